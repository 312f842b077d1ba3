"""The clinician's own pages at ``/account``: their methods (when added, last used, the
preferred one), adding an authenticator app, a mobile, an alternate mobile or an email,
choosing the preferred method, app passwords, backup codes, removing a method, and their
recent sign-ins.

Thin over the library: each handler parses the form, calls the function the command line
and the service call too (``admin_ops``, ``factors.totp|codes|apppasswords|backup``,
``signins``), and renders. Every change of methods asks for a recent sign-in first
(``require_recent_auth``: a second factor where MFA applies), every form carries its CSRF
token (``read_form``), and sending a code is rate-limited per user and per address
(``throttle``) on top of the factor's own resend limits. Secrets shown once (an app
password, backup codes, a new app's secret) are rendered in the answer to the POST that
made them, marked ``no-store``, never put in a redirect, a flash or a log.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import admin_ops, kinds, signins
from ..factors import FactorError, apppasswords, backup, codes, totp
from ..store import CredentialExists, InvalidValue
from .core import (blocking, client_ip, read_form, redirect, render, require_recent_auth,
                   require_user, throttle, web)

#: codes sent from the account pages: per user, and per client address
SEND_LIMIT, SEND_PER_SECONDS = 5, 900
CONFIRM_LIMIT, CONFIRM_PER_SECONDS = 20, 900


@dataclass(frozen=True)
class ContactKind:
    """One of the contacts a person adds: its channel, the method's name, what it is called
    on the page and the form field."""

    slug: str
    channel: str
    name: str
    title: str
    field_label: str
    hint: str
    autocomplete: str
    input_type: str


CONTACT_KINDS = {c.slug: c for c in (
    ContactKind("mobile", "sms", "mobile phone", "Add a mobile phone number", "Mobile phone number",
                "We will text a code to this number. Office phones and landlines cannot receive "
                "text messages.", "tel", "tel"),
    ContactKind("alternate", "sms", "alternate phone", "Add an alternate mobile phone number",
                "Alternate mobile phone number",
                "A second mobile, for when your usual phone is not with you. We will text a "
                "code to it.", "tel", "tel"),
    ContactKind("email", "email", "email", "Add an email address", "Email address",
                "A personal email address you can read when you cannot sign in. We will email "
                "a code to it.", "email", "email"),
)}


def _ctx(request: Request):
    return web(request).agent.factors()


def _agent(request: Request):
    return web(request).agent


def when(timestamp: float | None) -> str:
    """A time for people: "7 December 2026 at 14:05" (UK time), "Never" for None."""
    if not timestamp:
        return "Never"
    try:
        from zoneinfo import ZoneInfo

        zone = ZoneInfo("Europe/London")
        suffix = ""
    except Exception:  # no time zone data: say it is UTC
        zone, suffix = _dt.timezone.utc, " UTC"
    moment = _dt.datetime.fromtimestamp(float(timestamp), zone)
    return f"{moment.day} {moment:%B %Y} at {moment:%H:%M}{suffix}"


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


async def _send_throttle(request: Request, user_id: str) -> None:
    await throttle(request, "account-code-user", user_id, SEND_LIMIT, SEND_PER_SECONDS)
    await throttle(request, "account-code-ip", client_ip(request), SEND_LIMIT * 4,
                   SEND_PER_SECONDS)


async def _confirm_throttle(request: Request, user_id: str) -> None:
    await throttle(request, "account-confirm-user", user_id, CONFIRM_LIMIT, CONFIRM_PER_SECONDS)
    await throttle(request, "account-confirm-ip", client_ip(request), CONFIRM_LIMIT * 4,
                   CONFIRM_PER_SECONDS)


# --------------------------------------------------------------------------- the methods


def _detail(m: dict) -> str:
    """What tells a method apart beside its kind: its name unless it only repeats the kind,
    and a contact's masked destination unless the name already shows it."""
    parts = [m["name"]] if m["name"].casefold() != m["label"].casefold() else []
    if m["destination"] and m["destination"] not in m["name"]:
        parts.append(f"({m['destination']})")
    return " ".join(parts)


