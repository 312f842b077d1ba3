"""The seam between the store and a database engine: SQLite (``sqlite.py``, the embedded
default) or PostgreSQL (``postgres.py``, an organisation's shared database).

The store's areas (``users.py``, ``methods.py``, ...) write their SQL once, for both
engines, in the common subset:

* placeholders are ``?`` (the PostgreSQL engine turns them into ``%s``; a literal ``%`` in
  a query is fine, the engine escapes it);
* rows are read by column name or by index (``row["id"]``, ``row[0]``);
* booleans are stored as INTEGER 0/1 and passed as ``int`` (a Python ``bool`` is accepted
  and stored as 0/1 on both engines);
* new ids come from ``INSERT ... RETURNING id`` (SQLite 3.35 and later has RETURNING),
  never from ``cursor.lastrowid``;
* upserts are ``INSERT ... ON CONFLICT (cols) DO UPDATE/NOTHING`` (never ``INSERT OR``);
* case-insensitive names compare with ``lower(col) = lower(?)``;
* timestamps are REAL on SQLite and DOUBLE PRECISION on PostgreSQL, blobs BLOB / BYTEA,
  integers INTEGER / BIGINT: the DDL is per engine (``Migration``), the queries are not;
* the few fragments that differ come from the engine: ``engine.for_update`` (a row lock,
  ``" FOR UPDATE"`` on PostgreSQL, empty on SQLite whose ``BEGIN IMMEDIATE`` already holds
  the only write lock) and ``engine.string_agg(expr, sep)``.

Concurrency rules, the same on both engines (``BEGIN IMMEDIATE`` serialises SQLite's
writers; PostgreSQL runs READ COMMITTED, so the store must not rely on that):

* an operation that must happen once is one conditional UPDATE whose ``rowcount`` says who
  won (a TOTP step: ``... SET last_step = ? WHERE method_id = ? AND last_step < ?``; a
  one-time code: ``... WHERE id = ? AND used_at IS NULL``; a push answer: ``... WHERE id = ?
  AND state = 'pending'``; a signature counter: ``... WHERE method_id = ? AND sign_count < ?``);
* a read-then-write (the lockout count and its threshold) reads with ``engine.for_update``
  after making sure the row exists;
* the audit chain is appended under a lock on its single head row (``audit.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, Union


class Row(Protocol):
    """A result row: by column name or by index."""

    def __getitem__(self, key: int | str) -> Any: ...

    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...

    def __iter__(self) -> Iterator[Row]: ...


class Connection(Protocol):
    """What the store's areas get from ``Store.connection(action)``: ``?`` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> Any: ...


#: a migration step for one engine: a SQL script (statements separated by ``;`` at the end of
#: a line), or a function given the connection (inside the migration's transaction)
Step = Union[str, Callable[[Connection], None]]


@dataclass(frozen=True)
class Migration:
    """One step of the schema, on both engines: ``MIGRATIONS[n-1]`` brings a store to
    version ``n``. Each engine runs its own step inside the transaction that also records
    the version, so a failed migration leaves the store at the previous version.
    ``foreign_keys_off``: SQLite table rebuilds (PostgreSQL ignores it). ``postgresql`` may
    be ``None`` only for a migration written for SQLite alone (the tests of the migration
    mechanism); an engine without a step for a migration refuses it (the migration fails
    and is rolled back)."""

    version: int
    name: str
    sqlite: Step
    postgresql: Step | None = None
    foreign_keys_off: bool = False


