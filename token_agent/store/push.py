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
