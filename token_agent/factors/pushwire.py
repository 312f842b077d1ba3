"""What a push companion holds, signs and sends: the records, the signed bytes, and the
companion file of the command-line companion (``token-agent approve``). Pure: no store.
``token_agent.factors.push`` (which re-exports all of this) decides; its docstring describes
the protocol.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..outcome import Reason
from . import FactorError

COMPANION_VERSION = 1
APPROVE = "approve"
DENY = "deny"

ANSWER_PREFIX = b"token-agent push v1\0"
PAIRING_PREFIX = b"token-agent push pairing v1\0"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class CompanionFileError(FactorError):
    """A companion file cannot be read or written (missing, damaged, readable by others,
    in the way)."""

    def __init__(self, message: str, reason: Reason = Reason.NO_CREDENTIAL) -> None:
        super().__init__(reason, message)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Companion:
    """The companion app's side: its device id, the user and issuer it was enrolled for,
    and its Ed25519 private key (never shown by ``repr``)."""

    device_id: str
    username: str
    issuer: str
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)

    def __repr__(self) -> str:
        return (f"Companion(device_id={self.device_id!r}, username={self.username!r}, "
                f"issuer={self.issuer!r}, private_key=<hidden>)")

    def public_key_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class PushRequest:
    """A request as the login side sees it: ``number`` is shown on the login screen."""

    id: str
    method_id: int
    number: int
    created_at: float
    expires_at: float
    context: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"id": self.id, "method_id": self.method_id, "number": self.number,
                "created_at": self.created_at, "expires_at": self.expires_at,
                "context": dict(self.context)}


@dataclass(frozen=True)
class PendingPush:
    """A request as the companion app sees it: what to show, never the number."""

    id: str
    created_at: float
    expires_at: float
    context: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"id": self.id, "created_at": self.created_at, "expires_at": self.expires_at,
                "context": dict(self.context)}


@dataclass(frozen=True)
class SignedAnswer:
    """The companion's answer to one request, signed with its key (``answer``)."""

    device_id: str
    request_id: str
    decision: str  # "approve" or "deny"
    number: int | None
    signature: bytes = field(repr=False)

    def to_json(self) -> dict:
        return {"version": 1, "device_id": self.device_id, "request_id": self.request_id,
                "decision": self.decision, "number": self.number,
                "signature": base64.b64encode(self.signature).decode("ascii")}

    @classmethod
    def from_json(cls, data: Any) -> "SignedAnswer":
        """The answer from its JSON form (e.g. sent by another process); ``FactorError``
        (verification-failed) when malformed."""
        bad = FactorError(Reason.VERIFICATION_FAILED, "the push answer is malformed")
        if not isinstance(data, dict) or data.get("version") != 1:
            raise bad
        number = data.get("number")
        if not all(isinstance(data.get(k), str) for k in ("device_id", "request_id", "decision",
                                                          "signature")):
            raise bad
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
            raise bad
        try:
            signature = base64.b64decode(data["signature"], validate=True)
        except (binascii.Error, ValueError):
            raise bad from None
        return cls(data["device_id"], data["request_id"], data["decision"], number, signature)


# --------------------------------------------------------------------------- companion file


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_companion(path: str | os.PathLike[str]) -> Companion:
    """Read a companion file. ``CompanionFileError`` when it is missing, not a regular
    file, readable or writable by group or others (refused: "chmod 600" it), not JSON, of
    another version, or damaged."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CompanionFileError(f"companion file {path} does not exist: enrol the companion "
                                 "app first (or give the right path)") from None
    except OSError as exc:
        raise CompanionFileError(f"cannot read companion file {path}: "
                                 f"{exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CompanionFileError(f"companion file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise CompanionFileError(
                f"companion file {path} can be read by others (mode {mode:04o}): it holds the "
                f"companion app's private key; chmod 600 {path} (and check who could have "
                "copied it: if in doubt, remove the companion app and enrol it again)")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 65536:
                raise CompanionFileError(f"companion file {path} is too large to be one")
    except OSError as exc:
        raise CompanionFileError(f"cannot read companion file {path}: "
                                 f"{exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        data = json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CompanionFileError(f"companion file {path} is not JSON: is it a companion "
                                 "file? (it may be damaged: enrol the companion app again)") from None
    if not isinstance(data, dict):
        raise CompanionFileError(f"companion file {path} is not a JSON object")
    if data.get("version") != COMPANION_VERSION:
        raise CompanionFileError(f"companion file {path} has version {data.get('version')!r}; "
                                 f"this token-agent reads version {COMPANION_VERSION}")
    damaged = f"companion file {path} is damaged"
    for key in ("device_id", "user", "issuer", "private_key"):
        if not isinstance(data.get(key), str):
            raise CompanionFileError(f"{damaged}: {key!r} is missing or not a string")
    try:
        device_id = str(uuid.UUID(data["device_id"]))
    except ValueError:
        raise CompanionFileError(f"{damaged}: 'device_id' is not a UUID") from None
    try:
        raw = base64.b64decode(data["private_key"], validate=True)
    except (binascii.Error, ValueError):
        raise CompanionFileError(f"{damaged}: the private key is not base64") from None
    if len(raw) != 32:
        raise CompanionFileError(f"{damaged}: the private key is {len(raw)} bytes, not 32")
    return Companion(device_id, data["user"], data["issuer"],
                     Ed25519PrivateKey.from_private_bytes(raw))


def _check_request_id(request_id: Any) -> str:
    if not isinstance(request_id, str) or not _REQUEST_ID_RE.fullmatch(request_id):
        raise FactorError(Reason.VERIFICATION_FAILED, "not a push request id")
    return request_id


def _pairing_bytes(device_id: str, challenge: bytes) -> bytes:
    return PAIRING_PREFIX + device_id.encode() + b"\0" + bytes(challenge)


def answer_bytes(request_id: str, decision: str, number: int | None) -> bytes:
    """The canonical bytes a companion signs for an answer."""
    _check_request_id(request_id)
    if decision not in (APPROVE, DENY):
        raise ValueError(f"a decision is {APPROVE!r} or {DENY!r}, not {decision!r}")
    if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
        raise ValueError("the number is an integer (or None)")
    text = "" if number is None else str(number)
    return ANSWER_PREFIX + request_id.encode() + b"\0" + decision.encode() + b"\0" + text.encode()


def companion_sign_pairing(companion: Companion, challenge: bytes) -> bytes:
    """The companion side of the pairing: its signature over the challenge."""
    return companion.private_key.sign(_pairing_bytes(companion.device_id, challenge))


def answer(companion: Companion, request_id: str, *, approve: bool,
           number: int | None) -> SignedAnswer:
    """The companion's signed answer (pure: nothing is sent). Approving needs the number
    the user read on the login screen."""
    decision = APPROVE if approve else DENY
    if approve and number is None:
        raise ValueError("approving needs the number shown on the login screen")
    signature = companion.private_key.sign(answer_bytes(request_id, decision, number))
    return SignedAnswer(companion.device_id, request_id, decision, number, signature)
