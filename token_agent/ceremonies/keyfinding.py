"""What to tell the person when no security key can be used, or not the one named.

The driver reports the facts (``drivers.fido.discovery``: the keys it can open, and the FIDO
hidraw nodes plugged in that this process may not open); the words are here, for the CLI,
the login flow and the service alike. A key that this account may not open is not "no key":
python-fido2's listing passes over it in silence, and the person, who sees the key in the
USB port, is told to insert it. It is the udev rule that is missing (README "udev").
"""

from __future__ import annotations

import os
import pwd

from drivers.fido.errors import FidoKeyError, NoKeyFound


class KeyNotPermitted(NoKeyFound):
    """A FIDO key is plugged in, but this process may not open its hidraw node."""

    code = "key_not_permitted"


class KeyNotThere(NoKeyFound):
    """``--key PATH`` names no key that is plugged in."""

    code = "key_not_there"


def _account() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def no_key_found(error: NoKeyFound | None = None) -> NoKeyFound:
    """``error`` (default: a plain NoKeyFound), or, when the driver sees FIDO keys this
    account may not open, :class:`KeyNotPermitted` saying so and what to do."""
    from drivers.fido.discovery import unopenable_usb_keys

    blocked = unopenable_usb_keys()
    if not blocked:
        return error if error is not None else NoKeyFound()
    return KeyNotPermitted(
        "A security key is present but this account may not open it: install the udev rule "
        "(README §udev), then remove the key and insert it again "
        f"({', '.join(blocked)}; account {_account()}).")


def explain(error: FidoKeyError) -> FidoKeyError:
    """A key error as the person should read it: a NoKeyFound says why, when it can."""
    if type(error) is NoKeyFound:  # not one of the above, which say it already
        return no_key_found(error)
    return error


def key_not_at(path: str, present: list[str]) -> NoKeyFound:
    """``--key PATH`` names none of the keys ``present`` (their paths): say so and list
    them; a key there that this account may not open is reported as such."""
    from drivers.fido.discovery import unopenable_usb_keys

    blocked = unopenable_usb_keys()
    if path in blocked:
        return no_key_found()
    listed = present + [f"{b} (this account may not open it)" for b in blocked]
    return KeyNotThere(f"No security key at {path}. "
                      + (f"The keys here: {', '.join(listed)}." if listed
                         else "No security key is plugged in."))
