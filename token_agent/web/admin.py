"""The administrators' pages (``/admin``): users and their compliance (with a CSV export),
one user's methods, lockouts and temporary access passes (a lost device: reset the methods,
issue a pass, unlock), and, in ``admin_views.py``, the policy, cards, audit and workstations.
The sign-in with a temporary access pass (``/account/sign-in/access-pass``) is here too.

Every page needs the ``admin`` role from the store (``require_admin``: a 403 page otherwise,
recorded as ``web.admin-refused``); every change is a POST with its CSRF token
(``read_form``) and calls the library function the command line calls
(``admin_ops.reset_methods`` / ``unlock``, ``factors.accesspass``), which records it with the
administrator as ``actor``. Resetting methods and issuing a pass, which hand an account to
whoever holds the pass, also need the administrator's own recent sign-in
(``require_recent_auth``). A pass is shown once, on the page answering the POST (never in a
redirect, a cookie or a log), with ``Cache-Control: no-store``.
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import admin_ops, compliance
from ..factors import FactorError, accesspass, lockout
from ..store import USER_CLASSES, UnknownUser
from .core import (
    Refused, blocking, client_ip, device, read_form, redirect, render, require_admin,
    require_recent_auth, throttle, web,
)

log = logging.getLogger("token_agent.web.admin")

MAX_FILTER = 64
#: sign-ins with a pass per client address and window (the pass's own lockout protects each
#: user; a limit per user name would let anyone stop someone else's sign-in)
PASS_SIGNIN_LIMIT, PASS_SIGNIN_WINDOW = 20, 600.0


def when(ts: float | None, empty: str = "Never") -> str:
    """A time for people: "7 Dec 2026 at 01:23 UTC"."""
    if ts is None:
        return empty
    moment = _dt.datetime.fromtimestamp(float(ts), _dt.timezone.utc)
    return f"{moment.day} {moment:%b %Y} at {moment:%H:%M} UTC"


def no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


# --------------------------------------------------------------------------- users


def _filters(request: Request) -> tuple[dict[str, str], list[tuple[str, str]]]:
    q = request.query_params
    values = {"status": q.get("status", ""), "class": q.get("class", ""),
              "name": q.get("name", "")[:MAX_FILTER].strip()}
    errors = []
    if values["status"] and values["status"] not in compliance.STATUSES:
        errors.append(("status", "Choose a compliance state from the list"))
        values["status"] = ""
    if values["class"] and values["class"] not in USER_CLASSES:
        errors.append(("class", "Choose a user class from the list"))
        values["class"] = ""
    return values, errors


def _report(ctx, values: dict[str, str]) -> list[compliance.UserCompliance]:
    return compliance.report(ctx.store, ctx.agent.policy, ctx.now(),
                             status=values["status"] or None,
                             user_class=values["class"] or None, name=values["name"] or None)


async def index(request: Request) -> Response:
    await require_admin(request)
    return await render(request, "admin/index.html")


async def users(request: Request) -> Response:
    await require_admin(request)
    ctx = web(request)
    values, errors = _filters(request)
    lines = await blocking(_report, ctx, values)
    query = urlencode({k: v for k, v in values.items() if v})
    return await render(request, "admin/users.html", status=400 if errors else 200,
                        errors=errors, lines=lines, filters=values, query=query,
                        statuses=list(compliance.STATUSES.items()), classes=USER_CLASSES)


async def users_csv(request: Request) -> Response:
    session = await require_admin(request)
    ctx = web(request)
    values, errors = _filters(request)
    if errors:
        raise Refused("This export could not be made", errors[0][1] + ", then export again.",
                      status=400)

    text = await blocking(lambda: compliance.export_csv(
        ctx.store, ctx.agent.policy, ctx.now(), actor=session.user.username,
        actor_id=session.user_id, via="web", status=values["status"] or None,
        user_class=values["class"] or None, name=values["name"] or None))
    stamp = _dt.datetime.fromtimestamp(ctx.now(), _dt.timezone.utc).strftime("%Y%m%d-%H%M")
    return Response(text, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="users-{stamp}.csv"',
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


# --------------------------------------------------------------------------- one user


def _user_or_404(ctx, username: str):
    try:
        return ctx.store.get_user(username)
    except (UnknownUser, ValueError):
        raise Refused("No such user", "There is no user of that name: go back to the list of "
                      "users and choose one.", status=404) from None


def _user_view(ctx, username: str) -> dict[str, Any]:
    user = _user_or_404(ctx, username)
    factors = ctx.agent.factors()
    now = ctx.now()
    line = compliance.assess(ctx.agent.policy, user, ctx.store.list_methods(user.id), now)
    locks = [s for s in lockout.user_locks(ctx.store, user.id) if s.failures or s.locked(now)]
    passes = accesspass.list_(factors, user.id)
    return {"target": user, "line": line, "methods": admin_ops.list_methods(ctx.store, user),
            "locks": [{"scope": s.scope, "failures": s.failures,
                       "locked": s.locked(now), "permanent": s.permanent,
                       "until": s.locked_until} for s in locks],
            "passes": [{"issued_by": p.issued_by, "created_at": p.created_at,
                        "expires_at": p.expires_at, "state": p.state(now),
                        "ended_at": p.ended_at} for p in passes],
            "open_pass": any(p.state(now) == "open" for p in passes)}


async def _user_page(request: Request, username: str, *, status: int = 200,
                     errors=None, **extra) -> Response:
    ctx = web(request)
    view = await blocking(_user_view, ctx, username)
    return await render(request, "admin/user.html", status=status, errors=errors,
                        when=when, default_hours=accesspass.DEFAULT_HOURS,
                        max_hours=accesspass.MAX_HOURS, min_hours=accesspass.MIN_HOURS,
                        **view, **extra)


async def user_page(request: Request) -> Response:
    await require_admin(request)
    return await _user_page(request, request.path_params["username"])


def _hours(form: dict[str, str]) -> tuple[int | None, list[tuple[str, str]]]:
    try:
        return accesspass.check_hours(form.get("hours") or accesspass.DEFAULT_HOURS), []
    except FactorError as e:
        return None, [("hours", e.message[0].upper() + e.message[1:])]


async def _issued(request: Request, target, value: str, issued, removed: int | None) -> Response:
    ctx = web(request)
    response = await render(request, "admin/pass_issued.html", target=target, value=value,
                            expires=when(issued.expires_at), removed=removed,
                            sign_in_url=ctx.origin + "/account/sign-in/access-pass")
    return no_store(response)


async def reset(request: Request) -> Response:
    """A lost device: every method removed (``admin_ops.reset_methods``), the password too
    when asked, and optionally a temporary access pass, shown once."""
    session = await require_admin(request)
    form = await read_form(request)
    await require_recent_auth(request, session)
    ctx = web(request)
    username = request.path_params["username"]
    if form.get("confirm") != "yes":
        return await _user_page(request, username, status=400, errors=[
            ("confirm", "Confirm that you want to remove every method of this user")])
    issue = form.get("issue_pass") == "yes"
    hours, errors = _hours(form) if issue else (None, [])
    if errors:
        return await _user_page(request, username, status=400, errors=errors)
    actor = session.user.username

    def run():
        user = _user_or_404(ctx, username)
        removed = admin_ops.reset_methods(ctx.store, user, actor,
                                          include_password=form.get("password") == "yes")
        issued = (accesspass.issue(ctx.agent.factors(), user.id, actor=actor, hours=hours)
                  if issue else None)
        return user, removed, issued

    user, removed, issued = await blocking(run)
    log.info("%s reset the methods of %s from %s", actor, user.username, client_ip(request))
    if issued is not None:
        return await _issued(request, user, issued[1], issued[0], len(removed))
    return redirect(f"/admin/users/{quote(user.username)}",
                    flash=f"Removed {len(removed)} method{'' if len(removed) == 1 else 's'} "
                          f"of {user.username}. They must set up "
                          "new ones: issue a temporary access pass if they cannot sign in.")


async def issue_pass(request: Request) -> Response:
    session = await require_admin(request)
    form = await read_form(request)
    await require_recent_auth(request, session)
    ctx = web(request)
    username = request.path_params["username"]
    hours, errors = _hours(form)
    if errors:
        return await _user_page(request, username, status=400,
                                errors=[("pass-hours", m) for _, m in errors])

    def run():
        user = _user_or_404(ctx, username)
        return user, accesspass.issue(ctx.agent.factors(), user.id,
                                      actor=session.user.username, hours=hours)

    user, (issued, value) = await blocking(run)
    return await _issued(request, user, value, issued, None)


async def revoke_pass(request: Request) -> Response:
    session = await require_admin(request)
    await read_form(request)
    ctx = web(request)
    username = request.path_params["username"]

    def run():
        user = _user_or_404(ctx, username)
        return user, accesspass.revoke(ctx.agent.factors(), user.id,
                                       actor=session.user.username)

    user, ended = await blocking(run)
    return redirect(f"/admin/users/{quote(user.username)}",
                    flash=f"The temporary access pass of {user.username} no longer works."
                    if ended else f"{user.username} had no open temporary access pass.")


async def unlock(request: Request) -> Response:
    session = await require_admin(request)
    await read_form(request)
    ctx = web(request)
    username = request.path_params["username"]

    def run():
        user = _user_or_404(ctx, username)
        return user, admin_ops.unlock(ctx.store, user, None, session.user.username)

    user, cleared = await blocking(run)
    return redirect(f"/admin/users/{quote(user.username)}",
                    flash=f"Unlocked {user.username}: {len(cleared)} lockouts cleared. They can "
                          "try their methods again now.")


# --------------------------------------------------------------------------- sign-in with a pass


class _PassAnswer:
    """The login flow's ``Interaction`` for a pass typed on the page: the pass, once."""

    def __init__(self, typed: str) -> None:
        self._typed: str | None = typed

    def info(self, message: str) -> None:
        pass

    def secret(self, prompt: str) -> str | None:
        from ..ceremonies.passlogin import PROMPT

        typed, self._typed = (self._typed, None) if prompt == PROMPT else (None, self._typed)
        return typed

    def text(self, prompt: str) -> None:
        return None

    def choose(self, prompt: str, options, default: str) -> None:
        return None

    def show_qr(self, uri: str) -> None:
        pass


