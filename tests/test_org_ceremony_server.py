"""The ceremony channel over the real server: `token-agent server run` (separate processes,
real TLS with the workstation's certificate, WebSocket /v1/ceremony) on PostgreSQL, the
workstation's relay in this process with the virtual key over HID framing."""

from __future__ import annotations

import contextlib
import threading

import pytest

from drivers.pcsc import errors as card_errors
from token_agent.organisation import protocol
from token_agent.organisation.errors import ServerUnavailable
from token_agent.organisation.relay import relay_with_failover
from token_agent.outcome import Factor, Reason
from token_agent.store import Store

from key_helpers import PIN, Keyring
from orgtest import join_workstation, org_server, start_org_server  # noqa: F401 (fixture)
from test_pam import pam_service, pam_services, pam_stack, pamtester, sockdir  # noqa: F401
from test_service import socket_dir  # noqa: F401 (fixture)

PASSWORD = "correct horse battery staple"


class Person:
    def __init__(self, *answers, key_pin=PIN, gate: threading.Event | None = None) -> None:
        self.answers, self.asked, self.told = list(answers), [], []
        self._pin, self.gate, self.waiting = key_pin, gate, threading.Event()

    def info(self, message):
        self.told.append(message)

    show_qr = info

    def secret(self, prompt):
        self.asked.append(prompt)
        if self.gate is not None:
            self.waiting.set()
            self.gate.wait(30)
        return self.answers.pop(0) if self.answers else None

    text = secret

    def choose(self, prompt, options, default):
        return default

    def key_pin(self):
        self.asked.append("key PIN")
        return self._pin

    def touch(self):
        self.told.append("touch")


def key_opener(key):
    return lambda rp_id, ids, timeout, cancel, on_touch: contextlib.nullcontext(key)


def no_card(timeout, cancel):
    raise card_errors.NoCard()


@pytest.fixture
def org(tmp_path, pg_url, org_server):
    store = Store.open(pg_url)
    store.add_user("bob", display_name="Dr Bob Jones")
    ws = join_workstation(tmp_path / "ws1", org_server, "ws1")
    yield org_server, ws, store
    store.close()


def test_enrol_and_log_in_with_a_key_through_the_real_server(org, tmp_path):
    server, ws, store = org
    _, key, _ = Keyring(tmp_path).new()
    client = ws.client()
    # bob's first method needs no login; the server records it
    enrolled = relay_with_failover(client, protocol.enrol_key_request(user="bob", name="blue",
                                                                      ticket=None),
                                   Person(), key_opener(key), no_card)
    assert enrolled.result["ok"], enrolled.result
    [before] = store.list_fido_credentials(store.get_user("bob").id)
    person = Person()
    relayed = relay_with_failover(client, protocol.login_request(user="bob", primary="key"),
                                  person, key_opener(key), no_card)
    outcome = relayed.outcome
    assert outcome.ok and outcome.user == "bob", outcome
    assert set(outcome.factors) == {Factor.POSSESSION, Factor.KNOWLEDGE}
    assert person.asked == ["key PIN"] and relayed.ticket
    # the server's store holds it all: the credential's counter, the audit, the sighting
    [cred] = store.list_fido_credentials(store.get_user("bob").id)
    assert cred.sign_count > before.sign_count and cred.last_used_at is not None
    events = [e for e in store.list_events(kind="login") if e.outcome == "success"]
    assert events and events[0].detail["device"] == "managed"
    from token_agent import sightings

    assert sightings.seen(store, store.get_user("bob").id, "device", "ws1")
    # tap-and-go
    relayed = relay_with_failover(client, protocol.login_request(user=None), Person(),
                                  key_opener(key), no_card)
    assert relayed.outcome.ok and relayed.outcome.user == "bob", relayed.outcome


def test_a_malformed_first_message_over_the_socket(org):
    server, ws, store = org
    channel = ws.client().connect("/v1/ceremony")
    try:
        channel.send({"op": "login", "user": "bob", "pin": "1234"})
        final = channel.recv(timeout=10)
    finally:
        channel.close()
    assert final["error"]["type"] == "protocol" and "pin" in final["error"]["message"]


