"""The pages' common ground, in a real browser against a real server: signing in with a
password and an authenticator app (the login flow, through pages), the session cookie's
attributes, the security headers, CSRF, expired sessions, no user enumeration, rate limits,
re-authentication and signing out."""

from __future__ import annotations

import http.cookiejar
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from webtest import PASSWORD, fresh_totp, wait_for


class Client:
    """A plain HTTPS client with cookies (an attacker's script, not a browser)."""

    def __init__(self, web) -> None:
        self.web = web
        context = ssl.create_default_context(cafile=str(web.org.server_dir / "ca.pem"))
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context),
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())

    def request(self, method: str, path: str, form: dict | None = None,
                headers: dict | None = None) -> tuple[int, dict, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.web.url + path, data=data, method=method,
                                     headers=headers or {})
        try:
            with self.opener.open(req, timeout=20) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    def csrf(self, path: str = "/account/sign-in") -> str:
        import re

        status, _, body = self.request("GET", path)
        return re.search(r'name="csrf_token" value="([^"]+)"', body).group(1)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_sign_in_with_password_and_authenticator_app(web, browser):
    secret = web.add_user("alice", totp=True)
    page = browser
    page.open("/account")
    assert page.path.startswith("/account/sign-in?next=%2Faccount")
    assert page.heading() == "Sign in"
    page.axe()
    page.shot("signin")
    page.fill("User name", "alice").fill("Password", PASSWORD).click("Sign in")
    wait_for(lambda: "authenticator app" in page.text(), what="the second factor")
    assert page.heading() == "Sign in"
    page.axe()
    page.shot("signin-code")
    # a wrong code ends this sign-in, as at a workstation, saying how many tries are left
    page.fill("Code from your authenticator app", "000000").click("Continue")
    wait_for(lambda: page.errors(), what="the wrong code's answer")
    assert page.errors() == ["wrong code — 9 tries left"]
    page.axe()
    page.fill("User name", "alice").fill("Password", PASSWORD).click("Sign in")
    wait_for(lambda: "authenticator app" in page.text(), what="the second factor")
    page.fill("Code from your authenticator app", fresh_totp(secret)).click("Continue")
    wait_for(lambda: page.path == "/account", what="the account page")
    cookie = page.driver.get_cookie("__Host-ta_session")
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie.get("expiry") is None  # a session cookie: gone with the browser
    assert page.heading() == "Your account"
    page.axe()
    page.shot("account-home")
    logins = web.events("login", "alice")
    assert [e.outcome for e in logins[:2]] == ["success", "failure"]


def test_unknown_user_sees_exactly_what_a_wrong_password_gets(web, browser):
    web.add_user("alice", totp=True)
    page = browser
    shown = []
    for name, password in (("alice", "wrong password"), ("nobody-here", "wrong password")):
        page.open("/account/sign-in")
        page.fill("User name", name).fill("Password", password).click("Sign in")
        wait_for(lambda: page.errors(), what="the failure")
        shown.append((page.heading(), page.errors(), page.driver.title))
    assert shown[0] == shown[1]
    assert shown[0][1] == ["Authentication failed."]
    page.axe()


def test_security_headers_and_cookies(web):
    client = Client(web)
    status, headers, body = client.request("GET", "/account/sign-in")
    assert status == 200
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"
    assert "<script>" not in body and " style=" not in body  # no inline script or style
    # the workstations' API keeps its certificate check: the pages do not open it
    status, _, _ = client.request("GET", "/v1/audit")
    assert status == 403


def test_a_form_without_its_csrf_token_is_refused(web, browser):
    web.add_user("alice", totp=True)
    client = Client(web)
    token = client.csrf()
    form = {"username": "alice", "password": PASSWORD, "action": "password"}
    status, _, body = client.request("POST", "/account/sign-in", form)
    assert status == 403 and "This form has expired" in body
    status, _, body = client.request("POST", "/account/sign-in", {**form, "csrf_token": "x" * 48})
    assert status == 403
    # another site's form, even with a token
    status, _, body = client.request("POST", "/account/sign-in", {**form, "csrf_token": token},
                                     headers={"Origin": "https://evil.example"})
    assert status == 403 and "another site" in body
    # and the same form with its token goes on to the sign-in's next step
    status, headers, _ = client.request("POST", "/account/sign-in", {**form, "csrf_token": token})
    assert status == 303 and headers["location"] == "/account/sign-in/step"


