"""The access passes area: temporary access passes (``access_passes``, schema migration 9;
``token_agent.factors.accesspass`` holds the rules).

A pass's row keeps its keyed hash (never the pass), who issued it and when it expires; it ends
once (``ended_at``, ``end_reason``: used, expired, replaced, revoked), each end one
conditional UPDATE, so a pass is used at most once whatever the number of servers sharing
the store, and at most one pass of a user is open (a partial unique index)."""

from __future__ import annotations

from typing import Any

from .core import as_dict
from .errors import InvalidValue

END_REASONS = ("used", "expired", "replaced", "revoked")
_COLUMNS = "id, user_id, pass_hash, issued_by, created_at, expires_at, ended_at, end_reason"


class AccessPassesArea:
    """Temporary access passes (a mixin of ``Store``)."""

    def add_access_pass(self, user_id: str, pass_hash: bytes, *, issued_by: str,
                        created_at: float, expires_at: float) -> tuple[int, list[int]]:
        """A new open pass for the user; the user's open pass, if any, ends as ``replaced``
        (the same transaction). Returns the new id and the ids replaced. ``UnknownUser``."""
        if not isinstance(pass_hash, bytes) or len(pass_hash) != 32:
            raise InvalidValue("an access pass's hash is 32 bytes")
        if not float(expires_at) > float(created_at):
            raise InvalidValue("an access pass must expire after it is issued")
        with self.transaction(), self._using("issue a temporary access pass") as conn:
            user = self.get_user_by_id(user_id)
            replaced = [int(r["id"]) for r in conn.execute(
                "UPDATE access_passes SET ended_at = ?, end_reason = 'replaced' "
                "WHERE user_id = ? AND ended_at IS NULL RETURNING id",
                (float(created_at), user.id)).fetchall()]
            new_id = conn.execute(
                "INSERT INTO access_passes (user_id, pass_hash, issued_by, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?) RETURNING id",
                (user.id, bytes(pass_hash), str(issued_by), float(created_at),
                 float(expires_at))).fetchone()[0]
        return int(new_id), replaced

    def access_passes(self, user_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """The user's latest passes, newest first: ``id``, ``user_id``, ``pass_hash``,
        ``issued_by``, ``created_at``, ``expires_at``, ``ended_at``, ``end_reason``."""
        with self._using("read temporary access passes") as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM access_passes WHERE user_id = ? "
                                "ORDER BY id DESC LIMIT ?", (user_id, int(limit))).fetchall()
        out = [as_dict(r) for r in rows]
        for r in out:
            r["pass_hash"] = bytes(r["pass_hash"])
        return out

    def use_access_pass(self, pass_id: int, now: float) -> bool:
        """End an open, unexpired pass as ``used``: one conditional UPDATE; False when it was
        used, ended or expired already (a replay, or another server won the race)."""
        with self.transaction(), self._using("use a temporary access pass") as conn:
            return conn.execute(
                "UPDATE access_passes SET ended_at = ?, end_reason = 'used' WHERE id = ? "
                "AND ended_at IS NULL AND expires_at > ?",
                (float(now), int(pass_id), float(now))).rowcount == 1

    def end_access_passes(self, user_id: str, reason: str, now: float) -> list[dict[str, Any]]:
        """End the user's open passes: ``expired`` ends those past their expiry (at their
        expiry time), ``revoked`` every open one (now). Returns the rows ended."""
        if reason not in ("expired", "revoked"):
            raise InvalidValue(f"an access pass is ended by hand as expired or revoked, "
                               f"not {reason!r}")
        with self.transaction(), self._using("end temporary access passes") as conn:
            if reason == "expired":
                rows = conn.execute(
                    "UPDATE access_passes SET ended_at = expires_at, end_reason = 'expired' "
                    f"WHERE user_id = ? AND ended_at IS NULL AND expires_at <= ? "
                    f"RETURNING {_COLUMNS}", (user_id, float(now))).fetchall()
            else:
                rows = conn.execute(
                    "UPDATE access_passes SET ended_at = ?, end_reason = 'revoked' "
                    f"WHERE user_id = ? AND ended_at IS NULL RETURNING {_COLUMNS}",
                    (float(now), user_id)).fetchall()
        return [as_dict(r) for r in rows]
