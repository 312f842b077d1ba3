"""The PIV card application (NIST SP 800-73-4 Part 2) of the virtual smartcard.

What a host sends and what it gets back (as OpenSC's ``card-piv.c`` and yubikit's ``piv.py``
expect it):

* SELECT ``00 A4 04 00`` with the PIV AID ``A0 00 00 03 08 00 00 10 00 01 00`` or any prefix of
  it of at least 5 bytes (OpenSC selects with 9 bytes, yubikit with 5): the application
  property template ``61 {4F PIX, 79 {4F NIST RID}, 50 label}``; no ``AC`` cipher-suite entry,
  so hosts do not attempt SP 800-73-4 secure messaging. Selecting resets the security status.
* GET DATA ``00 CB 3F FF {5C tag}``: ``53 {content}`` (the discovery object answers
  ``7E {content}``); 6A82 when the card file has no such object; 6982 for the PIN-protected
  objects (printed information, biometrics, pairing code) until the PIN is verified. A card
  file without a discovery object gets a standard one (PIV PIN only).
* VERIFY ``00 20 00 80`` with the PIN padded with FF to 8 bytes: 9000, or 63Cx with the retries
  left (saved to the card file first), 6983 once blocked. Without data: 9000 if verified, else
  63Cx. ``00 20 FF 80`` without data logs out. PINs are 4 to 8 digits; anything else in the
  data field is 6A80 and costs no try.
* CHANGE REFERENCE DATA ``00 24 00 80|81`` (old + new, 8 bytes each); RESET RETRY COUNTER
  ``00 2C 00 80`` (PUK + new PIN): wrong PUKs count down the PUK's own retries.
* GENERAL AUTHENTICATE ``00 87 alg key`` with the dynamic authentication template ``7C``:
  ``{82 empty, 81 block}`` signs (RSA 2048, alg 07: raw RSA on the 256-byte block the host has
  padded; ECC P-256, alg 11: ECDSA over the hash, DER signature), ``{82 empty, 85 point}`` is
  ECDH; the answer is ``7C {82 result}``. 9A, 9D and retired keys need the PIN verified; 9C
  needs a VERIFY before every use ("PIN always"); 9E needs nothing. With the management key 9B
  (alg 03 3DES, or 00 meaning 3DES, or 08 AES-128): ``{80 empty}`` returns a witness encrypted
  under the key, ``{80 decrypted witness, 81 challenge}`` authenticates the host and answers
  ``{82 encrypted challenge}`` (mutual authentication), ``{80 decrypted witness}`` alone
  authenticates the host; ``{81 empty}`` returns a challenge and ``{82 encrypted challenge}``
  authenticates the host (external authentication); ``{81 challenge, 82 empty}`` has the card
  prove it knows the key (internal authentication). A wrong answer is 6982; a witness or
  challenge is only good for the command right after it.
* GENERATE ASYMMETRIC KEY PAIR ``00 47 00 key {AC {80 alg}}`` and PUT DATA ``00 DB 3F FF``
  (``5C tag`` + ``53 content``, or ``7E {...}`` for the discovery object) need the management
  key authenticated first (6982 otherwise); both are saved to the card file. The public key is
  answered as ``7F49 {81 modulus, 82 exponent}`` or ``7F49 {86 point}``.

Also here: builders for the data objects (CCC, CHUID, discovery, key history, certificate,
printed information) in the layout SP 800-73-4 Part 1 gives, for issuing cards.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.ciphers.algorithms import AES

try:  # cryptography >= 43 keeps 3DES here; the old location is removed in 48
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES  # type: ignore

from .apdu import (
    SW,
    ApduError,
    CommandApdu,
    ResponseApdu,
    parse_single_tlv,
    parse_tlv_dict,
    parse_tlvs,
    sw_retries_left,
    tag_bytes,
    tlv,
)
from .cardfile import CardFile, KeySlot, Secret

#: the PIV card application's full AID (NIST RID + PIX with version 01 00)
PIV_AID = bytes.fromhex("A000000308000010000100")
NIST_RID = PIV_AID[:5]
PIV_PIX = PIV_AID[5:]
#: the shortest AID prefix accepted by SELECT (the RID)
MIN_AID_PREFIX = 5
APPLICATION_LABEL = b"Virtual NHS-style PIV"

INS_VERIFY = 0x20
INS_CHANGE_REFERENCE_DATA = 0x24
INS_RESET_RETRY_COUNTER = 0x2C
INS_GENERATE_ASYMMETRIC_KEY_PAIR = 0x47
INS_GENERAL_AUTHENTICATE = 0x87
INS_GET_DATA = 0xCB
INS_PUT_DATA = 0xDB

# key references (SP 800-73-4 Part 1 Table 4)
KEY_GLOBAL_PIN = 0x00
KEY_PIN = 0x80
KEY_PUK = 0x81
KEY_AUTHENTICATION = 0x9A
KEY_MANAGEMENT = 0x9B
KEY_SIGNATURE = 0x9C
KEY_KEY_MANAGEMENT = 0x9D
KEY_CARD_AUTHENTICATION = 0x9E
RETIRED_KEYS = range(0x82, 0x96)
ASYMMETRIC_KEYS = (KEY_AUTHENTICATION, KEY_SIGNATURE, KEY_KEY_MANAGEMENT,
                   KEY_CARD_AUTHENTICATION, *RETIRED_KEYS)

# cryptographic algorithm identifiers (SP 800-78-4 Table 6-2)
ALG_3DES_LEGACY = 0x00
ALG_3DES = 0x03
ALG_RSA2048 = 0x07
ALG_AES128 = 0x08
ALG_ECCP256 = 0x11
KEY_ALGORITHMS = {ALG_RSA2048: "RSA2048", ALG_ECCP256: "ECCP256"}
ALGORITHM_IDS = {name: alg for alg, name in KEY_ALGORITHMS.items()}
MANAGEMENT_ALGORITHMS = {"3DES": ALG_3DES, "AES128": ALG_AES128}

# data objects (SP 800-73-4 Part 1 Table 3)
OBJ_CARD_AUTH_CERT = 0x5FC101
OBJ_CHUID = 0x5FC102
OBJ_FINGERPRINTS = 0x5FC103
OBJ_AUTHENTICATION_CERT = 0x5FC105
OBJ_SECURITY_OBJECT = 0x5FC106
OBJ_CCC = 0x5FC107
OBJ_FACIAL_IMAGE = 0x5FC108
OBJ_PRINTED_INFORMATION = 0x5FC109
OBJ_SIGNATURE_CERT = 0x5FC10A
OBJ_KEY_MANAGEMENT_CERT = 0x5FC10B
OBJ_KEY_HISTORY = 0x5FC10C
OBJ_IRIS_IMAGES = 0x5FC121
OBJ_PAIRING_CODE = 0x5FC123
OBJ_DISCOVERY = 0x7E
OBJ_BIOMETRIC_GROUP_TEMPLATE = 0x7F61
CERTIFICATE_OBJECTS = {
    KEY_AUTHENTICATION: OBJ_AUTHENTICATION_CERT,
    KEY_SIGNATURE: OBJ_SIGNATURE_CERT,
    KEY_KEY_MANAGEMENT: OBJ_KEY_MANAGEMENT_CERT,
    KEY_CARD_AUTHENTICATION: OBJ_CARD_AUTH_CERT,
    **{ref: 0x5FC10D + i for i, ref in enumerate(RETIRED_KEYS)},
}
#: objects readable only after the PIN (SP 800-73-4 Part 1 Table 3 access rules)
PIN_PROTECTED_OBJECTS = frozenset({OBJ_FINGERPRINTS, OBJ_FACIAL_IMAGE, OBJ_PRINTED_INFORMATION,
                                   OBJ_IRIS_IMAGES, OBJ_PAIRING_CODE})
#: objects whose GET DATA answer (and PUT DATA data field) is the object's own template
#: instead of 53
SELF_TAGGED_OBJECTS = frozenset({OBJ_DISCOVERY, OBJ_BIOMETRIC_GROUP_TEMPLATE})

TAG_OBJECT_ID = 0x5C
TAG_OBJECT_DATA = 0x53
TAG_DYNAMIC_AUTH = 0x7C
TAG_WITNESS = 0x80
TAG_CHALLENGE = 0x81
TAG_RESPONSE = 0x82
TAG_EXPONENTIATION = 0x85
TAG_APPLICATION_TEMPLATE = 0x61
TAG_CONTROL_REFERENCE = 0xAC
TAG_PUBLIC_KEY = 0x7F49

PIN_LENGTH = 8  # the data field of a PIN or PUK: padded with FF to 8 bytes
PIN_MIN_DIGITS = 4
PAD = 0xFF

#: PIN usage policy of the discovery object: the PIV application PIN only (40 00)
DEFAULT_PIN_USAGE_POLICY = b"\x40\x00"
#: FASC-N of a non-federal issuer (agency, system and credential codes 9999 / 9999 / 999999),
#: the value PIV-I and PIV-compatible cards carry; hosts then identify the card by its GUID
NON_FEDERAL_FASCN = bytes.fromhex("D4E739DA739CED39CE739D836858210842108421C84210C3EB")


def object_key(tag: int | bytes) -> str:
    """The key of a data object in :attr:`CardFile.objects`: its tag in lower-case hex as
    written ("5fc105", "7e")."""
    raw = tag if isinstance(tag, bytes) else tag_bytes(tag)
    return raw.hex()


# --- data object builders (SP 800-73-4 Part 1) -------------------------------------------------


def build_discovery_object(pin_usage_policy: bytes = DEFAULT_PIN_USAGE_POLICY) -> bytes:
    """Content of the discovery object 7E: the PIV AID and the PIN usage policy."""
    return tlv(0x4F, PIV_AID) + tlv(0x5F2F, pin_usage_policy)


def build_certificate_object(certificate_der: bytes) -> bytes:
    """Content of a certificate object: ``70 cert, 71 00 (not compressed), FE (LRC)``."""
    return tlv(0x70, certificate_der) + tlv(0x71, b"\x00") + tlv(0xFE)


def build_chuid(guid: bytes, expiry: str, *, fascn: bytes = NON_FEDERAL_FASCN,
                signature: bytes = b"") -> bytes:
    """Content of the Card Holder Unique Identifier: FASC-N (30), GUID (34, 16 bytes),
    expiration date (35, "YYYYMMDD"), issuer asymmetric signature (3E, may be empty), LRC."""
    if len(guid) != 16:
        raise ValueError("the CHUID's GUID is 16 bytes")
    if len(expiry) != 8 or not expiry.isdigit():
        raise ValueError("the CHUID's expiry is YYYYMMDD")
    return (tlv(0x30, fascn) + tlv(0x34, guid) + tlv(0x35, expiry.encode("ascii"))
            + tlv(0x3E, signature) + tlv(0xFE))


def build_ccc(card_identifier: bytes) -> bytes:
    """Content of the Card Capability Container. ``card_identifier`` is the 14-byte card ID
    that follows the GSC-RID, manufacturer (FF) and card type (02, Java Card) in tag F0."""
    if len(card_identifier) != 14:
        raise ValueError("the CCC's card identifier is 14 bytes")
    card_id = bytes.fromhex("A000000116") + b"\xff\x02" + card_identifier
    return (tlv(0xF0, card_id) + tlv(0xF1, b"\x21") + tlv(0xF2, b"\x21") + tlv(0xF3)
            + tlv(0xF4, b"\x00") + tlv(0xF5, b"\x10") + tlv(0xF6) + tlv(0xF7) + tlv(0xFA)
            + tlv(0xFB) + tlv(0xFC) + tlv(0xFD) + tlv(0xFE))


def build_key_history(on_card_certs: int = 0, off_card_certs: int = 0) -> bytes:
    """Content of the key history object: retired keys with on-card / off-card certificates."""
    return tlv(0xC1, bytes((on_card_certs,))) + tlv(0xC2, bytes((off_card_certs,))) + tlv(0xFE)


def build_printed_information(name: str, *, affiliation: str = "", expiry: str = "",
                              serial: str = "", issuer: str = "") -> bytes:
    """Content of the printed information object: name (01), employee affiliation (02),
    expiration date (04, e.g. "2029NOV23"), agency card serial number (05), issuer
    identification (06), LRC. Empty fields are left out."""
    fields = ((0x01, name, 125), (0x02, affiliation, 20), (0x04, expiry, 9),
              (0x05, serial, 20), (0x06, issuer, 15))
    out = b""
    for tag, value, limit in fields:
        raw = value.encode("utf-8")
        if len(raw) > limit:
            raise ValueError(f"printed information field {tag:02X} longer than {limit} bytes")
        if raw:
            out += tlv(tag, raw)
    return out + tlv(0xFE)


# --- the application ------------------------------------------------------------------------


def _decode_pin(field: bytes) -> str:
    """The PIN in an 8-byte PIN field: 4 to 8 ASCII digits, then FF padding (6A80 otherwise)."""
    value = field.rstrip(bytes((PAD,)))
    if not PIN_MIN_DIGITS <= len(value) <= PIN_LENGTH or not all(0x30 <= b <= 0x39 for b in value):
        raise ApduError(SW.WRONG_DATA, "a PIN is 4 to 8 digits padded with FF")
    return value.decode("ascii")


def _decode_puk(field: bytes) -> str:
    """The PUK in an 8-byte field: any bytes, FF padding stripped (latin-1, so every byte
    string maps to one text and back)."""
    value = field.rstrip(bytes((PAD,)))
    if not value:
        raise ApduError(SW.WRONG_DATA, "empty PUK")
    return value.decode("latin-1")


@dataclass
class _PendingAuth:
    """A management-key exchange in progress: what the card expects back."""

    kind: str  # "witness" (host must return the decrypted witness) or "challenge"
    value: bytes  # the plaintext witness, or the challenge sent


class PivApplication:
    """The PIV application over one :class:`CardFile`.

    ``persist`` is called after every change of persistent state (retry counters, PIN, PUK,
    keys, objects); an :class:`OSError` from it answers 6581 (memory failure). Volatile state
    (PIN verified, "PIN always" for 9C, management key authenticated, a pending
    witness/challenge) lives here and is cleared by :meth:`reset`.
    """

    def __init__(self, card: CardFile, persist: Callable[[], None] | None = None) -> None:
        self.card = card
        self._persist = persist or (lambda: None)
        self._key_cache: dict[str, tuple[bytes, object]] = {}
        self.reset()

    # -- volatile state ------------------------------------------------------------------

    def reset(self) -> None:
        """Clear the security status (power-on, reset, selection)."""
        self.pin_verified = False
        self.pin_always = False  # a VERIFY not yet consumed by a 9C operation
        self.management_authenticated = False
        self._pending: _PendingAuth | None = None

    def select(self, cmd: CommandApdu) -> ResponseApdu:
        """SELECT of this application (P1=04 already routed here by the card)."""
        if cmd.p2 not in (0x00, 0x04, 0x0C):
            raise ApduError(SW.INCORRECT_P1P2)
        self.reset()
        if cmd.p2 == 0x0C:
            return ResponseApdu()
        return ResponseApdu(self.application_property_template())

    @staticmethod
    def application_property_template() -> bytes:
        return tlv(TAG_APPLICATION_TEMPLATE, tlv(0x4F, PIV_PIX) + tlv(0x79, tlv(0x4F, NIST_RID))
                   + tlv(0x50, APPLICATION_LABEL))

    def process(self, cmd: CommandApdu) -> ResponseApdu:
        """One (reassembled) command for the selected application."""
        handler = self._HANDLERS.get(cmd.ins)
        if handler is None:
            self._pending = None
            raise ApduError(SW.INS_NOT_SUPPORTED)
        if cmd.ins != INS_GENERAL_AUTHENTICATE:
            self._pending = None  # a witness or challenge is only good for the next command
        return handler(self, cmd)

    def _commit(self) -> None:
        try:
            self._persist()
        except OSError as e:
            raise ApduError(SW.MEMORY_FAILURE, f"cannot save the card: {e}") from None

    # -- GET DATA / PUT DATA -------------------------------------------------------------

    def get_object(self, tag: int) -> bytes | None:
        """The content of data object ``tag`` (what a GET DATA answer wraps), or None."""
        content = self.card.objects.get(object_key(tag))
        if content is None and tag == OBJ_DISCOVERY:
            content = build_discovery_object()
        return content

    def _get_data(self, cmd: CommandApdu) -> ResponseApdu:
        if cmd.p1p2 != 0x3FFF:
            raise ApduError(SW.INCORRECT_P1P2)
        tag_field = parse_single_tlv(cmd.data, TAG_OBJECT_ID)
        if not 1 <= len(tag_field) <= 3:
            raise ApduError(SW.WRONG_DATA, "an object tag is 1 to 3 bytes")
        tag = int.from_bytes(tag_field, "big")
        if tag in PIN_PROTECTED_OBJECTS and not self.pin_verified:
            raise ApduError(SW.SECURITY_STATUS_NOT_SATISFIED)
        content = self.get_object(tag)
        if content is None:
            raise ApduError(SW.FILE_NOT_FOUND)
        wrapper = tag if tag in SELF_TAGGED_OBJECTS else TAG_OBJECT_DATA
        return ResponseApdu(tlv(wrapper, content))

    def _put_data(self, cmd: CommandApdu) -> ResponseApdu:
        if cmd.p1p2 != 0x3FFF:
            raise ApduError(SW.INCORRECT_P1P2)
        if not self.management_authenticated:
            raise ApduError(SW.SECURITY_STATUS_NOT_SATISFIED)
        items = parse_tlvs(cmd.data)
        if len(items) == 1 and items[0][0] in SELF_TAGGED_OBJECTS:
            tag, content = items[0]
        elif len(items) == 2 and items[0][0] == TAG_OBJECT_ID and items[1][0] == TAG_OBJECT_DATA:
            if not 1 <= len(items[0][1]) <= 3:
                raise ApduError(SW.WRONG_DATA, "an object tag is 1 to 3 bytes")
            tag, content = int.from_bytes(items[0][1], "big"), items[1][1]
        else:
            raise ApduError(SW.WRONG_DATA, "PUT DATA takes 5C tag + 53 data, or 7E / 7F61")
        key = object_key(tag)
        if content:
            self.card.objects[key] = content
        else:  # an empty object deletes it
            self.card.objects.pop(key, None)
        self._commit()
        return ResponseApdu()

    # -- PIN and PUK -----------------------------------------------------------------------

    def _attempt(self, secret: Secret, value: str) -> None:
        """Check ``value`` against ``secret``: a wrong one costs a try (saved before the answer,
        63Cx); a right one restores the tries."""
        if secret.blocked:
            raise ApduError(SW.AUTH_METHOD_BLOCKED)
        if not secret.matches(value):
            secret.retries_left = max(0, secret.retries_left - 1)
            self._commit()
            raise ApduError(sw_retries_left(secret.retries_left))
        if secret.retries_left != secret.max_retries:
            secret.retries_left = secret.max_retries
            self._commit()

    def _verify(self, cmd: CommandApdu) -> ResponseApdu:
        if cmd.p2 != KEY_PIN:
            raise ApduError(SW.REFERENCED_DATA_NOT_FOUND if cmd.p2 in (KEY_GLOBAL_PIN, 0x96, 0x97)
                            else SW.INCORRECT_P1P2)
        if cmd.p1 == 0xFF:  # reset the security status of the PIN (log out)
            if cmd.data:
                raise ApduError(SW.WRONG_LENGTH)
            self.pin_verified = self.pin_always = False
            return ResponseApdu()
        if cmd.p1 != 0x00:
            raise ApduError(SW.INCORRECT_P1P2)
        pin = self.card.pin
        if not cmd.data:  # retries query
            if pin.blocked:
                raise ApduError(SW.AUTH_METHOD_BLOCKED)
            if self.pin_verified:
                return ResponseApdu()
            raise ApduError(sw_retries_left(pin.retries_left))
        if len(cmd.data) != PIN_LENGTH:
            raise ApduError(SW.WRONG_LENGTH)
        value = _decode_pin(cmd.data)
        try:
            self._attempt(pin, value)
        except ApduError:
            self.pin_verified = self.pin_always = False
            raise
        self.pin_verified = self.pin_always = True
        return ResponseApdu()

    def _change_reference_data(self, cmd: CommandApdu) -> ResponseApdu:
        if cmd.p1 != 0x00 or cmd.p2 not in (KEY_PIN, KEY_PUK):
            raise ApduError(SW.INCORRECT_P1P2)
        if len(cmd.data) != 2 * PIN_LENGTH:
            raise ApduError(SW.WRONG_LENGTH)
        decode = _decode_pin if cmd.p2 == KEY_PIN else _decode_puk
        old, new = decode(cmd.data[:PIN_LENGTH]), decode(cmd.data[PIN_LENGTH:])
        secret = self.card.pin if cmd.p2 == KEY_PIN else self.card.puk
        try:
            self._attempt(secret, old)
        except ApduError:
            if cmd.p2 == KEY_PIN:
                self.pin_verified = self.pin_always = False
            raise
        secret.set(new)
        self._commit()
        return ResponseApdu()

    def _reset_retry_counter(self, cmd: CommandApdu) -> ResponseApdu:
        if cmd.p1 != 0x00 or cmd.p2 != KEY_PIN:
            raise ApduError(SW.INCORRECT_P1P2)
        if len(cmd.data) != 2 * PIN_LENGTH:
            raise ApduError(SW.WRONG_LENGTH)
        puk, new_pin = _decode_puk(cmd.data[:PIN_LENGTH]), _decode_pin(cmd.data[PIN_LENGTH:])
        self._attempt(self.card.puk, puk)
        self.card.pin.set(new_pin)
        self.pin_verified = self.pin_always = False
        self._commit()
        return ResponseApdu()

    # -- GENERAL AUTHENTICATE ----------------------------------------------------------------

    def _general_authenticate(self, cmd: CommandApdu) -> ResponseApdu:
        pending, self._pending = self._pending, None
        template = parse_tlv_dict(parse_single_tlv(cmd.data, TAG_DYNAMIC_AUTH))
        if cmd.p2 == KEY_MANAGEMENT:
            return self._management_authenticate(cmd.p1, template, pending)
        if cmd.p2 not in ASYMMETRIC_KEYS:
            raise ApduError(SW.INCORRECT_P1P2)
        return self._private_key_operation(cmd.p1, cmd.p2, template)

    # management key 9B

    def _management_cipher(self, alg: int) -> Cipher:
        algorithm = self.card.management_key_algorithm
        expected = MANAGEMENT_ALGORITHMS[algorithm]
        if alg != expected and not (alg == ALG_3DES_LEGACY and expected == ALG_3DES):
            raise ApduError(SW.INCORRECT_P1P2, "not the management key's algorithm")
        key = self.card.management_key
        if algorithm == "3DES":
            return Cipher(TripleDES(key), modes.ECB())
        return Cipher(AES(key), modes.ECB())

    def _management_authenticate(self, alg: int, template: dict[int, bytes],
                                 pending: _PendingAuth | None) -> ResponseApdu:
        cipher = self._management_cipher(alg)
        block = cipher.algorithm.block_size // 8  # type: ignore[attr-defined]
        tags = set(template)

        def encrypt(data: bytes) -> bytes:
            enc = cipher.encryptor()
            return enc.update(data) + enc.finalize()

        if tags == {TAG_WITNESS} and not template[TAG_WITNESS]:  # step 1: witness request
            witness = os.urandom(block)
            self._pending = _PendingAuth("witness", witness)
            self.management_authenticated = False
            return ResponseApdu(tlv(TAG_DYNAMIC_AUTH, tlv(TAG_WITNESS, encrypt(witness))))
        if tags == {TAG_CHALLENGE} and not template[TAG_CHALLENGE]:  # challenge request
            challenge = os.urandom(block)
            self._pending = _PendingAuth("challenge", challenge)
            self.management_authenticated = False
            return ResponseApdu(tlv(TAG_DYNAMIC_AUTH, tlv(TAG_CHALLENGE, challenge)))
        if (tags == {TAG_CHALLENGE, TAG_RESPONSE} and template[TAG_CHALLENGE]
                and not template[TAG_RESPONSE]):  # internal authentication of the card
            if len(template[TAG_CHALLENGE]) % block:
                raise ApduError(SW.WRONG_DATA, "challenge not a whole number of blocks")
            return ResponseApdu(tlv(TAG_DYNAMIC_AUTH,
                                    tlv(TAG_RESPONSE, encrypt(template[TAG_CHALLENGE]))))
        if template.get(TAG_WITNESS) and tags <= {TAG_WITNESS, TAG_CHALLENGE}:
            # the host returns the decrypted witness (and, mutual, its own challenge)
            host_challenge = template.get(TAG_CHALLENGE)
            if host_challenge is not None and (not host_challenge
                                               or len(host_challenge) % block):
                raise ApduError(SW.WRONG_DATA, "challenge not a whole number of blocks")
            if pending is None or pending.kind != "witness":
                raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no witness was requested")
            if not hmac.compare_digest(template[TAG_WITNESS], pending.value):
                self.management_authenticated = False
                raise ApduError(SW.SECURITY_STATUS_NOT_SATISFIED)
            self.management_authenticated = True
            if host_challenge is None:
                return ResponseApdu()
            return ResponseApdu(tlv(TAG_DYNAMIC_AUTH, tlv(TAG_RESPONSE, encrypt(host_challenge))))
        if tags == {TAG_RESPONSE} and template[TAG_RESPONSE]:  # external authentication
            if pending is None or pending.kind != "challenge":
                raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "no challenge was requested")
            ok = hmac.compare_digest(template[TAG_RESPONSE], encrypt(pending.value))
            self.management_authenticated = ok
            if not ok:
                raise ApduError(SW.SECURITY_STATUS_NOT_SATISFIED)
            return ResponseApdu()
        raise ApduError(SW.WRONG_DATA, "unexpected dynamic authentication template")

    # private keys

    def _private_key(self, ref: int) -> tuple[KeySlot, object]:
        slot = self.card.keys.get(f"{ref:02x}")
        if slot is None:
            raise ApduError(SW.REFERENCED_DATA_NOT_FOUND, f"no key {ref:02X} on the card")
        cached = self._key_cache.get(f"{ref:02x}")
        if cached is not None and cached[0] is slot.private_key_pem:
            return slot, cached[1]
        key = serialization.load_pem_private_key(slot.private_key_pem, password=None)
        self._key_cache[f"{ref:02x}"] = (slot.private_key_pem, key)
        return slot, key

    def _private_key_operation(self, alg: int, ref: int,
                               template: dict[int, bytes]) -> ResponseApdu:
        slot, key = self._private_key(ref)
        if ALGORITHM_IDS.get(slot.algorithm) != alg:
            raise ApduError(SW.INCORRECT_P1P2, "not the key's algorithm")
        if template.get(TAG_RESPONSE, None) != b"" or len(template) != 2:
            raise ApduError(SW.WRONG_DATA, "expected 82 (empty) and 81 or 85")
        if ref == KEY_SIGNATURE:
            if not (self.pin_verified and self.pin_always):
                raise ApduError(SW.SECURITY_STATUS_NOT_SATISFIED)
            self.pin_always = False  # "PIN always": the next use needs a new VERIFY
        elif ref != KEY_CARD_AUTHENTICATION and not self.pin_verified:
            raise ApduError(SW.SECURITY_STATUS_NOT_SATISFIED)
        if TAG_CHALLENGE in template and template[TAG_CHALLENGE]:
            data = template[TAG_CHALLENGE]
            if isinstance(key, rsa.RSAPrivateKey):
                result = _rsa_private_operation(key, data)
            elif isinstance(key, ec.EllipticCurvePrivateKey):
                result = _ecdsa_sign(key, data)
            else:  # pragma: no cover - the card file only holds RSA and EC keys
                raise ApduError(SW.CONDITIONS_NOT_SATISFIED)
        elif TAG_EXPONENTIATION in template and template[TAG_EXPONENTIATION]:
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ApduError(SW.WRONG_DATA, "key agreement needs an EC key")
            try:
                peer = ec.EllipticCurvePublicKey.from_encoded_point(
                    key.curve, template[TAG_EXPONENTIATION])
                result = key.exchange(ec.ECDH(), peer)
            except ValueError:
                raise ApduError(SW.WRONG_DATA, "not a point on the key's curve") from None
        else:
            raise ApduError(SW.WRONG_DATA, "expected 81 or 85 with data")
        return ResponseApdu(tlv(TAG_DYNAMIC_AUTH, tlv(TAG_RESPONSE, result)))

    # -- GENERATE ASYMMETRIC KEY PAIR ----------------------------------------------------------

    def _generate(self, cmd: CommandApdu) -> ResponseApdu:
        if cmd.p1 != 0x00 or cmd.p2 not in ASYMMETRIC_KEYS:
            raise ApduError(SW.INCORRECT_P1P2)
        if not self.management_authenticated:
            raise ApduError(SW.SECURITY_STATUS_NOT_SATISFIED)
        control = parse_tlv_dict(parse_single_tlv(cmd.data, TAG_CONTROL_REFERENCE))
        alg_field = control.get(0x80)
        if alg_field is None or len(alg_field) != 1 or alg_field[0] not in KEY_ALGORITHMS:
            raise ApduError(SW.WRONG_DATA, "unsupported or missing algorithm (80)")
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if alg_field[0] == ALG_RSA2048:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            numbers = key.public_key().public_numbers()
            public = tlv(0x81, numbers.n.to_bytes(256, "big")) + tlv(0x82, _int_bytes(numbers.e))
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            public = tlv(0x86, key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        self.card.keys[f"{cmd.p2:02x}"] = KeySlot(KEY_ALGORITHMS[alg_field[0]], pem)
        self._key_cache[f"{cmd.p2:02x}"] = (pem, key)
        self._commit()
        return ResponseApdu(tlv(TAG_PUBLIC_KEY, public))

    _HANDLERS: dict[int, Callable[["PivApplication", CommandApdu], ResponseApdu]] = {
        INS_GET_DATA: _get_data,
        INS_PUT_DATA: _put_data,
        INS_VERIFY: _verify,
        INS_CHANGE_REFERENCE_DATA: _change_reference_data,
        INS_RESET_RETRY_COUNTER: _reset_retry_counter,
        INS_GENERAL_AUTHENTICATE: _general_authenticate,
        INS_GENERATE_ASYMMETRIC_KEY_PAIR: _generate,
    }


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


# DigestInfo prefixes of EMSA-PKCS1-v1_5 (RFC 8017 9.2 note 1), for the fast signing path
_DIGEST_INFO_PREFIXES: dict[bytes, hashes.HashAlgorithm] = {
    bytes.fromhex("3021300906052b0e03021a05000414"): hashes.SHA1(),
    bytes.fromhex("302d300d06096086480165030402040500041c"): hashes.SHA224(),
    bytes.fromhex("3031300d060960864801650304020105000420"): hashes.SHA256(),
    bytes.fromhex("3041300d060960864801650304020205000430"): hashes.SHA384(),
    bytes.fromhex("3051300d060960864801650304020305000440"): hashes.SHA512(),
}


def _rsa_private_operation(key: rsa.RSAPrivateKey, block: bytes) -> bytes:
    """Raw RSA with the private key on a block of the modulus' length (the host has padded
    it): ``block ^ d mod n``. A PKCS#1 v1.5 signature block goes through OpenSSL (the same
    result, faster); anything else (PSS blocks, decryption) is computed with the CRT."""
    size = key.key_size // 8
    numbers = key.private_numbers()
    value = int.from_bytes(block, "big")
    if len(block) != size or value >= numbers.public_numbers.n:
        raise ApduError(SW.WRONG_DATA, f"RSA input must be {size} bytes, less than the modulus")
    if block[:2] == b"\x00\x01":
        separator = block.find(b"\x00", 2)
        if separator >= 10 and block[2:separator] == b"\xff" * (separator - 2):
            digest_info = block[separator + 1:]
            for prefix, algorithm in _DIGEST_INFO_PREFIXES.items():
                if (digest_info.startswith(prefix)
                        and len(digest_info) == len(prefix) + algorithm.digest_size):
                    return key.sign(digest_info[len(prefix):], padding.PKCS1v15(),
                                    Prehashed(algorithm))
    m1 = pow(value, numbers.dmp1, numbers.p)
    m2 = pow(value, numbers.dmq1, numbers.q)
    h = (numbers.iqmp * (m1 - m2)) % numbers.p
    return (m2 + h * numbers.q).to_bytes(size, "big")


def _ecdsa_sign(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """ECDSA over the hash the host sent: longer hashes are truncated to the field size and
    shorter ones left-padded with zeros (the integer ECDSA takes is the same)."""
    size = (key.curve.key_size + 7) // 8
    digest = digest[:size].rjust(size, b"\x00")
    hash_algorithm = {32: hashes.SHA256(), 48: hashes.SHA384()}[size]
    return key.sign(digest, ec.ECDSA(Prehashed(hash_algorithm)))
