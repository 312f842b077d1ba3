"""The forgotten-password pages and sign-in by phone call ("press #"), in a real browser
(tests/webtest.py: a real organisation server on PostgreSQL, real TLS, Debian's chromium).

The voice gateway is the real process ``python -m simulators.voicegateway``: the server asks
it to call (``call_url``), and it posts the signed DTMF result to the server's
``/hooks/voice``, as a real gateway would. This module's ``web`` fixture is the harness's
server with phone call approval configured (``[delivery.voice] call_url`` and
``webhook_secret_file``), so ``browser`` and ``browser2`` use it.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO_ROOT, free_port
from orgtest import start_org_server
from token_agent.factors import voicecall
from webtest import (PASSWORD, Gateway, SmtpSink, WebServer, code_in, policy_text, wait_for)

MOBILE = "07700900123"
MOBILE_E164 = "+447700900123"
MASKED = "+44•••••123"
NEW = "a brand new passphrase"
SECRET = "voice-webhook-secret-for-the-pages-0123"


class VoiceGatewayProcess:
    def __init__(self, base: Path, webhook: str, ca_file: Path):
        self.secret_file = base / "voice-webhook.secret"
        self.secret_file.write_text(SECRET + "\n")
        self.secret_file.chmod(0o600)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulators.voicegateway", "--port", "0", "--webhook",
             webhook, "--secret-file", str(self.secret_file), "--answer", "#", "--delay", "0.5",
             "--ca-file", str(ca_file)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line
        self.url = line.split()[-1]

    def answer(self, key: str, delay: float | None = None) -> None:
        wanted = {"answer": key, **({"delay": delay} if delay is not None else {})}
        request = urllib.request.Request(self.url + "/control/answer", method="POST",
                                         data=json.dumps(wanted).encode())
        urllib.request.urlopen(request, timeout=5).read()

    def calls(self) -> list[dict]:
        return json.loads(urllib.request.urlopen(self.url + "/calls", timeout=5).read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def web(tmp_path, pg_url, web_server_dir) -> Iterator[WebServer]:
    """The pages' server, with phone call approval through the simulated voice gateway."""
    base = tmp_path / "web"
    base.mkdir()
    port = free_port()
    voice = VoiceGatewayProcess(base, f"https://localhost:{port}/hooks/voice",
                                web_server_dir / "ca.pem")
    smtp, gateway = SmtpSink(), Gateway()
    policy = base / "policy.toml"
    text = policy_text(smtp, gateway).replace(
        "[delivery.voice]\n", f'[delivery.voice]\ncall_url = "{voice.url}/v1/calls"\n'
                              f'webhook_secret_file = "{voice.secret_file}"\n')
    assert "call_url" in text
    policy.write_text(text)
    org = start_org_server(base, pg_url, server_dir=web_server_dir, port=port,
                           extra_config=f'[policy]\nfile = "{policy}"\n'
                                        f'[web]\npublic_url = "https://localhost:{port}"\n')
    server = WebServer(org, port, base, pg_url, policy, smtp, gateway)
    server.extra["voice"] = voice
    yield server
    org.stop()
    voice.stop()
    smtp.close()
    gateway.close()


def oathtool(secret: str) -> str:
    """The authenticator app's code now, by oathtool (not the project's own TOTP code),
    waiting out the end of a step and never a code already used."""
    from webtest import _USED

    used = _USED.setdefault(secret, set())
    while True:
        left = 30 - time.time() % 30
        if left < 3:
            time.sleep(left + 0.1)
            continue
        code = subprocess.run(["oathtool", "--totp", "-b", secret], check=True,
                              capture_output=True, text=True).stdout.strip()
        if code not in used:
            used.add(code)
            return code
        time.sleep(left + 0.1)


def texts(web: WebServer, number: str = MOBILE_E164) -> list[str]:
    return web.sms_to(number)


def next_text(web: WebServer, seen: int, number: str = MOBILE_E164) -> str:
    wait_for(lambda: len(texts(web, number)) > seen, what=f"a text to {number}")
    return texts(web, number)[-1]


