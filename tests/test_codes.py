"""One-time codes sent by email, SMS, voice call and messaging (token_agent/factors/codes.py).

Email goes through a real SMTP server (aiosmtpd on 127.0.0.1), the phone channels through a
real local HTTP gateway (http.server on a thread); the rest uses the delivery outbox, whose
JSON files stand in for the user's phone or mailbox.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import re
import secrets
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import free_port
from token_agent.delivery import Delivery, Receipt, parse_delivery_config
from token_agent.factors import CodeRules, FactorContext, FactorError
from token_agent.factors import codes
from token_agent.outcome import Reason
from token_agent.secretbox import SecretKeys
from token_agent.store import Store

pytestmark = [pytest.mark.store_contract]  # a code consumed once, counted failures: on both engines

PHONE = "07700 900123"
PHONE_E164 = "+447700900123"
ADDRESS = "alice.smith@NHS.net"
T0 = 1_750_000_000.0


# --------------------------------------------------------------------------- helpers


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Outbox:
    """The delivery outbox directory: each message the "user" received, in order."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._seen: set[str] = set()

    def all(self) -> list[dict]:
        if not self.dir.exists():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]

    def new(self) -> list[dict]:
        fresh = [m for m in self.all() if m["id"] not in self._seen]
        self._seen.update(m["id"] for m in fresh)
        return fresh

    def last_code(self) -> str:
        fresh = self.new()
        assert len(fresh) == 1, f"expected one new message, got {len(fresh)}"
        return fresh[0]["code"]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def keys():
    return SecretKeys(secrets.token_bytes(32))


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "token-agent.db"


@pytest.fixture
def store(db_path, clock):
    s = Store.open(db_path, clock=clock)
    yield s
    s.close()


@pytest.fixture
def outbox(tmp_path):
    return Outbox(tmp_path / "outbox")


def outbox_delivery(outbox: Outbox) -> Delivery:
    return Delivery(parse_delivery_config({
        ch: {"gateway": "outbox"} for ch in codes.CHANNELS} | {"outbox": {"dir": str(outbox.dir)}}))


@pytest.fixture
def ctx(store, keys, clock, outbox):
    return FactorContext(store=store, keys=keys, delivery=outbox_delivery(outbox), clock=clock,
                         issuer="NHS Trust")


@pytest.fixture
def user(store):
    return store.add_user("alice")


def enrolled(ctx, user, outbox, channel="sms", destination=PHONE, **kw):
    """A confirmed contact; the clock moved past the enrolment code's send window."""
    method, _ = codes.add_contact(ctx, user.id, channel, destination, **kw)
    result = codes.confirm_contact(ctx, user.id, channel, outbox.last_code())
    assert result.ok, result.message
    ctx.clock.advance(ctx.codes.ttl_seconds + 1)
    return result.method


def challenges(store, method=None) -> list[sqlite3.Row]:
    with store.connection("test") as conn:
        if method is None:
            return conn.execute("SELECT * FROM otp_challenges ORDER BY id").fetchall()
        return conn.execute("SELECT * FROM otp_challenges WHERE method_id = ? ORDER BY id",
                            (method.id,)).fetchall()


def other(code: str) -> str:
    return f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"


# --------------------------------------------------------------------------- real servers


class SmtpSink:
    def __init__(self) -> None:
        self.envelopes = []
        self.received = threading.Event()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        self.envelopes.append(envelope)
        self.received.set()
        return "250 OK"


@pytest.fixture
def smtp_server():
    from aiosmtpd.controller import Controller

    sink = SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller, sink
    controller.stop()


def mail_code(envelope) -> tuple[email.message.EmailMessage, str]:
    mail = email.message_from_bytes(envelope.content, policy=email.policy.default)
    body = mail.get_body(preferencelist=("plain",)).get_content()
    return mail, re.search(r"\b(\d{6})\b", body).group(1)


