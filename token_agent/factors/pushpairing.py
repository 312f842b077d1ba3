"""A phone's browser as the push companion: pairing codes and signed requests.

The companion page (``/companion``, served by the organisation's server) makes its own
Ed25519 key pair with WebCrypto, *non-extractable*, kept in the browser's IndexedDB: the
private key never leaves the phone, and the server stores only the public key, as for every
companion (``push.add_device``). Everything after the pairing is authenticated by that key's
signatures, never by the account's session cookie.

Pairing
    Signed in (and recently re-authenticated), the user asks for a pairing code
    (``start``): ``CODE_LENGTH`` random characters of Crockford's base-32 alphabet (50 bits),
    valid ``CODE_TTL`` seconds, used once, stored only as a keyed hash (``SecretKeys.code_hash``)
    with its owner and the name the companion will get; asking again ends the earlier code.
    The account page shows it as a QR code and a link ``/companion/pair#CODE`` (a fragment:
    the code never reaches the server's logs or a ``Referer``) and as text to type. The phone
    sends its public key with the code (``redeem``): the code is used (one conditional
    UPDATE, so once whatever the number of replicas) and the key stored as an unconfirmed
    push method *in the same transaction*, and the phone gets its device id and a pairing
    challenge (``push.pairing_challenge``). It signs the challenge with its private key and
    ``push.confirm_enrol`` confirms the method: the same proof of possession as a companion
    file's.

Signed requests
    The phone reads its pending sign-ins (``/companion/events``) with headers naming its
    device, a time (milliseconds since the epoch) and a random nonce, and its signature over
    ``request_bytes(http_method, path, device_id, time, nonce)``. ``check_request`` accepts
    it when the device is enrolled, confirmed and not flagged, the time is within
    ``REQUEST_WINDOW`` seconds of the server's, the signature verifies with the device's key,
    and the nonce was not used before by that device (kept in the store until the window
    closes, so a captured request cannot be replayed, on any replica). The signature is
    checked before the nonce is stored: unsigned requests write nothing.

Answers are signed over ``push.answer_bytes`` and checked by ``push.submit`` as ever.

Audit events: ``push.pairing`` (``issued`` by ``start``; ``refused`` codes at ``redeem``),
then ``enrol.push`` (pending at ``redeem``, success or failure at ``confirm_enrol``);
``push.request`` refused signed requests (not the accepted ones: one per poll would flood
the log). The code, the keys and the signatures are never recorded.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..outcome import Reason
from ..store import KIND_PUSH, MAX_NAME_LEN, InvalidValue, Method
from . import FactorContext, FactorError, push

#: Crockford's base 32: no I, L, O or U (read as 1, 1, 0 and refused)
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 10
CODE_TTL = 600
#: how far a signed request's time may be from the server's (seconds)
REQUEST_WINDOW = 60
REQUEST_PREFIX = b"token-agent companion request v1\0"
DEFAULT_NAME = "phone"
#: a companion's name (room left for " 2", " 3"... when the user has one of that name)
MAX_NAME = MAX_NAME_LEN - 4
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_PATH_RE = re.compile(r"/[A-Za-z0-9/_.-]{0,200}")
_PURPOSE = "push-pairing-code"

MSG_BAD_CODE = ("This pairing code is not valid: it may be mistyped, used already or expired. "
                "On your computer, open Push approval in your account and start pairing again.")


@dataclass(frozen=True)
class Pairing:
    """A pairing code as the account page shows it, once."""

    code: str  # e.g. "7K3QD-MX2PA": show it, never store or log it
    expires_at: float
    name: str

    def __repr__(self) -> str:
        return f"Pairing(code=<hidden>, expires_at={self.expires_at!r}, name={self.name!r})"


@dataclass(frozen=True)
class Redeemed:
    """What the phone gets for a good pairing code: its device id and the challenge to sign."""

    device_id: str
    method: Method
    challenge: bytes


@dataclass(frozen=True)
class CompanionDevice:
    """The enrolled companion a signed request came from."""

    device_id: str
    method: Method

    @property
    def user_id(self) -> str:
        return self.method.user_id


def normalise_code(text: str) -> str:
    """The code as stored: capitals, without spaces and hyphens, O read as 0 and I, L as 1.
    ``ValueError`` if it cannot be a pairing code."""
    if not isinstance(text, str) or len(text) > 40:
        raise ValueError("not a pairing code")
    code = re.sub(r"[\s-]", "", text).upper().translate(str.maketrans("OIL", "011"))
    if len(code) != CODE_LENGTH or any(c not in ALPHABET for c in code):
        raise ValueError("not a pairing code")
    return code


def display_code(code: str) -> str:
    """The code in two groups of five, as shown and put in the link."""
    return f"{code[:5]}-{code[5:]}"


def _hash(ctx: FactorContext, code: str) -> bytes:
    return ctx.keys.code_hash(_PURPOSE, code)


def _free_name(ctx: FactorContext, user_id: str, name: str) -> str:
    """``name``, or ``name 2``, ``name 3``... if the user has a companion of that name."""
    taken = {m.name.lower() for m in ctx.store.list_methods(user_id, KIND_PUSH)}
    candidate, n = name, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{name} {n}"
    return candidate


def start(ctx: FactorContext, user_id: str, *, name: str = DEFAULT_NAME,
          ttl: float = CODE_TTL) -> Pairing:
    """A new pairing code for the user (their earlier unused code ends). The caller has
    checked that the user signed in recently."""
    store = ctx.store
    user = store.get_user_by_id(user_id)
    if (not isinstance(name, str) or not name.strip() or not name.isprintable()
            or len(name.strip()) > MAX_NAME):
        raise InvalidValue(f"a companion's name is 1 to {MAX_NAME} printable characters")
    name = name.strip()
    code = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
    now = ctx.now()
    expires_at = now + float(ttl)
    with store.transaction():
        store.add_push_pairing(_hash(ctx, code), user.id, name=name, created_at=now,
                               expires_at=expires_at)
        store.record_event("push.pairing", user_id=user.id, outcome="issued",
                           detail={"name": name, "expires_at": expires_at})
    return Pairing(display_code(code), expires_at, name)


def pending(ctx: FactorContext, user_id: str) -> dict | None:
    """The user's unused pairing code's ``created_at``, ``expires_at`` and ``name`` (never
    the code), or None."""
    return ctx.store.pending_push_pairing(user_id, ctx.now())


def redeem(ctx: FactorContext, code: str, public_key: bytes) -> Redeemed:
    """The phone's side of pairing: use ``code`` and store ``public_key`` (raw Ed25519, 32
    bytes) as an unconfirmed push method of the code's owner. ``FactorError``
    (verification-failed, ``MSG_BAD_CODE``) for an unknown, used or expired code, and the
    code stays unused when the key is refused."""
    store = ctx.store
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key))
    except (ValueError, TypeError):
        raise FactorError(Reason.VERIFICATION_FAILED, "the phone's public key is not an "
                          "Ed25519 key: this browser cannot be paired") from None
    try:
        normal = normalise_code(code)
    except ValueError:
        store.record_event("push.pairing", outcome="refused", detail={"why": "malformed"})
        raise FactorError(Reason.VERIFICATION_FAILED, MSG_BAD_CODE) from None
    now = ctx.now()
    device_id = push.new_device_id()
    with store.transaction():
        claimed, why = store.claim_push_pairing(_hash(ctx, normal), now)
        if claimed is not None:
            user_id = claimed["user_id"]
            method = push.add_device(ctx, user_id, device_id, bytes(public_key),
                                     name=_free_name(ctx, user_id, claimed["name"]),
                                     via="pairing code")
    if claimed is None:
        store.record_event("push.pairing", outcome="refused", detail={"why": why})
        raise FactorError(Reason.VERIFICATION_FAILED, MSG_BAD_CODE)
    return Redeemed(device_id, method, push.pairing_challenge(ctx, method))


def _device(ctx: FactorContext, device_id: str) -> tuple[Method, bytes] | None:
    try:
        device_id = str(uuid.UUID(str(device_id)))
    except ValueError:
        return None
    row = ctx.store.push_device_by_id(device_id)
    if row is None:
        return None
    try:
        method = ctx.store.get_method(row["method_id"])
    except LookupError:
        return None
    return method, bytes(row["public_key"])


def confirm(ctx: FactorContext, device_id: str, challenge: bytes, signature: bytes) -> Method:
    """The phone's signed pairing challenge: ``push.confirm_enrol`` for the method of
    ``device_id``."""
    found = _device(ctx, device_id)
    if found is None:
        raise FactorError(Reason.UNKNOWN_CREDENTIAL, "this phone is not being paired: start "
                          "pairing again from your account")
    method, _ = found
    return push.confirm_enrol(ctx, method.user_id, method, challenge, signature)


def request_bytes(http_method: str, path: str, device_id: str, timestamp: int,
                  nonce: str) -> bytes:
    """The canonical bytes a companion signs for a request."""
    return REQUEST_PREFIX + b"\0".join(
        str(part).encode() for part in (http_method.upper(), path, device_id, int(timestamp),
                                        nonce))


def check_request(ctx: FactorContext, *, http_method: str, path: str, device_id: str,
                  timestamp: str, nonce: str, signature: bytes) -> CompanionDevice:
    """The companion a signed request came from (see the module's text);
    ``FactorError`` (verification-failed, unknown-credential, not-confirmed,
    credential-flagged) otherwise, recorded as ``push.request`` once the device is known."""
    store = ctx.store
    bad = FactorError(Reason.VERIFICATION_FAILED, "this request is not signed by a paired "
                      "phone: pair this phone again from your account")
    if not (isinstance(timestamp, str) and timestamp.isdigit() and len(timestamp) <= 16
            and isinstance(nonce, str) and _NONCE_RE.fullmatch(nonce)
            and isinstance(path, str) and _PATH_RE.fullmatch(path)
            and isinstance(http_method, str) and http_method.isalpha()):
        raise bad
    found = _device(ctx, device_id)
    if found is None:
        raise FactorError(Reason.UNKNOWN_CREDENTIAL, "this phone is not paired (it may have "
                          "been removed): pair it again from your account")
    method, public = found
    device_id = str(uuid.UUID(device_id))

    def refuse(reason: Reason, message: str) -> FactorError:
        store.record_event("push.request", user_id=method.user_id, outcome="refused",
                           detail={"device_id": device_id, "reason": reason.value, "why": message})
        return FactorError(reason, message)

    try:
        Ed25519PublicKey.from_public_bytes(public).verify(
            bytes(signature), request_bytes(http_method, path, device_id, int(timestamp), nonce))
    except (InvalidSignature, ValueError, TypeError):
        raise refuse(Reason.VERIFICATION_FAILED, "the request's signature does not verify") from None
    now = ctx.now()
    if abs(int(timestamp) / 1000 - now) > REQUEST_WINDOW:
        raise refuse(Reason.VERIFICATION_FAILED, "the request's time is more than "
                     f"{REQUEST_WINDOW} seconds from the server's: check the phone's clock")
    if not method.confirmed:
        raise refuse(Reason.NOT_CONFIRMED, "this phone's pairing was not finished: pair it again")
    if method.flagged:
        raise refuse(Reason.CREDENTIAL_FLAGGED, f"companion app {method.name!r} is flagged "
                     f"({method.flag_reason or 'no reason given'}): ask IT")
    if not store.use_push_nonce(device_id, nonce, expires_at=now + 2 * REQUEST_WINDOW, now=now):
        raise refuse(Reason.VERIFICATION_FAILED, "this signed request was used before (a replay)")
    return CompanionDevice(device_id, method)

