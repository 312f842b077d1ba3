"""The administrators' policy, cards, audit and workstations pages (``/admin/...``; see
``admin.py``): the effective policy and "explain" as ``token-agent policy show|explain`` give
them (``admin_ops.effective_policy``, ``admin_ops.explain_login``), the cards report
(``admin_ops.cards_report``), the audit search (the store's ``search_events``) with the
chain's verification (``admin_ops.verify_audit``, as ``audit verify``), and the
organisation's workstations with their revocation (``admin_ops.revoke_workstation``, as
``server workstation-revoke``)."""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import admin_ops
from ..store import UnknownUser, UnknownWorkstation
from .core import blocking, read_form, redirect, render, require_admin, web

AUDIT_PAGE = 50
_KIND_RE = re.compile(r"[a-z0-9._:-]{1,64}")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _when(ts: float | None, empty: str = "Never") -> str:
    from .admin import when

    return when(ts, empty)


# --------------------------------------------------------------------------- policy


def _value(value: Any) -> str:
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_value(v)}" for k, v in value.items()) or "none"
    return str(value)


def _sections(data: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """The effective policy's tables as (heading, [(setting, value)])."""
    out = []
    for name, table in data.items():
        if name in ("source", "warnings", "delivery_channels"):
            continue
        if isinstance(table, dict) and name != "classes":
            out.append((name, [(k, _value(v)) for k, v in table.items()]))
        elif name == "classes":
            out.append(("classes", [(cls, _value(v)) for cls, v in table.items()]))
        else:
            out.append((name, [(name, _value(table))]))
    return out


async def policy_page(request: Request) -> Response:
    await require_admin(request)
    ctx = web(request)
    q = request.query_params
    form = {"user": q.get("user", "")[:64].strip(), "device": q.get("device", "managed"),
            "network": q.get("network", "")[:64].strip()}
    errors: list[tuple[str, str]] = []
    explained = None
    if form["device"] not in ("managed", "unmanaged"):
        errors.append(("device", "Choose managed or unmanaged"))
        form["device"] = "managed"
    if form["network"]:
        try:
            ipaddress.ip_address(form["network"])
        except ValueError:
            errors.append(("network", "Enter an IP address, like 10.1.2.3, or leave it empty"))
    if "user" in q and not form["user"]:
        errors.append(("user", "Enter the user name of the user to explain"))

    def explain() -> dict | None:
        from ..ceremonies.login import Device

        try:
            user = ctx.store.get_user(form["user"])
        except (UnknownUser, ValueError):
            errors.append(("user", "There is no user of that name: check the spelling"))
            return None
        where = Device(kind=form["device"], device_id=None, network=form["network"] or None)
        first, decision = admin_ops.explain_login(ctx.agent, user, where)
        return {"user": user, "primary": first, "decision": decision}

    if form["user"] and not errors:
        explained = await blocking(explain)
    data = admin_ops.effective_policy(ctx.agent.policy)
    return await render(request, "admin/policy.html", status=400 if errors else 200,
                        errors=errors, form=form, explained=explained,
                        source=data["source"] or "the built-in defaults (no policy file)",
                        warnings=data["warnings"], channels=data["delivery_channels"],
                        sections=_sections(data))


# --------------------------------------------------------------------------- cards


async def cards_page(request: Request) -> Response:
    await require_admin(request)
    ctx = web(request)
    report = await blocking(admin_ops.cards_report, ctx.store, ctx.now())
    return await render(request, "admin/cards.html", report=report, when=_when)


# --------------------------------------------------------------------------- audit


def _day(text: str, field: str, errors: list) -> float | None:
    if not text:
        return None
    if not _DATE_RE.fullmatch(text):
        errors.append((field, "Enter a date like 2026-12-07"))
        return None
    try:
        day = _dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        errors.append((field, "Enter a real date, like 2026-12-07"))
        return None
    return day.timestamp()


async def audit_page(request: Request) -> Response:
    await require_admin(request)
    ctx = web(request)
    q = request.query_params
    form = {"user": q.get("user", "")[:64].strip(), "kind": q.get("kind", "")[:64].strip(),
            "from": q.get("from", "")[:10], "to": q.get("to", "")[:10]}
    errors: list[tuple[str, str]] = []
    if form["kind"] and not _KIND_RE.fullmatch(form["kind"]):
        errors.append(("kind", "Enter an event kind in lower case, like login or verify.totp"))
    since = _day(form["from"], "from", errors)
    until = _day(form["to"], "to", errors)
    if until is not None:
        until += 86400.0  # to the end of that day
    if since is not None and until is not None and until <= since:
        errors.append(("to", "The end date must be the same as or after the start date"))
    before = q.get("before", "")
    before_id = int(before) if before.isdigit() else None

    def search() -> dict:
        intact, count, message = admin_ops.verify_audit(ctx.store)
        user_id = None
        if form["user"]:
            try:
                user_id = ctx.store.get_user(form["user"]).id
            except (UnknownUser, ValueError):
                errors.append(("user", "There is no user of that name: check the spelling"))
        events = [] if errors else ctx.store.search_events(
            user_id=user_id, kind=form["kind"] or None, since=since, until=until,
            before_id=before_id, limit=AUDIT_PAGE + 1)
        return {"intact": intact, "count": count, "message": message,
                "events": events[:AUDIT_PAGE], "more": len(events) > AUDIT_PAGE}

    found = await blocking(search)
    query = urlencode({k: v for k, v in form.items() if v})
    older = (f"/admin/audit?{query}{'&' if query else ''}before={found['events'][-1].id}"
             if found["more"] else None)
    return await render(request, "admin/audit.html", status=400 if errors else 200,
                        errors=errors, form=form, when=_when, older=older,
                        newest=f"/admin/audit?{query}" if before_id else None, **found)


# --------------------------------------------------------------------------- workstations


async def workstations_page(request: Request) -> Response:
    await require_admin(request)
    ctx = web(request)
    found = await blocking(ctx.store.list_workstations)
    return await render(request, "admin/workstations.html", workstations=found, when=_when)


async def revoke_workstation(request: Request) -> Response:
    session = await require_admin(request)
    form = await read_form(request)
    ctx = web(request)
    name = (form.get("name") or "")[:64]
    try:
        ws = await blocking(admin_ops.revoke_workstation, ctx.store, name,
                            session.user.username)
    except (UnknownWorkstation, ValueError):
        return redirect("/admin/workstations", flash="There is no workstation of that name: "
                        "nothing was revoked.")
    return redirect("/admin/workstations", flash=f"Revoked {ws.name}: its certificate is "
                    "refused from its next request on. Issue a new join token to join it again.")


ROUTES = [
    Route("/admin/policy", policy_page, methods=["GET"]),
    Route("/admin/cards", cards_page, methods=["GET"]),
    Route("/admin/audit", audit_page, methods=["GET"]),
    Route("/admin/workstations", workstations_page, methods=["GET"]),
    Route("/admin/workstations/revoke", revoke_workstation, methods=["POST"]),
]