class HttpGatewayServer:
    """A JSON SMS/voice/messaging gateway on 127.0.0.1 that records what it is sent."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(json.loads(body))
                answer = json.dumps({"id": f"msg-{len(outer.requests)}"}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/messages"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def last_code(self) -> str:
        request = self.requests[-1]
        if request["channel"] == "voice":
            spoken = re.search(r"((?:\d, ){5}\d)", request["say"]).group(1)
            return spoken.replace(", ", "")
        return re.search(r"\b(\d{6})\b", request["text"]).group(1)


@pytest.fixture
def http_gateways():
    servers = []

    def start(status: int = 200) -> HttpGatewayServer:
        servers.append(HttpGatewayServer(status))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


# --------------------------------------------------------------------------- end to end


def test_email_through_a_real_smtp_server(store, keys, clock, user, smtp_server):
    controller, sink = smtp_server
    delivery = Delivery(parse_delivery_config({"email": {
        "gateway": "smtp", "host": "127.0.0.1", "port": controller.port, "security": "none",
        "from": "MFA <mfa@trust.example>"}}))
    ctx = FactorContext(store=store, keys=keys, delivery=delivery, clock=clock, issuer="NHS Trust")

    method, receipt = codes.add_contact(ctx, user.id, "email", ADDRESS)
    assert not method.confirmed and method.name == "email a•••@nhs.net"
    assert (receipt.channel, receipt.gateway, receipt.destination_hint) == ("email", "smtp", "a•••@nhs.net")
    assert codes.prompt_for(method, receipt) == "Enter the code we emailed to a•••@nhs.net"
    assert len(sink.envelopes) == 1
    envelope = sink.envelopes[0]
    assert envelope.mail_from == "mfa@trust.example"
    assert envelope.rcpt_tos == ["alice.smith@nhs.net"]
    mail, code = mail_code(envelope)
    assert "confirm" in mail["Subject"].lower()

    result = codes.confirm_contact(ctx, user.id, "email", code)
    assert result.ok, result.message
    assert result.method.confirmed and result.method.preferred

    clock.advance(31)
    receipt = codes.send_code(ctx, result.method)
    assert len(sink.envelopes) == 2
    mail, code = mail_code(sink.envelopes[1])
    assert mail["Subject"] == "Your sign-in code"
    ok = codes.verify_code(ctx, result.method, code)
    assert ok.ok and ok.reason is None and ok.kind == "email"
    again = codes.verify_code(ctx, result.method, code)
    assert not again.ok and again.reason is Reason.CODE_REPLAYED
    assert "already used" in again.message


@pytest.mark.parametrize("channel", ["sms", "voice", "messaging"])
def test_phone_channels_through_a_real_http_gateway(store, keys, clock, user, http_gateways, channel):
    gateway = http_gateways()
    delivery = Delivery(parse_delivery_config({channel: {"gateway": "http", "url": gateway.url}}))
    ctx = FactorContext(store=store, keys=keys, delivery=delivery, clock=clock, issuer="NHS Trust")

    method, receipt = codes.add_contact(ctx, user.id, channel, PHONE)
    assert method.name == f"{channel} +44•••••123"
    assert (receipt.channel, receipt.gateway, receipt.message_id) == (channel, "http", "msg-1")
    assert gateway.requests[-1]["to"] == PHONE_E164
    assert codes.confirm_contact(ctx, user.id, channel, gateway.last_code()).ok
    method = store.get_method(method.id)
    assert codes.contact(ctx, method) == (channel, PHONE_E164)

    clock.advance(30)
    receipt = codes.send_code(ctx, method)
    assert len(gateway.requests) == 2 and gateway.requests[-1]["channel"] == channel
    if channel == "voice":
        assert "gather" in gateway.requests[-1]
        assert codes.prompt_for(method, receipt) == \
            "Answer the call to +44•••••123 and enter the code it reads out"
    code = gateway.last_code()
    assert codes.verify_code(ctx, method, code).ok
    assert codes.verify_code(ctx, method, code).reason is Reason.CODE_REPLAYED
    assert challenges(store, method)[-1]["channel"] == channel


def test_messaging_falls_back_to_sms_when_its_gateway_fails(store, keys, clock, user, http_gateways):
    broken, sms = http_gateways(status=500), http_gateways()
    delivery = Delivery(parse_delivery_config({
        "messaging": {"gateway": "http", "url": broken.url}, "sms": {"gateway": "http", "url": sms.url},
        "fallback": {"messaging": "sms"}}))
    ctx = FactorContext(store=store, keys=keys, delivery=delivery, clock=clock)

    method, receipt = codes.add_contact(ctx, user.id, "messaging", PHONE)
    assert (receipt.channel, receipt.fell_back_from) == ("sms", "messaging")
    assert len(broken.requests) == 1 and len(sms.requests) == 1
    assert codes.confirm_contact(ctx, user.id, "messaging", sms.last_code()).ok
    method = store.get_method(method.id)

    clock.advance(30)
    receipt = codes.send_code(ctx, method)
    assert receipt.channel == "sms" and receipt.fell_back_from == "messaging"
    prompt = codes.prompt_for(method, receipt)
    assert prompt.startswith("Enter the code sent to +44•••••123") and "could not" in prompt
    row = challenges(store, method)[-1]
    assert row["channel"] == "sms"
    sent = store.list_events(user.id, kind="code.sent", limit=1)[0]
    assert sent.detail["channel"] == "sms" and sent.detail["fell_back_from"] == "messaging"
    assert codes.verify_code(ctx, method, sms.last_code()).ok


def test_a_gateway_error_is_delivery_failed_and_stores_nothing(ctx, store, user, outbox,
                                                                http_gateways):
    method = enrolled(ctx, user, outbox)
    good = codes.send_code(ctx, method)
    assert good.gateway == "outbox"
    first = outbox.last_code()
    ctx.clock.advance(31)
    rows = len(challenges(store))
    ctx.delivery = Delivery(parse_delivery_config({"sms": {"gateway": "http",
                                                           "url": http_gateways(status=503).url}}))
    with pytest.raises(FactorError) as e:
        codes.send_code(ctx, method)
    assert e.value.reason is Reason.DELIVERY_FAILED
    assert "the gateway answered 503" in e.value.message
    assert len(challenges(store)) == rows
    # the failed send neither invalidated the earlier code nor counts against the throttle
    assert codes.verify_code(ctx, method, first).ok
    ctx.delivery = outbox_delivery(outbox)
    codes.send_code(ctx, method)


# --------------------------------------------------------------------------- enrolment


def test_add_and_confirm_a_contact(ctx, store, user, outbox):
    method, receipt = codes.add_contact(ctx, user.id, "sms", PHONE)
    assert not method.confirmed and method.kind == "sms"
    message = outbox.new()[0]
    assert message["purpose"] == "enrol" and message["to"] == PHONE_E164
    assert re.fullmatch(r"\d{6}", message["code"])
    assert codes.prompt_for(method, receipt) == "Enter the code sent to +44•••••123"
    started = store.list_events(user.id, kind="enrol.sms")[0]
    assert started.outcome == "started" and started.detail["destination_hint"] == "+44•••••123"

    # not usable before it is confirmed
    with pytest.raises(FactorError) as e:
        codes.send_code(ctx, method)
    assert e.value.reason is Reason.NOT_CONFIRMED
    assert codes.verify_code(ctx, method, message["code"]).reason is Reason.NOT_CONFIRMED

    wrong = codes.confirm_contact(ctx, user.id, "sms", other(message["code"]))
    assert not wrong.ok and wrong.reason is Reason.WRONG_CODE and wrong.tries_left == 9
    result = codes.confirm_contact(ctx, user.id, "sms", message["code"])
    assert result.ok and result.method.confirmed and result.method.preferred
    assert store.list_events(user.id, kind="enrol.sms")[0].outcome == "success"

    # a second contact is confirmed but does not take over as preferred
    ctx.clock.advance(1)
    second, _ = codes.add_contact(ctx, user.id, "email", ADDRESS, name="work email")
    assert second.name == "work email"
    confirmed = codes.confirm_contact(ctx, user.id, "email", outbox.last_code())
    assert confirmed.ok and not confirmed.method.preferred
    assert store.preferred_method(user.id).id == method.id

    contacts = codes.list_contacts(ctx, user.id)
    assert [(c.channel, c.destination, c.hint) for c in contacts] == [
        ("sms", PHONE_E164, "+44•••••123"), ("email", "alice.smith@nhs.net", "a•••@nhs.net")]
    assert contacts[0].to_json()["destination"] == "+44•••••123"

    # the full destinations are personal data: the audit log has the masked ones only
    text = json.dumps([ev.detail for ev in store.list_events(user.id, limit=1000)])
    assert "900123" not in text and "alice.smith" not in text


def test_an_enrolment_code_does_not_log_in(ctx, store, user, outbox):
    method, _ = codes.add_contact(ctx, user.id, "sms", PHONE)
    enrol = outbox.last_code()
    assert codes.confirm_contact(ctx, user.id, "sms", enrol).ok
    method = store.get_method(method.id)
    # the enrolment code was for enrolment only
    result = codes.verify_code(ctx, method, enrol)
    assert result.reason is Reason.WRONG_CODE and "no code was sent" in result.message


def test_readding_a_pending_contact_replaces_it(ctx, store, user, outbox):
    first, _ = codes.add_contact(ctx, user.id, "sms", PHONE)
    old = outbox.last_code()
    with pytest.raises(FactorError) as e:  # re-adding at once is a resend, throttled
        codes.add_contact(ctx, user.id, "sms", "+44 7700 900123")
    assert e.value.reason is Reason.RESEND_THROTTLED
    ctx.clock.advance(31)
    second, _ = codes.add_contact(ctx, user.id, "sms", "+44 7700 900123")
    new = outbox.last_code()
    assert [m.id for m in store.list_methods(user.id)] == [second.id] != [first.id]
    if new != old:
        assert codes.confirm_contact(ctx, user.id, "sms", old).reason is Reason.WRONG_CODE
    assert codes.confirm_contact(ctx, user.id, "sms", new).ok
    # the earlier sends still count: 2 of the 5 allowed in the window
    assert len(challenges(store, second)) == 2

    ctx.clock.advance(31)
    with pytest.raises(FactorError) as e:
        codes.add_contact(ctx, user.id, "sms", PHONE)
    assert e.value.reason is Reason.ALREADY_ENROLLED and "already enrolled" in e.value.message


def test_confirm_without_a_pending_contact(ctx, user):
    result = codes.confirm_contact(ctx, user.id, "voice", "123456")
    assert not result.ok and result.reason is Reason.NO_CREDENTIAL


def test_bad_destinations_are_refused(ctx, store, user, outbox):
    for channel, destination in (("sms", "not a number"), ("email", "alice@"), ("voice", "123")):
        with pytest.raises(FactorError) as e:
            codes.add_contact(ctx, user.id, channel, destination)
        assert e.value.reason is Reason.METHOD_NOT_ALLOWED
    with pytest.raises(FactorError):
        codes.add_contact(ctx, user.id, "fax", PHONE)
    assert store.list_methods(user.id) == [] and outbox.all() == []


def test_delivery_failure_while_adding_leaves_no_contact(ctx, store, user, outbox):
    ctx.delivery = None
    with pytest.raises(FactorError) as e:
        codes.add_contact(ctx, user.id, "sms", PHONE)
    assert e.value.reason is Reason.DELIVERY_FAILED
    assert store.list_methods(user.id) == [] and challenges(store) == []
    ctx.delivery = Delivery(parse_delivery_config({"sms": {"gateway": "outbox"},
                                                   "outbox": {"dir": str(outbox.dir)}}))
    with pytest.raises(FactorError) as e:
        codes.add_contact(ctx, user.id, "voice", PHONE)
    assert e.value.reason is Reason.DELIVERY_FAILED and "no gateway configured for voice" in e.value.message
    assert store.list_methods(user.id) == []
    assert store.list_events(user.id, kind="enrol.voice")[0].outcome == "failure"


def test_list_and_remove_contacts(ctx, store, user, outbox):
    sms = enrolled(ctx, user, outbox)
    enrolled(ctx, user, outbox, destination="07700 900456", name="mobile 2")
    enrolled(ctx, user, outbox, channel="email", destination=ADDRESS)
    assert [c.method.name for c in codes.list_contacts(ctx, user.id)] == [
        "sms +44•••••123", "mobile 2", "email a•••@nhs.net"]
    with pytest.raises(FactorError) as e:
        codes.remove_contact(ctx, user.id, "sms")
    assert e.value.reason is Reason.AMBIGUOUS
    removed = codes.remove_contact(ctx, user.id, "sms", "Mobile 2")
    assert removed.name == "mobile 2"
    assert codes.remove_contact(ctx, user.id, "sms").id == sms.id
    with pytest.raises(FactorError) as e:
        codes.remove_contact(ctx, user.id, "sms")
    assert e.value.reason is Reason.NO_CREDENTIAL
    assert [c.channel for c in codes.list_contacts(ctx, user.id)] == ["email"]
    assert store.list_events(user.id, kind="remove.sms")[0].detail == {"method": "sms +44•••••123"}


def test_same_mask_different_numbers_get_distinct_names(ctx, user, outbox):
    a = enrolled(ctx, user, outbox, destination="07700 900123")
    b = enrolled(ctx, user, outbox, destination="07711 111123")
    assert a.name == "sms +44•••••123" and b.name == "sms +44•••••123 (2)"


# --------------------------------------------------------------------------- codes


def test_code_format_and_what_is_stored(ctx, store, keys, user, outbox, monkeypatch):
    method = enrolled(ctx, user, outbox)
    monkeypatch.setattr(codes.secrets, "randbelow", lambda n: 42)
    receipt = codes.send_code(ctx, method)
    assert outbox.last_code() == "000042"
    row = challenges(store, method)[-1]
    assert bytes(row["code_hash"]) == keys.code_hash(f"otp:{method.id}:login", "000042")
    assert (row["purpose"], row["created_at"], row["expires_at"], row["used_at"], row["channel"]) == \
        ("login", ctx.now(), ctx.now() + 600, None, "sms")
    sent = store.list_events(user.id, kind="code.sent", limit=1)[0]
    assert sent.outcome == "success"
    assert sent.detail == {"method": method.name, "channel": "sms", "fell_back_from": None,
                           "destination_hint": "+44•••••123", "purpose": "login", "gateway": "outbox",
                           "expires_in": 600, "code_length": 6}
    assert receipt.message_id
    # spaces and dashes do not matter
    assert codes.verify_code(ctx, method, " 000-042 ").ok


def test_code_length_follows_the_rules(ctx, user, outbox):
    ctx.codes = CodeRules(length=8)
    method = enrolled(ctx, user, outbox)
    codes.send_code(ctx, method)
    code = outbox.last_code()
    assert re.fullmatch(r"\d{8}", code)
    assert codes.verify_code(ctx, method, code).ok


def test_wrong_code_counts(ctx, store, user, outbox):
    method = enrolled(ctx, user, outbox)
    codes.send_code(ctx, method)
    code = outbox.last_code()
    result = codes.verify_code(ctx, method, other(code))
    assert not result.ok and result.reason is Reason.WRONG_CODE
    assert result.message.startswith("wrong code") and result.tries_left == 9
    assert challenges(store, method)[-1]["attempts"] == 1
    assert codes.verify_code(ctx, method, "not digits").reason is Reason.WRONG_CODE
    assert codes.verify_code(ctx, method, code).ok  # a success clears the count


def test_no_code_sent(ctx, user, outbox):
    method = enrolled(ctx, user, outbox)
    result = codes.verify_code(ctx, method, "123456")
    assert result.reason is Reason.WRONG_CODE and "no code was sent" in result.message


def test_expired_code(ctx, user, outbox):
    method = enrolled(ctx, user, outbox)
    codes.send_code(ctx, method)
    code = outbox.last_code()
    ctx.clock.advance(600)
    result = codes.verify_code(ctx, method, code)
    assert result.reason is Reason.CODE_EXPIRED
    assert result.message.startswith("this code has expired: ask for a new one")


def test_only_the_newest_code_works(ctx, store, user, outbox, monkeypatch):
    method = enrolled(ctx, user, outbox)
    sent = iter([111111, 222222])
    monkeypatch.setattr(codes.secrets, "randbelow", lambda n: next(sent))
    codes.send_code(ctx, method)
    ctx.clock.advance(30)
    codes.send_code(ctx, method)
    first, second = [m["code"] for m in outbox.new()]
    rows = challenges(store, method)
    assert rows[-2]["used_at"] == ctx.now() and rows[-1]["used_at"] is None
    assert codes.verify_code(ctx, method, first).reason is Reason.WRONG_CODE
    assert codes.verify_code(ctx, method, second).ok


def test_resend_throttling(ctx, store, user, outbox):
    method = enrolled(ctx, user, outbox)
    codes.send_code(ctx, method)
    ctx.clock.advance(12)
    with pytest.raises(FactorError) as e:
        codes.send_code(ctx, method)
    assert e.value.reason is Reason.RESEND_THROTTLED
    assert e.value.message == "a code was sent 12 s ago: wait 18 s before asking for another"
    assert store.list_events(user.id, kind="code.sent", limit=1)[0].outcome == "refused"

    for _ in range(4):  # 5 sends in the window are allowed
        ctx.clock.advance(30)
        codes.send_code(ctx, method)
    ctx.clock.advance(100)
    with pytest.raises(FactorError) as e:
        codes.send_code(ctx, method)
    assert e.value.reason is Reason.RESEND_THROTTLED
    # the first of the five was sent 12 + 4*30 + 100 = 232 s ago: it leaves the window in 368 s
    assert e.value.message == "5 codes were sent in the last 10 min: wait 7 min before asking for another"
    assert len(outbox.new()) == 5
    ctx.clock.advance(368)
    codes.send_code(ctx, method)


def test_delivery_not_configured(ctx, store, user, outbox):
    method = enrolled(ctx, user, outbox)
    ctx.delivery = None
    rows = len(challenges(store))
    with pytest.raises(FactorError) as e:
        codes.send_code(ctx, method)
    assert e.value.reason is Reason.DELIVERY_FAILED
    assert len(challenges(store)) == rows
    assert store.list_events(user.id, kind="code.sent", limit=1)[0].outcome == "failure"


def test_lockout_after_ten_wrong_codes(ctx, store, user, outbox):
    method = enrolled(ctx, user, outbox)
    codes.send_code(ctx, method)
    code = outbox.last_code()
    for i in range(10):
        result = codes.verify_code(ctx, method, other(code))
        assert result.reason is Reason.WRONG_CODE
    assert result.tries_left == 0 and result.locked_until is not None and "locked" in result.message
    right = codes.verify_code(ctx, method, code)
    assert not right.ok and right.reason is Reason.METHOD_LOCKED
    ctx.clock.advance(31)
    with pytest.raises(FactorError) as e:  # and no more codes are sent to it
        codes.send_code(ctx, method)
    assert e.value.reason is Reason.METHOD_LOCKED
    assert store.list_events(user.id, kind="lockout.sms")[0].outcome == "locked"


def test_concurrent_verification_succeeds_once(ctx, db_path, keys, clock, user, outbox):
    method = enrolled(ctx, user, outbox)
    codes.send_code(ctx, method)
    code = outbox.last_code()
    stores = [Store.open(db_path, clock=clock) for _ in range(2)]
    contexts = [FactorContext(store=s, keys=keys, clock=clock) for s in stores]
    barrier = threading.Barrier(2)
    results = []

    def verify(c):
        barrier.wait()
        results.append(codes.verify_code(c, method, code))

    threads = [threading.Thread(target=verify, args=(c,)) for c in contexts]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        for s in stores:
            s.close()
    assert sorted(r.ok for r in results) == [False, True]
    assert [r.reason for r in results if not r.ok] == [Reason.CODE_REPLAYED]


def test_the_code_is_never_in_clear_in_the_store(ctx, store, db_path, user, outbox):
    method = enrolled(ctx, user, outbox)
    codes.send_code(ctx, method)
    code = outbox.last_code()
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{db_path}{suffix}")
        if p.exists():
            assert code.encode() not in p.read_bytes(), p.name
    assert codes.verify_code(ctx, method, code).ok
    for ev in store.list_events(user.id, limit=1000):
        assert code not in json.dumps(ev.detail)


def test_the_code_is_never_logged(ctx, user, outbox, caplog):
    caplog.set_level(logging.DEBUG)
    method, receipt = codes.add_contact(ctx, user.id, "sms", PHONE)
    enrol = outbox.last_code()
    codes.confirm_contact(ctx, user.id, "sms", enrol)
    ctx.clock.advance(31)
    codes.send_code(ctx, method)
    code = outbox.last_code()
    codes.verify_code(ctx, method, other(code))
    codes.verify_code(ctx, method, code)
    codes.verify_code(ctx, method, code)
    assert caplog.records, "the sends should be logged (without the codes)"
    for record in caplog.records:
        text = record.getMessage()
        assert enrol not in text and code not in text
        assert "900123" not in text  # nor the full phone number
    assert "+44•••••123" in caplog.text


def test_prompts():
    method = None
    r = Receipt(channel="sms", gateway="http", message_id="1", fell_back_from=None,
                destination_hint="07•••••123")
    assert codes.prompt_for(method, r) == "Enter the code sent to 07•••••123"
    r = Receipt(channel="email", gateway="smtp", message_id="1", fell_back_from=None,
                destination_hint="a•••@nhs.net")
    assert codes.prompt_for(method, r) == "Enter the code we emailed to a•••@nhs.net"
    r = Receipt(channel="voice", gateway="http", message_id="1", fell_back_from=None,
                destination_hint="07•••••123")
    assert codes.prompt_for(method, r) == "Answer the call to 07•••••123 and enter the code it reads out"
    r = Receipt(channel="messaging", gateway="http", message_id="1", fell_back_from=None,
                destination_hint="07•••••123")
    assert codes.prompt_for(method, r) == "Enter the code sent to 07•••••123 in your messaging app"
    r = Receipt(channel="sms", gateway="http", message_id="1", fell_back_from="messaging",
                destination_hint="07•••••123")
    assert codes.prompt_for(method, r) == \
        "Enter the code sent to 07•••••123 (sent by SMS: the messaging app could not be reached)"
