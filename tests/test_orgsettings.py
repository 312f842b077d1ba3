"""One schema for the organisation's settings (``token_agent.orgsettings``): each setting
declared once (name, type, default, validation, description); ``settings set``, ``card
settings set``, the key and card ceremonies and the agent all go through it; and a value in
the store the schema refuses (written by other means: an older version, a shared database
edited by hand) is refused where it is read, naming the setting, instead of being used."""

from __future__ import annotations


import pytest

from test_cli_mfa import Cli
from token_agent import exitcodes, orgsettings, settings, store
from token_agent.ceremonies.card import CARD_SETTINGS, CardSettings, check_card_setting
from token_agent.ceremonies.key import KeySettings
from token_agent.store import Store


def test_every_setting_is_declared_once_and_completely():
    names = [s.name for s in orgsettings.SETTINGS]
    assert len(names) == len(set(names))
    for s in orgsettings.SETTINGS:
        assert s.type in ("text", "choice", "integer", "boolean", "list") and s.description
        assert s.check(s.default) == s.default, s.name  # the default is a valid value
        assert orgsettings.get(s.name) is s
    with pytest.raises(orgsettings.UnknownSetting, match="unknown setting 'rp-id'.*rp_id"):
        orgsettings.get("rp-id")
    # the store keeps no setting names of its own: the schema is the one list
    assert not [n for n in vars(store) if n.startswith("SETTING_") and n != "SETTING_KEY_RE"]


def test_every_caller_reads_the_one_schema(tmp_path):
    assert set(settings.SETTABLE) | set(CARD_SETTINGS) == set(orgsettings.SETTABLE)
    assert {k: v[0] for k, v in CARD_SETTINGS.items()} == \
        {s.name: s.default for s in orgsettings.SETTINGS if s.name.startswith("card_")}
    s = Store.open(tmp_path / "t.db")
    try:
        key, card = KeySettings.from_store(s), CardSettings.from_store(s)
        defaults = orgsettings.in_force({})
        assert (key.rp_id, key.rp_name, key.user_verification) == \
            (defaults["rp_id"], defaults["rp_name"], defaults["user_verification"])
        assert card.to_settings() == {n: defaults[n] for n in orgsettings.CARD}
        settings.set_setting(s, "rp_id", "  Trust.NHS.example ")
        assert s.get_setting("rp_id") == "trust.nhs.example" == KeySettings.from_store(s).rp_id
        for bad in ((lambda: settings.set_setting(s, "rp_id", "not a domain")),
                    (lambda: settings.set_setting(s, "user_verification", "sometimes")),
                    (lambda: check_card_setting("card_on_stale_crl", "ignore")),
                    (lambda: check_card_setting("card_crl_max_age", "-5"))):
            with pytest.raises(ValueError):
                bad()
    finally:
        s.close()


@pytest.mark.parametrize("key,value", [("rp_id", "Not A Domain!"), ("rp_name", ""),
                                       ("allowed_aaguids", ["not-a-uuid"])])
def test_a_stored_value_the_schema_refuses_is_not_used(tmp_path, key, value):
    """Before, only user_verification and the card settings were checked when read: a bad
    relying party ID in a shared store was used by every key ceremony. Now `settings show`
    (a real process) refuses it, naming the setting (exit 2), and so do the ceremonies."""
    cli = Cli(tmp_path)
    cli("settings", "set", "rp_name", "Trust")  # creates the store
    s = Store.open(cli.db)  # the store itself takes any JSON value (the schema is above it)
    try:
        s.set_setting(key, value)
        shown = cli("settings", "show", expect=exitcodes.USAGE)
        assert f"setting {key} in the store is not valid" in shown.stderr
        with pytest.raises(ValueError, match=f"setting {key} "):
            KeySettings.from_store(s)
    finally:
        s.close()
