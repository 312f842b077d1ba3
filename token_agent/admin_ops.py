"""The administrators' and the users' own operations on methods, written once for every front
end: ``token-agent admin unlock|reset-methods``, ``token-agent methods list|prefer|remove`` and
``token-agent enrol key`` call them, and so do the service's ``admin.unlock``,
``admin.reset-methods``, ``methods.list|prefer|remove`` and ``enrol.key``. Each function does the store changes and records the audit
event; the front ends keep only who may call it, argument parsing and output.

``actor``: who made the change, recorded in the event's detail (``None``: not recorded, as for
the CLI's own ``methods prefer|remove``, run by the user at their terminal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import kinds

if TYPE_CHECKING:
    from .agent import Agent
    from .ceremonies.login import Device
    from .factors.lockout import LockState
    from .policy import Decision, Policy
    from .store import Method, Store, User, Workstation

#: the front ends' method names (``methods prefer|remove KIND``: ``token_agent.kinds``)
METHOD_KINDS = tuple(k.cli for k in kinds.ALL)


def _with_actor(detail: dict, actor: str | None) -> dict:
    return detail if actor is None else {**detail, "actor": actor}


def unlock(store: "Store", user: "User", kind: str | None, actor: str) -> list["LockState"]:
    """Clear ``user``'s lockouts (all, or those of one method ``kind``: a front-end or store
    name, policy or store name). Records ``admin.unlock``. Returns the cleared states.
    ``kinds.UnknownKind`` (nothing changed) for a name that is no method kind."""
    from .factors import lockout

    scopes = None
    if kind:
        store_kind = kinds.by_any(kind).store
        if store_kind == "password":
            scopes = {lockout.password_scope(user.id)}
        elif store_kind == "app_password":
            scopes = {f"app_password:{user.id}"}
        else:
            scopes = {lockout.method_scope(m.id) for m in store.list_methods(user.id, store_kind)}
    with store.transaction():
        cleared = [c for s in (scopes or [None]) for c in lockout.unlock(store, user.id, s)]
        store.record_event("admin.unlock", user_id=user.id, outcome="success",
                           detail={"actor": actor, "scopes": [c.scope for c in cleared]})
    return cleared


def reset_methods(store: "Store", user: "User", actor: str, *,
                  include_password: bool = False) -> list["Method"]:
    """A lost or stolen device: remove every method of ``user`` (the password too when
    ``include_password``) and end their web pages' sessions (whoever holds the device may be
    signed in with it). Records ``admin.reset-methods``. Returns the removed methods."""
    with store.transaction():
        removed = store.remove_all_methods(user.id, keep_password=not include_password)
        ended = store.end_web_sessions_of(user.id)
        store.record_event("admin.reset-methods", user_id=user.id, outcome="success",
                           detail={"actor": actor, "removed": len(removed),
                                   "kinds": sorted({m.kind for m in removed}),
                                   "web_sessions_ended": ended})
    return removed


def list_methods(store: "Store", user: "User") -> list[dict]:
    """``user``'s methods as ``methods list --json`` and ``methods.list`` give them (a
    contact's ``destination`` masked: ``+44•••••123``)."""
    from .factors import lockout

    from .delivery import mask_destination

    locks = {s.scope: s for s in lockout.user_locks(store, user.id)}
    contacts = store.user_contacts(user.id)
    methods = []
    for m in store.list_methods(user.id):
        lock = locks.get(f"method:{m.id}")
        contact = contacts.get(m.id)
        methods.append({
            "id": m.id, "kind": kinds.policy_of_store(m.kind),
            "label": kinds.label_of_store(m.kind), "name": m.name,
            "destination": None if contact is None else mask_destination(
                contact["channel"], contact["destination"]),
            "preferred": m.preferred, "confirmed": m.confirmed,
            "created_at": m.created_at, "last_used_at": m.last_used_at,
            "flagged": m.flagged, "flag_reason": m.flag_reason,
            "locked_until": lock.locked_until if lock else None,
            "failures": lock.failures if lock else 0})
    return methods


def find_method(store: "Store", user: "User", kind: str, name: str | None) -> "Method | None":
    """``user``'s method of front-end ``kind`` (one of ``METHOD_KINDS``), by ``name`` when
    given; ``None`` when there is none. ``kinds.UnknownKind`` for another name."""
    return store.find_method(user.id, kinds.by_cli(kind).store, name)


def method_of(store: "Store", user: "User", method_id: object) -> "Method | None":
    """``user``'s method with that id (a page's form names it so); None for anything else:
    not a number, no such method, or another user's (which is not told apart)."""
    from .store import UnknownCredential

    text = str(method_id)
    if not (text.isascii() and text.isdigit() and len(text) <= 15):
        return None
    try:
        method = store.get_method(int(text))
    except UnknownCredential:
        return None
    return method if method.user_id == user.id else None


