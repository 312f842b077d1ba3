"""Benchmark: a shift change at an organisation (issue 15), every part its own process.

    .venv/bin/python benchmarks/bench_organisation.py [--users 2000] [--workstations 20]
        [--keys-per-workstation 5] [--concurrency 40] [--replicas 2] [--json]

Set-up (tests/orgcluster.py, as the cluster tests use it): a throwaway PostgreSQL 15
cluster (tests/pgserver.py), ``--replicas`` server replicas (``token-agent server run``),
``--workstations`` workstation services (``token-agent serve``, each joined with a token),
and the keys: ``--keys-per-workstation`` virtual keys per workstation (PIN on, automatic
touch), all served by one separate process; ``--users`` users, each with one key credential
enrolled through the library on the organisation's store, on a key of "their" workstation
(user i at workstation i mod W; at most 20 users per key: the simulator keeps 25 resident
credentials).

The burst: every user logs in once with their key (PIN typed, touch automatic) at their
workstation, ``--concurrency`` logins in flight at a time across the workstations (about
``concurrency / workstations`` per workstation: people at a ward's PCs). A login is timed
from ``login.start`` on the workstation's socket to its result; it goes through the
ceremony channel to a replica (the server verifies the assertion against the global
counter, decides and writes the audit).

Figures: sustained logins/s over the burst, latency p50/p95/p99/max, the CPU each part
used (from /proc: utime+stime of the replicas, the workstation services, the keys'
process, PostgreSQL's processes, this process), server CPU per login (the replicas'),
and the organisation's ``login`` audit events that arrived against the logins the
workstations saw succeed (all of them, none doubled), then ``audit verify``.

Target (issue 15): 200 logins/s with p99 below 150 ms on a 2-core machine.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PIN = "246810"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- keys' process


def serve_keys(count: int, port_file: Path) -> None:
    """The keys' process: ``count`` virtual keys (PIN set) on loopback until SIGTERM."""
    from fido2.ctap2 import Ctap2
    from fido2.ctap2.pin import ClientPin

    from simulators.key import KeyServer, create_virtual_key
    from simulators.key.transport import open_tcp_device

    servers = [KeyServer(create_virtual_key(presence="auto"), port=0, control_port=None)
               for _ in range(count)]
    for s in servers:
        s.__enter__()
        device = open_tcp_device("127.0.0.1", s.port)
        try:
            ClientPin(Ctap2(device)).set_pin(PIN)
        finally:
            device.close()
    port_file.write_text(json.dumps([s.port for s in servers]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    for s in servers:
        s.__exit__(None, None, None)


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), in seconds; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def children_of(pid: int) -> list[int]:
    """Every process whose parent is ``pid`` (PostgreSQL's backends under the postmaster)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


class CpuMeter:
    """CPU seconds per part, between ``start()`` and ``stop()`` (processes that appear in
    between, PostgreSQL's new backends, are counted from zero)."""

    def __init__(self, parts: dict[str, callable]) -> None:
        self.parts = parts  # name -> () -> list of pids
        self.before: dict[str, dict[int, float]] = {}
        self.used: dict[str, float] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        return {name: {pid: cpu_seconds(pid) for pid in pids()}
                for name, pids in self.parts.items()}

    def start(self) -> None:
        self.before = self._sample()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        self.used = {name: sum(v - self.before.get(name, {}).get(pid, 0.0)
                               for pid, v in after[name].items())
                     for name in after}
        return self.used


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered))) - 1))]


