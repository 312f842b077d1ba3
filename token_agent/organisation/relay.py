"""The workstation's side of a ceremony run by the organisation's server (``remote.py``):
it answers the server's asks with the local Interaction (the service's socket, the PAM
conversation) and the local devices (the service's key pool and card readers).

    relayed = relay_with_failover(client, protocol.login_request(user="alice"), ui,
                                  key_opener, card_opener, cancel)
    relayed.outcome, relayed.offline, relayed.ticket

* The PIN of a key or a card is asked here and used here, on the device in the person's
  hand: no message carries it. So is a card's new PIN in a self-unlock (``card.new_pin``:
  asked twice here, kept for ``card.unblock``, whose PUK, from the server's RA source, is
  used on the card at once and forgotten: never logged, shown or kept). The presence rule
  (``ceremonies/keypresence``) is applied here too, by the caller's ``PinGuard``.
* Failover: when the channel fails before anything was asked of the person or of a device
  (a prompt, a touch, a PIN), the ceremony starts again on the next replica; after that it
  fails with ``Reason.SERVER_LOST`` and a sentence saying to try again (no session is made).
* ``key_opener(rp_id, credential_ids, timeout, cancel, on_touch)`` gives a context manager
  whose value is the ``FidoKey`` (the service's ``KeyPool.acquire``);
  ``card_opener(timeout, cancel)`` a context manager whose value is the ``PivSession``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import ExitStack
from typing import Any, Callable, NamedTuple

from drivers.fido import errors as key_errors
from drivers.pcsc import errors as card_errors

from ..outcome import LoginOutcome, Reason
from . import protocol
from .protocol import ProtocolError

log = logging.getLogger("token_agent.organisation")

PATH = "/v1/ceremony"
KEY_PIN_PROMPT = "Enter the PIN for your security key"
CARD_PIN_PROMPT = "Enter the PIN for your card"
TOUCH_MESSAGE = "Touch your security key"
LOST_MESSAGE = ("The connection to the organisation's server was lost during the sign-in: "
                "nothing was signed in. Try again.")
UNAVAILABLE_MESSAGE = "The organisation's server cannot be reached; use your key or card."
#: asks that reach the person or a device: once one came, the ceremony is not started again
ENGAGING = frozenset({"secret", "text", "choose", "key.assert", "key.make_credential",
                      "card.pin", "card.verify_pin", "card.sign", "card.new_pin",
                      "card.unblock", "card.mgmt_proof"})


_PIN_WORD = re.compile(r"\b(pin|passcode)\b", re.IGNORECASE)


def asks_for_a_pin(prompt: str) -> bool:
    """Whether a server's prompt asks for a device's PIN (the server never needs one: its
    own prompts are for passwords and one-time codes)."""
    return _PIN_WORD.search(prompt) is not None


class Relayed(NamedTuple):
    outcome: LoginOutcome | None  # a login's outcome (None for an enrolment)
    offline: dict | None  # the offline bundle the server gave (``want_offline``)
    ticket: str | None  # the server's re-authentication ticket of a successful login
    result: dict  # the final result as the server sent it


class WorkstationRefused(Exception):
    """The server refuses this workstation (its certificate unknown or revoked): WebSocket
    close code 4403, or an HTTP error on connecting (``ServerRefused``)."""

    def __init__(self, error: str, message: str | None = None) -> None:
        self.error = error
        self.message = message or (
            f"The organisation's server refuses this workstation ({error}): ask the "
            "organisation's administrator to join it again.")
        super().__init__(self.message)


class ChannelLost(Exception):
    """The channel failed; ``engaged``: the person or a device had been asked already."""

    def __init__(self, why: str, engaged: bool) -> None:
        super().__init__(why)
        self.why = why
        self.engaged = engaged


def _lost_outcome(message: str = LOST_MESSAGE) -> LoginOutcome:
    return LoginOutcome.failure("login", Reason.SERVER_LOST, message)


class _Session:
    """One relayed ceremony: the devices it holds, what it asked of whom."""

    def __init__(self, channel, interaction, key_opener, card_opener, cancel,
                 presence, idle_timeout: float) -> None:
        self.channel = channel
        self.ui = interaction
        self.key_opener = key_opener
        self.card_opener = card_opener
        self.cancel = cancel
        self.presence = presence
        self.idle_timeout = idle_timeout
        self.engaged = False
        self.held = ExitStack()
        self.key = None
        self.card = None
        self.card_pin: str | None = None
        self.new_pin: str | None = None

    # the person ---------------------------------------------------------------------------

    def _call(self, name: str, *args) -> Any:
        return getattr(self.ui, name)(*args)

    def key_pin(self) -> str | None:
        f = getattr(self.ui, "key_pin", None)
        return f() if f is not None else self.ui.secret(KEY_PIN_PROMPT)

    def touch(self) -> None:
        f = getattr(self.ui, "touch", None)
        if f is not None:
            f()
        else:
            self.ui.info(TOUCH_MESSAGE)

    def card_pin_prompt(self) -> str | None:
        f = getattr(self.ui, "card_pin", None)
        return f() if f is not None else self.ui.secret(CARD_PIN_PROMPT)

    # the conversation ---------------------------------------------------------------------

    def send(self, message: dict) -> None:
        try:
            self.channel.send(message)
        except Exception as e:  # noqa: BLE001 (whatever the channel raises: it is gone)
            raise ChannelLost(f"send failed: {type(e).__name__}", self.engaged) from None

    def recv(self) -> dict:
        deadline = time.monotonic() + self.idle_timeout
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise ChannelLost("cancelled", True)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelLost("the server stopped answering", self.engaged)
            try:
                return self.channel.recv(timeout=min(left, 0.5))
            except TimeoutError:
                continue
            except ProtocolError:
                raise
            except Exception as e:  # noqa: BLE001
                if getattr(e, "code", None) == 4403:
                    raise WorkstationRefused(str(getattr(e, "reason", None)
                                                 or "workstation-refused")) from None
                raise ChannelLost(f"receive failed: {type(e).__name__}", self.engaged) \
                    from None

    def run(self, first_message: dict) -> dict:
        """The final message (``("final", fields)`` of ``parse_server_message``)."""
        self.send(first_message)
        with self.held:
            while True:
                kind, message = protocol.parse_server_message(self.recv())
                if kind == "final":
                    return message
                if kind == "tell":
                    self.on_tell(message)
                    continue
                self.send(self.on_ask(message))

    def on_tell(self, m: dict) -> None:
        kind = m["tell"]
        if kind == "info":
            self.ui.info(m["message"])
        elif kind == "qr":
            self.ui.show_qr(m["uri"])
        elif kind == "key.close":
            self.key = None
            self._release("key")
        elif kind == "card.close":
            self.card, self.card_pin, self.new_pin = None, None, None
            self._release("card")

    def _release(self, what: str) -> None:
        stack = getattr(self, f"_{what}_stack", None)
        if stack is not None:
            setattr(self, f"_{what}_stack", None)
            stack.close()

    def on_ask(self, m: dict) -> dict:
        kind, ask_id = m["ask"], m["id"]
        if kind in ENGAGING:
            self.engaged = True
        card = kind.startswith("card.")
        try:
            return protocol.reply(ask_id, self.answer(kind, m))
        except (key_errors.FidoKeyError, card_errors.PcscError) as e:
            return protocol.error_reply(ask_id, e)
        except Exception:  # noqa: BLE001 (said to the server as the device's failure)
            log.exception("relaying %s failed", kind)
            generic = card_errors.PcscError() if card else key_errors.FidoKeyError()
            return protocol.error_reply(ask_id, generic)

    def answer(self, kind: str, m: dict) -> Any:
        if kind in ("secret", "text"):
            if asks_for_a_pin(m["prompt"]):
                # a device's PIN is asked here, by this workstation, never for the server:
                # a server that asks for one is not answered (the ceremony ends)
                log.warning("the organisation's server asked for a PIN in a prompt: refused")
                return None
            return self._call(kind, m["prompt"])
        if kind == "choose":
            return self.ui.choose(m["prompt"], [tuple(o) for o in m["options"]], m["default"])
        if kind == "key.open":
            return self.open_key(m)
        if kind in ("key.assert", "key.make_credential"):
            return self.use_key(kind, m)
        if kind == "card.open":
            return self.open_card(m)
        return self.use_card(kind, m)

    # keys ---------------------------------------------------------------------------------

    def open_key(self, m: dict) -> dict:
        if self.key is not None:
            raise key_errors.FidoKeyError("The server asked for a second key in one sign-in.")
        stack = ExitStack()
        try:
            self.key = stack.enter_context(self.key_opener(
                m["rp_id"], m["credential_ids"], float(m["timeout"]), self.cancel, self.touch))
        except BaseException:
            stack.close()
            raise
        self._key_stack = stack
        self.held.callback(self._release, "key")
        return {"path": str(self.key.path)}

    def use_key(self, kind: str, m: dict) -> dict:
        from ..ceremonies.keypresence import PinGuard

        key = self.key
        if key is None:
            raise key_errors.NoKeyFound()
        if self.presence is None:
            self.presence = PinGuard(trusted=False, on_touch=self.touch,
                                     timeout=float(m["timeout"]), cancel=self.cancel)
        used: list[bool] = []

        def pin() -> str | None:
            value = self.key_pin()
            if value:
                used.append(True)
            return value

        provider = self.presence.pin_provider(key, pin)
        common = dict(origin=m["origin"], pin_provider=provider, on_touch=self.touch,
                      timeout=float(m["timeout"]), cancel=self.cancel)
        if kind == "key.assert":
            found = key.assert_credentials(rp_id=m["rp_id"], challenge=m["challenge"],
                                           allow=m["allow"],
                                           user_verification=m["user_verification"], **common)
            return protocol.assertions_reply(found, bool(used))
        options = protocol.creation_options_from_json(m["options"])
        response = key.make_credential(options, **common)
        return protocol.registration_reply(response, bool(used))

    # cards --------------------------------------------------------------------------------

    def open_card(self, m: dict) -> dict:
        if self.card is not None:
            raise card_errors.PcscError("The server asked for a second card in one sign-in.")
        stack = ExitStack()
        try:
            self.card = stack.enter_context(self.card_opener(float(m["timeout"]), self.cancel))
        except BaseException:
            stack.close()
            raise
        self._card_stack = stack
        self.held.callback(self._release, "card")
        driver = getattr(self.card, "driver", None)
        return {"reader": getattr(self.card, "reader", None),
                "driver": driver if driver in ("piv", "pkcs11") else None}

    def use_card(self, kind: str, m: dict) -> Any:
        card = self.card
        if card is None:
            raise card_errors.NoCard()
        if kind == "card.certificate":
            return protocol.b64e(card.certificate(m["slot"]))
        if kind == "card.pin_retries":
            retries = card.pin_retries()  # None: the card does not say (PKCS#11)
            return None if retries is None else int(retries)
        if kind == "card.pin":
            self.card_pin = self.card_pin_prompt() or None
            return self.card_pin is not None
        if kind == "card.verify_pin":
            pin, self.card_pin = self.card_pin, None
            if pin is None:
                raise card_errors.PcscError("No PIN was given for the card.")
            card.verify_pin(pin)
            return None
        if kind == "card.sign":
            return protocol.b64e(card.sign(m["slot"], m["message"], algorithm=m["algorithm"]))
        if kind == "card.new_pin":
            from ..ceremonies.cardunlock import ask_new_pin

            self.new_pin, status = ask_new_pin(self.ui)
            return True if status == "ok" else (False if status == "invalid" else None)
        if kind == "card.unblock":
            new_pin, self.new_pin = self.new_pin, None
            if new_pin is None:
                raise card_errors.PcscError("No new PIN was given for the card.")
            card.unblock_pin(m["puk"], new_pin)  # the PUK: used here, never kept or logged
            return None
        if kind in ("card.mgmt_witness", "card.mgmt_proof"):
            step = getattr(card, "management_witness" if kind == "card.mgmt_witness"
                           else "management_proof", None)
            if step is None:
                raise card_errors.PcscError("This card's path has no management key.")
            if kind == "card.mgmt_witness":
                return protocol.b64e(step(m["algorithm"]))
            return protocol.b64e(step(m["algorithm"], m["witness"], m["challenge"]))
        raise card_errors.PcscError("The server asked something this workstation cannot do.")


def relay(channel, first_message: dict, interaction, key_opener: Callable[..., Any],
          card_opener: Callable[..., Any], cancel: threading.Event | None = None, *,
          presence=None, idle_timeout: float = 300.0) -> Relayed:
    """Run one ceremony over ``channel`` (``send(dict)``, ``recv(timeout) -> dict``). Raises
    :class:`ChannelLost` when the channel fails (``engaged`` says whether it may be started
    again elsewhere); a server that breaks the protocol, or its own failure, is a failed
    outcome."""
    session = _Session(channel, interaction, key_opener, card_opener, cancel, presence,
                       idle_timeout)
    try:
        final = session.run(first_message)
    except ProtocolError as e:
        log.warning("the organisation's server broke the ceremony protocol: %s", e.message)
        return Relayed(_lost_outcome("The organisation's server sent an answer this "
                                     "workstation does not understand: nothing was signed "
                                     "in. Ask IT to check the versions."), None, None, {})
    if "error" in final:
        err = final["error"]
        log.info("the organisation's server ended the ceremony: %s: %s", err["type"],
                 err["message"])
        if err["type"] == "internal":
            reason, message = Reason.INTERNAL_ERROR, err["message"]
        elif err["type"] == "protocol":  # this workstation's request: the server's words
            reason = Reason.INTERNAL_ERROR
            message = f"The organisation's server refused the request: {err['message']}"
        else:
            reason, message = Reason.SERVER_LOST, LOST_MESSAGE
        return Relayed(LoginOutcome.failure("login", reason, message), None, None, {})
    result = final["result"]
    outcome = None
    if first_message.get("op") == "login":
        outcome = protocol.outcome_from_json(result)
    return Relayed(outcome, final["offline"], final["ticket"], result)


def _refused_errors() -> tuple[type[BaseException], ...]:
    """The OrgClient's "a server refused" exception (``errors.ServerRefused``)."""
    try:
        from .errors import ServerRefused
    except ImportError:  # before the client's module is there: nothing to catch
        return ()
    return (ServerRefused,)