def test_signed_in_csrf_refused_in_the_browser(web, browser):
    secret = web.add_user("bob", totp=True)
    page = browser.sign_in("bob", totp_secret=secret)
    page.driver.execute_script(
        "document.querySelectorAll('input[name=csrf_token]').forEach(e => e.value = 'forged');")
    page.click("Sign out")
    assert page.heading() == "This form has expired"
    page.axe()
    page.open("/account")
    assert page.path == "/account"  # still signed in: the forged sign-out did nothing


def test_an_expired_session_is_sent_to_sign_in(web, browser):
    secret = web.add_user("carol", totp=True)
    page = browser.sign_in("carol", totp_secret=secret)
    with web.agent() as agent:  # the session was last used 16 minutes ago (idle 15)
        with agent.store.transaction(), agent.store._using("age a session") as conn:
            conn.execute("UPDATE web_sessions SET last_seen_at = last_seen_at - 960, "
                         "created_at = created_at - 960")
    page.open("/account")
    assert page.path.startswith("/account/sign-in?")
    assert "expired=1" in page.path
    assert "Your session has ended" in page.text()
    page.axe()
    with web.agent() as agent:
        assert agent.store.count_web_sessions(agent.store.get_user("carol").id) == 0


def test_sign_out_ends_the_session_everywhere(web, browser):
    secret = web.add_user("dan", totp=True)
    page = browser.sign_in("dan", totp_secret=secret)
    token = page.cookie("__Host-ta_session")
    page.click("Sign out")
    assert page.heading() == "You have signed out"
    page.axe()
    client = Client(web)  # the old cookie, replayed by someone who copied it
    client.jar.set_cookie(http.cookiejar.Cookie(
        0, "__Host-ta_session", token, None, False, "localhost", False, False, "/", True, True,
        None, False, None, None, {}))
    status, headers, _ = client.request("GET", "/account")
    assert status == 303 and headers["location"].startswith("/account/sign-in")


def test_sign_in_is_rate_limited_per_address(web):
    client = Client(web)
    token = client.csrf()
    statuses = []
    for _ in range(32):
        status, headers, _ = client.request("POST", "/account/sign-in", {
            "username": "nobody", "password": "guess", "action": "password",
            "csrf_token": token})
        statuses.append(status)
    assert statuses[:30] == [303] * 30
    assert statuses[30] == 429 and statuses[31] == 429


def test_reauthentication_asks_the_second_factor_again(web, browser):
    secret = web.add_user("erin", totp=True)
    page = browser.sign_in("erin", totp_secret=secret)
    with web.agent() as agent:  # the sign-in was 6 minutes ago (bind_minutes: 5)
        with agent.store.transaction(), agent.store._using("age a sign-in") as conn:
            conn.execute("UPDATE web_sessions SET auth_at = auth_at - 360")
    page.open("/account/reauth?next=/account")
    assert page.heading() == "Confirm it's you"
    page.axe()
    page.fill("Password", PASSWORD).click("Continue")
    wait_for(lambda: "authenticator app" in page.text(), what="the second factor, again")
    page.fill("Code from your authenticator app", fresh_totp(secret)).click("Continue")
    wait_for(lambda: page.path == "/account", what="back to the account")
    with web.agent() as agent:
        row = agent.store.web_sessions_of(agent.store.get_user("erin").id)[0]
    assert time.time() - row.auth_at < 60 and row.multi_factor


def test_open_redirects_are_not_followed(web, browser):
    secret = web.add_user("fay", totp=True)
    page = browser
    page.open("/account/sign-in?next=//evil.example/x")
    page.fill("User name", "fay").fill("Password", PASSWORD).click("Sign in")
    wait_for(lambda: "authenticator app" in page.text(), what="the second factor")
    page.fill("Code from your authenticator app", fresh_totp(secret)).click("Continue")
    wait_for(lambda: page.path == "/account", what="the account page, not another site")


@pytest.mark.parametrize("body", [b"\xff\xfe" * 10, b"a=" + b"x" * 70000])
def test_malformed_and_huge_forms_get_a_page_not_a_crash(web, body):
    client = Client(web)
    client.csrf()
    req = urllib.request.Request(web.url + "/account/sign-in", data=body, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with client.opener.open(req, timeout=20) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    assert status in (400, 403, 413)
