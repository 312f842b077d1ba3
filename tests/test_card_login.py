"""Smartcard login (token_agent.ceremonies.card), sponsor unlock, and card-bound sessions
(token_agent.cardsession), through the real pcscd + vpcd with cards issued by the simulated
NHS-style PKI; a few in-process cases (no pcscd) for what a real card cannot be made to do."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from drivers.pcsc.piv import PivSession
from pcsc_helpers import wait_for_card
from simulators.card.card import InProcessCardConnection, VirtualCard
from simulators.card.issuance import issue_card
from simulators.card.pki import admin_credentials, init_ca, issuing_cert_path, root_cert_path
from token_agent.cardsession import CardSessionManager
from token_agent.ceremonies.card import (
    CardSettings,
    check_card_setting,
    login_with_card,
    set_card_setting,
    unlock_card,
)
from token_agent.outcome import Factor, LoginOutcome, Reason
from token_agent.store import Store

PIN = "1234"
ALICE_UUID = "555123456789"
BOB_UUID = "555987654321"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """One CA and its cards, issued once (each test works on copies)."""
    directory = tmp_path_factory.mktemp("pki")
    ca = directory / "ca"
    init_ca(ca)
    cards = {}

    def issue(key, name, uuid, **kw):
        cards[key] = directory / f"{key}.card"
        issue_card(ca, name=name, uuid=uuid, pin=PIN, out=cards[key], **kw)

    issue("alice", "Dr Alice Smith", ALICE_UUID)
    issue("bob", "Dr Bob Jones", BOB_UUID, algorithm="ECCP256")
    issue("expired", "Dr Old Card", "555000000001", variant="expired")
    issue("revoked", "Dr Lost Card", "555000000002", variant="revoked")
    issue("untrusted", "Dr Fake Card", "555000000003", variant="untrusted")
    issue("expiring", "Dr Soon Card", "555000000004", variant="expiring")
    return {"ca": ca, "cards": cards}


@pytest.fixture
def card(pki, tmp_path):
    """``card(key)``: a fresh copy of an issued card file."""
    def copy(key: str) -> Path:
        target = tmp_path / f"{key}.card"
        shutil.copyfile(pki["cards"][key], target)
        os.chmod(target, 0o600)
        return target
    return copy


@pytest.fixture
def store(tmp_path, pki):
    (tmp_path / "data").mkdir(mode=0o700)
    s = Store.open(tmp_path / "data" / "token-agent.db")
    set_card_setting(s, "card_trust_anchors", [str(root_cert_path(pki["ca"]))])
    set_card_setting(s, "card_intermediates", [str(issuing_cert_path(pki["ca"]))])
    alice = s.add_user("alice", display_name="Dr Alice Smith", roles=["clinician"])
    s.add_card_identity(alice.id, uuid=ALICE_UUID, holder_name="Dr Alice Smith")
    bob = s.add_user("bob", display_name="Dr Bob Jones")
    s.add_card_identity(bob.id, uuid=BOB_UUID, holder_name="Dr Bob Jones")
    s.add_user("sam", display_name="Sam Sponsor", roles=["sponsor"])
    yield s
    s.close()


class Pins:
    """A pin_provider that counts its calls (and may do something when called)."""

    def __init__(self, *pins: str, on_call=None) -> None:
        self.pins = list(pins)
        self.calls = 0
        self.on_call = on_call

    def __call__(self) -> str:
        self.calls += 1
        if self.on_call:
            self.on_call()
        return self.pins.pop(0)


def in_process(path: Path, cls=PivSession):
    connection = InProcessCardConnection(VirtualCard.load(path))
    connection.connect()
    return cls(connection)


def never_asked():
    raise AssertionError("the PIN must not be asked for this card")


def inserted(vpcd_insert, pcscd, path: Path, slot: int = 0):
    """Insert the card at ``path``; (bridge, PivSession over pcscd)."""
    bridge = vpcd_insert(VirtualCard.load(path), slot=slot)
    wait_for_card(pcscd.context, pcscd.reader(slot), True)
    return bridge, PivSession.open(pcscd.reader(slot))


def sponsor_login(store, username="sam") -> LoginOutcome:
    user = store.get_user(username)
    return LoginOutcome(ok=True, method="key", user=user.username, user_id=user.id,
                        factors=(Factor.POSSESSION, Factor.KNOWLEDGE))


def card_events(store, outcome=None):
    return [e for e in store.list_events(kind="login.card")
            if outcome is None or e.outcome == outcome]


# --- the settings and the store ---------------------------------------------------------------


def test_card_settings_are_validated(store, pki):
    settings = CardSettings.from_store(store)
    assert settings.provision_on_first_use is False
    assert settings.lock_command == "loginctl lock-session"
    assert settings.lock_argv == ["loginctl", "lock-session"]
    assert settings.on_unreachable_crl == "refuse"
    for key, bad in (("card_on_stale_crl", "maybe"), ("card_expiry_warning_days", "soon"),
                     ("card_provision_on_first_use", "perhaps"), ("card_nonsense", "1"),
                     ("card_trust_anchors", ["/no/such/root.pem"]),
                     ("card_crl_sources", ["ftp://x/crl"])):
        with pytest.raises(ValueError):
            check_card_setting(key, bad)
    assert set_card_setting(store, "card_provision_on_first_use", "yes") is True
    pem = root_cert_path(pki["ca"]).read_text()
    assert set_card_setting(store, "card_trust_anchors", [pem]) == [pem.strip()]
    assert CardSettings.from_store(store).trust_policy().anchors


def test_card_identities_in_the_store(store):
    alice = store.get_user("alice")
    assert store.get_user_by_card_uuid(ALICE_UUID).username == "alice"
    assert store.get_user_by_card_uuid("000000000000") is None
    [ident] = store.list_card_identities(alice.id)
    assert (ident.uuid, ident.holder_name, ident.name) == (ALICE_UUID, "Dr Alice Smith",
                                                           f"card {ALICE_UUID}")
    assert len(store.list_card_identities()) == 2
    store.remove_card_identity(alice.id, uuid=ALICE_UUID)
    assert store.get_user_by_card_uuid(ALICE_UUID) is None


# --- in-process (no pcscd) --------------------------------------------------------------------


class ForgingSession(PivSession):
    """A card whose 9A signature does not come from the certificate's key."""

    def sign(self, slot, message, *, algorithm):
        return bytes(256) if algorithm == "RSA2048" else super().sign(slot, message[::-1],
                                                                       algorithm=algorithm)


