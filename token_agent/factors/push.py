"""Push approval with number matching (like Microsoft Authenticator's).

The login screen shows a two-digit number; the user's companion must type that number to
approve. The companion is the user's phone: the page ``/companion`` of the organisation's
server (``token_agent/web/companion.py``), whose browser keeps a non-extractable Ed25519 key
and is paired with a one-time code (``pushpairing``). The CLI ``token-agent approve``, with
its private key in a *companion file*, stays for tests and scripts. Either way the agent
stores only the public key (``push_devices``), and the login side (``start`` then ``wait``)
and the companion side (``pending_for_device``, ``answer``, ``submit``) meet in the store:
``wait`` polls it, so any server replica can take the answer.

Trust
    The agent accepts an answer only if its Ed25519 signature verifies with the enrolled
    public key of the device it names, that device is the one the request was sent to,
    the signed bytes name that request id, and the request is still pending and unexpired.
    The decision is written with a conditional ``UPDATE ... WHERE state = 'pending'``, so
    exactly one answer wins. The phone never sees the number (``PendingPush`` has none):
    that is the point of number matching (a user cannot approve a prompt they did not cause
    by tapping "yes" without looking at the login screen). Listing the pending requests is
    not authenticated by the CLI companion (it opens the store file, the trust boundary);
    the phone's page lists them only for requests signed by the phone
    (``pushpairing.check_request``). The answer is always signed.

Signed bytes
    ``b"token-agent push v1\\0" + request_id + b"\\0" + decision + b"\\0" + number`` where
    decision is ``approve`` or ``deny`` and number is ``str(number)`` (empty when none, as a
    denial may have none). Request ids are ``secrets.token_urlsafe(16)`` (no NUL, so the
    encoding is unambiguous).

Enrolment (a pairing, not a shortcut)
    ``enrol`` generates the key pair, writes the companion file (0600, atomically) and
    stores the method *unconfirmed*. The companion then proves it holds the private key:
    ``pairing_challenge`` (a nonce, stateless: bound to the method and device and its
    expiry by an HMAC under the data directory's key), ``companion_sign_pairing`` (the
    companion side, from its file) and ``confirm_enrol`` (verifies the HMAC, the expiry and
    the signature, confirms the method, and makes it preferred if the user has no preferred
    method). ``pair`` runs the three steps when both sides are in one process. The agent
    generated the key, so the proof shows that the companion file reached the companion and
    works, not that the agent never saw the key; the agent keeps no copy. A phone's
    browser makes its own key and sends only the public key (``pushpairing.redeem``, through
    ``add_device``, the step both enrolments share), then signs the same challenge.

Lockout
    An approval with the wrong number is a failed attempt on the method's lockout (run
    through ``checked()``: ``verify.push`` events, ``lockout.push`` when it locks); an
    approval with the right number clears it. A locked method refuses ``start``. A denial
    does not count (the user said no), but it is recorded as ``push.denied``: it may be an
    attack (someone who knows the password).

Audit events: ``enrol.push`` (pending at ``enrol``, success/failure at ``confirm_enrol``),
``push.sent``, ``push.answer`` (answers refused, late answers), ``push.denied``,
``verify.push`` (approvals and wrong numbers from ``submit``; expiry and cancellation
from ``wait``), ``lockout.push``, ``remove.push``. The number and the keys are never
recorded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding, NoEncryption, PrivateFormat, PublicFormat,
)

from ..atomicfile import write_private
from ..kinds import PUSH
from ..outcome import Reason
from ..secretbox import equal
from ..store import KIND_PUSH, Method, check_detail
from . import FactorContext, FactorError, Verification, checked, lockout
from .pushwire import (  # noqa: F401 (re-exported: push.* is the API)
    ANSWER_PREFIX, APPROVE, COMPANION_VERSION, DENY, PAIRING_PREFIX, Companion,
    CompanionFileError, PendingPush, PushRequest, SignedAnswer, _b64, _check_request_id,
    _pairing_bytes, answer, answer_bytes, companion_sign_pairing, load_companion,
)

DEFAULT_NAME = "companion app"
DEFAULT_TTL = 60
MAX_TTL = 600
PAIRING_TTL = 300

_NONCE_LEN = 16
_MAC_LEN = 32

PENDING = "pending"
APPROVED = "approved"
DENIED = "denied"
WRONG_NUMBER = "wrong-number"
EXPIRED = "expired"
CANCELLED = "cancelled"

LABEL = PUSH.label
MSG_EXPIRED = "the request expired: no answer from your companion app"
MSG_DENIED = ("you denied the sign-in on your companion app; if it was not you trying to sign "
              "in, tell IT at once: someone may know your password")
MSG_WRONG_NUMBER = ("the number entered on your companion app was not the one on this screen; "
                    "if it was not you trying to sign in, tell IT")
MSG_CANCELLED = "the request was cancelled"


# --------------------------------------------------------------------------- helpers


def _method(ctx: FactorContext, user_id: str, method: Method | int | str | None, *,
            usable: bool) -> Method:
    """The user's push method: a ``Method``, a method id, a name, or (None) the preferred
    one if it is a push method, else the first. With ``usable``, it must be confirmed and
    unflagged."""
    store = ctx.store
    if method is None:
        every = store.list_methods(user_id, KIND_PUSH)
        if not every:
            raise FactorError(Reason.NO_CREDENTIAL, "no companion app is enrolled for push "
                              "approval")
        methods = [m for m in every if m.confirmed and not m.flagged] if usable else every
        found = ([m for m in methods if m.preferred] or methods or every)[0]
    elif isinstance(method, str):
        found = store.find_method(user_id, KIND_PUSH, method)
        if found is None:
            raise FactorError(Reason.NO_CREDENTIAL, f"no companion app named {method!r}")
    else:
        method_id = method.id if isinstance(method, Method) else int(method)
        try:
            found = store.get_method(method_id)
        except LookupError:
            raise FactorError(Reason.NO_CREDENTIAL, "that companion app is not enrolled "
                              "(was it removed?)") from None
        if found.user_id != user_id:
            raise FactorError(Reason.WRONG_USER, "that companion app is another user's")
        if found.kind != KIND_PUSH:
            raise FactorError(Reason.NO_CREDENTIAL, f"method {found.name!r} is not a companion app")
    if usable and not found.confirmed:
        raise FactorError(Reason.NOT_CONFIRMED, f"companion app {found.name!r} is not paired "
                          "yet: confirm its enrolment first")
    if usable and found.flagged:
        raise FactorError(Reason.CREDENTIAL_FLAGGED, f"companion app {found.name!r} is flagged "
                          f"({found.flag_reason or 'no reason given'}): ask IT")
    return found


def _device_of_method(ctx: FactorContext, method_id: int) -> tuple[str, bytes]:
    row = ctx.store.push_device(int(method_id))
    if row is None:
        raise FactorError(Reason.NO_CREDENTIAL, "the companion app's key is missing from the store")
    return row["device_id"], bytes(row["public_key"])


def _device(ctx: FactorContext, device_id: str) -> tuple[int, bytes] | None:
    row = ctx.store.push_device_by_id(str(device_id))
    return None if row is None else (row["method_id"], bytes(row["public_key"]))


def _request(ctx: FactorContext, request_id: str) -> dict | None:
    return ctx.store.get_push_request(request_id)


def _set_state(ctx: FactorContext, request_id: str, state: str, now: float) -> bool:
    """Move a pending request to ``state``; False if it was no longer pending."""
    return ctx.store.decide_push_request(request_id, state, now)


def _pairing_purpose(method_id: int, device_id: str) -> str:
    return f"push-pairing:{int(method_id)}:{device_id}"


# --------------------------------------------------------------------------- enrolment


def enrol(ctx: FactorContext, user_id: str, companion_path: str | os.PathLike[str], *,
          name: str = DEFAULT_NAME) -> Method:
    """Enrol a companion app: a new Ed25519 key pair, the companion file written at
    ``companion_path`` (0600, atomically; an existing file is refused, never overwritten)
    and a push method stored *unconfirmed* until the companion proves it holds the key
    (``pairing_challenge`` / ``companion_sign_pairing`` / ``confirm_enrol``, or ``pair``)."""
    store = ctx.store
    user = store.get_user_by_id(user_id)
    path = Path(companion_path)
    if path.exists() or path.is_symlink():
        raise CompanionFileError(f"{path} exists: choose another path for the companion file, "
                                 "or remove the old one (a companion file is never overwritten)",
                                 Reason.DEVICE_ERROR)
    if not path.parent.is_dir():
        raise CompanionFileError(f"cannot write the companion file: directory {path.parent} "
                                 "does not exist", Reason.DEVICE_ERROR)
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    device_id = new_device_id()
    text = json.dumps({
        "version": COMPANION_VERSION, "device_id": device_id, "user": user.username,
        "issuer": ctx.issuer,
        "private_key": _b64(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())),
    }, indent=2) + "\n"
    del key
    written = False
    try:
        with store.transaction():
            method = add_device(ctx, user.id, device_id, public, name=name)
            try:
                write_private(path, text.encode())
            except OSError as exc:
                raise CompanionFileError(f"cannot write the companion file {path}: "
                                         f"{exc.strerror or exc}", Reason.DEVICE_ERROR) from None
            written = True
    except BaseException:
        if written:  # the commit failed: no method, so no file either
            try:
                path.unlink()
            except OSError:
                pass
        raise
    return method


def new_device_id() -> str:
    """A new companion's device id (a random UUID)."""
    return str(uuid.uuid4())


