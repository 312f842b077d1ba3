"""Failed attempts and growing lockouts, per method (``method:ID``) or per password
(``password:USER_ID``).

``attempt()`` is called *before* a secret is checked: it refuses when the scope is locked,
and otherwise counts the attempt as a failure at once. ``succeeded()`` then clears the count;
``failed()`` leaves it, and when it reaches the limit locks the scope for
``base_seconds * 2**(level-1)`` (capped at ``max_seconds``), level growing with each lockout
and going back to zero after a success. Counting first means that guesses made in parallel
cannot exceed the limit, and that a crash in the middle of a check counts as a failure
(fail closed). A lock that has run out lets ``max_failures`` more attempts through.

An administrator's ``unlock`` clears a scope (or every scope of a user). The card's and the
key's own PIN counters are theirs: nothing here counts them.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from ..store import Store


@dataclass(frozen=True)
class LockState:
    scope: str
    failures: int
    level: int
    locked_until: float | None

    def locked(self, now: float) -> bool:
        return self.locked_until is not None and self.locked_until > now

    def to_json(self) -> dict:
        return {"scope": self.scope, "failures": self.failures, "level": self.level,
                "locked_until": self.locked_until}


class Locked(Exception):
    """The scope is locked until ``until`` (seconds since the epoch)."""

    def __init__(self, message: str, *, scope: str, until: float) -> None:
        super().__init__(message)
        self.message = message
        self.scope = scope
        self.until = until


def method_scope(method_id: int) -> str:
    return f"method:{int(method_id)}"


def password_scope(user_id: str) -> str:
    return f"password:{user_id}"


def lock_duration(level: int, base_seconds: int, max_seconds: int) -> float:
    """Seconds of the ``level``-th lockout (1, 2, ...): doubling, capped."""
    return float(min(max_seconds, base_seconds * 2 ** min(max(level - 1, 0), 40)))


def describe_until(until: float, now: float) -> str:
    """"for 2 min (until 10:42 UTC)"."""
    left = max(0, int(until - now + 0.999))
    if left < 120:
        span = f"{left} s"
    elif left < 7200:
        span = f"{(left + 59) // 60} min"
    else:
        span = f"{left / 3600:.1f} h"
    at = _dt.datetime.fromtimestamp(until, _dt.timezone.utc).strftime("%H:%M UTC")
    return f"for {span} (until {at})"


def state(store: Store, scope: str) -> LockState:
    with store.connection("read a lockout") as conn:
        row = conn.execute("SELECT failures, level, locked_until FROM lockouts WHERE scope = ?",
                           (scope,)).fetchone()
    if row is None:
        return LockState(scope, 0, 0, None)
    return LockState(scope, row["failures"], row["level"], row["locked_until"])


def attempt(store: Store, scope: str, user_id: str, *, now: float, label: str) -> LockState:
    """Count an attempt (as a failure until ``succeeded``); ``Locked`` if the scope is
    locked now. ``label`` names the method in the message ("authenticator app")."""
    with store.transaction(), store.connection("count an attempt") as conn:
        current = state(store, scope)
        if current.locked(now):
            raise Locked(f"too many failed attempts: {label} locked "
                         f"{describe_until(current.locked_until, now)}; an administrator can "
                         "unlock it", scope=scope, until=current.locked_until)
        conn.execute(
            "INSERT INTO lockouts (scope, user_id, failures, level, locked_until, last_failure_at) "
            "VALUES (?, ?, 1, 0, NULL, ?) ON CONFLICT (scope) DO UPDATE SET "
            "failures = failures + 1, last_failure_at = excluded.last_failure_at",
            (scope, user_id, now))
        return state(store, scope)


def failed(store: Store, scope: str, *, now: float, max_failures: int, base_seconds: int,
           max_seconds: int) -> LockState:
    """After a failed check (already counted by ``attempt``): lock when the count reached
    the limit. Returns the state (``locked_until`` set when this failure locked it)."""
    with store.transaction(), store.connection("record a failure") as conn:
        current = state(store, scope)
        if current.failures >= max_failures:
            level = current.level + 1
            until = now + lock_duration(level, base_seconds, max_seconds)
            conn.execute("UPDATE lockouts SET failures = 0, level = ?, locked_until = ? "
                         "WHERE scope = ?", (level, until, scope))
        return state(store, scope)


def succeeded(store: Store, scope: str) -> None:
    """After a successful check: the count and the lockout level go back to zero."""
    with store.transaction(), store.connection("clear failures") as conn:
        conn.execute("DELETE FROM lockouts WHERE scope = ?", (scope,))


def tries_left(current: LockState, max_failures: int) -> int:
    return max(0, max_failures - current.failures)


def user_locks(store: Store, user_id: str) -> list[LockState]:
    """Every scope of a user with failures or a lockout."""
    with store.connection("list lockouts") as conn:
        rows = conn.execute("SELECT scope, failures, level, locked_until FROM lockouts "
                            "WHERE user_id = ? ORDER BY scope", (user_id,)).fetchall()
    return [LockState(r["scope"], r["failures"], r["level"], r["locked_until"]) for r in rows]


def unlock(store: Store, user_id: str, scope: str | None = None) -> list[LockState]:
    """Clear one scope of the user, or all of them (an administrator's action); returns what
    was cleared."""
    with store.transaction(), store.connection("unlock") as conn:
        cleared = [s for s in user_locks(store, user_id) if scope is None or s.scope == scope]
        for s in cleared:
            conn.execute("DELETE FROM lockouts WHERE scope = ?", (s.scope,))
        return cleared
