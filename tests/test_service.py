"""The service (token_agent/service/) as a real process on a real Unix socket: hello and the
peer's roles (SO_PEERCRED, with a child that becomes ``nobody``), key, password and TOTP
logins with their prompts answered over the socket, cancel and disconnect, authorisation
and its audit trail, concurrency (several users at once; a stuck client delays nobody),
restart (sessions survive; half-done enrolments are cleaned up), kill -9 during a key
enrolment, SIGTERM, the client commands, and no secret in the service's whole stderr.

Each test starts its own `token-agent serve` with a config.toml in tmp_path and the socket in
a fresh 0755 directory under /tmp (tmp_path's parents are 0700: ``nobody`` could not reach
it). Users and their methods are set up through the library on the same store."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from json_shapes import check_output
from token_agent.service.authz import Peer, Rules
from token_agent.service.client import Client, ServiceError, answers, wait_until_serving

PASSWORD = "correct horse battery"
WRONG_PASSWORD = "incorrect pony staple"
KEY_PIN = "246810"
WRONG_PIN = "135799"
NOBODY = 65534
IS_ROOT = os.geteuid() == 0
START_TIMEOUT = 20.0

#: no second factor for these users (class internal, MFA not enforced nor turned on)
NO_MFA_POLICY = "[classes.internal]\nenforce = false\n"


# --------------------------------------------------------------------------- the process


def leaks(secret: str, text: str) -> bool:
    if secret.isdigit():  # a short code: not as part of a longer number or an id
        return re.search(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", text) is not None
    return secret in text


@dataclass
class ServiceProcess:
    config: Path
    socket: Path
    data: Path
    log: Path
    env: dict
    proc: subprocess.Popen | None = None
    logs: list[str] = field(default_factory=list)  # stderr of earlier runs (restarts)

    def start(self) -> "ServiceProcess":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            token_agent_command() + ["serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO_ROOT, env=self.env,
            start_new_session=True)
        out.close()
        try:
            wait_until_serving(self.socket, process=self.proc, timeout=START_TIMEOUT)
        except ServiceError as e:
            raise AssertionError(f"{e}:\n{self.output()}") from None
        return self

    def client(self, timeout: float = 15.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int, wait: float = 10.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(wait)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


@pytest.fixture
def socket_dir():
    """A fresh directory for the socket that ``nobody`` can traverse (0755, under /tmp)."""
    d = Path(tempfile.mkdtemp(prefix="token-agent-svc-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Services:
    """Starts services for a test; every secret a test registers (``secrets.append``) is
    looked for in every started service's whole stderr at teardown."""

    def __init__(self, tmp_path: Path, socket_dir: Path) -> None:
        self.tmp = tmp_path
        self.socket_dir = socket_dir
        self.started: list[ServiceProcess] = []
        self.secrets: list[str] = [PASSWORD, WRONG_PASSWORD, KEY_PIN, WRONG_PIN]
        self.policy = tmp_path / "policy.toml"
        self.policy.write_text("")
        self.data = tmp_path / "data"

    def __call__(self, extra: str = "", *, start: bool = True, log_format: str = "json",
                 name: str = "svc", prompt_timeout: float = 30, max_connections: int = 256,
                 cards: str = 'lock_command = "true"') -> ServiceProcess:
        sock = self.socket_dir / f"{name}.sock"
        config = self.tmp / f"{name}.toml"
        config.write_text(textwrap.dedent(f"""\
            [service]
            socket = "{sock}"
            prompt_timeout = {prompt_timeout}
            max_connections = {max_connections}
            [store]
            data_dir = "{self.data}"
            [policy]
            file = "{self.policy}"
            [cards]
            {cards}
            [logging]
            level = "info"
            format = "{log_format}"
        """) + textwrap.dedent(extra))
        env = environ_for_agent()
        env["PYTHONUNBUFFERED"] = "1"
        svc = ServiceProcess(config, sock, self.data, self.tmp / f"{name}.log", env)
        self.started.append(svc)
        return svc.start() if start else svc

    def check_no_secrets(self) -> None:
        for svc in self.started:
            text = svc.output()
            for s in self.secrets:
                assert not leaks(s, text), f"secret {s!r} in the service's stderr:\n{text}"


@pytest.fixture
def services(tmp_path, socket_dir):
    s = Services(tmp_path, socket_dir)
    yield s
    for svc in s.started:
        svc.stop()
        # shown with a failing test's report ("Captured stdout teardown")
        print(f"--- {svc.config.name}: the service's stderr ---\n{svc.output()[-20000:]}")
    s.check_no_secrets()


