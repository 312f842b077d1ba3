"""The outbox of offline events and the server's ingest, on PostgreSQL (the organisation
server's store): exactly once whatever the retries and crashes, in order, the audit chain
intact, and the reconciliation (a key's counter that went backwards is a clone; an earlier
legitimate use is not; a TOTP step used offline is used online too)."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from token_agent.agent import Agent
from token_agent.ceremonies.key import enrol_key, login_with_key
from token_agent.factors import totp
from token_agent.organisation import offline, totpcache
from token_agent.organisation.cache import OfflineCache
from token_agent.organisation.ingest import IngestError, ingest
from token_agent.organisation.outbox import Deliverer, deliver
from token_agent.outcome import Reason
from token_agent.policy import DEFAULT_POLICY, parse_policy
from token_agent.store import Store

from key_helpers import PIN, Keyring
from offline_helpers import Interaction, oathtool

WS = "ws-1"


class Direct:
    """An OrgClient stand-in that hands the batch to ``ingest`` (what POST /v1/audit does)."""

    def __init__(self, agent, lose_answer=False):
        self.agent, self.lose_answer, self.calls = agent, lose_answer, 0

    def request(self, method, path, body=None):
        assert (method, path) == ("POST", "/v1/audit")
        self.calls += 1
        ack = ingest(self.agent, WS, body["events"])
        if self.lose_answer:  # committed on the server; the answer never arrives
            raise ConnectionResetError("connection reset by peer")
        return {"acknowledged": ack}


class Down:
    def request(self, method, path, body=None):
        raise ConnectionRefusedError("no server answers")


@pytest.fixture
def server(tmp_path, pg_url):
    data = tmp_path / "server"
    data.mkdir(mode=0o700)
    agent = Agent.open(data_dir=data, store=Store.open(pg_url), policy=DEFAULT_POLICY)
    agent.store.add_user("alice", display_name="Dr Alice Smith")
    yield agent
    agent.close()


@pytest.fixture
def keys(tmp_path):
    return Keyring(tmp_path)


@pytest.fixture
def cache(tmp_path):
    with OfflineCache.open(tmp_path / "ws") as c:
        yield c


@pytest.fixture
def alice_key(server, keys, cache):
    """alice's key (and its state file), her bundle cached at the workstation just now."""
    _, key, path = keys.new()
    result = enrol_key(server.store, key, "alice", pin_provider=lambda: PIN)
    cache.store_bundle(offline.bundle_for(server, "alice", WS), now=time.time())
    return key, result.credential_id, path


def key_login(cache, key, now=None, answers=()):
    return offline.login(cache, "alice", primary="key", interaction=Interaction(*answers),
                         key=key, key_pin=lambda: PIN, now=time.time() if now is None else now)


def offline_events(store):
    return [e for e in reversed(store.list_events(limit=1000)) if e.detail.get("offline")]


def test_delivered_once_in_order_and_the_audit_chain_is_intact(server, cache, alice_key):
    key, cred_id, _ = alice_key
    for _ in range(3):
        assert key_login(cache, key).ok
    queued = cache.pending()
    assert [e["seq"] for e in queued] == sorted(e["seq"] for e in queued) and len(queued) == 6
    report = deliver(cache, Direct(server), batch=4)  # two batches
    assert report.delivered == 6 and report.remaining == 0 and report.error is None
    assert cache.pending_count() == 0
    got = offline_events(server.store)
    assert [(e.kind, e.outcome) for e in got] == [(e["kind"], e["outcome"]) for e in queued]
    assert [e.detail["at"] for e in got] == [e["at"] for e in queued]
    assert all(e.detail["workstation"] == WS and e.user_id == server.store.get_user("alice").id
               for e in got)
    assert [e.id for e in got] == sorted(e.id for e in got)  # recorded in the queue's order
    assert server.store.delivered_seqs(WS) == [e["seq"] for e in queued]
    assert server.store.verify_events() == len(server.store.list_events(limit=10000))
    # the counter the key reached offline is the server's now
    assert server.store.get_fido_credential(cred_id).sign_count == \
        max(e["detail"]["sign_count"] for e in queued if e["kind"] == "login.key")


def test_the_same_batch_delivered_twice_is_recorded_once(server, cache, alice_key):
    key, _, _ = alice_key
    assert key_login(cache, key).ok
    batch = cache.pending()
    last = batch[-1]["seq"]
    assert ingest(server, WS, batch) == last
    before = len(server.store.list_events(limit=1000))
    assert ingest(server, WS, batch) == last  # acknowledged again, nothing written
    assert ingest(server, WS, list(reversed(batch))) == last
    assert len(server.store.list_events(limit=1000)) == before
    assert server.store.verify_events() == before


