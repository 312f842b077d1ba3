"""The web pages' area (schema migration 9): browser sessions and shared rate limits.

A session is found by the SHA-256 of its cookie's token (``id_hash``); the token itself is
never stored, so a copy of the database opens no one's session. Each row carries the last
sign-in that counts for re-authentication (``auth_at``, ``multi_factor``, ``method``), the
session's CSRF token, a message shown once (``flash``) and a page's pending state (``data``,
a JSON object of at most 16 KiB: e.g. an authenticator app being added). Idle and absolute
timeouts are the caller's (``token_agent/web/sessions.py``), applied when a session is read
and by ``purge_web_sessions``.

``hit_throttle`` counts one attempt in a fixed window per (scope, key) with one upsert, so
every replica of the server shares the limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import InvalidValue

#: a session's pending page state, at most (bytes of JSON)
MAX_DATA = 16384


@dataclass(frozen=True)
class WebSessionRow:
    id_hash: bytes
    user_id: str
    csrf: str
    created_at: float
    last_seen_at: float
    auth_at: float
    multi_factor: bool
    method: str
    address: str | None
    user_agent: str | None
    flash: str | None
    data: dict


def _row(row: Any) -> WebSessionRow:
    return WebSessionRow(
        id_hash=bytes(row["id_hash"]), user_id=row["user_id"], csrf=row["csrf"],
        created_at=float(row["created_at"]), last_seen_at=float(row["last_seen_at"]),
        auth_at=float(row["auth_at"]), multi_factor=bool(row["multi_factor"]),
        method=row["method"], address=row["address"], user_agent=row["user_agent"],
        flash=row["flash"], data=json.loads(row["data"] or "{}"))


def _data(data: dict) -> str:
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    if len(text) > MAX_DATA:
        raise InvalidValue(f"a web session's page state is limited to {MAX_DATA} bytes")
    return text


class WebSessionsArea:
    """The web pages' sessions and rate limits (a mixin of ``Store``)."""

    def add_web_session(self, id_hash: bytes, user_id: str, *, csrf: str, now: float,
                        multi_factor: bool, method: str, address: str | None,
                        user_agent: str | None, flash: str | None = None) -> None:
        with self.transaction(), self._using("record a web session") as conn:
            conn.execute(
                "INSERT INTO web_sessions (id_hash, user_id, csrf, created_at, last_seen_at, "
                "auth_at, multi_factor, method, address, user_agent, flash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (bytes(id_hash), str(user_id), csrf, now, now, now, int(bool(multi_factor)),
                 str(method)[:64], (address or None) and address[:64],
                 (user_agent or None) and user_agent[:256], flash))

    def get_web_session(self, id_hash: bytes) -> WebSessionRow | None:
        with self._using("read a web session") as conn:
            row = conn.execute("SELECT * FROM web_sessions WHERE id_hash = ?",
                               (bytes(id_hash),)).fetchone()
        return None if row is None else _row(row)

    def touch_web_session(self, id_hash: bytes, now: float) -> None:
        with self.transaction(), self._using("record a web session's use") as conn:
            conn.execute("UPDATE web_sessions SET last_seen_at = ? WHERE id_hash = ?",
                         (now, bytes(id_hash)))

    def reauth_web_session(self, id_hash: bytes, *, now: float, multi_factor: bool,
                           method: str) -> None:
        """Record a fresh sign-in of the session's user (re-authentication)."""
        with self.transaction(), self._using("record a re-authentication") as conn:
            conn.execute("UPDATE web_sessions SET auth_at = ?, multi_factor = ?, method = ?, "
                         "last_seen_at = ? WHERE id_hash = ?",
                         (now, int(bool(multi_factor)), str(method)[:64], now, bytes(id_hash)))

    def set_web_flash(self, id_hash: bytes, flash: str | None) -> None:
        with self.transaction(), self._using("record a web message") as conn:
            conn.execute("UPDATE web_sessions SET flash = ? WHERE id_hash = ?",
                         (None if flash is None else flash[:1024], bytes(id_hash)))

    def take_web_flash(self, id_hash: bytes) -> str | None:
        """The message to show once, cleared."""
        with self.transaction(), self._using("read a web message") as conn:
            row = conn.execute("SELECT flash FROM web_sessions WHERE id_hash = ?",
                               (bytes(id_hash),)).fetchone()
            if row is None or row["flash"] is None:
                return None
            conn.execute("UPDATE web_sessions SET flash = NULL WHERE id_hash = ?",
                         (bytes(id_hash),))
            return row["flash"]

    def set_web_data(self, id_hash: bytes, data: dict) -> None:
        """Replace the session's pending page state (``InvalidValue`` past 16 KiB)."""
        text = _data(data)
        with self.transaction(), self._using("record a page's state") as conn:
            conn.execute("UPDATE web_sessions SET data = ? WHERE id_hash = ?",
                         (text, bytes(id_hash)))

    def end_web_session(self, id_hash: bytes) -> bool:
        with self.transaction(), self._using("end a web session") as conn:
            cur = conn.execute("DELETE FROM web_sessions WHERE id_hash = ?", (bytes(id_hash),))
            return (cur.rowcount or 0) > 0

    def end_web_sessions_of(self, user_id: str) -> int:
        """End every web session of a user (a password reset, methods reset): how many."""
        with self.transaction(), self._using("end a user's web sessions") as conn:
            cur = conn.execute("DELETE FROM web_sessions WHERE user_id = ?", (str(user_id),))
            return cur.rowcount or 0

    def web_sessions_of(self, user_id: str) -> list[WebSessionRow]:
        with self._using("list a user's web sessions") as conn:
            rows = conn.execute("SELECT * FROM web_sessions WHERE user_id = ? "
                                "ORDER BY last_seen_at DESC", (str(user_id),)).fetchall()
        return [_row(r) for r in rows]

    def purge_web_sessions(self, *, idle_before: float, created_before: float) -> int:
        """Remove sessions idle since ``idle_before`` or made before ``created_before``."""
        with self.transaction(), self._using("remove old web sessions") as conn:
            cur = conn.execute("DELETE FROM web_sessions WHERE last_seen_at < ? OR "
                               "created_at < ?", (idle_before, created_before))
            return cur.rowcount or 0

    def count_web_sessions(self, user_id: str) -> int:
        with self._using("count a user's web sessions") as conn:
            row = conn.execute("SELECT count(*) AS n FROM web_sessions WHERE user_id = ?",
                               (str(user_id),)).fetchone()
        return int(row["n"])

    def hit_throttle(self, scope: str, key: str, *, now: float, window: float) -> tuple[int, float]:
        """Count one attempt for (scope, key) in the current fixed window of ``window``
        seconds: returns (attempts in the window, this one included; when it started)."""
        if not 1 <= len(scope) <= 64 or not 1 <= len(key) <= 256:
            raise InvalidValue("a rate limit's scope is 1 to 64 characters and its key 1 to 256")
        with self.transaction(), self._using("count an attempt") as conn:
            row = conn.execute(
                "INSERT INTO web_throttle (scope, key, window_start, count) VALUES (?, ?, ?, 1) "
                "ON CONFLICT (scope, key) DO UPDATE SET "
                "count = CASE WHEN web_throttle.window_start <= ? THEN 1 "
                "ELSE web_throttle.count + 1 END, "
                "window_start = CASE WHEN web_throttle.window_start <= ? THEN ? "
                "ELSE web_throttle.window_start END "
                "RETURNING count, window_start",
                (scope, key, now, now - window, now - window, now)).fetchone()
        return int(row["count"]), float(row["window_start"])

    def purge_throttle(self, before: float) -> int:
        with self.transaction(), self._using("remove old rate-limit counters") as conn:
            cur = conn.execute("DELETE FROM web_throttle WHERE window_start < ?", (before,))
            return cur.rowcount or 0
