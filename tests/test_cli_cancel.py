"""Ctrl-C in the `token-agent` CLI, typed on a real (pseudo-)terminal: at a password prompt, a
PIN prompt, a touch wait, the "touch the key to use" wait. Each time: "Cancelled." on stderr,
exit 5 (exitcodes.TIMEOUT, the README's code for Ctrl-C), no traceback, the terminal's echo
on again, and the key told to stop waiting (its ceremony ends at once and the next command
works) (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from conftest import REPO_ROOT, token_agent_command
from pty_helpers import CTRL_C, PtySession
from simulators.key.control import KeyControl
from token_agent import exitcodes

PIN = "246810"


@pytest.fixture
def env(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("")
    return {"TOKEN_AGENT_DATA_DIR": str(tmp_path / "data"), "TOKEN_AGENT_POLICY": str(policy),
            "PYTHONUNBUFFERED": "1"}


def run(env: dict, *args: str, input: str = "", expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(token_agent_command() + list(args), input=input, text=True,
                            capture_output=True, cwd=REPO_ROOT, env=dict(os.environ, **env),
                            timeout=60)
    assert result.returncode == expect, (args, result.returncode, result.stdout, result.stderr)
    return result


@pytest.fixture
def terminal(env):
    sessions: list[PtySession] = []

    def start(*args: str) -> PtySession:
        session = PtySession(list(args), env)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()


def key_with_pin(sim_key_factory, env, presence: str = "manual"):
    """A virtual key process with PIN set (touched automatically while the PIN is set)."""
    server = sim_key_factory(presence="auto")
    sims = ",".join(filter(None, [env.get("TOKEN_AGENT_SIM_KEYS"), server.address]))
    env["TOKEN_AGENT_SIM_KEYS"] = sims
    run(env, "keys", "pin", "set", "--key", f"sim:{server.address}", "--pin-stdin",
        input=PIN + "\n")
    control = KeyControl(port=server.control_port)
    control.set_presence(presence)
    return server, control


def assert_cancelled(session: PtySession) -> None:
    code, stdout, terminal = session.finish()
    assert code == exitcodes.TIMEOUT, (code, terminal)
    assert "Cancelled." in terminal and "Cancelled." not in stdout
    assert "Traceback" not in terminal + stdout and "Error" not in terminal
    assert session.echo_on(), "the terminal was left with echo off"


def wait_until_touch_wanted(session: PtySession, *controls: KeyControl) -> None:
    session.wait_for(lambda: all(c.status()["waiting_for_touch"] for c in controls),
                     "the key(s) waiting for a touch")


def assert_key_released(*controls: KeyControl) -> None:
    """Each key has stopped waiting for a touch (it got its CTAPHID_CANCEL: without it, it
    would wait out its own 30 s) and is no longer busy."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        states = [c.status() for c in controls]
        if not any(s["waiting_for_touch"] or s["busy"] for s in states):
            return
        time.sleep(0.05)
    raise AssertionError(f"a key still waits after the cancel: {states}")


def last_login(env, kind: str = "login") -> dict:
    """The audit log's latest event of ``kind``."""
    return json.loads(run(env, "audit", "tail", "-n", "1", "--kind", kind, "--json")
                      .stdout)["events"][0]


def test_ctrl_c_at_the_password_prompt(env, terminal):
    run(env, "users", "add", "alice")
    run(env, "enrol", "password", "--user", "alice", "--password-stdin",
        input="correct horse battery\n")
    session = terminal("login", "--user", "alice")
    session.wait_for_hidden_prompt("Password:")
    session.type(CTRL_C)
    assert_cancelled(session)
    login = last_login(env)  # the attempt is in the audit log, as cancelled
    assert login["username"] == "alice" and login["detail"]["reason"] == "cancelled", login


def test_ctrl_c_at_a_new_password_prompt(env, terminal):
    run(env, "users", "add", "alice")
    session = terminal("enrol", "password", "--user", "alice")
    session.wait_for_hidden_prompt("New password:")
    session.type(CTRL_C)
    assert_cancelled(session)


def enrolled_key(sim_key_factory, env):
    """A key with its PIN, enrolled for alice, then waiting for real touches."""
    server, control = key_with_pin(sim_key_factory, env, presence="auto")
    run(env, "users", "add", "alice")
    run(env, "enrol", "key", "--user", "alice", "--pin-stdin", input=PIN + "\n")
    control.set_presence("manual")
    return server, control


def cancel_at_the_touch(session: PtySession, control: KeyControl) -> None:
    """Type the PIN, then Ctrl-C while the key waits for its touch."""
    session.wait_for_hidden_prompt("PIN for your security key:")
    session.type(PIN.encode() + b"\r")
    wait_until_touch_wanted(session, control)
    session.type(CTRL_C)
    assert_cancelled(session)
    assert_key_released(control)


def test_ctrl_c_at_the_pin_prompt_then_at_the_touch_of_a_key_login(env, terminal,
                                                                  sim_key_factory):
    server, control = enrolled_key(sim_key_factory, env)
    session = terminal("login", "--method", "key", "--user", "alice")
    session.wait_for_hidden_prompt("PIN for your security key:")
    session.type(CTRL_C)
    assert_cancelled(session)
    assert last_login(env, "login.key")["detail"]["reason"] == "cancelled"

    cancel_at_the_touch(terminal("login", "--method", "key", "--user", "alice"), control)

    control.set_presence("auto")  # the key works on: the next login succeeds
    ok = run(env, "login", "--method", "key", "--user", "alice", "--pin-stdin",
             input=PIN + "\n")
    assert ok.stdout.startswith("logged in: alice")


def test_ctrl_c_at_the_touch_of_a_key_enrolment(env, terminal, sim_key_factory):
    server, control = key_with_pin(sim_key_factory, env)
    run(env, "users", "add", "alice")
    cancel_at_the_touch(terminal("enrol", "key", "--user", "alice", "--name", "blue key"),
                        control)
    assert json.loads(run(env, "users", "show", "alice", "--json").stdout)["keys"] == []

    control.set_presence("auto")  # nothing half done: the same name enrols now
    run(env, "enrol", "key", "--user", "alice", "--name", "blue key", "--pin-stdin",
        input=PIN + "\n")


def cancel_the_choice(session: PtySession, *controls: KeyControl) -> None:
    """Ctrl-C while every key waits to be touched as the one to use."""
    session.wait_for_text("touch the one to use")
    wait_until_touch_wanted(session, *controls)
    session.type(CTRL_C)
    assert_cancelled(session)
    assert_key_released(*controls)


def test_ctrl_c_while_choosing_among_several_keys(env, terminal, sim_key_factory):
    first, first_control = key_with_pin(sim_key_factory, env)
    second, second_control = key_with_pin(sim_key_factory, env)
    cancel_the_choice(terminal("keys", "info"), first_control, second_control)

    first_control.set_presence("auto")
    second_control.set_presence("auto")
    assert "PIN         set" in run(env, "keys", "info", "--key", f"sim:{first.address}").stdout


def test_ctrl_c_in_a_policy_login_with_a_key_as_primary(env, terminal, sim_key_factory):
    """The policy flow opens the key from its worker thread: Ctrl-C reaches the keys there
    too, at the choice among several and at the touch."""
    server, control = enrolled_key(sim_key_factory, env)
    cancel_at_the_touch(terminal("login", "--user", "alice", "--primary", "key", "--device",
                                 "unmanaged"), control)
    second, second_control = key_with_pin(sim_key_factory, env)
    cancel_the_choice(terminal("login", "--user", "alice", "--primary", "key", "--device",
                               "unmanaged"), control, second_control)
