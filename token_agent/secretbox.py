"""Secrets at rest: the data directory's key, encryption of stored secrets, keyed hashes of
codes, password hashing, and constant-time comparison.

The key file
    ``DATA_DIR/secrets.key``: 32 random bytes, mode 0600, created on first use (atomically:
    written to a private temporary file, flushed to disk, then linked into place, so two
    processes starting together agree on one key and a crash never leaves a short key).
    Two keys are derived from it with HKDF-SHA256: one for AES-256-GCM (authenticator-app
    secrets), one for HMAC-SHA256 (one-time codes, backup codes, app passwords). A copy of
    the store without the key file gives away neither the secrets nor a way to test codes
    offline. Keep the key file out of backups that travel with the store, or back it up
    apart. ``TOKEN_AGENT_KEY_FILE`` points elsewhere (e.g. a file on a tmpfs filled from the
    OS keyring or a TPM at boot). The file and its directory must be the running user's (or
    root's), not writable by group or others, and not symbolic links (``filetrust.py``):
    otherwise ``SecretError`` naming the path and the fix, and nothing is read or created.

Passwords
    scrypt (``hashlib.scrypt``), N=2**15, r=8, p=1 (32 MiB, about 0.1 s here), 16-byte salt,
    in a self-describing string ``scrypt$N$r$p$salt$hash`` so the cost can be raised later:
    ``needs_rehash`` says when a stored hash is weaker than the current parameters.

Comparisons
    Every comparison of a code, hash or password digest goes through ``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .atomicfile import write_private
from .filetrust import UntrustedPath, check_private_dir, check_private_file, read_private_file

KEY_FILENAME = "secrets.key"
KEY_FILE_ENV = "TOKEN_AGENT_KEY_FILE"
KEY_LEN = 32
_BLOB_VERSION = 1

SCRYPT_N = 2 ** 15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_LEN = 16
SCRYPT_DKLEN = 32
_SCRYPT_MAXMEM = 256 * 1024 * 1024
MAX_PASSWORD_LEN = 1024


class SecretError(Exception):
    """A secret cannot be protected or recovered (key file unusable, data tampered with)."""


def equal(a: bytes | str, b: bytes | str) -> bool:
    """Constant-time comparison (``hmac.compare_digest``); strings are compared as UTF-8."""
    if isinstance(a, str):
        a = a.encode()
    if isinstance(b, str):
        b = b.encode()
    return hmac.compare_digest(a, b)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------- passwords


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The scrypt hash of ``password`` as ``scrypt$N$r$p$salt$hash`` (base64url)."""
    if not isinstance(password, str) or not password:
        raise ValueError("a password must be a non-empty string")
    if len(password) > MAX_PASSWORD_LEN:
        raise ValueError(f"a password is at most {MAX_PASSWORD_LEN} characters")
    salt = secrets.token_bytes(SCRYPT_SALT_LEN)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM,
                            dklen=SCRYPT_DKLEN)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _parse_password_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        return int(n), int(r), int(p), _unb64(salt), _unb64(digest)
    except (ValueError, AttributeError):
        raise SecretError("the stored password hash is not in a known format") from None


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the stored hash (constant-time on the digest)."""
    n, r, p, salt, digest = _parse_password_hash(stored)
    if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD_LEN:
        # still spend the time, so the answer's timing says nothing
        password = "\0"
    candidate = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                               maxmem=_SCRYPT_MAXMEM, dklen=len(digest))
    return hmac.compare_digest(candidate, digest)


def needs_rehash(stored: str) -> bool:
    """Whether a stored hash uses weaker parameters than the current ones."""
    n, r, p, _, _ = _parse_password_hash(stored)
    return (n, r, p) < (SCRYPT_N, SCRYPT_R, SCRYPT_P) or n < SCRYPT_N


# --------------------------------------------------------------------------- the key file


def key_file_path(data_dir: str | os.PathLike[str], environ: dict | None = None) -> Path:
    """``TOKEN_AGENT_KEY_FILE`` when set, else ``DATA_DIR/secrets.key``."""
    env = os.environ if environ is None else environ
    explicit = env.get(KEY_FILE_ENV)
    return Path(explicit) if explicit else Path(data_dir) / KEY_FILENAME


def _create_key_file(path: Path) -> None:
    """A new key file, unless another process made one first (then theirs is the key)."""
    try:
        write_private(path, secrets.token_bytes(KEY_LEN), exclusive=True)
    except FileExistsError:
        pass


class SecretKeys:
    """The keys derived from the key file: ``encrypt``/``decrypt`` (AES-256-GCM, with the
    record's identity as associated data, so a ciphertext moved to another record does not
    decrypt) and ``code_hash`` (HMAC-SHA256)."""

    def __init__(self, master: bytes) -> None:
        if len(master) != KEY_LEN:
            raise SecretError(f"the key must be {KEY_LEN} bytes")
        self._enc = HKDF(hashes.SHA256(), 32, salt=None, info=b"token-agent aes-gcm v1").derive(master)
        self._mac = HKDF(hashes.SHA256(), 32, salt=None, info=b"token-agent hmac v1").derive(master)
        self._aead = AESGCM(self._enc)

    def __repr__(self) -> str:
        return "<SecretKeys (hidden)>"

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str],
                       environ: dict | None = None) -> "SecretKeys":
        """The keys of this data directory, creating the key file on first use."""
        path = key_file_path(data_dir, environ)
        try:
            # its directory and the file: ours or root's, not writable by others, no links
            check_private_dir(path.parent, "key file's directory")
            st = check_private_file(path, "key file")
            if st is None:
                _create_key_file(path)
                st = check_private_file(path, "key file")
            if st.st_mode & 0o077:
                try:
                    os.chmod(path, 0o600)
                except OSError:
                    raise SecretError(f"key file {path} can be read by others (mode "
                                      f"{st.st_mode & 0o777:04o}) and cannot be tightened: "
                                      "chmod 600 it") from None
            master = read_private_file(path, "key file")
        except UntrustedPath as exc:
            raise SecretError(f"cannot use the key file: {exc}") from None
        except OSError as exc:
            raise SecretError(f"cannot use the key file {path}: {exc.strerror or exc}") from None
        if len(master) != KEY_LEN:
            raise SecretError(f"key file {path} is damaged ({len(master)} bytes, expected "
                              f"{KEY_LEN}): restore it from a backup (without it the stored "
                              "authenticator-app secrets cannot be read)")
        return cls(master)

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """``version || nonce || ciphertext+tag``."""
        nonce = secrets.token_bytes(12)
        return bytes([_BLOB_VERSION]) + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        blob = bytes(blob)
        if len(blob) < 1 + 12 + 16 or blob[0] != _BLOB_VERSION:
            raise SecretError("a stored secret is damaged or of an unknown format")
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], aad)
        except InvalidTag:
            raise SecretError("a stored secret does not decrypt: it was altered, moved to "
                              "another record, or the key file is not the one it was "
                              "written with") from None

    def code_hash(self, purpose: str, value: str) -> bytes:
        """HMAC-SHA256 of ``value`` for ``purpose`` (e.g. ``"otp:42"``): what is stored of a
        one-time code, a backup code or an app password."""
        return hmac.new(self._mac, purpose.encode() + b"\0" + value.encode(), hashlib.sha256).digest()