class World:
    """The test's side of the store: users and their methods, through the library."""

    def __init__(self, services: Services, clock=None) -> None:
        from token_agent.agent import Agent
        from token_agent.store import Store
        from token_agent.paths import data_dir, store_path

        directory = data_dir(services.data)
        store = Store.open(store_path(directory), **({"clock": clock} if clock else {}))
        self.agent = Agent.open(directory, store=store, policy_path=services.policy)
        self.store = self.agent.store
        self.services = services

    def user(self, name: str, *, password: bool = False, totp: bool = False,
             mfa: bool = True, roles=()):
        from token_agent.factors import password as password_factor

        user = self.store.add_user(name, roles=list(roles))
        if not mfa:
            self.store.update_user(name, mfa_enabled=False)
        if password:
            password_factor.set_password(self.agent.factors(), user.id, PASSWORD)
        if totp:
            return user, self.totp(user)
        return user

    def totp(self, user) -> "TotpCodes":
        from token_agent.factors import totp

        pending = totp.begin_enrol(self.agent.factors(), user.id)
        codes = TotpCodes(pending.secret)
        self.services.secrets.append(pending.secret)
        result = totp.confirm_enrol(self.agent.factors(), user.id, codes.now())
        assert result.ok, result
        return codes

    def events(self, kind: str, **detail) -> list:
        return [e for e in self.store.list_events(kind=kind, limit=1000)
                if all(e.detail.get(k) == v for k, v in detail.items())]

    def close(self) -> None:
        self.agent.close()


class TotpCodes:
    """Codes of one authenticator app: the current step's, then always a later one (the
    agent accepts one step either side of now, and never the same step twice)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.step = None

    def _code(self, step: int) -> str:
        from token_agent.factors.totp import code_at

        self.step = step
        return code_at(self.secret, step * 30)

    def now(self) -> str:
        return self._code(int(time.time() // 30))

    def next(self) -> str:
        current = int(time.time() // 30)
        step = max(current - 1, (self.step if self.step is not None else current - 1) + 1)
        assert step <= current + 1, "no fresh TOTP step inside the window"
        return self._code(step)


@pytest.fixture
def world(services):
    w = World(services)
    yield w
    w.close()


def nobody(socket_path: Path, *requests: tuple[str, dict]) -> list[dict]:
    """Send ``requests`` as ``nobody`` (a child that drops to uid/gid 65534 first); one
    ``{"ok", "result" | "code", "message"}`` per request."""
    script = textwrap.dedent(f"""
        import json, os, sys
        from token_agent.service.client import Client, ServiceError  # before: the
        if os.geteuid() == 0:                    # interpreter may live where nobody cannot read
            os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        assert os.geteuid() == {NOBODY}
        out = []
        with Client(sys.argv[1], timeout=15) as c:
            for op, args in json.loads(sys.argv[2]):
                try:
                    out.append({{"ok": True, "result": c.request(op, **args)}})
                except ServiceError as e:
                    out.append({{"ok": False, "code": e.code, "message": e.message}})
        print(json.dumps(out))
    """)
    return run_script(script, str(socket_path), json.dumps(requests))


def run_script(script: str, *args: str):
    """Run a Python ``script`` (one that drops to ``nobody`` itself) in a child with ``args``;
    the last line it prints, as JSON."""
    proc = subprocess.run([sys.executable, "-c", script, *args],
                          cwd="/", capture_output=True, text=True, timeout=60,
                          env=environ_for_agent()
                          | {"PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def key_env(server) -> dict:
    return {"TOKEN_AGENT_SIM_KEYS": server.address}


def set_key_pin(server, pin: str = KEY_PIN) -> None:
    from drivers.fido.keys import open_single_key

    with open_single_key(key_env(server), on_touch=None) as key:
        key.set_pin(pin)


def toucher(server):
    """An ``on_event`` that touches the (manual-presence) key when the service relays the
    key's request for a touch; the infos it saw are in ``.infos``."""
    from simulators.key.control import KeyControl

    control = KeyControl(port=server.control_port)

    def on_event(event: dict) -> None:
        if event["event"] == "info":
            on_event.infos.append(event["message"])
            if event["message"] == "Touch your security key":
                control.touch()

    on_event.infos = []
    return on_event


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g} s")


