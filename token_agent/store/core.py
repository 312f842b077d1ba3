"""The store's core: open and close, transactions over the ``Engine`` seam (``engine.py``),
the migrations runner, and facts about the store. The areas (``users.py``, ``methods.py``,
...) are mixins over ``StoreCore``; ``Store`` (``__init__.py``) combines them.

Transactions
    ``with store.transaction():`` groups writes (``BEGIN IMMEDIATE`` on SQLite, ``BEGIN``
    on PostgreSQL, ... ``COMMIT``; any exception, ``KeyboardInterrupt`` included, rolls
    back): a ceremony's credential, sign count and audit event are written together or not
    at all. Every write method runs in one itself, so it joins the caller's. A nested
    ``transaction()`` is a savepoint inside the outer transaction: an exception leaving the
    inner block undoes only the inner writes, and nothing is committed before the outermost
    block ends. Keep transactions short: never wait for a touch, a PIN or the network inside
    one (other threads, and other processes after the busy timeout, wait for it).

Threads
    A ``Store`` may be shared by threads, and one thread's calls never join another thread's
    open transaction: the transaction in progress is the calling thread's own (thread-local).
    On an engine with one connection (SQLite) a re-entrant lock serialises the threads: every
    method holds it while it uses the connection, and a transaction holds it from ``BEGIN``
    to ``COMMIT``/``ROLLBACK`` (other threads wait for it to end). On an engine whose
    connections come from a pool (``Engine.concurrent``: PostgreSQL) the threads run side by
    side, each call or transaction on a connection of its own, as separate processes do (the
    database's own locks order their writes); ``close()`` then does not wait for them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .. import __version__
from .engine import Engine, Migration, Row
from .errors import StoreError, StoreFileError, StoreMissing
from .migrations import MIGRATIONS, SCHEMA_VERSION, check_migrations
from .records import DEFAULT_BUSY_TIMEOUT
from .sqlite import SQLiteEngine
from .url import is_url

log = logging.getLogger(__name__)


def as_dict(row: Row | None) -> dict[str, Any] | None:
    """A row as a plain dict (``None`` stays ``None``): what the areas return for rows of
    the factors' own tables."""
    return None if row is None else {k: row[k] for k in row.keys()}


