"""Virtual smartcards for tests, built in milliseconds, and the host side of PIV.

* :func:`build_card` / :func:`make_card_file`: a :class:`CardFile` with keys (RSA 2048 or
  ECC P-256 per key reference), certificates (self-signed, or issued by a :class:`TestCA`),
  CCC, CHUID, discovery, key history and printed information, PIN/PUK and a management key.
  Private keys and PIN hashes are made once per test session and reused (scrypt and RSA key
  generation are what would make card building slow), so two cards built with the same
  arguments share keys: pass ``key_seed`` to get different ones.
* Host-side helpers over any pyscard-like connection (``transmit(list) -> (data, sw1, sw2)``,
  e.g. :class:`~simulators.card.card.InProcessCardConnection` or a pyscard connection through
  pcscd): :func:`send` (follows 61xx with GET RESPONSE), :func:`select_piv`, :func:`get_data`,
  :func:`verify_pin`, :func:`authenticate_management_key` (SP 800-73-4 mutual or external
  authentication), :func:`sign` and :func:`pkcs1_v15_block`.

This does not replace the simulated NHS PKI (``simulators/card/pki.py``); it only gives the
card's own tests what they need without waiting for it.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.x509.oid import NameOID

from simulators.card.apdu import (
    INS_GET_RESPONSE,
    CommandApdu,
    ResponseApdu,
    parse_single_tlv,
    parse_tlv_dict,
    tlv,
)
from simulators.card.cardfile import (
    PIN_MAX_RETRIES,
    PUK_MAX_RETRIES,
    CardFile,
    KeySlot,
    Secret,
    hash_secret,
)
from simulators.card.piv import (
    ALGORITHM_IDS,
    CERTIFICATE_OBJECTS,
    MANAGEMENT_ALGORITHMS,
    OBJ_CCC,
    OBJ_CHUID,
    OBJ_DISCOVERY,
    OBJ_KEY_HISTORY,
    OBJ_PRINTED_INFORMATION,
    PIV_AID,
    build_ccc,
    build_certificate_object,
    build_chuid,
    build_discovery_object,
    build_key_history,
    build_printed_information,
    object_key,
)

TEST_PIN = "1234"
TEST_PUK = "12345678"
AES_MANAGEMENT_KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
TDES_MANAGEMENT_KEY = bytes.fromhex("010203040506070801020304050607080102030405060708")
DEFAULT_KEYS = {"9a": "RSA2048", "9c": "ECCP256", "9d": "ECCP256", "9e": "ECCP256"}
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# --- keys, secrets, certificates ---------------------------------------------------------------


@functools.cache
def private_key_for(algorithm: str, seed: str = "") -> PrivateKey:
    """A private key of ``algorithm`` ("RSA2048" or "ECCP256"), the same for the same seed
    for the whole test session."""
    if algorithm == "RSA2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "ECCP256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key algorithm {algorithm}")


@functools.cache
def _secret_hash(value: str) -> tuple[bytes, bytes]:
    return hash_secret(value)


def secret_for(value: str, max_retries: int, retries_left: int | None = None) -> Secret:
    """A PIN or PUK (its scrypt hash computed once per session and value)."""
    salt, digest = _secret_hash(value)
    left = max_retries if retries_left is None else retries_left
    return Secret(salt, digest, left, max_retries)


def _pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _signing_hash(key: PrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA256()


def _holder_name(name: str, uuid: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Token Agent Test Trust"),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, uuid),
    ])


def _certificate(subject: x509.Name, public_key: Any, issuer: x509.Name, signer: PrivateKey,
                 *, ca: bool, not_before: dt.datetime | None = None,
                 not_after: dt.datetime | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before or now - dt.timedelta(days=1))
               .not_valid_after(not_after or now + dt.timedelta(days=730))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
    return builder.sign(signer, _signing_hash(signer))


@dataclass
class TestCA:
    """A one-level test CA (EC P-256) that issues card certificates."""

    __test__ = False  # not a pytest test class

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    @functools.cache
    def shared(cls, name: str = "Token Agent Test CA") -> "TestCA":
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return cls(key, _certificate(subject, key.public_key(), subject, key, ca=True))

    def issue(self, public_key: Any, name: str, uuid: str, **validity: Any) -> x509.Certificate:
        return _certificate(_holder_name(name, uuid), public_key, self.certificate.subject,
                            self.key, ca=False, **validity)


def self_signed_certificate(key: PrivateKey, name: str, uuid: str) -> x509.Certificate:
    subject = _holder_name(name, uuid)
    return _certificate(subject, key.public_key(), subject, key, ca=False)


# --- the card file -------------------------------------------------------------------------


@dataclass
class BuiltCard:
    """A test card file and what went into it."""

    card_file: CardFile
    private_keys: dict[str, PrivateKey] = field(default_factory=dict)
    certificates: dict[str, x509.Certificate] = field(default_factory=dict)
    management_key: bytes = b""

    @property
    def path(self) -> Path | None:
        return self.card_file.path


def build_card(*, path: str | os.PathLike[str] | None = None,
               holder_name: str = "Dr Alice Smith", holder_uuid: str = "555123456789",
               serial: str = "0001234567", pin: str = TEST_PIN, puk: str = TEST_PUK,
               pin_retries_left: int | None = None, puk_retries_left: int | None = None,
               management_algorithm: str = "AES128", management_key: bytes | None = None,
               keys: dict[str, str] | None = None, ca: TestCA | None = None,
               key_seed: str = "", printed_information: bool = True) -> BuiltCard:
    """A complete test card. ``keys`` maps key references ("9a") to algorithms (default
    :data:`DEFAULT_KEYS`); each gets a certificate, self-signed unless ``ca`` is given. With
    ``path`` the card file is written there (0600)."""
    if management_key is None:
        management_key = AES_MANAGEMENT_KEY if management_algorithm == "AES128" \
            else TDES_MANAGEMENT_KEY
    if management_algorithm not in MANAGEMENT_ALGORITHMS:
        raise ValueError(f"unknown management key algorithm {management_algorithm}")
    card = CardFile(
        serial=serial, holder_name=holder_name, holder_uuid=holder_uuid,
        pin=secret_for(pin, PIN_MAX_RETRIES, pin_retries_left),
        puk=secret_for(puk, PUK_MAX_RETRIES, puk_retries_left),
        management_key_algorithm=management_algorithm, management_key=management_key)
    built = BuiltCard(card, management_key=management_key)
    for ref, algorithm in (DEFAULT_KEYS if keys is None else keys).items():
        if algorithm not in ALGORITHM_IDS:
            raise ValueError(f"unknown key algorithm {algorithm}")
        key = private_key_for(algorithm, f"{key_seed}/{ref}")
        certificate = (ca.issue(key.public_key(), holder_name, holder_uuid) if ca
                       else self_signed_certificate(key, holder_name, holder_uuid))
        card.keys[ref] = KeySlot(algorithm, _pem(key))
        card.objects[object_key(CERTIFICATE_OBJECTS[int(ref, 16)])] = build_certificate_object(
            certificate.public_bytes(serialization.Encoding.DER))
        built.private_keys[ref] = key
        built.certificates[ref] = certificate
    guid = bytes.fromhex(holder_uuid.rjust(32, "0")[-32:]) if holder_uuid.isdigit() \
        else os.urandom(16)
    card.objects[object_key(OBJ_CHUID)] = build_chuid(guid, "20301231")
    card.objects[object_key(OBJ_CCC)] = build_ccc(serial.encode("ascii").rjust(14, b"0")[-14:])
    card.objects[object_key(OBJ_DISCOVERY)] = build_discovery_object()
    card.objects[object_key(OBJ_KEY_HISTORY)] = build_key_history()
    if printed_information:
        card.objects[object_key(OBJ_PRINTED_INFORMATION)] = build_printed_information(
            holder_name, affiliation="Clinician", expiry="2030DEC31", serial=serial,
            issuer="TEST")
    if path is not None:
        card.save(path)
    return built


def make_card_file(**kwargs: Any) -> CardFile:
    """:func:`build_card`'s card file alone."""
    return build_card(**kwargs).card_file


