"""Part three of the demonstration: the organisation, a clinician roaming, then an outage.

The organisation's server (``token-agent server init`` and ``server run``, its own process,
on a throwaway store: SQLite, which one replica may use) and two ward PCs, each a
workstation service (``token-agent serve``, its own process and data directory) joined to
the organisation with a one-time token (``server workstation-token`` on the server's side,
``workstation join`` on the PC). Dr Alice Smith's virtual key (PIN on) is reachable from both
PCs, as the key she carries.

She logs in at ward A, then at ward B, a PC she never used: a joined workstation on the
trusted network, so no alert and no second factor (the policy's roaming rule, shown by
``policy explain``). Then the server stops: at ward B she still logs in with her key (the
offline cache, she was seen there), a password is refused with a clear message, and when the
server is back the ward's queued audit events arrive, once, and the audit verifies.
Everything lives in a temporary directory and is stopped and removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

from .demo_workstation import KEY_PIN, PASSWORD, _answering, _show

START_TIMEOUT = 30.0
WARDS = ("ward-a", "ward-b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(env: dict, config: Path, *args: str, input: str | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "token_agent", "--config", str(config), *args],
                          input=input, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`token-agent {' '.join(args)}` exited with {proc.returncode}: "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _healthy(url: str) -> bool:
    ctx = ssl.create_default_context()  # a readiness probe only: the PCs check the CA
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url + "/v1/health", timeout=2, context=ctx) as resp:
            return json.loads(resp.read()).get("ok") is True
    except (OSError, ValueError):
        return False


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "token_agent", *argv],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def _stop(proc: subprocess.Popen | None) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def organisation_demo(say: Callable[[str], None], check: Callable[[bool, str], None],
                      step: int = 10) -> None:
    from fido2.ctap2 import Ctap2
    from fido2.ctap2.pin import ClientPin
    from fido2.hid import CtapHidDevice

    from drivers.fido.keys import open_single_key
    from drivers.fido.sim import SocketHidConnection, sim_descriptor
    from simulators.key import KeyServer, create_virtual_key

    from .agent import Agent
    from .ceremonies.key import enrol_key
    from .factors import password
    from .service.client import Client, ServiceUnavailable, wait_until_serving

    say(f"{step}. the organisation: a server, two ward PCs joined to it, a clinician roaming "
        "between them, then an outage")
    tmp = Path(tempfile.mkdtemp(prefix="token-agent-demo-org-"))
    os.chmod(tmp, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_AGENT_")}
    env["PYTHONUNBUFFERED"] = "1"
    key_server = KeyServer(create_virtual_key(presence="auto"), port=0, control_port=None)
    server = None
    services: dict[str, subprocess.Popen] = {}
    try:
        key_server.__enter__()
        address = f"127.0.0.1:{key_server.port}"
        holder = CtapHidDevice(sim_descriptor("127.0.0.1", key_server.port),
                               SocketHidConnection("127.0.0.1", key_server.port))
        ClientPin(Ctap2(holder)).set_pin(KEY_PIN)
        holder.close()

        # -- the server --------------------------------------------------------------------
        org_data, server_dir = tmp / "org", tmp / "org" / "server"
        org_data.mkdir(mode=0o700)
        policy = tmp / "policy.toml"
        policy.write_text('[reverification]\ntrusted_networks = ["127.0.0.0/8"]\n')
        port = _free_port()
        url = f"https://127.0.0.1:{port}"
        admin = tmp / "server.toml"
        admin.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\ndir = "{server_dir}"\n'
                         f'[store]\ndata_dir = "{org_data}"\n[policy]\nfile = "{policy}"\n'
                         '[logging]\nlevel = "warning"\n')
        _cli(env, admin, "server", "init", "--dir", str(server_dir))
        check((server_dir / "ca.pem").exists(),
              "server init: the organisation's workstation CA and the server's TLS certificate")

        def start_server() -> subprocess.Popen:
            proc = _start(["--config", str(admin), "server", "run"], env, tmp / "server.log")
            deadline = time.monotonic() + START_TIMEOUT
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the organisation's server did not start: "
                                       + (tmp / "server.log").read_text(errors="replace")[-2000:])
                time.sleep(0.1)
            return proc

        server = start_server()
        check(True, f"the organisation's server runs (pid {server.pid}) at {url}")

        # alice, as the organisation's administrator sets her up (the library on the
        # server's store): her password and her key, enrolled at the registration desk
        agent = Agent.open(org_data, environ={}, policy_path=policy)
        try:
            alice = agent.store.add_user("alice", display_name="Dr Alice Smith")
            password.set_password(agent.factors(), alice.id, PASSWORD)
            with open_single_key({"TOKEN_AGENT_SIM_KEYS": address}, on_touch=None) as key:
                enrol_key(agent.store, key, "alice", name="blue key",
                          pin_provider=lambda: KEY_PIN)
        finally:
            agent.close()
        check(True, "Dr Alice Smith enrolled once, at the organisation: password and her key")

        # -- two ward PCs, joined ----------------------------------------------------------
        sockets: dict[str, Path] = {}
        for ward in WARDS:
            data = tmp / ward
            data.mkdir(mode=0o700)
            sockets[ward] = tmp / f"{ward}.sock"
            config = tmp / f"{ward}.toml"
            config.write_text(
                f'[service]\nsocket = "{sockets[ward]}"\n[store]\ndata_dir = "{data}"\n'
                f'[policy]\nfile = "{policy}"\n'
                f'[workstation]\ndevice = "managed"\ndevice_id = "{ward}"\n'
                f'[keys]\nsimulators = ["{address}"]\n[cards]\nlock_command = "true"\n'
                f'[organisation]\nservers = ["{url}"]\ntimeout = 10\n'
                '[logging]\nlevel = "warning"\n')
            token = json.loads(_cli(env, admin, "server", "workstation-token", "--name", ward,
                                    "--json"))["token"]
            _cli(env, config, "workstation", "join", "--server", url, "--token-stdin",
                 input=token + "\n")
            services[ward] = _start(["serve", "--config", str(config)], env,
                                    tmp / f"{ward}.log")
        for ward in WARDS:
            try:
                wait_until_serving(sockets[ward], process=services[ward], timeout=START_TIMEOUT)
            except ServiceUnavailable as e:
                raise RuntimeError(f"{ward}: {e}: "
                                   + (tmp / f"{ward}.log").read_text(errors="replace")[-2000:])
        listed = json.loads(_cli(env, admin, "server", "workstations", "--json"))
        names = sorted(w["name"] for w in listed.get("workstations", []))
        check(names == list(WARDS), f"both ward PCs joined with one-time tokens: {names}")

        # -- roaming -----------------------------------------------------------------------
        for ward in WARDS:
            with Client(sockets[ward], timeout=60) as c:
                outcome = c.login("alice", _answering(say, {"PIN": KEY_PIN}),
                                  on_event=_show(say), primary="key")
            check(outcome["ok"], f"{ward}: alice logs in with her key and its PIN")
        with Client(sockets["ward-b"], timeout=60) as c:
            outcome = c.login("alice", _answering(say, {"password": PASSWORD}),
                              on_event=_show(say), primary="password")
        check(outcome["ok"] and outcome["method"] == "password",
              "ward-b: her password alone on this ward PC: no authenticator code asked")
        agent = Agent.open(org_data, environ={}, policy_path=policy)
        try:
            alerts = agent.store.list_events(kind="login.unusual", limit=10)
            from .ceremonies.login import Device, explain_for
            from .policy import explain

            decision = explain_for(agent, "alice",
                                   device=Device("managed", "ward-c", "127.0.0.1", joined=True),
                                   primary="password")
        finally:
            agent.close()
        check(alerts == [], "roaming is not unusual: no login.unusual alert at the new PC")
        say("   policy for alice at another joined ward PC she never used:")
        for line in explain(decision).splitlines():
            say(f"     {line}")
        check(not decision.mfa_required and any("roaming" in r for r in decision.rules),
              "the roaming rule applied: a joined workstation on the trusted network")

        # -- the outage --------------------------------------------------------------------
        check(_stop(server) == 0, "the organisation's server stops (SIGTERM): an outage")
        server = None
        with Client(sockets["ward-b"], timeout=60) as c:
            outcome = c.login("alice", _answering(say, {"PIN": KEY_PIN}), on_event=_show(say),
                              primary="key")
            check(outcome["ok"], "ward-b, offline: alice logs in with her key (seen here "
                                 "recently: the ward's encrypted cache)")
            refused = c.login("alice", _answering(say, {"password": PASSWORD}),
                              on_event=_show(say), primary="password")
        say(f"   refused: {refused.get('message')}")
        check(not refused["ok"] and "key or card" in refused.get("message", ""),
              "ward-b, offline: a password is refused, saying to use a key or card")

        server = start_server()
        check(True, "the server is back")
        agent = Agent.open(org_data, environ={}, policy_path=policy)
        try:
            deadline = time.monotonic() + 40
            arrived = []
            while time.monotonic() < deadline:
                arrived = [e for e in agent.store.list_events(kind="login", limit=100)
                           if e.detail.get("offline") is True]
                if arrived:
                    break
                time.sleep(0.5)
            once = {(e.detail.get("workstation"), e.detail.get("at"), e.outcome)
                    for e in arrived}
            check(len(arrived) >= 1 and len(once) == len(arrived),
                  f"ward-b's queued audit arrived: {len(arrived)} offline login events, each "
                  "once")
            count = agent.store.verify_events()
        finally:
            agent.close()
        check(count > 0, f"the organisation's audit log is intact: {count} hash-chained events")
    finally:
        for proc in services.values():
            _stop(proc)
        _stop(server)
        try:
            key_server.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 (cleaning up whatever state the demo is in)
            pass
        shutil.rmtree(tmp, ignore_errors=True)
