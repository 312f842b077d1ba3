"""The `token-agent` MFA commands as a real process: users, passwords, authenticator apps,
backup codes, app passwords, the policy login, `policy check|explain`, `admin`, `audit`,
a simulated key as the primary factor, and no secret in any output or log.

Each test has its own data directory (TOKEN_AGENT_DATA_DIR) and policy file
(TOKEN_AGENT_POLICY, or --policy) in tmp_path; answers go in on standard input. TOTP codes
come from oathtool (else pyotp) for successive time steps, so no test waits for the clock."""

from __future__ import annotations

import json
import os
import re
import queue
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from json_shapes import check_output
from token_agent import exitcodes

PASSWORD = "correct horse battery"
KEY_PIN = "246810"
PERIOD = 30


def totp_code(secret: str, at: float) -> str:
    """The code of ``secret`` at ``at``: oathtool when installed, else pyotp."""
    if shutil.which("oathtool"):
        return subprocess.run(["oathtool", "--totp", "-b", f"--now=@{int(at)}", secret],
                              capture_output=True, text=True, check=True).stdout.strip()
    import pyotp

    return pyotp.TOTP(secret).at(at)


class Codes:
    """Codes of one authenticator app for successive time steps: each one later than the
    last one used (no replay) and inside the agent's window (one step either side of now);
    it waits for the next step only when it has to."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.last: int | None = None
        self.used: list[str] = []

    def next(self) -> str:
        while True:
            now = time.time()
            if now % PERIOD > PERIOD - 4:  # too close to the end of a step: wait for the next
                time.sleep(PERIOD - now % PERIOD + 0.2)
                continue
            current = int(now // PERIOD)
            step = current - 1 if self.last is None else max(self.last + 1, current - 1)
            if step <= current + 1:
                break
            time.sleep(PERIOD - now % PERIOD + 0.2)
        self.last = step
        code = totp_code(self.secret, step * PERIOD)
        self.used.append(code)
        return code


def leaks(secret: str, text: str) -> bool:
    if secret.isdigit():  # a short code: not as part of a longer number or id
        return re.search(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", text) is not None
    return secret in text


class Cli:
    """Runs `token-agent` with this test's data directory and policy file."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.data = tmp_path / "data"
        self.policy = tmp_path / "policy.toml"
        self.policy.write_text("")
        self.env = environ_for_agent()
        self.env.update(TOKEN_AGENT_DATA_DIR=str(self.data), TOKEN_AGENT_POLICY=str(self.policy),
                        PYTHONUNBUFFERED="1")
        self.runs: list[tuple[list[str], subprocess.CompletedProcess]] = []

    def __call__(self, *args, input: str = "", expect: int | None = 0,
                 env: dict | None = None) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        proc = subprocess.run(token_agent_command() + argv, input=input, capture_output=True,
                              text=True, env={**self.env, **(env or {})}, cwd=REPO_ROOT,
                              timeout=60)
        self.runs.append((argv, proc))
        if expect is not None:
            assert proc.returncode == expect, (argv, proc.returncode, proc.stdout, proc.stderr)
        if "--json" in argv:  # what README "JSON output" documents
            check_output(argv, proc.stdout, proc.returncode)
        return proc

    def json(self, *args, **kw):
        return json.loads(self(*args, "--json", **kw).stdout)

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    @property
    def db(self) -> Path:
        return self.data / "token-agent.db"

    def alice_with_totp(self) -> tuple[str, Codes]:
        """alice with a password and a confirmed authenticator app."""
        self("users", "add", "alice")
        self("enrol", "password", "--user", "alice", "--password-stdin", input=PASSWORD + "\n")
        enrolled = self.json("enrol", "totp", "--user", "alice")
        codes = Codes(enrolled["secret"])
        self("enrol", "totp", "--user", "alice", "--confirm", codes.next())
        return enrolled["secret"], codes


