"""Persistent state of the virtual key, kept apart from its volatile state.

Persistent (survives power cycles; optionally in a state file): the device's secrets, the PIN
(as LEFT(SHA-256(PIN), 16), as the spec stores it) and its retry counter, the configuration
(minimum PIN length, forcePINChange, alwaysUv), the discoverable credentials and the signature
counter. Volatile state (PIN tokens, key agreement keys, the PIN_AUTH_BLOCKED state, pending
getNextAssertion) lives in :class:`simulators.key.authenticator.VirtualAuthenticator` and is
cleared at every power-up.

The state file is JSON, written with mode 0600 to a temporary file, fsync'd and renamed over
the old one, so a crash mid-write leaves either the old state or the new one, never half.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..atomicfile import write_private
from .credentials import Credential

FORMAT_VERSION = 1
PIN_RETRIES = 8
DEFAULT_MIN_PIN_LENGTH = 4
DEFAULT_CAPACITY = 25
#: The serialized large-blob array of a new key: CBOR [] and its 16-byte checksum (section 6.10).
EMPTY_LARGE_BLOB_ARRAY = b"\x80" + hashlib.sha256(b"\x80").digest()[:16]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class StateFileError(Exception):
    """The state file cannot be read: corrupt, of an unknown version, or unreadable."""


@dataclass
class PersistentState:
    model: str = "ta-vk1"
    wrap_key: bytes = field(default_factory=lambda: os.urandom(32))
    pin_hash: bytes | None = None  # LEFT(SHA-256(PIN), 16)
    pin_length: int = 0  # in Unicode code points
    pin_retries: int = PIN_RETRIES
    min_pin_length: int = DEFAULT_MIN_PIN_LENGTH
    min_pin_rp_ids: list[str] = field(default_factory=list)
    force_pin_change: bool = False
    always_uv: bool = False
    counter: int = 0
    capacity: int = DEFAULT_CAPACITY
    credentials: list[Credential] = field(default_factory=list)  # discoverable only
    creation_seq: int = 0
    large_blob_array: bytes = EMPTY_LARGE_BLOB_ARRAY

    # -- (de)serialisation ----------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "model": self.model,
            "wrap_key": _b64(self.wrap_key),
            "pin_hash": _b64(self.pin_hash) if self.pin_hash else None,
            "pin_length": self.pin_length,
            "pin_retries": self.pin_retries,
            "min_pin_length": self.min_pin_length,
            "min_pin_rp_ids": list(self.min_pin_rp_ids),
            "force_pin_change": self.force_pin_change,
            "always_uv": self.always_uv,
            "counter": self.counter,
            "capacity": self.capacity,
            "creation_seq": self.creation_seq,
            "large_blob_array": _b64(self.large_blob_array),
            "credentials": [
                {
                    "id": _b64(c.id),
                    "rp_id_hash": _b64(c.rp_id_hash),
                    "alg": c.alg,
                    "seed": _b64(c.seed),
                    "cred_protect": c.cred_protect,
                    "hmac_secret": c.hmac_secret,
                    "large_blob_key": c.large_blob_key,
                    "rp": c.rp,
                    "user": {k: (_b64(v) if k == "id" else v) for k, v in c.user.items()},
                    "created": c.created,
                }
                for c in self.credentials
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> "PersistentState":
        if data.get("format") != FORMAT_VERSION:
            raise StateFileError(f"unsupported state format {data.get('format')!r}")
        try:
            creds = [
                Credential(
                    id=_unb64(c["id"]),
                    rp_id_hash=_unb64(c["rp_id_hash"]),
                    alg=int(c["alg"]),
                    seed=_unb64(c["seed"]),
                    cred_protect=int(c["cred_protect"]),
                    hmac_secret=bool(c["hmac_secret"]),
                    discoverable=True,
                    large_blob_key=bool(c.get("large_blob_key", False)),
                    rp=dict(c["rp"]),
                    user={k: (_unb64(v) if k == "id" else v) for k, v in c["user"].items()},
                    created=int(c["created"]),
                )
                for c in data["credentials"]
            ]
            return cls(
                model=data["model"],
                wrap_key=_unb64(data["wrap_key"]),
                pin_hash=_unb64(data["pin_hash"]) if data["pin_hash"] else None,
                pin_length=int(data["pin_length"]),
                pin_retries=int(data["pin_retries"]),
                min_pin_length=int(data["min_pin_length"]),
                min_pin_rp_ids=list(data["min_pin_rp_ids"]),
                force_pin_change=bool(data["force_pin_change"]),
                always_uv=bool(data["always_uv"]),
                counter=int(data["counter"]),
                capacity=int(data["capacity"]),
                creation_seq=int(data["creation_seq"]),
                large_blob_array=_unb64(data["large_blob_array"]),
                credentials=creds,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StateFileError(f"state file malformed: {e!r}") from None


class StateStore:
    """Holds the persistent state, in memory or backed by a file."""

    def __init__(self, path: str | os.PathLike | None = None, **defaults) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            self.state = self.load(self.path)
        else:
            self.state = PersistentState(**defaults)
            self.save()

    @staticmethod
    def load(path: Path) -> PersistentState:
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise StateFileError(f"cannot read virtual key state {path}: {e}") from None
        if not isinstance(data, dict):
            raise StateFileError(f"virtual key state {path} is not a JSON object")
        return PersistentState.from_json(data)

    def save(self) -> None:
        """Write the state atomically (no-op for an in-memory key)."""
        if self.path is None:
            return
        with self._lock:
            write_private(self.path, json.dumps(self.state.to_json(), indent=1).encode("utf-8"))
