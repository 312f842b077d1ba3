"""The service with smartcards, through the real pcscd and vpcd (the ``pcscd`` fixture: it
fails in CI and skips elsewhere when pcscd cannot be had, never silently in CI): the event
stream (card.inserted, card.removed, session.locked), a card login over the socket with its
PIN prompt, a card-bound session that survives a restart of the service while its card stays
in, and locks (the lock command runs) when the card leaves. On each card path of
``[cards] driver``: "piv", "pkcs11" (OpenSC's module; the PC/SC watcher still sees the removal)
and "auto" (which takes PIV for this card)."""

from __future__ import annotations

import time

import pytest

from pcsc_helpers import wait_for_card
from simulators.card.card import VirtualCard
from simulators.card.issuance import issue_card
from simulators.card.pki import issuing_cert_path, root_cert_path
from test_service import services, socket_dir, wait_for, world  # noqa: F401  (fixtures)

CARD_PIN = "739154"
ALICE_UUID = "555123456789"


@pytest.mark.parametrize("driver, used", [("piv", "piv"), ("pkcs11", "pkcs11"),
                                          ("auto", "piv")])
def test_card_events_login_restart_and_lock(services, world, fresh_ca, tmp_path, pcscd,  # noqa: F811
                                            vpcd_insert, driver, used):
    from token_agent.ceremonies.card import set_card_setting

    card_path = tmp_path / "alice.card"
    issue_card(fresh_ca, name="Dr Alice Smith", uuid=ALICE_UUID, pin=CARD_PIN, out=card_path,
               algorithm="ECCP256")
    services.secrets.append(CARD_PIN)
    store = world.store
    set_card_setting(store, "card_trust_anchors", [str(root_cert_path(fresh_ca))])
    set_card_setting(store, "card_intermediates", [str(issuing_cert_path(fresh_ca))])
    alice = store.add_user("alice", display_name="Dr Alice Smith")
    store.add_card_identity(alice.id, uuid=ALICE_UUID, holder_name="Dr Alice Smith")
    marker = tmp_path / "locked.log"
    reader = pcscd.reader(0)
    svc = services(cards=f'readers = ["Virtual PCD"]\ndriver = "{driver}"\n'
                         f"lock_command = \"sh -c 'echo locked >> {marker}'\"")

    events = svc.client()
    events.request("events.subscribe")
    bridge = vpcd_insert(VirtualCard.load(card_path))
    inserted = events.next_event(kind="card.inserted", timeout=5)
    assert inserted["reader"] == reader and inserted["atr"] == \
        "3bf91800008131fe454a434f503431563232af"

    prompts = []

    def pin(event):
        prompts.append(event)
        return CARD_PIN

    with svc.client() as c:
        outcome = c.login("alice", pin, primary="card")
        assert outcome["ok"], outcome
        assert outcome["method"] == "card" and outcome["multi_factor"]
        assert [p["message"] for p in prompts] == ["Enter the PIN for your card"]
        [session] = c.request("session.state", user="alice")["sessions"]
    assert session["id"] == outcome["session"] and session["state"] == "active"
    assert session["card"]["reader"] == reader and session["card"]["certificate_serial"]
    [audited] = world.store.list_events(kind="login.card")
    assert audited.outcome == "success" and audited.detail["card_driver"] == used, audited
    finished = events.next_event(kind="login.finished", timeout=5)  # root: an admin
    assert finished["user"] == "alice" and finished["ok"]
    events.close()

    # a restart while the card stays in: the session is still active, bound to the card
    assert svc.signal(15) == 0
    svc.start()
    events = svc.client()
    events.request("events.subscribe")
    with svc.client() as c:
        [again] = c.request("session.state", user="alice")["sessions"]
    assert again == session
    time.sleep(0.5)  # the restored session's card is read again (certificate serial)
    with svc.client() as c:
        assert c.request("session.state")["sessions"][0]["state"] == "active"

    # the card leaves: removed, the session locked, the lock command run
    removed_at = time.monotonic()
    bridge.remove()
    assert events.next_event(kind="card.removed", timeout=5)["reader"] == reader
    locked = events.next_event(kind="session.locked", timeout=5)
    seen_ms = (time.monotonic() - removed_at) * 1000
    assert locked["session"] == session["id"] and locked["user"] == "alice"
    assert locked["reader"] == reader and 0 <= locked["latency_ms"] < 100
    wait_for(lambda: marker.exists() and "locked" in marker.read_text(),
             what="the lock command ran")
    with svc.client() as c:
        [after] = c.request("session.state", user="alice")["sessions"]
    assert after["state"] == "locked" and after["end_reason"] == "card-removed"
    events.close()
    wait_for_card(pcscd.context, reader, present=False)
    print(f"\ncard removed -> session.locked at the subscriber: {seen_ms:.0f} ms "
          f"(the service's own share: {locked['latency_ms']:.2f} ms)")
    assert [e.outcome for e in world.store.list_events(kind="session.lock")] == ["success"]

    # a card taken out while the service is stopped: its session locks when it starts again
    bridge = vpcd_insert(VirtualCard.load(card_path))
    wait_for_card(pcscd.context, reader, present=True)
    with svc.client() as c:
        second = c.login("alice", lambda _e: CARD_PIN, primary="card")
        assert second["ok"], second
    assert svc.signal(15) == 0
    bridge.remove()
    wait_for_card(pcscd.context, reader, present=False)
    marker.unlink()
    svc.start()
    with svc.client() as c:
        states = {s["id"]: (s["state"], s["end_reason"])
                  for s in c.request("session.state", user="alice")["sessions"]}
    assert states == {session["id"]: ("locked", "card-removed"),
                      second["session"]: ("locked", "card-removed")}
    wait_for(lambda: marker.exists(), what="the lock command ran at start")
