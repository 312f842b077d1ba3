"""Security keys and passkeys on the pages, in a real browser: headless Chromium with its
virtual authenticator (a CTAP2 key with resident credentials and user verification), against
the organisation's server, whose own relying party (token_agent.browserkey on
token_agent.webauthn) checks every answer.

Journeys: add a key after signing in with password + TOTP, sign out, sign in with the key;
another user's credential refused; a replayed assertion refused; the page without JavaScript.
A wrong origin is a unit test (tests/test_browserkey.py: the browser itself never lets a page
claim another origin)."""

from __future__ import annotations

import json

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.virtual_authenticator import (
    Protocol, Transport, VirtualAuthenticatorOptions,
)

from webtest import PASSWORD, code_in, wait_for
from token_agent import browserkey

pytestmark = pytest.mark.usefixtures("web")

KEY_HEADING = "Use your security key"
WAITING = "Waiting for you to confirm"  # the flow is busy: the page refreshes itself


def virtual_key(page) -> str:
    return page.driver.add_virtual_authenticator(VirtualAuthenticatorOptions(
        protocol=Protocol.CTAP2, transport=Transport.USB, has_resident_key=True,
        has_user_verification=True, is_user_verified=True))


def add_key(page, name: str) -> None:
    page.open("/account/keys/add").wait_heading("Add a security key or passkey")
    page.fill("Name for this key", name).click("Add the key")
    page.wait_heading("Your security keys and passkeys")
    assert name in page.text()


def sign_out(page) -> None:
    page.click("Sign out")
    wait_for(lambda: page.cookie("__Host-ta_session") is None, what="signed out")


def start_key_sign_in(page, username: str) -> None:
    page.open("/account/sign-in")
    page.fill("User name", username).click("Use a security key")
    page.wait_heading(KEY_HEADING)


def outcome_page(page) -> str:
    """The heading once the sign-in is over (not the key's page any more)."""
    return wait_for(lambda: (h := page._heading_or_none()) not in (None, KEY_HEADING, WAITING)
                    and h, what="the end of the sign-in")


def add_email(web, username: str, address: str) -> None:
    """A confirmed email contact, added with the library (after signing in: with two second
    factors the sign-in would ask which one)."""
    from token_agent.factors import codes

    with web.agent() as agent:
        ctx, user = agent.factors(), agent.store.get_user(username)
        codes.add_contact(ctx, user.id, "email", address)
        text = wait_for(lambda: web.mail_to(address), what="the confirmation code")[-1]
        assert codes.confirm_contact(ctx, user.id, "email", code_in(text)).ok


def sign_in(page, username: str, secret: str) -> None:
    """Password + TOTP, until the account page (sign_in may return on the "waiting" page
    while the flow finishes)."""
    page.sign_in(username, PASSWORD, totp_secret=secret)
    page.wait_heading("Your account")


