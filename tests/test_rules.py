"""One copy of the lockout and code rules (``token_agent.rules``): the policy's ``[lockout]``
and ``[codes]`` parse into the very classes the factors run on, with one set of defaults and
bounds, so the two layers cannot disagree; the bounds and defaults the policy documents are
these; and rules made outside the policy follow them too (the unfamiliar limit defaults to half
of ``limit``, as README's policy section says, checked on a real store)."""

from __future__ import annotations

import re
import secrets
from dataclasses import fields

import pytest

from token_agent import factors, policy, rules
from token_agent.factors import FactorContext, lockout, password
from token_agent.outcome import Reason
from token_agent.policy import PolicyError, parse_policy
from token_agent.secretbox import SecretKeys
from token_agent.store import Store


def test_policy_and_factors_use_the_same_rules():
    assert policy.Lockout is rules.LockoutRules is factors.LockoutRules
    assert policy.Codes is rules.CodeRules is factors.CodeRules
    p = parse_policy("[lockout]\nmax_failures = 4\nlimit = 40\n[codes]\nlength = 8\n")
    assert type(p.lockout) is factors.LockoutRules and type(p.codes) is factors.CodeRules
    assert p.lockout == factors.LockoutRules(max_failures=4, limit=40)
    assert p.codes == factors.CodeRules(length=8)
    assert parse_policy("").lockout == factors.LockoutRules()
    assert parse_policy("").codes == factors.CodeRules()


def test_the_agent_hands_the_policys_rules_to_the_factors(tmp_path, monkeypatch):
    from token_agent.agent import Agent

    monkeypatch.setenv("TOKEN_AGENT_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "policy.toml"
    path.write_text("[lockout]\nlimit = 30\nbase_seconds = 5\n[codes]\nmax_sends = 2\n")
    agent = Agent.open(tmp_path / "data", policy_path=path)
    try:
        ctx = agent.factors()
        assert ctx.lockout is agent.policy.lockout and ctx.codes is agent.policy.codes
        assert ctx.lockout.unfamiliar_limit == 15 and ctx.codes.max_sends == 2
    finally:
        agent.close()


def test_unfamiliar_limit_defaults_to_half_of_limit_everywhere():
    """README: ``unfamiliar_limit`` [limit/2]. Before, the factors' own copy kept 50 whatever
    the limit (so a stranger could use the whole budget of a smaller limit)."""
    for limit in (1, 2, 7, 20, 100):
        parsed = parse_policy(f"[lockout]\nlimit = {limit}\n").lockout
        assert parsed.unfamiliar_limit == max(1, limit // 2)
        assert factors.LockoutRules(limit=limit).unfamiliar_limit == parsed.unfamiliar_limit


@pytest.mark.parametrize("cls,table", [(rules.LockoutRules, "lockout"),
                                       (rules.CodeRules, "codes")])
def test_out_of_bounds_is_refused_by_both_layers_alike(cls, table):
    for name, bound in cls.bounds().items():
        for bad in (bound.low - 1 if not bound.hours else 0, bound.high + 1):
            with pytest.raises(PolicyError) as parsed:
                parse_policy(f"[{table}]\n{name} = {bad}\n")
            with pytest.raises(ValueError) as made:
                cls(**{name: bad})
            said = str(made.value)
            assert f"{cls.__name__}.{name}" in said
            assert any(f"{table}.{name}" in e for e in parsed.value.errors), parsed.value.errors
            # the same bounds in both messages
            numbers = re.findall(r"\d+", said.split(":", 1)[1])
            assert all(n in " ".join(parsed.value.errors) for n in numbers), (said, parsed.value)
    # and the rules that hold between them
    with pytest.raises(ValueError, match="less than"):
        rules.LockoutRules(base_seconds=600, max_seconds=60)
    with pytest.raises(ValueError, match="more than"):
        rules.LockoutRules(limit=10, unfamiliar_limit=11)
    with pytest.raises(ValueError, match="less than codes.ttl_seconds"):
        rules.CodeRules(ttl_seconds=60, resend_seconds=60)
    with pytest.raises(PolicyError, match="less than lockout.base_seconds"):
        parse_policy("[lockout]\nbase_seconds = 600\nmax_seconds = 60\n")
    with pytest.raises(PolicyError, match="more than lockout.limit"):
        parse_policy("[lockout]\nlimit = 10\nunfamiliar_limit = 11\n")


def test_the_documented_defaults_and_bounds_are_the_rules():
    """policy.py's docstring documents each rule as ``key = N  # [default] ... (low..high)``."""
    doc = policy.__doc__
    for cls, table in ((rules.LockoutRules, "lockout"), (rules.CodeRules, "codes")):
        section = doc.split(f"[{table}]", 1)[1].split("\n\n", 1)[0]
        seen = set()
        for name in (f.name for f in fields(cls)):
            entry = re.search(rf"^\s+{name} = .*?(?=^\s+\w+ = |\Z)", section, re.M | re.S)
            assert entry, name
            text = entry.group(0)
            seen.add(name)
            default = re.search(r"# \[([^\]]+)\]", text).group(1)
            value = cls().__getattribute__(name)
            assert default == f"{value:g}" or (name == "unfamiliar_limit"
                                               and default == "half of limit"), (name, default)
            bound = cls.bounds()[name]
            if bound.hours:
                assert f"more than {bound.low:g}, at most {bound.high:g}" in text, text
                continue
            low, high = re.search(r"\((\w+)\.\.(\w+)", text).groups()
            assert low == f"{bound.low:g}" or low in cls.bounds(), (name, low)
            assert high == f"{bound.high:g}" or high in cls.bounds(), (name, high)
        assert seen == {f.name for f in fields(cls)}


def test_a_stranger_locks_only_half_of_a_smaller_limit(tmp_path):
    """Rules made in code (not parsed) count unfamiliar failures apart up to half of
    ``limit``: with limit = 6, the third failure from an unfamiliar device locks that scope
    until an administrator unlocks it, on a real store; the user's own scope stays open."""
    store = Store.open(tmp_path / "t.db")
    try:
        user = store.add_user("alice")
        ctx = FactorContext(store=store, keys=SecretKeys(secrets.token_bytes(32)),
                            lockout=factors.LockoutRules(max_failures=100, limit=6),
                            familiar=False)
        password.set_password(ctx, user.id, "correct horse battery")
        results = [password.verify(ctx, user.id, "wrong") for _ in range(4)]
        assert [r.reason for r in results] == [Reason.WRONG_PASSWORD] * 3 + [Reason.METHOD_LOCKED]
        assert results[2].locked_until == lockout.PERMANENT
        ctx.familiar = True
        assert password.verify(ctx, user.id, "correct horse battery").ok
    finally:
        store.close()
