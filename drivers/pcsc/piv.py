"""The PIV card application (NIST SP 800-73-4) over PC/SC, in the style of yubikit's sessions.

    from drivers.pcsc.piv import PivSession

    with PivSession.open("Virtual PCD 00 00") as piv:     # connect + SELECT the PIV AID
        der = piv.certificate("9a")                        # the authentication certificate
        print(piv.chuid().guid.hex(), piv.pin_retries())
        piv.verify_pin("1234")                             # WrongPin(2) / PinBlocked
        signature = piv.sign("9a", challenge, algorithm="RSA2048")

``PivSession(connection)`` takes any object with pyscard's ``transmit(list) -> (data, sw1,
sw2)`` (a pyscard ``CardConnection``, or the virtual card's in-process connection) and
selects the application. APDUs are framed in one place, :meth:`PivSession._transmit`:
command chaining (CLA 10) for data over 255 bytes, and ``61xx`` answered with GET RESPONSE
(``6Cxx`` with the command again with the right Le) until the whole response is in.

Signatures: for ``RSA2048`` the host hashes the message with SHA-256 and pads it
(EMSA-PKCS1-v1_5 with the SHA-256 DigestInfo, 256 bytes); the card does the raw RSA: the
result is a PKCS#1 v1.5 signature. For ``ECCP256`` the host hashes with SHA-256 and the card
answers a DER ECDSA signature. Both verify with ``cryptography`` against the certificate's
public key.

Every failure is a :class:`~drivers.pcsc.errors.PcscError` with a message for people: a
card pulled out during a call is :class:`~drivers.pcsc.errors.CardRemoved`. A session is not
thread-safe beyond one APDU exchange at a time (a lock serialises them). This is a driver: it
neither asks for PINs nor decides what a wrong one means.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import (
    CardError,
    InvalidPin,
    ManagementKeyRejected,
    NotPivCard,
    ObjectNotFound,
    PcscError,
    PinBlocked,
    PukBlocked,
    SecurityStatusNotSatisfied,
    WrongPin,
    WrongPuk,
    translate,
)

__all__ = [
    "Chuid",
    "PIV_AID",
    "PivSession",
    "SLOTS",
]

PIV_AID = bytes.fromhex("A000000308000010000100")

INS_VERIFY = 0x20
INS_CHANGE_REFERENCE_DATA = 0x24
INS_RESET_RETRY_COUNTER = 0x2C
INS_GENERAL_AUTHENTICATE = 0x87
INS_GET_RESPONSE = 0xC0
INS_GET_DATA = 0xCB
INS_SELECT = 0xA4

KEY_PIN = 0x80
KEY_PUK = 0x81
KEY_MANAGEMENT = 0x9B

#: key slots and their certificate objects (SP 800-73-4 Part 1 Table 3/4)
SLOTS = {"9a": 0x5FC105, "9c": 0x5FC10A, "9d": 0x5FC10B, "9e": 0x5FC101,
         **{f"{0x82 + i:02x}": 0x5FC10D + i for i in range(20)}}  # retired keys 82-95
OBJ_CHUID = 0x5FC102
OBJ_DISCOVERY = 0x7E
#: algorithm identifiers (SP 800-78-4)
SIGNING_ALGORITHMS = {"RSA2048": 0x07, "ECCP256": 0x11}
MANAGEMENT_ALGORITHMS = {"3DES": 0x03, "AES128": 0x08}
#: PIV's PIN retry counter when the card does not say (after a successful VERIFY the card
#: answers 9000, not the count); NHS cards lock after 3 wrong tries
DEFAULT_PIN_RETRIES = 3

SW_OK = 0x9000
SW_SECURITY_NOT_SATISFIED = 0x6982
SW_AUTH_BLOCKED = 0x6983
SW_WRONG_DATA = 0x6A80
SW_FILE_NOT_FOUND = 0x6A82
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00

#: data per command APDU before command chaining (short APDUs)
CHUNK = 255
#: GET RESPONSE rounds at most (a card that keeps answering 61xx is broken, not slow)
MAX_RESPONSE_ROUNDS = 64


class Connection(Protocol):
    def transmit(self, command: list[int]) -> tuple[list[int], int, int]: ...


# -- BER-TLV (what PIV uses: tags of 1-3 bytes, definite lengths) -----------------------------


def _parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    items = []
    i = 0
    while i < len(data):
        if data[i] in (0x00, 0xFF):  # padding between objects
            i += 1
            continue
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F:
            while True:
                if i >= len(data):
                    raise ValueError("truncated TLV tag")
                tag = tag << 8 | data[i]
                i += 1
                if not data[i - 1] & 0x80:
                    break
        if i >= len(data):
            raise ValueError("truncated TLV length")
        length = data[i]
        i += 1
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 3 or i + n > len(data):
                raise ValueError("bad TLV length")
            length = int.from_bytes(data[i:i + n], "big")
            i += n
        if i + length > len(data):
            raise ValueError("truncated TLV value")
        items.append((tag, bytes(data[i:i + length])))
        i += length
    return items


def _tlv_dict(data: bytes) -> dict[int, bytes]:
    return {tag: value for tag, value in _parse_tlvs(data)}


def _tlv(tag: int, value: bytes = b"") -> bytes:
    raw_tag = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n <= 0xFF:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return raw_tag + length + value


def _pin_field(pin: str | bytes, what: str = "PIN") -> bytes:
    raw = pin.encode("utf-8") if isinstance(pin, str) else bytes(pin)
    if not 1 <= len(raw) <= 8:
        raise InvalidPin(f"The {what} must be 4 to 8 digits." if what == "PIN"
                         else f"The {what} must be 1 to 8 characters.")  # fmt: skip
    return raw.ljust(8, b"\xff")


# DigestInfo for SHA-256 (RFC 8017 9.2, note 1)
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def pkcs1_v15_sha256_block(message: bytes, size: int = 256) -> bytes:
    """EMSA-PKCS1-v1_5 encoding of SHA-256(``message``) for an RSA key of ``size`` bytes."""
    t = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    return b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t


def _slot_ref(slot: str | int) -> int:
    ref = int(slot, 16) if isinstance(slot, str) else int(slot)
    if not 0 <= ref <= 0xFF:
        raise ValueError(f"invalid PIV key slot {slot!r}")
    return ref


def _decode_fascn(fascn: bytes) -> dict[str, str]:
    """The digit fields of a 25-byte FASC-N (5-bit BCD with odd parity, SS/FS/ES separators);
    {} when it is not one."""
    if len(fascn) != 25:
        return {}
    bits = bin(int.from_bytes(fascn, "big"))[2:].zfill(200)
    chars = []
    for i in range(0, 200, 5):
        b = bits[i:i + 5]
        chars.append(sum(int(b[j]) << j for j in range(4)))
    # 0xB = SS, 0xD = FS, 0xF = ES; the LRC is the last character
    if not chars or chars[0] != 0xB:
        return {}
    fields, current = [], ""
    for c in chars[1:]:
        if c in (0xD, 0xF):
            fields.append(current)
            current = ""
            if c == 0xF:
                break
        elif c <= 9:
            current += str(c)
        else:
            return {}
    if len(fields) != 6 or len(fields[5]) != 16:
        return {}
    agency, system, credential, cs, ici, rest = fields
    return {"agency": agency, "system": system, "credential": credential, "cs": cs,
            "ici": ici, "person": rest[:10], "oc": rest[10], "oi": rest[11:15],
            "poa": rest[15]}


@dataclass(frozen=True)
class Chuid:
    """The Card Holder Unique Identifier: ``fascn`` (25 bytes), ``guid`` (16 bytes: the
    card's UUID), ``expiry`` ("YYYYMMDD")."""

    fascn: bytes
    guid: bytes
    expiry: str

    @property
    def fascn_fields(self) -> dict[str, str]:
        """The FASC-N's digit fields (agency, system, credential, cs, ici, person, oc, oi,
        poa); {} when it does not decode. On cards issued by the simulated PKI, ``person``
        is the card serial (zero-padded to 10 digits)."""
        return _decode_fascn(self.fascn)


class PivSession:
    """A PIV session over ``connection`` (see the module docstring); SELECTs the PIV
    application (:class:`NotPivCard` if the card refuses)."""

    #: the card path, for the card-session interface (``drivers.cardaccess``)
    driver = "piv"

    def __init__(self, connection: Connection, *, reader: str | None = None,
                 owns_connection: bool = False) -> None:  # fmt: skip
        self.connection = connection
        self.reader = reader
        self._owns = owns_connection
        self._lock = threading.RLock()
        self._max_pin_retries_seen = 0
        self._closed = False
        data, sw = self._transmit(0x00, INS_SELECT, 0x04, 0x00, PIV_AID, le=0)
        if sw != SW_OK:
            raise NotPivCard(sw=sw)
        self.application = data

    @classmethod
    def open(cls, reader: str) -> "PivSession":
        """Connect to the card in ``reader`` through pcscd (shared, T=0 or T=1) and select
        PIV. :class:`NoReader`, :class:`NoCard`, :class:`PcscUnavailable`,
        :class:`NotPivCard`."""
        from smartcard.pcsc.PCSCReader import PCSCReader

        connection = None
        try:
            from smartcard.scard import SCARD_RESET_CARD

            connection = PCSCReader(reader).createConnection()
            # closed with a reset (it clears the PIN's verified state), not pyscard's default
            # unpower: an unpowered card stays so for every later connect while another
            # program (OpenSC's PKCS#11 module) holds a handle on it (SCARD_W_UNPOWERED_CARD)
            connection.connect(disposition=SCARD_RESET_CARD)
        except Exception as e:  # pyscard's exceptions, translated
            if connection is not None:
                _disconnect(connection)  # its own PC/SC context too
            raise translate(e) from e
        try:
            return cls(connection, reader=reader, owns_connection=True)
        except BaseException:
            _disconnect(connection)
            raise

    # -- APDUs, in one place -------------------------------------------------------------------

    def _raw(self, apdu: bytes) -> tuple[bytes, int]:
        if self._closed:
            raise PcscError("The smartcard session is closed.")
        try:
            data, sw1, sw2 = self.connection.transmit(list(apdu))
        except Exception as e:
            raise translate(e) from e
        return bytes(data), (sw1 << 8) | sw2

    def _transmit(self, cla: int, ins: int, p1: int, p2: int, data: bytes = b"",
                  le: int | None = None) -> tuple[bytes, int]:  # fmt: skip
        """Send one command (chained when its data is over 255 bytes) and collect the whole
        response (61xx -> GET RESPONSE, 6Cxx -> again with that Le). ``le``: None for no Le
        field, 0 for "up to 256". Returns (data, status word)."""
        with self._lock:
            chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
            for chunk in chunks[:-1]:
                _, sw = self._raw(_apdu(cla | 0x10, ins, p1, p2, chunk, None))
                if sw != SW_OK:
                    return b"", sw
            last = chunks[-1]
            response, sw = self._raw(_apdu(cla, ins, p1, p2, last, le))
            if sw >> 8 == 0x6C:  # wrong Le: the card says how many bytes it has
                response, sw = self._raw(_apdu(cla, ins, p1, p2, last, sw & 0xFF))
            collected = bytearray(response)
            rounds = 0
            while sw >> 8 == 0x61:
                rounds += 1
                if rounds > MAX_RESPONSE_ROUNDS:
                    raise CardError(sw, "The card's answer did not end. Remove the card, "
                                        "insert it again, and retry.")  # fmt: skip
                response, sw = self._raw(_apdu(0x00, INS_GET_RESPONSE, 0, 0, b"", sw & 0xFF))
                collected += response
            return bytes(collected), sw

    # -- reading -------------------------------------------------------------------------------

    @property
    def atr(self) -> bytes | None:
        """The card's ATR (None when the connection cannot say)."""
        get_atr = getattr(self.connection, "getATR", None)
        if get_atr is None:
            return None
        try:
            return bytes(get_atr())
        except Exception as e:
            raise translate(e) from e

    def read_object(self, tag: int) -> bytes:
        """A data object's content (inside its 53, or 7E for the discovery object).
        :class:`ObjectNotFound` when the card has none; :class:`SecurityStatusNotSatisfied`
        for a PIN-protected object before the PIN."""
        raw_tag = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
        data, sw = self._transmit(0x00, INS_GET_DATA, 0x3F, 0xFF, _tlv(0x5C, raw_tag), le=0)
        _check(sw)
        outer = OBJ_DISCOVERY if tag == OBJ_DISCOVERY else 0x53
        try:
            items = _parse_tlvs(data)
        except ValueError:
            items = []
        if not items or items[0][0] != outer:
            raise CardError(sw, "The card's answer is malformed (not a PIV data object).")
        return items[0][1]

    def certificate(self, slot: str | int = "9a") -> bytes:
        """The DER certificate of key ``slot`` ("9a" authentication, "9c" signature, "9d",
        "9e", retired "82".."95"); decompressed when the card stores it gzipped."""
        name = f"{_slot_ref(slot):02x}"
        if name not in SLOTS:
            raise ValueError(f"no certificate object for slot {slot!r}")
        content = self.read_object(SLOTS[name])
        try:
            fields = _tlv_dict(content)
        except ValueError:
            fields = {}
        cert = fields.get(0x70)
        if not cert:
            raise ObjectNotFound("The card holds no certificate in that slot.")
        if fields.get(0x71, b"\x00")[:1] == b"\x01":  # CertInfo: compressed (gzip)
            try:
                cert = gzip.decompress(cert)
            except (OSError, EOFError) as e:
                raise CardError(SW_OK, "The card's certificate is corrupt.") from e
        return cert

    def chuid(self) -> Chuid:
        """The CHUID: FASC-N, GUID (the card's UUID) and expiry date."""
        try:
            fields = _tlv_dict(self.read_object(OBJ_CHUID))
        except ValueError:
            fields = {}
        guid = fields.get(0x34)
        if guid is None:
            raise CardError(SW_OK, "The card's identifier (CHUID) is malformed.")
        return Chuid(fields.get(0x30, b""), guid,
                     fields.get(0x35, b"").decode("ascii", "replace"))

    # -- PIN -----------------------------------------------------------------------------------

    @property
    def pin_verified(self) -> bool:
        """Whether the card considers the PIN verified now (an empty VERIFY answers 9000)."""
        _, sw = self._transmit(0x00, INS_VERIFY, 0x00, KEY_PIN)
        return sw == SW_OK

    def pin_retries(self) -> int:
        """PIN tries left (0: blocked). Once the PIN is verified the card answers 9000, not
        the count: its counter is then full, reported as the most this session saw, or
        :data:`DEFAULT_PIN_RETRIES`."""
        _, sw = self._transmit(0x00, INS_VERIFY, 0x00, KEY_PIN)
        if sw == SW_OK:
            return self._max_pin_retries_seen or DEFAULT_PIN_RETRIES
        if sw == SW_AUTH_BLOCKED:
            return 0
        if sw >> 4 == 0x63C:
            retries = sw & 0x0F
            self._max_pin_retries_seen = max(self._max_pin_retries_seen, retries)
            return retries
        raise CardError(sw)

    def verify_pin(self, pin: str | bytes) -> None:
        """VERIFY the PIN (padded with FF to 8 bytes). :class:`WrongPin` with the tries left,
        :class:`PinBlocked`, :class:`InvalidPin` (refused for its form, no try lost)."""
        field = _pin_field(pin)
        _, sw = self._transmit(0x00, INS_VERIFY, 0x00, KEY_PIN, field)
        _check_secret(sw, WrongPin, PinBlocked)

    def change_pin(self, old_pin: str | bytes, new_pin: str | bytes) -> None:
        """CHANGE REFERENCE DATA for the PIN: :class:`WrongPin` / :class:`PinBlocked` for the
        old one, :class:`InvalidPin` for a new one the card does not take."""
        data = _pin_field(old_pin) + _pin_field(new_pin)
        _, sw = self._transmit(0x00, INS_CHANGE_REFERENCE_DATA, 0x00, KEY_PIN, data)
        _check_secret(sw, WrongPin, PinBlocked)

    def unblock_pin(self, puk: str | bytes, new_pin: str | bytes) -> None:
        """RESET RETRY COUNTER: a new PIN (its tries full again) with the PUK.
        :class:`WrongPuk` with the PUK's tries left, :class:`PukBlocked`."""
        data = _pin_field(puk, "PUK") + _pin_field(new_pin)
        _, sw = self._transmit(0x00, INS_RESET_RETRY_COUNTER, 0x00, KEY_PIN, data)
        _check_secret(sw, WrongPuk, PukBlocked)

    # -- keys ----------------------------------------------------------------------------------

    def sign(self, slot: str | int, message: bytes, *, algorithm: str) -> bytes:
        """Sign ``message`` with the key in ``slot``: ``RSA2048`` gives a PKCS#1 v1.5
        SHA-256 signature, ``ECCP256`` a DER ECDSA (SHA-256) signature. The PIN must be
        verified first for 9A/9D (and just before, for 9C):
        :class:`SecurityStatusNotSatisfied` otherwise."""
        if algorithm == "RSA2048":
            payload = pkcs1_v15_sha256_block(message)
        elif algorithm == "ECCP256":
            payload = hashlib.sha256(message).digest()
        else:
            raise ValueError(f"unknown signing algorithm {algorithm!r} (RSA2048 or ECCP256)")
        template = _tlv(0x7C, _tlv(0x82) + _tlv(0x81, payload))
        data, sw = self._transmit(0x00, INS_GENERAL_AUTHENTICATE, SIGNING_ALGORITHMS[algorithm],
                                  _slot_ref(slot), template, le=0)  # fmt: skip
        _check(sw)
        return _dynamic_field(data, 0x82, sw)

    def authenticate_management_key(self, key: bytes, algorithm: str = "AES128") -> None:
        """Mutual authentication with the management key (9B), as SP 800-73-4 describes
        and the card implements: the card's encrypted witness, decrypted by the host and sent
        back with a challenge of the host's, which the card must return encrypted.
        :class:`ManagementKeyRejected` for a wrong key (or a wrong proof from the card)."""
        if algorithm not in MANAGEMENT_ALGORITHMS:
            raise ValueError(f"unknown management key algorithm {algorithm!r} (AES128 or 3DES)")
        cipher = _management_cipher(algorithm, key)
        block = 8 if algorithm == "3DES" else 16
        witness = self.management_witness(algorithm)
        decryptor = cipher.decryptor()
        decrypted = decryptor.update(witness) + decryptor.finalize()
        challenge = os.urandom(block)
        proof = self.management_proof(algorithm, decrypted, challenge)
        encryptor = cipher.encryptor()
        if not hmac.compare_digest(proof, encryptor.update(challenge) + encryptor.finalize()):
            raise ManagementKeyRejected("The card's answer to the administrative key is wrong: "
                                        "it may not be a genuine card.")  # fmt: skip

    # The two halves of the mutual authentication, for a host whose key is elsewhere (the
    # organisation's server, which holds the key and relays these two steps to the card).

    def management_witness(self, algorithm: str = "AES128") -> bytes:
        """Step 1: the card's encrypted witness."""
        if algorithm not in MANAGEMENT_ALGORITHMS:
            raise ValueError(f"unknown management key algorithm {algorithm!r} (AES128 or 3DES)")
        alg = MANAGEMENT_ALGORITHMS[algorithm]
        data, sw = self._transmit(0x00, INS_GENERAL_AUTHENTICATE, alg, KEY_MANAGEMENT,
                                  _tlv(0x7C, _tlv(0x80)), le=0)  # fmt: skip
        if sw == SW_SECURITY_NOT_SATISFIED or sw == SW_AUTH_BLOCKED:
            raise ManagementKeyRejected(sw=sw)
        _check(sw)
        return _dynamic_field(data, 0x80, sw)

    def management_proof(self, algorithm: str, decrypted: bytes, challenge: bytes) -> bytes:
        """Step 2: the decrypted witness and the host's challenge; the card's encrypted
        challenge (the host compares it)."""
        if algorithm not in MANAGEMENT_ALGORITHMS:
            raise ValueError(f"unknown management key algorithm {algorithm!r} (AES128 or 3DES)")
        alg = MANAGEMENT_ALGORITHMS[algorithm]
        data, sw = self._transmit(0x00, INS_GENERAL_AUTHENTICATE, alg, KEY_MANAGEMENT,
                                  _tlv(0x7C, _tlv(0x80, decrypted) + _tlv(0x81, challenge)),
                                  le=0)  # fmt: skip
        if sw in (SW_SECURITY_NOT_SATISFIED, SW_WRONG_DATA, SW_AUTH_BLOCKED):
            raise ManagementKeyRejected(sw=sw)
        _check(sw)
        return _dynamic_field(data, 0x82, sw)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """End the session (disconnect when :meth:`open` made the connection)."""
        if self._closed:
            return
        self._closed = True
        if self._owns:
            _disconnect(self.connection)

    def __enter__(self) -> "PivSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_card(reader: str | None = None) -> PivSession:
    """A PivSession on ``reader``, or on the first reader holding a PIV card: ``NoReader``
    when there is no reader, else the last reader's ``NoCard`` / ``NotPivCard``."""
    from .errors import NoCard, NoReader, NotPivCard
    from .readers import list_readers

    if reader:
        return PivSession.open(reader)
    readers = list_readers()
    if not readers:
        raise NoReader()
    last: Exception = NoCard()
    for name in readers:
        try:
            return PivSession.open(name)
        except (NoCard, NotPivCard) as e:
            last = e
    raise last


def _apdu(cla: int, ins: int, p1: int, p2: int, data: bytes, le: int | None) -> bytes:
    apdu = bytes([cla, ins, p1, p2])
    if data:
        apdu += bytes([len(data)]) + data
    if le is not None:
        apdu += bytes([le & 0xFF])
    return apdu


def _check(sw: int) -> None:
    if sw == SW_OK:
        return
    if sw == SW_FILE_NOT_FOUND:
        raise ObjectNotFound(sw=sw)
    if sw == SW_SECURITY_NOT_SATISFIED:
        raise SecurityStatusNotSatisfied(sw=sw)
    if sw == SW_AUTH_BLOCKED:
        raise PinBlocked(sw=sw)
    if sw in (SW_INS_NOT_SUPPORTED, SW_CLA_NOT_SUPPORTED):
        raise NotPivCard(sw=sw)
    raise CardError(sw)


def _check_secret(sw: int, wrong: type, blocked: type) -> None:
    if sw == SW_OK:
        return
    if sw == SW_AUTH_BLOCKED or sw == 0x63C0:
        raise blocked(sw=sw)
    if sw >> 4 == 0x63C:
        raise wrong(sw & 0x0F, sw=sw)
    if sw == SW_WRONG_DATA:
        raise InvalidPin(sw=sw)
    _check(sw)


def _dynamic_field(data: bytes, tag: int, sw: int) -> bytes:
    try:
        outer = _tlv_dict(data)
        value = _tlv_dict(outer[0x7C])[tag]
    except (ValueError, KeyError):
        raise CardError(sw, "The card's answer is malformed.") from None
    return value


def _management_cipher(algorithm: str, key: bytes):
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    from cryptography.hazmat.primitives.ciphers.algorithms import AES

    if algorithm == "3DES":
        try:
            from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
        except ImportError:  # pragma: no cover - older cryptography
            from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES
        if len(key) != 24:
            raise ValueError("a 3DES management key is 24 bytes")
        return Cipher(TripleDES(key), modes.ECB())
    if len(key) != 16:
        raise ValueError("an AES-128 management key is 16 bytes")
    return Cipher(AES(key), modes.ECB())


def _disconnect(connection: Any) -> None:
    for name in ("disconnect", "release"):
        method = getattr(connection, name, None)
        if method is not None:
            try:
                method()
            except Exception:  # the card is gone already
                pass