@pytest.fixture
def cli(tmp_path) -> Cli:
    return Cli(tmp_path)


def _secret_of(uri: str) -> str:
    return parse_qs(urlsplit(uri).query)["secret"][0]


# --------------------------------------------------------------------------- TOTP and login


def test_password_totp_verify_and_login(cli, tmp_path):
    cli("users", "add", "alice")
    cli("enrol", "password", "--user", "alice", "--password-stdin", input=PASSWORD + "\n")
    qr = tmp_path / "qr.png"
    enrolled = cli.json("enrol", "totp", "--user", "alice", "--qr", qr)
    secret = enrolled["secret"]
    assert enrolled["uri"].startswith("otpauth://totp/") and _secret_of(enrolled["uri"]) == secret
    assert enrolled["confirmed"] is False and enrolled["qr_file"] == str(qr)
    assert qr.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert stat.S_IMODE(qr.stat().st_mode) == 0o600

    codes = Codes(secret)
    cli("verify", "totp", "--user", "alice", "--code", "123456", expect=exitcodes.AUTH_FAILED)
    cli("enrol", "totp", "--user", "alice", "--confirm", codes.next())
    app, = [m for m in cli.json("methods", "list", "--user", "alice")["methods"] if m["kind"] == "totp"]
    assert app["confirmed"] and app["preferred"]

    code = codes.next()
    cli("verify", "totp", "--user", "alice", "--code", code)
    again = cli("verify", "totp", "--user", "alice", "--code", code, expect=exitcodes.AUTH_FAILED)
    assert "already used" in again.stderr

    out = cli.json("login", "--user", "alice", "--device", "unmanaged",
                   input=f"{PASSWORD}\n{codes.next()}\n")
    assert out["ok"] and out["user"] == "alice" and out["method"] == "password+totp"
    assert out["multi_factor"] and out["detail"]["second"] == "totp"

    wrong = cli("login", "--user", "alice", "--device", "unmanaged", "--json",
                input="not the password\n", expect=exitcodes.AUTH_FAILED)
    assert json.loads(wrong.stdout)["reason"] == "wrong-password"
    # no factor yet: the generic words, no tries left (issue 11, item 10)
    assert "Authentication failed." in wrong.stderr and "tries left" not in wrong.stderr
    assert "tries_left" not in wrong.stdout
    text = cli("login", "--user", "alice", "--device", "unmanaged", input="not the password\n",
               expect=exitcodes.AUTH_FAILED)
    assert "login failed" in text.stderr


