"""token_agent/secretbox.py: the key file, encryption bound to its record, keyed hashes,
password hashing."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from token_agent.secretbox import (
    KEY_FILE_ENV, SecretError, SecretKeys, equal, hash_password, needs_rehash, verify_password,
)


def test_key_file_is_created_once_private_and_agreed_on(tmp_path):
    keys: list[SecretKeys] = []
    threads = [threading.Thread(target=lambda: keys.append(SecretKeys.load_or_create(tmp_path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({k.code_hash("p", "v") for k in keys}) == 1  # every process the same key
    assert os.listdir(tmp_path) == ["secrets.key"]  # no temporary file left
    assert stat.S_IMODE((tmp_path / "secrets.key").stat().st_mode) == 0o600
    assert "hidden" in repr(keys[0])


def test_key_file_elsewhere_and_damaged(tmp_path):
    other = tmp_path / "elsewhere.key"
    SecretKeys.load_or_create(tmp_path / "unused", {KEY_FILE_ENV: str(other)})
    assert other.exists() and not (tmp_path / "unused").exists()
    other.write_bytes(b"short")
    with pytest.raises(SecretError, match="damaged"):
        SecretKeys.load_or_create(tmp_path, {KEY_FILE_ENV: str(other)})
    os.chmod(tmp_path / "elsewhere.key", 0o644)
    other.write_bytes(os.urandom(32))
    SecretKeys.load_or_create(tmp_path, {KEY_FILE_ENV: str(other)})
    assert stat.S_IMODE(other.stat().st_mode) == 0o600  # tightened


def test_encryption_is_bound_to_its_record_and_key(tmp_path):
    keys = SecretKeys.load_or_create(tmp_path)
    blob = keys.encrypt(b"JBSWY3DPEHPK3PXP", b"totp:1")
    assert b"JBSWY3DPEHPK3PXP" not in blob
    assert keys.decrypt(blob, b"totp:1") == b"JBSWY3DPEHPK3PXP"
    with pytest.raises(SecretError, match="altered, moved"):
        keys.decrypt(blob, b"totp:2")
    with pytest.raises(SecretError):
        keys.decrypt(blob[:-1] + bytes([blob[-1] ^ 1]), b"totp:1")
    with pytest.raises(SecretError):
        SecretKeys(os.urandom(32)).decrypt(blob, b"totp:1")
    assert keys.code_hash("otp:1", "123456") != keys.code_hash("otp:2", "123456")


def test_passwords():
    stored = hash_password("correct horse battery")
    assert stored.startswith("scrypt$") and "correct" not in stored
    assert verify_password("correct horse battery", stored)
    assert not verify_password("Correct horse battery", stored)
    assert not verify_password("", stored)
    assert not needs_rehash(stored)
    weak = hash_password("correct horse battery", n=2 ** 12)
    assert verify_password("correct horse battery", weak) and needs_rehash(weak)
    with pytest.raises(SecretError):
        verify_password("x", "md5$abc")
    with pytest.raises(ValueError):
        hash_password("")
    assert equal("123456", "123456") and not equal(b"123456", b"123457")
