"""The phone companion for push approval: pairing from the account, and the phone's page.

* ``GET /account/push``: the user's paired phones, and "Get a pairing code";
  ``POST /account/push/pair`` (signed in, re-authenticated recently, CSRF): a one-time
  pairing code (``factors.pushpairing.start``), shown once as a QR code, a link
  ``/companion/pair#CODE`` (the code in the fragment: never in the server's logs or a
  ``Referer``) and text to type.
* ``GET /companion`` and ``GET /companion/pair``: the phone's page (``static/companion.js``):
  it makes a non-extractable Ed25519 key with WebCrypto, keeps it in IndexedDB, and pairs.
* ``POST /companion/pair`` (the code and the phone's public key: ``pushpairing.redeem``),
  ``POST /companion/pair/confirm`` (the signed challenge: ``pushpairing.confirm``, i.e.
  ``push.confirm_enrol``).
* ``GET /companion/events``: server-sent events listing the phone's pending sign-ins
  (``push.pending_for_device``, from the store: any replica serves them), authenticated by
  the phone's signature over the request (``pushpairing.check_request``), never by a cookie.
  A stream ends after ``STREAM_SECONDS`` (the page reconnects with a new signature); at most
  ``MAX_STREAMS_PER_DEVICE`` per phone and ``MAX_STREAMS`` in all are open on a replica.
* ``POST /companion/answer``: the phone's answer, signed over ``push.answer_bytes``, checked by
  ``push.submit`` (a wrong number is refused there, and counted on the method's lockout).

The ``/companion`` endpoints that take JSON carry no cookie-based authority (the phone's key
is the authority), so they need no CSRF token; they still refuse another ``Origin`` and any
body that is not ``application/json``, and they are rate-limited per client address.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..factors import FactorError, push, pushpairing
from .core import (
    blocking, client_ip, read_form, redirect, render, require_recent_auth, require_user,
    throttle, web,
)

log = logging.getLogger("token_agent.web.companion")

#: a stream of events lasts this long, then the page reconnects (seconds)
STREAM_SECONDS = 55.0
#: how often a stream reads the store for new requests (seconds)
POLL_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0
MAX_STREAMS_PER_DEVICE = 2
MAX_STREAMS = 500
MAX_JSON_BYTES = 4096
#: pairing attempts per client address
PAIR_LIMIT, PAIR_WINDOW = 20, 900.0
#: streams and answers per phone (a stream lasts a minute: about 10 in 10 minutes), and per
#: client address (many phones may share one behind a network's address translation)
CALL_LIMIT, CALL_WINDOW = 120, 600.0
ADDRESS_LIMIT = 2400
NAME_MAX = 40

_streams: dict[str, int] = {}
_streams_total = 0


def _fmt(ts: float | None) -> str:
    if ts is None:
        return "Never"
    return datetime.fromtimestamp(ts).strftime("%d %b %Y at %H:%M")


def _qr_svg(uri: str) -> str:
    import segno

    return segno.make(uri, error="m").svg_inline(
        scale=4, dark="#212b32", light="#ffffff", title="QR code to pair your phone",
        omitsize=True)


# --------------------------------------------------------------------------- account side


async def _account_page(request: Request, session: Any, *, pairing: Any = None,
                        errors: list | None = None, name: str = pushpairing.DEFAULT_NAME,
                        status: int = 200) -> Response:
    ctx = web(request)
    fctx = ctx.agent.factors()
    methods, waiting = await blocking(
        lambda: (push.list_(fctx, session.user_id), pushpairing.pending(fctx, session.user_id)))
    phones = [{"name": m.name, "added": _fmt(m.created_at), "used": _fmt(m.last_used_at),
               "state": ("Paired" if m.confirmed else "Pairing not finished")
               + (" (flagged: ask IT)" if m.flagged else "")} for m in methods]
    values: dict[str, Any] = {"phones": phones, "name": name,
                              "waiting": None if waiting is None or pairing is not None
                              else _fmt(waiting["expires_at"])}
    if pairing is not None:
        link = f"{ctx.origin}/companion/pair#{pairing.code}"
        values.update(code=pairing.code, link=link, qr=_qr_svg(link),
                      pair_page=f"{ctx.origin}/companion/pair",
                      expires=datetime.fromtimestamp(pairing.expires_at).strftime("%H:%M"))
    return await render(request, "companion/account.html", status=status, errors=errors,
                        **values)


async def account_push(request: Request) -> Response:
    session = await require_user(request)
    return await _account_page(request, session)


async def account_pair(request: Request) -> Response:
    session = await require_user(request)
    if request.method == "GET":  # back from re-authentication (``next`` is this path)
        return redirect("/account/push", "You have confirmed it is you: you can now get a "
                                         "pairing code.")
    await require_recent_auth(request, session)
    form = await read_form(request)
    ctx = web(request)
    await throttle(request, "companion-code", session.user_id, 10, 600.0)
    name = " ".join(str(form.get("name", "")).split())
    if not name:
        return await _account_page(
            request, session, name=name, status=400,
            errors=[("name", "Enter a name for the phone, for example \u201cMy phone\u201d")])
    if len(name) > NAME_MAX or not name.isprintable():
        return await _account_page(
            request, session, name=name[:NAME_MAX], status=400,
            errors=[("name", f"Enter a name of {NAME_MAX} characters or fewer, in letters, "
                             "digits and spaces")])
    fctx = ctx.agent.factors()
    pairing = await blocking(pushpairing.start, fctx, session.user_id, name=name)
    return await _account_page(request, session, pairing=pairing, name=name)


# --------------------------------------------------------------------------- phone side


async def phone_page(request: Request) -> Response:
    return await render(request, "companion/phone.html",
                        pairing=request.url.path == "/companion/pair")


def _error(status: int, message: str, reason: str | None = None) -> JSONResponse:
    return JSONResponse({"ok": False, "message": message, "reason": reason}, status_code=status)


async def _json(request: Request) -> dict | JSONResponse:
    """The JSON body of a phone's POST, or the error response to send."""
    ctx = web(request)
    origin = request.headers.get("origin")
    if origin is not None and origin != ctx.origin:
        return _error(403, "This request came from another site, so it was refused.")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return _error(415, "This request must be sent by the companion page.")
    length = request.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) > MAX_JSON_BYTES:
        return _error(413, "This request is too large.")
    body = await request.body()
    if len(body) > MAX_JSON_BYTES:
        return _error(413, "This request is too large.")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return _error(400, "This request could not be read: reload the page and try again.")
    return data


