"""The virtual card's ISO 7816-4 layer: APDU cases (short and extended), command chaining,
response chaining through GET RESPONSE, malformed APDUs, class and instruction errors."""

from __future__ import annotations

import random

import pytest

from card_helpers import make_card_file, object_content
from simulators.card.apdu import (
    PROTOCOL_T0,
    PROTOCOL_T1,
    SW,
    ApduError,
    CommandApdu,
    CommandProcessor,
    ResponseApdu,
    TlvError,
    encode_length,
    parse_tlv_dict,
    parse_tlvs,
    read_tlv,
    sw_more_data,
    sw_retries_left,
    tlv,
)
from simulators.card.card import CardConnectionError, InProcessCardConnection, VirtualCard
from simulators.card.cardfile import NHS_ATR, NHS_T0_ATR, CardFile, CardFileError
from simulators.card.piv import PIV_AID


def sw_of(raw: bytes) -> int:
    return int.from_bytes(raw[-2:], "big")


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("00A40400", CommandApdu(0, 0xA4, 4, 0)),
    ("00CA000005", CommandApdu(0, 0xCA, 0, 0, ne=5)),
    ("00CA000000", CommandApdu(0, 0xCA, 0, 0, ne=256)),
    ("00DA000003AABBCC", CommandApdu(0, 0xDA, 0, 0, bytes.fromhex("AABBCC"))),
    ("00DA000003AABBCC10", CommandApdu(0, 0xDA, 0, 0, bytes.fromhex("AABBCC"), ne=16)),
    ("00DA000003AABBCC00", CommandApdu(0, 0xDA, 0, 0, bytes.fromhex("AABBCC"), ne=256)),
    ("00CA0000000100", CommandApdu(0, 0xCA, 0, 0, ne=256, extended=True)),
    ("00CA0000000000", CommandApdu(0, 0xCA, 0, 0, ne=65536, extended=True)),
    ("00DA0000000002AABB", CommandApdu(0, 0xDA, 0, 0, b"\xaa\xbb", extended=True)),
    ("00DA0000000002AABB0400", CommandApdu(0, 0xDA, 0, 0, b"\xaa\xbb", ne=1024, extended=True)),
    ("00DA0000000002AABB0000", CommandApdu(0, 0xDA, 0, 0, b"\xaa\xbb", ne=65536, extended=True)),
])
def test_parse_cases(raw, expected):
    cmd = CommandApdu.parse(bytes.fromhex(raw))
    assert cmd == expected
    assert cmd.to_bytes() == bytes.fromhex(raw)


def test_case_numbers_and_long_data_round_trip():
    assert CommandApdu(0, 1, 0, 0).case == 1
    assert CommandApdu(0, 1, 0, 0, ne=1).case == 2
    assert CommandApdu(0, 1, 0, 0, b"x").case == 3
    assert CommandApdu(0, 1, 0, 0, b"x", ne=1).case == 4
    big = CommandApdu(0, 0xDB, 0x3F, 0xFF, bytes(300), ne=256)
    raw = big.to_bytes()
    assert raw[4:7] == b"\x00\x01\x2c" and len(raw) == 7 + 300 + 2
    assert CommandApdu.parse(raw) == CommandApdu(0, 0xDB, 0x3F, 0xFF, bytes(300), 256, True)


@pytest.mark.parametrize("raw", [
    "", "00", "00A4", "00A404",                    # shorter than the header
    "00A4040000",                                   # fine (case 2), control below
    "00A4040002AA",                                 # Lc 2, 1 byte
    "00A4040002AABBCCDD",                           # Lc 2, 4 bytes (not 2 + Le)
    "00A404000000",                                 # 6 bytes: truncated extended length
    "00A40400000000AA",                             # extended Lc 0
    "00A4040000000301",                             # extended Lc 3, 1 byte
    "00A40400000002AABB01",                         # extended Lc 2, then 1 byte of Le
    "00A40400000002AABB010203",                     # extended, 3 trailing bytes
])
def test_malformed_apdus_are_wrong_length(raw):
    data = bytes.fromhex(raw)
    if raw == "00A4040000":
        assert CommandApdu.parse(data).ne == 256
        return
    with pytest.raises(ApduError) as e:
        CommandApdu.parse(data)
    assert e.value.sw == SW.WRONG_LENGTH


