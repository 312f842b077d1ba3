"""Conformance: python-fido2's own device test suite against the virtual key.

python-fido2 ships a suite for real authenticators in its source distribution
(``tests/device``); scripts/setup.sh downloads and unpacks that sdist into
``.cache/fido2-sdist/fido2-<installed version>/``. Here a fresh virtual key runs as its own
process (``token-agent sim key serve --presence manual``); the suite runs in a subprocess
with ``tests/conformance/fido2_device_plugin.py`` replacing python-fido2's HID discovery by
the key's socket, and with ``--controller`` pointing at the key's control interface, which
serves the suite's touch and power paths (``/usb0/touch/on|off``, ``/usb0/power/on|off``).

The test passes only if every test of the suite passes or is skipped for a reason in
:data:`ALLOWED_SKIPS`: a feature the virtual key honestly does not claim in getInfo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = REPO_ROOT / "tests" / "conformance"
SUITE_TIMEOUT = 20 * 60  # seconds

#: Skip reasons (prefixes of the suite's skip messages) that are honest: the virtual key does
#: not claim the feature in authenticatorGetInfo, so the suite does not test it.
#: Anything else skipped is a failure: ES256 and EdDSA, PIN/UV protocols 1 and 2, ClientPIN,
#: credential management (with update), authenticatorConfig (alwaysUv, minPinLength),
#: hmac-secret / prf, permissions and factory reset are all claimed and must be tested.
ALLOWED_SKIPS: dict[str, str] = {
    "CredBlob not supported by authenticator": "no credBlob extension",
    "BioEnrollment not supported by authenticator": "no biometric sensor",
    "thirdPartyPayment not supported by authenticator": "no thirdPartyPayment extension",
    "previewSign not supported by authenticator": "no previewSign extension (draft)",
    "ARKG support requires cryptography 45 or later": "host library too old (not the key)",
    "Enterprise Attestation not supported": "no enterprise attestation (ep)",
    "No RP ID provided with --ep-rp-id": "enterprise attestation not run (no --ep-rp-id)",
    "Persistent PUAT not supported": "no persistent pinUvAuthToken (perCredMgmtRO)",
    "hmac-secret-mc not supported by authenticator": "no hmac-secret-mc (CTAP 2.2)",
    # COSE algorithms python-fido2 knows but the key does not claim (it claims ES256, EdDSA).
    **{
        f"Algorithm {name} not supported": f"{name} not claimed (ES256 and EdDSA only)"
        for name in ("ES384", "ES512", "PS256", "RS256", "ES256K", "ESP256", "ESP384",
                     "ESP512", "Ed25519", "Ed448", "MLDSA44", "MLDSA65", "MLDSA87")
    },  # fmt: skip
}


@dataclass
class SuiteResult:
    passed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (test id, message)
    errors: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (test id, reason)

    @property
    def total(self) -> int:
        return len(self.passed) + len(self.failed) + len(self.errors) + len(self.skipped)

    def unexplained_skips(self, allowed: dict[str, str] = ALLOWED_SKIPS) -> list[tuple[str, str]]:
        return [(t, r) for t, r in self.skipped if not allowed_skip(r, allowed)]

    def problems(self, allowed: dict[str, str] = ALLOWED_SKIPS) -> list[str]:
        """Everything that makes the conformance run a failure, one line each."""
        out = [f"FAILED {t}: {m}" for t, m in self.failed]
        out += [f"ERROR {t}: {m}" for t, m in self.errors]
        out += [f"SKIPPED (not allowed) {t}: {r}" for t, r in self.unexplained_skips(allowed)]
        if not self.passed:
            out.append("no test passed")
        return out

    def summary(self) -> str:
        allowed = len(self.skipped) - len(self.unexplained_skips())
        return (
            f"{len(self.passed)} passed, {len(self.skipped)} skipped ({allowed} allowed), "
            f"{len(self.failed)} failed, {len(self.errors)} errors, {self.total} in all"
        )


def allowed_skip(reason: str, allowed: dict[str, str] = ALLOWED_SKIPS) -> bool:
    reason = reason.strip()
    if reason.startswith("Skipped: "):
        reason = reason[len("Skipped: ") :]
    return any(reason.startswith(prefix) for prefix in allowed)


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def parse_junit(path: Path) -> SuiteResult:
    """Read a pytest ``--junitxml`` report (one ``testcase`` per test, with a ``failure``,
    ``error`` or ``skipped`` child when it did not simply pass)."""
    result = SuiteResult()
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        classname = case.get("classname", "")
        test_id = f"{classname}::{case.get('name', '?')}" if classname else case.get("name", "?")
        failures = case.findall("failure")
        errors = case.findall("error")
        skips = case.findall("skipped")
        for el in failures:
            result.failed.append((test_id, el.get("message") or _first_line(el.text)))
        for el in errors:
            result.errors.append((test_id, el.get("message") or _first_line(el.text)))
        if failures or errors:
            continue
        if skips:
            el = skips[0]
            reason = el.get("message") or _first_line(el.text)
            if el.get("type") == "pytest.xfail":
                reason = f"xfail: {reason}"
            result.skipped.append((test_id, reason))
        else:
            result.passed.append(test_id)
    return result


def fido2_sdist_root() -> Path:
    override = os.environ.get("TOKEN_AGENT_FIDO2_SDIST")
    if override:
        return Path(override)
    return REPO_ROOT / ".cache" / "fido2-sdist" / f"fido2-{version('fido2')}"


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- the conformance run ---------------------------------------------------------------------


def test_fido2_device_suite(sim_key_factory, tmp_path, capsys, record_property):
    sdist = fido2_sdist_root()
    suite = sdist / "tests" / "device"
    if not (suite / "conftest.py").is_file():
        pytest.fail(
            f"python-fido2's device suite is missing ({suite}): run scripts/test.sh, which "
            "runs scripts/setup.sh and fetches the fido2 sdist",
            pytrace=False,
        )

    key = sim_key_factory(presence="manual", state=tmp_path / "key.json")
    report = tmp_path / "report.xml"
    log = tmp_path / "suite.log"
    command = [
        sys.executable, "-m", "pytest", str(suite),
        "-p", "fido2_device_plugin",
        "--controller", key.control_url,
        "--pico-port", "0",
        "-p", "no:cacheprovider",
        f"--junitxml={report}",
        "-q", "-rfEs",
        f"--rootdir={sdist}",
        "-c", str(sdist / "pyproject.toml"),
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PLUGIN_DIR), str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["TOKEN_AGENT_CONFORMANCE_KEY"] = key.address
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("PYTEST_ADDOPTS", None)

    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=sdist,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(SUITE_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    elapsed = time.monotonic() - started
    output = log.read_text(errors="replace")

    def fail(why: str) -> None:
        pytest.fail(
            f"{why}\ncommand: {' '.join(command)}\n"
            f"--- last lines of the suite's output ---\n{_tail(output)}",
            pytrace=False,
        )

    if rc is None:
        fail(f"the fido2 device suite did not finish within {SUITE_TIMEOUT} s")
    if not report.is_file():
        fail(f"the fido2 device suite wrote no junit report (exit code {rc})")
    result = parse_junit(report)
    summary = f"fido2 {version('fido2')} device suite vs virtual key: {result.summary()}, {elapsed:.0f} s"
    record_property("fido2_conformance", summary)
    with capsys.disabled():
        print(f"\n{summary}")

    problems = result.problems()
    if rc not in (0, 1) and not problems:
        problems.append(f"pytest exit code {rc} (interrupted, usage error or no tests)")
    if problems:
        fail(f"{summary}\n" + "\n".join(problems))
    assert rc == 0, f"suite exit code {rc} although the report shows no problem"


# --- the report parser and the allow-list --------------------------------------------------------

SYNTHETIC = """\
<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="3" tests="6">
<testcase classname="tests.device.test_info" name="test_get_info" time="0.1"/>
<testcase classname="tests.device.test_ctap2" name="test_mc[ES256]" time="0.1">
  <failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.device.test_credman" name="test_list" time="0.1">
  <error message="failed on setup with &quot;CtapError&quot;">trace</error></testcase>