def add_device(ctx: FactorContext, user_id: str, device_id: str, public_key: bytes, *,
               name: str, via: str | None = None) -> Method:
    """Store a companion app's public key (32-byte Ed25519) as a push method of the user,
    *unconfirmed* until the companion signs a pairing challenge (``confirm_enrol``): the
    step every enrolment shares, whoever made the key (``enrol``: the agent, for a
    companion file; ``pushpairing.redeem``: a phone's browser, which keeps its private
    key). Runs in the caller's transaction."""
    store = ctx.store
    public_key = bytes(public_key)
    try:
        Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        raise FactorError(Reason.VERIFICATION_FAILED, "the companion's public key is not an "
                          "Ed25519 key (32 bytes)") from None
    with store.transaction():
        method = store.add_method(user_id, KIND_PUSH, name, confirmed=False)
        store.add_push_device(method.id, device_id, public_key)
        store.record_event("enrol.push", user_id=user_id, outcome="pending",
                           detail={"name": method.name, "device_id": device_id,
                                   **({"via": via} if via else {})})
    return method


def pairing_challenge(ctx: FactorContext, method: Method | int) -> bytes:
    """A fresh challenge for the companion to sign (valid ``PAIRING_TTL`` seconds):
    ``nonce(16) || expires(8, big-endian) || HMAC(32)``, the HMAC binding it to this method
    and device (nothing is stored)."""
    method_id = method.id if isinstance(method, Method) else int(method)
    device_id, _ = _device_of_method(ctx, method_id)
    body = secrets.token_bytes(_NONCE_LEN) + int(ctx.now() + PAIRING_TTL).to_bytes(8, "big")
    return body + ctx.keys.code_hash(_pairing_purpose(method_id, device_id), body.hex())


