"""systemd's notification protocol (``sd_notify(3)``), standard library only.

``Type=notify`` services tell systemd when they are ready (``READY=1``), that they are
stopping (``STOPPING=1``), and, with ``WatchdogSec=``, that they are still alive
(``WATCHDOG=1``, at least every ``WATCHDOG_USEC`` microseconds). A service that stops
sending the last is killed with SIGABRT and restarted (``Restart=on-failure``): that is what
catches a process that is alive but no longer serves (its accept loop dead, say).

    notifier = Notifier.from_environ()     # NOTIFY_SOCKET unset: every call does nothing
    notifier.send("READY=1")
    if notifier.watchdog_due(): notifier.send("WATCHDOG=1")
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("token_agent.service")


class Notifier:
    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        self.address = address
        self.watchdog_seconds = watchdog_seconds
        self._last_ping = 0.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "Notifier":
        """From ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` (honoured only when ``WATCHDOG_PID``
        is unset or names this process, as sd_watchdog_enabled(3) says)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not (address.startswith("/") or address.startswith("@")):
            log.warning("NOTIFY_SOCKET %r is not a Unix socket path: ignored", address)
            address = None
        watchdog = None
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC") and (not pid or pid == str(os.getpid())):
            try:
                usec = int(env["WATCHDOG_USEC"])
            except ValueError:
                usec = 0
            if usec > 0:
                watchdog = usec / 1e6
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when there is nobody to tell or
        the send failed (never raises: notification is advice to systemd, not a duty)."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), target)
        except OSError as e:
            log.warning("cannot notify systemd: %s", e.strerror or e)
            return False
        if any(line == "WATCHDOG=1" for line in lines):
            self._last_ping = time.monotonic()
        return True

    def watchdog_due(self) -> bool:
        """Whether a ``WATCHDOG=1`` is due: the watchdog is on and half its interval passed
        since the last one."""
        if self.address is None or not self.watchdog_seconds:
            return False
        return time.monotonic() - self._last_ping >= self.watchdog_seconds / 2
