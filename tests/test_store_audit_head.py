"""The audit chain's head (schema migration 6): a store of version 5 with events migrates
and verifies; a removed tail is found even when the attacker with the file also fixes
SQLite's own counter; the head cannot be deleted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from store_raw import drop_append_only, is_pg, query, run
from token_agent.store import MIGRATIONS, SCHEMA_VERSION, AuditChainBroken, Store, StoreError
from token_agent.store.audit import _event_hash

pytestmark = [pytest.mark.store_contract]


def raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection to the file, bypassing the store (the attacker's)."""
    return sqlite3.connect(path, isolation_level=None)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "token-agent.db"


def _append_as_version_5(store: Store, count: int) -> bytes:
    """Events as a version-5 store wrote them (ids 1, 2, ..., each chained to the one
    before), through the store's connection; returns the last hash."""
    prev = bytes(32)
    for i in range(1, count + 1):
        detail = '{"i":%d}' % i
        digest = _event_hash(prev, i, 1000.0 + i, "login.key", "success", None, None, None, detail)
        run(store, "INSERT INTO audit_events (id, at, kind, outcome, detail, prev_hash, hash) "
                   "VALUES (?, ?, 'login.key', 'success', ?, ?, ?)",
            (i, 1000.0 + i, detail, prev, digest))
        prev = digest
    return prev


def test_a_version_5_store_with_events_migrates_and_verifies(db_path):
    with Store.open(db_path, migrations=MIGRATIONS[:5]) as s:
        assert s.schema_version == 5
        last = _append_as_version_5(s, 4)
    with Store.open(db_path) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert query(s, "SELECT last_id, hash FROM audit_head") == [(4, last)]
        assert s.verify_events() == 4
        # appends continue the same chain, under the head
        assert s.record_event("login.key", outcome="failure") == 5
        assert s.verify_events() == 5
        assert query(s, "SELECT last_id FROM audit_head") == [(5,)]


def test_an_empty_version_5_store_gets_a_genesis_head(db_path):
    Store.open(db_path, migrations=MIGRATIONS[:5]).close()
    with Store.open(db_path) as s:
        assert query(s, "SELECT id, last_id, hash FROM audit_head") == [(1, 0, bytes(32))]
        assert s.verify_events() == 0
        assert s.record_event("login.key", outcome="success") == 1
        assert s.verify_events() == 1


def test_a_removed_tail_is_found_even_with_sqlites_counter_fixed(db_path):
    with Store.open(db_path) as s:
        for _ in range(3):
            s.record_event("login.key", outcome="success")
        assert s.verify_events() == 3
        # the attacker with the database: drop the trigger, cut the tail, fix SQLite's counter
        drop_append_only(s)
        run(s, "DELETE FROM audit_events WHERE id = 3")
        if not is_pg(s):
            run(s, "UPDATE sqlite_sequence SET seq = 2 WHERE name = 'audit_events'")
    with Store.open(db_path) as s:
        with pytest.raises(AuditChainBroken, match="audit events 3 to 3 are missing") as err:
            s.verify_events()
        assert err.value.event_id == 3


def test_a_head_that_does_not_match_the_last_event_is_found(db_path):
    with Store.open(db_path) as s:
        for _ in range(2):
            s.record_event("login.key", outcome="success")
        run(s, "UPDATE audit_head SET hash = ?", (bytes(32),))
    with Store.open(db_path) as s:
        with pytest.raises(AuditChainBroken, match="head does not match event 2"):
            s.verify_events()


def test_deleting_the_head_is_refused(db_path):
    with Store.open(db_path) as s:
        s.record_event("login.key", outcome="success")
        with pytest.raises(StoreError, match="head cannot be"):
            run(s, "DELETE FROM audit_head")
        if not is_pg(s):  # and with the file's own connection
            with pytest.raises(sqlite3.IntegrityError, match="head cannot be deleted"):
                raw(db_path).execute("DELETE FROM audit_head")
        assert query(s, "SELECT count(*) FROM audit_head") == [(1,)]
    with Store.open(db_path) as s:
        assert s.verify_events() == 1
