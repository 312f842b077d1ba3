"""Webhooks: machines reporting to the organisation server (no browser, no session, no CSRF
token: each is authenticated by its own signature).

``POST /hooks/voice``: the voice gateway's result of a phone call approval ("press #"),
signed with the secret of ``[delivery.voice] webhook_secret_file``
(``X-Token-Agent-Signature: t=<unix>,v1=<hex HMAC-SHA256>``). Everything is decided by
``token_agent.factors.voicecall.handle_webhook``; this page reads the body (at most
``voicecall.MAX_BODY`` bytes) and answers JSON: ``200 {"state": ...}``, or a 4xx
``{"error": CODE, "message": ...}`` (stale, bad signature, malformed, unknown call, a call
already finished, too large). At most ``PER_MINUTE`` requests a minute from one address
(``429 {"error": "too-many"}``): refusals are audited, and the audit log must not be a
stranger's to fill.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..factors import voicecall
from .core import TooMany, blocking, client_ip, throttle, web

PER_MINUTE = 120


async def _body(request: Request) -> bytes | None:
    """The body, or None when it is larger than the webhook allows (read no further)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > voicecall.MAX_BODY):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > voicecall.MAX_BODY:
            return None
    return body


async def voice(request: Request) -> JSONResponse:
    try:
        await throttle(request, "hooks-voice", client_ip(request), PER_MINUTE, 60.0)
    except TooMany as e:
        return JSONResponse({"error": "too-many", "message": "too many requests from this "
                             f"address: wait {e.retry_after} s"}, status_code=429,
                            headers={"Retry-After": str(e.retry_after)})
    body = await _body(request)
    if body is None:
        e = voicecall.WebhookError(413, "too-large",
                                   f"the body is larger than {voicecall.MAX_BODY} bytes")
        return JSONResponse(e.to_json(), status_code=e.status)
    ctx = web(request).agent.factors()
    try:
        state = await blocking(voicecall.handle_webhook, ctx,
                               request.headers.get(voicecall.SIGNATURE_HEADER), body)
    except voicecall.WebhookError as e:
        return JSONResponse(e.to_json(), status_code=e.status)
    return JSONResponse({"state": state})


ROUTES = [Route("/hooks/voice", voice, methods=["POST"])]
