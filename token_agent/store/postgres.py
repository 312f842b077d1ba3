"""The store on PostgreSQL (15 and later): an organisation's database, shared by many
workstations, through psycopg 3 and a ``psycopg_pool.ConnectionPool``.

``PostgresEngine(url, password_file=...)`` implements ``engine.Engine``:

* the URL names the server, the database and the role (``postgresql://ROLE@HOST/DB``, or
  a socket: ``postgresql://ROLE@/DB?host=/run/postgresql``); a URL carrying a password is
  refused: the password comes from ``password_file`` (mode 0600 or 0400, owned by the user or
  root, not a link) or from libpq's usual means (``PGPASSFILE``, ``~/.pgpass``,
  ``PGPASSWORD``, peer or certificate authentication), never from a command line;
* connections are autocommit (the store sends ``BEGIN``/``COMMIT``), checked when taken from
  the pool (a restarted server is reconnected), with ``lock_timeout`` and
  ``idle_in_transaction_session_timeout`` set per connection;
* the store's SQL (``?`` placeholders, rows by name or index, bools as 0/1) is translated by
  ``PgConnection``;
* the database is identified by the table ``token_agent_meta`` (the application marker and
  the schema version): a database with tables but no marker is another program's and is
  refused untouched.

Errors become ``StoreError``s naming the URL (never a password) and saying what to do:
``StoreUnavailable`` (``reason``: ``unreachable``, ``connection lost``, ``auth``, ``busy``,
``read-only``, ``permission``, ``no database``), ``IntegrityViolation`` (a constraint).
"""

from __future__ import annotations

import logging
import os
import re
import select
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import psycopg
    from psycopg import errors as pgerrors
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.pq import TransactionStatus
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as _missing:  # the optional extra
    raise ImportError(
        f"the PostgreSQL store needs psycopg 3 and psycopg-pool ({_missing}): install "
        "token-agent with its postgresql extra (pip install 'token-agent[postgresql]')"
    ) from _missing

from token_agent.filetrust import UntrustedPath, check_private_file, read_private_file
from token_agent.store.errors import (
    IntegrityViolation,
    InvalidValue,
    SchemaTooNew,
    StoreError,
    StoreFileError,
    StoreUnavailable,
)
from token_agent.store.records import APPLICATION_ID
from token_agent.store.url import redact, url_problem
from token_agent.store.engine import Engine, Migration, split_script
from token_agent.store.pgconn import PgConnection, row_factory

# The pool logs a warning for each failed connection attempt; the engine turns the same
# failure into the StoreError its caller reports (StoreUnavailable, with libpq's reason), so
# the pool's lines would only say it again, on the stderr of every command.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

#: the identification table: ``application`` = ``MARKER``, ``schema_version`` = N
META_TABLE = "token_agent_meta"
MARKER = "token-agent"
#: the advisory lock key held while migrating (the application id)
_SCHEMA_LOCK = APPLICATION_ID


# --------------------------------------------------------------------------- the engine

_AUTH = re.compile(r"authentication failed|no password supplied|password is required|"
                   r"role \".*\" does not exist|certificate|pg_hba\.conf", re.I)
_NO_DATABASE = re.compile(r"database \".*\" does not exist", re.I)


