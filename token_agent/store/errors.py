"""The store's errors.

Every error is a ``StoreError``. File-level problems (cannot create or open, not writable,
not a SQLite database, corrupt, locked, disk full) are ``StoreFileError``, whose message
names the file and says what to do; nothing is written when one is raised. ``UnknownUser``,
``UserExists``, ``CredentialExists``, ``UnknownCredential``, ``SignCountRegression``,
``SchemaTooNew`` and ``AuditChainBroken`` are the domain errors; ``InvalidValue`` (also a
``ValueError``) is bad input.
"""

from __future__ import annotations

from pathlib import Path


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


class StoreUnavailable(StoreError):
    """The PostgreSQL store cannot be used right now; nothing was written (or, for a
    connection lost during COMMIT, the message says the outcome is unknown).

    ``reason``: ``unreachable`` (no server at the address, or it is starting or stopping),
    ``connection lost`` (the server stopped or restarted during the operation), ``auth``
    (authentication refused), ``no database``, ``busy`` (a lock or a connection waited
    for too long), ``conflict`` (a serialization failure or deadlock: try again),
    ``read-only`` (a standby), ``permission`` (the role lacks a privilege);
    ``location`` the URL (without password)."""

    def __init__(self, message: str, *, reason: str, location: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.location = location


class IntegrityViolation(StoreError):
    """A constraint refused the write (unique, check, foreign key, or the audit table's
    append-only triggers); ``constraint`` is its name when the server gave it."""

    def __init__(self, message: str, *, constraint: str | None, sqlstate: str | None) -> None:
        super().__init__(message)
        self.constraint = constraint
        self.sqlstate = sqlstate


class UnknownWorkstation(StoreError, LookupError):
    """No organisation workstation of that name."""


class WorkstationExists(StoreError):
    """The workstation has joined and is not revoked: a new join token is refused."""


class JoinTokenRefused(StoreError):
    """A join token that cannot be used: ``reason`` is ``unknown``, ``used`` or ``expired``."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
