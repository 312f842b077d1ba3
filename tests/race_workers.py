"""The racing side of tests/test_store_races.py: functions run in child processes (the
"spawn" start method), each on its own ``Store`` of the same target.

A child gets everything by arguments (the store target, the master key, ids, codes, the
time its clock shows), says "ready" on the queue, waits for the start signal (one
``multiprocessing.Event`` for all), runs its operation and puts its result on the queue: a
tuple of plain values, or ``("error", traceback)``. :func:`race` runs the children and
collects the results, with time limits: a child that crashes or hangs fails the test with
its traceback or a clear message, it never hangs the run.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_mod
import time
import traceback
from typing import Any, Callable

#: how long a race may take, start to end (seconds)
RACE_TIMEOUT = 60.0


class FixedClock:
    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


def _context(store, master: bytes, now: float, rules: dict | None = None):
    from token_agent.factors import FactorContext, LockoutRules
    from token_agent.secretbox import SecretKeys

    kw = {} if rules is None else {"lockout": LockoutRules(**rules)}
    return FactorContext(store, SecretKeys(master), clock=FixedClock(now), **kw)


def _verification(v) -> tuple:
    return ("ok",) if v.ok else ("refused", v.reason.value if v.reason else None)


# --------------------------------------------------------------------------- operations
# Each is ``op(store, *args) -> result`` (plain values, picklable), run after the start signal.


def op_totp(store, master, now, user_id, code):
    from token_agent.factors import totp

    return _verification(totp.verify(_context(store, master, now), user_id, code))


def op_one_time_code(store, master, now, method_id, code):
    from token_agent.factors import codes

    ctx = _context(store, master, now)
    return _verification(codes.verify_code(ctx, store.get_method(method_id), code))


def op_backup_code(store, master, now, user_id, code):
    from token_agent.factors import backup

    return _verification(backup.verify(_context(store, master, now), user_id, code))


def op_lockout(store, user_id, scope, now, rules, tries, check_seconds=0.0):
    """``tries`` attempt/failed pairs on ``scope``, ``check_seconds`` apart (the time a real
    check takes: scrypt for a password, a decryption for a TOTP secret): how many attempts
    were let through, and how many were refused (``Locked``)."""
    import time

    from token_agent.factors import LockoutRules, lockout

    r = LockoutRules(**rules)
    admitted = refused = 0
    for _ in range(tries):
        try:
            lockout.attempt(store, scope, user_id, now=now, label="race", rules=r)
        except lockout.Locked:
            refused += 1
            continue
        admitted += 1
        time.sleep(check_seconds)
        lockout.failed(store, scope, rules=r)
    return admitted, refused


def op_fido_counters(store, credential_id, counters):
    """``record_fido_use`` with each counter in turn: the counters accepted, the number
    refused as a regression, and whether the stored counter this process read back ever
    went down."""
    from token_agent.store import SignCountRegression

    accepted, regressions, seen, went_down = [], 0, -1, False
    for value in counters:
        try:
            cred = store.record_fido_use(credential_id, value)
        except SignCountRegression:
            regressions += 1
        else:
            accepted.append(value)
            if cred.sign_count != value:
                went_down = True  # what was written is not what this call returned
        now = store.get_fido_credential(credential_id).sign_count
        if now < seen:
            went_down = True
        seen = now
    return accepted, regressions, went_down


def op_push_answer(store, master, now, signed_json):
    from token_agent.factors import FactorError, push

    signed = push.SignedAnswer.from_json(signed_json)
    try:
        return ("decided", push.submit(_context(store, master, now), signed))
    except FactorError as exc:
        return ("refused", exc.reason.value)


# --------------------------------------------------------------------------- the harness


def _child(index: int, target: str, op: Callable, args: tuple, start, results) -> None:
    store = None
    try:
        from token_agent.store import Store

        store = Store.open(target)
        results.put((index, "ready", None))
        if not start.wait(RACE_TIMEOUT):
            raise TimeoutError("the start signal never came")
        results.put((index, "done", op(store, *args)))
    except BaseException:  # reported to the test, which fails with it
        results.put((index, "error", traceback.format_exc()))
    finally:
        if store is not None:
            store.close()


def race(target: str, op: Callable, args_per_child: list[tuple]) -> list[Any]:
    """Run ``op(store, *args)`` in one process per entry of ``args_per_child``, all started
    at once once every child has opened its store; their results, in order. Raises
    ``AssertionError`` (with the child's traceback) when a child fails, exits without a
    result, or the race takes longer than ``RACE_TIMEOUT``."""
    mp = multiprocessing.get_context("spawn")
    start = mp.Event()
    results = mp.Queue()
    procs = [mp.Process(target=_child, args=(i, target, op, args, start, results), daemon=True)
             for i, args in enumerate(args_per_child)]
    n = len(procs)
    got: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        ready = 0
        deadline = time.monotonic() + RACE_TIMEOUT
        dead_since: dict[int, float] = {}
        while ready < n or len(got) < n:
            try:
                index, what, value = results.get(timeout=0.5)
            except queue_mod.Empty:
                now = time.monotonic()
                for i, p in enumerate(procs):
                    if p.exitcode is not None and i not in got:
                        # its last words may still be in the pipe: give them a moment
                        if now - dead_since.setdefault(i, now) > 2.0:
                            raise AssertionError(f"race: child {i} exited with {p.exitcode} "
                                                 "without a result") from None
                if now > deadline:
                    raise AssertionError(f"race: not over after {RACE_TIMEOUT:.0f} s ({ready}/{n} "
                                         f"ready, {len(got)}/{n} done)") from None
                continue
            if what == "error":
                raise AssertionError(f"race: child {index} failed:\n{value}")
            if what == "ready":
                ready += 1
                if ready == n:
                    start.set()
            else:
                got[index] = value
        for p in procs:
            p.join(RACE_TIMEOUT)
            if p.exitcode != 0:
                raise AssertionError(f"race: child exited with {p.exitcode} after its result")
        return [got[i] for i in range(n)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
