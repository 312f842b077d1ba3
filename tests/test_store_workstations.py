"""The store's workstations area (schema migration 7): join tokens used once, expiry,
revocation, last-seen; on SQLite and, with --store-engine postgresql (or the pg_url test
below), on PostgreSQL."""

from __future__ import annotations

import hashlib
import threading

import pytest

from token_agent.store import (
    InvalidValue, JoinTokenRefused, Store, UnknownWorkstation, WorkstationExists,
)


def _h(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _lifecycle(store: Store, clock: Clock) -> None:
    ws = store.add_join_token("Ward7-Bay3", _h("t1"), clock.now + 3600)
    assert (ws.name, ws.state, ws.token_used_at) == ("Ward7-Bay3", "pending", None)
    # a new token replaces the unused one
    store.add_join_token("ward7-bay3", _h("t2"), clock.now + 3600)
    with pytest.raises(JoinTokenRefused) as old:
        store.claim_join_token(_h("t1"), clock.now)
    assert old.value.reason == "unknown"
    with store.transaction():
        claimed = store.claim_join_token(_h("t2"), clock.now)
        joined = store.complete_join(claimed.id, cert_serial="ab", cert_fingerprint="F" * 64,
                                     cert_not_after=clock.now + 86400, now=clock.now)
    assert joined.state == "joined" and joined.cert_fingerprint == "f" * 64
    assert store.workstation_by_fingerprint("F" * 64).name == "Ward7-Bay3"
    with pytest.raises(JoinTokenRefused) as used:
        store.claim_join_token(_h("t2"), clock.now)
    assert used.value.reason == "used"
    with pytest.raises(WorkstationExists):
        store.add_join_token("WARD7-BAY3", _h("t3"), clock.now + 3600)
    # last seen: written at most once a minute
    assert store.touch_workstation(joined.id, clock.now, "10.0.0.7") is True
    clock.now += 30
    assert store.touch_workstation(joined.id, clock.now, "10.0.0.8") is False
    clock.now += 31
    assert store.touch_workstation(joined.id, clock.now, "10.0.0.9") is True
    assert store.get_workstation("ward7-bay3").last_address == "10.0.0.9"
    revoked = store.revoke_workstation("ward7-BAY3")
    assert revoked.state == "revoked" and revoked.revoked
    first = revoked.revoked_at
    clock.now += 5
    assert store.revoke_workstation("ward7-bay3").revoked_at == first
    # joining again: a new token, then the new certificate replaces the old one
    store.add_join_token("ward7-bay3", _h("t4"), clock.now + 10)
    assert store.get_workstation("ward7-bay3").state == "revoked"  # until it joins
    clock.now += 11
    with pytest.raises(JoinTokenRefused) as expired:
        store.claim_join_token(_h("t4"), clock.now)
    assert expired.value.reason == "expired"
    store.add_join_token("ward7-bay3", _h("t5"), clock.now + 10)
    with store.transaction():
        again = store.claim_join_token(_h("t5"), clock.now)
        store.complete_join(again.id, cert_serial="cd", cert_fingerprint="e" * 64,
                            cert_not_after=clock.now + 86400, now=clock.now)
    assert store.workstation_by_fingerprint("f" * 64) is None
    assert store.get_workstation("ward7-bay3").state == "joined"
    # an unused token of a revoked workstation stops working
    store.add_join_token("ws2", _h("t6"), clock.now + 3600)
    store.revoke_workstation("ws2")
    with pytest.raises(JoinTokenRefused):
        store.claim_join_token(_h("t6"), clock.now)
    assert [w.name for w in store.list_workstations()] == ["Ward7-Bay3", "ws2"]  # as first given
    with pytest.raises(UnknownWorkstation):
        store.revoke_workstation("nope")
    for bad in ("", "a b", "-x", "x" * 65, "ws/1"):
        with pytest.raises(InvalidValue):
            store.add_join_token(bad, _h("t"), clock.now + 10)


def test_workstations_lifecycle(tmp_path):
    clock = Clock()
    with Store.open(tmp_path / "store.db", clock=clock) as store:
        _lifecycle(store, clock)


def test_workstations_lifecycle_on_postgresql(pg_url):
    clock = Clock()
    with Store.open(pg_url, clock=clock) as store:
        _lifecycle(store, clock)


def test_a_join_token_is_claimed_once_by_racing_servers(pg_url):
    """Two replicas (two stores on one database) claim one token at once: one wins."""
    with Store.open(pg_url) as setup:
        setup.add_join_token("ws1", _h("race"), setup._now() + 3600)
    stores = [Store.open(pg_url) for _ in range(4)]
    results: list[str] = []
    barrier = threading.Barrier(len(stores))

    def claim(store: Store) -> None:
        barrier.wait()
        try:
            store.claim_join_token(_h("race"), store._now())
            results.append("won")
        except JoinTokenRefused as e:
            results.append(e.reason)

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in stores:
        s.close()
    assert sorted(results) == ["used", "used", "used", "won"]
