"""The real PC/SC stack for the card tests: pcscd (with vsmartcard's vpcd reader driver) and
small pyscard helpers.

:func:`pcscd_service` gives the session's :class:`PcscdService`: the pcscd already running
on this machine (a socket-activated Debian pcscd is started by connecting to it), or one it
starts itself in the foreground (``pcscd --foreground --auto-exit``, root only), stopped at
the end. It holds a PC/SC context for the whole session, which also keeps an ``--auto-exit``
pcscd alive between tests. When pcscd cannot be had, :class:`PcscdUnavailable` says what to
install or run; the fixture turns it into a failure in CI (``CI`` set) and a skip elsewhere.

pcscd is one per machine (its socket is /run/pcscd/pcscd.comm) and vpcd's slots are
machine-wide too, so one test session at a time uses them: the session takes an exclusive
``flock`` on :data:`LOCK_FILE` first (another session's card tests wait for it).
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path

from simulators.card.pcscd import (  # noqa: F401  (re-exported for the tests)
    INSTALL_HINT, START_HINT, VPCD_CONF, Pcscd, PcscdUnavailable, establish_context, find_pcscd,
    list_readers, release_context, vpcd_configured,
)
from simulators.card.vpcd import find_reader  # noqa: F401

#: serialises the machine's pcscd and vpcd slots between concurrent test sessions
LOCK_FILE = Path(tempfile.gettempdir()) / "token-agent-pcsc-tests.lock"
LOCK_TIMEOUT = 900.0


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _scard():
    from smartcard import scard

    return scard


def reader_state(context, reader: str) -> tuple[int, bytes]:
    """(event state flags, ATR) of ``reader`` right now."""
    scard = _scard()
    hresult, states = scard.SCardGetStatusChange(context, 0, [(reader, scard.SCARD_STATE_UNAWARE)])
    if hresult != scard.SCARD_S_SUCCESS:
        raise RuntimeError(f"SCardGetStatusChange: {scard.SCardGetErrorMessage(hresult)}")
    return states[0][1], bytes(states[0][2])


def wait_for_card(context, reader: str, present: bool = True, timeout: float = 5.0
                  ) -> tuple[float, bytes]:  # fmt: skip
    """Wait, with SCardGetStatusChange, until ``reader`` reports a card present (or absent);
    returns (seconds waited, ATR). Raises TimeoutError."""
    scard = _scard()
    start = time.monotonic()
    deadline = start + timeout
    state, atr = reader_state(context, reader)
    want = scard.SCARD_STATE_PRESENT if present else scard.SCARD_STATE_EMPTY
    while not state & want:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{reader}: card still {'absent' if present else 'present'} "
                               f"after {timeout:g} s (state 0x{state:x})")
        hresult, states = scard.SCardGetStatusChange(
            context, max(1, int(left * 1000)), [(reader, state & ~scard.SCARD_STATE_CHANGED)])
        if hresult == scard.SCARD_E_TIMEOUT:
            continue
        if hresult != scard.SCARD_S_SUCCESS:
            raise RuntimeError(f"SCardGetStatusChange: {scard.SCardGetErrorMessage(hresult)}")
        state, atr = states[0][1], bytes(states[0][2])
    return time.monotonic() - start, atr


class CardConnection:
    """A raw PC/SC connection to the card in ``reader`` (T=1 or T=0, shared)."""

    def __init__(self, context, reader: str) -> None:
        scard = _scard()
        self._scard = scard
        hresult, self.handle, self.protocol = scard.SCardConnect(
            context, reader, scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
        if hresult != scard.SCARD_S_SUCCESS:
            raise RuntimeError(f"SCardConnect {reader}: {scard.SCardGetErrorMessage(hresult)}"
                               f" (0x{hresult & 0xFFFFFFFF:08X})")

    def transmit_raw(self, apdu: bytes) -> bytes:
        """One APDU, its response with the status word (no GET RESPONSE handling)."""
        hresult, response = self._scard.SCardTransmit(self.handle, self.protocol, list(apdu))
        if hresult != self._scard.SCARD_S_SUCCESS:
            raise RuntimeError(f"SCardTransmit: {self._scard.SCardGetErrorMessage(hresult)} "
                               f"(0x{hresult & 0xFFFFFFFF:08X})")
        return bytes(response)

    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        """(data, SW) with 61xx answered by GET RESPONSE until the whole response is in."""
        response = self.transmit_raw(apdu)
        data = bytearray(response[:-2])
        sw = int.from_bytes(response[-2:], "big")
        while sw >> 8 == 0x61:
            response = self.transmit_raw(bytes([0x00, 0xC0, 0x00, 0x00, sw & 0xFF]))
            data += response[:-2]
            sw = int.from_bytes(response[-2:], "big")
        return bytes(data), sw

    def status_atr(self) -> bytes:
        hresult, _reader, _state, _protocol, atr = self._scard.SCardStatus(self.handle)
        if hresult != self._scard.SCARD_S_SUCCESS:
            raise RuntimeError(f"SCardStatus: {self._scard.SCardGetErrorMessage(hresult)}")
        return bytes(atr)

    def close(self) -> None:
        if self.handle is not None:
            self._scard.SCardDisconnect(self.handle, self._scard.SCARD_LEAVE_CARD)
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PcscdService(Pcscd):
    """The machine's pcscd for this test session (see the module docstring): a
    :class:`simulators.card.pcscd.Pcscd` taken under the session lock."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log=log_dir / "pcscd.log")
        self.log_dir = log_dir
        self._lock_fd: int | None = None

    def start(self) -> "PcscdService":
        self._take_lock()
        super().start()
        return self

    def _take_lock(self) -> None:
        fd = os.open(LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o666)
        deadline = time.monotonic() + LOCK_TIMEOUT
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise PcscdUnavailable(
                        f"another test session has held {LOCK_FILE} (the machine's pcscd and "
                        f"vpcd slots) for {LOCK_TIMEOUT:g} s") from None
                if not told:
                    print(f"\n[pcscd] waiting for another test session's card tests "
                          f"({LOCK_FILE})", file=sys.stderr)
                    told = True
                time.sleep(0.5)
        self._lock_fd = fd

    def stop(self) -> None:
        super().stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def unavailable(message: str):
    """Fail in CI, skip elsewhere (never a silent skip in CI)."""
    import pytest

    text = f"the card tests need pcscd with vsmartcard-vpcd: {message}"
    if in_ci():
        pytest.fail(text, pytrace=False)
    pytest.skip(text)