# --------------------------------------------------------------------------- hello, roles


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become nobody (SO_PEERCRED test)")
def test_hello_and_the_peer_from_so_peercred(services):
    svc = services()
    with svc.client() as c:
        hello = c.request("hello")
    assert hello["version"] == 1 and hello["agent"] == "0.1.0"
    assert hello["peer"]["uid"] == 0 and hello["peer"]["user"] == "root"
    assert hello["peer"]["roles"] == ["root", "admin", "user"]
    assert hello["peer"]["pid"] == os.getpid()
    assert hello["service"]["connections"] >= 1 and hello["service"]["ceremonies"] == 0

    [as_nobody] = nobody(svc.socket, ("hello", {}))
    peer = as_nobody["result"]["peer"]
    assert peer["uid"] == NOBODY and peer["user"] == "nobody" and peer["roles"] == ["user"]
    assert peer["pid"] != os.getpid()


def test_roles_from_groups_login_services_and_agent_users(world):
    nobody_peer = Peer(pid=1, uid=NOBODY, gid=NOBODY, user="nobody", groups=(NOBODY,))
    import grp

    group = grp.getgrgid(NOBODY).gr_name
    assert Rules().roles(nobody_peer) == ["user"]
    assert Rules(admin_group=group).roles(nobody_peer) == ["admin", "user"]
    assert Rules(login_service_users=("nobody",)).roles(nobody_peer) == ["login-service", "user"]
    assert Rules(admin_group="no-such-group-here").roles(nobody_peer) == ["user"]
    # an agent user of the caller's name with the role admin
    world.store.add_user("nobody", roles=["admin"])
    assert Rules().roles(nobody_peer, world.store) == ["admin", "user"]
    world.store.update_user("nobody", roles=[])
    assert Rules().roles(nobody_peer, world.store) == ["user"]
    unnamed = Peer(pid=1, uid=4242, gid=4242, user=None)
    assert Rules().roles(unnamed, world.store) == []


def test_bad_requests(services):
    svc = services()
    with svc.client() as c:
        for op, args, fragment in (("no.such.op", {}, "unknown op"),
                                   ("login.start", {"usr": "alice"}, "unknown argument(s): usr"),
                                   ("login.answer", {"login": "x"}, "missing argument 'prompt'"),
                                   ("methods.list", {"user": 3}, "wrong type"),
                                   ("login.start", {"user": "alice", "primary": "pin"},
                                    "primary must be")):
            with pytest.raises(ServiceError) as info:
                c.request(op, **args)
            assert info.value.code == "bad-request" and fragment in info.value.message
        with pytest.raises(ServiceError) as info:
            c.request("login.answer", login="nope", prompt=1, value=None)
        assert info.value.code == "not-found"
    # not JSON: bad-request, then the service closes the connection; it serves the next one
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(svc.socket))
    raw.sendall(b"this is not json\n")
    answer = raw.makefile("rb").readline()
    assert json.loads(answer)["error"]["code"] == "bad-request"
    assert raw.recv(10) == b""
    raw.close()
    with svc.client() as c:
        assert c.request("hello")["version"] == 1


# --------------------------------------------------------------------------- key logins


@pytest.mark.sim_key(presence="manual")
def test_key_enrolment_and_login_over_the_socket(services, world, sim_key_server):
    set_key_pin(sim_key_server)
    world.user("alice")
    svc = services(f'[keys]\nsimulators = ["{sim_key_server.address}"]\ntimeout = 10\n')
    prompts: list[dict] = []

    def pin(event):
        prompts.append(event)
        return KEY_PIN

    with svc.client() as c:
        touch = toucher(sim_key_server)
        login = c.request("enrol.key", user="alice", name="blue key")["login"]
        enrolled = c.run_ceremony(login, pin, on_event=touch)
        assert enrolled["ok"] and enrolled["name"] == "blue key" and enrolled["user"] == "alice"
        assert enrolled["user_verified"] and touch.infos == ["Touch your security key"]

        touch = toucher(sim_key_server)
        started = time.perf_counter()
        outcome = c.login("alice", pin, on_event=touch, primary="key")
        elapsed = time.perf_counter() - started
        assert outcome["ok"], outcome
        assert outcome["method"] == "key" and outcome["user"] == "alice"
        assert outcome["multi_factor"] and outcome["user_verified"]
        assert outcome["credential"] == "blue key" and outcome["session"]
        assert touch.infos == ["Touch your security key"]
        assert [p["message"] for p in prompts] == ["Enter the PIN for your security key"] * 2
        assert all(p["kind"] == "secret" for p in prompts)
        print(f"\nkey login over the socket (PIN + touch by the test): {elapsed * 1000:.0f} ms")

        # the wrong PIN: a failure with the tries left, and no touch asked for
        touch = toucher(sim_key_server)
        wrong = c.login("alice", answers(WRONG_PIN), on_event=touch, primary="key")
        assert not wrong["ok"] and wrong["reason"] == "wrong-pin"
        assert re.search(r"\d+ tries left", wrong["message"]), wrong["message"]
        assert touch.infos == []
        sessions = c.request("session.state", user="alice")["sessions"]
        assert [s["method"] for s in sessions] == ["key"] and sessions[0]["state"] == "active"
    assert [e.outcome for e in world.store.list_events(kind="login.key")][:2] == \
        ["failure", "success"]


