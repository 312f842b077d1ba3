"""The registry of method kinds (``token_agent.kinds``): every kind complete, its names unique,
the tables that remain elsewhere (the store's) in agreement with it, every layer reading it,
and a name that is no kind refused clearly (``admin unlock --method`` through a real process)."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_cli_mfa import PASSWORD, Cli
from token_agent import admin_ops, delivery, exitcodes, kinds, policy, store
from token_agent.ceremonies import choices, firstlogin, login
from token_agent.cli import auth, mfa
from token_agent.factors import codes
from token_agent.outcome import Factor


def test_every_kind_is_complete_and_its_names_unique():
    assert len(kinds.ALL) == 11
    for k in kinds.ALL:
        for f in fields(k):
            assert getattr(k, f.name) is not None or f.name in ("strength", "channel",
                                                                  "destination"), (k, f.name)
        assert k.store and k.policy and k.cli and k.label
        assert k.factor in (kinds.POSSESSION, kinds.KNOWLEDGE)
        Factor[k.factor.upper()]  # the login's factor type of the same name
        assert (k.strength is not None) == (k.second or k.fallback)
        assert not (k.phishing_resistant and not k.second)
        assert not (k.enrol_at_login and not k.second)
        assert (k.channel is not None) == bool(k.destination) == k.contact
        assert kinds.by_store(k.store) is k and kinds.by_policy(k.policy) is k
        assert kinds.by_cli(k.cli) is k and kinds.by_any(k.cli) is k
    for attr in ("store", "policy", "cli", "label"):
        names = [getattr(k, attr) for k in kinds.ALL]
        assert len(set(names)) == len(names), attr


@pytest.mark.parametrize("lookup", [kinds.by_store, kinds.by_policy, kinds.by_cli, kinds.by_any])
def test_unknown_names_are_refused_with_the_valid_ones(lookup):
    with pytest.raises(kinds.UnknownKind, match=r"unknown method kind 'carrier-pigeon'.*one of"):
        lookup("carrier-pigeon")
    with pytest.raises(kinds.UnknownKind):
        lookup(None)


def test_the_store_agrees_with_the_registry(tmp_path):
    """The store keeps its own KIND_* constants and METHOD_KINDS (its CHECK constraint): they
    name exactly the registry's kinds, and the store accepts each of them."""
    constants = {v for n, v in vars(store).items() if n.startswith("KIND_")}
    assert constants == {k.store for k in kinds.ALL}
    assert tuple(store.METHOD_KINDS) == tuple(k.store for k in kinds.ALL)
    s = store.Store.open(tmp_path / "t.db")
    try:
        user = s.add_user("alice")
        for k in kinds.ALL:
            assert s.add_method(user.id, k.store, f"one {k.cli}").kind == k.store
    finally:
        s.close()


def test_every_layer_reads_the_registry():
    assert policy.METHODS == tuple(k.policy for k in kinds.ALL)
    assert policy.SECOND_FACTORS == ("key", "card", "totp", "push", "sms", "voice", "messaging",
                                     "email")
    assert policy.STRENGTH == {k.policy: k.strength for k in kinds.ALL if k.strength}
    assert policy.PHISHING_RESISTANT == {"key", "card"}
    assert policy.PRIMARY_FACTORS == login.PRIMARY_METHODS == ("password", "key", "card")
    assert firstlogin.ENROLLABLE_AT_LOGIN == ("totp", "sms", "voice", "messaging", "email")
    assert set(choices.SECOND_METHODS) == set(policy.SECOND_FACTORS) | {"backup"}
    assert choices.CONTACT_METHODS == ("email", "sms", "voice", "messaging") == mfa.CHANNELS
    assert delivery.CHANNELS == codes.CHANNELS == choices.CONTACT_METHODS
    assert delivery.CHANNEL_LABELS == {"email": "email", "sms": "SMS", "voice": "voice call",
                                       "messaging": "messaging app"}
    assert admin_ops.METHOD_KINDS == tuple(k.cli for k in kinds.ALL)
    assert set(mfa.VERIFY_KINDS) == {"password", "totp", "email", "sms", "voice", "messaging",
                                     "backup", "app-password"}
    assert set(mfa.SECRET_KINDS) == {"password", "app-password"}
    primary = next(p for p in auth.login.params if p.name == "primary")
    assert tuple(primary.type.choices) == login.PRIMARY_METHODS


def test_no_hand_made_name_table_is_left():
    """No module outside kinds.py maps store names to policy names or labels by hand: a dict
    display with at least three of the registry's names as keys is such a table."""
    names = {n for k in kinds.ALL for n in (k.store, k.policy, k.cli)}
    found = []
    for path in sorted((REPO_ROOT / "token_agent").rglob("*.py")):
        if path.name == "kinds.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if len(keys & names) >= 3:
                    found.append(f"{Path(path).relative_to(REPO_ROOT)}:{node.lineno}")
    assert found == []


def test_admin_unlock_of_an_unknown_method_kind_is_a_usage_error(tmp_path):
    """``admin unlock --method`` takes a method's command-line, policy or store name; anything
    else is refused (exit 2, the valid names said) instead of clearing nothing in silence."""
    cli = Cli(tmp_path)
    cli("users", "add", "alice")
    cli("enrol", "password", "--user", "alice", "--password-stdin", input=PASSWORD + "\n")
    cli("verify", "password", "--user", "alice", "--code-stdin", input="wrong\n",
        expect=exitcodes.AUTH_FAILED)
    bad = cli("admin", "unlock", "alice", "--method", "passwd", expect=exitcodes.USAGE)
    assert "unknown method kind 'passwd'" in bad.stderr and "app-password" in bad.stderr
    assert [s["failures"] for s in cli.json("admin", "lockouts", "alice")["lockouts"]] == [1]
    assert cli.json("audit", "tail", "--kind", "admin.unlock")["events"] == []
    for name in ("password", "app-password", "app_password", "backup", "backup_codes", "key",
                 "fido2"):
        cli("admin", "unlock", "alice", "--method", name)
    assert cli.json("admin", "lockouts", "alice")["lockouts"] == []
