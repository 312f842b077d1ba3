"""One-time codes sent by email, text message (SMS), phone call (voice) or a messaging app.

A method of kind ``email``, ``sms``, ``voice`` or ``messaging`` (the kind is the channel) is
a contact: where codes are sent (``contact_methods``: the address or the phone number,
validated and normalised by ``token_agent.delivery.validate_destination``, E.164 for
phones). Adding one (``add_contact``) sends an enrolment code; the contact is usable once
``confirm_contact`` gets that code back. Re-adding an unconfirmed contact (same channel and
destination) replaces the pending one: its code stops working and a new one is sent.

Codes (``send_code``)
    ``CodeRules.length`` digits (6) from ``secrets.randbelow``, zero-padded, valid for
    ``ttl_seconds`` (10 min), for one purpose (``login`` or ``enrol``). Only a keyed hash is
    stored (``SecretKeys.code_hash("otp:METHOD_ID:PURPOSE", code)``, HMAC-SHA256 under the
    data directory's key), never the code: not in the store, a log line or the audit log.
    Sending a new code invalidates the method's earlier unused codes of that purpose: only
    the newest works. The channel that really delivered it (after a gateway's fallback,
    e.g. messaging -> sms) is recorded with it. Nothing is written when delivery fails.

Throttling
    A method gets at most one code of a purpose every ``resend_seconds`` (30 s: the
    enrolment's own code does not delay the first login code) and at most ``max_sends`` (5)
    codes of any purpose within ``ttl_seconds``: beyond that, ``RESEND_THROTTLED`` says how
    long to wait. Only successful sends count. (This also bounds what an attacker can
    cost the organisation in text messages and calls: "SMS pumping".) A locked method gets
    no codes.

Verification (``verify_code``)
    Under the method's lockout (``checked``: 10 failures lock it). Spaces and dashes in
    what was typed do not matter. The code is compared, in constant time, with the newest
    code of that method and purpose only. It is used exactly once: marking it used is a
    conditional ``UPDATE ... WHERE used_at IS NULL`` in one transaction, so two processes
    checking the same code at once get one success and one ``CODE_REPLAYED``.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..kinds import CONTACTS, label_of_store
from ..outcome import Reason
from ..secretbox import equal
from ..store import MAX_NAME_LEN, CredentialExists, Method, UnknownCredential
from . import FactorContext, FactorError, Verification, checked, lockout, refused

if TYPE_CHECKING:
    from ..delivery import Receipt

log = logging.getLogger(__name__)

#: the method kinds of this module (each the channel its codes go through)
CHANNELS = tuple(k.store for k in CONTACTS)
#: what a code is for (``otp_challenges.purpose``)
PURPOSES = ("login", "enrol")
#: characters people type between digits, ignored
_SEPARATORS = " \t-\u2010\u2011\u2012\u2013\u2014."


@dataclass(frozen=True)
class Contact:
    """A contact method: the method, its channel, the full destination and its masked form
    (``hint``, what is shown and recorded)."""

    method: Method
    channel: str
    destination: str
    hint: str

    def to_json(self) -> dict:
        return {"name": self.method.name, "channel": self.channel, "destination": self.hint,
                "confirmed": self.method.confirmed, "preferred": self.method.preferred,
                "flagged": self.method.flagged, "last_used_at": self.method.last_used_at}


# --------------------------------------------------------------------------- helpers


def _purpose_key(method_id: int, purpose: str) -> str:
    return f"otp:{int(method_id)}:{purpose}"


def _check_channel(channel: str) -> str:
    if channel not in CHANNELS:
        raise FactorError(Reason.METHOD_NOT_ALLOWED,
                          f"unknown channel {channel!r}: one of {', '.join(CHANNELS)}")
    return channel


def _check_purpose(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown code purpose {purpose!r}: one of {', '.join(PURPOSES)}")
    return purpose


def _normalise(code: object) -> str:
    return "".join(ch for ch in str(code) if ch not in _SEPARATORS)


def _span(seconds: float) -> str:
    """"18 s", "3 min", "1.5 h" (rounded up)."""
    left = max(1, math.ceil(seconds))
    if left < 120:
        return f"{left} s"
    if left < 7200:
        return f"{math.ceil(left / 60)} min"
    return f"{left / 3600:.1f} h"


def _mask(channel: str, destination: str) -> str:
    from ..delivery import mask_destination

    return mask_destination(channel, destination)


def _default_name(ctx: FactorContext, user_id: str, channel: str, hint: str,
                  replacing: Method | None) -> str:
    base = f"{channel} {hint}"[:MAX_NAME_LEN].strip()
    taken = {m.name.casefold() for m in ctx.store.list_methods(user_id, channel)
             if replacing is None or m.id != replacing.id}
    name, n = base, 2
    while name.casefold() in taken:
        suffix = f" ({n})"
        name = base[:MAX_NAME_LEN - len(suffix)] + suffix
        n += 1
    return name


def _destination_of(ctx: FactorContext, method: Method) -> str | None:
    row = ctx.store.get_contact(method.id)
    return None if row is None else row["destination"]


def contact(ctx: FactorContext, method: Method) -> tuple[str, str]:
    """``(channel, destination)`` of a contact method; ``FactorError(NO_CREDENTIAL)`` if the
    method is not one (or is gone)."""
    row = ctx.store.get_contact(method.id)
    if row is None:
        raise FactorError(Reason.NO_CREDENTIAL,
                          f"{method.name!r} is not an email address or phone number enrolled "
                          "for codes")
    return row["channel"], row["destination"]


def list_contacts(ctx: FactorContext, user_id: str) -> list[Contact]:
    """The user's contact methods (confirmed or not), in order of enrolment."""
    rows = ctx.store.user_contacts(user_id)
    out = []
    for m in ctx.store.list_methods(user_id):
        row = rows.get(m.id)
        if row is not None:
            out.append(Contact(m, row["channel"], row["destination"],
                               _mask(row["channel"], row["destination"])))
    return out


