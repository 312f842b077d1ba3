"""README.md says what is true: its shell blocks run, its examples are valid.

Every ```sh block of README.md carries a name, in an HTML comment just before the fence:

    <!-- readme-block: NAME -->                 run here, in a sandbox
    <!-- readme-block: NAME needs=root,card -->  not run here: skipped by name, with the reason

A block with ``needs`` is skipped only when it is listed in :data:`SKIPPED` with the same
needs, so a new block is run unless someone says, here and in the README, why it cannot be.
A runnable block runs as a person at a terminal would run it (``readme_blocks.Typist``:
``bash -euo pipefail`` on a pseudo-terminal, each prompt answered when it appears), in a
sandbox of its ``## `` section, shared in document order by the section's blocks: a private
HOME (so the store is ``~/.local/share/token-agent``), the venv's ``bin`` first on PATH, a
virtual key named in ``TOKEN_AGENT_SIM_KEYS``, a policy that delivers codes to an outbox (the
person's phone), and for the blocks in :data:`WITH_SERVICE` a ``token-agent serve`` of the
sandbox. Blocks with ``check=policy`` or ``check=config`` are example files: each must pass
``token-agent policy check`` / ``config check`` on its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import (REPO_ROOT, environ_for_agent, new_database_name, start_sim_key,
                      token_agent_command)
from readme_blocks import README, Answers, Block, Typist, blocks

#: what each need means: why such a block is not run by this test
NEEDS = {
    "root": "changes the machine (/etc, /opt, /usr, apt, useradd): run it on a machine of its own",
    "systemd": "systemctl and a running systemd",
    "network": "downloads (apt, git clone, pip)",
    "pcscd": "pcscd with vsmartcard-vpcd (tests/test_card_*.py drive it)",
    "card": "a smartcard in a reader (a real one, or the simulator's in pcscd)",
    "long": "runs for minutes (the demonstration, the whole test suite)",
}

#: the blocks not run here, by name, with their needs: must match the README's markers
SKIPPED = {
    "install-dev": ("root", "pcscd", "long"),
    "install-packages": ("root", "network"),
    "install-workstation": ("root", "systemd", "network"),
    "udev-install": ("root",),
    "card-login": ("card",),
    "sim-card-insert": ("pcscd",),
    "pcscd-start": ("root", "systemd"),
    "opensc": ("card",),
}

#: runnable blocks that talk to the service: the sandbox runs `token-agent serve` for them
WITH_SERVICE = {"service-clients"}

PIN = "135790"
PASSWORD = "correct horse battery"

ALL = blocks()
SHELL = [b for b in ALL if b.lang == "sh"]


def _id(block: Block) -> str:
    return block.name or f"unnamed-line-{block.line}"


def test_every_shell_block_is_named_and_the_skip_list_matches():
    other = [(b.line, b.lang) for b in ALL if b.lang in ("bash", "shell", "console", "zsh")]
    assert not other, f"shell blocks this test would not see (use ```sh): {other}"
    unnamed = [b.line for b in SHELL if not b.name]
    assert not unnamed, (f"README.md lines {unnamed}: a ```sh block without "
                         "`<!-- readme-block: NAME [needs=...] -->` just before it")
    names = [b.name for b in ALL if b.name]
    assert len(names) == len(set(names)), f"names used twice: {names}"
    unknown = {n for b in ALL for n in b.needs} - set(NEEDS)
    assert not unknown, f"needs nobody explained in NEEDS: {unknown}"
    marked = {b.name: b.needs for b in SHELL if b.needs}
    assert marked == SKIPPED, "the README's needs= markers and SKIPPED differ"
    assert WITH_SERVICE <= {b.name for b in SHELL if not b.needs}


# --------------------------------------------------------------------------- sandboxes


@dataclass
class Sandbox:
    root: Path
    env: dict[str, str]
    typist: Typist
    ran: list[str] = field(default_factory=list)
    stops: list = field(default_factory=list)
    service: subprocess.Popen | None = None
    service_log: Path | None = None


def _new_sandbox(root: Path) -> Sandbox:
    home, outbox, run = root / "home", root / "outbox", root / "run"
    for d in (home, run):
        d.mkdir(mode=0o700)
    policy = root / "policy.toml"
    policy.write_text(
        "# the built-in policy, with codes delivered to an outbox (README: Delivery of codes)\n"
        "[delivery.sms]\ngateway = \"outbox\"\n"
        "[delivery.email]\ngateway = \"outbox\"\n"
        f"[delivery.outbox]\ndir = \"{outbox}\"\n"
    )
    key = start_sim_key(root / "sim-key")
    env = {
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",  # the venv's first
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "XDG_RUNTIME_DIR": str(run),
        "TOKEN_AGENT_POLICY": str(policy),
        "TOKEN_AGENT_SIM_KEYS": key.address,
    }
    answers = Answers(pin=PIN, password=PASSWORD, outbox=outbox)
    box = Sandbox(root, env, Typist(answers))
    box.stops.append(key.stop)
    return box


def _start_service(box: Sandbox) -> None:
    """`token-agent serve` for the sandbox, its socket named in the sandbox's config.toml."""
    config = box.root / "config.toml"
    socket = box.root / "run" / "agent.sock"
    config.write_text(f'[service]\nsocket = "{socket}"\nlogin_socket = ""\n'
                      f'[keys]\nsimulators = ["{box.env["TOKEN_AGENT_SIM_KEYS"]}"]\n')
    box.env["TOKEN_AGENT_CONFIG"] = str(config)
    box.service_log = box.root / "serve.log"
    with open(box.service_log, "wb") as log:
        box.service = subprocess.Popen(token_agent_command() + ["serve"], env=box.env,
                                       cwd=box.root, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
    from processes import stop_process_group

    box.stops.append(lambda: stop_process_group(box.service, 10))
    deadline = time.monotonic() + 20
    while not socket.exists():
        assert box.service.poll() is None and time.monotonic() < deadline, \
            f"token-agent serve did not start:\n{box.service_log.read_text()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory, pg_server):
    """One sandbox per README section, made when its first block runs; its STORE_URL names
    an empty PostgreSQL database on the session's own server (pg_server), as the README's
    PostgreSQL block expects of its reader."""
    made: dict[str, Sandbox] = {}

    def get(section: str) -> Sandbox:
        if section not in made:
            made[section] = box = _new_sandbox(tmp_path_factory.mktemp("readme"))
            name = new_database_name()
            box.env["STORE_URL"] = pg_server.create_database(name)
            box.stops.append(lambda: pg_server.drop_database(name))
        return made[section]

    yield get
    for box in made.values():
        for stop in reversed(box.stops):
            stop()


def _run(box: Sandbox, block: Block) -> None:
    if block.name in WITH_SERVICE and box.service is None:
        _start_service(box)
    code = box.typist.run(block.text, box.env, box.root, timeout=60)
    assert code == 0, (
        f"README.md line {block.line}, block {block.name!r} exited {code}; its terminal "
        f"(commands marked +):\n{box.typist.transcript}"
        + (f"\nthe service's log:\n{box.service_log.read_text()}" if box.service_log else ""))
    box.ran.append(block.name)


@pytest.mark.parametrize("block", SHELL, ids=_id)
def test_shell_block_runs(block: Block, sandboxes):
    if block.name in SKIPPED:
        needs = "; ".join(f"{n}: {NEEDS[n]}" for n in SKIPPED[block.name])
        pytest.skip(f"README block {block.name!r} (line {block.line}) needs {needs}")
    assert block.name and not block.needs, \
        "unnamed, or marked needs= without being in SKIPPED: see the test above"
    box = sandboxes(block.section)
    # the section's blocks build on each other: the ones before it first (e.g. under -k)
    for earlier in SHELL:
        if earlier is block:
            break
        if (earlier.section == block.section and earlier.name not in SKIPPED
                and earlier.name not in box.ran):
            _run(box, earlier)
    _run(box, block)


# --------------------------------------------------------------------------- example files


@pytest.mark.parametrize("block", [b for b in ALL if b.check], ids=_id)
def test_example_file_is_valid_on_its_own(block: Block, tmp_path):
    """`<!-- readme-block: NAME check=policy|config -->`: the example passes
    `token-agent policy check` / `config check` as it stands, without the rest of a file."""
    path = tmp_path / f"{block.name}.toml"
    path.write_text(block.text)
    env = environ_for_agent()
    run = subprocess.run(token_agent_command() + [block.check, "check", str(path)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, (f"README.md line {block.line}, {block.name}:\n"
                                 f"{run.stdout}{run.stderr}")


def test_there_are_example_files_to_check():
    assert {b.name for b in ALL if b.check} >= {"policy-example", "delivery-example",
                                                "config-example"}


# --------------------------------------------------------------------------- single facts


def _readme_block(name: str) -> Block:
    (block,) = [b for b in ALL if b.name == name]
    return block


def test_workstation_install_runs_token_agent_by_a_path_that_exists():
    """Step 2 installs into /opt/token-agent/.venv, which is not on PATH: every token-agent
    the steps run is that venv's (relative to /opt/token-agent, where step 2 cd's, or full)."""
    text = _readme_block("install-workstation").text
    assert "git clone <this repository> /opt/token-agent && cd /opt/token-agent" in text
    assert "python3 -m venv .venv && .venv/bin/pip install ." in text
    bare = [line for line in text.splitlines()
            if re.search(r"(^|[\s;&|])token-agent (service|config|policy|users|serve)", line)]
    assert not bare, f"token-agent run from PATH, where it is not: {bare}"
    assert "/opt/token-agent/.venv/bin/token-agent service status" in text


def _auth_lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.startswith("auth ")]


def test_readme_pam_stanzas_are_the_shipped_files():
    """The README's stanzas say the same as pam/token-agent-primary.pam and
    pam/token-agent-2fa.pam (which tests/test_pam.py runs through the real PAM stack)."""
    readme = _auth_lines(_readme_block("pam-stanzas").text)
    shipped = [_auth_lines((REPO_ROOT / "pam" / f).read_text())
               for f in ("token-agent-primary.pam", "token-agent-2fa.pam")]
    assert readme == [shipped[0][0], shipped[1][0]]
    assert all(line.split()[1] == "required" for line in readme)


def test_masked_destinations_in_the_readme_are_what_the_cli_prints(tmp_path):
    """`enrol sms --to 07700900123` tells the person where the code went; the README shows
    destinations the same way."""
    outbox = tmp_path / "outbox"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[delivery.sms]\ngateway = "outbox"\n[delivery.outbox]\ndir = "{outbox}"\n')
    env = environ_for_agent()
    env.update(TOKEN_AGENT_DATA_DIR=str(tmp_path / "data"), TOKEN_AGENT_POLICY=str(policy),
               HOME=str(tmp_path))
    cli = token_agent_command()
    subprocess.run(cli + ["users", "add", "alice"], env=env, check=True, capture_output=True)
    run = subprocess.run(cli + ["enrol", "sms", "--user", "alice", "--to", "07700900123"],
                         env=env, input="", capture_output=True, text=True, timeout=60)
    printed = re.search(r"Enter the code sent to (\S+)", run.stderr)
    assert printed, run.stderr
    mask = printed.group(1)
    readme = README.read_text()
    assert f"Enter the code sent to {mask}" in readme
    assert f"(`{mask}`, `a•••@nhs.net`)" in readme
    shown = set(re.findall(r"[+0-9]{2,3}•{5}[0-9]{3}", readme))
    # other numbers (an alternate phone) are masked the same way: the same prefix, dots, last 3
    assert mask in shown and {m[:-3] for m in shown} == {mask[:-3]}, \
        f"the README shows {shown}, the CLI prints {mask}"


def test_bench_login_runs_without_the_pin(tmp_path):
    """benchmarks/bench_login.py --uv discouraged (the README's 'without PIN use' row)."""
    run = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_login.py"),
                          "--uv", "discouraged", "--runs", "2", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"user_verification": "discouraged"' in run.stdout