def confirm_enrol(ctx: FactorContext, user_id: str, method_id: Method | int, challenge: bytes,
                  signature: bytes) -> Method:
    """Confirm a companion app from its signed pairing challenge; it becomes the user's
    preferred method if they have none. ``FactorError`` (verification-failed) when the
    challenge is not this method's, has expired, or the signature does not verify."""
    store = ctx.store
    method = _method(ctx, user_id, method_id, usable=False)
    device_id, public = _device_of_method(ctx, method.id)
    challenge, signature = bytes(challenge), bytes(signature)

    def fail(message: str) -> FactorError:
        store.record_event("enrol.push", user_id=user_id, outcome="failure",
                           detail={"name": method.name, "device_id": device_id,
                                   "reason": Reason.VERIFICATION_FAILED.value, "why": message})
        return FactorError(Reason.VERIFICATION_FAILED, message)

    if len(challenge) != _NONCE_LEN + 8 + _MAC_LEN:
        raise fail("not a pairing challenge of this agent")
    body, mac = challenge[:-_MAC_LEN], challenge[-_MAC_LEN:]
    if not equal(mac, ctx.keys.code_hash(_pairing_purpose(method.id, device_id), body.hex())):
        raise fail("the pairing challenge was not issued for this companion app")
    if int.from_bytes(body[_NONCE_LEN:], "big") <= ctx.now():
        raise fail("the pairing challenge expired: ask for a new one")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature,
                                                          _pairing_bytes(device_id, challenge))
    except (InvalidSignature, ValueError, TypeError):
        raise fail("the pairing signature does not verify: this is not the companion file "
                   "written at enrolment") from None
    if method.confirmed:
        return method
    with store.transaction():
        method = store.confirm_method(method.id)
        if store.preferred_method(user_id) is None:
            method = store.set_preferred_method(user_id, method.id)
        store.record_event("enrol.push", user_id=user_id, outcome="success",
                           detail={"name": method.name, "device_id": device_id,
                                   "preferred": method.preferred})
    return method


