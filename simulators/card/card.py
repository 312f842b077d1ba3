"""The virtual smartcard: a card file behind an ISO 7816-4 APDU interface, with the PIV
application on it; and an in-process, pyscard-like connection to it for fast tests.

The card is what a reader sees: power on/off and warm reset (each answers with the ATR and
clears the volatile state: security status, selected application, command chains, response
data not yet fetched), and ``transmit``, which takes any bytes and always answers with a
response APDU (data + SW1 SW2). Chaining is handled once, by
:class:`~simulators.card.apdu.CommandProcessor`, following the transmission protocol of the
card file (``CardFile.protocol``, the one its ATR announces: T=1 by default, T=0 as an
option); SELECT by AID is routed here; everything else
goes to the selected application. A card that is transmitted to while unpowered is powered up
first, as a reader would.

Persistent state (PIN and PUK retries, PIN changes, generated keys, PUT DATA objects) is written
back to the card file after every change when ``autosave`` is on and the card file has a path;
:meth:`VirtualCard.save` writes it explicitly. All calls are serialised by one lock.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from .apdu import INS_SELECT, SW, ApduError, CommandApdu, CommandProcessor, ResponseApdu
from .cardfile import CardFile
from .piv import MIN_AID_PREFIX, PIV_AID, PivApplication

logger = logging.getLogger(__name__)

#: SELECT P1 values that address files (by identifier or path); this card has no file system
_SELECT_FILE_P1 = frozenset({0x00, 0x01, 0x02, 0x03, 0x08, 0x09})
_MAX_AID = 16


class VirtualCard:
    """One virtual card over a :class:`CardFile`."""

    def __init__(self, card: CardFile, *, autosave: bool = True) -> None:
        self.card = card
        self.autosave = autosave
        self._lock = threading.RLock()
        self._piv = PivApplication(card, persist=self._persistent_state_changed)
        self._selected: PivApplication | None = None
        self._processor = CommandProcessor(self._dispatch, protocol=card.protocol)
        self._powered = False

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, autosave: bool = True) -> "VirtualCard":
        """The card in card file ``path`` (its state is saved back there)."""
        return cls(CardFile.load(path), autosave=autosave)

    @property
    def atr(self) -> bytes:
        return self.card.atr

    @property
    def protocol(self) -> str:
        """The transmission protocol the card follows ("t1" or "t0")."""
        return self._processor.protocol

    @property
    def powered(self) -> bool:
        return self._powered

    @property
    def piv(self) -> PivApplication:
        """The PIV application (its volatile security state is readable for tests)."""
        return self._piv

    def power_on(self) -> bytes:
        """Cold reset: power up, clear the volatile state; returns the ATR."""
        with self._lock:
            self._clear_volatile_state()
            self._powered = True
            return self.atr

    def power_off(self) -> None:
        """Power down: the volatile state is lost."""
        with self._lock:
            self._clear_volatile_state()
            self._powered = False

    def reset(self) -> bytes:
        """Warm reset: as power-on; returns the ATR."""
        return self.power_on()

    def transmit(self, apdu: bytes) -> bytes:
        """One command APDU in, the response APDU (data + SW1 SW2) out. Never raises: a
        malformed APDU is answered with a status word."""
        try:
            if isinstance(apdu, (int, str)):
                raise TypeError("an APDU is bytes")
            raw = bytes(apdu)
        except (TypeError, ValueError):
            return int(SW.WRONG_LENGTH).to_bytes(2, "big")
        with self._lock:
            if not self._powered:
                self.power_on()
            return self._processor.process(raw)

    def save(self) -> Path | None:
        """Write the card's state to its card file; returns the path, or None for a card
        that has no file (kept in memory only)."""
        with self._lock:
            if self.card.path is None:
                return None
            return self.card.save()

    def _clear_volatile_state(self) -> None:
        self._processor.reset()
        self._piv.reset()
        self._selected = None

    def _persistent_state_changed(self) -> None:
        if self.autosave and self.card.path is not None:
            self.card.save()

    def _dispatch(self, cmd: CommandApdu) -> ResponseApdu:
        if cmd.ins == INS_SELECT:
            return self._select(cmd)
        if self._selected is None:
            raise ApduError(SW.INS_NOT_SUPPORTED, "no application selected")
        return self._selected.process(cmd)

    def _select(self, cmd: CommandApdu) -> ResponseApdu:
        if cmd.p1 in _SELECT_FILE_P1:
            raise ApduError(SW.FILE_NOT_FOUND, "the card has no file system")
        if cmd.p1 != 0x04:
            raise ApduError(SW.INCORRECT_P1P2)
        aid = cmd.data
        if len(aid) > _MAX_AID:
            raise ApduError(SW.WRONG_LENGTH)
        if (len(aid) < MIN_AID_PREFIX or not PIV_AID.startswith(aid)
                or not self.card.piv_enabled):
            # not found: the current selection stays (ISO 7816-4 11.2.2)
            raise ApduError(SW.FILE_NOT_FOUND)
        response = self._piv.select(cmd)
        self._selected = self._piv
        return response


class CardConnectionError(Exception):
    """The in-process connection is not connected."""


class InProcessCardConnection:
    """A pyscard-like connection (``connect``, ``getATR``, ``transmit``, ``disconnect``) to a
    :class:`VirtualCard` in the same process: connecting powers the card on, disconnecting
    powers it off."""

    def __init__(self, card: VirtualCard) -> None:
        self.card = card
        self._connected = False

    def connect(self, protocol: int | None = None, mode: int | None = None,
                disposition: int | None = None) -> None:
        self.card.power_on()
        self._connected = True

    def reconnect(self, protocol: int | None = None, mode: int | None = None,
                  disposition: int | None = None) -> None:
        self.card.reset()
        self._connected = True

    def disconnect(self) -> None:
        if self._connected:
            self._connected = False
            self.card.power_off()

    def getReader(self) -> str:  # noqa: N802 - pyscard's name
        return "in-process virtual card"

    def getATR(self) -> list[int]:  # noqa: N802 - pyscard's name
        self._check()
        return list(self.card.atr)

    def transmit(self, command: Sequence[int] | bytes,
                 protocol: int | None = None) -> tuple[list[int], int, int]:
        """Send ``command``; returns (response data, SW1, SW2)."""
        self._check()
        response = self.card.transmit(bytes(command))
        return list(response[:-2]), response[-2], response[-1]

    def _check(self) -> None:
        if not self._connected:
            raise CardConnectionError("not connected")

    def __enter__(self) -> "InProcessCardConnection":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()