def test_with_two_keys_the_one_holding_the_credential_is_used(services, world,
                                                              sim_key_factory):
    from drivers.fido.keys import open_single_key
    from token_agent.ceremonies.key import enrol_key

    first, second = sim_key_factory(), sim_key_factory()
    for server in (first, second):
        set_key_pin(server)
    world.user("alice")
    with open_single_key(key_env(second), on_touch=None) as key:
        enrol_key(world.store, key, "alice", name="second key", pin_provider=lambda: KEY_PIN)
    svc = services(f'[keys]\nsimulators = ["{first.address}", "{second.address}"]\n')
    with svc.client() as c:
        for _ in range(3):  # every time, without asking for a touch to choose
            seen = []
            outcome = c.login("alice", answers(KEY_PIN), primary="key", on_event=seen.append)
            assert outcome["ok"] and outcome["credential"] == "second key", outcome
            assert not [e for e in seen if e["event"] == "info"]


# --------------------------------------------------------------------------- password + TOTP


def test_password_and_totp_login_then_cancel(services, world):
    _alice, codes = world.user("alice", password=True, totp=True)
    svc = services(log_format="text")
    seen: list[dict] = []

    def reply(event):
        seen.append(event)
        return PASSWORD if event["message"] == "Password" else codes.next()

    with svc.client() as c:
        outcome = c.login("alice", reply, device={"kind": "unmanaged"})
        assert outcome["ok"], outcome
        assert outcome["method"] == "password+totp" and outcome["multi_factor"]
        assert [(e["kind"], e["message"]) for e in seen] == [
            ("secret", "Password"), ("secret", "Code from your authenticator app")]
        services.secrets.extend(codes_used := [codes._code(codes.step)])

        # login.cancel at the first prompt: the result says cancelled
        login = c.request("login.start", user="alice")["login"]
        prompt = c.next_event(kind="prompt", login=login)
        assert prompt["message"] == "Password"
        assert c.request("login.cancel", login=login) == {}
        result = c.next_event(kind="result", login=login)
        assert not result["outcome"]["ok"] and result["outcome"]["reason"] == "cancelled"
        with pytest.raises(ServiceError) as info:  # it is over
            c.request("login.answer", login=login, prompt=prompt["prompt"], value=PASSWORD)
        assert info.value.code == "not-found"

        # a wrong password: refused in the same words as an unknown user, after the same
        # prompt, and with no tries left: no factor has succeeded (issue 11, item 10)
        asked: dict[str, list] = {"alice": [], "mallory": []}
        results = {}
        for name in asked:
            results[name] = c.login(name, lambda event, name=name: asked[name].append(
                (event["kind"], event["message"])) or WRONG_PASSWORD)
        wrong, stranger = results["alice"], results["mallory"]
        assert not wrong["ok"] and wrong["reason"] == "wrong-password"
        assert stranger["reason"] == "unknown-user"
        assert asked["alice"] == asked["mallory"] == [("secret", "Password")]
        assert wrong["message"] == stranger["message"] == "Authentication failed."
        assert wrong["user_id"] is stranger["user_id"] is None
        assert "tries_left" not in wrong["detail"]
    assert world.events("service.cancel", cause="login.cancel", login=login)
    text = svc.output()
    assert "login finished" in text and " INFO token_agent.service: " in text
    for s in [PASSWORD, WRONG_PASSWORD, codes.secret, *codes_used]:
        assert not leaks(s, text)


def test_client_gone_mid_prompt_cancels_the_login(services, world):
    world.user("alice", password=True)
    svc = services()
    c = svc.client()
    login = c.request("login.start", user="alice")["login"]
    assert c.next_event(kind="prompt")["message"] == "Password"
    c.close()  # gone, the prompt unanswered
    wait_for(lambda: world.events("service.cancel", cause="disconnect", login=login),
             what="the cancellation recorded")
    failed = wait_for(lambda: [e for e in world.store.list_events(kind="login")
                               if e.detail.get("reason") == "cancelled"], what="login failure")
    assert failed[0].username == "alice" and failed[0].outcome == "failure"
    with svc.client() as c2:  # the service carries on
        assert c2.request("hello")["service"]["ceremonies"] == 0
    # its log: one JSON object per line, with the record's fields
    records = [json.loads(line) for line in svc.output().splitlines()]
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    [gone] = [r for r in records if r["message"] == "client went away mid-ceremony: cancelled"]
    assert gone["login"] == login and gone["level"] == "info" and gone["op"] == "login.start"