@pytest.mark.parametrize("key", ["alice", "bob"])
def test_a_signature_that_does_not_verify_is_refused(store, card, key):
    session = in_process(card(key), ForgingSession)
    outcome = login_with_card(store, session, pin_provider=Pins(PIN))
    assert not outcome.ok and outcome.reason is Reason.VERIFICATION_FAILED
    assert card_events(store, "failure")[0].detail["reason"] == "verification-failed"


def test_in_process_login(store, card):
    session = in_process(card("bob"))
    outcome = login_with_card(store, session, pin_provider=Pins(PIN))
    assert outcome.ok and outcome.user == "bob", outcome


def test_no_trust_anchor_refuses_before_the_pin(store, card):
    store.delete_setting("card_trust_anchors")
    session = in_process(card("alice"))
    outcome = login_with_card(store, session, pin_provider=never_asked)
    assert outcome.reason is Reason.CERT_UNTRUSTED and "trust anchors" in outcome.message


# --- through pcscd ----------------------------------------------------------------------------


def test_login_with_the_right_pin(store, card, vpcd_insert, pcscd):
    _bridge, session = inserted(vpcd_insert, pcscd, card("alice"))
    pins = Pins(PIN)
    outcome = login_with_card(store, session, pin_provider=pins)
    assert outcome.ok, outcome
    assert pins.calls == 1
    assert (outcome.method, outcome.user) == ("card", "alice")
    assert outcome.factors == (Factor.POSSESSION, Factor.KNOWLEDGE) and outcome.multi_factor
    assert outcome.user_verified
    assert outcome.credential == f"card {ALICE_UUID}"
    assert outcome.detail["uuid"] == ALICE_UUID
    assert outcome.detail["certificate_serial"] == outcome.credential_id
    assert outcome.detail["warnings"] == []
    [event] = card_events(store)
    assert event.outcome == "success" and event.username == "alice"
    ident = store.get_card_identity(ALICE_UUID)
    assert ident.certificate_serial == outcome.credential_id and ident.last_used_at
    # the end of the certificate's validity, for the administrators' cards page
    import datetime as _dt

    assert ident.cert_not_after == _dt.datetime.fromisoformat(
        outcome.detail["not_after"]).timestamp()
    store.verify_events()
    session.close()


