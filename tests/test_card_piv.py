"""The PIV application of the virtual card, driven through InProcessCardConnection as a host
would drive it: SELECT, GET DATA, VERIFY and the retry counters (saved to the card file),
CHANGE REFERENCE DATA, RESET RETRY COUNTER, signatures checked with the certificate's key,
management-key authentication, GENERATE ASYMMETRIC KEY PAIR and PUT DATA."""

from __future__ import annotations

import hashlib
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from card_helpers import (
    AES_MANAGEMENT_KEY,
    TDES_MANAGEMENT_KEY,
    TEST_PIN,
    TEST_PUK,
    TestCA,
    authenticate_management_key,
    build_card,
    get_data,
    object_content,
    pin_field,
    pkcs1_v15_block,
    select_piv,
    send,
    sign,
    verify_pin,
)
from simulators.card.apdu import SW, parse_single_tlv, parse_tlv_dict, parse_tlvs, tlv
from simulators.card.card import InProcessCardConnection, VirtualCard
from simulators.card.cardfile import CardFile
from simulators.card.piv import (
    NIST_RID,
    OBJ_AUTHENTICATION_CERT,
    OBJ_CARD_AUTH_CERT,
    OBJ_CCC,
    OBJ_CHUID,
    OBJ_DISCOVERY,
    OBJ_FINGERPRINTS,
    OBJ_KEY_HISTORY,
    OBJ_KEY_MANAGEMENT_CERT,
    OBJ_PRINTED_INFORMATION,
    OBJ_SIGNATURE_CERT,
    PIV_AID,
    PIV_PIX,
    build_certificate_object,
)

MESSAGE = b"clinical record 42"
DIGEST = hashlib.sha256(MESSAGE).digest()


def connect(card: VirtualCard) -> InProcessCardConnection:
    conn = InProcessCardConnection(card)
    conn.connect()
    assert select_piv(conn).sw == 0x9000
    return conn


@pytest.fixture
def built(tmp_path):
    """An RSA-9A card with a file (AES management key); a new file per test."""
    return build_card(path=tmp_path / "alice.card", ca=TestCA.shared())


@pytest.fixture
def card(built):
    return VirtualCard(built.card_file)


@pytest.fixture
def conn(card):
    return connect(card)


def reload_pin_retries(built) -> int:
    return CardFile.load(built.path).pin.retries_left


# --- SELECT and GET DATA ---------------------------------------------------------------------


@pytest.mark.parametrize("aid", [PIV_AID, PIV_AID[:9], PIV_AID[:5]])
def test_select_answers_the_application_property_template(card, aid):
    conn = InProcessCardConnection(card)
    conn.connect()
    response = select_piv(conn, aid)
    assert response.sw == 0x9000
    apt = parse_tlv_dict(parse_single_tlv(response.data, 0x61))
    assert apt[0x4F] == PIV_PIX
    assert parse_single_tlv(apt[0x79], 0x4F) == NIST_RID
    assert apt[0x50]
    assert 0xAC not in apt  # no cipher suite: hosts must not try secure messaging


def test_failed_select_keeps_piv_selected(conn):
    assert send(conn, 0x00, 0xA4, 0x04, 0x00, bytes.fromhex("D27600012401")).sw == 0x6A82
    assert get_data(conn, OBJ_DISCOVERY).sw == 0x9000


def test_read_every_object(conn, built):
    card_file = built.card_file
    for tag, key in [(OBJ_CCC, "5fc107"), (OBJ_CHUID, "5fc102"), (OBJ_KEY_HISTORY, "5fc10c"),
                     (OBJ_AUTHENTICATION_CERT, "5fc105"), (OBJ_SIGNATURE_CERT, "5fc10a"),
                     (OBJ_KEY_MANAGEMENT_CERT, "5fc10b"), (OBJ_CARD_AUTH_CERT, "5fc101")]:
        response = get_data(conn, tag)
        assert response.sw == 0x9000, hex(tag)
        assert response.data == tlv(0x53, card_file.objects[key])
    discovery = get_data(conn, OBJ_DISCOVERY)
    assert discovery.data == tlv(0x7E, card_file.objects["7e"])
    assert parse_tlv_dict(object_content(conn, OBJ_DISCOVERY))[0x4F] == PIV_AID
    chuid = parse_tlv_dict(object_content(conn, OBJ_CHUID))
    assert len(chuid[0x34]) == 16 and chuid[0x34].hex().endswith(card_file.holder_uuid)
    assert get_data(conn, OBJ_FINGERPRINTS).sw == 0x6982  # PIN-protected: status first
    assert verify_pin(conn) == 0x9000
    assert get_data(conn, OBJ_FINGERPRINTS).sw == 0x6A82  # then: not on this card
    assert get_data(conn, 0x5FC120).sw == 0x6A82  # a retired certificate slot, empty


