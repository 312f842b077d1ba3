"""`token-agent enrol ...` and `token-agent login ...`"""

from __future__ import annotations

import json

import click

from .. import exitcodes
from . import main
from .common import (
    Context, PinSource, cancellable, device_errors, emit, fail, json_option, pass_ctx,
    pin_options, say, touch_prompt,
)
from .keys import key_option, open_key, timeout_option

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
    from ..ceremonies.key import EnrolError, enrol_key as enrol
    from ..store import CredentialExists, UnknownUser

    store = ctx.store()
    try:
        store.get_user(username)
    except UnknownUser as e:
        fail(str(e), exitcodes.NOT_FOUND)
    with open_key(key_path, timeout) as key:
        try:
            result = cancellable(lambda cancel: enrol(
                store, key, username, name=name, pin_provider=PinSource(pin_stdin),
                on_touch=touch_prompt, timeout=timeout, cancel=cancel))
        except EnrolError as e:
            fail(e.message, exitcodes.CONFLICT if e.reason == "name-taken"
                 else exitcodes.AUTH_FAILED)
        except CredentialExists as e:
            fail(str(e), exitcodes.CONFLICT)
    for warning in result.warnings:
        say(f"warning: {warning}")
    _write_export(export, result.to_json(export=True)["webauthn"])
    emit(as_json, result.to_json(),
         f"enrolled {result.name!r} for {result.username} "
         f"({'discoverable' if result.discoverable else 'server-side'} credential, "
         f"AAGUID {result.aaguid}, attestation "
         f"{'trusted' if result.attestation_trusted else 'not checked against a trust list'})")


@main.command("login")
@click.option("--method", type=click.Choice(["key"]), default="key", show_default=True,
              help="How to authenticate.")
@click.option("--user", "username", help="Who is logging in (default: whoever the key says).")
@key_option
@timeout_option
@pin_options
@export_option
@json_option
@pass_ctx
@device_errors
def login(ctx: Context, method: str, username: str | None, key_path: str | None,
          timeout: float, pin_stdin: bool, export: str | None, as_json: bool) -> None:
    """Authenticate a user. Exit status 0 only when the login succeeded."""
    from ..ceremonies.key import login_with_key

    store = ctx.store()
    with open_key(key_path, timeout) as key:
        outcome = cancellable(lambda cancel: login_with_key(
            store, key, username=username, pin_provider=PinSource(pin_stdin),
            on_touch=touch_prompt, timeout=timeout, cancel=cancel, export=bool(export)))
    data = outcome.to_json()
    if export and outcome.ok:
        _write_export(export, data["detail"].pop("webauthn"))
    if outcome.ok:
        factors = " + ".join(f.value for f in outcome.factors)
        emit(as_json, data, f"logged in: {outcome.user} with key {outcome.credential!r} "
                            f"({factors}{'; multi-factor' if outcome.multi_factor else ''})")
        return
    if as_json:
        emit(True, data, "")
    fail(f"login failed: {outcome.message}", exitcodes.REASON_CODES.get(outcome.reason,
                                                                        exitcodes.ERROR))