def test_ec_card_login(store, card, vpcd_insert, pcscd):
    _bridge, session = inserted(vpcd_insert, pcscd, card("bob"))
    outcome = login_with_card(store, session, pin_provider=Pins(PIN))
    assert outcome.ok and outcome.user == "bob", outcome
    session.close()


def test_expiring_certificate_logs_in_with_a_warning(store, card, vpcd_insert, pcscd):
    store.add_card_identity(store.add_user("soon").id, uuid="555000000004", holder_name="Dr Soon")
    _bridge, session = inserted(vpcd_insert, pcscd, card("expiring"))
    outcome = login_with_card(store, session, pin_provider=Pins(PIN))
    assert outcome.ok
    assert any("expires on" in w for w in outcome.detail["warnings"]), outcome.detail
    session.close()


def test_wrong_pin_down_to_blocked_then_sponsor_unlock(store, card, vpcd_insert, pcscd, pki):
    _bridge, session = inserted(vpcd_insert, pcscd, card("alice"))
    first = login_with_card(store, session, pin_provider=Pins("9999"))
    assert first.reason is Reason.WRONG_PIN
    assert first.message == "Wrong PIN \N{EM DASH} 2 tries left"
    second = login_with_card(store, session, pin_provider=Pins("9998"))
    assert second.message == "Wrong PIN \N{EM DASH} 1 try left"
    third = login_with_card(store, session, pin_provider=Pins("9997"))
    assert third.reason is Reason.PIN_BLOCKED
    assert third.message == "Your card is locked: ask your sponsor to unlock it."
    # blocked: refused before the PIN is asked, the right PIN no longer helps
    fourth = login_with_card(store, session, pin_provider=never_asked)
    assert fourth.reason is Reason.PIN_BLOCKED
    assert [e.detail["reason"] for e in card_events(store)] == [
        "pin-blocked", "pin-blocked", "wrong-pin", "wrong-pin"]
    assert all(e.user_id == store.get_user("alice").id for e in card_events(store))

    puk, _alg, _mk = admin_credentials(pki["ca"], ALICE_UUID)
    # not a sponsor / the sponsor's login failed: refused, nothing sent to the card
    refused = unlock_card(store, session, sponsor="bob", sponsor_outcome=sponsor_login(store, "bob"),
                          puk=puk, new_pin="4321")
    assert refused.reason is Reason.SPONSOR_NOT_AUTHORISED
    failed_login = LoginOutcome.failure("key", Reason.WRONG_PIN, "Wrong PIN")
    refused = unlock_card(store, session, sponsor="sam", sponsor_outcome=failed_login,
                          puk=puk, new_pin="4321")
    assert refused.reason is Reason.SPONSOR_NOT_AUTHORISED
    wrong = unlock_card(store, session, sponsor="sam", sponsor_outcome=sponsor_login(store),
                        puk="00000000" if puk != "00000000" else "11111111", new_pin="4321")
    assert wrong.reason is Reason.WRONG_PUK
    with pytest.raises(ValueError):
        unlock_card(store, session, sponsor="sam", sponsor_outcome=sponsor_login(store),
                    puk=puk, new_pin="12")
    done = unlock_card(store, session, sponsor="sam", sponsor_outcome=sponsor_login(store),
                       puk=puk, new_pin="4321")
    assert done.ok, done
    assert done.card_uuid == ALICE_UUID and session.pin_retries() == 3
    unlocks = store.list_events(kind="card.unlock")
    assert [e.outcome for e in unlocks] == ["success", "failure", "failure", "failure"]
    assert unlocks[0].username == "sam" and unlocks[0].detail["uuid"] == ALICE_UUID
    assert unlocks[0].detail["holder_user"] == "alice"

    again = login_with_card(store, session, pin_provider=Pins("4321"))
    assert again.ok and again.user == "alice", again
    session.close()


