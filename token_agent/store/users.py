"""The users area: people who can log in (``users``, ``user_roles``)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable

from ..usernames import username_problem
from .engine import Row
from .errors import InvalidValue, UnknownUser, UserExists
from .records import MAX_DISPLAY_NAME_LEN, MFA_SOURCES, ROLE_RE, USER_CLASSES, USER_HANDLE_LEN, User


class UsersArea:
    """Users, their roles, class and MFA flag (a mixin of ``Store``)."""

    @property
    def _USER_SELECT(self) -> str:
        return ("SELECT u.id, u.username, u.display_name, u.user_handle, u.created_at, u.disabled, "
                "u.user_class, u.mfa_enabled, u.mfa_source, "
                f"(SELECT {self._engine.string_agg('r.role', ',')} FROM user_roles r "
                "WHERE r.user_id = u.id) AS roles FROM users u ")

    @staticmethod
    def _user(row: Row) -> User:
        return User(id=row["id"], username=row["username"], display_name=row["display_name"],
                    roles=sorted(row["roles"].split(",")) if row["roles"] else [],
                    user_handle=bytes(row["user_handle"]), created_at=row["created_at"],
                    disabled=bool(row["disabled"]), user_class=row["user_class"],
                    mfa_enabled=bool(row["mfa_enabled"]), mfa_source=row["mfa_source"])

    @staticmethod
    def _check_username(username: str) -> str:
        problem = username_problem(username)
        if problem is not None:
            raise InvalidValue(f"invalid username: {problem}")
        return username

    @staticmethod
    def _check_display_name(display_name: str) -> str:
        if (not isinstance(display_name, str) or not display_name.strip()
                or len(display_name) > MAX_DISPLAY_NAME_LEN or not display_name.isprintable()):
            raise InvalidValue(f"invalid display name {display_name!r}: 1 to {MAX_DISPLAY_NAME_LEN} "
                               "printable characters")
        return display_name.strip()

    @staticmethod
    def _check_roles(roles: Iterable[str]) -> list[str]:
        if isinstance(roles, str):
            raise InvalidValue("roles must be a list of strings, not a string")
        out = []
        for role in roles:
            if not isinstance(role, str) or not ROLE_RE.fullmatch(role):
                raise InvalidValue(f"invalid role {role!r}: 1 to 64 characters, letters, digits "
                                   "and . _ - : only")
            out.append(role)
        return sorted(set(out))

    @staticmethod
    def _check_user_class(user_class: str) -> str:
        if user_class not in USER_CLASSES:
            raise InvalidValue(f"invalid user class {user_class!r}: one of {', '.join(USER_CLASSES)}")
        return user_class

    def add_user(self, username: str, display_name: str | None = None,
                 roles: Iterable[str] = (), *, user_class: str = "internal",
                 mfa_enabled: bool = True) -> User:
        """Add a user with a new UUID4 id and a new random 32-byte user handle.

        ``username``: 1-64 letters, digits, ``.``, ``_``, ``-``, ``@``; unique regardless
        of case (``UserExists``). ``display_name`` defaults to the username. ``mfa_enabled``:
        the new account's own MFA flag (its source: ``new-account``; the policy's default for
        the class is ``Policy.new_account_mfa``).
        """
        self._check_username(username)
        display = self._check_display_name(username if display_name is None else display_name)
        role_list = self._check_roles(roles)
        self._check_user_class(user_class)
        with self.transaction(), self._using("add a user") as conn:
            row = conn.execute("SELECT username FROM users WHERE lower(username) = lower(?)",
                               (username,)).fetchone()
            if row is not None:
                raise UserExists(f"user {row['username']!r} already exists"
                                 + (f" (usernames ignore case: {username!r})"
                                    if row["username"] != username else ""))
            user_id = str(uuid.uuid4())
            conn.execute(
                "INSERT INTO users (id, username, display_name, user_handle, created_at, disabled, "
                "user_class, mfa_enabled, mfa_source) VALUES (?, ?, ?, ?, ?, 0, ?, ?, 'new-account')",
                (user_id, username, display, secrets.token_bytes(USER_HANDLE_LEN), self._now(),
                 user_class, int(bool(mfa_enabled))))
            conn.executemany("INSERT INTO user_roles (user_id, role) VALUES (?, ?)",
                             [(user_id, r) for r in role_list])
            return self.get_user_by_id(user_id)

    def mirror_user(self, user_id: str, username: str, display_name: str | None = None
                    ) -> User:
        """An organisation's user in a workstation's own store, which keeps only its
        sessions (``sessions.user_id`` refers to it): the row with the server's ``user_id``,
        made on first use (no method, no role, its own random user handle), its name and
        display name kept as the server says. ``UserExists`` when this store has a user of
        that name with another id (a store used before the workstation joined)."""
        self._check_username(username)
        display = self._check_display_name(username if display_name is None else display_name)
        with self.transaction(), self._using("keep an organisation's user") as conn:
            row = conn.execute("SELECT id FROM users WHERE lower(username) = lower(?)",
                               (username,)).fetchone()
            if row is not None and row["id"] != user_id:
                raise UserExists(f"this workstation's store has a user {username!r} of its own; "
                                 "it cannot log in through the organisation until it is removed "
                                 "here (token-agent users remove --store-url of the local store)")
            if row is None and conn.execute("SELECT id FROM users WHERE id = ?",
                                            (user_id,)).fetchone() is None:
                conn.execute(
                    "INSERT INTO users (id, username, display_name, user_handle, created_at, "
                    "disabled, user_class, mfa_enabled, mfa_source) "
                    "VALUES (?, ?, ?, ?, ?, 0, 'internal', 1, NULL)",
                    (user_id, username, display, secrets.token_bytes(USER_HANDLE_LEN),
                     self._now()))
            else:
                conn.execute("UPDATE users SET username = ?, display_name = ? WHERE id = ?",
                             (username, display, user_id))
            return self.get_user_by_id(user_id)

    def get_user(self, username: str) -> User:
        """The user with that username (case-insensitive); ``UnknownUser`` if none."""
        with self._using("read a user") as conn:
            row = conn.execute(self._USER_SELECT + "WHERE lower(u.username) = lower(?)", (username,)).fetchone()
        if row is None:
            raise UnknownUser(f"unknown user {username!r}")
        return self._user(row)

    def get_user_by_id(self, user_id: str) -> User:
        """The user with that id; ``UnknownUser`` if none."""
        with self._using("read a user") as conn:
            row = conn.execute(self._USER_SELECT + "WHERE u.id = ?", (user_id,)).fetchone()
        if row is None:
            raise UnknownUser(f"unknown user id {user_id!r}")
        return self._user(row)

    def get_user_by_handle(self, handle: bytes) -> User | None:
        """The user whose WebAuthn user handle is ``handle``, or ``None``."""
        with self._using("read a user") as conn:
            row = conn.execute(self._USER_SELECT + "WHERE u.user_handle = ?",
                               (bytes(handle),)).fetchone()
        return None if row is None else self._user(row)

    def list_users(self) -> list[User]:
        """All users, by username (case-insensitive order)."""
        with self._using("list users") as conn:
            rows = conn.execute(self._USER_SELECT + "ORDER BY lower(u.username), u.id").fetchall()
        return [self._user(r) for r in rows]

    def update_user(self, username: str, *, display_name: str | None = None,
                    roles: Iterable[str] | None = None, disabled: bool | None = None,
                    user_class: str | None = None, mfa_enabled: bool | None = None,
                    mfa_source: str = "admin") -> User:
        """Change a user's display name, roles (replaced), disabled flag, user class or MFA
        flag (set by ``mfa_source``: ``admin`` or ``user``); ``None`` keeps it."""
        display = None if display_name is None else self._check_display_name(display_name)
        role_list = None if roles is None else self._check_roles(roles)
        if user_class is not None:
            self._check_user_class(user_class)
        if mfa_source not in MFA_SOURCES:
            raise InvalidValue(f"invalid MFA source {mfa_source!r}: one of {', '.join(MFA_SOURCES)}")
        with self.transaction(), self._using("update a user") as conn:
            user = self.get_user(username)
            if display is not None:
                conn.execute("UPDATE users SET display_name = ? WHERE id = ?", (display, user.id))
            if disabled is not None:
                conn.execute("UPDATE users SET disabled = ? WHERE id = ?", (int(bool(disabled)), user.id))
            if user_class is not None:
                conn.execute("UPDATE users SET user_class = ? WHERE id = ?", (user_class, user.id))
            if mfa_enabled is not None:
                conn.execute("UPDATE users SET mfa_enabled = ?, mfa_source = ? WHERE id = ?",
                             (int(bool(mfa_enabled)), mfa_source, user.id))
            if role_list is not None:
                conn.execute("DELETE FROM user_roles WHERE user_id = ?", (user.id,))
                conn.executemany("INSERT INTO user_roles (user_id, role) VALUES (?, ?)",
                                 [(user.id, r) for r in role_list])
            return self.get_user_by_id(user.id)

    def remove_user(self, username: str) -> User:
        """Remove a user, their roles and all their methods (credentials); audit events are
        kept. Returns the removed user; ``UnknownUser`` if none."""
        with self.transaction(), self._using("remove a user") as conn:
            user = self.get_user(username)
            conn.execute("DELETE FROM users WHERE id = ?", (user.id,))
            return user
