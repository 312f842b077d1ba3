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
    with store.connection("read sightings") as conn:
        return conn.execute("SELECT 1 FROM sightings WHERE user_id = ? AND kind = ? AND value = ?",
                            (user_id, kind, value)).fetchone() is not None


def has_history(store: Store, user_id: str) -> bool:
    """Whether the user ever logged in successfully (anything recorded)."""
    with store.connection("read sightings") as conn:
        return conn.execute("SELECT 1 FROM sightings WHERE user_id = ? LIMIT 1",
                            (user_id,)).fetchone() is not None


def record_login(store: Store, user_id: str, *, device_id: str | None, network: str | None,
                 now: float) -> None:
    """Remember the device and network of a successful login."""
    with store.transaction(), store.connection("record sightings") as conn:
        for kind, value in (("device", device_id), ("network", network)):
            if value:
                conn.execute(
                    "INSERT INTO sightings (user_id, kind, value, first_seen, last_seen) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, kind, value) DO UPDATE SET "
                    "last_seen = excluded.last_seen", (user_id, kind, value, now, now))


def last_verified(store: Store, user_id: str, device_id: str | None) -> float | None:
    """When the user last completed a second factor on that device (seconds since the epoch)."""
    if not device_id:
        return None
    with store.connection("read verifications") as conn:
        row = conn.execute("SELECT verified_at FROM verifications WHERE user_id = ? AND device_id = ?",
                           (user_id, device_id)).fetchone()
    return None if row is None else float(row["verified_at"])


def record_verification(store: Store, user_id: str, device_id: str | None, method: str,
                        now: float) -> None:
    if not device_id:
        return
    with store.transaction(), store.connection("record a verification") as conn:
        conn.execute(
            "INSERT INTO verifications (user_id, device_id, verified_at, method) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id, device_id) DO UPDATE SET verified_at = excluded.verified_at, "
            "method = excluded.method", (user_id, device_id, now, method))


def forget_verifications(store: Store, user_id: str) -> None:
    """Every device must verify again (an administrator's action, e.g. after a reset)."""
    with store.transaction(), store.connection("forget verifications") as conn:
        conn.execute("DELETE FROM verifications WHERE user_id = ?", (user_id,))
