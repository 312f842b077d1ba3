"""The codes area: where one-time codes are sent (``contact_methods``: an email address or a
phone number per channel) and the codes sent (``otp_challenges``: keyed hashes, single use,
expiring). ``token_agent.factors.codes`` makes, sends and checks them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .core import as_dict

_HISTORY_COLUMNS = "purpose, code_hash, created_at, expires_at, used_at, channel, attempts"


class CodesArea:
    """Contacts and one-time codes (a mixin of ``Store``)."""

    # ---------------------------------------------------------------- contacts

    def get_contact(self, method_id: int) -> dict[str, Any] | None:
        """``channel`` and ``destination`` of a contact method, or ``None``."""
        with self._using("read a contact") as conn:
            return as_dict(conn.execute("SELECT channel, destination FROM contact_methods "
                                        "WHERE method_id = ?", (int(method_id),)).fetchone())

    def user_contacts(self, user_id: str) -> dict[int, dict[str, Any]]:
        """The user's contact methods by method id: ``channel`` and ``destination``."""
        with self._using("list contacts") as conn:
            rows = conn.execute(
                "SELECT c.method_id, c.channel, c.destination FROM contact_methods c "
                "JOIN methods m ON m.id = c.method_id WHERE m.user_id = ?", (user_id,)).fetchall()
        return {int(r["method_id"]): as_dict(r) for r in rows}

    def add_contact(self, method_id: int, channel: str, destination: str,
                    history: Sequence[dict[str, Any]] = (), *, now: float) -> None:
        """Store the contact of a new contact method, and carry over ``history`` (the codes
        sent to the pending contacts it replaces, from ``code_history``: they still count
        against sending too often; an unused one is marked used ``now``)."""
        with self.transaction(), self._using("add a contact") as conn:
            conn.execute("INSERT INTO contact_methods (method_id, channel, destination) "
                         "VALUES (?, ?, ?)", (int(method_id), channel, destination))
            conn.executemany(
                f"INSERT INTO otp_challenges (method_id, {_HISTORY_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(int(method_id), h["purpose"], h["code_hash"], h["created_at"], h["expires_at"],
                  h["used_at"] if h["used_at"] is not None else now, h["channel"], h["attempts"])
                 for h in history])

    # ---------------------------------------------------------------- one-time codes

    def code_history(self, method_id: int) -> list[dict[str, Any]]:
        """Every code sent for a method (what ``add_contact`` carries over)."""
        with self._using("add a contact") as conn:
            rows = conn.execute(f"SELECT {_HISTORY_COLUMNS} FROM otp_challenges WHERE method_id = ? "
                                "ORDER BY id", (int(method_id),)).fetchall()
        return [as_dict(r) for r in rows]

    def codes_sent_since(self, method_id: int, since: float) -> list[dict[str, Any]]:
        """``created_at`` and ``purpose`` of the codes sent for a method after ``since``,
        oldest first."""
        with self._using("read the codes sent") as conn:
            rows = conn.execute("SELECT created_at, purpose FROM otp_challenges WHERE method_id = ? "
                                "AND created_at > ? ORDER BY created_at",
                                (int(method_id), float(since))).fetchall()
        return [as_dict(r) for r in rows]

    def record_code_sent(self, method_id: int, purpose: str, code_hash: bytes, *, now: float,
                         expires_at: float, channel: str | None) -> None:
        """Store a code just sent; the method's earlier unused codes of that purpose are
        used up (only the newest is valid)."""
        with self.transaction(), self._using("record a code sent") as conn:
            conn.execute("UPDATE otp_challenges SET used_at = ? WHERE method_id = ? AND purpose = ? "
                         "AND used_at IS NULL", (float(now), int(method_id), purpose))
            conn.execute("INSERT INTO otp_challenges (method_id, purpose, code_hash, created_at, "
                         "expires_at, channel) VALUES (?, ?, ?, ?, ?, ?)",
                         (int(method_id), purpose, bytes(code_hash), float(now), float(expires_at),
                          channel))

    def latest_code(self, method_id: int, purpose: str) -> dict[str, Any] | None:
        """The newest code sent for a method and purpose (``id``, ``code_hash``,
        ``expires_at``, ``used_at``, ``channel``), or ``None``."""
        with self._using("check a code") as conn:
            return as_dict(conn.execute(
                "SELECT id, code_hash, expires_at, used_at, channel FROM otp_challenges "
                "WHERE method_id = ? AND purpose = ? ORDER BY id DESC LIMIT 1",
                (int(method_id), purpose)).fetchone())

    def count_code_attempt(self, code_id: int) -> None:
        """Count a wrong try at a code."""
        with self.transaction(), self._using("check a code") as conn:
            conn.execute("UPDATE otp_challenges SET attempts = attempts + 1 WHERE id = ?",
                         (int(code_id),))

    def use_code(self, code_id: int, used_at: float) -> bool:
        """Consume a one-time code once: one conditional UPDATE (``used_at IS NULL``); False
        when it was used already (a replay, or another process won the race)."""
        with self.transaction(), self._using("check a code") as conn:
            return conn.execute("UPDATE otp_challenges SET used_at = ? WHERE id = ? "
                                "AND used_at IS NULL", (float(used_at), int(code_id))).rowcount == 1
