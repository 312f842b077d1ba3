"""The service's main loop (``token-agent serve``): signals, systemd's notifications and the
health check.

    code = serve_until_stopped(service, stop, hup, reload=..., notifier=Notifier.from_environ())

Ready (``READY=1``) once the service listens; ``WATCHDOG=1`` while it is healthy (under
``WatchdogSec=``); ``RELOADING=1`` then ``READY=1`` around a SIGHUP's reload; ``STOPPING=1``
at the end. A service that is alive but cannot serve (``Service.healthy()``: an accept loop
dead or stuck) stops and returns 1, so that systemd restarts it even without a watchdog;
a stop asked for (SIGTERM, SIGINT) returns 0.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from .. import exitcodes
from .sdnotify import Notifier

log = logging.getLogger("token_agent.service")

#: how often the loop looks at the signals and the service's health
TICK = 0.2


def serve_until_stopped(service, stop: threading.Event, hup: threading.Event, *,
                        reload: Callable[[], None], notifier: Notifier,
                        tick: float = TICK) -> int:
    notifier.send("READY=1", f"MAINPID={os.getpid()}", "STATUS=serving")
    failure = None
    try:
        while not stop.wait(tick):
            if hup.is_set():
                hup.clear()
                notifier.send("RELOADING=1")
                reload()
                notifier.send("READY=1", "STATUS=serving")
            failure = service.healthy()
            if failure is not None:
                log.critical("the service cannot serve: %s: stopping (exit %d)", failure,
                             exitcodes.ERROR)
                notifier.send(f"STATUS={failure}")
                break
            if notifier.watchdog_due():
                notifier.send("WATCHDOG=1")
    finally:
        notifier.send("STOPPING=1")
        service.stop()
    return exitcodes.ERROR if failure is not None else exitcodes.OK