PASS_FAILED = ("Authentication failed. Check your user name and the temporary access pass. "
               "A pass works once, and only until it expires: if yours was used or has "
               "expired, ask your administrator for a new one.")


async def pass_sign_in_page(request: Request) -> Response:
    return await render(request, "admin/pass_sign_in.html", username="")


async def pass_sign_in(request: Request) -> Response:
    from ..ceremonies.login import login
    from ..ceremonies.passlogin import ACCESS_PASS
    from .signin import signed_in

    form = await read_form(request)
    await throttle(request, "web.access-pass", client_ip(request), PASS_SIGNIN_LIMIT,
                   PASS_SIGNIN_WINDOW)
    ctx = web(request)
    username = (form.get("username") or "").strip()[:255]
    typed = (form.get("access_pass") or "")[:128]
    errors = []
    if not username:
        errors.append(("username", "Enter your user name"))
    if not typed.strip():
        errors.append(("access_pass", "Enter the temporary access pass your administrator "
                                      "gave you"))
    if errors:
        return await render(request, "admin/pass_sign_in.html", status=400, errors=errors,
                            username=username)
    where = device(request)
    outcome = await blocking(lambda: login(ctx.agent, username, interaction=_PassAnswer(typed),
                                           device=where, primary=ACCESS_PASS))
    if not outcome.ok:
        return await render(request, "admin/pass_sign_in.html", status=401,
                            errors=[(None, PASS_FAILED)], username=username)
    return await signed_in(request, outcome, "/account",
                           flash="You signed in with your temporary access pass. It cannot be "
                                 "used again: set up a new way to sign in now.")


