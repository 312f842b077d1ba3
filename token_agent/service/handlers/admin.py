"""``policy.explain`` and the administrators' ops (``admin.unlock``,
``admin.reset-methods``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import admin_ops
from ..errors import RequestError
from .common import actor, admin_op, agent_user, check_args, device_of, user_op

if TYPE_CHECKING:
    from ..connections import Connection
    from ..host import Host


def op_policy_explain(svc: Host, conn: Connection, args: dict) -> dict:
    from ...policy import explain

    a = check_args(args, {"user": (str, True), "device": (dict, False)})
    peer = conn.peer
    if svc.rules.is_login_service(peer) and not svc.rules.is_admin(peer, svc.store):
        user = agent_user(svc, a["user"])
        if user is None:
            raise RequestError("not-found", f"no user {a['user']!r}")
    else:
        user = user_op(svc, conn, "policy.explain", a["user"])
    device = device_of(svc, conn, a["device"])
    with svc.user_locks.holding(user.username):
        first, decision = admin_ops.explain_login(svc.agent, user, device)
    return {**decision.to_json(), "text": explain(decision), "user": user.username,
            "primary": first, "device": device.to_json()}


def op_admin_unlock(svc: Host, conn: Connection, args: dict) -> dict:
    a = check_args(args, {"user": (str, True), "kind": (str, False)})
    user = admin_op(svc, conn, "admin.unlock", a["user"])
    from ...kinds import UnknownKind

    with svc.user_locks.holding(user.username):
        try:
            cleared = admin_ops.unlock(svc.store, user, a["kind"], actor(conn))
        except UnknownKind as e:
            raise RequestError("bad-request", str(e)) from None
    return {"cleared": [s.to_json() for s in cleared]}


def op_admin_reset_methods(svc: Host, conn: Connection, args: dict) -> dict:
    a = check_args(args, {"user": (str, True), "include_password": (bool, False)})
    user = admin_op(svc, conn, "admin.reset-methods", a["user"])
    with svc.user_locks.holding(user.username):
        removed = admin_ops.reset_methods(svc.store, user, actor(conn),
                                          include_password=bool(a["include_password"]))
    return {"removed": len(removed)}
