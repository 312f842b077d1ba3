"""The ASGI app: ``build_app(ctx)`` collects ``ROUTES`` (a list of Starlette ``Route`` /
``WebSocketRoute``) from each module named in ``ROUTE_MODULES``, behind ``WorkstationAuth``
(every path but ``auth.PUBLIC_PATHS`` needs a joined workstation's certificate). A route
module of this package adds its name to ``ROUTE_MODULES``; nothing else to wire."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..store import StoreError, StoreUnavailable
from .auth import WorkstationAuth, WorkstationRefused, unavailable_body

log = logging.getLogger(__name__)

#: the modules of ``token_agent.orgserver`` whose ``ROUTES`` the app serves
ROUTE_MODULES: tuple[str, ...] = ("join", "health", "ceremony_ws", "sync")


def collect_routes(modules: tuple[str, ...] = ROUTE_MODULES) -> list[Any]:
    routes: list[Any] = []
    for name in modules:
        routes.extend(importlib.import_module(f"{__package__}.{name}").ROUTES)
    return routes


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, StoreUnavailable):
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(unavailable_body(), status_code=503)
    log.error("%s %s: store error: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": "store-error", "message": "The organisation's server could "
                         "not complete this request (its store refused it); nothing was "
                         "changed. Try again, or tell the administrator."}, status_code=500)


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, WorkstationRefused)
    return JSONResponse({"error": exc.error, "message": exc.message}, status_code=403)


def build_app(ctx: Any, *, modules: tuple[str, ...] = ROUTE_MODULES, web: bool = True
              ) -> Starlette:
    """The server's app over a ``ServerContext`` (``app.state.ctx``); with ``web``, the
    people's pages too (``token_agent.web``, ``app.state.web``)."""
    workers = int(getattr(getattr(ctx.config, "server", None), "workers", 16) or 16)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        import anyio.to_thread

        # the store's work runs in worker threads (run_in_threadpool): this many at once
        anyio.to_thread.current_default_thread_limiter().total_tokens = workers
        # and they use it side by side (a PostgreSQL store: a connection each, from its pool)
        size_pool = getattr(getattr(ctx.store, "engine", None), "size_pool", None)
        if size_pool is not None:
            size_pool(workers)
        yield

    routes = collect_routes(modules)
    handlers: dict[Any, Any] = {StoreError: _store_error, WorkstationRefused: _refused}
    middleware = [Middleware(WorkstationAuth, ctx=ctx)]
    if web:
        from .. import web as pages
        from ..web.core import EXCEPTION_HANDLERS
        from ..web.security import SecurityHeaders

        routes.extend(pages.collect_routes())
        handlers.update(EXCEPTION_HANDLERS)
        middleware.insert(0, Middleware(SecurityHeaders))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers,
                    lifespan=lifespan)
    app.state.ctx = ctx
    if web:
        app.state.web = web_context(ctx)
    return app


def web_context(ctx: Any) -> Any:
    """The pages' context (``token_agent.web.core.WebContext``) of a server context: its
    origin and WebAuthn RP ID from ``[web] public_url``, else https://localhost:<port>."""
    from ..web.core import WebContext
    from ..webconfig import WebConfig

    settings = getattr(ctx.config, "web", None) or WebConfig()
    server = getattr(ctx.config, "server", None)
    port = server.host_port()[1] if server is not None else 8443
    return WebContext(agent=ctx.agent, settings=settings, origin=settings.origin(port),
                      rp_id=settings.rp_id(port))