def test_add_a_key_then_sign_in_with_it(web, browser):
    """Password + TOTP, add a key, sign out; sign in with the key (user name + key), then with
    the passkey alone (no user name); later, the key re-authenticates before a change."""
    secret = web.add_user("alice", totp=True)
    page = browser
    virtual_key(page)
    sign_in(page, "alice", secret)
    add_email(web, "alice", "alice@trust.nhs.example")  # where she is told of changes

    page.open("/account/keys/add").wait_heading("Add a security key or passkey")
    page.axe()
    page.shot("key-add")
    page.click("Add the key")  # no name: said beside the field, nothing enrolled
    page.wait_heading("Add a security key or passkey")
    assert any("name for the key" in e for e in page.errors())
    page.fill("Name for this key", "blue key").click("Add the key")
    page.wait_heading("Your security keys and passkeys")
    assert "blue key" in page.text() and "These web pages" in page.text()
    page.axe()
    page.shot("key-list")
    page.open("/account").wait_heading("Your account")
    assert "blue key" in page.text()  # among the methods
    # told by email, in case it was not them
    notice = wait_for(lambda: [m for m in web.mail_to("alice@trust.nhs.example")
                               if "security key named 'blue key' was added" in m],
                      what="the notice of the new key")
    assert "IT service desk" in notice[0]
    added = web.events("enrol.key", "alice")
    assert added and added[0].outcome == "success" and added[0].detail["via"] == "browser"
    with web.agent() as agent:
        alice = agent.store.get_user("alice")
        [cred] = agent.store.list_fido_credentials(alice.id)
    assert cred.rp_id == "localhost" and cred.uv_enrolled and cred.discoverable

    sign_out(page)
    start_key_sign_in(page, "alice")
    assert "needs JavaScript" not in page.text()
    page.axe()
    page.shot("signin-key")
    page.click(KEY_HEADING)
    assert outcome_page(page) == "Your account", page.errors()
    assert page.cookie("__Host-ta_session") is not None
    used = web.events("login.key", "alice")[0]
    assert used.outcome == "success" and used.detail == {
        "credential": "blue key", "user_verified": True, "via": "browser"}
    login = web.events("login", "alice")[0]
    assert login.outcome == "success" and login.detail["primary"] == "key"
    assert login.detail["second"] is None  # the key's PIN/biometric was the second factor
    with web.agent() as agent:
        after = agent.store.get_fido_credential(cred.credential_id)
    assert after.sign_count > cred.sign_count and after.last_used_at is not None

    # a passkey needs no user name: the key's credential says who it is
    sign_out(page)
    page.open("/account/sign-in")
    page.click("Use a security key")
    page.wait_heading(KEY_HEADING)
    page.click(KEY_HEADING)
    assert outcome_page(page) == "Your account", page.errors()
    assert "alice" in page.driver.find_element(By.CSS_SELECTOR, ".nhsuk-header__account").text

    # adding a key needs a recent sign-in: the key itself confirms it is her
    with web.agent() as agent:  # the sign-in was 6 minutes ago (bind_minutes: 5)
        with agent.store.transaction(), agent.store._using("age a sign-in") as conn:
            conn.execute("UPDATE web_sessions SET auth_at = auth_at - 360")
    page.open("/account/keys/add").wait_heading("Confirm it's you")
    page.click("Use a security key")
    page.wait_heading(KEY_HEADING)
    page.click(KEY_HEADING)
    page.wait_heading("Add a security key or passkey")


def _enrol_elsewhere(web, username: str) -> bytes:
    """A key enrolled for ``username`` on this site by another browser (python-fido2's client
    with the project's virtual key, at the site's origin): its credential ID."""
    from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
    from fido2.webauthn import PublicKeyCredentialCreationOptions

    from simulators.key import create_virtual_key, open_in_process_device

    class NoPin(UserInteraction):
        def request_pin(self, permissions, rp_id):
            return None

    device = open_in_process_device(create_virtual_key(presence="auto"))
    try:
        client = Fido2Client(device, client_data_collector=DefaultClientDataCollector(web.url),
                             user_interaction=NoPin())
        with web.agent() as agent:
            user = agent.store.get_user(username)
            options, state = browserkey.registration_options(agent, user, "localhost")
            options["authenticatorSelection"]["userVerification"] = "discouraged"
            made = client.make_credential(PublicKeyCredentialCreationOptions.from_dict(options))
            done = browserkey.finish_registration(agent, user, state,
                                                  json.loads(json.dumps(dict(made))), web.url,
                                                  "localhost", name=f"{username}'s key")
        return done.credential_id
    finally:
        device.close()


def _on_submit(page, script: str) -> None:
    """Run ``script`` (with ``form``) just before webauthn.js sends the key's answer."""
    page.driver.execute_script(
        "const form = document.querySelector('form[data-webauthn]');"
        "const send = HTMLFormElement.prototype.submit;"
        "form.submit = function () {" + script + "; send.call(form); };")


