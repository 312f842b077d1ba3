"""Security keys and passkeys in the browser: signing in with one, and adding one.

Thin over :mod:`token_agent.browserkey` (the relying party, on the same checks as the key
ceremony at a workstation):

* :func:`browser_key_login`: the ``key_login`` the sign-in conversation gives the login flow
  (``ceremonies/login.py``). When the flow wants the key (the person chose "Use a security
  key", or the key is their second factor), the next page is ``signin/prompt_webauthn-get.html``
  with the options; ``webauthn.js`` asks the browser and posts the answer; the flow goes on
  with the key ceremony's own :class:`~token_agent.outcome.LoginOutcome`. The challenge lives
  in the flow's thread (the conversation, on one replica), spent by the answer.
* ``GET/POST /account/keys/add``: add a security key or passkey (a fresh sign-in first,
  ``require_recent_auth``); the challenge is kept in the web session's page state in the
  store (any replica can take the answer), never taken from the form.
* ``GET /account/keys``: the user's keys, where each can be used, and whether suspended.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import browserkey
from ..ceremonies.key import EnrolError
from ..outcome import LoginOutcome
from .account import when
from .conversation import Prompt
from .core import (
    blocking, client_ip, read_form, redirect, render, require_recent_auth, require_user,
    throttle, web,
)

log = logging.getLogger("token_agent.web.webauthn")

#: the web session's page state key of a key being added
STATE_KEY = "webauthn_add"
#: keys added per user (and per address) in an hour, at most
ADD_LIMIT, ADD_WINDOW = 10, 3600.0
PROMPT_LABEL = "Use your security key"


def browser_key_login(conv: Any, ctx: Any):
    """The ``key_login(username)`` of a sign-in in the browser (see the module docstring)."""
    agent = ctx.agent

    def key_login(username: str | None) -> LoginOutcome:
        options, state = browserkey.assertion_options(agent, username, ctx.rp_id)
        answer = conv.ask(Prompt("webauthn-get", PROMPT_LABEL, data={"options": options}))
        if answer is None:  # cancelled, or no answer in time: the challenge dies with it
            answer = {"error": "no-answer"}
        return browserkey.finish_assertion(agent, username, state, answer, ctx.origin,
                                           ctx.rp_id)

    return key_login


# --------------------------------------------------------------------------- adding a key

def _keep_state(ctx, session, state: browserkey.Challenge | None) -> None:
    data = {k: v for k, v in session.data.items() if k != STATE_KEY}
    if state is not None:
        data[STATE_KEY] = state.to_json()
    ctx.store.set_web_data(session.id_hash, data)
    session.data = data


async def _add_page(request: Request, session, *, status: int = 200,
                    errors: list | None = None, name: str = "") -> Response:
    ctx = web(request)

    def prepare():
        count = len(browserkey.browser_keys(ctx.agent, session.user, ctx.rp_id))
        if count >= browserkey.MAX_KEYS:
            _keep_state(ctx, session, None)
            return None, count
        options, state = browserkey.registration_options(ctx.agent, session.user, ctx.rp_id)
        _keep_state(ctx, session, state)
        return options, count

    options, count = await blocking(prepare)
    return await render(request, "webauthn/add.html", status=status, errors=errors,
                        options=options, name=name, count=count,
                        max_keys=browserkey.MAX_KEYS)


async def add_key_page(request: Request) -> Response:
    session = await require_user(request)
    await require_recent_auth(request, session)
    return await _add_page(request, session)


def _field_of(reason: str) -> str | None:
    return "name" if reason in ("bad-name", "name-taken") else None


async def add_key(request: Request) -> Response:
    ctx = web(request)
    session = await require_user(request)
    await require_recent_auth(request, session)
    form = await read_form(request)
    await throttle(request, "web.key-add", session.user_id, ADD_LIMIT, ADD_WINDOW)
    await throttle(request, "web.key-add-ip", client_ip(request), ADD_LIMIT * 3, ADD_WINDOW)
    name = (form.get("name") or "").strip()[:200]
    state = browserkey.Challenge.from_json(session.data.get(STATE_KEY))
    await blocking(_keep_state, ctx, session, None)  # one answer per challenge, whatever it is
    if not form.get("attestation_object") and not form.get("error"):
        if not name:
            errors = [("name", "Enter a name for the key, such as 'blue key' or 'work laptop'")]
        else:
            errors = [(None, "Adding a security key needs JavaScript, which is turned off or "
                             "blocked in this browser: turn it on, or use another browser.")]
        return await _add_page(request, session, status=400, errors=errors, name=name)
    try:
        result = await blocking(browserkey.finish_registration, ctx.agent, session.user, state,
                                form, ctx.origin, ctx.rp_id, name=name)
    except EnrolError as e:
        log.info("adding a key for %s refused: %s", session.user.username, e.reason)
        return await _add_page(request, session, status=400,
                               errors=[(_field_of(e.reason), e.message)], name=name)
    await blocking(_tell, ctx, session.user, result.name)
    message = f"Your security key '{result.name}' has been added: you can use it to sign in."
    if not result.user_verified:
        message += (" It did not check a PIN, fingerprint or face, so you will also be asked "
                    "for your password when you use it.")
    return redirect("/account/keys", flash=message)


def _tell(ctx, user, name: str) -> None:
    """The person is told by their other channels that a key was added (it may not be them)."""
    try:
        from ..notify import tell_user
    except ImportError:  # the notices are the core's; without them, nothing to tell through
        return
    tell_user(ctx.agent, user, "A security key was added to your account",
              f"A security key named '{name}' was added to your {ctx.organisation} account. "
              "If this was not you, contact your IT service desk now.")


async def keys_page(request: Request) -> Response:
    ctx = web(request)
    session = await require_user(request)

    def listing():
        creds = ctx.store.list_fido_credentials(session.user_id)
        return [{"name": c.name, "added": when(c.created_at), "last_used": when(c.last_used_at),
                 "here": c.rp_id == ctx.rp_id, "suspended": c.flagged,
                 "passkey": c.discoverable} for c in creds]

    keys = await blocking(listing)
    return await render(request, "webauthn/keys.html", keys=keys)


ROUTES = [
    Route("/account/keys", keys_page, methods=["GET"]),
    Route("/account/keys/add", add_key_page, methods=["GET"]),
    Route("/account/keys/add", add_key, methods=["POST"]),
]
