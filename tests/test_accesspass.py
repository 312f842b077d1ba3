"""Temporary access passes (token_agent/factors/accesspass.py, the store's access_passes,
ceremonies/passlogin.py): issued by an administrator, shown once, stored as a keyed hash,
single use, short-lived, replaced by a newer one, revocable, guessed only under a lockout;
a sign-in with one satisfies MFA for that sign-in only. Run on both engines
(``--store-engine postgresql``)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from token_agent import reauth
from token_agent.agent import Agent
from token_agent.ceremonies.login import NOT_AUTHENTICATED, Device, login
from token_agent.factors import FactorError, accesspass, password, totp
from token_agent.outcome import Reason
from token_agent.policy import parse_policy
from token_agent.store import Store

T0 = 1_700_000_000.0
HOUR = 3600.0
PASSWORD = "correct horse battery"
HERE = Device("unmanaged", device_id="browser-1", network="192.0.2.7")


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class Answers:
    """An Interaction answering ``secret()`` with the given values in turn."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def info(self, message: str) -> None:
        pass

    def secret(self, prompt: str):
        self.prompts.append(prompt)
        return self.answers.pop(0) if self.answers else None

    text = secret

    def choose(self, prompt, options, default):
        return default

    def show_qr(self, uri: str) -> None:
        pass


@pytest.fixture(autouse=True)
def quick_failures(monkeypatch):
    """Failed sign-ins take their floor only where a test measures it."""
    from token_agent.ceremonies import passlogin

    monkeypatch.setattr(passlogin, "FAILURE_FLOOR", 0.0)


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    store = Store.open(tmp_path / "token-agent.db", clock=clock)
    agent = Agent.open(store=store, policy=parse_policy(""), clock=clock, environ={})
    user = store.add_user("alice")
    password.set_password(agent.factors(), user.id, PASSWORD)
    yield agent, clock, user
    store.close()


def _events(agent, prefix=""):
    return [e for e in reversed(agent.store.list_events(limit=10 ** 6))
            if e.kind.startswith(prefix)]


def _sign_in(agent, username, typed, device=HERE):
    return login(agent, username, interaction=Answers(typed), device=device,
                 primary="access_pass")


def test_issue_shows_the_pass_once_and_stores_only_a_keyed_hash(env):
    agent, clock, user = env
    issued, value = accesspass.issue(agent.factors(), user.id, actor="admin1")
    assert len(value) == 19 and value.count("-") == 3
    assert set(value.replace("-", "")) <= set(accesspass.ALPHABET)
    assert issued.expires_at == T0 + 8 * HOUR and issued.state(T0) == "open"
    rows = agent.store.access_passes(user.id)
    assert len(rows) == 1 and len(rows[0]["pass_hash"]) == 32
    assert value.encode() not in rows[0]["pass_hash"]
    issued_event = _events(agent, "access_pass.issued")[0]
    assert issued_event.detail["actor"] == "admin1" and issued_event.detail["hours"] == 8
    text = json.dumps([e.to_dict() for e in _events(agent)], default=str)
    assert value not in text and value.replace("-", "") not in text


@pytest.mark.parametrize("hours", [0, 25, -1, "eight", "", 1.5])
def test_a_lifetime_out_of_range_is_refused(env, hours):
    agent, _, user = env
    with pytest.raises(FactorError, match="1 to 24 hours"):
        accesspass.issue(agent.factors(), user.id, actor="admin1", hours=hours)
    assert agent.store.access_passes(user.id) == []


def test_a_pass_signs_in_once_with_mfa_for_that_sign_in_only(env):
    agent, clock, user = env
    _, value = accesspass.issue(agent.factors(), user.id, actor="admin1", hours=2)
    outcome = _sign_in(agent, "alice", value.upper().replace("-", " "))  # case, spaces: no matter
    assert outcome.ok and outcome.method == "access_pass" and outcome.multi_factor
    # the user may set up methods now: reauth takes the sign-in as multi-factor, even once
    # they hold a second factor (MFA applies to an internal user)
    auth = reauth.Authenticated.of(outcome, clock)
    assert reauth.check(agent, user, auth, now=clock()) == "login"
    pending = totp.begin_enrol(agent.factors(), user.id)
    assert totp.confirm_enrol(agent.factors(), user.id,
                              totp.code_at(pending.secret, clock())).ok
    assert reauth.check(agent, user, auth, now=clock()) == "login"
    kinds_ = [e.kind for e in _events(agent) if e.kind.startswith(("access_pass", "verify.access",
                                                                  "login"))]
    assert kinds_ == ["access_pass.issued", "access_pass.used", "verify.access_pass", "login"]
    assert _events(agent, "login")[-1].detail["primary"] == "access_pass"
    # nothing remembered for re-verification: the next password sign-in asks the app's code
    clock.t += 60
    again = login(agent, "alice", interaction=Answers(PASSWORD), device=HERE)
    assert not again.ok and again.reason is Reason.CANCELLED
    # used up
    second = _sign_in(agent, "alice", value)
    assert not second.ok and second.reason is Reason.CODE_REPLAYED
    assert second.message == NOT_AUTHENTICATED
    assert accesspass.list_(agent.factors(), user.id)[0].state(clock()) == "used"


