"""The organisation server's web pages: clinicians' self-service (``/account``), the phone
companion for push approval (``/companion``), the administrators' pages (``/admin``), and the
voice gateway's webhook (``/hooks``), served by ``token-agent server run`` beside the
workstations' API (``/v1``).

Each module of ``PAGE_MODULES`` that is installed adds its ``ROUTES``; ``core.py`` has what
every page uses (rendering, forms with CSRF, sessions, re-authentication, rate limits), and
``security.py`` the response headers (a strict Content-Security-Policy: no inline script).
Static files (``/assets``): the NHS.UK design system's styles and scripts, copied from npm's
``nhsuk-frontend`` by ``scripts/setup.sh``, and the pages' own few files.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from .core import STATIC

log = logging.getLogger("token_agent.web")

PAGE_MODULES: tuple[str, ...] = ("signin", "account", "webauthn_pages", "recovery", "hooks",
                                 "companion", "admin")
#: paths served without a workstation's certificate (people's browsers and the voice
#: gateway; each page checks who is asking itself)
PUBLIC_PREFIXES: tuple[str, ...] = ("/account", "/admin", "/companion", "/assets", "/hooks")
PUBLIC_PATHS: frozenset[str] = frozenset({"/", "/favicon.ico"})
#: the NHS.UK frontend's files, as set-up copies them
VENDOR_FILES = ("nhsuk/nhsuk-frontend.min.css", "nhsuk/nhsuk-frontend.min.js",
                "images/favicon.svg")


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or any(path == p or path.startswith(p + "/")
                                       for p in PUBLIC_PREFIXES)


def collect_routes() -> list[Any]:
    routes: list[Any] = []
    for name in PAGE_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            continue
        routes.extend(module.ROUTES)
    routes.append(Mount("/assets", app=StaticFiles(directory=str(STATIC)), name="assets"))
    return routes


def missing_assets() -> list[str]:
    """The NHS.UK frontend files set-up should have copied, when missing (the pages then
    work, unstyled)."""
    return [f for f in VENDOR_FILES if not (STATIC / f).is_file()]
