"""A malformed TOKEN_AGENT_SIM_KEYS, met by any command that looks for security keys: a clear
error naming the variable and the bad entry, exit 2 (usage), never a traceback (issue 12)."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO_ROOT, token_agent_command
from token_agent import exitcodes

COMMANDS = [
    ["keys", "list"],
    ["keys", "info"],
    ["login", "--method", "key", "--user", "alice", "--pin-stdin"],
    ["login", "--user", "alice", "--primary", "key", "--pin-stdin"],
    ["enrol", "key", "--user", "alice", "--pin-stdin"],
]


@pytest.mark.parametrize("value, entry", [
    ("garbage", "entry 1: 'garbage' is not host:port"),
    ("127.0.0.1:35962,127.0.0.1:notaport", "entry 2: '127.0.0.1:notaport': the port must be"),
    ("127.0.0.1:35962,,127.0.0.1:1", "entry 2 is empty"),
])
def test_malformed_sim_keys_is_a_usage_error(tmp_path, value, entry):
    env = dict(os.environ, TOKEN_AGENT_SIM_KEYS=value, TOKEN_AGENT_DATA_DIR=str(tmp_path))
    subprocess.run(token_agent_command() + ["users", "add", "alice"], env=env, cwd=REPO_ROOT,
                   check=True, capture_output=True, timeout=60)
    for command in COMMANDS:
        result = subprocess.run(token_agent_command() + command, env=env, cwd=REPO_ROOT,
                                input="135790\n", capture_output=True, text=True, timeout=60)
        assert result.returncode == exitcodes.USAGE, (command, result.stderr)
        assert result.stderr.startswith(f"token-agent: TOKEN_AGENT_SIM_KEYS {entry}"), \
            (command, result.stderr)
        assert "host:port" in result.stderr and "Traceback" not in result.stderr