def test_an_expired_pass_is_refused_and_its_end_recorded(env):
    agent, clock, user = env
    _, value = accesspass.issue(agent.factors(), user.id, actor="admin1", hours=1)
    clock.t += HOUR + 1
    outcome = _sign_in(agent, "alice", value)
    assert not outcome.ok and outcome.reason is Reason.CODE_EXPIRED
    assert outcome.message == NOT_AUTHENTICATED
    expired = _events(agent, "access_pass.expired")
    assert len(expired) == 1 and expired[0].detail["expires_at"] == T0 + HOUR
    # recorded once, however often it is found
    _sign_in(agent, "alice", value)
    assert len(_events(agent, "access_pass.expired")) == 1


def test_just_before_expiry_it_works(env):
    agent, clock, user = env
    _, value = accesspass.issue(agent.factors(), user.id, actor="admin1", hours=1)
    clock.t += HOUR - 1
    assert _sign_in(agent, "alice", value).ok


def test_a_newer_pass_replaces_the_open_one(env):
    agent, clock, user = env
    _, first = accesspass.issue(agent.factors(), user.id, actor="admin1")
    _, second = accesspass.issue(agent.factors(), user.id, actor="admin2")
    assert [e.detail["actor"] for e in _events(agent, "access_pass.replaced")] == ["admin2"]
    refused = _sign_in(agent, "alice", first)
    assert not refused.ok and refused.reason is Reason.CODE_EXPIRED
    assert _sign_in(agent, "alice", second).ok


def test_revoked(env):
    agent, clock, user = env
    _, value = accesspass.issue(agent.factors(), user.id, actor="admin1")
    assert len(accesspass.revoke(agent.factors(), user.id, actor="admin2")) == 1
    assert accesspass.open_pass(agent.factors(), user.id) is None
    assert not _sign_in(agent, "alice", value).ok
    assert _events(agent, "access_pass.revoked")[0].detail["actor"] == "admin2"


def test_wrong_passes_count_against_a_lockout_of_their_own(env):
    agent, clock, user = env
    _, value = accesspass.issue(agent.factors(), user.id, actor="admin1")
    limit = agent.policy.lockout.max_failures
    for i in range(limit):
        outcome = _sign_in(agent, "alice", f"wrong-pass-{i}")
        assert not outcome.ok and outcome.message == NOT_AUTHENTICATED
    locked = _sign_in(agent, "alice", value)  # the right one, while locked: refused
    assert not locked.ok and locked.reason is Reason.METHOD_LOCKED
    assert accesspass.open_pass(agent.factors(), user.id) is not None  # not spent
    # the password is a scope of its own: still usable
    from token_agent.factors import lockout

    assert not lockout.state(agent.store, lockout.password_scope(user.id)).locked(clock())
    # an administrator's unlock clears it
    from token_agent import admin_ops

    admin_ops.unlock(agent.store, user, None, "admin1")
    assert _sign_in(agent, "alice", value).ok


def test_unknown_and_disabled_users_and_users_without_a_pass_look_alike(env):
    agent, clock, user = env
    agent.store.add_user("bob")
    carol = agent.store.add_user("carol")
    _, value = accesspass.issue(agent.factors(), carol.id, actor="admin1")
    agent.store.update_user("carol", disabled=True)
    outcomes = [_sign_in(agent, "nobody", "abcd-efgh-jkmn-pqrs"),
                _sign_in(agent, "bob", "abcd-efgh-jkmn-pqrs"),
                _sign_in(agent, "carol", value),
                _sign_in(agent, "alice", "abcd-efgh-jkmn-pqrs")]
    assert {(o.ok, o.message, o.user_id) for o in outcomes} == {
        (False, NOT_AUTHENTICATED, None)}
    assert [o.reason for o in outcomes] == [Reason.UNKNOWN_USER, Reason.NO_CREDENTIAL,
                                            Reason.USER_DISABLED, Reason.NO_CREDENTIAL]


def test_another_users_pass_does_not_work(env):
    agent, clock, user = env
    bob = agent.store.add_user("bob")
    _, bobs = accesspass.issue(agent.factors(), bob.id, actor="admin1")
    accesspass.issue(agent.factors(), user.id, actor="admin1")
    assert not _sign_in(agent, "alice", bobs).ok
    assert _sign_in(agent, "bob", bobs).ok


def test_a_pass_is_used_once_when_two_sign_ins_race(env):
    agent, clock, user = env
    _, value = accesspass.issue(agent.factors(), user.id, actor="admin1")
    results = []
    barrier = threading.Barrier(4)

    def run():
        barrier.wait()
        results.append(_sign_in(agent, "alice", value).ok)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert len(_events(agent, "access_pass.used")) == 1


def test_removing_the_user_removes_their_passes(env):
    agent, clock, user = env
    accesspass.issue(agent.factors(), user.id, actor="admin1")
    agent.store.remove_user("alice")
    assert agent.store.access_passes(user.id) == []


def test_cancelled(env):
    agent, clock, user = env
    outcome = login(agent, "alice", interaction=Answers(), device=HERE, primary="access_pass")
    assert not outcome.ok and outcome.reason is Reason.CANCELLED


def test_every_failure_takes_the_same_least_time(env, monkeypatch):
    from token_agent.ceremonies import passlogin

    agent, clock, user = env
    accesspass.issue(agent.factors(), user.id, actor="admin1")
    agent.store.add_user("bob")
    monkeypatch.setattr(passlogin, "FAILURE_FLOOR", 0.2)
    for name in ("nobody", "bob", "alice"):
        started = time.monotonic()
        outcome = _sign_in(agent, name, "abcd-efgh-jkmn-pqrs")
        took = time.monotonic() - started
        assert not outcome.ok and 0.2 <= took < 1.0, (name, took)
