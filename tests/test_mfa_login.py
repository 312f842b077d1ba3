"""The policy login flow (token_agent/ceremonies/login.py) at library level: password and
second factors, "use a different method", enforcement and enrolment at first login, optional
classes, re-verification, unusual logins, a key as the primary factor, lockouts, app
passwords, the administrator's reset, and no secret in any log record or audit event.

Fast: a fake clock, an in-memory scripted :class:`Interaction`, a store in tmp_path. Every
test's log records (DEBUG and up) and audit events are checked for the secrets it used
(the autouse fixture ``no_secret_leaks``)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import store_contents
from token_agent import exitcodes
from token_agent.agent import Agent
from token_agent.ceremonies.login import (NOT_AUTHENTICATED, Device, explain_for, facts_for,
                                          login)
from token_agent.factors import apppasswords, backup, lockout, password, totp
from token_agent.outcome import Factor, LoginOutcome, Reason
from token_agent.policy import decide, parse_policy
from token_agent.store import Store

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC, 20 s into a TOTP step
HOUR = 3600.0
PASSWORD = "correct horse battery"
WRONG_PASSWORD = "incorrect pony staple"
TRUSTED = '[reverification]\ntrusted_networks = ["10.0.0.0/8"]\n'
#: no device id, no network: nothing is remembered, so every login is re-verified
ANYWHERE = Device("unmanaged")

TOTP_PROMPT = "Code from your authenticator app"


class Clock:
    """A clock the test moves."""

    def __init__(self, t: float = T0) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Script:
    """A scripted :class:`~token_agent.ceremonies.login.Interaction`: ``answers`` are given,
    in order, to ``secret()`` and ``text()`` (a callable answer is called with the script, so
    it can read a QR code shown before); ``choices`` to ``choose()`` (``None``: the default).
    No answer left: ``None`` (the login ends as cancelled). Everything asked is recorded."""

    def __init__(self, *answers, choices=()) -> None:
        self.answers = list(answers)
        self.choices = list(choices)
        self.infos: list[str] = []
        self.prompts: list[str] = []
        self.chose: list[tuple[str, list[str], str]] = []
        self.qrs: list[str] = []

    def _answer(self, prompt: str):
        self.prompts.append(prompt)
        if not self.answers:
            return None
        answer = self.answers.pop(0)
        return answer(self) if callable(answer) else answer

    def info(self, message: str) -> None:
        self.infos.append(message)

    def secret(self, prompt: str):
        return self._answer(prompt)

    def text(self, prompt: str):
        return self._answer(prompt)

    def choose(self, prompt: str, options: list[tuple[str, str]], default: str):
        self.chose.append((prompt, [k for k, _ in options], default))
        choice = self.choices.pop(0) if self.choices else None
        return default if choice is None else choice

    def show_qr(self, uri: str) -> None:
        self.qrs.append(uri)

    @property
    def asked_anything(self) -> bool:
        return bool(self.prompts or self.chose or self.qrs)


@dataclass
class World:
    """One agent (store, keys, policy, fake clock) and the secrets a test used with it."""

    agent: Agent
    clock: Clock
    secrets: list[str]
    outcomes: list[LoginOutcome] = field(default_factory=list)

    @property
    def store(self) -> Store:
        return self.agent.store

    @property
    def ctx(self):
        return self.agent.factors()

    def with_policy(self, text: str) -> Agent:
        """Another agent on the same store and keys, under another policy."""
        return Agent(store=self.store, keys=self.agent.keys, policy=parse_policy(text),
                     data_dir=self.agent.data_dir, clock=self.clock)

    def add_user(self, name: str, *, user_class: str = "internal", pw: str | None = PASSWORD):
        user = self.store.add_user(name, user_class=user_class)
        if pw is not None:
            self.secrets.append(pw)
            password.set_password(self.ctx, user.id, pw)
        return user

    def enrol_totp(self, user) -> str:
        """An authenticator app, enrolled and confirmed now; returns its secret."""
        pending = totp.begin_enrol(self.ctx, user.id)
        self.secrets.append(pending.secret)
        result = totp.confirm_enrol(self.ctx, user.id, self.code(pending.secret))
        assert result.ok, result
        return pending.secret

    def backup_codes(self, user) -> list[str]:
        _, codes = backup.generate(self.ctx, user.id)
        self.secrets.extend(codes)
        self.secrets.extend(c.replace("-", "") for c in codes)
        return codes

    def code(self, secret: str, at: float | None = None) -> str:
        code = totp.code_at(secret, self.clock() if at is None else at)
        self.secrets.append(code)
        return code

    def wrong_code(self, secret: str) -> str:
        """A well-formed code valid at no step of the window around now."""
        near = {totp.code_at(secret, self.clock() + k * 30) for k in range(-2, 3)}
        code = next(f"{n:06d}" for n in range(0, 10 ** 6, 7919) if f"{n:06d}" not in near)
        self.secrets.append(code)
        return code

    def login(self, username: str, *answers, device: Device = ANYWHERE, choices=(),
              agent: Agent | None = None, **kw) -> tuple[LoginOutcome, Script]:
        script = Script(*answers, choices=choices)
        outcome = login(agent or self.agent, username, interaction=script, device=device, **kw)
        self.outcomes.append(outcome)
        return outcome, script

    def events(self, kind: str | None = None, user=None):
        return self.store.list_events(kind=kind, user_id=None if user is None else user.id,
                                      limit=10 ** 6)


@pytest.fixture
def world(tmp_path):
    """``world(policy_text="")``: a new agent with its own store (several per test allowed)."""
    made: list[World] = []

    def make(policy_text: str = "") -> World:
        clock = Clock()
        directory = tmp_path / f"agent{len(made)}"
        directory.mkdir()
        store = Store.open(directory / "token-agent.db", clock=clock)
        agent = Agent.open(store=store, policy=parse_policy(policy_text), clock=clock,
                           environ={})
        w = World(agent, clock, [])
        made.append(w)
        return w

    make.made = made
    yield make
    for w in made:
        w.store.close()


def _leaks(secret: str, text: str) -> bool:
    if secret.isdigit():  # a short code: not as part of a longer number or id
        return re.search(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", text) is not None
    return secret in text


@pytest.fixture(autouse=True)
def no_secret_leaks(caplog, world):
    """After each test: none of the secrets it used (passwords, TOTP secrets, codes, backup
    codes, app passwords) is in a log record (DEBUG and up, message and arguments), in an
    audit event (as JSON) or in a login outcome (as JSON)."""
    caplog.set_level(logging.DEBUG)
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in records)
    for w in world.made:
        audit = "\n".join(json.dumps(e.to_dict(), sort_keys=True) for e in w.events())
        outcomes = "\n".join(json.dumps(o.to_json(), default=str) for o in w.outcomes)
        for secret in set(w.secrets):
            assert not _leaks(secret, logged), f"a secret was logged: {secret!r}"
            assert not _leaks(secret, audit), f"a secret is in the audit log: {secret!r}"
            assert not _leaks(secret, outcomes), f"a secret is in a login outcome: {secret!r}"


def _secret_of(uri: str) -> str:
    return parse_qs(urlsplit(uri).query)["secret"][0]


# --------------------------------------------------------------------------- password + TOTP


def test_password_and_totp_login(world):
    w = world()
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    w.clock.advance(60)

    out, script = w.login("alice", PASSWORD, w.code(secret))
    assert out.ok, out
    assert out.method == "password+totp" and out.user == "alice" and out.user_id == alice.id
    assert out.factors == (Factor.KNOWLEDGE, Factor.POSSESSION) and out.multi_factor
    assert out.detail["primary"] == "password" and out.detail["second"] == "totp"
    assert out.detail["decision"]["mfa_required"] and out.detail["decision"]["enforced"]
    assert script.prompts == ["Password", TOTP_PROMPT]
    assert script.chose == []  # one second factor: nothing to choose
    event = w.events("login", alice)[0]
    assert event.outcome == "success"
    assert event.detail["primary"] == "password" and event.detail["second"] == "totp"
    assert event.detail["mfa_required"] is True


def test_wrong_password_wrong_code_unknown_and_disabled_users(world):
    w = world()
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    w.clock.advance(60)

    out, script = w.login("alice", WRONG_PASSWORD, w.code(secret))
    assert not out.ok and out.reason is Reason.WRONG_PASSWORD
    # no factor succeeded yet: the generic words, no tries left (issue 11, item 10)...
    assert out.message == NOT_AUTHENTICATED and "tries_left" not in out.detail
    assert script.prompts == ["Password"]  # no second factor after a wrong password
    event = w.events("login", alice)[0]  # ...the audit log has them
    assert event.outcome == "failure" and event.detail["reason"] == "wrong-password"
    assert event.detail["tries_left"] == 9

    out, script = w.login("alice", PASSWORD, w.wrong_code(secret))
    assert not out.ok and out.reason is Reason.WRONG_CODE
    assert out.detail["second"] == "totp" and out.detail["tries_left"] == 9
    assert "9 tries left" in out.message
    assert exitcodes.REASON_CODES[out.reason] == exitcodes.AUTH_FAILED

    # an unknown or disabled user is asked for the password like anyone (issue 11, item 10)
    out, script = w.login("mallory", PASSWORD)
    assert not out.ok and out.reason is Reason.UNKNOWN_USER and script.prompts == ["Password"]
    assert out.message == NOT_AUTHENTICATED
    unknown = w.events("login")[0]
    assert unknown.username == "mallory" and unknown.detail["reason"] == "unknown-user"

    w.store.update_user("alice", disabled=True)
    out, script = w.login("alice", PASSWORD, w.code(secret))
    assert not out.ok and out.reason is Reason.USER_DISABLED and script.prompts == ["Password"]
    assert out.message == NOT_AUTHENTICATED
    assert w.events("login", alice)[0].detail["reason"] == "user-disabled"
    assert exitcodes.REASON_CODES[out.reason] == exitcodes.AUTH_FAILED


def test_no_answer_is_cancelled(world):
    w = world()
    alice = w.add_user("alice")
    w.enrol_totp(alice)
    out, script = w.login("alice", PASSWORD)  # the code is never typed
    assert not out.ok and out.reason is Reason.CANCELLED
    assert script.prompts == ["Password", TOTP_PROMPT]
    assert w.events("login", alice)[0].detail["reason"] == "cancelled"


# --------------------------------------------------------------------------- another method


def test_use_a_different_method(world):
    w = world()
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    codes = w.backup_codes(alice)
    assert w.store.preferred_method(alice.id).kind == "totp"
    w.clock.advance(60)

    out, script = w.login("alice", PASSWORD, codes[0], second="backup")
    assert out.ok, out
    assert out.method == "password+backup" and out.detail["second"] == "backup"
    assert script.prompts == ["Password", "Backup code"] and script.chose == []
    assert backup.remaining(w.ctx, alice.id) == 9

    out, script = w.login("alice", PASSWORD, w.code(secret))
    assert out.ok and out.method == "password+totp"
    (prompt, options, default), = script.chose
    assert default == "totp"  # the preferred one
    assert options == ["totp", "backup"]

    w.clock.advance(60)
    out, script = w.login("alice", PASSWORD, codes[1], choices=["backup"])
    assert out.ok and out.method == "password+backup"

    w.clock.advance(60)
    out, _ = w.login("alice", PASSWORD, codes[0], second="backup")  # used already
    assert not out.ok and out.reason is Reason.CODE_REPLAYED


def test_a_second_factor_the_user_does_not_hold_or_the_policy_refuses(world):
    w = world('[methods]\nallowed = ["totp", "key"]\n')
    alice = w.add_user("alice")
    w.enrol_totp(alice)
    out, _ = w.login("alice", PASSWORD, "123456", second="sms")
    assert not out.ok and out.reason is Reason.METHOD_NOT_ALLOWED
    out, _ = w.login("alice", PASSWORD, "123456", second="key")
    assert not out.ok and out.reason is Reason.NO_CREDENTIAL


# --------------------------------------------------------------------------- enforcement


def test_enforced_user_without_a_second_factor_sets_one_up_at_first_login(world):
    w = world()
    bob = w.add_user("bob")  # a password only

    def code_from_qr(script: Script) -> str:
        secret = _secret_of(script.qrs[-1])
        w.secrets.append(secret)
        return w.code(secret)

    out, script = w.login("bob", PASSWORD, code_from_qr, choices=["totp"])
    assert out.ok, out
    assert out.method == "password+totp" and out.multi_factor
    assert out.detail["decision"]["must_enrol"] is True
    (prompt, options, default), = script.chose
    assert prompt == "Second factor to set up" and options == ["totp"] and default == "totp"
    uri, = script.qrs
    assert uri.startswith("otpauth://totp/") and "secret=" in uri
    assert any("requires a second factor" in m for m in script.infos)
    assert script.prompts == ["Password", "Code shown by your authenticator app"]
    app, = w.store.list_methods(bob.id, "totp")
    assert app.confirmed and app.preferred
    assert w.events("enrol.totp", bob)[0].outcome == "success"

    # the next login uses it
    w.clock.advance(60)
    out, script = w.login("bob", PASSWORD, w.code(_secret_of(uri)))
    assert out.ok and out.method == "password+totp" and not script.qrs


def test_enrolment_at_login_with_a_wrong_code_fails_and_stays_pending(world):
    w = world()
    bob = w.add_user("bob")
    out, script = w.login("bob", PASSWORD, "000000")
    assert not out.ok and out.reason in (Reason.WRONG_CODE, Reason.CODE_REPLAYED)
    assert out.detail["second"] == "totp"
    app, = w.store.list_methods(bob.id, "totp")
    assert not app.confirmed


def test_backup_codes_only_user_proves_a_backup_code_before_enrolling(world):
    w = world()
    alice = w.add_user("alice")
    codes = w.backup_codes(alice)
    decision = explain_for(w.agent, "alice", device=ANYWHERE, primary="password")
    assert decision.must_enrol and any("only backup codes" in r for r in decision.rules)

    def code_from_qr(script: Script) -> str:
        secret = _secret_of(script.qrs[-1])
        w.secrets.append(secret)
        return w.code(secret)

    out, script = w.login("alice", PASSWORD, codes[0], code_from_qr, second="backup")
    assert "Backup code" in script.prompts  # else the password alone binds a new app


def test_enforcement_date_in_the_future_invites_instead(world):
    w = world("[enforcement]\nfrom = 2099-01-01\n")
    carol = w.add_user("carol")
    w.store.update_user("carol", mfa_enabled=False)

    out, script = w.login("carol", PASSWORD)
    assert out.ok, out
    assert out.method == "password" and out.detail["second"] is None
    assert out.factors == (Factor.KNOWLEDGE,) and not out.multi_factor
    assert script.prompts == ["Password"] and not script.qrs and not script.chose
    assert any("set up a second factor" in m for m in script.infos)
    decision = out.detail["decision"]
    assert decision["enforced"] is False and decision["invite_enrol"] is True
    assert any("2099-01-01" in rule for rule in decision["rules"])
    assert w.store.list_methods(carol.id, "totp") == []

    # an account whose own MFA is on (new accounts) has it before the date
    w.add_user("dave")
    early = explain_for(w.agent, "dave", device=ANYWHERE, primary="password")
    assert early.enforced and early.must_enrol


def test_optional_class(world):
    w = world()
    erin = w.add_user("erin", user_class="external")
    secret = w.enrol_totp(erin)
    w.store.update_user("erin", mfa_enabled=False)
    w.clock.advance(60)

    out, script = w.login("erin", PASSWORD)
    assert out.ok and out.method == "password" and script.prompts == ["Password"]
    assert out.detail["decision"]["enforced"] is False

    w.store.update_user("erin", mfa_enabled=True)
    out, script = w.login("erin", PASSWORD, w.code(secret))
    assert out.ok and out.method == "password+totp"
    assert script.prompts == ["Password", TOTP_PROMPT]

    # optional and off, with nothing set up: invited, never forced
    w.add_user("frank", user_class="external")
    w.store.update_user("frank", mfa_enabled=False)
    out, script = w.login("frank", PASSWORD)
    assert out.ok and out.method == "password" and not script.qrs
    assert any("set up a second factor" in m for m in script.infos)


# --------------------------------------------------------------------------- re-verification


def test_reverification_on_an_unmanaged_device(world):
    w = world()
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    laptop = Device("unmanaged", "laptop-1", "192.0.2.7")
    w.clock.advance(60)

    out, script = w.login("alice", PASSWORD, w.code(secret), device=laptop)
    assert out.ok and out.method == "password+totp"

    w.clock.advance(7 * HOUR)
    out, script = w.login("alice", PASSWORD, device=laptop)
    assert out.ok, out
    assert out.method == "password" and script.prompts == ["Password"]
    assert any("within 8 h" in r for r in out.detail["decision"]["rules"])

    w.clock.advance(2 * HOUR)  # 9 h after the last second factor
    out, script = w.login("alice", PASSWORD, w.code(secret), device=laptop)
    assert out.ok and out.method == "password+totp"
    assert script.prompts == ["Password", TOTP_PROMPT]
    assert any("more than 8 h" in r for r in out.detail["decision"]["rules"])

    # and the count starts again from that second factor
    w.clock.advance(7 * HOUR)
    out, script = w.login("alice", PASSWORD, device=laptop)
    assert out.ok and out.method == "password"


def test_managed_device_in_a_trusted_network(world):
    w = world(TRUSTED)
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    ws1 = Device("managed", "ws-1", "10.1.2.3")
    w.clock.advance(60)

    out, script = w.login("alice", PASSWORD, w.code(secret), device=ws1)
    assert out.ok and out.method == "password+totp"  # the device is new: a second factor

    w.clock.advance(10 * HOUR)  # beyond re-verification: the trusted network decides
    out, script = w.login("alice", PASSWORD, device=ws1)
    assert out.ok, out
    assert out.method == "password" and script.prompts == ["Password"]
    assert any("trusted network 10.0.0.0/8" in r for r in out.detail["decision"]["rules"])

    # the same device outside the trusted networks is re-verified
    out, script = w.login("alice", PASSWORD, w.code(secret),
                          device=Device("managed", "ws-1", "198.51.100.4"))
    assert out.ok and out.method == "password+totp"


def test_unusual_login_asks_a_second_factor_and_records_an_alert(world):
    w = world(TRUSTED)
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    w.clock.advance(60)

    out, _ = w.login("alice", PASSWORD, w.code(secret), device=Device("managed", "ws-1", "10.1.2.3"))
    assert out.ok and out.method == "password+totp"
    assert w.events("login.unusual") == []  # first login ever: nothing to compare with
    assert out.detail["decision"]["alert"] is False

    w.clock.advance(60)
    out, script = w.login("alice", PASSWORD, w.code(secret),
                          device=Device("managed", "ws-2", "10.1.2.3"))
    assert out.ok, out
    assert out.method == "password+totp" and script.prompts == ["Password", TOTP_PROMPT]
    alert, = w.events("login.unusual", alice)
    assert alert.outcome == "alert"
    assert alert.detail["device"] == "ws-2" and alert.detail["device_seen"] is False
    assert alert.detail["network_seen"] is True
    assert w.events("login", alice)[0].detail["alert"] is True

    # a new network for a known device is unusual too
    w.clock.advance(60)
    out, _ = w.login("alice", PASSWORD, w.code(secret), device=Device("managed", "ws-1", "10.9.9.9"))
    assert out.ok and out.method == "password+totp"
    assert len(w.events("login.unusual", alice)) == 2


def test_roaming_between_joined_workstations_is_not_unusual(world):
    """A clinician's first login at another ward PC (joined to the organisation, inside the
    trusted network) asks no second factor and records no alert; the same new PC not joined,
    or joined but outside the trusted networks, still does both."""
    w = world(TRUSTED)
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    w.clock.advance(60)
    out, script = w.login("alice", PASSWORD,
                          device=Device("managed", "ward-pc-1", "10.1.2.3", joined=True))
    assert out.ok and out.method == "password" and script.prompts == ["Password"]

    w.clock.advance(60)
    out, script = w.login("alice", PASSWORD,
                          device=Device("managed", "ward-pc-2", "10.4.2.9", joined=True))
    assert out.ok, out
    assert out.method == "password" and script.prompts == ["Password"]
    assert w.events("login.unusual", alice) == []
    rules = out.detail["decision"]["rules"]
    assert ("new device ward-pc-2 and new network 10.4.2.0/24 for this user: a joined "
            "workstation of the organisation in trusted network 10.0.0.0/8: roaming, not "
            "unusual (no alert)") in rules
    assert out.detail["decision"]["alert"] is False

    w.clock.advance(60)
    out, script = w.login("alice", PASSWORD, w.code(secret),
                          device=Device("managed", "ward-pc-3", "10.4.2.10"))  # not joined
    assert out.ok and out.method == "password+totp"
    assert script.prompts == ["Password", TOTP_PROMPT]
    assert [e.detail["device"] for e in w.events("login.unusual", alice)] == ["ward-pc-3"]

    w.clock.advance(60)
    out, _ = w.login("alice", PASSWORD, w.code(secret),
                     device=Device("managed", "ward-pc-4", "198.51.100.4", joined=True))
    assert out.ok and out.method == "password+totp"  # joined, outside the trusted networks
    assert sorted(e.detail["device"] for e in w.events("login.unusual", alice)) == \
        ["ward-pc-3", "ward-pc-4"]


# --------------------------------------------------------------------------- a key as primary


def _fake_key(store, user, name="k"):
    return store.add_fido_credential(
        user.id, name=name, credential_id=bytes(range(1, 33)), public_key=b"\xa1\x01\x02",
        aaguid=bytes(16), rp_id="token-agent.local", discoverable=True, uv_enrolled=True,
        attestation_format="none", attestation_trusted=False)


def _key_login(user, factors, calls: list | None = None):
    def run(name: str) -> LoginOutcome:
        if calls is not None:
            calls.append(name)
        return LoginOutcome(ok=True, method="key", user=name, user_id=user.id, factors=factors,
                            user_verified=Factor.KNOWLEDGE in factors, credential="k")
    return run


def test_key_with_user_verification_satisfies_mfa(world):
    w = world()
    alice = w.add_user("alice")
    _fake_key(w.store, alice)
    calls: list[str] = []
    out, script = w.login("alice", primary="key", device=Device("unmanaged", "ws-9", "192.0.2.9"),
                          key_login=_key_login(alice, (Factor.POSSESSION, Factor.KNOWLEDGE), calls))
    assert out.ok, out
    assert not script.asked_anything and script.infos == []
    assert calls == ["alice"]
    assert out.method == "key" and out.detail["second"] is None
    assert out.user_verified and out.credential == "k" and out.multi_factor
    assert any("satisfies MFA" in r for r in out.detail["decision"]["rules"])
    assert w.events("login", alice)[0].detail["primary"] == "key"


def test_key_without_user_verification_needs_a_second_factor(world):
    w = world()
    alice = w.add_user("alice")
    _fake_key(w.store, alice)
    secret = w.enrol_totp(alice)
    w.clock.advance(60)
    # the key alone is one factor (something you have); a TOTP code would be a second
    # possession factor (not multi-factor, NIST SP 800-63B), so the password is asked
    out, script = w.login("alice", PASSWORD, primary="key",
                          key_login=_key_login(alice, (Factor.POSSESSION,)))
    assert out.ok, out
    assert out.method == "key+password" and script.prompts == ["Password"]
    assert set(out.factors) == {Factor.POSSESSION, Factor.KNOWLEDGE} and out.multi_factor
    # without a password to go with it, the key is refused
    bob = w.add_user("bob", pw=None)
    w.store.add_fido_credential(
        bob.id, name="k", credential_id=bytes(range(2, 34)), public_key=b"\xa1\x01\x02",
        aaguid=bytes(16), rp_id="token-agent.local", discoverable=True, uv_enrolled=True,
        attestation_format="none", attestation_trusted=False)
    out, script = w.login("bob", primary="key", key_login=_key_login(bob, (Factor.POSSESSION,)))
    assert not out.ok and out.reason is Reason.UV_REQUIRED and not script.asked_anything


def test_the_primary_key_is_not_also_the_second_factor(world):
    w = world()
    alice = w.add_user("alice")
    _fake_key(w.store, alice)  # the user's only method besides the password
    calls: list[str] = []
    out, script = w.login("alice", primary="key",
                          key_login=_key_login(alice, (Factor.POSSESSION,), calls))
    # a touch of the same key twice is not two factors: without an answer to the password
    # prompt (the knowledge factor the key did not give) the login fails
    assert not (out.ok and out.method == "key+key"), (out.method, calls)
    assert not out.ok and calls == ["alice"]
    assert script.prompts == ["Password"]
    # with the password, the key (possession) and the password (knowledge) are two factors
    out, script = w.login("alice", PASSWORD, primary="key",
                          key_login=_key_login(alice, (Factor.POSSESSION,), calls))
    assert out.ok and out.multi_factor and out.method == "key+password", out
    assert calls == ["alice", "alice"]  # the key was asked once per login, never twice


def test_key_primary_without_a_key_reader(world):
    w = world()
    w.add_user("alice")
    out, script = w.login("alice", primary="key")
    assert not out.ok and out.reason is Reason.NO_DEVICE and not script.asked_anything


# --------------------------------------------------------------------------- lockout


def test_ten_wrong_codes_lock_the_method_until_unlocked(world):
    w = world()
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    app, = w.store.list_methods(alice.id, "totp")
    w.clock.advance(60)

    lefts = []
    for _ in range(10):
        out, _ = w.login("alice", PASSWORD, w.wrong_code(secret))
        assert not out.ok and out.reason is Reason.WRONG_CODE
        lefts.append(out.detail["tries_left"])
    assert lefts == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert "locked" in out.message
    # alice never logged in from this device: her failures count in the unfamiliar scope
    scope = lockout.unfamiliar(lockout.method_scope(app.id))
    assert lockout.state(w.store, scope).locked(w.clock())
    assert w.events("lockout.totp", alice)[0].outcome == "locked"

    out, _ = w.login("alice", PASSWORD, w.code(secret))  # even the right code
    assert not out.ok and out.reason is Reason.METHOD_LOCKED
    assert exitcodes.REASON_CODES[out.reason] == exitcodes.LOCKED == 6

    cleared = lockout.unlock(w.store, alice.id)
    assert scope in [c.scope for c in cleared]
    out, _ = w.login("alice", PASSWORD, w.code(secret))
    assert out.ok and out.method == "password+totp"


def test_wrong_passwords_lock_the_password(world):
    w = world('[lockout]\npassword_max_failures = 3\n')
    w.add_user("alice")
    alice = w.store.get_user("alice")
    for left in (2, 1, 0):
        out, _ = w.login("alice", WRONG_PASSWORD)
        assert out.reason is Reason.WRONG_PASSWORD and out.message == NOT_AUTHENTICATED
        assert w.events("login", alice)[0].detail["tries_left"] == left
    out, script = w.login("alice", PASSWORD)
    assert out.reason is Reason.METHOD_LOCKED and script.prompts == ["Password"]
    assert out.message == NOT_AUTHENTICATED  # not the lock or its end, before a factor


def test_a_stranger_learns_nothing_before_the_first_factor(world):
    """Issue 11, item 10: an unknown user, a known user with a wrong password, a user with
    no method, a disabled user and a locked password: the same prompts and the same words,
    in about the same time (the password checked against a decoy scrypt hash). The details
    come after a first factor, and stay in the audit log."""
    import time

    w = world("[lockout]\npassword_max_failures = 2\n")
    w.add_user("alice")
    w.add_user("bob", pw=None)  # no method at all
    w.add_user("carol")
    w.store.update_user("carol", disabled=True)
    w.add_user("dave")
    for _ in range(2):
        w.login("dave", WRONG_PASSWORD)  # dave's password is locked now

    def attempt(name):
        began = time.perf_counter()
        out, script = w.login(name, WRONG_PASSWORD)
        return out, script, time.perf_counter() - began

    seen, times = {}, {}
    for name in ("alice", "mallory", "bob", "carol", "dave"):
        runs = [attempt(name) for _ in range(3)]
        out, script, _ = runs[-1]
        assert not out.ok
        seen[name] = (script.prompts, script.infos, out.message, out.user, out.user_id,
                      out.detail)
        times[name] = sorted(t for _, _, t in runs)[1]
    assert seen["mallory"] == (["Password"], [], NOT_AUTHENTICATED, "mallory", None, {})
    for name in ("alice", "bob", "carol", "dave"):
        assert seen[name] == (["Password"], [], NOT_AUTHENTICATED, name, None,
                              {"primary": "password"} if name in ("alice", "dave") else {})
    slowest, fastest = max(times.values()), min(times.values())
    assert slowest / fastest < 3, times  # each did one scrypt
    reasons = [e.detail["reason"] for e in w.events("login")][:15]
    assert {"unknown-user", "no-credential-enrolled", "user-disabled", "method-locked",
            "wrong-password"} <= set(reasons)

    # after a first factor, the details: a wrong code says how many tries are left
    secret = w.enrol_totp(w.store.get_user("alice"))
    w.clock.advance(60)
    out, _ = w.login("alice", PASSWORD, w.wrong_code(secret))
    assert out.reason is Reason.WRONG_CODE and "tries left" in out.message


# --------------------------------------------------------------------------- app passwords


def test_app_passwords_only_where_the_policy_allows_legacy_access(world):
    w = world("[legacy]\napp_passwords = true\n")
    alice = w.add_user("alice")
    _, printer = apppasswords.create(w.ctx, alice.id, "printer")
    _, mail = apppasswords.create(w.ctx, alice.id, "mail")
    w.secrets += [printer, mail]
    strict = w.with_policy("")

    refused = apppasswords.verify(strict.factors(), alice.id, printer,
                                  legacy_allowed=strict.policy.legacy.app_passwords)
    assert not refused.ok and refused.reason is Reason.LEGACY_NOT_ALLOWED
    assert w.events("verify.app_password", alice)[0].outcome == "refused"
    user = w.store.get_user("alice")
    facts, _ = facts_for(strict, user, device=ANYWHERE, primary="password", legacy=True)
    decision = decide(strict.policy, facts)
    assert not decision.app_password_allowed

    accepted = apppasswords.verify(w.ctx, alice.id, printer,
                                   legacy_allowed=w.agent.policy.legacy.app_passwords)
    assert accepted.ok and accepted.method.name == "printer"
    facts, _ = facts_for(w.agent, user, device=ANYWHERE, primary="password", legacy=True)
    decision = decide(w.agent.policy, facts)
    assert decision.app_password_allowed and not decision.mfa_required

    apppasswords.revoke(w.ctx, alice.id, "printer")
    revoked = apppasswords.verify(w.ctx, alice.id, printer, legacy_allowed=True)
    assert not revoked.ok and revoked.reason is Reason.WRONG_PASSWORD
    assert apppasswords.verify(w.ctx, alice.id, mail, legacy_allowed=True).ok
    apppasswords.revoke(w.ctx, alice.id, "mail")
    assert not apppasswords.verify(w.ctx, alice.id, mail, legacy_allowed=True).ok

    # an app password is not the account password
    out, _ = w.login("alice", mail)
    assert not out.ok and out.reason is Reason.WRONG_PASSWORD


# --------------------------------------------------------------------------- admin reset


def test_after_an_admin_reset_the_next_login_must_enrol(world):
    w = world()
    alice = w.add_user("alice")
    old_secret = w.enrol_totp(alice)
    w.backup_codes(alice)
    ws = Device("unmanaged", "ws-1", "192.0.2.7")
    w.clock.advance(60)
    out, _ = w.login("alice", PASSWORD, w.code(old_secret), device=ws)
    assert out.ok and out.method == "password+totp"

    removed = w.store.remove_all_methods(alice.id)
    assert sorted(m.kind for m in removed) == ["backup_codes", "totp"]
    assert [m.kind for m in w.store.list_methods(alice.id)] == ["password"]

    w.clock.advance(HOUR)  # within re-verification, on the same device: still must enrol

    def code_from_qr(script: Script) -> str:
        secret = _secret_of(script.qrs[-1])
        w.secrets.append(secret)
        return w.code(secret)

    out, script = w.login("alice", PASSWORD, code_from_qr, device=ws)
    assert out.ok, out
    assert out.detail["decision"]["must_enrol"] and out.method == "password+totp"
    new_secret = _secret_of(script.qrs[0])
    assert new_secret != old_secret
    w.clock.advance(60)
    assert not totp.verify(w.ctx, alice.id, w.code(old_secret)).ok


# --------------------------------------------------------------------------- no secrets


def test_no_secret_in_logs_or_audit_over_a_whole_session(world, caplog):
    """Every flow at once, at DEBUG (the autouse fixture does the checking, for this and
    every other test of the file); here also that the check is not vacuous."""
    w = world(TRUSTED + "[legacy]\napp_passwords = true\n")
    alice = w.add_user("alice")
    secret = w.enrol_totp(alice)
    codes = w.backup_codes(alice)
    _, app_pw = apppasswords.create(w.ctx, alice.id, "printer")
    w.secrets.append(app_pw)
    w.clock.advance(60)
    w.login("alice", WRONG_PASSWORD)
    w.secrets.append(WRONG_PASSWORD)
    w.login("alice", PASSWORD, w.wrong_code(secret))
    w.login("alice", PASSWORD, w.code(secret), device=Device("managed", "ws-1", "10.1.2.3"))
    w.clock.advance(60)
    w.login("alice", PASSWORD, codes[0], second="backup", device=Device("managed", "ws-2", "10.1.2.3"))
    w.login("alice", PASSWORD, codes[0], second="backup")  # replayed
    apppasswords.verify(w.ctx, alice.id, app_pw, legacy_allowed=True)
    apppasswords.verify(w.ctx, alice.id, "Wr0ngAppPassw0rd", legacy_allowed=True)
    w.secrets.append("Wr0ngAppPassw0rd")
    bob = w.add_user("bob", pw="bob's own secret pass")

    def code_from_qr(script: Script) -> str:
        s = _secret_of(script.qrs[-1])
        w.secrets.append(s)
        return w.code(s)

    out, _ = w.login("bob", "bob's own secret pass", code_from_qr)
    assert out.ok

    assert any(r.name.startswith("token_agent") for r in caplog.records)
    kinds = {e.kind for e in w.events()}
    assert {"login", "verify.password", "verify.totp", "verify.backup_codes",
            "verify.app_password", "enrol.totp", "login.unusual"} <= kinds
    # and the store itself holds no secret in clear
    raw = store_contents(w.store)
    for s in (PASSWORD, secret, app_pw, codes[0], codes[0].replace("-", "")):
        assert s.encode() not in raw
