"""The example configuration and policy shipped in examples/ (and copied by the README's
install steps) are valid as they stand."""

from __future__ import annotations

from pathlib import Path

from token_agent.config import check_config_text
from token_agent.delivery import parse_delivery_config
from token_agent.policy import check_policy_text

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_policy_is_valid():
    path = EXAMPLES / "policy.toml"
    policy, errors, warnings = check_policy_text(path.read_text(), str(path))
    assert errors == [] and policy is not None
    assert "email" not in policy.methods.allowed  # the example switches email off
    parse_delivery_config(policy.delivery)  # raises on a wrong [delivery] table
    # the one warning a trust accepts knowingly: SMS and voice are restricted authenticators
    assert len(warnings) == 1 and "restricted" in warnings[0]


def test_example_config_is_valid():
    path = EXAMPLES / "config.toml"
    config, errors, warnings = check_config_text(path.read_text(), str(path))
    assert errors == [] and config is not None
    assert config.service.login_service_users == ("gdm",) or \
        list(config.service.login_service_users) == ["gdm"]
