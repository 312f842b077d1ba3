"""ISO/IEC 7816-4 APDUs for the virtual smartcard: commands, responses, status words, BER-TLV,
and the transmission layer (command chaining, response chaining with GET RESPONSE) for the
two transmission protocols a card can announce in its ATR.

A command APDU is ``CLA INS P1 P2 [Lc data] [Le]`` in one of four cases (ISO 7816-4 5.1):

====  ======================  =====================================================
case  short                   extended
====  ======================  =====================================================
1     ``CLA INS P1 P2``
2     ``... Le``  (Le 00=256)  ``... 00 Le1 Le2``  (0000 = 65536)
3     ``... Lc data``          ``... 00 Lc1 Lc2 data``
4     ``... Lc data Le``       ``... 00 Lc1 Lc2 data Le1 Le2``
====  ======================  =====================================================

:class:`CommandProcessor` is the one place where chaining is handled: command chaining
(CLA bit 0x10) is reassembled before the application sees a command, and a response the
host cannot take in one piece is handed out in pieces: ``61xx`` then ``GET RESPONSE``
(``00 C0 00 00 Le``) until the last piece, which carries the command's own status word.
What "cannot take in one piece" means depends on the protocol the card announces:

* T=1 (:data:`PROTOCOL_T1`, the default, as PIV cards and YubiKeys): a block carries a whole
  response APDU, so the answer comes with the data and its status word up to the command's
  Le; a command without Le gets up to 256 bytes (65,536 for an extended APDU). Only what goes
  beyond is handed out with ``61xx``. yubico-piv-tool relies on this: it SELECTs without Le
  and accepts only ``90 00``.
* T=0 (:data:`PROTOCOL_T0`): a command TPDU cannot carry both data and Le, so a command
  without Le gets no data at once: any response data waits behind ``61xx`` for GET RESPONSE
  (ISO 7816-3 12.2, 7816-4 5.3.3); so does what goes beyond the Le of a command that had one.

Malformed APDUs are answered with a status word, never an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

logger = logging.getLogger(__name__)

INS_GET_RESPONSE = 0xC0
INS_SELECT = 0xA4

#: CLA bit announcing that more command chunks follow (ISO 7816-4 5.4.2)
CLA_CHAINING = 0x10

#: the most command data the processor reassembles from a chain (extended Lc's maximum)
MAX_COMMAND_DATA = 0xFFFF

#: transmission protocols (ISO 7816-3): "t1" block transmission, "t0" character transmission
PROTOCOL_T1 = "t1"
PROTOCOL_T0 = "t0"
PROTOCOLS = (PROTOCOL_T1, PROTOCOL_T0)
#: what a T=1 card answers at once to a command without Le (short / extended APDU)
T1_DEFAULT_NE = 256
T1_DEFAULT_NE_EXTENDED = 65536


class SW(IntEnum):
    """Status words (ISO 7816-4 5.6, SP 800-73-4 Part 2)."""

    OK = 0x9000
    MEMORY_FAILURE = 0x6581
    WRONG_LENGTH = 0x6700
    LOGICAL_CHANNEL_NOT_SUPPORTED = 0x6881
    SECURE_MESSAGING_NOT_SUPPORTED = 0x6882
    LAST_COMMAND_OF_CHAIN_EXPECTED = 0x6883
    COMMAND_CHAINING_NOT_SUPPORTED = 0x6884
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    AUTH_METHOD_BLOCKED = 0x6983
    CONDITIONS_NOT_SATISFIED = 0x6985
    WRONG_DATA = 0x6A80
    FILE_NOT_FOUND = 0x6A82
    NOT_ENOUGH_MEMORY = 0x6A84
    INCORRECT_P1P2 = 0x6A86
    REFERENCED_DATA_NOT_FOUND = 0x6A88
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    NO_PRECISE_DIAGNOSIS = 0x6F00


def sw_more_data(remaining: int) -> int:
    """``61xx``: ``remaining`` bytes wait for GET RESPONSE (xx = 00 means 256 or more)."""
    return 0x6100 | (min(remaining, 256) & 0xFF)


def sw_retries_left(retries: int) -> int:
    """``63Cx``: verification failed, ``retries`` tries left (at most 15 can be told)."""
    return 0x63C0 | max(0, min(retries, 15))


class ApduError(Exception):
    """A command ends with status word ``sw`` (and no data). Raised by command handlers and
    the parser; the processor turns it into the response."""

    def __init__(self, sw: int, message: str = "") -> None:
        super().__init__(message or f"status word {sw:04X}")
        self.sw = int(sw)


@dataclass(frozen=True)
class CommandApdu:
    """A parsed command APDU. ``ne`` is the maximum response length the host accepts (Le
    decoded: 1-256 short, 1-65536 extended), or None when the command had no Le field."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    ne: int | None = None
    extended: bool = False

    @property
    def case(self) -> int:
        """ISO 7816-4 case: 1 (nothing), 2 (Le), 3 (data), 4 (data and Le)."""
        if self.data:
            return 4 if self.ne is not None else 3
        return 2 if self.ne is not None else 1

    @property
    def chained(self) -> bool:
        """More chunks of this command follow (interindustry CLA with bit 0x10 set)."""
        return not self.cla & 0x80 and bool(self.cla & CLA_CHAINING)

    @property
    def p1p2(self) -> int:
        return self.p1 << 8 | self.p2

    @classmethod
    def parse(cls, raw: bytes) -> "CommandApdu":
        """Decode ``raw``; an APDU that is too short or whose Lc/Le do not add up raises
        :class:`ApduError` with 6700 (wrong length)."""
        raw = bytes(raw)
        n = len(raw)
        if n < 4:
            raise ApduError(SW.WRONG_LENGTH, "an APDU has at least 4 bytes")
        cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
        if n == 4:
            return cls(cla, ins, p1, p2)
        if n == 5:  # case 2 short
            return cls(cla, ins, p1, p2, ne=raw[4] or 256)
        if raw[4] != 0:  # short Lc
            lc = raw[4]
            if n == 5 + lc:
                return cls(cla, ins, p1, p2, raw[5:])
            if n == 6 + lc:
                return cls(cla, ins, p1, p2, raw[5:-1], ne=raw[-1] or 256)
            raise ApduError(SW.WRONG_LENGTH, f"Lc {lc} does not match {n - 5} bytes after it")
        # raw[4] == 0 and more than 5 bytes: extended length
        if n == 6:
            raise ApduError(SW.WRONG_LENGTH, "truncated extended length")
        if n == 7:  # case 2 extended
            return cls(cla, ins, p1, p2, ne=int.from_bytes(raw[5:7], "big") or 65536,
                       extended=True)
        lc = int.from_bytes(raw[5:7], "big")
        if lc == 0:
            raise ApduError(SW.WRONG_LENGTH, "extended Lc of 0")
        if n == 7 + lc:
            return cls(cla, ins, p1, p2, raw[7:], extended=True)
        if n == 9 + lc:
            return cls(cla, ins, p1, p2, raw[7:-2],
                       ne=int.from_bytes(raw[-2:], "big") or 65536, extended=True)
        raise ApduError(SW.WRONG_LENGTH, f"extended Lc {lc} does not match {n - 7} bytes after it")

    def to_bytes(self) -> bytes:
        """Encode; short unless the data exceeds 255 bytes, Ne exceeds 256, or ``extended``."""
        if len(self.data) > 0xFFFF or (self.ne is not None and not 1 <= self.ne <= 65536):
            raise ValueError("data or Ne out of range")
        header = bytes((self.cla, self.ins, self.p1, self.p2))
        extended = self.extended or len(self.data) > 255 or (self.ne or 0) > 256
        if not extended:
            body = bytes((len(self.data),)) + self.data if self.data else b""
            le = bytes((self.ne & 0xFF,)) if self.ne is not None else b""
            return header + body + le
        body = b"\x00" + len(self.data).to_bytes(2, "big") + self.data if self.data else b""
        if self.ne is None:
            return header + body
        le = (self.ne & 0xFFFF).to_bytes(2, "big")
        return header + (body + le if self.data else b"\x00" + le)


