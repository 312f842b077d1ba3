"""Delivery of one-time codes (token_agent/delivery.py).

Email goes through a real SMTP server (aiosmtpd, in a thread); SMS, voice and messaging
through a real HTTP server (http.server, in a thread). Both listen on 127.0.0.1 on a port
the kernel chose (bound to port 0), and both are shut down at teardown.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import os
import re
import socket
import stat
import threading
import tomllib
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from token_agent.delivery import (
    CHANNELS,
    Delivery,
    DeliveryConfigError,
    DeliveryError,
    Message,
    Receipt,
    mask_destination,
    parse_delivery_config,
    validate_destination,
)

CODE = "480193"
SPOKEN = "4, 8, 0, 1, 9, 3"
TOKEN = "tok-7Qx9-very-secret-gateway-token"
PASSWORD = "pw-S3cr3t-smtp-password"
PHONE = "07700900123"
E164 = "+447700900123"
ADDRESS = "alice.smith@nhs.net"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(toml: str):
    return parse_delivery_config(tomllib.loads(toml).get("delivery"))


# --------------------------------------------------------------------------- SMTP server


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.content, policy=email.policy.default)


class RecordingHandler:
    """Stores what arrives; refuses the recipients in ``refuse`` with 550."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.refuse: set[str] = set()
        self.logins: list[str] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return "550 5.1.1 Mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"


class PortZeroController(Controller):
    """aiosmtpd's Controller, bound to port 0: the port is read back once it listens."""

    def _trigger_server(self):
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@pytest.fixture
def smtp_factory():
    started: list[Controller] = []

    def start(**smtp_kwargs) -> tuple[PortZeroController, RecordingHandler]:
        handler = RecordingHandler()
        controller = PortZeroController(handler, hostname="127.0.0.1", port=0, ready_timeout=5,
                                        **smtp_kwargs)
        controller.start()
        started.append(controller)
        return controller, handler

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture
def smtp_server(smtp_factory):
    return smtp_factory()


def email_config(port: int, extra: str = "") -> str:
    return f"""
[delivery]
sender_name = "NHS Trust"
[delivery.email]
host = "127.0.0.1"
port = {port}
security = "none"
from = "MFA <noreply@trust.nhs.example>"
timeout = 5
{extra}
"""


# --------------------------------------------------------------------------- HTTP server


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: dict


class _Recorder(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        srv: GatewayServer = self.server  # type: ignore[assignment]
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        srv.requests.append(Request(self.command, self.path,
                                    {k.lower(): v for k, v in self.headers.items()}, json.loads(raw)))
        if srv.hang:
            srv.release.wait(5)
            return
        self.send_response(srv.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(srv.reply)))
        for name, value in srv.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(srv.reply)

    def log_message(self, format, *args) -> None:  # noqa: A002
        pass


class GatewayServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status: int, reply: bytes, hang: bool):
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.status, self.reply, self.hang = status, reply, hang
        self.requests: list[Request] = []
        self.release = threading.Event()
        self.extra_headers: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/messages"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (the timeout test) is not news


@pytest.fixture
def http_factory():
    servers: list[tuple[GatewayServer, threading.Thread]] = []

    def start(status: int = 200, reply: bytes | None = None, hang: bool = False) -> GatewayServer:
        if reply is None:
            reply = json.dumps({"id": f"gw-{len(servers) + 1}"}).encode()
        server = GatewayServer(status, reply, hang)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "gateway.token"
    p.write_text(TOKEN + "\n")
    p.chmod(0o600)
    return p


def phone_table(channel: str, url: str, token: Path | None = None, timeout: float = 5) -> str:
    line = f'token_file = "{token}"\n' if token else ""
    return f'[delivery.{channel}]\nurl = "{url}"\n{line}timeout = {timeout}\n'


# --------------------------------------------------------------------------- messages


def test_sms_text_is_the_short_form():
    m = Message("sms", PHONE, "123456", sender_name="NHS Trust")
    assert m.text() == "123456 is your NHS Trust sign-in code. It expires in 10 minutes. Never share it."
    assert m.subject() is None


def test_voice_script_spells_the_code_twice():
    m = Message("voice", PHONE, "123456", sender_name="NHS Trust")
    assert m.text() == ("This is NHS Trust. Your sign-in code is 1, 2, 3, 4, 5, 6. Again: 1, 2, 3, 4, 5, 6. "
                        "Enter it on the screen, then press hash.")