# --------------------------------------------------------------------------- the run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--workstations", type=int, default=20)
    ap.add_argument("--keys-per-workstation", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=40)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--workers", type=int, default=16, help="each replica's worker threads")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    ap.add_argument("--log-level", default="warning",
                    help="the replicas' and services' log level (info: every login logged)")
    ap.add_argument("--serve-keys", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_keys:
        serve_keys(args.serve_keys, args.port_file)
        return 0

    from drivers.fido.keys import open_single_key
    from orgcluster import start_cluster
    from pgserver import PgServer
    from token_agent.ceremonies.key import enrol_key

    per_key = -(-args.users // (args.workstations * args.keys_per_workstation))
    if per_key > 20:
        raise SystemExit(f"{per_key} users per key: more than 20 (the simulator keeps 25 "
                         "resident credentials); raise --keys-per-workstation")
    tmp = Path(tempfile.mkdtemp(prefix="bench-org-"))
    tmp.chmod(0o755)
    pg = keys_proc = cluster = None
    keep = False  # the cluster's logs are kept when a login failed
    t0 = time.monotonic()
    try:
        pg = PgServer.start(tmp / "pg")
        nkeys = args.workstations * args.keys_per_workstation
        port_file = tmp / "ports.json"
        keys_proc = subprocess.Popen([sys.executable, __file__, "--serve-keys", str(nkeys),
                                      "--port-file", str(port_file)], start_new_session=True)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if time.monotonic() > deadline or keys_proc.poll() is not None:
                raise SystemExit("the keys' process did not start")
            time.sleep(0.1)
        ports = json.loads(port_file.read_text())
        names = [f"ws{i + 1}" for i in range(args.workstations)]  # as start_cluster names them
        keys_at = {ws: [f"127.0.0.1:{p}" for p in
                        ports[i * args.keys_per_workstation:(i + 1) * args.keys_per_workstation]]
                   for i, ws in enumerate(names)}
        cluster = start_cluster(pg, replicas=args.replicas, workstations=args.workstations,
                                policy='[reverification]\ntrusted_networks = ["127.0.0.0/8"]\n',
                                key_addresses=keys_at, card_reader_at=None,
                                workers=args.workers, log_level=args.log_level)
        print(f"set-up: PostgreSQL, {args.replicas} replicas, {args.workstations} "
              f"workstations joined, {nkeys} keys: {time.monotonic() - t0:.1f} s")

        # users, each with a credential on a key of their workstation
        t1 = time.monotonic()
        users: list[tuple[str, str]] = []  # (user, workstation)
        with cluster.agent() as agent:
            store = agent.store
            for i in range(args.users):
                ws = names[i % args.workstations]
                key = keys_at[ws][(i // args.workstations) % args.keys_per_workstation]
                user = f"clinician{i:04d}"
                store.add_user(user)
                with open_single_key({"TOKEN_AGENT_SIM_KEYS": key}, on_touch=None) as k:
                    enrol_key(store, k, user, name="key", pin_provider=lambda: PIN)
                users.append((user, ws))
            before_ids = {e.id for e in store.list_events(kind="login", limit=10_000_000)}
        print(f"set-up: {args.users} users enrolled: {time.monotonic() - t1:.1f} s")

        replica_pids = [r.proc.pid for r in cluster.replicas]
        service_pids = [w.proc.pid for w in cluster.workstations.values()]
        postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
        meter = CpuMeter({
            "replicas": lambda: replica_pids,
            "workstation services": lambda: service_pids,
            "keys (simulators)": lambda: [keys_proc.pid],
            "postgresql": lambda: [postmaster, *children_of(postmaster)],
            "load generator": lambda: [os.getpid()],
        })

        latencies: list[float] = []
        failures: list[dict] = []
        lock = threading.Lock()

        def one(item: tuple[str, str]) -> None:
            # a connection per login, as PAM makes one (a kept one would be closed by the
            # service after 60 s without a request)
            user, ws = item
            started = time.perf_counter()
            try:
                with cluster.workstations[ws].client(timeout=60) as client:
                    outcome = client.login(user, lambda _e: PIN, primary="key")
            except Exception as e:  # noqa: BLE001  (no result: counted)
                outcome = {"ok": False, "reason": "no-result",
                           "message": f"{type(e).__name__}: {e}"}
            elapsed = time.perf_counter() - started
            with lock:
                if outcome["ok"]:
                    latencies.append(elapsed)
                else:
                    failures.append({**outcome, "user": user, "workstation": ws})

        meter.start()
        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, users))
        wall = time.monotonic() - started
        used = meter.stop()

        ok = len(latencies)
        with cluster.agent() as agent:
            arrived = [e for e in agent.store.list_events(kind="login", limit=10_000_000)
                       if e.id not in before_ids and e.outcome == "success"]
        audit = cluster.admin("audit", "verify", check=False)
        server_cpu = used["replicas"]
        figures = {
            "users": args.users, "workstations": args.workstations, "replicas": args.replicas,
            "concurrency": args.concurrency, "keys": nkeys, "cpus": os.cpu_count(),
            "wall_s": round(wall, 2), "logins_ok": ok, "logins_failed": len(failures),
            "logins_per_s": round(ok / wall, 1) if wall else 0.0,
            "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
            "p95_ms": round(_percentile(latencies, 95) * 1000, 1) if latencies else None,
            "p99_ms": round(_percentile(latencies, 99) * 1000, 1) if latencies else None,
            "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
            "server_cpu_ms_per_login": round(server_cpu / ok * 1000, 2) if ok else None,
            "cpu_s": {k: round(v, 2) for k, v in used.items()},
            "audit_events_arrived": len(arrived),
            "audit_verify_exit": audit.returncode,
        }
        print(f"burst: {args.users} logins, {args.concurrency} in flight, "
              f"{args.workstations} workstations, {args.replicas} replicas, "
              f"{os.cpu_count()} CPUs: {wall:.1f} s")
        print(f"  logins ok              {ok} ({figures['logins_per_s']}/s), "
              f"failed {len(failures)}")
        if latencies:
            print(f"  latency p50/p95/p99    {figures['p50_ms']} / {figures['p95_ms']} / "
                  f"{figures['p99_ms']} ms (max {figures['max_ms']} ms)")
        print(f"  server CPU per login   {figures['server_cpu_ms_per_login']} ms "
              f"(the replicas' utime+stime / logins)")
        print("  CPU used, by part (s)  " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1])))
        total = sum(used.values())
        if ok and total:
            print(f"  CPU per login, all     {total / ok * 1000:.1f} ms "
                  f"({total / wall:.2f} of {os.cpu_count()} CPUs busy)")
        print(f"  audit events arrived   {len(arrived)} successful logins recorded, "
              f"{ok} seen: {'all, none doubled' if len(arrived) == ok else 'MISMATCH'}")
        print(f"  audit verify           exit {audit.returncode}: "
              f"{(audit.stdout or audit.stderr).strip()[:200]}")
        if failures:
            reasons: dict[str, int] = {}
            for f in failures:
                reasons[f.get("reason") or "?"] = reasons.get(f.get("reason") or "?", 0) + 1
            print(f"  failures by reason     {reasons}")
            messages: dict[str, int] = {}
            for f in failures:
                m = str(f.get("message"))[:90]
                messages[m] = messages.get(m, 0) + 1
            for m, n in sorted(messages.items(), key=lambda kv: -kv[1])[:5]:
                print(f"    {n:4d} x {m}")
            print(f"  first failure          {failures[0].get('reason')}: "
                  f"{failures[0].get('message')} ({failures[0].get('user')} at "
                  f"{failures[0].get('workstation')})")
            keep = True
        if args.json:
            print(json.dumps(figures, indent=2))
        return 0 if audit.returncode == 0 and len(arrived) == ok and not failures else 1
    finally:
        if cluster is not None:
            for ws in cluster.workstations.values():
                ws.stop()
            for r in cluster.replicas:
                r.stop(timeout=10)
            import shutil

            if keep:
                print(f"  the replicas' and workstations' logs are kept in {cluster.base}")
            else:
                shutil.rmtree(cluster.base, ignore_errors=True)
        if keys_proc is not None:
            keys_proc.send_signal(signal.SIGTERM)
            try:
                keys_proc.wait(10)
            except subprocess.TimeoutExpired:
                keys_proc.kill()
        if pg is not None:
            pg.remove()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