def test_status_word_helpers():
    assert sw_more_data(10) == 0x610A
    assert sw_more_data(256) == 0x6100
    assert sw_more_data(5000) == 0x6100
    assert sw_retries_left(2) == 0x63C2
    assert sw_retries_left(99) == 0x63CF
    assert ResponseApdu(b"\x01", 0x6A82).to_bytes() == b"\x01\x6a\x82"
    assert ResponseApdu.parse(b"\x01\x02\x90\x00") == ResponseApdu(b"\x01\x02", 0x9000)


# --- BER-TLV ---------------------------------------------------------------------------------


def test_tlv_lengths_and_multibyte_tags():
    assert encode_length(0x7F) == b"\x7f"
    assert encode_length(0x80) == b"\x81\x80"
    assert encode_length(0x1234) == b"\x82\x12\x34"
    assert encode_length(0x10000) == b"\x83\x01\x00\x00"
    assert tlv(0x5FC105, b"ab") == bytes.fromhex("5FC1050261 62".replace(" ", ""))
    long_value = bytes(range(256)) * 3
    encoded = tlv(0x7F49, long_value) + tlv(0x53)
    assert parse_tlvs(encoded) == [(0x7F49, long_value), (0x53, b"")]
    assert read_tlv(encoded)[2] == 2 + 3 + len(long_value)


@pytest.mark.parametrize("raw", ["5C", "5C02AA", "5F", "5FC1", "5C84000000", "5C820001",
                                 "7F", "5FFFFFFF0100"])
def test_malformed_tlv(raw):
    with pytest.raises(TlvError) as e:
        parse_tlvs(bytes.fromhex(raw))
    assert e.value.sw == SW.WRONG_DATA


def test_duplicate_tags_are_malformed():
    with pytest.raises(TlvError):
        parse_tlv_dict(tlv(0x80) + tlv(0x80))


# --- the processor, around an echo application ----------------------------------------------


class Echo:
    """Answers INS 0x01 with its data (or ``size`` bytes given in P1P2), and records what
    it saw."""

    def __init__(self) -> None:
        self.seen: list[CommandApdu] = []

    def __call__(self, cmd: CommandApdu) -> ResponseApdu:
        self.seen.append(cmd)
        if cmd.ins == 0x01:
            return ResponseApdu(cmd.data)
        if cmd.ins == 0x02:
            return ResponseApdu(bytes(i & 0xFF for i in range(cmd.p1p2)), 0x9000)
        if cmd.ins == 0x03:
            return ResponseApdu(b"abc", 0x6283)  # a warning with data
        if cmd.ins == 0x04:
            raise RuntimeError("a bug in the application")
        raise ApduError(SW.INS_NOT_SUPPORTED)


@pytest.fixture
def echo():
    app = Echo()
    return app, CommandProcessor(app, max_command_data=1000)


def test_short_response_within_le(echo):
    _, proc = echo
    assert proc.process(bytes.fromhex("00010000 03 414243 00")) == b"ABC\x90\x00"
    assert proc.process(bytes.fromhex("0002000A 0A"))[:-2] == bytes(range(10))


def test_response_chaining_through_get_response(echo):
    _, proc = echo
    first = proc.process(bytes.fromhex("00020258 00"))  # 600 bytes, Le 256
    assert len(first) == 258 and sw_of(first) == 0x6100
    second = proc.process(bytes.fromhex("00C00000 00"))
    assert len(second) == 258 and sw_of(second) == 0x6158  # 88 left
    third = proc.process(bytes.fromhex("00C00000 58"))
    assert sw_of(third) == 0x9000
    assert first[:-2] + second[:-2] + third[:-2] == bytes(i & 0xFF for i in range(600))
    # nothing left
    assert sw_of(proc.process(bytes.fromhex("00C0000000"))) == SW.CONDITIONS_NOT_SATISFIED


