"""The ceremony channel's messages (``WebSocket /v1/ceremony``), shared by the server
(``remote.py``) and the workstation (``relay.py``). No ASGI, no I/O: shapes, checks and
conversions only.

A ceremony, as JSON text messages:

1. the workstation opens it with one of
   ``{"op": "login", "user": str|null, "primary": str|null, "second": str|null,
   "step_up": bool, "want_offline": bool}`` or
   ``{"op": "enrol.key", "user": str, "name": str|null, "ticket": str}``
   (``ticket``: what the server gave with the user's recent login, :func:`ticket_claims`) or
   ``{"op": "card.self-unlock", "user": str|null}`` (the cardholder's own unlock of the locked
   card in the workstation's reader, ``ceremonies.cardunlock``; its result is a
   ``CardActionOutcome.to_json()``);
2. the server runs the existing ceremony and reaches the person and the devices through the
   workstation: an *ask* ``{"id": n, "ask": KIND, ...}`` wants exactly one *reply*
   ``{"id": n, "value": ...}`` or ``{"id": n, "error": {"type", "message", ...}}``;
   a *tell* ``{"tell": "info"|"qr"|"key.close"|"card.close", ...}`` wants none;
3. the server ends it with ``{"result": {...}, "offline": bundle|null, "ticket": str|null}``
   (a login: ``LoginOutcome.to_json()``; an enrolment: its result) or
   ``{"error": {"type": "protocol"|"refused"|"internal", "message": ...}}``.

Bytes travel as base64url without padding. A PIN never travels: the workstation asks for it
and uses it on its own device (:data:`ASKS` has no field that could carry one; the card's
``verify_pin`` is sent without its argument). A card's new PIN (self-unlock) is asked and kept
at the workstation too (``card.new_pin``); what travels is the RA's PUK, from the server to
the workstation only, in the ``card.unblock`` ask (inside the mutually authenticated TLS
channel): the workstation uses it on the card at once and forgets it, and neither side logs,
audits or shows it. The card's management key never leaves the server: the mutual
authentication runs as two asks (``card.mgmt_witness``, ``card.mgmt_proof``), the server
decrypting the witness and checking the card's proof itself.

Device errors travel by class name from a fixed registry (:data:`DEVICE_ERRORS`, the classes
of ``drivers.fido.errors``, ``drivers.pcsc.errors`` and the ceremonies' own subclasses), with
their message and their fields; a name not in it becomes the generic ``FidoKeyError`` /
``PcscError`` with the message it came with. Nothing is imported or evaluated by name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from typing import Any

from drivers.fido import errors as key_errors
from drivers.fido.keys import Assertion
from drivers.pcsc import errors as card_errors

from ..outcome import LoginOutcome

#: the largest message either side accepts (a certificate chain, an attestation, a bundle)
MAX_MESSAGE_BYTES = 1 << 20


class ProtocolError(Exception):
    """A message that is not what the protocol allows: the ceremony ends (the message says
    what was wrong, never the values)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --------------------------------------------------------------------------- bytes


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode("ascii")


def b64d(text: Any, what: str = "value") -> bytes:
    if not isinstance(text, str) or len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{what} must be a base64url string")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what} is not valid base64url") from None


# --------------------------------------------------------------------------- JSON