@pytest.mark.parametrize("variant,reason,words", [
    ("expired", Reason.CERT_EXPIRED, "Certificate expired on"),
    ("revoked", Reason.CERT_REVOKED, "revoked"),
    ("untrusted", Reason.CERT_UNTRUSTED, "trusted"),
])
def test_bad_certificates_are_refused_before_any_pin(store, card, vpcd_insert, pcscd,
                                                      variant, reason, words):
    _bridge, session = inserted(vpcd_insert, pcscd, card(variant))
    outcome = login_with_card(store, session, pin_provider=never_asked, provision=True)
    assert not outcome.ok and outcome.reason is reason, outcome
    assert words in outcome.message
    assert session.pin_retries() == 3  # no try spent
    [event] = card_events(store)
    assert event.outcome == "failure" and event.detail["reason"] == reason.value
    assert len(store.list_users()) == 3  # nobody provisioned
    session.close()


def test_card_pulled_out_mid_login(store, card, vpcd_insert, pcscd):
    bridge, session = inserted(vpcd_insert, pcscd, card("alice"))
    manager = CardSessionManager(lambda s: None)

    outcome = login_with_card(store, session, pin_provider=Pins(PIN, on_call=bridge.remove))
    assert not outcome.ok and outcome.reason is Reason.DEVICE_REMOVED, outcome
    assert outcome.message  # words for people
    with pytest.raises(ValueError):
        manager.start_session(outcome, reader=pcscd.reader(0), atr=b"")
    assert manager.sessions() == []
    [event] = store.list_events()  # the failure only: no use recorded
    assert (event.kind, event.outcome, event.detail["reason"]) == (
        "login.card", "failure", "device-removed")
    assert store.get_card_identity(ALICE_UUID).last_used_at is None
    session.close()
    # pcscd must see the reader empty before the next test inserts a card there (a card put
    # back into vpcd's reader right after one was pulled during a transaction can stay unseen)
    wait_for_card(pcscd.context, pcscd.reader(0), False)
    time.sleep(1.0)  # ... until pcscd has settled (seen here: a reinsertion within ~1 s unseen)


@pytest.mark.parametrize("allowed", [False, True])
def test_provisioning_on_first_use(store, card, vpcd_insert, pcscd, allowed):
    store.remove_card_identity(store.get_user("bob").id, uuid=BOB_UUID)
    set_card_setting(store, "card_provision_on_first_use", allowed)
    _bridge, session = inserted(vpcd_insert, pcscd, card("bob"))
    outcome = login_with_card(store, session, pin_provider=Pins(PIN))
    if not allowed:
        assert outcome.reason is Reason.UNKNOWN_USER and "not enrolled" in outcome.message
        assert store.get_user_by_card_uuid(BOB_UUID) is None
    else:
        assert outcome.ok and outcome.user == BOB_UUID and outcome.detail["provisioned"]
        user = store.get_user(BOB_UUID)
        assert user.display_name == "Dr Bob Jones"
        assert store.get_user_by_card_uuid(BOB_UUID).id == user.id
        assert store.list_events(kind="enrol.card")[0].detail["provisioned"] is True
    session.close()


# --- sessions bound to the card -----------------------------------------------------------------


class LockRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []
        self.called = threading.Event()

    def __call__(self, session) -> None:
        self.calls.append((time.monotonic(), session.user))
        self.called.set()


def login_and_bind(store, manager, session, reader):
    outcome = login_with_card(store, session, pin_provider=Pins(PIN))
    assert outcome.ok, outcome
    return manager.start_session(outcome, reader=reader, atr=session.atr)


