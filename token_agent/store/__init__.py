"""The agent's store: users, their authentication methods, audit events, settings.

One SQLite file (``paths.store_path(paths.data_dir(...))``), through the standard library's
``sqlite3`` only.

File and durability
    The file is created with mode 0600 whatever the umask (SQLite gives its ``-wal`` and
    ``-shm`` files the same mode); an existing file that group or others may read is
    tightened to 0600 with a warning (or only the warning when that is not allowed). The
    directory and the files must be the running user's (or root's), not writable by group
    or others, and not symbolic links (``filetrust.py``): otherwise ``StoreFileError``
    (reason ``untrusted``), naming the path and the fix, before anything is touched.
    ``Store.open(path, create=False)`` (for commands that only read) creates nothing: a
    missing store is ``StoreMissing``.
    ``journal_mode=WAL``, ``synchronous=FULL`` (every commit is on disk when ``commit``
    returns: a login is rare and must survive a crash or power cut), ``foreign_keys=ON``,
    ``secure_delete=ON`` (deleted rows are overwritten), ``trusted_schema=OFF`` and a busy
    timeout, so that several processes (the service, the CLI) can share the file. WAL needs
    every process on one machine: a store on a network file system shared by several
    workstations is not supported.

Schema and migrations
    The schema version is ``PRAGMA user_version``; ``MIGRATIONS`` is the ordered list of
    migrations, version *n* being ``MIGRATIONS[n-1]``. Opening a store applies the missing
    ones, each in its own ``BEGIN IMMEDIATE`` transaction together with its
    ``user_version`` bump and its ``schema_history`` row, so a failed or interrupted
    migration leaves the store at the previous version. A store of a newer version than this
    code knows is refused (``SchemaTooNew``), untouched. ``PRAGMA application_id`` marks the
    file as a token-agent store; another program's SQLite file is refused, untouched. To grow
    the schema, append a ``Migration`` (never edit a released one); a migration that rebuilds
    a table sets ``foreign_keys_off=True`` and the runner checks ``foreign_key_check``
    before it commits.

    Authentication methods of every kind share the ``methods`` table (owner, kind, name,
    created / last used, flag); each kind keeps its own details in a table keyed by the
    method id (``fido2_credentials`` now; smartcards, TOTP, codes, ... later), so that
    "the user's methods", "the preferred method", "remove all methods of a user" and
    per-method lockouts have one place to live.

Transactions
    ``with store.transaction():`` groups writes (``BEGIN IMMEDIATE`` ... ``COMMIT``; any
    exception, ``KeyboardInterrupt`` included, rolls back): a ceremony's credential, sign
    count and audit event are written together or not at all. Every write method runs in
    one itself, so it joins the caller's. A nested ``transaction()`` is a savepoint inside
    the outer transaction: an exception leaving the inner block undoes only the inner
    writes, and nothing is committed before the outermost block ends. Keep transactions
    short: never wait for a touch, a PIN or the network inside one (other threads, and other
    processes after the busy timeout, wait for it).

Threads
    One ``Store`` has one SQLite connection (``check_same_thread=False``) guarded by a
    re-entrant lock: every method holds the lock while it uses the connection, and a
    transaction holds it from ``BEGIN`` to ``COMMIT``/``ROLLBACK``. So a ``Store`` may be
    shared by threads; their calls are serialised, and one thread's calls never join
    another thread's open transaction (they wait for it to end). For parallel readers, open
    one ``Store`` per thread: SQLite's WAL lets readers proceed while a writer writes.

Errors
    Every error is a ``StoreError``. File-level problems (cannot create or open, not
    writable, not a SQLite database, corrupt, locked, disk full) are ``StoreFileError``,
    whose message names the file and says what to do; nothing is written when one is
    raised. ``UnknownUser``, ``UserExists``, ``CredentialExists``, ``UnknownCredential``,
    ``SignCountRegression``, ``SchemaTooNew`` and ``AuditChainBroken`` are the domain
    errors; ``InvalidValue`` (also a ``ValueError``) is bad input.

Audit events
    Append-only (triggers refuse UPDATE and DELETE) and hash-chained: each record carries
    the SHA-256 of its predecessor's hash and its own content; ``verify_events`` finds an
    edited, removed or reordered record. A plain hash chain does not stop someone who can
    rewrite the whole file from rewriting the whole chain; anchoring it elsewhere is for
    later. Detail keys that look like secrets (PIN, password, code, secret, token, ...)
    are refused (``check_detail``): secrets never reach the audit table. An event is never
    refused for its size: strings of its detail past ``MAX_DETAIL_STRING`` characters, a
    detail past ``MAX_DETAIL_BYTES`` and a user name past ``MAX_USERNAME_LEN`` are cut, with
    a marker giving the original length (``record_event``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..filetrust import UntrustedPath, check_private_dir, check_private_file
from ..usernames import MAX_USERNAME_LEN, username_problem

log = logging.getLogger(__name__)

#: ``PRAGMA application_id`` of a token-agent store ("TkAg")
APPLICATION_ID = 0x546B4167
#: seconds a statement waits for another process's lock before ``StoreFileError``
DEFAULT_BUSY_TIMEOUT = 5.0

#: method kinds (``methods.kind``)
KIND_FIDO2 = "fido2"
#: method kind of a smartcard identity (the holder's UUID in the card's certificate)
KIND_SMARTCARD = "smartcard"
#: method kinds of the second factors and the password (``token_agent.factors``)
KIND_PASSWORD = "password"
KIND_TOTP = "totp"
KIND_EMAIL = "email"
KIND_SMS = "sms"
KIND_VOICE = "voice"
KIND_MESSAGING = "messaging"
KIND_PUSH = "push"
KIND_APP_PASSWORD = "app_password"
KIND_BACKUP_CODES = "backup_codes"
#: every method kind the store knows
METHOD_KINDS = (KIND_PASSWORD, KIND_FIDO2, KIND_SMARTCARD, KIND_TOTP, KIND_EMAIL, KIND_SMS,
                KIND_VOICE, KIND_MESSAGING, KIND_PUSH, KIND_APP_PASSWORD, KIND_BACKUP_CODES)
#: user classes (``users.user_class``) of the MFA policy
USER_CLASSES = ("internal", "external", "contributor")
#: who set a user's own MFA flag (``users.mfa_source``): the policy's new-accounts default,
#: an administrator, the user themself
MFA_SOURCES = ("new-account", "admin", "user")
#: a smartcard holder's UUID (NHS: 12 digits; other PKIs: letters, digits and . _ : -)
CARD_UUID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")

# Setting names (the same as token_agent/settings.py, which validates their values).
#: setting: the WebAuthn relying party id (one per organisation), a string
SETTING_RP_ID = "rp_id"
#: setting: the relying party's display name, a string
SETTING_RP_NAME = "rp_name"
#: setting: AAGUIDs (canonical UUID strings) whose attestation is accepted, a list
SETTING_ALLOWED_AAGUIDS = "allowed_aaguids"
#: setting: trusted attestation root certificates, a list of PEM strings
SETTING_ATTESTATION_ROOTS = "attestation_roots"
#: setting: user verification policy: "required", "preferred" or "discouraged"
SETTING_USER_VERIFICATION = "user_verification"

ROLE_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
EVENT_KIND_RE = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}")
OUTCOME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
SETTING_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")
MAX_NAME_LEN = 64
MAX_DISPLAY_NAME_LEN = 128
MAX_CREDENTIAL_ID_LEN = 1023  # WebAuthn's limit
MAX_DETAIL_BYTES = 16384
#: longest string value of an audit detail recorded (characters); longer ones are cut
MAX_DETAIL_STRING = 1024
USER_HANDLE_LEN = 32
_GENESIS_HASH = bytes(32)


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class of every error of the store; the message is meant for the user."""


class StoreFileError(StoreError):
    """The store file cannot be used (created, opened, written, read); nothing was written.

    ``path`` is the file, ``reason`` a short description (``"not writable"``, ...).
    """

    def __init__(self, message: str, *, path: Path, reason: str,
                 run_as: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason
        #: root met another user's data directory: the user to run as (``filetrust.py``)
        self.run_as = run_as


class StoreMissing(StoreFileError):
    """There is no store at ``path`` and the caller asked not to create one
    (``Store.open(..., create=False)``: a command that only reads); nothing was created."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message, path=path, reason="missing")


class SchemaTooNew(StoreError):
    """The store was written by a newer token-agent than this one."""

    def __init__(self, message: str, *, path: Path, found: int, known: int) -> None:
        super().__init__(message)
        self.path = path
        self.found = found
        self.known = known


class InvalidValue(StoreError, ValueError):
    """A value given to the store is not acceptable (bad username, secret-looking key...)."""


class UnknownUser(StoreError, LookupError):
    """No such user."""


class UserExists(StoreError):
    """A user with that username (compared case-insensitively) already exists."""


class CredentialExists(StoreError):
    """The credential id is already enrolled, or the user already has a credential of that name."""


class UnknownCredential(StoreError, LookupError):
    """No such credential."""


class SignCountRegression(StoreError):
    """A signature counter that did not increase: possibly a cloned authenticator.

    Raised by ``record_fido_use``, which then writes nothing; flagging the credential and
    recording the event is the caller's decision.
    """

    def __init__(self, message: str, *, stored: int, received: int) -> None:
        super().__init__(message)
        self.stored = stored
        self.received = received


class AuditChainBroken(StoreError):
    """The audit events' hash chain does not verify: a record was edited, removed or moved."""

    def __init__(self, message: str, *, event_id: int | None) -> None:
        super().__init__(message)
        self.event_id = event_id


# --------------------------------------------------------------------------- records


def _b64url(data: bytes | None) -> str | None:
    if data is None:
        return None
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class User:
    """A person who can log in.

    ``id`` is a stable UUID4 string (what other records refer to); ``username`` is unique,
    compared case-insensitively and kept as given; ``user_handle`` is 32 random bytes, the
    WebAuthn ``user.id`` shared by all of the user's keys; ``roles`` is sorted;
    ``created_at`` is seconds since the epoch.
    """

    id: str
    username: str
    display_name: str
    roles: list[str]
    user_handle: bytes
    created_at: float
    disabled: bool
    #: the MFA policy's user class: internal (request handlers, admins), external, contributor
    user_class: str = "internal"
    #: whether MFA is on for the account itself (it matters where the class leaves MFA
    #: optional); new accounts: as the policy's new-accounts default for their class says
    mfa_enabled: bool = True
    #: who set ``mfa_enabled``: one of :data:`MFA_SOURCES`, or None (an account older than
    #: the record)
    mfa_source: str | None = "new-account"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``user_handle`` as unpadded base64url)."""
        d = asdict(self)
        d["user_handle"] = _b64url(self.user_handle)
        return d


@dataclass(frozen=True, slots=True)
class FidoCredential:
    """A FIDO2 credential (a key enrolled for a user).

    ``id`` is the method's row id; ``name`` is user-given and unique (case-insensitively) per
    user; ``credential_id`` is globally unique; ``public_key`` is the CBOR-encoded COSE key;
    ``aaguid`` a canonical UUID string; ``uv_enrolled`` whether user verification was
    performed at enrolment; ``flagged``/``flag_reason`` mark a credential under suspicion
    (e.g. a signature counter regression).
    """

    id: int
    user_id: str
    name: str
    credential_id: bytes
    public_key: bytes
    aaguid: str
    sign_count: int
    rp_id: str
    discoverable: bool
    uv_enrolled: bool
    attestation_format: str
    attestation_trusted: bool
    transports: list[str]
    created_at: float
    last_used_at: float | None
    flagged: bool
    flag_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (bytes as unpadded base64url)."""
        d = asdict(self)
        d["credential_id"] = _b64url(self.credential_id)
        d["public_key"] = _b64url(self.public_key)
        return d


