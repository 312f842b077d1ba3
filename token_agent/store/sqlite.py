"""The SQLite engine: the embedded default, one file (``paths.store_path(paths.data_dir(...))``)
through the standard library's ``sqlite3`` only.

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

Schema
    The schema version is ``PRAGMA user_version``; ``PRAGMA application_id`` marks the file
    as a token-agent store; another program's SQLite file is refused, untouched. A
    migration that rebuilds a table sets ``foreign_keys_off=True``: it runs with foreign
    keys off and ``foreign_key_check`` must be clean before it commits.

Threads
    One SQLite connection (``check_same_thread=False``), guarded by the store's re-entrant
    lock (``core.py``). For parallel readers, open one ``Store`` per thread: SQLite's WAL
    lets readers proceed while a writer writes.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import __version__
from ..filetrust import UntrustedPath, check_private_dir, check_private_file
from .engine import Connection, Engine, Migration
from .errors import SchemaTooNew, StoreError, StoreFileError, StoreMissing
from .records import APPLICATION_ID, DEFAULT_BUSY_TIMEOUT

log = logging.getLogger(__name__)


def run_script(conn: sqlite3.Connection | Connection, script: str) -> None:
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


class SQLiteEngine(Engine):
    """One SQLite file and the store's one connection to it. Create with
    ``SQLiteEngine.open(path)`` (the file checks; nothing is created when they fail)."""

    name = "sqlite"
    for_update = ""  # BEGIN IMMEDIATE already holds the only write lock

    def __init__(self, path: Path, conn: sqlite3.Connection, busy_timeout: float) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = conn
        self.busy_timeout = busy_timeout

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
             create: bool = True) -> SQLiteEngine:
        """Check the file and its directory, create the file (0600) if needed and connect.
        Without ``create`` a missing file is ``StoreMissing`` and nothing is created."""
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
        return cls(path, conn, busy_timeout)

    def describe(self) -> str:
        return str(self.path)

    def _file_error(self, exc: BaseException, action: str) -> StoreFileError:
        return _file_error(self.path, exc, action, self.busy_timeout)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        if self.conn is None:
            raise StoreError(f"token-agent store {self.path} is closed")
        yield self.conn

    def begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def in_transaction(self, conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    def error(self, exc: BaseException, action: str) -> Exception | None:
        if isinstance(exc, sqlite3.IntegrityError):
            return StoreError(f"token-agent store {self.path}: cannot {action}: {exc}")
        if isinstance(exc, sqlite3.Error):
            return self._file_error(exc, action)
        return None

    # ------------------------------------------------------------------ schema

    def prepare(self, conn: sqlite3.Connection, known_version: int) -> int:
        conn.row_factory = sqlite3.Row
        action = "read the file"
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
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
            if version > known_version:
                raise SchemaTooNew(
                    f"token-agent store {self.path}: schema version {version} was written by a newer "
                    f"token-agent; this one ({__version__}) knows versions up to {known_version}: "
                    "upgrade token-agent (a store is never downgraded)",
                    path=self.path, found=version, known=known_version)
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
            raise self._file_error(exc, action) from None
        return int(version)

    def schema_version(self, conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def lock_schema(self, conn: sqlite3.Connection) -> None:
        pass  # BEGIN IMMEDIATE holds the write lock

    def set_schema_version(self, conn: sqlite3.Connection, version: int) -> None:
        conn.execute(f"PRAGMA user_version = {int(version)}")

    def before_migration(self, conn: sqlite3.Connection, migration: Migration) -> None:
        if migration.foreign_keys_off:  # a no-op inside a transaction: before BEGIN
            conn.execute("PRAGMA foreign_keys = OFF")

    def after_migration(self, conn: sqlite3.Connection, migration: Migration) -> None:
        if migration.foreign_keys_off:
            conn.execute("PRAGMA foreign_keys = ON")

    def run_step(self, conn: sqlite3.Connection, migration: Migration) -> None:
        step = migration.sqlite
        if isinstance(step, str):
            run_script(conn, step)
        else:
            step(conn)
        if migration.foreign_keys_off:
            bad = conn.execute("PRAGMA foreign_key_check").fetchall()
            if bad:
                raise StoreError(f"{len(bad)} foreign key violations, e.g. {tuple(bad[0])}")

    # ------------------------------------------------------------------ facts and checks

    def info(self, conn: sqlite3.Connection) -> dict[str, Any]:
        q = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        st = self.path.stat()
        return {
            "path": str(self.path),
            "sqlite_version": sqlite3.sqlite_version,
            "journal_mode": str(q("PRAGMA journal_mode")),
            "synchronous": {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                int(q("PRAGMA synchronous")), "?"),
            "foreign_keys": bool(q("PRAGMA foreign_keys")),
            "busy_timeout_ms": int(q("PRAGMA busy_timeout")),
            "mode": f"{stat.S_IMODE(st.st_mode):04o}",
            "size": st.st_size,
        }

    def check_integrity(self, conn: sqlite3.Connection) -> list[str]:
        problems = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        if problems == ["ok"]:
            problems = []
        for r in conn.execute("PRAGMA foreign_key_check").fetchall():
            problems.append(f"foreign key violation: table {r[0]} row {r[1]} -> {r[2]}")
        return problems

    def string_agg(self, expr: str, sep: str) -> str:
        return f"group_concat({expr}, '{sep}')"

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            conn.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass
        conn.close()