def _throttle(ctx: FactorContext, method: Method, now: float, purpose: str) -> None:
    """``FactorError(RESEND_THROTTLED)`` when this method got a code for ``purpose`` too
    recently, or codes too often."""
    rules = ctx.codes
    rows = ctx.store.codes_sent_since(method.id, now - rules.ttl_seconds)
    times = [r["created_at"] for r in rows]
    # the resend interval is between codes of one purpose: the enrolment's own code does
    # not delay the first login code (max_sends still counts every code)
    same = [r["created_at"] for r in rows if r["purpose"] == purpose]
    if same and now - same[-1] < rules.resend_seconds:
        ago = max(0, int(now - same[-1]))
        wait = rules.resend_seconds - (now - same[-1])
        raise FactorError(Reason.RESEND_THROTTLED,
                          f"a code was sent {ago} s ago: wait {_span(wait)} before asking for "
                          "another")
    if len(times) >= rules.max_sends:
        wait = times[len(times) - rules.max_sends] + rules.ttl_seconds - now
        raise FactorError(Reason.RESEND_THROTTLED,
                          f"{len(times)} codes were sent in the last "
                          f"{_span(rules.ttl_seconds)}: wait {_span(wait)} before asking for "
                          "another")


# --------------------------------------------------------------------------- sending


