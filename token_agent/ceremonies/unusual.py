"""An unusual login (a device or network new to a user who has logged in before): recorded
as the audit event ``login.unusual`` and told to the user, by their confirmed email
addresses and mobiles (``token_agent.notify.tell_user``), so that a stolen password used
from elsewhere is noticed by the person it belongs to.

The alert is recorded once the primary factor has succeeded (the policy decides then),
before any second factor; the notice is sent when the login is over (:func:`finish`), saying
whether it signed in or stopped after the primary factor: a password that works for somebody
else is what the person must hear about, even when the second factor stopped them. Sent at
the end, the notice never comes between a code and the person waiting for it; the login
waits for it (at most ``WAIT_SECONDS``), so that a command that ends right after its login
does not lose it. Nothing secret is in it: where, when and with what, never a code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import kinds

if TYPE_CHECKING:
    from ..agent import Agent
    from .login import Device

log = logging.getLogger("token_agent.login")

SUBJECT = "A sign-in to your account from a new device or network"
#: how long a login waits at its end for its notice to be handed over (seconds)
WAIT_SECONDS = 15.0


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


@dataclass(frozen=True)
class Alert:
    """An unusual login recorded, its notice not sent yet."""

    user: Any
    primary: str
    device: "Device"
    network: str | None
    at: float


def notice(agent: "Agent", alert: Alert, *, signed_in: bool) -> str:
    """The text the user is sent (no secret: where, when, with what, and how it ended)."""
    label = kinds.by_policy(alert.primary).label if kinds.get_policy(alert.primary) \
        else alert.primary
    when = _dt.datetime.fromtimestamp(alert.at, _dt.timezone.utc).strftime(
        "%d %B %Y at %H:%M UTC").lstrip("0")
    place = f"{where(alert.device, alert.network)} that you have not signed in from before"
    user = alert.user
    if signed_in:
        what = (f"Your {agent.issuer} account ({user.username}) was signed in to on {when}, "
                f"from {place}.")
    else:
        what = (f"Your {label} was used to start a sign-in to your {agent.issuer} account "
                f"({user.username}) on {when}, from {place}. The sign-in did not finish.")
    return (f"{what} If this was you, you do not need to do anything. If not, change your "
            f"password now: your recent sign-ins are listed on your account's \"Recent "
            f"sign-ins\" page.")


def alert(agent: "Agent", user, *, primary: str, device: "Device", network: str | None,
          facts) -> Alert:
    """Record ``login.unusual``; the notice is sent by :func:`finish` when the login is over."""
    agent.store.record_event("login.unusual", user_id=user.id, outcome="alert",
                             detail={"device": device.device_id, "network": network,
                                     "device_ref": device_ref(device.device_id),
                                     "device_seen": facts.device_seen,
                                     "network_seen": facts.network_seen})
    return Alert(user, primary, device, network, agent.now())


def finish(agent: "Agent", alerts: list[Alert], *, signed_in: bool,
           timeout: float = WAIT_SECONDS) -> None:
    """Tell the user about the login's unusual-login alert (``notify.tell_user``: their
    verified email addresses and mobiles), waiting at most ``timeout`` for it to be handed
    over; a failure is logged, never raised (the login is over either way)."""
    import threading

    for a in alerts:
        text = notice(agent, a, signed_in=signed_in)

        def tell(a: Alert = a, text: str = text) -> None:
            from ..notify import tell_user

            try:
                told = tell_user(agent, a.user, SUBJECT, text)
            except Exception:  # noqa: BLE001  (tell_user logs its own failures)
                log.exception("could not tell %s about an unusual login", a.user.username)
                return
            log.info("told %s about an unusual login: %s", a.user.username,
                     ", ".join(told) or "no verified email address or mobile")

        thread = threading.Thread(target=tell, name="unusual-login-notice", daemon=False)
        thread.start()
        thread.join(timeout)