def _rows(methods: list[dict]) -> list[dict]:
    """The methods as the home page shows them."""
    return [{**m, "added": when(m["created_at"]), "used": when(m["last_used_at"]),
             "detail": _detail(m), "removable": m["kind"] != "password"} for m in methods]


async def home(request: Request) -> Response:
    session = await require_user(request)
    agent = _agent(request)
    methods = await blocking(admin_ops.list_methods, agent.store, session.user)
    return await render(request, "account/home.html", methods=_rows(methods),
                        legacy=agent.policy.legacy.app_passwords)


async def preferred(request: Request) -> Response:
    """Choose the preferred method: the one a sign-in asks for first."""
    session = await require_user(request)
    await require_recent_auth(request, session)
    agent = _agent(request)
    user = session.user
    methods = await blocking(admin_ops.list_methods, agent.store, user)
    options = [(str(m["id"]), m["label"].capitalize()
                + (f": {_detail(m)}" if _detail(m) else ""))
               for m in methods if m["confirmed"] and not m["flagged"]
               and kinds.by_policy(m["kind"]).second]
    current = next((str(m["id"]) for m in methods if m["preferred"]), None)
    errors = None
    if request.method == "POST":
        form = await read_form(request)
        chosen = form.get("method", "")
        method = await blocking(admin_ops.method_of, agent.store, user, chosen)
        if method is None or chosen not in {k for k, _ in options}:
            errors = [("method", "Select the method to use first when you sign in")]
        else:
            try:
                await blocking(admin_ops.prefer_method, agent.store, user, method,
                                        user.username)
            except InvalidValue as e:
                errors = [("method", f"That method cannot be your preferred one: {e}")]
            else:
                return redirect("/account",
                                flash=f"Your preferred method is now {method.name}. Sign-ins "
                                      "will ask for it first.")
    return await render(request, "account/preferred.html", status=400 if errors else 200,
                        errors=errors, options=options, current=current)


async def remove(request: Request) -> Response:
    """Remove one method, after a recent sign-in, never the last one where MFA applies."""
    session = await require_user(request)
    await require_recent_auth(request, session)
    agent = _agent(request)
    user = session.user
    method = await blocking(admin_ops.method_of, agent.store, user,
                                     request.path_params["method_id"])
    if method is None:
        return await render(request, "account/gone.html", status=404)
    label = kinds.label_of_store(method.kind)
    errors = None
    if request.method == "POST":
        await read_form(request)
        try:
            await blocking(admin_ops.remove_method, agent, user, method, user.username)
        except admin_ops.RemovalRefused as e:
            errors = [("remove", f"{method.name} was not removed: {e}.")]
        else:
            return redirect("/account", flash=f"{label.capitalize()} "
                                                        f"{method.name!r} was removed.")
    return await render(request, "account/remove.html", status=409 if errors else 200,
                        errors=errors, method=method, label=label)


# --------------------------------------------------------------------------- authenticator app


async def add_app(request: Request) -> Response:
    """Start adding an authenticator app: its name, then its QR code."""
    session = await require_user(request)
    await require_recent_auth(request, session)
    errors, name = None, totp.NAME
    if request.method == "POST":
        form = await read_form(request)
        name = " ".join(form.get("name", "").split()) or totp.NAME
        try:
            await blocking(totp.begin_enrol, _ctx(request), session.user_id, name=name)
        except CredentialExists:
            errors = [("name", f"You already have an authenticator app called {name!r}: "
                               "give this one another name")]
        except (FactorError, InvalidValue) as e:
            errors = [("name", getattr(e, "message", str(e)))]
        else:
            return redirect("/account/add-app/confirm")
    return await render(request, "account/add_app.html", status=400 if errors else 200,
                        errors=errors, name=name)


