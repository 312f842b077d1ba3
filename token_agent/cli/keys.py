"""`token-agent keys ...`: the security keys plugged into this workstation."""

from __future__ import annotations

import shlex

import click

from .. import exitcodes
from . import main
from .common import (
    PinSource, cancellable, device_errors, emit, fail, json_option, new_pin, pin_guard,
    pin_options, say, touch_prompt,
)

key_option = click.option("--key", "key_path", metavar="PATH",
                          help="Which key (a path from `keys list`); default: the only key, "
                               "or the one you touch.")
timeout_option = click.option("--timeout", type=click.FloatRange(1, 300), default=30.0,
                              show_default=True, help="Seconds to wait for a touch.")


def open_key(key_path: str | None, timeout: float):
    """The key to use: the named one, the only one, or the one the user touches."""
    from drivers.fido.discovery import list_descriptors
    from drivers.fido.keys import FidoKey, open_single_key

    from ..ceremonies.keyfinding import key_not_at

    if key_path:
        found = list_descriptors()
        for descriptor in found:
            if str(descriptor.path) == key_path:
                return FidoKey.open(descriptor)
        raise key_not_at(key_path, [str(d.path) for d in found])
    return cancellable(lambda cancel: open_single_key(on_touch=lambda: say(
        "Several keys found: touch the one to use"), timeout=timeout, cancel=cancel))


def first_pin(min_length: int) -> str | None:
    """Offered by `enrol key` at a terminal when the key has no PIN yet (as browsers do):
    the new PIN, typed twice, its length checked before the second entry; None when the
    person declines (an empty entry)."""
    say("This key has no PIN yet. Choose one now: this enrolment uses it, and so will "
        f"every login with the key (at least {min_length} characters; Enter alone: stop "
        "here).")
    return new_pin(False, "New PIN for your security key", min_length=min_length,
                   optional=True)


def _info_text(info) -> str:
    pin = ("not set" if not info.pin_set
           else f"set, {info.pin_retries} tries left")
    return "\n".join([
        f"{info.product}  ({info.path})",
        f"  AAGUID      {info.aaguid}",
        f"  versions    {', '.join(info.versions)}",
        f"  PIN         {pin}",
        f"  options     {', '.join(k for k, v in sorted(info.options.items()) if v)}",
        f"  extensions  {', '.join(info.extensions)}",
        f"  discoverable credential slots left: {info.remaining_discoverable}",
    ])


@main.group()
def keys() -> None:
    """Security keys on this workstation: list, PIN, credentials, reset."""


@keys.command("list")
@json_option
def list_(as_json: bool) -> None:
    """List the FIDO2 keys plugged in (and configured simulators)."""
    from drivers.fido.keys import list_keys

    from ..ceremonies.keyfinding import KeyNotPermitted, no_key_found

    found = list_keys()
    unusable = no_key_found()
    if isinstance(unusable, KeyNotPermitted):  # plugged in, but left out of the list
        say(unusable.message)
    emit(as_json, {"keys": [k.to_json() for k in found]},
         lambda: "\n".join(
             f"{k.path}  {k.product}  aaguid {k.aaguid}  "
             f"PIN {'set' if k.pin_set else 'not set'}"
             + (f" ({k.pin_retries} tries left)" if k.pin_set else "")
             for k in found) or "no security key found")


@keys.command("info")
@key_option
@timeout_option
@json_option
@device_errors
def info(key_path: str | None, timeout: float, as_json: bool) -> None:
    """Details of one key: versions, options, PIN state."""
    with open_key(key_path, timeout) as key:
        details = key.info()
    emit(as_json, details.to_json(), lambda: _info_text(details))


def _before_pin(key, timeout: float) -> None:
    """A touch first when the rule of ``ceremonies.keypresence`` wants one (not root, or few
    PIN tries left): these commands send the PIN the user types to the key."""
    cancellable(lambda cancel: pin_guard(timeout, cancel).before_pin(key))