def test_certificate_object_byte_for_byte(conn, built):
    for ref, tag in [("9a", OBJ_AUTHENTICATION_CERT), ("9c", OBJ_SIGNATURE_CERT)]:
        items = parse_tlv_dict(object_content(conn, tag))
        der = built.certificates[ref].public_bytes(serialization.Encoding.DER)
        assert items[0x70] == der
        assert items[0x71] == b"\x00" and items[0xFE] == b""
        assert x509.load_der_x509_certificate(items[0x70]).subject.rfc4514_string() \
            .startswith("2.5.4.5=555123456789,CN=Dr Alice Smith")


def test_discovery_object_is_synthesised_when_the_file_has_none(built):
    del built.card_file.objects["7e"]
    conn = connect(VirtualCard(built.card_file, autosave=False))
    content = parse_tlv_dict(object_content(conn, OBJ_DISCOVERY))
    assert content == {0x4F: PIV_AID, 0x5F2F: b"\x40\x00"}


def test_get_data_errors(conn):
    assert send(conn, 0x00, 0xCB, 0x3F, 0xFE, tlv(0x5C, b"\x7e")).sw == SW.INCORRECT_P1P2
    assert send(conn, 0x00, 0xCB, 0x3F, 0xFF, tlv(0x5D, b"\x7e")).sw == SW.WRONG_DATA
    assert send(conn, 0x00, 0xCB, 0x3F, 0xFF, tlv(0x5C, b"")).sw == SW.WRONG_DATA
    assert send(conn, 0x00, 0xCB, 0x3F, 0xFF, tlv(0x5C, bytes(4))).sw == SW.WRONG_DATA
    assert send(conn, 0x00, 0xCB, 0x3F, 0xFF, b"\x5c\x05\x01").sw == SW.WRONG_DATA
    assert send(conn, 0x00, 0xCB, 0x3F, 0xFF).sw == SW.WRONG_DATA


def test_printed_information_needs_the_pin(conn, card):
    assert get_data(conn, OBJ_PRINTED_INFORMATION).sw == 0x6982
    assert verify_pin(conn) == 0x9000
    printed = parse_tlv_dict(object_content(conn, OBJ_PRINTED_INFORMATION))
    assert printed[0x01] == b"Dr Alice Smith"
    # the security status ends with a reset, a re-select, or a logout
    card.reset()
    assert select_piv(conn).sw == 0x9000
    assert get_data(conn, OBJ_PRINTED_INFORMATION).sw == 0x6982
    assert verify_pin(conn) == 0x9000
    assert select_piv(conn).sw == 0x9000
    assert get_data(conn, OBJ_PRINTED_INFORMATION).sw == 0x6982
    assert verify_pin(conn) == 0x9000
    assert send(conn, 0x00, 0x20, 0xFF, 0x80, ne=None).sw == 0x9000
    assert get_data(conn, OBJ_PRINTED_INFORMATION).sw == 0x6982
    assert verify_pin(conn, None) == 0x63C3


# --- VERIFY and the retry counter ------------------------------------------------------------


def test_verify_wrong_down_to_blocked_and_persisted(conn, built):
    assert verify_pin(conn, None) == 0x63C3
    assert verify_pin(conn, "9999") == 0x63C2
    assert reload_pin_retries(built) == 2
    assert verify_pin(conn, None) == 0x63C2
    assert verify_pin(conn) == 0x9000  # the right PIN restores the tries
    assert reload_pin_retries(built) == 3
    assert verify_pin(conn, None) == 0x9000  # verified
    assert verify_pin(conn, "0000") == 0x63C2
    assert verify_pin(conn, None) == 0x63C2  # a wrong PIN ends the verified state
    assert verify_pin(conn, "00000000") == 0x63C1
    assert verify_pin(conn, "123") == SW.WRONG_DATA  # not a PIN: costs no try
    assert verify_pin(conn, "12a4") == SW.WRONG_DATA
    assert send(conn, 0x00, 0x20, 0x00, 0x80, b"1234").sw == SW.WRONG_LENGTH
    assert verify_pin(conn, None) == 0x63C1
    assert verify_pin(conn, "4321") == 0x63C0
    assert verify_pin(conn, None) == SW.AUTH_METHOD_BLOCKED
    assert verify_pin(conn) == SW.AUTH_METHOD_BLOCKED  # even the right one
    assert reload_pin_retries(built) == 0
    # survives reloading the card from its file
    again = connect(VirtualCard.load(built.path))
    assert verify_pin(again, None) == SW.AUTH_METHOD_BLOCKED