async def confirm_app(request: Request) -> Response:
    """The QR code and the secret of the app being added, and its first code. A wrong code
    asks again with the same QR code: the secret is read back from the store."""
    session = await require_user(request)
    await require_recent_auth(request, session)
    ctx = _ctx(request)
    errors = None
    if request.method == "POST":
        form = await read_form(request)
        await _confirm_throttle(request, session.user_id)
        code = form.get("code", "")
        pending = await blocking(totp.pending_enrolment, ctx, session.user_id)
        if pending is None:
            return redirect("/account/add-app",
                            flash="No authenticator app is waiting for its first code: start "
                                  "again.")
        if not totp.normalise_code(code):
            errors = [("code", "Enter the 6-digit code your authenticator app shows")]
        else:
            result = await blocking(totp.confirm_enrol, ctx, session.user_id, code,
                                             name=pending.method.name)
            if result.ok:
                return redirect(f"/account/add-app/done?m={pending.method.id}")
            errors = [("code", _code_error(result))]
    pending = await blocking(totp.pending_enrolment, ctx, session.user_id)
    if pending is None:
        return redirect("/account/add-app")
    response = await render(request, "account/confirm_app.html", status=400 if errors else 200,
                            errors=errors, name=pending.method.name,
                            qr=totp.qr_svg(pending.uri), secret=_grouped(pending.secret))
    return _no_store(response)


async def app_done(request: Request) -> Response:
    session = await require_user(request)
    method = await blocking(admin_ops.method_of, _agent(request).store, session.user,
                                     request.query_params.get("m", ""))
    if method is None or method.kind != "totp" or not method.confirmed:
        return redirect("/account")
    return await render(request, "account/app_done.html", method=method)


def _grouped(secret: str) -> str:
    return " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))


def _code_error(result) -> str:
    """A failed code in words: what happened and what to do."""
    message = result.message or "wrong code"
    if result.reason is not None and result.reason.value == "method-locked":
        return message[0].upper() + message[1:] + "."
    return ("The code is not right (" + message + "): enter the code shown now. If it keeps "
            "failing, check that your phone's clock is set automatically.")


# --------------------------------------------------------------------------- contacts


async def add_contact(request: Request) -> Response:
    session = await require_user(request)
    kind = CONTACT_KINDS.get(request.path_params["kind"])
    if kind is None:
        return await render(request, "account/gone.html", status=404)
    await require_recent_auth(request, session)
    errors, value = None, ""
    if request.method == "POST":
        form = await read_form(request)
        value = form.get("destination", "").strip()[:320]
        held = await blocking(_contact_of, _ctx(request), session.user_id, kind,
                              confirmed=True)
        if held is not None:
            errors = [("destination", f"You already have a {kind.name} ({held.hint}). To "
                                      "change it, remove it first, then add the new one.")]
        elif not value:
            errors = [("destination", f"Enter your {kind.field_label.lower()}")]
        else:
            await _send_throttle(request, session.user_id)
            try:
                await blocking(codes.add_contact, _ctx(request), session.user_id,
                                        kind.channel, value, name=kind.name)
            except FactorError as e:
                errors = [("destination", _sentence(e.message))]
            else:
                return redirect(f"/account/add-contact/{kind.slug}/confirm")
    return await render(request, "account/add_contact.html", status=400 if errors else 200,
                        errors=errors, kind=kind, value=value)


def _contact_of(ctx, user_id: str, kind: ContactKind, *, confirmed: bool):
    """The user's contact of this kind, confirmed (its name is taken) or still waiting for
    its code; None when there is none."""
    return next((c for c in codes.list_contacts(ctx, user_id)
                 if c.channel == kind.channel and bool(c.method.confirmed) is confirmed
                 and c.method.name.casefold() == kind.name.casefold()), None)