@keys.group()
def pin() -> None:
    """Set or change a key's PIN."""


@pin.command("set")
@key_option
@timeout_option
@pin_options
@json_option
@device_errors
def pin_set(key_path: str | None, timeout: float, pin_stdin: bool, as_json: bool) -> None:
    """Set the PIN of a key that has none (one that has a PIN: `keys pin change`)."""
    with open_key(key_path, timeout) as key:
        details = key.info()
        if details.pin_set:
            fail("This key already has a PIN: change it with "
                 f"`token-agent keys pin change --key {shlex.quote(key.path)}`",
                 exitcodes.CONFLICT)
        key.set_pin(new_pin(pin_stdin, min_length=details.min_pin_length))
        retries = key.pin_retries()
    emit(as_json, {"pin_set": True, "retries": retries}, "PIN set")


@pin.command("change")
@key_option
@timeout_option
@pin_options
@json_option
@device_errors
def pin_change(key_path: str | None, timeout: float, pin_stdin: bool, as_json: bool) -> None:
    """Change the PIN (with --pin-stdin: the current PIN, then the new one, one per line)."""
    with open_key(key_path, timeout) as key:
        _before_pin(key, timeout)
        current = PinSource(pin_stdin, "Current PIN")()
        if not current:
            fail("no PIN given", exitcodes.USAGE)
        key.change_pin(current, new_pin(pin_stdin))
    emit(as_json, {"pin_changed": True}, "PIN changed")


@keys.group()
def credentials() -> None:
    """The discoverable credentials stored on a key."""


@credentials.command("list")
@key_option
@timeout_option
@pin_options
@json_option
@device_errors
def credentials_list(key_path: str | None, timeout: float, pin_stdin: bool,
                     as_json: bool) -> None:
    """List the discoverable credentials on a key (needs its PIN)."""
    with open_key(key_path, timeout) as key:
        _before_pin(key, timeout)
        creds = key.list_credentials(PinSource(pin_stdin)())
    data = [
        {"rp_id": c.rp_id, "user": c.user_name, "display_name": c.display_name,
         "user_id": c.user_id.hex(), "credential_id": c.credential_id.hex()}
        for c in creds
    ]
    emit(as_json, {"credentials": data}, lambda: "\n".join(
        f"{c['rp_id']:<28} {c['user'] or '':<20} {c['credential_id']}" for c in data)
        or "no discoverable credentials")


@credentials.command("delete")
@click.argument("credential_id")
@key_option
@timeout_option
@pin_options
@json_option
@device_errors
def credentials_delete(credential_id: str, key_path: str | None, timeout: float,
                       pin_stdin: bool, as_json: bool) -> None:
    """Delete a discoverable credential from a key (CREDENTIAL_ID in hex, from `list`)."""
    try:
        raw = bytes.fromhex(credential_id)
    except ValueError:
        fail("CREDENTIAL_ID must be hexadecimal", exitcodes.USAGE)
    with open_key(key_path, timeout) as key:
        _before_pin(key, timeout)
        key.delete_credential(PinSource(pin_stdin)(), raw)
    emit(as_json, {"deleted": credential_id}, "credential deleted")


@keys.command("reset")
@key_option
@timeout_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@device_errors
def reset(key_path: str | None, timeout: float, yes: bool, as_json: bool) -> None:
    """Factory-reset a key: erases its PIN and every credential on it.

    The key only accepts this within 10 seconds of being plugged in, and only with a touch:
    unplug the key, plug it back in, and run this command at once.
    """
    if not yes and not click.confirm(
            "Reset erases the PIN and every credential on the key. Continue?", err=True):
        fail("not reset", exitcodes.ERROR)
    with open_key(key_path, timeout) as key:
        cancellable(lambda cancel: key.reset(on_touch=touch_prompt, timeout=timeout,
                                             cancel=cancel))
    emit(as_json, {"reset": True}, "key reset: PIN and credentials erased")
