"""The server's side of a ceremony: the existing login flow (``ceremonies.login``) and key
enrolment (``ceremonies.key.enrol_key``) run here, on the organisation's store and policy,
while the person and the devices are at the workstation, reached over a channel
(``protocol.py`` says the messages).

    final = run_ceremony(agent, channel, first_message, "ward-3-pc-1", "10.1.2.3")
    channel.send(final)

* :class:`RemoteInteraction`: the ceremonies' ``Interaction``, each prompt an ask;
* :class:`RemoteKey`: what the key ceremonies use of ``drivers.fido.keys.FidoKey``
  (``assert_credentials``, ``make_credential``, ``path``). The workstation runs its own key
  with its own PIN prompt and touch, and its own presence rule (``ceremonies/keypresence``):
  the server's ``pin_provider`` is never asked for a PIN; it is only told that one was used
  (so that a PIN counts as knowledge, a built-in UV as inherence). The key's answers are
  verified here (``webauthn.verify_assertion``, the sign counter in the store);
* :class:`RemoteCardSession`: what ``login_with_card`` uses of ``PivSession``. The PIN is
  asked and verified at the workstation; here it is only a sentinel, never sent. The
  cardholder's self-unlock (op ``card.self-unlock``) is ``remoteunlock.py``'s.

The channel is any object with ``send(message: dict)`` and ``recv(timeout) -> dict``
(raising ``TimeoutError`` at the timeout, anything else when the channel is gone). A
workstation that goes away or stops answering ends the ceremony as cancelled: the ceremony's
usual failure is recorded and nothing of a success is written after it (``on_success``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from drivers.fido import errors as key_errors
from drivers.pcsc import errors as card_errors

from ..outcome import LoginOutcome, Reason
from . import protocol
from .protocol import ProtocolError

if TYPE_CHECKING:
    from ..agent import Agent

log = logging.getLogger("token_agent.organisation")

#: what the server passes where the ceremonies want a PIN: never a PIN, never sent
PIN_AT_WORKSTATION = "\x00pin-at-the-workstation\x00"


@dataclass(frozen=True)
class Timeouts:
    """Seconds the server waits: for the person's answer to a prompt, for a device (its own
    touch timeout, plus the PIN prompt inside it), and for anything else."""

    prompt: float = 120.0
    device: float = 30.0
    other: float = 15.0
    grace: float = 5.0


class WorkstationLost(Exception):
    """The workstation went away, stopped answering, or broke the protocol."""


class Conversation:
    """One ceremony's asks and tells, one at a time (the ceremony runs on one thread)."""

    def __init__(self, channel, *, timeouts: Timeouts | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.channel = channel
        self.timeouts = timeouts or Timeouts()
        self.cancel = cancel or threading.Event()
        self.lost: str | None = None  # why, once the workstation is lost
        self._ids = 0

    def _lose(self, why: str) -> WorkstationLost:
        if self.lost is None:
            self.lost = why
            log.info("ceremony: the workstation is lost (%s)", why)
        self.cancel.set()
        return WorkstationLost(why)

    def tell(self, kind: str, **fields) -> None:
        if self.lost is not None:
            return
        try:
            self.channel.send(protocol.tell(kind, **fields))
        except Exception as e:  # noqa: BLE001 (whatever the channel raises: it is gone)
            self._lose(f"send failed: {type(e).__name__}")

    def ask(self, kind: str, wait: float, /, **fields) -> tuple[Any, dict | None]:
        """``(value, None)`` or ``(None, error JSON)``; WorkstationLost."""
        if self.lost is not None:
            raise WorkstationLost(self.lost)
        self._ids += 1
        ask_id = self._ids
        try:
            self.channel.send(protocol.ask(ask_id, kind, **fields))
        except Exception as e:  # noqa: BLE001
            raise self._lose(f"send failed: {type(e).__name__}") from None
        try:
            message = self.channel.recv(timeout=wait + self.timeouts.grace)
        except TimeoutError:
            raise self._lose(f"no answer to {kind} within {wait + self.timeouts.grace:g} s") \
                from None
        except ProtocolError as e:
            raise self._lose(f"protocol: {e.message}") from None
        except Exception as e:  # noqa: BLE001
            raise self._lose(f"receive failed: {type(e).__name__}") from None
        try:
            return protocol.parse_reply(message, ask_id)
        except ProtocolError as e:
            raise self._lose(f"protocol: {e.message}") from None

    def value(self, kind: str, wait: float, /, *, card: bool = False, **fields) -> Any:
        """The value of an ask to a device; its error raised as the device's own."""
        value, error = self.ask(kind, wait, **fields)
        if error is not None:
            try:
                raise protocol.error_from_json(error, card=card)
            except ProtocolError as e:
                raise self._lose(f"protocol: {e.message}") from None
        return value

    def device_lost(self, card: bool = False) -> Exception:
        message = ("The workstation stopped answering during the sign-in: it was cancelled. "
                   "Try again.")
        return card_errors.PcscError(message) if card else key_errors.Cancelled(message)


class RemoteInteraction:
    """``ceremonies.login.Interaction`` over the channel: a lost workstation is no answer."""

    def __init__(self, conv: Conversation) -> None:
        self.conv = conv

    def info(self, message: str) -> None:
        self.conv.tell("info", message=message)

    def show_qr(self, uri: str) -> None:
        self.conv.tell("qr", uri=uri)

    def _prompt(self, kind: str, **fields) -> str | None:
        try:
            value, error = self.conv.ask(kind, self.conv.timeouts.prompt, **fields)
        except WorkstationLost:
            return None
        if error is not None or (value is not None and not isinstance(value, str)):
            self.conv._lose(f"protocol: a {kind} answer must be text or null")
            return None
        return value

    def secret(self, prompt: str) -> str | None:
        return self._prompt("secret", prompt=prompt)

    def text(self, prompt: str) -> str | None:
        return self._prompt("text", prompt=prompt)

    def choose(self, prompt: str, options: list[tuple[str, str]], default: str) -> str | None:
        value = self._prompt("choose", prompt=prompt, options=[[k, v] for k, v in options],
                             default=default)
        if value is not None and value not in {k for k, _ in options}:
            return None  # not one of the options: no answer
        return value


class AtWorkstation:
    """The ceremonies' ``presence`` (``keypresence.PinGuard``) on the server: who must
    touch the key before its PIN is tried is decided at the workstation, which holds the key
    and its PIN prompt; here the provider is passed through."""

    present = False

    def before_pin(self, key) -> None:
        return None

    def pin_provider(self, key, provider: Callable[[], str | None]) -> Callable[[], str | None]:
        return provider


def _pin_used(pin_provider: Callable[[], str | None] | None) -> None:
    """Tell the ceremony's PIN tracker that the workstation's key verified a PIN (it gets the
    sentinel, which goes nowhere)."""
    if pin_provider is not None:
        pin_provider()


class RemoteKey:
    """A key at the workstation, as the key ceremonies use a ``FidoKey``. A context manager:
    leaving it tells the workstation that the ceremony is done with its key."""

    def __init__(self, conv: Conversation, path: str) -> None:
        self.conv = conv
        self.path = path
        self.closed = False

    @classmethod
    def open(cls, conv: Conversation, *, rp_id: str | None, credential_ids: list[bytes],
             timeout: float) -> "RemoteKey":
        try:
            value = conv.value("key.open", timeout + conv.timeouts.prompt, rp_id=rp_id,
                               credential_ids=[protocol.b64e(c) for c in credential_ids],
                               timeout=timeout)
        except WorkstationLost:
            raise conv.device_lost() from None
        try:
            fields = protocol.check(value, {"path": (str,)}, "key.open reply")
        except ProtocolError as e:
            conv._lose(f"protocol: {e.message}")
            raise conv.device_lost() from None
        return cls(conv, fields["path"][:256])

    def __enter__(self) -> "RemoteKey":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.conv.tell("key.close")

    def _value(self, kind: str, wait: float, /, **fields):
        try:
            return self.conv.value(kind, wait + self.conv.timeouts.prompt, **fields)
        except WorkstationLost:
            raise self.conv.device_lost() from None

    def assert_credentials(self, *, rp_id: str, challenge: bytes, allow=(),
                           user_verification: str | None = "preferred", origin: str,
                           pin_provider=None, on_touch=None, timeout: float = 30.0,
                           cancel=None) -> list:
        value = self._value("key.assert", timeout, rp_id=rp_id,
                            challenge=protocol.b64e(challenge),
                            allow=[protocol.b64e(c) for c in allow],
                            user_verification=user_verification, origin=origin,
                            timeout=timeout)
        return self._parsed(protocol.parse_assertions, value, pin_provider)

    def make_credential(self, options, *, origin: str, pin_provider=None, on_touch=None,
                        timeout: float = 30.0, cancel=None):
        value = self._value("key.make_credential", timeout,
                            options=protocol.creation_options_to_json(options), origin=origin,
                            timeout=timeout)
        return self._parsed(protocol.parse_registration, value, pin_provider)

    def _parsed(self, parse, value, pin_provider):
        """The key's answer parsed (``parse`` -> (response, pin_used)); a malformed one ends
        the ceremony (the workstation is lost) as a communication error of the key."""
        try:
            response, pin_used = parse(value)
        except ProtocolError as e:
            self.conv._lose(f"protocol: {e.message}")
            raise key_errors.KeyCommunicationError(
                "The workstation sent a malformed answer from the key.") from None
        if pin_used:
            _pin_used(pin_provider)
        return response

    def info(self):  # only asked to set a first PIN, which the server never does
        raise key_errors.PinNotSet()

    def set_pin(self, new: str) -> None:
        raise key_errors.UnsupportedKey("A PIN is never set through the organisation's server.")


class RemoteCardSession:
    """A card at the workstation, as ``ceremonies.card.login_with_card`` uses a
    ``PivSession``. The PIN: :meth:`collect_pin` (the ceremony's ``pin_provider``) has the
    workstation ask the person and keep it; :meth:`verify_pin` has it verified there."""

    def __init__(self, conv: Conversation, reader: str | None, driver: str | None = None
                 ) -> None:
        self.conv = conv
        self.reader = reader
        self.driver = driver or "piv"
        self.closed = False

    @classmethod
    def open(cls, conv: Conversation, *, timeout: float) -> "RemoteCardSession":
        try:
            value = conv.value("card.open", timeout + conv.timeouts.grace, card=True,
                               timeout=timeout)
        except WorkstationLost:
            raise conv.device_lost(card=True) from None
        try:
            fields = protocol.check(value, {"reader": (str, None), "driver": (str, None)},
                                    "card.open reply")
            if fields["driver"] not in (None, "piv", "pkcs11"):
                raise ProtocolError("card.open reply: unknown driver")
        except ProtocolError as e:
            conv._lose(f"protocol: {e.message}")
            raise conv.device_lost(card=True) from None
        return cls(conv, fields["reader"], fields["driver"])

    def _value(self, kind: str, wait: float | None = None, /, **fields):
        try:
            return self.conv.value(kind, wait or self.conv.timeouts.other, card=True,
                                   **fields)
        except WorkstationLost:
            raise self.conv.device_lost(card=True) from None

    def certificate(self, slot: str | int = "9a") -> bytes:
        value = self._value("card.certificate", slot=str(slot))
        try:
            return protocol.b64d(value, "certificate")
        except ProtocolError as e:
            self.conv._lose(f"protocol: {e.message}")
            raise self.conv.device_lost(card=True) from None

    def pin_retries(self) -> int | None:
        """The card's PIN tries left; None when the card does not say (a PKCS#11 module
        gives only its token flags until the last try)."""
        value = self._value("card.pin_retries")
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
            self.conv._lose("protocol: card.pin_retries must be a small integer or null")
            raise self.conv.device_lost(card=True)
        return value

    def collect_pin(self) -> str | None:
        """The ceremony's ``pin_provider``: the person types the PIN at the workstation,
        which keeps it for :meth:`verify_pin`; here, the sentinel (None: no PIN given)."""
        try:
            value = self.conv.value("card.pin", self.conv.timeouts.prompt, card=True)
        except (WorkstationLost, card_errors.PcscError):
            return None
        return PIN_AT_WORKSTATION if value is True else None

    def verify_pin(self, pin) -> None:
        if pin != PIN_AT_WORKSTATION:  # a PIN typed here would have to travel: never
            raise ValueError("the card's PIN is verified at the workstation only")
        self._value("card.verify_pin")

    def sign(self, slot: str | int, message: bytes, *, algorithm: str) -> bytes:
        value = self._value("card.sign", slot=str(slot), message=protocol.b64e(message),
                            algorithm=algorithm)
        try:
            return protocol.b64d(value, "signature")
        except ProtocolError as e:
            self.conv._lose(f"protocol: {e.message}")
            raise self.conv.device_lost(card=True) from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.conv.tell("card.close")

    def __enter__(self) -> "RemoteCardSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- the ceremony


def _key_login(agent: "Agent", conv: Conversation):
    from ..ceremonies.devices import make_key_login
    from ..ceremonies.key import KeySettings

    store = agent.store
    timeout = conv.timeouts.device
    asked: dict[str, str | None] = {"user": None}

    def open_key() -> RemoteKey:
        ids: list[bytes] = []
        rp_id = None
        if asked["user"] is not None:
            rp_id = KeySettings.from_store(store).rp_id
            try:
                user = store.get_user(asked["user"])
                ids = [c.credential_id for c in store.list_fido_credentials(user.id)
                       if c.rp_id == rp_id]
            except LookupError:
                ids = []
        return RemoteKey.open(conv, rp_id=rp_id, credential_ids=ids, timeout=timeout)

    runner = make_key_login(store, pin_provider=lambda: PIN_AT_WORKSTATION, on_touch=None,
                            timeout=timeout, cancel=conv.cancel, open_key=open_key,
                            presence=AtWorkstation())

    def run(name: str | None) -> LoginOutcome:
        asked["user"] = name
        return runner(name)

    return run


def _card_login(agent: "Agent", conv: Conversation):
    from ..ceremonies.devices import make_card_login

    holder: dict[str, RemoteCardSession] = {}

    def open_session() -> RemoteCardSession:
        holder["session"] = RemoteCardSession.open(conv, timeout=conv.timeouts.device)
        return holder["session"]

    def pin() -> str | None:
        session = holder.get("session")
        return session.collect_pin() if session is not None else None

    return make_card_login(agent.store, pin_provider=pin, open_session=open_session)


def _bundle(agent: "Agent", outcome: LoginOutcome, workstation: str) -> dict | None:
    """The offline bundle of the user who logged in (``offline.bundle_for``)."""
    try:
        from . import offline
    except ImportError:
        return None
    bundle_for = getattr(offline, "bundle_for", None)
    if bundle_for is None:
        return None
    try:
        user = agent.store.get_user_by_id(outcome.user_id)
        return bundle_for(agent, user, workstation)
    except Exception:  # noqa: BLE001 (the login stands; offline is a bonus)
        log.exception("cannot make the offline bundle")
        return None


def run_ceremony(agent: "Agent", channel, first_message: Any, workstation_name: str,
                 peer_address: str | None, *, timeouts: Timeouts | None = None,
                 cancel: threading.Event | None = None) -> dict:
    """Run the ceremony the workstation's first message asks for; returns the final
    message (the caller sends it). Never raises for the workstation's doing."""
    try:
        req = protocol.parse_request(first_message)
    except ProtocolError as e:
        return protocol.final_error("protocol", e.message)
    conv = Conversation(channel, timeouts=timeouts, cancel=cancel)
    try:
        if req["op"] == "login":
            return _login(agent, conv, req, workstation_name, peer_address)
        if req["op"] == "card.self-unlock":
            from .remoteunlock import card_self_unlock

            return card_self_unlock(agent, conv, req, workstation_name)
        return _enrol_key(agent, conv, req, workstation_name)
    except WorkstationLost as e:
        return protocol.final_error("lost", str(e))
    except Exception:  # noqa: BLE001 (the agent's own failure: logged, said plainly)
        log.exception("the ceremony failed unexpectedly")
        return protocol.final_error("internal", "The sign-in failed on the organisation's "
                                    "server: see its log.")


def workstation_device(name: str, peer: str | None):
    """The device of a login from a joined workstation: managed, named by its certificate,
    at the address the server sees, and joined (the roaming rule: a joined workstation in a
    trusted network is not an unusual device)."""
    from ..ceremonies.login import Device

    return Device("managed", name, peer, joined=True)


def _login(agent: "Agent", conv: Conversation, req: dict, workstation: str,
           peer: str | None) -> dict:
    from ..ceremonies.login import login_or_tap

    device = workstation_device(workstation, peer)

    def on_success(user, method: str) -> None:
        # inside the success's transaction: a workstation gone by now gets nothing, and
        # nothing of the success is written
        if conv.lost is not None or conv.cancel.is_set():
            raise WorkstationLost(conv.lost or "cancelled")

    outcome = login_or_tap(agent, req["user"], primary=req["primary"],
                           key_login=_key_login(agent, conv), card_login=_card_login(agent, conv),
                           interaction=RemoteInteraction(conv), device=device,
                           second=req["second"], cancel=conv.cancel, on_success=on_success,
                           step_up=req["step_up"])
    if conv.lost is not None:
        raise WorkstationLost(conv.lost)
    if not outcome.ok and outcome.reason == Reason.PIN_BLOCKED and outcome.user is not None:
        from .remoteunlock import self_unlock_available

        if self_unlock_available(agent):
            # the workstation may offer "Forgot your card PIN?" (``card.self-unlock``)
            outcome = dataclasses.replace(outcome,
                                          detail={**outcome.detail, "self_unlock": True})
    offline = _bundle(agent, outcome, workstation) if outcome.ok and req["want_offline"] \
        else None
    ticket = protocol.make_ticket(agent.keys, outcome, workstation, agent.now())
    return protocol.final_result(outcome.to_json(), offline=offline, ticket=ticket)


def _enrol_key(agent: "Agent", conv: Conversation, req: dict, workstation: str) -> dict:
    from .. import admin_ops
    from ..ceremonies.key import EnrolError, device_failure, enrol_key
    from ..reauth import Authenticated, ReauthRequired, check
    from ..store import CredentialExists, UnknownUser

    store = agent.store
    username = req["user"]

    def refused(reason: str, message: str, *, record: bool = True) -> dict:
        if record:
            try:
                admin_ops.enrol_failed(store, username, "key", reason, "organisation")
            except Exception as e:  # noqa: BLE001
                log.error("cannot record the failed enrolment: %s", e)
        return protocol.final_result({"ok": False, "method": "key", "reason": reason,
                                      "message": message})

    try:
        user = store.get_user(username)
    except UnknownUser:
        return refused("unknown-user", f"no user {username!r}", record=False)
    claims = protocol.ticket_claims(agent.keys, req["ticket"] or "", workstation)
    auth = None
    if claims is not None and claims["u"] == user.id:
        auth = Authenticated(claims["n"], claims["u"], claims["m"], claims["h"], claims["t"])
    try:
        check(agent, user, auth, now=agent.now(), where="at this workstation",
              hint=f"log in as {user.username} at this workstation first, then try again")
    except ReauthRequired as e:
        store.record_event("service.refused", user_id=user.id, outcome="refused",
                           detail={"op": "enrol.key", "workstation": workstation,
                                   "reauth": e.why})
        return protocol.final_result({"ok": False, "method": "key", "reason": "reauth-required",
                                      "message": e.message})
    timeout = conv.timeouts.device
    try:
        with RemoteKey.open(conv, rp_id=None, credential_ids=[], timeout=timeout) as key:
            result = enrol_key(store, key, user.username, name=req["name"],
                               pin_provider=lambda: PIN_AT_WORKSTATION, timeout=timeout,
                               cancel=conv.cancel, presence=AtWorkstation())
    except EnrolError as e:
        return refused(e.reason, e.message, record=not e.recorded)
    except CredentialExists as e:
        return refused("conflict", str(e))
    except key_errors.FidoKeyError as e:
        if conv.lost is not None:
            raise WorkstationLost(conv.lost) from None
        return refused(device_failure(e).value, e.message)
    return protocol.final_result({"ok": True, "method": "key", "reason": None,
                                  "message": "enrolled", **result.to_json()})


__all__ = ["AtWorkstation", "Conversation", "PIN_AT_WORKSTATION", "RemoteCardSession",
           "RemoteInteraction", "RemoteKey", "Timeouts", "WorkstationLost", "run_ceremony"]