def test_email_has_subject_and_body():
    m = Message("email", ADDRESS, CODE, ttl_seconds=300, sender_name="NHS Trust")
    assert m.subject() == "Your sign-in code"
    body = m.text()
    assert CODE in body and "5 minutes" in body
    assert "If you did not try to sign in, tell your IT service desk." in body
    enrol = Message("email", ADDRESS, CODE, purpose="enrol")
    assert "confirm this email address" in enrol.text() and enrol.subject() != m.subject()


def test_expiry_wording():
    assert "1 minute." in Message("sms", PHONE, CODE, ttl_seconds=119).text()
    assert "45 seconds" in Message("sms", PHONE, CODE, ttl_seconds=45).text()


def test_message_repr_hides_the_code_and_destination():
    m = Message("sms", PHONE, CODE)
    assert CODE not in repr(m) and PHONE not in repr(m) and "07•••••123" in repr(m)


@pytest.mark.parametrize("kwargs", [
    {"channel": "fax"}, {"code": "12a456"}, {"code": "99"}, {"purpose": "reset"},
    {"ttl_seconds": 0}, {"sender_name": "NHS\nTrust"}, {"destination": " "},
])
def test_bad_messages_are_refused(kwargs):
    args = {"channel": "sms", "destination": PHONE, "code": CODE, **kwargs}
    with pytest.raises(ValueError) as info:
        Message(**args)
    assert args["code"] not in str(info.value)


# --------------------------------------------------------------------------- destinations


@pytest.mark.parametrize("raw,expected", [
    ("07700900123", "+447700900123"),
    ("07700 900 123", "+447700900123"),
    ("+44 (0)7700 900123", "+447700900123"),
    ("+44 07700 900123", "+447700900123"),
    ("0044 7700 900123", "+447700900123"),
    ("+447700900123", "+447700900123"),
    ("+1 (202) 555-0143", "+12025550143"),
])
def test_phone_numbers_are_normalised_to_e164(raw, expected):
    for channel in ("sms", "voice", "messaging"):
        assert validate_destination(channel, raw) == expected


@pytest.mark.parametrize("raw,expected", [
    ("020 7946 0018", "+442079460018"),    # London: an office phone
    ("01632 960 001", "+441632960001"),    # a geographic landline
    ("+44 (0)3069 990000", "+443069990000"),  # 03: non-geographic, like a landline
    ("0808 157 0192", "+448081570192"),    # freephone
])
def test_landlines_are_refused_for_texts_but_not_for_calls(raw, expected):
    # NHSmail: "The use of the office phone option is not recommended or supported"
    assert validate_destination("voice", raw) == expected
    for channel in ("sms", "messaging"):
        with pytest.raises(ValueError) as info:
            validate_destination(channel, raw)
        assert str(info.value) == ("Office phones and landlines cannot receive text messages: "
                                   "enter a mobile number (UK mobile numbers start 07)")
    # a mobile, and a foreign number (whose kind cannot be told), are accepted
    assert validate_destination("sms", "07700 900123") == "+447700900123"
    assert validate_destination("sms", "+1 202 555 0143") == "+12025550143"


@pytest.mark.parametrize("raw", ["", "hello", "12345678", "+0447700900123", "+12", "0770090012345",
                                 "+44 7700 900123 ext 4", "07700900123; rm", "+٤٤٧٧٠٠٩٠٠١٢٣"])
def test_garbage_phone_numbers_are_refused(raw):
    with pytest.raises(ValueError, match="phone number") as info:
        validate_destination("sms", raw)
    assert raw.strip() == "" or raw not in str(info.value)


@pytest.mark.parametrize("raw,expected", [
    ("alice.smith@nhs.net", "alice.smith@nhs.net"),
    ("  Alice+MFA@Trust.NHS.UK ", "Alice+MFA@trust.nhs.uk"),
])
def test_email_addresses_are_checked(raw, expected):
    assert validate_destination("email", raw) == expected


