"""`token-agent enrol ...` and `token-agent login ...`"""

from __future__ import annotations

import json
import sys

import click

from .. import admin_ops, exitcodes, kinds
from . import main
from .common import (
    Context, PinSource, TerminalInteraction, cancellable, device_errors, emit, fail, json_option,
    pass_ctx, pin_guard, pin_options, say, touch_prompt,
)
from .keys import first_pin, key_option, open_key, timeout_option
from .policy_cmd import make_device, with_device

export_option = click.option(
    "--export", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
    help="Also write the WebAuthn response (JSON, with challenge and origin) to FILE, for "
         "verification by another relying party.",
)


def _write_export(path: str | None, data: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)


@main.group()
def enrol() -> None:
    """Enrol an authentication method for a user."""


@enrol.command("key")
@click.option("--user", "username", required=True, help="The user to enrol the key for.")
@click.option("--name", help="A name for this key, e.g. 'blue key' (default: 'key N').")
@key_option
@timeout_option
@pin_options
@export_option
@json_option
@pass_ctx
@device_errors
def enrol_key(ctx: Context, username: str, name: str | None, key_path: str | None,
              timeout: float, pin_stdin: bool, export: str | None, as_json: bool) -> None:
    """Enrol a FIDO2 security key for a user."""
    from drivers.fido.errors import FidoKeyError

    from ..ceremonies.key import EnrolError, device_failure, enrol_key as enrol
    from ..store import CredentialExists, UnknownUser

    from .reauth import require_login

    store = ctx.store()
    try:
        user = store.get_user(username)
    except UnknownUser as e:
        fail(str(e), exitcodes.NOT_FOUND)
    require_login(ctx, user, pin_stdin=pin_stdin)  # unless admin or the first method
    try:
        with open_key(key_path, timeout) as key:
            result = cancellable(lambda cancel: enrol(
                store, key, username, name=name, pin_provider=PinSource(pin_stdin),
                on_touch=touch_prompt, timeout=timeout, cancel=cancel,
                presence=pin_guard(timeout, cancel),
                new_pin=None if pin_stdin or not sys.stdin.isatty() else first_pin))
    except EnrolError as e:
        if not e.recorded:
            admin_ops.enrol_failed(store, username, "key", e.reason, "cli")
        fail(e.message, exitcodes.CONFLICT if e.reason == "name-taken"
             else exitcodes.AUTH_FAILED)
    except CredentialExists as e:
        admin_ops.enrol_failed(store, username, "key", "conflict", "cli")
        fail(str(e), exitcodes.CONFLICT)
    except FidoKeyError as e:  # reported by @device_errors
        admin_ops.enrol_failed(store, username, "key", device_failure(e).value, "cli")
        raise
    for warning in result.warnings:
        say(f"warning: {warning}")
    _write_export(export, result.to_json(export=True)["webauthn"])
    emit(as_json, result.to_json(),
         f"enrolled {result.name!r} for {result.username} "
         f"({'discoverable' if result.discoverable else 'server-side'} credential, "
         f"AAGUID {result.aaguid}, attestation "
         f"{'trusted' if result.attestation_trusted else 'not checked against a trust list'})")