def missing_method(user: "User", kind: str, name: str | None) -> str:
    """The message for a method ``find_method`` did not find."""
    return f"{user.username} has no {kind} method" + (f" named {name!r}" if name else "")


def prefer_method(store: "Store", user: "User", method: "Method", actor: str | None) -> None:
    """Make ``method`` ``user``'s preferred one. Records ``method.preferred``.
    ``InvalidValue`` when it cannot be preferred (nothing changed)."""
    with store.transaction():
        store.set_preferred_method(user.id, method.id)
        store.record_event("method.preferred", user_id=user.id, outcome="success",
                           detail=_with_actor({"kind": method.kind, "name": method.name}, actor))


class RemovalRefused(ValueError):
    """A method that cannot be removed (the last way to sign in, or the last second factor
    where MFA is enforced); the message says why and what to do."""


def removal_refused(agent: "Agent", user: "User", method: "Method") -> str | None:
    """Why ``method`` cannot be removed now, or None. Never the user's last usable way to
    sign in (a password, key or card), and, while MFA is enforced for them, never their last
    second factor the policy accepts (backup codes count: they let the user in to set up
    another): without it, whoever knows the password would set up their own at the next
    login. An administrator resets a lost device's methods with ``admin reset-methods``."""
    from .ceremonies.login import Device, explain_for
    from .factors import usable_methods

    usable = usable_methods(agent.store, user.id)
    if all(m.id != method.id for m in usable):
        return None  # not confirmed, or suspended: nobody signs in with it
    others = [m for m in usable if m.id != method.id]
    kind = kinds.by_store(method.kind)
    label = kind.label
    if kind.primary and not any(kinds.by_store(m.kind).primary for m in others):
        return (f"the {label} {method.name!r} is the last way you can sign in (a password, "
                f"security key or smartcard): set up another one before removing it")
    decision = explain_for(agent, user.username, device=Device())
    if decision.enforced and kind.policy in decision.allowed_methods and not any(
            kinds.by_store(m.kind).policy in decision.allowed_methods for m in others):
        return (f"the {label} {method.name!r} is your last second factor and multi-factor "
                "authentication applies to your account: add another method (an authenticator app, a "
                "phone, backup codes) before removing it")
    return None


def remove_method(agent: "Agent", user: "User", method: "Method", actor: str | None) -> None:
    """Remove one of ``user``'s methods. Records ``method.removed``. ``RemovalRefused``
    (nothing changed, recorded as ``method.removed`` refused) when
    :func:`removal_refused` says no."""
    store = agent.store
    with store.transaction():
        problem = removal_refused(agent, user, method)
        if problem is not None:
            store.record_event("method.removed", user_id=user.id, outcome="refused",
                               detail=_with_actor({"kind": method.kind, "name": method.name,
                                                   "reason": "last-method"}, actor))
        else:
            store.remove_method(method.id)
            store.record_event("method.removed", user_id=user.id, outcome="success",
                               detail=_with_actor({"kind": method.kind, "name": method.name},
                                                  actor))
    if problem is not None:
        raise RemovalRefused(problem)
    _tell_removed(agent, user, method)


def _tell_removed(agent: "Agent", user: "User", method: "Method") -> None:
    """Tell the user, on their other verified contacts, that a method was removed (a stolen
    session removing the user's methods is then noticed by the user)."""
    import datetime as _dt

    from .notify import tell_user

    label = kinds.label_of_store(method.kind)
    when = _dt.datetime.fromtimestamp(agent.now(), _dt.timezone.utc)
    tell_user(agent, user, "A sign-in method was removed from your account",
              f"The {label} \"{method.name}\" was removed from your {agent.issuer} account "
              f"({user.username}) on {when.day} {when:%B %Y at %H:%M} UTC. If you did this, "
              "you do not need to do anything. If not, sign in and check your methods now.",
              exclude_method_id=method.id)


def enrol_failed(store: "Store", username: str, kind: str, reason: str, via: str) -> None:
    """Record an enrolment of ``kind`` (``key``...) refused or failed for ``reason`` that the
    ceremony did not record itself (``EnrolError.recorded``): the event ``enrol.<kind>``,
    outcome failure, the same whichever front end ran it (``via``: ``cli`` or ``service``).
    A user that does not exist is recorded by the name given."""
    from .store import UnknownUser

    try:
        user = store.get_user(username)
    except UnknownUser:
        user = None
    store.record_event(f"enrol.{kind}", user_id=user.id if user else None,
                       username=None if user else username, outcome="failure",
                       detail={"reason": reason, "via": via})


