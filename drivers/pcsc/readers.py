"""Smartcard readers through PC/SC: list them, and watch readers and cards come and go.

    from drivers.pcsc.readers import ReaderWatcher, list_readers

    print(list_readers())                        # ["Virtual PCD 00 00", "Virtual PCD 00 01"]
    with ReaderWatcher(lambda e: print(e.kind, e.reader, e.atr and e.atr.hex())) as watcher:
        print(watcher.snapshot())                # {reader: ReaderState(...)} right now
        ...                                      # events arrive on the watcher's thread

One thread, one blocking ``SCardGetStatusChange`` over every reader plus the
``\\\\?PnP?\\Notification`` pseudo-reader (readers plugged in or out), with an infinite
timeout: nothing polls. :meth:`ReaderWatcher.stop` wakes it with ``SCardCancel`` from the
caller's thread. pyscard's ``CardMonitor`` / ``ReaderMonitor`` are not used: they poll and can
take up to a minute to stop. pcscd itself notices a card coming or going within its own 400 ms
poll (typically 100-200 ms); the watcher's event follows within a millisecond or two, stamped
``at = time.monotonic()`` when the watcher saw the change.

Events (:class:`ReaderEvent`): ``reader-added``, ``reader-removed``, ``card-inserted`` (with
the ATR), ``card-removed``, ``service-lost`` and ``service-back``. When pcscd stops or
restarts, the watcher says ``service-lost`` (from then on every reader and card is unknown:
open card handles are dead), establishes a new context with a backoff growing from 50 ms to
1 s, and says ``service-back`` followed by ``reader-added`` for each reader and
``card-inserted`` for each card present then, so the snapshot and the events always agree. A
card swapped within one pcscd poll is reported as removed then inserted (pcscd's event
counter changed).

The ``on_event`` callback runs on the watcher's thread; it should be quick (hand the event
over to a queue); an exception from it is logged and the watcher carries on. This is a
driver: it does not decide what a removal means (locking is the caller's business).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import (
    SCARD_E_CANCELLED,
    SCARD_E_NO_READERS_AVAILABLE,
    SCARD_E_TIMEOUT,
    SCARD_E_UNKNOWN_READER,
    from_scard_code,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EVENT_KINDS",
    "PNP_NOTIFICATION",
    "ReaderEvent",
    "ReaderState",
    "ReaderWatcher",
    "list_readers",
]

#: the pseudo-reader whose state changes when a reader is connected or disconnected
PNP_NOTIFICATION = "\\\\?PnP?\\Notification"
EVENT_KINDS = ("reader-added", "reader-removed", "card-inserted", "card-removed",
               "service-lost", "service-back")
#: reconnection backoff after the service is lost: first wait, growth factor, longest wait
BACKOFF_START = 0.05
BACKOFF_FACTOR = 2.0
BACKOFF_MAX = 1.0
#: how long :meth:`ReaderWatcher.stop` waits for the thread before giving up on it
STOP_TIMEOUT = 3.0


def _scard():
    from smartcard import scard

    return scard


def _u32(code: int) -> int:
    return int(code) & 0xFFFFFFFF


def _establish(scard) -> tuple[int, object]:
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    return _u32(hresult), context


def _list(scard, context) -> tuple[int, list[str]]:
    hresult, readers = scard.SCardListReaders(context, [])
    hresult = _u32(hresult)
    if hresult == SCARD_E_NO_READERS_AVAILABLE:
        return 0, []
    return hresult, list(readers or [])


def list_readers() -> list[str]:
    """The names of the smartcard readers PC/SC knows now (``[]`` when there are none).
    :class:`~drivers.pcsc.errors.PcscUnavailable` when pcscd does not answer."""
    scard = _scard()
    hresult, context = _establish(scard)
    if hresult != 0:
        raise from_scard_code(hresult, "connecting to pcscd")
    try:
        hresult, readers = _list(scard, context)
        if hresult != 0:
            raise from_scard_code(hresult, "listing readers")
        return readers
    finally:
        scard.SCardReleaseContext(context)


def card_present(reader: str, *, settle: float = 0.0) -> bool | None:
    """Whether ``reader`` holds a card (None when PC/SC cannot say: no pcscd, no such
    reader). With ``settle`` > 0, a card still present is watched that many seconds for its
    removal (pcscd learns of a removal by polling the reader, after a failed exchange may
    already have shown it). For drivers that reach the card another way (a PKCS#11 module)
    and must tell a removed card from a failing one."""
    with _status_now(reader) as (scard, context, hresult, states):
        if context is None:
            return None
        deadline = time.monotonic() + settle
        while True:
            if _u32(hresult) != 0 or not states:
                return None
            state = states[0][1]
            if state & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_UNAVAILABLE):
                return None
            present = bool(state & scard.SCARD_STATE_PRESENT)
            left = deadline - time.monotonic()
            if not present or left <= 0:
                return present
            hresult, states = scard.SCardGetStatusChange(
                context, max(1, int(left * 1000)), [(reader, state & ~scard.SCARD_STATE_CHANGED)])
            if _u32(hresult) == SCARD_E_TIMEOUT:
                return True


def card_atr(reader: str) -> bytes | None:
    """The ATR of the card in ``reader`` (None when there is none, or PC/SC cannot say)."""
    with _status_now(reader) as (scard, context, hresult, states):
        if context is None or _u32(hresult) != 0 or not states \
                or not states[0][1] & scard.SCARD_STATE_PRESENT:
            return None
        return bytes(states[0][2]) or None


@contextmanager
def _status_now(reader: str):
    """``(scard, context, hresult, states)`` of one immediate status query of ``reader`` in a
    context of its own, released on exit (``context`` None when pcscd gives none)."""
    scard = _scard()
    hresult, context = _establish(scard)
    if hresult != 0:
        yield scard, None, hresult, []
        return
    try:
        hresult, states = scard.SCardGetStatusChange(
            context, 0, [(reader, scard.SCARD_STATE_UNAWARE)])
        yield scard, context, hresult, states
    finally:
        scard.SCardReleaseContext(context)


@dataclass(frozen=True)
class ReaderEvent:
    """Something that happened to a reader or to the PC/SC service.

    ``kind``: one of :data:`EVENT_KINDS`; ``reader``: the reader's name (None for the
    service events); ``atr``: the card's ATR for ``card-inserted`` (else None); ``at``:
    ``time.monotonic()`` when the watcher saw the change."""

    kind: str
    reader: str | None
    atr: bytes | None
    at: float


@dataclass(frozen=True)
class ReaderState:
    """One reader as the watcher last saw it: ``present`` a card is in it (``atr`` its ATR),
    ``flags`` PC/SC's ``SCARD_STATE_*`` event state."""

    reader: str
    present: bool
    atr: bytes | None
    flags: int = 0