def encode(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def decode(text: str | bytes) -> dict:
    """One message: a JSON object, or ProtocolError."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_MESSAGE_BYTES:
            raise ProtocolError("the message is too large")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("the message is not UTF-8 text") from None
    if not isinstance(text, str):
        raise ProtocolError("the message is not text")
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError("the message is too large")
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("the message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("the message is not a JSON object")
    return message


_NONE = type(None)


def check(message: Any, spec: dict[str, tuple], what: str) -> dict:
    """``message``'s fields checked against ``spec`` (name -> allowed types; ``None`` in the
    tuple: may be null or absent). Unknown, missing or wrongly typed fields are a
    ProtocolError naming the field (never its value). bool is never an int here."""
    if not isinstance(message, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    unknown = sorted(set(message) - set(spec))
    if unknown:
        raise ProtocolError(f"{what}: unknown field(s) {', '.join(map(str, unknown))[:200]}")
    out = {}
    for name, types in spec.items():
        value = message.get(name)
        if value is None:
            if None not in types:
                raise ProtocolError(f"{what}: missing field {name!r}")
            out[name] = None
            continue
        real = tuple(t for t in types if t is not None)
        if isinstance(value, bool) and bool not in real:
            raise ProtocolError(f"{what}: field {name!r} has the wrong type")
        if not isinstance(value, real):
            raise ProtocolError(f"{what}: field {name!r} has the wrong type")
        out[name] = value
    return out


# --------------------------------------------------------------------------- the first message

OPS = ("login", "enrol.key", "card.self-unlock")


def login_request(*, user: str | None, primary: str | None = None, second: str | None = None,
                  step_up: bool = False, want_offline: bool = False) -> dict:
    return {"op": "login", "user": user, "primary": primary, "second": second,
            "step_up": bool(step_up), "want_offline": bool(want_offline)}


def enrol_key_request(*, user: str, name: str | None, ticket: str | None) -> dict:
    return {"op": "enrol.key", "user": user, "name": name, "ticket": ticket}


def card_self_unlock_request(*, user: str | None) -> dict:
    return {"op": "card.self-unlock", "user": user}


def parse_request(message: Any) -> dict:
    """The workstation's first message, checked (ProtocolError)."""
    from ..usernames import is_username

    if not isinstance(message, dict):
        raise ProtocolError("the first message must be a JSON object")
    op = message.get("op")
    if op == "login":
        req = check(message, {"op": (str,), "user": (str, None), "primary": (str, None),
                              "second": (str, None), "step_up": (bool, None),
                              "want_offline": (bool, None)}, "login")
        req["step_up"] = bool(req["step_up"])
        req["want_offline"] = bool(req["want_offline"])
    elif op == "enrol.key":
        req = check(message, {"op": (str,), "user": (str,), "name": (str, None),
                              "ticket": (str, None)}, "enrol.key")
        if req["name"] is not None and not (0 < len(req["name"]) <= 64):
            raise ProtocolError("enrol.key: field 'name' must be 1 to 64 characters")
    elif op == "card.self-unlock":
        req = check(message, {"op": (str,), "user": (str, None)}, "card.self-unlock")
    else:
        raise ProtocolError(f"unknown op: the first message's op must be one of "
                            f"{', '.join(OPS)}")
    if req["user"] is not None and not is_username(req["user"]):
        raise ProtocolError(f"{op}: field 'user' is not a user name")
    return req


# --------------------------------------------------------------------------- asks and tells

#: ask kind -> its fields (besides "id" and "ask"), as :func:`check` takes them
ASKS: dict[str, dict[str, tuple]] = {
    "secret": {"prompt": (str,)},
    "text": {"prompt": (str,)},
    "choose": {"prompt": (str,), "options": (list,), "default": (str, None)},
    "key.open": {"rp_id": (str, None), "credential_ids": (list,), "timeout": (int, float)},
    "key.assert": {"rp_id": (str,), "challenge": (str,), "allow": (list,),
                   "user_verification": (str, None), "origin": (str,),
                   "timeout": (int, float)},
    "key.make_credential": {"options": (dict,), "origin": (str,), "timeout": (int, float)},
    "card.open": {"timeout": (int, float)},
    "card.certificate": {"slot": (str,)},
    "card.pin_retries": {},
    "card.pin": {},  # ask the person for the card's PIN, kept at the workstation
    "card.verify_pin": {},  # VERIFY with the PIN kept (then forgotten)
    "card.sign": {"slot": (str,), "message": (str,), "algorithm": (str,)},
    # self-unlock: the new PIN asked (twice) and kept at the workstation; reply true (kept),
    # false (no valid PIN given twice) or null (no answer)
    "card.new_pin": {},
    # RESET RETRY COUNTER with the RA's PUK and the new PIN kept (then both forgotten)
    "card.unblock": {"puk": (str,)},
    # the management key's mutual authentication, in two steps (the key stays at the server)
    "card.mgmt_witness": {"algorithm": (str,)},
    "card.mgmt_proof": {"algorithm": (str,), "witness": (str,), "challenge": (str,)},
}
#: the management key algorithms and their block size (the witness and challenge's length)
MGMT_BLOCK = {"AES128": 16, "3DES": 8}
PUK_RE = re.compile(r"[0-9]{6,8}")
TELLS: dict[str, dict[str, tuple]] = {
    "info": {"message": (str,)},
    "qr": {"uri": (str,)},
    "key.close": {},
    "card.close": {},
}


