"""The forgotten-password pages (``/account/forgotten-password``): thin over
``token_agent.recovery``, which decides everything (which methods count, the two proofs,
the new password, no user enumeration).

The browser keeps only the reset's token, in the cookie ``__Host-ta_reset`` (Secure,
HttpOnly, SameSite=Strict); everything else is in the store. Every POST has its CSRF token
checked (``read_form``) and is rate limited per user name and per address: starting a reset,
asking for a code (``recovery-send``) and typing one or answering with a security key
(``recovery-try``). The security key's page uses the sign-in's ``webauthn.js``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import recovery
from ..factors import FactorError
from . import sessions
from .core import blocking, client_ip, read_form, redirect, render, throttle, web

COOKIE = "__Host-ta_reset"
BASE = "/account/forgotten-password"
WINDOW = 15 * 60
#: (per user name, per address) within WINDOW
START_LIMITS = (5, 20)
SEND_LIMITS = (5, 20)
TRY_LIMITS = (10, 30)


async def _limits(request: Request, scope: str, username: str, limits: tuple[int, int]) -> None:
    per_user, per_ip = limits
    await throttle(request, f"{scope}-user", username.strip().casefold(), per_user, WINDOW)
    await throttle(request, f"{scope}-ip", client_ip(request), per_ip, WINDOW)


async def _reset(request: Request) -> recovery.Reset:
    return await blocking(recovery.current, web(request).agent, request.cookies.get(COOKIE))


def _restarting(handler: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
    """A page of the reset: a reset that is gone, expired or ended (``ResetError``) sends the
    person back to the start, saying why, whatever step they were at."""
    @functools.wraps(handler)
    async def page(request: Request) -> Response:
        try:
            return await handler(request)
        except recovery.ResetError as e:
            return _start_again(e.message)
    return page


def _start_again(message: str = recovery.EXPIRED) -> Response:
    response = redirect(BASE, flash=message)
    sessions.clear_cookie(response, COOKIE)
    return response


def _next_page(reset: recovery.Reset) -> str | None:
    """Where a reset in this state belongs, when not on the methods' pages."""
    if reset.state == recovery.PROVEN:
        return f"{BASE}/new-password"
    if reset.state == recovery.REFUSED:
        return f"{BASE}/refused"
    return None


async def start_page(request: Request) -> Response:
    return await render(request, "recovery/start.html")


async def start(request: Request) -> Response:
    form = await read_form(request)
    username = form.get("username", "").strip()
    if not username:
        return await render(request, "recovery/start.html", status=400,
                            errors=[("username", "Enter your user name")])
    await _limits(request, "recovery-start", username, START_LIMITS)
    token = await blocking(recovery.start, web(request).agent, username)
    response = redirect(f"{BASE}/method")
    sessions.set_cookie(response, COOKIE, token, max_age=recovery.RESET_TTL)
    return response


async def method_page(request: Request, errors=None, status: int = 200) -> Response:
    reset = await _reset(request)
    if (elsewhere := _next_page(reset)) is not None:
        return redirect(elsewhere)
    ctx = web(request)
    options = await blocking(recovery.offered, ctx.agent, reset, ctx.rp_id)
    return await render(request, "recovery/method.html", status=status, errors=errors,
                        options=options, proofs=reset.proofs)


async def choose(request: Request) -> Response:
    form = await read_form(request)
    reset = await _reset(request)
    kind = form.get("method", "")
    ctx = web(request)
    if kind not in dict(await blocking(recovery.offered, ctx.agent, reset, ctx.rp_id)):
        return await method_page(request, errors=[("method", "Choose how to prove it is you")],
                                 status=400)
    await _limits(request, "recovery-send", reset.username, SEND_LIMITS)
    await blocking(recovery.choose, ctx.agent, reset, kind, ctx.rp_id)
    return redirect(f"{BASE}/key" if kind == "key" else f"{BASE}/code")


async def code_page(request: Request, errors=None, status: int = 200) -> Response:
    reset = await _reset(request)
    if (elsewhere := _next_page(reset)) is not None:
        return redirect(elsewhere)
    if reset.step_kind is None:
        return redirect(f"{BASE}/method")
    if reset.step_kind == "key":
        return redirect(f"{BASE}/key")
    return await render(request, "recovery/code.html", status=status, errors=errors,
                        prompt=recovery.prompt(reset), kind=reset.step_kind,
                        proofs=reset.proofs)


