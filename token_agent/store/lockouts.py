"""The lockouts area: failed attempts and growing lockouts (``lockouts``), per method
(``method:ID``) or per user's password (``password:USER_ID``); ``token_agent.factors.lockout``
holds the rules.

Counting a failure against a threshold is a read-then-write: the caller, inside one
``transaction()``, makes sure the row exists (``ensure_lockout``), reads it with a row lock
(``lock_lockouts``: ``engine.for_update``), then writes; so concurrent attempts on a
READ COMMITTED PostgreSQL are counted one after the other (SQLite's ``BEGIN IMMEDIATE``
already serialises them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .core import as_dict

_COLUMNS = "scope, user_id, failures, level, locked_until, last_failure_at"


class LockoutsArea:
    """Failure counts and lockouts (a mixin of ``Store``)."""

    def get_lockout(self, scope: str) -> dict[str, Any] | None:
        """The lockout row of ``scope`` (``scope``, ``user_id``, ``failures``, ``level``,
        ``locked_until``, ``last_failure_at``), or ``None``."""
        with self._using("read a lockout") as conn:
            return as_dict(conn.execute(f"SELECT {_COLUMNS} FROM lockouts WHERE scope = ?",
                                        (scope,)).fetchone())

    def ensure_lockout(self, scope: str, user_id: str) -> None:
        """Make sure ``scope`` has a row (no failures) to lock (inside a transaction)."""
        with self.transaction(), self._using("count an attempt") as conn:
            conn.execute("INSERT INTO lockouts (scope, user_id, failures, level) VALUES (?, ?, 0, 0) "
                         "ON CONFLICT (scope) DO NOTHING", (scope, user_id))

    def lock_lockouts(self, scopes: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The rows of ``scopes`` that exist, by scope, read with a row lock held to the end
        of the caller's transaction (in the order of their scopes, so two callers never
        wait for each other in a circle)."""
        scopes = sorted(set(scopes))
        with self._using("read a lockout") as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM lockouts WHERE scope IN ({', '.join('?' * len(scopes))}) "
                f"ORDER BY scope{self._engine.for_update}", scopes).fetchall()
        return {r["scope"]: as_dict(r) for r in rows}

    def count_lockout_failure(self, scope: str, *, now: float, level: int) -> None:
        """One more failure of ``scope`` (its row exists: ``ensure_lockout``), at ``level``."""
        with self.transaction(), self._using("count an attempt") as conn:
            conn.execute("UPDATE lockouts SET failures = failures + 1, level = ?, last_failure_at = ? "
                         "WHERE scope = ?", (int(level), float(now), scope))

    def lock_until(self, scope: str, user_id: str, until: float, level: int | None = None) -> None:
        """Lock ``scope`` until ``until`` (and set its level, when given); the row is
        created if needed."""
        with self.transaction(), self._using("record a failure") as conn:
            if level is None:
                conn.execute(
                    "INSERT INTO lockouts (scope, user_id, failures, level, locked_until) "
                    "VALUES (?, ?, 0, 0, ?) ON CONFLICT (scope) DO UPDATE SET "
                    "locked_until = excluded.locked_until", (scope, user_id, float(until)))
            else:
                conn.execute("UPDATE lockouts SET level = ?, locked_until = ? WHERE scope = ?",
                             (int(level), float(until), scope))

    def clear_lockout(self, scope: str) -> None:
        """Forget the failures and lockout of ``scope``."""
        with self.transaction(), self._using("clear failures") as conn:
            conn.execute("DELETE FROM lockouts WHERE scope = ?", (scope,))

    def user_lockouts(self, user_id: str) -> list[dict[str, Any]]:
        """Every lockout row of a user, by scope."""
        with self._using("list lockouts") as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM lockouts WHERE user_id = ? ORDER BY scope",
                                (user_id,)).fetchall()
        return [as_dict(r) for r in rows]
