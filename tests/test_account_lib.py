"""The library under the account pages (issue 16), at library level with the fake clock and
scripted logins of ``test_mfa_login.py``: landlines refused for texts; a method's removal
never leaves an MFA user without a second factor (nor anyone without a way to sign in); the
alternate phone, once preferred, is the one a login sends its code to; the recent sign-ins
(where, how, unusual) of one user only; the unusual-login notice.

Every test's log records and audit events are checked for its secrets (``no_secret_leaks``).
"""

from __future__ import annotations

import json
import re

import pytest

from test_mfa_login import PASSWORD, Device, HOUR, World, world, no_secret_leaks  # noqa: F401
from token_agent import admin_ops, signins
from token_agent.agent import Agent
from token_agent.delivery import LANDLINE_REFUSED
from token_agent.factors import FactorError, backup, codes, lockout
from token_agent.outcome import Reason
from token_agent.policy import parse_policy

MOBILE, ALTERNATE = "07700900123", "07700900456"


class Outbox:
    """The delivery outbox of a world: every code sent, read back (and counted a secret)."""

    def __init__(self, w: World, tmp_path, extra: str = "") -> None:
        self.dir = tmp_path / f"outbox{len(list(tmp_path.iterdir()))}"
        text = (f'{extra}\n[codes]\nresend_seconds = 0\n[delivery]\nsender_name = "NHS Trust"\n'
                f'[delivery.sms]\ngateway = "outbox"\n[delivery.email]\ngateway = "outbox"\n'
                f'[delivery.outbox]\ndir = "{self.dir}"\n')
        self.w = w
        w.agent = Agent(store=w.store, keys=w.agent.keys, policy=parse_policy(text),
                        data_dir=w.agent.data_dir, clock=w.clock)

    def messages(self) -> list[dict]:
        if not self.dir.exists():
            return []
        found = [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]
        for m in found:
            if m.get("code"):
                self.w.secrets.append(m["code"])
        return found

    def last(self) -> dict:
        """The latest code sent (notices, sent beside, have none)."""
        return [m for m in self.messages() if m.get("code")][-1]


def add_phone(w: World, box: Outbox, user, number: str, name: str):
    method, _ = codes.add_contact(w.ctx, user.id, "sms", number, name=name)
    assert codes.confirm_contact(w.ctx, user.id, "sms", box.last()["code"], name=name).ok
    return w.store.get_method(method.id)


# --------------------------------------------------------------------------- landlines


def test_a_landline_is_refused_for_text_messages_and_nothing_is_sent(world, tmp_path):
    w = world()
    box = Outbox(w, tmp_path)
    alice = w.add_user("alice")
    for office in ("020 7946 0018", "+44 1632 960001"):
        with pytest.raises(FactorError) as info:
            codes.add_contact(w.ctx, alice.id, "sms", office, name="office")
        assert info.value.reason == Reason.METHOD_NOT_ALLOWED
        assert info.value.message == LANDLINE_REFUSED
        assert "Office phones and landlines cannot receive text messages" in LANDLINE_REFUSED
    assert box.messages() == []
    assert [m.kind for m in w.store.list_methods(alice.id)] == ["password"]
    add_phone(w, box, alice, MOBILE, "mobile")  # a mobile is fine
    assert [m["to"] for m in box.messages()] == ["+447700900123"]


# --------------------------------------------------------------------------- removal


def test_the_last_second_factor_is_never_removed_under_enforced_mfa(world):
    w = world()  # class internal: MFA enforced
    alice = w.add_user("alice")
    w.enrol_totp(alice)
    app = w.store.find_method(alice.id, "totp")
    with pytest.raises(admin_ops.RemovalRefused) as info:
        admin_ops.remove_method(w.agent, alice, app, None)
    assert "last second factor" in str(info.value) and "add another method" in str(info.value)
    assert w.store.find_method(alice.id, "totp") is not None
    refused, = w.events("method.removed", alice)
    assert refused.outcome == "refused" and refused.detail["reason"] == "last-method"
    # an administrator is refused too: a lost device is reset (admin reset-methods)
    with pytest.raises(admin_ops.RemovalRefused):
        admin_ops.remove_method(w.agent, alice, app, "root")

    # with backup codes kept, the app can go (the codes let her in to set up another)
    w.backup_codes(alice)
    admin_ops.remove_method(w.agent, alice, app, None)
    assert sorted(m.kind for m in w.store.list_methods(alice.id)) == ["backup_codes", "password"]
    codes_method = backup.get(w.ctx, alice.id)
    with pytest.raises(admin_ops.RemovalRefused):  # now they are the last
        admin_ops.remove_method(w.agent, alice, codes_method, None)


