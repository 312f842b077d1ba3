"""The administrators' pages in a real browser against a real server (tests/webtest.py): a
lost device (reset the methods, issue a temporary access pass, the user signs in with it and
sets up a method again; the pass refused the second time, and once expired), the compliance
list and its CSV, a non-administrator refused, the policy, cards, audit and workstations
pages, and the forms' CSRF check. Every main page is checked with axe-core and
photographed."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import ssl
import time
import urllib.error
import urllib.request

import pyotp

from webtest import PASSWORD, fresh_totp, wait_for

ADMIN = "admin1"


def _admin(web, browser):
    secret = web.add_user(ADMIN, totp=True, roles=("admin",))
    browser.sign_in(ADMIN, PASSWORD, totp_secret=secret)
    return secret


def _get(web, path: str, session_cookie: str | None) -> tuple[int, dict, bytes]:
    """GET with the browser's session cookie, outside the browser (a download)."""
    context = ssl.create_default_context(cafile=str(web.org.server_dir / "ca.pem"))
    headers = {"Cookie": f"__Host-ta_session={session_cookie}"} if session_cookie else {}
    req = urllib.request.Request(web.url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, context=context, timeout=20) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _post(web, path: str, form: dict, session_cookie: str | None) -> tuple[int, str]:
    import urllib.parse

    context = ssl.create_default_context(cafile=str(web.org.server_dir / "ca.pem"))
    headers = {"Cookie": f"__Host-ta_session={session_cookie}"} if session_cookie else {}
    req = urllib.request.Request(web.url + path, data=urllib.parse.urlencode(form).encode(),
                                 headers=headers, method="POST")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                         NoRedirect())
    try:
        with opener.open(req, timeout=20) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _pass_on_page(page) -> str:
    from selenium.webdriver.common.by import By

    return page.driver.find_element(By.ID, "access-pass").text.strip()


def _sign_in_with_pass(page, username: str, value: str) -> None:
    page.driver.delete_all_cookies()
    page.open("/account/sign-in/access-pass")
    page.fill("User name", username).fill("Temporary access pass", value).click("Sign in")


def test_lost_device_reset_and_temporary_access_pass_then_the_user_enrols_again(web, browser):
    _admin(web, browser)
    web.add_user("alice", totp=True, mobile="+447700900123")
    page = browser
    page.open("/admin/users/alice")
    assert page.heading().startswith("Alice") or page.heading().startswith("alice")
    assert "Authenticator app" in page.text() and "Text message code" in page.text()
    page.axe()
    page.shot("admin-user")
    # the reset needs its confirmation: without it, an error and nothing removed
    page.click("Reset methods")
    wait_for(lambda: page.errors(), what="the confirmation's error")
    assert page.errors() == ["Confirm that you want to remove every method of this user"]
    assert page.driver.title.startswith("Error: ")
    page.axe()
    assert web.events("admin.reset-methods") == []
    page.choose("I have checked who is asking").fill("Hours the pass lasts", "2")
    page.click("Reset methods")
    page.wait_heading("Temporary access pass for alice")
    value = _pass_on_page(page)
    assert re.fullmatch(r"[a-z2-9]{4}(-[a-z2-9]{4}){3}", value)
    assert "Removed 2 methods of alice" in page.text()  # the password stays
    page.axe()
    page.shot("admin-access-pass")
    reset, = web.events("admin.reset-methods", "alice")
    assert reset.detail["actor"] == ADMIN and reset.detail["removed"] == 2
    issued, = web.events("access_pass.issued", "alice")
    assert issued.detail["actor"] == ADMIN and issued.detail["hours"] == 2
    # the pass is nowhere in the audit log
    with web.agent() as agent:
        everything = repr([e.to_dict() for e in agent.store.list_events(limit=10 ** 5)])
    assert value not in everything and value.replace("-", "") not in everything

    # alice signs in with the pass (its own page, a fresh browser session)
    _sign_in_with_pass(page, "alice", value)
    wait_for(lambda: page.path == "/account", what="signed in with the pass")
    assert "temporary access pass" in page.text()
    started = time.monotonic()
    login, = [e for e in web.events("login", "alice") if e.outcome == "success"]
    assert login.detail["primary"] == "access_pass"
    # the pass's session counts as multi-factor: the account pages let her set up methods
    # (core's require_recent_auth: reauth.check with this sign-in)
    from token_agent import reauth

    with web.agent() as agent:
        user = agent.store.get_user("alice")
        session, = agent.store.web_sessions_of(user.id)
        assert (session.multi_factor, session.method) == (True, "access_pass")
        auth = reauth.Authenticated(user.username, user.id, session.multi_factor,
                                    session.method, session.auth_at)
        assert reauth.check(agent, user, auth, now=time.time()) in ("login", "first-method")
    # and sets up an authenticator app again: through her pages when they are there,
    # else through the library on the same store (the pass's session allows it: reauth)
    secret = _enrol_totp(web, page, "alice")
    took = time.monotonic() - started
    # from now on she signs in with her password and the new app
    page.driver.delete_all_cookies()
    page.sign_in("alice", PASSWORD, totp_secret=secret)
    assert page.path == "/account"
    print(f"signed in with a pass to app enrolled: {took:.1f} s")

    # the pass was used up: the second time it is refused, saying what to do
    _sign_in_with_pass(page, "alice", value)
    wait_for(lambda: page.errors(), what="the refusal")
    assert page.errors()[0].startswith("Authentication failed.")
    assert "ask your administrator for a new one" in page.errors()[0]
    assert page.heading() == "Sign in with a temporary access pass"
    page.axe()
    page.shot("access-pass-refused")
    refused = [e for e in web.events("verify.access_pass", "alice") if e.outcome == "failure"]
    assert refused[0].detail["reason"] == "code-replayed"