def test_an_unanswered_prompt_times_out_and_connections_are_limited(services, world):
    world.user("alice", password=True)
    svc = services(prompt_timeout=1, max_connections=3)
    with svc.client() as c:
        started = time.perf_counter()
        login = c.request("login.start", user="alice")["login"]
        c.next_event(kind="prompt")
        result = c.next_event(kind="result", timeout=5)
        waited = time.perf_counter() - started
        assert result["outcome"]["reason"] == "cancelled" and 1.0 <= waited < 3.0, waited
        assert world.events("service.cancel", cause="prompt-timeout", login=login)
        # three connections at once (this one included); a fourth is turned away
        with svc.client() as second, svc.client() as third:
            assert second.request("hello") and third.request("hello")
            with pytest.raises(ServiceError) as info:
                with svc.client() as fourth:
                    fourth.request("hello")
            assert info.value.code == "unavailable" and "too many" in info.value.message

        def room_again():  # once the others left: this one and the probe
            try:
                with svc.client() as probe:
                    return probe.request("hello")["service"]["connections"] == 2
            except ServiceError:  # the service has not seen them leave yet: still full
                return False

        wait_for(room_again, what="the connections closed")


def test_local_users_cannot_take_every_connection():
    """``connections.admit``: per-uid caps, the eighth kept for root and the login services,
    and, once the users' share is full, an idle connection of the heaviest holder given up
    for a user holding fewer (connections cannot be pooled by a few accounts)."""
    from types import SimpleNamespace

    from token_agent.service.connections import LOGIN, PUBLIC, admit

    login_uids = frozenset({0, 120})
    opened = iter(range(1000))

    def conn(uid, *, busy=False, listener=PUBLIC):
        return SimpleNamespace(peer=SimpleNamespace(uid=uid), listener=listener,
                               ceremonies={"x": 1} if busy else {}, opened=next(opened))

    def check(conns, uid, listener=PUBLIC):
        return admit(conns, uid, listener=listener, login_uids=login_uids, limit=16, per_user=4)

    alice, bob, c, d, e = 1000, 1001, 1002, 1003, 1004
    assert check([conn(alice)] * 3, alice) == (True, None)
    assert check([conn(alice)] * 4, alice) == (False, None)    # the per-user cap
    assert check([conn(alice)] * 4, bob) == (True, None)
    # 14 of 16 held by users: their share is full; e holds none, alice (among others) 4:
    # alice's oldest idle connection makes room
    held = [conn(alice, busy=True), *[conn(alice) for _ in range(3)],
            *[conn(bob) for _ in range(4)], *[conn(c) for _ in range(4)], conn(d), conn(d)]
    ok, evicted = check(held, e)
    assert ok and evicted is held[1]                            # not the busy one
    # nobody holds more than d would after: refused
    assert check([conn(u) for u in range(2000, 2014)], e) == (False, None)
    # every connection of the heaviest busy: refused
    assert check([*[conn(alice, busy=True) for _ in range(4)],
                  *[conn(u) for u in range(2000, 2010)]], e) == (False, None)
    assert check(held, 120) == (True, None) and check(held, 0) == (True, None)
    assert check([conn(120)] * 16, 0) == (False, None)         # 16 in all: nobody else
    # the login socket counts apart: a full public socket leaves it open
    assert check([conn(alice)] * 16, 0, LOGIN) == (True, None)
    assert check([conn(0, listener=LOGIN)] * 16, 0, LOGIN) == (False, None)


