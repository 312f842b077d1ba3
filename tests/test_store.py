"""The store (token_agent/store/) and the data directory (token_agent/paths.py): the store's
contract suite, run on both engines (``--store-engine postgresql``). Tests that reach below
the store do it through ``store.connection`` and tests/store_raw.py, in each engine's own
SQL; tests of the SQLite file itself are marked ``sqlite_only``.

Permission tests need an unprivileged process: root ignores file modes. When the suite runs
as root, those scenarios run in a child process that drops to ``nobody`` after importing the
store (the interpreter itself may live where ``nobody`` cannot read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from token_agent import paths
from token_agent.store import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    AuditChainBroken,
    CredentialExists,
    InvalidValue,
    Migration,
    SchemaTooNew,
    SignCountRegression,
    Store,
    StoreError,
    StoreFileError,
    StoreMissing,
    UnknownCredential,
    UnknownUser,
    UserExists,
    check_detail,
    run_script,
    secret_looking,
)
from token_agent.store.url import is_url

from store_raw import (
    create_foreign_table,
    drop_append_only,
    fail_audit_inserts_after,
    fingerprint,
    query,
    remove_fault,
    run,
)

pytestmark = [pytest.mark.store_contract]

REPO_ROOT = Path(__file__).resolve().parent.parent
SIM_AAGUID = "5a1e7c2e-8f0b-4c6a-9d1e-70ce7a6e0001"
IS_ROOT = os.geteuid() == 0
NOBODY_UID = NOBODY_GID = 65534


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "token-agent.db"


@pytest.fixture
def target(db_path: Path, _store_on_postgresql) -> str | Path:
    """Where the test's store is, for a child process or before any Store is open: the
    SQLite file, or with --store-engine postgresql the test's database (its URL), which
    ``Store.open(db_path)`` is redirected to in this process."""
    return _store_on_postgresql or db_path


@pytest.fixture
def store(db_path: Path):
    s = Store.open(db_path)
    yield s
    s.close()


def cred_args(**overrides):
    args = dict(
        name="Main key", credential_id=os.urandom(32), public_key=b"\xa5\x01\x02\x03\x26" + os.urandom(64),
        aaguid=SIM_AAGUID, rp_id="nhs.example", discoverable=True, uv_enrolled=True,
        attestation_format="packed", attestation_trusted=True, transports=["usb"],
    )
    args.update(overrides)
    return args


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection to the file, bypassing the store."""
    return sqlite3.connect(path, isolation_level=None)


# --------------------------------------------------------------------------- paths


