"""`policy show` and `card settings show` through the real CLI: TOML that tomllib reads, with
the names of the policy file and of `card settings set`, which can be saved as a policy file
or replayed through `set` and give the same settings (no Python reprs: no None, no tuples)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import tomllib
from pathlib import Path

from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from token_agent.ceremonies.card import CARD_SETTINGS

POLICY = """\
[enforcement]
from = 2024-07-16T07:30:00Z
new_accounts_mfa = false

[classes.external]
enforce = true
minimum = "sms"

[methods]
allowed = ["key", "card", "totp", "push", "sms", "voice"]

[reverification]
unmanaged_hours = 4
trusted_networks = ["10.0.0.0/8", "2001:db8::/32"]

[lockout]
max_failures = 5

[codes]
length = 8
"""


def run(tmp_path: Path, *args, data: str = "data") -> subprocess.CompletedProcess:
    env = environ_for_agent()
    env.update(TOKEN_AGENT_DATA_DIR=str(tmp_path / data))
    proc = subprocess.run(token_agent_command() + [str(a) for a in args], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def no_python_reprs(text: str) -> None:
    for word in ("None", "True", "False", "{'", "('", "()", "'start'"):
        assert word not in text, (word, text)


def body(text: str) -> str:
    """The TOML without its comment header (which names the file shown)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("#")).strip()


def test_policy_show_prints_the_policy_file_it_would_take(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    shown = run(tmp_path, "--policy", policy, "policy", "show").stdout
    no_python_reprs(shown)
    parsed = tomllib.loads(shown)
    assert parsed["enforcement"] == {"from": dt.datetime(2024, 7, 16, 7, 30,
                                                         tzinfo=dt.timezone.utc),
                                     "new_accounts_mfa": False}
    external = parsed["classes"]["external"]
    assert (external["enforce"], external["minimum"]) == (True, "sms")
    # the default minimum (email) is not allowed here: left out, as the file must leave it
    internal = parsed["classes"]["internal"]
    assert internal["enforce"] is True and "minimum" not in internal
    assert "# minimum: not set" in shown
    assert parsed["reverification"]["trusted_networks"] == ["10.0.0.0/8", "2001:db8::/32"]
    assert parsed["lockout"]["max_failures"] == 5 and parsed["codes"]["length"] == 8
    assert f"# the policy in force: {policy}" in shown

    # the same names and values as --json (the file's structure, defaults filled in)
    data = json.loads(run(tmp_path, "--policy", policy, "policy", "show", "--json").stdout)
    assert data["enforcement"]["from"] == "2024-07-16T07:30:00Z" and data["source"] == str(policy)
    for section, values in parsed.items():
        if section not in ("enforcement", "classes"):
            assert data[section] == values, section
    assert data["classes"]["external"] == parsed["classes"]["external"]

    # saved as a policy file it is valid, and shows the same policy
    saved = tmp_path / "saved.toml"
    saved.write_text(shown)
    run(tmp_path, "policy", "check", saved)
    assert body(run(tmp_path, "--policy", saved, "policy", "show").stdout) == body(shown)

    # without an enforcement date: a comment, still TOML
    policy.write_text("[methods]\nallowed = [\"totp\", \"key\"]\n")
    shown = run(tmp_path, "--policy", policy, "policy", "show").stdout
    assert "from" not in tomllib.loads(shown)["enforcement"] and "# from: not set" in shown


def test_card_settings_show_prints_what_set_takes(tmp_path):
    run(tmp_path, "sim", "ca", "init", "--dir", tmp_path / "ca", "--algorithm", "ECCP256")
    root = tmp_path / "ca" / "root-ca.pem"
    assert root.is_file()
    run(tmp_path, "card", "settings", "set", "trust_anchors", root)  # the old short name
    run(tmp_path, "card", "settings", "set", "card_crl_sources", tmp_path / "ca" / "crl.der",
        "http://crl.example/nhs.crl")
    run(tmp_path, "card", "settings", "set", "card_lock_command", "xdg-screensaver", "lock")
    run(tmp_path, "card", "settings", "set", "card_provision_on_first_use", "true")
    run(tmp_path, "card", "settings", "set", "card_expiry_warning_days", "60")

    shown = run(tmp_path, "card", "settings", "show").stdout
    no_python_reprs(shown)
    parsed = tomllib.loads(shown)
    assert set(parsed) == set(CARD_SETTINGS)  # the names `set` takes, every one
    assert parsed["card_trust_anchors"] == [str(root)]
    assert parsed["card_intermediates"] == []
    assert parsed["card_crl_sources"] == [str(tmp_path / "ca" / "crl.der"),
                                          "http://crl.example/nhs.crl"]
    assert parsed["card_lock_command"] == "xdg-screensaver lock"
    assert parsed["card_provision_on_first_use"] is True
    assert parsed["card_expiry_warning_days"] == 60 and parsed["card_on_stale_crl"] == "refuse"

    data = json.loads(run(tmp_path, "card", "settings", "show", "--json").stdout)
    assert {k: data[k] for k in parsed} == parsed
    assert data["crl_cache_dir"] == str(tmp_path / "data" / "crl-cache")

    # replayed through `set` into another store: the same settings
    for key, value in parsed.items():
        values = value if isinstance(value, list) else [
            str(value).lower() if isinstance(value, bool) else str(value)]
        if values:
            run(tmp_path, "card", "settings", "set", key, *values, data="other")
    again = run(tmp_path, "card", "settings", "show", data="other").stdout
    assert body(again) == body(shown)
