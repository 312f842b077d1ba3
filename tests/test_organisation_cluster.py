"""Issue 15's organisation, every part a process of its own (tests/orgcluster.py): one
PostgreSQL database, two server replicas (`token-agent server run`), three workstation
services (`token-agent serve`, joined with a token), people's virtual keys and a virtual
card through pcscd. The cluster starts once for the module (about 10-20 s); each test
uses people of its own, so that the tests do not depend on each other's order, except
where a test says so.

People (each key a `sim key serve` process, PIN on unless said; "seen at" is which
workstations' services can reach it):

========  ==========================================  ======================
alice     password, authenticator app, key (ws1 enrols it over the socket)  ws1 ws2 ws3
bob       password, key                               ws2 ws3
carol     key; later a clone of its state             ws1 (clone: ws3)
dave      password (class external: no MFA)           -
gus       password (class external: no MFA)           -
shift00.. password (class external), 12 of them: SIGTERM  -
hana      key, authenticator app                      ws1 ws2 ws3
erin      password, a card (the card test: vpcd's reader, watched by ws3 only)
ian       password, authenticator app                 -
========  ==========================================  ======================

The policy: loopback is the trusted network (every workstation reaches the servers from
127.0.0.1), the password locks after 4 failures, offline logins for 12 hours (the outage
test takes keys out of the allowed second factors for a while, so that a key asks for a code).
"""

from __future__ import annotations

import shutil
import signal
import threading
import time

import pytest

from orgcluster import OrgCluster, start_cluster
from orgpeople import (PASSWORD, SHIFT, TOTP_PROMPT, alice_has_her_key, answering,
                       audit_intact, client_of, extra_workstation, forged_certificate_is_refused,
                       fresh_code, org_events, outbox_empty, people, wait_for,
                       wait_for_offline_codes)

WRONG_PASSWORD = "incorrect pony staple"
SERVER_CANNOT_BE_REACHED = "server cannot be reached"

KEYS_AT = {
    "ws1": ["alice", "carol", "hana"],
    "ws2": ["alice", "bob", "hana"],
    "ws3": ["alice", "bob", "hana"],
}

_started: dict[str, float] = {}


# --------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster(pg_server, pcscd, request) -> OrgCluster:  # pcscd first: ws3 watches its readers
    _started["module"] = time.monotonic()
    c = start_cluster(pg_server, ws_keys=KEYS_AT)
    _started["cluster_up"] = time.monotonic() - _started["module"]
    try:
        people(c)
        yield c
    finally:
        c.close()
        total = time.monotonic() - _started["module"]
        print(f"\norganisation cluster: up in {_started['cluster_up']:.1f} s "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in c.timings.items())}); "
              f"module {total:.1f} s")


