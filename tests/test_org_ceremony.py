"""The ceremony channel's library (token_agent/organisation/protocol.py, remote.py, relay.py):
the server's login and key enrolment run with the workstation's person and devices through an
in-memory channel pair (every message through JSON), the real virtual key over HID framing,
the virtual card in process; the server's store on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time

import pytest

from drivers.fido import errors as key_errors
from drivers.pcsc import errors as card_errors
from token_agent.agent import Agent
from token_agent.ceremonies.keypresence import PresenceRequired
from token_agent.organisation import protocol, relay as relay_mod
from token_agent.organisation.protocol import ProtocolError
from token_agent.organisation.relay import ChannelLost, relay, relay_with_failover
from token_agent.organisation.remote import Timeouts, run_ceremony
from token_agent.outcome import Factor, LoginOutcome, Reason
from token_agent.policy import parse_policy
from token_agent.store import Store

from key_helpers import PIN, Keyring
from org_channel import ChannelClosed, ServerThread, pair

PASSWORD = "correct horse battery staple"


class Person:
    """The workstation's Interaction: scripted answers, and what it was told."""

    def __init__(self, *answers, key_pin=PIN, card_pin=None) -> None:
        self.answers = list(answers)
        self.told: list[str] = []
        self.asked: list[str] = []
        self._key_pin, self._card_pin = key_pin, card_pin

    def info(self, message):
        self.told.append(message)

    def show_qr(self, uri):
        self.told.append(uri)

    def _next(self, prompt):
        self.asked.append(prompt)
        return self.answers.pop(0) if self.answers else None

    secret = text = _next

    def choose(self, prompt, options, default):
        self.asked.append(prompt)
        return default

    def key_pin(self):
        self.asked.append("key PIN")
        return self._key_pin

    def card_pin(self):
        self.asked.append("card PIN")
        return self._card_pin

    def touch(self):
        self.told.append("touch")


@pytest.fixture(params=["sqlite", "postgresql"])
def agent(request, tmp_path):
    if request.param == "sqlite":
        store = Store.open(tmp_path / "server.db")
    else:
        store = Store.open(request.getfixturevalue("pg_url"))
    # MFA not enforced yet: a password alone logs alice in (a ticket for her first key)
    agent = Agent.open(tmp_path, store=store, policy=parse_policy(
        "[enforcement]\nfrom = 2099-01-01\n"), environ={})
    alice = store.add_user("alice", display_name="Dr Alice Smith", mfa_enabled=False)
    from token_agent.factors import password

    password.set_password(agent.factors(), alice.id, PASSWORD)
    store.add_user("bob")
    yield agent
    store.close()


@pytest.fixture
def keys(tmp_path):
    return Keyring(tmp_path)


def key_opener(key, calls=None):
    def open_(rp_id, credential_ids, timeout, cancel, on_touch):
        if calls is not None:
            calls.append((rp_id, list(credential_ids)))
        return contextlib.nullcontext(key)
    return open_


def no_card(timeout, cancel):
    raise card_errors.NoCard()


def run(agent, first, person, key=None, *, card_opener=no_card, timeouts=None, ws_end=None,
        srv_end=None, workstation="ws1"):
    ws, srv = (ws_end, srv_end) if ws_end else pair()
    server = ServerThread(agent, srv, workstation=workstation, timeouts=timeouts)
    relayed = relay(ws, first, person, key_opener(key), card_opener, threading.Event())
    final = server.join()
    return relayed, final, ws, srv


def password_ticket(agent):
    """The ticket of alice's password login at ws1 (what a first enrolment needs)."""
    relayed = run(agent, login_request(primary="password"), Person(PASSWORD))[0]
    assert relayed.outcome.ok, relayed.outcome
    return relayed.ticket


def enrol(agent, key, person=None, user="alice", ticket="login", name="blue"):
    if ticket == "login":
        ticket = password_ticket(agent)
    relayed, final, ws, srv = run(agent, protocol.enrol_key_request(user=user, name=name,
                                                                    ticket=ticket),
                                  person or Person(), key)
    return relayed, ws, srv