class Engine(ABC):
    """One database: how to connect, begin, identify the schema, and what differs in SQL.

    ``Store`` owns the transaction logic (depth, savepoints, the lock between threads); the
    engine gives it connections and maps the driver's errors to ``StoreError``s."""

    #: "sqlite" or "postgresql"
    name: str
    #: a row lock on the rows a SELECT reads, up to the end of the transaction
    for_update: str = ""
    #: whether ``connect`` gives each caller a connection of its own (a pool), so that the
    #: store's threads may run side by side (``StoreCore``: no lock between them)
    concurrent: bool = False

    @abstractmethod
    def describe(self) -> str:
        """The store's location for messages: the file's path, or the URL without its
        password."""

    @contextmanager
    @abstractmethod
    def connect(self) -> Iterator[Any]:
        """A connection for one operation or one whole (outermost) transaction; given back
        at the end (SQLite: the store's one connection; PostgreSQL: the pool's)."""

    @abstractmethod
    def begin(self, conn: Any) -> None:
        """Start a write transaction (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``BEGIN``)."""

    def commit(self, conn: Any) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: Any) -> None:
        conn.execute("ROLLBACK")

    @abstractmethod
    def in_transaction(self, conn: Any) -> bool:
        """Whether a transaction is open on ``conn`` (false after the engine rolled it back
        by itself, e.g. on an I/O error or a lost connection)."""

    @abstractmethod
    def error(self, exc: BaseException, action: str) -> Exception | None:
        """The ``StoreError`` for a driver error met while doing ``action`` ("record an
        audit event"), with a message that names the store and says what to do; ``None``
        when ``exc`` is not the driver's."""

    # ------------------------------------------------------------------ schema

    @abstractmethod
    def prepare(self, conn: Any, known_version: int) -> int:
        """Before migrating: set the connection up, identify the database (refuse another
        program's, untouched: ``StoreFileError`` reason ``foreign``), refuse a schema newer
        than ``known_version`` (``SchemaTooNew``), check it can be written; return the
        schema version (0: empty)."""

    @abstractmethod
    def schema_version(self, conn: Any) -> int:
        """The version of the schema (0 for an empty database)."""

    @abstractmethod
    def lock_schema(self, conn: Any) -> None:
        """Inside a migration's transaction, before the version is read again: wait for
        another process migrating (SQLite: nothing, ``BEGIN IMMEDIATE`` did it)."""

    @abstractmethod
    def set_schema_version(self, conn: Any, version: int) -> None:
        """Record ``version`` inside the migration's transaction."""

    @abstractmethod
    def run_step(self, conn: Any, migration: Migration) -> None:
        """Apply this engine's step of ``migration`` inside the current transaction."""

    def before_migration(self, conn: Any, migration: Migration) -> None:
        """Before the migration's transaction begins (SQLite: foreign keys off for a table
        rebuild, which cannot be switched inside a transaction). Default: nothing."""

    def after_migration(self, conn: Any, migration: Migration) -> None:
        """After the migration's transaction ended, committed or not (SQLite: foreign keys
        back on). Default: nothing."""

    # ------------------------------------------------------------------ facts and checks

    @abstractmethod
    def info(self, conn: Any) -> dict[str, Any]:
        """Facts for ``store check`` and status: engine, location, server or library
        version, and engine-specific settings."""

    @abstractmethod
    def check_integrity(self, conn: Any) -> list[str]:
        """Problems with the database itself (empty when none)."""

    @abstractmethod
    def string_agg(self, expr: str, sep: str) -> str:
        """SQL aggregating ``expr`` into one string, ``sep`` between (a literal)."""

    def ids_copied(self, conn: Any, table: str, column: str) -> None:
        """After rows were inserted with their ids given (``store migrate``): make the ids
        the engine generates next follow them (SQLite's AUTOINCREMENT already does)."""

    def close(self) -> None:
        """Give back every connection (idempotent)."""


def split_script(script: str) -> list[str]:
    """The statements of a migration script, for engines that run them one by one: split
    at a ``;`` that ends a line outside a ``BEGIN ... END`` block (SQLite triggers) or a
    ``$$ ... $$`` body (PostgreSQL functions). Comment lines (``--``) are dropped."""
    statements: list[str] = []
    pending: list[str] = []
    depth = 0
    dollar = False
    for line in script.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("--")):
            continue
        pending.append(line)
        if stripped.count("$$") % 2:
            dollar = not dollar
        if not dollar:
            upper = stripped.upper()
            if upper == "BEGIN" or upper.endswith(" BEGIN"):
                depth += 1
            elif upper in ("END;", "END") and depth:
                depth -= 1
        if stripped.endswith(";") and depth == 0 and not dollar:
            statements.append("\n".join(pending).strip())
            pending = []
    if "\n".join(pending).strip():
        raise ValueError(f"incomplete SQL statement at the end of a script: "
                         f"{' '.join(pending).strip()[:80]!r}")
    return statements