def ask(ask_id: int, kind: str, **fields) -> dict:
    assert kind in ASKS, kind
    return {"id": ask_id, "ask": kind, **fields}


def tell(kind: str, **fields) -> dict:
    assert kind in TELLS, kind
    return {"tell": kind, **fields}


def parse_server_message(message: Any) -> tuple[str, dict]:
    """What the server sent, checked: ``("ask", msg)``, ``("tell", msg)`` or
    ``("final", msg)`` (ProtocolError for anything else)."""
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    if "ask" in message:
        kind = message.get("ask")
        if not isinstance(kind, str) or kind not in ASKS:
            raise ProtocolError("unknown ask")
        fields = check(message, {"id": (int,), "ask": (str,), **ASKS[kind]}, f"ask {kind}")
        if kind == "choose":
            options = fields["options"]
            if not all(isinstance(o, list) and len(o) == 2
                       and all(isinstance(x, str) for x in o) for o in options):
                raise ProtocolError("ask choose: options must be [key, label] pairs")
        if kind in ("key.open", "key.assert"):
            name = "credential_ids" if kind == "key.open" else "allow"
            fields[name] = [b64d(c, name) for c in fields[name]]
        for name in ("challenge", "message"):
            if name in fields and kind in ("key.assert", "card.sign"):
                fields[name] = b64d(fields[name], name)
        if "timeout" in fields and not 0 < fields["timeout"] <= 600:
            raise ProtocolError(f"ask {kind}: timeout out of range")
        if kind == "card.unblock" and PUK_RE.fullmatch(fields["puk"]) is None:
            raise ProtocolError("ask card.unblock: field 'puk' must be 6 to 8 digits")
        if kind in ("card.mgmt_witness", "card.mgmt_proof"):
            block = MGMT_BLOCK.get(fields["algorithm"])
            if block is None:
                raise ProtocolError(f"ask {kind}: unknown management key algorithm")
            for name in ("witness", "challenge"):
                if name in fields:
                    fields[name] = b64d(fields[name], name)
                    if len(fields[name]) != block:
                        raise ProtocolError(f"ask {kind}: field {name!r} has the wrong length")
        return "ask", fields
    if "tell" in message:
        kind = message.get("tell")
        if not isinstance(kind, str) or kind not in TELLS:
            raise ProtocolError("unknown tell")
        return "tell", check(message, {"tell": (str,), **TELLS[kind]}, f"tell {kind}")
    if "result" in message:
        final = check(message, {"result": (dict,), "offline": (dict, None),
                                "ticket": (str, None)}, "result")
        return "final", final
    if "error" in message:
        final = check(message, {"error": (dict,)}, "error")
        err = check(final["error"], {"type": (str,), "message": (str,)}, "error")
        return "final", {"error": err}
    raise ProtocolError("the message is neither an ask, a tell nor a result")


def reply(ask_id: int, value: Any = None) -> dict:
    return {"id": ask_id, "value": value}


def error_reply(ask_id: int, error: BaseException) -> dict:
    return {"id": ask_id, "error": error_to_json(error)}


def parse_reply(message: Any, expected_id: int) -> tuple[Any, dict | None]:
    """A workstation's reply to ask ``expected_id``: ``(value, None)`` or ``(None, error)``
    (the error's JSON, for :func:`error_from_json`)."""
    fields = check(message, {"id": (int,), "value": (str, int, float, bool, list, dict, None),
                             "error": (dict, None)}, "reply")
    if fields["id"] != expected_id:
        raise ProtocolError("a reply to an ask that is not waiting")
    if fields["error"] is not None:
        if fields["value"] is not None:
            raise ProtocolError("a reply with both a value and an error")
        return None, fields["error"]
    return fields["value"], None


def final_result(result: dict, *, offline: dict | None = None,
                 ticket: str | None = None) -> dict:
    return {"result": result, "offline": offline, "ticket": ticket}