def _read_password_file(path: str | os.PathLike[str]) -> str:
    """The password in ``path``'s first line. The file must be the user's or root's, a
    regular file (not a link), not readable or writable by its group or others."""
    path = Path(path)
    what = "store password file"
    try:
        st = check_private_file(path, what)
        if st is None:
            raise InvalidValue(f"{what} {path} does not exist")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise InvalidValue(f"{what} {path} can be read by its group or others (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        data = read_private_file(path, what, limit=4096)
    except UntrustedPath as exc:
        raise InvalidValue(str(exc)) from None
    except OSError as exc:
        raise InvalidValue(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    lines = data.decode("utf-8", "replace").splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise InvalidValue(f"{what} {path} is empty: put the password on its first line")
    return password


class PostgresEngine(Engine):
    """A PostgreSQL database through a connection pool; see the module docstring."""

    name = "postgresql"
    for_update = " FOR UPDATE"
    concurrent = True

    def __init__(self, url: str, *, password_file: str | os.PathLike[str] | None = None,
                 min_size: int = 1, max_size: int = 4, connect_timeout: float = 5.0,
                 pool_timeout: float = 30.0, lock_timeout: float = 10.0,
                 idle_in_transaction_timeout: float = 60.0,
                 application_name: str = "token-agent") -> None:
        if problem := url_problem(url):
            raise InvalidValue(f"the store's URL {redact(url)} {problem}")
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise InvalidValue(f"invalid PostgreSQL URL {redact(url)}: {exc}") from None
        self.url = url
        self.params = params
        self.connect_timeout = connect_timeout
        self.pool_timeout = pool_timeout
        self.lock_timeout = lock_timeout
        kwargs: dict[str, Any] = {"autocommit": True,
                                  "connect_timeout": max(1, round(connect_timeout))}
        if password_file is not None:
            kwargs["password"] = _read_password_file(password_file)
        options = params.get("options", "")
        kwargs["options"] = (f"{options} -c lock_timeout={int(lock_timeout * 1000)} "
                             f"-c idle_in_transaction_session_timeout="
                             f"{int(idle_in_transaction_timeout * 1000)}").strip()
        if "application_name" not in params:
            kwargs["application_name"] = application_name
        self._kwargs = kwargs
        self.pool = ConnectionPool(
            url, kwargs=kwargs, min_size=min_size, max_size=max_size, open=False,
            check=self._check, configure=self._configure,
            timeout=pool_timeout, name="token-agent-store", reconnect_timeout=60.0)
        self._opened = False
        self._closed = False

    @staticmethod
    def _check(conn: psycopg.Connection) -> None:
        """The pool's check of a connection it lends: a round trip (``check_connection``)
        only when the socket has something to read while idle, which is how a server that
        closed or restarted shows (its FIN or RST, or a termination notice); else none: the
        check's round trip doubled the round trips of every store call."""
        if conn.closed or conn.broken:
            raise psycopg.OperationalError("the connection is closed")
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError):
            readable = [True]
        if readable:
            ConnectionPool.check_connection(conn)

    @staticmethod
    def _configure(conn: psycopg.Connection) -> None:
        conn.row_factory = row_factory

    def describe(self) -> str:
        return redact(self.url)

    def _where(self) -> str:
        return f"token-agent store {self.describe()}"

    # ------------------------------------------------------------------ connections

    def _probe(self) -> None:
        """Connect once outside the pool, to learn why the pool cannot: raises the mapped
        error, or returns when a connection can be made."""
        try:
            psycopg.connect(self.url, **self._kwargs).close()
        except psycopg.Error as exc:
            raise self._connect_error(exc) from None

    def _connect_error(self, exc: BaseException) -> StoreUnavailable:
        text = str(exc).strip()
        detail = text.split("failed: ", 1)[-1] if "failed: " in text else text
        detail = " ".join(detail.split())
        if _AUTH.search(text):
            return StoreUnavailable(
                f"{self._where()}: authentication failed ({detail}): check the role and its "
                "password (the password file, ~/.pgpass or PGPASSFILE) and the server's "
                "pg_hba.conf", reason="auth", location=self.describe())
        if _NO_DATABASE.search(text):
            return StoreUnavailable(
                f"{self._where()}: the database does not exist ({detail}): create it "
                "(createdb), or check the URL", reason="no database", location=self.describe())
        return StoreUnavailable(
            f"{self._where()}: cannot connect to the server ({detail}): check that PostgreSQL "
            "runs and the URL's host and port, then try again; nothing was written",
            reason="unreachable", location=self.describe())

    @contextmanager
    def connect(self) -> Iterator[PgConnection]:
        if self._closed:
            raise StoreError(f"{self._where()} is closed")
        if not self._opened:
            self.pool.open(wait=False)
            self._opened = True
        # Wait in short slices: when the pool fails to connect, say why at once (a direct
        # connection gives libpq's reason) instead of waiting for the whole pool timeout.
        errors_seen = self.pool.get_stats().get("connections_errors", 0)
        deadline = time.monotonic() + self.pool_timeout
        while True:
            try:
                raw = self.pool.getconn(timeout=max(0.05, min(0.25, deadline - time.monotonic())))
                break
            except PoolTimeout:
                errors = self.pool.get_stats().get("connections_errors", 0)
                if errors > errors_seen:
                    self._probe()  # raises why it cannot connect; returns when it can
                    errors_seen = errors
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"{self._where()}: all {self.pool.max_size} connections of the pool "
                        f"stayed in use for {self.pool_timeout:g} s: try again, and look for a "
                        "stuck token-agent process", reason="busy",
                        location=self.describe()) from None
        try:
            yield PgConnection(raw)
        finally:
            self.pool.putconn(raw)

    def size_pool(self, max_size: int) -> None:
        """At most ``max_size`` connections (a server's worker threads, each with its own
        while it uses the store)."""
        max_size = max(1, int(max_size))
        self.pool.resize(min(self.pool.min_size, max_size), max_size)

    def begin(self, conn: PgConnection) -> None:
        conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")

    def in_transaction(self, conn: PgConnection) -> bool:
        if conn.raw.broken or conn.raw.closed:
            return False
        return conn.raw.info.transaction_status in (TransactionStatus.INTRANS,
                                                    TransactionStatus.INERROR)

    def close(self) -> None:
        self._closed = True
        if self._opened:
            self._opened = False
            self.pool.close()

    # ------------------------------------------------------------------ errors

    def error(self, exc: BaseException, action: str) -> Exception | None:
        if isinstance(exc, PoolTimeout):
            try:
                self._probe()
            except StoreUnavailable as mapped:
                return mapped
            return StoreUnavailable(f"{self._where()}: no connection free to {action}: try "
                                    "again", reason="busy", location=self.describe())
        if not isinstance(exc, psycopg.Error):
            return None
        where = self._where()
        state = getattr(exc, "sqlstate", None) or ""
        message = " ".join(str(exc).split()) or type(exc).__name__
        statement = getattr(exc, "token_agent_statement", "") or ""
        if isinstance(exc, pgerrors.IntegrityError):
            diag = exc.diag
            return IntegrityViolation(f"{where}: cannot {action}: {message}",
                                      constraint=diag.constraint_name, sqlstate=state)
        if isinstance(exc, pgerrors.LockNotAvailable) or isinstance(exc, pgerrors.QueryCanceled):
            return StoreUnavailable(
                f"{where}: busy ({message}) while trying to {action}: another session held a "
                f"lock for more than {self.lock_timeout:g} s; try again, and look for a stuck "
                "session (pg_stat_activity); nothing was written", reason="busy",
                location=self.describe())
        if isinstance(exc, (pgerrors.SerializationFailure, pgerrors.DeadlockDetected)):
            return StoreUnavailable(
                f"{where}: conflict ({message}) while trying to {action}: try again; nothing "
                "was written", reason="conflict", location=self.describe())
        if isinstance(exc, pgerrors.ReadOnlySqlTransaction):
            return StoreUnavailable(
                f"{where}: read-only ({message}) while trying to {action}: the server is a "
                "standby or the database is read-only; use the primary server's URL",
                reason="read-only", location=self.describe())
        if isinstance(exc, pgerrors.InsufficientPrivilege):
            return StoreUnavailable(
                f"{where}: permission denied ({message}) while trying to {action}: grant the "
                "role the privileges on the store's tables (or use the role that owns them)",
                reason="permission", location=self.describe())
        if isinstance(exc, pgerrors.InFailedSqlTransaction):
            return StoreError(f"{where}: the transaction was aborted by an earlier error; "
                              "nothing of it was written")
        lost = state.startswith("57P") or state.startswith("08") or (
            isinstance(exc, psycopg.OperationalError) and not state)
        if lost:
            if statement.strip().upper() == "COMMIT":
                outcome = ("the connection was lost during COMMIT: whether the transaction was "
                           "written is unknown; check before trying again")
            else:
                outcome = "the transaction was not committed: nothing of it was written"
            return StoreUnavailable(
                f"{where}: the connection to the server was lost ({message}) while trying to "
                f"{action}; the server stopped or restarted: {outcome}; try again once it "
                "runs", reason="connection lost", location=self.describe())
        return StoreError(f"{where}: cannot {action}: {message}")

    # ------------------------------------------------------------------ schema

    def _meta_table(self, conn: PgConnection) -> bool:
        """Whether the identification table exists: read from pg_class itself (this
        statement's snapshot), not through the name cache (``to_regclass``), which can keep
        "no such table" after another session created it while we waited for the schema
        lock; opening pg_class also makes the session take in the other's changes."""
        return conn.execute(
            "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.relname = ? AND n.nspname = current_schema()",
            (META_TABLE,)).fetchone()[0] > 0

    def _meta(self, conn: PgConnection) -> dict[str, str] | None:
        if not self._meta_table(conn):
            return None
        return {r[0]: r[1] for r in conn.execute(f"SELECT key, value FROM {META_TABLE}")}

    def prepare(self, conn: PgConnection, known_version: int) -> int:
        where = self._where()
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        if schema is None:
            raise StoreUnavailable(f"{where}: no schema to use (the role's search_path names "
                                   "none that exists): set search_path, or create the schema",
                                   reason="permission", location=self.describe())
        meta = self._meta(conn)
        if meta is None or meta.get("application") != MARKER:
            objects = conn.execute(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') "
                "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1").fetchall()
            if meta is not None or objects:
                names = [r[0] for r in objects]
                example = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                raise StoreFileError(
                    f"{where}: the database holds another program's tables ({len(names)} "
                    f"tables and sequences: {example}) and no token-agent marker "
                    f"({META_TABLE}): it is not a token-agent store; use an empty database "
                    "of its own (createdb)", path=self.describe(), reason="foreign")
            version = 0
        else:
            try:
                version = int(meta.get("schema_version", "0"))
            except ValueError:
                raise StoreFileError(f"{where}: the schema version in {META_TABLE} is not a "
                                     f"number: {meta.get('schema_version')!r}",
                                     path=self.describe(), reason="corrupt") from None
        if version > known_version:
            raise SchemaTooNew(
                f"{where}: schema version {version} was written by a newer token-agent; this "
                f"one knows versions up to {known_version}: upgrade token-agent (a store is "
                "never downgraded)", path=self.describe(), found=version, known=known_version)
        read_only = conn.execute("SELECT pg_is_in_recovery() OR "
                                 "current_setting('transaction_read_only') = 'on'").fetchone()[0]
        if read_only:
            raise StoreUnavailable(f"{where}: the database is read-only (a standby server?): "
                                   "use the primary server's URL", reason="read-only",
                                   location=self.describe())
        if version < known_version:
            may_create = conn.execute("SELECT has_schema_privilege(current_schema(), 'CREATE')"
                                      ).fetchone()[0]
            if not may_create:
                user = conn.execute("SELECT current_user").fetchone()[0]
                raise StoreUnavailable(
                    f"{where}: the role {user} may not create tables in schema {schema}, which "
                    f"the schema's migration needs: make {user} the database's owner, or GRANT "
                    f"CREATE ON SCHEMA {schema} TO {user}", reason="permission",
                    location=self.describe())
        return version

    def schema_version(self, conn: PgConnection) -> int:
        meta = self._meta(conn)
        return int(meta.get("schema_version", "0")) if meta else 0

    def lock_schema(self, conn: PgConnection) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))

    def set_schema_version(self, conn: PgConnection, version: int) -> None:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {META_TABLE} ("
                     "key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)")
        conn.execute(f"INSERT INTO {META_TABLE} (key, value) VALUES ('application', ?) "
                     "ON CONFLICT (key) DO NOTHING", (MARKER,))
        conn.execute(f"INSERT INTO {META_TABLE} (key, value) VALUES ('schema_version', ?) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(version),))

    def run_step(self, conn: PgConnection, migration: Migration) -> None:
        step = migration.postgresql
        if isinstance(step, str):
            for statement in split_script(step):
                try:
                    conn.raw.execute(statement)  # DDL as written: no placeholders
                except psycopg.Error as exc:
                    exc.token_agent_statement = statement  # type: ignore[attr-defined]
                    raise
        else:
            step(conn)

    # ------------------------------------------------------------------ facts and checks

    def info(self, conn: PgConnection) -> dict[str, Any]:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_database(), current_user, "
            "current_schema(), current_setting('lock_timeout'), "
            "current_setting('idle_in_transaction_session_timeout'), "
            "current_setting('default_transaction_isolation'), inet_server_addr()::text"
        ).fetchone()
        stats = self.pool.get_stats()
        return {
            "engine": self.name,
            "location": self.describe(),
            "server_version": row[0],
            "database": row[1],
            "user": row[2],
            "schema": row[3],
            "host": conn.raw.info.host,
            "port": conn.raw.info.port,
            "socket": row[7] is None,
            "ssl": conn.raw.pgconn.ssl_in_use,
            "schema_version": self.schema_version(conn),
            "lock_timeout": row[4],
            "idle_in_transaction_session_timeout": row[5],
            "isolation": "read committed",
            "default_isolation": row[6],
            "pool_min_size": self.pool.min_size,
            "pool_max_size": self.pool.max_size,
            "pool_size": stats.get("pool_size", 0),
            "driver": f"psycopg {psycopg.__version__}",
        }

    def check_integrity(self, conn: PgConnection) -> list[str]:
        from token_agent.store.schema_pg import SCRIPTS

        problems: list[str] = []
        version = self.schema_version(conn)
        expected: dict[str, set[str]] = {"table": set(), "index": set(), "trigger": set()}
        for n in sorted(SCRIPTS):
            if n > version:
                break
            script = SCRIPTS[n]
            expected["table"] |= set(re.findall(r"CREATE TABLE (\w+)", script))
            expected["index"] |= set(re.findall(r"CREATE (?:UNIQUE )?INDEX (\w+)", script))
            expected["trigger"] |= set(re.findall(r"CREATE TRIGGER (\w+)", script))
        if version:
            expected["table"].add(META_TABLE)
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
        indexes = {r[0]: r[1] for r in conn.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = "
            "i.indexrelid WHERE c.relnamespace = current_schema()::regnamespace")}
        triggers = {r[0]: r[1] for r in conn.execute(
            "SELECT t.tgname, t.tgenabled FROM pg_trigger t JOIN pg_class c ON c.oid = "
            "t.tgrelid WHERE c.relnamespace = current_schema()::regnamespace "
            "AND NOT t.tgisinternal")}
        for name in sorted(expected["table"] - tables):
            problems.append(f"missing table: {name}")
        for name in sorted(expected["index"]):
            if name not in indexes:
                problems.append(f"missing index: {name}")
            elif not indexes[name]:
                problems.append(f"index not valid (an interrupted CREATE INDEX?): {name}")
        for name in sorted(expected["trigger"]):
            if name not in triggers:
                problems.append(f"missing trigger: {name}")
            elif triggers[name] == "D":
                problems.append(f"trigger disabled: {name}")
        for r in conn.execute(
                "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE NOT "
                "convalidated AND connamespace = current_schema()::regnamespace ORDER BY 1, 2"):
            problems.append(f"constraint not validated: {r[1]} on {r[0]}")
        return problems

    def ids_copied(self, conn: PgConnection, table: str, column: str) -> None:
        conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                     f"coalesce(max({column}), 0) + 1, false) FROM {table}")

    def string_agg(self, expr: str, sep: str) -> str:
        literal = sep.replace("'", "''")
        return f"string_agg({expr}, '{literal}')"
