"""Phone call approvals (``voice_calls``) and forgotten-password resets in progress
(``recovery_resets``), one schema migration for both.

A call is decided once: ``decide_voice_call`` is one conditional UPDATE (``state =
'pending'``), so a webhook delivered twice, or racing the login's own expiry, changes it
once. ``token_agent.factors.voicecall`` starts, decides and waits; ``token_agent.recovery``
runs a reset, whose row is found by the SHA-256 of the browser's reset cookie.
"""

from __future__ import annotations

from typing import Any

from .core import as_dict

_CALL_COLUMNS = "id, method_id, created_at, expires_at, state, result, decided_at"
_RESET_COLUMNS = ("id, user_id, username, created_at, expires_at, proofs, step_kind, "
                  "step_method, state, updated_at")


class CallsArea:
    """Phone call approvals and password resets (a mixin of ``Store``)."""

    # --- voice calls

    def open_voice_call(self, call_id: str, method_id: int, *, created_at: float,
                        expires_at: float) -> int:
        """Store a new pending call of a method; its earlier pending calls are cancelled
        (one call at a time). Returns how many were cancelled."""
        now = float(created_at)
        with self.transaction(), self._using("start a phone call") as conn:
            cancelled = conn.execute(
                "UPDATE voice_calls SET state = 'cancelled', decided_at = ? "
                "WHERE method_id = ? AND state = 'pending'", (now, int(method_id))).rowcount
            conn.execute(
                "INSERT INTO voice_calls (id, method_id, created_at, expires_at, state) "
                "VALUES (?, ?, ?, ?, 'pending')",
                (call_id, int(method_id), now, float(expires_at)))
        return cancelled

    def get_voice_call(self, call_id: str) -> dict[str, Any] | None:
        with self._using("read a phone call") as conn:
            return as_dict(conn.execute(f"SELECT {_CALL_COLUMNS} FROM voice_calls WHERE id = ?",
                                        (str(call_id),)).fetchone())

    def decide_voice_call(self, call_id: str, state: str, decided_at: float,
                          result: str | None = None) -> bool:
        """Decide a pending call once; False when it was no longer pending."""
        with self.transaction(), self._using("decide a phone call") as conn:
            return conn.execute(
                "UPDATE voice_calls SET state = ?, result = ?, decided_at = ? "
                "WHERE id = ? AND state = 'pending'",
                (state, result, float(decided_at), str(call_id))).rowcount == 1

    def voice_calls_since(self, method_id: int, since: float) -> list[float]:
        """When the method's calls since ``since`` were started, oldest first."""
        with self._using("read phone calls") as conn:
            rows = conn.execute("SELECT created_at FROM voice_calls WHERE method_id = ? "
                                "AND created_at >= ? ORDER BY created_at",
                                (int(method_id), float(since))).fetchall()
        return [float(r["created_at"]) for r in rows]

    # --- password resets

    def add_reset(self, reset_id: str, user_id: str | None, username: str, *, now: float,
                  expires_at: float) -> None:
        with self.transaction(), self._using("start a password reset") as conn:
            conn.execute("DELETE FROM recovery_resets WHERE expires_at < ?", (float(now),))
            conn.execute(
                "INSERT INTO recovery_resets (id, user_id, username, created_at, expires_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (reset_id, user_id, username, float(now), float(expires_at), float(now)))

    def get_reset(self, reset_id: str) -> dict[str, Any] | None:
        with self._using("read a password reset") as conn:
            return as_dict(conn.execute(
                f"SELECT {_RESET_COLUMNS} FROM recovery_resets WHERE id = ?",
                (str(reset_id),)).fetchone())

    def update_reset(self, reset_id: str, *, expect_state: str, now: float,
                     expect_step: str | None = None, **values: Any) -> bool:
        """Change a reset's ``proofs``, ``step_kind``, ``step_method`` or ``state`` when it
        is still in ``expect_state`` (and, given ``expect_step``, asking for that step): one
        conditional UPDATE, so only one of two racing requests changes it; False for the
        other, or when the reset is gone."""
        allowed = {"proofs", "step_kind", "step_method", "state"}
        if not values or set(values) - allowed:
            raise ValueError(f"a reset's columns to change are {', '.join(sorted(allowed))}")
        names = sorted(values)
        sets = ", ".join(f"{n} = ?" for n in names)
        step = "" if expect_step is None else " AND step_kind = ?"
        with self.transaction(), self._using("update a password reset") as conn:
            return conn.execute(
                f"UPDATE recovery_resets SET {sets}, updated_at = ? WHERE id = ? AND state = ?"
                f"{step}", (*[values[n] for n in names], float(now), str(reset_id), expect_state,
                            *(() if expect_step is None else (expect_step,)))
            ).rowcount == 1

    def delete_reset(self, reset_id: str) -> None:
        with self.transaction(), self._using("end a password reset") as conn:
            conn.execute("DELETE FROM recovery_resets WHERE id = ?", (str(reset_id),))