@pytest.mark.parametrize("raw", ["alice", "alice@", "@nhs.net", "alice@nhs", "a b@nhs.net", "a@@nhs.net",
                                 "Alice <alice@nhs.net>", "alice@nhs..net", "alice.@nhs.net",
                                 "alice@-nhs.net", "alice@nhs.net\r\nBcc: x@y.example"])
def test_bad_email_addresses_are_refused(raw):
    with pytest.raises(ValueError, match="email address"):
        validate_destination("email", raw)


def test_unknown_channel_is_refused():
    with pytest.raises(ValueError, match="unknown channel"):
        validate_destination("pager", PHONE)


@pytest.mark.parametrize("channel,raw,expected", [
    ("sms", "07700900123", "07•••••123"),
    ("voice", "+447700900123", "+44•••••123"),
    ("messaging", "+12025550143", "+12•••••143"),
    ("sms", "123", "•••••"),
    ("email", "alice@nhs.net", "a•••@nhs.net"),
    ("email", "nonsense", "•••"),
])
def test_mask_destination(channel, raw, expected):
    assert mask_destination(channel, raw) == expected


# --------------------------------------------------------------------------- configuration


def test_no_table_means_no_channels():
    assert Delivery(parse_delivery_config(None)).configured_channels() == ()
    assert Delivery(parse_delivery_config({})).configured_channels() == ()


def test_full_config_is_parsed(tmp_path):
    c = config(f"""
[delivery]
fallback = {{ messaging = "sms", sms = "voice" }}
sender_name = "NHS Trust"
[delivery.email]
host = "SMTP.trust.nhs.example"
username = "agent"
password_file = "{tmp_path}/smtp.secret"
from = "MFA <noreply@trust.nhs.example>"
[delivery.sms]
url = "https://gateway.example/v1/messages"
token_file = "{tmp_path}/sms.token"
timeout = 2.5
[delivery.voice]
gateway = "outbox"
[delivery.messaging]
url = "http://[::1]:8080/send"
[delivery.outbox]
dir = "{tmp_path}/outbox"
""")
    assert c.sender_name == "NHS Trust"
    email_cfg = c.channels["email"].smtp
    assert (email_cfg.host, email_cfg.port, email_cfg.security) == ("smtp.trust.nhs.example", 25, "starttls")
    assert email_cfg.envelope_from == "noreply@trust.nhs.example"
    sms = c.channels["sms"].http
    assert sms.timeout == 2.5 and sms.token_file == tmp_path / "sms.token"
    assert c.channels["voice"].gateway == "outbox" and c.outbox.dir == tmp_path / "outbox"
    assert c.fallback_chain("messaging") == ("messaging", "sms", "voice")
    assert Delivery(c).configured_channels() == CHANNELS


def test_tls_defaults_to_port_465():
    c = config('[delivery.email]\nhost = "smtp.example"\nsecurity = "tls"\nfrom = "a@b.example"\n')
    assert c.channels["email"].smtp.port == 465


def config_errors(toml: str) -> list[str]:
    with pytest.raises(DeliveryConfigError) as info:
        config(toml)
    assert isinstance(info.value, ValueError)
    for e in info.value.errors:
        assert e in str(info.value)
    return info.value.errors