def test_the_last_way_to_sign_in_is_never_removed(world):
    w = world()
    alice = w.add_user("alice", user_class="external")  # MFA optional: only the primary rule
    alice = w.store.update_user("alice", mfa_enabled=False, mfa_source="user")  # and off
    w.enrol_totp(alice)
    pw = w.store.find_method(alice.id, "password")
    with pytest.raises(admin_ops.RemovalRefused) as info:
        admin_ops.remove_method(w.agent, alice, pw, None)
    assert "last way you can sign in" in str(info.value)
    # MFA does not apply to her: her only second factor may go
    admin_ops.remove_method(w.agent, alice, w.store.find_method(alice.id, "totp"), None)
    assert [m.kind for m in w.store.list_methods(alice.id)] == ["password"]


def test_a_pending_method_can_always_be_removed(world):
    w = world()
    alice = w.add_user("alice")
    w.enrol_totp(alice)
    from token_agent.factors import totp

    pending = totp.begin_enrol(w.ctx, alice.id, name="second phone")
    w.secrets.append(pending.secret)
    admin_ops.remove_method(w.agent, alice, w.store.get_method(pending.method.id), None)
    assert [m.name for m in w.store.list_methods(alice.id, "totp")] == ["authenticator app"]


# --------------------------------------------------------------------------- alternate phone


def test_the_preferred_alternate_phone_gets_the_login_code(world, tmp_path):
    w = world()
    box = Outbox(w, tmp_path)
    alice = w.add_user("alice")
    add_phone(w, box, alice, MOBILE, "mobile")
    alternate = add_phone(w, box, alice, ALTERNATE, "alternate phone")
    listed = {m["name"]: m for m in admin_ops.list_methods(w.store, alice)}
    assert listed["mobile"]["preferred"] and listed["alternate phone"]["destination"] == \
        "+44•••••456"
    admin_ops.prefer_method(w.store, alice, alternate, None)

    # both phones are offered; the alternate is the default, and its number gets the code
    out, script = w.login("alice", PASSWORD, lambda s: box.last()["code"])
    assert out.ok, out
    assert script.chose == [("Second factor (or use a different method)",
                             ["sms:mobile", "sms:alternate phone"], "sms:alternate phone")]
    assert box.last()["to"] == "+447700900456" and box.last()["purpose"] == "login"
    assert script.prompts[-1] == "Enter the code sent to +44•••••456"
    event = w.events("login", alice)[0]
    assert event.detail["second"] == "sms" and event.detail["second_method"] == "alternate phone"

    # the channel asked for by name ("sms", as a PAM stack may ask) means the preferred one
    out, _ = w.login("alice", PASSWORD, lambda s: box.last()["code"], second="sms")
    assert out.ok and box.last()["to"] == "+447700900456"
    # the mobile, when chosen, still works
    out, _ = w.login("alice", PASSWORD, lambda s: box.last()["code"], choices=["sms:mobile"])
    assert out.ok and box.last()["to"] == "+447700900123"

    # the alternate locked: the mobile is the default, so a locked phone never strands her
    scope = lockout.scope_for(lockout.method_scope(alternate.id), False)  # ANYWHERE: unfamiliar
    for _ in range(w.agent.policy.lockout.max_failures):
        try:
            lockout.attempt(w.store, scope, alice.id, now=w.clock(), label="sms",
                            rules=w.agent.policy.lockout)
        except lockout.Locked:
            break
        lockout.failed(w.store, scope, rules=w.agent.policy.lockout)
    assert lockout.state(w.store, scope).locked(w.clock())
    out, script = w.login("alice", PASSWORD, lambda s: box.last()["code"])
    assert out.ok and script.chose[0][2] == "sms:mobile" and box.last()["to"] == "+447700900123"


# --------------------------------------------------------------------------- recent sign-ins


