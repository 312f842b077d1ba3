"""The phone companion for push approval, in real browsers (token_agent/web/companion.py,
static/companion.js): browser 1 is the user's computer, browser 2 their phone.

The journey: sign in, pair the phone through the pairing link (the phone's browser makes a
non-extractable WebCrypto key), sign in again with push: the computer shows the number, the
phone shows the sign-in without it, the number typed on the phone signs the computer in; a
wrong number refuses the sign-in. Then the attacks, over plain HTTPS with a phone played by a
Python key (signing exactly what companion.js signs): reused and expired pairing codes,
streams without a valid signature (none, another key, a replay, a session cookie instead),
too many streams, an answer signed by another device, a replayed answer.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import ssl
import time
import urllib.error
import urllib.request

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from token_agent.factors import push, pushpairing
from webtest import PASSWORD, fresh_totp, wait_for

CONTEXT = {"username": "alice", "device": "unmanaged", "network": "192.0.2.7"}


# --------------------------------------------------------------------------- plain HTTPS


class Http:
    """HTTPS to the test server, trusting its CA (the phone played from Python)."""

    def __init__(self, web, server_dir) -> None:
        self.base = web.url
        self.tls = ssl.create_default_context(cafile=str(server_dir / "ca.pem"))

    def call(self, method: str, path: str, body: dict | bytes | None = None, *,
             headers: dict | None = None, timeout: float = 10.0):
        data = (json.dumps(body).encode() if isinstance(body, dict) else body)
        sent = {"Content-Type": "application/json"} if isinstance(body, dict) else {}
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={**sent, **(headers or {})})
        try:
            return urllib.request.urlopen(request, context=self.tls, timeout=timeout)
        except urllib.error.HTTPError as e:
            return e

    def json(self, method: str, path: str, body=None, **kw) -> tuple[int, dict]:
        response = self.call(method, path, body, **kw)
        with response:
            return response.status, json.loads(response.read() or b"{}")


class Phone:
    """A paired phone whose key is made here: what companion.js does, in Python."""

    def __init__(self, http: Http) -> None:
        self.http = http
        self.key = Ed25519PrivateKey.generate()
        self.device_id: str | None = None

    def pair(self, code: str) -> tuple[int, dict]:
        public = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        status, got = self.http.json("POST", "/companion/pair/redeem",
                                     {"code": code, "public_key": base64.b64encode(public).decode()})
        if status != 200:
            return status, got
        self.device_id = got["device_id"]
        challenge = base64.b64decode(got["challenge"])
        signature = self.key.sign(push._pairing_bytes(self.device_id, challenge))
        return self.http.json("POST", "/companion/pair/confirm",
                              {"device_id": self.device_id, "challenge": got["challenge"],
                               "signature": base64.b64encode(signature).decode()})

    def headers(self, path: str = "/companion/events", *, key=None, ms: int | None = None,
                nonce: str | None = None) -> dict:
        ms = int(time.time() * 1000) if ms is None else ms
        nonce = nonce or secrets.token_urlsafe(18)
        sig = (key or self.key).sign(pushpairing.request_bytes("GET", path, self.device_id, ms, nonce))
        return {"X-Companion-Device": self.device_id, "X-Companion-Time": str(ms),
                "X-Companion-Nonce": nonce, "X-Companion-Signature": base64.b64encode(sig).decode()}

    def first_event(self, headers: dict) -> tuple[int, str]:
        """The status of a stream and its first event (or the refusal's body)."""
        response = self.http.call("GET", "/companion/events", headers=headers)
        with response:
            if response.status != 200:
                return response.status, response.read().decode()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            text = ""
            while "event: pending" not in text:
                line = response.readline().decode()
                assert line, "the stream ended before its first event"
                text += line
            text += response.readline().decode()
            return 200, text

    def answer(self, request_id: str, number: int | None, decision: str = "approve", *,
               key=None, device_id: str | None = None) -> tuple[int, dict]:
        sig = (key or self.key).sign(push.answer_bytes(request_id, decision, number))
        return self.http.json("POST", "/companion/answer", {
            "version": 1, "device_id": device_id or self.device_id, "request_id": request_id,
            "decision": decision, "number": number, "signature": base64.b64encode(sig).decode()})


def new_code(web, username: str, *, name: str = "phone", ttl: float = pushpairing.CODE_TTL) -> str:
    with web.agent() as agent:
        user = agent.store.get_user(username)
        return pushpairing.start(agent.factors(), user.id, name=name, ttl=ttl).code


def start_push(web, username: str) -> push.PushRequest:
    with web.agent() as agent:
        user = agent.store.get_user(username)
        return push.start(agent.factors(), user.id, context=CONTEXT, ttl=120)


def request_state(web, request_id: str) -> str:
    with web.agent() as agent:
        return agent.store.get_push_request(request_id)["state"]


# --------------------------------------------------------------------------- the journey


def seen(page, text: str, timeout: float = 20.0) -> None:
    """Wait for ``text`` in the page; on timeout, say what the page showed."""
    try:
        wait_for(lambda: text in page.text(), timeout, repr(text))
    except AssertionError:
        raise AssertionError(f"{text!r} not shown at {page.path}: {page.text()[:800]}") from None


def sign_in_with_push(page, username: str) -> int:
    """Sign out, then sign in choosing push approval; the number the computer shows. The
    browser forgets its cookies first: a computer it has not seen, so the policy asks for a
    second factor (on a device seen within ``reverification.unmanaged_hours`` it would not)."""
    page.click("Sign out").wait_heading("You have signed out")
    page.driver.delete_all_cookies()
    page.open("/account/sign-in")
    page.fill("User name", username).fill("Password", PASSWORD).click("Sign in")
    wait_for(lambda: page.path.startswith("/account/sign-in/step"), what="the second factor")
    wait_for(lambda: "enter the number" in page.text() or "push approval" in page.text(),
             what=f"the second-factor question (at {page.path}: {page.text()[:300]})")
    if "enter the number" not in page.text():
        choose_push(page)
    text = wait_for(lambda: (re.search(r"enter the number (\d\d)", page.text()) or None),
                    what="the number on the sign-in screen")
    return int(text.group(1))


def choose_push(page) -> None:
    """On the second-factor page, choose push approval in the flow's method menu."""
    page.choose("push approval")
    page.click("Continue")


def stored_private_key_is_extractable(phone) -> str:
    """In the phone's page: try to export the private key kept in IndexedDB."""
    return phone.driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const open = indexedDB.open("token-agent-companion", 1);
        open.onerror = () => done("no database");
        open.onsuccess = () => {
          const get = open.result.transaction("companion").objectStore("companion").get("this");
          get.onsuccess = async () => {
            const record = get.result;
            if (!record) { done("no key"); return; }
            const flag = "extractable=" + record.privateKey.extractable;
            try {
              await crypto.subtle.exportKey("pkcs8", record.privateKey);
              done("EXPORTED " + flag);
            } catch (e) {
              try {
                await crypto.subtle.exportKey("jwk", record.privateKey);
                done("EXPORTED as JWK " + flag);
              } catch (e2) {
                done("refused: " + e.name + " " + flag + " " + record.privateKey.algorithm.name);
              }
            }
          };
          get.onerror = () => done("no record");
        };
    """)


def test_pair_a_phone_then_approve_with_the_number_and_refuse_a_wrong_one(web, browser, browser2):
    secret = web.add_user("alice", totp=True)
    computer, phone = browser, browser2
    computer.sign_in("alice", totp_secret=secret)
    computer.open("/account/push")
    assert computer.heading() == "Push approval on your phone"
    assert "You have no paired phone yet" in computer.text()
    computer.axe()
    computer.shot("companion-account")
    computer.fill("Name for the phone", "Work phone").click("Get a pairing code")
    computer.wait_heading("Pair your phone")
    from selenium.webdriver.common.by import By

    link = computer.driver.find_element(By.CSS_SELECTOR, "a[href*='/companion/pair#']") \
        .get_attribute("href")
    code = computer.driver.find_element(By.ID, "pairing-code").text
    assert link == f"{web.url}/companion/pair#{code}" and re.fullmatch(r"[0-9A-Z]{5}-[0-9A-Z]{5}", code)
    assert computer.driver.find_elements(By.CSS_SELECTOR, ".app-qr svg")
    computer.axe()
    computer.shot("companion-pairing-code")
    # the code is kept only as a keyed hash
    with web.agent() as agent, agent.store.connection("test") as conn:
        rows = conn.execute("SELECT code_hash FROM push_pairings").fetchall()
    assert len(rows) == 1 and code.replace("-", "").encode() not in bytes(rows[0]["code_hash"])

    # the phone opens the link: the code is filled in, and leaves the address bar
    phone.driver.get(link)
    phone.wait_heading("Pair this phone")
    assert phone.field("Pairing code").get_attribute("value") == code
    assert "#" not in phone.driver.current_url
    phone.axe()
    phone.shot("companion-pair")
    phone.click("Pair this phone")
    phone.wait_heading("Approve sign-ins")
    wait_for(lambda: "No sign-in is waiting for you" in phone.text(), what="the phone listening")
    assert "paired as \u201cWork phone\u201d" in phone.text()
    phone.axe()
    phone.shot("companion-waiting")
    with web.agent() as agent:
        user = agent.store.get_user("alice")
        (method,) = push.list_(agent.factors(), user.id)
    assert method.name == "Work phone" and method.confirmed
    # the private key never leaves the phone: not even this page's script can export it
    verdict = stored_private_key_is_extractable(phone)
    assert verdict.startswith("refused: InvalidAccessError extractable=false Ed25519"), verdict
    computer.open("/account/push")
    assert "Work phone" in computer.text() and "Paired" in computer.text()

    # sign in again with push: the computer shows the number, the phone does not
    number = sign_in_with_push(computer, "alice")
    computer.axe()
    computer.shot("companion-signin-number")
    seen(phone, "Is this you signing in?")
    shown = phone.text()
    assert "alice" in shown and "web browser" in shown
    assert not re.search(rf"(?<![\d.:]){number}(?![\d.:])", shown), shown
    hidden_too = phone.driver.execute_script(
        "return document.querySelector('main').textContent + ' ' + "
        "[...document.querySelectorAll('input')].map(i => i.value).join(' ')")
    assert not re.search(rf"(?<![\d.:]){number}(?![\d.:])", hidden_too), hidden_too
    phone.axe()
    phone.shot("companion-pending")
    # a typing slip is caught on the phone before anything is sent
    phone.fill("Number shown on the sign-in screen", "7").click("Approve")
    wait_for(lambda: phone.errors(), what="the error summary")
    assert phone.errors() == ["Enter the two-digit number shown on the sign-in screen"]
    assert phone.driver.title.startswith("Error: ")
    phone.axe()
    phone.fill("Number shown on the sign-in screen", str(number)).click("Approve")
    seen(phone, "You approved the sign-in")
    wait_for(lambda: computer.path.startswith("/account") and "sign-in" not in computer.path
             and computer._heading_or_none() not in ("Waiting for you to confirm", "Sign in"),
             what=f"signed in (at {computer.path})")
    assert [e.outcome for e in web.events("verify.push", "alice")][:1] == ["success"]

    # a wrong number refuses the sign-in
    number = sign_in_with_push(computer, "alice")
    seen(phone, "Is this you signing in?")
    wrong = 10 if number != 10 else 11
    phone.fill("Number shown on the sign-in screen", str(wrong)).click("Approve")
    seen(phone, "is not the one on the sign-in screen")
    wait_for(lambda: "not the one on this screen" in computer.text(), what="the computer told")
    computer.open("/account")
    assert computer.path.startswith("/account/sign-in"), computer.path
    assert web.events("verify.push", "alice")[0].outcome == "failure"


# --------------------------------------------------------------------------- attacks


@pytest.fixture
def http(web, web_server_dir) -> Http:
    return Http(web, web_server_dir)


def test_a_pairing_code_works_once_and_not_late(web, http, browser2):
    web.add_user("alice")
    code = new_code(web, "alice")
    first, second = Phone(http), Phone(http)
    assert first.pair(code)[0] == 200
    status, got = second.pair(code)
    assert status == 400 and got["message"] == pushpairing.MSG_BAD_CODE
    late = new_code(web, "alice", ttl=1)
    time.sleep(1.5)
    assert Phone(http).pair(late) == (400, {"ok": False, "message": pushpairing.MSG_BAD_CODE,
                                            "reason": None})
    # a phone never paired is told how to pair
    browser2.open("/companion")
    seen(browser2, "This phone is not paired yet")
    browser2.axe()
    browser2.shot("companion-not-paired")
    # the phone's page says the code is refused, in the error summary and beside the field
    browser2.open(f"/companion/pair#{code}")
    browser2.click("Pair this phone")
    wait_for(lambda: browser2.errors(), what="the error summary")
    assert browser2.errors() == [pushpairing.MSG_BAD_CODE]
    assert pushpairing.MSG_BAD_CODE in browser2.driver.find_element(
        "id", "pairing-code-error").text
    assert browser2.driver.title.startswith("Error: Pair this phone")
    browser2.axe()
    browser2.shot("companion-pair-refused")
    with web.agent() as agent:
        user = agent.store.get_user("alice")
        assert len(push.list_(agent.factors(), user.id)) == 1
    # newest first: the phone's page (the used row is gone once alice asked for a new code,
    # so "unknown"), the late code, the second phone
    assert [e.detail["why"] for e in web.events("push.pairing") if e.outcome == "refused"] \
        == ["unknown", "expired", "used"]


def test_streams_need_a_fresh_signature_of_a_paired_phone(web, http, browser):
    secret = web.add_user("alice", totp=True)
    browser.sign_in("alice", totp_secret=secret)  # (before the phone is paired: TOTP asked)
    phone = Phone(http)
    assert phone.pair(new_code(web, "alice"))[0] == 200
    request = start_push(web, "alice")
    good = phone.headers()
    status, text = phone.first_event(good)
    assert status == 200 and request.id in text
    event = json.loads(text.split("data: ", 1)[1])
    (listed,) = event["requests"]
    assert listed["id"] == request.id and listed["user"] == "alice"
    assert "number" not in listed and request.number not in listed.values()
    # replayed, another key, a bad time, no signature at all, another path's signature
    refusals = {
        "replay": good,
        "another key": phone.headers(key=Ed25519PrivateKey.generate()),
        "an old time": phone.headers(ms=int(time.time() * 1000) - 120_000),
        "unsigned": {},
        "another path": phone.headers(path="/companion/answer"),
    }
    for why, headers in refusals.items():
        status, body = phone.first_event(headers)
        assert status == 401, why
        assert "paired phone" in body or "signature" in body or "replay" in body \
            or "time" in body or "not paired" in body, (why, body)
    # the account's signed-in session cookie is no authority here
    cookies = "; ".join(f"{c['name']}={c['value']}" for c in browser.driver.get_cookies())
    assert phone.first_event({"Cookie": cookies})[0] == 401


def test_streams_per_phone_are_bounded(web, http):
    web.add_user("alice")
    phone = Phone(http)
    assert phone.pair(new_code(web, "alice"))[0] == 200
    held = [http.call("GET", "/companion/events", headers=phone.headers()) for _ in range(2)]
    try:
        assert [r.status for r in held] == [200, 200]
        status, body = phone.first_event(phone.headers())
        assert status == 429 and "Too many connections" in body
    finally:
        for r in held:
            r.close()
    # closed streams are given back
    wait_for(lambda: phone.first_event(phone.headers())[0] == 200, timeout=10,
             what="a stream after the others closed")


def test_a_phone_cannot_flood_the_server_with_answers(web, http):
    """Each refused answer is audited: the answers of one device are rate-limited, so the
    audit log cannot be filled through it."""
    from token_agent.web import companion

    web.add_user("alice")
    phone = Phone(http)
    assert phone.pair(new_code(web, "alice"))[0] == 200
    statuses = [phone.answer(f"no-such-request-{i}", 42)[0]
                for i in range(companion.CALL_LIMIT + 1)]
    assert set(statuses[:-1]) == {400} and statuses[-1] == 429
    refused = [e for e in web.events("push.answer") if e.outcome == "refused"]
    assert len(refused) == companion.CALL_LIMIT


def test_answers_must_be_signed_by_the_phone_the_request_went_to_and_count_once(web, http):
    web.add_user("alice")
    web.add_user("bob")
    alices, bobs = Phone(http), Phone(http)
    assert alices.pair(new_code(web, "alice"))[0] == 200
    assert bobs.pair(new_code(web, "bob"))[0] == 200
    request = start_push(web, "alice")
    # bob's phone (a real, paired device) cannot answer alice's request
    status, got = bobs.answer(request.id, request.number)
    assert status == 400 and "not the one the request was sent to" in got["message"]
    # a key claiming to be alice's phone
    status, got = alices.answer(request.id, request.number, key=Ed25519PrivateKey.generate())
    assert status == 400 and "signature does not verify" in got["message"]
    # malformed, and not JSON, and from another site
    assert http.json("POST", "/companion/answer", {"version": 1})[0] == 400
    assert http.call("POST", "/companion/answer", b"number=42",
                     headers={"Content-Type": "application/x-www-form-urlencoded"}).status == 415
    sig = alices.key.sign(push.answer_bytes(request.id, "approve", request.number))
    body = {"version": 1, "device_id": alices.device_id, "request_id": request.id,
            "decision": "approve", "number": request.number,
            "signature": base64.b64encode(sig).decode()}
    assert http.json("POST", "/companion/answer", body,
                     headers={"Origin": "https://evil.example"})[0] == 403
    assert request_state(web, request.id) == push.PENDING
    status, got = alices.answer(request.id, request.number)
    assert status == 200 and got["state"] == "approved"
    # the same signed answer again: refused, the request stays approved once
    status, got = http.json("POST", "/companion/answer", body)
    assert status == 400 and "already answered" in got["message"]
    assert request_state(web, request.id) == push.APPROVED
    refused = [e.detail.get("why") for e in web.events("push.answer") if e.outcome == "refused"]
    assert any("not the one" in (w or "") for w in refused)
    assert any("already answered" in (w or "") for w in refused)


def test_a_wrong_number_from_the_phone_is_a_refusal(web, http):
    web.add_user("alice")
    phone = Phone(http)
    assert phone.pair(new_code(web, "alice"))[0] == 200
    request = start_push(web, "alice")
    wrong = 10 if request.number != 10 else 11
    status, got = phone.answer(request.id, wrong)
    assert status == 200 and got["state"] == "wrong-number" and not got["ok"]
    assert request_state(web, request.id) == push.WRONG_NUMBER
    # and cannot be corrected afterwards
    assert phone.answer(request.id, request.number)[0] == 400
    assert request_state(web, request.id) == push.WRONG_NUMBER
    # "Deny" needs no number, and stops the sign-in
    denied = start_push(web, "alice")
    status, got = phone.answer(denied.id, None, "deny")
    assert status == 200 and got["state"] == "denied" and "IT service desk" in got["message"]
    assert request_state(web, denied.id) == push.DENIED


def test_pairing_needs_the_form_token_a_name_and_a_recent_sign_in(web, browser):
    secret = web.add_user("alice", totp=True)
    browser.sign_in("alice", totp_secret=secret)
    browser.open("/account/push")
    # the form without its CSRF token is refused
    browser.driver.execute_script(
        "document.querySelector(\"form[action='/account/push/pair'] input[name=csrf_token]\")"
        ".value = 'forged'")
    browser.fill("Name for the phone", "phone").click("Get a pairing code")
    wait_for(lambda: browser._heading_or_none() == "This form has expired", what="refusal")
    with web.agent() as agent, agent.store.connection("test") as conn:
        assert conn.execute("SELECT count(*) FROM push_pairings").fetchone()[0] == 0
    # a name left empty: the error summary and the field say so
    browser.open("/account/push")
    browser.fill("Name for the phone", "  ").click("Get a pairing code")
    wait_for(lambda: browser.errors(), what="the error summary")
    assert browser.errors() == ["Enter a name for the phone, for example \u201cMy phone\u201d"]
    assert browser.driver.title.startswith("Error: ")
    browser.axe()
    # a sign-in 6 minutes old (bind_minutes: 5) must be confirmed before a code is given
    with web.agent() as agent:
        with agent.store.transaction(), agent.store._using("age a sign-in") as conn:
            conn.execute("UPDATE web_sessions SET auth_at = auth_at - 360")
    browser.open("/account/push")
    browser.fill("Name for the phone", "phone").click("Get a pairing code")
    browser.wait_heading("Confirm it's you")
    with web.agent() as agent, agent.store.connection("test") as conn:
        assert conn.execute("SELECT count(*) FROM push_pairings").fetchone()[0] == 0
    browser.fill("Password", PASSWORD).click("Continue")
    wait_for(lambda: "authenticator app" in browser.text(), what="the second factor, again")
    browser.fill("Code from your authenticator app", fresh_totp(secret)).click("Continue")
    browser.wait_heading("Push approval on your phone")
    assert "you can now get a pairing code" in browser.text()
    browser.fill("Name for the phone", "phone").click("Get a pairing code")
    browser.wait_heading("Pair your phone")