def send_code(ctx: FactorContext, method: Method, *, purpose: str = "login") -> "Receipt":
    """Send a new code to the method's destination and return the gateway's receipt.

    ``FactorError`` with ``NOT_CONFIRMED`` (a login code for a contact not confirmed yet),
    ``CREDENTIAL_FLAGGED``, ``METHOD_LOCKED``, ``RESEND_THROTTLED`` or ``DELIVERY_FAILED``
    (nothing is stored then, and the earlier code still works)."""
    from ..delivery import DeliveryError, Message

    _check_purpose(purpose)
    store = ctx.store
    try:
        method = store.get_method(method.id)  # the current state, not the caller's copy
    except UnknownCredential:
        raise FactorError(Reason.NO_CREDENTIAL, f"{method.name!r} was removed") from None
    channel, destination = contact(ctx, method)
    hint = _mask(channel, destination)
    label = label_of_store(channel)
    base = {"method": method.name, "channel": channel, "destination_hint": hint,
            "purpose": purpose}
    now = ctx.now()

    def refuse(reason: Reason, message: str, outcome: str = "refused") -> FactorError:
        store.record_event("code.sent", user_id=method.user_id, outcome=outcome,
                           detail={**base, "reason": reason.value})
        log.info("%s code for %s not sent: %s", channel, hint, message)
        return FactorError(reason, message)

    if purpose == "login" and not method.confirmed:
        raise refuse(Reason.NOT_CONFIRMED,
                     f"{method.name!r} is not confirmed yet: enter the code sent when it was "
                     "added, or add it again")
    if method.flagged:
        raise refuse(Reason.CREDENTIAL_FLAGGED,
                     f"{method.name!r} was flagged ({method.flag_reason or 'no reason given'}): "
                     "ask an administrator")
    current = lockout.state(store, lockout.method_scope(method.id))
    if current.locked(now):
        raise refuse(Reason.METHOD_LOCKED,
                     f"too many failed attempts: {label} locked "
                     f"{lockout.describe_until(current.locked_until, now)}; an administrator "
                     "can unlock it")
    try:
        _throttle(ctx, method, now, purpose)
    except FactorError as e:
        raise refuse(e.reason, e.message) from None
    if ctx.delivery is None:
        raise refuse(Reason.DELIVERY_FAILED,
                     f"cannot send a {label}: no delivery gateway is configured", "failure")

    length = int(ctx.codes.length)
    code = f"{secrets.randbelow(10 ** length):0{length}d}"
    ttl = int(ctx.codes.ttl_seconds)
    try:
        message = Message(channel=channel, destination=destination, code=code, purpose=purpose,
                          ttl_seconds=ttl, sender_name=ctx.issuer)
        receipt = ctx.delivery.send(message)
    except (DeliveryError, ValueError) as e:  # ValueError: e.g. an issuer too long to sign with
        why = str(e).replace(code, "•" * length)  # whatever a gateway said, never the code
        raise refuse(Reason.DELIVERY_FAILED, f"could not send the {label} to {hint}: {why}",
                     "failure") from None
    digest = ctx.keys.code_hash(_purpose_key(method.id, purpose), code)
    with store.transaction():
        store.record_code_sent(method.id, purpose, digest, now=now, expires_at=now + ttl,
                               channel=receipt.channel)
        store.record_event("code.sent", user_id=method.user_id, outcome="success",
                           detail={**base, "channel": receipt.channel,
                                   "fell_back_from": receipt.fell_back_from,
                                   "destination_hint": receipt.destination_hint or hint,
                                   "gateway": receipt.gateway, "expires_in": ttl,
                                   "code_length": length})
    log.info("sent a %s %s code to %s via %s%s", purpose, receipt.channel,
             receipt.destination_hint or hint, receipt.gateway,
             f" (fell back from {receipt.fell_back_from})" if receipt.fell_back_from else "")
    return receipt


def prompt_for(method: Method, receipt: "Receipt | None" = None) -> str:
    """What to tell the person after a code was sent ("Enter the code sent to +44•••••123")."""
    if receipt is None:
        if method.kind == "voice":
            return f"Answer the call ({method.name}) and enter the code it reads out"
        return f"Enter the code sent to {method.name}"
    hint = receipt.destination_hint
    channel = receipt.channel
    if channel == "email":
        text = f"Enter the code we emailed to {hint}"
    elif channel == "voice":
        text = f"Answer the call to {hint} and enter the code it reads out"
    elif channel == "messaging":
        text = f"Enter the code sent to {hint} in your messaging app"
    else:
        text = f"Enter the code sent to {hint}"
    if receipt.fell_back_from and receipt.fell_back_from != channel:
        from ..delivery import CHANNEL_LABELS

        text += (f" (sent by {CHANNEL_LABELS.get(channel, channel)}: the "
                 f"{CHANNEL_LABELS.get(receipt.fell_back_from, receipt.fell_back_from)} could "
                 "not be reached)")
    return text


# --------------------------------------------------------------------------- verifying