def _make_filter(readers_filter) -> Callable[[str], bool]:
    if readers_filter is None:
        return lambda name: True
    if callable(readers_filter):
        return readers_filter
    if isinstance(readers_filter, str):
        readers_filter = [readers_filter]
    names = tuple(readers_filter)
    return lambda name: any(name == n or name.startswith(n) for n in names)


class ReaderWatcher:
    """Watches readers and cards with one blocking ``SCardGetStatusChange`` loop (see the
    module docstring). ``readers_filter``: None (all readers), a callable taking a reader's
    name, or names / name prefixes (``["Virtual PCD"]``) of the readers to watch."""

    def __init__(self, on_event: Callable[[ReaderEvent], None], *,
                 readers_filter: Callable[[str], bool] | Iterable[str] | str | None = None,
                 ) -> None:  # fmt: skip
        self._on_event = on_event
        self._wanted = _make_filter(readers_filter)
        self._scard = _scard()
        self._lock = threading.Lock()  # guards _context and _states
        self._context = None
        self._states: dict[str, ReaderState] = {}
        self._current: dict[str, int] = {}  # reader -> the current state we pass in
        self._pnp_state = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._service_up = False

    # -- public --------------------------------------------------------------------------------

    def start(self) -> "ReaderWatcher":
        """Take the readers' states now (so :meth:`snapshot` is right at once; no events for
        what is already there) and start watching. Without pcscd, the watcher starts anyway:
        it reports ``service-lost`` and waits for the service."""
        if self._thread is not None:
            raise RuntimeError("the watcher is already started")
        self._stopping.clear()
        if self._connect():
            self._baseline(emit=False)
        self._thread = threading.Thread(target=self._run, name="pcsc-reader-watcher",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop watching (wakes the blocked call with ``SCardCancel``); returns promptly."""
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            deadline = time.monotonic() + timeout
            while thread.is_alive() and time.monotonic() < deadline:
                with self._lock:
                    context = self._context
                if context is not None:
                    self._scard.SCardCancel(context)
                thread.join(0.05)
            if thread.is_alive():
                logger.warning("the PC/SC watcher thread did not stop within %g s", timeout)
            self._thread = None
        self._release()

    def snapshot(self) -> dict[str, ReaderState]:
        """Every watched reader's state as last seen (empty while the service is lost)."""
        with self._lock:
            return dict(self._states)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "ReaderWatcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the loop ------------------------------------------------------------------------------

    def _emit(self, kind: str, reader: str | None = None, atr: bytes | None = None,
              at: float | None = None) -> None:  # fmt: skip
        event = ReaderEvent(kind, reader, atr, time.monotonic() if at is None else at)
        try:
            self._on_event(event)
        except Exception:  # the callback's bug must not stop the watching
            logger.exception("PC/SC watcher callback failed on %s", event)

    def _connect(self) -> bool:
        hresult, context = _establish(self._scard)
        if hresult != 0:
            return False
        with self._lock:
            self._context = context
        self._service_up = True
        return True

    def _release(self) -> None:
        with self._lock:
            context, self._context = self._context, None
        if context is not None:
            try:
                self._scard.SCardReleaseContext(context)
            except Exception:  # a context of a dead service
                pass

    def _run(self) -> None:
        try:
            if not self._service_up:
                self._emit("service-lost")
                if not self._reconnect():
                    return
            while not self._stopping.is_set():
                try:
                    self._wait_once()
                except _ServiceLost:
                    self._release()
                    with self._lock:
                        self._states.clear()
                        self._current.clear()
                    self._service_up = False
                    self._emit("service-lost")
                    if not self._reconnect():
                        return
        except Exception:
            logger.exception("the PC/SC watcher stopped on an unexpected error")

    def _reconnect(self) -> bool:
        """Establish a new context with a growing backoff; then report the service back and
        everything there. False when stopped meanwhile."""
        delay = BACKOFF_START
        while not self._stopping.is_set():
            if self._connect():
                try:
                    hresult, _ = _list(self._scard, self._context)
                except Exception:
                    hresult = -1
                if hresult == 0:
                    self._emit("service-back")
                    try:
                        self._baseline(emit=True)
                    except _ServiceLost:
                        self._release()
                        continue
                    return True
                self._release()
            if self._stopping.wait(delay):
                break
            delay = min(delay * BACKOFF_FACTOR, BACKOFF_MAX)
        return False

    def _status(self, states: list[tuple[str, int]], timeout: int) -> tuple[int, list]:
        scard = self._scard
        with self._lock:
            context = self._context
        if context is None:
            raise _ServiceLost()
        hresult, result = scard.SCardGetStatusChange(context, timeout, states)
        return _u32(hresult), list(result or [])

    def _baseline(self, *, emit: bool) -> None:
        """Take every reader's state (and the PnP pseudo-reader's) afresh."""
        hresult, readers = _list(self._scard, self._context)
        if hresult != 0:
            raise _ServiceLost()
        readers = [r for r in readers if self._wanted(r)]
        unaware = self._scard.SCARD_STATE_UNAWARE
        hresult, result = self._status([(PNP_NOTIFICATION, unaware)], 0)
        if hresult == 0 and result:
            self._pnp_state = result[0][1] & ~self._scard.SCARD_STATE_CHANGED
        else:
            self._pnp_state = 0
        now = time.monotonic()
        for reader in readers:
            self._add_reader(reader, emit=emit, at=now)

    def _add_reader(self, reader: str, *, emit: bool, at: float) -> None:
        scard = self._scard
        hresult, result = self._status([(reader, scard.SCARD_STATE_UNAWARE)], 0)
        if hresult in (SCARD_E_UNKNOWN_READER,):
            return
        if hresult not in (0, SCARD_E_TIMEOUT):
            self._check_service(hresult)
            return
        flags = result[0][1] if result else 0
        state = self._state_of(reader, flags, result[0][2] if result else None)
        with self._lock:
            self._states[reader] = state
            self._current[reader] = flags & ~scard.SCARD_STATE_CHANGED
        if emit:
            self._emit("reader-added", reader, at=at)
            if state.present:
                self._emit("card-inserted", reader, state.atr, at=at)

    def _remove_reader(self, reader: str, at: float) -> None:
        with self._lock:
            state = self._states.pop(reader, None)
            self._current.pop(reader, None)
        if state is not None and state.present:
            self._emit("card-removed", reader, at=at)
        self._emit("reader-removed", reader, at=at)

    def _state_of(self, reader: str, flags: int, atr) -> ReaderState:
        scard = self._scard
        present = bool(flags & scard.SCARD_STATE_PRESENT) and not (
            flags & (scard.SCARD_STATE_UNAVAILABLE | scard.SCARD_STATE_UNKNOWN))
        return ReaderState(reader, present, bytes(atr) if present and atr else None, flags)

    def _check_service(self, hresult: int) -> None:
        if hresult in (SCARD_E_CANCELLED, SCARD_E_TIMEOUT):
            return
        raise _ServiceLost()

    def _wait_once(self) -> None:
        scard = self._scard
        with self._lock:
            readers = list(self._current.items())
        states = readers + [(PNP_NOTIFICATION, self._pnp_state)]
        hresult, result = self._status(states, scard.INFINITE)
        now = time.monotonic()
        if hresult in (SCARD_E_CANCELLED, SCARD_E_TIMEOUT):
            return
        if hresult == SCARD_E_UNKNOWN_READER:  # a reader left between two calls
            self._relist(now)
            return
        if hresult != 0:
            logger.info("SCardGetStatusChange: 0x%08X, the PC/SC service is lost", hresult)
            raise _ServiceLost()
        relist = False
        for reader, flags, atr in result:
            if reader == PNP_NOTIFICATION:
                if flags & scard.SCARD_STATE_CHANGED:
                    self._pnp_state = flags & ~scard.SCARD_STATE_CHANGED
                    relist = True
                continue
            if not flags & scard.SCARD_STATE_CHANGED:
                continue
            if flags & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_UNAVAILABLE):
                relist = True
                continue
            self._update(reader, flags, atr, now)
        if relist:
            self._relist(now)

    def _update(self, reader: str, flags: int, atr, at: float) -> None:
        scard = self._scard
        new = self._state_of(reader, flags, atr)
        with self._lock:
            old = self._states.get(reader)
            old_flags = self._current.get(reader, 0)
            self._states[reader] = new
            self._current[reader] = flags & ~scard.SCARD_STATE_CHANGED
        was_present = old is not None and old.present
        # pcsc-lite counts card events in the high word: a card swapped within one poll
        swapped = (was_present and new.present and old_flags >> 16 != flags >> 16
                   and (old_flags >> 16 or flags >> 16))  # fmt: skip
        if was_present and (not new.present or swapped):
            self._emit("card-removed", reader, at=at)
        if new.present and (not was_present or swapped):
            self._emit("card-inserted", reader, new.atr, at=at)

    def _relist(self, at: float) -> None:
        hresult, readers = _list(self._scard, self._context)
        if hresult != 0:
            raise _ServiceLost()
        readers = [r for r in readers if self._wanted(r)]
        with self._lock:
            known = list(self._states)
        for reader in known:
            if reader not in readers:
                self._remove_reader(reader, at)
        for reader in readers:
            if reader not in known:
                self._add_reader(reader, emit=True, at=at)


class _ServiceLost(Exception):
    """The PC/SC context is dead (pcscd stopped or restarted)."""

