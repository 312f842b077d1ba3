"""The offline routes of the organisation's server (token_agent/orgserver/sync.py) over real
TLS, against `token-agent server run` in its own process on PostgreSQL, with a workstation
joined by a real token: POST /v1/audit (the outbox delivered exactly once), POST
/v1/offline/totp, GET /v1/offline/trust, and who may use them."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request

import pytest

from orgtest import join_workstation, org_server  # noqa: F401  (fixture)
from token_agent.agent import Agent
from token_agent.ceremonies.key import enrol_key
from token_agent.factors import totp
from token_agent.organisation import offline, totpcache
from token_agent.organisation.cache import OfflineCache
from token_agent.organisation.errors import ServerRefused
from token_agent.organisation.outbox import deliver
from token_agent.policy import DEFAULT_POLICY
from token_agent.store import Store

from key_helpers import PIN, Keyring
from offline_helpers import Interaction, oathtool


@pytest.fixture
def admin(org_server):
    """The organisation's store, as the server's own data directory (its key file) sees it."""
    agent = Agent.open(data_dir=org_server.base / "data", store=Store.open(org_server.store_url),
                       policy=DEFAULT_POLICY)
    agent.store.add_user("alice", display_name="Dr Alice Smith")
    yield agent
    agent.close()


@pytest.fixture
def ws(org_server, tmp_path):
    return join_workstation(tmp_path / "ws1", org_server, "ws1")


def offline_events(store):
    return [e for e in reversed(store.list_events(limit=1000)) if e.detail.get("offline")]


def post(url, path, body, ca, timeout=10):
    """A request with the organisation's CA but no client certificate."""
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(ca)),
                                    timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_outbox_is_delivered_once_over_tls(org_server, admin, ws, tmp_path):
    keys = Keyring(tmp_path)
    _, key, _ = keys.new()
    enrol_key(admin.store, key, "alice", pin_provider=lambda: PIN)
    with OfflineCache.open(ws.org_dir) as cache:
        cache.store_bundle(offline.bundle_for(admin, "alice", "ws1"), now=time.time())
        for _ in range(2):
            assert offline.login(cache, "alice", primary="key", interaction=Interaction(),
                                 key=key, key_pin=lambda: PIN).ok
        batch = cache.pending()
        client = ws.client()
        report = deliver(cache, client)
        assert report.delivered == 4 and report.remaining == 0, report
        got = offline_events(admin.store)
        assert [(e.kind, e.detail["workstation"]) for e in got] == \
            [(e["kind"], "ws1") for e in batch]
        # the same batch again (a lost answer): acknowledged, not recorded twice
        assert client.request("POST", "/v1/audit", {"events": batch}) == \
            {"acknowledged": batch[-1]["seq"]}
        assert len(offline_events(admin.store)) == 4
        assert admin.store.verify_events() == len(admin.store.list_events(limit=1000))
        verified = json.loads(org_server.cli("audit", "verify", "--json").stdout)
        assert verified["intact"] is True and verified["events"] == \
            len(admin.store.list_events(limit=1000))
        with pytest.raises(ServerRefused) as refused:
            client.request("POST", "/v1/audit", {"events": [{"seq": "one"}]})
        assert refused.value.status == 400 and refused.value.error == "bad-request"
        with pytest.raises(ServerRefused) as refused:
            client.request("POST", "/v1/audit", {"nothing": []})
        assert refused.value.status == 400


def test_without_a_joined_workstations_certificate_nothing_is_recorded(org_server, admin, ws):
    event = {"seq": 1, "kind": "login", "outcome": "success", "at": time.time()}
    status, body = post(org_server.url, "/v1/audit", {"events": [event]}, org_server.ca_file)
    assert status == 403 and body["error"] == "client-certificate-required"
    org_server.revoke("ws1")
    with pytest.raises(ServerRefused) as refused:
        ws.client().request("POST", "/v1/audit", {"events": [event]})
    assert refused.value.status == 403 and refused.value.error == "workstation-revoked"
    with pytest.raises(ServerRefused):
        ws.client().request("GET", "/v1/offline/trust")
    assert offline_events(admin.store) == []


