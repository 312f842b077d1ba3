"""Refused requests in the audit log and the service's log: counts, not every copy.

Every refusal (``forbidden``) is worth knowing about, but a local account that repeats one
in a loop must not fill the disk (thousands a second, each an audit event and a log line).
So refusals are counted per caller and operation, ``(peer uid, op)``, in windows of
``WINDOW`` seconds opened by that pair's first refusal:

* the first ``BURST`` refusals of a window are recorded in full, as before: the audit event
  ``service.refused`` (outcome ``refused``, detail ``op``, ``peer_uid``, ``peer_pid``,
  ``peer_user``, ``target``) and a warning in the log;
* the rest are only counted; when the window closes (a timer), or when the service stops,
  one audit event ``service.refused`` with outcome ``repeated`` stands for them (detail
  ``op``, ``peer_uid``, ``peer_user``, ``count``, ``targets``: the first ``MAX_TARGETS``
  distinct user names asked for, ``first_at`` / ``last_at``: seconds since the epoch), with
  one warning in the log.

So one caller adds at most ``BURST + 1`` events per operation and window, whatever its rate.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("token_agent.service")

#: seconds of a counting window
WINDOW = 60.0
#: refusals of one (peer uid, op) recorded in full in a window
BURST = 3
#: distinct target user names listed in a summary
MAX_TARGETS = 8


@dataclass
class _Window:
    opened: float  # monotonic
    peer_user: str | None
    seen: int = 0
    repeated: int = 0
    first_at: float | None = None  # wall clock of the first refusal only counted
    last_at: float | None = None
    targets: list[str] = field(default_factory=list)


class Refusals:
    """The refusals of one service. ``refused(peer, op, target)`` for each one; ``close()``
    at stop writes what is still counted. ``store()`` gives the store to record in."""

    def __init__(self, store: Callable[[], Any], *, window: float = WINDOW, burst: int = BURST,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._store = store
        self.window = window
        self.burst = burst
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._windows: dict[tuple[int, str], _Window] = {}
        self._timer: threading.Timer | None = None

    def refused(self, peer, op: str, target: str | None) -> None:
        """Count a refusal of ``op`` (asked about ``target``) to ``peer``; record it in full
        when it is one of the first of its window."""
        now = self._clock()
        key = (peer.uid, op)
        with self._lock:
            due = self._take_closed(now)
            w = self._windows.get(key)
            if w is None:
                w = self._windows[key] = _Window(opened=now, peer_user=peer.user)
            w.seen += 1
            full = w.seen <= self.burst
            if not full:
                w.repeated += 1
                w.last_at = self._wall()
                if w.first_at is None:
                    w.first_at = w.last_at
                if target is not None and target not in w.targets and \
                        len(w.targets) < MAX_TARGETS:
                    w.targets.append(target)
                self._arm(now)
        self._write(due)
        if full:
            log.warning("request refused", extra={"op": op, "peer_uid": peer.uid,
                                                  "peer_user": peer.user, "target": target})
            self._record(outcome="refused", username=target, detail={
                "op": op, "peer_uid": peer.uid, "peer_pid": peer.pid,
                "peer_user": peer.user, "target": target})

    def close(self) -> None:
        """Write the summaries of every open window (the service is stopping)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            due = self._take_closed(None)
        self._write(due)

    # -- internals -----------------------------------------------------------------------------

    def _take_closed(self, now: float | None) -> list[tuple[tuple[int, str], _Window]]:
        """Remove the windows closed at ``now`` (all with None); those with refusals only
        counted are returned, to be written (under the lock)."""
        closed = [k for k, w in self._windows.items()
                  if now is None or now - w.opened >= self.window]
        due = []
        for k in closed:
            w = self._windows.pop(k)
            if w.repeated:
                due.append((k, w))
        return due

    def _arm(self, now: float) -> None:
        """A timer for the earliest window with counted refusals (under the lock)."""
        if self._timer is not None:
            return
        pending = [w.opened for w in self._windows.values() if w.repeated]
        if not pending:
            return
        delay = max(0.0, min(pending) + self.window - now) + 0.01
        self._timer = threading.Timer(delay, self._on_timer)
        self._timer.daemon = True
        self._timer.name = "token-agent-refusals"
        self._timer.start()

    def _on_timer(self) -> None:
        now = self._clock()
        with self._lock:
            self._timer = None
            due = self._take_closed(now)
            self._arm(now)
        self._write(due)

    def _write(self, due: list[tuple[tuple[int, str], _Window]]) -> None:
        for (uid, op), w in due:
            log.warning("requests refused again: counted, not recorded one by one", extra={
                "op": op, "peer_uid": uid, "peer_user": w.peer_user, "count": w.repeated})
            self._record(outcome="repeated", username=None, detail={
                "op": op, "peer_uid": uid, "peer_user": w.peer_user, "count": w.repeated,
                "targets": w.targets, "first_at": w.first_at, "last_at": w.last_at})

    def _record(self, *, outcome: str, username: str | None, detail: dict) -> None:
        try:
            self._store().record_event("service.refused", username=username, outcome=outcome,
                                       detail=detail)
        except Exception as e:  # noqa: BLE001: the refusal stands even if it cannot be recorded
            log.error("cannot record a refusal: %s", e)
