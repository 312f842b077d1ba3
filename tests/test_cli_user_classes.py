"""Issue 12, the seeds' class defaults, through the real CLI in a subprocess:

* a new account's MFA follows its class: a requester (``--class external``) starts without
  MFA (the AMS seed: enforcement "does not affect Requesters when they create an account"),
  an internal user with it (the NHSmail seed: new accounts have MFA on), unless the policy's
  ``[classes.NAME] new_accounts_mfa`` says otherwise;
* ``policy explain`` names who set the account's own MFA: the class's new-accounts default,
  an administrator (root here), or the user themself (a ``token-agent`` process running as
  the local account ``nobody`` for the agent user ``nobody``);
* ``users set alice --mfa off`` while her class enforces MFA is accepted with a warning
  (stderr, and ``warnings`` in ``--json``), and ``policy explain`` says the class still
  enforces it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from test_cli_mfa import Cli
from test_cli_reauth import NobodyCli


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path)


def rules(cli, user: str) -> list[str]:
    return cli.json("policy", "explain", "--user", user, "--device", "managed")["rules"]


def test_new_requester_starts_without_mfa_and_explain_says_why(cli):
    requester = cli.json("users", "add", "rita", "--class", "external")
    assert requester["mfa_enabled"] is False
    text = cli("policy", "explain", "--user", "rita").stdout
    assert "turned on by the user" not in text
    assert "class external: MFA optional and off since the account was created " \
           "(new_accounts_mfa for its class): no second factor" in text, text
    assert requester["mfa_source"] == "new-account"
    internal = cli.json("users", "add", "ian")
    assert (internal["mfa_enabled"], internal["mfa_source"]) == (True, "new-account")
    assert rules(cli, "ian")[0] == "class internal: MFA enforced"
    # the policy may have a class's new accounts start with MFA on
    cli.policy.write_text("[classes.external]\nnew_accounts_mfa = true\n")
    assert cli.json("users", "add", "rob", "--class", "external")["mfa_enabled"] is True
    assert rules(cli, "rob")[0] == "class external: MFA optional, on since the account was " \
                                   "created (new_accounts_mfa for its class)"


def test_explain_names_the_administrator(cli):
    cli("users", "add", "rita", "--class", "external")
    changed = cli.json("users", "set", "rita", "--mfa", "on")
    assert rules(cli, "rita")[0] == "class external: MFA optional, turned on by an administrator"
    assert (changed["mfa_enabled"], changed["mfa_source"], changed["warnings"]) == \
        (True, "admin", [])
    assert "MFA turned on by an administrator" in cli("users", "show", "rita").stdout
    cli("users", "set", "rita", "--mfa", "off")
    assert rules(cli, "rita")[0] == "class external: MFA optional and turned off by an " \
                                    "administrator: no second factor"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_explain_names_the_user_who_turned_it_on(tmp_path):
    top = Path(tempfile.mkdtemp(prefix="token-agent-classes-"))
    top.chmod(0o755)
    try:
        cli = NobodyCli(tmp_path, top)
        cli("users", "add", "nobody", "--class", "contributor")
        cli.nobody("users", "set", "nobody", "--mfa", "on")
        assert rules(cli, "nobody")[0] == "class contributor: MFA optional, turned on by the user"
        assert cli.json("users", "show", "nobody")["mfa_source"] == "user"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_mfa_off_while_the_class_enforces_it_warns(cli):
    cli("users", "add", "alice")
    text = cli("users", "set", "alice", "--mfa", "off")
    assert text.stdout.strip() == "alice: class internal, MFA off"
    assert text.stderr.strip() == (
        "warning: MFA is off for alice's account, but class internal enforces MFA: alice "
        "still needs a second factor (the account's setting applies only where the class "
        "leaves MFA optional)")
    data = cli.json("users", "set", "alice", "--mfa", "off")
    assert data["mfa_enabled"] is False and len(data["warnings"]) == 1
    assert "class internal enforces MFA" in data["warnings"][0]
    explained = cli.json("policy", "explain", "--user", "alice")
    assert explained["enforced"] and explained["rules"][:2] == [
        "class internal: MFA enforced",
        "the account's own MFA setting is off (turned off by an administrator): class "
        "internal enforces MFA regardless"]
    # before the class's enforcement date: the warning says from when
    cli.policy.write_text('[enforcement]\nfrom = "2999-01-01"\n')
    later = cli.json("users", "set", "alice", "--mfa", "off")
    assert "class internal enforces MFA from 2999-01-01" in later["warnings"][0]
    # where the class leaves MFA optional, turning it off is no contradiction
    cli("users", "set", "alice", "--class", "external")
    quiet = cli("users", "set", "alice", "--mfa", "off")
    assert quiet.stderr == ""