def _enrol_totp(web, page, username: str) -> str:
    """An authenticator app for ``username``, set up in the signed-in browser when the
    account pages offer it, else with the library; returns its secret."""
    page.open("/account/totp")
    if page._heading_or_none() and "authenticator app" in page.text().lower() \
            and _has_field(page, "Code"):
        secret = re.search(r"\b([A-Z2-7]{16,})\b", page.text().replace(" ", "")).group(1)
        page.fill("Code", pyotp.TOTP(secret).now()).click("Continue")
        wait_for(lambda: page.path.startswith("/account") and not page.errors(),
                 what="the app confirmed")
        return secret
    from token_agent.factors import totp

    with web.agent() as agent:
        user = agent.store.get_user(username)
        pending = totp.begin_enrol(agent.factors(), user.id)
        earlier = pyotp.TOTP(pending.secret).at(time.time() - 30)
        assert totp.confirm_enrol(agent.factors(), user.id, earlier).ok
        from webtest import _USED

        _USED.setdefault(pending.secret, set()).add(earlier)
    return pending.secret


def _has_field(page, label: str) -> bool:
    try:
        page.field(label)
        return True
    except AssertionError:
        return False


def test_an_expired_temporary_access_pass_is_refused(web, browser):
    from token_agent.factors import accesspass

    web.add_user("alice")
    raw = "abcd2345efgh6789"
    with web.agent() as agent:
        user = agent.store.get_user("alice")
        now = time.time()
        agent.store.add_access_pass(
            user.id, agent.keys.code_hash(f"access_pass:{user.id}", raw), issued_by=ADMIN,
            created_at=now - 3 * 3600, expires_at=now - 3600)
        assert accesspass.open_pass(agent.factors(), user.id) is None
    _sign_in_with_pass(browser, "alice", "abcd-2345-efgh-6789")
    wait_for(lambda: browser.errors(), what="the refusal")
    assert browser.errors()[0].startswith("Authentication failed.")
    assert browser.cookie("__Host-ta_session") is None
    expired, = web.events("access_pass.expired", "alice")
    assert expired.outcome == "expired"
    failed = [e for e in web.events("verify.access_pass", "alice") if e.outcome == "failure"]
    assert failed[0].detail["reason"] == "code-expired"


