"""Refused and unauthenticated requests in the audit log and the service's log: counts, not
every copy.

Every refusal (``forbidden``) and every login of an unknown user is worth knowing about,
but a local account that repeats one in a loop must not fill the disk (thousands a second,
each an audit event and a log line). So they are counted in windows of ``WINDOW`` seconds,
opened by a key's first event:

* refusals, per caller and operation ``(peer uid, op)`` (``Refusals``): the first ``BURST``
  of a window are recorded in full, as before: the audit event ``service.refused`` (outcome
  ``refused``, detail ``op``, ``peer_uid``, ``peer_pid``, ``peer_user``, ``target``) and a
  warning in the log; the rest are only counted, and when the window closes (a timer) or
  the service stops, one audit event ``service.refused`` with outcome ``repeated`` stands
  for them (detail ``op``, ``peer_uid``, ``peer_user``, ``count``, ``targets``: the first
  ``MAX_NOTES`` distinct user names asked for, ``first_at`` / ``last_at``: seconds since
  the epoch), with one warning in the log;
* logins of unknown users (``UnknownLogins``, the store's ``event_gate``: the audit event
  ``login`` / ``failure`` with reason ``unknown-user``, which the login flow records): all
  together, the first ``BURST`` of a window in full, the rest counted into one ``login``
  event with outcome ``repeated`` (detail ``reason``, ``count``, ``users``, ``first_at``,
  ``last_at``).

So a caller adds at most ``BURST + 1`` events per key and window, whatever its rate.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping

log = logging.getLogger("token_agent.service")

#: seconds of a counting window
WINDOW = 60.0
#: events of one key recorded in full in a window
BURST = 3
#: distinct names listed in a summary
MAX_NOTES = 8


@dataclass
class Window:
    opened: float  # monotonic
    context: Any = None  # what the first event of the window said (e.g. the peer's name)
    seen: int = 0
    repeated: int = 0
    first_at: float | None = None  # wall clock of the first event only counted
    last_at: float | None = None
    notes: list[str] = field(default_factory=list)


class Windows:
    """Counts events per key in windows: ``hit`` says whether to record one in full (the
    first ``burst`` of its window); the others are counted, and ``summary(key, window)`` is
    called for a window with counted events once it is closed: by a timer, by a later
    ``hit``, or by ``close()``."""

    def __init__(self, summary: Callable[[Hashable, Window], None], *, window: float = WINDOW,
                 burst: int = BURST, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, name: str = "token-agent-counts") -> None:
        self._summary = summary
        self.window = window
        self.burst = burst
        self._clock = clock
        self._wall = wall
        self._name = name
        self._lock = threading.Lock()
        self._windows: dict[Hashable, Window] = {}
        self._timer: threading.Timer | None = None

    def hit(self, key: Hashable, *, note: str | None = None, context: Any = None) -> bool:
        """Count an event of ``key`` (``note``: a name to list in the summary); whether it is
        one of the first of its window, to be recorded in full."""
        now = self._clock()
        with self._lock:
            due = self._take_closed(now)
            w = self._windows.get(key)
            if w is None:
                w = self._windows[key] = Window(opened=now, context=context)
            w.seen += 1
            full = w.seen <= self.burst
            if not full:
                w.repeated += 1
                w.last_at = self._wall()
                if w.first_at is None:
                    w.first_at = w.last_at
                if note is not None and note not in w.notes and len(w.notes) < MAX_NOTES:
                    w.notes.append(note)
                self._arm(now)
        self._write(due)
        return full

    def close(self) -> None:
        """Write the summaries of every open window (the service is stopping)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            due = self._take_closed(None)
        self._write(due)

    def _take_closed(self, now: float | None) -> list[tuple[Hashable, Window]]:
        """Remove the windows closed at ``now`` (all with None); those with events only
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
        """A timer for the earliest window with counted events (under the lock)."""
        if self._timer is not None:
            return
        pending = [w.opened for w in self._windows.values() if w.repeated]
        if not pending:
            return
        delay = max(0.0, min(pending) + self.window - now) + 0.01
        self._timer = threading.Timer(delay, self._on_timer)
        self._timer.daemon = True
        self._timer.name = self._name
        self._timer.start()

    def _on_timer(self) -> None:
        now = self._clock()
        with self._lock:
            self._timer = None
            due = self._take_closed(now)
            self._arm(now)
        self._write(due)

    def _write(self, due: list[tuple[Hashable, Window]]) -> None:
        for key, w in due:
            try:
                self._summary(key, w)
            except Exception as e:  # noqa: BLE001: a summary lost is logged, never raised
                log.error("cannot record a count of repeated events: %s", e)


def _record(store: Callable[[], Any], kind: str, **kw: Any) -> None:
    try:
        store().record_event(kind, **kw)
    except Exception as e:  # noqa: BLE001: the refusal stands even if it cannot be recorded
        log.error("cannot record a refusal: %s", e)


class Refusals:
    """The refusals of one service. ``refused(peer, op, target)`` for each one; ``close()``
    at stop writes what is still counted. ``store()`` gives the store to record in."""

    def __init__(self, store: Callable[[], Any], **windows: Any) -> None:
        self._store = store
        self.windows = Windows(self._summary, name="token-agent-refusals", **windows)

    def refused(self, peer, op: str, target: str | None, **detail: Any) -> None:
        """Count a refusal of ``op`` (asked about ``target``) to ``peer``; record it in full
        (with ``detail``, e.g. ``reauth``) when it is one of the first of its window."""
        if not self.windows.hit((peer.uid, op), note=target, context=peer.user):
            return
        log.warning("request refused", extra={"op": op, "peer_uid": peer.uid,
                                              "peer_user": peer.user, "target": target,
                                              **detail})
        _record(self._store, "service.refused", username=target, outcome="refused", detail={
            "op": op, "peer_uid": peer.uid, "peer_pid": peer.pid, "peer_user": peer.user,
            "target": target, **detail})

    def close(self) -> None:
        self.windows.close()

    def _summary(self, key: tuple[int, str], w: Window) -> None:
        uid, op = key
        log.warning("requests refused again: counted, not recorded one by one", extra={
            "op": op, "peer_uid": uid, "peer_user": w.context, "count": w.repeated})
        _record(self._store, "service.refused", outcome="repeated", detail={
            "op": op, "peer_uid": uid, "peer_user": w.context, "count": w.repeated,
            "targets": w.notes, "first_at": w.first_at, "last_at": w.last_at})


class UnknownLogins:
    """Logins of unknown users, counted: ``gate`` is the store's ``event_gate`` (whether to
    record an event now); ``close()`` at stop."""

    REASON = "unknown-user"

    def __init__(self, store: Callable[[], Any], **windows: Any) -> None:
        self._store = store
        self.windows = Windows(self._summary, name="token-agent-unknown-logins", **windows)

    def gate(self, kind: str, outcome: str, username: str | None,
             detail: Mapping[str, Any] | None) -> bool:
        if kind != "login" or outcome != "failure" or not detail or \
                detail.get("reason") != self.REASON:
            return True
        return self.windows.hit(("login", self.REASON), note=username)

    def close(self) -> None:
        self.windows.close()

    def _summary(self, key: Hashable, w: Window) -> None:
        log.warning("logins of unknown users: counted, not recorded one by one",
                    extra={"count": w.repeated, "users": w.notes})
        _record(self._store, "login", outcome="repeated", detail={
            "reason": self.REASON, "count": w.repeated, "users": w.notes,
            "first_at": w.first_at, "last_at": w.last_at})