def test_verify_reference_and_parameter_errors(conn):
    assert send(conn, 0x00, 0x20, 0x00, 0x00, pin_field(TEST_PIN)).sw \
        == SW.REFERENCED_DATA_NOT_FOUND
    assert send(conn, 0x00, 0x20, 0x00, 0x81, pin_field(TEST_PIN)).sw == SW.INCORRECT_P1P2
    assert send(conn, 0x00, 0x20, 0x01, 0x80, pin_field(TEST_PIN)).sw == SW.INCORRECT_P1P2
    assert send(conn, 0x00, 0x20, 0xFF, 0x80, b"\x00").sw == SW.WRONG_LENGTH


def test_change_pin(conn, built):
    data = pin_field("1111") + pin_field("24680")
    assert send(conn, 0x00, 0x24, 0x00, 0x80, data).sw == 0x63C2
    assert reload_pin_retries(built) == 2
    assert send(conn, 0x00, 0x24, 0x00, 0x80, pin_field(TEST_PIN) + pin_field("12")).sw \
        == SW.WRONG_DATA
    assert send(conn, 0x00, 0x24, 0x00, 0x80, pin_field(TEST_PIN)).sw == SW.WRONG_LENGTH
    assert send(conn, 0x00, 0x24, 0x00, 0x80, pin_field(TEST_PIN) + pin_field("24680")).sw \
        == 0x9000
    assert reload_pin_retries(built) == 3
    assert verify_pin(conn, TEST_PIN) == 0x63C2
    assert verify_pin(conn, "24680") == 0x9000
    assert CardFile.load(built.path).pin.matches("24680")


def test_puk_unlocks_a_blocked_pin(conn, built):
    for _ in range(3):
        verify_pin(conn, "0000")
    assert verify_pin(conn, None) == SW.AUTH_METHOD_BLOCKED
    assert send(conn, 0x00, 0x2C, 0x00, 0x80, pin_field("87654321") + pin_field("5555")).sw \
        == 0x63C4
    assert CardFile.load(built.path).puk.retries_left == 4
    assert send(conn, 0x00, 0x2C, 0x00, 0x80, pin_field(TEST_PUK) + pin_field("55")).sw \
        == SW.WRONG_DATA
    assert send(conn, 0x00, 0x2C, 0x00, 0x81, pin_field(TEST_PUK) + pin_field("5555")).sw \
        == SW.INCORRECT_P1P2
    assert send(conn, 0x00, 0x2C, 0x00, 0x80, pin_field(TEST_PUK) + pin_field("5555")).sw \
        == 0x9000
    saved = CardFile.load(built.path)
    assert (saved.pin.retries_left, saved.puk.retries_left) == (3, 5)
    assert verify_pin(conn, None) == 0x63C3  # unblocked, not verified
    assert verify_pin(conn, "5555") == 0x9000


def test_puk_blocked(conn, built):
    for expected in (0x63C4, 0x63C3, 0x63C2, 0x63C1, 0x63C0):
        assert send(conn, 0x00, 0x2C, 0x00, 0x80, pin_field("00000000") + pin_field("5555")).sw \
            == expected
    assert send(conn, 0x00, 0x2C, 0x00, 0x80, pin_field(TEST_PUK) + pin_field("5555")).sw \
        == SW.AUTH_METHOD_BLOCKED
    assert CardFile.load(built.path).puk.retries_left == 0
    assert verify_pin(conn) == 0x9000  # the PIN itself still works


def test_change_puk(conn, built):
    assert send(conn, 0x00, 0x24, 0x00, 0x81, pin_field(TEST_PUK) + pin_field("ABCDEFGH")).sw \
        == 0x9000
    assert CardFile.load(built.path).puk.matches("ABCDEFGH")


# --- signatures ------------------------------------------------------------------------------


