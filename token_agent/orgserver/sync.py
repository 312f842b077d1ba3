"""The organisation server's routes for offline logins (``ROUTES``, included by
``app.build_app``); every one needs a joined workstation's certificate
(``auth.require_workstation``), and runs its store work in a worker thread.

* ``POST /v1/audit {"events": [...]}`` -> ``{"acknowledged": max_seq}``: the workstation's
  outbox, recorded exactly once (``organisation.ingest``); 400 for a batch of the wrong shape,
  413 past ``MAX_AUDIT_BODY``.
* ``POST /v1/offline/totp {"user"}`` -> the salted slow hashes of the user's
  authenticator-app codes for the offline window (``organisation.totpcache.hashes_for``);
  only for a user who logged in at this workstation before (404 otherwise, as for an
  unknown user: the answer says nothing about who exists).
* ``GET /v1/offline/trust`` -> card trust anchors, intermediates, settings and CRLs
  (``organisation.offline.trust_for``).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import auth


def _agent(request: Request):
    return request.app.state.ctx.agent


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status)


#: the largest body each route reads (a batch of ``outbox.BATCH`` events is far smaller)
MAX_AUDIT_BODY = 8 * 1024 * 1024
MAX_SMALL_BODY = 4096


class _TooLarge(Exception):
    pass


async def _body(request: Request, limit: int) -> Any:
    """The JSON body, never more than ``limit`` bytes in memory (``_TooLarge``); None when
    it is not JSON."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge()
    try:
        return json.loads(body)
    except ValueError:
        return None


def _too_large() -> JSONResponse:
    return _error(413, "too-large", "The request is too large: send fewer events at a time.")


async def post_audit(request: Request) -> JSONResponse:
    from ..organisation.ingest import IngestError, ingest

    workstation = auth.require_workstation(request.scope)
    try:
        body = await _body(request, MAX_AUDIT_BODY)
    except _TooLarge:
        return _too_large()
    if not isinstance(body, dict) or "events" not in body:
        return _error(400, "bad-request", 'Send a JSON object {"events": [...]}.')
    try:
        ack = await run_in_threadpool(ingest, _agent(request), workstation.name, body["events"])
    except IngestError as e:
        return _error(400, "bad-request", f"The batch was not recorded: {e}.")
    return JSONResponse({"acknowledged": ack})


def _totp(agent, workstation: str, username: Any) -> dict[str, Any] | None:
    from ..organisation.totpcache import hashes_for
    from ..store import UnknownUser

    if not isinstance(username, str) or not username:
        return None
    try:
        user = agent.store.get_user(username)
    except UnknownUser:
        return None
    if user.disabled or not agent.store.has_sighting(user.id, "device", workstation):
        return None
    return hashes_for(agent, user)


async def post_offline_totp(request: Request) -> JSONResponse:
    workstation = auth.require_workstation(request.scope)
    try:
        body = await _body(request, MAX_SMALL_BODY)
    except _TooLarge:
        return _too_large()
    if not isinstance(body, dict):
        return _error(400, "bad-request", 'Send a JSON object {"user": NAME}.')
    data = await run_in_threadpool(_totp, _agent(request), workstation.name, body.get("user"))
    if data is None:
        return _error(404, "unknown-user", "No such user has logged in at this workstation: "
                                           "log in online first.")
    return JSONResponse(data)


async def get_offline_trust(request: Request) -> JSONResponse:
    from ..organisation.offline import trust_for

    auth.require_workstation(request.scope)
    return JSONResponse(await run_in_threadpool(trust_for, _agent(request)))


ROUTES = [
    Route("/v1/audit", post_audit, methods=["POST"]),
    Route("/v1/offline/totp", post_offline_totp, methods=["POST"]),
    Route("/v1/offline/trust", get_offline_trust, methods=["GET"]),
]
