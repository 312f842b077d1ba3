"""``GET /v1/health`` (no client certificate: load balancers and tests): 200 ``{"ok": true,
"server": ..., "schema_version": ...}`` when this replica can use its store, else 503
``{"error": "store-unavailable"}``. ``WebSocket /v1/ping`` (mTLS): answers each
``{"ping": X}`` with ``{"pong": X, "server": ...}``: the channel path, checked end to end."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import __version__
from ..store import StoreError
from .auth import require_workstation, unavailable_body


async def health(request: Request) -> JSONResponse:
    ctx = request.app.state.ctx
    try:
        version = await run_in_threadpool(lambda: ctx.store.schema_version)
    except StoreError:
        return JSONResponse(unavailable_body(), status_code=503)
    return JSONResponse({"ok": True, "server": ctx.server_id, "version": __version__,
                         "schema_version": version})


async def ping(websocket: WebSocket) -> None:
    ws = require_workstation(websocket.scope)
    server = websocket.app.state.ctx.server_id
    await websocket.accept()
    try:
        while True:
            try:
                message = await websocket.receive_json()
            except ValueError:
                message = None
            if not isinstance(message, dict) or "ping" not in message:
                await websocket.close(code=1003, reason="expected {\"ping\": ...}")
                return
            await websocket.send_json({"pong": message["ping"], "server": server,
                                       "workstation": ws.name})
    except WebSocketDisconnect:
        return


ROUTES = [
    Route("/v1/health", health, methods=["GET"]),
    WebSocketRoute("/v1/ping", ping),
]