def test_a_crash_between_the_servers_commit_and_the_delete_does_not_double(server, cache,
                                                                          alice_key):
    key, _, _ = alice_key
    assert key_login(cache, key).ok
    assert key_login(cache, key).ok
    lost = Direct(server, lose_answer=True)
    report = deliver(cache, lost, attempts=2, sleep=lambda s: None)
    assert report.delivered == 0 and report.remaining == 4
    assert "ConnectionResetError" in report.error
    assert lost.calls == 2  # retried
    assert len(offline_events(server.store)) == 4  # recorded once by the first call
    report = deliver(cache, Direct(server))
    assert report.delivered == 4 and cache.pending_count() == 0
    assert len(offline_events(server.store)) == 4
    assert server.store.verify_events() > 0


def test_no_server_keeps_the_events_queued(server, cache, alice_key):
    key, _, _ = alice_key
    assert key_login(cache, key).ok
    report = deliver(cache, Down(), attempts=3, sleep=lambda s: None)
    assert report.delivered == 0 and report.remaining == 2 and "ConnectionRefused" in report.error


def test_two_replicas_receiving_the_same_batch_at_once_record_it_once(server, cache, alice_key,
                                                                      pg_url, tmp_path):
    key, _, _ = alice_key
    for _ in range(5):
        assert key_login(cache, key).ok
    batch = cache.pending(100)
    replicas = [server] + [Agent.open(data_dir=tmp_path / "server", store=Store.open(pg_url),
                                      policy=DEFAULT_POLICY) for _ in range(2)]
    start = threading.Barrier(len(replicas))
    acks, errors = [], []

    def run(agent):
        start.wait()
        try:
            acks.append(ingest(agent, WS, batch))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(a,)) for a in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for agent in replicas[1:]:
        agent.close()
    assert errors == [] and acks == [batch[-1]["seq"]] * 3
    assert len(offline_events(server.store)) == len(batch)
    assert server.store.verify_events() > 0


def test_a_malformed_event_is_recorded_as_rejected_and_a_bad_batch_refused(server):
    events = [{"seq": 1, "kind": "login", "outcome": "success", "detail": {"pin": "1234"},
               "at": 1.0},
              {"seq": 2, "kind": "NOT A KIND", "outcome": "success", "at": 2.0}]
    assert ingest(server, WS, events) == 2
    got = offline_events(server.store)
    assert [e.kind for e in got] == ["offline.rejected", "offline.rejected"]
    assert "1234" not in repr([e.detail for e in got])  # the secret-looking detail is not kept
    before = len(server.store.list_events(limit=1000))
    for bad in ("nope", [{"seq": 0}], [{"seq": "3"}], [{"seq": 3}, {"seq": 3}], [1]):
        with pytest.raises(IngestError):
            ingest(server, WS, bad)
    assert len(server.store.list_events(limit=1000)) == before
    assert ingest(server, WS, []) == 0


def test_a_counter_that_went_backwards_flags_the_key(server, cache, alice_key, keys, tmp_path):
    key, cred_id, path = alice_key
    clone_state = tmp_path / "clone.json"
    shutil.copy(path, clone_state)  # someone copies the key (its secret and its counter)
    _, clone, _ = keys.new(state=clone_state, pin=None)
    online = login_with_key(server.store, key, username="alice", pin_provider=lambda: PIN)
    assert online.ok
    stored = server.store.get_fido_credential(cred_id)
    # later, the clone at a workstation without a server: its counter is the original's
    # last one, higher than the cached one, so the workstation cannot tell
    out = key_login(cache, clone, now=time.time() + 5)
    assert out.ok and out.detail["sign_count"] <= stored.sign_count
    deliver(cache, Direct(server))
    flagged = server.store.get_fido_credential(cred_id)
    assert flagged.flagged and "possibly a cloned key" in flagged.flag_reason
    assert flagged.sign_count == stored.sign_count
    [event] = server.store.list_events(kind="key.clone-suspected")
    assert event.detail["workstation"] == WS and event.detail["offline"] is True
    assert event.detail["presented_count"] == out.detail["sign_count"]
    again = login_with_key(server.store, key, username="alice", pin_provider=lambda: PIN)
    assert not again.ok and again.reason is Reason.CREDENTIAL_FLAGGED
    assert server.store.verify_events() > 0


def test_an_earlier_offline_use_delivered_late_is_not_a_clone(server, cache, alice_key):
    key, cred_id, _ = alice_key
    out = key_login(cache, key, now=time.time() - 60)  # offline first (not delivered)...
    assert out.ok
    online = login_with_key(server.store, key, username="alice", pin_provider=lambda: PIN)
    assert online.ok  # ...then online, with a higher counter
    deliver(cache, Direct(server))
    cred = server.store.get_fido_credential(cred_id)
    assert not cred.flagged and cred.sign_count == online.detail["sign_count"]
    assert server.store.list_events(kind="key.clone-suspected") == []
    assert [e.kind for e in offline_events(server.store)] == ["login.key", "login"]


