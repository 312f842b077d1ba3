"""Phone call approval, as the seeds describe it: "you will receive a call and will need to
press # on the keypad".

A user's phone contact (a ``voice`` method, or an ``sms`` one: a mobile takes calls too) is
called through the voice gateway's HTTP API (``call_url`` of ``[delivery.voice]``,
``token_agent.delivery.HttpGateway.start_call``). The gateway reads a short script and
gathers one key; when the call ends it POSTs the result to the organisation server's
``/hooks/voice`` (``token_agent/web/hooks.py``), signed with the secret both share
(``webhook_secret_file``):

    X-Token-Agent-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
    {"call_id": "...", "result": "pressed" | "no-answer" | "busy", "digits": "#"}

``handle_webhook`` checks the signature (constant time), refuses a timestamp more than
five minutes off, malformed JSON and a call already finished (a replay), then ``finish``
decides the call once (a conditional UPDATE): ``#`` approves; another key denies and
counts as a failure on the method's lockout; no answer or a busy line denies. The login
flow's ``wait`` polls the store until the call is decided, expires or is cancelled, so the
webhook may reach any replica of the server.

Each call is a row of ``voice_calls`` (id, method, state pending / approved / denied /
expired / cancelled, expiry). A method gets at most ``CodeRules.max_sends`` calls within
``ttl_seconds`` and one every ``resend_seconds`` (the codes' limits: calls cost money and
wake people up). Audit events: ``call.started`` (or refused), ``verify.<kind>`` (the
result, through ``checked`` for a key press), ``call.webhook`` for a refused webhook.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..outcome import Reason
from ..store import Method, UnknownCredential
from . import FactorContext, FactorError, Verification, checked, lockout

log = logging.getLogger(__name__)

#: the contact channels a call can go to
PHONE_KINDS = ("voice", "sms")
DEFAULT_TTL = 90.0
MAX_TTL = 600.0
PENDING, APPROVED, DENIED, EXPIRED, CANCELLED = (
    "pending", "approved", "denied", "expired", "cancelled")
RESULTS = ("pressed", "no-answer", "busy")
SIGNATURE_HEADER = "X-Token-Agent-Signature"
#: a webhook whose timestamp is further than this from now (seconds) is refused
MAX_SKEW = 300
MAX_BODY = 4096
APPROVE_KEY = "#"
LABEL = "phone call"

MSG_DENIED = ("a key other than # was pressed on the call, so the sign-in was not approved; "
              "if it was not you signing in, tell your IT service desk")
MSG_NO_ANSWER = "the call was not answered, so the sign-in was not approved: try again"
MSG_BUSY = "the phone was busy, so the sign-in was not approved: try again"
MSG_EXPIRED = "no answer came from the call in time, so the sign-in was not approved: try again"
MSG_CANCELLED = "the call was cancelled"

_CALL_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_SIGNATURE = re.compile(r"t=([0-9]{1,12}),v1=([0-9a-f]{64})")


@dataclass(frozen=True)
class Call:
    """A call started: its id (the gateway's webhook names it), the method, where it goes
    (masked) and when it expires."""

    id: str
    method_id: int
    destination_hint: str
    created_at: float
    expires_at: float

    def prompt(self) -> str:
        """What the person is told while the phone rings."""
        return f"We are calling {self.destination_hint}: answer and press #"


class WebhookError(Exception):
    """A webhook refused: ``status`` (a 4xx), a stable ``code`` and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_json(self) -> dict:
        return {"error": self.code, "message": self.message}


# --------------------------------------------------------------------------- starting


def available(ctx: FactorContext) -> bool:
    """Whether the voice gateway can make approval calls (``call_url`` configured)."""
    return ctx.delivery is not None and ctx.delivery.call_gateway() is not None


def script(ctx: FactorContext) -> str:
    """What the call says (no secret in it: the key to press is the same for everyone)."""
    from ..delivery import DEFAULT_SENDER_NAME

    name = ctx.issuer
    if name == DEFAULT_SENDER_NAME and ctx.delivery is not None:
        name = ctx.delivery.config.sender_name  # as a code's message is signed
    return (f"This is {name}. Someone is signing in as you. If it is you, press hash. "
            "If it is not you, hang up, and tell your IT service desk.")


def _throttle(ctx: FactorContext, method: Method, now: float) -> None:
    rules = ctx.codes
    times = ctx.store.voice_calls_since(method.id, now - rules.ttl_seconds)
    if times and now - times[-1] < rules.resend_seconds:
        wait = int(rules.resend_seconds - (now - times[-1])) + 1
        raise FactorError(Reason.RESEND_THROTTLED,
                          f"a call was made {int(now - times[-1])} s ago: wait {wait} s before "
                          "asking for another")
    if len(times) >= rules.max_sends:
        wait = int(times[len(times) - rules.max_sends] + rules.ttl_seconds - now) + 1
        raise FactorError(Reason.RESEND_THROTTLED,
                          f"{len(times)} calls were made recently: wait {max(1, wait // 60)} min "
                          "before asking for another")


def start(ctx: FactorContext, method: Method, *, ttl: float = DEFAULT_TTL) -> Call:
    """Call the method's phone and ask for #. ``FactorError``: not a confirmed phone
    contact, flagged, locked, throttled, or the call could not be started
    (``DELIVERY_FAILED``; the call is then recorded as cancelled)."""
    from ..delivery import DeliveryError, mask_destination

    store = ctx.store
    if isinstance(ttl, bool) or not 0 < float(ttl) <= MAX_TTL:
        raise ValueError(f"ttl is more than 0 and at most {MAX_TTL:g} seconds")
    try:
        method = store.get_method(method.id)
    except UnknownCredential:
        raise FactorError(Reason.NO_CREDENTIAL, f"{method.name!r} was removed") from None
    row = store.get_contact(method.id)
    now = ctx.now()

    def refuse(reason: Reason, message: str, outcome: str = "refused") -> FactorError:
        store.record_event("call.started", user_id=method.user_id, outcome=outcome,
                           detail={"method": method.name, "reason": reason.value})
        return FactorError(reason, message)

    if row is None or row["channel"] not in PHONE_KINDS:
        raise refuse(Reason.METHOD_NOT_ALLOWED,
                     f"{method.name!r} is not a phone number, so it cannot be called")
    if not method.confirmed:
        raise refuse(Reason.NOT_CONFIRMED, f"{method.name!r} is not confirmed yet")
    if method.flagged:
        raise refuse(Reason.CREDENTIAL_FLAGGED,
                     f"{method.name!r} was flagged ({method.flag_reason or 'no reason given'}): "
                     "ask an administrator")
    current = lockout.state(store, lockout.scope_for(lockout.method_scope(method.id),
                                                     ctx.familiar))
    if current.locked(now):
        raise refuse(Reason.METHOD_LOCKED,
                     f"too many failed attempts: {method.name!r} locked "
                     f"{lockout.describe_until(current.locked_until, now)}; an administrator "
                     "can unlock it")
    try:
        _throttle(ctx, method, now)
    except FactorError as e:
        raise refuse(e.reason, e.message) from None
    gateway = ctx.delivery.call_gateway() if ctx.delivery is not None else None
    if gateway is None:
        raise refuse(Reason.DELIVERY_FAILED, "phone call approval is not configured here",
                     "failure")
    hint = mask_destination(row["channel"], row["destination"])
    call = Call(id=secrets.token_urlsafe(16), method_id=method.id, destination_hint=hint,
                created_at=now, expires_at=now + float(ttl))
    # stored before the gateway is asked: a fast gateway's webhook finds it
    cancelled = store.open_voice_call(call.id, method.id, created_at=now,
                                      expires_at=call.expires_at)
    try:
        gateway_id = gateway.start_call(row["destination"], script(ctx), call.id)
    except DeliveryError as e:
        store.decide_voice_call(call.id, CANCELLED, ctx.now(), "not-started")
        raise refuse(Reason.DELIVERY_FAILED, f"could not call {hint}: {e.reason}",
                     "failure") from None
    store.record_event("call.started", user_id=method.user_id, outcome="success",
                       detail={"method": method.name, "call_id": call.id,
                               "destination_hint": hint, "gateway_id": gateway_id,
                               "expires_at": call.expires_at, "cancelled": cancelled})
    log.info("started an approval call to %s (call %s)", hint, call.id)
    return call


# --------------------------------------------------------------------------- the result


def _method_of(ctx: FactorContext, row: dict) -> Method | None:
    try:
        return ctx.store.get_method(row["method_id"])
    except UnknownCredential:
        return None


def finish(ctx: FactorContext, call_id: str, result: str, digits: str | None = None) -> str:
    """Decide a call from the gateway's report (the webhook's body, already authenticated):
    ``#`` pressed approves; another key denies and counts on the method's lockout; no
    answer or busy denies. Returns the new state (``expired`` for a report after the call
    expired). ``FactorError``: no such call, or already finished (a replay)."""
    store = ctx.store
    if not isinstance(call_id, str) or not _CALL_ID.fullmatch(call_id):
        raise FactorError(Reason.VERIFICATION_FAILED, "no phone call with that id")
    if result not in RESULTS:
        raise ValueError(f"result is one of {', '.join(RESULTS)}")
    row = store.get_voice_call(call_id)
    method = None if row is None else _method_of(ctx, row)
    if row is None or method is None:
        raise FactorError(Reason.VERIFICATION_FAILED, "no phone call with that id")
    if row["state"] != PENDING:
        raise FactorError(Reason.CODE_REPLAYED, f"the call was already finished ({row['state']})")
    now = ctx.now()
    name = {"method": method.name, "call_id": call_id, "result": result}
    if now >= row["expires_at"]:
        if not store.decide_voice_call(call_id, EXPIRED, now, result):
            raise FactorError(Reason.CODE_REPLAYED, "the call was already finished")
        store.record_event(f"verify.{method.kind}", user_id=method.user_id, outcome="failure",
                           detail={**name, "reason": Reason.TIMEOUT.value, "late": True})
        return EXPIRED
    if result != "pressed":
        if not store.decide_voice_call(call_id, DENIED, now, result):
            raise FactorError(Reason.CODE_REPLAYED, "the call was already finished")
        store.record_event(f"verify.{method.kind}", user_id=method.user_id, outcome="failure",
                           detail={**name, "reason": Reason.TIMEOUT.value})
        return DENIED
    decided: list[str] = []

    def check():
        right = isinstance(digits, str) and hmac.compare_digest(digits.strip(), APPROVE_KEY)
        state = APPROVED if right else DENIED
        if not store.decide_voice_call(call_id, state, now, result):
            raise FactorError(Reason.CODE_REPLAYED, "the call was already finished")
        decided.append(state)
        detail = {"call_id": call_id, "channel": "call"}
        if right:
            return True, None, "approved by a phone call", detail
        return False, Reason.VERIFICATION_FAILED, "another key than # was pressed", detail

    outcome = checked(ctx, kind=method.kind, method=method, user_id=method.user_id,
                      check=check, label=LABEL)
    if not decided:  # locked meanwhile: check() did not run
        store.decide_voice_call(call_id, CANCELLED, now, result)
        raise FactorError(outcome.reason or Reason.METHOD_LOCKED, outcome.message)
    return decided[0]


def _verification(ctx: FactorContext, method: Method | None, row: dict) -> Verification:
    kind = method.kind if method is not None else "voice"
    state = row["state"]
    if state == APPROVED:
        return Verification(True, kind, method, None, "approved by a phone call")
    if state == DENIED and row["result"] == "pressed":
        left = None
        if method is not None:
            current = lockout.state(ctx.store, lockout.scope_for(
                lockout.method_scope(method.id), ctx.familiar))
            if current.locked(ctx.now()):
                return Verification(False, kind, method, Reason.VERIFICATION_FAILED,
                                    f"{MSG_DENIED}; too many failed attempts: {LABEL}s to "
                                    f"{method.name!r} locked "
                                    f"{lockout.describe_until(current.locked_until, ctx.now())}",
                                    tries_left=0, locked_until=current.locked_until)
            left = lockout.tries_left(current, ctx.lockout.max_failures, ctx.lockout)
        return Verification(False, kind, method, Reason.VERIFICATION_FAILED, MSG_DENIED,
                            tries_left=left)
    if state == DENIED:
        return Verification(False, kind, method, Reason.TIMEOUT,
                            MSG_BUSY if row["result"] == "busy" else MSG_NO_ANSWER)
    if state == EXPIRED:
        return Verification(False, kind, method, Reason.TIMEOUT, MSG_EXPIRED)
    return Verification(False, kind, method, Reason.CANCELLED, MSG_CANCELLED)


def wait(ctx: FactorContext, call_id: str, *, timeout: float,
         cancel: threading.Event | None = None, poll: float = 0.1) -> Verification:
    """Wait for the call's result (polling the store): approved, denied, or expired when
    its ``expires_at`` or ``timeout`` seconds (real time) pass; cancelled when ``cancel``
    is set."""
    store = ctx.store
    row = store.get_voice_call(call_id)
    if row is None:
        raise FactorError(Reason.VERIFICATION_FAILED, "no phone call with that id")
    method = _method_of(ctx, row)
    deadline = time.monotonic() + max(0.0, float(timeout))
    poll = max(0.01, float(poll))
    while True:
        row = store.get_voice_call(call_id)
        if row is None:
            return Verification(False, "voice", None, Reason.NO_CREDENTIAL,
                                "the call is gone: the phone number was removed")
        if row["state"] != PENDING:
            return _verification(ctx, method, row)
        user_id = None if method is None else method.user_id
        kind = "voice" if method is None else method.kind
        if cancel is not None and cancel.is_set():
            if store.decide_voice_call(call_id, CANCELLED, ctx.now()):
                store.record_event(f"verify.{kind}", user_id=user_id, outcome="cancelled",
                                   detail={"call_id": call_id, "reason": Reason.CANCELLED.value})
            continue
        left = deadline - time.monotonic()
        if ctx.now() >= row["expires_at"] or left <= 0:
            if store.decide_voice_call(call_id, EXPIRED, ctx.now()):
                store.record_event(f"verify.{kind}", user_id=user_id, outcome="failure",
                                   detail={"call_id": call_id, "reason": Reason.TIMEOUT.value})
            continue
        pause = min(poll, left)
        if cancel is not None:
            cancel.wait(pause)
        else:
            time.sleep(pause)


def call_and_wait(ctx: FactorContext, method: Method, tell, *, timeout: float,
                  cancel: threading.Event | None = None) -> Verification:
    """The login flow's phone call approval: ``start``, ``tell(prompt)`` the person
    ("We are calling +44•••••123: answer and press #"), then ``wait``."""
    try:
        call = start(ctx, method)
    except FactorError as e:
        return Verification(False, method.kind, method, e.reason, e.message)
    tell(call.prompt())
    return wait(ctx, call.id, timeout=max(float(timeout), 1.0), cancel=cancel)


# --------------------------------------------------------------------------- the webhook


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Token-Agent-Signature`` header's value for ``body`` sent at ``timestamp``
    (what the gateway computes; the simulator and the tests use it)."""
    mac = hmac.new(secret, str(int(timestamp)).encode() + b"." + body, hashlib.sha256)
    return f"t={int(timestamp)},v1={mac.hexdigest()}"


def verify_webhook(secret: bytes, header: str | None, body: bytes, now: float) -> dict[str, Any]:
    """The webhook's body, once its signature is checked; ``WebhookError`` otherwise."""
    if len(body) > MAX_BODY:
        raise WebhookError(413, "too-large", f"the body is larger than {MAX_BODY} bytes")
    if not header:
        raise WebhookError(401, "no-signature", f"the {SIGNATURE_HEADER} header is missing")
    m = _SIGNATURE.fullmatch(header.strip())
    if m is None:
        raise WebhookError(400, "bad-signature-header",
                           f"the {SIGNATURE_HEADER} header is not t=<unix time>,v1=<hex>")
    timestamp = int(m.group(1))
    if abs(now - timestamp) > MAX_SKEW:
        raise WebhookError(401, "stale", "the signature's timestamp is more than 5 minutes "
                                         "from now: check the gateway's clock, do not replay")
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    if not hmac.compare_digest(expected.encode(), m.group(2).encode()):
        raise WebhookError(401, "bad-signature", "the signature does not match the body")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WebhookError(400, "malformed", "the body is not JSON") from None
    if not isinstance(data, dict):
        raise WebhookError(400, "malformed", "the body is not a JSON object")
    call_id, result, digits = data.get("call_id"), data.get("result"), data.get("digits")
    if not isinstance(call_id, str) or not _CALL_ID.fullmatch(call_id):
        raise WebhookError(400, "malformed", "call_id is missing or not a call id")
    if result not in RESULTS:
        raise WebhookError(400, "malformed", f"result is one of {', '.join(RESULTS)}")
    if digits is not None and (not isinstance(digits, str) or len(digits) > 32):
        raise WebhookError(400, "malformed", "digits is a short text (the keys pressed)")
    return {"call_id": call_id, "result": result, "digits": digits}


def handle_webhook(ctx: FactorContext, header: str | None, body: bytes) -> str:
    """The whole webhook: authenticate, parse, ``finish``. Returns the call's new state;
    ``WebhookError`` (a 4xx) for anything refused, recorded as ``call.webhook``."""
    from ..delivery import DeliveryError

    store = ctx.store
    try:
        try:
            secret = ctx.delivery.webhook_secret() if ctx.delivery is not None else None
        except DeliveryError:
            secret = None
        if secret is None:
            raise WebhookError(404, "not-configured", "phone call approval is not configured")
        data = verify_webhook(secret, header, body, ctx.now())
        try:
            return finish(ctx, data["call_id"], data["result"], data["digits"])
        except FactorError as e:
            if e.reason is Reason.CODE_REPLAYED:
                raise WebhookError(409, "already-finished", e.message) from None
            if e.reason is Reason.VERIFICATION_FAILED:
                raise WebhookError(404, "unknown-call", e.message) from None
            raise WebhookError(409, e.reason.value, e.message) from None
    except WebhookError as e:
        store.record_event("call.webhook", outcome="refused",
                           detail={"error": e.code, "status": e.status})
        raise
