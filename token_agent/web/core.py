"""What every page of the organisation's web front end uses: the context, rendering, forms
with their CSRF check, the signed-in session, re-authentication, rate limits and redirects.

Pages are thin: a handler reads the form (``read_form``), calls a library function of
``token_agent`` (``admin_ops``, ``factors``, ``accounts``, ``reauth``, the login flow) in a
worker thread (``blocking``), and renders a template (``render``). The rules that matter for
security are here once:

* ``read_form``: every POST. The form's ``csrf_token`` must be the session's (signed in) or,
  before sign-in, the keyed hash of the pre-sign-in cookie (double submit, bound to the
  server's key); an ``Origin`` header, when the browser sends one, must be the pages' origin.
  Bodies are limited to 64 KiB and 200 fields.
* ``require_user`` / ``require_admin`` / ``require_recent_auth``: who may see a page, and
  a sign-in recent and strong enough (``token_agent.reauth``) before any change to methods.
* ``throttle``: rate limits counted in the store, so every replica shares them.

Errors become pages through the exception handlers of ``EXCEPTION_HANDLERS`` (wired by
``orgserver/app.py``): ``SignInRequired`` and ``ReauthNeeded`` redirect, ``Refused`` renders
a 403 page, ``TooMany`` a 429 page with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, unquote, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from .. import reauth
from . import sessions

log = logging.getLogger("token_agent.web")

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
#: the largest form body accepted (bytes) and the most fields
MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 200
SERVICE_NAME = "Sign-in and security"
FLASH_COOKIE = "__Host-ta_flash"


class SignInRequired(Exception):
    """No signed-in session (or it expired): the sign-in page, then back to ``next``."""

    def __init__(self, next_url: str = "/account", expired: bool = False) -> None:
        super().__init__(next_url)
        self.next_url = next_url
        self.expired = expired


class ReauthNeeded(Exception):
    """A change of methods needs a fresh sign-in (``token_agent.reauth``)."""

    def __init__(self, next_url: str, message: str) -> None:
        super().__init__(message)
        self.next_url = next_url
        self.message = message


class Refused(Exception):
    """A 403 (or other status) page: ``heading`` and a sentence saying what to do."""

    def __init__(self, heading: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.heading = heading
        self.message = message
        self.status = status


class TooMany(Exception):
    """A rate limit reached: try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:.0f} s")
        self.retry_after = max(1, int(retry_after + 0.999))


@dataclass
class WebContext:
    """One per server replica (``request.app.state.web``)."""

    agent: Any
    settings: Any  # token_agent.webconfig.WebConfig
    origin: str
    rp_id: str
    templates: Environment = field(init=False)
    clock: Callable[[], float] = time.time
    #: sign-ins in progress (``conversation.Conversations``), set by ``signin``
    conversations: Any = None

    def __post_init__(self) -> None:
        self.templates = Environment(loader=FileSystemLoader(str(TEMPLATES)),
                                     autoescape=select_autoescape(("html", "xml")),
                                     trim_blocks=True, lstrip_blocks=True)
        from .conversation import Conversations

        self.conversations = Conversations(
            limit=int(self.settings.max_signins),
            answer_timeout=float(self.settings.signin_minutes) * 60.0)

    @property
    def store(self) -> Any:
        return self.agent.store

    @property
    def organisation(self) -> str:
        return str(self.agent.issuer)

    def now(self) -> float:
        return float(self.clock())

    def csrf_for(self, pre_token: str) -> str:
        """The pre-sign-in forms' CSRF token: a keyed hash of the pre-sign-in cookie."""
        return self.agent.keys.code_hash("web-csrf", pre_token).hex()[:48]


def web(request: Request) -> WebContext:
    return request.app.state.web


async def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run blocking library work (the store, the login flow) in a worker thread."""
    return await run_in_threadpool(fn, *args, **kwargs)


def client_ip(request: Request) -> str:
    client = request.client
    return client.host if client else "unknown"


def device(request: Request) -> Any:
    """Where a browser sign-in happens: an unmanaged device (a browser is not a managed
    workstation), known by the long-lived device cookie, on the client's address."""
    from ..ceremonies.login import Device

    token = request.cookies.get(sessions.DEVICE_COOKIE)
    device_id = ("browser-" + hashlib.sha256(token.encode()).hexdigest()[:32]
                 if sessions.valid_token(token) else None)
    return Device(kind="unmanaged", device_id=device_id, network=client_ip(request))