async def back_to_user(request: Request) -> Response:
    """A GET of an action's address (after re-authenticating, the browser comes back to it):
    the user's page, where the action is offered again; nothing is done."""
    await require_admin(request)
    return redirect(f"/admin/users/{quote(request.path_params['username'])}",
                    flash="You confirmed it is you: choose the action again.")


from . import admin_views  # noqa: E402  (the policy, cards, audit and workstations pages)

ROUTES = [
    Route("/admin", index, methods=["GET"]),
    Route("/admin/users", users, methods=["GET"]),
    Route("/admin/users.csv", users_csv, methods=["GET"]),
    Route("/admin/users/{username}", user_page, methods=["GET"]),
    Route("/admin/users/{username}/reset", reset, methods=["POST"]),
    Route("/admin/users/{username}/access-pass", issue_pass, methods=["POST"]),
    Route("/admin/users/{username}/access-pass/revoke", revoke_pass, methods=["POST"]),
    Route("/admin/users/{username}/unlock", unlock, methods=["POST"]),
    Route("/admin/users/{username}/reset", back_to_user, methods=["GET"]),
    Route("/admin/users/{username}/access-pass", back_to_user, methods=["GET"]),
    Route("/account/sign-in/access-pass", pass_sign_in_page, methods=["GET"]),
    Route("/account/sign-in/access-pass", pass_sign_in, methods=["POST"]),
    *admin_views.ROUTES,
]
