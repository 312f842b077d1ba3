"""The install and CI plumbing: scripts/, .ci/run, pyproject, README."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["scripts/setup.sh", "scripts/test.sh", "scripts/demo.sh", ".ci/run"]


@pytest.mark.parametrize("path", SCRIPTS)
def test_script_is_strict_executable_bash(path):
    script = ROOT / path
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert script.stat().st_mode & stat.S_IXUSR, f"{path} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_executable_bit_is_committed():
    proc = subprocess.run(
        ["git", "ls-files", "-s", "--", *SCRIPTS], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        return  # not a git checkout (e.g. an sdist): nothing to check
    modes = {line.split()[3]: line.split()[0] for line in proc.stdout.splitlines()}
    for path, mode in modes.items():
        assert mode == "100755", f"{path} is committed with mode {mode}"


def test_ci_runs_the_readme_test_command():
    assert "exec bash scripts/test.sh" in (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "scripts/test.sh" in readme and "scripts/demo.sh" in readme


def test_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["requires-python"] == ">=3.11"
    assert meta["project"]["scripts"]["token-agent"] == "token_agent.cli:main"
    assert "pytest>=8" in meta["project"]["optional-dependencies"]["test"]
    deps = " ".join(meta["project"]["dependencies"])
    for dep in ("fido2", "pyscard", "cryptography", "pyotp", "click"):
        assert dep in deps


def test_console_script_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "token_agent", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "sim" in proc.stdout


def test_generated_files_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in (".venv/", ".cache/"):
        assert entry in ignored


# --- setup.sh behaviour, with fake system tools (it stops before the venv step) -------------


def _fake_bin(tmp_path: Path, tools: dict[str, str]) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in tools.items():
        f = bindir / name
        f.write_text("#!/bin/sh\n" + body + "\n")
        f.chmod(0o755)
    return dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")


def _run_setup(env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts/setup.sh")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_setup_non_root_with_missing_packages_says_what_to_run(tmp_path):
    env = _fake_bin(
        tmp_path,
        {
            "id": 'if [ "$1" = -u ]; then echo 1000; else exec /usr/bin/id "$@"; fi',
            "dpkg-query": 'for a; do p=$a; done; '
            'case $p in swig|vsmartcard-vpcd) exit 1;; *) printf installed;; esac',
            "apt-get": f'echo called >> "{tmp_path}/apt-called"; exit 1',
            "sudo": f'echo called >> "{tmp_path}/apt-called"; exit 1',
        },
    )
    proc = _run_setup(env)
    assert proc.returncode != 0
    assert "sudo apt-get install -y --no-install-recommends swig vsmartcard-vpcd" in proc.stderr
    assert not (tmp_path / "apt-called").exists()


def test_setup_ready_machine_never_calls_apt(tmp_path):
    # every package installed; a too-old python stops the script right after the apt step
    env = _fake_bin(
        tmp_path,
        {
            "dpkg-query": "printf installed",
            "apt-get": f'echo called >> "{tmp_path}/apt-called"; exit 1',
            "python-old": 'case "$1" in -V) echo "Python 3.9.2";; *) exit 1;; esac',
        },
    )
    env["PYTHON"] = "python-old"
    proc = _run_setup(env)
    assert proc.returncode != 0
    assert "needs Python >= 3.11" in proc.stderr and "3.9.2" in proc.stderr
    assert not (tmp_path / "apt-called").exists()


def test_every_source_directory_is_a_package():
    """setuptools' discovery skips a directory without __init__.py: a wheel would lack it."""
    root = Path(__file__).resolve().parent.parent
    for top in ("token_agent", "drivers", "simulators"):
        for directory in [root / top, *(p for p in (root / top).rglob("*") if p.is_dir())]:
            if directory.name == "__pycache__" or not any(directory.glob("*.py")):
                continue
            assert (directory / "__init__.py").exists(), f"{directory} is not a package"


def test_simulator_data_is_package_data():
    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["simulators.key"]
    data = list((root / "simulators" / "key" / "data").iterdir())
    assert data and all(any(p.match(pattern) for pattern in patterns) for p in data)


def test_readme_lists_the_packages_setup_installs():
    """The README's two package lists (what set-up installs, and the line for a non-root
    user) are setup.sh's APT_PACKAGES, no more and no fewer."""
    import re

    setup = (ROOT / "scripts" / "setup.sh").read_text()
    packages = re.search(r"APT_PACKAGES=\(([^)]*)\)", setup).group(1).split()
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"running as root:\n\s*`([^`]*)`", readme).group(1).split()
    command = re.search(r"sudo apt-get install -y --no-install-recommends (.*?)\n```", readme,
                        re.S).group(1).replace("\\\n", " ").split()
    assert listed == packages
    assert command == packages


def test_postgresql_is_an_extra_that_setup_installs():
    """The store on PostgreSQL needs psycopg 3 and its pool: an optional extra (the embedded
    SQLite store needs neither), which set-up installs with the test extra, and Debian's
    PostgreSQL 15 (the tests start a throwaway cluster of it)."""
    import re

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = meta["project"]["optional-dependencies"]["postgresql"]
    assert "psycopg[binary]>=3.2" in extra and "psycopg-pool>=3.2" in extra
    assert not any("psycopg" in dep for dep in meta["project"]["dependencies"])
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "pip install --quiet --disable-pip-version-check -e '.[test,postgresql,server]'" in setup
    assert "postgresql" in re.search(r"APT_PACKAGES=\(([^)]*)\)", setup).group(1).split()
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e '.[test,postgresql,server]'" in readme