def _second_option(_ctx, _param, value: str | None) -> str | None:
    from ..ceremonies.choices import parse_second

    if value is not None:
        try:
            parse_second(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return value


@main.command("login")
@click.option("--method", type=click.Choice(["key"]), default=None,
              help="Only this method, no policy flow: `key` logs in with a security key alone "
                   "(the default when no --user is given: tap-and-go).")
@click.option("--user", "username", help="Who is logging in (default: whoever the key says).")
@click.option("--primary", type=click.Choice([k.policy for k in kinds.PRIMARY]),
              help="The primary factor (default: the user's preferred method).")
@click.option("--second", callback=_second_option, metavar="METHOD[:NAME]",
              help="Use this second factor instead of the preferred one: totp, push, email, "
                   "sms, voice, messaging, backup, key or card (a channel: its preferred "
                   "contact), or one contact by name, e.g. 'sms:alternate phone'.")
@click.option("--reader", help="The smartcard reader, for a card login.")
@click.option("--push-timeout", type=click.FloatRange(1, 300), default=60.0, show_default=True,
              help="Seconds to wait for the companion app's answer.")
@with_device
@key_option
@timeout_option
@pin_options
@export_option
@json_option
@pass_ctx
def login(ctx: Context, method: str | None, username: str | None, primary: str | None,
          second: str | None, reader: str | None, push_timeout: float, device_kind: str,
          device_id: str | None, network: str | None, key_path: str | None, timeout: float,
          pin_stdin: bool, export: str | None, as_json: bool) -> None:
    """Authenticate a user. Exit status 0 only when the login succeeded.

    With --user: the whole login the MFA policy asks for: the primary factor (password, key
    or card), then, when the policy wants one, the preferred second factor ("use a different
    method": --second), or setting one up when the user has none and MFA is enforced.
    Answers (password, codes, PINs) are asked on the terminal, or read one line each from
    standard input in the order asked."""
    if method == "key" or username is None:
        if primary or second:
            fail("--primary and --second need --user (and no --method)", exitcodes.USAGE)
        return _key_only_login(ctx, username, key_path, timeout, pin_stdin, export, as_json)
    _policy_login(ctx, username, primary, second, reader, push_timeout,
                  make_device(device_kind, device_id, network), key_path, timeout, pin_stdin,
                  as_json)


def _policy_login(ctx: Context, username: str, primary: str | None, second: str | None,
                  reader: str | None, push_timeout: float, device, key_path: str | None,
                  timeout: float, pin_stdin: bool, as_json: bool) -> None:
    outcome = policy_login(ctx, username, primary=primary, second=second, reader=reader,
                           push_timeout=push_timeout, device=device, key_path=key_path,
                           timeout=timeout, pin_stdin=pin_stdin)
    _finish_login(outcome, outcome.to_json(), as_json, outcome.method.replace("+", " + "))


def policy_login(ctx: Context, username: str, *, device, primary: str | None = None,
                 second: str | None = None, reader: str | None = None,
                 push_timeout: float = 60.0, key_path: str | None = None,
                 timeout: float = 30.0, pin_stdin: bool = False, step_up: bool = False):
    """The policy login flow on the terminal (answers from it, or one line of stdin each);
    Ctrl-C cancels. Returns the ``LoginOutcome``."""
    from ..ceremonies.login import login as run_login

    agent = ctx.agent()
    pins = PinSource(pin_stdin or not sys.stdin.isatty())

    from ..ceremonies.devices import make_card_login, make_key_login

    cancel_of: dict = {}  # Ctrl-C sets the flow's cancel event; the key ceremony shares it

    def key_login(name: str):
        if "presence" not in cancel_of:  # one for the whole login: a touch counts once
            cancel_of["presence"] = pin_guard(timeout, cancel_of.get("event"))
        return make_key_login(agent.store, pin_provider=pins, on_touch=touch_prompt,
                              timeout=timeout, cancel=cancel_of.get("event"),
                              open_key=lambda: open_key(key_path, timeout),
                              presence=cancel_of["presence"])(name)

    from ..cardopen import card_opener

    card_login = make_card_login(agent.store, reader=reader, pin_provider=PinSource(
        pin_stdin or not sys.stdin.isatty(), "PIN for your smartcard"),
        open_card=card_opener(ctx.config().cards))

    def flow(cancel):
        cancel_of["event"] = cancel
        return run_login(agent, username, interaction=TerminalInteraction(), device=device,
                         primary=primary, second=second, key_login=key_login,
                         card_login=card_login, push_timeout=push_timeout, cancel=cancel,
                         step_up=step_up)

    return cancellable(flow)


def _finish_login(outcome, data: dict, as_json: bool, what: str) -> None:
    """Print a login's outcome (``what``: how the user logged in) and exit with its code."""
    if outcome.ok:
        factors = " + ".join(f.value for f in outcome.factors)
        emit(as_json, data, f"logged in: {outcome.user} with {what} "
                            f"({factors}{'; multi-factor' if outcome.multi_factor else ''})")
        return
    fail(f"login failed: {outcome.message}",
         exitcodes.REASON_CODES.get(outcome.reason, exitcodes.ERROR),
         reason=data.get("reason"), data=data)


@device_errors
def _key_only_login(ctx: Context, username: str | None, key_path: str | None, timeout: float,
                    pin_stdin: bool, export: str | None, as_json: bool) -> None:
    from ..ceremonies.key import login_with_key

    store = ctx.store()
    with open_key(key_path, timeout) as key:
        outcome = cancellable(lambda cancel: login_with_key(
            store, key, username=username, pin_provider=PinSource(pin_stdin),
            on_touch=touch_prompt, timeout=timeout, cancel=cancel, export=bool(export),
            presence=pin_guard(timeout, cancel)))
    data = outcome.to_json()
    if export and outcome.ok:
        _write_export(export, data["detail"].pop("webauthn"))
    _finish_login(outcome, data, as_json, f"key {outcome.credential!r}")