class TestPaths:
    def test_precedence(self, tmp_path):
        env = {"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "xdg"),
               "TOKEN_AGENT_DATA_DIR": str(tmp_path / "envdir")}
        assert paths.data_dir(tmp_path / "explicit", env) == tmp_path / "explicit"
        assert paths.data_dir(None, env) == tmp_path / "envdir"
        del env["TOKEN_AGENT_DATA_DIR"]
        # then config.toml's [store] data_dir, then systemd's StateDirectory=
        env["STATE_DIRECTORY"] = str(tmp_path / "state")
        assert paths.choose_data_dir(None, env, configured=tmp_path / "cfg",
                                     config_source="/etc/c.toml") == \
            (tmp_path / "cfg", "[store] data_dir in /etc/c.toml")
        assert paths.choose_data_dir(None, env) == (tmp_path / "state", "STATE_DIRECTORY")
        del env["STATE_DIRECTORY"]
        assert paths.data_dir(None, env) == tmp_path / "xdg" / "token-agent"
        del env["XDG_DATA_HOME"]
        assert paths.data_dir(None, env) == tmp_path / "home" / ".local" / "share" / "token-agent"

    def test_empty_and_relative_values_are_ignored(self, tmp_path):
        env = {"HOME": str(tmp_path), "TOKEN_AGENT_DATA_DIR": "", "XDG_DATA_HOME": "relative/xdg"}
        assert paths.data_dir("", env) == tmp_path / ".local" / "share" / "token-agent"

    def test_tilde_expands_with_the_given_home(self, tmp_path):
        env = {"HOME": str(tmp_path), "TOKEN_AGENT_DATA_DIR": "~/agent"}
        assert paths.data_dir(None, env) == tmp_path / "agent"

    def test_not_created_for_a_reader(self, tmp_path):
        assert paths.data_dir(tmp_path / "a" / "b", {}, create=False) == tmp_path / "a" / "b"
        assert not (tmp_path / "a").exists()
        with pytest.raises(StoreMissing):
            Store.open(tmp_path / "a" / "b" / "token-agent.db", create=False)
        with pytest.raises(StoreMissing):
            Store.open(tmp_path / "token-agent.db", create=False)
        assert not (tmp_path / "a").exists() and not (tmp_path / "token-agent.db").exists()

    def test_created_0700_whatever_the_umask(self, tmp_path):
        old = os.umask(0o022)
        try:
            d = paths.data_dir(tmp_path / "a" / "b", {})
        finally:
            os.umask(old)
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700

    def test_existing_directory_left_alone(self, tmp_path):
        d = tmp_path / "shared"
        d.mkdir()
        d.chmod(0o755)
        assert paths.data_dir(d, {}) == d
        assert stat.S_IMODE(d.stat().st_mode) == 0o755

    def test_relative_explicit_becomes_absolute(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        assert paths.data_dir("rel", {}) == tmp_path / "rel"

    def test_a_file_in_the_way(self, tmp_path):
        (tmp_path / "f").write_text("")
        with pytest.raises(NotADirectoryError):
            paths.data_dir(tmp_path / "f", {})

    def test_store_path(self, tmp_path):
        assert paths.store_path(tmp_path) == tmp_path / "token-agent.db"


# --------------------------------------------------------------------------- opening, schema


class TestOpen:
    def test_new_store_is_migrated_and_reopens(self, db_path):
        with Store.open(db_path) as s:
            assert s.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
            s.add_user("alice")
        with Store.open(db_path) as s:
            assert [u.username for u in s.list_users()] == ["alice"]
            assert s.schema_version == SCHEMA_VERSION
            history = query(s, "SELECT version FROM schema_history ORDER BY version")
        assert [v for (v,) in history] == list(range(1, SCHEMA_VERSION + 1))

    @pytest.mark.sqlite_only  # the file's application id and its write-ahead log
    def test_the_file_is_marked_and_its_wal_checkpointed(self, db_path):
        with Store.open(db_path) as s:
            s.add_user("alice")
        assert not list(db_path.parent.glob("*-wal")), "the last close checkpoints the WAL away"
        assert raw(db_path).execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID

    @pytest.mark.sqlite_only  # SQLite's pragmas
    def test_pragmas(self, store):
        info = store.info()
        assert info["journal_mode"] == "wal"
        assert info["synchronous"] == "FULL"
        assert info["foreign_keys"] is True
        assert info["busy_timeout_ms"] == 5000
        assert raw(store.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    @pytest.mark.sqlite_only  # the file's mode
    def test_file_mode_0600_whatever_the_umask(self, db_path):
        old = os.umask(0)
        try:
            with Store.open(db_path) as s:
                s.add_user("alice")
                for p in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
                    assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        finally:
            os.umask(old)

    @pytest.mark.sqlite_only  # the file's mode
    def test_loose_existing_file_is_tightened_with_a_warning(self, db_path, caplog):
        Store.open(db_path).close()
        db_path.chmod(0o644)
        with caplog.at_level(logging.WARNING, logger="token_agent.store"):
            Store.open(db_path).close()
        assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
        assert "0644" in caplog.text and str(db_path) in caplog.text

    @pytest.mark.sqlite_only  # an empty file
    def test_empty_existing_file_becomes_a_store(self, db_path):
        db_path.write_bytes(b"")
        with Store.open(db_path) as s:
            assert s.schema_version == SCHEMA_VERSION

    def test_schema_too_new_is_refused_untouched(self, db_path, target):
        with Store.open(db_path) as s:
            location = s.location
            with s.connection("mark the schema newer") as conn:
                s.engine.set_schema_version(conn, SCHEMA_VERSION + 5)
        before = fingerprint(target)
        with pytest.raises(SchemaTooNew) as err:
            Store.open(db_path)
        assert location in str(err.value)
        assert "newer token-agent" in str(err.value) and "upgrade" in str(err.value)
        assert (err.value.found, err.value.known) == (SCHEMA_VERSION + 5, SCHEMA_VERSION)
        assert fingerprint(target) == before

    @pytest.mark.sqlite_only  # bytes that are not a SQLite file
    def test_not_a_database(self, db_path):
        db_path.write_bytes(b"these are not the bytes of a SQLite database\n" * 100)
        db_path.chmod(0o600)
        before = sha256(db_path)
        with pytest.raises(StoreFileError) as err:
            Store.open(db_path)
        assert err.value.reason == "not a SQLite database"
        assert str(db_path) in str(err.value) and "move it aside" in str(err.value)
        assert sha256(db_path) == before
        assert listing(db_path.parent) == [db_path.name]

    @pytest.mark.sqlite_only  # the file's pages
    def test_damaged_schema_page(self, db_path):
        with Store.open(db_path) as s:
            s.add_user("alice")
        with open(db_path, "r+b") as f:
            f.seek(100)  # page 1 after the file header: the schema table
            f.write(b"\xff" * 300)
        with pytest.raises(StoreFileError) as err:
            Store.open(db_path)
        assert err.value.reason == "corrupt" and str(db_path) in str(err.value)
        assert "backup" in str(err.value)

    @pytest.mark.sqlite_only  # the file's pages
    def test_damaged_data_page_is_found_by_the_integrity_check(self, db_path):
        with Store.open(db_path) as s:
            for i in range(50):
                s.record_event("test.filler", outcome="success", detail={"i": i, "pad": "x" * 200})
        assert db_path.stat().st_size > 4 * 4096
        with open(db_path, "r+b") as f:
            f.seek(3 * 4096)
            f.write(os.urandom(4096))
        with Store.open(db_path) as s:
            problems = s.check_integrity()
        # Random bytes over a b-tree page: either integrity_check lists what is wrong, or the
        # page is too damaged to walk and the StoreFileError's message is the problem.
        assert problems
        assert all(p != "ok" for p in problems)

    def test_another_programs_database_is_refused_untouched(self, db_path, target):
        create_foreign_table(target)
        before = fingerprint(target)
        with pytest.raises(StoreFileError) as err:
            Store.open(db_path)
        assert err.value.reason == "foreign"
        assert "not a token-agent store" in str(err.value)
        assert fingerprint(target) == before
        if not is_url(str(target)):  # not even switched to WAL
            assert raw(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"

    @pytest.mark.sqlite_only  # the file's directory
    def test_missing_directory(self, tmp_path):
        with pytest.raises(StoreFileError, match="does not exist"):
            Store.open(tmp_path / "nowhere" / "token-agent.db")
        assert not (tmp_path / "nowhere").exists()

    @pytest.mark.sqlite_only  # the file's path
    def test_path_is_a_directory(self, tmp_path):
        (tmp_path / "token-agent.db").mkdir()
        with pytest.raises(StoreFileError, match="not a regular file"):
            Store.open(tmp_path / "token-agent.db")

    def test_closed_store(self, db_path):
        s = Store.open(db_path)
        s.close()
        s.close()
        assert s.closed
        with pytest.raises(StoreError, match="closed"):
            s.list_users()

    def test_context_manager_closes(self, db_path):
        with Store.open(db_path) as s:
            pass
        assert s.closed


# --------------------------------------------------------------------------- migrations


def _add_nickname(conn):
    conn.execute("ALTER TABLE users ADD COLUMN nickname TEXT")


def _half_then_fail(conn):
    conn.execute("CREATE TABLE half_done (x INTEGER)")
    raise RuntimeError("disk says no")


class TestMigrations:
    # function steps: the same on both engines
    V2 = MIGRATIONS + (Migration(SCHEMA_VERSION + 1, "users.nickname", _add_nickname,
                                 postgresql=_add_nickname),)

    def test_upgrade_applies_the_next_migration_once(self, db_path):
        with Store.open(db_path) as s:
            s.add_user("alice")
        with Store.open(db_path, migrations=self.V2) as s:
            assert s.schema_version == SCHEMA_VERSION + 1
            assert s.get_user("alice").username == "alice"
        with Store.open(db_path, migrations=self.V2) as s:
            assert s.schema_version == SCHEMA_VERSION + 1
            assert query(s, "SELECT username, nickname FROM users") == [("alice", None)]
            assert query(s, "SELECT count(*) FROM schema_history") == [(SCHEMA_VERSION + 1,)]
        # the older code now refuses the newer store
        with pytest.raises(SchemaTooNew):
            Store.open(db_path)

    def test_failed_migration_is_rolled_back(self, db_path):
        with Store.open(db_path) as s:
            s.add_user("alice")
        broken = MIGRATIONS + (Migration(SCHEMA_VERSION + 1, "half", _half_then_fail,
                                         postgresql=_half_then_fail),)
        with pytest.raises(StoreError, match=rf"migration {SCHEMA_VERSION + 1} \(half\) failed and was rolled back"):
            Store.open(db_path, migrations=broken)
        with Store.open(db_path) as s:
            assert s.schema_version == SCHEMA_VERSION
            assert s.get_user("alice")
            with pytest.raises(StoreError, match="half_done"):  # no such table
                query(s, "SELECT count(*) FROM half_done")

    @pytest.mark.sqlite_only  # SQLite's table rebuild with its foreign_keys pragma off
    def test_table_rebuild_with_foreign_keys_off(self, db_path):
        def rebuild_users(conn):  # SQLite's 12-step table change: add a CHECK to users
            run_script(conn, """
                CREATE TABLE users_new (
                    id TEXT PRIMARY KEY NOT NULL,
                    username TEXT NOT NULL UNIQUE COLLATE NOCASE CHECK (length(username) <= 64),
                    display_name TEXT NOT NULL,
                    user_handle BLOB NOT NULL UNIQUE,
                    created_at REAL NOT NULL,
                    disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
                    user_class TEXT NOT NULL DEFAULT 'internal',
                    mfa_enabled INTEGER NOT NULL DEFAULT 0,
                    mfa_source TEXT
                );
                INSERT INTO users_new SELECT id, username, display_name, user_handle, created_at,
                    disabled, user_class, mfa_enabled, mfa_source FROM users;
                DROP TABLE users;
                ALTER TABLE users_new RENAME TO users;
            """)

        with Store.open(db_path) as s:
            u = s.add_user("alice", roles=["admin"])
            s.add_fido_credential(u.id, **cred_args())
        v2 = MIGRATIONS + (Migration(SCHEMA_VERSION + 1, "rebuild users", rebuild_users, foreign_keys_off=True),)
        with Store.open(db_path, migrations=v2) as s:
            assert s.get_user("alice").roles == ["admin"]
            assert len(s.list_fido_credentials(u.id)) == 1
            assert s.info()["foreign_keys"] is True
            assert s.check_integrity() == []

    @pytest.mark.sqlite_only  # SQLite's foreign_key_check after a rebuild with foreign keys off
    def test_rebuild_that_breaks_references_is_rolled_back(self, db_path):
        def lose_users(conn):
            conn.execute("DELETE FROM users")

        with Store.open(db_path) as s:
            u = s.add_user("alice")
            s.add_fido_credential(u.id, **cred_args())
        bad = MIGRATIONS + (Migration(SCHEMA_VERSION + 1, "lose users", lose_users, foreign_keys_off=True),)
        with pytest.raises(StoreError, match="foreign key violations"):
            Store.open(db_path, migrations=bad)
        with Store.open(db_path) as s:
            assert s.get_user("alice")

    def test_migrations_must_be_numbered_in_order(self, db_path):
        with pytest.raises(ValueError, match="numbered"):
            Store.open(db_path, migrations=(Migration(2, "two", _add_nickname),))


# --------------------------------------------------------------------------- users


class TestUsers:
    def test_add_and_get(self, store):
        u = store.add_user("alice.smith@nhs-trust", "Alice Smith", roles=["clinician", "admin"])
        assert uuid.UUID(u.id).version == 4
        assert u.username == "alice.smith@nhs-trust" and u.display_name == "Alice Smith"
        assert u.roles == ["admin", "clinician"]
        assert len(u.user_handle) == 32 and not u.disabled
        assert abs(u.created_at - time.time()) < 60
        assert store.get_user("ALICE.SMITH@NHS-TRUST") == u
        assert store.get_user_by_id(u.id) == u
        assert store.get_user_by_handle(u.user_handle) == u
        assert store.get_user_by_handle(os.urandom(32)) is None
        assert u.to_dict()["user_handle"] and json.dumps(u.to_dict())

    def test_display_name_defaults_to_username(self, store):
        assert store.add_user("bob").display_name == "bob"

    def test_handles_and_ids_are_distinct(self, store):
        users = [store.add_user(f"user{i}") for i in range(20)]
        assert len({u.user_handle for u in users}) == 20
        assert len({u.id for u in users}) == 20

    def test_usernames_unique_regardless_of_case(self, store):
        store.add_user("Alice")
        with pytest.raises(UserExists, match="'Alice' already exists"):
            store.add_user("alice")
        assert [u.username for u in store.list_users()] == ["Alice"]

    @pytest.mark.parametrize("bad", ["", "a" * 65, "alice smith", "alice/..", "ålice", "bob\n", "x;DROP", None])
    def test_invalid_usernames(self, store, bad):
        with pytest.raises(InvalidValue, match="invalid username"):
            store.add_user(bad)
        assert store.list_users() == []

    def test_invalid_roles_and_display_names(self, store):
        with pytest.raises(InvalidValue):
            store.add_user("alice", roles="admin")
        with pytest.raises(InvalidValue):
            store.add_user("alice", roles=["has,comma"])
        with pytest.raises(InvalidValue):
            store.add_user("alice", display_name="line\nbreak")
        assert store.list_users() == []

    def test_list_is_sorted_case_insensitively(self, store):
        for name in ("carol", "Bob", "alice"):
            store.add_user(name)
        assert [u.username for u in store.list_users()] == ["alice", "Bob", "carol"]

    def test_unknown_user(self, store):
        with pytest.raises(UnknownUser, match="unknown user 'nobody'"):
            store.get_user("nobody")
        with pytest.raises(UnknownUser):
            store.get_user_by_id(str(uuid.uuid4()))
        with pytest.raises(UnknownUser):
            store.remove_user("nobody")

    def test_update(self, store):
        u = store.add_user("alice", roles=["clinician"])
        v = store.update_user("alice", display_name="Dr Alice", roles=["admin"], disabled=True)
        assert (v.display_name, v.roles, v.disabled) == ("Dr Alice", ["admin"], True)
        assert (v.id, v.user_handle) == (u.id, u.user_handle)
        assert store.update_user("alice", disabled=False).roles == ["admin"]

    def test_remove_removes_credentials_keeps_events(self, store):
        u = store.add_user("alice", roles=["admin"])
        c = store.add_fido_credential(u.id, **cred_args())
        store.record_event("enrol.key", user_id=u.id, credential_id=c.credential_id, outcome="success")
        assert store.remove_user("alice") == u
        assert store.list_users() == []
        assert store.list_fido_credentials() == []
        assert store.get_fido_credential(c.credential_id) is None
        (event,) = store.list_events()
        assert (event.user_id, event.username, event.credential_id) == (u.id, "alice", c.credential_id)
        assert store.check_integrity() == []
        store.add_user("alice")  # the name is free again, with a new identity
        assert store.get_user("alice").id != u.id


# --------------------------------------------------------------------------- FIDO2 credentials


class TestFidoCredentials:
    def test_add_get_list(self, store):
        alice, bob = store.add_user("alice"), store.add_user("bob")
        args = cred_args(transports=["usb", "nfc"], sign_count=7)
        c = store.add_fido_credential(alice.id, **args)
        assert c.user_id == alice.id and c.name == "Main key" and c.sign_count == 7
        assert (c.credential_id, c.public_key) == (args["credential_id"], args["public_key"])
        assert (c.aaguid, c.rp_id, c.transports) == (SIM_AAGUID, "nhs.example", ["usb", "nfc"])
        assert c.discoverable and c.uv_enrolled and c.attestation_trusted
        assert c.attestation_format == "packed"
        assert c.last_used_at is None and not c.flagged and c.flag_reason is None
        assert store.get_fido_credential(args["credential_id"]) == c
        assert store.get_fido_credential(b"unknown") is None
        backup = store.add_fido_credential(alice.id, **cred_args(name="Backup", discoverable=False))
        other = store.add_fido_credential(bob.id, **cred_args(name="Main key"))  # same name, other user
        assert store.list_fido_credentials(alice.id) == [c, backup]
        assert store.list_fido_credentials(bob.id) == [other]
        assert store.list_fido_credentials() == [c, backup, other]
        assert json.dumps(c.to_dict())

    def test_aaguid_as_bytes_is_canonicalised(self, store):
        u = store.add_user("alice")
        c = store.add_fido_credential(u.id, **cred_args(aaguid=uuid.UUID(SIM_AAGUID.upper()).bytes))
        assert c.aaguid == SIM_AAGUID
        with pytest.raises(InvalidValue, match="AAGUID"):
            store.add_fido_credential(u.id, **cred_args(name="x", aaguid="not-a-uuid"))

    def test_duplicates(self, store):
        alice, bob = store.add_user("alice"), store.add_user("bob")
        c = store.add_fido_credential(alice.id, **cred_args())
        with pytest.raises(CredentialExists, match="already enrolled"):
            store.add_fido_credential(bob.id, **cred_args(name="Bob's", credential_id=c.credential_id))
        with pytest.raises(CredentialExists, match="already has a key named 'Main key'"):
            store.add_fido_credential(alice.id, **cred_args(name="MAIN KEY"))
        assert store.list_fido_credentials() == [c]

    def test_unknown_user(self, store):
        with pytest.raises(UnknownUser):
            store.add_fido_credential(str(uuid.uuid4()), **cred_args())
        assert store.list_fido_credentials() == []

    @pytest.mark.parametrize("bad", [
        dict(name=""), dict(name="x" * 65), dict(credential_id=b""), dict(credential_id=b"x" * 1024),
        dict(public_key=b""), dict(sign_count=-1), dict(sign_count=2**32), dict(rp_id=""),
        dict(attestation_format=""), dict(transports=[""]),
    ])
    def test_invalid_values(self, store, bad):
        u = store.add_user("alice")
        with pytest.raises(InvalidValue):
            store.add_fido_credential(u.id, **cred_args(**bad))
        assert store.list_fido_credentials() == []

    def test_record_use(self, store):
        u = store.add_user("alice")
        c = store.add_fido_credential(u.id, **cred_args(sign_count=5))
        d = store.record_fido_use(c.credential_id, 6, used_at=1234.5)
        assert (d.sign_count, d.last_used_at) == (6, 1234.5)
        for stale in (6, 5, 0):
            with pytest.raises(SignCountRegression) as err:
                store.record_fido_use(c.credential_id, stale, used_at=9999.0)
            assert (err.value.stored, err.value.received) == (6, stale)
            assert "cloned" in str(err.value)
        assert store.get_fido_credential(c.credential_id) == d
        with pytest.raises(UnknownCredential):
            store.record_fido_use(b"nope", 7)

    def test_keys_without_a_counter(self, store):
        u = store.add_user("alice")
        c = store.add_fido_credential(u.id, **cred_args(sign_count=0))
        assert store.record_fido_use(c.credential_id, 0).sign_count == 0
        assert store.record_fido_use(c.credential_id, 0).last_used_at is not None

    def test_flag_and_clear(self, store):
        u = store.add_user("alice")
        c = store.add_fido_credential(u.id, **cred_args())
        f = store.flag_fido_credential(c.credential_id, "signature counter regression")
        assert f.flagged and f.flag_reason == "signature counter regression"
        assert store.clear_flag(c.credential_id) == c
        with pytest.raises(InvalidValue):
            store.flag_fido_credential(c.credential_id, " ")
        with pytest.raises(UnknownCredential):
            store.flag_fido_credential(b"nope", "why")
        with pytest.raises(UnknownCredential):
            store.clear_flag(b"nope")

    def test_remove(self, store):
        u = store.add_user("alice")
        c = store.add_fido_credential(u.id, **cred_args())
        keep = store.add_fido_credential(u.id, **cred_args(name="Backup"))
        assert store.remove_fido_credential(u.id, "main KEY") == c
        assert store.list_fido_credentials(u.id) == [keep]
        with pytest.raises(UnknownCredential, match="no key named 'Main key'"):
            store.remove_fido_credential(u.id, "Main key")
        with pytest.raises(UnknownUser):
            store.remove_fido_credential(str(uuid.uuid4()), "Backup")
        # the credential id can be enrolled again once deleted
        store.add_fido_credential(u.id, **cred_args(credential_id=c.credential_id))


# --------------------------------------------------------------------------- transactions


class Boom(Exception):
    pass


class TestTransactions:
    def test_exception_halfway_leaves_nothing(self, store):
        with pytest.raises(Boom):
            with store.transaction():
                u = store.add_user("alice")
                c = store.add_fido_credential(u.id, **cred_args())
                store.record_fido_use(c.credential_id, 1)
                store.record_event("enrol.key", user_id=u.id, outcome="success")
                raise Boom
        assert store.list_users() == [] and store.list_fido_credentials() == []
        assert store.list_events() == []

    def test_keyboard_interrupt_rolls_back_too(self, store):
        with pytest.raises(KeyboardInterrupt):
            with store.transaction():
                store.add_user("alice")
                raise KeyboardInterrupt
        assert store.list_users() == []

    def test_commit_at_the_end(self, store, db_path):
        with Store.open(db_path) as other:  # another connection to the same database
            with store.transaction():
                store.add_user("alice")
                # not visible to another connection before the commit
                assert other.list_users() == []
            assert [u.username for u in other.list_users()] == ["alice"]

    def test_nested_block_joins_and_can_fail_alone(self, store, db_path):
        with Store.open(db_path) as other:
            with store.transaction():
                store.add_user("alice")
                with pytest.raises(Boom):
                    with store.transaction():
                        store.add_user("bob")
                        raise Boom
                with pytest.raises(UserExists):
                    store.add_user("ALICE")
                with store.transaction():
                    store.add_user("carol")
                assert other.list_users() == []
            assert [u.username for u in store.list_users()] == ["alice", "carol"]

    def test_failed_statement_in_a_nested_block_leaves_the_outer_one_usable(self, store):
        """PostgreSQL refuses every statement after an error in a transaction until a
        rollback: a nested block (a savepoint) catching the error must leave the outer
        transaction usable, as SQLite does."""
        store.add_user("alice")
        with store.transaction():
            store.add_user("bob")
            for _ in range(2):  # twice: the savepoint is released after its rollback
                with pytest.raises(UserExists):
                    with store.transaction():
                        store.add_user("carol")
                        store.add_user("ALICE")  # the database refuses the statement
            store.add_user("dave")
            store.record_event("test.nested", outcome="success")
        assert [u.username for u in store.list_users()] == ["alice", "bob", "dave"]
        assert store.verify_events() == 1

    def test_write_failure_midway_gives_a_clear_error_and_nothing(self, store):
        store.add_user("alice")
        store.record_event("test.before", outcome="success")
        fail_audit_inserts_after(store, 50, "the device says no")
        with pytest.raises(StoreError) as err:
            with store.transaction():
                store.add_user("bob")
                for i in range(100):
                    store.record_event("test.filler", outcome="success", detail={"i": i})
        assert "the device says no" in str(err.value) and store.location in str(err.value)
        assert "record an audit event" in str(err.value)
        remove_fault(store)
        assert [e.kind for e in store.list_events()] == ["test.before"]
        assert [u.username for u in store.list_users()] == ["alice"]
        store.add_user("bob")  # the store is usable again
        assert store.record_event("test.after", outcome="success") == 2
        assert store.verify_events() == 2
        assert store.check_integrity() == []

    @pytest.mark.sqlite_only  # the file's size limit: SQLite's "disk full"
    def test_disk_full_midway_gives_a_clear_error_and_nothing(self, store):
        store.add_user("alice")
        # The file system fills up in the middle of a ceremony.
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreFileError) as err:
            with store.transaction():
                for i in range(200):
                    store.record_event("test.filler", outcome="success", detail={"pad": "x" * 1000, "i": i})
        assert err.value.reason == "disk full" and str(store.path) in str(err.value)
        store._conn.execute("PRAGMA max_page_count = 1073741823")
        assert store.list_events() == []
        assert [u.username for u in store.list_users()] == ["alice"]
        store.add_user("bob")  # the store is usable again
        assert store.check_integrity() == []


CRASH_CHILD = textwrap.dedent("""
    import os, sys, time
    from token_agent.store import Store
    s = Store.open(sys.argv[1])
    s.add_user("committed")
    if s.engine.name == "sqlite":
        s._conn.execute("PRAGMA cache_size = 5")  # spill uncommitted pages into the WAL
    with s.transaction():
        u = s.add_user("halfway")
        c = s.add_fido_credential(u.id, name="Key", credential_id=b"c" * 32, public_key=b"k" * 77,
                                  aaguid="5a1e7c2e-8f0b-4c6a-9d1e-70ce7a6e0001", rp_id="nhs.example",
                                  discoverable=True, uv_enrolled=True, attestation_format="packed",
                                  attestation_trusted=True)
        s.record_fido_use(c.credential_id, 1)
        for i in range(300):
            s.record_event("enrol.key", user_id=u.id, outcome="success", detail={"i": i, "pad": "x" * 500})
        print("IN-TRANSACTION", flush=True)
        time.sleep(120)
""")


def test_sigkill_mid_transaction_leaves_no_half_enrolment(db_path, target):
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(target)], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line == "IN-TRANSACTION\n", child.stderr.read()
        if not is_url(str(target)):
            wal = Path(f"{db_path}-wal")
            assert wal.stat().st_size > 100_000, "uncommitted pages should have reached the WAL"
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with Store.open(db_path) as s:
        assert [u.username for u in s.list_users()] == ["committed"]
        assert s.list_fido_credentials() == [] and s.list_events() == []
        assert s.check_integrity() == []
        s.add_user("after")  # still writable
    if not is_url(str(target)):
        assert raw(db_path).execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# --------------------------------------------------------------------------- permissions


def _unprivileged_child(script: str, *args: str) -> dict:
    """Run ``script`` (which prints one JSON line) in a child, as ``nobody`` when we are root."""
    prelude = textwrap.dedent(f"""
        import json, os, sys
        from token_agent.store import Store, StoreError, StoreFileError
        if os.geteuid() == 0:
            os.setgroups([]); os.setgid({NOBODY_GID}); os.setuid({NOBODY_UID})
        assert os.geteuid() != 0
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


OPEN_AND_WRITE = """
    try:
        s = Store.open(sys.argv[1])
        s.add_user("mallory")
    except StoreError as e:
        print(json.dumps({"error": type(e).__name__, "reason": getattr(e, "reason", None), "message": str(e)}))
    else:
        print(json.dumps({"error": None}))
"""


@pytest.fixture
def unprivileged_dir():
    """A directory an unprivileged child can use: owned by ``nobody`` when we are root
    (pytest's tmp_path is under a 0700 root directory, so it is made elsewhere)."""
    base = Path(tempfile.mkdtemp(prefix="token-agent-store-test-"))
    base.chmod(0o711)
    work = base / "data"
    work.mkdir(mode=0o700)
    if IS_ROOT:
        os.chown(work, NOBODY_UID, NOBODY_GID)
    yield work
    for p in (work, *work.iterdir()):
        os.chmod(p, 0o700)
    shutil.rmtree(base)


def _make_store_for_child(directory: Path) -> Path:
    """A store with alice, handed to ``nobody`` (root does not use a directory or a store
    of another user: it is made while the directory is still root's)."""
    path = directory / "token-agent.db"
    _own(directory, 0)
    with Store.open(path) as s:
        s.add_user("alice")
    _own(directory, NOBODY_UID)
    return path


def _own(directory: Path, uid: int) -> None:
    """The directory and everything in it owned by ``uid`` (when we are root)."""
    if IS_ROOT:
        for p in (directory, *directory.iterdir()):
            os.chown(p, uid, NOBODY_GID if uid == NOBODY_UID else 0)


def _assert_unwritable_error(result: dict, path: Path) -> None:
    assert result["error"] == "StoreFileError", result
    assert result["reason"] == "not writable"
    assert str(path) in result["message"]
    assert "check the permissions of the file and of its directory" in result["message"]
    assert "--data-dir" in result["message"]


@pytest.mark.sqlite_only  # the file's and its directory's permissions
def test_read_only_store_file(unprivileged_dir):
    path = _make_store_for_child(unprivileged_dir)
    path.chmod(0o400)
    before, files = sha256(path), listing(unprivileged_dir)
    _assert_unwritable_error(_unprivileged_child(OPEN_AND_WRITE, str(path)), path)
    assert sha256(path) == before and listing(unprivileged_dir) == files
    path.chmod(0o600)
    _own(unprivileged_dir, 0)
    with Store.open(path) as s:
        assert [u.username for u in s.list_users()] == ["alice"]


@pytest.mark.sqlite_only  # the file's and its directory's permissions
def test_read_only_directory(unprivileged_dir):
    path = _make_store_for_child(unprivileged_dir)
    unprivileged_dir.chmod(0o500)
    before, files = sha256(path), listing(unprivileged_dir)
    _assert_unwritable_error(_unprivileged_child(OPEN_AND_WRITE, str(path)), path)
    assert sha256(path) == before and listing(unprivileged_dir) == files


@pytest.mark.sqlite_only  # the file's and its directory's permissions
def test_new_store_in_read_only_directory(unprivileged_dir):
    unprivileged_dir.chmod(0o500)
    path = unprivileged_dir / "token-agent.db"
    _assert_unwritable_error(_unprivileged_child(OPEN_AND_WRITE, str(path)), path)
    assert listing(unprivileged_dir) == []


@pytest.mark.sqlite_only  # the file's and its directory's permissions
def test_unprivileged_child_can_use_a_writable_store(unprivileged_dir):
    """The control case of the three above: the same child succeeds when it may write."""
    path = _make_store_for_child(unprivileged_dir)
    assert _unprivileged_child(OPEN_AND_WRITE, str(path)) == {"error": None}
    _own(unprivileged_dir, 0)
    with Store.open(path) as s:
        assert [u.username for u in s.list_users()] == ["alice", "mallory"]


# --------------------------------------------------------------------------- audit events


class TestAudit:
    def test_record_and_list(self, store):
        u = store.add_user("alice")
        t0 = time.time()
        e1 = store.record_event("enrol.key", user_id=u.id, credential_id=b"cid", outcome="success",
                                detail={"name": "Main key", "pin_retries": 8})
        e2 = store.record_event("login.key", user_id=u.id, outcome="failure", detail={"reason": "timeout"})
        e3 = store.record_event("login.key", username="ghost", outcome="refused", detail={"reason": "unknown user"})
        assert (e1, e2, e3) == (1, 2, 3)
        events = store.list_events()
        assert [e.id for e in events] == [3, 2, 1]
        first = events[-1]
        assert (first.kind, first.outcome, first.username, first.credential_id) == ("enrol.key", "success", "alice", b"cid")
        assert first.detail == {"name": "Main key", "pin_retries": 8} and first.at >= t0 - 1
        assert [e.id for e in store.list_events(user_id=u.id)] == [2, 1]
        assert [e.id for e in store.list_events(kind="login.key")] == [3, 2]
        assert [e.id for e in store.list_events(kind="login.key", limit=1)] == [3]
        assert [e.id for e in store.list_events(credential_id=b"cid")] == [1]
        assert events[0].username == "ghost" and events[0].user_id is None
        assert json.dumps(first.to_dict())

    @pytest.mark.parametrize("key", [
        "pin", "PIN", "new_pin", "newPin", "newpin", "password", "userPassword", "passwd", "code",
        "otp_code", "sent_code", "wrong_pin", "secret", "client-secret", "totpSecret", "token",
        "pinUvAuthToken", "accessToken", "private_key", "passcode", "puk", "otpauth_uri",
    ])
    def test_secret_looking_keys_are_refused(self, store, key):
        with pytest.raises(ValueError, match="looks like a secret"):
            store.record_event("login.key", outcome="failure", detail={key: "123456"})
        with pytest.raises(ValueError, match="looks like a secret"):
            store.record_event("login.key", outcome="failure", detail={"outer": [{"ok": 1}, {key: "1"}]})
        assert store.list_events() == []

    @pytest.mark.parametrize("key", [
        "pin_retries", "pinRetries", "retries_left", "error_code", "ctap_status", "code_length",
        "token_type", "pin_blocked", "has_pin", "reason", "name", "aaguid", "uv", "counter",
    ])
    def test_keys_about_secrets_are_allowed(self, key):
        assert not secret_looking(key)
        assert check_detail({key: 1})

    def test_bad_details_and_fields(self, store):
        for detail in ({"when": b"bytes"}, {1: "int key"}, ["not", "a", "dict"], {"x": float("nan")}):
            with pytest.raises(ValueError):
                store.record_event("login.key", outcome="failure", detail=detail)
        with pytest.raises(ValueError):
            store.record_event("Login Key", outcome="failure")
        with pytest.raises(ValueError):
            store.record_event("login.key", outcome="")
        assert store.list_events() == []
        # too large: refused by check_detail, cut (never dropped) by record_event
        with pytest.raises(ValueError, match="larger than"):
            check_detail({"pad": "x" * 20000})
        store.record_event("login.key", outcome="failure", detail={"pad": "x" * 20000})
        [event] = store.list_events()
        assert event.detail["pad"].endswith("...[truncated: 20000 characters]")

    def test_append_only(self, store):
        store.record_event("login.key", outcome="success")
        for sql in ("UPDATE audit_events SET outcome = 'failure'", "DELETE FROM audit_events"):
            with pytest.raises(StoreError, match="append-only"):
                run(store, sql)
        assert store.list_events()[0].outcome == "success"
        assert store.verify_events() == 1

    def test_hash_chain_detects_edits_and_removals(self, store):
        for i in range(5):
            store.record_event("login.key", outcome="success", detail={"i": i})
        assert store.verify_events() == 5
        drop_append_only(store)
        run(store, "UPDATE audit_events SET outcome = 'failure' WHERE id = 3")
        with pytest.raises(AuditChainBroken, match="event 3 was altered") as err:
            store.verify_events()
        assert err.value.event_id == 3
        run(store, "UPDATE audit_events SET outcome = 'success' WHERE id = 3")
        assert store.verify_events() == 5
        run(store, "DELETE FROM audit_events WHERE id = 2")
        with pytest.raises(AuditChainBroken, match="event 2 is missing"):
            store.verify_events()

    def test_hash_chain_detects_a_truncated_tail(self, store):
        for i in range(3):
            store.record_event("login.key", outcome="success")
        drop_append_only(store)
        run(store, "DELETE FROM audit_events WHERE id = 3")
        with pytest.raises(AuditChainBroken, match="3 to 3 are missing"):
            store.verify_events()


# --------------------------------------------------------------------------- settings


class TestSettings:
    def test_get_set_delete(self, store, db_path):
        assert store.get_setting("rp_id") is None
        assert store.get_setting("rp_id", "default.example") == "default.example"
        store.set_setting("rp_id", "nhs.example")
        roots = ["-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"]
        store.set_setting("attestation_roots", roots)
        store.set_setting("allowed_aaguids", [SIM_AAGUID])
        store.set_setting("user_verification", "required")
        store.set_setting("rp_id", "trust.nhs.example")
        assert store.get_setting("rp_id") == "trust.nhs.example"
        assert store.get_setting("attestation_roots") == roots
        assert store.list_settings() == {
            "allowed_aaguids": [SIM_AAGUID], "attestation_roots": roots,
            "rp_id": "trust.nhs.example", "user_verification": "required"}
        assert store.delete_setting("rp_id") and not store.delete_setting("rp_id")
        store.close()
        with Store.open(db_path) as s:
            assert s.get_setting("user_verification") == "required"

    def test_values_must_be_json(self, store):
        with pytest.raises(ValueError):
            store.set_setting("rp_id", b"bytes")
        with pytest.raises(ValueError):
            store.set_setting("Bad Key", 1)
        assert store.list_settings() == {}


# --------------------------------------------------------------------------- threads


class TestThreads:
    def _increment(self, store: Store, times: int, errors: list) -> None:
        try:
            for _ in range(times):
                with store.transaction():
                    # a read-then-write: the row lock the store's rules ask for (nothing on
                    # SQLite, whose BEGIN IMMEDIATE already holds the only write lock)
                    run(store, "SELECT value FROM settings WHERE key = 'counter'"
                        + store.engine.for_update)
                    n = store.get_setting("counter", 0)
                    time.sleep(0)  # invite a thread switch between the read and the write
                    store.set_setting("counter", n + 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def test_two_threads_one_store(self, store):
        store.set_setting("counter", 0)
        errors: list = []
        threads = [threading.Thread(target=self._increment, args=(store, 50, errors)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert store.get_setting("counter") == 100

    def test_two_threads_two_stores_on_one_file(self, db_path):
        stores = [Store.open(db_path), Store.open(db_path)]
        stores[0].set_setting("counter", 0)
        errors: list = []
        threads = [threading.Thread(target=self._increment, args=(s, 50, errors)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert stores[0].get_setting("counter") == stores[1].get_setting("counter") == 100
        for s in stores:
            s.close()

    def test_another_thread_never_joins_an_open_transaction(self, store):
        inside, release, done = threading.Event(), threading.Event(), threading.Event()
        errors: list = []

        def ceremony():
            try:
                with store.transaction():
                    store.add_user("alice")
                    inside.set()
                    release.wait(10)
                    raise Boom
            except Boom:
                pass
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        def admin():
            try:
                store.add_user("bob")
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)
            finally:
                done.set()

        a = threading.Thread(target=ceremony)
        a.start()
        assert inside.wait(10)
        b = threading.Thread(target=admin)
        b.start()
        if store.engine.concurrent:  # PostgreSQL: a connection of its own, side by side
            assert done.wait(10), "the second thread has its own connection: no wait"
        else:  # SQLite: one connection, the second thread waits for the transaction
            assert not done.wait(0.3), "the second thread must wait for the open transaction"
        release.set()
        a.join(10)
        b.join(10)
        assert not errors
        assert [u.username for u in store.list_users()] == ["bob"]


# --------------------------------------------------------------------------- methods of any kind
# (schema 3: user classes, preferred and confirmed methods, removal of all of a user's methods)


class TestMethods:
    def test_user_class_and_mfa(self, store):
        u = store.add_user("alice", user_class="external")
        assert (u.user_class, u.mfa_enabled) == ("external", True)  # new accounts: MFA on
        u = store.update_user("alice", user_class="contributor", mfa_enabled=False)
        assert (u.user_class, u.mfa_enabled) == ("contributor", False)
        with pytest.raises(InvalidValue, match="user class"):
            store.add_user("bob", user_class="visitor")

    def test_one_preferred_method_and_only_confirmed(self, store):
        u = store.add_user("alice")
        a = store.add_method(u.id, "totp", "phone app")
        b = store.add_method(u.id, "sms", "mobile")
        pending = store.add_method(u.id, "email", "work mail", confirmed=False)
        store.set_preferred_method(u.id, a.id)
        store.set_preferred_method(u.id, b.id)
        assert store.preferred_method(u.id).id == b.id
        assert [m.preferred for m in store.list_methods(u.id)] == [False, True, False]
        with pytest.raises(InvalidValue, match="not confirmed"):
            store.set_preferred_method(u.id, pending.id)
        assert store.confirm_method(pending.id).confirmed
        with pytest.raises(CredentialExists):
            store.add_method(u.id, "totp", "PHONE APP")  # names ignore case
        with pytest.raises(InvalidValue, match="unknown method kind"):
            store.add_method(u.id, "carrier-pigeon", "x")
        other = store.add_user("bob")
        with pytest.raises(UnknownCredential):
            store.set_preferred_method(other.id, a.id)

    def test_remove_all_methods_keeps_the_password_and_the_audit_log(self, store):
        u = store.add_user("alice")
        store.add_method(u.id, "password", "password")
        store.add_fido_credential(u.id, **cred_args())
        store.add_method(u.id, "totp", "app")
        store.record_event("login", user_id=u.id, outcome="success")
        removed = store.remove_all_methods(u.id)
        assert sorted(m.kind for m in removed) == ["fido2", "totp"]
        assert [m.kind for m in store.list_methods(u.id)] == ["password"]
        assert store.list_fido_credentials(u.id) == []
        assert store.verify_events() == 1
        assert [m.kind for m in store.remove_all_methods(u.id, keep_password=False)] == ["password"]

    def test_migration_from_schema_2_keeps_users_with_mfa_off(self, db_path):
        with Store.open(db_path, migrations=MIGRATIONS[:2]) as s:
            assert s.schema_version == 2
            run(s, "INSERT INTO users (id, username, display_name, user_handle, created_at) "
                   "VALUES ('u-1', 'alice', 'Alice', ?, 0)", (b"\x01",))  # as schema 2 wrote them
        with Store.open(db_path) as s:
            u = s.get_user("alice")
            assert u.id == "u-1" and s.schema_version == SCHEMA_VERSION
            # an account that existed before: only its class's enforcement applies to it
            assert (u.user_class, u.mfa_enabled) == ("internal", False)
            assert s.add_user("bob").mfa_enabled is True
