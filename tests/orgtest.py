"""Helpers for tests of the organisation: a real server (`token-agent server run`, a separate
process, real TLS) on a real store, and workstations joined to it with real join tokens.

    from orgtest import start_org_server, join_workstation, org_server   # org_server: fixture

    server = start_org_server(tmp_path / "s1", pg_url)          # init + run, waits for health
    ws = join_workstation(tmp_path / "ws1", server, "ws1")       # token + join, config written
    ws.client().request("GET", "/v1/whoami")                     # an OrgClient with ws1's cert
    server.cli("server", "workstations", "--json")               # CLI against the server's store
    replica = start_org_server(tmp_path / "s2", pg_url, server_dir=server.server_dir)
    server.stop()                                                # SIGTERM, returns the exit code

Every server and workstation has its own directory and config.toml (``TOKEN_AGENT_CONFIG``),
and none sees the caller's ``TOKEN_AGENT_*`` variables. Replicas share one store and one
``server_dir`` (the CA and TLS files), as an organisation's would.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import free_port, token_agent_command
from json_shapes import check_output

READY_TIMEOUT = 30.0


def clean_env(config: Path | None = None, **extra: str) -> dict[str, str]:
    """``os.environ`` without any ``TOKEN_AGENT_*``, with ``TOKEN_AGENT_CONFIG`` = ``config``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_AGENT_")}
    if config is not None:
        env["TOKEN_AGENT_CONFIG"] = str(config)
    env.update(extra)
    return env


def run_cli(env: dict, *args: str, input: str | None = None, expect: int | None = 0,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """`token-agent ARGS` with ``env``; asserts the exit code (``expect=None``: any) and,
    with --json, that the output has the shape README documents (``json_shapes``)."""
    proc = subprocess.run([*token_agent_command(), *args], env=env, input=input,
                          capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert proc.returncode == expect, (
            f"token-agent {' '.join(args)}: exit {proc.returncode}, expected {expect}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    if "--json" in args:
        check_output(list(args), proc.stdout, proc.returncode)
    return proc


def init_server_dir(directory: Path, *hostnames: str) -> Path:
    """`token-agent server init --dir DIRECTORY` (a new CA and TLS certificate)."""
    args = ["server", "init", "--dir", str(directory)]
    for h in hostnames:
        args += ["--hostname", h]
    run_cli(clean_env(), "--data-dir", str(directory.parent / "init-data"), *args)
    return directory


@dataclass
class OrgServer:
    """One replica: ``url`` (https://127.0.0.1:PORT), its ``base`` directory (config.toml,
    data dir, log), the shared ``server_dir`` and ``store_url``."""

    url: str
    port: int
    base: Path
    server_dir: Path
    store_url: str
    config: Path
    log: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        return clean_env(self.config)

    @property
    def ca_file(self) -> Path:
        return self.server_dir / "ca.pem"

    def cli(self, *args: str, input: str | None = None, expect: int | None = 0
            ) -> subprocess.CompletedProcess:
        """`token-agent ARGS` as the server's administrator (its config.toml and store)."""
        return run_cli(self.env, *args, input=input, expect=expect)

    def token(self, name: str, hours: float = 24) -> str:
        out = self.cli("server", "workstation-token", "--name", name, "--hours", str(hours),
                       "--json")
        return json.loads(out.stdout)["token"]

    def revoke(self, name: str) -> None:
        self.cli("server", "workstation-revoke", name)

    def health(self, timeout: float = 5) -> dict:
        """GET /v1/health, trusting the organisation's CA (no client certificate)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(f"{self.url}/v1/health", context=ctx,
                                    timeout=timeout) as resp:
            return json.loads(resp.read())

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait (SIGKILL after ``timeout``); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL (a replica dying mid-request)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def start_org_server(base: Path, store_url: str, *, server_dir: Path | None = None,
                     port: int | None = None, extra_config: str = "",
                     ready_timeout: float = READY_TIMEOUT) -> OrgServer:
    """A running replica on ``store_url``: `server init` into ``base/server`` unless
    ``server_dir`` is given (a second replica shares the first's), then `server run` on a
    free port of 127.0.0.1; returns once GET /v1/health answers (fails the test, with the
    server's log, when it does not)."""
    base.mkdir(parents=True, exist_ok=True)
    if server_dir is None:
        server_dir = init_server_dir(base / "server")
    port = port or free_port()
    config = base / "config.toml"
    config.write_text(f'[store]\ndata_dir = "{base / "data"}"\nurl = "{store_url}"\n'
                      f'[server]\nlisten = "127.0.0.1:{port}"\ndir = "{server_dir}"\n'
                      f'shutdown_timeout = 20\n{extra_config}')
    log = base / "server.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([*token_agent_command(), "server", "run"], env=clean_env(config),
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = OrgServer(f"https://127.0.0.1:{port}", port, base, server_dir, store_url, config,
                       log, process)
    deadline = time.monotonic() + ready_timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"token-agent server run exited {process.returncode}:\n{server.output()}",
                        pytrace=False)
        try:
            server.health(timeout=2)
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"token-agent server run not ready in {ready_timeout:g} s:\n"
                            f"{server.output()}", pytrace=False)
            time.sleep(0.1)


@dataclass
class JoinedWorkstation:
    """A workstation's directory: ``data_dir`` (its organisation files under
    ``data_dir/organisation``), ``config`` (its config.toml with ``[organisation] servers``)."""

    name: str
    base: Path
    data_dir: Path
    config: Path
    servers: list[str]

    @property
    def org_dir(self) -> Path:
        return self.data_dir / "organisation"

    @property
    def env(self) -> dict[str, str]:
        return clean_env(self.config)

    def cli(self, *args: str, input: str | None = None, expect: int | None = 0
            ) -> subprocess.CompletedProcess:
        return run_cli(self.env, *args, input=input, expect=expect)

    def client(self, timeout: float = 5.0):
        """An ``OrgClient`` with this workstation's certificate (as the service makes it)."""
        from token_agent.config import load_config
        from token_agent.organisation.client import OrgClient

        client = OrgClient.from_config(load_config(self.config), self.data_dir)
        client.timeout = timeout
        return client


def join_workstation(base: Path, server: OrgServer, name: str, *,
                     servers: list[str] | None = None, extra_config: str = ""
                     ) -> JoinedWorkstation:
    """A workstation joined through ``server`` with a fresh token: `workstation join
    --token-stdin`, then its config.toml written with ``[organisation] servers`` (default:
    ``[server.url]``) and ``[store] data_dir``; ``extra_config`` is appended."""
    base.mkdir(parents=True, exist_ok=True)
    data_dir = base / "data"
    servers = servers or [server.url]
    config = base / "config.toml"
    listed = ", ".join(f'"{s}"' for s in servers)
    config.write_text(f'[store]\ndata_dir = "{data_dir}"\n'
                      f'[organisation]\nservers = [{listed}]\n{extra_config}')
    token = server.token(name)
    run_cli(clean_env(config), "workstation", "join", "--server", server.url, "--token-stdin",
            input=token + "\n")
    return JoinedWorkstation(name, base, data_dir, config, servers)


@pytest.fixture
def org_server(tmp_path, pg_url):
    """One replica on a fresh PostgreSQL database (``pg_url``), stopped after the test."""
    server = start_org_server(tmp_path / "org-server", pg_url)
    yield server
    server.stop()
