"""The clinician's own pages (``/account``): the methods they sign in with.

This module starts with the overview; the pages that add, choose and remove methods are
added beside it. Each handler is thin over ``token_agent.admin_ops`` and the factors."""

from __future__ import annotations

import datetime as _dt

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import admin_ops
from .core import blocking, render, require_user, web


def when(ts: float | None) -> str:
    """A time as people read it: "6 December 2026, 14:05" (UTC), or "Never"."""
    if not ts:
        return "Never"
    moment = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
    return f"{moment.day} {moment:%B %Y, %H:%M} UTC"


async def home(request: Request) -> Response:
    session = await require_user(request)
    ctx = web(request)
    methods = await blocking(admin_ops.list_methods, ctx.store, session.user)
    return await render(request, "account/home.html", methods=methods, when=when)


ROUTES = [Route("/account", home, methods=["GET"])]
