"""The browser's WebAuthn relying party (token_agent.browserkey), without a browser.

The "browser" here is python-fido2's own WebAuthn client (``Fido2Client``) talking to the
project's virtual key: it builds the client data for the site's origin exactly as a browser
does, and its JSON is what ``webauthn.js`` posts. py_webauthn (an independent relying party)
checks the same responses, so the two implementations are held against each other.
"""

from __future__ import annotations

import json
import os

import pytest
import webauthn as pywebauthn  # py_webauthn: an independent relying party
from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.webauthn import (
    PublicKeyCredentialCreationOptions,
    PublicKeyCredentialRequestOptions,
)

from simulators.key import create_virtual_key, open_in_process_device
from token_agent import browserkey, webauthn
from token_agent.agent import Agent
from token_agent.browserkey import Challenge
from token_agent.ceremonies.key import EnrolError
from token_agent.outcome import Factor, Reason
from token_agent.policy import parse_policy
from token_agent.store import Store

RP_ID = "localhost"
ORIGIN = "https://localhost:8443"


class NoPin(UserInteraction):
    def request_pin(self, permissions, rp_id):
        return None


class Clock:
    def __init__(self) -> None:
        self.t = 1_900_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def agent(tmp_path):
    clock = Clock()
    store = Store.open(tmp_path / "token-agent.db", clock=clock)
    a = Agent.open(store=store, policy=parse_policy(""), clock=clock, environ={})
    a.test_clock = clock
    # python-fido2's client refuses "preferred" on a key without a PIN (a browser goes on)
    store.set_setting("user_verification", "discouraged")
    store.add_user("alice")
    store.add_user("bob")
    yield a
    store.close()


def make_browser(origin: str = ORIGIN):
    device = open_in_process_device(create_virtual_key(presence="auto"))
    return Fido2Client(device, client_data_collector=DefaultClientDataCollector(origin),
                       user_interaction=NoPin()), device


@pytest.fixture
def browser():
    client, device = make_browser()
    yield client
    device.close()


def create(client, options: dict) -> dict:
    """What webauthn.js posts after navigator.credentials.create (RegistrationResponseJSON)."""
    response = client.make_credential(PublicKeyCredentialCreationOptions.from_dict(options))
    return json.loads(json.dumps(dict(response)))


def get(client, options: dict) -> dict:
    result = client.get_assertion(PublicKeyCredentialRequestOptions.from_dict(options))
    return json.loads(json.dumps(dict(result.get_response(0))))


def as_form(response: dict) -> dict:
    """The sign-in form's hidden fields, as webauthn.js fills them."""
    r = response["response"]
    return {"credential_id": response["rawId"], "client_data_json": r["clientDataJSON"],
            "authenticator_data": r["authenticatorData"], "signature": r["signature"],
            "user_handle": r.get("userHandle") or ""}


def enrol(agent, client, username="alice", name="blue key"):
    user = agent.store.get_user(username)
    options, state = browserkey.registration_options(agent, user, RP_ID)
    saved = state.to_json()  # kept in the web session as JSON
    response = create(client, options)
    result = browserkey.finish_registration(agent, user, Challenge.from_json(saved), response,
                                            ORIGIN, RP_ID, name=name)
    return result, options, response


def events(agent, kind):
    return agent.store.list_events(kind=kind, limit=1000)