def sign_in_with_app(page, username: str, password: str, secret: str) -> None:
    """Sign in with the password and the authenticator app, chosen from the second-factor
    menu (the user also has a mobile)."""
    page.open("/account/sign-in")
    page.fill("User name", username).fill("Password", password).click("Sign in")
    wait_for(lambda: "Second factor" in page.text(), what="the second-factor choice")
    page.choose("authenticator app").click("Continue")
    wait_for(lambda: "authenticator app" in page.text() and page.heading() == "Sign in"
             and "Second factor" not in page.text(), what="the code question")
    page.fill("Code from your authenticator app", oathtool(secret)).click("Continue")
    page.wait_heading("Your account")


def password_is(web: WebServer, username: str, password: str) -> bool:
    from token_agent.factors import password as password_factor

    with web.agent() as agent:
        user = agent.store.get_user(username)
        return password_factor.verify(agent.factors(), user.id, password).ok


def start_reset(page, username: str):
    page.open("/account/sign-in")
    page.click("Forgotten your password?")
    page.wait_heading("Reset your password")
    page.fill("User name", username).click("Continue")
    page.wait_heading("Prove it is you")
    return page


# --------------------------------------------------------------------------- forgotten password


def test_forgotten_password_with_the_app_and_a_text_message(web, browser, browser2):
    secret = web.add_user("alice", totp=True, mobile=MOBILE)
    other = browser2
    sign_in_with_app(other, "alice", PASSWORD, secret)  # a session the reset must end
    page = browser
    page.open("/account/sign-in").click("Forgotten your password?")
    page.wait_heading("Reset your password")
    page.axe()
    page.shot("recovery-start")
    page.click("Continue")
    wait_for(lambda: page.errors() == ["Enter your user name"], what="the missing name's error")
    page.axe()
    page.fill("User name", "alice").click("Continue")
    page.wait_heading("Prove it is you")
    page.axe()
    page.shot("recovery-method")
    page.click("Continue")
    wait_for(lambda: page.errors() == ["Choose how to prove it is you"], what="the choice's error")
    page.choose("A code from your authenticator app").click("Continue")
    page.wait_heading("Enter your code")
    page.axe()
    page.fill("Code", "000000").click("Continue")
    wait_for(lambda: page.errors(), what="the wrong code's error")
    assert "did not work" in page.errors()[0]
    page.axe()
    page.shot("recovery-code-error")
    page.fill("Code", oathtool(secret)).click("Continue")
    page.wait_heading("Prove a second method")
    assert "accepted" in page.text()
    assert "A code from your authenticator app" not in page.text()
    seen = len(texts(web))
    page.choose("A code sent by text message").click("Continue")
    page.wait_heading("Enter your code")
    assert "we have sent a code" in page.text()
    code = code_in(next_text(web, seen))
    page.fill("Code", code).click("Continue")
    page.wait_heading("Choose a new password")
    page.axe()
    page.shot("recovery-new-password")
    page.fill("New password", NEW).fill("Type the new password again", NEW + "!")
    page.click("Change password")
    wait_for(lambda: page.errors(), what="the passwords' error")
    assert page.errors() == ["The two passwords are not the same: type the new password twice."]
    page.axe()
    page.fill("New password", "alice").fill("Type the new password again", "alice")
    page.click("Change password")
    wait_for(lambda: "at least 8 characters" in " ".join(page.errors()), what="the rule's error")
    seen = len(texts(web))
    page.fill("New password", NEW).fill("Type the new password again", NEW)
    page.click("Change password")
    page.wait_heading("Your password has been changed")
    page.axe()
    page.shot("recovery-done")
    notice = next_text(web, seen)
    assert "password was reset" in notice and code not in notice

    # the other browser's session has ended; the new password works, the old one not
    other.open("/account")
    other.wait_heading("Sign in")
    assert password_is(web, "alice", NEW) and not password_is(web, "alice", PASSWORD)
    (event,) = web.events("recovery.reset", "alice")
    assert event.detail["kinds"] == ["totp", "sms"] and event.detail["web_sessions_ended"] >= 1
    # the reset is over: its pages start again
    page.open("/account/forgotten-password/new-password")
    page.wait_heading("Reset your password")


def test_one_method_is_refused_and_the_user_is_told(web, browser):
    web.add_user("bob", mobile=MOBILE)
    page = start_reset(browser, "bob")
    seen = len(texts(web))
    page.choose("A code sent by text message").click("Continue")
    page.wait_heading("Enter your code")
    page.fill("Code", code_in(next_text(web, seen))).click("Continue")
    page.wait_heading("Contact your IT service desk")
    assert "only one sign-in method" in page.text()
    page.axe()
    page.shot("recovery-refused")
    notice = next_text(web, seen + 1)
    assert "refused" in notice and "has not changed" in notice
    page.open("/account/forgotten-password/new-password")
    page.wait_heading("Contact your IT service desk")
    assert password_is(web, "bob", PASSWORD)  # it did not change


