"""Joining an organisation, the workstation's side (``token-agent workstation join``), and
what a joined workstation knows of itself (``workstation status``).

A join token is ``<secret>.<SHA-256 of the organisation CA's certificate, hex>`` (kubeadm's
way): the workstation fetches the CA from the server (``GET /v1/ca``, over TLS it cannot
check yet), accepts it only when its hash is the token's, and from then on trusts that CA
alone: the join itself (``POST /v1/join``) goes over TLS verified against it, so the token is
never sent to a server that is not the organisation's. The key pair is made here (EC P-256)
and never leaves; the CSR goes to the server, which issues ``CN=<name>``. The key (0600),
the certificate and the CA are written under the organisation directory only once the
certificate is back and checked: a failed join leaves the previous files as they were.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets as _secrets
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import secretbox
from ..orgconfig import WS_CA_FILE, WS_CERT_FILE, WS_KEY_FILE, server_url_problem
from . import pki
from .client import USER_AGENT, OrgClient, failure_reason, client_ssl_context
from .errors import JoinError, ServerRefused, ServerUnavailable


def make_join_token(ca_hash: str) -> tuple[str, bytes]:
    """A new join token and the SHA-256 of its secret (all the server's store keeps)."""
    secret = _secrets.token_urlsafe(32)
    return f"{secret}.{ca_hash}", token_digest(secret)


def token_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_join_token(token: Any) -> tuple[str, str]:
    """(secret, CA hash) of a token; ``ValueError`` when it is not one."""
    if not isinstance(token, str):
        raise ValueError("the join token is missing")
    secret, dot, ca_hash = token.strip().rpartition(".")
    if not dot or not 32 <= len(secret) <= 128 or len(ca_hash) != 64 \
            or any(c not in "0123456789abcdef" for c in ca_hash.lower()):
        raise ValueError("this is not a join token: it looks like SECRET.CAHASH (64 hex "
                         "digits after the dot), exactly as `token-agent server "
                         "workstation-token` printed it")
    return secret, ca_hash.lower()


def _https(server: str, ctx: ssl.SSLContext, method: str, path: str, body: dict | None,
           timeout: float) -> tuple[int, Any]:
    parts = urlsplit(server)
    conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout,
                                       context=ctx)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read(1 << 20)
    except (OSError, http.client.HTTPException) as e:
        raise ServerUnavailable([(server, failure_reason(e))]) from None
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, None


def _checked(server: str, status: int, obj: Any) -> dict:
    if 200 <= status < 300 and isinstance(obj, dict):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        raise ServerRefused(status, obj["error"], str(obj.get("message") or obj["error"]),
                            server=server)
    raise ServerRefused(status, f"http-{status}", f"{server} answered HTTP {status}: is it an "
                        "organisation's token-agent server?", server=server)