def test_compliance_list_filters_and_csv(web, browser):
    _admin(web, browser)
    web.add_user("carol", totp=True)  # compliant
    web.add_user("dave", mobile="+447700900456")  # only weak methods
    web.add_user("erin")  # enforced, nothing set up
    web.add_user("frank", user_class="external")  # external: own MFA on, nothing set up
    with web.agent() as agent:  # a display name a spreadsheet would run as a formula
        agent.store.update_user("erin", display_name='=HYPERLINK("https://evil.example","x")')
    page = browser
    page.open("/admin")
    assert page.heading() == "Administration"
    page.axe()
    page.click("Users")
    wait_for(lambda: page.path == "/admin/users", what="the users page")
    assert page.heading() == "Users"
    text = page.text()
    for words in ("Compliant", "Only weak methods", "Enforced but not yet enrolled"):
        assert words in text
    page.axe()
    page.shot("admin-users")
    from selenium.webdriver.support.ui import Select

    Select(page.field("Compliance")).select_by_visible_text("Enforced but not yet enrolled")
    page.click("Filter")
    wait_for(lambda: "status=not-enrolled" in page.path, what="the filtered list")
    rows = _rows(page)
    assert [r[0].split()[0] for r in rows] == ["erin", "frank"]
    Select(page.field("User class")).select_by_visible_text("internal")
    page.click("Filter")
    wait_for(lambda: "class=internal" in page.path, what="the filtered list")
    assert [r[0].split()[0] for r in _rows(page)] == ["erin"]
    page.axe()

    # the CSV of the same filter, downloaded with the session
    status, headers, body = _get(web, "/admin/users.csv?status=not-enrolled",
                                 page.cookie("__Host-ta_session"))
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert headers["content-disposition"].startswith("attachment;")
    assert headers["cache-control"] == "no-store"
    table = list(csv.reader(io.StringIO(body.decode())))
    assert table[0][:3] == ["username", "display_name", "class"]
    assert [r[0] for r in table[1:]] == ["erin", "frank"]
    assert table[1][1] == '\'=HYPERLINK("https://evil.example","x")'
    assert all(not c.startswith(("=", "+", "-", "@")) for r in table for c in r)
    export, = web.events("admin.export-users")
    assert export.detail["actor"] == ADMIN and export.detail["status"] == "not-enrolled"
    # without a session: no CSV
    status, _, body = _get(web, "/admin/users.csv", None)
    assert status in (303, 200) and b"erin" not in body


def _event_ids(page) -> list[int]:
    from selenium.webdriver.common.by import By

    return [int(row.find_elements(By.TAG_NAME, "td")[0].text.split()[-1])
            for row in page.driver.find_elements(By.CSS_SELECTOR, "#events tbody tr")]


def _rows(page) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    return [[c.text for c in row.find_elements(By.TAG_NAME, "td")]
            for row in page.driver.find_elements(By.CSS_SELECTOR, "table.app-admin-users tbody tr")]


def test_a_non_admin_is_refused_and_recorded(web, browser):
    secret = web.add_user("alice", totp=True)
    web.add_user("bob", totp=True)
    page = browser
    page.open("/admin/users")
    assert page.path.startswith("/account/sign-in")  # signed out: sign in first
    page.sign_in("alice", PASSWORD, totp_secret=secret)
    for path in ("/admin", "/admin/users", "/admin/users/bob", "/admin/audit",
                 "/admin/policy", "/admin/cards", "/admin/workstations"):
        page.open(path)
        assert page.heading() == "You cannot use this page", path
    assert "administrators" in page.text()
    page.axe()
    page.shot("admin-refused")
    refused = web.events("web.admin-refused", "alice")
    assert len(refused) == 7 and refused[0].detail["path"] == "/admin/workstations"
    # nor can she act, even with her own session's CSRF token
    cookie = page.cookie("__Host-ta_session")
    page.open("/account")
    token = page.driver.find_element("name", "csrf_token").get_attribute("value")
    for path in ("/admin/users/bob/reset", "/admin/users/bob/access-pass",
                 "/admin/users/bob/unlock", "/admin/workstations/revoke"):
        status, body = _post(web, path, {"csrf_token": token, "confirm": "yes",
                                         "issue_pass": "yes", "name": "ws1"}, cookie)
        assert status == 403, (path, status)
    assert web.events("admin.reset-methods") == [] and web.events("access_pass.issued") == []
    status, _, _ = _get(web, "/admin/users.csv", cookie)
    assert status == 403