def test_session_locks_when_the_card_is_removed(store, card, vpcd_insert, pcscd):
    from drivers.pcsc.readers import ReaderWatcher

    lock = LockRecorder()
    seen = []
    manager = CardSessionManager(lock, on_event=seen.append, store=store)
    reader = pcscd.reader(0)
    bridge, session = inserted(vpcd_insert, pcscd, card("alice"))
    with ReaderWatcher(manager.handle):
        bound = login_and_bind(store, manager, session, reader)
        assert bound.binding.uuid == ALICE_UUID and manager.session_for(reader) is bound
        session.close()
        removed_at = time.monotonic()
        bridge.remove()
        assert lock.called.wait(3.0), "the lock action did not start"
    after_removal_ms = (lock.calls[0][0] - removed_at) * 1000
    assert lock.calls[0][1] == "alice"
    assert bound.state == "ended" and bound.end_reason == "card-removed"
    [latency] = manager.lock_latencies_ms
    assert 0 <= latency < 100, latency  # watcher saw it -> lock started
    assert after_removal_ms < 1500, after_removal_ms  # pcscd's 400 ms poll dominates
    kinds = [e.kind for e in seen]
    assert kinds == ["session-started", "session-ended", "lock-started"], kinds
    assert seen[-1].latency_ms == latency
    [audit] = store.list_events(kind="session.lock")
    assert audit.detail["latency_ms"] == latency and audit.username == "alice"
    print(f"\nremoval -> lock started: {after_removal_ms:.1f} ms "
          f"(watcher saw it -> lock started: {latency:.2f} ms)")


def test_two_readers_two_cards(store, card, vpcd_insert, pcscd):
    from drivers.pcsc.readers import ReaderWatcher

    lock = LockRecorder()
    manager = CardSessionManager(lock)
    readers = [pcscd.reader(0), pcscd.reader(1)]
    bridge_a, session_a = inserted(vpcd_insert, pcscd, card("alice"), slot=0)
    bridge_b, session_b = inserted(vpcd_insert, pcscd, card("bob"), slot=1)
    with ReaderWatcher(manager.handle):
        alice = login_and_bind(store, manager, session_a, readers[0])
        bob = login_and_bind(store, manager, session_b, readers[1])
        assert (alice.user, bob.user) == ("alice", "bob")
        session_b.close()
        bridge_b.remove()
        assert lock.called.wait(3.0)
        assert [u for _, u in lock.calls] == ["bob"]
        assert bob.state == "ended" and alice.state == "active"
        assert [s.user for s in manager.sessions()] == ["alice"]
        session_a.close()


def test_lock_command_is_started_not_waited_for(tmp_path):
    from types import SimpleNamespace

    marker = tmp_path / "locked"
    manager = CardSessionManager(["sh", "-c", f"sleep 0.3; touch {marker}"])
    outcome = LoginOutcome(ok=True, method="card", user="alice", user_id="x",
                           credential_id="ab", detail={"uuid": ALICE_UUID})
    manager.start_session(outcome, reader="R", atr=b"\x3b")
    started = time.monotonic()
    manager.handle(SimpleNamespace(kind="card-removed", reader="R", atr=None, at=started))
    assert time.monotonic() - started < 0.2  # not waited for
    assert manager.lock_latencies_ms and manager.lock_latencies_ms[0] < 200
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()


def test_service_loss_suspends_then_rechecks_the_card():
    from types import SimpleNamespace

    present = {"R1": True, "R2": False}
    lock = LockRecorder()
    manager = CardSessionManager(lock, reprobe=lambda b: present[b.reader])
    for reader in ("R1", "R2"):
        manager.start_session(LoginOutcome(ok=True, method="card", user=reader, user_id=reader,
                                           credential_id="ab"), reader=reader, atr=b"\x3b")
    ev = lambda kind: SimpleNamespace(kind=kind, reader=None, atr=None, at=time.monotonic())  # noqa: E731
    manager.handle(ev("service-lost"))
    assert {s.state for s in manager.sessions()} == {"suspended"}
    assert not lock.called.is_set()  # a pcscd restart alone locks nobody out
    manager.handle(ev("service-back"))
    assert lock.called.wait(2.0)
    deadline = time.monotonic() + 2
    while any(s.state == "suspended" for s in manager.sessions()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(s.user, s.state) for s in manager.sessions()] == [("R1", "active")]
    assert [u for _, u in lock.calls] == ["R2"]
