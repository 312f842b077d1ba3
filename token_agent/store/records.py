"""The store's constants and records: method kinds (``kinds.py`` is their registry), user
classes, limits, and
the dataclasses the store returns (``User``, ``FidoCredential``, ``SmartcardIdentity``,
``Method``, ``AuditEvent``, ``LoginSession``)."""

from __future__ import annotations

import base64
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import kinds as _kinds

#: ``PRAGMA application_id`` of a token-agent store ("TkAg")
APPLICATION_ID = 0x546B4167
#: seconds a statement waits for another process's lock before ``StoreFileError``
DEFAULT_BUSY_TIMEOUT = 5.0

# Method kinds (``methods.kind``): their store names, from the one registry (``kinds.py``).
KIND_PASSWORD = _kinds.PASSWORD.store
KIND_FIDO2 = _kinds.KEY.store
#: a smartcard identity (the holder's UUID in the card's certificate)
KIND_SMARTCARD = _kinds.CARD.store
KIND_TOTP = _kinds.TOTP.store
KIND_EMAIL = _kinds.EMAIL.store
KIND_SMS = _kinds.SMS.store
KIND_VOICE = _kinds.VOICE.store
KIND_MESSAGING = _kinds.MESSAGING.store
KIND_PUSH = _kinds.PUSH.store
KIND_APP_PASSWORD = _kinds.APP_PASSWORD.store
KIND_BACKUP_CODES = _kinds.BACKUP_CODES.store
#: every method kind the store knows
METHOD_KINDS = tuple(k.store for k in _kinds.ALL)
#: user classes (``users.user_class``) of the MFA policy
USER_CLASSES = ("internal", "external", "contributor")
#: who set a user's own MFA flag (``users.mfa_source``): the policy's new-accounts default,
#: an administrator, the user themself
MFA_SOURCES = ("new-account", "admin", "user")
#: a smartcard holder's UUID (NHS: 12 digits; other PKIs: letters, digits and . _ : -)
CARD_UUID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")

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
    #: the end of validity of the certificate the card last logged in with (None: not known)
    cert_not_after: float | None = None

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



#: an organisation workstation's name (``workstations.name``; the CN of its certificate)
WORKSTATION_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Workstation:
    """An organisation's workstation (schema migration 7): made by a join token, joined
    with a certificate (``cert_fingerprint``: SHA-256 of its DER, hex), maybe revoked.
    ``state``: ``pending`` (a token, not joined yet), ``joined``, ``revoked``."""

    id: int
    name: str
    token_expires_at: float | None
    token_used_at: float | None
    cert_serial: str | None
    cert_fingerprint: str | None
    cert_not_after: float | None
    created_at: float
    joined_at: float | None
    revoked_at: float | None
    last_seen_at: float | None
    last_address: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "joined" if self.cert_fingerprint is not None else "pending"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state
        return d
