"""The library functions behind the administrators' pages (token_agent/admin_ops.py, the
store's audit search): the effective policy as `policy show` gives it, the cards report,
audit search and verification, revoking a workstation. Both engines
(``--store-engine postgresql``)."""

from __future__ import annotations

import hashlib

import pytest

from token_agent import admin_ops
from token_agent.policy import parse_policy
from token_agent.store import Store, UnknownWorkstation

DAY = 86400.0


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = Store.open(tmp_path / "token-agent.db", clock=clock)
    yield s
    s.close()


def test_effective_policy_hides_the_delivery_table_and_names_its_channels():
    pol = parse_policy('[delivery.sms]\nurl = "https://gw.example/sms"\n'
                       'token = "s3cret-gateway-credential"\n'
                       '[legacy]\napp_passwords = true\n')
    data = admin_ops.effective_policy(pol)
    assert data["delivery_channels"] == ["sms"] and "delivery" not in data
    assert "s3cret-gateway-credential" not in repr(data)
    assert data["legacy"]["app_passwords"] is True
    assert any("app passwords" in w for w in data["warnings"])
    assert data["classes"]["internal"]["enforce"] is True


def test_search_events_filters_and_pages(store, clock):
    alice = store.add_user("alice")
    for i in range(7):
        clock.t += 60
        store.record_event("login", user_id=alice.id, outcome="success", detail={"i": i})
        store.record_event("login.unusual", user_id=alice.id, outcome="alert")
        store.record_event("loginx", outcome="success")  # not of the family "login"
        store.record_event("verify.totp", outcome="failure")
    first = store.search_events(user_id=alice.id, kind="login", limit=4)
    assert [e.kind for e in first] == ["login.unusual", "login"] * 2
    rest = store.search_events(user_id=alice.id, kind="login", limit=100,
                               before_id=first[-1].id)
    assert len(rest) == 10 and rest[0].id < first[-1].id
    assert len(store.search_events(kind="login", outcome="success", limit=100)) == 7
    t0 = 1_700_000_000.0
    window = store.search_events(kind="login", outcome="success", since=t0 + 120,
                                 until=t0 + 240, limit=100)
    assert [e.detail["i"] for e in window] == [2, 1]
    assert store.search_events(kind="login_", limit=10) == []  # LIKE wildcards are literal
    assert store.search_events(kind="verify.%", limit=10) == []
    assert [e.kind for e in store.search_events(kind="verify", limit=1)] == ["verify.totp"]


def test_verify_audit(store):
    store.record_event("login", outcome="success")
    assert admin_ops.verify_audit(store) == (True, 1, "audit log intact: 1 events verified")


def test_cards_report(store, clock):
    now = clock()
    alice, bob = store.add_user("alice"), store.add_user("bob")
    store.add_card_identity(alice.id, uuid="555000000001", holder_name="Alice A")
    store.add_card_identity(bob.id, uuid="555000000002", holder_name="Bob B")
    store.add_card_identity(bob.id, uuid="555000000003", holder_name="Bob B", name="old card")
    store.add_card_identity(alice.id, uuid="555000000004", holder_name="Alice A", name="never")
    store.record_card_use("555000000001", certificate_serial="a1", issuer="CA",
                          not_after=now + 30 * DAY)
    store.record_card_use("555000000002", certificate_serial="b1", issuer="CA",
                          not_after=now + 200 * DAY)
    store.record_card_use("555000000003", certificate_serial="b0", issuer="CA",
                          not_after=now - DAY)
    # revoked cards seen: one per serial, newest first; other failures ignored
    for serial, reason in (("r1", "certificate-revoked"), ("r2", "certificate-revoked"),
                           ("r1", "certificate-revoked"), ("x9", "wrong-pin")):
        clock.t += 1
        store.record_event("login.card", outcome="failure",
                           detail={"reason": reason, "certificate_serial": serial,
                                   "uuid": "555000000009", "holder_name": "Mallory"})
    report = admin_ops.cards_report(store, now)
    assert [(c["card"].uuid, c["expired"], c["days_left"]) for c in report["expiring"]] == [
        ("555000000003", True, 0), ("555000000001", False, 30)]
    assert report["expiring"][1]["user"].username == "alice"
    assert [r["certificate_serial"] for r in report["revoked"]] == ["r1", "r2"]
    assert report["scanned_all"]
    assert admin_ops.cards_report(store, now, scan=2)["scanned_all"] is False


def test_revoke_workstation_records_the_actor(store, clock):
    store.add_join_token("ws1", hashlib.sha256(b"t").digest(), clock() + 3600)
    ws = admin_ops.revoke_workstation(store, "WS1", "admin1")
    assert ws.state == "revoked"
    event = store.list_events(kind="workstation.revoke")[0]
    assert event.detail == {"workstation": "ws1", "actor": "admin1"}
    with pytest.raises(UnknownWorkstation):
        admin_ops.revoke_workstation(store, "nope", "admin1")


def test_reset_methods_ends_the_users_web_sessions(store, clock):
    alice, bob = store.add_user("alice"), store.add_user("bob")
    for user, n in ((alice, 1), (alice, 2), (bob, 3)):
        store.add_web_session(bytes([n]) * 32, user.id, csrf="c" * 32, now=clock(),
                              multi_factor=True, method="password+totp", address=None,
                              user_agent=None)
    store.add_method(alice.id, "totp", "phone app")
    removed = admin_ops.reset_methods(store, alice, "admin1")
    assert [m.kind for m in removed] == ["totp"]
    assert store.web_sessions_of(alice.id) == [] and len(store.web_sessions_of(bob.id)) == 1
    event = store.list_events(kind="admin.reset-methods")[0]
    assert event.detail["web_sessions_ended"] == 2 and event.detail["actor"] == "admin1"
