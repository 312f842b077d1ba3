"""Who is calling, and what they may ask (``protocol.py``, "Who may ask what").

The caller is known from the socket alone: ``SO_PEERCRED`` gives the connecting process's
pid, uid and gid (the kernel's word, not the message's); the user name comes from ``pwd``,
the admin group's membership from ``grp`` / ``os.getgrouplist``, and the agent user's
``admin`` role from the store (read at each request, so a role change applies at once).
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

ROLE_ROOT = "root"
ROLE_LOGIN_SERVICE = "login-service"
ROLE_ADMIN = "admin"
ROLE_USER = "user"


def credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end (``SO_PEERCRED``: the kernel's
    word, and no lookup: safe on the accept loop)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection."""

    pid: int
    uid: int
    gid: int
    user: str | None  # the uid's name (None: no passwd entry)
    groups: tuple[int, ...] = ()

    @classmethod
    def of(cls, sock: socket.socket) -> "Peer":
        return cls.resolve(*credentials(sock))

    @classmethod
    def resolve(cls, pid: int, uid: int, gid: int) -> "Peer":
        """The peer with its user name and groups (``pwd`` / ``os.getgrouplist``: may ask a
        directory service, so never on the accept loop)."""
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return cls(pid, uid, gid, None, (gid,))
        try:
            groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        except OSError:
            groups = (entry.pw_gid,)
        return cls(pid, uid, gid, entry.pw_name, tuple(sorted(set(groups) | {gid})))

    def to_json(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "user": self.user}


@dataclass(frozen=True)
class Rules:
    login_service_users: tuple[str, ...] = ()
    admin_group: str = "token-agent-admin"

    def admin_gid(self) -> int | None:
        try:
            return grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            return None

    def roles(self, peer: Peer, store=None) -> list[str]:
        """The peer's roles, in the order of ``hello``: root, login-service, admin, user."""
        roles = []
        if peer.uid == 0:
            roles.append(ROLE_ROOT)
        if peer.user is not None and peer.user in self.login_service_users:
            roles.append(ROLE_LOGIN_SERVICE)
        if self.is_admin(peer, store):
            roles.append(ROLE_ADMIN)
        if peer.user is not None:
            roles.append(ROLE_USER)
        return roles

    def is_admin(self, peer: Peer, store=None) -> bool:
        if peer.uid == 0:
            return True
        gid = self.admin_gid()
        if gid is not None and gid in peer.groups:
            return True
        if peer.user is not None and store is not None:
            from ..store import StoreError, UnknownUser

            try:
                user = store.get_user(peer.user)
            except (UnknownUser, StoreError):
                return False
            # the agent user of the same name, holding the role admin
            return user.username == peer.user and "admin" in user.roles and not user.disabled
        return False

    def is_login_service(self, peer: Peer) -> bool:
        return peer.uid == 0 or (peer.user is not None and peer.user in self.login_service_users)

    def login_service_uids(self) -> frozenset[int]:
        """The uids of root and the login services (looked up now: for the accept loop's
        limits, which must not look a name up per connection)."""
        uids = {0}
        for name in self.login_service_users:
            try:
                uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                pass
        return frozenset(uids)

    @staticmethod
    def is_self(peer: Peer, username: str | None) -> bool:
        return (peer.user is not None and username is not None
                and peer.user.casefold() == str(username).casefold())