def final_error(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


# --------------------------------------------------------------------------- device errors

def _registry(module, base, extra=()) -> dict[str, type[Exception]]:
    classes = [base, *extra] + [getattr(module, n) for n in module.__all__
                                if isinstance(getattr(module, n), type)]
    return {c.__name__: c for c in classes if issubclass(c, base)}


def _key_extras():
    from ..ceremonies.keyfinding import KeyNotPermitted, KeyNotThere
    from ..ceremonies.keypresence import PresenceRequired

    return (PresenceRequired, KeyNotPermitted, KeyNotThere)


#: class name -> class: the only device errors that travel as themselves, one registry per
#: device (both drivers have a WrongPin and a PinBlocked); the ask says which one applies
KEY_ERRORS: dict[str, type[Exception]] = _registry(key_errors, key_errors.FidoKeyError,
                                                   _key_extras())
CARD_ERRORS: dict[str, type[Exception]] = _registry(card_errors, card_errors.PcscError)
DEVICE_ERRORS = {"key": KEY_ERRORS, "card": CARD_ERRORS}
#: the fields a device error carries besides its message, and their types
_ERROR_FIELDS = {"ctap_code": int, "sw": int, "scard_code": int, "retries_left": int,
                 "seconds": (int, float), "min_length": int}


def error_to_json(error: BaseException) -> dict:
    """A device error as it travels: its class name (the nearest registered one), message
    and fields; anything else as a generic device error with its message."""
    registry = CARD_ERRORS if isinstance(error, card_errors.PcscError) else KEY_ERRORS
    name = next((c.__name__ for c in type(error).__mro__ if registry.get(c.__name__) is c),
                None)
    if name is None:
        return {"type": "FidoKeyError", "message": "The security key operation failed on the "
                "workstation. Remove the key, insert it again, and retry."}
    data: dict[str, Any] = {"type": name, "message": str(getattr(error, "message", error))}
    for field in _ERROR_FIELDS:
        value = getattr(error, field, None)
        if value is not None:
            data[field] = value
    return data


def error_from_json(data: Any, *, card: bool = False) -> Exception:
    """The device error a reply carried, as the same class (the generic one of the device
    for an unknown name) with the same message and fields. ProtocolError when malformed."""
    spec: dict[str, tuple] = {"type": (str,), "message": (str,)}
    spec.update({k: (v if isinstance(v, tuple) else (v,)) + (None,)
                 for k, v in _ERROR_FIELDS.items()})
    fields = check(data, spec, "error")
    base = card_errors.PcscError if card else key_errors.FidoKeyError
    cls = (CARD_ERRORS if card else KEY_ERRORS).get(fields["type"], base)
    error = cls.__new__(cls)
    Exception.__init__(error, fields["message"][:2000])
    error.message = fields["message"][:2000]
    for name in ("ctap_code",) if not card else ("sw", "scard_code"):
        setattr(error, name, fields[name])
    for name in ("retries_left", "seconds", "min_length"):
        if fields[name] is not None or any(issubclass(cls, c) for c in _CARRIES.get(name, ())):
            setattr(error, name, fields[name])
    return error


#: field -> the classes whose instances always have it (their ``to_json`` reads it)
_CARRIES = {"retries_left": (key_errors.WrongPin, card_errors.WrongPin, card_errors.WrongPuk),
            "seconds": (key_errors.TouchTimeout,),
            "min_length": (key_errors.PinPolicyViolation,)}


# --------------------------------------------------------------------------- key responses


def assertion_to_json(a: Assertion) -> dict:
    return {"credential_id": b64e(a.credential_id), "client_data_json": b64e(a.client_data_json),
            "authenticator_data": b64e(a.authenticator_data), "signature": b64e(a.signature),
            "user_handle": None if a.user_handle is None else b64e(a.user_handle)}


def assertion_from_json(data: Any) -> Assertion:
    f = check(data, {"credential_id": (str,), "client_data_json": (str,),
                     "authenticator_data": (str,), "signature": (str,),
                     "user_handle": (str, None)}, "assertion")
    return Assertion(credential_id=b64d(f["credential_id"], "credential_id"),
                     client_data_json=b64d(f["client_data_json"], "client_data_json"),
                     authenticator_data=b64d(f["authenticator_data"], "authenticator_data"),
                     signature=b64d(f["signature"], "signature"),
                     user_handle=None if f["user_handle"] is None
                     else b64d(f["user_handle"], "user_handle"))


def assertions_reply(assertions, pin_used: bool) -> dict:
    return {"assertions": [assertion_to_json(a) for a in assertions], "pin_used": bool(pin_used)}


def parse_assertions(value: Any) -> tuple[list[Assertion], bool]:
    f = check(value, {"assertions": (list,), "pin_used": (bool,)}, "key.assert reply")
    if not f["assertions"] or len(f["assertions"]) > 64:
        raise ProtocolError("key.assert reply: 1 to 64 assertions")
    return [assertion_from_json(a) for a in f["assertions"]], f["pin_used"]


def registration_reply(response, pin_used: bool) -> dict:
    """A python-fido2 RegistrationResponse (already base64url as ``dict(response)``)."""
    return {"registration": dict(response), "pin_used": bool(pin_used)}


def parse_registration(value: Any):
    """The RegistrationResponse a ``key.make_credential`` reply carried."""
    from fido2.webauthn import RegistrationResponse

    f = check(value, {"registration": (dict,), "pin_used": (bool,)},
              "key.make_credential reply")
    try:
        return RegistrationResponse.from_dict(f["registration"]), f["pin_used"]
    except Exception:  # noqa: BLE001 (python-fido2 raises several kinds for bad input)
        raise ProtocolError("key.make_credential reply: not a WebAuthn registration") from None


def creation_options_to_json(options) -> dict:
    return dict(options)


def creation_options_from_json(data: dict):
    from fido2.webauthn import PublicKeyCredentialCreationOptions

    try:
        return PublicKeyCredentialCreationOptions.from_dict(data)
    except Exception:  # noqa: BLE001
        raise ProtocolError("ask key.make_credential: not WebAuthn creation options") from None


# --------------------------------------------------------------------------- outcomes


def outcome_from_json(data: Any) -> LoginOutcome:
    """``LoginOutcome.from_json``, with ProtocolError for anything malformed."""
    try:
        return LoginOutcome.from_json(data)
    except (TypeError, ValueError, KeyError) as e:
        raise ProtocolError(f"result: not a login outcome ({e})") from None


# --------------------------------------------------------------------------- re-auth tickets
# A successful login's final message carries a ticket: who logged in, how strongly, when, and
# at which workstation, MACed with a key derived from the organisation's secret keys (every
# replica has the same). The workstation sends it back with enrol.key; the server checks it
# and the re-authentication rule (``token_agent/reauth.py``) with its own policy and clock.

TICKET_VERSION = "t1"


def _ticket_key(keys) -> bytes:
    return keys.code_hash("ceremony-ticket", "v1")


def make_ticket(keys, outcome: LoginOutcome, workstation: str, now: float) -> str | None:
    if not outcome.ok or outcome.user_id is None:
        return None
    claims = {"u": outcome.user_id, "n": outcome.user, "m": outcome.multi_factor,
              "h": outcome.method, "w": workstation, "t": now}
    body = b64e(json.dumps(claims, separators=(",", ":")).encode())
    mac = hmac.new(_ticket_key(keys), body.encode(), hashlib.sha256).digest()
    return f"{TICKET_VERSION}.{body}.{b64e(mac)}"


def ticket_claims(keys, ticket: str, workstation: str) -> dict | None:
    """The claims of a ticket this organisation made for ``workstation``; None when it is
    forged, damaged, or another workstation's."""
    from ..secretbox import equal

    parts = ticket.split(".") if isinstance(ticket, str) and len(ticket) < 4096 else []
    if len(parts) != 3 or parts[0] != TICKET_VERSION:
        return None
    mac = hmac.new(_ticket_key(keys), parts[1].encode(), hashlib.sha256).digest()
    try:
        if not equal(b64e(mac), parts[2]):
            return None
        claims = json.loads(b64d(parts[1]))
        claims = check(claims, {"u": (str,), "n": (str,), "m": (bool,), "h": (str,),
                                "w": (str,), "t": (int, float)}, "ticket")
    except (ProtocolError, ValueError):
        return None
    if claims["w"] != workstation:
        return None
    return claims


def now() -> float:
    return time.time()


__all__ = [
    "ASKS", "CARD_ERRORS", "DEVICE_ERRORS", "KEY_ERRORS", "ProtocolError", "TELLS", "ask",
    "card_self_unlock_request",
    "assertion_from_json", "assertion_to_json", "b64d", "b64e", "check", "decode", "encode",
    "error_from_json", "error_reply", "error_to_json", "final_error", "final_result",
    "login_request", "enrol_key_request", "make_ticket", "outcome_from_json",
    "parse_assertions", "parse_registration", "parse_reply", "parse_request",
    "parse_server_message", "registration_reply", "reply", "tell", "ticket_claims",
]
