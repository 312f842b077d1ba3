"""The server's side of the cardholder's self-service card unlock from a joined workstation
(ceremony op ``card.self-unlock``, ``protocol.py``): ``ceremonies.cardunlock.self_unlock`` runs
here, on the organisation's store, with this server's RA source (``card_ra_source`` in the
organisation's store, or ``$TOKEN_AGENT_RA`` of the server process), while the person and
the card are at the workstation (``relay.py``).

* the card proves it is genuine with PIV's mutual authentication: the management key stays
  here; the workstation relays the card's witness and its proof (``card.mgmt_witness``,
  ``card.mgmt_proof``);
* the new PIN is asked twice and kept at the workstation (``card.new_pin``); here it is a
  stand-in, never sent;
* the PUK goes to the workstation in the one ``card.unblock`` ask (inside the mutually
  authenticated TLS channel), used on the card there and forgotten; never logged, audited
  or shown on either side.
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import TYPE_CHECKING

from drivers.pcsc import errors as card_errors

from ..outcome import Reason
from . import protocol
from .protocol import ProtocolError
from .remote import (
    Conversation, RemoteCardSession, RemoteInteraction, WorkstationLost, _key_login,
)

if TYPE_CHECKING:
    from ..agent import Agent

log = logging.getLogger("token_agent.organisation")

#: what the server passes where the ceremony wants the new PIN: never a PIN, never sent
NEW_PIN_AT_WORKSTATION = "\x00new-pin-at-the-workstation\x00"


class UnlockCardSession(RemoteCardSession):
    """A :class:`RemoteCardSession` with what ``self_unlock`` uses besides a login's
    operations: the management key's mutual authentication, the new PIN kept at the
    workstation, and RESET RETRY COUNTER there."""

    @property
    def can_authenticate_management_key(self) -> bool:
        """Only a PIV card has a management key (a PKCS#11 path has none)."""
        return self.driver == "piv"

    def _lost(self, why: str) -> Exception:
        self.conv._lose(f"protocol: {why}")
        return self.conv.device_lost(card=True)

    def authenticate_management_key(self, key: bytes, algorithm: str = "AES128") -> None:
        """The card proves it is genuine: PIV's mutual authentication with its management
        key, which stays here. The workstation relays the two GENERAL AUTHENTICATE steps:
        the card's encrypted witness (decrypted here), then the decrypted witness and a
        challenge of ours, whose encryption the card must return."""
        from drivers.pcsc.piv import _management_cipher

        block = protocol.MGMT_BLOCK.get(algorithm)
        if block is None:
            raise ValueError(f"unknown management key algorithm {algorithm!r}")
        cipher = _management_cipher(algorithm, key)  # ValueError: a key of the wrong size
        try:
            witness = protocol.b64d(self._value("card.mgmt_witness", algorithm=algorithm),
                                    "witness")
        except ProtocolError as e:
            raise self._lost(e.message) from None
        if len(witness) != block:
            raise self._lost("card.mgmt_witness: a witness of the wrong length")
        decryptor = cipher.decryptor()
        decrypted = decryptor.update(witness) + decryptor.finalize()
        challenge = os.urandom(block)
        try:
            proof = protocol.b64d(self._value(
                "card.mgmt_proof", algorithm=algorithm, witness=protocol.b64e(decrypted),
                challenge=protocol.b64e(challenge)), "proof")
        except ProtocolError as e:
            raise self._lost(e.message) from None
        encryptor = cipher.encryptor()
        if not hmac.compare_digest(proof, encryptor.update(challenge) + encryptor.finalize()):
            raise card_errors.ManagementKeyRejected(
                "The card's answer to the administrative key is wrong: it may not be a "
                "genuine card.")

    def collect_new_pin(self) -> tuple[str | None, str]:
        """The new PIN, asked twice and kept at the workstation (as the library's
        ``ask_new_pin`` says: ``(stand-in, "ok")``, ``(None, "cancelled")`` or
        ``(None, "invalid")``); never sent here."""
        try:
            value = self.conv.value("card.new_pin", self.conv.timeouts.prompt * 6, card=True)
        except (WorkstationLost, card_errors.PcscError):
            return None, "cancelled"
        if value is True:
            return NEW_PIN_AT_WORKSTATION, "ok"
        if value is False:
            return None, "invalid"
        if value is None:
            return None, "cancelled"
        self.conv._lose("protocol: a card.new_pin answer must be true, false or null")
        return None, "cancelled"

    def unblock_pin(self, puk: str, new_pin: str) -> None:
        """RESET RETRY COUNTER at the workstation with ``puk`` (sent in the ``card.unblock``
        ask, over the channel only) and the new PIN the workstation kept."""
        if new_pin != NEW_PIN_AT_WORKSTATION:  # a new PIN typed here would have to travel
            raise ValueError("the card's new PIN is kept at the workstation only")
        self._value("card.unblock", puk=puk)


def self_unlock_available(agent: "Agent") -> bool:
    """Whether this server holds an RA credentials source (the PUKs): ``card_ra_source``
    in the organisation's store, or ``$TOKEN_AGENT_RA`` of the server's process."""
    from ..rasource import RaError, configured_source

    try:
        configured_source(agent)
    except RaError:
        return False
    except Exception as e:  # noqa: BLE001 (a broken plugin: not available)
        log.warning("the RA source failed: %s", type(e).__name__)
        return False
    return True


WRONG_HOLDER = "this card is not yours: it can be unlocked only by its holder"


def card_self_unlock(agent: "Agent", conv: Conversation, req: dict, workstation: str) -> dict:
    """The cardholder's unlock of the locked card at the workstation (``ceremonies.
    cardunlock.self_unlock``) with this server's RA source: the person answers at the
    workstation, the new PIN is asked and kept there, the PUK goes there only to be used."""
    from ..ceremonies.card import CardActionOutcome, _certificate_subject, device_failure
    from ..ceremonies.cardunlock import EVENT, self_unlock

    store = agent.store

    def failed(reason: Reason, message: str) -> dict:
        return protocol.final_result(CardActionOutcome(
            ok=False, action="self-unlock", reason=reason, message=message).to_json())

    try:
        session = UnlockCardSession.open(conv, timeout=conv.timeouts.device)
    except card_errors.PcscError as e:
        if conv.lost is not None:
            raise WorkstationLost(conv.lost) from None
        return failed(device_failure(e), e.message)
    with session:
        if req["user"] is not None:
            try:
                card_uuid = _certificate_subject(session.certificate("9a"))[0]
            except card_errors.PcscError as e:
                if conv.lost is not None:
                    raise WorkstationLost(conv.lost) from None
                return failed(device_failure(e), e.message)
            except ValueError as e:
                return failed(Reason.CERT_INVALID, f"unreadable card certificate: {e}")
            holder = store.get_user_by_card_uuid(card_uuid) if card_uuid else None
            if holder is None or holder.username.casefold() != req["user"].casefold():
                store.record_event(EVENT, username=req["user"], outcome="failure",
                                   detail={"reason": Reason.WRONG_USER.value, "uuid": card_uuid,
                                           "via": "organisation", "workstation": workstation})
                return failed(Reason.WRONG_USER, WRONG_HOLDER)
        outcome = self_unlock(agent, session, interaction=RemoteInteraction(conv),
                              key_login=_key_login(agent, conv))
    if conv.lost is not None:
        raise WorkstationLost(conv.lost)
    return protocol.final_result(outcome.to_json())


__all__ = ["NEW_PIN_AT_WORKSTATION", "UnlockCardSession", "card_self_unlock",
           "self_unlock_available"]