def test_recent_sign_ins_say_where_and_how_and_flag_the_unusual_one(world, tmp_path):
    w = world()
    box = Outbox(w, tmp_path)
    alice, bob = w.add_user("alice"), w.add_user("bob")
    add_phone(w, box, alice, MOBILE, "mobile")
    secret = w.enrol_totp(bob)
    ward = Device("unmanaged", device_id="browser-cookie-1", network="192.0.2.10")
    assert w.login("alice", PASSWORD, lambda s: box.last()["code"], device=ward)[0].ok
    w.clock.advance(HOUR)
    assert not w.login("alice", PASSWORD, "000000", device=ward, step_up=True)[0].ok
    w.clock.advance(HOUR)
    home = Device("unmanaged", device_id="browser-cookie-2", network="198.51.100.7")
    assert w.login("alice", PASSWORD, lambda s: box.last()["code"], device=home)[0].ok
    assert w.login("bob", PASSWORD, w.code(secret), device=home)[0].ok

    listed = signins.recent(w.store, alice.id)
    assert [(s.ok, s.unusual) for s in listed] == [(True, True), (False, False), (True, False)]
    newest, failed, first = listed
    assert newest.how == "password + text message code (mobile)"
    assert newest.where == "a web browser or personal device, network 198.51.100.0/24"
    assert newest.network == "198.51.100.0/24" and newest.result == "signed in"
    assert failed.result == "failed: wrong code" and failed.how == "password + text message code"
    assert first.result == "signed in"
    assert failed.where == "a web browser or personal device, network 192.0.2.0/24"
    # the device is told apart by a reference, never by its cookie
    assert first.device_ref and first.device_ref != newest.device_ref
    assert first.device_ref == failed.device_ref
    assert "browser-cookie" not in json.dumps([s.to_json() for s in listed])
    for e in w.events("login", alice):
        assert "browser-cookie" not in json.dumps(e.detail)
    # bob's sign-in is not alice's
    assert len(listed) == 3 and len(signins.recent(w.store, bob.id)) == 1
    # alice was told about the unusual one on her mobile (notify.tell_user), with no code
    notices = [m for m in box.messages() if m["purpose"] == "notice"]
    assert [m["to"] for m in notices] == ["+447700900123"]
    assert "was signed in to on" in notices[0]["text"]
    assert "from a web browser or personal device on network 198.51.100.0/24" in \
        notices[0]["text"] and not re.search(r"\b\d{6}\b", notices[0]["text"].split("on 1")[0])


# --------------------------------------------------------------------------- authenticator app


def test_a_pending_app_is_read_back_for_its_page_until_confirmed(world):
    from token_agent.factors import totp

    w = world()
    alice = w.add_user("alice")
    assert totp.pending_enrolment(w.ctx, alice.id) is None
    started = totp.begin_enrol(w.ctx, alice.id)
    w.secrets.append(started.secret)
    again = totp.pending_enrolment(w.ctx, alice.id)
    assert (again.secret, again.uri, again.method.id) == (started.secret, started.uri,
                                                          started.method.id)
    assert not totp.confirm_enrol(w.ctx, alice.id, w.wrong_code(started.secret)).ok
    assert totp.pending_enrolment(w.ctx, alice.id).secret == started.secret  # the same one
    svg = totp.qr_svg(again.uri)
    assert svg.startswith('<svg role="img" ') and "<title>QR code" in svg
    assert "style=" not in svg and "<script" not in svg
    assert totp.confirm_enrol(w.ctx, alice.id, w.code(started.secret)).ok
    assert totp.pending_enrolment(w.ctx, alice.id) is None  # a confirmed secret is not shown
    assert totp.pending_enrolment(w.ctx, w.add_user("bob").id) is None


def test_app_passwords_are_unavailable_unless_the_policy_allows_legacy_access():
    from token_agent.factors import apppasswords

    assert apppasswords.unavailable(True) is None
    assert "does not allow app passwords" in apppasswords.unavailable(False)


# --------------------------------------------------------------------------- unusual logins