def explain_login(agent: "Agent", user: "User", device: "Device", primary: str | None = None,
                  primary_uv: bool = True) -> tuple[str, "Decision"]:
    """What the policy decides for ``user``'s login on ``device`` (``policy explain``,
    ``policy.explain``): the primary factor (``primary``, else the user's usual one, else
    password) and the decision. ``primary_uv``: a key or card primary verified its PIN."""
    from .ceremonies.login import _choose_primary, explain_for

    first = primary or _choose_primary(agent, user, None) or kinds.PASSWORD.policy
    device_primary = kinds.get_policy(first)  # a key or card: multi-factor with its PIN
    decision = explain_for(agent, user.username, device=device, primary=first,
                           primary_multi_factor=primary_uv and device_primary is not None
                           and device_primary.primary and device_primary.factor == kinds.POSSESSION)
    return first, decision


def effective_policy(policy: "Policy") -> dict:
    """The policy in force as ``policy show`` gives it (``policy.show``): its settings with
    the defaults filled in, where it came from (``source``), the names of its delivery
    channels (``delivery_channels``: the ``[delivery]`` table itself may hold gateway
    credentials and is never shown) and the warnings ``policy check`` gives."""
    from .policy import policy_warnings

    data = policy.to_json()
    channels = sorted(k for k in (data.pop("delivery") or {}) if k not in
                      ("fallback", "sender_name", "outbox"))
    return {**data, "delivery_channels": channels, "warnings": policy_warnings(policy)}


def revoke_workstation(store: "Store", name: str, actor: str | None) -> "Workstation":
    """Cut an organisation's workstation off (``server workstation-revoke``): its certificate
    is refused from its next request on, an unused join token for it stops working.
    Records ``workstation.revoke``. ``UnknownWorkstation``."""
    with store.transaction():
        ws = store.revoke_workstation(name)
        store.record_event("workstation.revoke", outcome="success",
                           detail=_with_actor({"workstation": ws.name}, actor))
    return ws


#: the cards page's window: certificates ending within this many days (NHS cards' renewal
#: prompts start 90 days before)
CARD_EXPIRY_DAYS = 90


def cards_report(store: "Store", now: float, *, within_days: int = CARD_EXPIRY_DAYS,
                 revoked_days: int = 365, scan: int = 5000) -> dict:
    """The administrators' cards page: ``expiring``, the enrolled cards whose certificate
    (as recorded at their last login, ``SmartcardIdentity.cert_not_after``) ends within
    ``within_days`` of ``now`` or has ended, soonest first, with their user; ``revoked``,
    the revoked cards seen at a login in the last ``revoked_days`` (the ``login.card``
    failures with reason certificate-revoked, newest first, one per certificate serial; at
    most ``scan`` failures are read, ``scanned_all`` says whether that was all of them)."""
    import math

    from .outcome import Reason

    limit = now + within_days * 86400.0
    users = {}
    expiring = []
    for card in store.list_card_identities():
        if card.cert_not_after is None or card.cert_not_after > limit:
            continue
        if card.user_id not in users:
            users[card.user_id] = store.get_user_by_id(card.user_id)
        expiring.append({"card": card, "user": users[card.user_id],
                         "expired": card.cert_not_after <= now,
                         "days_left": max(0, math.ceil((card.cert_not_after - now) / 86400))})
    expiring.sort(key=lambda c: c["card"].cert_not_after)
    failures = store.search_events(kind="login.card", outcome="failure",
                                   since=now - revoked_days * 86400.0, limit=scan)
    revoked, seen = [], set()
    for event in failures:
        if event.detail.get("reason") != Reason.CERT_REVOKED.value:
            continue
        serial = event.detail.get("certificate_serial")
        if serial in seen:
            continue
        seen.add(serial)
        revoked.append({"at": event.at, "username": event.username,
                        "holder_name": event.detail.get("holder_name"),
                        "uuid": event.detail.get("uuid"), "certificate_serial": serial,
                        "event_id": event.id})
    return {"expiring": expiring, "revoked": revoked, "within_days": within_days,
            "revoked_days": revoked_days, "scanned_all": len(failures) < scan}


def verify_audit(store: "Store") -> tuple[bool, int | None, str]:
    """``audit verify``: ``(intact, events verified or the first bad event's id, message)``."""
    from .store import AuditChainBroken

    try:
        count = store.verify_events()
    except AuditChainBroken as e:
        return False, e.event_id, f"audit log damaged: {e}"
    return True, count, f"audit log intact: {count} events verified"
