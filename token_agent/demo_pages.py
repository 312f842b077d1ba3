"""Part four of the demonstration: the organisation's web pages.

The organisation's server (``token-agent server run``, its own process, a throwaway SQLite
store) serves the clinicians' self-service pages and the administrators' pages. Dr Alice
Smith (password and authenticator app) signs in through them with a plain HTTPS client that
trusts the organisation's CA: the sign-in page, its CSRF token, her password, the code her app
shows, then her account page with her methods. The addresses are printed; with
``--serve-pages`` the server then stays up for a browser until Ctrl-C.
"""

from __future__ import annotations

import html
import http.cookiejar
import os
import re
import shutil
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from .demo_organisation import START_TIMEOUT, _cli, _free_port, _start, _stop
from .demo_workstation import PASSWORD


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None


class _Browserless:
    """An HTTPS client with cookies that reads the pages' forms as a person would."""

    def __init__(self, base: str, ca_file: Path) -> None:
        self.base = base
        context = ssl.create_default_context(cafile=str(ca_file))
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context),
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect())

    def go(self, method: str, path: str, form: dict | None = None) -> tuple[int, str, str]:
        """(status, where it redirects or the path, the body); redirects are followed."""
        for _ in range(10):
            data = urllib.parse.urlencode(form).encode() if form is not None else None
            request = urllib.request.Request(self.base + path, data=data, method=method)
            try:
                with self.opener.open(request, timeout=30) as resp:
                    return resp.status, path, resp.read().decode()
            except urllib.error.HTTPError as e:
                if e.code in (302, 303):
                    path, method, form = e.headers["Location"], "GET", None
                    continue
                return e.code, path, e.read().decode()
        raise RuntimeError(f"too many redirects at {path}")


def _csrf(body: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', body).group(1)


def _turn(body: str) -> str:
    return re.search(r'name="turn" value="(\d+)"', body).group(1)


def _text(body: str) -> str:
    main = re.search(r"<main.*?</main>", body, re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", main.group(0)))).strip()


def pages_demo(say: Callable[[str], None], check: Callable[[bool, str], None], step: int = 11,
               serve: bool = False) -> None:
    import pyotp

    from .agent import Agent
    from .factors import password, totp

    say(f"{step}. the organisation's web pages: a clinician signs in to her account")
    tmp = Path(tempfile.mkdtemp(prefix="token-agent-demo-pages-"))
    os.chmod(tmp, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_AGENT_")}
    env["PYTHONUNBUFFERED"] = "1"
    server = None
    try:
        data, server_dir = tmp / "org", tmp / "org" / "server"
        data.mkdir(mode=0o700)
        port = _free_port()
        origin = f"https://localhost:{port}"
        config = tmp / "server.toml"
        config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\ndir = "{server_dir}"\n'
                          f'[store]\ndata_dir = "{data}"\n[web]\npublic_url = "{origin}"\n'
                          '[logging]\nlevel = "warning"\n')
        _cli(env, config, "server", "init", "--dir", str(server_dir))
        agent = Agent.open(data, environ={})
        try:
            alice = agent.store.add_user("alice", display_name="Dr Alice Smith",
                                         roles=["admin"])
            password.set_password(agent.factors(), alice.id, PASSWORD)
            pending = totp.begin_enrol(agent.factors(), alice.id)
            app = pyotp.TOTP(pending.secret)
            check(totp.confirm_enrol(agent.factors(), alice.id, app.at(time.time() - 30)).ok,
                  "Dr Alice Smith: a password and an authenticator app (and the admin role)")
        finally:
            agent.close()
        server = _start(["--config", str(config), "server", "run"], env, tmp / "server.log")
        client = _Browserless(origin, server_dir / "ca.pem")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                status, _, body = client.go("GET", "/account/sign-in")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start: " + (tmp / "server.log")
                                       .read_text(errors="replace")[-2000:]) from None
                time.sleep(0.1)
        check(status == 200 and "Sign in" in body,
              f"the pages are served over TLS at {origin}/account/sign-in")
        started = time.monotonic()
        status, where, body = client.go("POST", "/account/sign-in", {
            "csrf_token": _csrf(body), "username": "alice", "password": PASSWORD,
            "action": "password", "next": "/account"})
        check("Code from your authenticator app" in body,
              "her password is right: the policy asks for her authenticator app's code")
        status, where, body = client.go("POST", "/account/sign-in/step", {
            "csrf_token": _csrf(body), "turn": _turn(body), "answer": app.now()})
        elapsed = (time.monotonic() - started) * 1000
        check(where == "/account" and "Your account" in body,
              f"signed in with the code her app shows, in {elapsed:.0f} ms: her account page")
        rows = re.findall(r"<tr class=\"nhsuk-table__row\">(.*?)</tr>", body, re.S)
        shown = []
        for row in rows:
            cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)
            if cells and "<td" in row:
                name = _text(f"<main>{cells[0]}</main>")
                shown.append(name + (" (preferred)" if "Preferred" in row else ""))
        say("   her methods on the page: " + "; ".join(shown))
        say(f"   the pages: {origin}/account (self-service) and {origin}/admin")
        if serve:  # a person at the browser needs them; the demonstration's output has none
            say(f"   sign in as alice, password {PASSWORD!r}, authenticator key "
                f"{pending.secret}")
            say("   serving the pages until Ctrl-C (open the address above in a browser that "
                f"trusts {server_dir / 'ca.pem'}) ...")
            try:
                while server.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                say("   stopped (Ctrl-C)")
    finally:
        _stop(server)
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["pages_demo"]

if __name__ == "__main__":  # pragma: no cover  (python -m token_agent.demo_pages)
    pages_demo(print, lambda ok, what: print(("ok  " if ok else "FAIL") + " " + what),
               serve="--serve-pages" in sys.argv)