@dataclass(frozen=True)
class ResponseApdu:
    """Response data and status word."""

    data: bytes = b""
    sw: int = SW.OK

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF

    def to_bytes(self) -> bytes:
        return bytes(self.data) + int(self.sw).to_bytes(2, "big")

    @classmethod
    def parse(cls, raw: bytes) -> "ResponseApdu":
        if len(raw) < 2:
            raise ValueError("a response APDU has at least the two status bytes")
        return cls(bytes(raw[:-2]), int.from_bytes(raw[-2:], "big"))


# --- BER-TLV (ISO 7816-4 5.2), as PIV uses it -------------------------------------------------


class TlvError(ApduError):
    """Command data that is not well-formed BER-TLV (answered with 6A80)."""

    def __init__(self, message: str) -> None:
        super().__init__(SW.WRONG_DATA, message)


def encode_length(length: int) -> bytes:
    """BER length: one byte below 128, else 81 xx, 82 xxxx or 83 xxxxxx."""
    if length < 0x80:
        return bytes((length,))
    for size, prefix in ((1, 0x81), (2, 0x82), (3, 0x83)):
        if length < 1 << (8 * size):
            return bytes((prefix,)) + length.to_bytes(size, "big")
    raise ValueError(f"length {length} too large for BER-TLV")