def login_request(**kw):
    return protocol.login_request(**{"user": "alice", **kw})


# ------------------------------------------------------------------ key login through the server


def test_a_key_enrolled_and_used_through_the_server_never_sends_the_pin(agent, keys):
    _, key, _ = keys.new()
    relayed, ws, srv = enrol(agent, key)
    assert relayed.result["ok"], relayed.result
    assert relayed.result["name"] == "blue"
    alice = agent.store.get_user("alice")
    [cred] = agent.store.list_fido_credentials(alice.id)
    assert cred.uv_enrolled
    person = Person()
    relayed, final, ws2, srv2 = run(agent, login_request(primary="key"), person, key)
    outcome = relayed.outcome
    assert outcome.ok and outcome.user == "alice" and outcome.method == "key", outcome
    # a PIN verified at the workstation counts as knowledge, as it does locally
    assert set(outcome.factors) == {Factor.POSSESSION, Factor.KNOWLEDGE}
    assert "key PIN" in person.asked
    assert agent.store.get_fido_credential(cred.credential_id).sign_count > cred.sign_count
    for text in ws.sent + srv.sent + ws2.sent + srv2.sent:
        assert PIN not in text
    # the device is the workstation, as the server sees it
    event = max((e for e in agent.store.list_events(kind="login") if e.outcome == "success"),
                key=lambda e: e.id)
    assert event.detail["device"] == "managed" and event.detail["primary"] == "key"
    from token_agent import sightings
    assert sightings.seen(agent.store, alice.id, "device", "ws1")
    assert relayed.ticket and relayed.offline is None


def test_tap_and_go_without_a_user_name(agent, keys):
    _, key, _ = keys.new()
    enrol(agent, key)
    relayed, *_ = run(agent, login_request(user=None), Person(), key)
    assert relayed.outcome.ok and relayed.outcome.user == "alice", relayed.outcome


def test_the_server_asks_for_the_key_holding_the_users_credentials(agent, keys):
    _, key, _ = keys.new()
    enrol(agent, key)
    calls = []
    ws, srv = pair()
    server = ServerThread(agent, srv)
    relay(ws, login_request(primary="key"), Person(), key_opener(key, calls), no_card)
    server.join()
    [cred] = agent.store.list_fido_credentials(agent.store.get_user("alice").id)
    assert calls == [(cred.rp_id, [cred.credential_id])]


def test_a_wrong_pin_at_the_workstation_keeps_its_reason_and_tries_left(agent, keys):
    _, key, _ = keys.new()
    enrol(agent, key)
    relayed, *_ = run(agent, login_request(primary="key"), Person(key_pin="000000"), key)
    outcome = relayed.outcome
    assert not outcome.ok and outcome.reason is Reason.WRONG_PIN
    assert "tries left" in outcome.message  # the key's own words, shown before a factor
    [failure] = [e for e in agent.store.list_events(kind="login.key")]
    assert failure.detail["reason"] == "wrong-pin"


class PulledKey:
    """The workstation's key, pulled out while the server waits for its assertion."""

    def __init__(self, key):
        self.key, self.path = key, key.path

    def assert_credentials(self, **kw):
        raise key_errors.KeyRemoved()

    def __getattr__(self, name):
        return getattr(self.key, name)


def test_a_key_pulled_mid_login_fails_as_removed(agent, keys):
    _, key, _ = keys.new()
    enrol(agent, key)
    relayed, *_ = run(agent, login_request(primary="key"), Person(), PulledKey(key))
    outcome = relayed.outcome
    assert not outcome.ok and outcome.reason is Reason.DEVICE_REMOVED
    assert outcome.message == key_errors.KeyRemoved.default_message


def test_no_key_at_the_workstation(agent, keys):
    _, key, _ = keys.new()
    enrol(agent, key)

    def none(*a):
        raise key_errors.NoKeyFound()

    ws, srv = pair()
    server = ServerThread(agent, srv)
    relayed = relay(ws, login_request(primary="key"), Person(), none, no_card)
    server.join()
    assert relayed.outcome.reason is Reason.NO_DEVICE
    assert relayed.outcome.message == key_errors.NoKeyFound.default_message