@dataclass(frozen=True, slots=True)
class SmartcardIdentity:
    """A smartcard identity enrolled for a user: the holder UUID that the card's
    authentication certificate carries (any card issued to that person, renewals included,
    logs them in). ``id`` is the method's row id; ``name`` unique per user;
    ``certificate_serial`` / ``issuer`` are those of the last card used (None before)."""

    id: int
    user_id: str
    name: str
    uuid: str
    holder_name: str
    certificate_serial: str | None
    issuer: str | None
    created_at: float
    last_used_at: float | None
    flagged: bool
    flag_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Method:
    """One authentication method of a user, of any kind (the ``methods`` table): what
    "the user's methods", "the preferred method" and "remove all methods" work on. Details
    of each kind live in that kind's table (``token_agent.factors`` reads them)."""

    id: int
    user_id: str
    kind: str
    name: str
    created_at: float
    last_used_at: float | None
    flagged: bool
    flag_reason: str | None
    preferred: bool
    confirmed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit record. ``username`` is the user's name when the event was recorded (it
    stays readable after the user is removed); ``detail`` is a JSON object; ``hash`` is the
    record's link in the hash chain."""

    id: int
    at: float
    kind: str
    outcome: str
    user_id: str | None
    username: str | None
    credential_id: bytes | None
    detail: dict[str, Any]
    hash: bytes = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (bytes as unpadded base64url / hex)."""
        d = asdict(self)
        d["credential_id"] = _b64url(self.credential_id)
        d["hash"] = self.hash.hex()
        return d


@dataclass(frozen=True, slots=True)
class LoginSession:
    """A session the service holds for a successful login (schema migration 4), kept in the
    store so that it survives a restart of the service. ``state``: active, locked (its card
    left) or ended; a card-bound session names its card (reader, ATR as hex, the
    certificate's serial), others have ``None`` there. ``username`` is kept as it was at
    the login."""

    id: str
    user_id: str
    username: str
    method: str
    created_at: float
    updated_at: float
    state: str
    end_reason: str | None
    device_id: str | None
    card_reader: str | None
    card_atr: str | None
    card_serial: str | None

    @property
    def card_bound(self) -> bool:
        return self.card_reader is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: session states (``sessions.state``)
SESSION_STATES = ("active", "locked", "ended")


# --------------------------------------------------------------------------- audit detail


#: words that make a detail key look like a secret
SECRET_WORDS = frozenset({
    "pin", "pins", "puk", "password", "passwords", "passwd", "pwd", "passphrase", "passcode",
    "code", "codes", "otp", "totp", "hotp", "secret", "secrets", "token", "tokens",
    "private", "privkey", "seed", "cookie", "authorization",
})
#: stems that make a single fused word (``newpin``, ``authtoken``) look like a secret
SECRET_STEMS = ("pin", "password", "passwd", "passphrase", "passcode", "pwd", "code", "otp",
                "secret", "token", "puk")
#: words that make a secret-looking key describe a secret rather than carry it
#: (``pin_retries``, ``error_code``, ``token_type``)
#: (words that could as well go with the secret itself, like ``wrong``, ``new`` or ``sent``,
#: are deliberately not here: ``wrong_pin`` and ``sent_code`` are refused)
METADATA_WORDS = frozenset({
    "retries", "tries", "attempts", "remaining", "left", "length", "len", "count", "blocked",
    "status", "state", "error", "exit", "type", "kind", "policy", "required", "configured",
    "enabled", "disabled", "supported", "changed", "expired", "expires", "expiry", "age",
    "format", "id", "is", "has",
})


_ACRONYM_RE = re.compile(r"([A-Z]+)([A-Z][a-z])")
_CAMEL_RE = re.compile(r"([a-z0-9])([A-Z])")
_WORD_SPLIT_RE = re.compile(r"[^a-z0-9]+")


def _key_words(key: str) -> list[str]:
    spaced = _ACRONYM_RE.sub(r"\1_\2", key)
    spaced = _CAMEL_RE.sub(r"\1_\2", spaced)
    return [w for w in _WORD_SPLIT_RE.split(spaced.lower()) if w]


@functools.lru_cache(maxsize=1024)  # a pure function of the key; the same keys come back
def secret_looking(key: str) -> bool:
    """Whether a detail key looks like it would hold a secret.

    The key is split into words (``_``, ``-``, ``.``, spaces, camelCase). It looks like a
    secret when a word is a secret word (``pin``, ``password``, ``code``, ``secret``,
    ``token``, ``otp``, ...) or begins or ends with one (``newpin``, ``authtoken``), unless
    another word says it is about the secret rather than the secret itself (``pin_retries``,
    ``error_code``, ``token_type``, ``code_length``).
    """
    words = _key_words(key)
    suspicious = [w for w in words
                  if w in SECRET_WORDS or any(w.startswith(s) or w.endswith(s) for s in SECRET_STEMS)]
    if not suspicious:
        return False
    return not any(w in METADATA_WORDS for w in words if w not in suspicious)


def _cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and a marker giving its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[truncated: {len(text)} characters]"


def check_detail(detail: Mapping[str, Any] | None, *, truncate: bool = False) -> str:
    """Validate an audit detail and return its canonical JSON text.

    Raises ``InvalidValue`` (a ``ValueError``) when the detail is not a JSON object of JSON
    values with string keys, or has a key at any depth that looks like a secret
    (``secret_looking``): secrets never reach the audit table. A detail larger than
    ``MAX_DETAIL_BYTES`` raises too, unless ``truncate`` (what ``record_event`` does: an
    event is never lost for its size): then every string longer than ``MAX_DETAIL_STRING``
    characters is cut, with the marker ``...[truncated: N characters]``, and a detail still
    too large becomes ``{"truncated": true, "original_bytes": N, "head": "<the start of
    its JSON text>"}``.
    """
    if detail is None:
        return "{}"
    if not isinstance(detail, Mapping):
        raise InvalidValue(f"audit detail must be a dict, not {type(detail).__name__}")

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise InvalidValue(f"audit detail key {k!r} at {where or 'top level'} is not a string")
                if secret_looking(k):
                    raise InvalidValue(
                        f"audit detail key {k!r} looks like a secret (PIN, password, code, secret, "
                        "token): secrets must never be recorded; record a fact about it instead "
                        "(e.g. 'pin_retries', 'code_length')")
                out[k] = walk(v, f"{where}.{k}" if where else k)
            return out
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            return _cut(value, MAX_DETAIL_STRING) if truncate else value
        if value is None or isinstance(value, (int, float, bool)):
            return value
        raise InvalidValue(
            f"audit detail value at {where!r} is a {type(value).__name__}, not a JSON value")

    def dumps(value: Any) -> str:
        try:
            return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except ValueError as exc:
            raise InvalidValue(f"audit detail is not valid JSON: {exc}") from None

    text = dumps(walk(detail, ""))
    size = len(text.encode())
    if size > MAX_DETAIL_BYTES:
        if not truncate:
            raise InvalidValue(f"audit detail is larger than {MAX_DETAIL_BYTES} bytes")
        text = dumps({"truncated": True, "original_bytes": size,
                      "head": text[:MAX_DETAIL_BYTES // 4]})
    return text


def _event_hash(prev: bytes, event_id: int, at: float, kind: str, outcome: str,
                user_id: str | None, username: str | None, credential_id: bytes | None,
                detail_text: str) -> bytes:
    canonical = json.dumps(
        [event_id, at, kind, outcome, user_id, username,
         credential_id.hex() if credential_id is not None else None, detail_text],
        separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(prev + canonical.encode("ascii")).digest()


# --------------------------------------------------------------------------- migrations


@dataclass(frozen=True)
class Migration:
    """One step of the schema: ``apply(conn)`` runs inside the transaction that also sets
    ``user_version`` to ``version``. It must not commit (``executescript`` commits: use
    ``run_script``). ``foreign_keys_off`` runs it with foreign keys disabled (for table
    rebuilds); ``foreign_key_check`` must then be clean before the commit."""

    version: int
    name: str
    apply: Callable[[sqlite3.Connection], None]
    foreign_keys_off: bool = False


def run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run the SQL statements of ``script`` one by one, inside the current transaction
    (unlike ``executescript``, which commits first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            conn.execute(pending)
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement at the end of a script: {pending.strip()[:80]!r}")


_SCHEMA_V1 = """
CREATE TABLE schema_history (
    version       INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,
    applied_at    REAL NOT NULL,
    agent_version TEXT NOT NULL
);

CREATE TABLE users (
    id           TEXT PRIMARY KEY NOT NULL,
    username     TEXT NOT NULL UNIQUE COLLATE NOCASE,
    display_name TEXT NOT NULL,
    user_handle  BLOB NOT NULL UNIQUE CHECK (typeof(user_handle) = 'blob' AND length(user_handle) BETWEEN 1 AND 64),
    created_at   REAL NOT NULL,
    disabled     INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1))
);

CREATE TABLE user_roles (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role    TEXT NOT NULL,
    PRIMARY KEY (user_id, role)
) WITHOUT ROWID;
CREATE INDEX user_roles_by_role ON user_roles(role);

-- Every authentication method a user holds, of any kind; details per kind in their own tables.
CREATE TABLE methods (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind         TEXT NOT NULL,
    name         TEXT NOT NULL COLLATE NOCASE,
    created_at   REAL NOT NULL,
    last_used_at REAL,
    flagged      INTEGER NOT NULL DEFAULT 0 CHECK (flagged IN (0, 1)),
    flag_reason  TEXT,
    UNIQUE (user_id, kind, name)
);

