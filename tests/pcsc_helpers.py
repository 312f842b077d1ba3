"""The real PC/SC stack for the card tests: pcscd (with vsmartcard's vpcd reader driver) and
small pyscard helpers.

The session's pcscd is a :class:`PcscdService` (:class:`simulators.card.pcscd.LockedPcscd`):
the pcscd already running on this machine (a socket-activated Debian pcscd is started by
connecting to it), or one it starts itself in the foreground (``pcscd --foreground
--auto-exit``, root only), stopped at the end. It holds a PC/SC context for the whole session,
which also keeps an ``--auto-exit`` pcscd alive between tests. When pcscd cannot be had,
:class:`PcscdUnavailable` says what to install or run; the fixture turns it into a failure in
CI (``CI`` set) and a skip elsewhere.

pcscd is one per machine (its socket is /run/pcscd/pcscd.comm) and vpcd's slots are
machine-wide too, so one test session at a time uses them: the session takes an exclusive
``flock`` on :data:`LOCK_FILE` first (another session's card tests wait for it). That logic
lives in :mod:`simulators.card.pcscd`, shared with the pytest plugin that token-agent ships
(:mod:`simulators.pytest_plugin`).
"""

from __future__ import annotations

import os

from simulators.card.pcscd import (  # noqa: F401  (re-exported for the tests)
    INSTALL_HINT, LOCK_FD_ENV, LOCK_FILE, LOCK_TIMEOUT, START_HINT, VPCD_CONF, Pcscd,
    PcscdUnavailable, establish_context, find_pcscd, list_readers, reader_state,
    release_context, vpcd_configured, wait_for_card,
)
from simulators.card.pcscd import LockedPcscd as PcscdService  # noqa: F401
from simulators.card.vpcd import find_reader  # noqa: F401


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _scard():
    from smartcard import scard

    return scard


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


def unavailable(message: str):
    """Fail in CI, skip elsewhere (never a silent skip in CI)."""
    import pytest

    text = f"the card tests need pcscd with vsmartcard-vpcd: {message}"
    if in_ci():
        pytest.fail(text, pytrace=False)
    pytest.skip(text)