def test_another_users_credential_is_refused(web, browser):
    """Alice's page posts her key's signature under bob's credential ID: the server looks
    the credential up, sees it is bob's, and refuses (nothing of bob's changes)."""
    secret = web.add_user("alice", totp=True)
    web.add_user("bob", totp=True)
    bob_credential = _enrol_elsewhere(web, "bob")
    page = browser
    virtual_key(page)
    sign_in(page, "alice", secret)
    add_key(page, "alice key")
    sign_out(page)

    start_key_sign_in(page, "alice")
    _on_submit(page, "form.querySelector('[name=credential_id]').value = "
               f"{json.dumps(browserkey.b64url(bob_credential))}")
    page.click(KEY_HEADING)
    assert outcome_page(page) == "Sign in"
    assert page.errors() == ["Authentication failed."]
    assert page.cookie("__Host-ta_session") is None
    refused = web.events("login.key", "alice")[0]
    assert refused.outcome == "failure"
    assert refused.detail["reason"] == "credential-of-another-user"
    with web.agent() as agent:
        bobs = agent.store.get_fido_credential(bob_credential)
    assert bobs.last_used_at is None and not bobs.flagged
    page.axe()


def test_a_replayed_assertion_is_refused(web, browser):
    """The fields a successful key sign-in posted, posted again in a new sign-in (a copy from
    a proxy's log, a shoulder-surfed form): signed for another challenge, refused."""
    secret = web.add_user("alice", totp=True)
    page = browser
    virtual_key(page)
    sign_in(page, "alice", secret)
    add_key(page, "blue key")
    sign_out(page)

    start_key_sign_in(page, "alice")
    fields = ["credential_id", "client_data_json", "authenticator_data", "signature",
              "user_handle"]
    _on_submit(page, "sessionStorage.setItem('answer', JSON.stringify(Object.fromEntries("
               f"{json.dumps(fields)}.map(n => [n, form.querySelector('[name=' + n + ']').value]))))")
    page.click(KEY_HEADING)
    assert outcome_page(page) == "Your account"
    sign_out(page)

    start_key_sign_in(page, "alice")
    _on_submit(page, "const old = JSON.parse(sessionStorage.getItem('answer'));"
               "for (const n in old) { form.querySelector('[name=' + n + ']').value = old[n]; }")
    page.click(KEY_HEADING)
    assert outcome_page(page) == "Sign in"
    assert page.errors() == ["Authentication failed."]
    refused = web.events("login.key", "alice")[0]
    assert refused.outcome == "failure" and refused.detail["reason"] == "verification-failed"
    assert any(e.outcome == "success" for e in web.events("login.key", "alice"))


def scripts(page, on: bool) -> None:
    page.driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": not on})


def test_without_javascript_the_pages_say_so_and_offer_the_password(web, browser):
    secret = web.add_user("alice", totp=True)
    page = browser
    scripts(page, False)
    sign_in(page, "alice", secret)  # the password and the code work as plain forms
    page.open("/account/keys/add").wait_heading("Add a security key or passkey")
    assert "Adding a security key or passkey needs JavaScript" in page.text()
    page.fill("Name for this key", "blue key").click("Add the key")
    page.wait_heading("Add a security key or passkey")
    assert any("needs JavaScript" in e for e in page.errors())
    scripts(page, True)  # for axe-core only: the page's own scripts ran (or not) already
    page.axe()
    scripts(page, False)
    sign_out(page)

    start_key_sign_in(page, "alice")
    assert "needs JavaScript" in page.text()
    assert not [b for b in page.driver.find_elements(By.CSS_SELECTOR, "[data-webauthn-start]")
                if b.is_displayed()]
    page.click("Use your password instead")
    assert outcome_page(page) == "Sign in"
    assert any("password" in e for e in page.errors())
    cancelled = web.events("login.key", "alice")[0]
    assert cancelled.outcome == "failure" and cancelled.detail["reason"] == "cancelled"


def test_adding_a_key_needs_a_signed_in_user(web, browser):
    page = browser
    page.open("/account/keys/add")
    page.wait_heading("Sign in")
    assert page.path.startswith("/account/sign-in?next=%2Faccount%2Fkeys%2Fadd")