def pair(ctx: FactorContext, user_id: str, method: Method | int, companion: Companion) -> Method:
    """The whole pairing when both sides run in one process (e.g. the enrolment command
    reading back the companion file it just wrote)."""
    challenge = pairing_challenge(ctx, method)
    return confirm_enrol(ctx, user_id, method, challenge,
                         companion_sign_pairing(companion, challenge))


def list_(ctx: FactorContext, user_id: str) -> list[Method]:
    """The user's companion apps (confirmed or not)."""
    return ctx.store.list_methods(user_id, KIND_PUSH)


def remove(ctx: FactorContext, user_id: str, name: str | None = None) -> Method:
    """Remove a companion app (the only one when ``name`` is None); its key and requests go
    with it. The companion file, on the companion's side, is the user's to delete."""
    store = ctx.store
    if name is None:
        methods = list_(ctx, user_id)
        if not methods:
            raise FactorError(Reason.NO_CREDENTIAL, "no companion app is enrolled")
        if len(methods) > 1:
            raise FactorError(Reason.AMBIGUOUS, "several companion apps are enrolled: name one of "
                              + ", ".join(repr(m.name) for m in methods))
        method = methods[0]
    else:
        method = store.find_method(user_id, KIND_PUSH, name)
        if method is None:
            raise FactorError(Reason.NO_CREDENTIAL, f"no companion app named {name!r}")
    device_id, _ = _device_of_method(ctx, method.id)
    with store.transaction():
        store.remove_method(method.id)
        store.record_event("remove.push", user_id=user_id, outcome="success",
                           detail={"name": method.name, "device_id": device_id})
    return method


# --------------------------------------------------------------------------- login side


def start(ctx: FactorContext, user_id: str, *, context: dict, method: Method | int | str | None = None,
          ttl: float = DEFAULT_TTL) -> PushRequest:
    """Send a push request to the user's companion app (``method``, or their preferred /
    first one); returns it, with the number to show on the login screen. ``context`` is what
    the companion shows (workstation, network, username...): a JSON object that passes the
    audit detail rules (no secret-looking keys: ``InvalidValue`` otherwise). An earlier
    pending request of the method is cancelled (or marked expired if it ran out). A locked
    method is refused (``FactorError`` method-locked)."""
    store = ctx.store
    if not isinstance(context, dict):
        raise TypeError("context is a dict")
    context_text = check_detail(context)
    if isinstance(ttl, bool) or not 0 < float(ttl) <= MAX_TTL:
        raise ValueError(f"ttl is more than 0 and at most {MAX_TTL} seconds")
    method = _method(ctx, user_id, method, usable=True)
    now = ctx.now()
    current = lockout.state(store, lockout.method_scope(method.id))
    if current.locked(now):
        store.record_event("push.sent", user_id=user_id, outcome="refused",
                           detail={"name": method.name, "reason": Reason.METHOD_LOCKED.value})
        raise FactorError(Reason.METHOD_LOCKED,
                          f"too many failed attempts: {LABEL} locked "
                          f"{lockout.describe_until(current.locked_until, now)}; an administrator "
                          "can unlock it")
    request = PushRequest(id=secrets.token_urlsafe(16), method_id=method.id,
                          number=10 + secrets.randbelow(90), created_at=now,
                          expires_at=now + float(ttl), context=json.loads(context_text))
    with store.transaction():
        expired, cancelled = store.open_push_request(
            request.id, method.id, number=request.number, context=context_text,
            created_at=request.created_at, expires_at=request.expires_at)
        store.record_event("push.sent", user_id=user_id, outcome="success",
                           detail={"name": method.name, "request_id": request.id,
                                   "expires_at": request.expires_at, "context": request.context,
                                   "cancelled": cancelled, "expired": expired})
    return request