def one_error(toml: str) -> str:
    errors = config_errors(toml)
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("toml,path,words", [
    ('[delivery.fax]\nurl = "https://x.example"', "delivery.fax:", "unknown table"),
    ('[delivery.smss]\nurl = "https://x.example"', "delivery.smss:", "did you mean sms?"),
    ('[delivery.sms]\nurl = "https://x.example"\ntimout = 5', "delivery.sms.timout:", "did you mean timeout?"),
    ('[delivery.email]\nhots = "x"\nfrom = "a@b.example"', "delivery.email.hots:", "did you mean host?"),
    ('[delivery.email]\nhost = "smtp.example"\nfrom = "a@b.example"\nusername = "u"\npassword = "hunter2"\n'
     'password_file = "/etc/x"', "delivery.email.password:", "password_file"),
    ('[delivery.sms]\nurl = "https://x.example"\ntoken = "abc"', "delivery.sms.token:", "token_file"),
    ('[delivery.sms]\nurl = "http://gateway.example/send"', "delivery.sms.url:", "https://"),
    ('[delivery.sms]\nurl = "ftp://gateway.example/send"', "delivery.sms.url:", "https://"),
    ('[delivery.sms]\nurl = "https://user:pw@gateway.example/send"', "delivery.sms.url:", "token_file"),
    ('[delivery.sms]\ngateway = "http"', "delivery.sms.url:", "missing"),
    ('[delivery.email]\nhost = "smtp.example"\nsecurity = "none"\nfrom = "a@b.example"',
     "delivery.email.security:", "only to a mail server on this machine"),
    ('[delivery.email]\nsecurity = "plain"\nfrom = "a@b.example"', "delivery.email.security:", "none or starttls or tls"),
    ('[delivery.email]\nfrom = "not an address"', "delivery.email.from:", "not an address"),
    ('[delivery.email]\nhost = "smtp.example"', "delivery.email.from:", "missing"),
    ('[delivery.email]\nport = 70000\nfrom = "a@b.example"', "delivery.email.port:", "1 to 65535"),
    ('[delivery.email]\nusername = "agent"\nfrom = "a@b.example"', "delivery.email.password_file:", "missing"),
    ('[delivery.email]\npassword_file = "relative/file"\nusername = "u"\nfrom = "a@b.example"',
     "delivery.email.password_file:", "absolute path"),
    ('[delivery.sms]\ngateway = "outbox"', "delivery.sms.gateway:", "[delivery.outbox]"),
    ('[delivery.sms]\ngateway = "smpp"\nurl = "https://x.example"', "delivery.sms.gateway:", "http or outbox"),
    ('[delivery.outbox]\n[delivery.sms]\ngateway = "outbox"', "delivery.outbox.dir:", "missing"),
    ('[delivery.sms]\nurl = "https://x.example"\ntimeout = 0', "delivery.sms.timeout:", "above 0"),
    ('[delivery.sms]\nurl = "https://x.example"\ntimeout = "10"', "delivery.sms.timeout:", "number of seconds"),
    ('[delivery.sms]\nurl = "https://x.example"\ntimeout = true', "delivery.sms.timeout:", "number of seconds"),
    ('[delivery.sms]\nurl = "https://x.example"\ntimeout = 3600', "delivery.sms.timeout:", "at most 120"),
    ('[delivery]\nsender_name = ""', "delivery.sender_name:", "non-empty"),
    ('[delivery]\nsms = "https://x.example"', "delivery.sms:", "must be a table"),
    ('[delivery]\nfallback = { messaging = "sms" }\n[delivery.messaging]\nurl = "https://x.example"',
     "delivery.fallback.messaging:", "[delivery.sms] is not configured"),
    ('[delivery]\nfallback = { sms = "pigeon" }\n[delivery.sms]\nurl = "https://x.example"',
     "delivery.fallback.sms:", "not a channel"),
    ('[delivery]\nfallback = { sms = "sms" }\n[delivery.sms]\nurl = "https://x.example"',
     "delivery.fallback.sms:", "itself"),
    ('[delivery]\nfallback = { smss = "voice" }\n[delivery.sms]\nurl = "https://x.example"\n'
     '[delivery.voice]\nurl = "https://x.example"', "delivery.fallback.smss:", "did you mean sms?"),
    ('[delivery]\nfallback = { email = "sms" }\n[delivery.email]\nfrom = "a@b.example"\n'
     '[delivery.sms]\nurl = "https://x.example"', "delivery.fallback.email:", "phone number"),
])
def test_each_config_error_names_its_path(toml, path, words):
    error = one_error(toml)
    assert error.startswith(path), error
    assert words in error, error


def test_a_fallback_cycle_is_a_config_error():
    error = one_error("""
[delivery]
fallback = { messaging = "sms", sms = "voice", voice = "messaging" }
[delivery.sms]
url = "https://x.example"
[delivery.voice]
url = "https://x.example"
[delivery.messaging]
url = "https://x.example"
""")
    assert error.startswith("delivery.fallback:") and "circle" in error
    assert "messaging -> sms -> voice -> messaging" in error


def test_secrets_are_not_repeated_in_config_errors():
    errors = config_errors("""
[delivery.email]
host = "smtp.example"
from = "a@b.example"
username = "agent"
password = "hunter2-secret"
[delivery.sms]
url = "https://agent:pw-in-url-secret@gateway.example/send"
token = "tok-secret"
""")
    text = "\n".join(errors)
    for secret in ("hunter2-secret", "pw-in-url-secret", "tok-secret"):
        assert secret not in text


