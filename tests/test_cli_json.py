"""`--json` through the real CLI: exactly one JSON object on stdout for every command, errors
(click's own usage errors included) as much as successes, with "version", "ok", "error",
ISO-8601 UTC times; and every object as README "JSON output" documents it (json_shapes.py).

Each test has its own data directory and policy file in tmp_path; the commands run as a
process (`token-agent ...`), codes arrive through the delivery outbox."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import click
import pytest

from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from json_shapes import ISO_TIME, check_output, parse_readme
from token_agent import exitcodes

PASSWORD = "correct horse battery"
PHONE = "07700 900123"


class Cli:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.outbox = tmp_path / "outbox"
        self.policy = tmp_path / "policy.toml"
        self.policy.write_text('[codes]\nresend_seconds = 0\n[delivery.sms]\ngateway = "outbox"\n'
                               f'[delivery.outbox]\ndir = "{self.outbox}"\n')
        self.env = environ_for_agent()
        self.env.update(TOKEN_AGENT_DATA_DIR=str(tmp_path / "data"),
                        TOKEN_AGENT_POLICY=str(self.policy), TOKEN_AGENT_SIM_KEYS="",
                        TOKEN_AGENT_SOCKET=str(tmp_path / "no-service.sock"))

    def run(self, *args, input: str = "", expect: int = 0) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        proc = subprocess.run(token_agent_command() + argv, input=input, capture_output=True,
                              text=True, env=self.env, cwd=REPO_ROOT, timeout=60)
        assert proc.returncode == expect, (argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, *args, input: str = "", expect: int = 0) -> dict:
        """``args`` with --json: its one object, checked against README."""
        argv = [*args, "--json"]
        proc = self.run(*argv, input=input, expect=expect)
        [obj] = check_output(argv, proc.stdout, proc.returncode)
        return obj

    def last_code(self) -> str:
        latest = sorted(self.outbox.glob("*.json"))[-1]
        return json.loads(latest.read_text())["code"]


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path)


def _json_commands(group: click.Group, path=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _json_commands(cmd, (*path, name))
        elif any(p.name == "as_json" for p in cmd.params):
            yield " ".join((*path, name))


def test_every_json_command_has_its_shape_in_the_readme():
    from token_agent.cli import main

    _, documented = parse_readme()
    commands = set(_json_commands(main)) | {"service events"}  # JSON lines without --json
    assert commands - set(documented) == set(), "commands whose --json is not documented"
    assert set(documented) - commands == set(), "documented commands without --json"


def test_errors_are_one_json_object_too(cli, tmp_path):
    no_store = cli.json("users", "show", "nobody", expect=exitcodes.NOT_FOUND)
    assert no_store["error"]["reason"] == "no-store", no_store
    assert "no token-agent store " in no_store["error"]["message"]  # at PATH, or in the database

    cli.run("users", "add", "alice")
    missing = cli.json("users", "show", "nobody", expect=exitcodes.NOT_FOUND)
    assert missing["error"] == {"code": 8, "reason": "not-found",
                                "message": "unknown user 'nobody'"}
    assert missing["ok"] is False and missing["version"] == 1

    no_key = cli.json("keys", "info", "--key", "/dev/no-such-key", expect=exitcodes.NO_DEVICE)
    assert no_key["error"]["code"] == exitcodes.NO_DEVICE and no_key["error"]["message"]

    bad = tmp_path / "bad.toml"
    bad.write_text("[methods]\nallowed = ['carrier-pigeon']\n[lockout]\nmax_failures = 0\n")
    checked = cli.json("policy", "check", bad, expect=exitcodes.USAGE)
    assert checked["valid"] is False and len(checked["errors"]) == 2
    assert checked["error"]["reason"] == "invalid" and checked["path"] == str(bad)

    # click's own errors (exit 2) when --json is on the command line
    for argv in (["users", "show"], ["users", "list", "--colour"], ["usres", "list"],
                 ["policy", "check", "--json", "--json", "a", "b"]):
        proc = cli.run(*argv, "--json", expect=exitcodes.USAGE)
        obj = json.loads(proc.stdout)
        assert obj["ok"] is False and obj["version"] == 1 and obj["error"]["code"] == 2, obj
        assert obj["error"]["reason"] == "usage" and obj["error"]["message"] in proc.stderr
    assert cli.run("users", "show", expect=exitcodes.USAGE).stdout == ""  # without --json

    # a failed login: the outcome and the error in the one object
    failed = cli.json("login", "--user", "alice", "--primary", "password", input="nope\n",
                      expect=exitcodes.AUTH_FAILED)
    assert failed["error"]["code"] == 3 and failed["reason"] == failed["error"]["reason"]
    assert failed["method"] and failed["message"] in failed["error"]["message"]

    status = cli.json("service", "status", expect=exitcodes.ERROR)
    assert status["error"]["message"]


def test_ctrl_c_under_json_is_one_object_and_exit_5(cli, tmp_path):
    cli.run("users", "add", "alice")
    companion = tmp_path / "phone.json"
    cli.json("enrol", "push", "--user", "alice", "--companion", companion)
    argv = ["approve", "--companion", str(companion), "--wait", "60", "--json"]
    proc = subprocess.Popen(token_agent_command() + argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli.env, cwd=REPO_ROOT)
    time.sleep(2)  # waiting for a sign-in to approve
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == exitcodes.TIMEOUT, (out, err)
    [obj] = check_output(argv, out, proc.returncode)
    assert obj["error"]["reason"] == "cancelled" and "Traceback" not in err


def test_times_are_iso_utc(cli):
    added = cli.json("users", "add", "alice")
    assert ISO_TIME.fullmatch(added["created_at"]), added
    [event] = cli.json("audit", "tail")["events"]
    assert ISO_TIME.fullmatch(event["at"]) and event["kind"] == "user.added"
    text = cli.run("users", "show", "alice", "--json").stdout
    assert not re.search(r'"\w*_at": \d', text)


def test_outputs_follow_the_documented_shapes(cli, tmp_path):
    j = cli.json
    j("users", "add", "alice", "--display-name", "Dr Alice Smith", "--role", "clinician")
    j("users", "add", "bob", "--class", "external")
    j("users", "set", "bob", "--mfa", "off")
    assert [u["username"] for u in j("users", "list")["users"]] == ["alice", "bob"]

    j("enrol", "password", "--user", "alice", "--password-stdin", input=PASSWORD + "\n")
    assert j("verify", "password", "--user", "alice", "--code-stdin",
             input=PASSWORD + "\n")["kind"] == "password"
    wrong = j("verify", "password", "--user", "alice", "--code-stdin", input="wrong\n",
              expect=exitcodes.AUTH_FAILED)
    assert wrong["reason"] == "wrong-password" and wrong["tries_left"] is not None
    pending = j("enrol", "totp", "--user", "alice")
    assert pending["confirmed"] is False and pending["uri"].startswith("otpauth://")
    j("enrol", "totp", "--user", "alice", "--confirm", "000000", expect=exitcodes.AUTH_FAILED)
    assert len(j("enrol", "backup-codes", "--user", "alice")["backup_codes"]) == 10
    j("enrol", "app-password", "--user", "alice", "--name", "printer")
    sent = j("enrol", "sms", "--user", "alice", "--to", PHONE)
    assert sent["confirmed"] is False
    j("enrol", "sms", "--user", "alice", "--confirm", cli.last_code())
    j("send-code", "sms", "--user", "alice")
    methods = j("methods", "list", "--user", "alice")["methods"]
    assert {m["kind"] for m in methods} >= {"password", "sms", "backup"}
    j("methods", "prefer", "--user", "alice", "sms")
    j("methods", "remove", "--user", "alice", "app-password", "--name", "printer")
    shown = j("users", "show", "alice")
    assert shown["keys"] == [] and shown["methods"]

    j("policy", "check")
    j("policy", "explain", "--user", "alice", "--device", "unmanaged")
    j("policy", "show")
    j("audit", "verify")
    j("audit", "tail", "-n", "5")
    for _ in range(2):
        j("verify", "sms", "--user", "alice", "--code", "000000", expect=exitcodes.AUTH_FAILED)
    assert any(lock["failures"] == 2 for lock in j("admin", "lockouts", "alice")["lockouts"])
    assert j("admin", "unlock", "alice")["cleared"]
    j("admin", "clear-flag", "alice", "--key", "blue", expect=exitcodes.NOT_FOUND)
    j("admin", "reset-methods", "alice", "--yes")

    j("settings", "show")
    j("settings", "set", "rp_id", "trust.nhs.example")
    j("trust", "list")
    aaguid = "2fc0579f-8113-47ea-b116-bb5a8db9202a"
    j("trust", "add-aaguid", aaguid)
    j("trust", "remove-aaguid", aaguid)
    j("card", "settings", "show")
    j("config", "check")
    assert j("keys", "list")["keys"] == []

    ca = tmp_path / "ca"
    j("sim", "ca", "init", "--dir", ca, "--algorithm", "ECCP256")
    card = tmp_path / "alice.card"
    j("sim", "card", "issue", "--ca", ca, "--name", "Dr Alice Smith", "--uuid", "555000000001",
      "--pin-stdin", "--out", card, "--algorithm", "ECCP256", input="123456\n")
    assert ISO_TIME.fullmatch(j("sim", "card", "show", card)["certificates"]["9a"]["not_after"])
    j("sim", "ca", "revoke", "--dir", ca, "--uuid", "555000000001")
    j("sim", "ca", "crl", "--dir", ca)
    j("sim", "ca", "show", "--dir", ca)
    j("users", "remove", "bob", "--yes")