def test_sign_rsa_with_9a(conn, built):
    block = pkcs1_v15_block(DIGEST)
    assert sign(conn, 0x9A, "RSA2048", block).sw == 0x6982  # PIN first
    assert verify_pin(conn) == 0x9000
    signature = sign(conn, 0x9A, "RSA2048", block)
    assert signature.sw == 0x9000 and len(signature.data) == 256
    built.certificates["9a"].public_key().verify(signature.data, MESSAGE, padding.PKCS1v15(),
                                                  hashes.SHA256())
    # 9A stays usable while the PIN is verified
    assert sign(conn, 0x9A, "RSA2048", block).sw == 0x9000


def test_rsa_raw_operation_on_any_block(conn, built):
    """A block that is not PKCS#1 v1.5 (the CRT path) gives textbook RSA too."""
    assert verify_pin(conn) == 0x9000
    public = built.certificates["9a"].public_key().public_numbers()
    block = b"\x00" + bytes(range(1, 256))
    result = sign(conn, 0x9A, "RSA2048", block)
    assert result.sw == 0x9000
    assert pow(int.from_bytes(result.data, "big"), public.e, public.n) \
        == int.from_bytes(block, "big")
    assert sign(conn, 0x9A, "RSA2048", block[:-1]).sw == SW.WRONG_DATA
    assert sign(conn, 0x9A, "RSA2048", b"\xff" * 256).sw == SW.WRONG_DATA  # >= modulus
    assert sign(conn, 0x9A, "ECCP256", DIGEST).sw == SW.INCORRECT_P1P2  # not its algorithm


def test_sign_ec_with_9a(tmp_path):
    built = build_card(path=tmp_path / "ec.card", keys={"9a": "ECCP256"})
    conn = connect(VirtualCard(built.card_file))
    assert verify_pin(conn) == 0x9000
    signature = sign(conn, 0x9A, "ECCP256", DIGEST)
    assert signature.sw == 0x9000
    built.certificates["9a"].public_key().verify(signature.data, MESSAGE,
                                                  ec.ECDSA(hashes.SHA256()))
    # a SHA-384 hash is truncated to the field size, as ECDSA does
    digest384 = hashlib.sha384(MESSAGE).digest()
    signature = sign(conn, 0x9A, "ECCP256", digest384)
    built.certificates["9a"].public_key().verify(signature.data, digest384[:32],
                                                  ec.ECDSA(Prehashed(hashes.SHA256())))


def test_9c_needs_a_fresh_verify_for_every_signature(conn, built):
    public = built.certificates["9c"].public_key()
    assert sign(conn, 0x9C, "ECCP256", DIGEST).sw == 0x6982
    for _ in range(2):
        assert verify_pin(conn) == 0x9000
        signature = sign(conn, 0x9C, "ECCP256", DIGEST)
        assert signature.sw == 0x9000
        public.verify(signature.data, MESSAGE, ec.ECDSA(hashes.SHA256()))
        assert sign(conn, 0x9C, "ECCP256", DIGEST).sw == 0x6982
        assert sign(conn, 0x9A, "RSA2048", pkcs1_v15_block(DIGEST)).sw == 0x9000  # PIN still on


def test_9e_card_authentication_needs_no_pin(conn, built):
    signature = sign(conn, 0x9E, "ECCP256", DIGEST)
    assert signature.sw == 0x9000
    built.certificates["9e"].public_key().verify(signature.data, MESSAGE,
                                                  ec.ECDSA(hashes.SHA256()))


def test_ecdh_with_9d(conn, built):
    peer = ec.generate_private_key(ec.SECP256R1())
    point = peer.public_key().public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint)
    template = tlv(0x7C, tlv(0x82) + tlv(0x85, point))
    assert send(conn, 0x00, 0x87, 0x11, 0x9D, template).sw == 0x6982
    assert verify_pin(conn) == 0x9000
    response = send(conn, 0x00, 0x87, 0x11, 0x9D, template)
    assert response.sw == 0x9000
    secret = parse_single_tlv(parse_single_tlv(response.data, 0x7C), 0x82)
    assert secret == peer.exchange(ec.ECDH(), built.certificates["9d"].public_key())
    bad = tlv(0x7C, tlv(0x82) + tlv(0x85, b"\x04" + bytes(64)))
    assert send(conn, 0x00, 0x87, 0x11, 0x9D, bad).sw == SW.WRONG_DATA


