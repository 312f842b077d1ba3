"""The self-service card unlock through the organisation's server (ceremony op
``card.self-unlock``: organisation/remote.py runs ``ceremonies.cardunlock.self_unlock`` with
the server's RA source; organisation/relay.py answers with the workstation's person and card):
the virtual card in process, the channel in memory (every message through JSON).

What is checked: the card unlocked and a login with the new PIN through the server; the new
PIN asked at the workstation and never sent; the PUK only in the ``card.unblock`` ask, never
in the workstation's log, its person's prompts or answers, the outcome, or the audit; the
management key never sent (the mutual authentication relayed in two steps); a copied
certificate (another card) refused as not genuine; someone else's card refused before
anything is asked; malformed new asks refused by the workstation."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading

import pytest

from drivers.pcsc.piv import PivSession
from token_agent.agent import Agent
from token_agent.ceremonies.card import set_card_setting
from token_agent.ceremonies.cardunlock import NEW_PIN_AGAIN, NEW_PIN_PROMPT, UNLOCKED
from token_agent.organisation import protocol
from token_agent.organisation.protocol import ProtocolError
from token_agent.organisation.relay import relay
from token_agent.outcome import Reason
from token_agent.policy import parse_policy
from token_agent.store import Store

from org_channel import ServerThread, pair

PASSWORD = "correct horse battery staple"
ALICE_UUID = "555123456789"
NEW_PIN = "24681357"
MOBILE = "+447700900123"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from simulators.card.issuance import issue_card
    from simulators.card.pki import init_ca

    directory = tmp_path_factory.mktemp("pki")
    init_ca(directory / "ca")
    issue_card(directory / "ca", name="Dr Alice Smith", uuid=ALICE_UUID, pin="123456",
               out=directory / "alice.card")
    # a second card with alice's certificate's UUID but its own keys: a copy would be
    # refused by the management key (another card of the same CA, other credentials)
    issue_card(directory / "ca", name="Dr Bob Jones", uuid="555987654321", pin="123456",
               out=directory / "bob.card")
    return directory


class Server:
    def __init__(self, tmp_path, pki):
        from simulators.card.pki import admin_credentials, issuing_cert_path, root_cert_path
        from token_agent.factors import password

        self.outbox = tmp_path / "outbox"
        store = Store.open(tmp_path / "server.db")
        self.agent = Agent.open(tmp_path, store=store, environ={}, policy=parse_policy(
            "[enforcement]\nfrom = 2099-01-01\n"
            '[delivery.sms]\ngateway = "outbox"\n'
            f'[delivery.outbox]\ndir = "{self.outbox}"\n'))
        self.store = store
        alice = store.add_user("alice", display_name="Dr Alice Smith", mfa_enabled=False)
        password.set_password(self.agent.factors(), alice.id, PASSWORD)
        method = store.add_method(alice.id, "sms", "mobile 123", confirmed=True)
        store.add_contact(method.id, "sms", MOBILE, now=self.agent.now())
        bob = store.add_user("bob", mfa_enabled=False)
        set_card_setting(store, "card_trust_anchors", [str(root_cert_path(pki / "ca"))])
        set_card_setting(store, "card_intermediates", [str(issuing_cert_path(pki / "ca"))])
        set_card_setting(store, "card_ra_source", f"simulated:{pki / 'ca'}")
        store.add_card_identity(alice.id, uuid=ALICE_UUID, holder_name="Dr Alice Smith")
        store.add_card_identity(bob.id, uuid="555987654321", holder_name="Dr Bob Jones")
        self.puk, _alg, self.mgmt_key = admin_credentials(pki / "ca", ALICE_UUID)

    def last_code(self) -> str:
        found = [json.loads(p.read_text()) for p in sorted(
            self.outbox.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)]
        found = [m for m in found if m.get("code")]
        assert found, "no code sent"
        return found[-1]["code"]


@pytest.fixture
def server(tmp_path, pki, monkeypatch):
    monkeypatch.delenv("TOKEN_AGENT_RA", raising=False)
    s = Server(tmp_path, pki)
    yield s
    s.store.close()


class Card:
    """The workstation's card: a copy of an issued card, opened in process."""

    def __init__(self, pki, tmp_path, name="alice"):
        self.path = tmp_path / f"{name}.card"
        shutil.copyfile(pki / f"{name}.card", self.path)
        os.chmod(self.path, 0o600)
        self.opened = 0

    def session(self) -> PivSession:
        from simulators.card.card import InProcessCardConnection, VirtualCard

        connection = InProcessCardConnection(VirtualCard.load(self.path))
        connection.connect()
        return PivSession(connection)

    def opener(self):
        @contextlib.contextmanager
        def open_(timeout, cancel):
            self.opened += 1
            session = self.session()
            try:
                yield session
            finally:
                session.close()
        return open_

    def lock(self):
        session = self.session()
        for bad in ("999999", "999998", "999997"):
            with contextlib.suppress(Exception):
                session.verify_pin(bad)
        assert session.pin_retries() == 0