def join_organisation(server: str, token: str, org_dir: str | os.PathLike[str], *,
                      timeout: float = 10.0) -> dict[str, Any]:
    """Join through ``server`` with ``token``; writes the key, certificate and CA under
    ``org_dir`` (made 0700 when missing). Returns what was joined. Raises ``JoinError``,
    ``ServerUnavailable``, ``ServerRefused`` (e.g. ``join-token-used``), ``OSError``."""
    if problem := server_url_problem(server):
        raise JoinError(f"--server {server!r} {problem}")
    server = server.rstrip("/")
    try:
        secret, ca_hash = split_join_token(token)
    except ValueError as e:
        raise JoinError(str(e)) from None
    # 1. the CA, over TLS not yet verified, pinned by the token's hash
    blind = ssl.create_default_context()
    blind.check_hostname = False
    blind.verify_mode = ssl.CERT_NONE
    answer = _checked(server, *_https(server, blind, "GET", "/v1/ca", None, timeout))
    ca_text = answer.get("ca")
    try:
        ca_cert = pki.load_cert(ca_text if isinstance(ca_text, str) else "")
    except pki.PkiError as e:
        raise JoinError(f"{server} did not send a CA certificate ({e})") from None
    if not secretbox.equal(pki.ca_hash(ca_cert), ca_hash):
        raise JoinError(f"the CA of {server} is not the one this join token names: this is "
                        "not your organisation's server, or the token is for another "
                        "organisation. Nothing was sent; check the server's address and the "
                        "token with the administrator")
    ca_pem = pki.cert_pem(ca_cert)
    # 2. the join, over TLS verified against that CA
    verified = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    verified.minimum_version = ssl.TLSVersion.TLSv1_2
    key = pki.make_key()
    csr = pki.csr_pem(pki.make_csr(key, "workstation"))
    try:
        status, obj = _https(server, verified, "POST", "/v1/join",
                             {"token": f"{secret}.{ca_hash}", "csr": csr}, timeout)
    except ServerUnavailable as e:
        reason = e.attempts[0][1] if e.attempts else "no answer"
        raise ServerUnavailable(e.attempts, f"The join through {server} failed ({reason}); "
                                "the token was not used if the server never answered: try "
                                "again") from None
    answer = _checked(server, status, obj)
    try:
        cert = pki.load_cert(answer.get("certificate") or "")
    except pki.PkiError as e:
        raise JoinError(f"{server} sent no certificate ({e})") from None
    if not pki.issued_by(cert, ca_cert):
        raise JoinError(f"the certificate {server} sent was not issued by its CA")
    try:
        pki.check_key_matches(key, cert, what="the certificate the server sent")
    except pki.PkiError as e:
        raise JoinError(str(e)) from None
    # 3. the files, only now
    directory = Path(org_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki.write_key(directory / WS_KEY_FILE, key)
    pki.write_cert(directory / WS_CERT_FILE, cert)
    pki.write_cert(directory / WS_CA_FILE, ca_cert)
    return {"name": pki.common_name(cert), "server": server, "dir": str(directory),
            "fingerprint": pki.fingerprint(cert), "ca_hash": pki.ca_hash(ca_cert),
            "not_after": cert.not_valid_after_utc.timestamp()}


def workstation_status(config: Any, data_dir: str | os.PathLike[str], *,
                       check: bool = True) -> dict[str, Any]:
    """This workstation's membership: its organisation's servers, its certificate (name,
    fingerprint, expiry) and, with ``check``, what each server says of it (``GET
    /v1/whoami``: ``ok``, the refusal's code, or ``unreachable`` with the reason)."""
    org = config.organisation
    directory = org.directory(data_dir)
    out: dict[str, Any] = {"organisation": org.enabled, "servers": list(org.servers),
                           "dir": str(directory), "joined": False}
    cert_file = directory / WS_CERT_FILE
    if cert_file.is_file() and (directory / WS_KEY_FILE).is_file():
        try:
            cert = pki.read_cert(cert_file)
            ca = pki.read_cert(directory / WS_CA_FILE)
        except pki.PkiError as e:
            out["problem"] = str(e)
        else:
            out.update(joined=True, name=pki.common_name(cert),
                       fingerprint=pki.fingerprint(cert), ca_hash=pki.ca_hash(ca),
                       not_after=cert.not_valid_after_utc.timestamp())
    if check and out["joined"] and org.enabled:
        ctx = client_ssl_context(directory / WS_CA_FILE, cert_file, directory / WS_KEY_FILE)
        checks = []
        for server in org.servers:
            client = OrgClient([server], ssl_context=ctx, timeout=org.timeout)
            try:
                who = client.request("GET", "/v1/whoami")
                checks.append({"server": server, "state": "ok",
                               "workstation": who.get("workstation")})
            except ServerRefused as e:
                checks.append({"server": server, "state": e.error, "message": e.message})
            except ServerUnavailable as e:
                checks.append({"server": server, "state": "unreachable",
                               "message": e.attempts[0][1] if e.attempts else str(e)})
        out["checks"] = checks
    return out
