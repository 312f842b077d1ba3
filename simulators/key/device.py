"""The virtual key as a USB device: one authenticator, its button, its faults, its CTAPHID
framing, and hidraw-like handles.

Semantics modelled on Linux hidraw, which is how python-fido2 and libfido2 reach real keys:

* several handles (open file descriptors) may be open at once; every report the key sends
  goes to all of them, and hosts keep the ones for their own channel;
* opening the first handle while none is open is a plug-in: the key powers up
  (``app.power_up()``: volatile state cleared, the reset window opens);
* unless the key is *single-host* (``single_host=True``, ``sim key serve --single-host``), as
  the emulated keys some authenticator test suites were written for: then opening a handle
  first closes every other one (as an unplug closes them), so the new handle is the only one
  and opening it is that same plug-in, whatever was open before;
* :meth:`VirtualKey.unplug` is a key pulled out: every handle is closed, reads and writes on
  it fail with ``OSError(ENODEV)``, and no handle can be opened until :meth:`VirtualKey.plug`;
* :meth:`VirtualKey.power_cycle` reboots the key in place: handles stay open, every channel
  is forgotten (hosts must send CTAPHID_INIT again), ``app.power_up()`` runs.
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers.fido.sim import SIM_PRODUCT_NAME

from .base import CtapApp, FaultPlan, PresenceMode, UserPresence
from .ctaphid import DEFAULT_MSG_TIMEOUT, REPORT_SIZE, CtapHid

logger = logging.getLogger(__name__)

#: reports queued on a handle nobody reads before the oldest are dropped (hidraw drops too)
MAX_QUEUED_REPORTS = 4096

ReportCallback = Callable[[bytes], None]
CloseCallback = Callable[[], None]


def _no_device(what: str) -> OSError:
    return OSError(errno.ENODEV, f"virtual key {what}")


class KeyHandle:
    """One open connection to the key, like an open ``/dev/hidrawN``.

    Reports the key sends are queued for :meth:`read`, or, if the handle was opened with
    ``on_report``, passed to that callback instead (it must not block: it is called while the
    key's framing layer holds its lock). ``on_close`` is called once when the key closes the
    handle (unplug, or a new host on a single-host key), not when the owner calls :meth:`close`.
    """

    def __init__(
        self,
        key: VirtualKey,
        on_report: ReportCallback | None = None,
        on_close: CloseCallback | None = None,
    ) -> None:
        self._key = key
        self._on_report = on_report
        self._on_close = on_close
        self._reports: collections.deque[bytes] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._closed_reason: str | None = None
        self._overflowed = False

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def write(self, report: bytes) -> None:
        """Send one HID output report (at most 64 bytes) to the key."""
        if self._closed_reason is not None:
            raise _no_device(self._closed_reason)
        self._key._receive(self, report)

    def read(self, timeout: float | None = None) -> bytes:
        """The next 64-byte input report. Blocks; ``timeout`` seconds (None: forever) then
        :class:`TimeoutError`. Raises ``OSError(ENODEV)`` once the handle is closed."""
        with self._ready:
            while not self._reports and self._closed_reason is None:
                if not self._ready.wait(timeout):
                    raise TimeoutError(f"no report from the virtual key within {timeout} s")
            if self._closed_reason is not None:
                raise _no_device(self._closed_reason)
            return self._reports.popleft()

    def close(self) -> None:
        """Close the handle (idempotent)."""
        if self._shut("handle is closed"):
            self._key._forget(self)

    # -- called by the key ---------------------------------------------------------------

    def _deliver(self, report: bytes) -> None:
        if self._closed_reason is not None:
            return
        if self._on_report is not None:
            self._on_report(report)
            return
        with self._ready:
            if len(self._reports) >= MAX_QUEUED_REPORTS:
                self._reports.popleft()
                if not self._overflowed:
                    self._overflowed = True
                    logger.warning("a handle is not reading its reports: dropping the oldest")
            self._reports.append(report)
            self._ready.notify()

    def _shut(self, reason: str) -> bool:
        """Mark closed; True if it was open."""
        with self._ready:
            if self._closed_reason is not None:
                return False
            self._closed_reason = reason
            self._reports.clear()
            self._ready.notify_all()
        return True

    def _dropped(self, reason: str) -> None:
        if self._shut(reason) and self._on_close is not None:
            try:
                self._on_close()
            except Exception:
                logger.exception("a handle's close callback failed")


class VirtualKey:
    """A virtual FIDO2 key on a virtual USB port.

    :param app: the authenticator (CTAP2/U2F logic).
    :param presence: the key's button; defaults to ``app.presence`` (the authenticator's own).
    :param faults: faults to inject (shared with the control interface); a fresh plan if None.
    :param msg_timeout: CTAPHID message timeout, seconds.
    :param serial_number: reported in HID descriptors.
    :param single_host: a new handle closes the others and powers the key up (see the module
        docstring); a plain attribute, which ``KeyServer(single_host=True)`` also sets.
    """

    def __init__(
        self,
        app: CtapApp,
        presence: UserPresence | None = None,
        faults: FaultPlan | None = None,
        *,
        msg_timeout: float = DEFAULT_MSG_TIMEOUT,
        serial_number: str | None = None,
        single_host: bool = False,
    ) -> None:
        if presence is None:
            presence = getattr(app, "presence", None)
        if presence is None:
            raise ValueError("no UserPresence: pass presence=, or give the app a .presence")
        self.app = app
        self.presence: UserPresence = presence
        self.faults = faults if faults is not None else FaultPlan()
        self.product_name = SIM_PRODUCT_NAME
        self.serial_number = serial_number
        self.single_host = single_host
        self._handles: tuple[KeyHandle, ...] = ()  # replaced, never mutated: read lock-free
        self._handles_lock = threading.Lock()
        self._power_lock = threading.RLock()  # open / close / plug / unplug / power_cycle
        self._plugged = True
        self._listeners: list[Callable[[bool], None]] = []
        self._closed = False
        self.hid = CtapHid(app, self._broadcast, self.faults, msg_timeout=msg_timeout)

    # -- power -------------------------------------------------------------------------

    @property
    def powered(self) -> bool:
        """True while the key is plugged in (from :meth:`plug` until :meth:`unplug`)."""
        return self._plugged

    @property
    def handle_count(self) -> int:
        return len(self._handles)

    def add_power_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(plugged)`` after every :meth:`unplug` (False) and :meth:`plug`
        (True). Exceptions from a listener propagate to the caller of plug/unplug."""
        self._listeners.append(listener)

    def remove_power_listener(self, listener: Callable[[bool], None]) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def open(
        self, on_report: ReportCallback | None = None, on_close: CloseCallback | None = None
    ) -> KeyHandle:
        """Open a handle (see :class:`KeyHandle`). The first handle opened while none is open
        powers the key up; on a single-host key every open handle is closed first, so each
        open powers it up. Raises ``OSError(ENODEV)`` while the key is unplugged."""
        with self._power_lock:
            if self._closed:
                raise _no_device("is closed")
            if not self._plugged:
                raise _no_device("is unplugged")
            if self.single_host and self._handles:
                with self._handles_lock:
                    earlier, self._handles = self._handles, ()
                logger.info("virtual key: a new host (single-host mode): closing %d earlier "
                            "handle(s)", len(earlier))  # fmt: skip
                for old in earlier:
                    old._dropped("was closed: a new host connected (single-host mode)")
            handle = KeyHandle(self, on_report, on_close)
            if not self._handles:
                logger.info("virtual key: plugged in (first handle opened), powering up")
                self.hid.power_up()
            with self._handles_lock:
                self._handles = self._handles + (handle,)
            return handle

    def unplug(self) -> None:
        """Pull the key out: every handle is closed (their reads fail with ENODEV), pending
        transactions are dropped, and :meth:`open` fails until :meth:`plug`."""
        with self._power_lock:
            if not self._plugged:
                return
            self._plugged = False
            with self._handles_lock:
                handles, self._handles = self._handles, ()
            self.hid.power_down()
            try:
                self._notify(False)  # first, so a host that sees its handle fail finds no key
            finally:
                for handle in handles:
                    handle._dropped("was unplugged")
            logger.info("virtual key: unplugged (%d handle(s) dropped)", len(handles))

    def plug(self) -> None:
        """Plug the key back in. It powers up when the first handle opens."""
        with self._power_lock:
            if self._closed:
                raise _no_device("is closed")
            if self._plugged:
                return
            self._plugged = True
            logger.info("virtual key: plugged in")
            self._notify(True)

    def power_cycle(self) -> None:
        """Reboot the key in place: open handles stay, all channels are forgotten, a
        transaction in progress is dropped, and ``app.power_up()`` runs."""
        with self._power_lock:
            if not self._plugged:
                raise _no_device("is unplugged: plug it in to power it")
            logger.info("virtual key: power cycle")
            self.hid.power_up()

    def close(self) -> None:
        """Unplug for good and stop the framing layer's threads."""
        with self._power_lock:
            self.unplug()
            self._closed = True
        self.hid.close()

    def _notify(self, plugged: bool) -> None:
        for listener in list(self._listeners):
            listener(plugged)

    # -- faults and status ---------------------------------------------------------------

    _FAULT_FIELDS = {
        "fail_next": (int, 0, None),
        "fail_status": (int, 0, 0xFF),
        "delay": (float, 0.0, 3600.0),
        "drop_reports": (int, 0, None),
        "corrupt_reports": (int, 0, None),
        "unplug_after_reports": (int, 1, None),
    }

    def set_faults(self, **changes: Any) -> dict:
        """Change some :class:`FaultPlan` fields, all or none: unknown fields, wrong types and
        out-of-range values raise ValueError. ``unplug_after_reports=None`` disarms it.
        Returns the plan as a dict."""
        clean: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in self._FAULT_FIELDS:
                known = ", ".join(self._FAULT_FIELDS)
                raise ValueError(f"unknown fault {name!r} (known: {known})")
            kind, low, high = self._FAULT_FIELDS[name]
            if value is None and name == "unplug_after_reports":
                clean[name] = None
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, not {value!r}")
            if kind is int and not float(value).is_integer():
                raise ValueError(f"{name} must be a whole number, not {value!r}")
            value = kind(value)
            if value < low or (high is not None and value > high):
                bound = f"{low}..{high}" if high is not None else f">= {low}"
                raise ValueError(f"{name} must be {bound}, not {value!r}")
            clean[name] = value
        with self.faults.lock:
            for name, value in clean.items():
                setattr(self.faults, name, value)
        if clean:
            logger.info("virtual key: faults set: %s", clean)
        return self.faults.as_dict()

    def status(self) -> dict:
        """A JSON-able snapshot: power, handles, button, busy, faults."""
        return {
            "powered": self._plugged,
            "handles": len(self._handles),
            "single_host": self.single_host,
            "presence": PresenceMode(self.presence.mode).value,
            "waiting_for_touch": bool(self.presence.waiting),
            "busy": self.hid.busy,
            "channels": self.hid.channel_count,
            "faults": self.faults.as_dict(),
        }

    # -- data path -----------------------------------------------------------------------

    def _receive(self, handle: KeyHandle, report: bytes) -> None:
        if len(report) > REPORT_SIZE:
            raise ValueError(f"HID report of {len(report)} bytes exceeds {REPORT_SIZE}")
        faults = self.faults
        if faults.unplug_after_reports is not None:
            with faults.lock:
                left = faults.unplug_after_reports
                if left is not None:
                    left -= 1
                    faults.unplug_after_reports = left if left > 0 else None
            if left is not None and left <= 0:
                # The report reached the key, which is pulled out before it can answer.
                logger.info("fault: unplugging after the last counted report")
                self.unplug()
                return
        self.hid.handle_report(report)

    def _broadcast(self, report: bytes) -> None:
        for handle in self._handles:
            handle._deliver(report)

    def _forget(self, handle: KeyHandle) -> None:
        with self._handles_lock:
            self._handles = tuple(h for h in self._handles if h is not handle)