def _verification(ctx: FactorContext, method: Method | None, state: str) -> Verification:
    if state == APPROVED:
        return Verification(True, KIND_PUSH, method, None, "approved on your companion app")
    if state == DENIED:
        return Verification(False, KIND_PUSH, method, Reason.PUSH_DENIED, MSG_DENIED)
    if state == WRONG_NUMBER:
        limit = ctx.lockout.max_failures
        now = ctx.now()
        current = (lockout.state(ctx.store, lockout.method_scope(method.id))
                   if method is not None else None)
        if current is not None and current.locked(now):
            return Verification(False, KIND_PUSH, method, Reason.PUSH_WRONG_NUMBER,
                                f"{MSG_WRONG_NUMBER}; too many failed attempts: {LABEL} locked "
                                f"{lockout.describe_until(current.locked_until, now)}",
                                tries_left=0, locked_until=current.locked_until)
        left = None if current is None else lockout.tries_left(current, limit)
        suffix = "" if left is None else f" — {left} {'try' if left == 1 else 'tries'} left"
        return Verification(False, KIND_PUSH, method, Reason.PUSH_WRONG_NUMBER,
                            MSG_WRONG_NUMBER + suffix, tries_left=left)
    if state == EXPIRED:
        return Verification(False, KIND_PUSH, method, Reason.PUSH_EXPIRED, MSG_EXPIRED)
    return Verification(False, KIND_PUSH, method, Reason.CANCELLED, MSG_CANCELLED)


def wait(ctx: FactorContext, request_id: str, *, timeout: float,
         cancel: threading.Event | None = None, poll: float = 0.1) -> Verification:
    """Wait for the companion's answer to a request (polling the store every ``poll``
    seconds). Ends when the request is decided; when it expires (``ctx.now()`` past its
    ``expires_at``) or ``timeout`` seconds (real time) pass, it is marked expired
    (push-expired); when ``cancel`` is set, cancelled (cancelled). A denial is push-denied,
    a wrong number push-wrong-number (counted on the method's lockout by ``submit``)."""
    store = ctx.store
    row = _request(ctx, _check_request_id(request_id))
    if row is None:
        raise FactorError(Reason.VERIFICATION_FAILED, "no push request with that id")
    try:
        method = store.get_method(row["method_id"])
    except LookupError:
        method = None
    user_id = None if method is None else method.user_id
    deadline = time.monotonic() + max(0.0, float(timeout))
    poll = max(0.01, float(poll))
    while True:
        row = _request(ctx, request_id)
        if row is None:
            return Verification(False, KIND_PUSH, None, Reason.NO_CREDENTIAL,
                                "the push request is gone: the companion app was removed")
        if row["state"] != PENDING:
            return _verification(ctx, method, row["state"])
        name = {} if method is None else {"name": method.name}
        if cancel is not None and cancel.is_set():
            if _set_state(ctx, request_id, CANCELLED, ctx.now()):
                store.record_event("verify.push", user_id=user_id, outcome="cancelled",
                                   detail={**name, "request_id": request_id,
                                           "reason": Reason.CANCELLED.value})
                return Verification(False, KIND_PUSH, method, Reason.CANCELLED,
                                    "cancelled: the push request was withdrawn")
            continue  # answered meanwhile: read it
        left = deadline - time.monotonic()
        if ctx.now() >= row["expires_at"] or left <= 0:
            if _set_state(ctx, request_id, EXPIRED, ctx.now()):
                store.record_event("verify.push", user_id=user_id, outcome="failure",
                                   detail={**name, "request_id": request_id,
                                           "reason": Reason.PUSH_EXPIRED.value})
                return Verification(False, KIND_PUSH, method, Reason.PUSH_EXPIRED, MSG_EXPIRED)
            continue
        pause = min(poll, left)
        if cancel is not None:
            cancel.wait(pause)
        else:
            time.sleep(pause)


# --------------------------------------------------------------------------- companion side


def pending_for(ctx: FactorContext, companion: Companion) -> list[PendingPush]:
    """The companion's pending, unexpired requests, oldest first: what to show, never the
    number."""
    return pending_for_device(ctx, companion.device_id)


def pending_for_device(ctx: FactorContext, device_id: str) -> list[PendingPush]:
    """The pending, unexpired requests of the companion ``device_id``, oldest first (read
    from the store, so any server replica answers the same)."""
    found = _device(ctx, device_id)
    if found is None:
        raise FactorError(Reason.UNKNOWN_CREDENTIAL, "this companion app is not enrolled (it "
                          "may have been removed): enrol it again")
    method_id, _ = found
    rows = ctx.store.pending_push_requests(method_id, ctx.now())
    return [PendingPush(r["id"], r["created_at"], r["expires_at"], json.loads(r["context"]))
            for r in rows]


