"""The clinician's own pages (``/account``, issue 16) in a real browser: headless Chromium
driven by Selenium against a real organisation server on TLS and PostgreSQL, with a real SMTP
server and HTTP SMS gateway (``tests/webtest.py``). One test per journey:

* enrol an authenticator app, confirmed by a code computed by the real ``oathtool`` (a wrong
  code first: asked again with the same QR code and key); the time from the sign-in form to
  "App enrolled", as the browser measured it, is printed;
* add a mobile, verified by the code texted to the gateway (an office phone refused first),
  and an email address, by the code emailed (a wrong code first);
* the alternate phone made preferred, and the next sign-in (another browser: a new device)
  sends its code there; the unusual sign-in is told by text and flagged on "Recent sign-ins";
* backup codes made, shown once; app passwords under a policy that allows legacy access
  (shown once, named, revocable), and the page saying why not where it does not;
* removing a method after re-authentication, never the last second factor;
* attacks through a plain HTTPS client: another user's method, a form without its CSRF
  token, pages without a session, too many codes sent.

Each journey runs axe-core on its main pages and saves their screenshots (``account-*``).
"""

from __future__ import annotations

import re
import subprocess
import time

import pyotp
import pytest

from test_web_core import Client
from webtest import (PASSWORD, Page, close_driver, code_in, fresh_totp, new_driver, start_web,
                     wait_for)

MOBILE, MOBILE_HINT = "+447700900123", "+44•••••123"
ALTERNATE, ALTERNATE_HINT = "+447700900456", "+44•••••456"
OFFICE = "020 7946 0018"
LANDLINE_WORDS = ("Office phones and landlines cannot receive text messages: enter a mobile "
                  "number")


def by_css(page: Page, selector: str):
    from selenium.webdriver.common.by import By

    return page.driver.find_elements(By.CSS_SELECTOR, selector)


def signed_in_with_code(page: Page, username: str, code_for) -> Page:
    """Sign in with the password, keeping the second factor the page proposes (the preferred
    one), and ``code_for(prompt_text)`` as its code."""
    page.open("/account/sign-in")
    page.fill("User name", username).fill("Password", PASSWORD).click("Sign in")
    wait_for(lambda: page.path.startswith("/account/sign-in/step") and by_css(page, "form"),
             what="the second factor")
    if by_css(page, "input[name=choice]"):  # "use a different method": keep the default
        page.click("Continue")
        wait_for(lambda: by_css(page, "input[name=answer]"), what="the code question")
    prompt = by_css(page, "label[for=answer]")[0].text
    page.fill(prompt, code_for(prompt)).click("Continue")
    wait_for(lambda: page.path == "/account", what=f"signed in as {username}")
    return page


def method_id(web, username: str, kind: str, name: str | None = None) -> int:
    with web.agent() as agent:
        user = agent.store.get_user(username)
        return agent.store.find_method(user.id, kind, name).id


def age_sign_in(web, seconds: float = 360) -> None:
    """The browser's sign-in was ``seconds`` ago (re-authentication: bind_minutes is 5)."""
    with web.agent() as agent:
        with agent.store.transaction(), agent.store._using("age a sign-in") as conn:
            conn.execute("UPDATE web_sessions SET auth_at = auth_at - ?", (seconds,))


# --------------------------------------------------------------------------- authenticator app


def nav_ms(page: Page) -> float:
    """How long the browser took to load the current page (its navigation entry: from the
    request to the end of its load event), in ms."""
    return float(page.driver.execute_script(
        "const nav = performance.getEntriesByType('navigation')[0];"
        "return nav.loadEventEnd - nav.startTime;"))