CREATE TABLE fido2_credentials (
    method_id           INTEGER PRIMARY KEY REFERENCES methods(id) ON DELETE CASCADE,
    credential_id       BLOB NOT NULL UNIQUE
                        CHECK (typeof(credential_id) = 'blob' AND length(credential_id) BETWEEN 1 AND 1023),
    public_key          BLOB NOT NULL CHECK (typeof(public_key) = 'blob' AND length(public_key) > 0),
    aaguid              TEXT NOT NULL,
    sign_count          INTEGER NOT NULL CHECK (sign_count BETWEEN 0 AND 4294967295),
    rp_id               TEXT NOT NULL,
    discoverable        INTEGER NOT NULL CHECK (discoverable IN (0, 1)),
    uv_enrolled         INTEGER NOT NULL CHECK (uv_enrolled IN (0, 1)),
    attestation_format  TEXT NOT NULL,
    attestation_trusted INTEGER NOT NULL CHECK (attestation_trusted IN (0, 1)),
    transports          TEXT NOT NULL DEFAULT '[]'
);

-- Append-only and hash-chained. user_id is not a foreign key: events outlive users.
CREATE TABLE audit_events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    at            REAL NOT NULL,
    kind          TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    user_id       TEXT,
    username      TEXT,
    credential_id BLOB,
    detail        TEXT NOT NULL DEFAULT '{}',
    prev_hash     BLOB NOT NULL,
    hash          BLOB NOT NULL
);
CREATE INDEX audit_events_by_user ON audit_events(user_id, id);
CREATE INDEX audit_events_by_kind ON audit_events(kind, id);
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;

CREATE TABLE settings (
    key        TEXT PRIMARY KEY NOT NULL,
    value      TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


def _migration_1(conn: sqlite3.Connection) -> None:
    run_script(conn, _SCHEMA_V1)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


_SCHEMA_V2 = """
-- A smartcard identity: the holder UUID in a card's authentication certificate.
CREATE TABLE smartcard_identities (
    method_id          INTEGER PRIMARY KEY REFERENCES methods(id) ON DELETE CASCADE,
    uuid               TEXT NOT NULL UNIQUE CHECK (length(uuid) BETWEEN 1 AND 64),
    holder_name        TEXT NOT NULL,
    certificate_serial TEXT,
    issuer             TEXT
);
"""


def _migration_2(conn: sqlite3.Connection) -> None:
    run_script(conn, _SCHEMA_V2)


_SCHEMA_V3 = """
-- The MFA policy's view of a user: their class, and whether MFA is on for the account itself
-- (new accounts: on, as the policy's new_accounts_mfa says; accounts that existed before this
-- migration: off, so only their class's enforcement, from its date, applies to them).
ALTER TABLE users ADD COLUMN user_class TEXT NOT NULL DEFAULT 'internal'
    CHECK (user_class IN ('internal', 'external', 'contributor'));
ALTER TABLE users ADD COLUMN mfa_enabled INTEGER NOT NULL DEFAULT 0 CHECK (mfa_enabled IN (0, 1));

-- One preferred method per user; a method not yet confirmed (a TOTP secret before its first
-- code, a phone number before its first code) is not usable.
ALTER TABLE methods ADD COLUMN preferred INTEGER NOT NULL DEFAULT 0 CHECK (preferred IN (0, 1));
ALTER TABLE methods ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 1 CHECK (confirmed IN (0, 1));
CREATE UNIQUE INDEX methods_one_preferred ON methods(user_id) WHERE preferred = 1;
CREATE INDEX methods_by_user ON methods(user_id, kind);

-- A password (one per user): scrypt, in a self-describing string.
CREATE TABLE password_credentials (
    method_id  INTEGER PRIMARY KEY REFERENCES methods(id) ON DELETE CASCADE,
    hash       TEXT NOT NULL,
    changed_at REAL NOT NULL
);

-- An authenticator app: the secret encrypted (AES-GCM under the data directory's key) and the
-- last accepted time step (a code of that step or an earlier one is a replay).
CREATE TABLE totp_credentials (
    method_id  INTEGER PRIMARY KEY REFERENCES methods(id) ON DELETE CASCADE,
    secret_enc BLOB NOT NULL,
    digits     INTEGER NOT NULL CHECK (digits BETWEEN 6 AND 8),
    period     INTEGER NOT NULL CHECK (period BETWEEN 15 AND 120),
    algorithm  TEXT NOT NULL CHECK (algorithm IN ('SHA1', 'SHA256', 'SHA512')),
    last_step  INTEGER NOT NULL DEFAULT -1
);

-- Where one-time codes are sent: an email address or a phone number, per channel.
CREATE TABLE contact_methods (
    method_id   INTEGER PRIMARY KEY REFERENCES methods(id) ON DELETE CASCADE,
    channel     TEXT NOT NULL CHECK (channel IN ('email', 'sms', 'voice', 'messaging')),
    destination TEXT NOT NULL
);

-- One-time codes sent (stored as keyed hashes), single use, expiring.
CREATE TABLE otp_challenges (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    method_id    INTEGER NOT NULL REFERENCES methods(id) ON DELETE CASCADE,
    purpose      TEXT NOT NULL CHECK (purpose IN ('login', 'enrol')),
    code_hash    BLOB NOT NULL,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    used_at      REAL,
    channel      TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX otp_challenges_by_method ON otp_challenges(method_id, created_at);

-- A companion app for push approval: its Ed25519 public key.
CREATE TABLE push_devices (
    method_id   INTEGER PRIMARY KEY REFERENCES methods(id) ON DELETE CASCADE,
    device_id   TEXT NOT NULL UNIQUE,
    public_key  BLOB NOT NULL CHECK (length(public_key) = 32)
);

-- A push request: the number shown on the login screen, and what the companion answered.
CREATE TABLE push_requests (
    id          TEXT PRIMARY KEY NOT NULL,
    method_id   INTEGER NOT NULL REFERENCES methods(id) ON DELETE CASCADE,
    number      INTEGER NOT NULL CHECK (number BETWEEN 10 AND 99),
    context     TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'approved', 'denied', 'wrong-number', 'expired', 'cancelled')),
    decided_at  REAL
);
CREATE INDEX push_requests_by_method ON push_requests(method_id, state);

-- App passwords for legacy applications, and backup codes: keyed hashes only.
CREATE TABLE app_passwords (
    method_id  INTEGER PRIMARY KEY REFERENCES methods(id) ON DELETE CASCADE,
    hash       BLOB NOT NULL UNIQUE
);
CREATE TABLE backup_codes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    method_id  INTEGER NOT NULL REFERENCES methods(id) ON DELETE CASCADE,
    code_hash  BLOB NOT NULL,
    used_at    REAL
);
CREATE INDEX backup_codes_by_method ON backup_codes(method_id);

-- Failed attempts and growing lockouts, per method ('method:ID') or per user's password
-- ('password:USER_ID').
CREATE TABLE lockouts (
    scope           TEXT PRIMARY KEY NOT NULL,
    user_id         TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    failures        INTEGER NOT NULL DEFAULT 0,
    level           INTEGER NOT NULL DEFAULT 0,
    locked_until    REAL,
    last_failure_at REAL
);
CREATE INDEX lockouts_by_user ON lockouts(user_id);

-- Devices and networks a user has logged in from (unusual-login detection), and when each
-- device last completed a second factor (re-verification).
CREATE TABLE sightings (
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('device', 'network')),
    value      TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL,
    PRIMARY KEY (user_id, kind, value)
) WITHOUT ROWID;
CREATE TABLE verifications (
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    device_id   TEXT NOT NULL,
    verified_at REAL NOT NULL,
    method      TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
"""


def _migration_3(conn: sqlite3.Connection) -> None:
    run_script(conn, _SCHEMA_V3)


_SCHEMA_V4 = """
-- The service's sessions (successful logins), so that they survive its restart; a card-bound
-- session names its card. Ended sessions stay as a record until their user is removed.
CREATE TABLE sessions (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    username    TEXT NOT NULL,
    method      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    state       TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'locked', 'ended')),
    end_reason  TEXT,
    device_id   TEXT,
    card_reader TEXT,
    card_atr    TEXT,
    card_serial TEXT
);
CREATE INDEX sessions_by_user ON sessions(user_id, created_at);
CREATE INDEX sessions_by_state ON sessions(state);
"""


def _migration_4(conn: sqlite3.Connection) -> None:
    run_script(conn, _SCHEMA_V4)


_SCHEMA_V5 = """
-- Who set the account's own MFA flag, for `policy explain`: 'new-account' (the policy's
-- default for new accounts of the user's class), 'admin', 'user' (their own choice); NULL for
-- accounts from before this migration (not known).
ALTER TABLE users ADD COLUMN mfa_source TEXT
    CHECK (mfa_source IS NULL OR mfa_source IN ('new-account', 'admin', 'user'));
"""


def _migration_5(conn: sqlite3.Connection) -> None:
    run_script(conn, _SCHEMA_V5)


#: the schema, in order: ``MIGRATIONS[n-1]`` brings a store to version ``n``. Append only.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "users, roles, methods, FIDO2 credentials, audit events, settings", _migration_1),
    Migration(2, "smartcard identities", _migration_2),
    Migration(3, "user classes, preferred methods, second factors, lockouts, sightings",
              _migration_3),
    Migration(4, "the service's sessions", _migration_4),
    Migration(5, "who set a user's MFA flag", _migration_5),
)
#: the schema version this code writes
SCHEMA_VERSION = len(MIGRATIONS)


def _check_migrations(migrations: Sequence[Migration]) -> None:
    for i, m in enumerate(migrations, start=1):
        if m.version != i:
            raise ValueError(f"migration {m.name!r} has version {m.version}, expected {i}: "
                             "migrations must be numbered 1, 2, 3, ... in order")


_check_migrations(MIGRATIONS)


# --------------------------------------------------------------------------- file errors

_FIX_PERMS = ("check the permissions of the file and of its directory (token-agent writes the "
              "file and creates '{name}-wal' and '{name}-shm' beside it), or use another data "
              "directory (--data-dir or TOKEN_AGENT_DATA_DIR)")


