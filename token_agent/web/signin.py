"""Signing in to the pages, re-authenticating before a change, and signing out.

The sign-in is THE login flow (``ceremonies/login.py``), run by ``conversation.py``: the
password (or a security key, through ``webauthn_pages.browser_key_login`` when that module
is installed), then the second factor the organisation's policy asks for, with the same
lockouts, "use a different method" menu and audit as at a workstation. The pages:

* ``GET/POST /account/sign-in``: user name and password, or "Use a security key";
* ``GET/POST /account/sign-in/step``: the flow's current question, its answer;
* ``GET/POST /account/reauth``: the same for the signed-in user, asking the second factor
  even where the policy would skip it (``step_up``), before a change of methods;
* ``POST /account/sign-out``.

No user enumeration: the flow itself answers an unknown user, a disabled one and a wrong
password with the same words ("Authentication failed.") after the same prompts, and this
page adds nothing of its own. Sign-ins are limited per client address (``throttle``), not per
user name, so that nobody can lock someone else out of the pages by typing their name;
the factors' own lockouts (which count failures from unfamiliar devices apart) protect each
method.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ..ceremonies.login import login, login_or_tap
from . import sessions
from .conversation import Busy, Conversation, Prompt
from .core import (
    Refused, blocking, client_ip, device, read_form, redirect, render, require_user,
    safe_next, throttle, web,
)

log = logging.getLogger("token_agent.web.signin")

SIGNIN_COOKIE = "__Host-ta_signin"
#: sign-ins started per client address: at most this many per window
SIGNIN_LIMIT, SIGNIN_WINDOW = 30, 600.0
#: how long a page waits for the flow's next question before showing "please wait"
TURN_WAIT = 1.5
#: how long the waiting page's status request waits for the sign-in to move on
STATUS_WAIT = 8.0
MAX_USERNAME = 255
MAX_ANSWER = 1024


def _qr_svg(uri: str) -> str:
    import segno

    return segno.make(uri, error="m").svg_inline(scale=4, dark="#212b32", light="#ffffff",
                                                 title="QR code for your authenticator app")


def _secret_of(uri: str) -> str | None:
    found = re.search(r"[?&]secret=([A-Z2-7]+)", uri)
    return found.group(1) if found else None


class WebInteraction:
    """``ceremonies.login.Interaction`` over pages: each question is a ``Prompt``."""

    def __init__(self, conv: Conversation, password: str | None = None) -> None:
        self.conv = conv
        self._password = password

    def info(self, message: str) -> None:
        self.conv.tell(message)

    def _ask(self, prompt: Prompt, field: str) -> str | None:
        answer = self.conv.ask(prompt)
        if answer is None:
            return None
        value = answer.get(field)
        return value[:MAX_ANSWER] if isinstance(value, str) else ""

    def secret(self, prompt: str) -> str | None:
        if self._password is not None and prompt == "Password":
            typed, self._password = self._password, None  # typed on the sign-in page
            return typed
        return self._ask(Prompt("secret", prompt), "answer")

    def text(self, prompt: str) -> str | None:
        return self._ask(Prompt("text", prompt), "answer")

    def choose(self, prompt: str, options: list[tuple[str, str]], default: str) -> str | None:
        keys = {k for k, _ in options}
        for _ in range(3):
            chosen = self._ask(Prompt("choose", prompt, list(options), default), "choice")
            if chosen is None or chosen in keys:
                return chosen
            self.conv.tell("Choose one of the options.", error=True)
        return None

    def show_qr(self, uri: str) -> None:
        self.conv.tell("Scan this QR code with your authenticator app, or type the key below "
                       "into it.", qr=_qr_svg(uri), secret=_secret_of(uri))


def _key_login(conv: Conversation, ctx: Any) -> Any:
    import importlib

    try:
        webauthn_pages = importlib.import_module(f"{__package__}.webauthn_pages")
    except ModuleNotFoundError as e:  # the browser's security keys are an optional module
        if e.name != f"{__package__}.webauthn_pages":
            raise
        return None
    return webauthn_pages.browser_key_login(conv, ctx)


def _run_login(ctx: Any, username: str | None, password: str | None, primary: str | None,
               where: Any, *, step_up: bool) -> Any:
    def run(conv: Conversation) -> Any:
        if username is None:  # a passkey without a user name: the key says who it is
            return login_or_tap(ctx.agent, None, primary="key", key_login=_key_login(conv, ctx),
                                card_login=None, interaction=WebInteraction(conv),
                                device=where, cancel=conv.cancel_event, step_up=step_up)
        return login(ctx.agent, username, interaction=WebInteraction(conv, password),
                     device=where, primary=primary, key_login=_key_login(conv, ctx),
                     cancel=conv.cancel_event, step_up=step_up)
    return run


async def _start(request: Request, username: str | None, password: str | None, primary: str | None,
                 next_url: str, *, purpose: str, user_id: str | None = None) -> Response:
    ctx = web(request)
    address = client_ip(request)
    try:
        conv = ctx.conversations.start(
            _run_login(ctx, username, password, primary, device(request),
                       step_up=purpose == "reauth"),
            address=address, purpose=purpose, user_id=user_id)
    except Busy as e:
        log.warning("refused a sign-in from %s: %s", address, e)
        raise Refused("The service is busy", "Too many people are signing in at the moment: "
                      "wait a minute and try again.", status=503) from None
    conv.state["next"] = next_url
    response = RedirectResponse("/account/sign-in/step", status_code=303)
    old = ctx.conversations.get(request.cookies.get(SIGNIN_COOKIE))
    if old is not None and old is not conv:
        ctx.conversations.drop(old)
    sessions.set_cookie(response, SIGNIN_COOKIE, conv.id, max_age=None)
    return response


# --------------------------------------------------------------------------- pages

async def home(request: Request) -> Response:
    return RedirectResponse("/account", status_code=303)


async def sign_in_page(request: Request) -> Response:
    next_url = safe_next(request.query_params.get("next"))
    message = None
    if request.query_params.get("expired"):
        message = "Your session has ended: sign in again to carry on."
    return await render(request, "signin/start.html", next_url=next_url, notice=message,
                        username="")


async def sign_in(request: Request) -> Response:
    form = await read_form(request)
    await throttle(request, "web.sign-in", client_ip(request), SIGNIN_LIMIT, SIGNIN_WINDOW)
    next_url = safe_next(form.get("next"))
    username = (form.get("username") or "").strip()
    use_key = form.get("action") == "key"
    errors = []
    if not username and not use_key:  # with a key and no user name: a passkey says who
        errors.append(("username", "Enter your user name"))
    elif len(username) > MAX_USERNAME:
        errors.append(("username", f"A user name is at most {MAX_USERNAME} characters"))
    password = form.get("password") or ""
    if not use_key and not password:
        errors.append(("password", "Enter your password"))
    if errors:
        return await render(request, "signin/start.html", status=400, errors=errors,
                            next_url=next_url, username=username[:MAX_USERNAME], notice=None)
    return await _start(request, username or None, None if use_key else password[:MAX_ANSWER],
                        "key" if use_key else "password", next_url, purpose="sign-in")


def _conversation(request: Request) -> Conversation | None:
    return web(request).conversations.get(request.cookies.get(SIGNIN_COOKIE))


async def step_page(request: Request) -> Response:
    ctx = web(request)
    conv = _conversation(request)
    if conv is None:
        return redirect("/account/sign-in", flash="Your sign-in timed out: start again.")
    prompt = await blocking(conv.wait_turn, TURN_WAIT)
    if conv.done:
        return await _finish(request, conv)
    infos = conv.infos()
    if prompt is None:  # the flow is busy: waiting for a phone, a push answer, a key
        return await render(request, "signin/wait.html", infos=infos, purpose=conv.purpose)
    template = f"signin/prompt_{prompt.kind}.html"
    if prompt.kind not in ("secret", "text", "choose"):
        try:
            ctx.templates.get_template(template)
        except Exception:  # noqa: BLE001
            log.error("no page for a sign-in question of kind %r", prompt.kind)
            conv.cancel()
            return redirect("/account/sign-in", flash="This way of signing in is not "
                            "available here: sign in another way.")
    else:
        template = "signin/step.html"
    errors = [("answer" if prompt.kind != "choose" else "choice", i["text"])
              for i in infos if i.get("error")]
    return await render(request, template, prompt=prompt, infos=[i for i in infos
                                                                 if not i.get("error")],
                        turn=conv.turn, purpose=conv.purpose, errors=errors)


async def status(request: Request) -> Response:
    """For the waiting page's script: ``{"ready": true}`` once the sign-in has a new question
    or is over (waits up to ``STATUS_WAIT`` s for it: a long poll)."""
    conv = _conversation(request)
    if conv is None:
        return JSONResponse({"ready": True})
    prompt = await blocking(conv.wait_turn, STATUS_WAIT)
    return JSONResponse({"ready": conv.done or prompt is not None})


async def step(request: Request) -> Response:
    form = await read_form(request)
    conv = _conversation(request)
    if conv is None:
        return redirect("/account/sign-in", flash="Your sign-in timed out: start again.")
    if "cancel" in form:
        conv.cancel()
    else:
        turn = form.pop("turn", "")
        conv.clear_infos()
        conv.answer(form, turn=int(turn) if turn.isdigit() else None)
    return RedirectResponse("/account/sign-in/step", status_code=303)


async def _finish(request: Request, conv: Conversation) -> Response:
    ctx = web(request)
    ctx.conversations.drop(conv)
    outcome = conv.outcome
    next_url = conv.state.get("next", "/account")
    if conv.error is not None or outcome is None:
        response = await render(request, "signin/start.html", status=500, next_url=next_url,
                                username="", notice=None, errors=[(None, "Something went "
                                "wrong while signing you in: try again. If it happens again, "
                                "contact your IT service desk.")])
    elif not outcome.ok:
        page = "signin/reauth.html" if conv.purpose == "reauth" else "signin/start.html"
        response = await render(request, page, status=401, next_url=next_url, username="",
                                notice=None, errors=[(None, outcome.message or
                                                      "Authentication failed.")])
    elif conv.purpose == "reauth":
        session = await require_user(request)
        if outcome.user_id != session.user_id:
            response = await render(request, "signin/reauth.html", status=401,
                                    next_url=next_url, errors=[(None, "Authentication failed.")])
        else:
            await blocking(ctx.store.reauth_web_session, session.id_hash, now=ctx.now(),
                           multi_factor=outcome.multi_factor, method=outcome.method)
            response = redirect(next_url, flash="Thank you: you can now make the change.")
    else:
        warning = " ".join(outcome.warnings) if outcome.warnings else None
        response = await signed_in(request, outcome, next_url, flash=warning)
    sessions.clear_cookie(response, SIGNIN_COOKIE)
    return response


async def signed_in(request: Request, outcome: Any, next_url: str,
                    flash: str | None = None) -> Response:
    """After a successful sign-in (``outcome``): a new session of its user (a new token: no
    fixation), any earlier session of this browser ended, and a redirect to ``next_url``
    carrying the cookie."""
    ctx = web(request)
    user = await blocking(ctx.store.get_user_by_id, outcome.user_id)
    token = await blocking(sessions.start_session, ctx, user,
                           multi_factor=outcome.multi_factor, method=outcome.method,
                           address=client_ip(request),
                           user_agent=request.headers.get("user-agent"))
    old = request.cookies.get(sessions.COOKIE)
    if sessions.valid_token(old):  # another session in this browser: ended, not kept
        await blocking(ctx.store.end_web_session, sessions.token_hash(old))
    response = redirect(next_url, flash=flash)
    sessions.set_cookie(response, sessions.COOKIE, token, max_age=None)
    return response


async def reauth_page(request: Request) -> Response:
    session = await require_user(request)
    return await render(request, "signin/reauth.html",
                        next_url=safe_next(request.query_params.get("next")),
                        username=session.user.username)


async def reauth(request: Request) -> Response:
    session = await require_user(request)
    form = await read_form(request)
    await throttle(request, "web.sign-in", client_ip(request), SIGNIN_LIMIT, SIGNIN_WINDOW)
    next_url = safe_next(form.get("next"))
    use_key = form.get("action") == "key"
    password = form.get("password") or ""
    if not use_key and not password:
        return await render(request, "signin/reauth.html", status=400, next_url=next_url,
                            errors=[("password", "Enter your password")])
    return await _start(request, session.user.username, None if use_key else password[:MAX_ANSWER],
                        "key" if use_key else "password", next_url, purpose="reauth",
                        user_id=session.user_id)


async def sign_out(request: Request) -> Response:
    ctx = web(request)
    session = await require_user(request)
    await read_form(request)
    await blocking(ctx.store.end_web_session, session.id_hash)
    await blocking(ctx.store.record_event, "web.sign-out", outcome="success",
                   user_id=session.user_id, detail={"address": client_ip(request)})
    request.state.web_session = None
    response = await render(request, "signin/signed_out.html")
    sessions.clear_cookie(response, sessions.COOKIE)
    return response


async def help_page(request: Request) -> Response:
    return await render(request, "signin/help.html")


ROUTES = [
    Route("/", home, methods=["GET"]),
    Route("/account/sign-in", sign_in_page, methods=["GET"]),
    Route("/account/sign-in", sign_in, methods=["POST"]),
    Route("/account/sign-in/step", step_page, methods=["GET"]),
    Route("/account/sign-in/step", step, methods=["POST"]),
    Route("/account/sign-in/status", status, methods=["GET"]),
    Route("/account/reauth", reauth_page, methods=["GET"]),
    Route("/account/reauth", reauth, methods=["POST"]),
    Route("/account/sign-out", sign_out, methods=["POST"]),
    Route("/account/help", help_page, methods=["GET"]),
]