def test_all_config_errors_are_reported_together():
    errors = config_errors("""
[delivery]
fallback = { messaging = "sms", sms = "messaging" }
sender_name = "NHS Trust"
[delivery.fax]
url = "https://x.example"
[delivery.email]
host = "smtp.trust.example"
security = "none"
password = "x"
from = "MFA <noreply@trust.example>"
timeout = -1
[delivery.sms]
url = "http://gateway.example/v1"
tiemout = 5
[delivery.messaging]
url = "https://gateway.example/v1"
[delivery.voice]
gateway = "outbox"
""")
    expected = [
        ("delivery.fax:", "unknown"),
        ("delivery.email.password:", "password_file"),
        ("delivery.email.timeout:", "above 0"),
        ("delivery.email.security:", "unencrypted"),
        ("delivery.sms.tiemout:", "did you mean timeout?"),
        ("delivery.sms.url:", "https://"),
        ("delivery.voice.gateway:", "[delivery.outbox]"),
        ("delivery.fallback:", "circle"),
    ]
    for path, words in expected:
        assert any(e.startswith(path) and words in e for e in errors), (path, errors)
    assert len(errors) == len(expected), errors


# --------------------------------------------------------------------------- email


def test_email_arrives_at_a_real_smtp_server(smtp_server):
    controller, handler = smtp_server
    delivery = Delivery(config(email_config(controller.port)))
    receipt = delivery.send(Message("email", "Alice.Smith@NHS.net", CODE))
    assert receipt == Receipt("email", "smtp", receipt.message_id, None, "A•••@nhs.net")
    [got] = handler.received
    assert got.mail_from == "noreply@trust.nhs.example"
    assert got.rcpt_tos == ["Alice.Smith@nhs.net"]
    mail = got.message
    assert mail["To"] == "Alice.Smith@nhs.net"
    assert mail["Subject"] == "Your sign-in code"
    assert mail["From"] == "MFA <noreply@trust.nhs.example>"
    assert mail["Message-ID"] == receipt.message_id and receipt.message_id.endswith("@trust.nhs.example>")
    body = mail.get_content()
    assert CODE in body and "10 minutes" in body and "NHS Trust" in body  # the policy's sender_name
    assert "If you did not try to sign in, tell your IT service desk." in body


def test_refused_recipient_is_a_delivery_error(smtp_server):
    controller, handler = smtp_server
    handler.refuse.add(ADDRESS)
    with pytest.raises(DeliveryError) as info:
        Delivery(config(email_config(controller.port))).send(Message("email", ADDRESS, CODE))
    assert info.value.channel == "email"
    message = str(info.value)
    assert message.startswith("could not send the code by email:")
    assert "refused the address a•••@nhs.net (550)" in message
    assert ADDRESS not in message and not handler.received


def test_nothing_listening_is_a_delivery_error():
    port = free_port()
    refused = rf"nothing is listening at 127\.0\.0\.1:{port} \(connection refused\)"
    with pytest.raises(DeliveryError, match=refused):
        Delivery(config(email_config(port))).send(Message("email", ADDRESS, CODE))


def test_silent_mail_server_times_out():
    with socket.socket() as listener:  # accepts connections (the kernel does) but never greets
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        toml = email_config(listener.getsockname()[1]).replace("timeout = 5", "timeout = 0.3")
        with pytest.raises(DeliveryError, match=r"did not answer within 0\.3 s"):
            Delivery(config(toml)).send(Message("email", ADDRESS, CODE))


def test_starttls_not_offered_is_a_delivery_error(smtp_server):
    controller, handler = smtp_server
    toml = email_config(controller.port).replace('security = "none"', 'security = "starttls"')
    with pytest.raises(DeliveryError, match="does not offer STARTTLS"):
        Delivery(config(toml)).send(Message("email", ADDRESS, CODE))
    assert not handler.received


@pytest.fixture
def smtp_with_auth(smtp_factory):
    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"agent" \
            and auth_data.password == PASSWORD.encode()
        return AuthResult(success=ok, handled=False)

    return smtp_factory(authenticator=authenticator, auth_require_tls=False)