def test_totp_hashes_only_for_a_user_who_logged_in_at_this_workstation(org_server, admin, ws):
    alice = admin.store.get_user("alice")
    ctx = admin.factors()
    enrolment = totp.begin_enrol(ctx, alice.id)
    assert totp.confirm_enrol(ctx, alice.id, oathtool(enrolment.secret, time.time() - 30)).ok
    client = ws.client(timeout=60)
    for user in ("alice", "nobody"):  # alice never logged in at ws1; nobody does not exist
        with pytest.raises(ServerRefused) as refused:
            client.request("POST", "/v1/offline/totp", {"user": user})
        assert refused.value.status == 404 and refused.value.error == "unknown-user"
    admin.store.record_sighting(alice.id, "device", "ws1", time.time())  # an online login there
    started = time.monotonic()
    hashes = client.request("POST", "/v1/offline/totp", {"user": "alice"})
    took = time.monotonic() - started
    [app] = hashes["apps"]
    assert enrolment.secret not in json.dumps(hashes)
    now = time.time() + 3 * 3600
    code = oathtool(enrolment.secret, now)
    assert totpcache.match(app, code, now=now, last_step=-1)[0] == totpcache.OK
    assert took < 30, took  # 12 h of steps, each a slow hash


def test_the_card_trust_is_served(org_server, admin, ws, tmp_path):
    from simulators.card.pki import init_ca, root_cert_path
    from token_agent.ceremonies.card import set_card_setting

    ca = tmp_path / "ca"
    init_ca(ca)
    set_card_setting(admin.store, "card_trust_anchors", [root_cert_path(ca).read_text()])
    trust = ws.client().request("GET", "/v1/offline/trust")
    assert [a.strip() for a in trust["settings"]["card_trust_anchors"]] == \
        [root_cert_path(ca).read_text().strip()]
    assert trust["crls"] == [] and trust["settings"]["card_on_unreachable_crl"] == "refuse"


def test_after_an_online_login_the_workstation_keeps_what_offline_needs(org_server, admin, ws,
                                                                        tmp_path):
    from simulators.card.pki import init_ca, root_cert_path
    from token_agent.ceremonies.card import set_card_setting

    admin.store.set_setting("user_verification", "discouraged")  # a key alone: one factor
    alice = admin.store.get_user("alice")
    ctx = admin.factors()
    enrolment = totp.begin_enrol(ctx, alice.id)
    assert totp.confirm_enrol(ctx, alice.id, oathtool(enrolment.secret, time.time() - 30)).ok
    init_ca(tmp_path / "ca")
    set_card_setting(admin.store, "card_trust_anchors", [str(root_cert_path(tmp_path / "ca"))])
    admin.store.add_card_identity(alice.id, uuid="555123456789", holder_name="Dr Alice Smith")
    admin.store.record_sighting(alice.id, "device", "ws1", time.time())
    bundle = offline.bundle_for(admin, "alice", "ws1")
    with OfflineCache.open(ws.org_dir) as cache:
        assert offline.after_online_login(cache, ws.client(timeout=60), bundle) == []
        assert cache.bundle("alice")["user"]["id"] == alice.id
        assert len(cache.totp("alice")["apps"]) == 1
        assert cache.trust()["settings"]["card_trust_anchors"][0].startswith("-----BEGIN")
        org_server.stop()  # no server: the bundle is kept, the fetches say why they failed
        problems = offline.after_online_login(cache, ws.client(timeout=2), bundle)
        assert len(problems) == 2 and all("cannot be reached" in p for p in problems)
        assert cache.bundle("alice") is not None and cache.totp("alice") is not None


def test_a_body_too_large_is_refused_unread(org_server, admin, ws):
    from token_agent.orgserver.sync import MAX_AUDIT_BODY

    client = ws.client(timeout=30)
    huge = [{"seq": 1, "kind": "login", "outcome": "success",
             "detail": {"note": "x" * (MAX_AUDIT_BODY + 10)}}]
    with pytest.raises(ServerRefused) as refused:
        client.request("POST", "/v1/audit", {"events": huge})
    assert refused.value.status == 413 and refused.value.error == "too-large"
    with pytest.raises(ServerRefused) as refused:
        client.request("POST", "/v1/offline/totp", {"user": "a" * 5000})
    assert refused.value.status == 413
    assert offline_events(admin.store) == []
