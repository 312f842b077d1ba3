"""The seams of the virtual key: what the CTAPHID framing layer asks of an authenticator,
and the user-presence model shared by the authenticator and the control interface.

Layering (one protocol layer per module, as in python-fido2):

    transport (in-process CtapHidConnection, TCP socket)  -- simulators.key.transport
        -> CTAPHID framing, channels, keepalive, cancel     -- simulators.key.ctaphid
            -> CtapApp: CTAP2 (CBOR) and CTAP1/U2F (MSG)     -- simulators.key.authenticator
"""

from __future__ import annotations

import abc
import enum
import threading
import time
from dataclasses import dataclass, field


class KeepaliveStatus(enum.IntEnum):
    """CTAPHID_KEEPALIVE status bytes."""

    PROCESSING = 1
    UPNEEDED = 2


class Request:
    """One CTAPHID transaction, as the application sees it.

    The framing layer creates it, hands it to :class:`CtapApp`, and while the app works it
    sends a KEEPALIVE carrying :attr:`status` about every 100 ms (and at once when the status
    changes). A CTAPHID_CANCEL on the transaction's channel sets :attr:`cancelled`.

    :attr:`channel` is the CTAPHID channel (CID) the command came on: the authenticator binds
    continuation state to it (getNextAssertion and the credential-management enumerations
    go on only on the channel that began them). Callers outside CTAPHID leave it 0.
    """

    def __init__(self, channel: int = 0, on_status=None) -> None:
        self.channel = channel
        self.cancelled = threading.Event()
        self._status = KeepaliveStatus.PROCESSING
        self._on_status = on_status

    @property
    def status(self) -> KeepaliveStatus:
        return self._status

    def set_status(self, status: KeepaliveStatus) -> None:
        changed = status != self._status
        self._status = status
        if changed and self._on_status is not None:
            self._on_status(status)


class CtapApp(abc.ABC):
    """What the CTAPHID layer dispatches to: one authenticator."""

    #: CTAPHID capability flags announced in the INIT response (WINK=0x01, CBOR=0x04, NMSG=0x08).
    capabilities: int = 0x01 | 0x04
    #: device version (major, minor, build) announced in the INIT response.
    device_version: tuple[int, int, int] = (1, 0, 0)

    @abc.abstractmethod
    def cbor(self, data: bytes, request: Request) -> bytes:
        """Process a CTAPHID_CBOR payload (command byte + CBOR); return status byte + CBOR."""

    @abc.abstractmethod
    def msg(self, apdu: bytes, request: Request) -> bytes:
        """Process a CTAPHID_MSG payload (a CTAP1/U2F APDU); return response data + SW."""

    def wink(self) -> None:
        """CTAPHID_WINK: show the user which key this is."""

    @abc.abstractmethod
    def power_up(self) -> None:
        """The key was plugged in or power-cycled: clear volatile state, open the reset window."""


class Presence(enum.Enum):
    """Outcome of waiting for the user's touch."""

    APPROVED = "approved"
    DENIED = "denied"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class PresenceMode(str, enum.Enum):
    AUTO = "auto"  # the user touches at once
    MANUAL = "manual"  # wait for an explicit touch (control interface, CLI, test)
    DENY = "deny"  # the user refuses: the request fails with OPERATION_DENIED
    NEVER = "never"  # nobody answers: the request times out (USER_ACTION_TIMEOUT)


class UserPresence:
    """The key's button, under control.

    * ``touch()``: a tap. It satisfies the request waiting for a touch, or, if none is
      waiting, the next one that starts within :attr:`TAP_MEMORY` seconds (a tap that races
      the request, as happens when a script touches right after starting an operation).
    * ``press()`` / ``release()``: the button held down (as a relay on a real key's button);
      while held, every wait is approved at once.
    """

    TAP_MEMORY = 1.0
    TIMEOUT = 30.0

    def __init__(self, mode: PresenceMode | str = PresenceMode.AUTO, timeout: float = TIMEOUT):
        self.mode = PresenceMode(mode)
        self.timeout = timeout
        self._cond = threading.Condition()
        self._taps = 0
        self._tap_time = 0.0
        self._held = False
        self.waiting = False

    def set_mode(self, mode: PresenceMode | str) -> None:
        with self._cond:
            self.mode = PresenceMode(mode)
            self._cond.notify_all()

    def touch(self) -> None:
        with self._cond:
            self._taps = 1
            self._tap_time = time.monotonic()
            self._cond.notify_all()

    def press(self) -> None:
        with self._cond:
            self._held = True
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._held = False

    def wait(self, request: Request, timeout: float | None = None) -> Presence:
        """Block until the user touches, refuses, the wait times out or is cancelled."""
        limit = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            if self.mode is PresenceMode.AUTO:
                return Presence.APPROVED
            if self.mode is PresenceMode.DENY:
                return Presence.DENIED
            # A tap older than TAP_MEMORY is forgotten.
            if self._taps and time.monotonic() - self._tap_time > self.TAP_MEMORY:
                self._taps = 0
            self.waiting = True
            request.set_status(KeepaliveStatus.UPNEEDED)
            try:
                while True:
                    if request.cancelled.is_set():
                        return Presence.CANCELLED
                    if self.mode is PresenceMode.AUTO or self._held:
                        return Presence.APPROVED
                    if self.mode is PresenceMode.DENY:
                        return Presence.DENIED
                    if self._taps and self.mode is not PresenceMode.NEVER:
                        self._taps = 0
                        return Presence.APPROVED
                    left = limit - time.monotonic()
                    if left <= 0:
                        return Presence.TIMEOUT
                    # Wake up regularly to notice a cancel (set from another thread).
                    self._cond.wait(min(left, 0.02))
            finally:
                self.waiting = False
                request.set_status(KeepaliveStatus.PROCESSING)


@dataclass
class FaultPlan:
    """Faults to inject, modelled on Chromium's virtual authenticator and on what really
    goes wrong with USB keys. Applied by the CTAPHID layer and the transports; every counter
    counts down as it fires. Thread-safe through :attr:`lock`.
    """

    fail_next: int = 0  # fail the next N CBOR commands ...
    fail_status: int = 0x7F  # ... with this CTAP status (default CTAP1_ERR_OTHER)
    delay: float = 0.0  # seconds added before every response
    drop_reports: int = 0  # drop the next N reports the key sends
    corrupt_reports: int = 0  # corrupt the next N reports the key sends
    unplug_after_reports: int | None = None  # unplug after the key has received N more reports
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def clear(self) -> None:
        with self.lock:
            self.fail_next = 0
            self.fail_status = 0x7F
            self.delay = 0.0
            self.drop_reports = 0
            self.corrupt_reports = 0
            self.unplug_after_reports = None

    def as_dict(self) -> dict:
        with self.lock:
            return {
                "fail_next": self.fail_next,
                "fail_status": self.fail_status,
                "delay": self.delay,
                "drop_reports": self.drop_reports,
                "corrupt_reports": self.corrupt_reports,
                "unplug_after_reports": self.unplug_after_reports,
            }