def oathtool(key: str) -> str:
    return subprocess.run(["oathtool", "--totp", "-b", key], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_enrol_an_authenticator_app_confirmed_by_oathtool(web, browser, capsys):
    secret = web.add_user("alice", totp=True)
    page = browser
    # 1. the measured journey, as a person does it (no checks in between): sign in, add an
    #    app, scan (read its key), type its first code (oathtool), "App enrolled"
    page.open("/account/sign-in")
    page.fill("User name", "alice").fill("Password", PASSWORD)
    code = fresh_totp(secret)  # not waited for inside the measured time
    loads = []
    started = page.driver.execute_script("return Date.now()")  # the browser's clock
    page.click("Sign in")
    wait_for(lambda: "authenticator app" in page.text(), what="the second factor")
    loads.append(nav_ms(page))
    page.fill("Code from your authenticator app", code).click("Continue")
    wait_for(lambda: page.path == "/account", what="the account page")
    loads.append(nav_ms(page))
    page.click("Add an authenticator app")
    page.wait_heading("Add an authenticator app")
    loads.append(nav_ms(page))
    page.fill("Name for this app", "work phone").click("Continue")
    page.wait_heading("Scan the QR code with your authenticator app")
    loads.append(nav_ms(page))
    key = by_css(page, "#secret")[0].text.replace(" ", "")
    page.fill("Code from your authenticator app", oathtool(key)).click("Confirm app")
    page.wait_heading("App enrolled")
    finished = page.driver.execute_script(
        "const nav = performance.getEntriesByType('navigation')[0];"
        "return performance.timeOrigin + nav.loadEventEnd;")
    loads.append(nav_ms(page))
    elapsed = (finished - started) / 1000.0
    with capsys.disabled():
        print(f"\nsign-in form submitted -> 'App enrolled' shown: {elapsed:.2f} s on the "
              f"browser's clock, of which {sum(loads) / 1000:.2f} s loading the "
              f"{len(loads)} pages ({', '.join(f'{x:.0f}' for x in loads)} ms)")
    assert 0 < elapsed < 60 and "work phone" in page.text()
    page.axe()
    page.shot("account-app-enrolled")
    with web.agent() as agent:
        user = agent.store.get_user("alice")
        apps = {m.name: m.confirmed for m in agent.store.list_methods(user.id, "totp")}
    assert apps == {"authenticator app": True, "work phone": True}
    assert [e.outcome for e in web.events("enrol.totp", "alice")][:2] == ["success", "started"]
    page.open("/account")
    assert page.heading() == "Your account" and "work phone" in page.text()
    page.axe()
    page.shot("account-home")

    # 2. another app, checked page by page, with a wrong code first: asked again, with the
    #    same QR code and key (the secret stays on the server)
    page.click("Add an authenticator app")
    page.wait_heading("Add an authenticator app")
    page.axe()
    page.fill("Name for this app", "work phone").click("Continue")  # a name taken
    wait_for(lambda: page.errors(), what="the taken name")
    assert "already have an authenticator app called 'work phone'" in page.errors()[0]
    page.fill("Name for this app", "tablet").click("Continue")
    page.wait_heading("Scan the QR code with your authenticator app")
    key = by_css(page, "#secret")[0].text.replace(" ", "")
    assert re.fullmatch(r"[A-Z2-7]{32}", key)
    assert by_css(page, "figure.app-qr svg[role=img] title")
    # no form field carries the secret (nothing for the browser to swap)
    hidden = [e.get_attribute("name") for e in by_css(page, "input[type=hidden]")]
    assert hidden == ["csrf_token", "csrf_token"]  # the sign-out form's and this form's
    page.axe()
    page.shot("account-add-app")
    near = {pyotp.TOTP(key).at(time.time() + k * 30) for k in range(-2, 3)}
    wrong = next(c for c in ("000000", "111111", "222222") if c not in near)
    page.fill("Code from your authenticator app", wrong).click("Confirm app")
    wait_for(lambda: page.errors(), what="the wrong code's error")
    assert page.heading() == "Scan the QR code with your authenticator app"
    assert page.driver.title.startswith("Error: ")
    assert "The code is not right" in page.errors()[0]
    assert by_css(page, "#secret")[0].text.replace(" ", "") == key
    page.axe()
    page.shot("account-add-app-wrong-code")
    page.fill("Code from your authenticator app", oathtool(key)).click("Confirm app")
    page.wait_heading("App enrolled")
    assert "tablet" in page.text()


# --------------------------------------------------------------------------- phones


def test_add_a_mobile_verified_by_the_texted_code_an_office_phone_refused(web, browser):
    secret = web.add_user("bob", totp=True)
    page = browser.sign_in("bob", totp_secret=secret)
    page.click("Add a mobile phone number")
    page.wait_heading("Add a mobile phone number")
    page.axe()

    page.fill("Mobile phone number", OFFICE).click("Send code")
    wait_for(lambda: page.errors(), what="the landline's error")
    assert page.errors()[0].startswith(LANDLINE_WORDS)
    assert page.driver.title.startswith("Error: ")
    assert LANDLINE_WORDS in by_css(page, "#destination-error")[0].text
    assert web.gateway.requests == []  # nothing was sent
    page.axe()
    page.shot("account-landline-refused")

    page.fill("Mobile phone number", "07700 900123").click("Send code")
    page.wait_heading(f"Enter the code we sent to {MOBILE_HINT}")
    page.axe()
    page.shot("account-confirm-phone")
    with web.agent() as agent:  # not saved until the code comes back
        user = agent.store.get_user("bob")
        assert [m.confirmed for m in agent.store.list_methods(user.id, "sms")] == [False]
    text = wait_for(lambda: web.sms_to(MOBILE), what="the text")[-1]
    assert "code to confirm this phone number" in text
    page.fill("Code", code_in(text)).click("Confirm")
    wait_for(lambda: page.path == "/account", what="back to the account")
    assert f"Your mobile phone ({MOBILE_HINT}) is confirmed" in page.text()
    assert f"mobile phone ({MOBILE_HINT})" in by_css(page, "#methods")[0].text
    assert web.events("enrol.sms", "bob")[0].outcome == "success"

    # an email address, the same way: the code is emailed
    page.click("Add an email address")
    page.wait_heading("Add an email address")
    page.fill("Email address", "Bob.Jones@Example.NHS.uk").click("Send code")
    page.wait_heading("Enter the code we sent to B•••@example.nhs.uk")
    mail = wait_for(lambda: web.mail_to("Bob.Jones@example.nhs.uk"), what="the email")[-1]
    page.fill("Code", "000000" if code_in(mail) != "000000" else "111111").click("Confirm")
    wait_for(lambda: page.errors(), what="the wrong code's error")
    assert "Wrong code" in page.errors()[0] and "send a new code" in page.errors()[0]
    page.axe()
    page.fill("Code", code_in(mail)).click("Confirm")
    wait_for(lambda: page.path == "/account", what="back to the account")
    assert "email (B•••@example.nhs.uk)" in by_css(page, "#methods")[0].text


def test_the_preferred_alternate_phone_gets_the_next_sign_in_code(web, browser, browser2):
    secret = web.add_user("carol", totp=True, mobile=MOBILE)
    page = signed_in_with_code(browser, "carol", lambda prompt: fresh_totp(secret))
    page.click("Add an alternate mobile phone number")
    page.wait_heading("Add an alternate mobile phone number")
    page.fill("Alternate mobile phone number", "07700 900456").click("Send code")
    page.wait_heading(f"Enter the code we sent to {ALTERNATE_HINT}")
    page.fill("Code", code_in(wait_for(lambda: web.sms_to(ALTERNATE), what="a text")[-1]))
    page.click("Confirm")
    wait_for(lambda: page.path == "/account", what="back to the account")

    page.click("Choose your preferred method")
    page.wait_heading("Choose your preferred method")
    page.axe()
    page.shot("account-preferred")
    page.choose(f"Text message code: alternate phone ({ALTERNATE_HINT})").click(
        "Save preferred method")
    wait_for(lambda: page.path == "/account", what="back to the account")
    assert "Your preferred method is now alternate phone" in page.text()
    assert web.events("method.preferred", "carol")[0].detail["name"] == "alternate phone"

    # the next sign-in, from another browser (a new device): the code goes to the alternate
    to_mobile = len(web.sms_to(MOBILE))

    def alternate_code(prompt: str) -> str:
        assert prompt == f"Enter the code sent to {ALTERNATE_HINT}"
        texts = wait_for(lambda: [t for t in web.sms_to(ALTERNATE) if "sign-in code" in t],
                         what="the sign-in code")
        return code_in(texts[-1])

    other = signed_in_with_code(browser2, "carol", alternate_code)
    login = web.events("login", "carol")[0]
    assert login.outcome == "success" and login.detail["second_method"] == "alternate phone"
    assert not [t for t in web.sms_to(MOBILE)[to_mobile:] if "sign-in code" in t]
    # a new device for a user with history: unusual, and carol is told on her phones
    notice = wait_for(lambda: [t for t in web.sms_to(MOBILE)[to_mobile:]
                               if "account (carol) was signed in to" in t],
                    what="the notice")[0]
    assert "web browser or personal device" in notice and not re.search(r"\b\d{6}\b", notice)

    other.open("/account/activity")
    assert other.heading() == "Recent sign-ins"
    rows = [r.text for r in by_css(other, "#signins tbody tr")]
    assert "Unusual" in rows[0] and "text message code (alternate phone)" in rows[0]
    assert "Unusual" not in rows[1] and "authenticator app" in rows[1]
    assert "1 unusual sign-in" in other.text()
    other.axe()
    other.shot("account-activity")


# --------------------------------------------------------------------------- backup codes


def test_backup_codes_are_shown_once_and_work(web, browser):
    secret = web.add_user("dave", totp=True)
    page = browser.sign_in("dave", totp_secret=secret)
    page.click("Backup codes")
    page.wait_heading("Backup codes")
    assert "You have no backup codes yet" in page.text()
    page.axe()
    page.click("Make backup codes")
    wait_for(lambda: by_css(page, "#backup-codes li"), what="the codes")
    made = [e.text for e in by_css(page, "#backup-codes li")]
    assert len(made) == 10 and all(re.fullmatch(r"[a-z2-9]{4}-[a-z2-9]{4}-[a-z2-9]{4}", c)
                                   for c in made)
    assert "earlier backup codes no longer work" not in page.text()  # there were none
    page.axe()
    page.shot("account-backup-codes")
    page.open("/account/backup-codes")  # shown once: not again
    assert "You have 10 unused backup codes" in page.text()
    assert not any(c in page.driver.page_source for c in made)
    # new codes replace the old ones
    page.click("Make new backup codes")
    wait_for(lambda: by_css(page, "#backup-codes li"), what="the new codes")
    again = [e.text for e in by_css(page, "#backup-codes li")]
    assert "Your earlier backup codes no longer work." in page.text()
    assert not set(again) & set(made)
    from token_agent.factors import backup

    with web.agent() as agent:
        user = agent.store.get_user("dave")
        assert not backup.verify(agent.factors(), user.id, made[0]).ok
        assert backup.verify(agent.factors(), user.id, again[0]).ok

    # app passwords: this organisation's policy does not allow them, and the page says why
    page.open("/account/app-passwords")
    assert "App passwords are not available" in page.text()
    assert "does not allow app passwords" in page.text() and not by_css(page, "#name")
    page.axe()
    page.shot("account-app-passwords-not-allowed")


# --------------------------------------------------------------------------- app passwords


@pytest.fixture
def legacy_web(tmp_path, pg_url, web_server_dir):
    server = start_web(tmp_path / "legacy", pg_url, web_server_dir,
                       policy_extra="[legacy]\napp_passwords = true\n")
    yield server
    server.org.stop()
    server.smtp.close()
    server.gateway.close()


def test_app_passwords_shown_once_named_and_revocable(legacy_web, browser_home):
    from token_agent.factors import apppasswords

    web = legacy_web
    secret = web.add_user("erin", totp=True)
    driver = new_driver(browser_home)
    try:
        page = Page(driver, web).sign_in("erin", totp_secret=secret)
        page.click("App passwords")
        page.wait_heading("App passwords")
        page.axe()
        page.click("Make app password")  # no name: asked for one
        wait_for(lambda: page.errors(), what="the missing name")
        assert "Enter a name for the app password" in page.errors()[0]
        page.fill("Name of the application", "ward printer").click("Make app password")
        wait_for(lambda: by_css(page, "#app-password"), what="the new app password")
        password = by_css(page, "#app-password")[0].text
        assert len(password) == 16
        page.axe()
        page.shot("account-app-password")
        with web.agent() as agent:
            user = agent.store.get_user("erin")
            ok = apppasswords.verify(agent.factors(), user.id, password, legacy_allowed=True)
            assert ok.ok and ok.method.name == "ward printer"
        page.open("/account/app-passwords")  # shown once
        assert password not in page.driver.page_source and "ward printer" in page.text()
        link = by_css(page, "a[href^='/account/remove/']")[0]
        link.click()
        page.wait_heading("Remove app password “ward printer”?")
        page.axe()
        page.click("Remove this method")
        wait_for(lambda: page.path == "/account", what="back to the account")
        assert "App password 'ward printer' was removed" in page.text()
        with web.agent() as agent:
            assert not apppasswords.verify(agent.factors(), user.id, password,
                                           legacy_allowed=True).ok
    finally:
        close_driver(driver)


# --------------------------------------------------------------------------- removal


def test_remove_a_method_after_reauthentication_never_the_last(web, browser):
    secret = web.add_user("fred", totp=True)
    page = browser.sign_in("fred", totp_secret=secret)
    app = method_id(web, "fred", "totp")
    page.open(f"/account/remove/{app}")
    page.wait_heading("Remove authenticator app “authenticator app”?")
    page.axe()
    page.shot("account-remove")
    page.click("Remove this method")
    wait_for(lambda: page.errors(), what="the refusal")
    assert "is your last second factor" in page.errors()[0]
    assert page.driver.title.startswith("Error: ")
    page.axe()
    page.shot("account-remove-last-refused")

    # with backup codes, the app may go: after signing in again (the sign-in is 6 min old)
    from token_agent.factors import backup

    with web.agent() as agent:
        _, codes = backup.generate(agent.factors(), agent.store.get_user("fred").id)
    age_sign_in(web)
    page.open(f"/account/remove/{app}")
    wait_for(lambda: page.path.startswith("/account/reauth"), what="the re-authentication")
    assert page.heading() == "Confirm it's you"
    page.axe()
    page.fill("Password", PASSWORD).click("Continue")
    wait_for(lambda: by_css(page, "input[name=choice]"), what="the second factor, again")
    page.axe()  # "use a different method": the app (preferred) or a backup code
    page.choose("backup codes").click("Continue")
    wait_for(lambda: by_css(page, "input[name=answer]"), what="the backup code question")
    page.fill("Backup code", codes[0]).click("Continue")
    page.wait_heading("Remove authenticator app “authenticator app”?")
    page.click("Remove this method")
    wait_for(lambda: page.path == "/account", what="back to the account")
    assert "Authenticator app 'authenticator app' was removed" in page.text()
    assert "authenticator app" not in by_css(page, "#methods")[0].text.lower()
    events = web.events("method.removed", "fred")
    assert [e.outcome for e in events] == ["success", "refused"]


# --------------------------------------------------------------------------- attacks


def test_attacks_other_users_methods_forged_forms_and_code_flooding(web, browser):
    secret = web.add_user("gina", totp=True)
    web.add_user("hal", totp=True, mobile=MOBILE)
    page = browser.sign_in("gina", totp_secret=secret)
    from token_agent.web import sessions

    client = Client(web)
    client.jar.clear()
    cookie = {"Cookie": f"{sessions.COOKIE}={page.cookie(sessions.COOKIE)}"}
    _, _, body = client.request("GET", "/account/add-contact/mobile", headers=cookie)
    token = re.search(r'name="csrf_token" value="([^"]+)"', body).group(1)

    # another user's method looks like no method at all, and is not touched
    hals = method_id(web, "hal", "sms")
    mine = client.request("GET", f"/account/remove/{hals}", headers=cookie)
    none = client.request("GET", "/account/remove/999999", headers=cookie)
    assert mine[0] == none[0] == 404 and mine[2].split("<main")[1] == none[2].split("<main")[1]
    status, _, _ = client.request("POST", f"/account/remove/{hals}", {"csrf_token": token},
                                  headers=cookie)
    assert status == 404
    status, _, _ = client.request("POST", "/account/preferred",
                                  {"csrf_token": token, "method": str(hals)}, headers=cookie)
    assert status == 400
    with web.agent() as agent:
        hal = agent.store.get_user("hal")
        assert agent.store.find_method(hal.id, "sms") is not None
        assert agent.store.preferred_method(hal.id).kind == "totp"

    # a form without its CSRF token (a forged page elsewhere): refused, nothing sent
    status, _, _ = client.request("POST", "/account/add-contact/mobile",
                                  {"destination": "07700900999"}, headers=cookie)
    assert status == 403 and web.sms_to("+447700900999") == []
    # no session: every page sends to the sign-in, nothing bound
    anonymous = Client(web)
    for path in ("/account", "/account/add-app", "/account/backup-codes",
                 "/account/activity", f"/account/remove/{hals}"):
        status, headers, _ = anonymous.request("GET", path)
        assert status == 303 and headers["location"].startswith("/account/sign-in?"), path
    status, _, _ = anonymous.request("POST", "/account/add-contact/mobile",
                                     {"destination": "07700900999", "csrf_token": token})
    assert status in (303, 403) and web.sms_to("+447700900999") == []

    # sending codes again and again: the page's limit (5 per 15 min per user) answers 429
    statuses = [client.request("POST", "/account/add-contact/mobile",
                               {"destination": "07700900777", "csrf_token": token},
                               headers=cookie)[0] for _ in range(7)]
    assert statuses[:5] == [303] * 5 and statuses[5:] == [429, 429], statuses
    assert len(web.sms_to("+447700900777")) == 5