def test_the_unusual_login_notice_says_where_when_and_what_to_do(world):
    from token_agent.ceremonies import unusual

    w = world()
    alice = w.add_user("alice")
    browser = Device("unmanaged", device_id="cookie-value-123", network="192.0.2.10")
    alert = unusual.Alert(alice, "password", browser, "192.0.2.0/24", w.clock())
    stopped = unusual.notice(w.agent, alert, signed_in=False)
    assert stopped.startswith("Your password was used to start a sign-in to your token-agent "
                              "account (alice) on 14 November 2023 at 22:13 UTC, from a web "
                              "browser or personal device on network 192.0.2.0/24 that you "
                              "have not signed in from before. The sign-in did not finish. ")
    signed = unusual.notice(w.agent, alert, signed_in=True)
    assert signed.startswith("Your token-agent account (alice) was signed in to on 14 November "
                             "2023 at 22:13 UTC, from a web browser")
    for text in (stopped, signed):
        assert "If not, change your password now" in text and "\n" not in text
        assert "cookie-value-123" not in text
    joined = Device("managed", device_id="ws-1", network="10.1.2.3", joined=True)
    assert unusual.where(joined, "10.1.2.0/24") == \
        "a joined workstation of the organisation on network 10.1.2.0/24"
    assert unusual.where_of(w.agent, Device("unmanaged", network="not an address")) == \
        {"device": "unmanaged", "joined": False, "device_ref": None, "network": None}
    assert unusual.device_ref("cookie-value-123") == unusual.device_ref("cookie-value-123")
    assert unusual.device_ref("cookie-value-123") != unusual.device_ref("cookie-value-124")


def test_the_user_is_told_when_a_method_is_removed_but_not_on_the_removed_contact(world,
                                                                                  tmp_path):
    w = world()
    box = Outbox(w, tmp_path)
    alice = w.add_user("alice")
    mobile = add_phone(w, box, alice, MOBILE, "mobile")
    alternate = add_phone(w, box, alice, ALTERNATE, "alternate phone")
    w.enrol_totp(alice)
    admin_ops.remove_method(w.agent, alice, w.store.find_method(alice.id, "totp"), "root")
    notices = [m for m in box.messages() if m["purpose"] == "notice"]
    assert sorted(m["to"] for m in notices) == ["+447700900123", "+447700900456"]
    assert 'The authenticator app "authenticator app" was removed from your token-agent ' \
           "account (alice)" in notices[0]["text"]
    admin_ops.remove_method(w.agent, alice, mobile, None)
    notices = [m for m in box.messages() if m["purpose"] == "notice"][2:]
    assert [m["to"] for m in notices] == ["+447700900456"]  # not the number just removed
    assert w.store.get_method(alternate.id).confirmed


def test_an_unusual_login_stopped_at_the_second_factor_is_told_too(world, tmp_path):
    w = world()
    box = Outbox(w, tmp_path)
    alice = w.add_user("alice")
    add_phone(w, box, alice, MOBILE, "mobile")
    secret = w.enrol_totp(alice)
    w.clock.advance(30)  # the enrolment's code is used
    assert w.login("alice", PASSWORD, w.code(secret), choices=["totp"],
                   device=Device("unmanaged", device_id="pc-1", network="192.0.2.1"))[0].ok
    assert [m for m in box.messages() if m["purpose"] == "notice"] == []  # first: no history
    stranger = Device("unmanaged", device_id="pc-9", network="203.0.113.9")
    out, _ = w.login("alice", PASSWORD, w.wrong_code(secret), choices=["totp"], device=stranger)
    assert not out.ok
    notice, = [m for m in box.messages() if m["purpose"] == "notice"]
    assert notice["to"] == "+447700900123"
    assert "Your password was used to start a sign-in" in notice["text"]
    assert "network 203.0.113.0/24" in notice["text"] and "did not finish" in notice["text"]
    assert signins.recent(w.store, alice.id)[0].unusual


def test_a_sign_in_with_a_temporary_access_pass_is_listed_with_where(world):
    from token_agent.ceremonies.passlogin import ACCESS_PASS
    from token_agent.factors import accesspass

    w = world()
    alice = w.add_user("alice")
    _, issued = accesspass.issue(w.ctx, alice.id, actor="root")
    w.secrets.append(issued)
    ward = Device("unmanaged", device_id="pc-1", network="192.0.2.10")
    assert w.login("alice", issued, device=ward, primary=ACCESS_PASS)[0].ok
    signed, = signins.recent(w.store, alice.id)
    assert signed.how == "temporary access pass" and signed.ok
    assert signed.result == "signed in"
    assert signed.where == "a web browser or personal device, network 192.0.2.0/24"


def test_a_step_up_sign_in_is_listed_as_confirming_it_was_you(world):
    w = world()
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    w.clock.advance(30)
    assert w.login("alice", PASSWORD, w.code(secret), step_up=True)[0].ok
    assert signins.recent(w.store, alice.id)[0].result == "confirmed it was you"