class _NoLock:
    """The lock of a store whose engine gives each thread its own connection."""

    def __enter__(self) -> "_NoLock":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class StoreCore:
    """Connection, transactions, migrations and facts; see the module docstring."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float]) -> None:
        """Internal: use ``Store.open``."""
        self._engine = engine
        #: the store's file (SQLite), or None
        self.path: Path | None = getattr(engine, "path", None)
        #: this machine's data directory, for its local files (the CRL cache): the SQLite
        #: file's directory; for PostgreSQL the one ``datadir.open_store`` names, else None
        self.local_dir: Path | None = self.path.parent if self.path is not None else None
        self._where = engine.describe()
        self._clock = clock
        self._lock: Any = (_NoLock() if getattr(engine, "concurrent", False)
                           else threading.RLock())
        self._tx = threading.local()  # the calling thread's transaction (depth, conn, stack)
        self._closed = False
        #: called (no arguments) after each ``record_event``, e.g. the service's size alarm
        self.after_event: Callable[[], None] | None = None
        #: called ``(kind, outcome, username, detail)`` before each ``record_event``: False
        #: means counted instead of recorded (the service's ``refusals.UnknownLogins``)
        self.event_gate: Callable[[str, str, str | None, Any], bool] | None = None

    # the calling thread's transaction: nesting depth, connection, what closes it
    @property
    def _depth(self) -> int:
        return getattr(self._tx, "depth", 0)

    @_depth.setter
    def _depth(self, value: int) -> None:
        self._tx.depth = value

    @property
    def _tx_conn(self) -> Any:
        return getattr(self._tx, "conn", None)

    @_tx_conn.setter
    def _tx_conn(self, value: Any) -> None:
        self._tx.conn = value

    @property
    def _tx_stack(self) -> ExitStack | None:
        return getattr(self._tx, "stack", None)

    @_tx_stack.setter
    def _tx_stack(self, value: ExitStack | None) -> None:
        self._tx.stack = value

    # ---------------------------------------------------------------- open / close

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
             clock: Callable[[], float] = time.time,
             migrations: Sequence[Migration] = MIGRATIONS, create: bool = True,
             password_file: str | os.PathLike[str] | None = None) -> Any:
        """Open the store at ``path``, a SQLite file, or a PostgreSQL database named by a
        ``postgresql://`` URL (``url.py``; ``password_file``: where its password is), and
        bring its schema up to date.

        A SQLite file's directory must exist. Without ``create`` (a command that only
        reads) a missing file (or directory), or a database without a token-agent schema,
        is ``StoreMissing`` and nothing is created. Raises ``StoreFileError`` when the file
        cannot be created, opened or written, is not a SQLite database, is corrupt, or
        belongs to another program (on PostgreSQL: a database holding another program's
        tables); ``StoreUnavailable`` when the server cannot be reached or refuses the
        role; ``SchemaTooNew`` when it was written by a newer token-agent; in every case
        without changing anything. Writability is checked here, before any ceremony starts,
        not at the first write. ``migrations`` is for tests of the migration mechanism.
        """
        check_migrations(migrations)
        if is_url(path):
            from .postgres import PostgresEngine

            engine: Engine = PostgresEngine(str(path), password_file=password_file)
        else:
            engine = SQLiteEngine.open(path, busy_timeout=busy_timeout, create=create)
        return cls.open_engine(engine, clock=clock, migrations=migrations, create=create)

    @classmethod
    def open_engine(cls, engine: Engine, *, clock: Callable[[], float] = time.time,
                    migrations: Sequence[Migration] = MIGRATIONS, create: bool = True) -> Any:
        """A store over an engine (``SQLiteEngine.open``, a ``PostgresEngine``): identify
        the database, refuse a newer schema, migrate. Without ``create``, a database with
        no token-agent schema yet is ``StoreMissing`` (nothing is created in it). The engine
        is closed when this fails."""
        check_migrations(migrations)
        store = cls(engine, clock=clock)
        try:
            with engine.connect() as conn:
                found = engine.prepare(conn, len(migrations))
                if not create and not found and getattr(engine, "path", None) is None:
                    raise StoreMissing(f"no token-agent store in the database "
                                       f"{engine.describe()}", path=engine.describe())
                store._migrate(conn, migrations)
        except BaseException:
            store._closed = True
            engine.close()
            raise
        return store

    def _migrate(self, conn: Any, migrations: Sequence[Migration]) -> None:
        engine = self._engine
        for m in migrations:
            action = f"apply schema migration {m.version} ({m.name})"
            try:
                if engine.schema_version(conn) >= m.version:
                    continue
                engine.before_migration(conn, m)
                try:
                    engine.begin(conn)
                    try:
                        engine.lock_schema(conn)
                        # Another process may have migrated while we waited for the lock.
                        if engine.schema_version(conn) >= m.version:
                            engine.rollback(conn)
                            continue
                        engine.run_step(conn, m)
                        engine.set_schema_version(conn, m.version)
                        conn.execute(
                            "INSERT INTO schema_history (version, name, applied_at, agent_version) "
                            "VALUES (?, ?, ?, ?)", (m.version, m.name, self._clock(), __version__))
                        engine.commit(conn)
                    except BaseException:
                        if engine.in_transaction(conn):
                            engine.rollback(conn)
                        raise
                finally:
                    engine.after_migration(conn, m)
            except StoreFileError:
                raise
            except Exception as exc:
                mapped = engine.error(exc, action)
                if isinstance(mapped, StoreFileError):
                    raise mapped from exc
                raise StoreError(f"token-agent store {self._where}: schema migration {m.version} "
                                 f"({m.name}) failed and was rolled back: {exc}") from exc
            log.info("token-agent store %s: applied schema migration %d (%s)", self._where,
                     m.version, m.name)

    def close(self) -> None:
        """Close the store (idempotent). Waits for a transaction of another thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._engine.close()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    @property
    def location(self) -> str:
        """Where the store is, for messages: the file's path, or the URL without its
        password (``Engine.describe``)."""
        return self._where

    @property
    def engine(self) -> Engine:
        """The store's engine (``SQLiteEngine``, ``PostgresEngine``)."""
        return self._engine

    @property
    def _conn(self) -> Any:
        """SQLite: the store's one connection (for tests that reach below the store)."""
        return None if self._closed else getattr(self._engine, "conn", None)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Store {self._where!r}{' closed' if self.closed else ''}>"

    # ---------------------------------------------------------------- plumbing

    def _require_open(self) -> None:
        if self._closed:
            raise StoreError(f"token-agent store {self._where} is closed")

    @contextmanager
    def _using(self, action: str) -> Iterator[Any]:
        """Hold the lock, give the connection (the transaction's, inside one) and map the
        engine's errors to ``StoreError``s."""
        with self._lock:
            self._require_open()
            engine = self._engine
            if self._depth:
                conn = self._tx_conn
                if not engine.in_transaction(conn):
                    raise StoreError(f"token-agent store {self._where}: the transaction was "
                                     "aborted by an earlier error; nothing of it was written")
                with self._mapped(action):
                    yield conn
            else:
                with self._mapped(action), engine.connect() as conn:
                    yield conn

    @contextmanager
    def _mapped(self, action: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except Exception as exc:
            mapped = self._engine.error(exc, action)
            if mapped is None:
                raise
            raise mapped from exc

    @contextmanager
    def connection(self, action: str) -> Iterator[Any]:
        """The engine's connection (``?`` placeholders, rows by name or index), for the
        store's areas: held under the store's lock, the engine's errors mapped to
        ``StoreError`` (``action`` says what was being done, for the message). Wrap writes
        in ``transaction()``."""
        with self._using(action) as conn:
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """All writes inside are committed together at the end, or none of them.

        ``BEGIN IMMEDIATE`` on SQLite (the write lock is taken at once, so a read-then-write
        inside cannot be overtaken by another writer; on PostgreSQL such a read takes a row
        lock: ``engine.for_update``); ``COMMIT`` at the end; ``ROLLBACK`` if any exception
        leaves the block. Nested use joins the outer transaction through a savepoint (an
        exception leaving the inner block undoes the inner block's writes). Holds the
        store's lock throughout: other threads wait. Yields the store.
        """
        with self._lock:
            self._require_open()
            engine = self._engine
            if self._depth == 0:
                stack = ExitStack()
                with self._mapped("start a write transaction"):
                    try:
                        conn = stack.enter_context(engine.connect())
                        engine.begin(conn)
                    except BaseException:
                        stack.close()
                        raise
                self._tx_conn, self._tx_stack, self._depth = conn, stack, 1
                try:
                    yield self
                except BaseException:
                    self._rollback(conn, None)
                    raise
                else:
                    try:
                        with self._mapped("commit"):
                            engine.commit(conn)
                    except BaseException:
                        self._rollback(conn, None)
                        raise
                finally:
                    self._depth = 0
                    self._tx_conn = self._tx_stack = None
                    stack.close()
            else:
                conn = self._tx_conn
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
                        conn.execute(f"RELEASE SAVEPOINT {name}")
                finally:
                    self._depth -= 1

    def _rollback(self, conn: Any, savepoint: str | None) -> None:
        engine = self._engine
        if not engine.in_transaction(conn):
            return  # the engine already rolled back (e.g. after an I/O error)
        try:
            if savepoint is None:
                engine.rollback(conn)
            else:
                conn.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
                conn.execute(f"RELEASE SAVEPOINT {savepoint}")
        except Exception as exc:
            log.error("token-agent store %s: rollback failed: %s", self._where, exc)

    def _now(self) -> float:
        return float(self._clock())

    # ---------------------------------------------------------------- information

    @property
    def schema_version(self) -> int:
        """The store's schema version."""
        with self._using("read the schema version") as conn:
            return self._engine.schema_version(conn)

    def info(self) -> dict[str, Any]:
        """Facts about the store for status and diagnostics: its location, schema version,
        and the engine's facts (SQLite: version, journal mode, synchronous level, foreign
        keys, busy timeout, file mode and size)."""
        with self._using("read the store's settings") as conn:
            facts = self._engine.info(conn)
            version = self._engine.schema_version(conn)
        first, rest = list(facts.items())[:1], list(facts.items())[1:]
        return {**dict(first), "schema_version": version, "code_schema_version": SCHEMA_VERSION,
                **dict(rest)}

    def check_integrity(self) -> list[str]:
        """Problems found by the engine's checks (SQLite: ``PRAGMA integrity_check`` and
        ``foreign_key_check``); empty if none. (Damage is only noticed when a damaged page
        is read: ``Store.open`` reads the schema, not every page. A file too damaged to
        check gives its error as the problem.)"""
        try:
            with self._using("check the file's integrity") as conn:
                return self._engine.check_integrity(conn)
        except StoreFileError as exc:
            if exc.reason in ("corrupt", "not a SQLite database"):
                return [str(exc)]
            raise
