"""An organisation on this machine, every part its own process (issue 15's test setup):

* one PostgreSQL database (on the session's ``pg_server``, a fresh database);
* two server replicas: ``token-agent server run`` processes, each with its own config.toml
  (``[server] listen`` on a free loopback port, the same ``dir``: one workstation CA and TLS
  certificate made by ``token-agent server init``; ``[store] url`` the database; one
  policy file);
* three workstation services: ``token-agent serve`` processes, each with its own data
  directory, socket and config.toml (``[organisation] servers = [both replicas]``,
  ``[workstation] device = "managed"``, ``device_id = wsN``), joined to the organisation
  with ``token-agent server workstation-token`` (run as the admin, where the store is
  reachable) and ``token-agent workstation join`` (run on the workstation);
* virtual keys, each a ``token-agent sim key serve`` process with its PIN set. A key is a
  person's: the key a clinician carries is reachable from the workstations they walk to
  (``Workstation.keys``: the key servers that workstation's service sees). The key pool of
  each service holds them open at once, as several programs may hold a USB key open
  (hidraw delivers every report to every handle; the driver copes: tests/test_key_sharing.py);
* a virtual card through the machine's pcscd and vpcd, seen by ws3 only (ws1 and ws2 watch
  no reader).

Everything is stopped (and the database dropped) by :meth:`OrgCluster.close`. The replicas'
and services' output is kept in their log files (``OrgCluster.logs()`` for a failing test).

The commands it runs are the public interface of the organisation's parts (README,
"The organisation"); the few names the harness depends on are the ``*_COMMAND`` constants
below.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from conftest import (REPO_ROOT, SimKeyServer, environ_for_agent, free_ports, new_database_name,
                      start_sim_key, token_agent_command)

#: the key PIN of every person's key
KEY_PIN = "246810"
#: how long a process may take to answer after it starts
START_TIMEOUT = 30.0

SERVER_INIT_COMMAND = ("server", "init")
SERVER_RUN_COMMAND = ("server", "run")
WORKSTATION_TOKEN_COMMAND = ("server", "workstation-token")
WORKSTATION_JOIN_COMMAND = ("workstation", "join")
HEALTH_PATH = "/v1/health"

#: the policy the replicas decide with: loopback is the organisation's trusted network here
#: (every workstation reaches the servers from 127.0.0.1), the password locks after 4
#: failures in a row (the lockout test), offline logins for 12 hours
DEFAULT_POLICY = """\
[reverification]
trusted_networks = ["127.0.0.0/8"]

[lockout]
password_max_failures = 4
max_failures = 4

[offline]
max_hours = 12
"""


def default_policy() -> str:
    """``DEFAULT_POLICY``, less the ``[offline]`` table where this checkout's policy has no
    such table yet (the offline part not merged: the outage test then fails, as it must)."""
    from token_agent.policy import PolicyError, parse_policy

    try:
        parse_policy(DEFAULT_POLICY)
    except PolicyError:
        return DEFAULT_POLICY.split("[offline]")[0]
    return DEFAULT_POLICY


class ClusterError(RuntimeError):
    """A part of the cluster did not start or a command failed; the message has its output."""


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0
          ) -> int | None:
    """``sig`` to the process's group, SIGKILL after ``timeout``; its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout if s == sig else 10)
                break
            except subprocess.TimeoutExpired:
                continue
    return proc.returncode


# --------------------------------------------------------------------------- replicas