class Person:
    """The workstation's Interaction: answers by prompt (callables are called), a record."""

    def __init__(self, answers: dict, card_pin=None):
        self.answers = {k: list(v) for k, v in answers.items()}
        self.asked: list[str] = []
        self.told: list[str] = []
        self.given: list[str] = []
        self._card_pin = card_pin

    def _ask(self, prompt):
        self.asked.append(prompt)
        for start, values in self.answers.items():
            if prompt.startswith(start) and values:
                value = values.pop(0)
                value = value() if callable(value) else value
                self.given.append(value)
                return value
        return None

    secret = text = _ask

    def choose(self, prompt, options, default):
        self.asked.append(prompt)
        return default

    def info(self, message):
        self.told.append(message)

    def show_qr(self, uri):
        pass

    def card_pin(self):
        self.asked.append("card PIN")
        return self._card_pin

    def touch(self):
        pass


def no_key(*a, **k):
    raise AssertionError("no key in these tests")


def run(server, first, person, card):
    ws, srv = pair()
    thread = ServerThread(server.agent, srv, workstation="ws1")
    relayed = relay(ws, first, person, no_key, card.opener(), threading.Event())
    final = thread.join()
    return relayed, final, ws, srv


def unlock_answers(server, new=NEW_PIN, again=None):
    return {"Enter the code": [server.last_code], "Your password": [PASSWORD],
            NEW_PIN_PROMPT: [new], NEW_PIN_AGAIN: [again or new]}


def test_self_unlock_through_the_server_then_a_login_with_the_new_pin(server, pki, tmp_path,
                                                                     caplog):
    caplog.set_level(logging.DEBUG)
    card = Card(pki, tmp_path)
    card.lock()
    # the login on the locked card says the server may unlock it (the offer's cue)
    relayed, *_ = run(server, protocol.login_request(user="alice", primary="card"),
                      Person({}, card_pin="123456"), card)
    assert relayed.outcome.reason is Reason.PIN_BLOCKED
    assert relayed.outcome.detail.get("self_unlock") is True
    person = Person(unlock_answers(server))
    relayed, final, ws, srv = run(server, protocol.card_self_unlock_request(user="alice"),
                                  person, card)
    result = relayed.result
    assert result["ok"] is True and result["message"] == UNLOCKED, result
    assert result["detail"]["card_proof"] == "management-key"
    # the new PIN was asked at the workstation, twice, and never sent; the PUK went only in
    # the one card.unblock ask; the management key never went
    assert person.asked[-2:] == [NEW_PIN_PROMPT, NEW_PIN_AGAIN]
    assert not any(NEW_PIN in text for text in ws.sent + srv.sent)
    carrying = [json.loads(t) for t in srv.sent if server.puk in t]
    assert [m.get("ask") for m in carrying] == ["card.unblock"]
    mgmt = server.mgmt_key.hex()
    assert not any(mgmt in t or protocol.b64e(server.mgmt_key) in t for t in ws.sent + srv.sent)
    # the PUK is nowhere at the workstation: its log, the person's prompts, the outcome
    assert server.puk not in caplog.text
    assert not any(server.puk in x for x in person.asked + person.told + person.given)
    assert server.puk not in json.dumps(result) and NEW_PIN not in json.dumps(result)
    # nor in the audit
    audit = json.dumps([e.to_dict() for e in server.store.list_events(limit=10 ** 6)])
    assert server.puk not in audit and NEW_PIN not in audit
    # the card is unlocked with the new PIN: a login through the server
    assert card.session().pin_retries() > 0
    person = Person({}, card_pin=NEW_PIN)
    relayed, *_ = run(server, protocol.login_request(user="alice", primary="card"), person,
                      card)
    assert relayed.outcome.ok and relayed.outcome.method == "card", relayed.outcome


