"""The sessions area: the service's sessions (successful logins), kept so that they survive
its restart (``sessions``)."""

from __future__ import annotations

from collections.abc import Sequence

from .engine import Row
from .errors import InvalidValue
from .records import SESSION_STATES, LoginSession


class SessionsArea:
    """The service's sessions (a mixin of ``Store``)."""

    @staticmethod
    def _session(row: Row) -> LoginSession:
        return LoginSession(
            id=row["id"], user_id=row["user_id"], username=row["username"], method=row["method"],
            created_at=row["created_at"], updated_at=row["updated_at"], state=row["state"],
            end_reason=row["end_reason"], device_id=row["device_id"],
            card_reader=row["card_reader"], card_atr=row["card_atr"],
            card_serial=row["card_serial"])

    def add_session(self, session_id: str, user_id: str, *, method: str,
                    device_id: str | None = None, card_reader: str | None = None,
                    card_atr: str | None = None, card_serial: str | None = None) -> LoginSession:
        """Record an active session of a user (``UnknownUser``)."""
        if not isinstance(session_id, str) or not 1 <= len(session_id) <= 64:
            raise InvalidValue(f"invalid session id {session_id!r}")
        with self.transaction(), self._using("record a session") as conn:
            user = self.get_user_by_id(user_id)
            now = self._now()
            conn.execute(
                "INSERT INTO sessions (id, user_id, username, method, created_at, updated_at, "
                "state, device_id, card_reader, card_atr, card_serial) "
                "VALUES (?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                (session_id, user.id, user.username, str(method), now, now, device_id,
                 card_reader, card_atr, card_serial))
            return self.get_session(session_id)

    def get_session(self, session_id: str) -> LoginSession | None:
        """The session with that id, or ``None``."""
        with self._using("read a session") as conn:
            row = conn.execute("SELECT * FROM sessions WHERE id = ?", (str(session_id),)).fetchone()
        return None if row is None else self._session(row)

    def list_sessions(self, user_id: str | None = None,
                      states: Sequence[str] | None = None) -> list[LoginSession]:
        """Sessions (of one user, in some states), oldest first."""
        clauses, args = [], []
        if user_id is not None:
            clauses.append("user_id = ?"); args.append(user_id)  # noqa: E702
        if states is not None:
            states = list(states)
            clauses.append(f"state IN ({', '.join('?' * len(states))})"); args.extend(states)  # noqa: E702
        where = ("WHERE " + " AND ".join(clauses) + " ") if clauses else ""
        with self._using("list sessions") as conn:
            rows = conn.execute(f"SELECT * FROM sessions {where}ORDER BY created_at, id",
                                args).fetchall()
        return [self._session(r) for r in rows]

    def set_session_state(self, session_id: str, state: str,
                          reason: str | None = None) -> LoginSession | None:
        """Move a session to ``state`` (active, locked, ended) with the reason; ``None``
        when there is no such session. An ended session stays ended."""
        if state not in SESSION_STATES:
            raise InvalidValue(f"invalid session state {state!r}: one of {', '.join(SESSION_STATES)}")
        with self.transaction(), self._using("change a session") as conn:
            conn.execute("UPDATE sessions SET state = ?, end_reason = ?, updated_at = ? "
                         "WHERE id = ? AND (state != 'ended' OR ? = 'ended')",
                         (state, reason, self._now(), str(session_id), state))
            return self.get_session(session_id)