@dataclass
class Replica:
    name: str
    config: Path
    port: int
    log: Path
    env: dict
    proc: subprocess.Popen | None = None
    #: the output of earlier runs (restarts), oldest first
    runs: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> "Replica":
        self.runs += 1
        with open(self.log, "ab") as out:
            out.write(f"\n--- run {self.runs} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                token_agent_command() + ["--config", str(self.config), *SERVER_RUN_COMMAND],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO_ROOT, env=self.env,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClusterError(f"replica {self.name} exited with {self.proc.returncode} "
                                   f"before it answered:\n{_tail(self.log)}")
            if self.health() is not None:
                return self
            time.sleep(0.1)
        raise ClusterError(f"replica {self.name} did not answer GET {HEALTH_PATH} within "
                           f"{timeout:g} s:\n{_tail(self.log)}")

    def health(self, timeout: float = 2.0) -> dict | None:
        """``GET /v1/health`` (a readiness probe: the server's certificate is not checked
        here; the workstations check it against the CA their join token pins)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(self.url + HEALTH_PATH, timeout=timeout,
                                        context=ctx) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                return {"status": e.code, **json.loads(e.read())}
            except ValueError:
                return {"status": e.code}
        except (OSError, ValueError):
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown), SIGKILL after ``timeout``; exit code."""
        return _stop(self.proc, sig, timeout)

    def kill(self) -> int | None:
        """SIGKILL at once (a crashed replica)."""
        return _stop(self.proc, signal.SIGKILL, 10)

    def output(self) -> str:
        return _tail(self.log, 50000)


# --------------------------------------------------------------------------- workstations


