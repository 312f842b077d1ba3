"""The SQLite DDL of the store's migrations (``migrations.py``): one script per schema
version, as released (never edit one; append a new version). The PostgreSQL DDL of the same
versions is in ``schema_pg.py``."""

V1 = """
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

V2 = """
-- A smartcard identity: the holder UUID in a card's authentication certificate.
CREATE TABLE smartcard_identities (
    method_id          INTEGER PRIMARY KEY REFERENCES methods(id) ON DELETE CASCADE,
    uuid               TEXT NOT NULL UNIQUE CHECK (length(uuid) BETWEEN 1 AND 64),
    holder_name        TEXT NOT NULL,
    certificate_serial TEXT,
    issuer             TEXT
);
"""

V3 = """
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

V4 = """
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

V5 = """
-- Who set the account's own MFA flag, for `policy explain`: 'new-account' (the policy's
-- default for new accounts of the user's class), 'admin', 'user' (their own choice); NULL for
-- accounts from before this migration (not known).
ALTER TABLE users ADD COLUMN mfa_source TEXT
    CHECK (mfa_source IS NULL OR mfa_source IN ('new-account', 'admin', 'user'));
"""


V6 = """
-- The audit chain's head: the id and hash of the last event, one row. An append reads it
-- (under a row lock on PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers),
-- writes the event with id last_id + 1 and prev_hash = hash, and moves the head, in one
-- transaction: one gap-free chain whatever the number of writers, and a removed tail is
-- found (the head names an event that is gone).
CREATE TABLE audit_head (
    id      INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    last_id INTEGER NOT NULL CHECK (last_id >= 0),
    hash    BLOB NOT NULL CHECK (typeof(hash) = 'blob' AND length(hash) = 32)
);
INSERT INTO audit_head (id, last_id, hash)
    SELECT 1, coalesce((SELECT max(id) FROM audit_events), 0),
           coalesce((SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1), zeroblob(32));
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
BEGIN
    SELECT RAISE(ABORT, 'the audit chain''s head cannot be deleted');