# ------------------------------------------------------------------ the person's prompts


def test_a_password_login_through_the_server(agent):
    person = Person(PASSWORD)
    relayed, *_ = run(agent, login_request(), person)
    assert relayed.outcome.ok and relayed.outcome.method.startswith("password"), \
        relayed.outcome
    assert person.asked[0] == "Password"


def test_a_wrong_password_says_only_authentication_failed(agent):
    relayed, *_ = run(agent, login_request(), Person("wrong"))
    assert not relayed.outcome.ok and relayed.outcome.message == "Authentication failed."
    assert relayed.outcome.reason is Reason.WRONG_PASSWORD and relayed.ticket is None


def test_no_answer_at_the_workstation_is_a_cancel(agent):
    relayed, *_ = run(agent, login_request(), Person())
    assert relayed.outcome.reason is Reason.CANCELLED


# ------------------------------------------------------------------ re-authentication tickets


def test_a_second_key_needs_a_ticket_of_a_recent_login_at_this_workstation(agent, keys):
    _, key, _ = keys.new()
    _, key2, _ = keys.new()
    assert enrol(agent, key)[0].result["ok"]
    refused = enrol(agent, key2, ticket=None)[0].result
    assert not refused["ok"] and refused["reason"] == "reauth-required"
    login = run(agent, login_request(primary="key"), Person(), key)[0]
    assert login.outcome.ok and login.ticket
    # another workstation's ticket, or a damaged one, does not count
    other = run(agent, login_request(primary="key"), Person(), key, workstation="ws2")[0]
    assert not enrol(agent, key2, ticket=other.ticket)[0].result["ok"]
    assert not enrol(agent, key2, ticket=login.ticket[:-2] + "AA")[0].result["ok"]
    done = enrol(agent, key2, ticket=login.ticket, name="green")[0].result
    assert done["ok"], done


# ------------------------------------------------------------------ the card


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from simulators.card.issuance import issue_card
    from simulators.card.pki import init_ca

    directory = tmp_path_factory.mktemp("pki")
    init_ca(directory / "ca")
    card = directory / "alice.card"
    issue_card(directory / "ca", name="Dr Alice Smith", uuid="555123456789", pin="1234",
               out=card)
    return directory


def card_opener(pki, tmp_path):
    from drivers.pcsc.piv import PivSession
    from simulators.card.card import InProcessCardConnection, VirtualCard

    path = tmp_path / "alice.card"
    shutil.copyfile(pki / "alice.card", path)
    os.chmod(path, 0o600)

    @contextlib.contextmanager
    def open_(timeout, cancel):
        connection = InProcessCardConnection(VirtualCard.load(path))
        connection.connect()
        yield PivSession(connection)

    return open_


def test_a_card_login_through_the_server_verifies_the_pin_at_the_workstation(agent, pki,
                                                                               tmp_path):
    from simulators.card.pki import issuing_cert_path, root_cert_path
    from token_agent.ceremonies.card import set_card_setting

    store = agent.store
    set_card_setting(store, "card_trust_anchors", [str(root_cert_path(pki / "ca"))])
    set_card_setting(store, "card_intermediates", [str(issuing_cert_path(pki / "ca"))])
    store.add_card_identity(store.get_user("alice").id, uuid="555123456789",
                            holder_name="Dr Alice Smith")
    person = Person(card_pin="1234")
    relayed, final, ws, srv = run(agent, login_request(primary="card"), person,
                                  card_opener=card_opener(pki, tmp_path))
    assert relayed.outcome.ok and relayed.outcome.method == "card", relayed.outcome
    assert person.asked == ["card PIN"]
    for text in ws.sent + srv.sent:
        assert "1234" not in text.replace("555123456789", "")
    # a wrong PIN: the card's own error, with its reason
    person = Person(card_pin="9999")
    relayed, *_ = run(agent, login_request(primary="card"), person,
                      card_opener=card_opener(pki, tmp_path))
    assert relayed.outcome.reason is Reason.WRONG_PIN and "tries left" in relayed.outcome.message