def test_admin_forms_need_their_csrf_token(web, browser):
    _admin(web, browser)
    web.add_user("alice", totp=True)
    cookie = browser.cookie("__Host-ta_session")
    for form in ({}, {"csrf_token": "forged-token-value-0123456789abcdef"}):
        status, body = _post(web, "/admin/users/alice/reset",
                             {**form, "confirm": "yes", "issue_pass": "yes"}, cookie)
        assert status == 403 and "This form has expired" in body
    assert web.events("admin.reset-methods") == []


def test_unlock_and_pass_only(web, browser):
    from token_agent.factors import totp

    _admin(web, browser)
    web.add_user("alice", totp=True)
    with web.agent() as agent:
        user = agent.store.get_user("alice")
        for _ in range(agent.policy.lockout.max_failures):
            totp.verify(agent.factors(), user.id, "000000")
    page = browser
    page.open("/admin/users/alice")
    assert "locked" in page.text()
    page.click("Unlock alice")
    wait_for(lambda: "Unlocked alice" in page.text(), what="the unlock")
    assert "No failed attempts are counted against alice" in page.text()
    unlock, = web.events("admin.unlock", "alice")
    assert unlock.detail["actor"] == ADMIN
    # a pass without a reset (the second form's lifetime); an out-of-range lifetime first
    from selenium.webdriver.common.by import By

    hours = page.driver.find_element(By.ID, "pass-hours")
    hours.clear()
    hours.send_keys("48")
    page.click("Issue a temporary access pass")
    wait_for(lambda: page.errors(), what="the lifetime's error")
    assert page.errors() == ["A temporary access pass lasts 1 to 24 hours: enter a whole "
                             "number of hours in that range"]
    page.axe()
    hours = page.driver.find_element(By.ID, "pass-hours")
    hours.clear()
    hours.send_keys("4")
    page.click("Issue a temporary access pass")
    page.wait_heading("Temporary access pass for alice")
    assert "Removed" not in page.text()
    page.open("/admin/users/alice")
    assert "Not used yet" in page.text()
    page.click("Revoke the open pass")
    wait_for(lambda: "no longer works" in page.text(), what="the revocation")
    assert "Revoked" in page.text()
    revoked, = web.events("access_pass.revoked", "alice")
    assert revoked.detail["actor"] == ADMIN


