"""An unusual login (a device or network new to a user who has logged in before): recorded
as the audit event ``login.unusual`` and told to the user, by their confirmed email
addresses and mobiles (``token_agent.notify.tell_user``), so that a stolen password used
from elsewhere is noticed by the person it belongs to.

The alert comes once the primary factor has succeeded (the policy decides then), before any
second factor: the notice says so ("your password was used to start a sign-in"), since the
second factor may still fail, and a password that works for somebody else is what the
person must hear about. The notice is sent from a thread while the login goes on (a slow
mail server does not hold up the person at the prompt); the login waits for it before it
returns (:func:`finish`), so that a command that ends right after its login does not lose
it. Nothing secret is in it: where, when and with what, never a code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import threading
from typing import TYPE_CHECKING

from .. import kinds

if TYPE_CHECKING:
    from ..agent import Agent
    from .login import Device

log = logging.getLogger("token_agent.login")

SUBJECT = "A sign-in to your account from a new device or network"
#: how long a login waits at its end for its notice to be handed over (seconds)
WAIT_SECONDS = 30.0


def device_ref(device_id: str | None) -> str | None:
    """A short reference to a device id for the audit log and the user's sign-in list: the
    same device gives the same reference, but the id itself (a browser's long-lived cookie)
    is not written where others read it."""
    if not device_id:
        return None
    return hashlib.sha256(b"token-agent device ref\0" + device_id.encode()).hexdigest()[:10]


def where_detail(device: "Device", network: str | None) -> dict:
    """Where a login came from, for its audit event (``login``): the device's kind, whether
    it is a joined workstation, its reference (``device_ref``) and the network."""
    return {"device": device.kind, "joined": device.joined,
            "device_ref": device_ref(device.device_id), "network": network}


def where_of(agent: "Agent", device: "Device") -> dict:
    """:func:`where_detail` before the policy's facts are known (a failed login's event):
    the network at the policy's prefix length, None when the address is not one."""
    from ..policy import network_key

    network = None
    if device.network:
        try:
            network = network_key(agent.policy, device.network)
        except ValueError:
            pass
    return where_detail(device, network)


def where(device: "Device", network: str | None) -> str:
    """Where a login came from, in words: "a joined workstation on network 10.1.2.0/24"."""
    if device.joined:
        what = "a joined workstation of the organisation"
    elif device.kind == "managed":
        what = "a managed device"
    else:
        what = "a web browser or personal device"
    return what + (f" on network {network}" if network else "")


def notice(agent: "Agent", user, *, primary: str, device: "Device", network: str | None,
           now: float) -> str:
    """The text the user is sent (no secret: where, when, with what)."""
    label = kinds.by_policy(primary).label if kinds.get_policy(primary) else primary
    when = _dt.datetime.fromtimestamp(now, _dt.timezone.utc).strftime("%d %B %Y at %H:%M UTC")
    return (f"Your {label} was used to start a sign-in to your {agent.issuer} account "
            f"({user.username}) on {when}, from {where(device, network)} that you have not "
            f"signed in from before. If this was you, you do not need to do anything. If not, "
            f"change your password now: your recent sign-ins are listed on your account's "
            f"\"Recent sign-ins\" page.")


def alert(agent: "Agent", user, *, primary: str, device: "Device", network: str | None,
          facts) -> threading.Thread:
    """Record ``login.unusual`` and start telling the user; returns the thread sending the
    notice (``finish`` waits for it)."""
    now = agent.now()
    agent.store.record_event("login.unusual", user_id=user.id, outcome="alert",
                             detail={"device": device.device_id, "network": network,
                                     "device_ref": device_ref(device.device_id),
                                     "device_seen": facts.device_seen,
                                     "network_seen": facts.network_seen})
    text = notice(agent, user, primary=primary, device=device, network=network, now=now)

    def tell() -> None:
        from ..notify import tell_user

        try:
            told = tell_user(agent, user, SUBJECT, text)
        except Exception:  # tell_user logs its own failures; never let a notice end a login
            log.exception("could not tell %s about an unusual login", user.username)
            return
        log.info("told %s about an unusual login: %s", user.username,
                 ", ".join(told) or "no confirmed email address or mobile")

    thread = threading.Thread(target=tell, name="unusual-login-notice", daemon=False)
    thread.start()
    return thread


def finish(threads: list[threading.Thread], timeout: float = WAIT_SECONDS) -> None:
    """Wait (at most ``timeout`` in all) for the notices a login started."""
    import time

    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