# ------------------------------------------------------------------ device errors travel


@pytest.mark.parametrize("error", [
    key_errors.WrongPin(3), key_errors.TouchTimeout(30), key_errors.PinPolicyViolation(6),
    key_errors.KeyRemoved(), key_errors.PinAuthBlocked(), key_errors.NoCredentials("none here"),
    PresenceRequired(), key_errors.FidoKeyError("odd"),
])
def test_a_key_error_round_trip_keeps_its_class_reason_and_message(error):
    from token_agent.ceremonies.key import device_failure

    back = protocol.error_from_json(json.loads(json.dumps(protocol.error_to_json(error))))
    assert type(back) is type(error)
    assert back.message == error.message and str(back) == str(error)
    assert device_failure(back) is device_failure(error)
    assert back.to_json() == error.to_json()


@pytest.mark.parametrize("error", [
    card_errors.WrongPin(2), card_errors.PinBlocked(), card_errors.CardRemoved(),
    card_errors.NoCard(), card_errors.CardError(0x6F00),
])
def test_a_card_error_round_trip_keeps_its_class_reason_and_message(error):
    from token_agent.ceremonies.card import device_failure

    back = protocol.error_from_json(protocol.error_to_json(error), card=True)
    assert type(back) is type(error) and back.message == error.message
    assert device_failure(back) is device_failure(error)
    assert back.to_json() == error.to_json()


def test_an_unknown_error_type_becomes_the_generic_device_error():
    back = protocol.error_from_json({"type": "os.system", "message": "rm -rf"})
    assert type(back) is key_errors.FidoKeyError and back.message == "rm -rf"
    # the names of one device's registry mean nothing for the other's
    back = protocol.error_from_json({"type": "KeyRemoved", "message": "m"}, card=True)
    assert type(back) is card_errors.PcscError
    # not a device error at all: said generically, never its text
    data = protocol.error_to_json(RuntimeError("secret internals"))
    assert data["type"] == "FidoKeyError" and "internals" not in data["message"]


@pytest.mark.parametrize("bad", [
    "nope", {"type": 3, "message": "m"}, {"type": "WrongPin"},
    {"type": "WrongPin", "message": "m", "retries_left": "3"},
    {"type": "WrongPin", "message": "m", "extra": 1},
])
def test_malformed_errors_are_protocol_errors(bad):
    with pytest.raises(ProtocolError):
        protocol.error_from_json(bad)


# ------------------------------------------------------------------ malformed messages


@pytest.mark.parametrize("first", [
    "not a dict", {"op": "login", "user": 3}, {"op": "drop tables"}, {},
    {"op": "login", "user": "alice", "step_up": "yes"},
    {"op": "login", "user": "alice", "pin": "1234"},
    {"op": "login", "user": "../../etc"}, {"op": "enrol.key", "user": "alice", "name": ""},
])
def test_a_malformed_first_message_ends_with_a_protocol_error(agent, first):
    ws, srv = pair()
    final = run_ceremony(agent, srv, first, "ws1", None)
    assert final["error"]["type"] == "protocol" and final["error"]["message"]
    assert ws.inbox.empty() and srv.sent == []  # nothing was asked


@pytest.mark.parametrize("text", ["{", "[]", "null", "\"x\"", b"\xff\xfe", "x" * 2_000_000])
def test_undecodable_text_is_a_protocol_error(text):
    with pytest.raises(ProtocolError):
        protocol.decode(text)


