"""The cardholder's own unlock of a card locked by wrong PINs, at the workstation, with the
card in the reader ("Forgot your card PIN?"): the CLI's ``card self-unlock``, and the
service's and PAM's path (they give their own :class:`~token_agent.ceremonies.login.Interaction`).

    outcome = self_unlock(agent, session, interaction=terminal, ra=rasource.load_source(spec))

In this order, each step only when the one before passed (the questions: ``QUESTIONS``):

1. the card's certificate (9A), validated with the card trust policy as at login: an
   expired, revoked or untrusted card is refused, nothing asked;
2. the RA's credentials for this card (``token_agent.rasource``), and the card proves it is
   the genuine card: mutual authentication with its management key (a secret only the card
   and the RA hold; PIV). A copied certificate in another card (or a card emulator) stops
   here, so a stranger cannot spend the card's attempts nor make codes be sent to its
   holder. A session that cannot do it (PKCS#11) goes on, and the event records
   ``card_proof: "none"``;
3. the holder: the card's UUID mapped to its enrolled user (an unknown card, a disabled user,
   a suspended card: the login's messages);
4. the PIN must be locked (no tries left); otherwise "Your card is not locked: ...";
5. the holder must have a verified mobile number or email address, and a password (or a
   security key, when the front end gives ``key_login``);
6. one attempt is counted for this card (at most ``MAX_ATTEMPTS`` per ``WINDOW`` seconds, in
   the store: ``hit_throttle``), then a one-time code is sent to the contact (chosen when there
   are several) and must be typed back (the contact's lockout counts a wrong one);
7. the password (under its lockout), or the key ceremony;
8. the new PIN, 6 to 8 digits, twice;
9. RESET RETRY COUNTER with the RA's PUK (never shown, never logged or audited).

One ``card.self-unlock`` audit event per attempt (success or failure with its reason; never
a PIN, PUK, code or password). The holder is told on their email and SMS contacts (but the
one the code went to) when the card was unlocked, and when an attempt failed at a code or a
password.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any, Callable

from drivers.pcsc import errors as card_errors

from .. import notify, rasource
from ..cardopen import session_driver
from ..outcome import LoginOutcome, Reason
from .card import (
    CardActionOutcome, CardRefused, CardSettings, _certificate_subject, check_certificate,
    device_failure,
)

if TYPE_CHECKING:
    from ..agent import Agent
    from ..cardtrust import CardTrustPolicy
    from .login import Interaction

log = logging.getLogger("token_agent.card")

ACTION = "self-unlock"
EVENT = "card.self-unlock"
MAX_ATTEMPTS = 3
WINDOW = 24 * 3600
THROTTLE_SCOPE = "card-self-unlock"
NEW_PIN_TRIES = 3
NEW_PIN_RE = re.compile(r"[0-9]{6,8}")
#: the channels a code may go to (a verified mobile number or email address)
CODE_CHANNELS = ("sms", "email")

CHOOSE_PROMPT = "Where should we send a one-time code?"
PASSWORD_PROMPT = "Your password"
NEW_PIN_PROMPT = "New card PIN (6 to 8 digits)"
NEW_PIN_AGAIN = "New card PIN again"
#: the fixed questions (the code's prompt is ``codes.prompt_for``'s: "Enter the code sent to ...")
QUESTIONS = (CHOOSE_PROMPT, PASSWORD_PROMPT, NEW_PIN_PROMPT, NEW_PIN_AGAIN)
SELF_UNLOCK_QUESTIONS = QUESTIONS

NOT_LOCKED = "Your card is not locked: log in with your PIN or change it."
UNLOCKED = "Your card is unlocked. Log in with your new PIN."
NOT_SET_UP = ("Unlocking your card yourself is not set up here: ask your sponsor to unlock "
              "it.")
NOT_GENUINE = ("This card did not prove that it is a genuine card of the organisation: it "
               "cannot be unlocked here. Ask your sponsor.")
NO_CONTACT = ("You have no verified mobile number or email address for a one-time code: ask "
              "your sponsor to unlock your card.")
NO_SECOND = ("You need a password (or a security key) to unlock your card yourself: ask your "
             "sponsor to unlock it.")


def card_ids(session) -> tuple[str | None, str | None]:
    """(the holder's UUID from the 9A certificate, the card's serial as the RA may know it:
    the CHUID GUID in hex when the session reads one, else None). Not validated."""
    uuid, _holder, _serial = _certificate_subject(session.certificate("9a"))
    serial = None
    chuid = getattr(session, "chuid", None)
    if callable(chuid):
        try:
            serial = chuid().guid.hex()
        except (card_errors.PcscError, ValueError, AttributeError):
            serial = None
    return uuid, serial


def _new_pin_ok(pin: str) -> bool:
    return isinstance(pin, str) and NEW_PIN_RE.fullmatch(pin) is not None


def ask_new_pin(interaction: "Interaction") -> tuple[str | None, str]:
    """The new PIN, 6 to 8 digits, typed twice (``NEW_PIN_TRIES`` tries, each failure said
    with ``interaction.info``): ``(pin, "ok")``, ``(None, "cancelled")`` (no answer) or
    ``(None, "invalid")``."""
    for _ in range(NEW_PIN_TRIES):
        first = interaction.secret(NEW_PIN_PROMPT)
        if first is None:
            return None, "cancelled"
        if not _new_pin_ok(first):
            interaction.info("A card PIN is 6 to 8 digits.")
            continue
        again = interaction.secret(NEW_PIN_AGAIN)
        if again is None:
            return None, "cancelled"
        if again != first:
            interaction.info("The two PINs are not the same.")
            continue
        return first, "ok"
    return None, "invalid"


def self_unlock(agent: "Agent", session, *, interaction: "Interaction",
                ra: "rasource.RaSource | None" = None,
                key_login: Callable[[str], LoginOutcome] | None = None,
                policy: "CardTrustPolicy | None" = None, now=None) -> CardActionOutcome:
    """Unlock the locked card in ``session`` for its holder (see the module docstring).
    ``ra``: where the PUK comes from (default: ``rasource.configured_source``). Always returns
    an outcome (``message``: what to tell the person); one audit event per call."""
    from ..factors import FactorError, codes, password

    started = time.perf_counter()
    store = agent.store
    facts: dict[str, Any] = {}
    state: dict[str, Any] = {"user": None, "told_failure": False, "contact": None,
                             "recorded": False}

    def done(ok: bool, reason: Reason | None = None, message: str = "") -> CardActionOutcome:
        user = state["user"]
        facts["ceremony_ms"] = round((time.perf_counter() - started) * 1000, 3)
        state["recorded"] = True
        store.record_event(EVENT, user_id=user.id if user else None,
                           outcome="success" if ok else "failure",
                           detail={**facts, **({"reason": reason.value} if reason else {})})
        if not ok:
            log.info("card self-unlock refused: %s", reason.value if reason else "?")
        return CardActionOutcome(ok=ok, action=ACTION, reason=reason, message=message,
                                 card_uuid=facts.get("uuid"), holder_name=facts.get("holder_name"),
                                 certificate_serial=facts.get("certificate_serial"),
                                 detail={k: v for k, v in facts.items()
                                         if k in ("user", "card_proof", "attempt", "contact",
                                                  "card_driver")})

    def failed_factor(reason: Reason, message: str) -> CardActionOutcome:
        user = state["user"]
        contact = state["contact"]
        notify.tell_user(agent, user, "Your smartcard was not unlocked",
                         "Someone with your smartcard tried to unlock it at a workstation and "
                         "gave a wrong one-time code or password. Your card stays locked.",
                         exclude_method_id=contact.method.id if contact else None)
        return done(False, reason, message)

    facts["card_driver"] = session_driver(session)
    # 1. the certificate, validated as at login
    try:
        cert_der = session.certificate("9a")
    except card_errors.PcscError as e:
        return done(False, device_failure(e), e.message)
    settings = CardSettings.from_store(store)
    try:
        identity = check_certificate(cert_der, settings, policy=policy, now=now, facts=facts)
    except CardRefused as e:
        return done(False, e.reason, e.message)
    cert_serial = identity.certificate_serial
    cert_serial = f"{cert_serial:x}" if isinstance(cert_serial, int) else str(cert_serial).lower()
    facts.update({"uuid": identity.uuid, "holder_name": identity.holder_name,
                  "certificate_serial": cert_serial})

    # 2. the RA's credentials, and the card proves it is genuine
    try:
        if ra is None:
            ra = rasource.configured_source(agent)
    except rasource.RaError as e:
        log.warning("card self-unlock: %s", e)
        return done(False, Reason.INTERNAL_ERROR, NOT_SET_UP)
    try:
        _uuid, card_serial = card_ids(session)
    except (card_errors.PcscError, ValueError) as e:
        return done(False, device_failure(e) if isinstance(e, card_errors.PcscError)
                    else Reason.CERT_INVALID, getattr(e, "message", str(e)))
    if card_serial:
        facts["card_serial"] = card_serial
    try:
        creds = ra.credentials(uuid=identity.uuid, serial=card_serial)
    except rasource.UnknownCard as e:
        log.info("card self-unlock: %s", e)
        return done(False, Reason.UNKNOWN_CREDENTIAL,
                    "The registration authority has no record of this card: ask your sponsor.")
    except rasource.RaError as e:
        log.warning("card self-unlock: the RA's credentials cannot be had: %s", e)
        return done(False, Reason.INTERNAL_ERROR, NOT_SET_UP)
    prove = getattr(session, "authenticate_management_key", None)
    if not getattr(session, "can_authenticate_management_key", True):
        prove = None  # a relayed card whose path has no management key (PKCS#11)
    if callable(prove) and creds.management_key:
        try:
            prove(creds.management_key, creds.management_key_algorithm)
        except card_errors.ManagementKeyRejected:
            return done(False, Reason.VERIFICATION_FAILED, NOT_GENUINE)
        except card_errors.PcscError as e:
            return done(False, device_failure(e), e.message)
        except ValueError:  # a key of the wrong size for its algorithm: the RA's record
            return done(False, Reason.VERIFICATION_FAILED, NOT_GENUINE)
        facts["card_proof"] = "management-key"
    else:
        facts["card_proof"] = "none"

    # 3. the holder
    ident = store.get_card_identity(identity.uuid)
    if ident is None:
        return done(False, Reason.UNKNOWN_USER,
                    f"the card of {identity.holder_name} (UUID {identity.uuid}) is not "
                    "enrolled here: ask an administrator")
    user = store.get_user_by_id(ident.user_id)
    state["user"] = user
    facts["user"] = user.username
    if user.disabled:
        return done(False, Reason.USER_DISABLED, f"{user.username} is disabled")
    if ident.flagged:
        return done(False, Reason.CREDENTIAL_FLAGGED,
                    f"this card is suspended ({ident.flag_reason}): ask an administrator")

    # 4. locked?
    try:
        retries = session.pin_retries()
    except card_errors.PcscError as e:
        return done(False, device_failure(e), e.message)
    if retries != 0:
        return done(False, Reason.PIN_NOT_BLOCKED, NOT_LOCKED)

    # 5. what the holder can prove
    ctx = agent.factors()
    contacts = [c for c in codes.list_contacts(ctx, user.id)
                if c.channel in CODE_CHANNELS and c.method.confirmed and not c.method.flagged]
    if not contacts:
        return done(False, Reason.NO_CREDENTIAL, NO_CONTACT)
    has_password = password.get(ctx, user.id) is not None
    has_key = key_login is not None and any(
        m.kind == "fido2" and m.confirmed and not m.flagged for m in store.list_methods(user.id))
    if not has_password and not has_key:
        return done(False, Reason.NO_CREDENTIAL, NO_SECOND)

    # from here an attempt is counted: an interrupt (Ctrl-C, a client gone) still leaves its
    # one audit event
    try:
        # 6. one attempt for this card, then the one-time code
        card_key = f"{identity.uuid}:{card_serial or cert_serial}"
        count, window_start = store.hit_throttle(THROTTLE_SCOPE, card_key, now=agent.now(),
                                                 window=WINDOW)
        facts["attempt"] = count
        if count > MAX_ATTEMPTS:
            until = time.strftime("%H:%M", time.localtime(window_start + WINDOW))
            return done(False, Reason.TOO_MANY_ATTEMPTS,
                        f"Too many unlock attempts for this card: try again after {until}, or ask "
                        "your sponsor to unlock it.")
        contact = contacts[0]
        if len(contacts) > 1:
            options = [(f"m{c.method.id}",
                        f"{'Email to' if c.channel == 'email' else 'Text message to'} {c.hint}")
                       for c in contacts]
            preferred = next((f"m{c.method.id}" for c in contacts if c.method.preferred),
                             options[0][0])
            picked = interaction.choose(CHOOSE_PROMPT, options, preferred)
            if picked is None:
                return done(False, Reason.CANCELLED, "cancelled: no answer")
            contact = next((c for c in contacts if f"m{c.method.id}" == picked), None)
            if contact is None:
                return done(False, Reason.METHOD_NOT_ALLOWED, "choose one of the contacts listed")
        state["contact"] = contact
        facts["contact"] = contact.hint
        try:
            receipt = codes.send_code(ctx, contact.method, purpose="login")
        except FactorError as e:
            return done(False, e.reason, e.message)
        typed = interaction.secret(codes.prompt_for(store.get_method(contact.method.id), receipt))
        if typed is None:
            return done(False, Reason.CANCELLED, "cancelled: no answer")
        checked = codes.verify_code(ctx, contact.method, typed, purpose="login")
        typed = None
        if not checked.ok:
            return failed_factor(checked.reason or Reason.WRONG_CODE,
                                 checked.message or "wrong code")

        # 7. the password (or the key)
        if has_password:
            secret = interaction.secret(PASSWORD_PROMPT)
            if secret is None:
                return done(False, Reason.CANCELLED, "cancelled: no answer")
            checked = password.verify(ctx, user.id, secret)
            secret = None
            if not checked.ok:
                return failed_factor(checked.reason or Reason.WRONG_PASSWORD,
                                     checked.message or "wrong password")
            facts["second"] = "password"
        else:
            outcome = key_login(user.username)
            if not outcome.ok or outcome.user_id != user.id:
                return failed_factor(outcome.reason or Reason.VERIFICATION_FAILED,
                                     outcome.message or "the security key was not accepted")
            facts["second"] = "key"

        # 8. the new PIN, twice (a card at another host, the organisation's workstation: asked
        # and kept there, ``collect_new_pin``; what comes here is a stand-in for it)
        collect = getattr(session, "collect_new_pin", None)
        if callable(collect):
            new_pin, status = collect()
        else:
            new_pin, status = ask_new_pin(interaction)
        if status == "cancelled":
            return done(False, Reason.CANCELLED, "cancelled: no answer")
        if new_pin is None:
            return done(False, Reason.WRONG_PIN, "no new PIN of 6 to 8 digits was given twice")

        # 9. RESET RETRY COUNTER with the RA's PUK
        try:
            session.unblock_pin(creds.puk, new_pin)
        except card_errors.PcscError as e:
            reason = device_failure(e)
            message = e.message
            if reason in (Reason.WRONG_PUK, Reason.PUK_BLOCKED):
                log.warning("card self-unlock: the card refused the RA's PUK (%s)", reason.value)
                message = ("The card refused the registration authority's unlock code: ask your "
                           "sponsor.")
            return done(False, reason, message)
        finally:
            new_pin = None
            creds = None
        notify.tell_user(agent, user, "Your smartcard was unlocked",
                         "Your smartcard was unlocked at a workstation with a new PIN, after a "
                         "one-time code sent to you and your password or security key.",
                         exclude_method_id=contact.method.id)
        log.info("card %s unlocked by its holder %s", identity.uuid, user.username)
        return done(True, message=UNLOCKED)
    except BaseException:
        if not state["recorded"]:
            done(False, Reason.CANCELLED, "interrupted")
        raise
