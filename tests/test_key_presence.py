"""Issue 11 item 6: a background process must not spend a plugged-in key's PIN tries.

The attack: an unprivileged user sent ``enrol.key`` for itself over the service socket and
answered a wrong PIN three times; alice's correct PIN then got PIN_AUTH_BLOCKED and the key
was at 5 of 8 tries. Now (``token_agent/ceremonies/keypresence.py``) a caller other than the
login service must touch the key before a PIN is asked for and sent to it, and every caller
must when few tries are left.

The service tests run the service as its own process, the key in this process (so that its
retries are read from the authenticator itself, with no second program on the key), and the
attacker as ``nobody`` (a child that drops to uid 65534). Every loop is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import REPO_ROOT, environ_for_agent
from key_helpers import PIN, Keyring, serve_key
from test_service import KEY_PIN, NOBODY, WRONG_PIN, services, socket_dir, world  # noqa: F401
from token_agent.ceremonies.key import KeySettings, enrol_key, login_with_key
from token_agent.ceremonies.keypresence import LOW_PIN_RETRIES, PinGuard, PresenceRequired
from token_agent.outcome import Reason
from token_agent.store import Store

IS_ROOT = os.geteuid() == 0
FULL = 8  # CTAP 2.1 PIN retries


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "store.db")
    s.add_user("alice")
    yield s
    s.close()


@pytest.fixture
def keys(tmp_path):
    return Keyring(tmp_path)


class Toucher:
    """A person at the key: touches it whenever it waits for a touch, until stopped."""

    def __init__(self, vkey) -> None:
        self.vkey, self.touches = vkey, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 60  # bounded, whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.vkey.presence.waiting:
                self.vkey.presence.touch()
                self.touches += 1
            time.sleep(0.01)

    def __enter__(self) -> "Toucher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def retries(vkey) -> int:
    return vkey.app.state.pin_retries


# --------------------------------------------------------------------------- the library


def test_untrusted_caller_spends_no_pin_try_without_a_touch(store, keys):
    vkey, key, _ = keys.new(presence="manual")
    asked = []

    def wrong_pin():
        asked.append(1)
        return "000000"

    for _ in range(3):  # the attack: three wrong PINs in a row
        with pytest.raises(PresenceRequired):
            enrol_key(store, key, "alice", pin_provider=wrong_pin,
                      presence=PinGuard(trusted=False, timeout=0.3))
    assert asked == [] and retries(vkey) == FULL
    # the default is the strict rule: a caller that says nothing is not the login service
    with pytest.raises(PresenceRequired):
        enrol_key(store, key, "alice", pin_provider=wrong_pin, timeout=0.3)
    assert asked == [] and retries(vkey) == FULL
    # with a person at the key: the wrong PIN is tried, and reported with the tries left
    from drivers.fido.errors import WrongPin

    with Toucher(vkey), pytest.raises(WrongPin) as raised:
        enrol_key(store, key, "alice", pin_provider=wrong_pin, timeout=5,
                  presence=PinGuard(trusted=False, timeout=5))
    assert asked == [1] and retries(vkey) == FULL - 1
    assert raised.value.retries_left == FULL - 1
    with Toucher(vkey) as person:
        result = enrol_key(store, key, "alice", pin_provider=lambda: PIN, timeout=5,
                           presence=PinGuard(trusted=False, timeout=5))
    assert result.user_verified and person.touches == 2  # presence, then makeCredential's UP


def test_one_touch_per_ceremony_and_none_needed_without_a_pin(store, keys):
    vkey, key, _ = keys.new(presence="manual")
    guard = PinGuard(trusted=False, timeout=5)
    with Toucher(vkey):
        enrol_key(store, key, "alice", pin_provider=lambda: PIN, presence=guard)
    assert guard.present
    # the same ceremony's guard: no second touch before the PIN (the key's own touch only)
    with Toucher(vkey) as person:
        outcome = login_with_key(store, key, username="alice", pin_provider=lambda: PIN,
                                 timeout=5, presence=guard)
    assert outcome.ok and person.touches == 1
    # a key without a PIN spends no tries: no presence touch
    vkey2, key2, _ = keys.new(presence="manual", pin=None)
    store.add_user("bob")
    with Toucher(vkey2) as person:
        enrol_key(store, key2, "bob", pin_provider=lambda: None,
                  settings=KeySettings(user_verification="discouraged"),
                  presence=PinGuard(trusted=False, timeout=5))
    assert person.touches == 1


def test_login_service_is_unaffected_until_few_tries_are_left(store, keys):
    vkey, key, _ = keys.new(presence="auto")
    enrol_key(store, key, "alice", pin_provider=lambda: PIN,
              presence=PinGuard(trusted=True))
    vkey.presence.set_mode("manual")
    # trusted, many tries: the PIN is asked before any touch (a wrong one fails at once)
    outcome = login_with_key(store, key, username="alice", pin_provider=lambda: "000000",
                             timeout=0.5, presence=PinGuard(trusted=True, timeout=0.5))
    assert outcome.reason is Reason.WRONG_PIN and retries(vkey) == FULL - 1
    # few tries left: even the login service needs a person at the key
    vkey.app.state.pin_retries = LOW_PIN_RETRIES
    for _ in range(3):
        outcome = login_with_key(store, key, username="alice", pin_provider=lambda: "000000",
                                 timeout=0.3, presence=PinGuard(trusted=True, timeout=0.3))
        assert outcome.reason is Reason.PRESENCE_REQUIRED, outcome
        assert "3 PIN tries left" in outcome.message
    assert retries(vkey) == LOW_PIN_RETRIES
    with Toucher(vkey):
        outcome = login_with_key(store, key, username="alice", pin_provider=lambda: PIN,
                                 timeout=5, presence=PinGuard(trusted=True, timeout=5))
    assert outcome.ok and retries(vkey) == FULL  # a right PIN restores them
    # no tries left: blocked, without asking anyone to touch
    vkey.app.state.pin_retries = 0
    outcome = login_with_key(store, key, username="alice", pin_provider=lambda: PIN,
                             timeout=0.3, presence=PinGuard(trusted=True, timeout=0.3))
    assert outcome.reason is Reason.PIN_BLOCKED


# --------------------------------------------------------------------------- over the socket

CHILD = textwrap.dedent("""
    import json, os, sys
    from token_agent.service.client import Client, ServiceError
    if os.geteuid() == 0:
        os.setgroups([]); os.setgid({uid}); os.setuid({uid})
    assert os.geteuid() == {uid}
    out = []
    with Client(sys.argv[1], timeout=30) as c:
        for op, args, pin in json.loads(sys.argv[2]):
            prompts = []
            def answer(event):
                prompts.append(event["message"])
                return pin
            try:
                login = c.request(op, **args)["login"]
                outcome = c.run_ceremony(login, answer, timeout=30)
            except ServiceError as e:
                outcome = {{"ok": False, "reason": e.code, "message": e.message}}
            out.append({{"outcome": outcome, "prompts": prompts}})
    print(json.dumps(out))
