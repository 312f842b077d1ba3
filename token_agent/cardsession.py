"""Sessions bound to a smartcard: when the card leaves, the session ends and the screen locks.

A login through a card (``token_agent.ceremonies.card.login_with_card``) starts a
:class:`CardSession` bound to that card: the reader it is in, its ATR and the serial number of
the certificate it logged in with. :class:`CardSessionManager` takes the PC/SC watcher's
events (pass :meth:`CardSessionManager.handle` as ``ReaderWatcher``'s ``on_event``) and:

* ``card-removed`` in the reader of an active session, or ``reader-removed`` of that reader,
  or ``card-inserted`` there with another ATR (a swap the watcher saw as one change): the
  session ends, the **lock action starts at once, on the watcher's thread** (a command started
  with ``subprocess.Popen`` and not waited for, e.g. ``loginctl lock-session``, or a Python
  callable), and a ``lock-started`` event is emitted with the latency from the moment the
  watcher saw the change (``ReaderEvent.at``) to the moment the action started;
* ``service-lost`` (pcscd stopped or restarted): the card's fate is unknown, every session is
  *suspended* (not ended: a pcscd restart alone must not lock a clinician out). On
  ``service-back`` each suspended session's card is checked afresh, on a worker thread
  (``reprobe``: by default the reader is opened and the 9A certificate's serial compared): the
  same card still there resumes the session; anything else ends it and locks;
* everything observable is emitted as a :class:`SessionEvent` to ``on_event`` (for the
  service of issue 7) and kept in ``events`` (a ``queue.Queue``), and the lock latencies in
  ``lock_latencies_ms``. With a ``store``, each lock is also an audit event
  (``session.lock``), written after the action started.

The manager decides nothing about who may log in: it only ends what a card removal ends.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
import time
import uuid as uuid_module
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("token_agent.cardsession")

#: reasons a card session ends
END_CARD_REMOVED = "card-removed"
END_READER_REMOVED = "reader-removed"
END_CARD_SWAPPED = "card-swapped"
END_CARD_GONE_AFTER_SERVICE_LOSS = "card-gone-after-service-loss"
END_LOGOUT = "logout"


@dataclass(frozen=True)
class CardBinding:
    """What ties a session to one card: the reader, the ATR, the certificate's serial."""

    reader: str
    atr: bytes
    certificate_serial: str
    uuid: str | None = None

    def to_json(self) -> dict:
        return {"reader": self.reader, "atr": self.atr.hex(),
                "certificate_serial": self.certificate_serial, "uuid": self.uuid}


@dataclass
class CardSession:
    id: str
    user: str | None
    user_id: str | None
    binding: CardBinding
    started_at: float  # time.time()
    state: str = "active"  # active, suspended, ended
    ended_at: float | None = None
    end_reason: str | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["binding"] = self.binding.to_json()
        return data


@dataclass(frozen=True)
class SessionEvent:
    """``kind``: session-started, session-ended, session-suspended, session-resumed,
    lock-started, lock-failed. ``at``: ``time.monotonic()``; ``latency_ms``: for lock events,
    from the watcher seeing the change to the action started."""

    kind: str
    session_id: str | None
    user: str | None
    reader: str | None
    at: float
    reason: str | None = None
    latency_ms: float | None = None
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


LockAction = Callable[["CardSession"], Any] | Sequence[str] | str | None


def make_lock_action(spec: LockAction) -> Callable[[CardSession], Any] | None:
    """A callable that *starts* the lock: ``spec`` itself when callable, else a command (an
    argv list or a shell-like string) started with ``Popen`` and not waited for (a reaper
    thread collects its exit status). None or empty: no lock action."""
    if spec is None or spec == "" or spec == []:
        return None
    if callable(spec):
        return spec
    import shlex

    argv = shlex.split(spec) if isinstance(spec, str) else list(spec)

    def start(_session: CardSession) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=proc.wait, name="token-agent-lock-reaper", daemon=True).start()
        return proc

    start.argv = argv  # type: ignore[attr-defined]
    return start


def default_reprobe(binding: CardBinding, open_card: Callable[[str | None], Any] | None = None
                    ) -> bool:
    """Whether the card of ``binding`` is (still) in its reader: same certificate serial.
    ``open_card``: ``token_agent.cardopen.card_opener(config.cards)`` (default: the built-in
    defaults, driver "auto")."""
    from .cardopen import card_opener
    from .ceremonies.card import _certificate_subject

    session = (open_card or card_opener())(binding.reader)
    try:
        _uuid, _holder, serial = _certificate_subject(session.certificate("9a"))
    finally:
        session.close()
    return serial == binding.certificate_serial