def refused_outcome(e: WorkstationRefused) -> LoginOutcome:
    """A refused workstation: no login, and no offline one either."""
    return LoginOutcome.failure("login", Reason.SERVER_UNAVAILABLE, e.message,
                                detail={"refused": e.error})


def relay_with_failover(client, first_message: dict, interaction, key_opener, card_opener,
                        cancel: threading.Event | None = None, *, presence=None,
                        idle_timeout: float = 300.0, attempts: int | None = None) -> Relayed:
    """:func:`relay` through ``client.connect(PATH)`` (an ``OrgClient``), started again on
    another replica when the channel fails before the person or a device was asked anything.
    The client's ``ServerUnavailable`` (no replica answers) is raised as it is: the caller's
    offline login, or the refusal :data:`UNAVAILABLE_MESSAGE`."""
    tries = attempts or max(2, len(getattr(client, "servers", None) or ()) + 1)
    last = "no replica was tried"
    refused = _refused_errors()
    for attempt in range(tries):
        try:
            channel = client.connect(PATH)
        except refused as e:
            return Relayed(refused_outcome(WorkstationRefused(
                getattr(e, "error", "refused"), getattr(e, "message", None))), None, None, {})
        try:
            return relay(channel, first_message, interaction, key_opener, card_opener, cancel,
                         presence=presence, idle_timeout=idle_timeout)
        except WorkstationRefused as e:
            return Relayed(refused_outcome(e), None, None, {})
        except ChannelLost as e:
            last = e.why
            if cancel is not None and cancel.is_set():
                return Relayed(LoginOutcome.failure("login", Reason.CANCELLED,
                                                    "cancelled: no answer"), None, None, {})
            server = getattr(channel, "server", "?")
            if e.engaged:
                log.warning("the organisation's server %s was lost mid-ceremony (%s)",
                            server, e.why)
                return Relayed(_lost_outcome(), None, None, {})
            log.info("the organisation's server %s failed before the ceremony began (%s): "
                     "trying again", server, e.why)
        finally:
            try:
                channel.close()
            except Exception:  # noqa: BLE001
                pass
    log.warning("every attempt at the organisation's servers failed (%s)", last)
    return Relayed(_lost_outcome(), None, None, {})


def unavailable_outcome() -> LoginOutcome:
    return LoginOutcome.failure("login", Reason.SERVER_UNAVAILABLE, UNAVAILABLE_MESSAGE)


__all__ = ["ChannelLost", "LOST_MESSAGE", "PATH", "Relayed", "UNAVAILABLE_MESSAGE",
           "WorkstationRefused", "refused_outcome", "relay", "relay_with_failover",
           "unavailable_outcome"]