# --------------------------------------------------------------------------- authorisation


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become nobody (SO_PEERCRED test)")
def test_who_may_ask_what(services, world):
    alice = world.user("alice", password=True)
    svc = services()
    results = nobody(svc.socket,
                     ("login.start", {"user": "alice"}),
                     ("methods.list", {"user": "nobody"}),   # no agent user "nobody" yet
                     ("methods.list", {"user": "alice"}),
                     ("enrol.backup-codes", {"user": "alice"}),
                     ("admin.unlock", {"user": "alice"}),
                     ("admin.reset-methods", {"user": "alice"}),
                     ("session.state", {"user": "alice"}),
                     ("login.start", {"user": None, "device": {"kind": "managed",
                                                                "network": "10.0.0.1"}}))
    assert [r.get("code") for r in results[:7]] == ["forbidden"] * 7, results
    assert results[7]["ok"]  # user null: nobody's own login (its device claim ignored)
    refused = world.events("service.refused", peer_uid=NOBODY)
    ops = sorted(e.detail["op"] for e in refused)
    assert ops == sorted(["login.start", "methods.list", "methods.list", "enrol.backup-codes",
                          "admin.unlock", "admin.reset-methods", "session.state"]), ops
    assert all(e.outcome == "refused" and e.detail["peer_user"] == "nobody" for e in refused)
    assert any(e.detail["target"] == "alice" and e.detail["op"] == "login.start"
               for e in refused)

    # an agent user "nobody": now nobody manages its own methods, and only its own
    world.store.add_user("nobody")
    results = nobody(svc.socket,
                     ("methods.list", {"user": "nobody"}),
                     ("enrol.backup-codes", {"user": "nobody"}),
                     ("methods.list", {"user": "nobody"}),
                     ("session.state", {"user": None}),
                     ("methods.list", {"user": "alice"}),
                     ("admin.unlock", {"user": "nobody"}))
    assert results[0] == {"ok": True, "result": {"methods": []}}
    assert len(results[1]["result"]["codes"]) == 10
    services.secrets.extend(results[1]["result"]["codes"])
    assert [m["kind"] for m in results[2]["result"]["methods"]] == ["backup"]
    assert results[3] == {"ok": True, "result": {"sessions": []}}
    assert [r.get("code") for r in results[4:]] == ["forbidden", "forbidden"]

    # root is an admin: every op, for anyone
    with svc.client() as c:
        assert c.request("admin.unlock", user="alice") == {"cleared": []}
        c.request("enrol.backup-codes", user="alice")
        assert {m["kind"] for m in c.request("methods.list", user="alice")["methods"]} == \
            {"password", "backup"}
        assert c.request("admin.reset-methods", user="alice") == {"removed": 1}
        with pytest.raises(ServiceError) as info:
            c.request("methods.list", user="mallory")
        assert info.value.code == "not-found"
    assert world.events("admin.reset-methods", actor="root", removed=1)
    assert [m.kind for m in world.store.list_methods(alice.id)] == ["password"]



def test_admin_reset_methods_include_password_over_the_socket(services, world):
    """The service's admin.reset-methods takes include_password, as the CLI's
    --include-password: without it the password stays, with it the password goes too."""
    alice = world.user("alice", password=True)
    bob = world.user("bob", password=True)
    svc = services()
    with svc.client() as c:
        for user in ("alice", "bob"):
            services.secrets.extend(c.request("enrol.backup-codes", user=user)["codes"])
        assert c.request("admin.reset-methods", user="alice") == {"removed": 1}
        assert c.request("admin.reset-methods", user="bob", include_password=True) == \
            {"removed": 2}
        with pytest.raises(ServiceError) as info:
            c.request("admin.reset-methods", user="bob", include_password="yes")
        assert info.value.code == "bad-request"
    assert [m.kind for m in world.store.list_methods(alice.id)] == ["password"]
    assert world.store.list_methods(bob.id) == []
    assert world.events("admin.reset-methods", actor="root", removed=2,
                        kinds=["backup_codes", "password"])

def test_methods_enrolment_and_policy_over_the_socket(services, world):
    world.user("alice", password=True)
    svc = services()
    with svc.client() as c:
        pending = c.request("enrol.totp", user="alice")
        services.secrets.append(pending["secret"])
        assert pending["uri"].startswith("otpauth://totp/") and pending["text"]
        codes = TotpCodes(pending["secret"])
        wrong = c.request("enrol.totp.confirm", user="alice", code="000000")
        assert wrong["ok"] is False and wrong["reason"] == "wrong-code"
        confirmed = c.request("enrol.totp.confirm", user="alice", code=codes.now())
        assert confirmed["ok"] is True
        kinds = [m["kind"] for m in c.request("methods.list", user="alice")["methods"]]
        assert kinds == ["password", "totp"]
        assert c.request("methods.prefer", user="alice", kind="password") == {}
        [pw] = [m for m in c.request("methods.list", user="alice")["methods"]
                if m["kind"] == "password"]
        assert pw["preferred"]
        explained = c.request("policy.explain", user="alice", device={"kind": "unmanaged"})
        assert explained["mfa_required"] and "second factor" in explained["text"]
        assert explained["device"]["joined"] is False
        # a joined workstation is the organisation server's word, never a caller's claim
        with pytest.raises(ServiceError) as info:
            c.request("policy.explain", user="alice", device={"kind": "managed", "joined": True})
        assert info.value.code == "bad-request" and "joined" in str(info.value)
        with pytest.raises(ServiceError) as info:  # her last second factor: MFA is enforced
            c.request("methods.remove", user="alice", kind="totp")
        assert info.value.code == "conflict" and "last second factor" in str(info.value)
        services.secrets.extend(c.request("enrol.backup-codes", user="alice")["codes"])
        assert c.request("methods.remove", user="alice", kind="totp") == {}
        with pytest.raises(ServiceError) as info:
            c.request("methods.remove", user="alice", kind="totp")
        assert info.value.code == "not-found"


