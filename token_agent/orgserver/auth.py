"""Which workstation is asking: its client certificate (the TLS extension ``tlsext.py``
puts in the scope), found by its SHA-256 fingerprint in the store, refused when unknown or
revoked. ``WorkstationAuth`` (ASGI middleware, in ``app.build_app``) does it for every
request except ``PUBLIC_PATHS``, before any route runs: an HTTP request is answered 403 with
``{"error": "client-certificate-required" | "workstation-unknown" | "workstation-revoked",
"message": ...}``; a WebSocket is accepted and closed at once with code 4403 and the error as
its reason. Routes read the workstation with ``require_workstation(scope)``
(``request.scope``, ``websocket.scope``)."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..organisation import pki
from ..store import StoreError, Workstation

log = logging.getLogger(__name__)

#: paths served without a client certificate: joining, the CA a joining workstation pins,
#: and the load balancers' health check (and the people's pages: ``web.is_public``)
PUBLIC_PATHS = frozenset({"/v1/join", "/v1/ca", "/v1/health"})
#: the WebSocket close code of a refused workstation
WS_REFUSED = 4403
SCOPE_KEY = "token_agent.workstation"


def unavailable_body() -> dict:
    """The 503 answer of a replica whose store cannot be used (clients try another)."""
    return {"error": "store-unavailable",
            "message": "The organisation's server cannot reach its store now; try again "
                       "later or another server."}

_MESSAGES = {
    "client-certificate-required": "This request needs the workstation's certificate: join "
                                   "the organisation first (token-agent workstation join).",
    "workstation-unknown": "This workstation's certificate is not known to the organisation: "
                           "ask its administrator for a join token and join again.",
    "workstation-revoked": "This workstation was revoked by the organisation's administrator: "
                           "ask them for a new join token to join again.",
}


class WorkstationRefused(Exception):
    """The request has no acceptable workstation certificate; ``error`` is the stable code."""

    def __init__(self, error: str, message: str | None = None) -> None:
        self.error = error
        self.message = message or _MESSAGES[error]
        super().__init__(self.message)


def client_certificate(scope: dict) -> str | None:
    """The client certificate's PEM from the TLS extension, or None."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return chain[0] if chain else None


def lookup_workstation(ctx: Any, scope: dict) -> Workstation:
    """The workstation of the scope's certificate (blocking: runs the store's query), its
    last-seen time updated at most once a minute by this replica. ``WorkstationRefused``."""
    pem = client_certificate(scope)
    if pem is None:
        raise WorkstationRefused("client-certificate-required")
    found = ctx.store.workstation_by_fingerprint(pki.fingerprint(pem))
    if found is None:
        raise WorkstationRefused("workstation-unknown")
    if found.revoked:
        raise WorkstationRefused("workstation-revoked")
    now = ctx.clock()
    with ctx._touch_lock:
        due = now - ctx._touched.get(found.id, 0.0) >= 60.0
        if due:
            ctx._touched[found.id] = now
    if due:
        client = scope.get("client")
        try:
            ctx.store.touch_workstation(found.id, now, client[0] if client else None)
        except Exception as e:  # noqa: BLE001  (last-seen is a convenience, never a refusal)
            log.warning("could not record that workstation %s was seen: %s", found.name, e)
    return found


def require_workstation(scope: dict) -> Workstation:
    """The workstation ``WorkstationAuth`` found for this request (``WorkstationRefused``
    when there is none: a route outside the middleware's care)."""
    found = scope.get(SCOPE_KEY)
    if found is None:
        raise WorkstationRefused("client-certificate-required")
    return found


async def _send_json(send: Any, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _web_path(path: str) -> bool:
    """A path of the people's pages (``token_agent.web``): browsers have no workstation
    certificate; the pages check who is asking themselves."""
    from ..web import is_public

    return is_public(path)


class WorkstationAuth:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: Any, ctx: Any) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or (
                scope["type"] == "http" and (scope.get("path") in PUBLIC_PATHS
                                             or _web_path(scope.get("path", "")))):
            await self.app(scope, receive, send)
            return
        try:
            scope[SCOPE_KEY] = await run_in_threadpool(lookup_workstation, self.ctx, scope)
        except StoreError as e:
            log.error("cannot check a workstation's certificate: %s", e)
            if scope["type"] == "http":
                await _send_json(send, 503, unavailable_body())
            else:
                message = await receive()
                if message["type"] == "websocket.connect":  # an HTTP 503: clients fail over
                    data = json.dumps(unavailable_body()).encode()
                    await send({"type": "websocket.http.response.start", "status": 503,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(data)).encode())]})
                    await send({"type": "websocket.http.response.body", "body": data})
            return
        except WorkstationRefused as e:
            client = scope.get("client")
            log.info("refused %s %s from %s: %s", scope["type"], scope.get("path"),
                     client[0] if client else "?", e.error)
            if scope["type"] == "http":
                await _send_json(send, 403, {"error": e.error, "message": e.message})
            else:
                message = await receive()
                if message["type"] == "websocket.connect":
                    await send({"type": "websocket.accept"})
                    await send({"type": "websocket.close", "code": WS_REFUSED,
                                "reason": e.error})
            return
        await self.app(scope, receive, send)