def test_forgotten_password_with_a_security_key_and_the_app(web, browser):
    """A key enrolled on the pages (Chromium's virtual authenticator) is one of the two."""
    from selenium.webdriver.common.virtual_authenticator import (
        Protocol, Transport, VirtualAuthenticatorOptions,
    )

    secret = web.add_user("gina", totp=True)
    page = browser
    page.driver.add_virtual_authenticator(VirtualAuthenticatorOptions(
        protocol=Protocol.CTAP2, transport=Transport.USB, has_resident_key=True,
        has_user_verification=True, is_user_verified=True))
    page.sign_in("gina", PASSWORD, totp_secret=secret)
    page.wait_heading("Your account")
    page.open("/account/keys/add").wait_heading("Add a security key or passkey")
    page.fill("Name for this key", "blue key").click("Add the key")
    page.wait_heading("Your security keys and passkeys")
    page.click("Sign out")
    wait_for(lambda: page.cookie("__Host-ta_session") is None, what="signed out")

    start_reset(page, "gina")
    page.choose("Your security key or passkey").click("Continue")
    page.wait_heading("Use your security key")
    page.axe()
    page.shot("recovery-key")
    page.click("Use your security key")
    page.wait_heading("Prove a second method")
    assert "Security key accepted" in page.text()
    assert "Your security key or passkey" not in page.text()
    page.choose("A code from your authenticator app").click("Continue")
    page.wait_heading("Enter your code")
    page.fill("Code", oathtool(secret)).click("Continue")
    page.wait_heading("Choose a new password")
    page.fill("New password", NEW).fill("Type the new password again", NEW)
    page.click("Change password")
    page.wait_heading("Your password has been changed")
    (event,) = web.events("recovery.reset", "gina")
    assert event.detail["kinds"] == ["key", "totp"]
    assert password_is(web, "gina", NEW)


def _journey(page, username: str, kind_label: str, code: str) -> list[str]:
    """What a person sees (the pages' text) for a reset of ``username`` until a code fails."""
    seen = []
    start_reset(page, username)
    seen.append(page.text())
    page.choose(kind_label).click("Continue")
    page.wait_heading("Enter your code")
    seen.append(page.text())
    page.fill("Code", code).click("Continue")
    wait_for(lambda: page.errors(), what="the wrong code's error")  # the same heading
    seen.append(page.text())
    page.click("Choose another method")
    page.wait_heading("Prove it is you")
    seen.append(page.text())
    return seen


def test_unknown_disabled_and_one_method_users_see_the_same_pages(web, browser):
    web.add_user("bob", mobile=MOBILE)  # one method: a mobile
    web.add_user("carol", totp=True, mobile="07700900456")
    with web.agent() as agent:
        agent.store.update_user("carol", disabled=True)
    carol_texts = len(texts(web, "+447700900456"))  # her enrolment code
    journeys = {name: _journey(browser, name, "A code sent by text message", "123456")
                for name in ("nobody", "carol")}
    journeys["bob"] = _journey(browser, "bob", "A code sent by text message",
                                        "123456")
    # bob holds the mobile: a code went to it, but what he sees is the same
    first = journeys["nobody"]
    assert all(seen == first for seen in journeys.values()), journeys
    assert "If the account has a mobile number" in first[1]
    assert len(texts(web, "+447700900456")) == carol_texts  # carol is disabled: nothing sent
    wait_for(lambda: len(texts(web)) == 2, what="bob's code")  # enrolment, then the reset's


# --------------------------------------------------------------------------- phone call approval


def _sign_in_by_call(web, page, username: str) -> None:
    page.open("/account/sign-in")
    page.fill("User name", username).fill("Password", PASSWORD).click("Sign in")
    wait_for(lambda: "phone call: press #" in page.text(), what="the second-factor choice")
    page.choose(f"phone call: press # ({MASKED})")
    page.click("Continue")


