"""The store's schema, in order, on both engines: ``MIGRATIONS[n-1]`` brings a store to
version ``n``. Opening a store applies the missing ones, each in its own transaction
together with its version bump and its ``schema_history`` row, so a failed or interrupted
migration leaves the store at the previous version (``core.py`` runs them). A store of a
newer version than this code knows is refused (``SchemaTooNew``), untouched.

To grow the schema, append a ``Migration`` (never edit a released one) with its SQLite step
(``schema_sqlite.py``) and its PostgreSQL step (``schema_pg.SCRIPTS[n]``, imported only when
a PostgreSQL store migrates, so SQLite never imports psycopg); a migration that rebuilds a
SQLite table sets ``foreign_keys_off=True`` and the runner checks ``foreign_key_check``
before it commits.

Authentication methods of every kind share the ``methods`` table (owner, kind, name,
created / last used, flag); each kind keeps its own details in a table keyed by the method
id (``fido2_credentials``, ``smartcard_identities``, ``totp_credentials``, ...), so that
"the user's methods", "the preferred method", "remove all methods of a user" and per-method
lockouts have one place to live.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import schema_sqlite
from .engine import Migration
from .records import APPLICATION_ID
from .sqlite import run_script


def _pg(version: int) -> Callable[[Any], None]:
    """The PostgreSQL step of migration ``version``: ``schema_pg.SCRIPTS[version]``."""

    def step(conn: Any) -> None:
        from . import schema_pg
        from .engine import split_script

        for statement in split_script(schema_pg.SCRIPTS[version]):
            conn.execute(statement)

    step.__name__ = f"postgresql_{version}"
    return step


def _sqlite_1(conn: Any) -> None:
    run_script(conn, schema_sqlite.V1)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


#: the schema, in order: ``MIGRATIONS[n-1]`` brings a store to version ``n``. Append only.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "users, roles, methods, FIDO2 credentials, audit events, settings",
              sqlite=_sqlite_1, postgresql=_pg(1)),
    Migration(2, "smartcard identities", sqlite=schema_sqlite.V2, postgresql=_pg(2)),
    Migration(3, "user classes, preferred methods, second factors, lockouts, sightings",
              sqlite=schema_sqlite.V3, postgresql=_pg(3)),
    Migration(4, "the service's sessions", sqlite=schema_sqlite.V4, postgresql=_pg(4)),
    Migration(5, "who set a user's MFA flag", sqlite=schema_sqlite.V5, postgresql=_pg(5)),
    Migration(6, "the audit chain's head", sqlite=schema_sqlite.V6, postgresql=_pg(6)),
    Migration(7, "an organisation's workstations", sqlite=schema_sqlite.V7, postgresql=_pg(7)),
    Migration(8, "audit events delivered by organisation workstations",
              sqlite=schema_sqlite.V8, postgresql=_pg(8)),
    Migration(9, "the web pages' sessions and rate limits", sqlite=schema_sqlite.V9,
              postgresql=_pg(9)),
    Migration(10, "pairing codes and signed-request nonces of push companions",
              sqlite=schema_sqlite.PUSH_PAIRING, postgresql=_pg(10)),
    Migration(11, "temporary access passes; a card certificate's end of validity",
              sqlite=schema_sqlite.V11, postgresql=_pg(11)),
    Migration(12, "phone call approvals and forgotten-password resets",
              sqlite=schema_sqlite.V_CALLS, postgresql=_pg(12)),
)
#: the schema version this code writes
SCHEMA_VERSION = len(MIGRATIONS)


def check_migrations(migrations: Sequence[Migration]) -> None:
    """``ValueError`` unless the migrations are numbered 1, 2, 3, ... in order."""
    for i, m in enumerate(migrations, start=1):
        if m.version != i:
            raise ValueError(f"migration {m.name!r} has version {m.version}, expected {i}: "
                             "migrations must be numbered 1, 2, 3, ... in order")


check_migrations(MIGRATIONS)
