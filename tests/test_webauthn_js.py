"""webauthn.js in a real browser (headless Chromium with its virtual authenticator), against
the relying party of token_agent.browserkey, without the rest of the pages: a bare page
holds the form the way the templates do, and what the script posts is checked by the
library. The whole journeys on the real pages are in test_web_webauthn.py."""

from __future__ import annotations

import json
import shutil
import threading
import time
from html import escape
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

pytest.importorskip("selenium")
uvicorn = pytest.importorskip("uvicorn")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.virtual_authenticator import (  # noqa: E402
    Protocol, Transport, VirtualAuthenticatorOptions,
)
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import FileResponse, HTMLResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from conftest import free_port  # noqa: E402
from token_agent import browserkey  # noqa: E402
from token_agent.agent import Agent  # noqa: E402
from token_agent.outcome import Reason  # noqa: E402
from token_agent.policy import parse_policy  # noqa: E402
from token_agent.store import Store  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "token_agent" / "web" / "static" / "webauthn.js"
if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)


def page(mode: str, options: dict, fields: list[str], extra: str = "") -> str:
    hidden = "".join(f'<input type="hidden" name="{f}" value="">' for f in fields)
    start = ('<button type="button" id="go" data-webauthn-start>Use your key</button>'
             if mode == "get" else
             '<button type="submit" id="go" data-webauthn-start>Add the key</button>')
    return f"""<!DOCTYPE html><html lang="en-GB"><head><title>t</title>
<script src="/webauthn.js" defer></script></head><body>
<form method="post" action="/answer" data-webauthn="{mode}"
 data-webauthn-options="{escape(json.dumps(options))}">
{hidden}{extra}
<div data-webauthn-problem tabindex="-1" hidden><p id="problem" data-webauthn-problem-text></p></div>
<p id="nojs" data-webauthn-needs-js>needs JavaScript</p>
<div data-webauthn-controls hidden>{start}</div>
</form></body></html>"""


class Site:
    def __init__(self) -> None:
        self.html = ""
        self.answers: list[dict] = []
        self.port = free_port()

    @property
    def origin(self) -> str:
        return f"http://localhost:{self.port}"

    def app(self) -> Starlette:
        async def show(request):
            return HTMLResponse(self.html)

        async def answer(request):
            body = (await request.body()).decode()
            self.answers.append(dict(parse_qsl(body, keep_blank_values=True)))
            return HTMLResponse("<!DOCTYPE html><title>done</title><p id='done'>done</p>")

        async def script(request):
            return FileResponse(SCRIPT, media_type="text/javascript")

        return Starlette(routes=[Route("/", show), Route("/answer", answer, methods=["POST"]),
                                 Route("/webauthn.js", script)])


@pytest.fixture
def site():
    s = Site()
    server = uvicorn.Server(uvicorn.Config(s.app(), host="127.0.0.1", port=s.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield s
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def driver():
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    d = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")),
                         options=options)
    d.add_virtual_authenticator(VirtualAuthenticatorOptions(
        protocol=Protocol.CTAP2, transport=Transport.USB, has_resident_key=True,
        has_user_verification=True, is_user_verified=True))
    yield d
    d.quit()


@pytest.fixture
def agent(tmp_path):
    store = Store.open(tmp_path / "token-agent.db")
    a = Agent.open(store=store, policy=parse_policy(""), environ={})
    store.add_user("alice")
    yield a
    store.close()


def run(driver, site, html: str) -> dict:
    site.html = html
    before = len(site.answers)
    driver.get(site.origin + "/")
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "go").is_displayed())
    assert not driver.find_element(By.ID, "nojs").is_displayed()
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, 20).until(lambda d: len(site.answers) > before)
    return site.answers[-1]


REG_FIELDS = ["credential_id", "client_data_json", "attestation_object", "transports",
              "discoverable"]
GET_FIELDS = ["credential_id", "client_data_json", "authenticator_data", "signature",
              "user_handle"]


def test_the_script_enrols_a_key_and_signs_in_with_it(driver, site, agent):
    alice = agent.store.get_user("alice")
    options, state = browserkey.registration_options(agent, alice, "localhost")
    form = run(driver, site, page("create", options, REG_FIELDS,
                                  '<input name="name" value="blue key">'))
    assert form["discoverable"] == "true" and "usb" in form["transports"]
    enrolled = browserkey.finish_registration(agent, alice, state, form, site.origin,
                                              "localhost", name=form["name"])
    assert enrolled.user_verified and enrolled.discoverable

    options, state = browserkey.assertion_options(agent, "alice", "localhost")
    form = run(driver, site, page("get", options, GET_FIELDS))
    outcome = browserkey.finish_assertion(agent, "alice", state, form, site.origin, "localhost")
    assert outcome.ok and outcome.user == "alice" and outcome.multi_factor, outcome

    # usernameless: the passkey says who it is (its user handle is posted)
    options, state = browserkey.assertion_options(agent, None, "localhost")
    form = run(driver, site, page("get", options, GET_FIELDS))
    assert browserkey.unb64url(form["user_handle"]) == alice.user_handle
    assert browserkey.finish_assertion(agent, None, state, form, site.origin, "localhost").ok

    # the same answer again: the challenge was spent
    again = browserkey.finish_assertion(agent, None, state, form, site.origin, "localhost")
    assert not again.ok and again.reason is Reason.VERIFICATION_FAILED


def test_a_key_the_browser_does_not_hold_shows_a_problem_and_posts_nothing(driver, site, agent):
    options, _ = browserkey.assertion_options(agent, "nobody", "localhost")  # a decoy ID
    site.html = page("get", options, GET_FIELDS)
    driver.get(site.origin + "/")
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "go").is_displayed())
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "problem").is_displayed())
    assert "did not answer" in driver.find_element(By.ID, "problem").text
    assert driver.find_element(By.ID, "go").is_enabled()  # can try again
    assert site.answers == []