@pytest.mark.parametrize("message", [
    {"id": 1, "ask": "rm"}, {"id": "1", "ask": "secret", "prompt": "p"},
    {"id": 1, "ask": "secret"}, {"id": 1, "ask": "secret", "prompt": "p", "x": 1},
    {"id": 1, "ask": "choose", "prompt": "p", "options": [["a"]], "default": "a"},
    {"id": 1, "ask": "key.assert", "rp_id": "r", "challenge": "!!", "allow": [],
     "user_verification": None, "origin": "o", "timeout": 5},
    {"id": 1, "ask": "key.open", "rp_id": None, "credential_ids": [], "timeout": 1e9},
    {"tell": "exec", "message": "m"}, {"result": "ok"}, {"something": "else"},
])
def test_the_workstation_refuses_malformed_server_messages(message):
    with pytest.raises(ProtocolError):
        protocol.parse_server_message(message)


def test_a_server_that_breaks_the_protocol_ends_the_login_cleanly():
    ws, srv = pair()
    person = Person()

    def server():
        srv.recv(timeout=5)
        srv.send({"id": 1, "ask": "shell", "cmd": "id"})

    t = threading.Thread(target=server)
    t.start()
    relayed = relay(ws, login_request(), person, key_opener(None), no_card)
    t.join()
    assert relayed.outcome.reason is Reason.SERVER_LOST and not relayed.outcome.ok
    assert person.asked == []


def test_a_workstation_that_sends_garbage_ends_the_servers_ceremony_cleanly(agent):
    ws, srv = pair()
    server = ServerThread(agent, srv, timeouts=Timeouts(prompt=5, grace=0.5))
    ws.send(login_request())
    kind, ask = protocol.parse_server_message(ws.recv(timeout=5))
    assert ask["ask"] == "secret"
    ws.send({"id": ask["id"], "value": 12})  # a password must be text
    final = server.join()
    assert final["error"]["type"] == "lost" or final["result"]["reason"] == "cancelled"
    [failure] = agent.store.list_events(kind="login")
    assert failure.outcome == "failure" and failure.detail["reason"] == "cancelled"


def test_a_workstation_that_stops_answering_ends_the_ceremony(agent):
    ws, srv = pair()
    server = ServerThread(agent, srv, timeouts=Timeouts(prompt=0.5, grace=0.2))
    ws.send(login_request())
    started = time.monotonic()
    final = server.join(timeout=10)
    assert time.monotonic() - started < 5
    assert "error" in final or final["result"]["reason"] == "cancelled"
    assert [e.detail["reason"] for e in agent.store.list_events(kind="login")] == ["cancelled"]


def test_a_workstation_that_leaves_mid_login_records_a_cancel_and_no_success(agent, keys):
    """The channel closes once the key is open, before its answer: the server's login ends
    as cancelled (recorded), nothing of a success is written."""
    _, key, _ = keys.new()
    enrol(agent, key)
    ws, srv = pair()
    server = ServerThread(agent, srv)
    real_send = ws.send

    def send_then_leave(message):
        real_send(message)
        if isinstance(message.get("value"), dict) and "path" in message["value"]:
            ws.close()

    ws.send = send_then_leave
    with pytest.raises(ChannelLost) as lost:
        relay(ws, login_request(primary="key"), Person(), key_opener(key), no_card)
    assert not lost.value.engaged  # only the key was opened: another replica may start again
    final = server.join()
    key_logins = [e for e in agent.store.list_events(kind="login")
                  if e.detail.get("primary") == "key" or e.outcome == "failure"]
    assert [e.outcome for e in key_logins] == ["failure"], key_logins
    assert key_logins[0].detail["reason"] == "cancelled"
    assert "error" in final or final["result"]["reason"] == "cancelled"


# ------------------------------------------------------------------ failover


class FakeClient:
    """OrgClient's ``connect`` over in-memory replicas: ``behaviours`` says what each
    replica does ("serve", "die-at-once", "die-after-prompt")."""

    def __init__(self, agent, behaviours):
        self.agent, self.behaviours = agent, list(behaviours)
        self.servers = [f"mem://{i}" for i in range(len(behaviours))]
        self.connected: list[str] = []

    def connect(self, path):
        assert path == "/v1/ceremony"
        behaviour = self.behaviours.pop(0)
        self.connected.append(behaviour)
        ws, srv = pair()
        if behaviour == "serve":
            ServerThread(self.agent, srv)
        elif behaviour == "die-at-once":
            srv.close()
        elif behaviour == "die-after-prompt":
            def die():
                srv.recv(timeout=5)
                srv.send(protocol.ask(1, "secret", prompt="Password"))
                srv.recv(timeout=5)
                srv.close()
            threading.Thread(target=die, daemon=True).start()
        return ws