def safe_next(value: str | None, default: str = "/account") -> str:
    """A local path to go on to after sign-in (never another site: no scheme, no //)."""
    if (not value or not value.startswith("/") or value.startswith("//")
            or "\\" in value or len(value) > 512 or any(ord(c) < 32 for c in value)):
        return default
    return value


# --------------------------------------------------------------------------- sessions

async def current_session(request: Request) -> "sessions.WebSession | None":
    """The signed-in session of the request (read once per request), or None."""
    if "web_session" not in request.state._state:
        token = request.cookies.get(sessions.COOKIE)
        ctx = web(request)
        found = None
        if sessions.valid_token(token):
            found = await blocking(sessions.open_session, ctx, token)
        request.state.web_session = found
        request.state.web_session_expired = found is None and token is not None
    return request.state.web_session


async def require_user(request: Request) -> "sessions.WebSession":
    found = await current_session(request)
    if found is None:
        raise SignInRequired(_here(request), expired=bool(request.state.web_session_expired))
    return found


async def require_admin(request: Request) -> "sessions.WebSession":
    found = await require_user(request)
    if "admin" not in found.user.roles:
        ctx = web(request)
        await blocking(ctx.store.record_event, "web.admin-refused", outcome="refused",
                       user_id=found.user.id, username=found.user.username,
                       detail={"path": request.url.path, "address": client_ip(request)})
        raise Refused("You cannot use this page",
                      "The administration pages are for your organisation's administrators. "
                      "If you need one of them, ask your IT service desk.")
    return found


async def require_recent_auth(request: Request, session: "sessions.WebSession") -> str:
    """``reauth.check`` with the session's last sign-in; ``ReauthNeeded`` (a redirect to
    ``/account/reauth``) when it is too old, or one factor where MFA applies."""
    ctx = web(request)
    auth = session.auth

    def check() -> str:
        return reauth.check(ctx.agent, session.user, auth, now=ctx.now(),
                            where="in this browser", hint="confirm it is you")

    try:
        return await blocking(check)
    except reauth.ReauthRequired as e:
        raise ReauthNeeded(_here(request), str(e)) from None


def _here(request: Request) -> str:
    path = request.url.path
    if request.method != "GET":
        return safe_next(path)
    return safe_next(path + (f"?{request.url.query}" if request.url.query else ""))


# --------------------------------------------------------------------------- forms

async def read_form(request: Request) -> dict[str, str]:
    """The POSTed form as a dict (a field given twice: its last value), with its CSRF token
    and origin checked; raises ``Refused`` (403) or ``SignInRequired`` (an expired session)."""
    ctx = web(request)
    origin = request.headers.get("origin")
    if origin is not None and origin != ctx.origin and origin != "null":
        raise Refused("This form was sent from another site",
                      "For your safety this page only accepts forms from its own address. "
                      "Open the page again and try once more.")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
        raise Refused("This form is too large", "Go back, check what you typed and try again.",
                      status=413)
    try:
        form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
    except Exception:  # noqa: BLE001  (a malformed body: a clear page, never a 500)
        raise Refused("This form could not be read", "Go back, reload the page and try "
                      "again.", status=400) from None
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    sent = values.pop("csrf_token", "")
    session = await current_session(request)
    if session is not None:
        expected = session.csrf
    else:
        pre = request.cookies.get(sessions.PRE_COOKIE)
        expected = ctx.csrf_for(pre) if sessions.valid_token(pre) else None
        if expected is None or not hmac.compare_digest(sent.encode(), expected.encode()):
            if request.state.web_session_expired:
                raise SignInRequired(safe_next(request.url.path), expired=True)
    if expected is None or not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
        log.info("refused a form without a valid CSRF token: %s %s from %s", request.method,
                 request.url.path, client_ip(request))
        raise Refused("This form has expired",
                      "This form has expired: go back, reload the page and try again.")
    return values