@pytest.fixture
def echo_t0():
    app = Echo()
    return app, CommandProcessor(app, max_command_data=1000, protocol=PROTOCOL_T0)


def test_response_smaller_le(echo, echo_t0):
    for _, proc in (echo, echo_t0):
        part = proc.process(bytes.fromhex("00020014 10"))  # 20 bytes, Le 16
        assert part[:-2] == bytes(range(16)) and sw_of(part) == 0x6104
        assert proc.process(bytes.fromhex("00C00000 04")) == bytes(range(16, 20)) + b"\x90\x00"


def test_t1_no_le_gets_up_to_256_bytes_with_the_status_word(echo):
    _, proc = echo
    assert proc.protocol == PROTOCOL_T1  # the default
    # case 1 and case 3 without Le: the data comes at once, with 90 00 (as YubiKeys answer)
    assert proc.process(bytes.fromhex("00020005")) == bytes(range(5)) + b"\x90\x00"
    assert proc.process(bytes.fromhex("00020100")) == bytes(range(256)) + b"\x90\x00"
    assert proc.process(bytes.fromhex("00010000 03 414243")) == b"ABC\x90\x00"
    assert proc.process(bytes.fromhex("00030000")) == b"abc\x62\x83"
    # beyond 256 bytes: the first 256, then 61xx and GET RESPONSE for the rest
    first = proc.process(bytes.fromhex("00020258"))  # 600 bytes
    assert first[:-2] == bytes(range(256)) and sw_of(first) == 0x6100
    second = proc.process(bytes.fromhex("00C00000 00"))
    assert sw_of(second) == 0x6158
    third = proc.process(bytes.fromhex("00C00000 58"))
    assert sw_of(third) == 0x9000
    assert first[:-2] + second[:-2] + third[:-2] == bytes(i & 0xFF for i in range(600))


def test_t1_extended_no_le_gets_up_to_65536_bytes(echo):
    _, proc = echo
    data = bytes(i & 0xFF for i in range(300))
    out = proc.process(bytes.fromhex("00010000 00012C") + data)  # extended case 3, no Le
    assert out == data + b"\x90\x00"
    # the same 300 bytes by a short chain without Le: 256 at once, the rest by GET RESPONSE
    assert proc.process(bytes.fromhex("10010000 FF") + data[:255]) == b"\x90\x00"
    out = proc.process(bytes.fromhex("00010000 2D") + data[255:])
    assert out[:-2] == data[:256] and sw_of(out) == 0x612C
    assert proc.process(bytes.fromhex("00C00000 2C")) == data[256:] + b"\x90\x00"


def test_t0_no_le_hands_the_data_out_with_61xx(echo_t0):
    _, proc = echo_t0
    # case 1: no Le at all, the data waits for GET RESPONSE
    assert proc.process(bytes.fromhex("00020005")) == b"\x61\x05"
    assert proc.process(bytes.fromhex("00C00000 05")) == bytes(range(5)) + b"\x90\x00"
    # case 3 (data, no Le), short or extended: the same
    assert proc.process(bytes.fromhex("00010000 03 414243")) == b"\x61\x03"
    assert proc.process(bytes.fromhex("00C00000 03")) == b"ABC\x90\x00"
    assert proc.process(bytes.fromhex("00010000 000003 414243")) == b"\x61\x03"
    assert proc.process(bytes.fromhex("00C00000 00")) == b"ABC\x90\x00"
    assert proc.process(bytes.fromhex("00030000")) == b"\x61\x03"
    assert proc.process(bytes.fromhex("00C00000 03")) == b"abc\x62\x83"
    # no data: just the status word
    assert proc.process(bytes.fromhex("00020000")) == b"\x90\x00"


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError):
        CommandProcessor(Echo(), protocol="t2")


def test_get_response_carries_the_commands_own_status_word(echo):
    _, proc = echo
    assert proc.process(bytes.fromhex("00030000 01")) == b"a\x61\x02"
    assert proc.process(bytes.fromhex("00C00000 02")) == b"bc\x62\x83"


