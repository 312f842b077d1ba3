"""The audit chain's head (schema migration 6): a store of version 5 with events migrates
and verifies; a removed tail is found even when the attacker with the file also fixes
SQLite's own counter; the head cannot be deleted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from token_agent.store import MIGRATIONS, AuditChainBroken, Store
from token_agent.store.audit import _event_hash


def raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection to the file, bypassing the store (the attacker's)."""
    return sqlite3.connect(path, isolation_level=None)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "token-agent.db"


def _append_as_version_5(path: Path, count: int) -> bytes:
    """Events as a version-5 store wrote them (AUTOINCREMENT ids, each chained to the one
    before); returns the last hash."""
    c = raw(path)
    prev = bytes(32)
    for i in range(1, count + 1):
        detail = '{"i":%d}' % i
        digest = _event_hash(prev, i, 1000.0 + i, "login.key", "success", None, None, None, detail)
        c.execute("INSERT INTO audit_events (at, kind, outcome, detail, prev_hash, hash) "
                  "VALUES (?, 'login.key', 'success', ?, ?, ?)", (1000.0 + i, detail, prev, digest))
        prev = digest
    c.close()
    return prev


def test_a_version_5_store_with_events_migrates_and_verifies(db_path):
    with Store.open(db_path, migrations=MIGRATIONS[:5]) as s:
        assert s.schema_version == 5
    last = _append_as_version_5(db_path, 4)
    with Store.open(db_path) as s:
        assert s.schema_version == 6
        head = s._conn.execute("SELECT last_id, hash FROM audit_head").fetchall()
        assert [(r[0], bytes(r[1])) for r in head] == [(4, last)]
        assert s.verify_events() == 4
        # appends continue the same chain, under the head
        assert s.record_event("login.key", outcome="failure") == 5
        assert s.verify_events() == 5
        assert s._conn.execute("SELECT last_id FROM audit_head").fetchone()[0] == 5


def test_an_empty_version_5_store_gets_a_genesis_head(db_path):
    Store.open(db_path, migrations=MIGRATIONS[:5]).close()
    with Store.open(db_path) as s:
        assert [tuple(r) for r in s._conn.execute("SELECT id, last_id, hash FROM audit_head")] == [
            (1, 0, bytes(32))]
        assert s.verify_events() == 0
        assert s.record_event("login.key", outcome="success") == 1
        assert s.verify_events() == 1


def test_a_removed_tail_is_found_even_with_sqlites_counter_fixed(db_path):
    with Store.open(db_path) as s:
        for _ in range(3):
            s.record_event("login.key", outcome="success")
        assert s.verify_events() == 3
    c = raw(db_path)  # the attacker with the file: drop the trigger, cut the tail, fix the counter
    c.execute("DROP TRIGGER audit_events_no_delete")
    c.execute("DELETE FROM audit_events WHERE id = 3")
    c.execute("UPDATE sqlite_sequence SET seq = 2 WHERE name = 'audit_events'")
    c.close()
    with Store.open(db_path) as s:
        with pytest.raises(AuditChainBroken, match="audit events 3 to 3 are missing") as err:
            s.verify_events()
        assert err.value.event_id == 3


def test_a_head_that_does_not_match_the_last_event_is_found(db_path):
    with Store.open(db_path) as s:
        for _ in range(2):
            s.record_event("login.key", outcome="success")
    c = raw(db_path)
    c.execute("UPDATE audit_head SET hash = ?", (bytes(32),))
    c.close()
    with Store.open(db_path) as s:
        with pytest.raises(AuditChainBroken, match="head does not match event 2"):
            s.verify_events()


def test_deleting_the_head_is_refused(db_path):
    with Store.open(db_path) as s:
        s.record_event("login.key", outcome="success")
        with pytest.raises(sqlite3.IntegrityError, match="head cannot be deleted"):
            s._conn.execute("DELETE FROM audit_head")
    c = raw(db_path)
    with pytest.raises(sqlite3.IntegrityError, match="head cannot be deleted"):
        c.execute("DELETE FROM audit_head")
    assert c.execute("SELECT count(*) FROM audit_head").fetchone()[0] == 1
    c.close()
    with Store.open(db_path) as s:
        assert s.verify_events() == 1