def test_general_authenticate_errors(conn):
    assert verify_pin(conn) == 0x9000
    good = tlv(0x82) + tlv(0x81, DIGEST)
    assert send(conn, 0x00, 0x87, 0x11, 0x95, tlv(0x7C, good)).sw == SW.REFERENCED_DATA_NOT_FOUND
    assert send(conn, 0x00, 0x87, 0x11, 0x80, tlv(0x7C, good)).sw == SW.INCORRECT_P1P2
    assert send(conn, 0x00, 0x87, 0x11, 0x9E, good).sw == SW.WRONG_DATA  # no 7C
    assert send(conn, 0x00, 0x87, 0x11, 0x9E, tlv(0x7C, tlv(0x81, DIGEST))).sw == SW.WRONG_DATA
    assert send(conn, 0x00, 0x87, 0x11, 0x9E, tlv(0x7C, tlv(0x82) + tlv(0x81))).sw \
        == SW.WRONG_DATA
    assert send(conn, 0x00, 0x87, 0x11, 0x9E, tlv(0x7C, good + tlv(0x80))).sw == SW.WRONG_DATA


# --- management key, GENERATE, PUT DATA -------------------------------------------------------


@pytest.mark.parametrize("algorithm, key", [("AES128", AES_MANAGEMENT_KEY),
                                            ("3DES", TDES_MANAGEMENT_KEY)])
def test_management_key_then_generate_and_put_data(tmp_path, algorithm, key):
    built = build_card(path=tmp_path / "card", management_algorithm=algorithm)
    card = VirtualCard(built.card_file)
    conn = connect(card)
    generate = tlv(0xAC, tlv(0x80, b"\x11"))
    assert send(conn, 0x00, 0x47, 0x00, 0x9C, generate).sw == 0x6982
    assert authenticate_management_key(conn, algorithm, key) == 0x9000
    assert card.piv.management_authenticated

    response = send(conn, 0x00, 0x47, 0x00, 0x9C, generate)
    assert response.sw == 0x9000
    point = parse_single_tlv(parse_single_tlv(response.data, 0x7F49), 0x86)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)

    ca = TestCA.shared()
    certificate = ca.issue(public, "Dr Alice Smith", "555123456789")
    der = certificate.public_bytes(serialization.Encoding.DER)
    put = tlv(0x5C, b"\x5f\xc1\x0a") + tlv(0x53, build_certificate_object(der))
    assert len(put) > 255  # goes in a command chain
    assert send(conn, 0x00, 0xDB, 0x3F, 0xFF, put, ne=None).sw == 0x9000

    saved = CardFile.load(built.path)
    assert saved.keys["9c"].algorithm == "ECCP256"
    assert saved.objects["5fc10a"] == build_certificate_object(der)
    # the new key signs, and the new certificate reads back
    conn = connect(VirtualCard.load(built.path))
    assert parse_tlv_dict(object_content(conn, OBJ_SIGNATURE_CERT))[0x70] == der
    assert verify_pin(conn) == 0x9000
    signature = sign(conn, 0x9C, "ECCP256", DIGEST)
    public.verify(signature.data, MESSAGE, ec.ECDSA(hashes.SHA256()))


def test_generate_rsa(conn, card, built):
    old_pem = built.card_file.keys["9a"].private_key_pem
    assert authenticate_management_key(conn, "AES128", AES_MANAGEMENT_KEY, "external") == 0x9000
    response = send(conn, 0x00, 0x47, 0x00, 0x9A, tlv(0xAC, tlv(0x80, b"\x07")))
    assert response.sw == 0x9000
    fields = parse_tlv_dict(parse_single_tlv(response.data, 0x7F49))
    assert len(fields[0x81]) == 256 and int.from_bytes(fields[0x82], "big") == 65537
    assert verify_pin(conn) == 0x9000
    result = sign(conn, 0x9A, "RSA2048", pkcs1_v15_block(DIGEST))
    n, e = int.from_bytes(fields[0x81], "big"), 65537
    assert pow(int.from_bytes(result.data, "big"), e, n) \
        == int.from_bytes(pkcs1_v15_block(DIGEST), "big")
    saved = CardFile.load(built.path).keys["9a"]
    assert saved.private_key_pem != old_pem and saved == built.card_file.keys["9a"]