def test_smtp_login_with_password_file(smtp_with_auth, tmp_path):
    controller, handler = smtp_with_auth
    secret = tmp_path / "smtp.secret"
    secret.write_text(PASSWORD + "\n")
    toml = email_config(controller.port, f'username = "agent"\npassword_file = "{secret}"')
    Delivery(config(toml)).send(Message("email", ADDRESS, CODE))
    assert len(handler.received) == 1

    secret.write_text("wrong-password\n")
    with pytest.raises(DeliveryError, match="did not accept the user name and password") as info:
        Delivery(config(toml)).send(Message("email", ADDRESS, CODE))
    assert "wrong-password" not in str(info.value) and len(handler.received) == 1


def test_missing_password_file_is_a_clear_error(smtp_server, tmp_path):
    controller, handler = smtp_server
    missing = tmp_path / "nope.secret"
    toml = email_config(controller.port, f'username = "agent"\npassword_file = "{missing}"')
    with pytest.raises(DeliveryError) as info:
        Delivery(config(toml)).send(Message("email", ADDRESS, CODE))
    assert str(info.value) == (f"could not send the code by email: the SMTP password file {missing} does not "
                               f"exist (password_file in [delivery.email])")
    assert not handler.received


# --------------------------------------------------------------------------- SMS, voice, messaging


def test_sms_is_posted_as_json_with_the_bearer_token(http_factory, token_file):
    server = http_factory()
    toml = '[delivery]\nsender_name = "NHS Trust"\n' + phone_table("sms", server.url, token_file)
    delivery = Delivery(config(toml))
    receipt = delivery.send(Message("sms", PHONE, CODE))
    assert receipt == Receipt("sms", "http", "gw-1", None, "+44•••••123")
    [req] = server.requests
    assert (req.method, req.path) == ("POST", "/v1/messages")
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.headers["content-type"] == "application/json"
    assert set(req.body) == {"channel", "to", "text", "reference"}
    assert req.body["channel"] == "sms" and req.body["to"] == E164
    assert req.body["text"] == (f"{CODE} is your NHS Trust sign-in code. "
                                f"It expires in 10 minutes. Never share it.")
    assert uuid.UUID(req.body["reference"]).version == 4


def test_messaging_is_posted_with_its_channel(http_factory):
    server = http_factory()
    toml = '[delivery]\nsender_name = "St Elsewhere"\n' + phone_table("messaging", server.url)
    delivery = Delivery(config(toml))
    receipt = delivery.send(delivery.message("messaging", E164, CODE, purpose="enrol", ttl_seconds=120))
    [req] = server.requests
    assert receipt.channel == "messaging"
    assert req.body["channel"] == "messaging" and req.body["to"] == E164
    assert req.body["text"] == (f"{CODE} is your St Elsewhere code to confirm this phone number. "
                                f"It expires in 2 minutes. Never share it.")
    assert "authorization" not in req.headers


def test_voice_call_says_the_digits_and_gathers_until_hash(http_factory, token_file):
    server = http_factory()
    delivery = Delivery(config(phone_table("voice", server.url, token_file)))
    delivery.send(Message("voice", PHONE, CODE, sender_name="NHS Trust"))
    [req] = server.requests
    assert set(req.body) == {"channel", "to", "say", "gather", "reference"}
    assert req.body["channel"] == "voice" and req.body["to"] == E164
    assert req.body["say"].count(SPOKEN) == 2 and "hash" in req.body["say"]
    assert req.body["say"].startswith("This is NHS Trust.")
    assert req.body["gather"] == {"finish_on_key": "#"}
    assert req.headers["authorization"] == f"Bearer {TOKEN}"


def test_gateway_without_an_id_gives_the_reference(http_factory):
    server = http_factory(reply=b'{"status": "queued"}')
    receipt = Delivery(config(phone_table("sms", server.url))).send(Message("sms", PHONE, CODE))
    assert receipt.message_id == server.requests[0].body["reference"]


def test_gateway_503_is_a_delivery_error(http_factory, token_file):
    server = http_factory(status=503, reply=b'{"error": "busy"}')
    with pytest.raises(DeliveryError) as info:
        Delivery(config(phone_table("sms", server.url, token_file))).send(Message("sms", PHONE, CODE))
    assert str(info.value) == "could not send the code by SMS: the gateway answered 503"
    assert info.value.channel == "sms" and len(server.requests) == 1