def test_backup_codes(cli):
    cli("users", "add", "alice")
    codes = cli.json("enrol", "backup-codes", "--user", "alice")["backup_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(re.fullmatch(r"[a-z2-9]{4}-[a-z2-9]{4}-[a-z2-9]{4}", c) for c in codes)
    used = cli.json("verify", "backup", "--user", "alice", "--code", codes[0])
    assert used["ok"] and used["detail"]["remaining"] == 9
    again = cli("verify", "backup", "--user", "alice", "--code", codes[0],
                expect=exitcodes.AUTH_FAILED)
    assert "already used" in again.stderr
    # typed without dashes, in capitals
    cli("verify", "backup", "--user", "alice", "--code", codes[1].replace("-", "").upper())


def test_app_passwords_need_a_policy_allowing_legacy(cli):
    cli("users", "add", "alice")
    made = cli("enrol", "app-password", "--user", "alice", "--name", "printer", "--json")
    assert "will not work" in made.stderr  # warned: the policy does not allow them
    app_pw = json.loads(made.stdout)["app_password"]
    assert len(app_pw) == 16
    refused = cli("verify", "app-password", "--user", "alice", "--code-stdin",
                  input=app_pw + "\n", expect=exitcodes.AUTH_FAILED)
    assert "not allowed" in refused.stderr
    legacy = cli.write("legacy.toml", "[legacy]\napp_passwords = true\n")
    ok = cli("--policy", legacy, "verify", "app-password", "--user", "alice", "--code-stdin",
             "--json", input=app_pw + "\n")
    assert json.loads(ok.stdout)["method"] == "printer"
    cli("--policy", legacy, "verify", "app-password", "--user", "alice", "--code-stdin",
        input="NotTheAppPassword\n", expect=exitcodes.AUTH_FAILED)
    cli("methods", "remove", "--user", "alice", "app-password", "--name", "printer")
    cli("--policy", legacy, "verify", "app-password", "--user", "alice", "--code-stdin",
        input=app_pw + "\n", expect=exitcodes.AUTH_FAILED)


def test_verify_refuses_passwords_in_argv(cli):
    """Issue 11e: `verify password|app-password --code SECRET` put the secret in argv (seen
    by every local user in /proc/PID/cmdline, kept in shell history). Refused now, like a
    PIN, before anything is checked; --code-stdin and the prompt still work."""
    cli("users", "add", "alice")
    cli("enrol", "password", "--user", "alice", "--password-stdin", input=PASSWORD + "\n")
    app_pw = cli.json("enrol", "app-password", "--user", "alice", "--name", "printer")[
        "app_password"]
    legacy = cli.write("legacy.toml", "[legacy]\napp_passwords = true\n")
    before = cli.json("audit", "tail", "-n", "1000")["events"]
    for kind, secret in (("password", PASSWORD), ("app-password", app_pw),
                         ("password", "wrong password")):
        refused = cli("--policy", legacy, "verify", kind, "--user", "alice", "--code", secret,
                      expect=exitcodes.USAGE)
        assert "never taken on the command line" in refused.stderr
        assert "--code-stdin" in refused.stderr
        assert secret not in refused.stdout + refused.stderr
    assert cli.json("audit", "tail", "-n", "1000")["events"] == before  # nothing was checked
    cli("--policy", legacy, "verify", "password", "--user", "alice", "--code-stdin",
        input=PASSWORD + "\n")
    cli("--policy", legacy, "verify", "app-password", "--user", "alice", input=app_pw + "\n")
    nothing = cli("verify", "totp", "--user", "alice", "--code", "123456",  # codes still may
                  expect=exitcodes.AUTH_FAILED)
    assert "no authenticator app" in nothing.stderr


# --------------------------------------------------------------------------- policy


def test_policy_check(cli):
    valid = cli.write("valid.toml", '[reverification]\nunmanaged_hours = 4\n'
                                    'trusted_networks = ["10.0.0.0/8"]\n')
    out = cli("policy", "check", valid)
    assert "valid" in out.stdout
    assert "warning:" in out.stderr and "email is allowed" in out.stderr
    data = cli.json("policy", "check", valid)
    assert data["valid"] and data["errors"] == [] and data["warnings"]

    too_many = cli.write("bad.toml", "[lockout]\nmax_failures = 101\n")
    out = cli("policy", "check", too_many, expect=exitcodes.USAGE)
    assert "lockout.max_failures" in out.stderr and "101" in out.stderr

    typo = cli.write("typo.toml", "[lockout]\nmax_failure = 5\n")
    out = cli("policy", "check", typo, expect=exitcodes.USAGE)
    assert "did you mean max_failures" in out.stderr

    # the policy in force (TOKEN_AGENT_POLICY) is checked when no file is named
    cli.policy.write_text("[legacy]\napp_passwords = true\n")
    assert "legacy.app_passwords" in cli("policy", "check").stderr
    # and a command that needs the policy refuses a broken one
    cli.policy.write_text("[lockout]\nmax_failures = 101\n")
    assert "max_failures" in cli("policy", "explain", "--user", "nobody",
                                 expect=exitcodes.USAGE).stderr


def test_policy_explain(cli):
    cli("users", "add", "alice")
    data = cli.json("policy", "explain", "--user", "alice", "--device", "unmanaged",
                    "--network", "192.0.2.7")
    assert data["user"] == "alice" and data["primary"] == "password"
    assert data["mfa_required"] is True and data["must_enrol"] is True
    assert data["device"] == {"kind": "unmanaged", "device_id": data["device"]["device_id"],
                              "network": "192.0.2.7", "joined": False}
    assert isinstance(data["rules"], list) and data["rules"]
    assert any("class internal: MFA enforced" in r for r in data["rules"])

    text = cli("policy", "explain", "--user", "alice", "--device", "unmanaged",
               "--network", "192.0.2.7").stdout
    assert "second factor: required" in text and "rules applied:" in text
    assert "  1. class internal: MFA enforced" in text
    assert "network 192.0.2.7" in text

    cli("policy", "explain", "--user", "alice", "--network", "not-an-ip", expect=exitcodes.USAGE)
    cli("policy", "explain", "--user", "nobody", expect=exitcodes.NOT_FOUND)


def test_policy_explain_a_joined_workstation(cli):
    """``--joined``: the roaming rule, shown in the rules applied; refused for an unmanaged
    device."""
    cli.alice_with_totp()
    cli.policy.write_text('[reverification]\ntrusted_networks = ["10.0.0.0/8"]\n')
    ask = ("policy", "explain", "--user", "alice", "--device", "managed", "--device-id",
           "ward-pc-3", "--network", "10.4.2.9")
    plain = cli.json(*ask)  # a managed PC that is new to alice, by the caller's word only
    assert plain["mfa_required"] is True and plain["device"]["joined"] is False
    assert any("new device ward-pc-3" in r and "second factor required" in r
               for r in plain["rules"])
    joined = cli.json(*ask, "--joined")
    assert joined["mfa_required"] is False and joined["device"]["joined"] is True
    assert joined["rules"][-2:] == [
        "new device ward-pc-3 and new network 10.4.2.0/24 for this user: a joined workstation "
        "of the organisation in trusted network 10.0.0.0/8: roaming, not unusual (no alert)",
        "managed device in trusted network 10.0.0.0/8: no second factor"]
    text = cli(*ask, "--joined").stdout
    assert "managed device (joined workstation), network 10.4.2.9" in text
    assert "roaming, not unusual (no alert)" in text
    outside = cli.json("policy", "explain", "--user", "alice", "--device-id", "ward-pc-3",
                       "--network", "198.51.100.4", "--joined")
    assert outside["mfa_required"] is True
    assert not any("roaming" in r for r in outside["rules"])
    refused = cli(*ask[:4], "--device", "unmanaged", "--joined", expect=exitcodes.USAGE)
    assert "--joined needs --device managed" in refused.stderr


# --------------------------------------------------------------------------- admin


def _login_enrolling(cli: Cli, username: str, password: str) -> tuple[int, str, str]:
    """`token-agent login` answered as a person would: the password, then, when the agent
    shows the new authenticator app's key, its current code."""
    proc = subprocess.Popen(token_agent_command() + ["login", "--user", username, "--json",
                                                     "--device", "unmanaged"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli.env, cwd=REPO_ROOT)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stderr.readline, "")]
                              + [lines.put(None)], daemon=True)
    reader.start()
    try:
        proc.stdin.write(password + "\n")
        proc.stdin.flush()
        err, secret = "", None
        while secret is None:
            line = lines.get(timeout=30)
            if line is None:
                break
            err += line
            found = re.search(r"or type the key ([A-Z2-7]+)\)", line)
            if found:
                secret = found.group(1)
        assert secret, err
        proc.stdin.write(Codes(secret).next() + "\n")
        proc.stdin.close()
        out = proc.stdout.read()
        proc.wait(timeout=30)
        reader.join(timeout=30)
        while (line := lines.get_nowait()) is not None:
            err += line
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_admin_lockouts_unlock_and_reset(cli):
    secret, codes = cli.alice_with_totp()
    cli("enrol", "backup-codes", "--user", "alice")
    for _ in range(3):
        cli("verify", "totp", "--user", "alice", "--code", "000000", expect=exitcodes.AUTH_FAILED)
    cli("verify", "password", "--user", "alice", "--code-stdin", input="wrong password\n",
        expect=exitcodes.AUTH_FAILED)
    locks = {s["scope"].split(":")[0]: s for s in cli.json("admin", "lockouts", "alice")["lockouts"]}
    assert locks["method"]["failures"] == 3 and locks["password"]["failures"] == 1
    assert "failures 3" in cli("admin", "lockouts", "alice").stdout

    cleared = cli.json("admin", "unlock", "alice", "--method", "totp")["cleared"]
    assert [c["scope"].split(":")[0] for c in cleared] == ["method"]
    assert [s["scope"].split(":")[0] for s in cli.json("admin", "lockouts", "alice")["lockouts"]] == ["password"]
    cli("admin", "unlock", "alice")
    assert cli.json("admin", "lockouts", "alice")["lockouts"] == []
    assert "no failures recorded" in cli("admin", "lockouts", "alice").stdout
    unlocks = cli.json("audit", "tail", "--kind", "admin.unlock")["events"]
    assert len(unlocks) == 2 and all(e["outcome"] == "success" for e in unlocks)

    removed = cli.json("admin", "reset-methods", "alice", "--yes")["removed"]
    assert sorted(m["kind"] for m in removed) == ["backup_codes", "totp"]
    assert [m["kind"] for m in cli.json("methods", "list", "--user", "alice")["methods"]] == ["password"]
    event, = cli.json("audit", "tail", "--kind", "admin.reset-methods")["events"]
    assert event["username"] == "alice" and event["detail"]["removed"] == 2
    assert event["detail"]["kinds"] == ["backup_codes", "totp"]
    cli("verify", "totp", "--user", "alice", "--code", codes.next(), expect=exitcodes.AUTH_FAILED)

    # the next login, under enforcement, sets up a new authenticator app first
    assert cli.json("policy", "explain", "--user", "alice")["must_enrol"] is True
    code, out, err = _login_enrolling(cli, "alice", PASSWORD)
    assert code == 0, (out, err)
    outcome = json.loads(out)
    assert outcome["ok"] and outcome["method"] == "password+totp"
    assert outcome["detail"]["decision"]["must_enrol"] is True
    assert "requires a second factor" in err