# --- host side -------------------------------------------------------------------------------


class Connection(Protocol):
    def transmit(self, command: list[int]) -> tuple[list[int], int, int]: ...


def transmit_raw(conn: Connection, apdu: bytes) -> ResponseApdu:
    """One APDU exactly as given; no GET RESPONSE."""
    data, sw1, sw2 = conn.transmit(list(apdu))
    return ResponseApdu(bytes(data), sw1 << 8 | sw2)


def send(conn: Connection, cla: int, ins: int, p1: int, p2: int, data: bytes = b"",
         ne: int | None = 256, *, extended: bool = False) -> ResponseApdu:
    """Send a command (chained in 255-byte pieces when longer, as OpenSC does with short
    APDUs unless ``extended``) and collect the whole response through GET RESPONSE."""
    if extended or len(data) <= 255:
        response = transmit_raw(conn, CommandApdu(cla, ins, p1, p2, data, ne,
                                                  extended).to_bytes())
    else:
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)]
        for chunk in chunks[:-1]:
            response = transmit_raw(conn, CommandApdu(cla | 0x10, ins, p1, p2, chunk).to_bytes())
            if response.sw != 0x9000:
                return response
        response = transmit_raw(conn, CommandApdu(cla, ins, p1, p2, chunks[-1], ne).to_bytes())
    collected = response.data
    while response.sw1 == 0x61:
        response = transmit_raw(conn, CommandApdu(0x00, INS_GET_RESPONSE, 0, 0,
                                                  ne=response.sw2 or 256).to_bytes())
        collected += response.data
    return ResponseApdu(collected, response.sw)