def test_extended_le_gets_everything_at_once(echo):
    _, proc = echo
    out = proc.process(bytes.fromhex("000207D0 000000"))  # 2000 bytes, Le 65536
    assert len(out) == 2002 and sw_of(out) == 0x9000
    out = proc.process(bytes.fromhex("000207D0 000400"))  # Le 1024: the rest by GET RESPONSE
    assert len(out) == 1026 and sw_of(out) == 0x6100


def test_get_response_errors(echo):
    _, proc = echo
    assert sw_of(proc.process(bytes.fromhex("00C0000000"))) == SW.CONDITIONS_NOT_SATISFIED
    proc.process(bytes.fromhex("00020200 00"))
    assert sw_of(proc.process(bytes.fromhex("00C0010000"))) == SW.INCORRECT_P1P2
    assert sw_of(proc.process(bytes.fromhex("00C0000001AA"))) == SW.WRONG_LENGTH
    # the wrong GET RESPONSE with data dropped the pending data
    assert sw_of(proc.process(bytes.fromhex("00C0000000"))) == SW.CONDITIONS_NOT_SATISFIED
    proc.process(bytes.fromhex("00020200 00"))
    assert sw_of(proc.process(bytes.fromhex("10C0000000"))) == SW.COMMAND_CHAINING_NOT_SUPPORTED


def test_another_command_drops_pending_response(echo):
    _, proc = echo
    assert sw_of(proc.process(bytes.fromhex("00020200 00"))) == 0x6100
    assert proc.process(bytes.fromhex("00010000 01 41 00")) == b"A\x90\x00"
    assert sw_of(proc.process(bytes.fromhex("00C0000000"))) == SW.CONDITIONS_NOT_SATISFIED


def test_command_chaining_reassembles(echo):
    app, proc = echo
    assert proc.process(bytes.fromhex("10010000 02 4142")) == b"\x90\x00"
    assert proc.chaining
    assert proc.process(bytes.fromhex("10010000 01 43")) == b"\x90\x00"
    assert proc.process(bytes.fromhex("00010000 02 4445 00")) == b"ABCDE\x90\x00"
    assert not proc.chaining
    assert len(app.seen) == 1
    assert app.seen[0] == CommandApdu(0x00, 0x01, 0, 0, b"ABCDE", ne=256)


def test_command_chaining_interrupted(echo):
    app, proc = echo
    proc.process(bytes.fromhex("10010000 02 4142"))
    # a different INS (or P1/P2) in the middle of the chain
    assert sw_of(proc.process(bytes.fromhex("00010100 01 43"))) == SW.LAST_COMMAND_OF_CHAIN_EXPECTED
    assert not proc.chaining and not app.seen
    # GET RESPONSE does not belong in a chain either
    proc.process(bytes.fromhex("10010000 02 4142"))
    assert sw_of(proc.process(bytes.fromhex("00C0000000"))) == SW.LAST_COMMAND_OF_CHAIN_EXPECTED
    # a malformed APDU also ends the chain
    proc.process(bytes.fromhex("10010000 02 4142"))
    assert sw_of(proc.process(bytes.fromhex("0001"))) == SW.WRONG_LENGTH
    assert proc.process(bytes.fromhex("00010000 01 5A 00")) == b"Z\x90\x00"


def test_command_chain_too_long(echo):
    _, proc = echo
    for _ in range(3):
        assert sw_of(proc.process(b"\x10\x01\x00\x00\xff" + bytes(255))) == 0x9000
    assert sw_of(proc.process(b"\x10\x01\x00\x00\xff" + bytes(255))) == SW.WRONG_LENGTH
    assert not proc.chaining


@pytest.mark.parametrize("cla, sw", [
    (0x80, SW.CLA_NOT_SUPPORTED), (0x84, SW.CLA_NOT_SUPPORTED), (0xFF, SW.CLA_NOT_SUPPORTED),
    (0x20, SW.CLA_NOT_SUPPORTED), (0xA0, SW.CLA_NOT_SUPPORTED),
    (0x01, SW.LOGICAL_CHANNEL_NOT_SUPPORTED), (0x03, SW.LOGICAL_CHANNEL_NOT_SUPPORTED),
    (0x40, SW.LOGICAL_CHANNEL_NOT_SUPPORTED),
    (0x04, SW.SECURE_MESSAGING_NOT_SUPPORTED), (0x0C, SW.SECURE_MESSAGING_NOT_SUPPORTED),
])
def test_class_errors(echo, cla, sw):
    app, proc = echo
    assert sw_of(proc.process(bytes((cla, 0x01, 0, 0, 1, 0x41)))) == sw
    assert not app.seen