def test_enrol_then_sign_in_and_py_webauthn_agrees(agent, browser):
    result, reg_options, reg_response = enrol(agent, browser)
    assert result.name == "blue key" and not result.user_verified
    cred = agent.store.get_fido_credential(result.credential_id)
    assert cred.rp_id == RP_ID and cred.user_id == agent.store.get_user("alice").id
    enrolled = [e for e in events(agent, "enrol.key") if e.outcome == "success"]
    assert enrolled and enrolled[-1].detail["via"] == "browser"
    # the independent relying party accepts the same registration
    checked = pywebauthn.verify_registration_response(
        credential=reg_response,
        expected_challenge=webauthn.websafe_decode(reg_options["challenge"]),
        expected_rp_id=RP_ID, expected_origin=ORIGIN)
    assert checked.credential_id == result.credential_id

    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    assert [d["id"] for d in options["allowCredentials"]] == \
        [browserkey.b64url(result.credential_id)]
    answer = get(browser, options)
    pychecked = pywebauthn.verify_authentication_response(
        credential=answer, expected_challenge=state.challenge, expected_rp_id=RP_ID,
        expected_origin=ORIGIN, credential_public_key=cred.public_key,
        credential_current_sign_count=cred.sign_count)
    outcome = browserkey.finish_assertion(agent, "alice", state, as_form(answer), ORIGIN, RP_ID)
    assert outcome.ok, outcome
    assert outcome.method == "key" and outcome.user == "alice"
    assert outcome.credential == "blue key" and outcome.factors == (Factor.POSSESSION,)
    assert outcome.detail["via"] == "browser"
    assert agent.store.get_fido_credential(result.credential_id).sign_count == \
        pychecked.new_sign_count
    last = events(agent, "login.key")[-1]
    assert last.outcome == "success" and last.detail["via"] == "browser"


def test_usernameless_sign_in_with_a_passkey(agent, browser):
    result, _, _ = enrol(agent, browser)
    options, state = browserkey.assertion_options(agent, None, RP_ID)
    assert options["allowCredentials"] == []
    answer = get(browser, options)
    assert answer["response"].get("userHandle")
    outcome = browserkey.finish_assertion(agent, None, state, answer, ORIGIN, RP_ID)
    assert outcome.ok and outcome.user == "alice"


def test_replayed_assertion_is_refused(agent, browser):
    enrol(agent, browser)
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    answer = as_form(get(browser, options))
    assert browserkey.finish_assertion(agent, "alice", state, answer, ORIGIN, RP_ID).ok
    again = browserkey.finish_assertion(agent, "alice", state, answer, ORIGIN, RP_ID)
    assert not again.ok and again.reason is Reason.VERIFICATION_FAILED
    assert "answered already" in again.message
    # and against a new challenge, the old answer is for another one
    _, fresh = browserkey.assertion_options(agent, "alice", RP_ID)
    third = browserkey.finish_assertion(agent, "alice", fresh, answer, ORIGIN, RP_ID)
    assert not third.ok and third.reason is Reason.VERIFICATION_FAILED
    assert "not for this challenge" in third.message


def test_a_failed_answer_spends_the_challenge(agent, browser):
    enrol(agent, browser)
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    answer = as_form(get(browser, options))
    bad = dict(answer, signature=browserkey.b64url(b"\x30\x06\x02\x01\x01\x02\x01\x01"))
    assert browserkey.finish_assertion(agent, "alice", state, bad, ORIGIN, RP_ID).reason is \
        Reason.VERIFICATION_FAILED
    late = browserkey.finish_assertion(agent, "alice", state, answer, ORIGIN, RP_ID)
    assert not late.ok and "answered already" in late.message


def test_expired_challenge_is_refused(agent, browser):
    enrol(agent, browser)
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    answer = as_form(get(browser, options))
    agent.test_clock.t += browserkey.CHALLENGE_SECONDS + 1
    outcome = browserkey.finish_assertion(agent, "alice", state, answer, ORIGIN, RP_ID)
    assert not outcome.ok and outcome.reason is Reason.TIMEOUT