def _b64(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) > 512:
        raise ValueError("not base64")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


async def _limit(request: Request, scope: str, limit: int, window: float, *,
                 key: str | None = None) -> JSONResponse | None:
    from .core import TooMany

    try:
        await throttle(request, scope, key or client_ip(request), limit, window)
    except TooMany as e:
        minutes = max(1, round(e.retry_after / 60))
        response = _error(429, f"Too many attempts from this phone: wait {minutes} minute"
                               f"{'s' if minutes != 1 else ''} and try again.")
        response.headers["Retry-After"] = str(e.retry_after)
        return response
    return None


async def pair_redeem(request: Request) -> Response:
    if (limited := await _limit(request, "companion-pair", PAIR_LIMIT, PAIR_WINDOW)) is not None:
        return limited
    data = await _json(request)
    if isinstance(data, Response):
        return data
    try:
        public_key = _b64(data.get("public_key"))
    except ValueError:
        return _error(400, "This browser's key could not be read: this browser cannot be paired.")
    fctx = web(request).agent.factors()
    try:
        got = await blocking(pushpairing.redeem, fctx, str(data.get("code", ""))[:64], public_key)
    except FactorError as e:
        return _error(400, e.message)
    return JSONResponse({"ok": True, "device_id": got.device_id, "name": got.method.name,
                         "challenge": base64.b64encode(got.challenge).decode("ascii")})


async def pair_confirm(request: Request) -> Response:
    if (limited := await _limit(request, "companion-pair", PAIR_LIMIT, PAIR_WINDOW)) is not None:
        return limited
    data = await _json(request)
    if isinstance(data, Response):
        return data
    try:
        challenge, signature = _b64(data.get("challenge")), _b64(data.get("signature"))
    except ValueError:
        return _error(400, "The pairing answer could not be read: start pairing again.")
    fctx = web(request).agent.factors()
    try:
        method = await blocking(pushpairing.confirm, fctx, str(data.get("device_id", ""))[:64],
                                challenge, signature)
    except FactorError as e:
        return _error(400, f"The phone could not be paired: {e.message}")
    return JSONResponse({"ok": True, "name": method.name})


async def _signed_device(request: Request) -> pushpairing.CompanionDevice | JSONResponse:
    """The paired phone that signed this request (headers ``X-Companion-*``)."""
    h = request.headers
    try:
        signature = _b64(h.get("x-companion-signature", ""))
    except ValueError:
        signature = b""
    fctx = web(request).agent.factors()
    try:
        return await blocking(
            pushpairing.check_request, fctx, http_method=request.method,
            path=request.url.path, device_id=h.get("x-companion-device", "")[:64],
            timestamp=h.get("x-companion-time", "")[:20], nonce=h.get("x-companion-nonce", "")[:80],
            signature=signature)
    except FactorError as e:
        return _error(401, e.message, e.reason.value)