def test_admin_reset_needs_confirmation(cli):
    cli.alice_with_totp()
    cli("admin", "reset-methods", "alice", input="n\n", expect=exitcodes.ERROR)
    assert len(cli.json("methods", "list", "--user", "alice")["methods"]) == 2
    cli("admin", "reset-methods", "nobody", "--yes", expect=exitcodes.NOT_FOUND)


def test_admin_access_pass(cli):
    cli("users", "add", "alice")
    issued = cli.json("admin", "access-pass", "alice", "--hours", "2")
    value = issued["access_pass"]
    assert len(value) == 19 and issued["user"] == "alice"
    again = cli("admin", "access-pass", "alice").stdout  # a new one, printed once
    assert re.search(r"shown only now\): [a-z2-9]{4}(-[a-z2-9]{4}){3}$", again.strip())
    assert value not in again
    event, = cli.json("audit", "tail", "--kind", "access_pass.replaced")["events"]
    assert event["username"] == "alice" and event["detail"]["actor"]
    events = cli("audit", "tail", "-n", "100").stdout
    assert value not in events and value.replace("-", "") not in events
    assert cli.json("admin", "access-pass", "alice", "--revoke")["revoked"] == 1
    cli("admin", "access-pass", "alice", "--hours", "25", expect=exitcodes.USAGE)
    cli("admin", "access-pass", "nobody", expect=exitcodes.NOT_FOUND)


