"""Faults of a PostgreSQL store, through ``Store`` (tests/test_store_postgres_engine.py covers
the engine alone): the server stopped in the middle of a transaction, the server gone and
back (the pool reconnects), a wrong password, another program's database. They run in every
run, whatever --store-engine says: the suite's own PostgreSQL (tests/pgserver.py) is there."""

from __future__ import annotations

import pytest

from store_raw import create_foreign_table, database_behind_a_password, fingerprint, query
from token_agent.store import Store, StoreError, StoreFileError
from token_agent.store.errors import StoreUnavailable

pytestmark = [pytest.mark.store_contract]


@pytest.fixture
def store(pg_url):
    s = Store.open(pg_url)
    yield s
    s.close()


def _backend_pid(store) -> int:
    return query(store, "SELECT pg_backend_pid()")[0][0]


def test_server_stopped_mid_transaction_writes_nothing_and_says_so(pg_server, store):
    store.add_user("committed")
    store.record_event("test.before", outcome="success")
    with pytest.raises(StoreUnavailable) as raised:
        with store.transaction():
            u = store.add_user("halfway")
            store.add_method(u.id, "totp", "phone app")
            store.record_event("enrol.totp", user_id=u.id, outcome="success")
            pg_server.kill()  # as a crash: no shutdown checkpoint
            store.record_event("enrol.done", user_id=u.id, outcome="success")
    error = raised.value
    assert error.reason == "connection lost"
    assert store.location in str(error) and "the connection to the server was lost" in str(error)
    assert "nothing of it was written" in str(error)
    with pytest.raises(StoreUnavailable) as raised:  # while it is down: said at once
        store.list_users()
    assert raised.value.reason == "unreachable"
    pg_server.restart()
    assert [u.username for u in store.list_users()] == ["committed"]
    assert [e.kind for e in store.list_events()] == ["test.before"]
    assert query(store, "SELECT count(*) FROM methods") == [(0,)]
    assert store.verify_events() == 1
    assert store.record_event("test.after", outcome="success") == 2  # the chain goes on


def test_server_stopped_before_commit_says_the_outcome_is_unknown(pg_server, store):
    with pytest.raises(StoreUnavailable) as raised:
        with store.transaction():
            store.add_user("halfway")
            pg_server.kill()
    assert raised.value.reason == "connection lost"
    assert "during COMMIT" in str(raised.value) and "unknown" in str(raised.value)
    pg_server.restart()
    assert store.list_users() == []  # the server never got the COMMIT


def test_transaction_while_the_server_is_gone_then_back(pg_server, store):
    store.add_user("alice")
    before = _backend_pid(store)
    pg_server.stop()  # the pool's connections are dropped by the server
    with pytest.raises(StoreUnavailable) as raised:
        with store.transaction():
            store.add_user("bob")
    assert raised.value.reason in ("unreachable", "connection lost")
    assert store.location in str(raised.value) and "nothing was written" in str(raised.value)
    pg_server.restart()
    with store.transaction():  # the pool reconnects: the next operation works
        store.add_user("carol")
    assert [u.username for u in store.list_users()] == ["alice", "carol"]
    assert _backend_pid(store) != before


def test_the_pool_reconnects_after_a_server_restart(pg_server, store):
    store.add_user("alice")
    before = _backend_pid(store)
    pg_server.restart()  # between two operations: nobody needs to see an error
    with store.transaction():
        store.add_user("bob")
    assert [u.username for u in store.list_users()] == ["alice", "bob"]
    assert _backend_pid(store) != before


def test_a_wrong_password_is_refused_and_the_database_left_untouched(pg_server, tmp_path):
    with database_behind_a_password(pg_server, tmp_path, "ta_pw") as (
            role, url, as_superuser, good, wrong):
        with Store.open(url, password_file=good) as s:
            s.add_user("alice")
        before = fingerprint(as_superuser)
        with pytest.raises(StoreUnavailable) as raised:
            Store.open(url, password_file=wrong)
        assert raised.value.reason == "auth"
        assert role in str(raised.value) and "horse" not in str(raised.value)
        with pytest.raises(StoreUnavailable) as raised:  # no password at all
            Store.open(url)
        assert raised.value.reason == "auth"
        assert fingerprint(as_superuser) == before
        with Store.open(url, password_file=good) as s:
            assert [u.username for u in s.list_users()] == ["alice"]


def test_another_programs_database_is_refused_untouched(pg_url):
    create_foreign_table(pg_url)
    before = fingerprint(pg_url)
    for create in (True, False):
        with pytest.raises(StoreFileError) as raised:
            Store.open(pg_url, create=create)
        assert raised.value.reason == "foreign"
        assert "invoices" in str(raised.value) and "not a token-agent store" in str(raised.value)
        assert fingerprint(pg_url) == before
    assert isinstance(raised.value, StoreError)