@dataclass
class Workstation:
    name: str
    data: Path
    config: Path
    socket: Path
    log: Path
    env: dict
    keys: list[str] = field(default_factory=list)  # the key servers' addresses it sees
    readers: str = ""
    proc: subprocess.Popen | None = None
    runs: int = 0

    def start(self, timeout: float = START_TIMEOUT) -> "Workstation":
        from token_agent.service.client import ServiceError, wait_until_serving

        self.runs += 1
        with open(self.log, "ab") as out:
            out.write(f"\n--- run {self.runs} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                token_agent_command() + ["serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO_ROOT, env=self.env,
                start_new_session=True)
        try:
            wait_until_serving(self.socket, process=self.proc, timeout=timeout)
        except ServiceError as e:
            raise ClusterError(f"workstation {self.name}: {e}:\n{_tail(self.log)}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return _stop(self.proc, sig)

    def client(self, timeout: float = 30.0):
        from token_agent.service.client import Client

        return Client(self.socket, timeout=timeout)

    def cli(self, *args: str, input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess:
        """``token-agent --config <this workstation's config> ARGS`` (as on the workstation)."""
        return run_cli(["--config", str(self.config), *args], self.env, input=input,
                       check=check)

    def login(self, user: str | None, answers, **options) -> dict:
        """A login over this workstation's socket (``Client.login``): its outcome."""
        with self.client() as c:
            return c.login(user, answers, **options)

    def output(self) -> str:
        return _tail(self.log, 50000)


def run_cli(args, env: dict, *, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(token_agent_command() + [str(a) for a in args], input=input,
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterError(f"`token-agent {' '.join(map(str, args))}` exited with "
                           f"{proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# --------------------------------------------------------------------------- the cluster


@dataclass
class OrgCluster:
    base: Path
    pg: object  # pgserver.PgServer
    db_name: str
    db_url: str
    server_dir: Path
    policy: Path
    admin_config: Path
    env: dict
    replicas: list[Replica] = field(default_factory=list)
    workstations: dict[str, Workstation] = field(default_factory=dict)
    keys: dict[str, SimKeyServer] = field(default_factory=dict)
    cards: dict[str, object] = field(default_factory=dict)  # name -> VpcdBridge
    pcscd: object | None = None
    timings: dict[str, float] = field(default_factory=dict)

    # -- the admin's side (where the store is reachable) -------------------------------------

    def admin(self, *args: str, input: str | None = None, check: bool = True
              ) -> subprocess.CompletedProcess:
        """``token-agent --config <admin.toml> ARGS``: the store URL and the policy of the
        organisation, as the administrator runs commands on the server host."""
        return run_cli(["--config", str(self.admin_config), *args], self.env, input=input,
                       check=check)

    def admin_json(self, *args: str, input: str | None = None) -> dict:
        return json.loads(self.admin(*args, "--json", input=input).stdout)

    @contextlib.contextmanager
    def agent(self):
        """``with cluster.agent() as agent``: an :class:`token_agent.agent.Agent` on the
        organisation's store, with the replicas' key file (for the tests' own setup and
        checks, as the admin's library), closed at the end of the block."""
        from token_agent.agent import Agent
        from token_agent.datadir import DataDir

        agent = Agent.open(where=DataDir(self.org_data, "test", self.db_url, "test"),
                           policy_path=self.policy)
        try:
            yield agent
        finally:
            agent.close()

    def join_token(self, name: str, hours: float | None = None) -> str:
        args = [*WORKSTATION_TOKEN_COMMAND, "--name", name]
        if hours is not None:
            args += ["--hours", str(hours)]
        return self.admin_json(*args)["token"]

    def join(self, ws: Workstation, token: str | None = None, *, server: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        """``token-agent workstation join --server URL --token T`` on ``ws`` (the token from
        standard input: it is a secret, never on a command line)."""
        token = token or self.join_token(ws.name)
        return ws.cli(*WORKSTATION_JOIN_COMMAND, "--server", server or self.replicas[0].url,
                      "--token-stdin", input=token + "\n", check=check)

    # -- parts ------------------------------------------------------------------------------

    @property
    def org_data(self) -> Path:
        """The data directory the replicas and the admin share: its key file encrypts the
        store's secrets (TOTP), so every replica must read the same one."""
        return self.base / "org-data"

    @property
    def servers(self) -> list[str]:
        return [r.url for r in self.replicas]

    def key(self, name: str, state: Path | None = None, pin: bool = True) -> SimKeyServer:
        """A person's virtual key (a ``sim key serve`` process), PIN ``KEY_PIN`` unless
        ``pin`` is false; ``state``: start it from this state file (a clone's: a copy of
        another key's)."""
        server = start_sim_key(self.base / "keys" / name, presence="auto", state=state)
        self.keys[name] = server
        if state is None and pin:
            from drivers.fido.keys import open_single_key

            with open_single_key({"TOKEN_AGENT_SIM_KEYS": server.address}, on_touch=None) as k:
                k.set_pin(KEY_PIN)
        return server

    @contextlib.contextmanager
    def only_touching(self, name: str):
        """While in the block, only ``name``'s key answers a request for a touch at once (the
        other people's keys wait for a touch nobody gives: their presence is "manual"), as
        when one person touches their own key at a PC where several are plugged in (an
        enrolment picks the key that is touched)."""
        from simulators.key.control import KeyControl

        others = [KeyControl(k.control_port) for n, k in self.keys.items() if n != name]
        for control in others:
            control.set_presence("manual")
        try:
            yield
        finally:
            for control in others:
                control.set_presence("auto")

    def stop_replicas(self) -> None:
        for r in self.replicas:
            r.stop()

    def start_replicas(self) -> None:
        for r in self.replicas:
            if not r.running:
                r.start()

    def logs(self) -> str:
        parts = []
        for r in self.replicas:
            parts.append(f"--- replica {r.name} ({r.url}) ---\n{_tail(r.log, 8000)}")
        for ws in self.workstations.values():
            parts.append(f"--- workstation {ws.name} ---\n{_tail(ws.log, 8000)}")
        return "\n".join(parts)

    def close(self) -> None:
        from simulators.card.pcscd import remove_card

        for ws in self.workstations.values():
            ws.stop()
        for r in self.replicas:
            r.stop(timeout=10)
        for key in self.keys.values():
            key.stop()
        for bridge in self.cards.values():
            remove_card(bridge)
        try:
            if not self.pg.running():
                self.pg.restart()
            self.pg.drop_database(self.db_name)
        except Exception:  # noqa: BLE001  (the session's teardown removes the cluster anyway)
            pass
        shutil.rmtree(self.base, ignore_errors=True)


def _toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def start_cluster(pg_server, *, replicas: int = 2, workstations: int = 3,
                  policy: str | None = None, ws_keys: dict[str, list[str]] | None = None,
                  keys_without_pin: tuple[str, ...] = (),
                  key_addresses: dict[str, list[str]] | None = None,
                  card_reader_at: str | None = "ws3", pcscd=None, workers: int = 8,
                  log_level: str = "info") -> OrgCluster:
    """Start an organisation (see the module docstring). ``ws_keys``: for each workstation
    the names of the people's keys it sees (each key started once, whoever sees it);
    ``key_addresses``: for each workstation, more keys it sees, served by the caller
    (``host:port``; the benchmark's keys, many in one process);
    ``card_reader_at``: the workstation that watches vpcd's readers (needs ``pcscd``)."""
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="token-agent-org-"))
    base.chmod(0o755)
    db_name = new_database_name()
    db_url = pg_server.create_database(db_name)
    env = environ_for_agent()
    env["PYTHONUNBUFFERED"] = "1"
    policy_file = base / "policy.toml"
    policy_file.write_text(default_policy() if policy is None else policy)
    policy_file.chmod(0o644)
    server_dir = base / "server"
    admin_config = base / "admin.toml"
    admin_config.write_text(textwrap.dedent(f"""\
        [store]
        data_dir = "{base / 'org-data'}"
        url = "{db_url}"
        [policy]
        file = "{policy_file}"
        [server]
        dir = "{server_dir}"
    """))
    cluster = OrgCluster(base, pg_server, db_name, db_url, server_dir, policy_file,
                         admin_config, env, pcscd=pcscd)
    try:
        cluster.admin(*SERVER_INIT_COMMAND, "--dir", str(server_dir))
        cluster.timings["init"] = time.monotonic() - started
        for i, port in enumerate(free_ports(replicas), 1):
            name = f"replica{i}"
            config = base / f"{name}.toml"
            config.write_text(textwrap.dedent(f"""\
                [server]
                listen = "127.0.0.1:{port}"
                dir = "{server_dir}"
                workers = {workers}
                shutdown_timeout = 20
                [store]
                data_dir = "{base / 'org-data'}"
                url = "{db_url}"
                [policy]
                file = "{policy_file}"
                [logging]
                level = "{log_level}"
                format = "json"
            """))
            cluster.replicas.append(Replica(name, config, port, base / f"{name}.log", env))
        for r in cluster.replicas:
            r.start()
        cluster.timings["replicas"] = time.monotonic() - started

        ws_keys = ws_keys or {}
        for name in sorted({k for names in ws_keys.values() for k in names}):
            cluster.key(name, pin=name not in keys_without_pin)
        cluster.timings["keys"] = time.monotonic() - started
        sockets = base / "sockets"
        sockets.mkdir()
        sockets.chmod(0o755)
        for i in range(1, workstations + 1):
            name = f"ws{i}"
            data = base / name
            data.mkdir()
            addresses = [cluster.keys[k].address for k in ws_keys.get(name, [])]
            addresses += (key_addresses or {}).get(name, [])
            readers = ('readers = ["Virtual PCD"]' if name == card_reader_at
                       else f'readers = ["no reader at {name}"]')
            config = base / f"{name}.toml"
            config.write_text(textwrap.dedent(f"""\
                [service]
                socket = "{sockets / name}.sock"
                prompt_timeout = 30
                [store]
                data_dir = "{data}"
                [policy]
                file = "{policy_file}"
                [workstation]
                device = "managed"
                device_id = "{name}"
                network = "127.0.0.1"
                [keys]
                simulators = {_toml_list(addresses)}
                timeout = 10
                [cards]
                {readers}
                lock_command = "true"
                [organisation]
                servers = {_toml_list(cluster.servers)}
                timeout = 10
                [logging]
                level = "{log_level}"
                format = "json"
            """))
            ws = Workstation(name, data, config, sockets / f"{name}.sock", base / f"{name}.log",
                             env, addresses, readers)
            cluster.workstations[name] = ws
        for ws in cluster.workstations.values():
            cluster.join(ws)
        cluster.timings["joined"] = time.monotonic() - started
        for ws in cluster.workstations.values():
            ws.start()
        cluster.timings["started"] = time.monotonic() - started
        return cluster
    except BaseException:
        logs = cluster.logs()
        cluster.close()
        if isinstance(logs, str) and logs:
            print(logs)
        raise