# --------------------------------------------------------------------------- audit


def _tampered(cli: Cli, name: str, *sql: str) -> dict:
    """A copy of the data directory, with ``sql`` run on its store; returns the env."""
    copy = cli.tmp / name
    shutil.copytree(cli.data, copy)
    conn = sqlite3.connect(copy / "token-agent.db")
    try:
        for statement in sql:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()
    return {"TOKEN_AGENT_DATA_DIR": str(copy)}


def _five_events(cli) -> None:
    cli("users", "add", "alice")
    cli("enrol", "password", "--user", "alice", "--password-stdin", input=PASSWORD + "\n")
    cli("verify", "password", "--user", "alice", "--code-stdin", input=PASSWORD + "\n")
    cli("verify", "password", "--user", "alice", "--code-stdin", input="wrong password\n",
        expect=exitcodes.AUTH_FAILED)
    cli("users", "add", "bob")


def test_audit_verify_and_tail(cli):
    _five_events(cli)
    intact = cli.json("audit", "verify")
    assert intact == {"intact": True, "events": 5, "ok": True, "version": 1}
    assert "audit log intact: 5 events" in cli("audit", "verify").stdout

    tail = cli.json("audit", "tail", "-n", "3")["events"]
    assert [e["id"] for e in tail] == [3, 4, 5]  # the latest, oldest first
    assert [e["kind"] for e in tail] == ["verify.password", "verify.password", "user.added"]
    assert len(cli("audit", "tail", "-n", "3").stdout.strip().splitlines()) == 3


