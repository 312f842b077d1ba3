"""Credentials of the virtual key: key derivation, key handles, signatures.

Every credential is born from a random 32-byte *seed*; its private key and its hmac-secret
``CredRandom`` values are derived from the seed with HKDF. The credential ID is the seed and
the credential's parameters sealed with AES-256-GCM under the device's wrapping key, with the
RP ID hash as associated data:

    id = 0x01 || nonce(12) || AES-GCM(wrap_key, nonce, alg || credProtect || flags || seed,
                                      aad = rpIdHash)                      (64 bytes)

So a non-discoverable credential needs no storage, a key handle presented for another RP or
by another device fails authentication, and a factory reset (new wrapping key) invalidates
every key handle ever issued. Discoverable credentials use the same ID format and are also
kept in the persistent state with their user and RP information.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ES256 = -7
EDDSA = -8
#: COSE algorithms this key offers, in order of preference.
ALGORITHMS = (ES256, EDDSA)
_ALG_CODES = {ES256: 1, EDDSA: 2}
_CODE_ALGS = {v: k for k, v in _ALG_CODES.items()}

ID_VERSION = 0x01
ID_LENGTH = 64
_FLAG_HMAC = 0x01
_FLAG_DISCOVERABLE = 0x02
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass
class Credential:
    id: bytes
    rp_id_hash: bytes
    alg: int
    seed: bytes
    cred_protect: int = 1
    hmac_secret: bool = False
    discoverable: bool = False
    # Discoverable credentials only:
    large_blob_key: bool = False  # created with the largeBlobKey extension
    rp: dict = field(default_factory=dict)
    user: dict = field(default_factory=dict)
    created: int = 0  # creation order, for "most recent first"

    # -- keys -------------------------------------------------------------------------
    def private_key(self):
        return _derive_key(self.alg, self.seed)

    def cose_public_key(self) -> dict:
        key = self.private_key()
        if self.alg == ES256:
            n = key.public_key().public_numbers()
            return {1: 2, 3: ES256, -1: 1, -2: n.x.to_bytes(32, "big"), -3: n.y.to_bytes(32, "big")}
        raw = key.public_key().public_bytes_raw()
        return {1: 1, 3: EDDSA, -1: 6, -2: raw}

    def sign(self, message: bytes) -> bytes:
        key = self.private_key()
        if self.alg == ES256:
            return key.sign(message, ec.ECDSA(hashes.SHA256()))
        return key.sign(message)

    def cred_random(self, with_uv: bool) -> bytes:
        """hmac-secret's CredRandomWithUV / CredRandomWithoutUV (CTAP 2.1 section 12.5)."""
        label = b"hmac-secret with uv" if with_uv else b"hmac-secret without uv"
        return hmac.new(self.seed, label, hashlib.sha256).digest()

    def large_blob_secret(self) -> bytes:
        """The credential's largeBlobKey (CTAP 2.1 section 12.3)."""
        return hmac.new(self.seed, b"largeBlobKey", hashlib.sha256).digest()

    def descriptor(self) -> dict:
        return {"id": self.id, "type": "public-key"}


@lru_cache(maxsize=256)
def _derive_key(alg: int, seed: bytes):
    material = HKDF(hashes.SHA256(), 48, b"token-agent virtual key", b"credential key %d" % alg)
    okm = material.derive(seed)
    if alg == ES256:
        d = int.from_bytes(okm, "big") % (_P256_ORDER - 1) + 1
        return ec.derive_private_key(d, ec.SECP256R1())
    if alg == EDDSA:
        return ed25519.Ed25519PrivateKey.from_private_bytes(okm[:32])
    raise ValueError(f"unsupported algorithm {alg}")


class KeyWrapper:
    """Seals and opens credential IDs under the device's wrapping key."""

    def __init__(self, wrap_key: bytes) -> None:
        if len(wrap_key) != 32:
            raise ValueError("wrapping key must be 32 bytes")
        self._aead = AESGCM(wrap_key)

    def new_credential(
        self,
        rp_id_hash: bytes,
        alg: int,
        *,
        cred_protect: int = 1,
        hmac_secret: bool = False,
        discoverable: bool = False,
    ) -> Credential:
        seed = os.urandom(32)
        flags = (_FLAG_HMAC if hmac_secret else 0) | (_FLAG_DISCOVERABLE if discoverable else 0)
        nonce = os.urandom(12)
        plain = struct.pack(">BBB", _ALG_CODES[alg], cred_protect, flags) + seed
        cred_id = bytes([ID_VERSION]) + nonce + self._aead.encrypt(nonce, plain, rp_id_hash)
        return Credential(
            id=cred_id,
            rp_id_hash=rp_id_hash,
            alg=alg,
            seed=seed,
            cred_protect=cred_protect,
            hmac_secret=hmac_secret,
            discoverable=discoverable,
        )

    def open(self, cred_id: bytes, rp_id_hash: bytes) -> Credential | None:
        """The credential behind an ID, or None if the ID is not ours or not for this RP."""
        if not isinstance(cred_id, bytes) or len(cred_id) != ID_LENGTH or cred_id[0] != ID_VERSION:
            return None
        try:
            plain = self._aead.decrypt(cred_id[1:13], cred_id[13:], rp_id_hash)
        except InvalidTag:
            return None
        alg_code, cred_protect, flags = struct.unpack(">BBB", plain[:3])
        if alg_code not in _CODE_ALGS:
            return None
        return Credential(
            id=cred_id,
            rp_id_hash=rp_id_hash,
            alg=_CODE_ALGS[alg_code],
            seed=plain[3:],
            cred_protect=cred_protect,
            hmac_secret=bool(flags & _FLAG_HMAC),
            discoverable=bool(flags & _FLAG_DISCOVERABLE),
        )