def test_witness_only_authentication_and_put_data_delete(conn, built):
    assert authenticate_management_key(conn, "AES128", AES_MANAGEMENT_KEY, "witness") == 0x9000
    assert send(conn, 0x00, 0xDB, 0x3F, 0xFF, tlv(0x5C, b"\x5f\xc1\x09") + tlv(0x53)).sw == 0x9000
    assert "5fc109" not in CardFile.load(built.path).objects
    discovery = tlv(0x7E, tlv(0x4F, PIV_AID) + tlv(0x5F2F, b"\x60\x00"))
    assert send(conn, 0x00, 0xDB, 0x3F, 0xFF, discovery).sw == 0x9000
    assert get_data(conn, OBJ_DISCOVERY).data == discovery
    assert send(conn, 0x00, 0xDB, 0x3F, 0xFF, tlv(0x5C, b"\x5f\xc1\x09")).sw == SW.WRONG_DATA
    assert send(conn, 0x00, 0xDB, 0x3F, 0xFE, tlv(0x5C, b"\x7e") + tlv(0x53)).sw \
        == SW.INCORRECT_P1P2
    assert send(conn, 0x00, 0x47, 0x00, 0x9A, tlv(0xAC, tlv(0x80, b"\x06"))).sw == SW.WRONG_DATA
    assert send(conn, 0x00, 0x47, 0x00, 0x9B, tlv(0xAC, tlv(0x80, b"\x11"))).sw \
        == SW.INCORRECT_P1P2


def test_wrong_management_key_is_refused(conn, card):
    for mode in ("mutual", "witness", "external"):
        assert authenticate_management_key(conn, "AES128", bytes(16), mode) == 0x6982
        assert not card.piv.management_authenticated
    assert send(conn, 0x00, 0xDB, 0x3F, 0xFF, tlv(0x5C, b"\x7e") + tlv(0x53, b"x")).sw == 0x6982
    # the algorithm must be the card's (3DES is not), and a witness is good once
    assert authenticate_management_key(conn, "3DES", TDES_MANAGEMENT_KEY) == SW.INCORRECT_P1P2
    witness_request = tlv(0x7C, tlv(0x80))
    assert send(conn, 0x00, 0x87, 0x08, 0x9B, witness_request).sw == 0x9000
    assert get_data(conn, OBJ_DISCOVERY).sw == 0x9000  # another command in between
    answer = tlv(0x7C, tlv(0x80, bytes(16)))
    assert send(conn, 0x00, 0x87, 0x08, 0x9B, answer).sw == SW.CONDITIONS_NOT_SATISFIED


def test_management_authentication_ends_with_reset_and_select(conn, card):
    assert authenticate_management_key(conn, "AES128", AES_MANAGEMENT_KEY) == 0x9000
    assert select_piv(conn).sw == 0x9000
    assert not card.piv.management_authenticated
    assert authenticate_management_key(conn, "AES128", AES_MANAGEMENT_KEY) == 0x9000
    card.power_off()
    conn = connect(card)
    assert not card.piv.management_authenticated


def test_card_internal_authentication_with_9b(conn):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    challenge = bytes(range(16))
    response = send(conn, 0x00, 0x87, 0x08, 0x9B, tlv(0x7C, tlv(0x81, challenge) + tlv(0x82)))
    enc = Cipher(algorithms.AES(AES_MANAGEMENT_KEY), modes.ECB()).encryptor()
    assert parse_tlv_dict(parse_single_tlv(response.data, 0x7C))[0x82] \
        == enc.update(challenge) + enc.finalize()


# --- concurrency and persistence ---------------------------------------------------------------


def test_threads_share_one_card(card, built):
    """Calls from several threads are serialised: every answer is whole and right."""
    expected = tlv(0x53, built.card_file.objects["5fc105"]) + b"\x90\x00"
    apdu = bytes.fromhex("00CB3FFF 000005 5C035FC105 0000")
    card.transmit(b"\x00\xa4\x04\x00\x0b" + PIV_AID + b"\x00")
    failures: list[bytes] = []

    def worker() -> None:
        for _ in range(50):
            out = card.transmit(apdu)
            if out != expected:
                failures.append(out)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_autosave_off_and_explicit_save(built):
    card = VirtualCard(built.card_file, autosave=False)
    conn = connect(card)
    assert verify_pin(conn, "0000") == 0x63C2
    assert reload_pin_retries(built) == 3  # not yet written
    assert card.save() == built.path
    assert reload_pin_retries(built) == 2
    memory_only = VirtualCard(build_card().card_file)
    assert memory_only.save() is None


def test_unwritable_card_file_answers_memory_failure(built, monkeypatch):
    conn = connect(VirtualCard(built.card_file))

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CardFile, "save", fail)
    assert verify_pin(conn, "0000") == SW.MEMORY_FAILURE


def test_objects_listing_matches_parse(conn):
    """Every object the card answers is well-formed BER-TLV inside its wrapper."""
    for tag in (OBJ_CCC, OBJ_CHUID, OBJ_KEY_HISTORY, OBJ_DISCOVERY):
        assert parse_tlvs(object_content(conn, tag))
