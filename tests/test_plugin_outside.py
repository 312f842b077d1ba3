"""Proof from outside: token-agent as a developer gets it. A wheel is built from this checkout,
installed with its dependencies into a fresh venv outside the repository, and the example
relying party (examples/relying_party) is copied there and runs its own tests with that venv's
pytest, from its own directory: token-agent's pytest plugin gives them their fixtures (the
virtual key in process and on TCP, the simulated PKI, the card in process and in the real
pcscd).

pip runs as scripts/setup.sh runs it (the machine's index and cache). pcscd is shared with
this session: the test holds this session's pcscd lock and hands it to the example's pytest
(simulators.card.pcscd.LOCK_FD_ENV), which would otherwise wait for this session to end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "relying_party"
#: what the wheel is built from (copied, so that the build leaves nothing in the checkout)
SOURCES = ("pyproject.toml", "README.md", "token_agent", "drivers", "simulators")
#: the example's tests: every one must run and pass
EXAMPLE_TESTS = 14


def _run(command: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(kwargs.pop("env", {}))
    proc = subprocess.run([str(c) for c in command], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, command))} exited {proc.returncode}:\n"
        f"{proc.stdout[-8000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="module")
def outside_venv(tmp_path_factory) -> Path:
    """A fresh venv outside the repository with the wheel of this checkout installed."""
    base = tmp_path_factory.mktemp("outside")
    assert not base.resolve().is_relative_to(REPO_ROOT)
    source = base / "source"
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    wheels = base / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, source],
         timeout=180)
    (wheel,) = wheels.glob("token_agent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    assert "simulators/pytest_plugin.py" in names
    assert "[pytest11]" in entry_points and "simulators.pytest_plugin" in entry_points

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", venv], timeout=120)
    _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, "pytest"],
         timeout=300)
    return venv


def test_the_example_relying_party_passes_its_tests_in_a_fresh_venv(outside_venv, pcscd,
                                                                     tmp_path):
    python = outside_venv / "bin" / "python"
    where = _run([python, "-c", "import simulators.pytest_plugin as p; print(p.__file__)"],
                 timeout=60, cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(outside_venv), f"imported from {where}, not the venv"

    project = tmp_path / "relying_party"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__", "*.pyc",
                                                                     ".pytest_cache"))
    from simulators.card.pcscd import LOCK_FD_ENV

    assert pcscd.lock_fd is not None
    proc = _run([python, "-m", "pytest", "-v", "-p", "no:cacheprovider"], timeout=300,
                cwd=project, pass_fds=[pcscd.lock_fd],
                env={LOCK_FD_ENV: str(pcscd.lock_fd),
                     "PATH": f"{outside_venv / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    out = proc.stdout
    plugins = next(line for line in out.splitlines() if line.startswith("plugins:"))
    assert "token-agent" in plugins, plugins
    assert f"{EXAMPLE_TESTS} passed" in out.splitlines()[-1], out[-4000:]
    for name in ("test_register_then_log_in", "test_a_cloned_key_is_refused",
                 "test_over_tcp_with_the_control_interface", "test_card_login_through_pcscd"):
        assert f"{name} PASSED" in out, out[-4000:]
