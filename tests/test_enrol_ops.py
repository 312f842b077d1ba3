"""Enrolment written once for every front end (``admin_ops.enrol_failed``): a key enrolment
refused by the command line is recorded in the audit log as the service records it
(``enrol.key``, outcome failure, the reason, ``via``), once; before, only the service recorded
them. Through a real ``token-agent`` process and a virtual key over TCP (python-fido2's CTAPHID
framing)."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from test_cli_keys import PIN, sim  # noqa: F401  (fixture)
from token_agent import exitcodes


def _run(env, *args, input="", expect=0):
    proc = subprocess.run(token_agent_command() + list(args), input=input, capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_a_refused_key_enrolment_is_recorded_by_the_cli_as_by_the_service(tmp_path, sim):  # noqa: F811
    _, address = sim
    env = environ_for_agent()
    env.update(TOKEN_AGENT_SIM_KEYS=address, TOKEN_AGENT_DATA_DIR=str(tmp_path / "data"),
               TOKEN_AGENT_POLICY=str(tmp_path / "policy.toml"))
    (tmp_path / "policy.toml").write_text("")
    _run(env, "keys", "pin", "set", "--pin-stdin", input=PIN + "\n")
    _run(env, "users", "add", "alice")
    _run(env, "enrol", "key", "--user", "alice", "--name", "blue key", "--pin-stdin",
         input=PIN + "\n")
    again = _run(env, "enrol", "key", "--user", "alice", "--name", "blue key", "--pin-stdin",
                 input=PIN + "\n", expect=exitcodes.CONFLICT)
    assert "already has a key named 'blue key'" in again.stderr
    events = json.loads(_run(env, "audit", "tail", "--kind", "enrol.key", "--json").stdout)["events"]
    assert [(e["outcome"], e["detail"]) for e in events] == [
        ("success", events[0]["detail"]),
        ("failure", {"reason": "name-taken", "via": "cli"}),
    ]
    assert events[1]["username"] == "alice" and PIN not in json.dumps(events)
    assert _run(env, "audit", "verify").returncode == 0
