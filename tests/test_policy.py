"""The MFA enforcement policy (token_agent/policy.py): parsing, validation, warnings, decisions.

The policy matrix at the end checks ``decide`` against an expectation computed here, from the
rules as written in the module's documentation, not from the module's own tables.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from token_agent.policy import (
    DEFAULT_POLICY,
    STRENGTH,
    Decision,
    LoginFacts,
    PolicyError,
    check_policy_text,
    decide,
    default_policy_path,
    explain,
    load_policy,
    method_from_store_kind,
    network_key,
    parse_policy,
    policy_warnings,
    resolve_policy,
)
from token_agent.store import USER_CLASSES

NOW = datetime(2024, 9, 1, 12, 0, tzinfo=timezone.utc)


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.toml")
    assert str(info.value) == "\n".join(info.value.errors)
    assert all(e.startswith("p.toml: ") for e in info.value.errors)
    return info.value.errors


def one_error(text: str) -> str:
    errors = errors_of(text)
    assert len(errors) == 1, errors
    return errors[0]


def warnings_of(text: str) -> list[str]:
    policy, errors, warnings = check_policy_text(text, "p.toml")
    assert policy is not None and errors == []
    return warnings


def facts(**kw) -> LoginFacts:
    base = dict(user_class="internal", mfa_enabled=False, methods=("totp",), primary="password",
                device="unmanaged", network="192.0.2.10", device_id="ws-1", now=NOW,
                last_verified_at=NOW - timedelta(hours=1), device_seen=True, network_seen=True,
                has_history=True)
    base.update(kw)
    return LoginFacts(**base)


# --- parsing ------------------------------------------------------------------------------

def test_empty_text_is_the_default_policy():
    p = parse_policy("")
    assert p == DEFAULT_POLICY
    assert p.enforcement.start is None and p.enforcement.new_accounts_mfa is True
    assert [(c.name, c.enforce, c.minimum) for c in p.classes] == [
        ("internal", True, "email"), ("external", False, "email"), ("contributor", False, "email")]
    assert set(p.methods.allowed) == {"email", "sms", "voice", "messaging", "totp", "push",
                                      "key", "card"}
    assert p.methods.allow_backup_codes is True
    assert (p.reverification.unmanaged_hours, p.reverification.managed_hours) == (8, 8)
    assert p.reverification.trusted_networks == ()
    assert (p.unusual_login.enabled, p.unusual_login.ipv4_prefix, p.unusual_login.ipv6_prefix) \
        == (True, 24, 64)
    lk = p.lockout
    assert (lk.max_failures, lk.base_seconds, lk.max_seconds, lk.password_max_failures) \
        == (10, 60, 86400, 10)
    assert (p.codes.length, p.codes.ttl_seconds, p.codes.resend_seconds, p.codes.max_sends) \
        == (6, 600, 30, 5)
    assert p.legacy.app_passwords is False
    assert p.delivery == {}
    assert DEFAULT_POLICY.source is None and p.source == "<policy>"


def test_strength_order():
    assert STRENGTH["email"] < STRENGTH["sms"] == STRENGTH["voice"] == STRENGTH["messaging"]
    assert STRENGTH["messaging"] < STRENGTH["totp"] == STRENGTH["push"]
    assert STRENGTH["push"] < STRENGTH["key"] == STRENGTH["card"]
    assert STRENGTH["backup"] == 2
    assert "password" not in STRENGTH and "app_password" not in STRENGTH


def test_store_kinds_map_to_policy_names():
    assert [method_from_store_kind(k) for k in ("fido2", "smartcard", "backup_codes", "totp")] \
        == ["key", "card", "backup", "totp"]


def test_full_policy_parses():
    p = parse_policy("""
        [enforcement]
        from = 2024-07-16T08:30:00+01:00
        new_accounts_mfa = false
        [classes.internal]
        minimum = "totp"
        [classes.external]
        enforce = true
        minimum = "sms"
        [methods]
        allowed = ["card", "sms", "key", "totp"]
        allow_backup_codes = false
        [reverification]
        unmanaged_hours = 4.5
        managed_hours = 12
        trusted_networks = ["10.0.0.0/8", "fd00:1::/48"]
        [unusual_login]
        enabled = false
        ipv4_prefix = 16
        ipv6_prefix = 56
        [lockout]
        max_failures = 5
        base_seconds = 30
        max_seconds = 3600
        password_max_failures = 8
        [codes]
        length = 8
        ttl_seconds = 300
        resend_seconds = 60
        max_sends = 3
        [legacy]
        app_passwords = true
        [delivery]
        smtp = { host = "mail.example", port = 25 }
        anything = "goes here"
    """, "org.toml")
    assert p.enforcement.start == datetime(2024, 7, 16, 7, 30, tzinfo=timezone.utc)
    assert p.enforcement.new_accounts_mfa is False
    assert p.class_policy("internal").minimum == "totp"
    assert p.class_policy("external").enforce is True
    assert p.class_policy("contributor").enforce is False
    assert p.methods.allowed == ("key", "card", "totp", "sms")   # strongest first
    assert p.allowed_for("internal") == ("key", "card", "totp")
    assert p.reverification.unmanaged_hours == 4.5
    assert [str(n) for n in p.reverification.trusted_networks] == ["10.0.0.0/8", "fd00:1::/48"]
    assert p.unusual_login.ipv4_prefix == 16
    assert p.lockout.delay(1) == 30 and p.lockout.delay(2) == 60 and p.lockout.delay(30) == 3600
    assert p.codes.length == 8
    assert p.legacy.app_passwords is True
    assert p.delivery == {"smtp": {"host": "mail.example", "port": 25}, "anything": "goes here"}
    assert p.source == "org.toml"
    assert json.loads(json.dumps(p.to_json()))["enforcement"]["from"] == "2024-07-16T07:30:00Z"


@pytest.mark.parametrize("written, expected", [
    ("2024-07-16", datetime(2024, 7, 16, tzinfo=timezone.utc)),
    ("2024-07-16T09:00:00", datetime(2024, 7, 16, 9, tzinfo=timezone.utc)),
    ('"2024-07-16"', datetime(2024, 7, 16, tzinfo=timezone.utc)),
    ('"2024-07-16T09:00:00+02:00"', datetime(2024, 7, 16, 7, tzinfo=timezone.utc)),
])
def test_enforcement_date_forms(written, expected):
    assert parse_policy(f"[enforcement]\nfrom = {written}\n").enforcement.start == expected


# --- errors -------------------------------------------------------------------------------

def test_unknown_key_with_suggestion():
    assert one_error("[lockout]\nmax_failure = 3\n") == \
        "p.toml: lockout.max_failure: unknown key (did you mean max_failures?)"


def test_unknown_key_without_suggestion_lists_the_known_ones():
    err = one_error("[codes]\nzzz = 1\n")
    assert err.startswith("p.toml: codes.zzz: unknown key (known: length, ttl_seconds")


def test_unknown_table_and_class():
    assert one_error("[lockouts]\nmax_failures = 3\n") == \
        "p.toml: lockouts: unknown table (did you mean lockout?)"
    assert one_error("[classes.extrenal]\nenforce = true\n") == \
        "p.toml: classes.extrenal: unknown user class (did you mean external?)"
    assert one_error("[classes.internal]\nenfroce = true\n") == \
        "p.toml: classes.internal.enfroce: unknown key (did you mean enforce?)"
    assert "p.toml: enforce: unknown key" in one_error("enforce = true\n")


def test_table_that_is_not_a_table():
    assert "lockout: must be a table" in one_error("lockout = 5\n")


def test_all_errors_are_reported_together():
    errors = errors_of("[lockout]\nmax_failure = 3\n[codes]\nlength = 4\n"
                       "[legacy]\napp_passwords = 1\n")
    assert len(errors) == 3


def test_syntax_error():
    err = one_error("[lockout\n")
    assert err.startswith("p.toml: not valid TOML:")


@pytest.mark.parametrize("text, fragment", [
    ("[enforcement]\nnew_accounts_mfa = \"yes\"\n",
     'enforcement.new_accounts_mfa: "yes" must be true or false, not a string'),
    ("[lockout]\nmax_failures = \"10\"\n",
     'lockout.max_failures: "10" must be a whole number from 1 to 100, not a string'),
    ("[lockout]\nmax_failures = 10.5\n", "lockout.max_failures: 10.5 must be a whole number"),
    ("[lockout]\nmax_failures = true\n", "lockout.max_failures: true must be a whole number"),
    ("[reverification]\nunmanaged_hours = \"8\"\n",
     'reverification.unmanaged_hours: "8" must be a number of hours'),
    ("[methods]\nallowed = \"totp\"\n", 'methods.allowed: "totp" must be an array'),
    ("[methods]\nallowed = [3]\n", "methods.allowed: 3 is not a method name"),
    ("[reverification]\ntrusted_networks = \"10.0.0.0/8\"\n",
     "reverification.trusted_networks: \"10.0.0.0/8\" must be an array"),
    ("[classes.internal]\nenforce = 1\n", "classes.internal.enforce: 1 must be true or false"),
    ("[classes.internal]\nminimum = 3\n", "classes.internal.minimum: 3 is not a method"),
    ("[enforcement]\nfrom = 08:00:00\n", "enforcement.from: 08:00:00 must be a date or datetime"),
])
def test_wrong_types(text, fragment):
    assert fragment in one_error(text)


@pytest.mark.parametrize("key, bad, good, range_text", [
    ("lockout.max_failures", [0, 101, -1], [1, 100], "allowed 1 to 100"),
    ("lockout.password_max_failures", [0, 101], [1, 100], "allowed 1 to 100"),
    ("lockout.base_seconds", [0, 86401], [1, 86400], "allowed 1 to 86400 seconds"),
    ("lockout.max_seconds", [0, 604801], [86400, 604800], "allowed 1 to 604800 seconds"),
    ("codes.length", [5, 9], [6, 8], "allowed 6 to 8 digits"),
    ("codes.ttl_seconds", [59, 3601], [60, 3600], "allowed 60 to 3600 seconds"),
    ("codes.resend_seconds", [-1], [0, 59], "allowed 0 to 3600 seconds"),
    ("codes.max_sends", [0, 21], [1, 20], "allowed 1 to 20"),
    ("unusual_login.ipv4_prefix", [7, 33], [8, 32], "allowed 8 to 32"),
    ("unusual_login.ipv6_prefix", [15, 129], [16, 128], "allowed 16 to 128"),
    ("reverification.unmanaged_hours", [0, -1, 720.5, "nan", "inf"], [0.5, 720],
     "allowed more than 0 and at most 720 hours"),
    ("reverification.managed_hours", [0, 721], [1, 720],
     "allowed more than 0 and at most 720 hours"),
])
def test_ranges(key, bad, good, range_text):
    table, name = key.split(".")
    for value in bad:
        err = one_error(f"[{table}]\n{name} = {value}\n")
        assert f"p.toml: {key}: {value} is out of range: {range_text}" == err
    for value in good:
        parse_policy(f"[{table}]\n{name} = {value}\n")


def test_max_failures_101_refused_100_accepted():
    assert "lockout.max_failures: 101 is out of range" in \
        one_error("[lockout]\nmax_failures = 101\n")
    assert parse_policy("[lockout]\nmax_failures = 100\n").lockout.max_failures == 100


def test_cross_field_ranges():
    assert "lockout.max_seconds: 30 is less than lockout.base_seconds (60)" in \
        one_error("[lockout]\nmax_seconds = 30\n")
    assert "codes.resend_seconds: 600 must be less than codes.ttl_seconds (600)" in \
        one_error("[codes]\nresend_seconds = 600\n")


def test_minimum_not_in_allowed():
    err = one_error('[methods]\nallowed = ["sms", "totp", "key"]\n'
                    '[classes.internal]\nminimum = "push"\n')
    assert err == ('p.toml: classes.internal.minimum: "push" is not in methods.allowed '
                   '(key, totp, sms)')


def test_minimum_stronger_than_every_allowed_method():
    err = one_error('[methods]\nallowed = ["sms", "totp"]\n[classes.external]\nminimum = "card"\n')
    assert '"card" is stronger than every allowed method (totp, sms)' in err
    assert "class external could never satisfy it" in err


def test_default_minimum_needs_no_email():
    p = parse_policy('[methods]\nallowed = ["totp", "key"]\n')
    assert p.allowed_for("external") == ("key", "totp")


def test_empty_allowed_with_enforcement():
    err = one_error("[methods]\nallowed = []\n")
    assert "methods.allowed: is empty, but MFA is enforced for class internal" in err
    p = parse_policy("[methods]\nallowed = []\n[classes.internal]\nenforce = false\n")
    assert p.methods.allowed == ()


@pytest.mark.parametrize("item, fragment", [
    ('"yubikey"', '"yubikey" is not a method (did you mean key?)'),
    ('"password"', '"password" is the primary factor, not a second factor'),
    ('"backup"', "methods.allow_backup_codes"),
    ('"app_password"', "legacy.app_passwords"),
    ('"sms", "sms"', '"sms" is listed twice'),
])
def test_bad_allowed_entries(item, fragment):
    err = one_error(f"[methods]\nallowed = [{item}]\n[classes.internal]\nenforce = false\n")
    assert err.startswith("p.toml: methods.allowed: ") and fragment in err


@pytest.mark.parametrize("value, fragment", [
    ('"backup"', "cannot be a minimum"),
    ('"password"', "is not a second factor"),
    ('"totpp"', '"totpp" is not a method (did you mean totp?)'),
])
def test_bad_minimum(value, fragment):
    assert fragment in one_error(f"[classes.internal]\nminimum = {value}\n")


@pytest.mark.parametrize("net, fragment", [
    ("10.0.0.0/33", "is not a network in CIDR notation"),
    ("ten/8", "is not a network in CIDR notation"),
    ("10.0.0.1/8", "has host bits set (did you mean 10.0.0.0/8?)"),
    ("fd00::1/8", "has host bits set (did you mean fd00::/8?)"),
])
def test_bad_cidr(net, fragment):
    err = one_error(f'[reverification]\ntrusted_networks = ["{net}"]\n')
    assert err.startswith("p.toml: reverification.trusted_networks: ") and fragment in err


@pytest.mark.parametrize("value", ['"16/07/2024"', '"tomorrow"', "2024"])
def test_bad_date(value):
    assert one_error(f"[enforcement]\nfrom = {value}\n").startswith("p.toml: enforcement.from: ")


def test_check_policy_text_reports_errors_instead_of_raising():
    policy, errors, warnings = check_policy_text("[lockout]\nmax_failures = 0\n", "x.toml")
    assert policy is None and warnings == []
    assert errors == ["x.toml: lockout.max_failures: 0 is out of range: allowed 1 to 100"]


# --- warnings -----------------------------------------------------------------------------

STRONG = '[methods]\nallowed = ["totp", "key"]\n'


def test_strong_policy_has_no_warnings():
    assert warnings_of(STRONG) == []


def test_default_policy_warns_about_email_and_sms_voice():
    ws = policy_warnings(DEFAULT_POLICY)
    assert len(ws) == 2
    assert "NIST SP 800-63B does not accept email as an out-of-band authenticator" in ws[0]
    assert "sms and voice allowed: restricted authenticators (NIST SP 800-63B): offer an " \
           "alternative" in ws[1]


def test_warnings_carry_the_source():
    assert all(w.startswith("p.toml: methods.allowed: ") for w in warnings_of(""))


@pytest.mark.parametrize("text, fragment", [
    ('[methods]\nallowed = ["email", "key"]\n',
     "NIST SP 800-63B does not accept email as an out-of-band authenticator"),
    ('[methods]\nallowed = ["sms", "key"]\n',
     "sms allowed: restricted authenticators (NIST SP 800-63B): offer an alternative"),
    ('[methods]\nallowed = ["voice", "key"]\n',
     "voice allowed: restricted authenticators (NIST SP 800-63B): offer an alternative"),
    ('[methods]\nallowed = ["sms"]\n', "(this policy allows nothing stronger)"),
    (STRONG + "[lockout]\nmax_failures = 11\n", "lockout.max_failures: 11 failed attempts"),
    (STRONG + "[lockout]\npassword_max_failures = 50\n", "lockout.password_max_failures: 50"),
    (STRONG + "[reverification]\nunmanaged_hours = 12.5\n",
     "reverification.unmanaged_hours: 12.5 h is longer than the NIST AAL2 reauthentication "
     "limit: 12 h"),
    (STRONG + "[reverification]\nmanaged_hours = 24\n", "NIST AAL2 reauthentication limit: 12 h"),
    (STRONG + '[reverification]\ntrusted_networks = ["0.0.0.0/0"]\n', "0.0.0.0/0 is a very broad"),
    (STRONG + '[reverification]\ntrusted_networks = ["8.0.0.0/7"]\n', "8.0.0.0/7 is a very broad"),
    (STRONG + '[reverification]\ntrusted_networks = ["::/0"]\n', "::/0 is a very broad"),
    (STRONG + '[reverification]\ntrusted_networks = ["8.8.8.0/24"]\n', "8.8.8.0/24 is a public"),
    (STRONG + "[legacy]\napp_passwords = true\n", "app passwords bypass MFA for legacy apps"),
])
def test_each_warning(text, fragment):
    ws = warnings_of(text)
    assert len(ws) == 1 and fragment in ws[0], ws


def test_limits_at_the_threshold_do_not_warn():
    assert warnings_of(STRONG + "[lockout]\nmax_failures = 10\n"
                       "[reverification]\nunmanaged_hours = 12\n"
                       'managed_hours = 12\ntrusted_networks = ["10.0.0.0/8", "192.168.0.0/16", '
                       '"fd00::/32"]\n') == []


# --- files --------------------------------------------------------------------------------

def test_load_policy_missing_file(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "nope.toml")
    assert info.value.errors == [f"{tmp_path / 'nope.toml'}: policy file not found"]


def test_load_policy_directory_and_bad_encoding(tmp_path):
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[x]")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(bad)


def test_load_policy_names_the_file_in_errors(tmp_path):
    f = tmp_path / "policy.toml"
    f.write_text("[lockout]\nmax_failures = 101\n")
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    assert info.value.errors[0].startswith(f"{f}: lockout.max_failures: 101")
    f.write_text("[lockout]\nmax_failures = 3\n")
    p = load_policy(f)
    assert p.lockout.max_failures == 3 and p.source == str(f)


def test_default_policy_path_precedence(tmp_path):
    system = tmp_path / "etc" / "policy.toml"
    home = tmp_path / "home"
    xdg = tmp_path / "xdg"
    home_file = home / ".config" / "token-agent" / "policy.toml"
    xdg_file = xdg / "token-agent" / "policy.toml"
    env = {"HOME": str(home)}

    def path(environ):
        return default_policy_path(environ, system_path=system)

    assert path(env) is None                                   # nothing exists: built-in
    home_file.parent.mkdir(parents=True)
    home_file.write_text("")
    assert path(env) == home_file
    assert path({**env, "XDG_CONFIG_HOME": "relative/dir"}) == home_file   # relative: ignored
    assert path({**env, "XDG_CONFIG_HOME": str(xdg)}) is None  # XDG dir chosen, no file there
    xdg_file.parent.mkdir(parents=True)
    xdg_file.write_text("")
    assert path({**env, "XDG_CONFIG_HOME": str(xdg)}) == xdg_file
    system.parent.mkdir()
    system.write_text("")
    assert path({**env, "XDG_CONFIG_HOME": str(xdg)}) == system
    named = tmp_path / "named.toml"                            # named: wins even when missing
    assert path({**env, "TOKEN_AGENT_POLICY": str(named)}) == named
    assert path({**env, "TOKEN_AGENT_POLICY": "~/p.toml"}) == home / "p.toml"
    assert path({**env, "TOKEN_AGENT_POLICY": ""}) == system   # empty counts as unset


def test_resolve_policy(tmp_path):
    env = {"HOME": str(tmp_path / "home")}
    missing_system = tmp_path / "no-such-file"
    assert resolve_policy(None, env, system_path=missing_system) is DEFAULT_POLICY
    f = tmp_path / "a.toml"
    f.write_text("[codes]\nlength = 7\n")
    g = tmp_path / "b.toml"
    g.write_text("[codes]\nlength = 8\n")
    env["TOKEN_AGENT_POLICY"] = str(g)
    assert resolve_policy(None, env, system_path=missing_system).codes.length == 8
    assert resolve_policy(f, env, system_path=missing_system).codes.length == 7
    env["TOKEN_AGENT_POLICY"] = str(tmp_path / "gone.toml")
    with pytest.raises(PolicyError, match="policy file not found"):
        resolve_policy(None, env, system_path=missing_system)


# --- network keys -------------------------------------------------------------------------

def test_network_key_ipv4_and_ipv6():
    assert network_key(DEFAULT_POLICY, "10.1.2.3") == "10.1.2.0/24"
    assert network_key(DEFAULT_POLICY, "10.1.2.250") == network_key(DEFAULT_POLICY, "10.1.2.3")
    assert network_key(DEFAULT_POLICY, "2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert network_key(DEFAULT_POLICY, "fe80::1%eth0") == "fe80::/64"
    assert network_key(DEFAULT_POLICY, "::ffff:10.1.2.3") == "10.1.2.0/24"
    p = parse_policy("[unusual_login]\nipv4_prefix = 16\nipv6_prefix = 48\n")
    assert network_key(p, "10.1.2.3") == "10.1.0.0/16"
    assert network_key(p, "2001:db8:1:2::9") == "2001:db8:1::/48"
    assert network_key(parse_policy("[unusual_login]\nipv4_prefix = 32\n"), "10.1.2.3") == \
        "10.1.2.3/32"


@pytest.mark.parametrize("bad", ["", "10.1.2", "10.1.2.3/24", "example.org", "::g"])
def test_network_key_rejects_non_addresses(bad):
    with pytest.raises(ValueError, match="is not an IP address"):
        network_key(DEFAULT_POLICY, bad)


# --- login facts --------------------------------------------------------------------------

@pytest.mark.parametrize("kw, fragment", [
    (dict(user_class="staff"), "unknown user class"),
    (dict(methods=("otp",)), "unknown method"),
    (dict(primary="sms"), "unknown primary factor"),
    (dict(primary="password", primary_multi_factor=True), "primary_multi_factor needs"),
    (dict(device="laptop"), "unknown device kind"),
    (dict(network="not-an-ip"), "is not an IP address"),
    (dict(now=datetime(2024, 1, 1)), "now must be an aware datetime"),
    (dict(last_verified_at=datetime(2024, 1, 1)), "last_verified_at must be an aware"),
])
def test_login_facts_are_checked(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        facts(**kw)


def test_login_facts_defaults():
    f = LoginFacts("external", True, ["totp"])
    assert f.methods == ("totp",) and f.now.tzinfo is not None and f.device == "unmanaged"


# --- decisions ----------------------------------------------------------------------------

DATED = parse_policy("[enforcement]\nfrom = 2024-07-16\n")


def test_before_the_enforcement_date():
    d = decide(DATED, facts(now=datetime(2024, 7, 15, 23, 59, tzinfo=timezone.utc), methods=()))
    assert not d.enforced and not d.mfa_required and not d.must_enrol and d.invite_enrol
    assert "class internal: MFA enforced from 2024-07-16, not yet" in d.rules[0]
    d = decide(DATED, facts(now=datetime(2024, 7, 15, tzinfo=timezone.utc), methods=("totp",)))
    assert not d.enforced and not d.mfa_required and not d.invite_enrol


def test_on_and_after_the_enforcement_date():
    d = decide(DATED, facts(now=datetime(2024, 7, 16, tzinfo=timezone.utc),
                            last_verified_at=None))
    assert d.enforced and d.mfa_required
    assert d.rules[0] == "class internal: MFA enforced since 2024-07-16"
    d = decide(DATED, facts(now=datetime(2024, 7, 16, tzinfo=timezone.utc), methods=()))
    assert d.enforced and d.must_enrol and d.mfa_required and not d.invite_enrol


def test_enforcement_date_and_opted_in_user_of_an_optional_class():
    """The date holds back the class's enforcement only: an account whose own MFA is on (new
    accounts, or users who turned it on) has it at once, in any class."""
    before = datetime(2024, 7, 1, tzinfo=timezone.utc)
    d = decide(DATED, facts(user_class="external", mfa_enabled=True, methods=(), now=before))
    assert d.enforced and d.must_enrol and d.mfa_required and not d.invite_enrol
    d = decide(DATED, facts(user_class="internal", mfa_enabled=True, methods=("totp",), now=before,
                            last_verified_at=None))
    assert d.enforced and d.mfa_required
    assert "already on for this account" in d.rules[0]
    d = decide(DATED, facts(user_class="external", mfa_enabled=False, methods=(), now=before))
    assert not d.enforced and not d.mfa_required
    d = decide(DATED, facts(user_class="external", mfa_enabled=True, methods=(),
                            now=datetime(2024, 7, 17, tzinfo=timezone.utc)))
    assert d.enforced and d.must_enrol


def test_optional_class_not_opted_in():
    d = decide(DEFAULT_POLICY, facts(user_class="contributor", methods=("totp",),
                                     last_verified_at=None))
    assert not d.enforced and not d.mfa_required and not d.invite_enrol
    assert d.rules == ("class contributor: MFA optional and not turned on for this account: "
                       "no second factor",)
    d = decide(DEFAULT_POLICY, facts(user_class="contributor", methods=()))
    assert d.invite_enrol and not d.must_enrol


@pytest.mark.parametrize("new_accounts_mfa", [True, False])
def test_new_accounts(new_accounts_mfa):
    """A new account's mfa_enabled comes from the policy's default for its class; it decides
    for optional classes."""
    p = parse_policy(f"[classes.external]\nnew_accounts_mfa = {str(new_accounts_mfa).lower()}\n")
    mfa_enabled = p.new_account_mfa("external")
    d = decide(p, facts(user_class="external", mfa_enabled=mfa_enabled, methods=(),
                        has_history=False, device_seen=False, network_seen=False,
                        mfa_source="new-account"))
    assert d.enforced is new_accounts_mfa
    assert d.must_enrol is new_accounts_mfa and d.mfa_required is new_accounts_mfa
    assert d.invite_enrol is not new_accounts_mfa
    assert not d.alert


@pytest.mark.parametrize("text, expected", [
    ("", {"internal": True, "external": False, "contributor": False}),
    ("[enforcement]\nnew_accounts_mfa = false\n",
     {"internal": False, "external": False, "contributor": False}),
    ("[classes.external]\nenforce = true\n",
     {"internal": True, "external": True, "contributor": False}),
    ("[classes.contributor]\nnew_accounts_mfa = true\n[classes.internal]\n"
     "new_accounts_mfa = false\n", {"internal": False, "external": False, "contributor": True}),
])
def test_new_account_mfa_follows_the_class(text, expected):
    """New accounts start with MFA on where their class enforces it (a requester, class
    external, does not), unless the class or [enforcement] says otherwise."""
    p = parse_policy(text)
    assert {c: p.new_account_mfa(c) for c in expected} == expected
    assert {c: v["new_accounts_mfa"] for c, v in p.to_json()["classes"].items()} == expected


@pytest.mark.parametrize("source, words", [
    ("new-account", "on since the account was created"),
    ("admin", "turned on by an administrator"),
    ("user", "turned on by the user"),
    (None, "turned on for this account"),
])
def test_explain_names_who_turned_mfa_on(source, words):
    d = decide(DEFAULT_POLICY, facts(user_class="external", mfa_enabled=True, methods=("totp",),
                                     mfa_source=source))
    assert d.rules[0] == f"class external: MFA optional, {words}" + (
        " (new_accounts_mfa for its class)" if source == "new-account" else "")


def test_explain_says_the_class_enforces_mfa_whatever_the_account_setting():
    d = decide(DEFAULT_POLICY, facts(user_class="internal", mfa_enabled=False, methods=("totp",),
                                     mfa_source="admin"))
    assert d.enforced and d.rules[:2] == (
        "class internal: MFA enforced",
        "the account's own MFA setting is off (turned off by an administrator): class internal "
        "enforces MFA regardless")


@pytest.mark.parametrize("primary, rule", [
    ("key", "primary factor key with user verification satisfies MFA: no second challenge"),
    ("card", "primary factor card with PIN satisfies MFA: no second challenge"),
])
def test_multi_factor_primary_skips_the_second_factor(primary, rule):
    d = decide(DEFAULT_POLICY, facts(primary=primary, primary_multi_factor=True,
                                     methods=(primary,), last_verified_at=None))
    assert d.enforced and not d.mfa_required and rule in d.rules and not d.alert
    # even on an unusual login, where the alert is still recorded
    d = decide(DEFAULT_POLICY, facts(primary=primary, primary_multi_factor=True,
                                     methods=(primary,), device_id="new", device_seen=False))
    assert not d.mfa_required and d.alert and rule in d.rules
    assert "new device new for this user: alert recorded" in d.rules


def test_multi_factor_primary_not_allowed_does_not_skip():
    p = parse_policy('[methods]\nallowed = ["totp", "card"]\n')
    d = decide(p, facts(primary="key", primary_multi_factor=True, methods=("key", "totp"),
                        last_verified_at=None))
    assert d.mfa_required and d.usable_methods == ("totp",)
    assert any("not an allowed method" in r for r in d.rules)


def test_key_without_user_verification_does_not_skip():
    d = decide(DEFAULT_POLICY, facts(primary="key", primary_multi_factor=False,
                                     methods=("key",), last_verified_at=None))
    assert d.mfa_required
    assert "primary factor key without user verification: one factor only" in d.rules
    d = decide(DEFAULT_POLICY, facts(primary="card", methods=("card",), last_verified_at=None))
    assert d.mfa_required and "primary factor card without PIN: one factor only" in d.rules


@pytest.mark.parametrize("device, network, hours_key", [
    ("unmanaged", "192.0.2.10", "unmanaged_hours"),
    ("managed", "192.0.2.10", "managed_hours"),
])
def test_reverification_7_9_vs_8_1_hours(device, network, hours_key):
    d = decide(DEFAULT_POLICY, facts(device=device, network=network,
                                     last_verified_at=NOW - timedelta(hours=7.9)))
    assert not d.mfa_required
    assert d.rules[-1].endswith("last second factor 7.9 h ago, within 8 h: no second factor")
    d = decide(DEFAULT_POLICY, facts(device=device, network=network,
                                     last_verified_at=NOW - timedelta(hours=8.1)))
    assert d.mfa_required
    assert d.rules[-1].endswith("last second factor 8.1 h ago, more than 8 h: second factor "
                                "required")
    label = "unmanaged device" if device == "unmanaged" else \
        "managed device outside the trusted networks"
    assert d.rules[-1].startswith(label + ":")
    # the other setting does not count
    other = "managed_hours" if hours_key == "unmanaged_hours" else "unmanaged_hours"
    p = parse_policy(f"[reverification]\n{other} = 1\n")
    assert not decide(p, facts(device=device, network=network,
                               last_verified_at=NOW - timedelta(hours=7.9))).mfa_required


def test_reverification_without_record_or_in_the_future():
    d = decide(DEFAULT_POLICY, facts(last_verified_at=None))
    assert d.mfa_required and "no second factor on record" in d.rules[-1]
    d = decide(DEFAULT_POLICY, facts(last_verified_at=NOW + timedelta(hours=1)))
    assert d.mfa_required and "in the future" in d.rules[-1]


TRUSTED = parse_policy('[reverification]\ntrusted_networks = ["10.0.0.0/8", "fd00::/8"]\n')


def test_managed_device_in_trusted_network():
    for addr in ("10.20.30.40", "fd00::5", "::ffff:10.1.1.1"):
        d = decide(TRUSTED, facts(device="managed", network=addr, last_verified_at=None))
        assert not d.mfa_required
        assert d.rules[-1].startswith("managed device in trusted network ")
    d = decide(TRUSTED, facts(device="unmanaged", network="10.20.30.40", last_verified_at=None))
    assert d.mfa_required
    d = decide(TRUSTED, facts(device="managed", network=None, last_verified_at=None))
    assert d.mfa_required and d.rules[-1].startswith("managed device, network unknown")


@pytest.mark.parametrize("history", [True, False])
def test_unusual_device(history):
    d = decide(TRUSTED, facts(device="managed", network="10.1.1.1", device_id="ws-9",
                              device_seen=False, has_history=history))
    assert d.mfa_required and d.alert is history
    if history:
        assert "new device ws-9 for this user: second factor required and alert recorded" in d.rules
    else:
        assert any("first login: no history to compare" in r for r in d.rules)


@pytest.mark.parametrize("history", [True, False])
def test_unusual_network(history):
    d = decide(DEFAULT_POLICY, facts(network="192.0.2.77", network_seen=False,
                                     has_history=history))
    assert d.mfa_required and d.alert is history
    expected = ("alert recorded" if history else
                "first login: no history to compare, no alert")
    assert f"new network 192.0.2.0/24 for this user: second factor required and {expected}" \
        in d.rules


# --- roaming: joined workstations of the organisation -------------------------------------

def roaming(**kw) -> LoginFacts:
    """A clinician at a ward PC they never used: a joined, managed workstation inside the
    trusted network, a device new to them, a password primary and no recent second factor."""
    base = dict(device="managed", device_joined=True, network="10.4.2.9", device_id="ward-pc-3",
                device_seen=False, network_seen=True, last_verified_at=None)
    base.update(kw)
    return facts(**base)


def test_roaming_to_a_new_joined_workstation_is_not_unusual():
    d = decide(TRUSTED, roaming())
    assert not d.mfa_required and not d.alert
    assert d.rules[-2:] == (
        "new device ward-pc-3 for this user: a joined workstation of the organisation in "
        "trusted network 10.0.0.0/8: roaming, not unusual (no alert)",
        "managed device in trusted network 10.0.0.0/8: no second factor")


def test_roaming_onto_a_new_trusted_network_is_not_unusual():
    d = decide(TRUSTED, roaming(network="10.9.9.9", network_seen=False))
    assert not d.mfa_required and not d.alert
    assert ("new device ward-pc-3 and new network 10.9.9.0/24 for this user: a joined "
            "workstation of the organisation in trusted network 10.0.0.0/8: roaming, not "
            "unusual (no alert)") in d.rules


@pytest.mark.parametrize("change, expected", [
    # the same PC not joined (a managed device by the caller's word only): unusual
    (dict(device_joined=False), "new device ward-pc-3 for this user: second factor required "
                                "and alert recorded"),
    # joined, but outside the trusted networks (a ward PC carried home, a VPN exit)
    (dict(network="192.0.2.7"), "new device ward-pc-3 for this user: second factor required "
                                "and alert recorded"),
    (dict(network="192.0.2.7", network_seen=False),
     "new device ward-pc-3 and new network 192.0.2.0/24 for this user: second factor required "
     "and alert recorded"),
    # joined, network unknown: nothing vouches for where it is
    (dict(network=None), "new device ward-pc-3 for this user: second factor required and "
                         "alert recorded"),
    # an unknown unmanaged device inside the trusted network
    (dict(device="unmanaged", device_joined=False),
     "new device ward-pc-3 for this user: second factor required and alert recorded"),
])
def test_roaming_needs_a_joined_workstation_inside_a_trusted_network(change, expected):
    d = decide(TRUSTED, roaming(**change))
    assert d.mfa_required and d.alert
    assert expected in d.rules
    assert not any("roaming" in r for r in d.rules)


def test_roaming_without_trusted_networks_is_unusual():
    d = decide(DEFAULT_POLICY, roaming())
    assert d.mfa_required and d.alert


def test_roaming_with_a_multi_factor_primary_says_so_without_an_alert():
    d = decide(TRUSTED, roaming(primary="key", primary_multi_factor=True, methods=("key",)))
    assert not d.mfa_required and not d.alert
    assert d.rules[-1].endswith("roaming, not unusual (no alert)")


def test_roaming_of_a_user_without_mfa_records_no_alert():
    d = decide(TRUSTED, roaming(user_class="external"))
    assert not d.mfa_required and not d.alert
    assert d.rules[-1].endswith("roaming, not unusual (no alert)")


def test_a_seen_joined_workstation_says_nothing_about_roaming():
    d = decide(TRUSTED, roaming(device_seen=True))
    assert not d.mfa_required and not d.alert
    assert d.rules[-1] == "managed device in trusted network 10.0.0.0/8: no second factor"
    assert not any("roaming" in r for r in d.rules)


def test_roaming_with_unusual_login_checks_off():
    p = parse_policy('[reverification]\ntrusted_networks = ["10.0.0.0/8"]\n'
                     '[unusual_login]\nenabled = false\n')
    d = decide(p, roaming())
    assert not d.mfa_required and not d.alert
    assert "unusual-login checks are off ([unusual_login] enabled = false)" in d.rules
    assert not any("roaming" in r for r in d.rules)


def test_joined_needs_a_managed_device():
    with pytest.raises(ValueError, match="device_joined needs device 'managed'"):
        facts(device="unmanaged", device_joined=True)


def test_unusual_login_disabled():
    p = parse_policy("[unusual_login]\nenabled = false\n")
    d = decide(p, facts(network="192.0.2.77", network_seen=False, device_id="x",
                        device_seen=False))
    assert not d.mfa_required and not d.alert
    assert "unusual-login checks are off ([unusual_login] enabled = false)" in d.rules


def test_unusual_login_of_a_user_without_mfa_still_alerts():
    d = decide(DEFAULT_POLICY, facts(user_class="external", device_id="x", device_seen=False))
    assert not d.mfa_required and d.alert


def test_no_device_or_network_given_is_not_unusual():
    d = decide(DEFAULT_POLICY, facts(device_id=None, network=None, device_seen=False,
                                     network_seen=False))
    assert not d.alert and not d.mfa_required


@pytest.mark.parametrize("allowed", [True, False])
def test_legacy_app_passwords(allowed):
    p = parse_policy(f"[legacy]\napp_passwords = {str(allowed).lower()}\n")
    d = decide(p, facts(legacy=True, methods=("totp", "app_password"), last_verified_at=None))
    assert d.app_password_allowed is allowed
    assert d.mfa_required is not allowed
    if allowed:
        assert "app passwords allowed ([legacy] app_passwords = true)" in d.rules[-1]
    else:
        assert "app passwords are not allowed ([legacy] app_passwords = false)" in d.rules[-1]


def test_only_backup_codes_must_enrol_but_may_use_one():
    d = decide(DEFAULT_POLICY, facts(methods=("backup",)))
    assert d.must_enrol and d.mfa_required and d.usable_methods == ("backup",)
    assert "only backup codes" in d.rules[-1]


def test_backup_codes_disallowed():
    p = parse_policy("[methods]\nallow_backup_codes = false\n")
    d = decide(p, facts(methods=("totp", "backup")))
    assert "backup" not in d.allowed_methods and d.usable_methods == ("totp",)


def test_explain_and_json():
    d = decide(DEFAULT_POLICY, facts(methods=("totp", "backup"), last_verified_at=None,
                                     network="192.0.2.1", network_seen=False))
    text = explain(d)
    assert text.splitlines()[0] == "second factor: required"
    assert "the user's usable methods: totp, backup (fallback)" in text
    assert "unusual-login alert: yes" in text
    assert "  1. class internal: MFA enforced" in text
    assert "  2. new network 192.0.2.0/24 for this user" in text
    data = json.loads(json.dumps(d.to_json()))
    assert data["mfa_required"] is True and data["usable_methods"] == ["totp", "backup"]
    assert set(data) == {f for f in Decision.__dataclass_fields__}


# --- the policy matrix --------------------------------------------------------------------
#
# Every user class x device kind x method held, against three policies; inside each case every
# combination of the user's own MFA choice and a recent / stale last verification. The
# expectation below is written from the rules, with its own strength table.

T_STRENGTH = {"email": 1, "sms": 2, "voice": 2, "messaging": 2, "totp": 3, "push": 3,
              "key": 4, "card": 4}
T_ORDER = ["key", "card", "totp", "push", "sms", "voice", "messaging", "email"]
ALL_METHODS = ["password", "key", "card", "totp", "push", "email", "sms", "voice", "messaging",
               "backup", "app_password", "none"]

POLICIES = {
    "default": (
        "",
        dict(allowed=set(T_ORDER), minimum={}, enforce={"internal"}),
    ),
    "no-email": (
        '[methods]\nallowed = ["sms", "voice", "messaging", "totp", "push", "key", "card"]\n'
        '[classes.internal]\nminimum = "sms"\n',
        dict(allowed=set(T_ORDER) - {"email"}, minimum={"internal": "sms"}, enforce={"internal"}),
    ),
    "strict": (
        '[classes.internal]\nminimum = "key"\n[classes.external]\nenforce = true\n'
        'minimum = "totp"\n[methods]\nallow_backup_codes = false\n',
        dict(allowed=set(T_ORDER), minimum={"internal": "key", "external": "totp"},
             enforce={"internal", "external"}, no_backup=True),
    ),
}
TRUSTED_TEXT = '[reverification]\ntrusted_networks = ["10.0.0.0/8"]\n'
DEVICES = {
    "managed-trusted": ("managed", "10.4.5.6"),
    "managed-outside": ("managed", "192.0.2.50"),
    "unmanaged": ("unmanaged", "10.4.5.6"),      # inside the range, but not a managed device
}
PARSED = {name: parse_policy(text + TRUSTED_TEXT) for name, (text, _) in POLICIES.items()}


def expectation(spec: dict, user_class: str, device_kind: str, method: str, mfa_enabled: bool,
                recent: bool) -> dict:
    floor = T_STRENGTH[spec["minimum"].get(user_class, "email")]
    allowed = [m for m in T_ORDER if m in spec["allowed"] and T_STRENGTH[m] >= floor]
    if not spec.get("no_backup"):
        allowed.append("backup")
    usable = [m for m in allowed if m == method]
    normal_usable = [m for m in usable if m != "backup"]
    enforced = user_class in spec["enforce"] or mfa_enabled
    if not enforced:
        mfa_required, must_enrol = False, False
    elif not normal_usable:
        mfa_required, must_enrol = True, True
    elif device_kind == "managed-trusted":
        mfa_required, must_enrol = False, False
    else:
        mfa_required, must_enrol = not recent, False
    return dict(mfa_required=mfa_required, enforced=enforced, must_enrol=must_enrol,
                invite_enrol=not enforced and not normal_usable,
                allowed_methods=tuple(allowed), usable_methods=tuple(usable), alert=False,
                app_password_allowed=False)


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("device_kind", list(DEVICES))
@pytest.mark.parametrize("user_class", USER_CLASSES)
def test_policy_matrix(policy_name, user_class, device_kind, method):
    policy = PARSED[policy_name]
    spec = POLICIES[policy_name][1]
    device, network = DEVICES[device_kind]
    for mfa_enabled in (False, True):
        for recent in (True, False):
            f = LoginFacts(
                user_class=user_class, mfa_enabled=mfa_enabled,
                methods=() if method == "none" else (method,), primary="password",
                device=device, network=network, device_id="ws-1", now=NOW,
                last_verified_at=NOW - timedelta(hours=1 if recent else 9),
                device_seen=True, network_seen=True, has_history=True)
            d = decide(policy, f)
            want = expectation(spec, user_class, device_kind, method, mfa_enabled, recent)
            got = {k: getattr(d, k) for k in want}
            assert got == want, (mfa_enabled, recent, d.rules)
            assert d.rules and d.rules[0].startswith(f"class {user_class}: ")


def test_lockout_limit_decay_unfamiliar_and_bind_minutes():
    """Issue 11: the lockout's limit until reset, its unfamiliar share and decay, and the
    re-authentication window for changing methods: defaults, ranges, cross-checks, warnings."""
    p = parse_policy("")
    assert (p.lockout.limit, p.lockout.unfamiliar_limit, p.lockout.decay_hours) == (100, 50, 24)
    assert p.reverification.bind_minutes == 5
    assert p.to_json()["lockout"]["limit"] == 100
    assert p.to_json()["reverification"]["bind_minutes"] == 5
    assert parse_policy("[lockout]\nlimit = 30\n").lockout.unfamiliar_limit == 15
    assert "lockout.limit: 101 is out of range" in one_error("[lockout]\nlimit = 101\n")
    assert "lockout.unfamiliar_limit: 60 is more than lockout.limit (40)" in one_error(
        "[lockout]\nlimit = 40\nunfamiliar_limit = 60\n")
    assert "lockout.decay_hours" in one_error("[lockout]\ndecay_hours = 0\n")
    assert "reverification.bind_minutes: 61 is out of range" in one_error(
        "[reverification]\nbind_minutes = 61\n")
    assert warnings_of(STRONG + "[lockout]\nlimit = 40\nunfamiliar_limit = 40\n") == [
        "p.toml: lockout.unfamiliar_limit: 40, as many as lockout.limit: failures from "
        "unfamiliar devices can lock the user out of their own workstation too"]
    assert "a login that old still lets a method be added" in \
        warnings_of(STRONG + "[reverification]\nbind_minutes = 30\n")[0]