def _file_error(path: Path, exc: BaseException, action: str, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
                ) -> StoreFileError:
    """A ``StoreFileError`` for an ``sqlite3.Error`` or ``OSError``, naming the file and the fix."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    detail = str(exc)
    fix_perms = _FIX_PERMS.format(name=path.name)
    if isinstance(exc, OSError):
        reason, advice = "cannot be opened", fix_perms
        if exc.errno in (13, 1, 30):  # EACCES, EPERM, EROFS
            reason = "not writable"
        detail = exc.strerror or str(exc)
    elif name.startswith("SQLITE_READONLY"):
        reason, advice = "not writable", fix_perms
    elif name.startswith("SQLITE_CANTOPEN") or name.startswith("SQLITE_PERM"):
        reason, advice = "cannot be opened", fix_perms
    elif name == "SQLITE_NOTADB":
        reason = "not a SQLite database"
        advice = ("it is damaged or is another kind of file: move it aside and run again to start "
                  "an empty store, or restore the store from a backup")
    elif name.startswith("SQLITE_CORRUPT"):
        reason = "corrupt"
        advice = "restore the store from a backup, or move it aside to start an empty store"
    elif name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
        reason = "locked"
        advice = (f"another process held it for more than {busy_timeout:g} s: try again, and look "
                  "for a stuck token-agent process")
    elif name == "SQLITE_FULL":
        reason, advice = "disk full", "free some space on its file system and try again"
    elif name.startswith("SQLITE_IOERR"):
        reason, advice = "I/O error", "check the disk and the file system (dmesg), then try again"
    else:
        reason, advice = "error", "see the SQLite message; the store was not changed"
    return StoreFileError(
        f"token-agent store {path}: {reason} ({detail}) while trying to {action}: {advice}",
        path=path, reason=reason)


# --------------------------------------------------------------------------- the store


def _new_file_0600(path: Path) -> None:
    """Create an empty file with mode 0600 (umask-independent) if it does not exist."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _tighten(path: Path) -> None:
    """Remove group/other permissions of an existing file, warning about it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return
    try:
        os.chmod(path, mode & ~0o077)
    except OSError as exc:
        log.warning("token-agent store file %s has mode %04o (group or others can read it) and "
                    "cannot be tightened (%s): run chmod 600 on it", path, mode, exc.strerror)
    else:
        log.warning("token-agent store file %s had mode %04o (group or others could read it); "
                    "tightened to %04o", path, mode, mode & ~0o077)


class Store:
    """The agent's SQLite store. Create with ``Store.open(path)``; close with ``close()``
    or use it as a context manager. See the module docstring for durability, transactions,
    threads and errors."""

    def __init__(self, path: Path, conn: sqlite3.Connection, *, clock: Callable[[], float],
                 busy_timeout: float) -> None:
        """Internal: use ``Store.open``."""
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._lock = threading.RLock()
        self._depth = 0
        #: called (no arguments) after each ``record_event``, e.g. the service's size alarm
        self.after_event: Callable[[], None] | None = None
        #: called ``(kind, outcome, username, detail)`` before each ``record_event``: False
        #: means counted instead of recorded (the service's ``refusals.UnknownLogins``)
        self.event_gate: Callable[[str, str, str | None, Any], bool] | None = None

    # ---------------------------------------------------------------- open / close

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
             clock: Callable[[], float] = time.time,
             migrations: Sequence[Migration] = MIGRATIONS, create: bool = True) -> Store:
        """Open (creating it if needed) the store at ``path`` and bring its schema up to date.

        The file's directory must exist. Without ``create`` (a command that only reads) a
        missing file (or directory) is ``StoreMissing`` and nothing is created. Raises
        ``StoreFileError`` when the file cannot be created, opened or written, is not a
        SQLite database, is corrupt, or belongs to another program; ``SchemaTooNew`` when it was written by a newer token-agent; in
        every case without changing the file. Writability is checked here, before any
        ceremony starts, not at the first write. ``migrations`` is for tests of the
        migration mechanism.
        """
        _check_migrations(migrations)
        path = Path(os.path.abspath(os.fspath(path)))
        directory = path.parent
        if not create and not os.path.lexists(path):
            raise StoreMissing(f"no token-agent store at {path}", path=path)
        if not directory.is_dir():
            raise StoreFileError(
                f"token-agent store {path}: its directory {directory} does not exist: create it "
                "(mode 0700) or use another data directory (--data-dir or TOKEN_AGENT_DATA_DIR)",
                path=path, reason="no directory")
        if path.exists() and not path.is_symlink() and not path.is_file():
            raise StoreFileError(
                f"token-agent store {path}: exists and is not a regular file: move it aside or use "
                "another data directory (--data-dir or TOKEN_AGENT_DATA_DIR)",
                path=path, reason="not a file")
        # Owned by us or root, not writable by others, no symbolic links (filetrust.py):
        # checked before anything is created, chmod-ed or opened.
        try:
            check_private_dir(directory, "data directory")
            for p, what in ((path, "store"), (Path(f"{path}-wal"), "store's write-ahead log"),
                            (Path(f"{path}-shm"), "store's shared-memory file")):
                check_private_file(p, what)
        except UntrustedPath as exc:
            raise StoreFileError(f"token-agent store {path}: {exc}", path=path,
                                 reason="untrusted", run_as=exc.run_as) from None
        # Fail before SQLite creates -wal/-shm files or anything else: the directory must be
        # writable (SQLite creates its WAL and shared-memory files there) and so must the file.
        for target, mode, what in ((directory, os.W_OK | os.X_OK, "write into the directory"),
                                   (path, os.R_OK | os.W_OK, "open the file for writing")):
            if target is path and not path.exists():
                continue
            if not os.access(target, mode, effective_ids=os.access in os.supports_effective_ids):
                raise _file_error(path, PermissionError(13, os.strerror(13)), what)
        try:
            _new_file_0600(path)
        except OSError as exc:
            raise _file_error(path, exc, "create the file") from None
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            _tighten(p)

        try:
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise _file_error(path, exc, "open the file", busy_timeout) from None
        store = cls(path, conn, clock=clock, busy_timeout=busy_timeout)
        try:
            store._setup(migrations)
        except BaseException:
            conn.close()
            store._conn = None
            raise
        return store

    def _setup(self, migrations: Sequence[Migration]) -> None:
        conn = self._require_open()
        conn.row_factory = sqlite3.Row
        action = "read the file"
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA trusted_schema = OFF")
            conn.execute("PRAGMA secure_delete = ON")
            # Identify the file before changing anything in it (journal mode included).
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id != APPLICATION_ID and (app_id != 0 or version != 0 or objects != 0):
                raise StoreFileError(
                    f"token-agent store {self.path}: is a SQLite database of another program "
                    f"(application id {app_id:#x}, {objects} schema objects, user_version {version}), "
                    "not a token-agent store: use another data directory (--data-dir or "
                    "TOKEN_AGENT_DATA_DIR) or move the file aside", path=self.path, reason="foreign")
            if version > len(migrations):
                raise SchemaTooNew(
                    f"token-agent store {self.path}: schema version {version} was written by a newer "
                    f"token-agent; this one ({__version__}) knows versions up to {len(migrations)}: "
                    "upgrade token-agent (a store is never downgraded)",
                    path=self.path, found=version, known=len(migrations))
            action = "switch the file to WAL mode"
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreFileError(
                    f"token-agent store {self.path}: cannot use write-ahead logging (journal mode "
                    f"stays {mode!r}): put the store on a local file system", path=self.path,
                    reason="no WAL")
            conn.execute("PRAGMA synchronous = FULL")
            # Is the file writable? (A read-only file opens and even BEGINs IMMEDIATE fine; the
            # first real write fails.) Rewrite user_version unchanged, then roll back.
            action = "write to the file"
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(f"PRAGMA user_version = {int(version)}")
            finally:
                conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise _file_error(self.path, exc, action, self._busy_timeout) from None
        self._migrate(migrations)

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        conn = self._require_open()
        for m in migrations:
            action = f"apply schema migration {m.version} ({m.name})"
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] >= m.version:
                    continue
                if m.foreign_keys_off:
                    conn.execute("PRAGMA foreign_keys = OFF")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        # Another process may have migrated while we waited for the lock.
                        if conn.execute("PRAGMA user_version").fetchone()[0] >= m.version:
                            conn.execute("ROLLBACK")
                            continue
                        m.apply(conn)
                        if m.foreign_keys_off:
                            bad = conn.execute("PRAGMA foreign_key_check").fetchall()
                            if bad:
                                raise StoreError(f"{len(bad)} foreign key violations, e.g. {tuple(bad[0])}")
                        conn.execute(f"PRAGMA user_version = {m.version}")
                        conn.execute(
                            "INSERT INTO schema_history (version, name, applied_at, agent_version) "
                            "VALUES (?, ?, ?, ?)", (m.version, m.name, self._clock(), __version__))
                        conn.execute("COMMIT")
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                finally:
                    if m.foreign_keys_off:
                        conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"token-agent store {self.path}: schema migration {m.version} "
                                 f"({m.name}) failed and was rolled back: {exc}") from exc
            except sqlite3.Error as exc:
                raise _file_error(self.path, exc, action, self._busy_timeout) from exc
            except Exception as exc:
                raise StoreError(f"token-agent store {self.path}: schema migration {m.version} "
                                 f"({m.name}) failed and was rolled back: {exc}") from exc
            log.info("token-agent store %s: applied schema migration %d (%s)", self.path,
                     m.version, m.name)

    def close(self) -> None:
        """Close the connection (idempotent). Waits for a transaction of another thread."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            conn.close()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._conn is None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Store {str(self.path)!r}{' closed' if self.closed else ''}>"

    # ---------------------------------------------------------------- plumbing

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"token-agent store {self.path} is closed")
        return self._conn

    @contextmanager
    def _using(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and map SQLite errors to ``StoreError``s."""
        with self._lock:
            conn = self._require_open()
            if self._depth and not conn.in_transaction:
                raise StoreError(f"token-agent store {self.path}: the transaction was aborted by an "
                                 "earlier error; nothing of it was written")
            try:
                yield conn
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"token-agent store {self.path}: cannot {action}: {exc}") from exc
            except sqlite3.Error as exc:
                raise _file_error(self.path, exc, action, self._busy_timeout) from exc

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """All writes inside are committed together at the end, or none of them.

        ``BEGIN IMMEDIATE`` (the write lock is taken at once, so a read-then-write inside
        cannot be overtaken by another writer); ``COMMIT`` at the end; ``ROLLBACK`` if any
        exception leaves the block. Nested use joins the outer transaction through a
        savepoint (an exception leaving the inner block undoes the inner block's writes).
        Holds the store's lock throughout: other threads wait. Yields the store.
        """
        with self._lock:
            conn = self._require_open()
            if self._depth == 0:
                with self._using("start a write transaction"):
                    conn.execute("BEGIN IMMEDIATE")
                self._depth = 1
                try:
                    yield self
                except BaseException:
                    self._rollback(conn, None)
                    raise
                else:
                    try:
                        with self._using("commit"):
                            conn.execute("COMMIT")
                    except BaseException:
                        self._rollback(conn, None)
                        raise
                finally:
                    self._depth = 0
            else:
                name = f"ta_sp{self._depth}"
                with self._using("start a nested transaction"):
                    conn.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield self
                except BaseException:
                    self._rollback(conn, name)
                    raise
                else:
                    with self._using("end a nested transaction"):
                        conn.execute(f"RELEASE {name}")
                finally:
                    self._depth -= 1

    def _rollback(self, conn: sqlite3.Connection, savepoint: str | None) -> None:
        if not conn.in_transaction:
            return  # SQLite already rolled back (e.g. after an I/O error)
        try:
            if savepoint is None:
                conn.execute("ROLLBACK")
            else:
                conn.execute(f"ROLLBACK TO {savepoint}")
                conn.execute(f"RELEASE {savepoint}")
        except sqlite3.Error as exc:
            log.error("token-agent store %s: rollback failed: %s", self.path, exc)

    def _now(self) -> float:
        return float(self._clock())

    # ---------------------------------------------------------------- information

    @property
    def schema_version(self) -> int:
        """The store's schema version (``PRAGMA user_version``)."""
        with self._using("read the schema version") as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def info(self) -> dict[str, Any]:
        """Facts about the store for status and diagnostics: path, schema version, SQLite
        version, journal mode, synchronous level, foreign keys, file mode and size."""
        with self._using("read the store's settings") as conn:
            q = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
            st = self.path.stat()
            return {
                "path": str(self.path),
                "schema_version": int(q("PRAGMA user_version")),
                "code_schema_version": SCHEMA_VERSION,
                "sqlite_version": sqlite3.sqlite_version,
                "journal_mode": str(q("PRAGMA journal_mode")),
                "synchronous": {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                    int(q("PRAGMA synchronous")), "?"),
                "foreign_keys": bool(q("PRAGMA foreign_keys")),
                "busy_timeout_ms": int(q("PRAGMA busy_timeout")),
                "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                "size": st.st_size,
            }

    def check_integrity(self) -> list[str]:
        """Problems found by ``PRAGMA integrity_check`` and ``foreign_key_check``; empty if
        none. (Damage is only noticed when a damaged page is read: ``Store.open`` reads the
        schema, not every page. A file too damaged to check gives its error as the problem.)"""
        try:
            with self._using("check the file's integrity") as conn:
                problems = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
                if problems == ["ok"]:
                    problems = []
                for r in conn.execute("PRAGMA foreign_key_check").fetchall():
                    problems.append(f"foreign key violation: table {r[0]} row {r[1]} -> {r[2]}")
                return problems
        except StoreFileError as exc:
            if exc.reason in ("corrupt", "not a SQLite database"):
                return [str(exc)]
            raise

    # ---------------------------------------------------------------- users

    _USER_SELECT = (
        "SELECT u.id, u.username, u.display_name, u.user_handle, u.created_at, u.disabled, "
        "u.user_class, u.mfa_enabled, u.mfa_source, "
        "(SELECT group_concat(r.role, ',') FROM user_roles r WHERE r.user_id = u.id) AS roles "
        "FROM users u ")

    @staticmethod
    def _user(row: sqlite3.Row) -> User:
        return User(id=row["id"], username=row["username"], display_name=row["display_name"],
                    roles=sorted(row["roles"].split(",")) if row["roles"] else [],
                    user_handle=bytes(row["user_handle"]), created_at=row["created_at"],
                    disabled=bool(row["disabled"]), user_class=row["user_class"],
                    mfa_enabled=bool(row["mfa_enabled"]), mfa_source=row["mfa_source"])

    @staticmethod
    def _check_username(username: str) -> str:
        problem = username_problem(username)
        if problem is not None:
            raise InvalidValue(f"invalid username: {problem}")
        return username

    @staticmethod
    def _check_display_name(display_name: str) -> str:
        if (not isinstance(display_name, str) or not display_name.strip()
                or len(display_name) > MAX_DISPLAY_NAME_LEN or not display_name.isprintable()):
            raise InvalidValue(f"invalid display name {display_name!r}: 1 to {MAX_DISPLAY_NAME_LEN} "
                               "printable characters")
        return display_name.strip()

    @staticmethod
    def _check_roles(roles: Iterable[str]) -> list[str]:
        if isinstance(roles, str):
            raise InvalidValue("roles must be a list of strings, not a string")
        out = []
        for role in roles:
            if not isinstance(role, str) or not ROLE_RE.fullmatch(role):
                raise InvalidValue(f"invalid role {role!r}: 1 to 64 characters, letters, digits "
                                   "and . _ - : only")
            out.append(role)
        return sorted(set(out))

    @staticmethod
    def _check_user_class(user_class: str) -> str:
        if user_class not in USER_CLASSES:
            raise InvalidValue(f"invalid user class {user_class!r}: one of {', '.join(USER_CLASSES)}")
        return user_class

    def add_user(self, username: str, display_name: str | None = None,
                 roles: Iterable[str] = (), *, user_class: str = "internal",
                 mfa_enabled: bool = True) -> User:
        """Add a user with a new UUID4 id and a new random 32-byte user handle.

        ``username``: 1-64 letters, digits, ``.``, ``_``, ``-``, ``@``; unique regardless
        of case (``UserExists``). ``display_name`` defaults to the username. ``mfa_enabled``:
        the new account's own MFA flag (its source: ``new-account``; the policy's default for
        the class is ``Policy.new_account_mfa``).
        """
        self._check_username(username)
        display = self._check_display_name(username if display_name is None else display_name)
        role_list = self._check_roles(roles)
        self._check_user_class(user_class)
        with self.transaction(), self._using("add a user") as conn:
            row = conn.execute("SELECT username FROM users WHERE username = ?", (username,)).fetchone()
            if row is not None:
                raise UserExists(f"user {row['username']!r} already exists"
                                 + (f" (usernames ignore case: {username!r})"
                                    if row["username"] != username else ""))
            user_id = str(uuid.uuid4())
            conn.execute(
                "INSERT INTO users (id, username, display_name, user_handle, created_at, disabled, "
                "user_class, mfa_enabled, mfa_source) VALUES (?, ?, ?, ?, ?, 0, ?, ?, 'new-account')",
                (user_id, username, display, secrets.token_bytes(USER_HANDLE_LEN), self._now(),
                 user_class, int(bool(mfa_enabled))))
            conn.executemany("INSERT INTO user_roles (user_id, role) VALUES (?, ?)",
                             [(user_id, r) for r in role_list])
            return self.get_user_by_id(user_id)

    def get_user(self, username: str) -> User:
        """The user with that username (case-insensitive); ``UnknownUser`` if none."""
        with self._using("read a user") as conn:
            row = conn.execute(self._USER_SELECT + "WHERE u.username = ?", (username,)).fetchone()
        if row is None:
            raise UnknownUser(f"unknown user {username!r}")
        return self._user(row)

    def get_user_by_id(self, user_id: str) -> User:
        """The user with that id; ``UnknownUser`` if none."""
        with self._using("read a user") as conn:
            row = conn.execute(self._USER_SELECT + "WHERE u.id = ?", (user_id,)).fetchone()
        if row is None:
            raise UnknownUser(f"unknown user id {user_id!r}")
        return self._user(row)

    def get_user_by_handle(self, handle: bytes) -> User | None:
        """The user whose WebAuthn user handle is ``handle``, or ``None``."""
        with self._using("read a user") as conn:
            row = conn.execute(self._USER_SELECT + "WHERE u.user_handle = ?",
                               (bytes(handle),)).fetchone()
        return None if row is None else self._user(row)

    def list_users(self) -> list[User]:
        """All users, by username (case-insensitive order)."""
        with self._using("list users") as conn:
            rows = conn.execute(self._USER_SELECT + "ORDER BY u.username, u.id").fetchall()
        return [self._user(r) for r in rows]

    def update_user(self, username: str, *, display_name: str | None = None,
                    roles: Iterable[str] | None = None, disabled: bool | None = None,
                    user_class: str | None = None, mfa_enabled: bool | None = None,
                    mfa_source: str = "admin") -> User:
        """Change a user's display name, roles (replaced), disabled flag, user class or MFA
        flag (set by ``mfa_source``: ``admin`` or ``user``); ``None`` keeps it."""
        display = None if display_name is None else self._check_display_name(display_name)
        role_list = None if roles is None else self._check_roles(roles)
        if user_class is not None:
            self._check_user_class(user_class)
        if mfa_source not in MFA_SOURCES:
            raise InvalidValue(f"invalid MFA source {mfa_source!r}: one of {', '.join(MFA_SOURCES)}")
        with self.transaction(), self._using("update a user") as conn:
            user = self.get_user(username)
            if display is not None:
                conn.execute("UPDATE users SET display_name = ? WHERE id = ?", (display, user.id))
            if disabled is not None:
                conn.execute("UPDATE users SET disabled = ? WHERE id = ?", (int(bool(disabled)), user.id))
            if user_class is not None:
                conn.execute("UPDATE users SET user_class = ? WHERE id = ?", (user_class, user.id))
            if mfa_enabled is not None:
                conn.execute("UPDATE users SET mfa_enabled = ?, mfa_source = ? WHERE id = ?",
                             (int(bool(mfa_enabled)), mfa_source, user.id))
            if role_list is not None:
                conn.execute("DELETE FROM user_roles WHERE user_id = ?", (user.id,))
                conn.executemany("INSERT INTO user_roles (user_id, role) VALUES (?, ?)",
                                 [(user.id, r) for r in role_list])
            return self.get_user_by_id(user.id)

    def remove_user(self, username: str) -> User:
        """Remove a user, their roles and all their methods (credentials); audit events are
        kept. Returns the removed user; ``UnknownUser`` if none."""
        with self.transaction(), self._using("remove a user") as conn:
            user = self.get_user(username)
            conn.execute("DELETE FROM users WHERE id = ?", (user.id,))
            return user

    # ---------------------------------------------------------------- methods of any kind

    @contextmanager
    def connection(self, action: str) -> Iterator[sqlite3.Connection]:
        """The SQLite connection, for the modules that own the queries of their own tables
        (``token_agent.factors``): held under the store's lock, SQLite errors mapped to
        ``StoreError`` (``action`` says what was being done, for the message). Wrap writes
        in ``transaction()``."""
        with self._using(action) as conn:
            yield conn

    _METHOD_SELECT = ("SELECT id, user_id, kind, name, created_at, last_used_at, flagged, "
                      "flag_reason, preferred, confirmed FROM methods ")

    @staticmethod
    def _method(row: sqlite3.Row) -> Method:
        return Method(id=row["id"], user_id=row["user_id"], kind=row["kind"], name=row["name"],
                      created_at=row["created_at"], last_used_at=row["last_used_at"],
                      flagged=bool(row["flagged"]), flag_reason=row["flag_reason"],
                      preferred=bool(row["preferred"]), confirmed=bool(row["confirmed"]))

    def add_method(self, user_id: str, kind: str, name: str, *, confirmed: bool = True) -> Method:
        """Add a row to ``methods`` (the kind's own table is the caller's, in the same
        transaction). ``CredentialExists`` if the user has a method of that kind and name."""
        if kind not in METHOD_KINDS:
            raise InvalidValue(f"unknown method kind {kind!r}")
        name = self._check_method_name(name)
        with self.transaction(), self._using("add an authentication method") as conn:
            user = self.get_user_by_id(user_id)
            row = conn.execute("SELECT name FROM methods WHERE user_id = ? AND kind = ? AND name = ?",
                               (user.id, kind, name)).fetchone()
            if row is not None:
                raise CredentialExists(f"user {user.username!r} already has a {kind} method named "
                                       f"{row['name']!r}")
            cur = conn.execute(
                "INSERT INTO methods (user_id, kind, name, created_at, confirmed) VALUES (?, ?, ?, ?, ?)",
                (user.id, kind, name, self._now(), int(bool(confirmed))))
            return self.get_method(cur.lastrowid)

    def get_method(self, method_id: int) -> Method:
        """The method with that id; ``UnknownCredential`` if none."""
        with self._using("read an authentication method") as conn:
            row = conn.execute(self._METHOD_SELECT + "WHERE id = ?", (int(method_id),)).fetchone()
        if row is None:
            raise UnknownCredential(f"unknown authentication method {method_id}")
        return self._method(row)

    def list_methods(self, user_id: str, kind: str | None = None) -> list[Method]:
        """The user's methods (of one kind, or all), in order of enrolment."""
        with self._using("list authentication methods") as conn:
            if kind is None:
                rows = conn.execute(self._METHOD_SELECT + "WHERE user_id = ? ORDER BY id",
                                    (user_id,)).fetchall()
            else:
                rows = conn.execute(self._METHOD_SELECT + "WHERE user_id = ? AND kind = ? ORDER BY id",
                                    (user_id, kind)).fetchall()
        return [self._method(r) for r in rows]

    def find_method(self, user_id: str, kind: str, name: str | None = None) -> Method | None:
        """The user's method of that kind (and name, case-insensitive; else the first)."""
        for m in self.list_methods(user_id, kind):
            if name is None or m.name.casefold() == name.casefold():
                return m
        return None

    def confirm_method(self, method_id: int) -> Method:
        """Mark a method confirmed (usable)."""
        with self.transaction(), self._using("confirm an authentication method") as conn:
            method = self.get_method(method_id)
            conn.execute("UPDATE methods SET confirmed = 1 WHERE id = ?", (method.id,))
            return self.get_method(method.id)

    def touch_method(self, method_id: int, used_at: float | None = None) -> None:
        """Record that a method was used now."""
        with self.transaction(), self._using("record the use of a method") as conn:
            conn.execute("UPDATE methods SET last_used_at = ? WHERE id = ?",
                         (self._now() if used_at is None else float(used_at), int(method_id)))

    def set_preferred_method(self, user_id: str, method_id: int) -> Method:
        """Make a confirmed method of the user their preferred one (the only one)."""
        with self.transaction(), self._using("set the preferred method") as conn:
            method = self.get_method(method_id)
            if method.user_id != user_id:
                raise UnknownCredential(f"method {method_id} is not this user's")
            if not method.confirmed:
                raise InvalidValue(f"method {method.name!r} is not confirmed yet")
            conn.execute("UPDATE methods SET preferred = 0 WHERE user_id = ? AND preferred = 1",
                         (user_id,))
            conn.execute("UPDATE methods SET preferred = 1 WHERE id = ?", (method.id,))
            return self.get_method(method.id)

    def preferred_method(self, user_id: str) -> Method | None:
        """The user's preferred method, if they chose one."""
        with self._using("read the preferred method") as conn:
            row = conn.execute(self._METHOD_SELECT + "WHERE user_id = ? AND preferred = 1",
                               (user_id,)).fetchone()
        return None if row is None else self._method(row)

    def remove_method(self, method_id: int) -> Method:
        """Remove a method of any kind (its details and pending challenges go with it)."""
        with self.transaction(), self._using("remove an authentication method") as conn:
            method = self.get_method(method_id)
            conn.execute("DELETE FROM methods WHERE id = ?", (method.id,))
            conn.execute("DELETE FROM lockouts WHERE scope = ?", (f"method:{method.id}",))
            return method

    def remove_all_methods(self, user_id: str, *, keep_password: bool = True) -> list[Method]:
        """Remove every method of a user (a lost device: the admin's reset), the password
        too unless ``keep_password``; their lockouts, device verifications and pending
        requests go with them. Returns what was removed."""
        with self.transaction(), self._using("remove a user's methods") as conn:
            removed = [m for m in self.list_methods(self.get_user_by_id(user_id).id)
                       if not (keep_password and m.kind == KIND_PASSWORD)]
            for m in removed:
                conn.execute("DELETE FROM methods WHERE id = ?", (m.id,))
                conn.execute("DELETE FROM lockouts WHERE scope = ?", (f"method:{m.id}",))
            conn.execute("DELETE FROM verifications WHERE user_id = ?", (user_id,))
            return removed

    # ---------------------------------------------------------------- FIDO2 credentials

    _FIDO_SELECT = (
        "SELECT m.id, m.user_id, m.name, m.created_at, m.last_used_at, m.flagged, m.flag_reason, "
        "f.credential_id, f.public_key, f.aaguid, f.sign_count, f.rp_id, f.discoverable, "
        "f.uv_enrolled, f.attestation_format, f.attestation_trusted, f.transports "
        "FROM fido2_credentials f JOIN methods m ON m.id = f.method_id ")

    @staticmethod
    def _fido(row: sqlite3.Row) -> FidoCredential:
        return FidoCredential(
            id=row["id"], user_id=row["user_id"], name=row["name"],
            credential_id=bytes(row["credential_id"]), public_key=bytes(row["public_key"]),
            aaguid=row["aaguid"], sign_count=row["sign_count"], rp_id=row["rp_id"],
            discoverable=bool(row["discoverable"]), uv_enrolled=bool(row["uv_enrolled"]),
            attestation_format=row["attestation_format"],
            attestation_trusted=bool(row["attestation_trusted"]),
            transports=list(json.loads(row["transports"])), created_at=row["created_at"],
            last_used_at=row["last_used_at"], flagged=bool(row["flagged"]),
            flag_reason=row["flag_reason"])

    @staticmethod
    def _check_method_name(name: str) -> str:
        if (not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LEN
                or not name.isprintable()):
            raise InvalidValue(f"invalid name {name!r}: 1 to {MAX_NAME_LEN} printable characters")
        return name.strip()

    @staticmethod
    def _check_aaguid(aaguid: str | bytes) -> str:
        try:
            if isinstance(aaguid, (bytes, bytearray)):
                return str(uuid.UUID(bytes=bytes(aaguid)))
            return str(uuid.UUID(aaguid))
        except (ValueError, TypeError, AttributeError):
            raise InvalidValue(f"invalid AAGUID {aaguid!r}: a UUID string or 16 bytes") from None

    def add_fido_credential(
        self, user_id: str, *, name: str, credential_id: bytes, public_key: bytes,
        aaguid: str | bytes, rp_id: str, sign_count: int = 0, discoverable: bool,
        uv_enrolled: bool, attestation_format: str, attestation_trusted: bool,
        transports: Iterable[str] = (), created_at: float | None = None,
    ) -> FidoCredential:
        """Enrol a FIDO2 credential for a user.

        ``UnknownUser`` if ``user_id`` is unknown; ``CredentialExists`` if the credential id
        is already enrolled (for anyone) or the user already has a FIDO2 credential of that
        name (compared case-insensitively). ``aaguid`` may be a UUID string or 16 bytes
        (``fido2``'s ``Aaguid``); it is stored in canonical form.
        """
        name = self._check_method_name(name)
        if not isinstance(credential_id, (bytes, bytearray)) or not 1 <= len(credential_id) <= MAX_CREDENTIAL_ID_LEN:
            raise InvalidValue(f"credential id must be 1 to {MAX_CREDENTIAL_ID_LEN} bytes")
        if not isinstance(public_key, (bytes, bytearray)) or not public_key:
            raise InvalidValue("public key must be non-empty bytes (the CBOR-encoded COSE key)")
        aaguid_s = self._check_aaguid(aaguid)
        if not isinstance(rp_id, str) or not rp_id or len(rp_id) > 253:
            raise InvalidValue(f"invalid relying party id {rp_id!r}")
        if isinstance(sign_count, bool) or not isinstance(sign_count, int) or not 0 <= sign_count <= 0xFFFFFFFF:
            raise InvalidValue(f"invalid signature counter {sign_count!r}: 0 to 2**32-1")
        if not isinstance(attestation_format, str) or not attestation_format:
            raise InvalidValue("attestation format must be a non-empty string (e.g. 'packed', 'none')")
        transport_list = list(transports)
        if not all(isinstance(t, str) and t for t in transport_list):
            raise InvalidValue(f"transports must be non-empty strings: {transport_list!r}")
        credential_id = bytes(credential_id)
        with self.transaction(), self._using("add a FIDO2 credential") as conn:
            user = self.get_user_by_id(user_id)
            if self.get_fido_credential(credential_id) is not None:
                raise CredentialExists(f"this key's credential ({_b64url(credential_id)[:16]}...) is "
                                       "already enrolled")
            row = conn.execute("SELECT name FROM methods WHERE user_id = ? AND kind = ? AND name = ?",
                               (user.id, KIND_FIDO2, name)).fetchone()
            if row is not None:
                raise CredentialExists(f"user {user.username!r} already has a key named {row['name']!r}")
            cur = conn.execute(
                "INSERT INTO methods (user_id, kind, name, created_at) VALUES (?, ?, ?, ?)",
                (user.id, KIND_FIDO2, name, self._now() if created_at is None else float(created_at)))
            method_id = cur.lastrowid
            conn.execute(
                "INSERT INTO fido2_credentials (method_id, credential_id, public_key, aaguid, sign_count, "
                "rp_id, discoverable, uv_enrolled, attestation_format, attestation_trusted, transports) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (method_id, credential_id, bytes(public_key), aaguid_s, sign_count, rp_id,
                 int(bool(discoverable)), int(bool(uv_enrolled)), attestation_format,
                 int(bool(attestation_trusted)), json.dumps(transport_list)))
            return self._fido_by_method(method_id)

    def _fido_by_method(self, method_id: int) -> FidoCredential:
        with self._using("read a FIDO2 credential") as conn:
            row = conn.execute(self._FIDO_SELECT + "WHERE m.id = ?", (method_id,)).fetchone()
        if row is None:
            raise UnknownCredential(f"unknown credential {method_id}")
        return self._fido(row)

    def get_fido_credential(self, credential_id: bytes) -> FidoCredential | None:
        """The FIDO2 credential with that credential id, or ``None``."""
        with self._using("read a FIDO2 credential") as conn:
            row = conn.execute(self._FIDO_SELECT + "WHERE f.credential_id = ?",
                               (bytes(credential_id),)).fetchone()
        return None if row is None else self._fido(row)

    def _require_fido(self, credential_id: bytes) -> FidoCredential:
        cred = self.get_fido_credential(credential_id)
        if cred is None:
            raise UnknownCredential(f"unknown credential {_b64url(bytes(credential_id))}: it was "
                                    "never enrolled here or has been deleted")
        return cred

    def list_fido_credentials(self, user_id: str | None = None) -> list[FidoCredential]:
        """FIDO2 credentials, of one user or of everyone, in order of enrolment."""
        with self._using("list FIDO2 credentials") as conn:
            if user_id is None:
                rows = conn.execute(self._FIDO_SELECT + "ORDER BY m.id").fetchall()
            else:
                rows = conn.execute(self._FIDO_SELECT + "WHERE m.user_id = ? ORDER BY m.id",
                                    (user_id,)).fetchall()
        return [self._fido(r) for r in rows]

    def record_fido_use(self, credential_id: bytes, sign_count: int,
                        used_at: float | None = None) -> FidoCredential:
        """Record a successful assertion: the new signature counter and the time of use.

        The counter must increase, unless it is zero and so is the stored one (a key without
        counters); otherwise ``SignCountRegression`` and nothing is written (the check and
        the write are one step, so two logins racing with one counter value cannot both
        pass). ``UnknownCredential`` if there is no such credential.
        """
        if isinstance(sign_count, bool) or not isinstance(sign_count, int) or not 0 <= sign_count <= 0xFFFFFFFF:
            raise InvalidValue(f"invalid signature counter {sign_count!r}: 0 to 2**32-1")
        with self.transaction(), self._using("record the use of a FIDO2 credential") as conn:
            cred = self._require_fido(credential_id)
            if not (sign_count > cred.sign_count or sign_count == cred.sign_count == 0):
                raise SignCountRegression(
                    f"signature counter of key {cred.name!r} did not increase (stored "
                    f"{cred.sign_count}, received {sign_count}): the key may have been cloned",
                    stored=cred.sign_count, received=sign_count)
            conn.execute("UPDATE fido2_credentials SET sign_count = ? WHERE method_id = ?",
                         (sign_count, cred.id))
            conn.execute("UPDATE methods SET last_used_at = ? WHERE id = ?",
                         (self._now() if used_at is None else float(used_at), cred.id))
            return self._fido_by_method(cred.id)

    def flag_fido_credential(self, credential_id: bytes, reason: str) -> FidoCredential:
        """Flag a credential as suspect (e.g. counter regression), with a reason."""
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidValue("a flag needs a reason")
        with self.transaction(), self._using("flag a FIDO2 credential") as conn:
            cred = self._require_fido(credential_id)
            conn.execute("UPDATE methods SET flagged = 1, flag_reason = ? WHERE id = ?",
                         (reason.strip(), cred.id))
            return self._fido_by_method(cred.id)

    def clear_flag(self, credential_id: bytes) -> FidoCredential:
        """Remove a credential's flag (an administrator's decision)."""
        with self.transaction(), self._using("clear the flag of a FIDO2 credential") as conn:
            cred = self._require_fido(credential_id)
            conn.execute("UPDATE methods SET flagged = 0, flag_reason = NULL WHERE id = ?", (cred.id,))
            return self._fido_by_method(cred.id)

    def remove_fido_credential(self, user_id: str, name: str) -> FidoCredential:
        """Remove the user's FIDO2 credential of that name (case-insensitive); returns it.
        ``UnknownUser`` / ``UnknownCredential`` when there is no such user / credential."""
        with self.transaction(), self._using("remove a FIDO2 credential") as conn:
            user = self.get_user_by_id(user_id)
            row = conn.execute(self._FIDO_SELECT + "WHERE m.user_id = ? AND m.kind = ? AND m.name = ?",
                               (user.id, KIND_FIDO2, name)).fetchone()
            if row is None:
                raise UnknownCredential(f"user {user.username!r} has no key named {name!r}")
            cred = self._fido(row)
            conn.execute("DELETE FROM methods WHERE id = ?", (cred.id,))
            return cred

    # ---------------------------------------------------------------- smartcard identities

    _CARD_SELECT = (
        "SELECT m.id, m.user_id, m.name, m.created_at, m.last_used_at, m.flagged, m.flag_reason, "
        "c.uuid, c.holder_name, c.certificate_serial, c.issuer "
        "FROM smartcard_identities c JOIN methods m ON m.id = c.method_id ")

    @staticmethod
    def _card(row: sqlite3.Row) -> SmartcardIdentity:
        return SmartcardIdentity(
            id=row["id"], user_id=row["user_id"], name=row["name"], uuid=row["uuid"],
            holder_name=row["holder_name"], certificate_serial=row["certificate_serial"],
            issuer=row["issuer"], created_at=row["created_at"], last_used_at=row["last_used_at"],
            flagged=bool(row["flagged"]), flag_reason=row["flag_reason"])

    @staticmethod
    def _check_card_uuid(card_uuid: str) -> str:
        if not isinstance(card_uuid, str) or not CARD_UUID_RE.fullmatch(card_uuid):
            raise InvalidValue(f"invalid card holder UUID {card_uuid!r}: 1 to 64 letters, "
                               "digits and . _ : -")
        return card_uuid

    def add_card_identity(self, user_id: str, *, uuid: str, holder_name: str,
                          name: str | None = None) -> SmartcardIdentity:
        """Enrol the smartcard holder ``uuid`` (from the card certificate) for a user; ``name``
        defaults to ``"card <uuid>"``. ``CredentialExists`` if the UUID is enrolled already
        (for anyone) or the user has a method of that name; ``UnknownUser``."""
        card_uuid = self._check_card_uuid(uuid)
        holder = self._check_display_name(holder_name)
        name = self._check_method_name(f"card {card_uuid}" if name is None else name)
        with self.transaction(), self._using("add a smartcard identity") as conn:
            user = self.get_user_by_id(user_id)
            owner = self.get_user_by_card_uuid(card_uuid)
            if owner is not None:
                raise CredentialExists(f"the card holder {card_uuid} is already enrolled "
                                       f"(user {owner.username!r})")
            row = conn.execute("SELECT name FROM methods WHERE user_id = ? AND kind = ? AND name = ?",
                               (user.id, KIND_SMARTCARD, name)).fetchone()
            if row is not None:
                raise CredentialExists(f"user {user.username!r} already has a card named {row['name']!r}")
            cur = conn.execute(
                "INSERT INTO methods (user_id, kind, name, created_at) VALUES (?, ?, ?, ?)",
                (user.id, KIND_SMARTCARD, name, self._now()))
            conn.execute("INSERT INTO smartcard_identities (method_id, uuid, holder_name) "
                         "VALUES (?, ?, ?)", (cur.lastrowid, card_uuid, holder))
            return self._card_by_method(cur.lastrowid)

    def _card_by_method(self, method_id: int) -> SmartcardIdentity:
        with self._using("read a smartcard identity") as conn:
            row = conn.execute(self._CARD_SELECT + "WHERE m.id = ?", (method_id,)).fetchone()
        if row is None:
            raise UnknownCredential(f"unknown smartcard identity {method_id}")
        return self._card(row)

    def get_card_identity(self, uuid: str) -> SmartcardIdentity | None:
        """The smartcard identity of that holder UUID, or ``None``."""
        with self._using("read a smartcard identity") as conn:
            row = conn.execute(self._CARD_SELECT + "WHERE c.uuid = ?", (str(uuid),)).fetchone()
        return None if row is None else self._card(row)

    def get_user_by_card_uuid(self, uuid: str) -> User | None:
        """The user for whom that card holder UUID is enrolled, or ``None``."""
        ident = self.get_card_identity(uuid)
        return None if ident is None else self.get_user_by_id(ident.user_id)

    def list_card_identities(self, user_id: str | None = None) -> list[SmartcardIdentity]:
        """Smartcard identities, of one user or of everyone, in order of enrolment."""
        with self._using("list smartcard identities") as conn:
            if user_id is None:
                rows = conn.execute(self._CARD_SELECT + "ORDER BY m.id").fetchall()
            else:
                rows = conn.execute(self._CARD_SELECT + "WHERE m.user_id = ? ORDER BY m.id",
                                    (user_id,)).fetchall()
        return [self._card(r) for r in rows]

    def record_card_use(self, uuid: str, *, certificate_serial: str, issuer: str,
                        used_at: float | None = None) -> SmartcardIdentity:
        """Record a successful card login: the certificate used and the time."""
        with self.transaction(), self._using("record the use of a smartcard") as conn:
            ident = self.get_card_identity(uuid)
            if ident is None:
                raise UnknownCredential(f"the card holder {uuid} is not enrolled")
            conn.execute("UPDATE smartcard_identities SET certificate_serial = ?, issuer = ? "
                         "WHERE method_id = ?", (str(certificate_serial), str(issuer), ident.id))
            conn.execute("UPDATE methods SET last_used_at = ? WHERE id = ?",
                         (self._now() if used_at is None else float(used_at), ident.id))
            return self._card_by_method(ident.id)

    def remove_card_identity(self, user_id: str, *, uuid: str | None = None,
                             name: str | None = None) -> SmartcardIdentity:
        """Remove the user's smartcard identity given by holder ``uuid`` or by ``name``
        (exactly one); returns it. ``UnknownUser`` / ``UnknownCredential``."""
        if (uuid is None) == (name is None):
            raise InvalidValue("name the card identity to remove by uuid or by name (one of them)")
        with self.transaction(), self._using("remove a smartcard identity") as conn:
            user = self.get_user_by_id(user_id)
            if uuid is not None:
                row = conn.execute(self._CARD_SELECT + "WHERE m.user_id = ? AND c.uuid = ?",
                                   (user.id, str(uuid))).fetchone()
            else:
                row = conn.execute(self._CARD_SELECT + "WHERE m.user_id = ? AND m.kind = ? "
                                   "AND m.name = ?", (user.id, KIND_SMARTCARD, name)).fetchone()
            if row is None:
                raise UnknownCredential(f"user {user.username!r} has no card "
                                        f"{uuid if uuid is not None else repr(name)}")
            ident = self._card(row)
            conn.execute("DELETE FROM methods WHERE id = ?", (ident.id,))
            return ident

    # ---------------------------------------------------------------- sessions (the service's)

    @staticmethod
    def _session(row: sqlite3.Row) -> LoginSession:
        return LoginSession(
            id=row["id"], user_id=row["user_id"], username=row["username"], method=row["method"],
            created_at=row["created_at"], updated_at=row["updated_at"], state=row["state"],
            end_reason=row["end_reason"], device_id=row["device_id"],
            card_reader=row["card_reader"], card_atr=row["card_atr"],
            card_serial=row["card_serial"])

    def add_session(self, session_id: str, user_id: str, *, method: str,
                    device_id: str | None = None, card_reader: str | None = None,
                    card_atr: str | None = None, card_serial: str | None = None) -> LoginSession:
        """Record an active session of a user (``UnknownUser``)."""
        if not isinstance(session_id, str) or not 1 <= len(session_id) <= 64:
            raise InvalidValue(f"invalid session id {session_id!r}")
        with self.transaction(), self._using("record a session") as conn:
            user = self.get_user_by_id(user_id)
            now = self._now()
            conn.execute(
                "INSERT INTO sessions (id, user_id, username, method, created_at, updated_at, "
                "state, device_id, card_reader, card_atr, card_serial) "
                "VALUES (?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                (session_id, user.id, user.username, str(method), now, now, device_id,
                 card_reader, card_atr, card_serial))
            return self.get_session(session_id)

    def get_session(self, session_id: str) -> LoginSession | None:
        """The session with that id, or ``None``."""
        with self._using("read a session") as conn:
            row = conn.execute("SELECT * FROM sessions WHERE id = ?", (str(session_id),)).fetchone()
        return None if row is None else self._session(row)

    def list_sessions(self, user_id: str | None = None,
                      states: Sequence[str] | None = None) -> list[LoginSession]:
        """Sessions (of one user, in some states), oldest first."""
        clauses, args = [], []
        if user_id is not None:
            clauses.append("user_id = ?"); args.append(user_id)  # noqa: E702
        if states is not None:
            states = list(states)
            clauses.append(f"state IN ({', '.join('?' * len(states))})"); args.extend(states)  # noqa: E702
        where = ("WHERE " + " AND ".join(clauses) + " ") if clauses else ""
        with self._using("list sessions") as conn:
            rows = conn.execute(f"SELECT * FROM sessions {where}ORDER BY created_at, id",
                                args).fetchall()
        return [self._session(r) for r in rows]

    def set_session_state(self, session_id: str, state: str,
                          reason: str | None = None) -> LoginSession | None:
        """Move a session to ``state`` (active, locked, ended) with the reason; ``None``
        when there is no such session. An ended session stays ended."""
        if state not in SESSION_STATES:
            raise InvalidValue(f"invalid session state {state!r}: one of {', '.join(SESSION_STATES)}")
        with self.transaction(), self._using("change a session") as conn:
            conn.execute("UPDATE sessions SET state = ?, end_reason = ?, updated_at = ? "
                         "WHERE id = ? AND (state != 'ended' OR ? = 'ended')",
                         (state, reason, self._now(), str(session_id), state))
            return self.get_session(session_id)

    # ---------------------------------------------------------------- audit events

    @staticmethod
    def _event(row: sqlite3.Row) -> AuditEvent:
        return AuditEvent(
            id=row["id"], at=row["at"], kind=row["kind"], outcome=row["outcome"],
            user_id=row["user_id"], username=row["username"],
            credential_id=None if row["credential_id"] is None else bytes(row["credential_id"]),
            detail=json.loads(row["detail"]), hash=bytes(row["hash"]))

    def record_event(self, kind: str, *, user_id: str | None = None, username: str | None = None,
                     credential_id: bytes | None = None, outcome: str,
                     detail: Mapping[str, Any] | None = None) -> int:
        """Append an audit event (timestamped now) and return its id.

        ``kind``: lowercase, e.g. ``"login.key"``, ``"enrol.key"``; ``outcome``: lowercase
        word, e.g. ``"success"``, ``"failure"``, ``"refused"``. ``user_id`` need not exist
        (events outlive users and record attempts for unknown ones); when it does, the
        user's current username is stored with the event, unless ``username`` is given
        (e.g. the name typed for an unknown user). ``detail`` is a JSON object checked by
        ``check_detail``: a key that looks like a secret raises ``InvalidValue`` (a
        ``ValueError``) and nothing is written. Nothing is refused for its size: a detail
        too large is cut (``check_detail(..., truncate=True)``), and so are a ``username``
        or ``user_id`` longer than ``MAX_USERNAME_LEN`` characters, with the marker
        ``...[truncated: N characters]``; the hash chain covers what is stored. Returns 0,
        writing nothing, when ``event_gate`` counts the event instead.
        """
        if not isinstance(kind, str) or not EVENT_KIND_RE.fullmatch(kind):
            raise InvalidValue(f"invalid event kind {kind!r}: lowercase letters, digits and . _ : -")
        if not isinstance(outcome, str) or not OUTCOME_RE.fullmatch(outcome):
            raise InvalidValue(f"invalid event outcome {outcome!r}: a lowercase word")
        detail_text = check_detail(detail, truncate=True)
        if self.event_gate is not None and not self.event_gate(kind, outcome, username, detail):
            return 0
        if user_id is not None:
            user_id = _cut(str(user_id), MAX_USERNAME_LEN)
        cred = None if credential_id is None else bytes(credential_id)
        with self.transaction(), self._using("record an audit event") as conn:
            if username is None and user_id is not None:
                row = conn.execute("SELECT username FROM users WHERE id = ?", (user_id,)).fetchone()
                username = None if row is None else row["username"]
            if username is not None:
                username = _cut(str(username), MAX_USERNAME_LEN)
            last = conn.execute("SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1").fetchone()
            prev = _GENESIS_HASH if last is None else bytes(last["hash"])
            seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'").fetchone()
            event_id = (0 if seq is None else int(seq["seq"])) + 1
            at = self._now()
            digest = _event_hash(prev, event_id, at, kind, outcome, user_id, username, cred, detail_text)
            conn.execute(
                "INSERT INTO audit_events (id, at, kind, outcome, user_id, username, credential_id, "
                "detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (event_id, at, kind, outcome, user_id, username, cred, detail_text, prev, digest))
        if self.after_event is not None:
            self.after_event()
        return event_id

    def list_events(self, user_id: str | None = None, kind: str | None = None,
                    limit: int = 100, *, credential_id: bytes | None = None) -> list[AuditEvent]:
        """The latest ``limit`` events matching the filters, newest first."""
        clauses, args = [], []
        if user_id is not None:
            clauses.append("user_id = ?"); args.append(user_id)  # noqa: E702
        if kind is not None:
            clauses.append("kind = ?"); args.append(kind)  # noqa: E702
        if credential_id is not None:
            clauses.append("credential_id = ?"); args.append(bytes(credential_id))  # noqa: E702
        where = ("WHERE " + " AND ".join(clauses) + " ") if clauses else ""
        with self._using("list audit events") as conn:
            rows = conn.execute(f"SELECT * FROM audit_events {where}ORDER BY id DESC LIMIT ?",
                                (*args, int(limit))).fetchall()
        return [self._event(r) for r in rows]

    def verify_events(self) -> int:
        """Check the audit events' hash chain; return how many events were verified.

        Raises ``AuditChainBroken`` at the first record that was edited, removed (a gap in
        the ids, or the last ones missing) or moved.
        """
        with self._using("verify the audit events") as conn:
            prev, expected_id, count = _GENESIS_HASH, 1, 0
            for row in conn.execute("SELECT * FROM audit_events ORDER BY id"):
                eid = row["id"]
                if eid != expected_id:
                    raise AuditChainBroken(f"audit event {expected_id} is missing (next is {eid})",
                                           event_id=expected_id)
                if bytes(row["prev_hash"]) != prev:
                    raise AuditChainBroken(f"audit event {eid} does not follow event {eid - 1}",
                                           event_id=eid)
                cred = None if row["credential_id"] is None else bytes(row["credential_id"])
                digest = _event_hash(prev, eid, row["at"], row["kind"], row["outcome"], row["user_id"],
                                     row["username"], cred, row["detail"])
                if digest != bytes(row["hash"]):
                    raise AuditChainBroken(f"audit event {eid} was altered", event_id=eid)
                prev, expected_id, count = digest, eid + 1, count + 1
            seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'").fetchone()
            if seq is not None and int(seq["seq"]) != count:
                raise AuditChainBroken(f"audit events {count + 1} to {seq['seq']} are missing",
                                       event_id=count + 1)
            return count

    # ---------------------------------------------------------------- settings

    @staticmethod
    def _check_setting_key(key: str) -> str:
        if not isinstance(key, str) or not SETTING_KEY_RE.fullmatch(key):
            raise InvalidValue(f"invalid setting name {key!r}: lowercase letters, digits and . _ -")
        return key

    def get_setting(self, key: str, default: Any = None) -> Any:
        """The setting's value (decoded JSON), or ``default`` when it is not set."""
        self._check_setting_key(key)
        with self._using("read a setting") as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def set_setting(self, key: str, value: Any) -> None:
        """Set a setting to a JSON value (``InvalidValue`` if it is not one). Settings are
        configuration, not secrets: never store a secret here."""
        self._check_setting_key(key)
        try:
            text = json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidValue(f"setting {key!r}: value is not JSON: {exc}") from None
        with self.transaction(), self._using("write a setting") as conn:
            conn.execute(
                "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, text, self._now()))

    def delete_setting(self, key: str) -> bool:
        """Remove a setting; whether it was set."""
        self._check_setting_key(key)
        with self.transaction(), self._using("delete a setting") as conn:
            return conn.execute("DELETE FROM settings WHERE key = ?", (key,)).rowcount > 0

    def list_settings(self) -> dict[str, Any]:
        """All settings, by name."""
        with self._using("list settings") as conn:
            rows = conn.execute("SELECT key, value FROM settings ORDER BY key").fetchall()
        return {r["key"]: json.loads(r["value"]) for r in rows}
