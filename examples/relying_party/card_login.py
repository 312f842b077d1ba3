"""Smartcard login, as a workstation's login code might do it with an NHS-style PIV card: read
the authentication certificate, check it chains to the organisation's CA, verify the PIN, and
have the card sign a fresh challenge with its authentication key (PIV slot 9A).

``connection`` is anything with pyscard's ``transmit(apdu) -> (data, sw1, sw2)``: a pyscard
connection to a reader (through pcscd), or token-agent's in-process
``InProcessCardConnection``. Nothing here knows of token-agent.
"""

from __future__ import annotations

import datetime as dt
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

PIV_AID = bytes.fromhex("A000000308000010000100")
SLOT_AUTHENTICATION = 0x9A
CERT_TAG_AUTHENTICATION = bytes.fromhex("5FC105")
ALG_RSA_2048, ALG_ECC_P256 = 0x07, 0x11
#: DigestInfo prefix of a SHA-256 hash (PKCS #1 v1.5)
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


class CardLoginError(Exception):
    """The card, its certificate or its PIN is refused."""


def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return bytes([tag]) + length + value


def _read_tlv(data: bytes, tag: int) -> bytes:
    """The value of the first TLV in ``data`` if its (one-byte) tag is ``tag``."""
    if not data or data[0] != tag:
        raise CardLoginError(f"expected tag {tag:02X}, got {data[:1].hex()}")
    n, at = data[1], 2
    if n & 0x80:
        size = n & 0x7F
        n, at = int.from_bytes(data[2:2 + size], "big"), 2 + size
    return data[at:at + n]


def transmit(connection, cla: int, ins: int, p1: int, p2: int,
             data: bytes = b"") -> tuple[bytes, int]:
    """One command (chained in 255-byte pieces when longer), its whole response (61xx
    answered with GET RESPONSE) and status word."""
    while len(data) > 255:
        chunk, data = data[:255], data[255:]
        _, sw1, sw2 = connection.transmit(list(bytes([cla | 0x10, ins, p1, p2, 255]) + chunk))
        if (sw1, sw2) != (0x90, 0x00):
            return b"", sw1 << 8 | sw2
    apdu = bytes([cla, ins, p1, p2]) + (bytes([len(data)]) + data if data else b"") + b"\x00"
    response, sw1, sw2 = connection.transmit(list(apdu))
    out = bytes(response)
    while sw1 == 0x61:
        response, sw1, sw2 = connection.transmit([0x00, 0xC0, 0x00, 0x00, sw2])
        out += bytes(response)
    return out, sw1 << 8 | sw2


def _check(sw: int, what: str) -> None:
    if sw != 0x9000:
        raise CardLoginError(f"{what}: status {sw:04X}")


def read_certificate(connection) -> x509.Certificate:
    """SELECT the PIV application, then GET DATA of the authentication certificate."""
    _, sw = transmit(connection, 0x00, 0xA4, 0x04, 0x00, PIV_AID)
    _check(sw, "SELECT PIV")
    data, sw = transmit(connection, 0x00, 0xCB, 0x3F, 0xFF, _tlv(0x5C, CERT_TAG_AUTHENTICATION))
    _check(sw, "GET DATA (authentication certificate)")
    return x509.load_der_x509_certificate(_read_tlv(_read_tlv(data, 0x53), 0x70))


def check_certificate(cert: x509.Certificate, issuing_ca_pem: bytes, root_pem: bytes) -> str:
    """The holder's UUID (the subject's serialNumber) if ``cert`` is in date and issued by
    the issuing CA, which the root issued; CardLoginError otherwise."""
    issuing = x509.load_pem_x509_certificate(issuing_ca_pem)
    root = x509.load_pem_x509_certificate(root_pem)
    now = dt.datetime.now(dt.timezone.utc)
    for what, c in (("card", cert), ("issuing CA", issuing)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise CardLoginError(f"the {what} certificate is not valid now")
    try:
        cert.verify_directly_issued_by(issuing)
        issuing.verify_directly_issued_by(root)
    except Exception as e:
        raise CardLoginError(f"the certificate does not chain to the organisation's CA: {e}") from e
    uuids = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if not uuids:
        raise CardLoginError("the certificate names no UUID")
    return str(uuids[0].value)


def prove_possession(connection, cert: x509.Certificate, pin: str) -> None:
    """VERIFY the PIN, then have key 9A sign a random challenge; the signature must verify
    with the certificate's public key."""
    _, sw = transmit(connection, 0x00, 0x20, 0x00, 0x80, pin.encode().ljust(8, b"\xff"))
    if sw >> 4 == 0x63C or sw == 0x6983:
        raise CardLoginError(f"wrong PIN ({sw & 0xF if sw != 0x6983 else 0} tries left)")
    _check(sw, "VERIFY")
    challenge = os.urandom(32)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(challenge)
    hashed = digest.finalize()
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        block = SHA256_DIGEST_INFO + hashed
        alg, block = ALG_RSA_2048, b"\x00\x01" + b"\xff" * (256 - 3 - len(block)) + b"\x00" + block
    elif isinstance(key, ec.EllipticCurvePublicKey):
        alg, block = ALG_ECC_P256, hashed
    else:
        raise CardLoginError(f"unsupported key {type(key).__name__}")
    template = _tlv(0x7C, _tlv(0x82, b"") + _tlv(0x81, block))
    data, sw = transmit(connection, 0x00, 0x87, alg, SLOT_AUTHENTICATION, template)
    _check(sw, "GENERAL AUTHENTICATE")
    signature = _read_tlv(_read_tlv(data, 0x7C), 0x82)
    try:
        if alg == ALG_RSA_2048:
            key.verify(signature, challenge, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, challenge, ec.ECDSA(hashes.SHA256()))
    except Exception as e:
        raise CardLoginError("the card's signature does not verify") from e


def card_login(connection, pin: str, issuing_ca_pem: bytes, root_pem: bytes) -> str:
    """The UUID of the card's holder, once the certificate and the PIN check out."""
    cert = read_certificate(connection)
    uuid = check_certificate(cert, issuing_ca_pem, root_pem)
    prove_possession(connection, cert, pin)
    return uuid
