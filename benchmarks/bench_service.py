"""The service under load: concurrent key logins for many users over its socket.

    .venv/bin/python benchmarks/bench_service.py [--users 40] [--clients 8] [--seconds 20]

Set-up: ``--users`` virtual FIDO2 keys (automatic touch, each with a PIN) served by a
separate process (``--serve-keys``), one user per key, each user's key enrolled through the
agent's library; then ``token-agent serve`` as its own process, with every key configured.
Load: ``--clients`` client threads, each with its own connection, log users in one after
another (round robin over the users, so no two clients log the same user in at once) for
``--seconds``: ``login.start`` with the key as primary factor, the PIN prompt answered, the
result awaited. Every login's wall time is measured from ``login.start`` to its result.

Afterwards the audit log must verify (``token-agent audit verify``), and it must hold exactly
one successful ``login`` event per login the clients saw succeed: none lost, none doubled.

Target (issue 7): 200 logins/s with p99 under 50 ms on the CI machine (2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PIN = "246810"


def serve_keys(count: int, port_file: Path) -> None:
    """The keys' process: ``count`` virtual keys on loopback until SIGTERM."""
    from simulators.key import KeyServer, create_virtual_key

    servers = [KeyServer(create_virtual_key(presence="auto"), port=0, control_port=None)
               for _ in range(count)]
    for s in servers:
        s.__enter__()
    port_file.write_text(json.dumps([s.port for s in servers]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    for s in servers:
        s.__exit__(None, None, None)


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered))) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--profile", type=Path, help="write the service's cProfile stats here")
    ap.add_argument("--serve-keys", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_keys:
        serve_keys(args.serve_keys, args.port_file)
        return 0

    from fido2.ctap2 import Ctap2
    from fido2.ctap2.pin import ClientPin
    from fido2.hid import CtapHidDevice

    from drivers.fido.discovery import SIM_KEYS_ENV
    from drivers.fido.keys import open_single_key
    from drivers.fido.sim import SocketHidConnection, sim_descriptor
    from token_agent.ceremonies.key import enrol_key
    from token_agent.paths import store_path
    from token_agent.service.client import Client, ServiceUnavailable, wait_until_serving
    from token_agent.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    os.chmod(tmp, 0o755)
    port_file = tmp / "ports.json"
    keys_proc = subprocess.Popen([sys.executable, __file__, "--serve-keys", str(args.users),
                                  "--port-file", str(port_file)], start_new_session=True)
    service = None
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if time.monotonic() > deadline or keys_proc.poll() is not None:
                raise SystemExit("the keys' process did not start")
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        addresses = [f"127.0.0.1:{p}" for p in ports]

        data = tmp / "data"
        data.mkdir(mode=0o700)
        users = [f"clinician{i:03d}" for i in range(args.users)]
        t0 = time.perf_counter()
        with Store.open(store_path(data)) as store:
            for user, port, address in zip(users, ports, addresses):
                holder = CtapHidDevice(sim_descriptor("127.0.0.1", port),
                                       SocketHidConnection("127.0.0.1", port))
                ClientPin(Ctap2(holder)).set_pin(PIN)
                holder.close()
                store.add_user(user)
                with open_single_key({SIM_KEYS_ENV: address}, on_touch=None) as key:
                    enrol_key(store, key, user, name="key", pin_provider=lambda: PIN)
        print(f"set-up: {args.users} keys with PINs, one enrolled per user, "
              f"{time.perf_counter() - t0:.1f} s")

        socket_path = tmp / "agent.sock"
        config = tmp / "config.toml"
        config.write_text(f'[service]\nsocket = "{socket_path}"\n[store]\ndata_dir = "{data}"\n'
                          f'[keys]\nsimulators = {json.dumps(addresses)}\n'
                          '[logging]\nlevel = "warning"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_AGENT_")}
        service_log = open(tmp / "service.log", "wb")
        profile = ["-m", "cProfile", "-o", str(args.profile)] if args.profile else []
        service = subprocess.Popen([sys.executable, *profile, "-m", "token_agent", "serve",
                                    "--config", str(config)], stdout=service_log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_until_serving(socket_path, process=service)
        except ServiceUnavailable as e:
            raise SystemExit(f"the service did not start: {e}: {(tmp / 'service.log').read_text()[-2000:]}")

        # warm-up: one login per user (the service meets each key once)
        with Client(socket_path, timeout=60) as c:
            for user in users:
                outcome = c.login(user, lambda _e: PIN, primary="key")
                if not outcome["ok"]:
                    raise SystemExit(f"warm-up login of {user} failed: {outcome}")
        warmup = len(users)

        latencies: list[float] = []
        failures: list[dict] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds
        started = time.monotonic()

        def client_loop(index: int) -> None:
            mine = users[index::args.clients]
            with Client(socket_path, timeout=60) as c:
                i = 0
                while time.monotonic() < stop_at:
                    user = mine[i % len(mine)]
                    i += 1
                    t = time.perf_counter()
                    outcome = c.login(user, lambda _e: PIN, primary="key")
                    elapsed = time.perf_counter() - t
                    with lock:
                        (latencies if outcome["ok"] else failures).append(
                            elapsed if outcome["ok"] else outcome)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started

        service.send_signal(signal.SIGTERM)
        service.wait(30)
        service = None
        with Store.open(store_path(data)) as store:
            verified = store.verify_events()
            logged = sum(1 for e in store.list_events(kind="login", limit=10_000_000)
                         if e.outcome == "success")
        audit = subprocess.run([sys.executable, "-m", "token_agent", "--data-dir", str(data),
                                "audit", "verify"], capture_output=True, text=True, env=env)
        ok = len(latencies)
        print(f"load: {args.clients} clients, {args.users} users/keys, {wall:.1f} s")
        print(f"  logins ok              {ok} ({ok / wall:.0f}/s), failed {len(failures)}")
        if latencies:
            print(f"  latency p50            {statistics.median(latencies) * 1000:.1f} ms")
            print(f"  latency p99            {_percentile(latencies, 99) * 1000:.1f} ms")
            print(f"  latency max            {max(latencies) * 1000:.1f} ms")
        print(f"  audit verify           {audit.stdout.strip() or audit.stderr.strip()} "
              f"(exit {audit.returncode}); {verified} events")
        expected = ok + warmup
        print(f"  login events           {logged} successful, expected {expected}: "
              f"{'none lost or doubled' if logged == expected else 'MISMATCH'}")
        if failures:
            print(f"  first failure          {failures[0].get('reason')}: {failures[0].get('message')}")
        return 0 if audit.returncode == 0 and logged == expected and not failures else 1
    finally:
        if service is not None and service.poll() is None:
            service.kill()
        keys_proc.send_signal(signal.SIGTERM)
        try:
            keys_proc.wait(10)
        except subprocess.TimeoutExpired:
            keys_proc.kill()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