async def confirm_contact(request: Request) -> Response:
    session = await require_user(request)
    kind = CONTACT_KINDS.get(request.path_params["kind"])
    if kind is None:
        return await render(request, "account/gone.html", status=404)
    await require_recent_auth(request, session)
    ctx = _ctx(request)
    pending = await blocking(_contact_of, ctx, session.user_id, kind, confirmed=False)
    if pending is None:
        return redirect(f"/account/add-contact/{kind.slug}")
    errors = None
    if request.method == "POST":
        form = await read_form(request)
        await _confirm_throttle(request, session.user_id)
        code = form.get("code", "").strip()
        if not code:
            errors = [("code", "Enter the code we sent")]
        else:
            result = await blocking(codes.confirm_contact, ctx, session.user_id,
                                             kind.channel, code, name=kind.name)
            if result.ok:
                return redirect("/account",
                                flash=f"Your {kind.name} ({pending.hint}) is confirmed: you can "
                                      "now use it to sign in.")
            errors = [("code", _sentence(result.message) + " Enter the code from the latest "
                               "message, or send a new code.")]
    return await render(request, "account/confirm_contact.html", status=400 if errors else 200,
                        errors=errors, kind=kind, hint=pending.hint)


def _sentence(message: str) -> str:
    text = message.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


# --------------------------------------------------------------------------- app passwords


async def app_passwords(request: Request) -> Response:
    session = await require_user(request)
    agent = _agent(request)
    why_not = apppasswords.unavailable(agent.policy.legacy.app_passwords)
    ctx = _ctx(request)
    errors, made, name = None, None, ""
    if request.method == "POST":
        await require_recent_auth(request, session)
        form = await read_form(request)
        name = " ".join(form.get("name", "").split())
        if why_not is not None:
            errors = [("name", why_not)]
        elif not name:
            errors = [("name", "Enter a name for the app password, like \"ward printer\"")]
        else:
            try:
                made = await blocking(apppasswords.create, ctx, session.user_id, name)
            except CredentialExists:
                errors = [("name", f"You already have an app password called {name!r}: "
                                   "choose another name")]
            except (FactorError, InvalidValue) as e:
                errors = [("name", _sentence(getattr(e, "message", str(e))))]
    listed = await blocking(apppasswords.list_, ctx, session.user_id)
    rows = [{"id": m.id, "name": m.name, "added": when(m.created_at),
             "used": when(m.last_used_at)} for m in listed]
    response = await render(request, "account/app_passwords.html",
                            status=400 if errors else 200, errors=errors, why_not=why_not,
                            rows=rows, name="" if made else name,
                            made_name=made[0].name if made else None,
                            made_password=made[1] if made else None)
    return _no_store(response)


# --------------------------------------------------------------------------- backup codes


async def backup_codes(request: Request) -> Response:
    session = await require_user(request)
    ctx = _ctx(request)
    made, replaced = None, False
    if request.method == "POST":
        await require_recent_auth(request, session)
        await read_form(request)
        replaced = await blocking(backup.get, ctx, session.user_id) is not None
        _, made = await blocking(backup.generate, ctx, session.user_id)
    left = await blocking(backup.remaining, ctx, session.user_id)
    held = await blocking(backup.get, ctx, session.user_id)
    response = await render(request, "account/backup_codes.html", codes=made, left=left,
                            held=held is not None, replaced=replaced)
    return _no_store(response)


# --------------------------------------------------------------------------- sign-ins


async def activity(request: Request) -> Response:
    session = await require_user(request)
    listed = await blocking(signins.recent, _agent(request).store, session.user_id)
    rows = [{**s.to_json(), "when": when(s.at)} for s in listed]
    return await render(request, "account/activity.html", rows=rows,
                        unusual=sum(1 for s in listed if s.unusual))


GET_POST = ["GET", "POST"]
ROUTES = [
    Route("/account", home, methods=["GET"]),
    Route("/account/preferred", preferred, methods=GET_POST),
    Route("/account/remove/{method_id}", remove, methods=GET_POST),
    Route("/account/add-app", add_app, methods=GET_POST),
    Route("/account/add-app/confirm", confirm_app, methods=GET_POST),
    Route("/account/add-app/done", app_done, methods=["GET"]),
    Route("/account/add-contact/{kind}", add_contact, methods=GET_POST),
    Route("/account/add-contact/{kind}/confirm", confirm_contact, methods=GET_POST),
    Route("/account/app-passwords", app_passwords, methods=GET_POST),
    Route("/account/backup-codes", backup_codes, methods=GET_POST),
    Route("/account/activity", activity, methods=["GET"]),
]