def test_gateway_401_points_at_the_token(http_factory, token_file):
    server = http_factory(status=401, reply=b"{}")
    with pytest.raises(DeliveryError, match=r"answered 401: check token_file in \[delivery.sms\]") as info:
        Delivery(config(phone_table("sms", server.url, token_file))).send(Message("sms", PHONE, CODE))
    assert TOKEN not in str(info.value)


def test_redirects_are_not_followed(http_factory, token_file):
    elsewhere = http_factory()
    server = http_factory(status=307, reply=b"{}")
    server.extra_headers["Location"] = elsewhere.url
    with pytest.raises(DeliveryError, match="answered 307 \\(a redirect, which is not followed"):
        Delivery(config(phone_table("sms", server.url, token_file))).send(Message("sms", PHONE, CODE))
    assert len(server.requests) == 1 and not elsewhere.requests  # the token went nowhere else


def test_gateway_answer_that_is_not_json_is_a_delivery_error(http_factory):
    server = http_factory(reply=f"<html>sent {CODE}</html>".encode())
    with pytest.raises(DeliveryError, match="not with JSON") as info:
        Delivery(config(phone_table("sms", server.url))).send(Message("sms", PHONE, CODE))
    assert CODE not in str(info.value)


def test_gateway_not_listening_is_a_delivery_error():
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/messages"
    with pytest.raises(DeliveryError, match=rf"nothing is listening at 127\.0\.0\.1:{port}"):
        Delivery(config(phone_table("sms", url))).send(Message("sms", PHONE, CODE))


def test_silent_gateway_times_out(http_factory):
    server = http_factory(hang=True)
    with pytest.raises(DeliveryError, match=r"did not answer within 0\.3 s"):
        Delivery(config(phone_table("sms", server.url, timeout=0.3))).send(Message("sms", PHONE, CODE))


def test_missing_token_file_is_a_clear_error(http_factory, tmp_path):
    server = http_factory()
    with pytest.raises(DeliveryError, match=r"the token file .*nope\.token does not exist \(token_file in"):
        delivery = Delivery(config(phone_table("sms", server.url, tmp_path / "nope.token")))
        delivery.send(Message("sms", PHONE, CODE))
    assert not server.requests


def test_unconfigured_channel_is_a_delivery_error(http_factory):
    server = http_factory()
    with pytest.raises(DeliveryError) as info:
        Delivery(config(phone_table("sms", server.url))).send(Message("voice", PHONE, CODE))
    assert str(info.value) == "no gateway configured for voice: add [delivery.voice] to the policy file"


def test_bad_destination_is_a_delivery_error_before_any_request(http_factory):
    server = http_factory()
    with pytest.raises(DeliveryError, match="not a phone number"):
        Delivery(config(phone_table("sms", server.url))).send(Message("sms", "call me", CODE))
    assert not server.requests


def fallback_config(messaging_url: str, sms_url: str, token: Path | None = None) -> str:
    return ('[delivery.fallback]\nmessaging = "sms"\n'
            + phone_table("messaging", messaging_url, token) + phone_table("sms", sms_url, token))


def test_messaging_falls_back_to_sms(http_factory, token_file):
    messaging, sms = http_factory(status=500, reply=b"{}"), http_factory()
    receipt = Delivery(config(fallback_config(messaging.url, sms.url, token_file))).send(
        Message("messaging", PHONE, CODE))
    assert receipt.channel == "sms" and receipt.fell_back_from == "messaging"
    assert receipt.gateway == "http" and receipt.message_id == "gw-2"
    assert [r.body["channel"] for r in messaging.requests] == ["messaging"]
    [req] = sms.requests
    assert req.body["channel"] == "sms" and req.body["to"] == E164 and CODE in req.body["text"]


def test_every_failure_is_listed_when_the_fallback_fails_too(http_factory):
    messaging, sms = http_factory(status=500, reply=b"{}"), http_factory(status=503, reply=b"{}")
    with pytest.raises(DeliveryError) as info:
        Delivery(config(fallback_config(messaging.url, sms.url))).send(Message("messaging", PHONE, CODE))
    assert str(info.value) == ("could not send the code by messaging app (the gateway answered 500), "
                               "nor by SMS (the gateway answered 503)")
    assert info.value.channel == "messaging"
    assert [c for c, _ in info.value.failures] == ["messaging", "sms"]