def test_wrong_origin_is_refused():
    """A page on another origin (a phishing site relaying the challenge) signs client data
    naming its own origin: refused, even though the RP ID and signature are right."""
    client, device = make_browser("https://localhost:9999")
    try:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            clock = Clock()
            store = Store.open(Path(d) / "token-agent.db", clock=clock)
            agent = Agent.open(store=store, policy=parse_policy(""), clock=clock, environ={})
            store.set_setting("user_verification", "discouraged")
            store.add_user("alice")
            user = store.get_user("alice")
            options, state = browserkey.registration_options(agent, user, RP_ID)
            response = create(client, options)
            with pytest.raises(EnrolError) as e:
                browserkey.finish_registration(agent, user, state, response, ORIGIN, RP_ID,
                                               name="k")
            assert e.value.reason == "origin-mismatch"
            assert store.list_fido_credentials(user.id) == []
            # enrolled as that site (its origin accepted), then signing in at ours
            options, state = browserkey.registration_options(agent, user, RP_ID)
            response = create(client, options)
            browserkey.finish_registration(agent, user, state, response,
                                           "https://localhost:9999", RP_ID, name="k")
            options, state = browserkey.assertion_options(agent, "alice", RP_ID)
            outcome = browserkey.finish_assertion(agent, "alice", state, get(client, options),
                                                  ORIGIN, RP_ID)
            assert not outcome.ok and outcome.reason is Reason.VERIFICATION_FAILED
            assert "origin" in outcome.message
            store.close()
    finally:
        device.close()


def test_crafted_client_data_is_refused(agent, browser):
    """Client data a script wrote itself: the wrong type, another origin, another challenge.
    The signature covers the client data, so none of them can be fixed up afterwards."""
    enrol(agent, browser)
    for change in ({"type": "webauthn.create"}, {"origin": "https://evil.example"},
                   {"challenge": browserkey.b64url(os.urandom(32))}):
        options, state = browserkey.assertion_options(agent, "alice", RP_ID)
        answer = as_form(get(browser, options))
        data = json.loads(webauthn.websafe_decode(answer["client_data_json"]))
        data.update(change)
        answer["client_data_json"] = browserkey.b64url(json.dumps(data).encode())
        outcome = browserkey.finish_assertion(agent, "alice", state, answer, ORIGIN, RP_ID)
        assert not outcome.ok and outcome.reason is Reason.VERIFICATION_FAILED, change


def test_other_users_credential_is_refused(agent, browser):
    """Bob's own key, answering a sign-in for alice: refused as another user's credential."""
    enrol(agent, browser, "alice", "alice key")
    bob_browser, device = make_browser()
    try:
        bob, _, _ = enrol(agent, bob_browser, "bob", "bob key")
        count = agent.store.get_fido_credential(bob.credential_id).sign_count
        options, state = browserkey.assertion_options(agent, "bob", RP_ID)
        answer = get(bob_browser, options)  # a genuine assertion by bob's key
        _, alice_state = browserkey.assertion_options(agent, "alice", RP_ID)
        alice_state.challenge = state.challenge  # even for the very challenge it signed
        outcome = browserkey.finish_assertion(agent, "alice", alice_state, as_form(answer),
                                              ORIGIN, RP_ID)
        assert not outcome.ok and outcome.reason is Reason.WRONG_USER
        assert agent.store.get_fido_credential(bob.credential_id).sign_count == count
    finally:
        device.close()


def test_tampered_credential_id_and_user_handle_are_refused(agent, browser):
    result, _, _ = enrol(agent, browser)
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    answer = as_form(get(browser, options))
    forged = dict(answer, credential_id=browserkey.b64url(os.urandom(len(result.credential_id))))
    outcome = browserkey.finish_assertion(agent, "alice", state, forged, ORIGIN, RP_ID)
    assert not outcome.ok and outcome.reason is Reason.UNKNOWN_CREDENTIAL
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    answer = as_form(get(browser, options))
    bob = agent.store.get_user("bob")
    answer["user_handle"] = browserkey.b64url(bob.user_handle)
    outcome = browserkey.finish_assertion(agent, "alice", state, answer, ORIGIN, RP_ID)
    assert not outcome.ok and outcome.reason is Reason.VERIFICATION_FAILED
    assert "user handle" in outcome.message