def submit(ctx: FactorContext, signed: SignedAnswer) -> str:
    """The agent's side of an answer: returns the request's new state ("approved",
    "denied", "wrong-number", or "expired" for a late answer). Refused with ``FactorError``
    (recorded as ``push.answer``, the request unchanged) when the request is unknown, the
    signature does not verify with the named device's key, the device is not the one the
    request went to, or the request is no longer pending."""
    store = ctx.store
    if not isinstance(signed, SignedAnswer):
        raise TypeError("submit takes a SignedAnswer")
    request_id = _check_request_id(signed.request_id)
    row = _request(ctx, request_id)
    user_id = None
    method = None
    if row is not None:
        try:
            method = store.get_method(row["method_id"])
            user_id = method.user_id
        except LookupError:
            row = None

    def refuse(reason: Reason, message: str) -> FactorError:
        store.record_event("push.answer", user_id=user_id, outcome="refused",
                           detail={"request_id": request_id, "device_id": str(signed.device_id),
                                   "decision": str(signed.decision), "reason": reason.value,
                                   "why": message})
        return FactorError(reason, message)

    if row is None:
        raise refuse(Reason.VERIFICATION_FAILED, "no push request with that id")
    device = _device(ctx, signed.device_id)
    if device is None:
        raise refuse(Reason.UNKNOWN_CREDENTIAL, "this companion app is not enrolled (it may "
                     "have been removed)")
    device_method_id, public = device
    try:
        data = answer_bytes(request_id, signed.decision, signed.number)
        Ed25519PublicKey.from_public_bytes(public).verify(bytes(signed.signature), data)
    except (InvalidSignature, ValueError, TypeError):
        raise refuse(Reason.VERIFICATION_FAILED, "the answer's signature does not verify: it "
                     "was not made by this companion app, or was altered") from None
    if device_method_id != row["method_id"]:
        raise refuse(Reason.WRONG_USER, "this companion app is not the one the request was sent to")
    row = _request(ctx, request_id) or row
    now = ctx.now()
    not_pending = {EXPIRED: (Reason.PUSH_EXPIRED, "the request expired before this answer"),
                   CANCELLED: (Reason.CANCELLED, "the request was cancelled")}
    if row["state"] != PENDING:
        reason, message = not_pending.get(row["state"], (Reason.VERIFICATION_FAILED,
                                                          "the request was already answered"))
        raise refuse(reason, message)
    if now >= row["expires_at"]:
        if not _set_state(ctx, request_id, EXPIRED, now):
            raise refuse(Reason.VERIFICATION_FAILED, "the request was already answered")
        store.record_event("push.answer", user_id=user_id, outcome="expired",
                           detail={"request_id": request_id, "name": method.name,
                                   "decision": signed.decision,
                                   "reason": Reason.PUSH_EXPIRED.value})
        return EXPIRED
    if method.flagged:
        _set_state(ctx, request_id, CANCELLED, now)
        raise refuse(Reason.CREDENTIAL_FLAGGED, f"companion app {method.name!r} is flagged")
    context = json.loads(row["context"])

    if signed.decision == DENY:
        with store.transaction():
            if not _set_state(ctx, request_id, DENIED, now):
                raise FactorError(Reason.VERIFICATION_FAILED, "the request was already answered")
            store.record_event("push.denied", user_id=user_id, outcome="denied",
                               detail={"name": method.name, "request_id": request_id,
                                       "device_id": signed.device_id, "context": context})
        return DENIED

    decided: list[str] = []

    def check():
        right = (signed.number is not None
                 and equal(str(signed.number), str(row["number"])))
        state = APPROVED if right else WRONG_NUMBER
        if not _set_state(ctx, request_id, state, now):
            # lost a race with another answer (counted: fail closed)
            raise FactorError(Reason.VERIFICATION_FAILED, "the request was already answered")
        decided.append(state)
        detail = {"request_id": request_id, "device_id": signed.device_id}
        if right:
            return True, None, "approved on the companion app", detail
        return False, Reason.PUSH_WRONG_NUMBER, "wrong number entered on the companion app", detail

    result = checked(ctx, kind=KIND_PUSH, method=method, user_id=method.user_id, check=check)
    if not decided:  # locked: check() was not run
        _set_state(ctx, request_id, CANCELLED, now)
        raise FactorError(result.reason or Reason.METHOD_LOCKED, result.message)
    return decided[0]