@pytest.mark.parametrize("ins", [0x60, 0x61, 0x6F, 0x90, 0x99, 0x9F])
def test_invalid_instructions(echo, ins):
    app, proc = echo
    assert sw_of(proc.process(bytes((0, ins, 0, 0)))) == SW.INS_NOT_SUPPORTED
    assert not app.seen


def test_application_bug_answers_6f00(echo):
    _, proc = echo
    assert proc.process(bytes.fromhex("00040000")) == b"\x6f\x00"
    assert proc.process(bytes.fromhex("00010000 01 41 00")) == b"A\x90\x00"


# --- the same through the virtual card -------------------------------------------------------


@pytest.fixture(scope="module")
def card_file():
    return make_card_file()


@pytest.fixture
def card(card_file):
    card = VirtualCard(card_file, autosave=False)
    card.power_on()
    return card


def test_power_and_atr(card, card_file):
    assert card.atr == card_file.atr
    assert card.power_on() == card_file.atr
    assert card.reset() == card_file.atr
    card.power_off()
    assert not card.powered
    # a transmit to an unpowered card powers it up (as a reader would)
    assert sw_of(card.transmit(bytes.fromhex("00A4040005A000000308 00"))) == 0x9000
    assert card.powered


def test_nothing_selected_after_power_on(card):
    assert card.transmit(bytes.fromhex("00CB3FFF 03 5C017E 00")) == b"\x6d\x00"
    card.transmit(b"\x00\xa4\x04\x00\x0b" + PIV_AID + b"\x00")
    assert sw_of(card.transmit(bytes.fromhex("00CB3FFF 03 5C017E 00"))) == 0x9000
    card.reset()
    assert card.transmit(bytes.fromhex("00CB3FFF 03 5C017E 00")) == b"\x6d\x00"


def test_select_errors(card):
    assert card.transmit(bytes.fromhex("00A40400 05 A000000399 00")) == b"\x6a\x82"  # other RID
    assert card.transmit(bytes.fromhex("00A40400 04 A0000003 00")) == b"\x6a\x82"  # too short
    assert card.transmit(bytes.fromhex("00A40000 02 3F00 00")) == b"\x6a\x82"  # no files
    assert card.transmit(bytes.fromhex("00A40C00 02 3F00")) == b"\x6a\x86"
    assert card.transmit(b"\x00\xa4\x04\x00\x11" + bytes(17)) == b"\x67\x00"
    assert card.transmit(b"\x00\xa4\x04\x01\x0b" + PIV_AID) == b"\x6a\x86"  # P2
    assert card.transmit(b"\x00\xa4\x04\x0c\x0b" + PIV_AID) == b"\x90\x00"  # no FCI wanted


def test_certificate_through_response_chaining(card, card_file):
    """A short GET DATA (Le 00) of a certificate object comes back in 256-byte pieces."""
    card.transmit(b"\x00\xa4\x04\x00\x0b" + PIV_AID + b"\x00")
    expected = b"\x53\x82" + len(card_file.objects["5fc105"]).to_bytes(2, "big") \
        + card_file.objects["5fc105"]
    out = card.transmit(bytes.fromhex("00CB3FFF 05 5C035FC105 00"))
    collected = out[:-2]
    while out[-2] == 0x61:
        out = card.transmit(bytes((0, 0xC0, 0, 0, out[-1])))
        collected += out[:-2]
    assert sw_of(out) == 0x9000
    assert collected == expected
    # extended: all at once
    out = card.transmit(bytes.fromhex("00CB3FFF 000005 5C035FC105 0000"))
    assert out == expected + b"\x90\x00"