def verify_code(ctx: FactorContext, method: Method, code: str, *,
                purpose: str = "login") -> Verification:
    """Check a code typed by the person against the newest code sent to ``method`` for
    ``purpose`` (under the method's lockout); a code works once."""
    _check_purpose(purpose)
    store = ctx.store
    kind = method.kind
    try:
        method = store.get_method(method.id)
    except UnknownCredential:
        return refused(ctx, kind, method.user_id, Reason.NO_CREDENTIAL,
                       f"{method.name!r} was removed")
    refusal = None
    if method.kind not in CHANNELS:
        refusal = (Reason.NO_CREDENTIAL, f"{method.name!r} does not receive codes")
    elif purpose == "login" and not method.confirmed:
        refusal = (Reason.NOT_CONFIRMED, f"{method.name!r} is not confirmed yet")
    elif method.flagged:
        refusal = (Reason.CREDENTIAL_FLAGGED,
                   f"{method.name!r} was flagged ({method.flag_reason or 'no reason given'})")
    if refusal is not None:
        store.record_event(f"verify.{kind}", user_id=method.user_id, outcome="refused",
                           detail={"reason": refusal[0].value, "method": method.name})
        return Verification(False, kind, method, refusal[0], refusal[1])

    typed = _normalise(code)
    digest = ctx.keys.code_hash(_purpose_key(method.id, purpose), typed)

    def check():
        now = ctx.now()
        with store.transaction():
            row = store.latest_code(method.id, purpose)
            if row is None:
                return (False, Reason.WRONG_CODE,
                        "no code was sent for this: ask for a code first", {"purpose": purpose})
            detail = {"purpose": purpose, "channel": row["channel"]}
            match = equal(bytes(row["code_hash"]), digest)
            if row["used_at"] is not None:
                if match:
                    return False, Reason.CODE_REPLAYED, "this code was already used", detail
                return False, Reason.WRONG_CODE, "wrong code", detail
            if row["expires_at"] <= now:
                return False, Reason.CODE_EXPIRED, "this code has expired: ask for a new one", detail
            if not match:
                store.count_code_attempt(row["id"])
                return False, Reason.WRONG_CODE, "wrong code", detail
            if not store.use_code(row["id"], now):
                return False, Reason.CODE_REPLAYED, "this code was already used", detail
        return True, None, f"{label_of_store(kind)} accepted", detail

    return checked(ctx, kind=kind, method=method, user_id=method.user_id, check=check)


# --------------------------------------------------------------------------- enrolment


def _pending(ctx: FactorContext, user_id: str, channel: str, name: str | None) -> Method | None:
    pending = [m for m in ctx.store.list_methods(user_id, channel) if not m.confirmed
               and (name is None or m.name.casefold() == name.strip().casefold())]
    return pending[-1] if pending else None  # the newest


