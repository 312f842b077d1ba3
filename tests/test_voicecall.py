"""Phone call approval ("press #", token_agent/factors/voicecall.py).

The voice gateway is the real local process ``python -m simulators.voicegateway``; its signed
DTMF result goes to a small HTTP server of this test that runs ``voicecall.handle_webhook``
on its own store connection, as the organisation server's ``/hooks/voice`` does
(``tests/test_web_recovery.py`` drives that one through the browser). The webhook's attacks
(bad or missing signature, stale timestamp, replay, malformed JSON, an unknown call, a big
body) are each refused with their own 4xx and leave the call as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_mfa_login import PASSWORD, Script
from token_agent.agent import Agent
from token_agent.ceremonies import choices
from token_agent.ceremonies.login import Device, login
from token_agent.delivery import DeliveryConfigError, parse_delivery_config
from token_agent.factors import FactorContext, FactorError, lockout, password, voicecall
from token_agent.outcome import Reason
from token_agent.policy import parse_policy
from token_agent.store import Store

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "a-webhook-secret-for-tests-0123456789"
MOBILE = "+447700900123"


class Clock:
    """Real time (the gateway signs with it), moved on by ``advance``."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Hook(ThreadingHTTPServer):
    """The server's side of the webhook: ``handle_webhook`` on a store connection of its own."""

    daemon_threads = True

    def __init__(self, ctx: FactorContext):
        self.ctx = ctx
        self.answers: list[tuple[int, dict]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # noqa: ANN002
                pass

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    state = voicecall.handle_webhook(
                        ctx, self.headers.get(voicecall.SIGNATURE_HEADER), body)
                    status, answer = 200, {"state": state}
                except voicecall.WebhookError as e:
                    status, answer = e.status, e.to_json()
                hook.answers.append((status, answer))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        hook = self
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/voice"


class VoiceGateway:
    """``python -m simulators.voicegateway`` as a real process."""

    def __init__(self, tmp: Path, webhook: str, answer: str = "#"):
        secret_file = tmp / "voice-webhook.secret"
        secret_file.write_text(SECRET + "\n")
        secret_file.chmod(0o600)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulators.voicegateway", "--port", "0", "--webhook", webhook,
             "--secret-file", str(secret_file), "--answer", answer, "--delay", "0.2"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line
        self.url = line.split()[-1]
        self.secret_file = secret_file

    def answer(self, key: str) -> None:
        import urllib.request

        req = urllib.request.Request(self.url + "/control/answer", method="POST",
                                     data=json.dumps({"answer": key}).encode())
        urllib.request.urlopen(req, timeout=5).read()

    def calls(self) -> list[dict]:
        import urllib.request

        return json.loads(urllib.request.urlopen(self.url + "/calls", timeout=5).read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def policy_text(gateway_url: str, secret_file: Path, calls: bool = True) -> str:
    call = (f'call_url = "{gateway_url}/v1/calls"\nwebhook_secret_file = "{secret_file}"\n'
            if calls else "")
    return ('[codes]\nresend_seconds = 0\n[delivery]\nsender_name = "NHS Trust"\n'
            f'[delivery.voice]\nurl = "{gateway_url}/v1/messages"\n{call}')


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    store = Store.open(data / "token-agent.db")
    server_store = Store.open(data / "token-agent.db")  # the org server's connection
    placeholder = Agent.open(store=store, policy=parse_policy(""), clock=clock, environ={})
    hook = Hook(FactorContext(server_store, placeholder.keys, clock=clock))
    threading.Thread(target=hook.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    gateway = VoiceGateway(tmp_path, hook.url)
    agent = Agent.open(store=store, policy=parse_policy(policy_text(gateway.url,
                                                                    gateway.secret_file)),
                       clock=clock, environ={})
    hook.ctx.delivery = agent.delivery
    user = store.add_user("alice")
    password.set_password(agent.factors(), user.id, PASSWORD)
    method = store.add_method(user.id, "voice", "mobile", confirmed=True)
    store.add_contact(method.id, "voice", MOBILE, now=clock())
    store.set_preferred_method(user.id, method.id)

    class Env:
        pass

    e = Env()
    e.agent, e.ctx, e.store, e.clock, e.hook, e.gateway = (
        agent, agent.factors(), store, clock, hook, gateway)
    e.user, e.method, e.tmp = user, method, tmp_path
    yield e
    gateway.stop()
    hook.shutdown()
    hook.server_close()
    server_store.close()
    store.close()


def signed(body: bytes, at: float | None = None, secret: str = SECRET) -> str:
    return voicecall.sign(secret.encode(), body, int(time.time() if at is None else at))


# --------------------------------------------------------------------------- configuration


def test_call_approval_needs_both_keys_only_on_voice_and_no_inline_secret(tmp_path):
    ok = parse_delivery_config({"voice": {"url": "https://g.example/m", "call_url":
                                          "https://g.example/c",
                                          "webhook_secret_file": "/etc/ta/hook.secret"}})
    assert ok.channels["voice"].http.call_url == "https://g.example/c"
    cases = [
        ({"voice": {"url": "https://g.example/m", "call_url": "https://g.example/c"}},
         "delivery.voice.webhook_secret_file: missing"),
        ({"voice": {"url": "https://g.example/m", "webhook_secret_file": "/x"}},
         "delivery.voice.call_url: missing"),
        ({"sms": {"url": "https://g.example/m", "call_url": "https://g.example/c"}},
         "delivery.sms.call_url: unknown key"),
        ({"voice": {"url": "https://g.example/m", "call_url": "http://g.example/c",
                    "webhook_secret_file": "/x"}}, "delivery.voice.call_url: http://"),
        ({"voice": {"url": "https://g.example/m", "secret": "s3cret"}},
         "delivery.voice.secret: a secret does not go in the policy file"),
    ]
    for table, expected in cases:
        with pytest.raises(DeliveryConfigError) as e:
            parse_delivery_config(table)
        assert expected in str(e.value), (table, str(e.value))
        assert "s3cret" not in str(e.value)


# --------------------------------------------------------------------------- the calls


def test_press_hash_approves_through_the_real_gateway_process(env):
    result_seen = []
    v = voicecall.call_and_wait(env.ctx, env.method, result_seen.append, timeout=15)
    assert v.ok and v.kind == "voice", v
    assert result_seen == ["We are calling +44•••••123: answer and press #"]
    (call,) = env.gateway.calls()
    assert call["to"] == MOBILE and "press hash" in call["say"] and "NHS Trust" in call["say"]
    assert env.hook.answers == [(200, {"state": "approved"})]
    kinds = [(e.kind, e.outcome) for e in env.store.list_events(user_id=env.user.id, limit=50)]
    assert ("call.started", "success") in kinds and ("verify.voice", "success") in kinds


def test_another_key_fails_and_counts_on_the_lockout(env):
    env.gateway.answer("1")
    v = voicecall.call_and_wait(env.ctx, env.method, lambda m: None, timeout=15)
    assert not v.ok and v.reason is Reason.VERIFICATION_FAILED
    assert "other than #" in v.message and v.tries_left == env.ctx.lockout.max_failures - 1
    state = lockout.state(env.store, lockout.method_scope(env.method.id))
    assert state.failures == 1


def test_no_answer_and_busy_fail_without_counting(env):
    env.gateway.answer("none")
    v = voicecall.call_and_wait(env.ctx, env.method, lambda m: None, timeout=15)
    assert not v.ok and v.reason is Reason.TIMEOUT and "not answered" in v.message
    env.gateway.answer("busy")
    v = voicecall.call_and_wait(env.ctx, env.method, lambda m: None, timeout=15)
    assert not v.ok and v.reason is Reason.TIMEOUT and "busy" in v.message
    assert lockout.state(env.store, lockout.method_scope(env.method.id)).failures == 0


def test_login_offers_the_call_before_the_spoken_code_and_completes_on_hash(env):
    held = [m for m in env.store.list_methods(env.user.id) if m.kind != "password"]
    menu = choices.menu(env.ctx, held, ["voice"])
    assert [(c.key, c.call) for c in menu] == [("call:voice", True), ("voice", False)]
    assert menu[0].label == "phone call: press # (+44•••••123)"
    script = Script(PASSWORD)
    out = login(env.agent, "alice", interaction=script, device=Device("unmanaged", "pc-1"),
                second="call:voice", push_timeout=15)
    assert out.ok and out.method == "password+voice", out
    assert "We are calling +44•••••123: answer and press #" in script.infos
    # the spoken code stays as the fallback choice
    env.gateway.answer("none")
    script = Script(PASSWORD)
    out = login(env.agent, "alice", interaction=script, device=Device("unmanaged", "pc-2"),
                push_timeout=15)
    assert not out.ok and out.reason is Reason.TIMEOUT
    (prompt, options, default), = script.chose
    assert options == ["call:voice", "voice"] and default == "call:voice"


def test_no_call_choice_without_call_url(env):
    agent = Agent(store=env.store, keys=env.agent.keys, policy=parse_policy(
        policy_text(env.gateway.url, env.gateway.secret_file, calls=False)),
        data_dir=env.agent.data_dir, clock=env.clock)
    held = [m for m in env.store.list_methods(env.user.id) if m.kind != "password"]
    assert [c.key for c in choices.menu(agent.factors(), held, ["voice"])] == ["voice"]
    out = login(agent, "alice", interaction=Script(PASSWORD), device=Device("unmanaged", "x"),
                second="call:voice")
    assert not out.ok and out.reason is Reason.METHOD_NOT_ALLOWED
    assert "not available" in out.message


def test_calls_are_throttled_and_a_locked_or_email_method_is_never_called(env):
    env.gateway.answer("none")
    for _ in range(env.ctx.codes.max_sends):
        voicecall.start(env.ctx, env.method)
    with pytest.raises(FactorError) as e:
        voicecall.start(env.ctx, env.method)
    assert e.value.reason is Reason.RESEND_THROTTLED
    env.clock.advance(env.ctx.codes.ttl_seconds + 1)
    env.store.lock_until(lockout.method_scope(env.method.id), env.user.id, env.clock() + 600)
    with pytest.raises(FactorError) as e:
        voicecall.start(env.ctx, env.method)
    assert e.value.reason is Reason.METHOD_LOCKED
    email = env.store.add_method(env.user.id, "email", "work", confirmed=True)
    env.store.add_contact(email.id, "email", "alice@nhs.example", now=env.clock())
    with pytest.raises(FactorError) as e:
        voicecall.start(env.ctx, email)
    assert e.value.reason is Reason.METHOD_NOT_ALLOWED
    assert len(env.gateway.calls()) == env.ctx.codes.max_sends


def test_a_gateway_that_fails_cancels_the_call(env):
    env.gateway.stop()
    with pytest.raises(FactorError) as e:
        voicecall.start(env.ctx, env.method)
    assert e.value.reason is Reason.DELIVERY_FAILED and "+44•••••123" in e.value.message


def test_wait_cancel_and_expiry(env):
    env.gateway.answer("none")
    env.gateway.proc.terminate()  # no result will come
    env.gateway.proc.wait(10)
    env.gateway = VoiceGateway(env.tmp, "http://127.0.0.1:9/nowhere")
    agent = Agent(store=env.store, keys=env.agent.keys, policy=parse_policy(
        policy_text(env.gateway.url, env.gateway.secret_file)), data_dir=env.agent.data_dir,
        clock=env.clock)
    ctx = agent.factors()
    call = voicecall.start(ctx, env.method)
    cancel = threading.Event()
    cancel.set()
    v = voicecall.wait(ctx, call.id, timeout=5, cancel=cancel)
    assert v.reason is Reason.CANCELLED
    env.clock.advance(1)
    call = voicecall.start(ctx, env.method)
    v = voicecall.wait(ctx, call.id, timeout=0.3)
    assert v.reason is Reason.TIMEOUT and env.store.get_voice_call(call.id)["state"] == "expired"


# --------------------------------------------------------------------------- webhook attacks


def _pending_call(env) -> str:
    env.gateway.answer("none")
    env.gateway.proc.terminate()
    env.gateway.proc.wait(10)
    env.gateway = VoiceGateway(env.tmp, "http://127.0.0.1:9/nowhere")
    env.hook.ctx.delivery = env.ctx.delivery = Agent(
        store=env.store, keys=env.agent.keys, policy=parse_policy(
            policy_text(env.gateway.url, env.gateway.secret_file)),
        data_dir=env.agent.data_dir, clock=env.clock).delivery
    return voicecall.start(env.ctx, env.method).id


def _refused(env, header, body, status, code):
    with pytest.raises(voicecall.WebhookError) as e:
        voicecall.handle_webhook(env.hook.ctx, header, body)
    assert (e.value.status, e.value.code) == (status, code), e.value.to_json()
    assert e.value.message  # a sentence for whoever runs the gateway


def test_webhook_attacks_are_refused_and_leave_the_call_pending(env):
    call_id = _pending_call(env)
    body = json.dumps({"call_id": call_id, "result": "pressed", "digits": "#"}).encode()
    _refused(env, None, body, 401, "no-signature")
    _refused(env, "v1=abc", body, 400, "bad-signature-header")
    _refused(env, signed(body, secret="another-secret-of-the-same-length!!"), body, 401,
             "bad-signature")
    tampered = body.replace(b'"#"', b'"1"')
    _refused(env, signed(body), tampered, 401, "bad-signature")
    _refused(env, signed(body, at=time.time() - 301), body, 401, "stale")
    _refused(env, signed(body, at=time.time() + 301), body, 401, "stale")
    for bad in (b"not json", b"[1, 2]", json.dumps({"call_id": call_id}).encode(),
                json.dumps({"call_id": "x", "result": "pressed"}).encode(),
                json.dumps({"call_id": call_id, "result": "pressed", "digits": 5}).encode()):
        _refused(env, signed(bad), bad, 400, "malformed")
    big = b" " * (voicecall.MAX_BODY + 1)
    _refused(env, signed(big), big, 413, "too-large")
    unknown = json.dumps({"call_id": "A" * 22, "result": "pressed", "digits": "#"}).encode()
    _refused(env, signed(unknown), unknown, 404, "unknown-call")
    assert env.store.get_voice_call(call_id)["state"] == "pending"
    refused = env.store.list_events(kind="call.webhook", limit=50)
    assert len(refused) == 13 and all(e.outcome == "refused" for e in refused)
    assert all(SECRET not in json.dumps(e.detail) for e in refused)

    # the genuine result, once; the same delivery again is a replay
    assert voicecall.handle_webhook(env.hook.ctx, signed(body), body) == "approved"
    _refused(env, signed(body), body, 409, "already-finished")
    deny = json.dumps({"call_id": call_id, "result": "pressed", "digits": "1"}).encode()
    _refused(env, signed(deny), deny, 409, "already-finished")
    assert env.store.get_voice_call(call_id)["state"] == "approved"


def test_a_late_result_expires_the_call(env):
    call_id = _pending_call(env)
    env.clock.advance(voicecall.DEFAULT_TTL + 1)
    body = json.dumps({"call_id": call_id, "result": "pressed", "digits": "#"}).encode()
    # the signature's time is the gateway's real clock: signed now, the call's clock is later
    env.hook.ctx.clock = env.ctx.clock = lambda: time.time() + voicecall.DEFAULT_TTL + 1
    state = voicecall.handle_webhook(env.hook.ctx, signed(body, at=env.ctx.now()), body)
    assert state == "expired"


def test_webhook_without_call_approval_configured_is_404(env):
    env.hook.ctx.delivery = None
    body = b"{}"
    _refused(env, signed(body), body, 404, "not-configured")