def test_the_audit_of_the_server_has_no_secret(server, pki, tmp_path):
    card = Card(pki, tmp_path)
    card.lock()
    relayed, *_ = run(server, protocol.card_self_unlock_request(user=None),
                      Person(unlock_answers(server)), card)
    assert relayed.result["ok"] is True, relayed.result
    events = server.store.list_events(kind="card.self-unlock", limit=100)
    assert [e.outcome for e in events] == ["success"]
    assert events[0].detail["card_proof"] == "management-key"
    dumped = json.dumps([e.to_dict() for e in server.store.list_events(limit=10 ** 6)])
    assert server.puk not in dumped and NEW_PIN not in dumped


def test_a_new_pin_that_is_not_given_twice_leaves_the_card_locked(server, pki, tmp_path):
    card = Card(pki, tmp_path)
    card.lock()
    person = Person({**unlock_answers(server), NEW_PIN_PROMPT: ["12", NEW_PIN, NEW_PIN],
                     NEW_PIN_AGAIN: ["11112222", "22223333"]})
    relayed, final, ws, srv = run(server, protocol.card_self_unlock_request(user="alice"),
                                  person, card)
    assert relayed.result["ok"] is False and relayed.result["reason"] == "wrong-pin"
    assert person.told.count("The two PINs are not the same.") == 2
    assert not any("card.unblock" in t for t in srv.sent)  # the PUK never left the server
    assert card.session().pin_retries() == 0


def test_someone_elses_card_is_refused_before_anything_is_asked(server, pki, tmp_path):
    card = Card(pki, tmp_path, "bob")
    card.lock()
    person = Person(unlock_answers(server))
    relayed, *_ = run(server, protocol.card_self_unlock_request(user="alice"), person, card)
    result = relayed.result
    assert result["ok"] is False and result["reason"] == "credential-of-another-user"
    assert person.asked == [] and not server.outbox.exists()


def test_a_card_that_is_not_the_genuine_one_is_refused(server, pki, tmp_path):
    """Bob's card presented with the RA record of alice's: the management key does not
    match (what a copied certificate in another card gives): no code, no question."""
    from token_agent import rasource

    card = Card(pki, tmp_path, "bob")
    card.lock()

    class Mixed:
        def credentials(self, *, uuid, serial=None):
            return real.credentials(uuid=ALICE_UUID)

    real = rasource.load_source(f"simulated:{pki / 'ca'}")
    person = Person(unlock_answers(server))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rasource, "configured_source", lambda agent: Mixed())
        relayed, *_ = run(server, protocol.card_self_unlock_request(user=None), person, card)
    assert relayed.result["ok"] is False and relayed.result["reason"] == "verification-failed"
    assert relayed.result["detail"] == {} or "attempt" not in relayed.result["detail"]
    assert person.asked == [] and not server.outbox.exists()


@pytest.mark.parametrize("message", [
    {"id": 1, "ask": "card.unblock"},  # no PUK
    {"id": 1, "ask": "card.unblock", "puk": 12345678},  # not text
    {"id": 1, "ask": "card.unblock", "puk": "1234"},  # too short
    {"id": 1, "ask": "card.unblock", "puk": "12345678x"},  # not digits
    {"id": 1, "ask": "card.unblock", "puk": "12345678", "new_pin": "123456"},  # a PIN field
    {"id": 1, "ask": "card.new_pin", "pin": "123456"},
    {"id": 1, "ask": "card.mgmt_witness", "algorithm": "DES"},
    {"id": 1, "ask": "card.mgmt_witness"},
    {"id": 1, "ask": "card.mgmt_proof", "algorithm": "AES128", "witness": "!!",
     "challenge": "AAAAAAAAAAAAAAAAAAAAAA"},
    {"id": 1, "ask": "card.mgmt_proof", "algorithm": "AES128",
     "witness": protocol.b64e(b"x" * 8), "challenge": protocol.b64e(b"y" * 16)},
    {"id": 1, "ask": "card.mgmt_proof", "algorithm": "3DES",
     "witness": protocol.b64e(b"x" * 8)},
])
def test_the_workstation_refuses_malformed_unlock_asks(message):
    with pytest.raises(ProtocolError) as e:
        protocol.parse_server_message(message)
    assert "12345678" not in e.value.message and "1234" not in e.value.message


