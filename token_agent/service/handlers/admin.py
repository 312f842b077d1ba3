"""``policy.explain`` and the administrators' ops (``admin.unlock``,
``admin.reset-methods``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import RequestError
from .common import actor, admin_op, agent_user, check_args, device_of, user_op

if TYPE_CHECKING:
    from ..connections import Connection
    from ..host import Host


def op_policy_explain(svc: Host, conn: Connection, args: dict) -> dict:
    from ...ceremonies.login import _choose_primary, explain_for
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
        first = _choose_primary(svc.agent, user, None) or "password"
        decision = explain_for(svc.agent, user.username, device=device, primary=first,
                               primary_multi_factor=first in ("key", "card"))
    return {**decision.to_json(), "text": explain(decision), "user": user.username,
            "primary": first, "device": device.to_json()}


def op_admin_unlock(svc: Host, conn: Connection, args: dict) -> dict:
    from ...factors import KINDS, lockout

    a = check_args(args, {"user": (str, True), "kind": (str, False)})
    user = admin_op(svc, conn, "admin.unlock", a["user"])
    with svc.user_locks.holding(user.username):
        scopes = None
        if a["kind"]:
            store_kind = KINDS.get(a["kind"], a["kind"].replace("-", "_"))
            if store_kind == "password":
                scopes = {lockout.password_scope(user.id)}
            elif store_kind == "app_password":
                scopes = {f"app_password:{user.id}"}
            else:
                scopes = {lockout.method_scope(m.id)
                          for m in svc.store.list_methods(user.id, store_kind)}
        with svc.store.transaction():
            cleared = [s for scope in (scopes or [None])
                       for s in lockout.unlock(svc.store, user.id, scope)]
            svc.store.record_event("admin.unlock", user_id=user.id, outcome="success",
                                   detail={"actor": actor(conn),
                                           "scopes": [s.scope for s in cleared]})
    return {"cleared": [s.to_json() for s in cleared]}


def op_admin_reset_methods(svc: Host, conn: Connection, args: dict) -> dict:
    a = check_args(args, {"user": (str, True)})
    user = admin_op(svc, conn, "admin.reset-methods", a["user"])
    with svc.user_locks.holding(user.username):
        with svc.store.transaction():
            removed = svc.store.remove_all_methods(user.id)
            svc.store.record_event("admin.reset-methods", user_id=user.id,
                                   outcome="success",
                                   detail={"actor": actor(conn), "removed": len(removed),
                                           "kinds": sorted({m.kind for m in removed})})
    return {"removed": len(removed)}