def test_a_workstation_key_is_not_offered_or_accepted_in_the_browser(agent, browser):
    """A credential enrolled for the workstations' RP ID: not in the browser's options, and
    its assertion (necessarily for the other RP ID) is not accepted here."""
    result, _, _ = enrol(agent, browser)
    # move alice's credential to the workstations' RP ID, as if enrolled at a workstation
    with agent.store.transaction(), agent.store._using("test") as conn:
        conn.execute("UPDATE fido2_credentials SET rp_id = ? WHERE credential_id = ?",
                     ("token-agent.local", result.credential_id))
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    assert [d["id"] for d in options["allowCredentials"]] != \
        [browserkey.b64url(result.credential_id)]
    options["allowCredentials"] = [{"type": "public-key",
                                    "id": browserkey.b64url(result.credential_id)}]
    outcome = browserkey.finish_assertion(agent, "alice", state, as_form(get(browser, options)),
                                          ORIGIN, RP_ID)
    assert not outcome.ok and outcome.reason is Reason.NO_CREDENTIAL


def test_unknown_and_keyless_users_get_options_like_anyone(agent):
    """No enumeration: a user name that does not exist, or has no key, gets one credential
    ID like a user with one key, the same every time; an answer is refused."""
    unknown, _ = browserkey.assertion_options(agent, "nobody", RP_ID)
    again, state = browserkey.assertion_options(agent, "nobody", RP_ID)
    keyless, _ = browserkey.assertion_options(agent, "bob", RP_ID)
    for o in (unknown, keyless):
        assert len(o["allowCredentials"]) == 1 and set(o) == set(again)
    assert unknown["allowCredentials"] == again["allowCredentials"]
    assert unknown["allowCredentials"] != keyless["allowCredentials"]
    assert unknown["challenge"] != again["challenge"]
    fake = {"credential_id": again["allowCredentials"][0]["id"], "client_data_json": "e30",
            "authenticator_data": "AAAA", "signature": "AAAA"}
    outcome = browserkey.finish_assertion(agent, "nobody", state, fake, ORIGIN, RP_ID)
    assert not outcome.ok and outcome.reason is Reason.UNKNOWN_USER


def test_counter_going_back_suspends_the_key(agent, browser):
    result, _, _ = enrol(agent, browser)
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    assert browserkey.finish_assertion(agent, "alice", state, as_form(get(browser, options)),
                                       ORIGIN, RP_ID).ok
    # a copy of the key that lags behind: the stored counter is ahead of what it will sign
    with agent.store.transaction(), agent.store._using("test") as conn:
        conn.execute("UPDATE fido2_credentials SET sign_count = sign_count + 100 "
                     "WHERE credential_id = ?", (result.credential_id,))
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    outcome = browserkey.finish_assertion(agent, "alice", state, as_form(get(browser, options)),
                                          ORIGIN, RP_ID)
    assert not outcome.ok and outcome.reason is Reason.CLONE_SUSPECTED
    cred = agent.store.get_fido_credential(result.credential_id)
    assert cred.flagged
    clone = events(agent, "key.clone-suspected")[-1]
    assert clone.detail["via"] == "browser"
    # suspended: even a good answer is refused now
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    outcome = browserkey.finish_assertion(agent, "alice", state, as_form(get(browser, options)),
                                          ORIGIN, RP_ID)
    assert outcome.reason is Reason.CREDENTIAL_FLAGGED


def test_user_verification_required_by_the_organisation(agent, browser):
    enrol(agent, browser)
    agent.store.set_setting("user_verification", "required")
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    assert options["userVerification"] == "required"
    options["userVerification"] = "discouraged"  # a page that asks the key for no PIN
    outcome = browserkey.finish_assertion(agent, "alice", state, as_form(get(browser, options)),
                                          ORIGIN, RP_ID)
    assert not outcome.ok and outcome.reason is Reason.UV_REQUIRED


def test_browser_error_is_a_cancel_and_malformed_fields_are_refused(agent, browser):
    enrol(agent, browser)
    _, state = browserkey.assertion_options(agent, "alice", RP_ID)
    outcome = browserkey.finish_assertion(agent, "alice", state, {"error": "NotAllowedError"},
                                          ORIGIN, RP_ID)
    assert outcome.reason is Reason.CANCELLED and "password" in outcome.message
    for bad in ({"credential_id": "a$b"}, {"credential_id": "A" * 5000}, {}):
        _, state = browserkey.assertion_options(agent, "alice", RP_ID)
        outcome = browserkey.finish_assertion(agent, "alice", state, bad, ORIGIN, RP_ID)
        assert outcome.reason is Reason.VERIFICATION_FAILED and "malformed" in outcome.message