def test_a_totp_step_used_offline_cannot_be_used_online(server, cache, keys):
    server.policy = parse_policy('[methods]\nallowed = ["totp"]\n')  # the key is not enough
    _, key, _ = keys.new()
    enrol_key(server.store, key, "alice", pin_provider=lambda: PIN)
    alice = server.store.get_user("alice")
    ctx = server.factors()
    enrolment = totp.begin_enrol(ctx, alice.id)
    assert totp.confirm_enrol(ctx, alice.id, oathtool(enrolment.secret, time.time() - 30)).ok
    now = time.time()
    cache.store_bundle(offline.bundle_for(server, "alice", WS), now=now)
    cache.store_totp("alice", totpcache.hashes_for(server, alice), now=now)
    code = oathtool(enrolment.secret, now)
    out = key_login(cache, key, now=now, answers=[code])
    assert out.ok and out.detail["second"] == "totp", out
    deliver(cache, Direct(server))
    [method] = server.store.list_methods(alice.id, "totp")
    assert server.store.totp_credential(method.id)["last_step"] == int(now // 30)
    online = totp.verify(ctx, alice.id, code)
    assert not online.ok and online.reason is Reason.CODE_REPLAYED


def test_the_deliverer_thread_empties_the_outbox(server, cache, alice_key):
    key, _, _ = alice_key
    assert key_login(cache, key).ok
    deliverer = Deliverer(cache, lambda: Direct(server), interval=0.05).start()
    try:
        deadline = time.monotonic() + 10
        while cache.pending_count() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        deliverer.stop()
    assert cache.pending_count() == 0 and len(offline_events(server.store)) == 2


def test_a_clone_caught_at_the_workstation_is_suspended_on_the_server(server, cache, alice_key,
                                                                      keys, tmp_path):
    key, cred_id, path = alice_key
    clone_state = tmp_path / "clone.json"
    shutil.copy(path, clone_state)
    _, clone, _ = keys.new(state=clone_state, pin=None)
    assert key_login(cache, key).ok
    out = key_login(cache, clone)  # the workstation's cached counter catches this one
    assert not out.ok and out.reason is Reason.CLONE_SUSPECTED
    deliver(cache, Direct(server))
    cred = server.store.get_fido_credential(cred_id)
    assert cred.flagged and "at workstation ws-1 (offline)" in cred.flag_reason
    assert [e.detail["workstation"] for e in
            server.store.list_events(kind="key.clone-suspected")] == [WS]


def test_a_workstation_cannot_move_a_counter_or_suspend_a_key_by_saying_so(server, cache,
                                                                          alice_key):
    key, cred_id, _ = alice_key
    assert key_login(cache, key).ok
    genuine = next(e for e in cache.pending() if e["kind"] == "login.key")
    proof = genuine["detail"]["assertion"]
    stored = server.store.get_fido_credential(cred_id).sign_count
    alice = server.store.get_user("alice").id
    forged_sig = dict(proof, signature=proof["signature"][:-8] + "AAAAAAA=")
    base = {"user_id": alice, "username": "alice", "credential_id": cred_id.hex(),
            "at": time.time() + 60}
    events = [
        # a counter pushed up (the genuine key's next login would then look like a clone)
        {**base, "seq": 1, "kind": "login.key", "outcome": "success",
         "detail": {"sign_count": 4_000_000_000}},
        {**base, "seq": 2, "kind": "login.key", "outcome": "success",
         "detail": {"sign_count": 4_000_000_000, "assertion": forged_sig}},
        # a key suspended by a claim
        {**base, "seq": 3, "kind": "key.clone-suspected", "outcome": "refused",
         "detail": {"stored_count": 10, "presented_count": 1}},
        {**base, "seq": 4, "kind": "key.clone-suspected", "outcome": "refused",
         "detail": {"assertion": forged_sig}},
    ]
    assert ingest(server, WS, events) == 4
    cred = server.store.get_fido_credential(cred_id)
    assert cred.sign_count == stored and not cred.flagged
    assert len(offline_events(server.store)) == 4  # recorded all the same, for the auditor
    # the genuine event still counts
    assert ingest(server, WS, [{**genuine, "seq": 5}]) == 5
    assert server.store.get_fido_credential(cred_id).sign_count == \
        genuine["detail"]["sign_count"] > stored


def test_a_workstation_cannot_consume_an_apps_future_codes(server):
    alice = server.store.get_user("alice")
    ctx = server.factors()
    enrolment = totp.begin_enrol(ctx, alice.id)
    assert totp.confirm_enrol(ctx, alice.id, oathtool(enrolment.secret, time.time() - 30)).ok
    [method] = server.store.list_methods(alice.id, "totp")
    before = server.store.totp_credential(method.id)["last_step"]
    future = int(time.time() // 30) + 100
    ingest(server, WS, [{"seq": 1, "kind": "verify.totp", "outcome": "success",
                         "user_id": alice.id, "at": time.time(),
                         "detail": {"method_id": method.id, "step": future}}])
    assert server.store.totp_credential(method.id)["last_step"] == before
    assert totp.verify(ctx, alice.id, oathtool(enrolment.secret, time.time())).ok
