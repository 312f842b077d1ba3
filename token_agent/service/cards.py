"""The service's smartcard side: the readers watched (``drivers.pcsc.readers``), the card
logins on a reader holding a card, and the card-bound sessions (``token_agent.cardsession``),
locked when their card leaves, kept in the store across restarts.

    cards = CardWatch(service)
    cards.start()                 # sessions of the store bound again, readers watched
    runner = cards.runner(c, ui, used)          # a card login for a ceremony
    cards.bind_session(sid, outcome, used)      # after a card login's session row
    cards.stop()

The session manager starts the lock action at once when a card leaves; its events (the
store's session state, ``session.locked`` for the subscribers) are dealt with afterwards, so
that neither the store nor a slow subscriber delays a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from drivers.pcsc.errors import PcscError

from ..outcome import LoginOutcome, Reason

if TYPE_CHECKING:
    from .ceremony import Ceremony, SocketInteraction
    from .host import Host

log = logging.getLogger("token_agent.service")

#: card session end reasons that lock (all but a logout)
LOCK_REASONS = ("card-removed", "reader-removed", "card-swapped",
                "card-gone-after-service-loss", "card-gone-while-stopped")


class ReaderWaitCancelled(PcscError):
    """The ceremony was cancelled while it waited for a free reader."""


class CardWatch:
    def __init__(self, service: "Host") -> None:
        self.service = service
        self.watcher = None  # ReaderWatcher, while readers are watched
        self.manager = None  # CardSessionManager
        self.sessions: dict[str, str] = {}  # manager session id -> store session id
        self._pending_locks: list[dict] = []
        self._session_events: list = []
        self._pending_guard = threading.Lock()
        self._deferring = threading.local()
        self._flush_lock = threading.Lock()
        self._has_lock_action = False
        from ..cardopen import card_opener

        #: ``reader -> card session`` as config.toml's [cards] driver says: every card the
        #: service opens (logins, through the organisation's server too, re-checks)
        self.open_card = card_opener(service.config.cards)

    def reprobe(self, binding) -> bool:
        """Whether the card of ``binding`` is still in its reader (``default_reprobe`` through
        the configured driver: a card without PIV is read over PKCS#11 too)."""
        from ..cardsession import default_reprobe

        return default_reprobe(binding, self.open_card)

    def readers(self) -> dict:
        """Reader name -> whether a card is in it (for ``hello``)."""
        if self.watcher is None:
            return {}
        return {name: st.present for name, st in self.watcher.snapshot().items()}

    def _lock_spec(self) -> str | None:
        spec = self.service.config.cards.lock_command
        if spec is None:
            from ..ceremonies.card import CardSettings

            try:
                spec = CardSettings.from_store(self.service.store).lock_command
            except ValueError as e:
                log.error("card settings: %s", e)
                spec = None
        return spec or None

    def start(self) -> None:
        from ..cardsession import CardSessionManager

        lock_spec = self._lock_spec()
        self._has_lock_action = lock_spec is not None
        self.manager = CardSessionManager(lock_spec, on_event=self._on_session_event,
                                         reprobe=self.reprobe, store=self.service.store)
        restored = self._restore_card_sessions()  # known to the manager before any event
        try:
            from drivers.pcsc.readers import ReaderWatcher, list_readers

            self.watcher = ReaderWatcher(self._on_reader_event,
                                          readers_filter=self.service.config.cards.readers)
            self.watcher.start()
        except Exception as e:  # no pyscard, no PC/SC library: keys only
            log.warning("smartcard readers are not watched: %s", e)
            self.watcher = None
            return
        try:
            list_readers()
        except Exception:  # pcscd is not there now: its return re-reads every card
            return
        self._check_restored(restored)

    def stop(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            try:
                watcher.stop()
            except Exception as e:
                log.error("stopping the reader watcher: %s", e)

    def _restore_card_sessions(self) -> list:
        """The active card-bound sessions of the store, bound again in the session manager."""
        restored = []
        for s in self.service.store.list_sessions(states=["active"]):
            if not s.card_bound:
                continue
            outcome = LoginOutcome(ok=True, method="card", user=s.username, user_id=s.user_id,
                                   credential_id=s.card_serial, detail={})
            session = self.manager.start_session(outcome, reader=s.card_reader,
                                                atr=bytes.fromhex(s.card_atr or ""))
            self.sessions[session.id] = s.id
            restored.append(session)
        return restored

    def _check_restored(self, restored: list) -> None:
        """Lock the restored sessions whose card is not in its reader now; read the
        certificate of the others again (on a thread) and lock those with another card."""
        from drivers.pcsc.readers import ReaderEvent

        snapshot = self.watcher.snapshot()
        to_check = []
        for session in restored:
            binding = session.binding
            state = snapshot.get(binding.reader)
            if state is None or not state.present or bytes(state.atr or b"") != binding.atr:
                log.info("the card of a session left while the service was stopped",
                         extra={"session": self.sessions.get(session.id),
                                "user": session.user, "reader": binding.reader})
                self.handle(ReaderEvent("card-removed", binding.reader, None,
                                               time.monotonic()))
            else:
                to_check.append(session)
        if to_check:
            threading.Thread(target=self._recheck_cards, args=(to_check,), daemon=True,
                             name="token-agent-card-restore").start()

    def _recheck_cards(self, sessions) -> None:
        from drivers.pcsc.readers import ReaderEvent

        for s in sessions:
            try:
                same = self.reprobe(s.binding)
            except Exception as e:
                log.info("cannot read the card of a restored session: %s", e)
                same = False
            if not same:
                self.handle(ReaderEvent("card-removed", s.binding.reader, None,
                                               time.monotonic()))
            else:
                log.info("session restored: its card is still in", extra={
                    "session": self.sessions.get(s.id), "reader": s.binding.reader})

    def _on_reader_event(self, event) -> None:
        """The watcher's thread: the session manager first (it starts the lock action at
        once), then the subscribers, who see the card's event before the session.locked it
        caused."""
        self.handle(event, announce=event)
        log.info("reader event", extra={"event": event.kind, "reader": event.reader})

    def handle(self, event, announce=None) -> None:
        """``CardSessionManager.handle``, its session events dealt with afterwards (their
        store writes and broadcasts never delay the lock action)."""
        self._deferring.active = True
        try:
            if self.manager is not None:
                self.manager.handle(event)
        finally:
            self._deferring.active = False
        if announce is not None:
            at = time.time() - max(0.0, time.monotonic() - announce.at)
            if announce.kind == "card-inserted":
                self.service.broadcast({"event": "card.inserted", "reader": announce.reader,
                                "atr": (announce.atr or b"").hex(), "at": at})
            elif announce.kind == "card-removed":
                self.service.broadcast({"event": "card.removed", "reader": announce.reader, "at": at})
            elif announce.kind in ("service-lost", "service-back"):
                self.service.broadcast({"event": "service.readers",
                                "state": "lost" if announce.kind == "service-lost" else "back",
                                "at": at})
        self._flush_session_events()

    def _on_session_event(self, event) -> None:
        with self._pending_guard:
            self._session_events.append(event)
        if not getattr(self._deferring, "active", False):  # from the manager's own threads
            self._flush_session_events()

    def _flush_session_events(self) -> None:
        with self._flush_lock:
            with self._pending_guard:
                events, self._session_events = self._session_events, []
            for event in events:
                self._session_event(event)

    def _session_event(self, event) -> None:
        """One session event of the manager: the store, then the subscribers."""
        kind = event.kind
        if kind == "session-ended":
            sid = self.sessions.get(event.session_id, event.session_id)
            locking = event.reason in LOCK_REASONS
            try:
                self.service.store.set_session_state(sid, "locked" if locking else "ended",
                                             event.reason)
            except Exception as e:
                log.error("cannot record the session's end: %s", e)
            if not locking:
                return
            item = {"event": "session.locked", "session": sid, "user": event.user,
                    "reader": event.reader, "reason": event.reason}
            if self._has_lock_action:
                self._pending_locks.append(item)  # its latency comes with lock-started
            else:
                self._emit_locked(item, None)
        elif kind in ("lock-started", "lock-failed"):
            pending, self._pending_locks = self._pending_locks, []
            for item in pending:
                self._emit_locked(item, event.latency_ms,
                                  error=event.detail.get("error") if kind == "lock-failed"
                                  else None)

    def _emit_locked(self, item: dict, latency_ms: float | None, error: str | None = None) -> None:
        log.info("session locked: its card left", extra={
            "session": item["session"], "user": item["user"], "reader": item["reader"],
            "reason": item["reason"], "latency_ms": latency_ms, "lock_error": error})
        self.service.broadcast({**item, "latency_ms": latency_ms, "at": time.time()})


    @contextmanager
    def reader_held(self, c: "Ceremony", timeout: float | None = None
                    ) -> Iterator[tuple[str | None, bytes | None]]:
        """``(reader, ATR)`` of a reader holding a card, its reader lock held for the
        ``with`` (None, None: no watcher, PC/SC picks the reader). ``NoCard`` when no reader
        holds a card, :class:`ReaderWaitCancelled` when the ceremony is cancelled meanwhile,
        a ``PcscError`` when every reader stays in use by other logins."""
        from drivers.pcsc import errors as card_errors

        candidates: list[tuple[str | None, bytes | None]] = []
        if self.watcher is not None:
            candidates = [(r, st.atr) for r, st in sorted(self.watcher.snapshot().items())
                          if st.present]
            if not candidates:
                raise card_errors.NoCard("no card is in a reader: insert your card")
        else:
            candidates = [(None, None)]
        deadline = time.monotonic() + (timeout or self.service.config.keys.timeout)
        while True:
            for reader, atr in candidates:
                lock = self.service.device_locks.get(f"reader:{reader}")
                if not lock.acquire(blocking=False):
                    continue
                try:
                    yield reader, atr
                finally:
                    lock.release()
                return
            if c.cancel.is_set():
                raise ReaderWaitCancelled("cancelled")
            if time.monotonic() > deadline:
                raise card_errors.PcscError("the card reader is in use by another login")
            time.sleep(0.05)

    def runner(self, c: "Ceremony", ui: "SocketInteraction", used: list,
               key_login: Callable[[str], LoginOutcome] | None = None
               ) -> Callable[[str | None], LoginOutcome]:
        """A card login on a reader holding a card (its reader lock held), remembering the
        card's outcome, reader and ATR in ``used`` (for the session's binding). A locked
        card may be unlocked by its holder on the way (``selfunlock.py``: the "Forgot your
        card PIN?" offer; ``key_login``: the key instead of a password there)."""
        from drivers.pcsc import errors as card_errors

        from ..ceremonies.card import device_failure
        from ..ceremonies.devices import make_card_login
        from .selfunlock import offer_after_login

        def run(name: str | None) -> LoginOutcome:
            with c.unlocked():
                try:
                    with self.reader_held(c) as (reader, atr):
                        login = make_card_login(self.service.store, pin_provider=ui.card_pin,
                                                reader=reader, open_card=self.open_card)
                        outcome = login(name)
                        outcome = offer_after_login(self.service, c, ui, reader, name, outcome,
                                                    relogin=lambda: login(name),
                                                    key_login=key_login)
                except ReaderWaitCancelled:
                    return LoginOutcome.failure("card", Reason.CANCELLED, "cancelled")
                except card_errors.PcscError as e:
                    return LoginOutcome.failure("card", device_failure(e), e.message)
                if outcome.ok:
                    used.append((outcome, reader, atr))
                return outcome

        return run

    def card_of(self, card_used: list) -> tuple[LoginOutcome, str, bytes] | None:
        """The card a login used, as ``(outcome, reader, ATR)`` (what ``runner`` put in
        ``card_used``), when its session is to be bound to it: a reader watched, a card
        seen in it; else None."""
        card = card_used[-1] if card_used else None
        if card is None or card[1] is None or self.manager is None:
            return None
        card_outcome, reader, atr = card
        return card_outcome, reader, bytes(atr or b"")

    def bind_session(self, sid: str, outcome: LoginOutcome, card_used: list) -> None:
        """After the session's row: a card-bound session joins the session manager, which
        locks it when its card leaves (the row first, so that a removal racing with this
        finds it)."""
        card = self.card_of(card_used)
        if card is None:
            return
        card_outcome, reader, atr = card
        session = self.manager.start_session(card_outcome, reader=reader, atr=atr)
        self.sessions[session.id] = sid
        # the card may have left before the manager knew of the session
        state = self.watcher.snapshot().get(reader) if self.watcher is not None else None
        if state is None or not state.present or bytes(state.atr or b"") != atr:
            from drivers.pcsc.readers import ReaderEvent

            self.handle(ReaderEvent("card-removed", reader, None, time.monotonic()))