def test_sign_in_by_phone_call_press_hash(web, browser):
    web.add_user("dave", mobile=MOBILE)
    web.extra["voice"].answer("#", delay=4)  # long enough to see the wait page
    page = browser
    _sign_in_by_call(web, page, "dave")
    wait_for(lambda: f"We are calling {MASKED}: answer and press #" in page.text(),
             what="the call's wait page")
    page.axe()  # the waiting page moves on by a long poll, not a timed refresh
    page.shot("recovery-call-wait")
    page.wait_heading("Your account")
    (call,) = web.extra["voice"].calls()
    assert call["to"] == MOBILE_E164 and "press hash" in call["say"]
    assert call["webhook"]["status"] == 200, call
    login = web.events("login", "dave")[0]
    assert login.outcome == "success" and login.detail["second"] == "sms"
    (approved,) = [e for e in web.events("verify.sms", "dave")
                   if e.outcome == "success" and e.detail.get("channel") == "call"]
    assert approved.detail["call_id"] == call["call_id"]


@pytest.mark.parametrize("answer,words", [("1", "other than #"), ("none", "not answered")])
def test_phone_call_with_another_key_or_no_answer_fails(web, browser, answer, words):
    web.add_user("erin", mobile=MOBILE)
    web.extra["voice"].answer(answer)
    page = browser
    _sign_in_by_call(web, page, "erin")
    wait_for(lambda: words in page.text(), what=f"the failure ({words})")
    assert not web.events("login", "erin") or web.events("login", "erin")[0].outcome != "success"
    page.axe()


def _https(web: WebServer):
    import http.cookiejar

    context = ssl.create_default_context(cafile=str(web.org.server_dir / "ca.pem"))
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                         urllib.request.HTTPCookieProcessor(jar))

    def send(path: str, body: bytes | None = None, headers: dict | None = None):
        request = urllib.request.Request(web.url + path, data=body, headers=headers or {},
                                         method="POST" if body is not None else "GET")
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return send


def test_the_webhook_refuses_forgeries_and_floods_over_https(web):
    send = _https(web)

    def post(body: bytes, header: str | None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if header:
            headers[voicecall.SIGNATURE_HEADER] = header
        status, text = send("/hooks/voice", body, headers)
        return status, json.loads(text)

    key = SECRET.encode()
    body = json.dumps({"call_id": "A" * 22, "result": "pressed", "digits": "#"}).encode()
    now = int(time.time())
    status, answer = post(body, None)
    assert status == 401 and answer["error"] == "no-signature" and answer["message"]
    assert post(body, voicecall.sign(b"not-the-secret-at-all-0123", body, now))[0] == 401
    assert post(body, voicecall.sign(key, body, now - 600))[1]["error"] == "stale"
    bad = b"{not json"
    assert post(bad, voicecall.sign(key, bad, now))[1]["error"] == "malformed"
    assert post(body, voicecall.sign(key, body, now)) == (404, {
        "error": "unknown-call", "message": "no phone call with that id"})
    big = b" " * 10000
    assert post(big, voicecall.sign(key, big, now))[0] == 413
    # a flood from one address is cut off before it fills the audit log
    from token_agent.web import hooks

    codes = [post(body, None)[0] for _ in range(hooks.PER_MINUTE)]
    assert codes[-1] == 429 and codes.count(401) == hooks.PER_MINUTE - 6
    refused = web.events("call.webhook")  # all but the too-large body (never read) and the 429s
    assert len(refused) == hooks.PER_MINUTE - 1 and SECRET not in json.dumps(
        [e.detail for e in refused])


def test_reset_forms_need_their_csrf_token_and_are_rate_limited(web):
    import re as _re

    send = _https(web)
    status, page = send("/account/forgotten-password")
    assert status == 200
    token = _re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, page = send("/account/forgotten-password", b"username=alice", form)
    assert status == 403 and "This form has expired" in page
    from token_agent.web import recovery as pages

    per_user = pages.START_LIMITS[0]
    answers = [send("/account/forgotten-password",
                    f"csrf_token={token}&username=Alice".encode(), form)[0]
               for _ in range(per_user + 1)]
    # each start redirects to the methods page (followed: 200); then the name is throttled
    assert answers[:per_user] == [200] * per_user and answers[-1] == 429
    status, page = send("/account/forgotten-password",
                        f"csrf_token={token}&username=bob".encode(), form)
    assert status == 200 and "Prove it is you" in page  # another name is not held up