def create_virtual_key(
    state_file: str | Path | None = None,
    presence: UserPresence | PresenceMode | str = PresenceMode.AUTO,
    *,
    faults: FaultPlan | None = None,
    msg_timeout: float = DEFAULT_MSG_TIMEOUT,
    touch_timeout: float | None = None,
    serial_number: str | None = None,
    single_host: bool = False,
) -> VirtualKey:
    """A :class:`VirtualKey` around the real authenticator
    (:class:`simulators.key.authenticator.VirtualAuthenticator`).

    :param state_file: where the authenticator keeps its persistent state (None: in memory).
    :param presence: a :class:`UserPresence`, or a mode for a new one
        (``auto``, ``manual``, ``deny``, ``never``).
    :param touch_timeout: seconds a request waits for a touch (default: UserPresence's 30 s).
    :param single_host: every new handle (over TCP: a new connection's first report) closes
        the others and powers the key up, as the emulated keys some test suites expect;
        default False: several handles at once, as with hidraw.
    """
    from .authenticator import VirtualAuthenticator  # imported late: a heavier module

    if not isinstance(presence, UserPresence):
        presence = UserPresence(presence)
    if touch_timeout is not None:
        presence.timeout = touch_timeout
    app = VirtualAuthenticator(state_file=state_file, presence=presence)
    return VirtualKey(
        app, presence, faults, msg_timeout=msg_timeout, serial_number=serial_number,
        single_host=single_host,
    )