def test_a_state_for_another_user_or_purpose_is_refused(agent, browser):
    enrol(agent, browser)
    options, state = browserkey.assertion_options(agent, "alice", RP_ID)
    answer = as_form(get(browser, options))
    outcome = browserkey.finish_assertion(agent, "bob", state, answer, ORIGIN, RP_ID)
    assert not outcome.ok and "another sign-in" in outcome.message
    alice = agent.store.get_user("alice")
    _, reg_state = browserkey.registration_options(agent, alice, RP_ID)
    outcome = browserkey.finish_assertion(agent, "alice", reg_state, answer, ORIGIN, RP_ID)
    assert not outcome.ok and "not for this page" in outcome.message


def test_registration_state_is_single_use_expiring_and_for_its_user(agent, browser):
    alice, bob = agent.store.get_user("alice"), agent.store.get_user("bob")
    options, state = browserkey.registration_options(agent, alice, RP_ID)
    response = create(browser, options)
    with pytest.raises(EnrolError) as e:  # bob's page posting alice's registration
        browserkey.finish_registration(agent, bob, Challenge.from_json(state.to_json()),
                                       response, ORIGIN, RP_ID, name="k")
    assert e.value.reason == "wrong-user"
    spent = state.to_json()
    browserkey.finish_registration(agent, alice, state, response, ORIGIN, RP_ID, name="k")
    spent["used"] = True
    with pytest.raises(EnrolError) as e:
        browserkey.finish_registration(agent, alice, Challenge.from_json(spent), response,
                                       ORIGIN, RP_ID, name="k2")
    assert e.value.reason == "challenge-used"
    options, state = browserkey.registration_options(agent, alice, RP_ID)
    assert len(options["excludeCredentials"]) == 1  # the key just enrolled
    agent.test_clock.t += browserkey.CHALLENGE_SECONDS + 1
    with pytest.raises(EnrolError) as e:
        browserkey.finish_registration(agent, alice, state, {}, ORIGIN, RP_ID, name="k3")
    assert e.value.reason == "expired"
    with pytest.raises(EnrolError) as e:
        browserkey.finish_registration(agent, alice, None, {}, ORIGIN, RP_ID, name="k3")
    assert e.value.reason == "no-challenge"


def test_registration_names_and_tampering(agent, browser):
    alice = agent.store.get_user("alice")
    enrol(agent, browser, name="Blue key")
    other, device = make_browser()
    try:
        for name, reason in (("", "bad-name"), ("x" * 65, "bad-name"), ("blue KEY", "name-taken")):
            options, state = browserkey.registration_options(agent, alice, RP_ID)
            with pytest.raises(EnrolError) as e:
                browserkey.finish_registration(agent, alice, state, create(other, options),
                                               ORIGIN, RP_ID, name=name)
            assert e.value.reason == reason
        # the credential ID the page posts must be the attested one
        options, state = browserkey.registration_options(agent, alice, RP_ID)
        response = create(other, options)
        response["rawId"] = browserkey.b64url(os.urandom(16))
        with pytest.raises(EnrolError) as e:
            browserkey.finish_registration(agent, alice, state, response, ORIGIN, RP_ID,
                                           name="green key")
        assert e.value.reason == "verification-failed"
        # a registration made for another RP ID
        options, state = browserkey.registration_options(agent, alice, RP_ID)
        response = create(other, options)
        with pytest.raises(EnrolError) as e:
            browserkey.finish_registration(agent, alice, state, response, ORIGIN,
                                           "other.example", name="green key")
        assert e.value.reason == "wrong-request" and "not for this page" in e.value.message
    finally:
        device.close()
    assert [c.name for c in agent.store.list_fido_credentials(alice.id)] == ["Blue key"]


