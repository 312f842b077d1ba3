"""Issue 11, item 9: the lockout schedule (``token_agent/factors/lockout.py``) against a
guesser who knows only a username, with the real store and a fake clock.

* 100 consecutive failures of one method, then it stays locked until an administrator
  unlocks it (before: a failure every few hours for ever, about 3,750 a year);
* the lock level decays after a quiet period (before: it never did);
* a stranger's failures (a device or network the user never logged in from) are counted
  apart, so they never lock the user out of their own workstation, and never add up to
  more than the limit with the user's own;
* a lock on one method never blocks the user's others: the login flow goes to a key when
  the password is locked, and to another second factor when one is locked.

Each loop is bounded (at most ``MAX_TRIES`` guesses) and ends by itself."""

from __future__ import annotations

from token_agent.ceremonies.login import Device
from token_agent.factors import lockout, password
from token_agent.outcome import Factor, Reason

from test_mfa_login import (  # noqa: F401  (fixtures)
    PASSWORD, WRONG_PASSWORD, _fake_key, _key_login, no_secret_leaks, world,
)

MAX_TRIES = 1000
WORKSTATION = Device("managed", "ws-alice", None)
STRANGER = Device("unmanaged", "laptop-of-a-stranger", "203.0.113.9")
NO_MFA = "[classes.internal]\nenforce = false\n"
DAY = 86400


def guess_until_locked_for_good(w, guess) -> int:
    """Guess as fast as the locks allow (the clock jumps to each lock's end); returns the
    failures counted before the lock until reset."""
    failures = 0
    for _ in range(MAX_TRIES):
        r = guess()
        if r.reason in (Reason.WRONG_PASSWORD, Reason.WRONG_CODE):
            failures += 1
        elif r.reason is not Reason.METHOD_LOCKED:
            raise AssertionError(r)
        until = getattr(r, "locked_until", None) or r.detail.get("locked_until")
        if until is not None and until >= lockout.PERMANENT:
            return failures
        if until is not None:
            w.clock.t = max(w.clock.t, until)
    raise AssertionError(f"not locked for good after {MAX_TRIES} guesses ({failures} counted)")


def wrong_login(w, user, device):
    def run():
        out, _ = w.login(user.username, WRONG_PASSWORD, device=device)
        assert not out.ok
        state = lockout.state(w.store, lockout.scope_for(
            lockout.password_scope(user.id), device is WORKSTATION))
        out.detail["locked_until"] = state.locked_until if state.locked(w.clock()) else None
        return out
    return run


def test_one_hundred_failures_in_a_row_then_locked_until_an_administrator_unlocks(world):
    w = world()
    alice = w.add_user("alice")
    start = w.clock()
    failures = guess_until_locked_for_good(
        w, lambda: password.verify(w.ctx, alice.id, WRONG_PASSWORD))
    assert failures == 100
    hours = (w.clock() - start) / 3600
    assert 8 < hours < 9, hours  # the locks in between: 60 s, 120 s, ... 7.7 h
    w.clock.advance(365 * DAY)  # a year later: still locked, even the right password
    r = password.verify(w.ctx, alice.id, PASSWORD)
    assert r.reason is Reason.METHOD_LOCKED and "until an administrator unlocks it" in r.message
    # no budget is left for unfamiliar devices either: both scopes are locked for good
    assert [s.permanent for s in lockout.user_locks(w.store, alice.id)] == [True, True]
    lockout.unlock(w.store, alice.id)
    assert password.verify(w.ctx, alice.id, PASSWORD).ok


def test_the_lock_level_decays_after_a_quiet_period(world):
    w = world()  # [lockout] decay_hours = 24
    alice = w.add_user("alice")

    def ten_wrong():
        for _ in range(10):
            r = password.verify(w.ctx, alice.id, WRONG_PASSWORD)
        return r.locked_until - w.clock()

    durations = []
    for _ in range(3):
        durations.append(ten_wrong())
        w.clock.advance(durations[-1])
    assert durations == [60, 120, 240]
    state = lockout.state(w.store, lockout.password_scope(alice.id))
    assert state.level == 3 and state.failures == 30
    w.clock.t = state.locked_until + 2 * DAY + 1  # two quiet days after the last lock
    assert ten_wrong() == 120  # level 3 - 2 + 1 (before: 480 s, level 4)
    w.clock.t = lockout.state(w.store, lockout.password_scope(alice.id)).locked_until + 10 * DAY
    assert ten_wrong() == 60  # back to the first lock
    # the consecutive failures do not decay: 50 so far, the limit still counts them
    assert lockout.state(w.store, lockout.password_scope(alice.id)).failures == 50


