"""Codes sent to a user's contacts, as clinicians meet them (issue 12, "The seeds' flows"):
each contact (a mobile and an "alternate phone") is its own choice at login and the
preferred one is used; scripted first-login enrolment honours ``--second sms``; the first
login code after an enrolment is not throttled by the enrolment's own code (a resend still
is); a contact named twice is a conflict (exit 9).

Everything goes through the real `token-agent` command (a subprocess; a pty where the menu
is shown to a person) or the real service on its socket, with texts delivered to a real HTTP
server standing in for the SMS gateway (``tests/test_delivery.py``'s ``GatewayServer``)."""

from __future__ import annotations

import itertools
import json
import os
import pty
import queue
import re
import select
import subprocess
import threading
import time

import pytest

from conftest import REPO_ROOT, token_agent_command
from test_cli_mfa import PASSWORD, Cli
from test_delivery import GatewayServer
from test_service import World, services, socket_dir  # noqa: F401 (fixtures)
from token_agent import exitcodes
from token_agent.service.client import ServiceError

#: a new device for each login: the policy asks for the second factor every time
DEVICES = (f"ward-pc-{n}" for n in itertools.count(1))
#: for the tests of the menu: no resend interval, so that they test the menu alone
#: and no unusual-login notices (each login is from a new device: its notice would be one more
#: text among the codes these tests count; the notices have their own tests, test_account_lib)
NO_RESEND_GAP = "[codes]\nresend_seconds = 0\n[unusual_login]\nenabled = false\n"
MOBILE, MOBILE_E164 = "07700900123", "+447700900123"
ALTERNATE, ALTERNATE_E164 = "07700900456", "+447700900456"


