"""Browser sessions of the web pages, kept in the store (``store/websessions.py``) so any
replica serves them.

Cookies (all ``Secure; HttpOnly; SameSite=Strict; Path=/`` with the ``__Host-`` prefix, so no
other host or path can set or read them):

* ``__Host-ta_session``: the signed-in session's token (32 random bytes, base64url); the store
  keeps its SHA-256 only. A session ends after ``[web] idle_minutes`` unused (15) and
  ``absolute_hours`` after sign-in (8), whatever its use; signing out deletes it.
* ``__Host-ta_pre``: before sign-in, the token the pre-sign-in forms' CSRF token is derived
  from (``WebContext.csrf_for``), and the key of a sign-in in progress.
* ``__Host-ta_device``: a long-lived random id of this browser (a year), so that the policy
  knows a device seen before (unusual sign-ins, re-verification every N hours).

A new session always gets a new token (no fixation), and its own CSRF token.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from .. import reauth
from ..store import UnknownUser

log = logging.getLogger("token_agent.web")

COOKIE = "__Host-ta_session"
PRE_COOKIE = "__Host-ta_pre"
DEVICE_COOKIE = "__Host-ta_device"
DEVICE_MAX_AGE = 365 * 86400
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")
#: the last-seen time is written at most this often (seconds)
TOUCH_INTERVAL = 30.0


def new_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def valid_token(token: str | None) -> bool:
    return isinstance(token, str) and bool(_TOKEN_RE.fullmatch(token))


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


@dataclass
class WebSession:
    """A signed-in browser session: its user, its last sign-in that counts for
    re-authentication (``auth``), its CSRF token and page state (``data``)."""

    id_hash: bytes
    user: Any  # token_agent.store.User
    csrf: str
    created_at: float
    auth: reauth.Authenticated
    data: dict

    @property
    def user_id(self) -> str:
        return self.user.id

    @property
    def id(self) -> str:
        """A short, non-secret id for logs."""
        return self.id_hash.hex()[:12]


def open_session(ctx: Any, token: str) -> WebSession | None:
    """The live session of ``token`` (blocking), or None: unknown, idle too long, past its
    absolute lifetime, or its user removed or disabled (the row is then deleted)."""
    store = ctx.store
    id_hash = token_hash(token)
    row = store.get_web_session(id_hash)
    if row is None:
        return None
    now = ctx.now()
    settings = ctx.settings
    idle = float(settings.idle_minutes) * 60.0
    absolute = float(settings.absolute_hours) * 3600.0
    if now - row.last_seen_at > idle or now - row.created_at > absolute or now < row.created_at:
        store.end_web_session(id_hash)
        return None
    try:
        user = store.get_user_by_id(row.user_id)
    except UnknownUser:
        user = None
    if user is None or user.disabled:
        store.end_web_session(id_hash)
        return None
    if now - row.last_seen_at >= TOUCH_INTERVAL:
        store.touch_web_session(id_hash, now)
    auth = reauth.Authenticated(user.username, user.id, row.multi_factor, row.method,
                                row.auth_at)
    return WebSession(id_hash, user, row.csrf, row.created_at, auth, row.data)


def start_session(ctx: Any, user: Any, *, multi_factor: bool, method: str,
                  address: str | None, user_agent: str | None) -> str:
    """A new signed-in session of ``user`` (blocking): returns its cookie's token."""
    token = new_token()
    ctx.store.add_web_session(token_hash(token), user.id, csrf=secrets.token_hex(24),
                              now=ctx.now(), multi_factor=multi_factor, method=method,
                              address=address, user_agent=user_agent)
    return token


def set_cookie(response: Response, name: str, value: str, *, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=True,
                        samesite="strict")


def clear_cookie(response: Response, name: str) -> None:
    response.delete_cookie(name, path="/", secure=True, httponly=True, samesite="strict")


def ensure_device_cookie(request: Any, response: Response) -> None:
    if not valid_token(request.cookies.get(DEVICE_COOKIE)):
        set_cookie(response, DEVICE_COOKIE, new_token(), max_age=DEVICE_MAX_AGE)
