"""token_agent/compliance.py: each user's compliance with the MFA policy (the admin users list
and its CSV), from the policy's own decision and the kinds' strengths; the CSV safe to open
in a spreadsheet."""

from __future__ import annotations

import csv
import io

import pytest

from token_agent import compliance
from token_agent.policy import parse_policy
from token_agent.store import Store

T0 = 1_700_000_000.0  # 2023-11-14


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "token-agent.db")
    yield s
    s.close()


def _user(store, name, kinds_=(), *, user_class="internal", mfa=True, display=None):
    user = store.add_user(name, display_name=display, user_class=user_class, mfa_enabled=mfa)
    store.add_method(user.id, "password", "password")
    for i, kind in enumerate(kinds_):
        store.add_method(user.id, kind, f"{kind} {i}")
    return store.get_user(name)


def _status(store, policy_text="", **filters):
    return {line.username: line.status
            for line in compliance.report(store, parse_policy(policy_text), T0, **filters)}


def test_statuses_from_the_policy_and_the_strengths(store):
    _user(store, "nobody")  # internal: enforced, nothing held
    _user(store, "texts", ["sms"])
    _user(store, "mailer", ["email", "voice"])
    _user(store, "appuser", ["totp", "sms"])
    _user(store, "keyholder", ["fido2"])
    _user(store, "pusher", ["push"])
    _user(store, "spare", ["backup_codes"])  # backup codes alone: must still enrol
    _user(store, "visitor", user_class="external", mfa=False)  # optional and off
    _user(store, "careful", ["email"], user_class="external", mfa=False)
    assert _status(store) == {
        "appuser": "compliant", "careful": "weak-only", "keyholder": "compliant",
        "mailer": "weak-only", "nobody": "not-enrolled", "pusher": "compliant",
        "spare": "not-enrolled", "texts": "weak-only", "visitor": "not-required"}


def test_a_method_below_the_class_minimum_does_not_count(store):
    _user(store, "texts", ["sms"])
    _user(store, "mailer", ["email"])
    policy = '[classes.internal]\nenforce = true\nminimum = "totp"\n'
    assert _status(store, policy) == {"texts": "not-enrolled", "mailer": "not-enrolled"}
    line = compliance.report(store, parse_policy(policy), T0, name="texts")[0]
    assert line.acceptable == () and line.methods == ("password", "text message code")


def test_a_method_the_policy_does_not_allow_does_not_count(store):
    _user(store, "appuser", ["totp", "sms"])
    policy = '[methods]\nallowed = ["sms", "email"]\n'
    assert _status(store, policy) == {"appuser": "weak-only"}


def test_enforcement_from_a_later_date_is_still_not_enrolled(store):
    _user(store, "later", user_class="contributor", mfa=False)
    policy = ('[enforcement]\nfrom = 2030-01-01\nnew_accounts_mfa = false\n'
              '[classes.contributor]\nenforce = true\n')
    line = compliance.report(store, parse_policy(policy), T0)[0]
    assert line.status == "not-enrolled"
    assert not line.mfa_applies
    assert line.class_enforcement == "enforces MFA from 2030-01-01"
    assert _status(store) == {"later": "not-required"}  # the defaults: contributors optional


def test_the_users_own_mfa_flag_applies_where_the_class_leaves_it_optional(store):
    _user(store, "keen", user_class="external", mfa=True)
    line = compliance.report(store, parse_policy(""), T0)[0]
    assert (line.status, line.mfa_applies, line.class_enforcement) == (
        "not-enrolled", True, None)
    assert line.mfa_words.startswith("on since the account was created")


def test_unconfirmed_methods_do_not_count(store):
    user = _user(store, "pending")
    store.add_method(user.id, "totp", "half-enrolled app", confirmed=False)
    line = compliance.report(store, parse_policy(""), T0)[0]
    assert (line.status, line.methods) == ("not-enrolled", ("password",))


def test_filters(store):
    _user(store, "alice", ["totp"], display="Alice Smith")
    _user(store, "bob")
    _user(store, "carol", user_class="external", mfa=False, display="Carol BOBBINS")
    assert list(_status(store, status="not-enrolled")) == ["bob"]
    assert list(_status(store, user_class="external")) == ["carol"]
    assert list(_status(store, name="BOB")) == ["bob", "carol"]  # display names too
    assert list(_status(store, name="smith", status="compliant")) == ["alice"]
    assert _status(store, name="nobody") == {}
    with pytest.raises(ValueError, match="unknown compliance status"):
        compliance.report(store, parse_policy(""), T0, status="fine")
    with pytest.raises(ValueError, match="unknown user class"):
        compliance.report(store, parse_policy(""), T0, user_class="admins")


@pytest.mark.parametrize("value, cell", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1", "'+1"), ("-2", "'-2"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("alice", "alice"), ("a=b", "a=b"), ("", "")])
def test_csv_cells_never_start_a_formula(value, cell):
    assert compliance.csv_cell(value) == cell


def test_csv_has_a_header_and_one_safe_row_per_user(store):
    _user(store, "-2.3", display="=cmd|' /C calc'!A0")
    _user(store, "alice", ["totp"], display="Alice, \"the\" admin")
    text = compliance.to_csv(compliance.report(store, parse_policy(""), T0))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(compliance.CSV_COLUMNS)
    assert rows[1][:3] == ["'-2.3", "'=cmd|' /C calc'!A0", "internal"]
    assert rows[1][-1] == "Enforced but not yet enrolled"
    assert rows[2][:2] == ["alice", "Alice, \"the\" admin"]
    assert rows[2][-1] == "Compliant"
    assert rows[2][7] == "password; authenticator app"
    for row in rows[1:]:
        assert not any(c.startswith(("=", "+", "-", "@")) for c in row)


def test_export_is_recorded_with_its_filters(store):
    admin = _user(store, "admin1")
    _user(store, "alice", ["totp"])
    text = compliance.export_csv(store, parse_policy(""), T0, actor="admin1",
                                 actor_id=admin.id, via="web", status="compliant")
    assert [r[0] for r in csv.reader(io.StringIO(text))] == ["username", "alice"]
    event = store.list_events(kind="admin.export-users")[0]
    assert event.detail == {"actor": "admin1", "via": "web", "status": "compliant"}
    assert event.username == "admin1"
