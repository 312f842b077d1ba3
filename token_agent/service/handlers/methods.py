"""A user's methods: ``methods.list|prefer|remove`` and the enrolments (``enrol.totp``,
``enrol.totp.confirm``, ``enrol.backup-codes``, ``enrol.key``, a ceremony)."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from ... import admin_ops
from ...outcome import Reason
from ..ceremony import SocketInteraction
from ..errors import RequestError
from .common import actor, binding_op, check_args, refuse, user_op
from .login import open_key, pin_guard

if TYPE_CHECKING:
    from ..ceremony import Ceremony
    from ..connections import Connection
    from ..host import Host

log = logging.getLogger("token_agent.service")

def op_methods_list(svc: Host, conn: Connection, args: dict) -> dict:
    a = check_args(args, {"user": (str, True)})
    user = user_op(svc, conn, "methods.list", a["user"])
    with svc.user_locks.holding(user.username):
        return {"methods": admin_ops.list_methods(svc.store, user)}


def _method_of(svc: Host, user, kind: str, name: str | None):
    if kind not in admin_ops.METHOD_KINDS:
        raise RequestError("bad-request",
                           f"kind must be one of {', '.join(admin_ops.METHOD_KINDS)}")
    method = admin_ops.find_method(svc.store, user, kind, name)
    if method is None:
        raise RequestError("not-found", admin_ops.missing_method(user, kind, name))
    return method


def op_methods_prefer(svc: Host, conn: Connection, args: dict) -> dict:
    from ...store import InvalidValue

    a = check_args(args, {"user": (str, True), "kind": (str, True), "name": (str, False)})
    user = binding_op(svc, conn, "methods.prefer", a["user"])
    with svc.user_locks.holding(user.username):
        method = _method_of(svc, user, a["kind"], a["name"])
        try:
            admin_ops.prefer_method(svc.store, user, method, actor(conn))
        except InvalidValue as e:
            raise RequestError("conflict", str(e)) from None
    return {}


def op_methods_remove(svc: Host, conn: Connection, args: dict) -> dict:
    a = check_args(args, {"user": (str, True), "kind": (str, True), "name": (str, False)})
    user = binding_op(svc, conn, "methods.remove", a["user"])
    with svc.user_locks.holding(user.username):
        try:
            admin_ops.remove_method(svc.agent, user,
                                    _method_of(svc, user, a["kind"], a["name"]), actor(conn))
        except admin_ops.RemovalRefused as e:
            raise RequestError("conflict", str(e)) from None
    return {}


def op_enrol_totp(svc: Host, conn: Connection, args: dict) -> dict:
    from ...factors import FactorError, totp
    from ...store import CredentialExists

    a = check_args(args, {"user": (str, True), "name": (str, False)})
    user = binding_op(svc, conn, "enrol.totp", a["user"])
    with svc.user_locks.holding(user.username):
        try:
            pending = totp.begin_enrol(svc.agent.factors(), user.id,
                                       **({"name": a["name"]} if a["name"] else {}))
        except CredentialExists as e:
            raise RequestError("conflict", str(e)) from None
        except FactorError as e:
            raise RequestError("bad-request", e.message) from None
    # the secret goes to the client only; never to a log
    return {"uri": pending.uri, "secret": pending.secret, "text": totp.qr_terminal(pending.uri),
            "method": pending.method.name}


def op_enrol_totp_confirm(svc: Host, conn: Connection, args: dict) -> dict:
    from ...factors import FactorError, totp

    a = check_args(args, {"user": (str, True), "code": (str, True), "name": (str, False)})
    user = binding_op(svc, conn, "enrol.totp.confirm", a["user"])
    with svc.user_locks.holding(user.username):
        try:
            result = totp.confirm_enrol(svc.agent.factors(), user.id, a["code"],
                                        name=a["name"])
        except FactorError as e:
            raise RequestError("not-found", e.message) from None
    return {"ok": result.ok, "message": result.message,
            "reason": result.reason.value if result.reason else None}


def op_enrol_backup_codes(svc: Host, conn: Connection, args: dict) -> dict:
    from ...factors import backup

    a = check_args(args, {"user": (str, True)})
    user = binding_op(svc, conn, "enrol.backup-codes", a["user"])
    with svc.user_locks.holding(user.username), svc.store.transaction():
        _method, codes = backup.generate(svc.agent.factors(), user.id)
        if conn.client_gone():  # nobody to show them to: the old codes stay
            raise RequestError("unavailable", "the client left before it got its codes: "
                                              "nothing was changed")
    return {"codes": codes}


def op_enrol_key(svc: Host, conn: Connection, args: dict) -> dict:
    a = check_args(args, {"user": (str, True), "name": (str, False)})
    if getattr(svc, "org", None) is not None:
        # the organisation's server checks the re-authentication (this connection's login
        # ticket); here: users enrol their own keys, administrators anyone's
        peer = conn.peer
        if not (svc.rules.is_admin(peer, svc.store) or svc.rules.is_self(peer, a["user"])):
            raise refuse(svc, conn, "enrol.key", a["user"],
                         f"{peer.user or f'uid {peer.uid}'} may not do enrol.key for "
                         f"{a['user']}")
        c = svc.new_ceremony(conn, "enrol", "enrol.key", a["user"])
        svc.launch(c, partial(_run_org_enrol_key, svc), a["name"])
        return {"login": c.id}
    user = binding_op(svc, conn, "enrol.key", a["user"])
    c = svc.new_ceremony(conn, "enrol", "enrol.key", user.username)
    svc.launch(c, partial(_run_enrol_key, svc), a["name"])
    log.info("key enrolment started", extra={"login": c.id, "user": user.username,
                                             "peer_uid": conn.peer.uid})
    return {"login": c.id}


def _run_enrol_key(svc: Host, c: Ceremony, name: str | None) -> None:
    from drivers.fido.errors import FidoKeyError

    from ...ceremonies.key import EnrolError, device_failure, enrol_key
    from ...store import CredentialExists

    started = time.perf_counter()
    ui = SocketInteraction(c)
    timeout = svc.config.keys.timeout
    outcome: dict[str, Any]
    reason = None
    try:
        with c.user_locked(svc.user_locks.get(c.user)):
            with c.unlocked():
                held = open_key(svc, c, ui, timeout)
            with held as key:
                with c.unlocked():  # the key's wait for a touch holds no user lock
                    result = enrol_key(svc.store, key, c.user, name=name,
                                       pin_provider=ui.key_pin, on_touch=ui.touch,
                                       timeout=timeout, cancel=c.cancel,
                                       presence=pin_guard(svc, c, ui, timeout))
        outcome = {"ok": True, "method": "key", "reason": None, "message": "enrolled",
                   **result.to_json()}
    except EnrolError as e:
        reason = None if e.recorded else e.reason
        outcome = {"ok": False, "method": "key", "reason": e.reason, "message": e.message}
    except CredentialExists as e:
        reason = "conflict"
        outcome = {"ok": False, "method": "key", "reason": reason, "message": str(e)}
    except FidoKeyError as e:  # a cancel may break the key's exchange on its way out
        reason = (Reason.CANCELLED if c.cancel.is_set() else device_failure(e)).value
        outcome = {"ok": False, "method": "key", "reason": reason,
                   "message": "cancelled" if c.cancel.is_set() else e.message}
    except Exception as e:
        failed = svc.unexpected(c, e, "key")  # recorded there
        reason, outcome = "recorded", {"ok": False, "method": "key",
                                       "reason": failed.reason.value,
                                       "message": failed.message}
    if not outcome["ok"] and reason not in (None, "recorded"):  # else recorded already
        try:
            admin_ops.enrol_failed(svc.store, c.user, "key", reason, "service")
        except Exception as e:
            log.error("cannot record the failed enrolment: %s", e)
    svc.finish(c, outcome, ok=outcome["ok"], user=c.user, method="key",
               reason=outcome["reason"], started=started)


def _run_org_enrol_key(svc: Host, c: Ceremony, name: str | None) -> None:
    """``enrol.key`` run by the organisation's server (``service/org.py``), which records it."""
    from ..org import run_enrol_key

    started = time.perf_counter()
    try:
        outcome = run_enrol_key(svc, c, name, SocketInteraction(c))
    except Exception as e:
        failed = svc.unexpected(c, e, "key")
        outcome = {"ok": False, "method": "key", "reason": failed.reason.value,
                   "message": failed.message}
    svc.finish(c, outcome, ok=bool(outcome.get("ok")), user=c.user, method="key",
               reason=outcome.get("reason"), started=started)
