"""What the policy needs to remember about a user's logins: the devices and networks they
logged in from (unusual-login detection) and when each device last completed a second
factor (re-verification every N hours).

Only a *successful* login records a sighting, so failing to log in from a device never makes
it "known". Networks are kept as prefixes (``policy.network_key``: a /24 or /64 by default),
devices as the opaque device id the caller gives (``workstation_device_id()`` for this
machine).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .store import Store

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def workstation_device_id(files: tuple[str, ...] = MACHINE_ID_FILES) -> str:
    """A stable id for this machine that does not give away its machine-id: the first 16 hex
    digits of SHA-256("token-agent device" + machine-id); ``"unknown-device"`` when no
    machine-id can be read."""
    for name in files:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text:
            return "ws-" + hashlib.sha256(b"token-agent device\0" + text.encode()).hexdigest()[:16]
    return "unknown-device"


def seen(store: Store, user_id: str, kind: str, value: str | None) -> bool:
    if not value:
        return False
    return store.has_sighting(user_id, kind, value)


def has_history(store: Store, user_id: str) -> bool:
    """Whether the user ever logged in successfully (anything recorded)."""
    return store.has_sightings(user_id)


def record_login(store: Store, user_id: str, *, device_id: str | None, network: str | None,
                 now: float) -> None:
    """Remember the device and network of a successful login."""
    with store.transaction():
        for kind, value in (("device", device_id), ("network", network)):
            if value:
                store.record_sighting(user_id, kind, value, now)


def last_verified(store: Store, user_id: str, device_id: str | None) -> float | None:
    """When the user last completed a second factor on that device (seconds since the epoch)."""
    if not device_id:
        return None
    return store.device_verified_at(user_id, device_id)


def record_verification(store: Store, user_id: str, device_id: str | None, method: str,
                        now: float) -> None:
    if not device_id:
        return
    store.record_device_verification(user_id, device_id, method, now)


def forget_verifications(store: Store, user_id: str) -> None:
    """Every device must verify again (an administrator's action, e.g. after a reset)."""
    store.forget_device_verifications(user_id)