def test_a_revoked_workstation_is_refused_and_gets_no_login(org):
    server, ws, store = org
    server.revoke("ws1")
    relayed = relay_with_failover(ws.client(), protocol.login_request(user="bob"), Person(),
                                  key_opener(None), no_card)
    assert not relayed.outcome.ok and relayed.outcome.reason is Reason.SERVER_UNAVAILABLE
    assert relayed.outcome.detail["refused"] == "workstation-revoked"
    assert "revoked" in relayed.outcome.message or "refuses" in relayed.outcome.message


def test_a_replica_killed_after_the_person_answered_fails_the_login_cleanly(tmp_path, pg_url):
    first = start_org_server(tmp_path / "s1", pg_url)
    second = start_org_server(tmp_path / "s2", pg_url, server_dir=first.server_dir)
    try:
        store = Store.open(pg_url)
        from token_agent.factors import password as password_factor
        from token_agent.agent import Agent

        agent = Agent.open(tmp_path / "agent", store=store, environ={})
        carol = store.add_user("carol")
        password_factor.set_password(agent.factors(), carol.id, PASSWORD)
        ws = join_workstation(tmp_path / "ws1", first, "ws1", servers=[first.url, second.url])
        gate = threading.Event()
        person = Person(PASSWORD, gate=gate)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=relay_with_failover(
            ws.client(), protocol.login_request(user="carol"), person, key_opener(None),
            no_card)))
        t.start()
        assert person.waiting.wait(20), "the password was never asked"
        first.kill()  # the replica that asked dies while the person types
        gate.set()
        t.join(30)
        outcome = result["r"].outcome
        assert not outcome.ok and outcome.reason is Reason.SERVER_LOST, outcome
        assert person.asked == ["Password"]  # not asked again on the other replica
        assert not [e for e in store.list_events(kind="login") if e.outcome == "success"]
        # the next login goes to the other replica
        relayed = relay_with_failover(ws.client(), protocol.login_request(user="carol"),
                                      Person(PASSWORD), key_opener(None), no_card)
        assert relayed.outcome.reason is not Reason.SERVER_LOST  # answered (the policy decides)
        assert relayed.outcome.reason is not Reason.SERVER_UNAVAILABLE
        # no replica: the caller's offline path
        second.stop()
        with pytest.raises(ServerUnavailable):
            relay_with_failover(ws.client(), protocol.login_request(user="carol"), Person(),
                                key_opener(None), no_card)
        store.close()
    finally:
        first.kill()
        second.kill()


# --------------------------------------------------------------------------- the service


def _service_at_ws1(tmp_path, pg_url, org_server, sim_key_server, socket_dir):
    """alice in the organisation's store (no method yet), and ws1 joined to ``org_server``
    with its service started on the virtual key: (store, workstation, service)."""
    from conftest import environ_for_agent
    from test_service import ServiceProcess, set_key_pin

    set_key_pin(sim_key_server)
    store = Store.open(pg_url)
    store.add_user("alice", display_name="Dr Alice Smith")
    sock = socket_dir / "svc.sock"
    ws = join_workstation(tmp_path / "ws1", org_server, "ws1", extra_config=(
        f'[keys]\nsimulators = ["{sim_key_server.address}"]\ntimeout = 10\n'
        f'[service]\nsocket = "{sock}"\nprompt_timeout = 30\n[cards]\nlock_command = "true"\n'))
    svc = ServiceProcess(ws.config, sock, ws.data_dir, tmp_path / "svc.log",
                         {**environ_for_agent(), "PYTHONUNBUFFERED": "1"}).start()
    return store, ws, svc


def test_the_workstation_service_logs_in_through_the_organisation(tmp_path, pg_url, org_server,
                                                                  sim_key_server, socket_dir):
    """`token-agent serve` with [organisation] servers: the socket API unchanged for its
    callers; the key enrolled and used through the server; the session kept here; the local
    ops on methods refused in one sentence; no server: server-unavailable."""
    from test_service import KEY_PIN
    from token_agent.service.client import ServiceError, answers

    store, ws, svc = _service_at_ws1(tmp_path, pg_url, org_server, sim_key_server, socket_dir)
    try:
        with svc.client() as c:
            login = c.request("enrol.key", user="alice", name="blue key")["login"]
            enrolled = c.run_ceremony(login, answers(KEY_PIN, KEY_PIN))
            assert enrolled["ok"] and enrolled["name"] == "blue key", enrolled
            outcome = c.login("alice", answers(KEY_PIN), primary="key")
            assert outcome["ok"] and outcome["user"] == "alice" and outcome["session"], outcome
            assert outcome["multi_factor"]
            sessions = c.request("session.state", user="alice")["sessions"]
            assert [s["id"] for s in sessions] == [outcome["session"]]
            with pytest.raises(ServiceError) as refused:
                c.request("methods.list", user="alice")
            assert refused.value.code == "forbidden"
            assert "organisation" in refused.value.message
        # the server recorded both, and knows the key
        assert [c.name for c in store.list_fido_credentials(store.get_user("alice").id)] == \
            ["blue key"]
        org_server.stop()
        with svc.client() as c:
            down = c.login("alice", answers(KEY_PIN), primary="password")
        assert not down["ok"] and down["reason"] == "server-unavailable", down
        assert down["message"] == "The organisation's server cannot be reached; use your key " \
                                  "or card."
        assert KEY_PIN not in svc.output()
    finally:
        svc.stop()
        store.close()