def _pending_json(fctx: Any, device_id: str) -> list[dict]:
    found = push.pending_for_device(fctx, device_id)
    out = []
    for p in found:
        context = p.context if isinstance(p.context, dict) else {}
        out.append({"id": p.id, "created_at": p.created_at, "expires_at": p.expires_at,
                    "user": str(context.get("username", "")),
                    "network": str(context.get("network", "unknown")),
                    "device": str(context.get("device", "")),
                    "workstation": str(context.get("workstation", ""))})
    return out


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _limit_calls(request: Request, device_id: Any, *,
                       address: bool = True) -> JSONResponse | None:
    """The rate limits of a phone's streams and answers: per address, then per device."""
    limited = (await _limit(request, "companion-address", ADDRESS_LIMIT, CALL_WINDOW)
               if address else None)
    if limited is None and isinstance(device_id, str) and device_id:
        limited = await _limit(request, "companion-device", CALL_LIMIT, CALL_WINDOW,
                               key=device_id[:64])
    return limited


class _Stream(StreamingResponse):
    """A stream that gives its place back (``release``) however it ends, even when the
    client goes before the first byte."""

    def __init__(self, content: Any, release: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def events(request: Request) -> Response:
    global _streams_total
    limited = await _limit_calls(request, request.headers.get("x-companion-device"))
    if limited is not None:
        return limited
    who = await _signed_device(request)
    if isinstance(who, Response):
        return who
    device_id = who.device_id
    if _streams.get(device_id, 0) >= MAX_STREAMS_PER_DEVICE or _streams_total >= MAX_STREAMS:
        response = _error(429, "Too many connections from this phone: close its other "
                               "companion pages.")
        response.headers["Retry-After"] = "5"
        return response
    _streams[device_id] = _streams.get(device_id, 0) + 1
    _streams_total += 1
    released = []

    def release() -> None:
        global _streams_total
        if released:
            return
        released.append(True)
        _streams[device_id] -= 1
        if _streams[device_id] <= 0:
            _streams.pop(device_id, None)
        _streams_total -= 1

    ctx = web(request)
    fctx = ctx.agent.factors()

    async def stream():
        started = time.monotonic()
        last: Any = None
        quiet = started
        yield b"retry: 2000\n\n"
        while time.monotonic() - started < STREAM_SECONDS:
            try:
                pending = await blocking(_pending_json, fctx, device_id)
            except FactorError as e:  # removed meanwhile
                yield _event("unpaired", {"message": e.message, "reason": e.reason.value})
                return
            if pending != last:
                last = pending
                quiet = time.monotonic()
                yield _event("pending", {"now": ctx.now(), "requests": pending})
            elif time.monotonic() - quiet >= KEEPALIVE_SECONDS:
                quiet = time.monotonic()
                yield b": still here\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_SECONDS)
        yield _event("reconnect", {})

    return _Stream(stream(), release)


_RESULTS = {
    push.APPROVED: "You approved the sign-in. Go back to the computer: it is signing you in.",
    push.DENIED: ("You denied the sign-in, so it was stopped. If it was not you trying to sign "
                  "in, tell your IT service desk now: someone may know your password."),
    push.WRONG_NUMBER: ("The number you entered is not the one on the sign-in screen, so the "
                        "sign-in was refused. If it was you, sign in again and enter the number "
                        "shown. If it was not you, tell your IT service desk."),
    push.EXPIRED: "This sign-in request had expired, so nothing was approved. Sign in again.",
}


async def answer(request: Request) -> Response:
    if (limited := await _limit_calls(request, None)) is not None:
        return limited
    data = await _json(request)
    if isinstance(data, Response):
        return data
    if (limited := await _limit_calls(request, data.get("device_id"), address=False)) is not None:
        return limited
    fctx = web(request).agent.factors()
    try:
        signed = push.SignedAnswer.from_json(data)
        state = await blocking(push.submit, fctx, signed)
    except FactorError as e:
        return _error(400, f"Your answer was not accepted: {e.message}.")
    return JSONResponse({"ok": state == push.APPROVED, "state": state,
                         "message": _RESULTS[state]})


ROUTES = [
    Route("/account/push", account_push, methods=["GET"]),
    Route("/account/push/pair", account_pair, methods=["GET", "POST"]),
    Route("/companion", phone_page, methods=["GET"]),
    Route("/companion/pair", phone_page, methods=["GET"]),
    Route("/companion/pair/redeem", pair_redeem, methods=["POST"]),
    Route("/companion/pair/confirm", pair_confirm, methods=["POST"]),
    Route("/companion/events", events, methods=["GET"]),
    Route("/companion/answer", answer, methods=["POST"]),
]