def tag_bytes(tag: int) -> bytes:
    """The encoding of tag number ``tag`` as written (0x7E -> 7E, 0x5FC105 -> 5F C1 05)."""
    return tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")


def tlv(tag: int, value: bytes = b"") -> bytes:
    """One BER-TLV data object."""
    return tag_bytes(tag) + encode_length(len(value)) + bytes(value)


def read_tlv(data: bytes, offset: int = 0) -> tuple[int, bytes, int]:
    """Decode the data object at ``offset``: (tag, value, offset after it)."""
    n = len(data)
    if offset >= n:
        raise TlvError("missing tag")
    start = offset
    first = data[offset]
    offset += 1
    if first & 0x1F == 0x1F:  # tag number continues in following bytes
        while True:
            if offset >= n or offset - start > 3:
                raise TlvError("truncated or oversized tag")
            b = data[offset]
            offset += 1
            if not b & 0x80:
                break
    tag = int.from_bytes(data[start:offset], "big")
    if offset >= n:
        raise TlvError("missing length")
    first = data[offset]
    offset += 1
    if first < 0x80:
        length = first
    elif 0x81 <= first <= 0x83:
        size = first & 0x7F
        if offset + size > n:
            raise TlvError("truncated length")
        length = int.from_bytes(data[offset:offset + size], "big")
        offset += size
    else:
        raise TlvError(f"unsupported length byte {first:02X}")
    end = offset + length
    if end > n:
        raise TlvError("value runs past the end of the data")
    return tag, bytes(data[offset:end]), end


def parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """All data objects of ``data`` (one level), in order."""
    items: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        tag, value, offset = read_tlv(data, offset)
        items.append((tag, value))
    return items


def parse_single_tlv(data: bytes, expected_tag: int) -> bytes:
    """The value of ``data`` that must be exactly one data object with ``expected_tag``."""
    items = parse_tlvs(data)
    if len(items) != 1 or items[0][0] != expected_tag:
        raise TlvError(f"expected exactly one data object {expected_tag:X}")
    return items[0][1]


def parse_tlv_dict(data: bytes) -> dict[int, bytes]:
    """The data objects of ``data`` by tag; a tag given twice is malformed."""
    result: dict[int, bytes] = {}
    for tag, value in parse_tlvs(data):
        if tag in result:
            raise TlvError(f"data object {tag:X} given twice")
        result[tag] = value
    return result


# --- transmission: class checks, chaining, GET RESPONSE ------------------------------------


def check_class(cla: int) -> None:
    """Accept interindustry CLA 00 (and 10, chaining) only. Proprietary or RFU classes get 6E00;
    logical channels other than the basic one 6881; secure messaging 6882."""
    if cla == 0xFF or cla & 0x80 or 0x20 <= cla <= 0x3F:
        raise ApduError(SW.CLA_NOT_SUPPORTED)
    if cla & 0x40:  # further interindustry class: logical channels 4 to 19
        raise ApduError(SW.LOGICAL_CHANNEL_NOT_SUPPORTED)
    if cla & 0x03:
        raise ApduError(SW.LOGICAL_CHANNEL_NOT_SUPPORTED)
    if cla & 0x0C:
        raise ApduError(SW.SECURE_MESSAGING_NOT_SUPPORTED)


def check_instruction(ins: int) -> None:
    """INS 6x and 9x are invalid in ISO 7816-3 (they would be procedure bytes under T=0)."""
    if ins & 0xF0 in (0x60, 0x90):
        raise ApduError(SW.INS_NOT_SUPPORTED)


Handler = Callable[[CommandApdu], ResponseApdu]


