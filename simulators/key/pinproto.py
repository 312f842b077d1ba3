"""PIN/UV auth protocols 1 and 2, authenticator side (CTAP 2.1 section 6.5.6, 6.5.7).

Written from the specification, independently of python-fido2's client-side classes, so that
the conformance run compares two implementations rather than one with itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class PinProtocolError(Exception):
    """Malformed protocol input (a bad key agreement, a ciphertext of the wrong size)."""


class AuthenticatorPinProtocol:
    """Common part: the authenticator's ECDH key-agreement key pair."""

    VERSION = 0

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    def regenerate(self) -> None:
        """A new key-agreement key (at power-up and after a wrong PIN)."""
        self._key = ec.generate_private_key(ec.SECP256R1())

    def key_agreement(self) -> dict:
        """The COSE_Key returned by getKeyAgreement (alg -25, ECDH-ES+HKDF-256)."""
        numbers = self._key.public_key().public_numbers()
        return {
            1: 2,
            3: -25,
            -1: 1,
            -2: numbers.x.to_bytes(32, "big"),
            -3: numbers.y.to_bytes(32, "big"),
        }

    def decapsulate(self, peer_cose: object) -> bytes:
        """ECDH with the platform's COSE key; returns the shared secret."""
        if not isinstance(peer_cose, dict):
            raise PinProtocolError("keyAgreement is not a map")
        x, y = peer_cose.get(-2), peer_cose.get(-3)
        if peer_cose.get(1) != 2 or peer_cose.get(-1) != 1:
            raise PinProtocolError("keyAgreement is not an EC2 P-256 key")
        if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == len(y) == 32):
            raise PinProtocolError("keyAgreement coordinates malformed")
        try:
            peer = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError as e:  # point not on the curve
            raise PinProtocolError(f"keyAgreement point invalid: {e}") from None
        z = self._key.exchange(ec.ECDH(), peer)
        return self.kdf(z)

    # Subclasses define kdf, encrypt, decrypt, authenticate.
    def kdf(self, z: bytes) -> bytes:
        raise NotImplementedError

    def encrypt(self, key: bytes, plaintext: bytes) -> bytes:
        raise NotImplementedError

    def decrypt(self, key: bytes, ciphertext: bytes) -> bytes:
        raise NotImplementedError

    def authenticate(self, key: bytes, message: bytes) -> bytes:
        raise NotImplementedError

    def verify(self, key: bytes, message: bytes, signature: bytes) -> bool:
        """Constant-time check of a pinUvAuthParam."""
        return isinstance(signature, bytes) and hmac.compare_digest(
            self.authenticate(key, message), signature
        )


def _aes_cbc(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    if len(data) % 16:
        raise PinProtocolError("ciphertext is not a whole number of AES blocks")
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    op = cipher.encryptor() if encrypt else cipher.decryptor()
    return op.update(data) + op.finalize()


class PinProtocolV1(AuthenticatorPinProtocol):
    VERSION = 1

    def kdf(self, z: bytes) -> bytes:
        return hashlib.sha256(z).digest()

    def encrypt(self, key: bytes, plaintext: bytes) -> bytes:
        return _aes_cbc(key, b"\0" * 16, plaintext, True)

    def decrypt(self, key: bytes, ciphertext: bytes) -> bytes:
        return _aes_cbc(key, b"\0" * 16, ciphertext, False)

    def authenticate(self, key: bytes, message: bytes) -> bytes:
        return hmac.new(key, message, hashlib.sha256).digest()[:16]


class PinProtocolV2(AuthenticatorPinProtocol):
    VERSION = 2

    def kdf(self, z: bytes) -> bytes:
        def hkdf(info: bytes) -> bytes:
            return HKDF(hashes.SHA256(), 32, b"\0" * 32, info).derive(z)

        return hkdf(b"CTAP2 HMAC key") + hkdf(b"CTAP2 AES key")

    @staticmethod
    def _aes_key(key: bytes) -> bytes:
        return key[32:] if len(key) == 64 else key

    def encrypt(self, key: bytes, plaintext: bytes) -> bytes:
        iv = os.urandom(16)
        return iv + _aes_cbc(self._aes_key(key), iv, plaintext, True)

    def decrypt(self, key: bytes, ciphertext: bytes) -> bytes:
        if len(ciphertext) < 16:
            raise PinProtocolError("ciphertext shorter than its IV")
        return _aes_cbc(self._aes_key(key), ciphertext[:16], ciphertext[16:], False)

    def authenticate(self, key: bytes, message: bytes) -> bytes:
        # With the shared secret, the HMAC key is its first half; a pinUvAuthToken is used whole.
        return hmac.new(key[:32], message, hashlib.sha256).digest()


PROTOCOLS: dict[int, type[AuthenticatorPinProtocol]] = {2: PinProtocolV2, 1: PinProtocolV1}