def test_a_stranger_cannot_lock_the_user_out_of_their_workstation(world):
    w = world(NO_MFA)
    alice = w.add_user("alice")
    w.store.update_user("alice", mfa_enabled=False)
    out, _ = w.login("alice", PASSWORD, device=WORKSTATION)  # her usual workstation
    assert out.ok

    # ten guesses from a stranger's laptop lock the stranger out, not alice
    for _ in range(10):
        wrong_login(w, alice, STRANGER)()
    out, _ = w.login("alice", PASSWORD, device=STRANGER)
    assert out.reason is Reason.METHOD_LOCKED
    out, _ = w.login("alice", PASSWORD, device=WORKSTATION)
    assert out.ok, out  # before: method-locked (one count for every device)

    # the stranger gets at most half of the 100 (then locked for good), alice still logs in
    assert guess_until_locked_for_good(w, wrong_login(w, alice, STRANGER)) == 40  # 10 above
    w.clock.advance(365 * DAY)
    out, _ = w.login("alice", PASSWORD, device=STRANGER)
    assert out.reason is Reason.METHOD_LOCKED
    out, _ = w.login("alice", PASSWORD, device=WORKSTATION)
    assert out.ok, out

    # and both together never exceed the limit: 50 more from the workstation lock both
    assert guess_until_locked_for_good(w, wrong_login(w, alice, WORKSTATION)) == 50
    out, _ = w.login("alice", PASSWORD, device=WORKSTATION)
    assert out.reason is Reason.METHOD_LOCKED
    locks = lockout.user_locks(w.store, alice.id)
    assert sorted(s.scope.endswith(":unfamiliar") for s in locks) == [False, True]
    assert all(s.permanent for s in locks)
    events = w.events("lockout.password", alice)
    assert any(e.detail["until_reset"] and e.detail["unfamiliar"] for e in events)


def test_a_locked_method_never_blocks_the_others(world):
    w = world()  # MFA enforced: a second factor at every login from an unknown device
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    codes = w.backup_codes(alice)

    # the authenticator app locked: after the password, the backup codes are offered
    for _ in range(10):
        out, _ = w.login("alice", PASSWORD, w.wrong_code(secret))
    assert out.reason is Reason.WRONG_CODE and "locked" in out.message
    out, script = w.login("alice", PASSWORD, codes[0])
    assert out.ok and out.method == "password+backup", out  # before: method-locked
    assert script.prompts == ["Password", "Backup code"]

    # the password locked: a login that names no primary factor takes her key
    _fake_key(w.store, alice)
    key = _key_login(alice, (Factor.POSSESSION, Factor.KNOWLEDGE))
    for _ in range(10):
        out, _ = w.login("alice", WRONG_PASSWORD, key_login=key, primary="password")
    out, _ = w.login("alice", PASSWORD, key_login=key, primary="password")
    assert out.reason is Reason.METHOD_LOCKED
    out, script = w.login("alice", key_login=key)
    assert out.ok and out.method == "key", out  # before: method-locked (the password)
    assert script.prompts == []


def test_a_lock_for_good_found_at_an_attempt_is_recorded(tmp_path):
    """An attempt that finds the scope past its cap (the policy's limit was lowered) refuses
    it and records the lock for good, instead of rolling it back with the refusal."""
    import pytest

    from token_agent.factors import LockoutRules
    from token_agent.store import Store

    with Store.open(tmp_path / "s.db") as store:
        user = store.add_user("alice")
        scope = lockout.password_scope(user.id)
        loose = LockoutRules(max_failures=100, limit=100)
        for _ in range(5):
            lockout.attempt(store, scope, user.id, now=1000.0, label="password", rules=loose)
            lockout.failed(store, scope, rules=loose)
        assert not lockout.state(store, scope).permanent
        strict = LockoutRules(max_failures=5, limit=5)
        with pytest.raises(lockout.Locked) as raised:
            lockout.attempt(store, scope, user.id, now=1000.0, label="password", rules=strict)
        assert raised.value.until == lockout.PERMANENT
        assert lockout.state(store, scope).permanent