<testcase classname="tests.device.test_credblob" name="test_read" time="0">
  <skipped type="pytest.skip" message="CredBlob not supported by authenticator">x.py:19: CredBlob not supported by authenticator</skipped></testcase>
<testcase classname="tests.device.conftest" name="test_alg[ES384]" time="0">
  <skipped type="pytest.skip" message="Algorithm ES384 not supported">x.py:396: Algorithm ES384 not supported</skipped></testcase>
<testcase classname="tests.device.test_config" name="test_always_uv" time="0">
  <skipped type="pytest.skip" message="AlwaysUv not supported">x.py:35: AlwaysUv not supported</skipped></testcase>
</testsuite></testsuites>
"""


def test_parse_junit_synthetic(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(SYNTHETIC)
    r = parse_junit(path)
    assert r.passed == ["tests.device.test_info::test_get_info"]
    assert r.failed == [("tests.device.test_ctap2::test_mc[ES256]", "assert 1 == 2")]
    assert r.errors == [("tests.device.test_credman::test_list", 'failed on setup with "CtapError"')]
    assert [t for t, _ in r.skipped] == [
        "tests.device.test_credblob::test_read",
        "tests.device.conftest::test_alg[ES384]",
        "tests.device.test_config::test_always_uv",
    ]
    assert r.unexplained_skips() == [("tests.device.test_config::test_always_uv", "AlwaysUv not supported")]
    problems = r.problems()
    assert len(problems) == 3
    assert problems[0].startswith("FAILED tests.device.test_ctap2::test_mc[ES256]")
    assert problems[1].startswith("ERROR tests.device.test_credman::test_list")
    assert problems[2].startswith("SKIPPED (not allowed) tests.device.test_config::test_always_uv")
    assert r.summary() == "1 passed, 3 skipped (2 allowed), 1 failed, 1 errors, 6 in all"


def test_allow_list_is_honest():
    # what the key claims must never be skippable
    for reason in (
        "Algorithm ES256 not supported",
        "Algorithm EdDSA not supported",
        "PIN/UV protocol 1 not supported",
        "PIN/UV protocol 2 not supported",
        "ClientPin not supported by authenticator",
        "CredentialManagement not supported by authenticator",
        "ClientPin update not supported",
        "Config not supported by authenticator",
        "AlwaysUv not supported",
        "Cannot increase min PIN length further",
        "hmac-secret not supported by authenticator",
        "LargeBlobs not supported by authenticator",
        "Permissions not supported",
        "Requires factory reset",
        "Authenticator does not support CTAP 2",
        "Device is not a CtapHidDevice",
        "UV already configured",
        "Skip device tests",
    ):
        assert not allowed_skip(reason), reason
    assert allowed_skip("Algorithm ES384 not supported")
    assert allowed_skip("Skipped: CredBlob not supported by authenticator")
    assert not allowed_skip("no test passed")


def test_parse_junit_from_real_pytest(tmp_path):
    """The parser reads what this pytest version really writes."""
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.fixture
            def broken():
                raise RuntimeError("setup broke")

            @pytest.fixture(params=["ES256", "RS256"])
            def alg(request):
                if request.param != "ES256":
                    pytest.skip(f"Algorithm {request.param} not supported")
                return request.param

            def test_ok(alg):
                pass

            def test_fails():
                assert 1 == 2

            def test_error(broken):
                pass

            def test_skip_bad():
                pytest.skip("AlwaysUv not supported")
            """
        )
    )
    report = tmp_path / "r.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         f"--rootdir={tmp_path}", "-c", os.devnull, str(tmp_path / "test_sample.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    r = parse_junit(report)
    assert r.passed == ["test_sample::test_ok[ES256]"]
    assert [t for t, _ in r.failed] == ["test_sample::test_fails"]
    assert [t for t, _ in r.errors] == ["test_sample::test_error"]
    assert r.skipped == [
        ("test_sample::test_ok[RS256]", "Algorithm RS256 not supported"),
        ("test_sample::test_skip_bad", "AlwaysUv not supported"),
    ]
    assert r.unexplained_skips() == [("test_sample::test_skip_bad", "AlwaysUv not supported")]