@pytest.fixture
def gateway():
    server = GatewayServer(200, json.dumps({"id": "gw-1"}).encode(), False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def delivery_policy(gateway: GatewayServer, extra: str = "") -> str:
    return (f'{extra}\n[delivery]\nsender_name = "NHS Trust"\n'
            f'[delivery.sms]\nurl = "{gateway.url}"\ntimeout = 5\n')


def code_of(request) -> str:
    return re.search(r"(?<!\d)(\d{6})(?!\d)", request.body["text"]).group(1)


def wait_for_text(gateway: GatewayServer, count: int, timeout: float = 20.0):
    """The ``count``-th text the gateway received (waits for it)."""
    deadline = time.monotonic() + timeout
    while len(gateway.requests) < count:
        assert time.monotonic() < deadline, f"no text #{count}: {gateway.requests}"
        time.sleep(0.05)
    return gateway.requests[count - 1]


@pytest.fixture
def cli(tmp_path, gateway) -> Cli:
    c = Cli(tmp_path)
    c.policy.write_text(delivery_policy(gateway, NO_RESEND_GAP))
    return c


def add_contact(cli: Cli, gateway: GatewayServer, number: str, name: str) -> None:
    sent = len(gateway.requests)
    cli("enrol", "sms", "--user", "alice", "--to", number, "--name", name, "--json")
    cli("enrol", "sms", "--user", "alice", "--name", name, "--confirm",
        code_of(wait_for_text(gateway, sent + 1)))


def alice_with_two_phones(cli: Cli, gateway: GatewayServer) -> None:
    cli("users", "add", "alice")
    cli("enrol", "password", "--user", "alice", "--password-stdin", input=PASSWORD + "\n")
    add_contact(cli, gateway, MOBILE, "mobile")
    add_contact(cli, gateway, ALTERNATE, "alternate phone")


class Login:
    """`token-agent login ...` as a person answers it on standard input (not a terminal):
    the password, then, when the text arrives at the gateway, its code."""

    def __init__(self, cli: Cli, *args: str) -> None:
        self.proc = subprocess.Popen(token_agent_command() + ["login", "--user", "alice",
                                                              "--device", "unmanaged",
                                                              "--device-id", next(DEVICES),
                                                              *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=cli.env,
                                     cwd=REPO_ROOT)
        self.lines: queue.Queue = queue.Queue()
        self.err = ""
        threading.Thread(target=lambda: [self.lines.put(x) for x in
                                         iter(self.proc.stderr.readline, "")]
                         + [self.lines.put(None)], daemon=True).start()

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait_for(self, pattern: str) -> re.Match:
        while True:
            line = self.lines.get(timeout=30)
            assert line is not None, f"{pattern!r} never came:\n{self.err}"
            self.err += line
            found = re.search(pattern, line)
            if found:
                return found

    def finish(self) -> tuple[int, str]:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        out = self.proc.stdout.read()
        self.proc.wait(timeout=30)
        while (line := self.lines.get(timeout=30)) is not None:
            self.err += line
        return self.proc.returncode, out


def login_with_text(cli: Cli, gateway: GatewayServer, *args: str) -> tuple[int, str, str, str]:
    """A login answered with the password and the code the gateway got; returns the exit
    code, stdout, stderr and the number the code went to."""
    sent = len(gateway.requests)
    run = Login(cli, *args)
    run.send(PASSWORD)
    run.wait_for(r"Enter the code sent to")
    text = wait_for_text(gateway, sent + 1)
    run.send(code_of(text))
    code, out = run.finish()
    return code, out, run.err, text.body["to"]


# --------------------------------------------------------------------------- item 1: the menu


def test_the_preferred_alternate_phone_gets_the_code_through_the_cli(cli, gateway):
    alice_with_two_phones(cli, gateway)
    cli("methods", "prefer", "--user", "alice", "sms", "--name", "alternate phone")

    code, out, err, to = login_with_text(cli, gateway, "--json")
    assert code == 0, err
    assert to == ALTERNATE_E164  # not the first number enrolled
    assert json.loads(out)["method"] == "password+sms"
    # without a terminal the default (the preferred contact) is taken; the others are named
    assert "Second factor (or use a different method): sms:alternate phone (others: " \
           "sms:mobile" in err

    # --second sms: the preferred sms contact; --second sms:NAME: that one
    code, _, err, to = login_with_text(cli, gateway, "--second", "sms:mobile")
    assert code == 0, err
    assert to == MOBILE_E164


def test_second_names_a_contact_or_says_what_is_wrong(cli, gateway):
    alice_with_two_phones(cli, gateway)
    cli("methods", "prefer", "--user", "alice", "sms", "--name", "alternate phone")
    code, _, err, to = login_with_text(cli, gateway, "--second", "sms")
    assert code == 0, err
    assert to == ALTERNATE_E164

    # a contact she does not have, a name on something that is not a contact
    proc = cli("login", "--user", "alice", "--device", "unmanaged", "--second", "sms:pager",
               input=PASSWORD + "\n", expect=exitcodes.AUTH_FAILED)
    assert "has no sms method set up named 'pager'" in proc.stderr
    proc = cli("login", "--user", "alice", "--second", "totp:phone", expect=exitcodes.USAGE)
    assert "only a contact is chosen by name" in proc.stderr


def _pty_login(cli: Cli, gateway: GatewayServer, choose: str) -> tuple[int, str, str]:
    """`token-agent login` on a pty: the password, the menu's answer ``choose``, the code."""
    sent = len(gateway.requests)
    master, slave = pty.openpty()
    proc = subprocess.Popen(token_agent_command() + ["login", "--user", "alice", "--device",
                                                     "unmanaged", "--device-id", next(DEVICES)],
                            stdin=slave, stdout=slave, stderr=slave, env=cli.env, cwd=REPO_ROOT,
                            start_new_session=True)
    os.close(slave)
    seen = b""

    def until(pattern: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while not re.search(pattern, seen):
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break

    try:
        until(b"Password")
        os.write(master, PASSWORD.encode() + b"\r")
        until(rb"Second factor \(or use a different method\) \[\d\]:")
        os.write(master, choose.encode() + b"\r")
        until(b"Enter the code sent to")
        os.write(master, code_of(wait_for_text(gateway, sent + 1)).encode() + b"\r")
        until(b"logged in|login failed")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, seen.decode(errors="replace"), gateway.requests[-1].body["to"]


def test_each_contact_is_its_own_choice_on_the_terminal(cli, gateway):
    alice_with_two_phones(cli, gateway)
    cli("methods", "prefer", "--user", "alice", "sms", "--name", "alternate phone")
    code, screen, to = _pty_login(cli, gateway, "")  # Enter: the default
    assert code == 0, screen
    assert "1. text message code: mobile (+44•••••123)\r\n" in screen
    assert "2. text message code: alternate phone (+44•••••456)  (preferred)" in screen
    assert "[2]:" in screen
    assert to == ALTERNATE_E164

    code, screen, to = _pty_login(cli, gateway, "1")  # "use a different method"
    assert code == 0, screen
    assert to == MOBILE_E164


def test_each_contact_is_its_own_choice_over_the_socket(services, gateway):  # noqa: F811
    from token_agent.factors import codes, password

    services.policy.write_text(delivery_policy(gateway, NO_RESEND_GAP))
    world = World(services)
    try:
        user = world.user("alice", password=True)
        ctx = world.agent.factors()
        for number, name in ((MOBILE, "mobile"), (ALTERNATE, "alternate phone")):
            codes.add_contact(ctx, user.id, "sms", number, name=name)
            assert codes.confirm_contact(ctx, user.id, "sms",
                                         code_of(gateway.requests[-1]), name=name).ok
    finally:
        world.close()
    svc = services()
    with svc.client() as c:
        c.request("methods.prefer", user="alice", kind="sms", name="alternate phone")
        menus: list[dict] = []

        def reply(event):
            if event["kind"] == "choose":
                menus.append(event)
                return event["default"]
            if event["message"] == "Password":
                return PASSWORD
            return code_of(gateway.requests[-1])

        outcome = c.login("alice", reply, device={"kind": "unmanaged", "device_id": next(DEVICES)})
        assert outcome["ok"], outcome
        assert gateway.requests[-1].body["to"] == ALTERNATE_E164
        [menu] = menus
        assert menu["options"] == [
            ["sms:mobile", "text message code: mobile (+44•••••123)"],
            ["sms:alternate phone", "text message code: alternate phone (+44•••••456)"]]
        assert menu["default"] == "sms:alternate phone"

        # login.start's second: a contact by name
        outcome = c.login("alice", reply, device={"kind": "unmanaged",
                                                  "device_id": next(DEVICES)},
                          second="sms:mobile")
        assert outcome["ok"], outcome
        assert gateway.requests[-1].body["to"] == MOBILE_E164
        with pytest.raises(ServiceError) as e:
            c.request("login.start", user="alice", second="fax:mobile")
        assert e.value.code == "bad-request"


# --------------------------------------------------------------------------- item 2


def test_scripted_first_login_enrolment_honours_second_sms(cli, gateway):
    cli.policy.write_text(delivery_policy(gateway))
    cli("users", "add", "alice")
    cli("enrol", "password", "--user", "alice", "--password-stdin", input=PASSWORD + "\n")
    run = Login(cli, "--second", "sms", "--json")
    run.send(PASSWORD)
    run.wait_for(r"Phone number")
    run.send(MOBILE)
    run.wait_for(r"Enter the code sent to")
    run.send(code_of(wait_for_text(gateway, 1)))
    code, out = run.finish()
    assert code == 0, run.err
    assert "authenticator app" not in run.err
    assert gateway.requests[0].body["to"] == MOBILE_E164
    methods = cli.json("methods", "list", "--user", "alice")["methods"]
    assert [(m["kind"], m["confirmed"]) for m in methods if m["kind"] != "password"] == [
        ("sms", True)]
    assert json.loads(out)["method"] == "password+sms"


# --------------------------------------------------------------------------- item 3


def test_the_first_login_code_after_enrolment_is_not_throttled(cli, gateway):
    cli.policy.write_text(delivery_policy(gateway))  # the default: 30 s between two codes
    cli("users", "add", "alice")
    cli("enrol", "password", "--user", "alice", "--password-stdin", input=PASSWORD + "\n")
    add_contact(cli, gateway, MOBILE, "mobile")  # the enrolment's code, seconds ago
    code, _, err, to = login_with_text(cli, gateway)
    assert code == 0, err
    assert to == MOBILE_E164
    # a resend within 30 s of that login code is still refused
    proc = cli("send-code", "sms", "--user", "alice", expect=exitcodes.DELIVERY)
    assert re.search(r"a code was sent \d+ s ago: wait \d+ s", proc.stderr), proc.stderr
    assert len(gateway.requests) == 2


# --------------------------------------------------------------------------- item 4


def test_a_contact_named_twice_is_a_conflict(cli, gateway):
    cli("users", "add", "alice")
    add_contact(cli, gateway, MOBILE, "mobile")
    proc = cli("enrol", "sms", "--user", "alice", "--to", ALTERNATE, "--name", "mobile",
               expect=exitcodes.CONFLICT)
    assert "alice already has a text message code contact named 'mobile': choose another " \
           "name" in proc.stderr
    proc = cli("enrol", "sms", "--user", "alice", "--to", MOBILE, "--name", "again",
               expect=exitcodes.CONFLICT)
    assert "is already enrolled for text message codes as 'mobile'" in proc.stderr
    assert len(gateway.requests) == 1  # nothing sent for either