def test_a_card_login_through_the_real_server(org, tmp_path):
    """The card's certificate validated by the server with the organisation's trust, its
    PIN asked and verified at the workstation, its signature checked by the server."""
    import os
    import shutil

    from drivers.pcsc.piv import PivSession
    from simulators.card.card import InProcessCardConnection, VirtualCard
    from simulators.card.issuance import issue_card
    from simulators.card.pki import init_ca, issuing_cert_path, root_cert_path
    from token_agent.ceremonies.card import set_card_setting

    server, ws, store = org
    ca = tmp_path / "ca"
    init_ca(ca)
    card = tmp_path / "bob.card"
    issue_card(ca, name="Dr Bob Jones", uuid="555987654321", pin="4321", out=card)
    os.chmod(card, 0o600)
    set_card_setting(store, "card_trust_anchors", [str(root_cert_path(ca))])
    set_card_setting(store, "card_intermediates", [str(issuing_cert_path(ca))])
    store.add_card_identity(store.get_user("bob").id, uuid="555987654321",
                            holder_name="Dr Bob Jones")

    @contextlib.contextmanager
    def card_opener(timeout, cancel):
        connection = InProcessCardConnection(VirtualCard.load(card))
        connection.connect()
        yield PivSession(connection)

    class CardPerson(Person):
        def card_pin(self):
            self.asked.append("card PIN")
            return "4321"

    person = CardPerson()
    relayed = relay_with_failover(ws.client(), protocol.login_request(user=None, primary="card"),
                                  person, key_opener(None), card_opener)
    assert relayed.outcome.ok and relayed.outcome.user == "bob", relayed.outcome
    assert relayed.outcome.method == "card" and person.asked == ["card PIN"]
    assert [e.outcome for e in store.list_events(kind="login.card")] == ["success"]


def test_the_service_logs_in_offline_with_the_key_when_no_server_answers(
        tmp_path, pg_url, org_server, sim_key_server, socket_dir):
    """Online first (the server's bundle kept in the offline cache), then no server: the key
    logs alice in offline (offline.login, called by service/org.py), a password
    is refused with the sentence, and once the server is back the queued audit arrives."""
    from test_service import KEY_PIN
    from token_agent.service.client import answers

    store, ws, svc = _service_at_ws1(tmp_path, pg_url, org_server, sim_key_server, socket_dir)
    try:
        with svc.client() as c:
            login = c.request("enrol.key", user="alice", name="blue key")["login"]
            assert c.run_ceremony(login, answers(KEY_PIN, KEY_PIN))["ok"]
            assert c.login("alice", answers(KEY_PIN), primary="key")["ok"]
        org_server.stop()
        with svc.client() as c:
            offline = c.login("alice", answers(KEY_PIN), primary="key")
            refused = c.login("alice", answers(PASSWORD), primary="password")
        assert offline["ok"] and offline["user"] == "alice", offline
        assert offline["session"] and offline["multi_factor"]
        assert refused["reason"] == "server-unavailable"
        assert refused["message"] == "The organisation's server cannot be reached; use your " \
                                     "key or card."
        # the server back (same address): the next contact delivers the offline audit, once
        back = start_org_server(tmp_path / "back", pg_url, server_dir=org_server.server_dir,
                                port=org_server.port)
        try:
            with svc.client() as c:
                assert c.login("alice", answers(KEY_PIN), primary="key")["ok"]
            import time

            deadline = time.monotonic() + 30
            while True:
                offline_events = [e for e in store.list_events(limit=1000)
                                  if e.detail.get("offline") is True]
                if len(offline_events) >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            kinds = sorted((e.kind, e.outcome) for e in offline_events)
            assert ("login", "success") in kinds and ("login", "failure") in kinds, kinds
            assert all(e.detail.get("workstation") == "ws1" for e in offline_events)
        finally:
            back.stop()
    finally:
        svc.stop()
        store.close()