def select_piv(conn: Connection, aid: bytes = PIV_AID) -> ResponseApdu:
    return send(conn, 0x00, 0xA4, 0x04, 0x00, aid)


def get_data(conn: Connection, tag: int) -> ResponseApdu:
    raw_tag = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    return send(conn, 0x00, 0xCB, 0x3F, 0xFF, tlv(0x5C, raw_tag))


def object_content(conn: Connection, tag: int) -> bytes:
    """The content of a data object (inside its 53 / 7E), asserting success."""
    response = get_data(conn, tag)
    assert response.sw == 0x9000, f"GET DATA {tag:X}: {response.sw:04X}"
    return parse_single_tlv(response.data, 0x7E if tag == 0x7E else 0x53)


def pin_field(pin: str | bytes) -> bytes:
    raw = pin.encode("latin-1") if isinstance(pin, str) else pin
    return raw.ljust(8, b"\xff")


def verify_pin(conn: Connection, pin: str | None = TEST_PIN) -> int:
    """VERIFY the PIN (None: the retries query); returns the status word."""
    data = b"" if pin is None else pin_field(pin)
    return send(conn, 0x00, 0x20, 0x00, 0x80, data, ne=None).sw


def _management_cipher(algorithm: str, key: bytes) -> Cipher:
    return Cipher(TripleDES(key) if algorithm == "3DES" else AES(key), modes.ECB())


def authenticate_management_key(conn: Connection, algorithm: str, key: bytes,
                                mode: str = "mutual") -> int:
    """Authenticate to the card with management key 9B: ``mutual`` (witness, then the
    decrypted witness with a challenge of the host's, checking the card's answer),
    ``witness`` (the decrypted witness alone) or ``external`` (the card's challenge
    encrypted). Returns the final status word; raises AssertionError if the card's proof in
    mutual authentication is wrong."""
    alg = MANAGEMENT_ALGORITHMS[algorithm]
    cipher = _management_cipher(algorithm, key)
    block = 8 if algorithm == "3DES" else 16

    def general_authenticate(template: bytes) -> ResponseApdu:
        return send(conn, 0x00, 0x87, alg, 0x9B, tlv(0x7C, template))

    if mode == "external":
        response = general_authenticate(tlv(0x81))
        if response.sw != 0x9000:
            return response.sw
        challenge = parse_tlv_dict(parse_single_tlv(response.data, 0x7C))[0x81]
        enc = cipher.encryptor()
        return general_authenticate(tlv(0x82, enc.update(challenge) + enc.finalize())).sw
    response = general_authenticate(tlv(0x80))
    if response.sw != 0x9000:
        return response.sw
    witness = parse_tlv_dict(parse_single_tlv(response.data, 0x7C))[0x80]
    dec = cipher.decryptor()
    decrypted = dec.update(witness) + dec.finalize()
    if mode == "witness":
        return general_authenticate(tlv(0x80, decrypted)).sw
    challenge = os.urandom(block)
    response = general_authenticate(tlv(0x80, decrypted) + tlv(0x81, challenge))
    if response.sw == 0x9000:
        proof = parse_tlv_dict(parse_single_tlv(response.data, 0x7C))[0x82]
        enc = cipher.encryptor()
        assert proof == enc.update(challenge) + enc.finalize(), "the card's proof is wrong"
    return response.sw


# DigestInfo prefixes (RFC 8017 9.2)
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
}


def pkcs1_v15_block(digest: bytes, hash_name: str = "sha256", size: int = 256) -> bytes:
    """EMSA-PKCS1-v1_5: the block a host sends to the card for an RSA signature."""
    t = _DIGEST_INFO[hash_name] + digest
    return b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t


def sign(conn: Connection, key_ref: int, algorithm: str, data: bytes) -> ResponseApdu:
    """GENERAL AUTHENTICATE ``{82 empty, 81 data}`` with key ``key_ref``; on success the
    response data is the signature (taken out of 7C/82)."""
    response = send(conn, 0x00, 0x87, ALGORITHM_IDS[algorithm], key_ref,
                    tlv(0x7C, tlv(0x82) + tlv(0x81, data)))
    if response.sw != 0x9000:
        return response
    return ResponseApdu(parse_tlv_dict(parse_single_tlv(response.data, 0x7C))[0x82],
                        response.sw)
