"""The push area: companion apps (``push_devices``: their Ed25519 public keys) and push
requests (``push_requests``: the number shown on the login screen, and what the companion
answered, once). ``token_agent.factors.push`` signs, checks and decides."""

from __future__ import annotations

from typing import Any

from .core import as_dict

_REQUEST_COLUMNS = "id, method_id, number, context, created_at, expires_at, state, decided_at"


class PushArea:
    """Companion apps and push requests (a mixin of ``Store``)."""

    def add_push_device(self, method_id: int, device_id: str, public_key: bytes) -> None:
        """Store the companion app of a new push method."""
        with self.transaction(), self._using("enrol a companion app") as conn:
            conn.execute("INSERT INTO push_devices (method_id, device_id, public_key) "
                         "VALUES (?, ?, ?)", (int(method_id), device_id, bytes(public_key)))

    def push_device(self, method_id: int) -> dict[str, Any] | None:
        """``device_id`` and ``public_key`` of a push method's companion app, or ``None``."""
        with self._using("read a companion app") as conn:
            return as_dict(conn.execute("SELECT device_id, public_key FROM push_devices "
                                        "WHERE method_id = ?", (int(method_id),)).fetchone())

    def push_device_by_id(self, device_id: str) -> dict[str, Any] | None:
        """``method_id`` and ``public_key`` of the companion app ``device_id``, or ``None``."""
        with self._using("read a companion app") as conn:
            return as_dict(conn.execute("SELECT method_id, public_key FROM push_devices "
                                        "WHERE device_id = ?", (str(device_id),)).fetchone())

    def get_push_request(self, request_id: str) -> dict[str, Any] | None:
        """A push request (every column), or ``None``."""
        with self._using("read a push request") as conn:
            return as_dict(conn.execute(f"SELECT {_REQUEST_COLUMNS} FROM push_requests "
                                        "WHERE id = ?", (request_id,)).fetchone())

    def decide_push_request(self, request_id: str, state: str, decided_at: float) -> bool:
        """Answer a pending push request once: one conditional UPDATE (``state =
        'pending'``); False when it was no longer pending (answered, expired, cancelled, or
        another process won the race)."""
        with self.transaction(), self._using("decide a push request") as conn:
            return conn.execute("UPDATE push_requests SET state = ?, decided_at = ? "
                                "WHERE id = ? AND state = 'pending'",
                                (state, float(decided_at), request_id)).rowcount == 1

    def open_push_request(self, request_id: str, method_id: int, *, number: int, context: str,
                          created_at: float, expires_at: float) -> tuple[int, int]:
        """Store a new pending request of a push method; its earlier pending requests end
        (expired, or cancelled: one request at a time). Returns ``(expired, cancelled)``."""
        now = float(created_at)
        with self.transaction(), self._using("send a push request") as conn:
            expired = conn.execute(
                "UPDATE push_requests SET state = 'expired', decided_at = ? "
                "WHERE method_id = ? AND state = 'pending' AND expires_at <= ?",
                (now, int(method_id), now)).rowcount
            cancelled = conn.execute(
                "UPDATE push_requests SET state = 'cancelled', decided_at = ? "
                "WHERE method_id = ? AND state = 'pending'", (now, int(method_id))).rowcount
            conn.execute(
                "INSERT INTO push_requests (id, method_id, number, context, created_at, expires_at, "
                "state) VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                (request_id, int(method_id), int(number), context, now, float(expires_at)))
        return expired, cancelled

    def pending_push_requests(self, method_id: int, now: float) -> list[dict[str, Any]]:
        """A push method's pending, unexpired requests (``id``, ``created_at``,
        ``expires_at``, ``context``), oldest first."""
        with self._using("list push requests") as conn:
            rows = conn.execute("SELECT id, created_at, expires_at, context FROM push_requests "
                                "WHERE method_id = ? AND state = 'pending' AND expires_at > ? "
                                "ORDER BY created_at, id", (int(method_id), float(now))).fetchall()
        return [as_dict(r) for r in rows]

    # ----------------------------------------------------------------- pairing (migration 10)

    def add_push_pairing(self, code_hash: bytes, user_id: str, *, name: str, created_at: float,
                         expires_at: float) -> None:
        """Store a new pairing code (its keyed hash) of a user. The user's earlier unused
        codes end (one at a time), and expired or used codes of anyone are deleted, so the
        table holds at most one row per user."""
        now = float(created_at)
        with self.transaction(), self._using("start pairing a companion app") as conn:
            conn.execute("DELETE FROM push_pairings WHERE user_id = ? OR expires_at <= ? "
                         "OR used_at IS NOT NULL", (str(user_id), now))
            conn.execute("INSERT INTO push_pairings (code_hash, user_id, name, created_at, "
                         "expires_at) VALUES (?, ?, ?, ?, ?)",
                         (bytes(code_hash), str(user_id), str(name), now, float(expires_at)))

    def claim_push_pairing(self, code_hash: bytes, now: float) -> tuple[dict[str, Any] | None, str]:
        """Use the pairing code with that hash: one conditional UPDATE, so a code is used
        once whatever the number of servers. Returns ``({"user_id", "name"}, "ok")``, or
        ``(None, why)`` with why ``unknown``, ``used`` or ``expired``. Call inside the
        transaction that enrols the companion, so a failed enrolment leaves it unused."""
        with self.transaction(), self._using("use a pairing code") as conn:
            row = conn.execute(
                "UPDATE push_pairings SET used_at = ? WHERE code_hash = ? AND used_at IS NULL "
                "AND expires_at > ? RETURNING user_id, name",
                (float(now), bytes(code_hash), float(now))).fetchone()
            if row is not None:
                return as_dict(row), "ok"
            row = conn.execute("SELECT used_at FROM push_pairings WHERE code_hash = ?",
                               (bytes(code_hash),)).fetchone()
        if row is None:
            return None, "unknown"
        return None, ("used" if row["used_at"] is not None else "expired")

    def pending_push_pairing(self, user_id: str, now: float) -> dict[str, Any] | None:
        """The user's unused, unexpired pairing code (``created_at``, ``expires_at``,
        ``name``; never the code), or ``None``."""
        with self._using("read a pairing code") as conn:
            return as_dict(conn.execute(
                "SELECT created_at, expires_at, name FROM push_pairings WHERE user_id = ? "
                "AND used_at IS NULL AND expires_at > ?", (str(user_id), float(now))).fetchone())

    def use_push_nonce(self, device_id: str, nonce: str, *, expires_at: float, now: float) -> bool:
        """Record the nonce of a companion's signed request; False when it was seen before
        (a replay). The device's nonces whose window has closed are deleted first."""
        with self.transaction(), self._using("check a companion's request") as conn:
            conn.execute("DELETE FROM push_nonces WHERE device_id = ? AND expires_at <= ?",
                         (str(device_id), float(now)))
            return conn.execute("INSERT INTO push_nonces (device_id, nonce, expires_at) "
                                "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                                (str(device_id), str(nonce), float(expires_at))).rowcount == 1
