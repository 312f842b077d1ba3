"""What every request handler shares: the check of a request's arguments, and who may do
what (the caller's rights over a user, an administrator's op, a recent login for an op that
binds a method: ``token_agent/reauth.py``), with the refusals recorded (``refusals.py``)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from ...usernames import RULE, is_username
from ..errors import RequestError

if TYPE_CHECKING:
    from ..connections import Connection
    from ..host import Host


def check_args(args: dict, spec: dict[str, tuple[type | tuple, bool]]) -> dict:
    """Check the arguments: ``spec`` name -> (types, required). Unknown, missing or
    wrongly typed arguments, and a ``user`` that is not a user name
    (``token_agent.usernames``), are a bad-request naming them (never their values)."""
    unknown = sorted(set(args) - set(spec))
    if unknown:
        raise RequestError("bad-request", f"unknown argument(s): {', '.join(unknown)}")
    out = {}
    for name, (types, required) in spec.items():
        if name not in args or args[name] is None:
            if required:
                raise RequestError("bad-request", f"missing argument {name!r}")
            out[name] = None
            continue
        value = args[name]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                    else (types,)):
            raise RequestError("bad-request", f"argument {name!r} has the wrong type")
        if not isinstance(value, types):
            raise RequestError("bad-request", f"argument {name!r} has the wrong type")
        if name == "user" and not is_username(value):  # never audited, logged or echoed
            raise RequestError("bad-request", f"argument 'user' is not a user name ({RULE})")
        out[name] = value
    return out


def refuse(svc: Host, conn: Connection, op: str, target: str | None, why: str,
           code: str = "forbidden", **detail) -> RequestError:
    """Record a refusal (audit ``service.refused``, a log line; repeats are counted:
    ``refusals.py``) and return the error (``code``: forbidden, reauth-required)."""
    svc.refusals.refused(conn.peer, op, target, **detail)
    return RequestError(code, why)


def agent_user(svc: Host, username: str):
    from ...store import UnknownUser

    try:
        return svc.store.get_user(username)
    except UnknownUser:
        return None


def user_op(svc: Host, conn: Connection, op: str, username: str):
    """Authorise an op on ``username``'s methods: admins for anyone, a user for their own
    agent user (which must exist). Returns the user."""
    peer = conn.peer
    if svc.rules.is_admin(peer, svc.store):
        user = agent_user(svc, username)
        if user is None:
            raise RequestError("not-found", f"no user {username!r}")
        return user
    user = agent_user(svc, username) if svc.rules.is_self(peer, username) else None
    if user is None or user.username != peer.user:
        raise refuse(svc, conn, op, username,
                     f"{peer.user or f'uid {peer.uid}'} may not do {op} for {username}")
    return user


def binding_op(svc: Host, conn: Connection, op: str, username: str):
    """``user_op`` for an op that adds, replaces or removes a method: a caller who is
    not an admin needs a recent login of that user on this connection, at the level
    the policy requires (``token_agent/reauth.py``), unless it is the user's first
    method."""
    from ...reauth import ReauthRequired, check

    user = user_op(svc, conn, op, username)
    if svc.rules.is_admin(conn.peer, svc.store):
        return user
    try:
        check(svc.agent, user, conn.authenticated)
    except ReauthRequired as e:
        raise refuse(svc, conn, op, user.username, e.message, "reauth-required",
                     reauth=e.why) from None
    return user


def admin_op(svc: Host, conn: Connection, op: str, username: str | None):
    if not svc.rules.is_admin(conn.peer, svc.store):
        raise refuse(svc, conn, op, username, f"{op} is for administrators only")
    if username is None:
        return None
    user = agent_user(svc, username)
    if user is None:
        raise RequestError("not-found", f"no user {username!r}")
    return user


def actor(conn: Connection) -> str:
    return conn.peer.user or f"uid {conn.peer.uid}"


def device_of(svc: Host, conn: Connection, spec: dict | None):
    from ...ceremonies.login import Device

    if spec is None:
        return svc.device
    if not isinstance(spec, dict):
        raise RequestError("bad-request", "argument 'device' must be an object")
    d = check_args(spec, {"kind": (str, False), "device_id": (str, False),
                          "network": (str, False)})
    kind = d["kind"] or svc.device.kind
    if kind not in ("managed", "unmanaged"):
        raise RequestError("bad-request", "device.kind must be managed or unmanaged")
    if d["network"] is not None:
        try:
            ipaddress.ip_address(d["network"].split("%", 1)[0])
        except ValueError:
            raise RequestError("bad-request", "device.network must be an IP address") \
                from None
    return Device(kind, d["device_id"] or svc.device.device_id,
                  d["network"] if d["network"] is not None else svc.device.network)
