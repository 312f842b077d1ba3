"""Device side of CTAPHID, the FIDO USB HID framing (CTAP 2.1, section 11.2).

:class:`CtapHid` turns 64-byte HID output reports from hosts into CTAPHID messages, dispatches
them to a :class:`~simulators.key.base.CtapApp`, and frames the answers back into 64-byte
input reports handed to a ``send`` callback (the key broadcasts them to every open handle).

What it implements, as the specification describes it:

* packets: an init packet is ``CID(4) | CMD|0x80 | BCNT(2, big-endian) | 57 data bytes``, a
  continuation packet ``CID(4) | SEQ(0..127) | 59 data bytes``; messages up to
  57 + 128 * 59 = 7609 bytes.
* channels: CTAPHID_INIT on the broadcast CID 0xFFFFFFFF allocates a channel; INIT on an
  allocated channel resynchronises it (its pending transaction, if any, is aborted). Every
  other command needs an allocated channel (else ERR_INVALID_CHANNEL).
* one transaction at a time: a request on another channel while a transaction is being
  received or processed gets ERR_CHANNEL_BUSY at once; a new init packet on the same channel
  in the middle of a message gets ERR_INVALID_SEQ, as does a continuation out of sequence; a
  continuation with no message pending on its channel is ignored; a message whose next packet
  does not arrive within ``msg_timeout`` seconds is abandoned with ERR_MSG_TIMEOUT.
* CTAPHID_CANCEL sets ``request.cancelled`` of the transaction processing on that channel and
  is never answered; CTAPHID_KEEPALIVE is sent about every 100 ms while a request is
  processed, and at once when the application changes the request's status (UPNEEDED while
  it waits for a touch).
* CTAPHID_LOCK (0..10 s; 0 releases): while a channel holds the lock, requests from other
  channels get ERR_LOCK_REQUIRED (CTAPHID_INIT is still answered, so hosts can allocate).

Application calls (CBOR, MSG, and the other transaction commands) run on one worker thread,
so CANCEL, INIT and other channels' requests are answered while a request waits for a touch.
Faults from a :class:`~simulators.key.base.FaultPlan` are applied here: ``fail_next``,
``delay``, ``drop_reports`` and ``corrupt_reports`` (``unplug_after_reports`` belongs to the
key, :mod:`simulators.key.device`).
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import CtapApp, FaultPlan, KeepaliveStatus, Request

logger = logging.getLogger(__name__)

REPORT_SIZE = 64
INIT_HEADER = 7  # CID(4) CMD(1) BCNT(2)
CONT_HEADER = 5  # CID(4) SEQ(1)
INIT_DATA = REPORT_SIZE - INIT_HEADER  # 57
CONT_DATA = REPORT_SIZE - CONT_HEADER  # 59
MAX_SEQ = 0x7F
MAX_MESSAGE = INIT_DATA + (MAX_SEQ + 1) * CONT_DATA  # 7609
BROADCAST_CID = 0xFFFFFFFF
TYPE_INIT = 0x80
PROTOCOL_VERSION = 2  # CTAPHID protocol version announced in the INIT response
INIT_NONCE_SIZE = 8
MAX_LOCK_SECONDS = 10

DEFAULT_MSG_TIMEOUT = 0.5
DEFAULT_KEEPALIVE_INTERVAL = 0.1
#: channels remembered at once; the least recently used one is forgotten beyond this
MAX_CHANNELS = 1024


class Cmd(enum.IntEnum):
    """CTAPHID command codes (without the init-packet bit 0x80)."""

    PING = 0x01
    MSG = 0x03
    LOCK = 0x04
    INIT = 0x06
    WINK = 0x08
    CBOR = 0x10
    CANCEL = 0x11
    KEEPALIVE = 0x3B
    ERROR = 0x3F


class HidError(enum.IntEnum):
    """CTAPHID_ERROR codes."""

    INVALID_CMD = 0x01
    INVALID_PAR = 0x02
    INVALID_LEN = 0x03
    INVALID_SEQ = 0x04
    MSG_TIMEOUT = 0x05
    CHANNEL_BUSY = 0x06
    LOCK_REQUIRED = 0x0A
    INVALID_CHANNEL = 0x0B
    OTHER = 0x7F


CAPABILITY_WINK = 0x01
CAPABILITY_CBOR = 0x04
CAPABILITY_NMSG = 0x08

#: commands that start a transaction (handled on the worker thread)
_TRANSACTION_COMMANDS = frozenset({Cmd.PING, Cmd.MSG, Cmd.LOCK, Cmd.WINK, Cmd.CBOR})


def frame_message(cid: int, cmd: int, data: bytes = b"") -> list[bytes]:
    """Split one CTAPHID message into 64-byte reports (an init packet, then continuations)."""
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"CTAPHID message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    header = cid.to_bytes(4, "big")
    reports = [
        (header + bytes((TYPE_INIT | cmd,)) + len(data).to_bytes(2, "big") + data[:INIT_DATA])
        .ljust(REPORT_SIZE, b"\0")
    ]
    for seq, pos in enumerate(range(INIT_DATA, len(data), CONT_DATA)):
        reports.append(
            (header + bytes((seq,)) + data[pos : pos + CONT_DATA]).ljust(REPORT_SIZE, b"\0")
        )
    return reports


def corrupt_report(report: bytes) -> bytes:
    """What ``FaultPlan.corrupt_reports`` does to a report: every byte after the CID is
    inverted, so the report still reaches its channel but its command or sequence byte and
    its data are garbage (a host sees a wrong command, a wrong sequence or bad data)."""
    return report[:4] + bytes(b ^ 0xFF for b in report[4:])


class _HidFailure(Exception):
    """Internal: answer the current packet with CTAPHID_ERROR ``code``."""

    def __init__(self, code: HidError):
        super().__init__(code.name)
        self.code = code


@dataclass(eq=False)
class _Transaction:
    """One message being received, then processed."""

    cid: int
    cmd: int
    length: int
    data: bytearray
    next_seq: int = 0
    deadline: float = 0.0  # while receiving: when the next continuation is overdue
    request: Request | None = None  # set when processing starts
    last_keepalive: float = 0.0
    aborted: threading.Event = field(default_factory=threading.Event)

    @property
    def processing(self) -> bool:
        return self.request is not None

    @property
    def complete(self) -> bool:
        return len(self.data) >= self.length


class CtapHid:
    """The CTAPHID framing layer of one key.

    :param app: the authenticator.
    :param send: called with every 64-byte report the key sends. It is called with this
        layer's lock held and must not block (append to a queue, non-blocking socket send).
    :param faults: the fault plan shared with the key and the control interface.
    :param msg_timeout: seconds the key waits for the next packet of a message before
        answering ERR_MSG_TIMEOUT.
    :param keepalive_interval: seconds between CTAPHID_KEEPALIVE reports while processing.

    Threads: a worker runs application calls one at a time; a timer sends keepalives and
    enforces the message timeout. :meth:`close` stops both.
    """

    def __init__(
        self,
        app: CtapApp,
        send: Callable[[bytes], None],
        faults: FaultPlan | None = None,
        *,
        msg_timeout: float = DEFAULT_MSG_TIMEOUT,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
    ) -> None:
        if msg_timeout <= 0 or keepalive_interval <= 0:
            raise ValueError("msg_timeout and keepalive_interval must be positive")
        self.app = app
        self.faults = faults if faults is not None else FaultPlan()
        self.msg_timeout = msg_timeout
        self.keepalive_interval = keepalive_interval
        self._send = send
        self._lock = threading.RLock()
        self._timer_wakeup = threading.Condition(self._lock)
        self._timer_due = math.inf  # when the timer thread wakes up next
        self._app_lock = threading.Lock()  # one application call (or power-up) at a time
        self._channels: OrderedDict[int, None] = OrderedDict()
        self._txn: _Transaction | None = None
        self._lock_owner: int | None = None
        self._lock_until = 0.0
        self._closed = False
        self._jobs: queue.SimpleQueue[_Transaction | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="ctaphid-worker", daemon=True)
        self._timer = threading.Thread(target=self._time, name="ctaphid-timer", daemon=True)
        self._worker.start()
        self._timer.start()

    # -- state -------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A transaction is being received or processed."""
        return self._txn is not None

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def power_up(self) -> None:
        """The key was plugged in or power-cycled: forget every channel, lock and pending
        transaction (a transaction being processed is cancelled and its answer dropped),
        then call ``app.power_up()``."""
        self.power_down()
        with self._app_lock:
            self.app.power_up()

    def power_down(self) -> None:
        """The key lost power: forget every channel, lock and pending transaction."""
        with self._lock:
            if self._txn is not None:
                self._abort_locked(self._txn)
            self._channels.clear()
            self._lock_owner = None

    def close(self) -> None:
        """Stop the worker and timer threads (an application call in progress is cancelled)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._txn is not None:
                self._abort_locked(self._txn)
            self._timer_wakeup.notify_all()
        self._jobs.put(None)
        for thread in (self._worker, self._timer):
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    # -- incoming reports --------------------------------------------------------------

    def handle_report(self, report: bytes) -> None:
        """Process one HID output report from a host (shorter reports are zero-padded, as
        the USB stack does)."""
        if len(report) > REPORT_SIZE:
            raise ValueError(f"HID report of {len(report)} bytes exceeds {REPORT_SIZE}")
        report = bytes(report).ljust(REPORT_SIZE, b"\0")
        cid = int.from_bytes(report[:4], "big")
        with self._lock:
            if self._closed:
                return
            now = time.monotonic()
            self._expire_locked(now)
            try:
                if report[4] & TYPE_INIT:
                    self._on_init_packet_locked(cid, report, now)
                else:
                    self._on_continuation_locked(cid, report, now)
            except _HidFailure as failure:
                self._send_locked(cid, Cmd.ERROR, bytes((failure.code,)))

    def _on_init_packet_locked(self, cid: int, report: bytes, now: float) -> None:
        cmd = report[4] & 0x7F
        length = int.from_bytes(report[5:7], "big")
        if cmd == Cmd.CANCEL:
            self._on_cancel_locked(cid)
            return
        if cid == 0:
            raise _HidFailure(HidError.INVALID_CHANNEL)
        if cmd == Cmd.INIT:
            self._on_init_locked(cid, length, report[INIT_HEADER : INIT_HEADER + INIT_NONCE_SIZE])
            return
        if cid == BROADCAST_CID or cid not in self._channels:
            raise _HidFailure(HidError.INVALID_CHANNEL)
        self._channels.move_to_end(cid)
        if self._lock_owner is not None and now >= self._lock_until:
            self._lock_owner = None
        if self._lock_owner not in (None, cid):
            raise _HidFailure(HidError.LOCK_REQUIRED)
        txn = self._txn
        if txn is not None:
            if txn.cid == cid and not txn.processing:
                # A new message on a channel in the middle of receiving one.
                self._txn = None
                raise _HidFailure(HidError.INVALID_SEQ)
            raise _HidFailure(HidError.CHANNEL_BUSY)
        if length > MAX_MESSAGE:
            raise _HidFailure(HidError.INVALID_LEN)
        self._check_command(cmd, length, report)
        txn = _Transaction(cid, cmd, length, bytearray(report[INIT_HEADER : INIT_HEADER + length]))
        self._txn = txn
        if txn.complete:
            self._dispatch_locked(txn, now)
        else:
            txn.deadline = now + self.msg_timeout
            self._wake_timer_locked(txn.deadline)

    def _check_command(self, cmd: int, length: int, report: bytes) -> None:
        """Is ``cmd`` one this key implements, with an acceptable length?"""
        caps = self.app.capabilities
        if (
            cmd not in _TRANSACTION_COMMANDS
            or (cmd == Cmd.CBOR and not caps & CAPABILITY_CBOR)
            or (cmd == Cmd.MSG and caps & CAPABILITY_NMSG)
            or (cmd == Cmd.WINK and not caps & CAPABILITY_WINK)
        ):
            raise _HidFailure(HidError.INVALID_CMD)
        if cmd == Cmd.WINK and length != 0:
            raise _HidFailure(HidError.INVALID_LEN)
        if cmd in (Cmd.CBOR, Cmd.MSG) and length == 0:
            raise _HidFailure(HidError.INVALID_LEN)
        if cmd == Cmd.LOCK:
            if length != 1:
                raise _HidFailure(HidError.INVALID_LEN)
            if report[INIT_HEADER] > MAX_LOCK_SECONDS:
                raise _HidFailure(HidError.INVALID_PAR)

    def _on_init_locked(self, cid: int, length: int, nonce: bytes) -> None:
        if length != INIT_NONCE_SIZE:
            raise _HidFailure(HidError.INVALID_LEN)
        if cid == BROADCAST_CID:
            new_cid = self._allocate_channel_locked()
        elif cid in self._channels:
            # Resynchronise: abort whatever this channel had pending, keep the channel.
            if self._txn is not None and self._txn.cid == cid:
                self._abort_locked(self._txn)
            self._channels.move_to_end(cid)
            new_cid = cid
        else:
            raise _HidFailure(HidError.INVALID_CHANNEL)
        major, minor, build = self.app.device_version
        payload = (
            nonce
            + new_cid.to_bytes(4, "big")
            + bytes((PROTOCOL_VERSION, major, minor, build, self.app.capabilities))
        )
        self._send_locked(cid, Cmd.INIT, payload)

    def _allocate_channel_locked(self) -> int:
        while True:
            cid = secrets.randbelow(BROADCAST_CID - 1) + 1  # 1 .. 0xFFFFFFFE
            if cid not in self._channels:
                break
        self._channels[cid] = None
        while len(self._channels) > MAX_CHANNELS:
            oldest = next(iter(self._channels))
            if self._txn is not None and self._txn.cid == oldest:
                self._channels.move_to_end(oldest)
                continue
            del self._channels[oldest]
        return cid

    def _on_cancel_locked(self, cid: int) -> None:
        # Never answered. Ignored unless it names the channel of the current transaction.
        txn = self._txn
        if txn is None or txn.cid != cid:
            return
        if txn.processing:
            txn.request.cancelled.set()
        else:
            self._txn = None  # the host gave up on the message it was sending

    def _on_continuation_locked(self, cid: int, report: bytes, now: float) -> None:
        txn = self._txn
        if txn is None or txn.cid != cid or txn.processing:
            return  # a continuation with no message pending on its channel: ignored
        seq = report[4]
        if seq != txn.next_seq:
            self._txn = None
            raise _HidFailure(HidError.INVALID_SEQ)
        txn.next_seq += 1
        txn.data += report[CONT_HEADER : CONT_HEADER + txn.length - len(txn.data)]
        if txn.complete:
            self._dispatch_locked(txn, now)
        else:
            txn.deadline = now + self.msg_timeout

    def _expire_locked(self, now: float) -> None:
        txn = self._txn
        if txn is not None and not txn.processing and now >= txn.deadline:
            self._txn = None
            self._send_locked(txn.cid, Cmd.ERROR, bytes((HidError.MSG_TIMEOUT,)))

    # -- processing ----------------------------------------------------------------------

    def _dispatch_locked(self, txn: _Transaction, now: float) -> None:
        txn.request = Request(txn.cid, on_status=functools.partial(self._on_status, txn))
        txn.last_keepalive = now
        self._jobs.put(txn)
        self._wake_timer_locked(now + self.keepalive_interval)

    def _abort_locked(self, txn: _Transaction) -> None:
        if self._txn is txn:
            self._txn = None
        txn.aborted.set()
        if txn.request is not None:
            txn.request.cancelled.set()

    def _on_status(self, txn: _Transaction, status: KeepaliveStatus) -> None:
        """``Request.set_status`` changed the status: send a keepalive at once."""
        with self._lock:
            if self._txn is txn and not txn.aborted.is_set():
                txn.last_keepalive = time.monotonic()
                self._send_locked(txn.cid, Cmd.KEEPALIVE, bytes((status,)))

    def _work(self) -> None:
        while True:
            txn = self._jobs.get()
            if txn is None:
                return
            if txn.aborted.is_set():
                continue
            try:
                cmd, payload = self._execute(txn)
                if len(payload) > MAX_MESSAGE:
                    logger.error(
                        "%s answer of %d bytes exceeds the CTAPHID maximum of %d bytes",
                        Cmd(txn.cmd).name, len(payload), MAX_MESSAGE,
                    )  # fmt: skip
                    cmd, payload = Cmd.ERROR, bytes((HidError.OTHER,))
            except Exception:
                logger.exception("CTAPHID %s on channel %08x failed", Cmd(txn.cmd).name, txn.cid)
                cmd, payload = Cmd.ERROR, bytes((HidError.OTHER,))
            delay = self.faults.delay
            if delay > 0:
                txn.aborted.wait(delay)  # keepalives go on meanwhile
            with self._lock:
                if self._txn is txn and not txn.aborted.is_set():
                    self._txn = None
                    self._send_locked(txn.cid, cmd, payload)

    def _execute(self, txn: _Transaction) -> tuple[int, bytes]:
        data = bytes(txn.data)
        request = txn.request
        assert request is not None
        if txn.cmd == Cmd.PING:
            return Cmd.PING, data
        if txn.cmd == Cmd.LOCK:
            seconds = data[0]
            with self._lock:
                self._lock_owner = txn.cid if seconds else None
                self._lock_until = time.monotonic() + seconds
            return Cmd.LOCK, b""
        if txn.cmd == Cmd.CBOR:
            faults = self.faults
            with faults.lock:
                failing = faults.fail_next > 0
                if failing:
                    faults.fail_next -= 1
                    status = faults.fail_status
            if failing:
                logger.info("fault: answering CBOR command 0x%02x with status 0x%02x",
                            data[0], status)  # fmt: skip
                return Cmd.CBOR, bytes((status,))
        with self._app_lock:
            if txn.aborted.is_set():
                return Cmd.ERROR, bytes((HidError.OTHER,))  # dropped by the caller
            if txn.cmd == Cmd.CBOR:
                return Cmd.CBOR, self.app.cbor(data, request)
            if txn.cmd == Cmd.MSG:
                return Cmd.MSG, self.app.msg(data, request)
            self.app.wink()
            return Cmd.WINK, b""

    # -- timer: keepalives and message timeouts ------------------------------------------

    def _wake_timer_locked(self, due: float) -> None:
        """Make sure the timer thread wakes up by ``due``."""
        if due < self._timer_due:
            self._timer_wakeup.notify()

    def _time(self) -> None:
        with self._lock:
            while not self._closed:
                txn = self._txn
                now = time.monotonic()
                if txn is None:
                    due = math.inf
                elif not txn.processing:
                    due = txn.deadline
                    if now >= due:
                        self._expire_locked(now)
                        continue
                else:
                    due = txn.last_keepalive + self.keepalive_interval
                    if now >= due:
                        txn.last_keepalive = now
                        self._send_locked(txn.cid, Cmd.KEEPALIVE, bytes((txn.request.status,)))
                        continue
                self._timer_due = due
                self._timer_wakeup.wait(None if due == math.inf else due - now)
                self._timer_due = math.inf  # awake: it looks at the state before sleeping again

    # -- outgoing reports ----------------------------------------------------------------

    def _send_locked(self, cid: int, cmd: int, data: bytes) -> None:
        for report in frame_message(cid, cmd, data):
            self._emit_locked(report)

    def _emit_locked(self, report: bytes) -> None:
        faults = self.faults
        if faults.drop_reports or faults.corrupt_reports:
            with faults.lock:
                if faults.drop_reports > 0:
                    faults.drop_reports -= 1
                    logger.info("fault: dropped an outgoing report (%s)", report[:7].hex())
                    return
                if faults.corrupt_reports > 0:
                    faults.corrupt_reports -= 1
                    logger.info("fault: corrupted an outgoing report (%s)", report[:7].hex())
                    report = corrupt_report(report)
        try:
            self._send(report)
        except Exception:
            logger.exception("delivering a report failed")