async def prove(request: Request) -> Response:
    form = await read_form(request)
    reset = await _reset(request)
    code = form.get("code", "").strip()
    if not code:
        return await code_page(request, errors=[("code", "Enter the code")], status=400)
    await _limits(request, "recovery-try", reset.username, TRY_LIMITS)
    ctx = web(request)
    proof = await blocking(recovery.prove, ctx.agent, reset, code, ctx.rp_id)
    if not proof.ok:
        return await code_page(request, errors=[("code", proof.message)], status=400)
    return _after(proof)


def _after(proof: recovery.Proof) -> Response:
    """Where a successful proof leads."""
    if proof.state == recovery.PROVEN:
        return redirect(f"{BASE}/new-password", flash=proof.message)
    if proof.state == recovery.REFUSED:
        return redirect(f"{BASE}/refused")
    return redirect(f"{BASE}/method", flash=proof.message)


async def key_page(request: Request) -> Response:
    reset = await _reset(request)
    if (elsewhere := _next_page(reset)) is not None:
        return redirect(elsewhere)
    if reset.step_kind != "key" or reset.key is None:
        return redirect(f"{BASE}/method")
    return await render(request, "recovery/key.html", options=recovery.key_options(reset),
                        prompt=recovery.prompt(reset), proofs=reset.proofs)


async def prove_key(request: Request) -> Response:
    form = await read_form(request)
    reset = await _reset(request)
    await _limits(request, "recovery-try", reset.username, TRY_LIMITS)
    ctx = web(request)
    proof = await blocking(recovery.prove_key, ctx.agent, reset, form, ctx.origin,
                           ctx.rp_id)
    if not proof.ok:  # the challenge is spent: choose again (a new one)
        return await method_page(request, errors=[("method", proof.message)], status=400)
    return _after(proof)


async def password_page(request: Request, errors=None, status: int = 200) -> Response:
    reset = await _reset(request)
    if reset.state != recovery.PROVEN:
        return redirect(_next_page(reset) or f"{BASE}/method")
    return await render(request, "recovery/new_password.html", status=status, errors=errors,
                        username=reset.username)


async def set_password(request: Request) -> Response:
    form = await read_form(request)
    reset = await _reset(request)
    new, again = form.get("new-password", ""), form.get("confirm-password", "")
    if not new:
        return await password_page(request, errors=[("new-password", "Enter a new password")],
                                   status=400)
    try:
        username = await blocking(recovery.finish, web(request).agent, reset, new, again)
    except FactorError as e:
        field = "confirm-password" if new != again else "new-password"
        return await password_page(request, errors=[(field, e.message)], status=400)
    response = await render(request, "recovery/done.html", username=username)
    sessions.clear_cookie(response, COOKIE)
    sessions.clear_cookie(response, sessions.COOKIE)
    return response


async def refused_page(request: Request) -> Response:
    reset = await _reset(request)
    if reset.state != recovery.REFUSED:
        return redirect(_next_page(reset) or f"{BASE}/method")
    return await render(request, "recovery/refused.html", message=recovery.refused_message())


async def cancel(request: Request) -> Response:
    await read_form(request)
    await blocking(recovery.cancel, web(request).agent, request.cookies.get(COOKIE))
    response = redirect("/account/sign-in", flash="Your password reset was cancelled.")
    sessions.clear_cookie(response, COOKIE)
    return response


ROUTES = [
    Route(BASE, _restarting(start_page), methods=["GET"]),
    Route(BASE, _restarting(start), methods=["POST"]),
    Route(f"{BASE}/method", _restarting(method_page), methods=["GET"]),
    Route(f"{BASE}/method", _restarting(choose), methods=["POST"]),
    Route(f"{BASE}/code", _restarting(code_page), methods=["GET"]),
    Route(f"{BASE}/code", _restarting(prove), methods=["POST"]),
    Route(f"{BASE}/key", _restarting(key_page), methods=["GET"]),
    Route(f"{BASE}/key", _restarting(prove_key), methods=["POST"]),
    Route(f"{BASE}/new-password", _restarting(password_page), methods=["GET"]),
    Route(f"{BASE}/new-password", _restarting(set_password), methods=["POST"]),
    Route(f"{BASE}/refused", _restarting(refused_page), methods=["GET"]),
    Route(f"{BASE}/cancel", _restarting(cancel), methods=["POST"]),
]
