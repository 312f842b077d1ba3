"""The cardholder's self-service unlock of a locked card, in the service: the "Forgot your
card PIN?" path of a card login (so of PAM ``primary=card``), and the op
``card.self-unlock``. The unlock itself is the library's
(``token_agent.ceremonies.cardunlock.self_unlock``: the card checked, the per-card rate
limit, a one-time code to the holder's verified contact, their password or key, a new PIN
twice, the RA's PUK from the configured ``token_agent.rasource`` source, the audit event
``card.self-unlock``); this module only decides when to offer it and runs it with the
ceremony's interaction, holding the reader lock of the login.

A card login whose card turns out locked (reason ``pin-blocked``, found before any PIN is
asked) offers the unlock when all of these hold:

* an RA source is configured (``$TOKEN_AGENT_RA`` of the service, or the card setting
  ``card_ra_source``): without one, no offer, the login fails as before ("Your card is
  locked: ask your sponsor to unlock it.");
* the card's holder is enrolled here and, when the login names a user, is that user (the
  card of someone else is not offered for unlocking through your login);
* the ceremony is not cancelled.

The offer is the text prompt :data:`OFFER_PROMPT`; "y" or "yes" (any case) accepts, anything
else (an empty answer included) declines: the login fails as it would have. On yes, the
library's questions follow on the same conversation; when the card is unlocked the person is
told (info :data:`UNLOCKED_INFO`) and the card login goes on at once, asking the card's PIN
again (the new one): one PAM conversation, from the locked card to the session. A failed
unlock ends the login with the library's message, reason ``pin-blocked`` (the card is still
locked) or ``cancelled``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..outcome import LoginOutcome, Reason

if TYPE_CHECKING:
    from .ceremony import Ceremony, SocketInteraction
    from .host import Host

log = logging.getLogger("token_agent.service")

OFFER_PROMPT = "Your card is locked. Forgot your card PIN? Unlock it now? [y/N]"
YES = frozenset({"y", "yes"})
UNLOCKED_INFO = "Your card is unlocked. Log in with your new PIN."


def ra_source(svc: "Host"):
    """The configured RA credentials source, or None (self-unlock not set up here: no offer)."""
    from ..rasource import RaError, configured_source

    try:
        return configured_source(svc.agent)
    except RaError as e:
        log.info("self-service card unlock not offered: %s", e)
    except Exception as e:  # a broken plugin: no offer, never a failed login for it
        log.warning("self-service card unlock not offered: the RA source failed: %s",
                    type(e).__name__)
    return None


WRONG_HOLDER = "this card is not yours: it can be unlocked only by its holder"


def run_self_unlock(svc: "Host", c: "Ceremony", ui: "SocketInteraction", reader: str | None,
                    *, ra=None, key_login: Callable[[str], LoginOutcome] | None = None,
                    expect_user: str | None = None):
    """The library's self-unlock of the card in ``reader`` (its reader lock held by the
    caller), asking through ``ui``: a ``CardActionOutcome``. ``expect_user``: the card's
    holder must be this user (checked from the card's certificate before anything is asked
    or charged to the card's rate limit)."""
    from drivers.pcsc import errors as card_errors

    from ..ceremonies.card import CardActionOutcome, _certificate_subject, device_failure
    from ..ceremonies.cardunlock import self_unlock

    def failed(reason: Reason, message: str) -> CardActionOutcome:
        return CardActionOutcome(ok=False, action="self-unlock", reason=reason, message=message)

    try:
        session = svc.cards.open_card(reader)  # the configured [cards] driver, as logins
    except card_errors.PcscError as e:
        return failed(device_failure(e), e.message)
    try:
        if expect_user is not None:
            try:
                card_uuid, _holder, _serial = _certificate_subject(session.certificate("9a"))
            except card_errors.PcscError as e:
                return failed(device_failure(e), e.message)
            except ValueError as e:
                return failed(Reason.CERT_INVALID, f"unreadable card certificate: {e}")
            holder = svc.store.get_user_by_card_uuid(card_uuid) if card_uuid else None
            if holder is None or holder.username.casefold() != expect_user.casefold():
                log.info("card self-unlock refused: the card is not the user's",
                         extra={"login": c.id, "user": expect_user})
                svc.store.record_event("card.self-unlock", username=expect_user,
                                       outcome="failure",
                                       detail={"reason": Reason.WRONG_USER.value,
                                               "uuid": card_uuid, "via": "service"})
                return failed(Reason.WRONG_USER, WRONG_HOLDER)
        return self_unlock(svc.agent, session, interaction=ui, ra=ra, key_login=key_login)
    finally:
        try:
            session.close()
        except Exception:
            pass


def offer_after_login(svc: "Host", c: "Ceremony", ui: "SocketInteraction",
                      reader: str | None, name: str | None, outcome: LoginOutcome, *,
                      relogin: Callable[[], LoginOutcome],
                      key_login: Callable[[str], LoginOutcome] | None = None) -> LoginOutcome:
    """``outcome`` of a card login, or, for a locked card the holder may unlock themselves,
    the outcome of the offer (see the module docstring): declined, the unlock failed, or
    ``relogin()`` (the card login again, with the new PIN) after the unlock."""
    if outcome.ok or outcome.reason != Reason.PIN_BLOCKED or c.cancel.is_set():
        return outcome
    holder = outcome.user
    if holder is None or (name is not None and holder.casefold() != name.casefold()):
        return outcome  # a card not enrolled here, or someone else's: nothing to offer
    ra = ra_source(svc)
    if ra is None:
        return outcome
    answer = ui.text(OFFER_PROMPT)
    if answer is None:
        return LoginOutcome.failure("card", Reason.CANCELLED, "cancelled: no answer",
                                    user=holder, user_id=outcome.user_id,
                                    detail=dict(outcome.detail))
    if answer.strip().casefold() not in YES:
        log.info("self-service card unlock declined", extra={"login": c.id, "user": holder})
        return outcome
    log.info("self-service card unlock started", extra={"login": c.id, "user": holder})
    result = run_self_unlock(svc, c, ui, reader, ra=ra, key_login=key_login)
    log.info("self-service card unlock finished", extra={
        "login": c.id, "user": holder, "ok": result.ok,
        "reason": result.reason.value if result.reason else None})
    if not result.ok:
        reason = Reason.CANCELLED if result.reason == Reason.CANCELLED else Reason.PIN_BLOCKED
        return LoginOutcome.failure(
            "card", reason, result.message or outcome.message, user=holder,
            user_id=outcome.user_id,
            detail={**outcome.detail, "self_unlock": result.reason.value if result.reason
                    else "failed"})
    ui.info(result.message or UNLOCKED_INFO)
    if c.cancel.is_set():
        return LoginOutcome.failure("card", Reason.CANCELLED, "cancelled", user=holder)
    return relogin()