# --------------------------------------------------------------------------- concurrency


def test_concurrent_logins_and_a_stuck_client(services, world):
    services.policy.write_text(NO_MFA_POLICY)
    names = [f"user{i}" for i in range(6)]
    for name in [*names, "stuck"]:
        world.user(name, password=True, mfa=False)
    svc = services(prompt_timeout=60)

    # a client that starts a login and never answers
    stuck = svc.client()
    stuck_login = stuck.request("login.start", user="stuck")["login"]
    assert stuck.next_event(kind="prompt")["message"] == "Password"

    # another user's login is not held up by it
    with svc.client() as c:
        started = time.perf_counter()
        outcome = c.login("user0", answers(PASSWORD))
        alone = time.perf_counter() - started
        assert outcome["ok"], outcome
        # nor is another login of the stuck client's own user
        started = time.perf_counter()
        assert c.login("stuck", answers(PASSWORD))["ok"]
        same_user = time.perf_counter() - started
    assert alone < 1.0 and same_user < 1.0, (alone, same_user)

    # several users at once, each on its own connection
    results: dict[str, dict] = {}
    times: dict[str, float] = {}

    def one(name: str) -> None:
        with svc.client() as c:
            t = time.perf_counter()
            results[name] = c.login(name, answers(PASSWORD))
            times[name] = time.perf_counter() - t

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wall = time.perf_counter() - started
    assert sorted(results) == sorted(names)
    assert all(r["ok"] and r["user"] == n for n, r in results.items()), results
    print(f"\none login beside a stuck client: {alone * 1000:.0f} ms (same user: "
          f"{same_user * 1000:.0f} ms); {len(names)} concurrent password logins: "
          f"{wall * 1000:.0f} ms wall, slowest {max(times.values()) * 1000:.0f} ms")
    with svc.client() as c:
        assert c.request("hello")["service"]["ceremonies"] == 1  # the stuck one, still waiting
    stuck.request("login.cancel", login=stuck_login)
    assert not stuck.next_event(kind="result")["outcome"]["ok"]
    stuck.close()


# --------------------------------------------------------------------------- restarts


def test_sessions_survive_a_restart_and_sigterm_exits_cleanly(services, world):
    services.policy.write_text(NO_MFA_POLICY)
    alice = world.user("alice", password=True, mfa=False)
    svc = services()
    with svc.client() as c:
        outcome = c.login("alice", answers(PASSWORD))
        assert outcome["ok"]
        before = c.request("session.state", user="alice")["sessions"]
    assert [s["id"] for s in before] == [outcome["session"]]

    # a half-done enrolment left 11 minutes ago (a crash between start and confirmation)
    from token_agent.factors import totp

    old = World(services, clock=lambda: time.time() - 660)
    totp.begin_enrol(old.agent.factors(), alice.id, name="old phone")
    old.close()
    totp.begin_enrol(world.agent.factors(), alice.id, name="new phone")  # recent: kept

    pending = svc.client()  # a login waiting at its prompt when the service is stopped
    waiting = pending.request("login.start", user="alice")["login"]
    pending.next_event(kind="prompt")
    assert svc.signal(signal.SIGTERM) == 0
    assert not svc.socket.exists()
    assert pending.next_event(kind="result")["outcome"]["reason"] == "cancelled"
    pending.close()
    assert world.events("service.cancel", cause="shutdown", login=waiting)
    svc.start()
    # a second service on the same socket refuses to start (exit 1), touching nothing
    second = subprocess.run(token_agent_command() + ["serve", "--config", str(svc.config)],
                            capture_output=True, text=True, cwd=REPO_ROOT, env=svc.env,
                            timeout=30)
    assert second.returncode == 1
    assert "another token-agent service is listening" in second.stderr
    with svc.client() as c:
        after = c.request("session.state", user="alice")["sessions"]
    assert after == before and after[0]["state"] == "active" and after[0]["user"] == "alice"
    names = [m.name for m in world.store.list_methods(alice.id) if not m.confirmed]
    assert names == ["new phone"]
    [cleanup] = world.events("service.cleanup")
    assert cleanup.detail["name"] == "old phone" and cleanup.username == "alice"