def test_command_chaining_through_the_card(card):
    """GET DATA's data field sent in two chained pieces."""
    card.transmit(b"\x00\xa4\x04\x00\x0b" + PIV_AID + b"\x00")
    assert card.transmit(bytes.fromhex("10CB3FFF 02 5C01")) == b"\x90\x00"
    out = card.transmit(bytes.fromhex("00CB3FFF 01 7E 00"))
    assert sw_of(out) == 0x9000 and out[0] == 0x7E


def test_unsupported_instruction_in_piv(card):
    card.transmit(b"\x00\xa4\x04\x00\x0b" + PIV_AID + b"\x00")
    assert card.transmit(bytes.fromhex("00FD0000 00")) == b"\x6d\x00"  # YubiKey's version
    assert card.transmit(bytes.fromhex("00B00000 00")) == b"\x6d\x00"  # READ BINARY


def test_garbage_never_crashes(card):
    rng = random.Random(4)
    card.transmit(b"\x00\xa4\x04\x00\x0b" + PIV_AID + b"\x00")
    headers = [b"\x00\xcb\x3f\xff", b"\x00\x87\x07\x9a", b"\x00\x87\x03\x9b", b"\x00\x87\x08\x9b",
               b"\x00\xdb\x3f\xff", b"\x00\x47\x00\x9a", b"\x00\x24\x00\x80", b"\x00\x2c\x00\x80",
               b"\x00\xa4\x04\x00", b"\x10\xcb\x3f\xff", b"\x00\xc0\x00\x00"]
    for i in range(3000):
        if i % 2:
            apdu = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        else:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 30)))
            apdu = rng.choice(headers) + body
        out = card.transmit(apdu)
        assert isinstance(out, bytes) and len(out) >= 2
        assert out[-2] in (0x90, 0x61, 0x62, 0x63, 0x65, 0x67, 0x68, 0x69, 0x6A, 0x6D, 0x6E), \
            (apdu.hex(), out.hex())
    for junk in (None, 5, "00A40400", [256], object()):
        assert card.transmit(junk) == b"\x67\x00"  # type: ignore[arg-type]


def test_in_process_connection(card_file):
    card = VirtualCard(card_file, autosave=False)
    conn = InProcessCardConnection(card)
    with pytest.raises(CardConnectionError):
        conn.transmit([0, 0xA4, 4, 0])
    conn.connect()
    assert conn.getATR() == list(card_file.atr)
    data, sw1, sw2 = conn.transmit(list(b"\x00\xa4\x04\x00\x09" + PIV_AID[:9] + b"\x00"))
    assert (sw1, sw2) == (0x90, 0x00) and data[0] == 0x61
    assert object_content(conn, 0x7E)[:2] == b"\x4f\x0b"
    conn.disconnect()
    assert not card.powered
    with InProcessCardConnection(card) as again:
        assert again.transmit([0, 0xCB, 0x3F, 0xFF, 3, 0x5C, 1, 0x7E, 0]) == ([], 0x6D, 0x00)


def test_the_card_follows_its_protocol_option(card_file):
    """T=1 by default (SELECT without Le answers the template with 90 00); the option "t0"
    hands the same answer out with 61xx + GET RESPONSE. The protocol is kept in the card
    file; a file from before the option is a T=1 card."""
    select = bytes.fromhex("00A4040009") + PIV_AID[:9]
    t1 = VirtualCard(card_file, autosave=False)
    assert t1.protocol == "t1" and card_file.atr == NHS_ATR
    answer = t1.transmit(select)
    assert answer[:1] == b"\x61" and answer[-2:] == b"\x90\x00"
    data = card_file.to_json()
    data.update(protocol="t0", atr=NHS_T0_ATR.hex())
    t0 = VirtualCard(CardFile.from_json(data), autosave=False)
    assert t0.protocol == "t0" and t0.power_on() == NHS_T0_ATR
    more = t0.transmit(select)
    assert more == bytes((0x61, len(answer) - 2))
    assert t0.transmit(bytes.fromhex("00C00000") + more[1:]) == answer
    del data["protocol"]
    assert CardFile.from_json(data).protocol == "t1"
    with pytest.raises(CardFileError):
        CardFile.from_json({**data, "protocol": "t2"})