END;
"""


V7 = """
-- An organisation's workstations (the server's store): one row per name, made by
-- `server workstation-token` (the join token's SHA-256, its expiry, when it was used) and
-- completed by the join (the certificate's serial and SHA-256 fingerprint). A revoked
-- workstation keeps its row (revoked_at) until a new token for its name is issued.
CREATE TABLE workstations (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT NOT NULL UNIQUE COLLATE NOCASE
                     CHECK (length(name) BETWEEN 1 AND 64),
    token_hash       BLOB UNIQUE CHECK (token_hash IS NULL OR
                                        (typeof(token_hash) = 'blob' AND length(token_hash) = 32)),
    token_expires_at REAL,
    token_used_at    REAL,
    cert_serial      TEXT,
    cert_fingerprint TEXT UNIQUE CHECK (cert_fingerprint IS NULL OR length(cert_fingerprint) = 64),
    cert_not_after   REAL,
    created_at       REAL NOT NULL,
    joined_at        REAL,
    revoked_at       REAL,
    last_seen_at     REAL,
    last_address     TEXT
);
"""


V8 = """
-- The audit events an organisation's workstation delivered (its offline logins, queued in
-- its outbox and numbered there): one row per (workstation, seq), written in the same
-- transaction as the event's audit record, so a batch delivered twice is recorded once.
CREATE TABLE org_deliveries (
    workstation  TEXT NOT NULL CHECK (length(workstation) BETWEEN 1 AND 255),
    seq          INTEGER NOT NULL CHECK (seq >= 1),
    delivered_at REAL NOT NULL,
    event_id     INTEGER,
    PRIMARY KEY (workstation, seq)
) WITHOUT ROWID;
"""

V9 = """
-- The organisation's web pages (token_agent/web): signed-in browser sessions, found by the
-- SHA-256 of the cookie's token (never the token), with the last sign-in that counts for
-- re-authentication, the CSRF token, a message shown once, and a page's pending state
-- (a JSON object, bounded); and the rate limits every replica shares: one counter per
-- (scope, key) and fixed window.
CREATE TABLE web_sessions (
    id_hash       BLOB PRIMARY KEY CHECK (typeof(id_hash) = 'blob' AND length(id_hash) = 32),
    user_id       TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf          TEXT NOT NULL CHECK (length(csrf) BETWEEN 16 AND 128),
    created_at    REAL NOT NULL,
    last_seen_at  REAL NOT NULL,
    auth_at       REAL NOT NULL,
    multi_factor  INTEGER NOT NULL CHECK (multi_factor IN (0, 1)),
    method        TEXT NOT NULL CHECK (length(method) BETWEEN 1 AND 64),
    address       TEXT CHECK (address IS NULL OR length(address) <= 64),
    user_agent    TEXT CHECK (user_agent IS NULL OR length(user_agent) <= 256),
    flash         TEXT CHECK (flash IS NULL OR length(flash) <= 1024),
    data          TEXT NOT NULL DEFAULT '{}' CHECK (length(data) <= 16384)
);
CREATE INDEX web_sessions_user ON web_sessions (user_id);
CREATE TABLE web_throttle (
    scope        TEXT NOT NULL CHECK (length(scope) BETWEEN 1 AND 64),
    key          TEXT NOT NULL CHECK (length(key) BETWEEN 1 AND 256),
    window_start REAL NOT NULL,
    count        INTEGER NOT NULL CHECK (count >= 0),
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
"""

PUSH_PAIRING = """
-- Pairing a phone's browser as a push companion: a one-time pairing code (its keyed hash,
-- never the code), its owner, expiry and use (single use: one conditional UPDATE), and the
-- name the new companion will get. One unused code per user at a time.
CREATE TABLE push_pairings (
    code_hash   BLOB PRIMARY KEY NOT NULL CHECK (length(code_hash) = 32),
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    used_at     REAL
) WITHOUT ROWID;
CREATE INDEX push_pairings_by_user ON push_pairings(user_id);

-- The nonces of a companion's signed requests, kept until their time window closes: a
-- signed request is accepted once.
CREATE TABLE push_nonces (
    device_id   TEXT NOT NULL REFERENCES push_devices(device_id) ON DELETE CASCADE,
    nonce       TEXT NOT NULL CHECK (length(nonce) BETWEEN 16 AND 64),
    expires_at  REAL NOT NULL,
    PRIMARY KEY (device_id, nonce)
) WITHOUT ROWID;
"""


V11 = """
-- Temporary access passes (factors/accesspass.py): issued by an administrator after a lost
-- device, each single use and short-lived; the pass itself is never stored, only its keyed
-- hash. A pass ends once: used, expired (recorded when found past expires_at), replaced by a
-- newer pass, or revoked; at most one pass of a user is open (ended_at NULL) at a time.
CREATE TABLE access_passes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    pass_hash  BLOB NOT NULL CHECK (typeof(pass_hash) = 'blob' AND length(pass_hash) = 32),
    issued_by  TEXT NOT NULL CHECK (length(issued_by) BETWEEN 1 AND 255),
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL CHECK (expires_at > created_at),
    ended_at   REAL,
    end_reason TEXT CHECK ((ended_at IS NULL AND end_reason IS NULL) OR
                           (ended_at IS NOT NULL AND
                            end_reason IN ('used', 'expired', 'replaced', 'revoked')))
);
CREATE INDEX access_passes_by_user ON access_passes(user_id, id);
CREATE UNIQUE INDEX access_passes_one_open ON access_passes(user_id) WHERE ended_at IS NULL;
-- The end of validity of the certificate a card last logged in with (the cards page lists
-- those ending soon); NULL until the card is used again.
ALTER TABLE smartcard_identities ADD COLUMN cert_not_after REAL;
"""


V_CALLS = """
-- Phone call approvals ("press #"): one row per call, decided once by the voice gateway's
-- signed webhook (token_agent/factors/voicecall.py).
CREATE TABLE voice_calls (
    id          TEXT PRIMARY KEY NOT NULL CHECK (length(id) BETWEEN 16 AND 64),
    method_id   INTEGER NOT NULL REFERENCES methods(id) ON DELETE CASCADE,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'approved', 'denied', 'expired', 'cancelled')),
    result      TEXT CHECK (result IS NULL OR length(result) <= 32),
    decided_at  REAL
);
CREATE INDEX voice_calls_by_method ON voice_calls(method_id, state);

-- Forgotten-password resets in progress (token_agent/recovery.py): keyed by the SHA-256 of
-- the browser's reset cookie; user_id is NULL for a name that cannot be reset (unknown,
-- disabled), so that such a reset looks the same until a method is proven.
CREATE TABLE recovery_resets (
    id          TEXT PRIMARY KEY NOT NULL CHECK (length(id) = 64),
    user_id     TEXT REFERENCES users(id) ON DELETE CASCADE,
    username    TEXT NOT NULL CHECK (length(username) BETWEEN 1 AND 256),
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    proofs      TEXT NOT NULL DEFAULT '[]',
    step_kind   TEXT,
    step_method INTEGER,
    state       TEXT NOT NULL DEFAULT 'started'
                CHECK (state IN ('started', 'proven', 'done', 'refused')),
    updated_at  REAL NOT NULL
);
CREATE INDEX recovery_resets_by_expiry ON recovery_resets(expires_at);
"""
