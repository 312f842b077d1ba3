"""The service attacked by ordinary local accounts while clinicians log in (issue 11).

    .venv/bin/python benchmarks/bench_service_abuse.py [--seconds 12] [--logins 40]

Run as root (the attackers are other uids: ``nobody`` and uids with no passwd entry). One
``token-agent serve`` with its store in a temporary directory; for ``--seconds``, at once:

* flood: 2 processes as ``nobody``, each with 2 threads connecting and closing in a loop on
  the public socket (the attack that stopped 19 of 20 PAM logins);
* pipelining: 4 accounts, each writing 800 ``login.start`` at once on one connection, again
  and again (the attack that started a thread per request and killed the accept loop);
* idle connections: 5 accounts each trying to hold 40 connections open;
* audit growth: ``nobody`` sending refused requests naming 7,000-character users, as fast as
  the service answers (the attack that wrote 52 MB in 3 s);

and, beside them, ``--logins`` genuine PAM-style logins (``login.start`` for a user, the
password prompt answered, the result read: what pam_token_agent does) on the login socket,
spread over the run, then as many on the public socket (the PAM module's fallback when the
login socket is out of its reach). Reported: login success (target 100%), latency p50 / p99 /
max, the service's thread count (sampled with ``hello`` every 0.25 s), the store's growth
(database and WAL), the attackers' own figures, and whether the audit chain verifies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

ATTACKER = ROOT / "tests" / "attacker.py"
PASSWORD = "correct horse battery"
NOBODY = 65534
STRANGERS = (61001, 61002, 61003, 61004, 61005)


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered))) - 1))]


def _attacker(uid: int, socket_path: Path, action: str, seconds: float, **options) -> list[str]:
    argv = [sys.executable, str(ATTACKER), "--uid", str(uid), "--socket", str(socket_path),
            "--seconds", str(seconds), action]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def _run(argv: list[str]) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=120)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _store_bytes(data: Path) -> int:
    return sum(p.stat().st_size for p in data.glob("token-agent.db*"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--logins", type=int, default=40)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run it as root: the attackers are other uids")

    from token_agent.agent import Agent
    from token_agent.factors import password as password_factor
    from token_agent.paths import data_dir as resolve_data_dir
    from token_agent.service.client import Client, ServiceError, answers, wait_until_serving

    tmp = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    os.chmod(tmp, 0o755)
    data = tmp / "data"
    data.mkdir(mode=0o700)
    policy = tmp / "policy.toml"
    policy.write_text("[classes.internal]\nenforce = false\n")
    socket_path = tmp / "agent.sock"
    login_socket = tmp / "login.sock"
    service = None
    try:
        agent = Agent.open(resolve_data_dir(data), policy_path=policy)
        for name in ("alice", "nobody"):
            user = agent.store.add_user(name)
            agent.store.update_user(name, mfa_enabled=False)
            password_factor.set_password(agent.factors(), user.id, PASSWORD)
        agent.close()
        config = tmp / "config.toml"
        config.write_text(f'[service]\nsocket = "{socket_path}"\n[store]\ndata_dir = "{data}"\n'
                          f'[policy]\nfile = "{policy}"\n[cards]\nlock_command = "true"\n'
                          '[logging]\nlevel = "warning"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_AGENT_")}
        log = open(tmp / "service.log", "wb")
        service = subprocess.Popen([sys.executable, "-m", "token_agent", "serve", "--config",
                                    str(config)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, cwd=ROOT)
        wait_until_serving(socket_path, process=service)
        with Client(socket_path) as c:
            baseline_threads = c.request("hello")["service"]["threads"]
        store_before = _store_bytes(data)

        stop_at = time.monotonic() + args.seconds
        attackers: dict[str, list[dict]] = {"flood": [], "pipeline": [], "hold": [],
                                            "refused": []}
        guard = threading.Lock()

        def repeat(kind: str, argv_for) -> None:
            while time.monotonic() < stop_at - 0.5:
                out = _run(argv_for(max(0.5, stop_at - time.monotonic())))
                with guard:
                    attackers[kind].append(out)

        jobs = [threading.Thread(target=lambda: attackers["flood"].append(_run(_attacker(
                    NOBODY, socket_path, "flood", args.seconds, threads=2)))) for _ in range(2)]
        def pipeline(uid):
            return lambda left: _attacker(uid, socket_path, "pipeline", min(left, 5), count=800)

        def hold(uid):
            return lambda left: _attacker(uid, socket_path, "hold", min(left, 3), count=40)

        jobs += [threading.Thread(target=repeat, args=("pipeline", pipeline(uid)))
                 for uid in (NOBODY, *STRANGERS[:3])]
        jobs += [threading.Thread(target=repeat, args=("hold", hold(uid))) for uid in STRANGERS]
        jobs.append(threading.Thread(target=repeat, args=("refused", lambda left: _attacker(
            NOBODY, socket_path, "refused", left, name_size=7000))))

        threads_seen: list[int] = []

        def sample() -> None:
            while time.monotonic() < stop_at:
                try:
                    with Client(login_socket, timeout=5) as c:
                        threads_seen.append(c.request("hello")["service"]["threads"])
                except (ServiceError, OSError):
                    pass
                time.sleep(0.25)

        jobs.append(threading.Thread(target=sample))
        for j in jobs:
            j.start()
        time.sleep(0.5)  # the attacks are under way

        results: dict[str, list] = {"login socket": [], "public socket": []}
        spacing = max(0.0, (args.seconds - 1.0) / (2 * args.logins))
        for i in range(2 * args.logins):
            where = "login socket" if i % 2 == 0 else "public socket"
            path = login_socket if i % 2 == 0 else socket_path
            t = time.perf_counter()
            try:
                with Client(path, timeout=30) as c:
                    outcome = c.login("alice", answers(PASSWORD))
                ok = bool(outcome.get("ok"))
                why = None if ok else outcome.get("reason")
            except (ServiceError, OSError) as e:
                ok, why = False, str(e)
            results[where].append((ok, time.perf_counter() - t, why))
            time.sleep(spacing)
        for j in jobs:
            j.join()
        store_after = _store_bytes(data)
        alive = service.poll() is None
        service.send_signal(signal.SIGTERM)
        stopped = service.wait(30)
        service = None
        store_closed = _store_bytes(data)  # the WAL checkpointed into the database at close
        audit = subprocess.run([sys.executable, "-m", "token_agent", "--data-dir", str(data),
                                "audit", "verify"], capture_output=True, text=True, env=env,
                               cwd=ROOT)

        print(f"attacks for {args.seconds:g} s beside {args.logins} + {args.logins} PAM-style "
              "password logins (2 cores)")
        all_ok = True
        for where, rows in results.items():
            lat = [r[1] for r in rows if r[0]]
            okn = sum(1 for r in rows if r[0])
            all_ok &= okn == len(rows)
            print(f"  logins on the {where:13s} {okn}/{len(rows)} ok "
                  f"({100 * okn / max(1, len(rows)):.0f}%)"
                  + (f", p50 {statistics.median(lat) * 1000:.0f} ms, p99 "
                     f"{_percentile(lat, 99) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms"
                     if lat else ""))
            failed = [r[2] for r in rows if not r[0]]
            if failed:
                print(f"    failures: {failed[:3]}")
        print(f"  service threads        {baseline_threads} at rest, at most "
              f"{max(threads_seen, default=0)} under attack ({len(threads_seen)} samples)")
        print(f"  store growth           {(store_closed - store_before) / 1024:.0f} KiB once "
              f"closed ({store_before / 1024:.0f} -> {store_closed / 1024:.0f} KiB); "
              f"{store_after / 1024:.0f} KiB with its WAL while running")
        flood = attackers["flood"]
        print(f"  flood                  {sum(f.get('connected', 0) for f in flood)} connects, "
              f"{sum(f.get('failed', 0) for f in flood)} refused by the kernel")
        codes: dict[str, int] = {}
        for p in attackers["pipeline"]:
            for k, v in p.get("codes", {}).items():
                codes[k] = codes.get(k, 0) + v
        print(f"  pipelined login.start  {sum(codes.values())} answered: {codes}")
        held = attackers["hold"]
        print(f"  idle connections       {sum(h.get('admitted', 0) for h in held)} admitted, "
              f"{sum(h.get('refused', 0) for h in held)} refused, "
              f"{sum(h.get('closed_meanwhile', 0) for h in held)} closed to make room")
        refused = {}
        for r in attackers["refused"]:
            for k, v in r.get("codes", {}).items():
                refused[k] = refused.get(k, 0) + v
        print(f"  refused requests       {sum(refused.values())} answered: {refused}")
        print(f"  service                {'alive' if alive else 'DEAD'} through it; SIGTERM "
              f"exit {stopped}; audit verify: {audit.stdout.strip() or audit.stderr.strip()}")
        with __import__("sqlite3").connect(data / "token-agent.db") as db:
            rows = db.execute("SELECT kind, outcome, COUNT(*) FROM audit_events GROUP BY 1, 2 "
                              "ORDER BY 3 DESC").fetchall()
        print("  audit events           " + ", ".join(f"{k} {o}: {n}" for k, o, n in rows))
        return 0 if all_ok and alive and stopped == 0 and audit.returncode == 0 else 1
    finally:
        if service is not None and service.poll() is None:
            service.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
