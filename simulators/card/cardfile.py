"""The virtual smartcard's file: everything a card holds, as a JSON document.

A card file is the card's secure element made visible: its private keys, its PIV data
objects (certificates, CHUID, ...), its PIN and PUK (as salted scrypt hashes) with their retry
counters, and its management key. It is written with mode 0600, atomically (temporary file,
fsync, rename), so a card pulled out mid-write keeps its old state or the new one.

The cardholder knows the PIN. The PUK and the management key are the card's administrative
credentials: the simulated registration authority keeps them (in its CA directory), not the
cardholder, as with NHS smartcards where a sponsor or RA unlocks a blocked card.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..atomicfile import write_private
from .apdu import PROTOCOL_T0, PROTOCOL_T1, PROTOCOLS

FORMAT_VERSION = 1
PIN_MAX_RETRIES = 3
PUK_MAX_RETRIES = 5
#: NHS smartcard ATR (JCOP41 V2.2), from public sources; the virtual card presents it. It
#: announces T=1 only (TD1 81, TD2 31: IFSC 254), and the card then answers as a T=1 card.
NHS_ATR = bytes.fromhex("3BF91800008131FE454A434F503431563232AF")
#: the same card announcing T=0 only (T0 79: TA1 18, TB1 00, TC1 00, no TD1 and so no TCK;
#: the same historical bytes), for the card option "t0": it answers with the 61xx convention.
NHS_T0_ATR = bytes.fromhex("3B791800004A434F503431563232")
#: the ATR a card presents for each transmission protocol
PROTOCOL_ATRS = {PROTOCOL_T1: NHS_ATR, PROTOCOL_T0: NHS_T0_ATR}


class CardFileError(Exception):
    """The card file cannot be read or is malformed."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def hash_secret(secret: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    """(salt, scrypt hash) of a PIN or PUK."""
    salt = salt or os.urandom(16)
    return salt, hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=2**14, r=8, p=1, dklen=32)


def check_secret(secret: str, salt: bytes, expected: bytes) -> bool:
    """Constant-time check of a PIN or PUK against its stored hash."""
    return hmac.compare_digest(hash_secret(secret, salt)[1], expected)


@dataclass
class Secret:
    """A PIN or PUK: its hash and retry counter."""

    salt: bytes
    hash: bytes
    retries_left: int
    max_retries: int

    @classmethod
    def new(cls, value: str, max_retries: int) -> "Secret":
        salt, digest = hash_secret(value)
        return cls(salt, digest, max_retries, max_retries)

    def matches(self, value: str) -> bool:
        return check_secret(value, self.salt, self.hash)

    def set(self, value: str) -> None:
        self.salt, self.hash = hash_secret(value)
        self.retries_left = self.max_retries

    @property
    def blocked(self) -> bool:
        return self.retries_left <= 0

    def to_json(self) -> dict:
        return {"salt": _b64(self.salt), "hash": _b64(self.hash),
                "retries_left": self.retries_left, "max_retries": self.max_retries}

    @classmethod
    def from_json(cls, data: dict) -> "Secret":
        return cls(_unb64(data["salt"]), _unb64(data["hash"]), int(data["retries_left"]),
                   int(data["max_retries"]))


@dataclass
class KeySlot:
    """A PIV key reference (9A authentication, 9C signature, 9D key management, 9E card
    authentication) and its private key."""

    algorithm: str  # "RSA2048" or "ECCP256"
    private_key_pem: bytes  # PKCS#8, unencrypted (the file is the secure element)

    def to_json(self) -> dict:
        return {"algorithm": self.algorithm, "private_key_pem": self.private_key_pem.decode()}

    @classmethod
    def from_json(cls, data: dict) -> "KeySlot":
        if data["algorithm"] not in ("RSA2048", "ECCP256"):
            raise CardFileError(f"unknown key algorithm {data['algorithm']!r}")
        return cls(data["algorithm"], data["private_key_pem"].encode())


@dataclass
class CardFile:
    """Everything on one virtual card."""

    serial: str  # the card serial number (printed on the card)
    holder_name: str  # e.g. "Dr Alice Smith"
    holder_uuid: str  # the 12-digit NHS user id (UUID)
    pin: Secret
    puk: Secret
    management_key_algorithm: str  # "AES128" or "3DES"
    management_key: bytes
    keys: dict[str, KeySlot] = field(default_factory=dict)  # "9a", "9c", ...
    objects: dict[str, bytes] = field(default_factory=dict)  # PIV object tag (hex) -> value
    atr: bytes = NHS_ATR
    #: the transmission protocol the ATR announces and the card follows: "t1" or "t0"
    protocol: str = PROTOCOL_T1
    #: False: the card refuses SELECT of the PIV application (6A82), as a card with only a
    #: proprietary applet does (``sim card issue --no-piv``)
    piv_enabled: bool = True
    path: Path | None = field(default=None, compare=False)

    def to_json(self) -> dict:
        extra = {} if self.piv_enabled else {"piv_enabled": False}
        return {
            **extra,
            "format": FORMAT_VERSION,
            "serial": self.serial,
            "holder_name": self.holder_name,
            "holder_uuid": self.holder_uuid,
            "atr": self.atr.hex(),
            "protocol": self.protocol,
            "pin": self.pin.to_json(),
            "puk": self.puk.to_json(),
            "management_key_algorithm": self.management_key_algorithm,
            "management_key": _b64(self.management_key),
            "keys": {ref: slot.to_json() for ref, slot in self.keys.items()},
            "objects": {tag: _b64(value) for tag, value in self.objects.items()},
        }

    @classmethod
    def from_json(cls, data: dict, path: Path | None = None) -> "CardFile":
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise CardFileError(f"not a virtual card file of format {FORMAT_VERSION}")
        try:
            card = cls(
                serial=str(data["serial"]),
                holder_name=str(data["holder_name"]),
                holder_uuid=str(data["holder_uuid"]),
                atr=bytes.fromhex(data["atr"]),
                protocol=str(data.get("protocol", PROTOCOL_T1)),  # older files: T=1
                piv_enabled=data.get("piv_enabled", True) is not False,
                pin=Secret.from_json(data["pin"]),
                puk=Secret.from_json(data["puk"]),
                management_key_algorithm=str(data["management_key_algorithm"]),
                management_key=_unb64(data["management_key"]),
                keys={ref.lower(): KeySlot.from_json(s) for ref, s in data["keys"].items()},
                objects={tag.lower(): _unb64(v) for tag, v in data["objects"].items()},
                path=path,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CardFileError(f"card file malformed: {e!r}") from None
        if card.protocol not in PROTOCOLS:
            raise CardFileError(f"unknown transmission protocol {card.protocol!r}")
        if card.management_key_algorithm not in ("AES128", "3DES"):
            raise CardFileError(f"unknown management key algorithm {card.management_key_algorithm}")
        return card

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CardFile":
        path = Path(path)
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise CardFileError(f"cannot read card file {path}: {e}") from None
        return cls.from_json(data, path)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write atomically with mode 0600 (to ``path``, or where it was loaded from)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path to save the card file to")
        write_private(target, json.dumps(self.to_json(), indent=1).encode("utf-8"))
        self.path = target
        return target
