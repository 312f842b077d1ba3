"""Races between processes on the store's atomic operations (issue 14): 8 processes, each
with its own ``Store`` on the same target, started together, race on

* the same TOTP code: one accepts it, the others see a replay;
* the same one-time (SMS) code, the same backup code: one consumes it;
* failures at the lockout thresholds: the count is exact, and no more attempts get through
  than the limit allows;
* a FIDO2 signature counter: one of the same value wins, the rest are regressions; with
  growing values, the stored counter ends at the highest and never goes down;
* a push request answered by several phones: one answer counts.

Each race runs for several rounds (a fresh user, code or request each time), so that a
lost race shows. The children are in ``race_workers.py`` (processes, "spawn": no state
shared with the test but what their arguments carry).

The store target is the fixture ``store_target``: a SQLite file today; the PostgreSQL
param (``"postgresql"``, from the ``pg_url`` fixture) is added to ``STORE_TARGETS``.
"""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

import pytest
import race_workers as rw

from token_agent.delivery import Delivery, parse_delivery_config
from token_agent.factors import FactorContext, LockoutRules, backup, codes, lockout, push, totp
from token_agent.outcome import Reason
from token_agent.secretbox import SecretKeys
from token_agent.store import Store

# Not marked store_contract: every run already races on both engines (the params below), so
# the contract suite's second, PostgreSQL pass would only repeat the postgresql races.

#: the store engines these races run on; "postgresql" takes the URL of the ``pg_url``
#: fixture (tests/conftest.py): any database, the tests make their own uniquely named users
#: (with --store-engine postgresql the test process's Store.open(path) goes to PostgreSQL
#: while the workers would open the file: the SQLite race runs in the SQLite run only)
STORE_TARGETS = [pytest.param("sqlite", marks=pytest.mark.sqlite_only), "postgresql"]
#: processes per race, and rounds of each race
PROCS = 8
ROUNDS = 5
T0 = 1_700_000_000.0


@pytest.fixture(params=STORE_TARGETS)
def store_target(request, tmp_path) -> str:
    """What ``Store.open`` takes to reach the store every process shares."""
    if request.param == "sqlite":
        return str(tmp_path / "token-agent.db")
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    raise AssertionError(f"unknown store target {request.param!r}")


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def master() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def ctx(store_target, master, tmp_path):
    """The test's own store (set-up and checks), its context and clock."""
    clock = Clock()
    store = Store.open(store_target, clock=clock)
    outbox = tmp_path / "outbox"
    delivery = Delivery(parse_delivery_config(
        {ch: {"gateway": "outbox"} for ch in codes.CHANNELS} | {"outbox": {"dir": str(outbox)}}))
    ctx = FactorContext(store, SecretKeys(master), delivery=delivery, clock=clock)
    yield ctx
    store.close()


def new_user(ctx: FactorContext, what: str):
    return ctx.store.add_user(f"race-{what}-{uuid.uuid4().hex[:12]}")


def one_winner(results: list, winner, loser) -> None:
    assert len(results) == PROCS
    assert results.count(winner) == 1, results
    assert [r for r in results if r != winner] == [loser] * (PROCS - 1), results


# --------------------------------------------------------------------------- (a) TOTP


def test_a_totp_code_is_accepted_once(store_target, ctx, master):
    for round_ in range(ROUNDS):
        user = new_user(ctx, "totp")
        e = totp.begin_enrol(ctx, user.id)
        assert totp.confirm_enrol(ctx, user.id, totp.code_at(e.secret, ctx.now())).ok
        now = ctx.now() + 30 * (round_ + 1)  # a step not used yet
        code = totp.code_at(e.secret, now)
        results = rw.race(store_target, rw.op_totp, [(master, now, user.id, code)] * PROCS)
        one_winner(results, ("ok",), ("refused", Reason.CODE_REPLAYED.value))


# --------------------------------------------------------------------------- (b) codes


