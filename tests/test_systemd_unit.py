"""systemd/token-agent.service: a valid unit (systemd-analyze verify), hardened
(systemd-analyze security --offline), running the service unprivileged."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "token-agent.service"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: apt-get install systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return tool


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        m = re.match(r"([A-Za-z]+)=(.*)", line)
        if m:
            out.setdefault(m[1], []).append(m[2])
    return out


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's token-agent (verify checks it)."""
    exe = Path(sys.executable).parent / "token-agent"
    text = UNIT.read_text().replace("/opt/token-agent/.venv/bin/token-agent", str(exe))
    path = tmp_path / "token-agent.service"
    path.write_text(text)
    return path


def test_unit_verifies(local_unit):
    proc = subprocess.run([_systemd_analyze(), "verify", str(local_unit)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unit_exposure_is_low(local_unit):
    proc = subprocess.run([_systemd_analyze(), "security", "--offline=true", str(local_unit)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m[1]) <= 2.0, proc.stdout  # systemd rates 0-10; "OK" is below 4.5


def test_unit_runs_the_service_unprivileged():
    s = _settings()
    assert s["User"] == ["token-agent"] and s["Group"] == ["token-agent"]
    assert s["ExecStart"][0].split()[1:3] == ["serve", "--config"]
    assert s["NoNewPrivileges"] == ["yes"] and s["CapabilityBoundingSet"] == [""]
    assert s["ProtectSystem"] == ["strict"] and s["ProtectHome"] == ["yes"]
    assert s["DevicePolicy"] == ["closed"] and s["DeviceAllow"] == ["char-hidraw rw"]
    assert s["StateDirectory"] == ["token-agent"] and s["StateDirectoryMode"] == ["0700"]
    assert s["RuntimeDirectory"] == ["token-agent"]
    # the store is config.toml's [store] data_dir, else StateDirectory's, for the service and
    # the command line alike: TOKEN_AGENT_DATA_DIR here would win over config.toml for the
    # service only (token_agent/paths.py)
    assert not any("TOKEN_AGENT_DATA_DIR" in e for e in s.get("Environment", []))
    assert s["UMask"] == ["0077"]
    # a service alive but no longer serving is restarted (issue 11: the accept loop died)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30s"] and s["Restart"] == ["on-failure"]
