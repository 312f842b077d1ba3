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

#: a new device for each login: the policy asks for the second factor every time
DEVICES = (f"ward-pc-{n}" for n in itertools.count(1))
#: for the tests of the menu: no resend interval, so that they test the menu alone
NO_RESEND_GAP = "[codes]\nresend_seconds = 0\n"
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