# --------------------------------------------------------------------------- outbox


def test_outbox_writes_a_private_json_file_atomically(tmp_path):
    outbox = tmp_path / "outbox"
    delivery = Delivery(config(f"""
[delivery]
sender_name = "NHS Trust"
[delivery.sms]
gateway = "outbox"
[delivery.email]
gateway = "outbox"
[delivery.outbox]
dir = "{outbox}"
"""))
    receipt = delivery.send(Message("sms", PHONE, CODE, purpose="enrol"))
    assert receipt.gateway == "outbox" and receipt.channel == "sms"
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o700
    [path] = list(outbox.iterdir())  # no temporary file left behind
    assert re.fullmatch(rf"\d{{8}}T\d{{12}}Z-{receipt.message_id}\.json", path.name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = json.loads(path.read_text())
    assert record == {"channel": "sms", "to": E164, "text": Message("sms", PHONE, CODE, purpose="enrol",
                                                                     sender_name="NHS Trust").text(),
                      "code": CODE, "purpose": "enrol", "created_at": record["created_at"],
                      "id": receipt.message_id}
    assert record["created_at"].endswith("Z")

    delivery.send(Message("email", ADDRESS, CODE))
    files = sorted(outbox.iterdir())
    assert len(files) == 2 and not any(f.name.startswith(".") for f in files)
    mail = json.loads(files[1].read_text())
    assert mail["subject"] == "Your sign-in code" and mail["to"] == ADDRESS


def test_outbox_open_to_other_users_is_refused(tmp_path):
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    os.chmod(outbox, 0o755)
    delivery = Delivery(config(f'[delivery.sms]\ngateway = "outbox"\n[delivery.outbox]\ndir = "{outbox}"\n'))
    with pytest.raises(DeliveryError, match="open to other users"):
        delivery.send(Message("sms", PHONE, CODE))
    assert list(outbox.iterdir()) == []


# --------------------------------------------------------------------------- logging


def test_no_code_token_or_password_is_logged(caplog, smtp_with_auth, http_factory, token_file, tmp_path):
    caplog.set_level(logging.DEBUG)
    controller, handler = smtp_with_auth
    secret = tmp_path / "smtp.secret"
    secret.write_text(PASSWORD + "\n")
    messaging, sms, voice = http_factory(status=500, reply=b"{}"), http_factory(), http_factory()
    delivery = Delivery(config(
        email_config(controller.port, f'username = "agent"\npassword_file = "{secret}"')
        + fallback_config(messaging.url, sms.url, token_file)
        + phone_table("voice", voice.url, token_file)))

    assert delivery.send(Message("email", ADDRESS, CODE)).channel == "email"
    assert delivery.send(Message("messaging", PHONE, CODE)).channel == "sms"
    assert delivery.send(Message("voice", PHONE, CODE)).channel == "voice"
    messaging.status = 503
    sms.status = 500
    with pytest.raises(DeliveryError) as info:
        delivery.send(Message("messaging", PHONE, CODE))
    assert len(handler.received) == 1 and len(sms.requests) == 2 and len(voice.requests) == 1

    # the SMTP server's own debug log ("mail.log") plays the user's mailbox: it shows the mail
    ours = [r for r in caplog.records if not r.name.startswith("mail.log")]
    texts = [r.getMessage() + (r.exc_text or "") for r in ours] + [str(info.value)]
    assert any("sms" in t and "+44•••••123" in t for t in texts)  # the log says something
    assert any(r.name == "token_agent.delivery" and r.levelno == logging.WARNING for r in ours)
    for text in texts:
        for secret_text in (CODE, SPOKEN, TOKEN, PASSWORD, PHONE, E164, ADDRESS):
            assert secret_text not in text, (secret_text, text)


def test_the_module_docstring_example_is_a_valid_delivery_table():
    """The `[delivery]` example in token_agent/delivery.py's docstring is accepted on its own
    (its fallback names a channel it configures)."""
    import re

    import token_agent.delivery as module

    example = re.search(r"```toml\n(.*?)```", module.__doc__, re.S).group(1)
    parsed = config(example)
    assert parsed.fallback_chain("messaging") == ("messaging", "sms")
