"""The store's web area (schema migration 9): browser sessions found by their token's hash,
page state bounded, sessions ended one by one or all of a user's, old ones purged; and the
rate-limit counters every replica shares. On SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import threading

import pytest

from token_agent.store import InvalidValue, Store


def _h(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _sessions(store: Store) -> None:
    alice = store.add_user("alice")
    bob = store.add_user("bob")
    store.add_web_session(_h("a1"), alice.id, csrf="c" * 48, now=100.0, multi_factor=True,
                          method="totp", address="10.0.0.1", user_agent="x" * 1000)
    store.add_web_session(_h("a2"), alice.id, csrf="d" * 48, now=200.0, multi_factor=False,
                          method="password", address=None, user_agent=None)
    store.add_web_session(_h("b1"), bob.id, csrf="e" * 48, now=300.0, multi_factor=True,
                          method="key", address=None, user_agent=None)
    row = store.get_web_session(_h("a1"))
    assert (row.user_id, row.multi_factor, row.method, row.auth_at) == (alice.id, True, "totp",
                                                                          100.0)
    assert len(row.user_agent) == 256  # cut, never refused
    assert store.get_web_session(_h("nope")) is None
    store.reauth_web_session(_h("a2"), now=250.0, multi_factor=True, method="totp")
    row = store.get_web_session(_h("a2"))
    assert (row.auth_at, row.multi_factor, row.last_seen_at) == (250.0, True, 250.0)
    store.set_web_flash(_h("a1"), "saved")
    assert store.take_web_flash(_h("a1")) == "saved"
    assert store.take_web_flash(_h("a1")) is None
    store.set_web_data(_h("a1"), {"pending": "totp"})
    assert store.get_web_session(_h("a1")).data == {"pending": "totp"}
    with pytest.raises(InvalidValue):  # a page's state cannot fill the disk
        store.set_web_data(_h("a1"), {"x": "y" * 20000})
    assert store.get_web_session(_h("a1")).data == {"pending": "totp"}
    assert store.count_web_sessions(alice.id) == 2
    assert [r.id_hash for r in store.web_sessions_of(alice.id)] == [_h("a2"), _h("a1")]
    assert store.purge_web_sessions(idle_before=150.0, created_before=0.0) == 1  # a1: idle
    assert store.end_web_sessions_of(alice.id) == 1
    assert store.end_web_session(_h("b1")) is True
    assert store.end_web_session(_h("b1")) is False
    store.add_web_session(_h("b2"), bob.id, csrf="f" * 48, now=400.0, multi_factor=True,
                          method="key", address=None, user_agent=None)
    store.remove_user("bob")  # a removed user's sessions go with them
    assert store.get_web_session(_h("b2")) is None


def _throttle(store: Store) -> None:
    assert store.hit_throttle("sign-in", "k", now=1000.0, window=60.0) == (1, 1000.0)
    assert store.hit_throttle("sign-in", "k", now=1010.0, window=60.0) == (2, 1000.0)
    assert store.hit_throttle("sign-in", "other", now=1010.0, window=60.0) == (1, 1010.0)
    assert store.hit_throttle("codes", "k", now=1010.0, window=60.0) == (1, 1010.0)
    # the window ended: a new one starts
    assert store.hit_throttle("sign-in", "k", now=1061.0, window=60.0) == (1, 1061.0)
    with pytest.raises(InvalidValue):
        store.hit_throttle("sign-in", "k" * 300, now=1061.0, window=60.0)
    assert store.purge_throttle(1050.0) == 2


@pytest.mark.parametrize("part", [_sessions, _throttle])
def test_web_area_on_sqlite(tmp_path, part):
    with Store.open(tmp_path / "store.db") as store:
        part(store)


@pytest.mark.parametrize("part", [_sessions, _throttle])
def test_web_area_on_postgresql(pg_url, part):
    with Store.open(pg_url) as store:
        part(store)


def test_replicas_share_one_rate_limit(pg_url):
    """Two replicas (two stores on one database) counting at once: every attempt counted."""
    stores = [Store.open(pg_url) for _ in range(2)]
    counts: list[int] = []
    lock = threading.Lock()

    def hit(store: Store) -> None:
        for _ in range(25):
            count, _ = store.hit_throttle("sign-in", "10.0.0.1", now=5000.0, window=600.0)
            with lock:
                counts.append(count)

    threads = [threading.Thread(target=hit, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert sorted(counts) == list(range(1, 51))