@pytest.mark.sqlite_only  # edits copies of the SQLite file (the contract suite tampers on both)
def test_audit_verify_finds_tampering(cli):
    _five_events(cli)
    edited = _tampered(cli, "edited", "DROP TRIGGER audit_events_no_update",
                       "UPDATE audit_events SET detail = '{\"changed\": true}' WHERE id = 3")
    out = cli("audit", "verify", env=edited, expect=exitcodes.ERROR)
    assert "audit event 3 was altered" in out.stderr
    data = json.loads(cli("audit", "verify", "--json", env=edited, expect=exitcodes.ERROR).stdout)
    assert data["intact"] is False and data["event_id"] == 3

    deleted = _tampered(cli, "deleted", "DROP TRIGGER audit_events_no_delete",
                        "DELETE FROM audit_events WHERE id = 3")
    out = cli("audit", "verify", env=deleted, expect=exitcodes.ERROR)
    assert "audit event 3 is missing" in out.stderr
    assert json.loads(cli("audit", "verify", "--json", env=deleted,
                          expect=exitcodes.ERROR).stdout)["event_id"] == 3

    last = _tampered(cli, "last", "DROP TRIGGER audit_events_no_delete",
                     "DELETE FROM audit_events WHERE id = 5")
    out = cli("audit", "verify", env=last, expect=exitcodes.ERROR)
    assert "audit events 5 to 5 are missing" in out.stderr

    # the untouched original still verifies, and the triggers refuse edits there
    cli("audit", "verify")
    conn = sqlite3.connect(cli.db)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit_events SET outcome = 'success' WHERE id = 4")
    finally:
        conn.close()


# --------------------------------------------------------------------------- a key as primary