# --------------------------------------------------------------------------- card self-unlock


def test_a_joined_workstation_offers_the_card_self_unlock_through_the_server(
        tmp_path, pg_url, socket_dir, pcscd, vpcd_insert, pam_service):  # noqa: F811
    """The joined workstation's service (real pcscd + vpcd, the real server on PostgreSQL
    holding the RA's file source): a card login on the locked card offers "Forgot your card
    PIN?"; the unlock runs on the server (its code, the password, its PUK) with the new PIN
    asked at the workstation, then the card login goes on with the new PIN; then the socket
    op ``card.self-unlock`` on the card locked again. The PUK is nowhere at the workstation:
    not in the service's output, nor in any file under its directory (its store and audit)."""
    import json
    import os
    import time

    from conftest import environ_for_agent
    from pcsc_helpers import wait_for_card
    from simulators.card.card import VirtualCard
    from simulators.card.issuance import issue_card
    from simulators.card.pcscd import remove_card
    from simulators.card.pki import admin_credentials, init_ca, issuing_cert_path, root_cert_path
    from test_service import ServiceProcess
    from token_agent.agent import Agent
    from token_agent.ceremonies.card import set_card_setting
    from token_agent.ceremonies.cardunlock import NEW_PIN_AGAIN, NEW_PIN_PROMPT, UNLOCKED
    from token_agent.factors import password as password_factor
    from token_agent.rasource import write_file
    from token_agent.service.selfunlock import OFFER_PROMPT

    uuid, pin, new_pin, newer_pin = "555100000888", "739154", "5318642", "86420864"
    newest_pin = "97531864"
    outbox = tmp_path / "outbox"
    policy = tmp_path / "server-policy.toml"
    policy.write_text(f'[codes]\nresend_seconds = 0\n[delivery.sms]\ngateway = "outbox"\n'
                      f'[delivery.outbox]\ndir = "{outbox}"\n')
    ca = tmp_path / "ca"
    init_ca(ca)
    card = tmp_path / "locky.card"
    issue_card(ca, name="Dr Locked Out", uuid=uuid, pin=pin, out=card)
    os.chmod(card, 0o600)
    puk, algorithm, key = admin_credentials(ca, uuid)
    ra_file = write_file(tmp_path / "ra.json", {uuid: {
        "uuid": uuid, "puk": puk, "management_key_algorithm": algorithm,
        "management_key": key.hex()}})
    store = Store.open(pg_url)
    server = start_org_server(tmp_path / "org", pg_url,
                              extra_config=f'[policy]\nfile = "{policy}"\n')
    svc = None
    try:
        agent = Agent.open(tmp_path / "agent", store=store, environ={})
        locky = store.add_user("locky", display_name="Dr Locked Out")
        password_factor.set_password(agent.factors(), locky.id, PASSWORD)
        method = store.add_method(locky.id, "sms", "mobile 123", confirmed=True)
        store.add_contact(method.id, "sms", "+447700900123", now=time.time())
        set_card_setting(store, "card_trust_anchors", [str(root_cert_path(ca))])
        set_card_setting(store, "card_intermediates", [str(issuing_cert_path(ca))])
        set_card_setting(store, "card_ra_source", f"file:{ra_file}")
        store.add_card_identity(locky.id, uuid=uuid, holder_name="Dr Locked Out")
        sock = socket_dir / "svc.sock"
        ws = join_workstation(tmp_path / "ws1", server, "ws1", extra_config=(
            f'[service]\nsocket = "{sock}"\nprompt_timeout = 30\n'
            f'[cards]\nreaders = ["Virtual PCD"]\nlock_command = "true"\ndriver = "piv"\n'))
        svc = ServiceProcess(ws.config, sock, ws.data_dir, tmp_path / "svc.log",
                             {**environ_for_agent(), "PYTHONUNBUFFERED": "1"}).start()

        def lock():
            virtual = VirtualCard.load(card)
            virtual.power_on()
            assert virtual.transmit(bytes.fromhex("00A4040009A0000003080000100000"))[-2:] \
                == b"\x90\x00"
            for _ in range(3):
                virtual.transmit(bytes.fromhex("0020008008") + b"000000\xff\xff")

        def code() -> str:
            found = [json.loads(p.read_text()) for p in sorted(
                outbox.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)]
            found = [m for m in found if m.get("code")]
            assert found, "no code sent"
            return found[-1]["code"]

        def answering(chosen_pin: str, prompts: list):
            fixed = {OFFER_PROMPT: "y", "Your password": PASSWORD,
                     NEW_PIN_PROMPT: chosen_pin, NEW_PIN_AGAIN: chosen_pin}

            def answer(event):
                prompts.append(event["message"])
                if event["message"].startswith("Enter the code sent to"):
                    return code()
                return fixed.get(event["message"], chosen_pin)  # the card's PIN: the new one
            return answer

        lock()
        bridge = vpcd_insert(VirtualCard.load(card))
        wait_for_card(pcscd.context, pcscd.reader(0), True)
        prompts: list = []
        with svc.client() as c:
            outcome = c.login("locky", answering(new_pin, prompts), primary="card")
        assert outcome["ok"] and outcome["method"] == "card" and outcome["session"], \
            (outcome, prompts)
        assert prompts[0] == OFFER_PROMPT
        assert NEW_PIN_PROMPT in prompts and NEW_PIN_AGAIN in prompts
        events = store.list_events(kind="card.self-unlock")
        assert [e.outcome for e in events] == ["success"]
        assert events[0].detail["card_proof"] == "management-key"
        # the socket op, on the card locked again (a fresh copy in the reader)
        remove_card(bridge)
        wait_for_card(pcscd.context, pcscd.reader(0), False)
        lock()
        vpcd_insert(VirtualCard.load(card))
        wait_for_card(pcscd.context, pcscd.reader(0), True)
        prompts = []
        with svc.client() as c:
            login = c.request("card.self-unlock", user="locky")["login"]
            result = c.run_ceremony(login, answering(newer_pin, prompts))
            assert result["ok"] and result["message"] == UNLOCKED, (result, prompts)
            again = c.login("locky", lambda e: newer_pin, primary="card")
        assert again["ok"] and again["method"] == "card", again
        assert OFFER_PROMPT not in prompts
        assert [e.outcome for e in store.list_events(kind="card.self-unlock")] == \
            ["success", "success"]
        # PAM primary=card on the joined workstation: two wrong PINs, no offer; the third
        # locks the card and the same conversation offers the unlock, then logs in
        from test_pam_cardunlock import (
            AGAIN_PROMPT, CODE_PROMPT, NEW_PIN_PROMPT as PAM_NEW_PIN, OFFER, PASSWORD_PROMPT,
            PIN_PROMPT,
        )

        service = pam_service(svc.socket, "primary=card")
        for _ in range(2):
            run = pamtester(service, "locky", [(PIN_PROMPT, "000000")])
            assert run.pam_result == "PAM_AUTH_ERR" and "Forgot" not in run.output, run
        run = pamtester(service, "locky", [
            (PIN_PROMPT, "000000"), (OFFER, "y"), (CODE_PROMPT, code),
            (PASSWORD_PROMPT, PASSWORD), (PAM_NEW_PIN, newest_pin), (AGAIN_PROMPT, newest_pin),
            (PIN_PROMPT, newest_pin)])
        assert run.returncode == 0 and run.pam_result == "PAM_SUCCESS", run
        assert UNLOCKED in run.output and puk not in run.output and newest_pin not in run.output
        assert [e.outcome for e in store.list_events(kind="card.self-unlock")] == \
            ["success"] * 3
        run = pamtester(service, "locky", [(PIN_PROMPT, newest_pin)])
        assert run.pam_result == "PAM_SUCCESS", run
        # the PUK: nowhere at the workstation
        output = svc.output()
        assert puk not in output and new_pin not in output and newer_pin not in output
        assert newest_pin not in output
        assert puk not in json.dumps([outcome, result, again])
        for path in ws.base.rglob("*"):
            if path.is_file():
                assert puk.encode() not in path.read_bytes(), path
        audit = json.dumps([e.to_dict() for e in store.list_events(limit=10 ** 6)])
        assert puk not in audit and new_pin not in audit
    finally:
        if svc is not None:
            svc.stop()
        server.stop()
        store.close()
