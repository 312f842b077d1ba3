"""The workstation's outbox: the audit events of offline logins, delivered to the
organisation's server exactly once, in order.

Each event is queued (``OfflineCache.queue``) in the same local transaction as the change it
records (a key's counter, a consumed TOTP step), numbered by the cache's ``seq`` (increasing,
never reused). ``deliver(cache, client)`` posts the oldest events in batches
(``POST /v1/audit {"events": [...]}``); the server records each one once, keyed by
(workstation, seq), in the transaction that writes its audit record, and answers
``{"acknowledged": max_seq}``; only then are the events up to it deleted here. A lost answer
or a crash between the server's commit and the delete sends the batch again: the server
acknowledges it without recording it twice. ``Deliverer`` runs ``deliver`` in a thread: every
``interval`` seconds while events wait, and at once when ``kick()``ed (after any successful
server contact).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .cache import OfflineCache

log = logging.getLogger("token_agent.outbox")

BATCH = 100
PATH = "/v1/audit"


@dataclass(frozen=True)
class DeliveryReport:
    #: events the server acknowledged (and that were deleted here)
    delivered: int
    #: events still queued
    remaining: int
    #: why delivery stopped early (the server could not be reached, refused), or None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "remaining": self.remaining, "error": self.error}


def deliver(cache: OfflineCache, client, *, batch: int = BATCH, attempts: int = 3,
            pause: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> DeliveryReport:
    """Post the queued events, oldest first, ``batch`` at a time, until none is left. A
    batch that fails is tried again (``attempts`` in all, ``pause`` seconds apart, doubling);
    then delivery stops, keeping the events for the next call. ``client``: an ``OrgClient``
    (``request(method, path, body) -> dict``)."""
    delivered = 0
    while True:
        events = cache.pending(batch)
        if not events:
            return DeliveryReport(delivered, 0)
        sent = [e["seq"] for e in events]
        error = None
        for attempt in range(attempts):
            try:
                answer = client.request("POST", PATH, {"events": events})
                ack = answer.get("acknowledged") if isinstance(answer, dict) else None
                if isinstance(ack, bool) or not isinstance(ack, int) or ack < sent[0]:
                    raise ValueError(f"the server acknowledged {ack!r} for events "
                                     f"{sent[0]}..{sent[-1]}")
                break
            except Exception as exc:  # noqa: BLE001  (the client's errors, a bad answer)
                error = f"{type(exc).__name__}: {exc}"
                log.info("outbox: delivery of events %d..%d failed (%s)", sent[0], sent[-1],
                         error)
                if attempt + 1 < attempts:
                    sleep(pause * 2 ** attempt)
        else:
            return DeliveryReport(delivered, cache.pending_count(), error)
        delivered += cache.acknowledged(min(ack, sent[-1]))


class Deliverer:
    """Delivers the outbox in a background thread (the workstation service)."""

    def __init__(self, cache: OfflineCache, client_factory: Callable[[], Any], *,
                 interval: float = 10.0) -> None:
        self._cache = cache
        self._client_factory = client_factory
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: DeliveryReport | None = None

    def start(self) -> "Deliverer":
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()
        return self

    def kick(self) -> None:
        """Deliver now (a server just answered)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._cache.pending_count():
                    self.last = deliver(self._cache, self._client_factory(), attempts=1)
            except Exception:  # noqa: BLE001  (keep the thread; try again later)
                log.exception("outbox: delivery failed")
            self._wake.wait(self.interval)
            self._wake.clear()