def test_policy_cards_audit_and_workstations_pages(web, browser):
    _admin(web, browser)
    web.add_user("alice", totp=True)
    now = time.time()
    with web.agent() as agent:
        store = agent.store
        alice = store.get_user("alice")
        store.add_card_identity(alice.id, uuid="555000000001", holder_name="Alice Able")
        store.record_card_use("555000000001", certificate_serial="1a2b", issuer="CN=Test CA",
                              not_after=now + 20 * 86400)
        store.record_event("login.card", outcome="failure",
                           detail={"reason": "certificate-revoked", "certificate_serial": "9f",
                                   "uuid": "555000000099", "holder_name": "Mallory Stolen"})
        store.add_join_token("ward-3-pc", hashlib.sha256(b"join").digest(), now + 3600)
    page = browser

    page.open("/admin/policy")
    assert page.heading() == "Policy"
    assert "built-in defaults" in page.text() or "policy.toml" in page.text()
    page.fill("User name", "alice").choose("Unmanaged").fill("Network address", "192.0.2.7")
    page.click("Explain")
    wait_for(lambda: "Rules that applied" in page.text(), what="the explanation")
    assert "class internal: MFA enforced" in page.text()
    page.axe()
    page.shot("admin-policy")
    page.fill("User name", "nobody").click("Explain")
    wait_for(lambda: page.errors(), what="the unknown user")
    assert page.errors() == ["There is no user of that name: check the spelling"]

    page.open("/admin/cards")
    text = page.text()
    assert "Alice Able (555000000001)" in text and "20 days left" in text
    assert "Mallory Stolen" in text
    page.axe()
    page.shot("admin-cards")

    page.open("/admin/audit?user=alice")
    assert "Chain verified: the audit log is intact" in page.text()
    assert "enrol" in page.text()
    page.fill("Kind", "enrol").click("Search")
    wait_for(lambda: "kind=enrol" in page.path, what="the search")
    from selenium.webdriver.common.by import By

    shown = [row.find_elements(By.TAG_NAME, "td")[2].text.split()[-1]
             for row in page.driver.find_elements(By.CSS_SELECTOR, "#events tbody tr")]
    assert shown and all(k.startswith("enrol.") for k in shown)
    page.axe()
    page.shot("admin-audit")
    # pages of 50, newest first: "Older events" goes on below the last one shown
    with web.agent() as agent:
        alice = agent.store.get_user("alice")
        for i in range(60):
            agent.store.record_event("test.page", user_id=alice.id, outcome="success",
                                     detail={"n": i})
    page.open("/admin/audit?kind=test.page")
    first = _event_ids(page)
    assert len(first) == 50 and first == sorted(first, reverse=True)
    page.click("Older events")
    wait_for(lambda: "before=" in page.path, what="the older events")
    older = _event_ids(page)
    assert len(older) == 10 and max(older) < min(first)
    page.click("Newest events")
    wait_for(lambda: "before=" not in page.path, what="the newest events")
    assert _event_ids(page) == first
    page.open("/admin/audit?kind=verify.totp&from=2999-01-01")
    assert "No events match this search." in page.text()
    page.open("/admin/audit?from=yesterday")
    assert page.errors() == ["Enter a date like 2026-12-07"]

    page.open("/admin/workstations")
    assert "ward-3-pc" in page.text() and "Waiting to join" in page.text()
    page.axe()
    page.shot("admin-workstations")
    page.click("Revoke")
    wait_for(lambda: "Revoked ward-3-pc" in page.text(), what="the revocation")
    revoked, = web.events("workstation.revoke")
    assert revoked.detail == {"workstation": "ward-3-pc", "actor": ADMIN}


def test_a_reset_needs_the_administrators_recent_sign_in(web, browser):
    secret = _admin(web, browser)
    web.add_user("alice", totp=True)
    with web.agent() as agent:  # the administrator signed in 6 minutes ago (bind_minutes: 5)
        admin = agent.store.get_user(ADMIN)
        session, = agent.store.web_sessions_of(admin.id)
        agent.store.reauth_web_session(session.id_hash, now=time.time() - 360,
                                       multi_factor=True, method="password+totp")
    page = browser
    page.open("/admin/users/alice")
    page.choose("I have checked who is asking").click("Reset methods")
    wait_for(lambda: page.path.startswith("/account/reauth"), what="the re-authentication")
    assert web.events("admin.reset-methods") == []  # nothing done yet
    page.fill("Password", PASSWORD).click("Continue")
    wait_for(lambda: "authenticator app" in page.text(), what="the second factor")
    page.fill("Code from your authenticator app", fresh_totp(secret)).click("Continue")
    # back on alice's page (the action's address, now a GET, does nothing), to choose again
    wait_for(lambda: page.path == "/admin/users/alice", what="back to alice's page")
    assert "choose the action again" in page.text()
    assert web.events("admin.reset-methods") == []
    page.choose("I have checked who is asking").choose("No").click("Reset methods")
    wait_for(lambda: "Removed 1 method of alice." in page.text(), what="the reset")
    assert web.events("admin.reset-methods", "alice")[0].detail["actor"] == ADMIN
    assert web.events("access_pass.issued") == []