def test_key_with_pin_as_primary_satisfies_mfa(cli, sim_key_server):
    cli.env["TOKEN_AGENT_SIM_KEYS"] = sim_key_server.address
    cli.policy.write_text("[classes.internal]\nenforce = true\n")
    cli("keys", "pin", "set", "--pin-stdin", input=KEY_PIN + "\n")
    cli("users", "add", "alice")
    cli("enrol", "key", "--user", "alice", "--name", "blue key", "--pin-stdin",
        input=KEY_PIN + "\n")
    assert cli.json("policy", "explain", "--user", "alice", "--primary", "key")["mfa_required"] \
        is False

    result = cli("login", "--user", "alice", "--primary", "key", "--pin-stdin", "--json",
                 "--device", "unmanaged", input=KEY_PIN + "\n")
    outcome = json.loads(result.stdout)
    assert outcome["ok"] and outcome["method"] == "key" and outcome["user"] == "alice"
    assert outcome["detail"]["second"] is None
    assert outcome["user_verified"] and outcome["multi_factor"]
    assert outcome["credential"] == "blue key"
    assert any("satisfies MFA" in r for r in outcome["detail"]["decision"]["rules"])
    assert KEY_PIN not in result.stdout + result.stderr
    # no second-factor prompt was shown
    assert "Code" not in result.stderr and "Second factor" not in result.stderr

    wrong = cli("login", "--user", "alice", "--primary", "key", "--pin-stdin",
                input="999999\n", expect=exitcodes.AUTH_FAILED)
    assert "login failed" in wrong.stderr


# --------------------------------------------------------------------------- no secrets


def test_secrets_never_reach_output_or_logs(cli):
    cli.policy.write_text("[legacy]\napp_passwords = true\n")

    def v(*args, **kw):
        return cli("-v", *args, **kw)

    v("users", "add", "alice")
    v("enrol", "password", "--user", "alice", "--password-stdin", input=PASSWORD + "\n")
    enrolled = json.loads(v("enrol", "totp", "--user", "alice", "--json").stdout)
    secret = enrolled["secret"]
    codes = Codes(secret)
    v("enrol", "totp", "--user", "alice", "--confirm", codes.next())
    v("verify", "totp", "--user", "alice", "--code", codes.next())
    v("verify", "totp", "--user", "alice", "--code", codes.used[-1], expect=exitcodes.AUTH_FAILED)
    v("verify", "totp", "--user", "alice", "--code-stdin", input="000000\n",
      expect=exitcodes.AUTH_FAILED)
    backup_codes = json.loads(v("enrol", "backup-codes", "--user", "alice", "--json")
                              .stdout)["backup_codes"]
    v("verify", "backup", "--user", "alice", "--code-stdin", input=backup_codes[0] + "\n")
    v("verify", "backup", "--user", "alice", "--code", backup_codes[0],
      expect=exitcodes.AUTH_FAILED)
    app_pw = json.loads(v("enrol", "app-password", "--user", "alice", "--name", "printer",
                          "--json").stdout)["app_password"]
    v("verify", "app-password", "--user", "alice", "--code-stdin", input=app_pw + "\n")
    v("verify", "password", "--user", "alice", "--code-stdin", input=PASSWORD + "\n")
    v("login", "--user", "alice", "--device", "unmanaged", input="wrong password!\n",
      expect=exitcodes.AUTH_FAILED)
    v("login", "--user", "alice", "--device", "unmanaged", "--json",
      input=f"{PASSWORD}\n{codes.next()}\n")
    audit = v("audit", "tail", "-n", "1000", "--json")

    secrets = [PASSWORD, "wrong password!", secret, *codes.used, "000000", backup_codes[0],
               backup_codes[0].replace("-", ""), app_pw]
    logged = "".join(proc.stderr for _, proc in cli.runs)
    assert " INFO " in logged  # the log handler was really on
    checked_stdout = "".join(proc.stdout for argv, proc in cli.runs if argv[1] != "enrol")
    assert '"ok": true' in checked_stdout and audit.stdout in checked_stdout
    for s in secrets:
        assert not leaks(s, logged), f"secret on stderr: {s!r}"
        assert not leaks(s, checked_stdout), f"secret on stdout of a verify/login command: {s!r}"
    # the enrol commands show each secret exactly where it belongs: once, on stdout
    enrol_out = "".join(proc.stdout for argv, proc in cli.runs if argv[1] == "enrol")
    assert secret in enrol_out and backup_codes[0] in enrol_out and app_pw in enrol_out
