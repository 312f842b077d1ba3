"""The forgotten-password reset's library (token_agent/recovery.py): two distinct methods,
each checked by its factor (so failures count on its lockout), refusal with one method and
the notice, the new password by the project's rules, and no user enumeration (the same
answers, in the same time, for an unknown, a disabled and a one-method user until a method
is proven). The pages over it: tests/test_web_recovery.py."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from test_delivery import GatewayServer
from test_mfa_login import PASSWORD, World, world  # noqa: F401 (fixture)
from token_agent import recovery
from token_agent.factors import FactorError, lockout, password
from token_agent.store import Store

MOBILE = "+447700900123"
NEW = "a brand new passphrase"


@pytest.fixture
def gateway():
    server = GatewayServer(200, json.dumps({"id": "gw-1"}).encode(), False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def w(world, gateway) -> World:
    made = world(f'[codes]\nresend_seconds = 0\n[delivery]\nsender_name = "NHS Trust"\n'
                 f'[delivery.sms]\nurl = "{gateway.url}"\ntimeout = 5\n')
    made.gateway = gateway
    return made


def add_sms(w: World, user, number: str = MOBILE):
    method = w.store.add_method(user.id, "sms", f"mobile {number[-3:]}", confirmed=True)
    w.store.add_contact(method.id, "sms", number, now=w.clock())
    return method


def texts_to(w: World, number: str) -> list[str]:
    return [r.body["text"] for r in w.gateway.requests if r.body.get("to") == number]


def wait_for_text(w: World, number: str, count: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while len(texts_to(w, number)) < count:
        assert time.monotonic() < deadline, w.gateway.requests
        time.sleep(0.02)
    return texts_to(w, number)[count - 1]


def code_in(text: str) -> str:
    return re.search(r"(?<!\d)(\d{6})(?!\d)", text).group(1)


def test_two_methods_reset_the_password_and_tell_the_user(w):
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    add_sms(w, alice)
    w.clock.advance(60)  # past the step of the enrolment's code
    agent = w.agent
    token = recovery.start(agent, "alice")
    reset = recovery.current(agent, token)
    assert [k for k, _ in recovery.offered(agent, reset)] == ["totp", "sms", "backup"]
    assert "authenticator app" in recovery.choose(agent, reset, "totp")
    proof = recovery.prove(agent, recovery.current(agent, token), w.wrong_code(secret))
    assert not proof.ok and proof.message == recovery.WRONG
    assert lockout.state(w.store, lockout.unfamiliar(lockout.method_scope(
        w.store.find_method(alice.id, "totp").id))).failures == 1
    proof = recovery.prove(agent, recovery.current(agent, token), w.code(secret))
    assert proof.ok and proof.state == recovery.STARTED and "second" in proof.message
    reset = recovery.current(agent, token)
    assert reset.proofs == 1 and [k for k, _ in recovery.offered(agent, reset)] == ["sms"]
    with pytest.raises(recovery.ResetError):
        recovery.choose(agent, reset, "totp")  # the same app twice is one method
    recovery.choose(agent, reset, "sms")
    code = code_in(wait_for_text(w, MOBILE, 1))
    proof = recovery.prove(agent, recovery.current(agent, token), code)
    assert proof.ok and proof.state == recovery.PROVEN
    reset = recovery.current(agent, token)
    with pytest.raises(FactorError, match="not the same"):
        recovery.finish(agent, reset, NEW, NEW + "x")
    with pytest.raises(FactorError, match="at least 8"):
        recovery.finish(agent, reset, "short", "short")
    with pytest.raises(FactorError, match="at most 128"):
        recovery.finish(agent, reset, "x" * 129, "x" * 129)
    assert recovery.finish(agent, reset, NEW, NEW) == "alice"
    assert password.verify(w.ctx, alice.id, NEW).ok
    assert not password.verify(w.ctx, alice.id, PASSWORD).ok
    with pytest.raises(recovery.ResetError):
        recovery.current(agent, token)  # used up
    notice = wait_for_text(w, MOBILE, 2)
    assert "password was reset" in notice and not re.search(r"\d{6}", notice)
    (event,) = w.store.list_events(kind="recovery.reset", limit=10)
    assert event.detail["kinds"] == ["totp", "sms"]
    assert NEW not in json.dumps([e.detail for e in w.store.list_events(limit=1000)])


def test_one_method_is_refused_after_its_proof_and_the_user_is_told(w):
    bob = w.add_user("bob")
    add_sms(w, bob)
    agent = w.agent
    token = recovery.start(agent, "bob")
    recovery.choose(agent, recovery.current(agent, token), "sms")
    code = code_in(wait_for_text(w, MOBILE, 1))
    proof = recovery.prove(agent, recovery.current(agent, token), code)
    assert proof.ok and proof.state == recovery.REFUSED and "IT service desk" in proof.message
    notice = wait_for_text(w, MOBILE, 2)
    assert "refused" in notice and "has not changed" in notice
    with pytest.raises(recovery.ResetError):
        recovery.finish(agent, recovery.current(agent, token), NEW, NEW)
    assert password.verify(w.ctx, bob.id, PASSWORD).ok


def test_backup_codes_count_once(w):
    carol = w.add_user("carol")
    codes = w.backup_codes(carol)
    agent = w.agent
    token = recovery.start(agent, "carol")
    recovery.choose(agent, recovery.current(agent, token), "backup")
    proof = recovery.prove(agent, recovery.current(agent, token), codes[0])
    assert proof.state == recovery.REFUSED  # backup codes alone are one method
    secret = w.enrol_totp(carol)
    w.clock.advance(60)
    token = recovery.start(agent, "carol")
    recovery.choose(agent, recovery.current(agent, token), "backup")
    assert recovery.prove(agent, recovery.current(agent, token), codes[1]).state == "started"
    reset = recovery.current(agent, token)
    assert [k for k, _ in recovery.offered(agent, reset)] == ["totp"]
    with pytest.raises(recovery.ResetError):
        recovery.choose(agent, reset, "backup")
    recovery.choose(agent, reset, "totp")
    assert recovery.prove(agent, recovery.current(agent, token),
                          w.code(secret)).state == recovery.PROVEN


def test_the_same_answers_in_the_same_time_until_a_method_is_proven(w):
    """An unknown user, a disabled one, one with a single method and one who does not
    hold the method chosen: the same offers, prompts, failures, and times."""
    dave = w.add_user("dave")
    add_sms(w, dave, "+447700900111")
    erin = w.add_user("erin")
    w.enrol_totp(erin)
    add_sms(w, erin, "+447700900222")
    w.store.update_user("erin", disabled=True)
    frank = w.add_user("frank")
    w.enrol_totp(frank)
    w.backup_codes(frank)
    agent = w.agent
    seen = {}
    for name, kind in (("nobody", "sms"), ("erin", "sms"), ("dave", "totp"), ("frank", "sms"),
                       ("nobody", "totp"), ("erin", "totp")):
        times = []
        t = time.monotonic()
        token = recovery.start(agent, name)
        times.append(time.monotonic() - t)
        reset = recovery.current(agent, token)
        offers = recovery.offered(agent, reset)
        t = time.monotonic()
        said = recovery.choose(agent, reset, kind)
        times.append(time.monotonic() - t)
        t = time.monotonic()
        proof = recovery.prove(agent, recovery.current(agent, token), "123456")
        times.append(time.monotonic() - t)
        seen[(name, kind)] = (offers, said, proof)
        for took in times:
            assert recovery.FLOOR_SECONDS <= took < recovery.FLOOR_SECONDS + 0.25, (name, took)
    by_kind = {}
    for (name, kind), answers in seen.items():
        by_kind.setdefault(kind, set()).add(repr(answers))
    assert all(len(answers) == 1 for answers in by_kind.values()), by_kind
    time.sleep(0.3)
    # only frank-with-no-sms and dave-with-no-totp hold accounts: nothing was sent to erin
    assert texts_to(w, "+447700900222") == [] and texts_to(w, "+447700900111") == []


def test_wrong_codes_end_the_reset_and_it_expires(w):
    alice = w.add_user("alice")
    w.enrol_totp(alice)
    add_sms(w, alice)
    agent = w.agent
    token = recovery.start(agent, "alice")
    recovery.choose(agent, recovery.current(agent, token), "totp")
    for _ in range(recovery.MAX_FAILURES - 1):
        assert not recovery.prove(agent, recovery.current(agent, token), "000000").ok
    with pytest.raises(recovery.ResetError, match="Too many"):
        recovery.prove(agent, recovery.current(agent, token), "000000")
    with pytest.raises(recovery.ResetError):
        recovery.current(agent, token)
    token = recovery.start(agent, "alice")
    w.clock.advance(recovery.RESET_TTL + 1)
    with pytest.raises(recovery.ResetError):
        recovery.current(agent, token)
    for bad in (None, "", "x" * 500, "not-a-token"):
        with pytest.raises(recovery.ResetError):
            recovery.current(agent, bad)


def test_a_method_removed_after_its_code_was_sent_is_a_plain_failure(w):
    alice = w.add_user("alice")
    w.enrol_totp(alice)
    mobile = add_sms(w, alice)
    token = recovery.start(w.agent, "alice")
    recovery.choose(w.agent, recovery.current(w.agent, token), "sms")
    code = code_in(wait_for_text(w, MOBILE, 1))
    w.store.remove_method(mobile.id)
    proof = recovery.prove(w.agent, recovery.current(w.agent, token), code)
    assert not proof.ok and proof.message == recovery.WRONG


def test_a_security_key_step_is_answered_once_and_looks_the_same_for_strangers(w):
    alice = w.add_user("alice")
    w.enrol_totp(alice)
    agent = w.agent
    token = recovery.start(agent, "alice")
    reset = recovery.current(agent, token)
    assert "key" not in dict(recovery.offered(agent, reset))  # no pages' RP ID: no key
    assert "key" in dict(recovery.offered(agent, reset, "trust.example"))
    recovery.choose(agent, reset, "key", "trust.example")
    reset = recovery.current(agent, token)
    options = recovery.key_options(reset)
    assert options["rpId"] == "trust.example" and len(options["allowCredentials"]) == 1
    # alice has no key here: a decoy, as for a name nobody has
    stranger = recovery.current(agent, recovery.start(agent, "nobody"))
    recovery.choose(agent, stranger, "key", "trust.example")
    other = recovery.key_options(recovery.current_by_id(agent, stranger.id))
    assert set(other) == set(options) and other["challenge"] != options["challenge"]
    proof = recovery.prove_key(agent, reset, {"credential_id": "AAAA"}, "https://trust.example",
                               "trust.example")
    assert not proof.ok and proof.message == recovery.WRONG
    with pytest.raises(recovery.ResetError):  # the same step again: its challenge is spent
        recovery.prove_key(agent, reset, {"credential_id": "AAAA"}, "https://trust.example",
                           "trust.example")
    with pytest.raises(recovery.ResetError):
        recovery.prove(agent, recovery.current(agent, token), "123456")  # no step chosen


def test_a_reset_row_keeps_no_token_and_no_code(w, tmp_path):
    alice = w.add_user("alice")
    w.enrol_totp(alice)
    token = recovery.start(w.agent, "alice")
    row = w.store.get_reset(recovery._hash(token))
    assert row is not None and token not in json.dumps(row)
    assert isinstance(w.store, Store)