class FakeConversation:
    """The sign-in conversation as the login flow's thread sees it: each prompt answered by
    ``answer(prompt)``."""

    def __init__(self, answer) -> None:
        self.answer, self.prompts = answer, []

    def ask(self, prompt):
        self.prompts.append(prompt)
        return self.answer(prompt)


class Terminal:
    """The rest of the login flow's questions: only the password is typed here."""

    def __init__(self, password: str) -> None:
        self.password, self.asked = password, []

    def info(self, message):
        pass

    def secret(self, prompt):
        self.asked.append(prompt)
        return self.password if prompt == "Password" else None

    def text(self, prompt):
        return None

    def choose(self, prompt, options, default):
        return None

    def show_qr(self, uri):
        pass


def test_the_login_flow_with_the_browser_as_its_key(agent, browser):
    """browser_key_login gives the login flow (ceremonies/login.py) a key ceremony whose
    answers come from the page: the same policy flow as at a workstation. A key that did not
    verify its user is one factor, so the flow asks for the password too."""
    from types import SimpleNamespace

    from token_agent.ceremonies.login import Device, login
    from token_agent.factors import password as password_factor
    from token_agent.web.webauthn_pages import browser_key_login

    enrol(agent, browser)
    alice = agent.store.get_user("alice")
    password_factor.set_password(agent.factors(), alice.id, "correct horse battery staple")
    ctx = SimpleNamespace(agent=agent, rp_id=RP_ID, origin=ORIGIN)
    conv = FakeConversation(lambda prompt: as_form(get(browser, prompt.data["options"])))
    terminal = Terminal("correct horse battery staple")
    outcome = login(agent, "alice", interaction=terminal, device=Device("unmanaged", "b1"),
                    primary="key", key_login=browser_key_login(conv, ctx))
    assert outcome.ok, outcome
    assert [p.kind for p in conv.prompts] == ["webauthn-get"]
    assert conv.prompts[0].label == "Use your security key"
    assert terminal.asked == ["Password"]  # the key without PIN: the password as well
    assert set(outcome.factors) == {Factor.POSSESSION, Factor.KNOWLEDGE}

    # no answer from the page (cancelled, or the conversation timed out): a cancel, recorded
    conv = FakeConversation(lambda prompt: None)
    outcome = login(agent, "alice", interaction=terminal, device=Device("unmanaged", "b1"),
                    primary="key", key_login=browser_key_login(conv, ctx))
    assert not outcome.ok and outcome.reason is Reason.CANCELLED
    assert events(agent, "login.key")[0].detail["reason"] == "cancelled"

    # an unknown user: the same page, with a decoy credential, and the same failure
    conv = FakeConversation(lambda prompt: {"error": "NotAllowedError"})
    outcome = login(agent, "nobody", interaction=terminal, device=Device("unmanaged", "b1"),
                    primary="key", key_login=browser_key_login(conv, ctx))
    assert not outcome.ok and [p.kind for p in conv.prompts] == ["webauthn-get"]
    assert len(conv.prompts[0].data["options"]["allowCredentials"]) == 1


def test_the_browser_key_as_the_second_factor(agent, browser):
    """After the password, the policy's second factor: the user's key, asked in the page."""
    from types import SimpleNamespace

    from token_agent.ceremonies.login import Device, login
    from token_agent.factors import password as password_factor
    from token_agent.web.webauthn_pages import browser_key_login

    enrol(agent, browser)
    alice = agent.store.get_user("alice")
    password_factor.set_password(agent.factors(), alice.id, "correct horse battery staple")
    ctx = SimpleNamespace(agent=agent, rp_id=RP_ID, origin=ORIGIN)
    conv = FakeConversation(lambda prompt: as_form(get(browser, prompt.data["options"])))
    outcome = login(agent, "alice", interaction=Terminal("correct horse battery staple"),
                    device=Device("unmanaged", "b2"), primary="password",
                    key_login=browser_key_login(conv, ctx))
    assert outcome.ok, outcome
    assert outcome.method == "password+key" and [p.kind for p in conv.prompts] == ["webauthn-get"]
    assert events(agent, "login")[0].detail["second"] == "key"