class CommandProcessor:
    """Turns raw command APDUs into raw responses around an application ``handler``.

    The handler receives whole commands (chains reassembled, CLA without the chaining bit)
    and returns a :class:`ResponseApdu` or raises :class:`ApduError`; any other exception is
    logged and answered 6F00. ``protocol`` (:data:`PROTOCOL_T1` or :data:`PROTOCOL_T0`)
    decides when a response is held back for GET RESPONSE (see the module's docstring).
    Not thread-safe by itself: the card serialises calls.
    """

    def __init__(self, handler: Handler, *, max_command_data: int = MAX_COMMAND_DATA,
                 protocol: str = PROTOCOL_T1) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown transmission protocol {protocol!r}")
        self.protocol = protocol
        self._handler = handler
        self._max_command_data = max_command_data
        self._chain_header: tuple[int, int, int, int] | None = None
        self._chain_data = bytearray()
        self._pending: bytes = b""
        self._pending_sw: int = SW.OK

    def reset(self) -> None:
        """Forget a command chain in progress and response data not yet fetched."""
        self._chain_header = None
        self._chain_data = bytearray()
        self._pending = b""
        self._pending_sw = SW.OK

    @property
    def chaining(self) -> bool:
        """A command chain is in progress (its last chunk has not arrived)."""
        return self._chain_header is not None

    @property
    def pending_response(self) -> int:
        """Bytes of response waiting for GET RESPONSE."""
        return len(self._pending)

    def process(self, raw: bytes) -> bytes:
        """One command APDU in, its response APDU (data + SW1 SW2) out."""
        try:
            return self._process(raw)
        except ApduError as e:
            return int(e.sw).to_bytes(2, "big")
        except Exception:  # a bug must not take the card down
            logger.exception("internal error processing APDU %s", bytes(raw[:16]).hex())
            self.reset()
            return int(SW.NO_PRECISE_DIAGNOSIS).to_bytes(2, "big")

    def _process(self, raw: bytes) -> bytes:
        try:
            cmd = CommandApdu.parse(raw)
            check_class(cmd.cla)
            check_instruction(cmd.ins)
        except ApduError:
            self.reset()
            raise
        if cmd.ins == INS_GET_RESPONSE and self._chain_header is None:
            return self._get_response(cmd)
        self._pending = b""
        cmd = self._reassemble(cmd)
        if cmd is None:  # a chunk of a chain: acknowledged, nothing executed yet
            return int(SW.OK).to_bytes(2, "big")
        try:
            response = self._handler(cmd)
        except ApduError as e:
            response = ResponseApdu(b"", e.sw)
        return self._respond(response, self._answer_limit(cmd))

    def _reassemble(self, cmd: CommandApdu) -> CommandApdu | None:
        header = (cmd.cla & ~CLA_CHAINING, cmd.ins, cmd.p1, cmd.p2)
        if self._chain_header is not None and self._chain_header != header:
            self.reset()
            raise ApduError(SW.LAST_COMMAND_OF_CHAIN_EXPECTED,
                            "a different command arrived in the middle of a chain")
        if self._chain_header is None and not cmd.chained:
            return cmd
        if len(self._chain_data) + len(cmd.data) > self._max_command_data:
            self.reset()
            raise ApduError(SW.WRONG_LENGTH, "chained command too long")
        self._chain_data += cmd.data
        if cmd.chained:
            self._chain_header = header
            return None
        data = bytes(self._chain_data)
        self.reset()
        return CommandApdu(header[0], cmd.ins, cmd.p1, cmd.p2, data, cmd.ne, cmd.extended)

    def _answer_limit(self, cmd: CommandApdu) -> int:
        """How many response bytes go out with the answer itself (the rest waits for GET
        RESPONSE): the command's Ne; without Le, none on T=0 and 256 / 65,536 on T=1."""
        if cmd.ne is not None:
            return cmd.ne
        if self.protocol == PROTOCOL_T0:
            return 0
        return T1_DEFAULT_NE_EXTENDED if cmd.extended else T1_DEFAULT_NE

    def _respond(self, response: ResponseApdu, limit: int) -> bytes:
        data = bytes(response.data)
        if len(data) <= limit:
            return data + int(response.sw).to_bytes(2, "big")
        # more than the host can take at once: hand out in pieces
        head = data[:limit]
        self._pending = data[len(head):]
        self._pending_sw = response.sw
        return head + sw_more_data(len(self._pending)).to_bytes(2, "big")

    def _get_response(self, cmd: CommandApdu) -> bytes:
        if cmd.chained:
            self._pending = b""
            raise ApduError(SW.COMMAND_CHAINING_NOT_SUPPORTED)
        if cmd.data:
            self._pending = b""
            raise ApduError(SW.WRONG_LENGTH, "GET RESPONSE takes no data")
        if cmd.p1 or cmd.p2:
            raise ApduError(SW.INCORRECT_P1P2)
        if not self._pending:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no response data waiting")
        ne = cmd.ne if cmd.ne is not None else 256
        chunk, self._pending = self._pending[:ne], self._pending[ne:]
        if self._pending:
            return chunk + sw_more_data(len(self._pending)).to_bytes(2, "big")
        return chunk + int(self._pending_sw).to_bytes(2, "big")
