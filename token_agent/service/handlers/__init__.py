"""The service's request handlers, by area: each is ``handler(service, conn, args) -> dict``
(the result of ``protocol.py``'s op, or a ``RequestError``), found by ``server.Service``'s
dispatch in :data:`OPS`.

* ``common``: the arguments' check and who may do what;
* ``status``: hello, events.subscribe;
* ``login``: login.start|answer|cancel (the login ceremony);
* ``sessions``: session.state (and the sessions' rows);
* ``methods``: methods.list|prefer|remove, enrol.* (the key enrolment ceremony);
* ``admin``: policy.explain, admin.unlock, admin.reset-methods;
* ``cards``: card.self-unlock (the cardholder's unlock of a locked card).
"""

from __future__ import annotations

from collections.abc import Callable

from . import admin, cards, login, methods, sessions, status

#: op -> handler(service, conn, args)
OPS: dict[str, Callable[..., dict]] = {
    "hello": status.op_hello,
    "login.start": login.op_login_start,
    "login.answer": login.op_login_answer,
    "login.cancel": login.op_login_cancel,
    "session.state": sessions.op_session_state,
    "methods.list": methods.op_methods_list,
    "methods.prefer": methods.op_methods_prefer,
    "methods.remove": methods.op_methods_remove,
    "enrol.totp": methods.op_enrol_totp,
    "enrol.totp.confirm": methods.op_enrol_totp_confirm,
    "enrol.backup-codes": methods.op_enrol_backup_codes,
    "enrol.key": methods.op_enrol_key,
    "policy.explain": admin.op_policy_explain,
    "admin.unlock": admin.op_admin_unlock,
    "admin.reset-methods": admin.op_admin_reset_methods,
    "events.subscribe": status.op_events_subscribe,
    "card.self-unlock": cards.op_card_self_unlock,
}
