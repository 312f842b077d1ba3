"""The pages' tests: a real organisation server (`token-agent server run`, a process of its
own, real TLS) on a real PostgreSQL store, driven by a real browser (Debian's chromium through
chromedriver, headless, via Selenium) that trusts the organisation's CA as a trust's managed
browsers do (an NSS database made with certutil), with a real SMTP server and an HTTP SMS and
voice gateway recording what they are sent.

    def test_x(web, browser):                       # fixtures (conftest imports them)
        secret = web.add_user("alice", password=PASSWORD, totp=True)
        page = browser                              # a Page over a new browser profile
        page.sign_in("alice", PASSWORD, totp_secret=secret)
        page.open("/account"); assert page.heading() == "Your account"
        page.axe()                                  # zero serious or critical violations
        page.shot("account-home")                   # .cache/screenshots/account-home.png

``browser2`` is a second, independent browser (the phone of the push companion). The CA and
TLS files are made once per test session and shared by every server (each test still gets its
own database and server process).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyotp
import pytest

from conftest import REPO_ROOT, free_port
from orgtest import OrgServer, init_server_dir, start_org_server
from test_codes import HttpGatewayServer

PASSWORD = "correct horse battery staple"
SCREENSHOTS = REPO_ROOT / ".cache" / "screenshots"
AXE = REPO_ROOT / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: axe-core impacts that fail a test
FAILING_IMPACTS = ("serious", "critical")


# --------------------------------------------------------------------------- message sinks

class SmtpSink:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 keeping every mail."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.mails: list[email.message.EmailMessage] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        mail = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._lock:
            self.mails.append(mail)
        return "250 OK"

    def to(self, address: str) -> list[str]:
        with self._lock:
            return [m.get_body(preferencelist=("plain",)).get_content() for m in self.mails
                    if address.lower() in str(m["To"]).lower()]

    def close(self) -> None:
        self.controller.stop()


class Gateway(HttpGatewayServer):
    """An HTTP SMS and voice gateway on 127.0.0.1 (the JSON API of token_agent.delivery's
    HTTP gateway, ``test_codes``'s), keeping every request."""

    def to(self, number: str) -> list[dict]:
        return [r for r in list(self.requests) if r.get("to") == number]


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def code_in(text: str) -> str:
    return re.search(r"(?<![\d])(\d{6})(?![\d])", text).group(1)


# --------------------------------------------------------------------------- the server

@dataclass
class WebServer:
    org: OrgServer
    port: int
    base: Path
    pg_url: str
    policy: Path
    smtp: SmtpSink
    gateway: Gateway
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @contextlib.contextmanager
    def agent(self) -> Iterator[Any]:
        """An Agent on the server's store, with its key file and policy (the tests' own
        set-up and checks, as the administrator's library)."""
        from token_agent.agent import Agent
        from token_agent.datadir import DataDir

        agent = Agent.open(where=DataDir(self.base / "data", "test", self.pg_url, "test"),
                           policy_path=self.policy)
        try:
            yield agent
        finally:
            agent.close()

    def add_user(self, name: str, *, password: str | None = PASSWORD, totp: bool = False,
                 roles: tuple[str, ...] = (), user_class: str = "internal",
                 mobile: str | None = None, email_address: str | None = None) -> str | None:
        """A user made with the library; returns the TOTP secret when ``totp``."""
        from token_agent.factors import codes
        from token_agent.factors import password as password_factor
        from token_agent.factors import totp as totp_factor

        secret = None
        with self.agent() as agent:
            ctx = agent.factors()
            user = agent.store.add_user(name, roles=list(roles), user_class=user_class,
                                        mfa_enabled=True)
            if password:
                password_factor.set_password(ctx, user.id, password)
            if totp:
                pending = totp_factor.begin_enrol(ctx, user.id)
                secret = pending.secret
                # the previous step's code (inside the factor's window): the current step's
                # stays unused for the sign-in that follows
                left = 30 - time.time() % 30
                if left < 2:  # not at a step's end: the code must still be the previous one's
                    time.sleep(left + 0.05)
                earlier = pyotp.TOTP(secret).at(time.time() - 30)
                _USED.setdefault(secret, set()).add(earlier)
                assert totp_factor.confirm_enrol(ctx, user.id, earlier).ok
            for channel, destination in (("sms", mobile), ("email", email_address)):
                if destination:
                    sent = len(self.gateway.requests) + len(self.smtp.mails)
                    codes.add_contact(ctx, user.id, channel, destination)
                    wait_for(lambda: len(self.gateway.requests) + len(self.smtp.mails) > sent,
                             what="the enrolment code")
                    text = (self.gateway.requests[-1]["text"] if channel == "sms"
                            else self.smtp.to(destination)[-1])
                    assert codes.confirm_contact(ctx, user.id, channel, code_in(text)).ok
        return secret

    def sms_to(self, number: str) -> list[str]:
        return [r.get("text") or r.get("say") or "" for r in self.gateway.to(number)]

    def mail_to(self, address: str) -> list[str]:
        return self.smtp.to(address)

    def events(self, kind: str, username: str | None = None) -> list[Any]:
        """The audit events of ``kind`` (of ``username``), newest first."""
        with self.agent() as agent:
            found = agent.store.list_events(kind=kind, limit=1000)
        return [e for e in found if username is None or e.username == username]


def policy_text(smtp: SmtpSink, gateway: Gateway, extra: str = "") -> str:
    return (f"{extra}\n"
            '[delivery]\nsender_name = "NHS Trust"\n'
            f'[delivery.email]\ngateway = "smtp"\nhost = "127.0.0.1"\nport = {smtp.port}\n'
            'security = "none"\nfrom = "NHS Trust <security@trust.nhs.example>"\n'
            f'[delivery.sms]\nurl = "{gateway.url}"\ntimeout = 5\n'
            f'[delivery.voice]\nurl = "{gateway.url}"\ntimeout = 5\n'
            "[codes]\nresend_seconds = 0\n")


def start_web(base: Path, pg_url: str, server_dir: Path, *, policy_extra: str = "",
              config_extra: str = "") -> WebServer:
    smtp, gateway = SmtpSink(), Gateway()
    base.mkdir(parents=True, exist_ok=True)
    policy = base / "policy.toml"
    policy.write_text(policy_text(smtp, gateway, policy_extra))
    port = free_port()
    org = start_org_server(base, pg_url, server_dir=server_dir, port=port,
                           extra_config=f'[policy]\nfile = "{policy}"\n'
                                        f'[web]\npublic_url = "https://localhost:{port}"\n'
                                        f"{config_extra}")
    return WebServer(org, port, base, pg_url, policy, smtp, gateway)


@pytest.fixture(scope="session")
def web_server_dir(tmp_path_factory) -> Path:
    """The CA and TLS files every pages' server of the session shares (for localhost)."""
    return init_server_dir(tmp_path_factory.mktemp("web-ca") / "server", "localhost",
                           "127.0.0.1")


@pytest.fixture
def web(tmp_path, pg_url, web_server_dir) -> Iterator[WebServer]:
    server = start_web(tmp_path / "web", pg_url, web_server_dir)
    yield server
    server.org.stop()
    server.smtp.close()
    server.gateway.close()


# --------------------------------------------------------------------------- the browser

@pytest.fixture(scope="session")
def browser_home(web_server_dir, tmp_path_factory) -> Path:
    """A HOME whose NSS database trusts the organisation's CA (Chromium on Linux reads
    ~/.pki/nssdb): the browser trusts the server's certificate like a managed browser."""
    for tool in (CHROMIUM, CHROMEDRIVER, shutil.which("certutil")):
        if not tool or not Path(tool).exists():
            pytest.fail(f"{tool or 'certutil'} is missing: run scripts/setup.sh (Debian "
                        "chromium, chromium-driver, libnss3-tools)", pytrace=False)
    home = tmp_path_factory.mktemp("browser-home")
    nss = home / ".pki" / "nssdb"
    nss.mkdir(parents=True)
    subprocess.run(["certutil", "-d", f"sql:{nss}", "-N", "--empty-password"], check=True)
    subprocess.run(["certutil", "-d", f"sql:{nss}", "-A", "-t", "C,,", "-n",
                    "token-agent test organisation", "-i", str(web_server_dir / "ca.pem")],
                   check=True)
    return home


class Page:
    """A browser (Selenium WebDriver over Debian's chromium) with the pages' vocabulary."""

    def __init__(self, driver: Any, web: WebServer | None) -> None:
        self.driver = driver
        self.web = web

    # ---- navigation
    def open(self, path: str) -> "Page":
        self.driver.get(self.web.url + path)
        return self

    @property
    def path(self) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(self.driver.current_url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def heading(self, timeout: float = 10.0) -> str:
        """The page's h1 (waits for one while the page is changing)."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.driver.find_element(By.TAG_NAME, "h1").text.strip()
            except WebDriverException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def text(self) -> str:
        """The main part's text ("" while the page is changing)."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        try:
            return self.driver.find_element(By.TAG_NAME, "main").text
        except WebDriverException:
            return ""

    def errors(self) -> list[str]:
        """The error summary's lines ([] while the page is changing)."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        try:
            return [e.text for e in self.driver.find_elements(
                By.CSS_SELECTOR, ".nhsuk-error-summary__list li")]
        except WebDriverException:
            return []

    # ---- forms
    def field(self, label: str) -> Any:
        """The input labelled ``label`` (exact label text, or its start)."""
        from selenium.webdriver.common.by import By

        for lab in self.driver.find_elements(By.TAG_NAME, "label"):
            text = lab.text.strip()
            if text == label or text.startswith(label):
                target = lab.get_attribute("for")
                if target:
                    return self.driver.find_element(By.ID, target)
        raise AssertionError(f"no field labelled {label!r} on {self.path}: {self.text()[:500]}")

    def fill(self, label: str, value: str) -> "Page":
        element = self.field(label)
        element.clear()
        element.send_keys(value)
        return self

    def choose(self, label: str) -> "Page":
        self.field(label).click()
        return self

    def click(self, text: str) -> "Page":
        """Click the button (or link) whose visible text is ``text``."""
        from selenium.webdriver.common.by import By

        for tag in ("button", "a", "input"):
            for element in self.driver.find_elements(By.TAG_NAME, tag):
                shown = (element.text or element.get_attribute("value") or "").strip()
                if shown == text and element.is_displayed():
                    element.click()
                    return self
        raise AssertionError(f"no button or link {text!r} on {self.path}: {self.text()[:500]}")

    def wait_heading(self, heading: str, timeout: float = 20.0) -> "Page":
        wait_for(lambda: self._heading_or_none() == heading, timeout,
                 f"the page {heading!r} (now {self._heading_or_none()!r} at {self.path})")
        return self

    def _heading_or_none(self) -> str | None:
        try:
            return self.heading(timeout=0)
        except Exception:  # noqa: BLE001
            return None

    # ---- journeys' common steps
    def sign_in(self, username: str, password: str = PASSWORD, *,
                totp_secret: str | None = None) -> "Page":
        """Sign in with the password and, when the policy asks, the authenticator app."""
        self.open("/account/sign-in")
        self.fill("User name", username).fill("Password", password).click("Sign in")
        if totp_secret is not None:
            wait_for(lambda: "authenticator app" in self.text() or self.path.startswith(
                "/account") and self._heading_or_none() != "Sign in", what="the code question")
            if self._radio("authenticator app"):  # several second factors: the app, chosen
                self.click("Continue")
                wait_for(lambda: "Code from your authenticator app" in self.text(),
                         what="the code question")
            if "authenticator app" in self.text():
                self.fill("Code from your authenticator app", fresh_totp(totp_secret))
                self.click("Continue")
        wait_for(lambda: self._heading_or_none() not in (None, "Sign in",
                                                         "Waiting for you to confirm")
                 and not self.path.startswith("/account/sign-in"),
                 what=f"signed in (at {self.path}: {self._heading_or_none()})")
        return self

    def _radio(self, label_start: str) -> bool:
        """Choose the radio whose label starts with ``label_start`` (any case), if any."""
        from selenium.webdriver.common.by import By

        for lab in self.driver.find_elements(By.CSS_SELECTOR, "label.nhsuk-radios__label"):
            if lab.text.strip().lower().startswith(label_start.lower()):
                lab.click()
                return True
        return False

    def cookie(self, name: str) -> str | None:
        found = self.driver.get_cookie(name)
        return found["value"] if found else None

    # ---- checks
    def axe(self) -> list[dict]:
        """Run axe-core (npm axe-core) in the page: fails on serious or critical violations;
        returns every violation found."""
        source = AXE.read_text()
        self.driver.execute_script(source)
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {runOnly: {type: 'tag', values: "
            "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'wcag22aa']}})"
            ".then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, "
            "help: v.help, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}))))"
            ".catch(e => done([{id: 'axe-error', impact: 'critical', help: String(e), "
            "nodes: []}]));")
        bad = [v for v in result if v["impact"] in FAILING_IMPACTS]
        assert not bad, f"accessibility violations on {self.path}: {json.dumps(bad, indent=1)}"
        return result

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        height = self.driver.execute_script("return document.body.scrollHeight")
        self.driver.set_window_size(1024, max(700, min(int(height) + 40, 2400)))
        self.driver.save_screenshot(str(path))
        return path


def fresh_totp(secret: str) -> str:
    """A code of the current step, waiting out the last second of a step (so that it is still
    valid when it arrives) and never one already used (the factor refuses replays)."""
    totp = pyotp.TOTP(secret)
    used = _USED.setdefault(secret, set())
    while True:
        left = 30 - time.time() % 30
        if left < 2:
            time.sleep(left + 0.05)
            continue
        code = totp.now()
        if code not in used:
            used.add(code)
            return code
        time.sleep(left + 0.05)


_USED: dict[str, set[str]] = {}


def new_driver(home: Path, *, user_data: Path | None = None) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = user_data or Path(tempfile.mkdtemp(prefix="token-agent-chromium-"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic",
                "--window-size=1024,800", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "en_GB.UTF-8"}
    service = Service(executable_path=CHROMEDRIVER, env=env)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    driver._token_agent_profile = profile
    return driver


def close_driver(driver: Any) -> None:
    with contextlib.suppress(Exception):
        driver.quit()
    shutil.rmtree(driver._token_agent_profile, ignore_errors=True)


@pytest.fixture
def browser(browser_home, web) -> Iterator[Page]:
    driver = new_driver(browser_home)
    try:
        yield Page(driver, web)
    finally:
        close_driver(driver)


@pytest.fixture
def browser2(browser_home, web) -> Iterator[Page]:
    """A second browser of its own (the phone of the push companion)."""
    driver = new_driver(browser_home)
    try:
        yield Page(driver, web)
    finally:
        close_driver(driver)
