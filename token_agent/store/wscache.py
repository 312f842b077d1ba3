"""The workstation's offline cache: a small SQLite file of its own (not the Store), in the
organisation directory, mode 0600.

What it keeps (``token_agent/organisation/cache.py`` gives it meaning; this module only
stores opaque values):

* ``bundles``: per user, the bundle the organisation's server sent at the user's last online
  login here, encrypted (``blob``), and when that online login was
  (``last_online_login_at``); the row's key is a keyed hash of the user name, never the
  name;
* ``totp``: per user, the encrypted salted hashes of their authenticator-app codes;
* ``totp_used``: per user and app, the last time step accepted offline (that step and every
  earlier one are consumed);
* ``outbox``: the audit events of offline logins, encrypted, numbered by ``seq`` (SQLite's
  AUTOINCREMENT: never reused, even after the rows are deleted), until the server
  acknowledged them;
* ``meta``: a few named values (the card trust material, encrypted).

Durability: WAL journal, ``synchronous = FULL``; every write is in a transaction
(``with cache.transaction():`` groups several: a login's counter update and its outbox
events are committed together or not at all), so a crash mid-write leaves the file as it
was before or after, never half. The schema's version is SQLite's ``user_version``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import StoreFileError

#: the schema this code writes (``PRAGMA user_version``)
WSCACHE_VERSION = 1
FILENAME = "offline-cache.db"

_SCHEMA_1 = """
CREATE TABLE bundles (
    user_key             TEXT PRIMARY KEY NOT NULL,
    blob                 BLOB NOT NULL,
    stored_at            REAL NOT NULL,
    last_online_login_at REAL NOT NULL
);
CREATE TABLE totp (
    user_key  TEXT PRIMARY KEY NOT NULL,
    blob      BLOB NOT NULL,
    stored_at REAL NOT NULL
);
CREATE TABLE totp_used (
    user_key  TEXT NOT NULL,
    method    TEXT NOT NULL,
    last_step INTEGER NOT NULL,
    PRIMARY KEY (user_key, method)
);
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    payload    BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
"""


class WorkstationCache:
    """The cache file; one per workstation. Safe to share between threads (one lock)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()
        self._depth = 0

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "WorkstationCache":
        """Open (creating, mode 0600) the cache file at ``path``; its directory must exist.
        ``StoreFileError`` when it cannot be opened, is not a cache, or is newer than this
        code."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
        except OSError as exc:
            raise StoreFileError(f"cannot open the offline cache {path}: "
                                 f"{exc.strerror or exc}", path=path, reason="unusable") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > WSCACHE_VERSION:
                    raise StoreFileError(f"the offline cache {path} was written by a newer "
                                         f"token-agent (version {version}): upgrade, or remove "
                                         "the file (it is rebuilt at the next online logins)",
                                         path=path, reason="unusable")
                if version == 0:
                    if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                        raise StoreFileError(f"{path} is not token-agent's offline cache: move "
                                             "it away", path=path, reason="unusable")
                    for statement in _SCHEMA_1.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {WSCACHE_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreFileError(f"cannot use the offline cache {path}: {exc}: move it away "
                                 "(it is rebuilt at the next online logins)",
                                 path=path, reason="unusable") from None
        except BaseException:
            conn.close()
            raise
        for suffix in ("-wal", "-shm"):  # SQLite makes them with the umask's mode
            try:
                os.chmod(str(path) + suffix, 0o600)
            except OSError:
                pass
        return cls(path, conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "WorkstationCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``; an exception rolls
        back). Nested: joins the outer one. Holds the lock: other threads wait."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            self._conn.execute("COMMIT")

    def _run(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self.transaction():
            return self._conn.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # ------------------------------------------------------------ bundles

    def put_bundle(self, user_key: str, blob: bytes, *, now: float,
                   online_login_at: float) -> None:
        self._run("INSERT INTO bundles (user_key, blob, stored_at, last_online_login_at) "
                  "VALUES (?, ?, ?, ?) ON CONFLICT (user_key) DO UPDATE SET blob = excluded.blob, "
                  "stored_at = excluded.stored_at, "
                  "last_online_login_at = excluded.last_online_login_at",
                  (user_key, bytes(blob), float(now), float(online_login_at)))

    def replace_bundle_blob(self, user_key: str, blob: bytes) -> None:
        """The bundle's new content (a counter moved), its online login time unchanged."""
        self._run("UPDATE bundles SET blob = ? WHERE user_key = ?", (bytes(blob), user_key))

    def get_bundle(self, user_key: str) -> tuple[bytes, float] | None:
        """``(blob, last_online_login_at)`` or None."""
        rows = self._read("SELECT blob, last_online_login_at FROM bundles WHERE user_key = ?",
                          (user_key,))
        return (bytes(rows[0]["blob"]), float(rows[0]["last_online_login_at"])) if rows else None

    def forget_user(self, user_key: str) -> None:
        with self.transaction():
            for table in ("bundles", "totp", "totp_used"):
                self._conn.execute(f"DELETE FROM {table} WHERE user_key = ?", (user_key,))

    def forget_older_than(self, cutoff: float) -> int:
        """Forget every user whose last online login here is before ``cutoff``; how many."""
        with self.transaction():
            old = [r["user_key"] for r in self._conn.execute(
                "SELECT user_key FROM bundles WHERE last_online_login_at < ?", (float(cutoff),))]
            for key in old:
                self.forget_user(key)
            return len(old)

    def user_count(self) -> int:
        return int(self._read("SELECT count(*) AS n FROM bundles")[0]["n"])

    # ------------------------------------------------------------ TOTP

    def put_totp(self, user_key: str, blob: bytes, *, now: float) -> None:
        self._run("INSERT INTO totp (user_key, blob, stored_at) VALUES (?, ?, ?) "
                  "ON CONFLICT (user_key) DO UPDATE SET blob = excluded.blob, "
                  "stored_at = excluded.stored_at", (user_key, bytes(blob), float(now)))

    def get_totp(self, user_key: str) -> bytes | None:
        rows = self._read("SELECT blob FROM totp WHERE user_key = ?", (user_key,))
        return bytes(rows[0]["blob"]) if rows else None

    def totp_last_step(self, user_key: str, method: str) -> int:
        """The last step accepted offline for this app (-1: none)."""
        rows = self._read("SELECT last_step FROM totp_used WHERE user_key = ? AND method = ?",
                          (user_key, method))
        return int(rows[0]["last_step"]) if rows else -1

    def consume_totp_step(self, user_key: str, method: str, step: int) -> bool:
        """Consume ``step`` and every earlier one of this app: True when ``step`` was later
        than the last one consumed (a conditional write: two checks of one code racing, one
        wins)."""
        with self.transaction():
            cur = self._conn.execute(
                "INSERT INTO totp_used (user_key, method, last_step) VALUES (?, ?, ?) "
                "ON CONFLICT (user_key, method) DO UPDATE SET last_step = excluded.last_step "
                "WHERE totp_used.last_step < excluded.last_step", (user_key, method, int(step)))
            return cur.rowcount == 1

    # ------------------------------------------------------------ outbox

    def outbox_add(self, payload: bytes, *, now: float) -> int:
        """Queue one event; its ``seq``."""
        return int(self._run("INSERT INTO outbox (payload, created_at) VALUES (?, ?)",
                             (bytes(payload), float(now))).lastrowid)

    def outbox_batch(self, limit: int = 100) -> list[tuple[int, bytes]]:
        """The oldest ``limit`` queued events, ``(seq, payload)``, in order."""
        return [(int(r["seq"]), bytes(r["payload"])) for r in
                self._read("SELECT seq, payload FROM outbox ORDER BY seq LIMIT ?", (int(limit),))]

    def outbox_delete_through(self, seq: int) -> int:
        """Drop every queued event up to ``seq`` (acknowledged); how many."""
        return int(self._run("DELETE FROM outbox WHERE seq <= ?", (int(seq),)).rowcount)

    def outbox_count(self) -> int:
        return int(self._read("SELECT count(*) AS n FROM outbox")[0]["n"])

    # ------------------------------------------------------------ meta

    def put_meta(self, name: str, value: bytes) -> None:
        self._run("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                  "SET value = excluded.value", (name, bytes(value)))

    def get_meta(self, name: str) -> bytes | None:
        rows = self._read("SELECT value FROM meta WHERE name = ?", (name,))
        return bytes(rows[0]["value"]) if rows else None