def test_sighup_reloads_the_policy_and_a_broken_file_changes_nothing(services, world):
    world.user("alice", password=True)
    svc = services()
    with svc.client() as c:
        assert c.request("policy.explain", user="alice")["mfa_required"] is True
        services.policy.write_text(NO_MFA_POLICY)
        world.store.update_user("alice", mfa_enabled=False)
        svc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: c.request("policy.explain", user="alice")["mfa_required"] is False,
                 what="the new policy in force")
        good = svc.config.read_text()
        svc.config.write_text(good + "[servce]\n")
        services.policy.write_text("")
        svc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in svc.output(), what="the reload refused")
        assert c.request("policy.explain", user="alice")["mfa_required"] is False
    assert svc.proc.poll() is None
    svc.config.write_text(good)


@pytest.mark.sim_key(presence="manual")
def test_kill_9_during_a_key_enrolment_leaves_nothing_half_done(services, world, sim_key_server):
    from simulators.key.control import KeyControl

    set_key_pin(sim_key_server)
    alice = world.user("alice")
    svc = services(f'[keys]\nsimulators = ["{sim_key_server.address}"]\ntimeout = 20\n')
    c = svc.client()
    login = c.request("enrol.key", user="alice")["login"]
    prompt = c.next_event(kind="prompt", login=login)
    c.request("login.answer", login=login, prompt=prompt["prompt"], value=KEY_PIN)
    info = c.next_event(kind="info", login=login)
    assert info["message"] == "Touch your security key"
    assert wait_for(lambda: KeyControl(port=sim_key_server.control_port).status()
                    .get("waiting_for_touch"), what="the key waiting for a touch")
    svc.proc.kill()  # SIGKILL, mid-ceremony
    svc.proc.wait(10)
    c.close()
    assert svc.socket.exists()  # left behind by the killed process

    svc.start()  # the stale socket is recognised and replaced
    with svc.client() as c2:
        assert c2.request("hello")["version"] == 1
        assert c2.request("methods.list", user="alice") == {"methods": []}
    assert world.store.list_fido_credentials(alice.id) == []
    assert not [e for e in world.store.list_events(kind="enrol.key") if e.outcome == "success"]
    assert world.store.check_integrity() == []
    world.store.verify_events()  # the audit chain intact


# --------------------------------------------------------------------------- the CLI


def test_service_commands(services, world):
    services.policy.write_text(NO_MFA_POLICY)
    world.user("alice", password=True, mfa=False)
    svc = services()
    env = svc.env

    def cli(*args, **kw):
        return subprocess.run(token_agent_command() + ["service", *args, "--socket",
                                                       str(svc.socket)],
                              capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                              timeout=30, **kw)

    status = cli("status", "--json")
    assert status.returncode == 0, status.stderr
    [shown] = check_output(["service", "status", "--json"], status.stdout, 0)
    assert shown["peer"]["roles"][0] == "root" and shown["protocol_version"] >= 1
    assert "token-agent service 0.1.0" in cli("status").stdout

    events = subprocess.Popen(token_agent_command() + ["service", "events", "--socket",
                                                       str(svc.socket)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT, env=env)
    try:
        def subscribed():
            with svc.client() as probe:
                return probe.request("hello")["service"]["subscribers"] == 1

        wait_for(subscribed, what="the events command subscribed")
        with svc.client() as c:
            assert c.login("alice", answers(PASSWORD))["ok"]
        def next_line() -> dict:  # checked against README "JSON output"
            return check_output(["service", "events"], events.stdout.readline(), 0,
                                lines=True)[0]

        line = next_line()
        while line["event"] != "login.finished":  # e.g. service.readers: pcscd came or went
            line = next_line()
        assert line["user"] == "alice" and line["ok"]
    finally:
        events.send_signal(signal.SIGINT)
        assert events.wait(10) == 0

    sessions = cli("sessions", "--json")
    [listed] = check_output(["service", "sessions", "--json"], sessions.stdout, 0)
    assert [s["user"] for s in listed["sessions"]] == ["alice"]
    assert "alice" in cli("sessions").stdout
    gone = subprocess.run(token_agent_command() + ["service", "status", "--socket",
                                                   str(svc.socket) + ".nope"],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=30)
    assert gone.returncode == 1 and "cannot connect" in gone.stderr
