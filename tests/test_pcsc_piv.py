"""drivers.pcsc.piv: the PIV session, in-process over the virtual card (APDU-level cases,
fast) and through the real pcscd and vpcd with cards issued by the simulated PKI."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from card_helpers import (
    AES_MANAGEMENT_KEY,
    TDES_MANAGEMENT_KEY,
    TEST_PIN,
    TEST_PUK,
    build_card,
)
from drivers.pcsc.errors import (
    CardError,
    CardRemoved,
    InvalidPin,
    ManagementKeyRejected,
    NoCard,
    NotPivCard,
    ObjectNotFound,
    PinBlocked,
    PukBlocked,
    SecurityStatusNotSatisfied,
    WrongPin,
    WrongPuk,
)
from drivers.pcsc.piv import Chuid, PivSession, _parse_tlvs, _tlv
from simulators.card.card import InProcessCardConnection, VirtualCard
from simulators.card.cardfile import NHS_ATR, NHS_T0_ATR, PROTOCOL_ATRS, CardFile
from simulators.card.issuance import card_guid, issue_card
from simulators.card.pki import admin_credentials, init_ca

CHALLENGE = b"a fresh challenge from the agent: " + os.urandom(32)


def verify_signature(cert: x509.Certificate, signature: bytes, message: bytes) -> None:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    else:
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


# -- in-process ----------------------------------------------------------------------------


@pytest.fixture(params=["t1", "t0"])
def built(request):
    """A card answering as T=1 (the default) or as T=0 (61xx + GET RESPONSE): the driver
    gets the same results from both."""
    card = build_card()
    card.card_file.protocol = request.param
    card.card_file.atr = PROTOCOL_ATRS[request.param]
    return card


def session_for(built_card, **options) -> tuple[PivSession, VirtualCard]:
    card = VirtualCard(built_card.card_file, autosave=False)
    connection = InProcessCardConnection(card)
    connection.connect()
    return PivSession(connection, **options), card


def test_select_and_read(built):
    piv, card = session_for(built)
    assert piv.application[:1] == b"\x61"
    assert piv.atr == card.atr
    for slot in ("9a", "9c"):
        der = built.certificates[slot].public_bytes(serialization.Encoding.DER)
        assert piv.certificate(slot) == der
    chuid = piv.chuid()
    assert isinstance(chuid, Chuid) and len(chuid.guid) == 16 and chuid.expiry == "20301231"
    assert chuid.guid == bytes.fromhex("555123456789".rjust(32, "0"))
    with pytest.raises(ObjectNotFound):
        piv.certificate("82")  # a retired slot with no certificate
    with pytest.raises(ValueError):
        piv.certificate("9b")
    assert piv.read_object(0x7E)[:1] == b"\x4f"  # the discovery object (7E, not 53)


def test_pin_retries_verify_and_block(built):
    piv, _ = session_for(built)
    assert piv.pin_retries() == 3 and not piv.pin_verified
    with pytest.raises(WrongPin) as info:
        piv.verify_pin("9999")
    assert info.value.retries_left == 2 and str(info.value) == "Wrong PIN \N{EM DASH} 2 tries left"
    assert info.value.sw == 0x63C2 and info.value.to_json()["retries_left"] == 2
    assert piv.pin_retries() == 2
    piv.verify_pin(TEST_PIN)
    assert piv.pin_verified and piv.pin_retries() == 3  # full again, as the card says 9000
    for left in (2, 1):
        with pytest.raises(WrongPin) as info:
            piv.verify_pin("0000")
        assert info.value.retries_left == left
    assert str(info.value) == "Wrong PIN \N{EM DASH} 1 try left"
    with pytest.raises(PinBlocked) as blocked:
        piv.verify_pin("0000")
    assert str(blocked.value) == "Your card is locked: ask your sponsor to unlock it."
    with pytest.raises(PinBlocked):
        piv.verify_pin(TEST_PIN)  # the right PIN no longer helps
    assert piv.pin_retries() == 0


def test_pin_of_the_wrong_form(built):
    piv, _ = session_for(built)
    with pytest.raises(InvalidPin):
        piv.verify_pin("123456789")  # refused here: over 8 bytes
    with pytest.raises(InvalidPin):
        piv.verify_pin("12")  # refused by the card (6A80), no try lost
    assert piv.pin_retries() == 3


def test_sign_rsa_and_ec(built):
    piv, _ = session_for(built)
    with pytest.raises(SecurityStatusNotSatisfied):
        piv.sign("9a", CHALLENGE, algorithm="RSA2048")
    piv.verify_pin(TEST_PIN)
    signature = piv.sign("9a", CHALLENGE, algorithm="RSA2048")  # 262 bytes of data: chained
    assert len(signature) == 256
    verify_signature(built.certificates["9a"], signature, CHALLENGE)
    piv.verify_pin(TEST_PIN)  # 9C is "PIN always"
    signature = piv.sign("9c", CHALLENGE, algorithm="ECCP256")
    verify_signature(built.certificates["9c"], signature, CHALLENGE)
    with pytest.raises(ValueError):
        piv.sign("9a", CHALLENGE, algorithm="ED25519")


def test_change_pin_and_unblock(built):
    piv, _ = session_for(built)
    with pytest.raises(WrongPin):
        piv.change_pin("0000", "654321")
    piv.change_pin(TEST_PIN, "654321")
    piv.verify_pin("654321")
    for _ in range(3):
        with pytest.raises((WrongPin, PinBlocked)):
            piv.verify_pin("0000")
    assert piv.pin_retries() == 0
    with pytest.raises(PinBlocked):
        piv.change_pin("654321", "111111")
    with pytest.raises(WrongPuk) as info:
        piv.unblock_pin("00000000", "111111")
    assert info.value.retries_left == 4 and "unlock code" in str(info.value)
    piv.unblock_pin(TEST_PUK, "111111")
    assert piv.pin_retries() == 3
    piv.verify_pin("111111")


def test_puk_blocked():
    piv, _ = session_for(build_card(puk_retries_left=1, pin_retries_left=0))
    with pytest.raises(PukBlocked) as info:
        piv.unblock_pin("00000000", "111111")
    assert info.value.code == "puk_blocked"
    with pytest.raises(PukBlocked):
        piv.unblock_pin(TEST_PUK, "111111")


@pytest.mark.parametrize("algorithm, key", [("AES128", AES_MANAGEMENT_KEY),
                                            ("3DES", TDES_MANAGEMENT_KEY)])
def test_management_key(algorithm, key):
    piv, card = session_for(build_card(management_algorithm=algorithm))
    piv.authenticate_management_key(key, algorithm)
    with pytest.raises(ManagementKeyRejected):
        piv.authenticate_management_key(bytes(len(key)), algorithm)


class Recorder:
    """A connection that records the APDUs and can answer from a script."""

    def __init__(self, inner=None, script=None):
        self.inner, self.script, self.sent = inner, list(script or []), []

    def transmit(self, command):
        self.sent.append(bytes(command))
        if self.script:
            data, sw = self.script.pop(0)
            return list(data), sw >> 8, sw & 0xFF
        return self.inner.transmit(command)


def test_chaining_and_get_response_in_one_place(built):
    card = VirtualCard(built.card_file, autosave=False)
    inner = InProcessCardConnection(card)
    inner.connect()
    recorder = Recorder(inner)
    piv = PivSession(recorder)
    piv.certificate("9a")  # over 256 bytes: GET RESPONSE rounds
    assert any(apdu[:2] == b"\x00\xc0" for apdu in recorder.sent)
    piv.verify_pin(TEST_PIN)
    recorder.sent.clear()
    piv.sign("9a", b"x", algorithm="RSA2048")
    assert recorder.sent[0][0] == 0x10 and recorder.sent[1][0] == 0x00  # chained command


def test_scripted_answers():
    cert = b"\x30\x03\x02\x01\x05"
    compressed = gzip.compress(cert)
    obj = _tlv(0x53, _tlv(0x70, compressed) + _tlv(0x71, b"\x01") + _tlv(0xFE))
    recorder = Recorder(script=[(b"\x61\x00", 0x9000), (b"", 0x6C00 | len(obj)),
                                (obj[:4], 0x6100 | (len(obj) - 4)), (obj[4:], 0x9000)])
    piv = PivSession(recorder)
    assert piv.certificate("9a") == cert  # 6Cxx retried with Le, 61xx collected, gunzipped
    assert recorder.sent[2][-1] == len(obj)
    with pytest.raises(NotPivCard):
        PivSession(Recorder(script=[(b"", 0x6A82)]))
    piv = PivSession(Recorder(script=[(b"", 0x9000), (b"", 0x6A88)]))
    with pytest.raises(CardError) as info:
        piv.chuid()
    assert info.value.sw == 0x6A88 and "6A88" in str(info.value)
    assert _parse_tlvs(_tlv(0x5FC102, b"\x01" * 300)) == [(0x5FC102, b"\x01" * 300)]


def test_removed_in_process(built):
    card = VirtualCard(built.card_file, autosave=False)
    connection = InProcessCardConnection(card)
    connection.connect()
    piv = PivSession(connection)

    class Gone(Exception):
        hresult = 0x80100069 - 2**32

    def pulled(command, protocol=None):
        raise Gone("Card was removed")

    connection.transmit = pulled
    with pytest.raises(CardRemoved):
        piv.pin_retries()


# -- through pcscd ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_and_cards(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    directory = tmp_path_factory.mktemp("pcsc-piv")
    init_ca(directory / "ca")
    cards = {}
    for name, uuid, algorithm, protocol in (("alice", "555123456789", "RSA2048", "t1"),
                                            ("erin", "555111222333", "ECCP256", "t1"),
                                            ("tara", "555444555666", "RSA2048", "t0")):
        cards[name] = directory / f"{name}.card"
        issue_card(directory / "ca", name=f"Dr {name.title()} Smith", uuid=uuid, pin="123456",
                   out=cards[name], algorithm=algorithm, protocol=protocol)  # fmt: skip
    return directory / "ca", cards


@pytest.fixture
def empty_reader(pcscd):
    from pcsc_helpers import wait_for_card

    wait_for_card(pcscd.context, pcscd.reader(0), present=False)


def insert(vpcd_insert, pcscd, source: Path, tmp_path: Path) -> tuple[Path, VirtualCard]:
    from pcsc_helpers import wait_for_card

    path = tmp_path / source.name
    shutil.copyfile(source, path)
    os.chmod(path, 0o600)
    card = VirtualCard.load(path)
    bridge = vpcd_insert(card)
    wait_for_card(pcscd.context, pcscd.reader(0))
    return path, bridge


def card_cert(path: Path, slot: str = "9a") -> x509.Certificate:
    from simulators.card.issuance import card_certificate

    return card_certificate(CardFile.load(path), slot)


@pytest.mark.parametrize("holder,atr", [("alice", NHS_ATR), ("tara", NHS_T0_ATR)])
def test_pcsc_session(pcscd, empty_reader, vpcd_insert, ca_and_cards, tmp_path, holder, atr):
    """The same session on a T=1 card and on a T=0 one (61xx + GET RESPONSE)."""
    ca, cards = ca_and_cards
    path, _ = insert(vpcd_insert, pcscd, cards[holder], tmp_path)
    cert = card_cert(path)
    with PivSession.open(pcscd.reader(0)) as piv:
        assert piv.atr == CardFile.load(path).atr == atr
        assert piv.certificate() == cert.public_bytes(serialization.Encoding.DER)
        assert x509.load_der_x509_certificate(piv.certificate("9c")) == card_cert(path, "9c")
        chuid = piv.chuid()
        assert chuid.guid.hex() == card_guid(CardFile.load(path))
        assert chuid.fascn_fields["person"] == CardFile.load(path).serial[-10:].zfill(10)
        assert piv.pin_retries() == 3
        with pytest.raises(WrongPin) as info:
            piv.verify_pin("000000")
        assert info.value.retries_left == 2
        piv.verify_pin("123456")
        signature = piv.sign("9a", CHALLENGE, algorithm="RSA2048")
        verify_signature(cert, signature, CHALLENGE)
        piv.change_pin("123456", "24681357")
        piv.verify_pin("24681357")


def test_pcsc_ec_card(pcscd, empty_reader, vpcd_insert, ca_and_cards, tmp_path):
    _, cards = ca_and_cards
    path, _ = insert(vpcd_insert, pcscd, cards["erin"], tmp_path)
    with PivSession.open(pcscd.reader(0)) as piv:
        piv.verify_pin("123456")
        signature = piv.sign("9a", CHALLENGE, algorithm="ECCP256")
        verify_signature(card_cert(path), signature, CHALLENGE)


def test_pcsc_block_and_sponsor_unlock(pcscd, empty_reader, vpcd_insert, ca_and_cards,
                                       tmp_path):  # fmt: skip
    ca, cards = ca_and_cards
    insert(vpcd_insert, pcscd, cards["alice"], tmp_path)
    puk, algorithm, management_key = admin_credentials(ca, "555123456789")
    with PivSession.open(pcscd.reader(0)) as piv:
        for left in (2, 1):
            with pytest.raises(WrongPin) as info:
                piv.verify_pin("000000")
            assert info.value.retries_left == left
        with pytest.raises(PinBlocked):
            piv.verify_pin("000000")
        assert piv.pin_retries() == 0
        piv.authenticate_management_key(management_key, algorithm)
        with pytest.raises(WrongPuk):
            piv.unblock_pin("00000000", "13572468")
        piv.unblock_pin(puk, "13572468")
        assert piv.pin_retries() == 3
        piv.verify_pin("13572468")


def test_pcsc_card_removed_mid_session(pcscd, empty_reader, vpcd_insert, ca_and_cards,
                                       tmp_path):  # fmt: skip
    _, cards = ca_and_cards
    _, bridge = insert(vpcd_insert, pcscd, cards["alice"], tmp_path)
    piv = PivSession.open(pcscd.reader(0))
    try:
        piv.certificate()
        bridge.remove()
        with pytest.raises(CardRemoved) as info:
            piv.certificate()
        assert str(info.value) == "The card was removed before the operation finished."
    finally:
        piv.close()
    piv.close()  # idempotent


def test_pcsc_open_empty_reader(pcscd, empty_reader):
    with pytest.raises(NoCard) as info:
        PivSession.open(pcscd.reader(0))
    assert str(info.value) == "Insert your smartcard."
