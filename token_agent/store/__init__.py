"""The agent's store: users, their authentication methods, audit events, settings; one
package, one module per area, on an engine behind one seam.

* ``core.py``: ``StoreCore`` (open and close, transactions and savepoints, the migrations
  runner, facts and integrity), over ``engine.py``'s ``Engine`` (the rules for SQL written
  once for both engines);
* ``sqlite.py``: ``SQLiteEngine``, the embedded default (file checks, pragmas, durability);
* ``migrations.py``: the ordered ``MIGRATIONS`` (DDL: ``schema_sqlite.py``, ``schema_pg.py``);
* ``errors.py``, ``records.py`` (constants and dataclasses), ``detail.py`` (audit detail
  rules);
* the areas, each a mixin owning its tables and queries: ``users.py``, ``methods.py``
  (methods of any kind, FIDO2 credentials), ``cards.py`` (smartcard identities),
  ``secrets.py`` (passwords, authenticator apps, app passwords, backup codes), ``codes.py``
  (contacts, one-time codes), ``push.py``, ``lockouts.py``, ``sightings.py``,
  ``sessions.py``, ``settings.py``, ``workstations.py`` (an organisation's
  workstations), ``deliveries.py`` (the events they delivered), ``accesspasses.py``
  (temporary access passes), ``calls.py`` (phone call approvals, password resets),
  ``audit.py``. No SQL outside this package.

``Store`` combines them; ``Store.open(path)`` opens a SQLite store. Every error is a
``StoreError`` (``errors.py``).
"""

from __future__ import annotations

from .accesspasses import AccessPassesArea
from .audit import AuditArea
from .calls import CallsArea
from .cards import CardsArea
from .codes import CodesArea
from .core import StoreCore
from .deliveries import DeliveriesArea
from .detail import (
    METADATA_WORDS, SECRET_STEMS, SECRET_WORDS, check_detail, secret_looking,
)
from .engine import Engine, Migration
from .errors import (
    AuditChainBroken, CredentialExists, IntegrityViolation, InvalidValue, SchemaTooNew,
    JoinTokenRefused, SignCountRegression, StoreError, StoreFileError, StoreMissing,
    StoreUnavailable, UnknownCredential, UnknownUser, UnknownWorkstation, UserExists,
    WorkstationExists,
)
from .lockouts import LockoutsArea
from .methods import MethodsArea
from .migrations import MIGRATIONS, SCHEMA_VERSION
from .records import (
    APPLICATION_ID, CARD_UUID_RE, DEFAULT_BUSY_TIMEOUT, EVENT_KIND_RE, KIND_APP_PASSWORD,
    KIND_BACKUP_CODES, KIND_EMAIL, KIND_FIDO2, KIND_MESSAGING, KIND_PASSWORD, KIND_PUSH,
    KIND_SMARTCARD, KIND_SMS, KIND_TOTP, KIND_VOICE, MAX_CREDENTIAL_ID_LEN, MAX_DETAIL_BYTES,
    MAX_DETAIL_STRING, MAX_DISPLAY_NAME_LEN, MAX_NAME_LEN, METHOD_KINDS, MFA_SOURCES,
    OUTCOME_RE, ROLE_RE, SESSION_STATES, SETTING_KEY_RE, USER_CLASSES,
    USER_HANDLE_LEN, WORKSTATION_NAME_RE, AuditEvent, FidoCredential, LoginSession, Method,
    SmartcardIdentity, User, Workstation,
)
from .push import PushArea
from .secrets import SecretsArea
from .sessions import SessionsArea
from .settings import SettingsArea
from .sightings import SightingsArea
from .sqlite import SQLiteEngine, run_script
from .users import UsersArea
from .websessions import WebSessionRow, WebSessionsArea
from .workstations import WorkstationsArea


class Store(UsersArea, MethodsArea, CardsArea, SecretsArea, CodesArea, PushArea, CallsArea,
            LockoutsArea, SightingsArea, SessionsArea, SettingsArea, WorkstationsArea,
            DeliveriesArea, WebSessionsArea, AccessPassesArea,
            AuditArea, StoreCore):
    """The agent's store. Create with ``Store.open(path)`` (SQLite); close with ``close()``
    or use it as a context manager. See the package's modules for durability
    (``sqlite.py``), transactions and threads (``core.py``) and errors (``errors.py``)."""


__all__ = [
    "IntegrityViolation", "StoreUnavailable",
    "APPLICATION_ID", "CARD_UUID_RE", "DEFAULT_BUSY_TIMEOUT", "EVENT_KIND_RE", "KIND_APP_PASSWORD",
    "KIND_BACKUP_CODES", "KIND_EMAIL", "KIND_FIDO2", "KIND_MESSAGING", "KIND_PASSWORD", "KIND_PUSH",
    "KIND_SMARTCARD", "KIND_SMS", "KIND_TOTP", "KIND_VOICE", "MAX_CREDENTIAL_ID_LEN",
    "MAX_DETAIL_BYTES", "MAX_DETAIL_STRING", "MAX_DISPLAY_NAME_LEN", "MAX_NAME_LEN",
    "METADATA_WORDS", "METHOD_KINDS", "MFA_SOURCES", "MIGRATIONS", "OUTCOME_RE", "ROLE_RE",
    "SCHEMA_VERSION", "SECRET_STEMS", "SECRET_WORDS", "SESSION_STATES",
    "SETTING_KEY_RE",
    "USER_CLASSES", "USER_HANDLE_LEN", "AuditChainBroken",
    "AuditEvent", "CredentialExists", "Engine", "FidoCredential", "InvalidValue", "LoginSession",
    "Method", "Migration", "SQLiteEngine", "SchemaTooNew", "SignCountRegression",
    "SmartcardIdentity", "Store", "StoreCore", "StoreError", "StoreFileError", "StoreMissing",
    "UnknownCredential", "UnknownUser", "User", "UserExists", "check_detail", "run_script",
    "secret_looking", "JoinTokenRefused", "UnknownWorkstation", "WorkstationExists",
    "WORKSTATION_NAME_RE", "Workstation", "WorkstationsArea",
]