def last_sent_code(outbox: Path) -> str:
    import json

    newest = max(outbox.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(newest.read_text())["code"]


def test_a_one_time_code_is_consumed_once(store_target, ctx, master, tmp_path):
    for round_ in range(ROUNDS):
        user = new_user(ctx, "sms")
        ctx.clock.t = T0 + 10_000 * round_
        codes.add_contact(ctx, user.id, "sms", "+447700900123")
        assert codes.confirm_contact(ctx, user.id, "sms", last_sent_code(tmp_path / "outbox")).ok
        ctx.clock.t += ctx.codes.ttl_seconds + 1
        method = ctx.store.find_method(user.id, "sms")
        codes.send_code(ctx, method)
        code = last_sent_code(tmp_path / "outbox")
        results = rw.race(store_target, rw.op_one_time_code,
                          [(master, ctx.now() + 1, method.id, code)] * PROCS)
        one_winner(results, ("ok",), ("refused", Reason.CODE_REPLAYED.value))


def test_a_backup_code_is_consumed_once(store_target, ctx, master):
    for _ in range(ROUNDS):
        user = new_user(ctx, "backup")
        _, fresh = backup.generate(ctx, user.id)
        results = rw.race(store_target, rw.op_backup_code,
                          [(master, ctx.now(), user.id, fresh[0])] * PROCS)
        one_winner(results, ("ok",), ("refused", Reason.CODE_REPLAYED.value))
        assert backup.remaining(ctx, user.id) == len(fresh) - 1


# --------------------------------------------------------------------------- (c) lockout


#: the time between an attempt and its failure in the lockout races: what a real check takes
#: (scrypt for a password: tens of milliseconds), so that attempts of other processes come in
#: between, as they do in production
CHECK_SECONDS = 0.01


def lockout_race(store_target, ctx, rules: LockoutRules, tries: int):
    user = new_user(ctx, "lockout")
    scope = lockout.password_scope(user.id)
    args = (user.id, scope, ctx.now(), rules.__dict__, tries, CHECK_SECONDS)
    results = rw.race(store_target, rw.op_lockout, [args] * PROCS)
    admitted = sum(a for a, _ in results)
    assert admitted + sum(r for _, r in results) == PROCS * tries
    return admitted, lockout.state(ctx.store, scope)


def test_lockout_failures_are_counted_exactly(store_target, ctx):
    """No lost update: every attempt let through is one failure in the count."""
    rules = LockoutRules(max_failures=100, limit=100)
    for _ in range(ROUNDS):
        admitted, state = lockout_race(store_target, ctx, rules, tries=10)
        assert admitted == PROCS * 10 and state.failures == PROCS * 10, (admitted, state)
        assert not state.locked(ctx.now())


def test_no_more_attempts_than_the_limit_get_through(store_target, ctx):
    """At ``limit`` consecutive failures the scope locks for good: however the 8 processes
    interleave, exactly ``limit`` attempts are let through, and the count is exact."""
    rules = LockoutRules(max_failures=100, limit=20)
    for _ in range(ROUNDS):
        admitted, state = lockout_race(store_target, ctx, rules, tries=5)
        assert admitted == rules.limit and state.failures == rules.limit, (admitted, state)
        assert state.permanent, state


def test_no_more_attempts_than_max_failures_get_through(store_target, ctx):
    """At ``max_failures`` failures the scope locks for a while: exactly ``max_failures``
    attempts are let through while the clock stands still."""
    rules = LockoutRules(max_failures=5, limit=100)
    for _ in range(ROUNDS):
        admitted, state = lockout_race(store_target, ctx, rules, tries=3)
        assert admitted == rules.max_failures, (admitted, state)
        assert state.failures == admitted and state.locked(ctx.now()), state


# --------------------------------------------------------------------------- (d) FIDO2


def new_credential(ctx):
    user = new_user(ctx, "key")
    credential_id = secrets.token_bytes(32)
    ctx.store.add_fido_credential(
        user.id, name="key", credential_id=credential_id, public_key=b"\xa1\x01\x02",
        aaguid=uuid.uuid4().bytes, rp_id="token-agent.local", sign_count=10, discoverable=True,
        uv_enrolled=True, attestation_format="none", attestation_trusted=False)
    return credential_id


def test_one_sign_counter_value_is_accepted_once(store_target, ctx):
    for round_ in range(ROUNDS):
        credential_id = new_credential(ctx)
        value = 11 + round_
        results = rw.race(store_target, rw.op_fido_counters, [(credential_id, [value])] * PROCS)
        one_winner(results, ([value], 0, False), ([], 1, False))
        assert ctx.store.get_fido_credential(credential_id).sign_count == value


def test_sign_counters_only_move_forward(store_target, ctx):
    """Child i records i+11, i+19, i+27, ... (interleaved across children): each accepted
    value was higher than the one stored, no process ever reads the counter going down,
    and the stored counter ends at the highest value sent."""
    for _ in range(ROUNDS):
        credential_id = new_credential(ctx)
        sent = [[11 + i + PROCS * k for k in range(10)] for i in range(PROCS)]
        results = rw.race(store_target, rw.op_fido_counters, [(credential_id, s) for s in sent])
        accepted = [v for a, _, _ in results for v in a]
        assert not any(down for _, _, down in results), results
        assert len(accepted) == len(set(accepted))  # no value accepted twice
        assert len(accepted) + sum(r for _, r, _ in results) == PROCS * 10
        highest = max(v for s in sent for v in s)
        assert highest in accepted
        assert ctx.store.get_fido_credential(credential_id).sign_count == highest


# --------------------------------------------------------------------------- (e) push


def test_a_push_request_is_answered_once(store_target, ctx, master, tmp_path):
    for round_ in range(ROUNDS):
        user = new_user(ctx, "push")
        path = tmp_path / f"companion-{round_}.json"
        method = push.enrol(ctx, user.id, path, name="phone")
        companion = push.load_companion(path)
        push.pair(ctx, user.id, method, companion)
        request = push.start(ctx, user.id, context={"workstation": "ward-7-pc3"})
        answers = [push.answer(companion, request.id, approve=i % 2 == 0,
                               number=request.number).to_json() for i in range(PROCS)]
        results = rw.race(store_target, rw.op_push_answer,
                          [(master, ctx.now(), a) for a in answers])
        decided = [r for r in results if r[0] == "decided"]
        assert len(decided) == 1, results
        assert decided[0][1] in ("approved", "denied")
        assert all(r[0] == "refused" for r in results if r not in decided), results
        assert push.wait(ctx, request.id, timeout=1).ok == (decided[0][1] == "approved")
