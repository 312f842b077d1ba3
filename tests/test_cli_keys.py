"""The `token-agent` users / keys / enrol / login commands, against virtual keys served over
TCP (found through TOKEN_AGENT_SIM_KEYS, as a developer's simulator would be)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from fido2.hid import CtapHidDevice

from drivers.fido.sim import SocketHidConnection, sim_descriptor

from simulators.key import KeyServer, create_virtual_key
from token_agent import exitcodes
from json_shapes import check_output
from token_agent.cli import main

PIN = "246810"


@pytest.fixture
def sim():
    """One virtual key over TCP (automatic touch).

    Over the socket, a connection made while none is open is a plug-in (power-up). Each CLI
    run is a new process and connection, so the fixture keeps one connection open for the
    whole test, as a key stays plugged in between commands on a real workstation.
    """
    key = create_virtual_key(presence="auto")
    with KeyServer(key, port=0, control_port=0) as server:
        holder = CtapHidDevice(sim_descriptor("127.0.0.1", server.port),
                               SocketHidConnection("127.0.0.1", server.port))
        try:
            yield key, f"127.0.0.1:{server.port}"
        finally:
            holder.close()


@pytest.fixture
def cli(tmp_path, sim):
    _, address = sim
    env = {"TOKEN_AGENT_SIM_KEYS": address, "TOKEN_AGENT_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()

    def run(*args, input=None, expect=0):
        result = runner.invoke(main, list(args), input=input, env=env, catch_exceptions=False)
        assert result.exit_code == expect, (result.exit_code, result.output, result.stderr)
        if "--json" in args:  # what README "JSON output" documents
            check_output(args, result.stdout, result.exit_code)
        return result

    run("keys", "pin", "set", "--pin-stdin", input=PIN + "\n")
    run("users", "add", "alice", "--display-name", "Dr Alice Smith", "--role", "clinician")
    return run


def test_users_commands(cli):
    cli("users", "add", "bob")
    listed = json.loads(cli("users", "list", "--json").stdout)["users"]
    assert [u["username"] for u in listed] == ["alice", "bob"]
    assert "already" in cli("users", "add", "alice", expect=exitcodes.CONFLICT).stderr
    shown = json.loads(cli("users", "show", "alice", "--json").stdout)
    assert shown["display_name"] == "Dr Alice Smith" and shown["roles"] == ["clinician"]
    cli("users", "remove", "bob", "--yes")
    assert "bob" in cli("users", "show", "bob", expect=exitcodes.NOT_FOUND).stderr
    cli("users", "add", "bad name!", expect=exitcodes.USAGE)


def test_keys_list_and_info(cli, sim):
    listed = json.loads(cli("keys", "list", "--json").stdout)["keys"]
    assert len(listed) == 1 and listed[0]["path"] == f"sim:{sim[1]}"
    assert listed[0]["pin_set"] and listed[0]["pin_retries"] == 8
    info = json.loads(cli("keys", "info", "--json").stdout)
    assert info["aaguid"] == listed[0]["aaguid"] and "FIDO_2_1" in info["versions"]
    assert "PIN         set, 8 tries left" in cli("keys", "info").stdout


def test_enrol_and_login(cli, tmp_path):
    enrolled = cli("enrol", "key", "--user", "alice", "--name", "blue key", "--pin-stdin",
                   "--json", "--export", str(tmp_path / "reg.json"), input=PIN + "\n")
    data = json.loads(enrolled.stdout)
    assert data["name"] == "blue key" and data["discoverable"] and data["user_verified"]
    assert "Touch your security key" not in enrolled.stderr  # automatic presence: never asked
    assert PIN not in enrolled.stdout + enrolled.stderr
    assert json.loads((tmp_path / "reg.json").read_text())["registration"]["type"] == "public-key"

    result = cli("login", "--method", "key", "--user", "alice", "--pin-stdin", "--json",
                 input=PIN + "\n")
    outcome = json.loads(result.stdout)
    assert outcome["ok"] and outcome["user"] == "alice" and outcome["multi_factor"]
    assert outcome["factors"] == ["something-you-have", "something-you-know"]
    text = cli("login", "--pin-stdin", input=PIN + "\n").stdout  # usernameless
    assert text.startswith("logged in: alice with key 'blue key'")
    shown = json.loads(cli("users", "show", "alice", "--json").stdout)
    assert shown["keys"][0]["sign_count"] > 0


def test_login_failures_and_exit_codes(cli):
    cli("enrol", "key", "--user", "alice", "--pin-stdin", input=PIN + "\n")
    wrong = cli("login", "--user", "alice", "--pin-stdin", input="999999\n",
                expect=exitcodes.AUTH_FAILED)
    assert "Wrong PIN — 7 tries left" in wrong.stderr
    failed = cli("login", "--user", "mallory", "--pin-stdin", "--json", input=PIN + "\n",
                 expect=exitcodes.AUTH_FAILED)
    assert json.loads(failed.stdout)["reason"] == "unknown-user"
    cli("users", "add", "bob")
    assert "no security key enrolled" in cli("login", "--method", "key", "--user", "bob",
                                            "--pin-stdin", input=PIN + "\n",
                                            expect=exitcodes.AUTH_FAILED).stderr
    # the policy login (no --method): bob has nothing to log in with at all, and is told no
    # more than a stranger, after the same password prompt (issue 11, item 10)
    nothing = cli("login", "--user", "bob", "--pin-stdin", input=PIN + "\n",
                  expect=exitcodes.AUTH_FAILED).stderr
    stranger = cli("login", "--user", "mallory", "--pin-stdin", input=PIN + "\n",
                   expect=exitcodes.AUTH_FAILED).stderr
    assert nothing == stranger == "Password:\ntoken-agent: login failed: Authentication failed.\n"


def test_pin_blocked_exit_code(cli):
    cli("enrol", "key", "--user", "alice", "--pin-stdin", input=PIN + "\n")
    for code in (exitcodes.AUTH_FAILED, exitcodes.AUTH_FAILED, exitcodes.LOCKED):
        last = cli("login", "--user", "alice", "--pin-stdin", input="000000\n", expect=code)
    assert "remove the key, insert it again" in last.stderr


def test_key_pin_change_and_credentials(cli):
    cli("enrol", "key", "--user", "alice", "--pin-stdin", input=PIN + "\n")
    listed = json.loads(cli("keys", "credentials", "list", "--pin-stdin", "--json",
                            input=PIN + "\n").stdout)["credentials"]
    assert [c["user"] for c in listed] == ["alice"]
    cli("keys", "pin", "change", "--pin-stdin", input=f"{PIN}\n13572468\n")
    cli("keys", "credentials", "delete", listed[0]["credential_id"], "--pin-stdin",
        input="13572468\n")
    assert "no discoverable credentials" in cli("keys", "credentials", "list", "--pin-stdin",
                                                input="13572468\n").stdout
    cli("keys", "pin", "change", "--pin-stdin", input="000000\n11112222\n",
        expect=exitcodes.AUTH_FAILED)


def test_key_reset_window(cli, sim):
    key, _ = sim
    cli("keys", "reset", "--yes")  # the key was plugged in moments ago: within 10 s
    assert json.loads(cli("keys", "info", "--json").stdout)["pin_set"] is False
    key.app.clock = lambda: 1e12  # much later than the power-up
    out = cli("keys", "reset", "--yes", expect=exitcodes.NO_DEVICE)
    assert "within 10 seconds" in out.stderr


def test_trust_and_settings(cli, tmp_path):
    root = subprocess.run([sys.executable, "-m", "token_agent", "sim", "key",
                           "attestation-root"], capture_output=True, check=True).stdout
    (tmp_path / "root.pem").write_bytes(root)
    cli("trust", "add-aaguid", "00000000-0000-0000-0000-000000000001")
    refused = cli("enrol", "key", "--user", "alice", "--pin-stdin", input=PIN + "\n",
                  expect=exitcodes.AUTH_FAILED)
    assert "not one the organisation accepts" in refused.stderr
    cli("trust", "add-root", str(tmp_path / "root.pem"))
    assert json.loads(cli("enrol", "key", "--user", "alice", "--pin-stdin", "--json",
                          input=PIN + "\n").stdout)["attestation_trusted"]
    cli("settings", "set", "user_verification", "sometimes", expect=exitcodes.USAGE)
    cli("settings", "set", "rp_id", "trust.nhs.example")
    assert json.loads(cli("settings", "show", "--json").stdout)["rp_id"] == "trust.nhs.example"


def test_no_key_and_two_keys_without_a_touch(tmp_path):
    env = {"TOKEN_AGENT_DATA_DIR": str(tmp_path), "TOKEN_AGENT_SIM_KEYS": "127.0.0.1:1"}
    runner = CliRunner()
    result = runner.invoke(main, ["keys", "info"], env=env)
    assert result.exit_code == exitcodes.NO_DEVICE and "No security key found" in result.stderr
    keys = [create_virtual_key(presence="manual", touch_timeout=5) for _ in range(2)]
    with KeyServer(keys[0], port=0, control_port=None) as a, \
            KeyServer(keys[1], port=0, control_port=None) as b:
        env["TOKEN_AGENT_SIM_KEYS"] = f"127.0.0.1:{a.port},127.0.0.1:{b.port}"
        result = runner.invoke(main, ["keys", "info", "--timeout", "1"], env=env)
    assert result.exit_code == exitcodes.TIMEOUT
    assert "touch the one to use" in result.stderr


@pytest.mark.sqlite_only  # a stray file where the SQLite store should be
def test_store_unwritable_is_exit_7(tmp_path, sim):
    data = tmp_path / "data"
    data.mkdir()
    (data / "token-agent.db").write_bytes(b"this is not a database, just a stray file" * 50)
    env = {**os.environ, "TOKEN_AGENT_DATA_DIR": str(data), "TOKEN_AGENT_SIM_KEYS": sim[1]}
    proc = subprocess.run([sys.executable, "-m", "token_agent", "users", "list"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == exitcodes.STORE and str(data) in proc.stderr


def test_pin_never_reaches_output_or_logs(cli, sim, tmp_path):
    """With verbose logging on (a real process: its log handler writes to stderr), neither
    the PIN nor a wrong PIN appears anywhere, nor in the audit log."""
    env = {**os.environ, "TOKEN_AGENT_SIM_KEYS": sim[1],
           "TOKEN_AGENT_DATA_DIR": str(tmp_path / "data")}

    def run(*args, stdin):
        return subprocess.run([sys.executable, "-m", "token_agent", "-v", *args], input=stdin,
                              env=env, capture_output=True, text=True, timeout=120)

    runs = [run("enrol", "key", "--user", "alice", "--pin-stdin", stdin=PIN + "\n"),
            run("login", "--user", "alice", "--pin-stdin", stdin=PIN + "\n"),
            run("login", "--user", "alice", "--pin-stdin", stdin="975310\n")]
    assert [r.returncode for r in runs] == [0, 0, exitcodes.AUTH_FAILED]
    text = "".join(r.stdout + r.stderr for r in runs)
    assert " INFO " in text  # logging was really on
    assert PIN not in text and "975310" not in text
    from token_agent.store import Store

    with Store.open(tmp_path / "data" / "token-agent.db") as store:
        dump = "\n".join(str(e.to_dict()) for e in store.list_events())
    assert "login.key" in dump and PIN not in dump and "975310" not in dump
