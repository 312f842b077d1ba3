"""Joining: ``GET /v1/ca`` (the workstation CA, which a joining workstation checks against
the hash in its token before it trusts this server), ``POST /v1/join {"token", "csr"}``
(no client certificate: the one-time token is the credential) and ``GET /v1/whoami`` (mTLS:
the workstation the server sees).

A join token is ``<secret>.<SHA-256 of the CA certificate, hex>``; the store keeps the
secret's SHA-256 only. The join checks the CA hash (constant-time), the CSR (signature, key
type), then consumes the token and records the certificate in one transaction: a token is
used once (a conditional UPDATE, whichever replica), and a join that fails leaves it
unused. The certificate's subject is ``CN=<the name the token was issued for>``, never what
the CSR asks for."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import secretbox
from ..organisation import pki
from ..organisation.joining import make_join_token, split_join_token, token_digest
from ..store import JoinTokenRefused
from .auth import require_workstation

log = logging.getLogger(__name__)

MAX_BODY = 16384
DEFAULT_TOKEN_HOURS = 24.0
MAX_TOKEN_HOURS = 24.0 * 30


def issue_join_token(store: Any, ca_hash: str, name: str, hours: float = DEFAULT_TOKEN_HOURS,
                     *, now: float | None = None) -> tuple[str, Any]:
    """A one-time join token for ``name``, valid ``hours``, recorded hashed with an audit
    event: (token, Workstation). ``WorkstationExists``, ``InvalidValue``, ``ValueError``."""
    if not 0 < hours <= MAX_TOKEN_HOURS:
        raise ValueError(f"a join token is valid for more than 0 and at most "
                         f"{MAX_TOKEN_HOURS:g} hours")
    token, digest = make_join_token(ca_hash)
    now = time.time() if now is None else now
    with store.transaction():
        ws = store.add_join_token(name, digest, now + hours * 3600)
        store.record_event("workstation.token", outcome="success",
                           detail={"workstation": ws.name, "hours": hours})
    return token, ws


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status)


async def ca(request: Request) -> JSONResponse:
    ctx = request.app.state.ctx
    return JSONResponse({"ca": ctx.ca_pem, "ca_hash": ctx.ca_hash})


def _join(ctx: Any, digest: bytes, csr: Any, address: str | None) -> dict:
    store = ctx.store
    now = ctx.clock()
    try:
        with store.transaction():
            ws = store.claim_join_token(digest, now)
            cert = pki.issue_workstation_cert(ctx.ca_key, ctx.ca_cert, csr, ws.name)
            ws = store.complete_join(ws.id, cert_serial=format(cert.serial_number, "x"),
                                     cert_fingerprint=pki.fingerprint(cert),
                                     cert_not_after=cert.not_valid_after_utc.timestamp(),
                                     now=now)
            store.record_event("workstation.join", outcome="success",
                               detail={"workstation": ws.name, "address": address,
                                       "serial": ws.cert_serial,
                                       "fingerprint": ws.cert_fingerprint})
    except JoinTokenRefused as e:
        store.record_event("workstation.join", outcome="refused",
                           detail={"reason": f"token {e.reason}", "address": address})
        raise
    log.info("workstation %s joined from %s", ws.name, address)
    return {"name": ws.name, "certificate": pki.cert_pem(cert).decode("ascii"),
            "ca": ctx.ca_pem}


async def join(request: Request) -> JSONResponse:
    ctx = request.app.state.ctx
    body = b""
    async for chunk in request.stream():  # never more than MAX_BODY in memory
        body += chunk
        if len(body) > MAX_BODY:
            return _error(413, "too-large", "The join request is too large.")
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError
    except ValueError:
        return _error(400, "bad-request", "The join request must be a JSON object with "
                                          "\"token\" and \"csr\".")
    try:
        secret, ca_hash = split_join_token(data.get("token"))  # type: ignore[arg-type]
    except ValueError as e:
        return _error(400, "bad-token", str(e))
    if not secretbox.equal(ca_hash, ctx.ca_hash):
        return _error(403, "join-token-wrong-ca",
                      "This join token was made for another organisation's CA: ask this "
                      "server's administrator for a token.")
    try:
        csr = pki.load_csr(data.get("csr"))  # type: ignore[arg-type]
    except pki.PkiError as e:
        return _error(400, "bad-csr", f"The certificate signing request is refused: {e}.")
    digest = token_digest(secret)
    client = request.client
    try:
        answer = await run_in_threadpool(_join, ctx, digest, csr,
                                         client.host if client else None)
    except JoinTokenRefused as e:
        return _error(403, f"join-token-{e.reason}", str(e)[:1].upper() + str(e)[1:] + ".")
    return JSONResponse(answer)


async def whoami(request: Request) -> JSONResponse:
    ws = require_workstation(request.scope)
    return JSONResponse({"workstation": ws.name, "joined_at": ws.joined_at,
                         "server": request.app.state.ctx.server_id})


ROUTES = [
    Route("/v1/ca", ca, methods=["GET"]),
    Route("/v1/join", join, methods=["POST"]),
    Route("/v1/whoami", whoami, methods=["GET"]),
]
