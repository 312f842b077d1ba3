"""Test helpers for the virtual key's framing and transports: a small CtapApp double, and a
raw CTAPHID host that speaks reports directly (filtering by channel, as a host on hidraw
must)."""

from __future__ import annotations

import os
import threading

from simulators.key.base import CtapApp, KeepaliveStatus, Presence, Request, UserPresence
from simulators.key.ctaphid import (
    BROADCAST_CID,
    CONT_DATA,
    INIT_DATA,
    REPORT_SIZE,
    TYPE_INIT,
    Cmd,
    frame_message,
)
from simulators.key.device import KeyHandle, VirtualKey

#: CBOR command bytes the double understands
NEEDS_TOUCH = 0x01  # waits for the user's touch, answers 0x00 / 0x27 / 0x2D / 0x2F
ECHO = 0x04  # answers 0x00 + the rest of the request
EXPLODE = 0x7E  # raises

CTAP2_OK = 0x00
OPERATION_DENIED = 0x27
KEEPALIVE_CANCEL = 0x2D
USER_ACTION_TIMEOUT = 0x2F


class DoubleApp(CtapApp):
    """A CtapApp whose CBOR commands wait for the UserPresence like the real one does."""

    def __init__(self, presence: UserPresence | None = None) -> None:
        self.presence = presence or UserPresence("auto")
        self.power_ups = 0
        self.winks = 0
        self.cbor_calls: list[bytes] = []
        self.msg_calls: list[bytes] = []
        self.cancelled = threading.Event()  # a touch wait ended because of a cancel
        self.finished = threading.Event()  # a cbor call returned
        self.waiting = threading.Event()  # set while a request waits for a touch

    def cbor(self, data: bytes, request: Request) -> bytes:
        self.cbor_calls.append(data)
        try:
            if data[0] == EXPLODE:
                raise RuntimeError("the double was asked to fail")
            if data[0] == NEEDS_TOUCH:
                outcome = self._wait_for_touch(request)
                if outcome is Presence.CANCELLED:
                    self.cancelled.set()
                return bytes(
                    (
                        {
                            Presence.APPROVED: CTAP2_OK,
                            Presence.DENIED: OPERATION_DENIED,
                            Presence.CANCELLED: KEEPALIVE_CANCEL,
                            Presence.TIMEOUT: USER_ACTION_TIMEOUT,
                        }[outcome],
                    )
                )
            return bytes((CTAP2_OK,)) + data[1:]
        finally:
            self.finished.set()

    def _wait_for_touch(self, request: Request) -> Presence:
        # UserPresence.wait reports the start of its wait through request.set_status
        # (UPNEEDED): hook it to set an event tests can wait on.
        report_status = request.set_status

        def set_status(status: KeepaliveStatus) -> None:
            report_status(status)
            if status == KeepaliveStatus.UPNEEDED:
                self.waiting.set()

        request.set_status = set_status
        try:
            return self.presence.wait(request)
        finally:
            self.waiting.clear()

    def msg(self, apdu: bytes, request: Request) -> bytes:
        self.msg_calls.append(apdu)
        return apdu + b"\x90\x00"

    def wink(self) -> None:
        self.winks += 1

    def power_up(self) -> None:
        self.power_ups += 1


def wait_until_waiting(app: DoubleApp, timeout: float = 2.0) -> None:
    """Block until the double's CBOR call waits for a touch."""
    assert app.waiting.wait(timeout), "the request never started waiting for a touch"


def double_key(presence: str = "auto", **kwargs) -> tuple[VirtualKey, DoubleApp]:
    app = DoubleApp(UserPresence(presence))
    return VirtualKey(app, **kwargs), app


class RawHost:
    """A host speaking raw CTAPHID reports over one handle of a key."""

    def __init__(self, key: VirtualKey | None = None, handle: KeyHandle | None = None) -> None:
        self.handle = handle if handle is not None else key.open()

    def write(self, report: bytes) -> None:
        self.handle.write(report.ljust(REPORT_SIZE, b"\0"))

    def send(self, cid: int, cmd: int, data: bytes = b"") -> None:
        for report in frame_message(cid, cmd, data):
            self.write(report)

    def init_packet(self, cid: int, cmd: int, length: int, data: bytes = b"") -> None:
        self.write(
            cid.to_bytes(4, "big") + bytes((TYPE_INIT | cmd,)) + length.to_bytes(2, "big") + data
        )

    def cont_packet(self, cid: int, seq: int, data: bytes = b"") -> None:
        self.write(cid.to_bytes(4, "big") + bytes((seq,)) + data)

    def report(self, cid: int, timeout: float = 2.0) -> bytes:
        """The next report on channel ``cid`` (others are skipped, as hosts do)."""
        while True:
            report = self.handle.read(timeout)
            if int.from_bytes(report[:4], "big") == cid:
                return report

    def receive(self, cid: int, timeout: float = 2.0, keepalives: list | None = None):
        """The next message on ``cid`` as (cmd, data); keepalives are collected into
        ``keepalives`` (as status bytes) and skipped."""
        while True:
            report = self.report(cid, timeout)
            cmd = report[4] & 0x7F
            length = int.from_bytes(report[5:7], "big")
            data = bytearray(report[7 : 7 + min(length, INIT_DATA)])
            seq = 0
            while len(data) < length:
                cont = self.report(cid, timeout)
                assert cont[4] == seq, f"sequence {cont[4]}, expected {seq}"
                seq += 1
                data += cont[5 : 5 + min(CONT_DATA, length - len(data))]
            if cmd == Cmd.KEEPALIVE:
                if keepalives is not None:
                    keepalives.append(data[0])
                continue
            return cmd, bytes(data)

    def allocate(self) -> int:
        """CTAPHID_INIT on the broadcast channel; returns the new channel."""
        nonce = os.urandom(8)
        self.send(BROADCAST_CID, Cmd.INIT, nonce)
        while True:
            cmd, data = self.receive(BROADCAST_CID)
            if cmd == Cmd.INIT and data[:8] == nonce:
                return int.from_bytes(data[8:12], "big")

    def close(self) -> None:
        self.handle.close()