""")


def as_uid(uid: int, socket_path, *ceremonies) -> list[dict]:
    """Run ``(op, args, pin)`` ceremonies over the socket as ``uid`` (root stays root)."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(uid=uid), str(socket_path), json.dumps(ceremonies)],
        cwd="/", capture_output=True, text=True, timeout=120,
        env=environ_for_agent()
        | {"PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def served_key():
    vkey, server = serve_key(KEY_PIN)
    yield vkey, server
    server.__exit__(None, None, None)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become nobody (SO_PEERCRED test)")
def test_a_background_process_cannot_burn_the_keys_pin_tries(services, world, served_key):
    vkey, server = served_key
    world.user("nobody")
    world.user("alice")
    from drivers.fido.keys import open_single_key

    env = {"TOKEN_AGENT_SIM_KEYS": f"127.0.0.1:{server.port}"}
    with open_single_key(env, on_touch=None) as key:  # enrolled for alice by an admin
        enrol_key(world.store, key, "alice", pin_provider=lambda: KEY_PIN)  # auto touch
    vkey.presence.set_mode("manual")  # from now on only the test's "person" touches it
    svc = services(f'[keys]\nsimulators = ["127.0.0.1:{server.port}"]\ntimeout = 2\n')

    # the attack: enrol.key for itself (nobody has no method yet, so its first one needs no
    # login: issue 11 item 4), wrong PINs, nobody there
    started = time.monotonic()
    results = as_uid(NOBODY, svc.socket, *[("enrol.key", {"user": "nobody"}, WRONG_PIN)] * 3)
    # then, with a key of its own (an admin's enrolment, a person at the key), a
    # screen-locker login with a wrong PIN, nobody there
    with open_single_key(env, on_touch=None) as key, Toucher(vkey):
        enrol_key(world.store, key, "nobody", pin_provider=lambda: KEY_PIN)
    assert retries(vkey) == FULL
    results += as_uid(NOBODY, svc.socket, ("login.start", {"primary": "key"}, WRONG_PIN))
    print(f"\n4 refused ceremonies as nobody: {time.monotonic() - started:.1f} s")
    for r in results:
        assert r["outcome"]["ok"] is False
        assert r["outcome"]["reason"] == "presence-required", r
        assert "Touch your security key" in r["outcome"]["message"]
        assert r["prompts"] == []  # no PIN was even asked for
    assert retries(vkey) == FULL and not vkey.app._pin_auth_blocked
    # and now that it has a method, enrol.key needs a login on the connection (item 4)
    [again] = as_uid(NOBODY, svc.socket, ("enrol.key", {"user": "nobody"}, WRONG_PIN))
    assert again["outcome"]["reason"] == "reauth-required" and again["prompts"] == []

    # alice's correct PIN at the login screen (root, the login service): unaffected
    with svc.client() as c, Toucher(vkey) as person:
        outcome = c.login("alice", lambda e: KEY_PIN, primary="key")
    assert outcome["ok"], outcome
    assert person.touches == 1  # only the assertion's own touch

    # with a person at the key, nobody's wrong PIN is tried and reported with the count
    with Toucher(vkey):
        [wrong] = as_uid(NOBODY, svc.socket, ("login.start", {"primary": "key"}, WRONG_PIN))
    assert wrong["outcome"]["reason"] == "wrong-pin", wrong
    assert f"{FULL - 1} tries left" in wrong["outcome"]["message"]
    assert retries(vkey) == FULL - 1
    with Toucher(vkey) as person:  # the user's own screen locker, the user at the key
        [ok] = as_uid(NOBODY, svc.socket, ("login.start", {"primary": "key"}, KEY_PIN))
    assert ok["outcome"]["ok"] and ok["outcome"]["user"] == "nobody", ok
    assert person.touches == 2  # presence before the PIN, then the assertion's own
    assert retries(vkey) == FULL

    # few tries left: the login service too is refused without a person, and no try is spent
    vkey.app.state.pin_retries = LOW_PIN_RETRIES
    with svc.client() as c:
        asked = []
        refused = c.login("alice", lambda e: asked.append(e) or KEY_PIN, primary="key")
    assert refused["reason"] == "presence-required" and asked == [], refused
    assert f"only {LOW_PIN_RETRIES} PIN tries left" in refused["message"]
    assert retries(vkey) == LOW_PIN_RETRIES
    with svc.client() as c, Toucher(vkey) as person:
        outcome = c.login("alice", lambda e: KEY_PIN, primary="key")
    assert outcome["ok"] and person.touches == 2, outcome
    assert retries(vkey) == FULL


# --------------------------------------------------------------------------- the CLI


def cli(served, uid: int, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """``token-agent ARGS`` as ``uid`` (a background process running as the user can run
    the CLI too), against the served key only."""
    _, server = served
    env = environ_for_agent()
    env |= {"TOKEN_AGENT_SIM_KEYS": f"127.0.0.1:{server.port}", "PYTHONPATH": str(REPO_ROOT),
            "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"}
    return subprocess.run(
        [sys.executable, "-c", CLI_CHILD.format(uid=uid), *args], input=stdin,
        capture_output=True, text=True, timeout=60, cwd="/", env=env)


#: the CLI, its modules imported first (the interpreter lives where nobody cannot read)
CLI_CHILD = textwrap.dedent("""
    import os, sys
    import encodings.idna, fido2.client, fido2.ctap2.credman
    import drivers.fido.keys, drivers.fido.discovery, drivers.fido.sim
    import token_agent.ceremonies.key, token_agent.ceremonies.keypresence
    from token_agent.cli import main
    if {uid} != 0:
        os.setgroups([]); os.setgid({uid}); os.setuid({uid})
    main(sys.argv[1:], prog_name="token-agent")
""")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become nobody")
def test_the_cli_as_an_ordinary_user_needs_a_touch_before_a_pin_try(served_key):
    vkey, _ = served_key
    vkey.presence.set_mode("manual")
    for _ in range(3):  # the attack, bounded: three wrong "current PINs"
        run = cli(served_key, NOBODY, "keys", "pin", "change", "--pin-stdin", "--timeout", "1",
                  stdin=f"{WRONG_PIN}\n{KEY_PIN}\n")
        assert run.returncode == 5, run.stderr  # exit code 5: no touch in time
        assert "Touch your security key before its PIN is tried" in run.stderr
    assert retries(vkey) == FULL
    run = cli(served_key, NOBODY, "keys", "credentials", "list", "--pin-stdin", "--timeout", "1",
              stdin=f"{WRONG_PIN}\n")
    assert run.returncode == 5 and retries(vkey) == FULL, run.stderr
    # a person at the key: the wrong PIN is tried (and counted); root needs no touch
    with Toucher(vkey):
        run = cli(served_key, NOBODY, "keys", "pin", "change", "--pin-stdin", "--timeout", "5",
                  stdin=f"{WRONG_PIN}\n{KEY_PIN}\n")
    assert run.returncode == 3 and "7 tries left" in run.stderr, run.stderr
    run = cli(served_key, 0, "keys", "credentials", "list", "--pin-stdin", "--timeout", "1",
              stdin=f"{KEY_PIN}\n")
    assert run.returncode == 0, run.stderr
    assert retries(vkey) == FULL