def add_contact(ctx: FactorContext, user_id: str, channel: str, destination: str, *,
                name: str | None = None) -> "tuple[Method, Receipt]":
    """Add an email address or phone number (not usable until ``confirm_contact``) and send
    it an enrolment code. ``name`` defaults to the channel and the masked destination
    ("sms +44•••••123"). Re-adding a pending one replaces it (its code stops working; the
    resend limits still apply). ``FactorError``: bad destination (``METHOD_NOT_ALLOWED``),
    that destination already enrolled or that name taken (``ALREADY_ENROLLED``), or what
    ``send_code`` raises (then nothing is added)."""
    from ..delivery import validate_destination

    _check_channel(channel)
    store = ctx.store
    user = store.get_user_by_id(user_id)
    try:
        destination = validate_destination(channel, destination)
    except ValueError as e:
        raise FactorError(Reason.METHOD_NOT_ALLOWED, str(e)) from None
    hint = _mask(channel, destination)
    label = label_of_store(channel)
    same = [c for c in list_contacts(ctx, user.id)
            if c.channel == channel and c.destination == destination]
    confirmed = [c for c in same if c.method.confirmed]
    if confirmed:
        raise FactorError(Reason.ALREADY_ENROLLED,
                          f"{hint} is already enrolled for {label}s as {confirmed[0].method.name!r}")
    old = same[-1].method if same else None
    if old is not None:  # re-adding gets round neither the resend limits nor a lockout
        now = ctx.now()
        current = lockout.state(store, lockout.method_scope(old.id))
        if current.locked(now):
            raise FactorError(Reason.METHOD_LOCKED,
                              f"too many failed attempts: {old.name!r} locked "
                              f"{lockout.describe_until(current.locked_until, now)}; an "
                              "administrator can unlock it")
        _throttle(ctx, old, now, "enrol")
    now = ctx.now()
    with store.transaction():
        history = []
        for c in same:  # the pending ones: replaced, their sends still count
            history += store.code_history(c.method.id)
            store.remove_method(c.method.id)
        if name is None:
            name = _default_name(ctx, user.id, channel, hint, None)
        try:
            method = store.add_method(user.id, channel, name, confirmed=False)
        except CredentialExists:
            raise FactorError(Reason.ALREADY_ENROLLED,
                              f"{user.username} already has a {label} contact named {name!r}: "
                              "choose another name with --name") from None
        store.add_contact(method.id, channel, destination, history, now=now)
    try:
        receipt = send_code(ctx, method, purpose="enrol")
    except BaseException as e:  # nothing half-added: no contact without a code sent
        try:
            store.remove_method(method.id)
        except UnknownCredential:
            pass
        reason = e.reason if isinstance(e, FactorError) else Reason.DELIVERY_FAILED
        store.record_event(f"enrol.{channel}", user_id=user.id, outcome="failure",
                           detail={"method": method.name, "destination_hint": hint,
                                   "reason": reason.value})
        raise
    store.record_event(f"enrol.{channel}", user_id=user.id, outcome="started",
                       detail={"method": method.name, "destination_hint": hint,
                               "replaced": old is not None, "channel": receipt.channel})
    return store.get_method(method.id), receipt


def confirm_contact(ctx: FactorContext, user_id: str, channel: str, code: str, *,
                    name: str | None = None) -> Verification:
    """Check the enrolment code of the user's pending ``channel`` contact (the one named
    ``name``, else the newest); on success it becomes usable, and preferred if the user
    has no preferred method."""
    _check_channel(channel)
    store = ctx.store
    method = _pending(ctx, user_id, channel, name)
    label = label_of_store(channel)
    if method is None:
        store.record_event(f"enrol.{channel}", user_id=user_id, outcome="failure",
                           detail={"reason": Reason.NO_CREDENTIAL.value,
                                   **({"method": name} if name else {})})
        return Verification(False, channel, None, Reason.NO_CREDENTIAL,
                            f"no {label} contact{f' named {name!r}' if name else ''} is waiting "
                            "for confirmation: add it first")
    result = verify_code(ctx, method, code, purpose="enrol")
    if not result.ok:
        return result
    _, destination = contact(ctx, method)
    with store.transaction():
        method = store.confirm_method(method.id)
        preferred = store.preferred_method(user_id) is None
        if preferred:
            method = store.set_preferred_method(user_id, method.id)
        store.record_event(f"enrol.{channel}", user_id=user_id, outcome="success",
                           detail={"method": method.name,
                                   "destination_hint": _mask(channel, destination),
                                   "preferred": preferred})
    return replace(result, method=method, message=f"{label} {method.name!r} confirmed")


def remove_contact(ctx: FactorContext, user_id: str, channel: str,
                   name: str | None = None) -> Method:
    """Remove the user's ``channel`` contact named ``name`` (or their only one)."""
    _check_channel(channel)
    store = ctx.store
    label = label_of_store(channel)
    methods = store.list_methods(user_id, channel)
    if name is not None:
        methods = [m for m in methods if m.name.casefold() == name.strip().casefold()]
    if not methods:
        raise FactorError(Reason.NO_CREDENTIAL,
                          f"no {label} contact" + (f" named {name!r}" if name else ""))
    if len(methods) > 1:
        raise FactorError(Reason.AMBIGUOUS,
                          f"{len(methods)} {label} contacts: name one of "
                          + ", ".join(repr(m.name) for m in methods))
    method = methods[0]
    with store.transaction():
        store.remove_method(method.id)
        store.record_event(f"remove.{channel}", user_id=user_id, outcome="success",
                           detail={"method": method.name})
    return method