def test_a_replica_lost_before_anything_was_asked_is_replaced(agent):
    client = FakeClient(agent, ["die-at-once", "serve"])
    person = Person(PASSWORD)
    relayed = relay_with_failover(client, login_request(), person, key_opener(None), no_card)
    assert relayed.outcome.ok, relayed.outcome
    assert client.connected == ["die-at-once", "serve"] and person.asked == ["Password"]


def test_a_replica_lost_after_the_person_answered_fails_the_login(agent):
    client = FakeClient(agent, ["die-after-prompt", "serve"])
    person = Person(PASSWORD, PASSWORD)
    relayed = relay_with_failover(client, login_request(), person, key_opener(None), no_card)
    assert relayed.outcome.reason is Reason.SERVER_LOST and not relayed.outcome.ok
    assert relayed.outcome.message == relay_mod.LOST_MESSAGE
    assert client.connected == ["die-after-prompt"]  # not asked again elsewhere


def test_outcome_from_json_is_strict():
    ok = LoginOutcome(ok=True, method="key", user="a", factors=(Factor.POSSESSION,))
    assert LoginOutcome.from_json(ok.to_json()) == ok
    for bad in ({**ok.to_json(), "ok": "yes"}, {**ok.to_json(), "reason": "made-up"},
                {**ok.to_json(), "factors": ["x"]}, {**ok.to_json(), "extra": 1}, []):
        with pytest.raises(ProtocolError):
            protocol.outcome_from_json(bad)


def test_a_server_that_asks_for_a_pin_in_a_prompt_gets_no_answer():
    """A compromised server could ask for the key's PIN with the workstation's own words:
    the relay never puts such a prompt to the person."""
    ws, srv = pair()
    person = Person("123456")
    replies = []

    def server():
        srv.recv(timeout=5)
        srv.send(protocol.ask(1, "secret", prompt="Enter the PIN for your security key"))
        replies.append(srv.recv(timeout=5))
        srv.send(protocol.final_result(LoginOutcome.failure(
            "login", Reason.CANCELLED, "cancelled").to_json()))

    t = threading.Thread(target=server)
    t.start()
    relay(ws, login_request(), person, key_opener(None), no_card)
    t.join()
    assert replies == [{"id": 1, "value": None}] and person.asked == []
    assert relay_mod.asks_for_a_pin("Card passcode") and not relay_mod.asks_for_a_pin("Password")
    assert not relay_mod.asks_for_a_pin("Enter the code sent to Spinner")


def test_a_malformed_key_open_reply_ends_the_servers_login_as_a_device_failure(agent, keys):
    _, key, _ = keys.new()
    enrol(agent, key)
    ws, srv = pair()
    server = ServerThread(agent, srv)
    ws.send(login_request(primary="key"))
    kind, ask = protocol.parse_server_message(ws.recv(timeout=5))
    assert ask["ask"] == "key.open"
    ws.send({"id": ask["id"], "value": {"path": 7}})
    final = server.join()
    assert "error" in final or not final["result"]["ok"]
    failures = [e for e in agent.store.list_events(kind="login") if e.outcome == "failure"]
    assert failures and failures[-1].detail["reason"] == "cancelled"


def test_a_request_the_server_refuses_says_why(agent):
    ws, srv = pair()
    server = ServerThread(agent, srv)
    relayed = relay(ws, protocol.enrol_key_request(user="alice", name="x" * 65, ticket=None),
                    Person(), key_opener(None), no_card)
    server.join()
    assert relayed.outcome.reason is Reason.INTERNAL_ERROR
    assert "1 to 64 characters" in relayed.outcome.message