@pytest.fixture(autouse=True)
def _logs_on_failure(request, cluster):
    """A failing test's report gets the replicas' and workstations' recent output."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed != failed or getattr(request.node, "_failed", False):
        print(cluster.logs())


# --------------------------------------------------------------------------- roaming


def test_roaming_enrol_at_ws1_log_in_at_ws2_and_ws3_without_a_second_factor(cluster):
    c = cluster
    ws1, ws2, ws3 = (c.workstations[n] for n in ("ws1", "ws2", "ws3"))
    with ws1.client() as conn:  # a multi-factor login first: changing methods needs one
        first = conn.login("alice", answering(password=PASSWORD, code=c.codes["alice"].next),
                           primary="password", step_up=True)
        assert first["ok"] and first["method"] == "password+totp", first
        with c.only_touching("alice"):  # she touches her own key, of those plugged in
            login = conn.request("enrol.key", user="alice", name="alice's key")["login"]
            enrolled = conn.run_ceremony(login, answering())
    assert enrolled["ok"] and enrolled["user"] == "alice", enrolled

    # her key at ws2, a ward PC she never used
    seen: list[str] = []
    outcome = ws2.login("alice", answering(seen=seen), primary="key")
    assert outcome["ok"] and outcome["method"] == "key", outcome
    assert outcome["multi_factor"] and outcome["session"]
    assert not any(TOTP_PROMPT in m for m in seen), seen
    # her password at ws3, new to her too: the password alone (no authenticator code asked),
    # as at a PC she uses every day; then her key there
    seen = []
    outcome = ws3.login("alice", answering(password=PASSWORD, seen=seen), primary="password")
    assert outcome["ok"] and outcome["method"] == "password", outcome
    assert not any(TOTP_PROMPT in m for m in seen), seen
    outcome = ws3.login("alice", answering(), primary="key")
    assert outcome["ok"] and outcome["method"] == "key", outcome
    assert org_events(c, "login.unusual", "alice") == []  # roaming is not unusual
    # the key's counter is the organisation's: each workstation's use advanced it
    with c.agent() as agent:
        [cred] = agent.store.list_fido_credentials(agent.store.get_user("alice").id)
        assert cred.sign_count >= 2 and not cred.flagged
    # the sessions are per workstation
    for ws in (ws2, ws3):
        with ws.client() as conn:
            sessions = conn.request("session.state", user="alice")["sessions"]
        assert sessions and all(s["state"] == "active" for s in sessions)
    audit_intact(c)


# --------------------------------------------------------------------------- one-time codes


def test_a_totp_code_used_at_ws1_is_refused_at_ws2(cluster):
    c = cluster
    code = c.codes["ian"].next()
    first = c.workstations["ws1"].login(
        "ian", answering(password=PASSWORD, code=code), primary="password", step_up=True)
    assert first["ok"] and first["method"] == "password+totp", first
    again = c.workstations["ws2"].login(
        "ian", answering(password=PASSWORD, code=code), primary="password", step_up=True)
    assert not again["ok"], again
    assert "already used" in again["message"] or again["reason"] == "code-replayed", again
    replays = [e for e in org_events(c, "verify.totp", "ian") if e.outcome != "success"]
    assert replays, "the replay at ws2 is in the organisation's audit"


# --------------------------------------------------------------------------- lockout


def test_failures_at_ws1_and_ws2_add_up_to_one_lockout(cluster):
    c = cluster
    ws1, ws2 = c.workstations["ws1"], c.workstations["ws2"]
    for ws in (ws1, ws2):  # dave works at both: familiar devices, counted together
        ok = ws.login("dave", answering(password=PASSWORD), primary="password")
        assert ok["ok"], ok
    reasons = []
    for ws in (ws1, ws2, ws1, ws2):  # 4 = password_max_failures
        out = ws.login("dave", answering(password=WRONG_PASSWORD), primary="password")
        assert not out["ok"]
        reasons.append(out["reason"])
    assert reasons[:3] == ["wrong-password"] * 3, reasons
    # the right password is refused now, at either workstation (at a PC dave never used,
    # failures and locks are counted apart: issue 11's "keeping the victim's way in")
    for ws in (ws1, ws2):
        locked = ws.login("dave", answering(password=PASSWORD), primary="password")
        assert not locked["ok"] and locked["reason"] in ("method-locked", "locked"), locked
    # one lock, the organisation's: an administrator's unlock on the server clears it
    c.admin("admin", "unlock", "dave")
    again = ws1.login("dave", answering(password=PASSWORD), primary="password")
    assert again["ok"], again


# --------------------------------------------------------------------------- clone detection


def test_a_cloned_key_used_at_ws3_after_the_genuine_key_at_ws1_is_suspended(cluster, tmp_path):
    c = cluster
    ws1, ws3 = c.workstations["ws1"], c.workstations["ws3"]
    genuine = c.keys["carol"]
    copied = tmp_path / "carol-clone.json"
    shutil.copy2(genuine.state, copied)  # the key's secrets and counter, copied
    for _ in range(2):  # the genuine key goes on being used at ws1
        out = ws1.login("carol", answering(), primary="key")
        assert out["ok"], out
    clone = c.key("carol-clone", state=copied)  # plugged in at ws3
    ws3.stop()
    ws3.keys.append(clone.address)
    text = ws3.config.read_text().replace(
        "simulators = [", f'simulators = ["{clone.address}", ', 1)
    ws3.config.write_text(text)
    ws3.start()
    try:
        out = ws3.login("carol", answering(), primary="key")
        assert not out["ok"] and out["reason"] in ("clone-suspected", "counter-regression"), \
            out
        [event] = org_events(c, "key.clone-suspected", "carol")
        assert event.detail["presented_count"] <= event.detail["stored_count"]
        # suspended for the whole organisation: the genuine key at ws1 is refused too
        after = ws1.login("carol", answering(), primary="key")
        assert not after["ok"], after
        with c.agent() as agent:
            [cred] = agent.store.list_fido_credentials(agent.store.get_user("carol").id)
            assert cred.flagged
    finally:
        ws3.stop()
        ws3.config.write_text(text.replace(f'"{clone.address}", ', "", 1))
        ws3.keys.remove(clone.address)
        c.keys.pop("carol-clone").stop()
        ws3.start()


# --------------------------------------------------------------------------- admin


def test_a_reset_of_methods_on_the_server_takes_effect_at_every_workstation(cluster):
    c = cluster
    for ws in c.workstations.values():
        out = ws.login("hana", answering(), primary="key")
        assert out["ok"], (ws.name, out)
    c.admin("admin", "reset-methods", "hana", "--yes")
    for ws in c.workstations.values():
        out = ws.login("hana", answering(), primary="key")
        assert not out["ok"], (ws.name, out)
    [reset] = org_events(c, "admin.reset-methods", "hana")
    assert reset.detail["removed"] == 2  # her key and her authenticator app


# --------------------------------------------------------------------------- failover


def test_a_replica_killed_mid_login_then_the_next_login_goes_to_the_other(cluster):
    c = cluster
    first, second = c.replicas
    ws1 = c.workstations["ws1"]
    logins_before = len(org_events(c, "login", "bob"))
    killed = threading.Event()

    def answer(event):  # the password prompt is asked by the server: kill it meanwhile
        if not killed.is_set():
            first.kill()
            killed.set()
        return PASSWORD

    try:
        outcome = c.workstations["ws2"].login("bob", answer, primary="password")
        assert killed.is_set()
        print(f"\nlogin with its replica killed mid-prompt: ok={outcome['ok']} "
              f"reason={outcome.get('reason')}")
        # completed on the other replica, or failed cleanly saying so
        assert outcome["ok"] or outcome["reason"] in ("server-lost", "server-unavailable"), \
            outcome
        if not outcome["ok"]:
            assert "server" in outcome["message"].lower()
        started = time.monotonic()
        nxt = c.workstations["ws2"].login("bob", answering(password=PASSWORD),
                                          primary="password")
        took = time.monotonic() - started
        assert nxt["ok"], nxt
        assert took < 3.0, f"the next login took {took:.1f} s (the dead replica tried first?)"
        assert first.health() is None and second.health()["ok"]
        with ws1.client() as conn:  # the other workstations too
            assert conn.login("dave", answering(password=PASSWORD), primary="password")["ok"]
        # nothing half-written: one login event per finished login, the chain intact
        successes = [e for e in org_events(c, "login", "bob")[: 10]
                     if e.outcome == "success"]
        assert len(org_events(c, "login", "bob")) - logins_before in (1, 2)
        assert successes
        audit_intact(c)
    finally:
        if not first.running:
            first.start()


# --------------------------------------------------------------------------- outage


def test_outage_offline_logins_then_the_queued_audit_arrives_once(cluster):
    """Both replicas stopped: ws2 logs alice in with her key (seen there before) and a code
    of her authenticator app checked against the precomputed hashes (the policy here takes
    no key as a second factor, so offline her key asks for a code); the same code again is
    refused; ws3 refuses bob, never seen there; a password is refused. The servers back:
    the queued events arrive, once, the audit verifies, and the code used offline is refused
    online too."""
    from orgcluster import default_policy

    c = cluster
    ws1, ws2, ws3 = (c.workstations[n] for n in ("ws1", "ws2", "ws3"))
    alice_has_her_key(c)
    c.policy.write_text(default_policy().replace(
        "[reverification]\n", "[reverification]\nmanaged_hours = 0.001\n") + OFFLINE_TOTP_POLICY)
    c.stop_replicas()
    c.start_replicas()
    # ws2 restarted (a PC switched on for the shift): its service fetches a user's code
    # hashes at most hourly, and alice logged in there under the other policy already
    ws2.stop()
    ws2.start()
    try:
        # online first: alice at ws2, her password alone (the trusted network: no second
        # factor asked, none on record here for the last 3.6 s); bob never at ws3
        assert ws2.login("alice", answering(password=PASSWORD), primary="password")["ok"]
        wait_for_offline_codes(ws2, "alice")
        before = {e.id for e in org_events(c, "login")}

        c.stop_replicas()
        code = fresh_code(c.codes["alice"])
        with c.only_touching("alice"):  # she touches her key, of the four plugged in at ws2
            seen: list[str] = []
            alice = ws2.login("alice", answering(code=code, seen=seen), primary="key")
            assert alice["ok"] and alice["method"] == "key+totp", \
                (alice.get("reason"), alice.get("message"), seen)
            assert alice["detail"].get("offline") is True
            replay = ws2.login("alice", answering(code=code), primary="key")
        assert not replay["ok"], replay  # each precomputed code once
        with c.only_touching("bob"):
            refused = ws3.login("bob", answering(), primary="key")
        assert not refused["ok"], refused
        password = ws2.login("alice", answering(password=PASSWORD), primary="password")
        assert not password["ok"]
        assert SERVER_CANNOT_BE_REACHED in password["message"].lower() and \
            "key or card" in password["message"], password
    finally:
        c.policy.write_text(default_policy())
        c.stop_replicas()
        c.start_replicas()

    def offline_events():
        return [e for e in org_events(c, "login") if e.id not in before
                and e.detail.get("offline") is True]

    wait_for(lambda: outbox_empty(ws2) and outbox_empty(ws3), timeout=40,
             what="ws2's and ws3's queued audit delivered")
    arrived = offline_events()
    # alice's key and code, the code again, the password (ws2), bob (ws3)
    assert len(arrived) >= 4, arrived
    # each once: the workstation's outbox delivered exactly once (seq per workstation)
    keys = [(e.detail.get("workstation"), e.detail.get("at"), e.user_id, e.outcome)
            for e in arrived]
    assert len(keys) == len(set(keys)), arrived
    assert {e.detail.get("workstation") for e in arrived} <= {"ws2", "ws3"}
    assert any(e.outcome == "success" for e in arrived)
    # a restart of ws2 delivers nothing twice
    count = len(offline_events())
    ws2.stop()
    ws2.start()
    time.sleep(12)  # more than one delivery round
    assert len(offline_events()) == count
    audit_intact(c)
    # the step used offline is the organisation's now: the same code is refused online
    online = ws1.login("alice", answering(password=PASSWORD, code=code), primary="password",
                       step_up=True)
    assert not online["ok"], online


#: for the outage test: no key satisfies MFA, and a second factor counts for 3.6 s only
#: where the network is unknown (offline), so a key login offline asks for a code
OFFLINE_TOTP_POLICY = '\n[methods]\nallowed = ["totp"]\n'


# --------------------------------------------------------------------------- cards


ERIN_UUID = "555000000005"
CARD_PIN = "739154"


def test_a_card_session_stays_at_its_workstation(cluster, pcscd, fresh_ca, tmp_path):
    """erin's card at ws3 (the virtual card through pcscd and vpcd): the card's
    certificate is validated on the server, the session is ws3's; her login at ws1 does not
    touch it, and pulling the card out locks it there, not her session at ws1."""
    from simulators.card.card import VirtualCard
    from simulators.card.issuance import issue_card
    from simulators.card.pcscd import insert_card, remove_card, wait_for_card
    from simulators.card.pki import issuing_cert_path, root_cert_path
    from token_agent.ceremonies.card import set_card_setting
    from token_agent.factors import password as password_factor

    c = cluster
    ws1, ws3 = c.workstations["ws1"], c.workstations["ws3"]
    card_file = tmp_path / "erin.card"
    issue_card(fresh_ca, name="Dr Erin Jones", uuid=ERIN_UUID, pin=CARD_PIN, out=card_file,
               algorithm="ECCP256")
    with c.agent() as agent:
        store = agent.store
        set_card_setting(store, "card_trust_anchors", [str(root_cert_path(fresh_ca))])
        set_card_setting(store, "card_intermediates", [str(issuing_cert_path(fresh_ca))])
        erin = store.add_user("erin", display_name="Dr Erin Jones")
        store.add_card_identity(erin.id, uuid=ERIN_UUID, holder_name="Dr Erin Jones")
        password_factor.set_password(agent.factors(), erin.id, PASSWORD)
    reader = pcscd.reader(0)
    bridge = insert_card(pcscd, VirtualCard.load(card_file), 0)
    try:
        wait_for_card(pcscd.context, reader, present=True)

        def ws3_sees_the_card() -> bool:
            with ws3.client() as conn:
                return bool(conn.request("hello")["service"]["readers"].get(reader))

        wait_for(ws3_sees_the_card, timeout=10, what="ws3's service sees the card")
        seen: list[str] = []
        at_ws3 = ws3.login("erin", lambda e: seen.append(e["message"]) or CARD_PIN,
                           primary="card")
        assert at_ws3["ok"] and at_ws3["method"] == "card", \
            (at_ws3.get("reason"), at_ws3.get("message"))
        assert seen == ["Enter the PIN for your card"]
        at_ws1 = ws1.login("erin", answering(password=PASSWORD), primary="password")
        assert at_ws1["ok"], at_ws1

        def sessions(ws) -> dict:
            with ws.client() as conn:
                return {s["id"]: s for s in conn.request("session.state",
                                                         user="erin")["sessions"]}

        assert sessions(ws3)[at_ws3["session"]]["state"] == "active"  # untouched by ws1
        assert at_ws3["session"] not in sessions(ws1)
        remove_card(bridge)
        bridge = None
        wait_for(lambda: sessions(ws3)[at_ws3["session"]]["state"] == "locked", timeout=10,
                 what="the card's session locked at ws3")
        assert sessions(ws3)[at_ws3["session"]]["end_reason"] == "card-removed"
        assert sessions(ws1)[at_ws1["session"]]["state"] == "active"
    finally:
        if bridge is not None:
            remove_card(bridge)
        wait_for_card(pcscd.context, reader, present=False)


# --------------------------------------------------------------------------- certificates


def test_certificates_revoked_expired_reused_and_another_workstations(cluster):
    from token_agent.organisation.client import ServerRefused

    c = cluster
    # a revoked workstation: its next request is refused
    ws4 = extra_workstation(c, "ws4")
    c.join(ws4)
    assert client_of(ws4).request("GET", "/v1/whoami")["workstation"] == "ws4"
    c.admin("server", "workstation-revoke", "ws4")
    with pytest.raises(ServerRefused) as info:
        client_of(ws4).request("GET", "/v1/whoami")
    assert info.value.status == 403 and info.value.error == "workstation-revoked"

    # an expired join token
    ws5 = extra_workstation(c, "ws5")
    token = c.join_token("ws5", hours=0.0003)  # about a second
    time.sleep(2.0)
    expired = c.join(ws5, token, check=False)
    assert expired.returncode != 0 and "expired" in (expired.stderr + expired.stdout).lower()

    # a join token used twice
    ws6, ws7 = extra_workstation(c, "ws6"), extra_workstation(c, "ws7")
    token = c.join_token("ws6")
    c.join(ws6, token)
    reused = c.join(ws7, token, check=False)
    assert reused.returncode != 0
    assert not (ws7.data / "organisation" / "workstation.pem").exists()

    # another workstation's certificate: useless without its key, and a look-alike
    # certificate (CN=ws1) from another CA is refused
    forged_certificate_is_refused(c, ws6)
    audit_intact(c)


# --------------------------------------------------------------------------- shutdown


def test_sigterm_with_logins_in_flight_leaves_nothing_half_written(cluster):
    c = cluster
    first = c.replicas[0]
    results: list[dict] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results.append(c.workstations[f"ws{1 + i % 3}"].login(
                f"shift{i:02d}", answering(password=PASSWORD), primary="password"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    before = {e.id for e in org_events(c, "login")}
    threads = [threading.Thread(target=one, args=(i,)) for i in range(SHIFT)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    code = first.stop(signal.SIGTERM, timeout=30)
    for t in threads:
        t.join(60)
    try:
        assert code == 0, f"the replica exited with {code}:\n{first.output()[-4000:]}"
        assert not errors, errors
        assert len(results) == SHIFT
        for r in results:
            assert r["ok"] or r["reason"] in ("server-lost", "server-unavailable"), r
        print(f"\nSIGTERM with {SHIFT} logins in flight: "
              f"{sorted((r['ok'], r.get('reason') or '') for r in results)}")
        # every login the workstations saw succeed is recorded whole; none twice (a login
        # whose answer was lost on the way may be recorded without the workstation knowing)
        recorded = [e for e in org_events(c, "login") if e.id not in before
                    and e.outcome == "success"]
        assert sum(1 for r in results if r["ok"]) <= len(recorded) <= len(results)
        audit_intact(c)
    finally:
        first.start()
    assert c.workstations["ws1"].login("gus", answering(password=PASSWORD),
                                       primary="password")["ok"]