class CardSessionManager:
    """Card-bound sessions, ended (and the lock action started) when their card leaves."""

    def __init__(self, lock_action: LockAction = None, *,
                 on_event: Callable[[SessionEvent], None] | None = None,
                 reprobe: Callable[[CardBinding], bool] | None = None,
                 store=None) -> None:
        self._lock_action = make_lock_action(lock_action)
        self._on_event = on_event
        self._reprobe = reprobe or default_reprobe
        self._store = store
        self._lock = threading.RLock()
        self._sessions: dict[str, CardSession] = {}
        self.events: "queue.Queue[SessionEvent]" = queue.Queue()
        self.lock_latencies_ms: list[float] = []

    # -- sessions ------------------------------------------------------------------------------

    def start_session(self, outcome, *, reader: str, atr: bytes) -> CardSession:
        """A session for a successful card ``outcome`` (a LoginOutcome of method "card"), bound
        to the card in ``reader`` (``atr`` as the watcher or the connection saw it)."""
        if not outcome.ok:
            raise ValueError("a session starts only from a successful login")
        binding = CardBinding(reader=reader, atr=bytes(atr or b""),
                              certificate_serial=str(outcome.credential_id),
                              uuid=outcome.detail.get("uuid"))
        session = CardSession(id=uuid_module.uuid4().hex, user=outcome.user,
                              user_id=outcome.user_id, binding=binding, started_at=time.time())
        with self._lock:
            self._sessions[session.id] = session
        self._emit(SessionEvent("session-started", session.id, session.user, reader,
                                time.monotonic(), detail=binding.to_json()))
        return session

    def sessions(self, *, active_only: bool = True) -> list[CardSession]:
        with self._lock:
            return [s for s in self._sessions.values()
                    if not active_only or s.state != "ended"]

    def session_for(self, reader: str) -> CardSession | None:
        with self._lock:
            return next((s for s in self._sessions.values()
                         if s.state != "ended" and s.binding.reader == reader), None)

    def end_session(self, session_id: str, reason: str = END_LOGOUT) -> CardSession | None:
        """End a session without locking (a logout)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.state == "ended":
                return None
            self._end(session, reason)
        self._emit(SessionEvent("session-ended", session.id, session.user,
                                session.binding.reader, time.monotonic(), reason=reason))
        return session

    def _end(self, session: CardSession, reason: str) -> None:
        session.state = "ended"
        session.ended_at = time.time()
        session.end_reason = reason

    # -- the watcher's events ------------------------------------------------------------------

    def handle(self, event) -> None:
        """The ``ReaderWatcher`` callback (runs on the watcher's thread; quick)."""
        kind, reader = event.kind, event.reader
        if kind in ("card-removed", "reader-removed"):
            reason = END_CARD_REMOVED if kind == "card-removed" else END_READER_REMOVED
            self._lock_sessions([s for s in self.sessions() if s.binding.reader == reader],
                                reason, event.at)
        elif kind == "card-inserted":
            swapped = [s for s in self.sessions() if s.binding.reader == reader
                       and s.state == "active" and bytes(event.atr or b"") != s.binding.atr]
            self._lock_sessions(swapped, END_CARD_SWAPPED, event.at)
        elif kind == "service-lost":
            with self._lock:
                suspended = [s for s in self._sessions.values() if s.state == "active"]
                for s in suspended:
                    s.state = "suspended"
            for s in suspended:
                self._emit(SessionEvent("session-suspended", s.id, s.user, s.binding.reader,
                                        time.monotonic(), reason="service-lost"))
        elif kind == "service-back":
            threading.Thread(target=self._recheck, args=(event.at,),
                             name="token-agent-card-recheck", daemon=True).start()

    def _recheck(self, seen_at: float) -> None:
        with self._lock:
            suspended = [s for s in self._sessions.values() if s.state == "suspended"]
        for s in suspended:
            try:
                present = bool(self._reprobe(s.binding))
            except Exception as e:  # no card, no reader, another card: all mean "gone"
                log.info("card of session %s not found after the service came back: %s", s.id, e)
                present = False
            if present:
                with self._lock:
                    if s.state == "suspended":
                        s.state = "active"
                self._emit(SessionEvent("session-resumed", s.id, s.user, s.binding.reader,
                                        time.monotonic(), reason="service-back"))
            else:
                self._lock_sessions([s], END_CARD_GONE_AFTER_SERVICE_LOSS, seen_at)

    def _lock_sessions(self, sessions: list[CardSession], reason: str, seen_at: float) -> None:
        with self._lock:
            ending = [s for s in sessions if s.state != "ended"]
            for s in ending:
                self._end(s, reason)
        if not ending:
            return
        # the lock first (what the target measures), then the bookkeeping
        error = None
        started = None
        if self._lock_action is not None:
            try:
                self._lock_action(ending[0])
                started = time.monotonic()
            except Exception as e:  # a missing command: say so, the session is ended anyway
                error = e
                log.error("the lock action failed to start: %s", e)
        latency = None if started is None else round((started - seen_at) * 1000, 3)
        if latency is not None:
            self.lock_latencies_ms.append(latency)
        for s in ending:
            self._emit(SessionEvent("session-ended", s.id, s.user, s.binding.reader,
                                    time.monotonic(), reason=reason))
        first = ending[0]
        if error is not None:
            self._emit(SessionEvent("lock-failed", first.id, first.user, first.binding.reader,
                                    time.monotonic(), reason=reason,
                                    detail={"error": str(error)}))
        elif self._lock_action is not None:
            self._emit(SessionEvent("lock-started", first.id, first.user, first.binding.reader,
                                    started, reason=reason, latency_ms=latency))
        if self._store is not None:
            try:
                self._store.record_event(
                    "session.lock", user_id=first.user_id,
                    outcome="failure" if error else "success",
                    detail={"reason": reason, "reader": first.binding.reader,
                            "uuid": first.binding.uuid, "latency_ms": latency,
                            "lock_action": self._lock_action is not None})
            except Exception as e:
                log.error("cannot record the lock in the store: %s", e)

    def _emit(self, event: SessionEvent) -> None:
        self.events.put(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("a session event handler failed")