def test_a_malformed_unlock_ask_ends_the_workstations_relay_cleanly(pki, tmp_path, caplog):
    """A server that sends a malformed card.unblock: the workstation answers nothing to it,
    uses no card operation, and ends with the protocol's failure, the PUK in no log."""
    card = Card(pki, tmp_path)
    card.lock()
    ws, srv = pair()
    person = Person({})

    def server():
        srv.recv(timeout=5)
        srv.send({"id": 1, "ask": "card.open", "timeout": 5})
        srv.recv(timeout=5)
        srv.send({"id": 2, "ask": "card.unblock", "puk": "87654321", "extra": 1})
        with contextlib.suppress(Exception):
            srv.recv(timeout=1)

    caplog.set_level(logging.DEBUG)
    t = threading.Thread(target=server)
    t.start()
    relayed = relay(ws, protocol.card_self_unlock_request(user="alice"), person, no_key,
                    card.opener())
    t.join()
    assert relayed.outcome.reason is Reason.SERVER_LOST and not relayed.outcome.ok
    assert "87654321" not in caplog.text
    assert len(ws.sent) == 2  # the request and the card.open reply: nothing to card.unblock
    assert card.session().pin_retries() == 0


def test_an_unblock_without_a_new_pin_kept_is_refused_at_the_workstation(pki, tmp_path):
    """A server that sends card.unblock before (or without) card.new_pin: refused, the card
    untouched (a server cannot choose the PIN)."""
    card = Card(pki, tmp_path)
    card.lock()
    ws, srv = pair()
    replies = []

    def server():
        srv.recv(timeout=5)
        srv.send({"id": 1, "ask": "card.open", "timeout": 5})
        replies.append(srv.recv(timeout=5))
        srv.send({"id": 2, "ask": "card.unblock", "puk": "87654321"})
        replies.append(srv.recv(timeout=5))
        srv.send(protocol.final_error("internal", "done"))

    t = threading.Thread(target=server)
    t.start()
    relay(ws, protocol.card_self_unlock_request(user="alice"), Person({}), no_key,
          card.opener())
    t.join()
    assert replies[1]["error"]["type"] == "PcscError"
    assert "new PIN" in replies[1]["error"]["message"]
    assert card.session().pin_retries() == 0


@pytest.mark.parametrize("first", [
    {"op": "card.self-unlock"},  # user missing: allowed as null
])
def test_the_request_is_checked(first):
    assert protocol.parse_request(first)["user"] is None


@pytest.mark.parametrize("first", [
    {"op": "card.self-unlock", "user": 5}, {"op": "card.self-unlock", "user": "a b"},
    {"op": "card.self-unlock", "user": "alice", "puk": "12345678"},
])
def test_a_malformed_request_is_a_protocol_error(first):
    with pytest.raises(ProtocolError):
        protocol.parse_request(first)


class _FlagsOnlyCard(Card):
    """The card as a PKCS#11 module shows it: no count of PIN tries (``pin_retries`` None
    until the card is locked), a wrong PIN without a count, driver "pkcs11"."""

    def session(self):
        from drivers.pcsc import errors as card_errors

        inner = super().session()

        class FlagsOnly:
            driver = "pkcs11"
            reader = "Virtual PCD 00 00"

            def pin_retries(self):
                return 0 if inner.pin_retries() == 0 else None

            def verify_pin(self, pin):
                try:
                    inner.verify_pin(pin)
                except card_errors.WrongPin:
                    raise card_errors.WrongPin(None, several=True) from None

            def __getattr__(self, name):
                return getattr(inner, name)

        return FlagsOnly()


def test_a_card_that_gives_no_count_of_tries_logs_in_through_the_server(server, pki, tmp_path):
    """Over PKCS#11 the tries left are unknown (None) until the last: the relay carries null,
    the server's ceremony goes on, the wrong PIN's message says so, the login records the
    workstation's driver."""
    card = _FlagsOnlyCard(pki, tmp_path)
    relayed, *_ = run(server, protocol.login_request(user="alice", primary="card"),
                      Person({}, card_pin="000000"), card)
    assert relayed.outcome.reason is Reason.WRONG_PIN, relayed.outcome
    assert "more than one try left" in relayed.outcome.message
    relayed, *_ = run(server, protocol.login_request(user="alice", primary="card"),
                      Person({}, card_pin="123456"), card)
    assert relayed.outcome.ok, relayed.outcome
    assert relayed.outcome.user == "alice"
    events = server.store.list_events(kind="login.card", limit=10)
    assert [e.outcome for e in events] == ["success", "failure"]
    assert {e.detail.get("card_driver") for e in events} == {"pkcs11"}