# --------------------------------------------------------------------------- rendering

async def render(request: Request, template: str, *, status: int = 200,
                 errors: list[tuple[str | None, str]] | None = None, **values: Any) -> HTMLResponse:
    """The page ``template`` with the values every page has (see the module docstring)."""
    ctx = web(request)
    session = await current_session(request)
    pre_new = None
    if session is not None:
        csrf = session.csrf
    else:
        pre = request.cookies.get(sessions.PRE_COOKIE)
        if not sessions.valid_token(pre):
            pre = pre_new = sessions.new_token()
        csrf = ctx.csrf_for(pre)
    flash = request.cookies.get(FLASH_COOKIE)
    page = ctx.templates.get_template(template).render(
        request=request, user=session.user if session else None, session=session,
        csrf_token=csrf, flash=unquote(flash)[:512] if flash else None,
        is_admin=bool(session and "admin" in session.user.roles), errors=errors or [],
        service_name=SERVICE_NAME, organisation=ctx.organisation, **values)
    response = HTMLResponse(page, status_code=status)
    if pre_new is not None:
        sessions.set_cookie(response, sessions.PRE_COOKIE, pre_new, max_age=None)
    if flash:
        response.delete_cookie(FLASH_COOKIE, path="/", secure=True, httponly=True,
                               samesite="strict")
    sessions.ensure_device_cookie(request, response)
    return response


def redirect(url: str, flash: str | None = None) -> RedirectResponse:
    """A 303 to ``url`` (a local path), with a message shown once on the next page."""
    response = RedirectResponse(safe_next(url, "/account"), status_code=303)
    if flash:
        response.set_cookie(FLASH_COOKIE, quote(flash[:512]), path="/", secure=True,
                            httponly=True, samesite="strict")
    return response


async def page_error(request: Request, heading: str, message: str, status: int,
                     link: tuple[str, str] | None = None) -> HTMLResponse:
    return await render(request, "errors/page.html", status=status, heading=heading,
                        message=message, link=link)


# --------------------------------------------------------------------------- rate limits

async def throttle(request: Request, scope: str, key: str, limit: int,
                   per_seconds: float) -> None:
    """Count one attempt of ``scope`` for ``key`` (hashed: user names and addresses are not
    kept as typed); ``TooMany`` past ``limit`` in the window of ``per_seconds``."""
    ctx = web(request)
    digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
    now = ctx.now()
    count, started = await blocking(ctx.store.hit_throttle, scope, digest, now=now,
                                    window=per_seconds)
    if secrets.randbelow(200) == 0:  # now and then: forget finished windows (bounded table)
        await blocking(ctx.store.purge_throttle, now - 86400.0)
    if count > limit:
        log.info("rate limit %s reached (%d in %.0f s) from %s", scope, count, per_seconds,
                 client_ip(request))
        raise TooMany(started + per_seconds - now)


# --------------------------------------------------------------------------- error pages

async def _signin_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    query = {"next": exc.next_url}
    if exc.expired:
        query["expired"] = "1"
    response = RedirectResponse("/account/sign-in?" + urlencode(query), status_code=303)
    if exc.expired:
        sessions.clear_cookie(response, sessions.COOKIE)
    return response


async def _reauth_needed(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ReauthNeeded)
    return RedirectResponse("/account/reauth?" + urlencode({"next": exc.next_url}),
                            status_code=303)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return await page_error(request, exc.heading, exc.message, exc.status)


async def _too_many(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TooMany)
    minutes = max(1, round(exc.retry_after / 60))
    response = await page_error(
        request, "Too many attempts",
        f"Too many attempts from here: wait {minutes} minute{'s' if minutes != 1 else ''} "
        "and try again. If you keep seeing this, contact your IT service desk.", 429)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


EXCEPTION_HANDLERS: dict[Any, Callable] = {
    SignInRequired: _signin_required, ReauthNeeded: _reauth_needed, Refused: _refused,
    TooMany: _too_many,
}
