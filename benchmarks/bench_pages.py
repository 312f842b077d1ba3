"""Benchmark: from the sign-in form to "App enrolled", on the browser's clock (issue 16).

    .venv/bin/python benchmarks/bench_pages.py [--runs 5] [--json]

Set-up (the pages' test harness, tests/webtest.py): a throwaway PostgreSQL 15 cluster
(tests/pgserver.py), the organisation's server with its pages (``token-agent server run``,
real TLS, its CA trusted by the browser through an NSS database), and Debian's chromium
through chromedriver, headless, a new profile per run.

Each run is a new clinician with a password and an authenticator app, doing what a person
does: the sign-in form (user name, password), the app's code, "Add an authenticator app", a
name, the QR code's key into ``oathtool --totp`` (the real binary, as the app), "Confirm app".
The time runs from ``Date.now()`` just before the sign-in form is submitted to
``performance.timeOrigin + loadEventEnd`` of the "App enrolled" page: the browser's own
clock. Also reported: the part of it the browser spent loading the five pages (their
navigation entries), the rest being the typing (Selenium) and oathtool.

No target is set by the issue; the figure is reported in the README.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

NAV_MS = ("const nav = performance.getEntriesByType('navigation')[0];"
          "return nav.loadEventEnd - nav.startTime;")


def trusting_home(base: Path, ca: Path) -> Path:
    home = base / "home"
    nss = home / ".pki" / "nssdb"
    nss.mkdir(parents=True)
    subprocess.run(["certutil", "-d", f"sql:{nss}", "-N", "--empty-password"], check=True)
    subprocess.run(["certutil", "-d", f"sql:{nss}", "-A", "-t", "C,,", "-n", "organisation",
                    "-i", str(ca)], check=True)
    return home


def one_run(web, home: Path, username: str) -> dict:
    from selenium.webdriver.common.by import By

    from webtest import PASSWORD, Page, close_driver, fresh_totp, new_driver, wait_for

    secret = web.add_user(username, totp=True)
    driver = new_driver(home)
    try:
        page = Page(driver, web)
        page.open("/account/sign-in")
        page.fill("User name", username).fill("Password", PASSWORD)
        code = fresh_totp(secret)  # waited for (at a step's end) before the clock starts
        loads = []
        started = driver.execute_script("return Date.now()")
        page.click("Sign in")
        wait_for(lambda: "authenticator app" in page.text(), what="the second factor")
        loads.append(driver.execute_script(NAV_MS))
        page.fill("Code from your authenticator app", code).click("Continue")
        wait_for(lambda: page.path == "/account", what="the account page")
        loads.append(driver.execute_script(NAV_MS))
        page.click("Add an authenticator app")
        page.wait_heading("Add an authenticator app")
        loads.append(driver.execute_script(NAV_MS))
        page.fill("Name for this app", "work phone").click("Continue")
        page.wait_heading("Scan the QR code with your authenticator app")
        loads.append(driver.execute_script(NAV_MS))
        key = driver.find_element(By.CSS_SELECTOR, "#secret").text.replace(" ", "")
        typed = subprocess.run(["oathtool", "--totp", "-b", key], capture_output=True,
                               text=True, check=True).stdout.strip()
        page.fill("Code from your authenticator app", typed).click("Confirm app")
        page.wait_heading("App enrolled")
        finished = driver.execute_script(
            "const nav = performance.getEntriesByType('navigation')[0];"
            "return performance.timeOrigin + nav.loadEventEnd;")
        loads.append(driver.execute_script(NAV_MS))
    finally:
        close_driver(driver)
    return {"seconds": (finished - started) / 1000.0, "page_loads_ms": loads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import conftest  # noqa: F401  (first: the tests' helpers import each other through it)
    from orgtest import init_server_dir
    from pgserver import PgServer
    from webtest import start_web

    base = Path(tempfile.mkdtemp(prefix="token-agent-bench-pages-"))
    base.chmod(0o711)
    pg = web = None
    try:
        pg = PgServer.start(base / "pg")
        url = pg.create_database("bench_pages")
        server_dir = init_server_dir(base / "ca" / "server", "localhost", "127.0.0.1")
        web = start_web(base / "web", url, server_dir)
        home = trusting_home(base, server_dir / "ca.pem")
        runs = [one_run(web, home, f"clinician{i:02d}") for i in range(args.runs)]
    finally:
        if web is not None:
            web.org.stop()
            web.smtp.close()
            web.gateway.close()
        if pg is not None:
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    seconds = [r["seconds"] for r in runs]
    loads = [sum(r["page_loads_ms"]) / 1000.0 for r in runs]
    result = {"runs": len(runs), "seconds": seconds,
              "median_s": statistics.median(seconds), "min_s": min(seconds),
              "max_s": max(seconds), "page_loads_median_s": statistics.median(loads),
              "per_page_ms_first_run": runs[0]["page_loads_ms"],
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"sign-in form -> 'App enrolled', {len(runs)} runs, on the browser's clock: "
              f"median {result['median_s']:.2f} s (min {result['min_s']:.2f}, max "
              f"{result['max_s']:.2f}); of which loading the five pages: median "
              f"{result['page_loads_median_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
