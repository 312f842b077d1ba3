"""Benchmark: the store on SQLite and on PostgreSQL, in the same run.

    python benchmarks/bench_store.py [--engines sqlite,postgresql] [--pg-url URL]
                                     [--ops N] [--lockout-ops M] [--procs P] [--dir DIR] [--json]

Three operations, each on every engine given:

* ``totp``: one TOTP verification (``factors.totp.verify``) with a valid code, a new time
  step each time (the clock moves 30 s per verification): the lockout attempt, the check
  that advances the step, and the success (lockout cleared, method touched, audit event);
* ``key_login``: a key login's writes in one transaction: ``record_fido_use`` (a growing
  counter), ``add_session`` and ``record_event``;
* ``lockout``: a contended lockout counter: ``--procs`` processes (8) each count ``M``
  failed guesses on the same scope at once (the transaction ``lockout.attempt`` writes:
  the row made sure of, read under its row lock, counted; without the policy, which would
  lock the scope for good after at most 100 failures);
  the final count is checked to be exact.

For each: ops/s and the latency of one operation (p50, p99), and the ratio between the
engines (postgresql / sqlite). Where the time goes: the key login split into BEGIN, each
call and COMMIT, run as shipped (SQLite ``synchronous=FULL``; PostgreSQL ``fsync=on``,
``synchronous_commit=on``) and once with the commit's flush to disk turned off
(``PRAGMA synchronous=OFF`` / ``SET LOCAL synchronous_commit=off``): the difference is
what the flush costs.

PostgreSQL: ``--pg-url`` names a database (it gets its own uniquely named users); without
it, a throwaway cluster is started with ``tests/pgserver.py`` (Debian's PostgreSQL 15) and
removed at the end; durable (``fsync=on``) when ``PgServer.start`` takes ``durable=True``,
else as the tests run it (``fsync=off``: its commits then do not wait for the disk, which
favours PostgreSQL). The settings the server really runs with are printed with the figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import race_workers  # noqa: E402 (tests/race_workers.py: processes started together)

from token_agent.factors import FactorContext, lockout, totp  # noqa: E402
from token_agent.secretbox import SecretKeys  # noqa: E402
from token_agent.store import Store  # noqa: E402

T0 = 1_700_000_000.0
PHASES = ("begin", "record_fido_use", "add_session", "record_event", "commit")


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def stats(latencies: list[float], wall: float, ops: int) -> dict:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"ops": ops, "ops_per_s": round(ops / wall, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_ms": round(q[98] * 1000, 3)}


def new_user(store: Store, what: str):
    return store.add_user(f"bench-{what}-{uuid.uuid4().hex[:12]}")


# --------------------------------------------------------------------------- the operations


def bench_totp(target: str, ops: int) -> dict:
    clock = Clock()
    with Store.open(target, clock=clock) as store:
        ctx = FactorContext(store, SecretKeys(secrets.token_bytes(32)), clock=clock)
        user = new_user(store, "totp")
        e = totp.begin_enrol(ctx, user.id)
        assert totp.confirm_enrol(ctx, user.id, totp.code_at(e.secret, clock.t)).ok
        codes = [totp.code_at(e.secret, clock.t + 30 * (i + 1)) for i in range(ops)]
        latencies = []
        start = time.perf_counter()
        for code in codes:
            clock.t += 30
            t = time.perf_counter()
            result = totp.verify(ctx, user.id, code)
            latencies.append(time.perf_counter() - t)
            if not result.ok:
                raise SystemExit(f"bench_store: a valid TOTP code was refused: {result.message}")
        return stats(latencies, time.perf_counter() - start, ops)


def no_flush(store: Store, engine: str) -> None:
    """Inside a transaction: commit without waiting for the disk (for the breakdown)."""
    if engine == "postgresql":
        with store.connection("benchmark: commit without flush") as conn:
            conn.execute("SET LOCAL synchronous_commit = off")


def bench_key_login(target: str, engine: str, ops: int, flush: bool = True) -> dict:
    with Store.open(target) as store:
        user = new_user(store, "key")
        credential_id = secrets.token_bytes(32)
        store.add_fido_credential(
            user.id, name="key", credential_id=credential_id, public_key=b"\xa1\x01\x02",
            aaguid=uuid.uuid4().bytes, rp_id="bench.nhs.example", sign_count=0,
            discoverable=True, uv_enrolled=True, attestation_format="none",
            attestation_trusted=False)
        if engine == "sqlite" and not flush:
            with store.connection("benchmark: no flush") as conn:
                conn.execute("PRAGMA synchronous = OFF")
        phases: dict[str, list[float]] = {p: [] for p in PHASES}
        latencies = []
        start = time.perf_counter()
        for i in range(ops):
            t0 = time.perf_counter()
            tx = store.transaction()
            tx.__enter__()
            try:
                if not flush:
                    no_flush(store, engine)
                t1 = time.perf_counter()
                store.record_fido_use(credential_id, i + 1)
                t2 = time.perf_counter()
                store.add_session(uuid.uuid4().hex, user.id, method="key")
                t3 = time.perf_counter()
                store.record_event("login.key", user_id=user.id, credential_id=credential_id,
                                   outcome="success", detail={"method": "key"})
                t4 = time.perf_counter()
            except BaseException:
                tx.__exit__(*sys.exc_info())
                raise
            tx.__exit__(None, None, None)
            t5 = time.perf_counter()
            for name, a, b in zip(PHASES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
                phases[name].append(b - a)
            latencies.append(t5 - t0)
        result = stats(latencies, time.perf_counter() - start, ops)
        result["phases_ms"] = {p: round(statistics.mean(v) * 1000, 3) for p, v in phases.items()}
        if store.get_fido_credential(credential_id).sign_count != ops:
            raise SystemExit("bench_store: the signature counter did not end at the last value")
        return result


def _hammer(store: Store, user_id: str, scope: str, ops: int) -> tuple[float, float, list[float]]:
    """One contender (a child process): ``ops`` failed guesses; when it started and ended
    (``time.monotonic``: one clock for every process) and the latency of each guess."""
    out = []
    begin = time.monotonic()
    for _ in range(ops):
        t = time.perf_counter()
        # what lockout.attempt() writes, without its policy (which would lock the scope
        # after at most 100 failures): the row made sure of, read under its row lock with
        # its unfamiliar twin's, counted, in one transaction
        with store.transaction():
            store.ensure_lockout(scope, user_id)
            store.lock_lockouts((scope, lockout.unfamiliar(scope)))
            store.count_lockout_failure(scope, now=T0, level=0)
        out.append(time.perf_counter() - t)
    return begin, time.monotonic(), out


def bench_lockout(target: str, ops: int, procs: int) -> dict:
    with Store.open(target) as store:
        user = new_user(store, "lockout")
        scope = lockout.password_scope(user.id)
        results = race_workers.race(target, _hammer, [(user.id, scope, ops)] * procs)
        failures = lockout.state(store, scope).failures
    # from the first guess of any process to the last (not the processes' start-up)
    wall = max(end for _, end, _ in results) - min(begin for begin, _, _ in results)
    result = stats([x for _, _, r in results for x in r], wall, ops * procs)
    result["count_exact"] = failures == ops * procs
    if not result["count_exact"]:
        raise SystemExit(f"bench_store: lockout count {failures}, expected {ops * procs}")
    return result


# --------------------------------------------------------------------------- engines


class Engines:
    """The targets to open, one per engine; cleans up what it started."""

    def __init__(self, parent: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-store-", dir=parent))
        self.pg = None
        self.notes: dict[str, str] = {}

    def sqlite(self) -> str:
        self.notes["sqlite"] = (f"SQLite {sqlite3.sqlite_version}, WAL, synchronous=FULL, "
                                f"file in {self.dir}")
        return str(self.dir / "bench.db")

    def postgresql(self, url: str | None) -> str:
        if url is None:
            try:
                from pgserver import PgServer  # tests/pgserver.py
            except ImportError as exc:
                raise SystemExit(
                    f"bench_store: cannot start a PostgreSQL cluster ({exc}): it needs "
                    "tests/pgserver.py and Debian's postgresql (scripts/setup.sh); or give "
                    "--pg-url postgresql://...") from None
            base = self.dir / "pg"
            base.mkdir()
            os.chmod(self.dir, 0o711)
            os.chmod(base, 0o711)
            # as shipped (commits wait for the disk), not as the tests run it, when
            # PgServer.start can ("durable"); what the server really does is printed
            durable = "durable" in inspect.signature(PgServer.start).parameters
            self.pg = PgServer.start(base, **({"durable": True} if durable else {}))
            self.pg.create_database("bench")
            url = self.pg.url("bench")
        self.notes["postgresql"] = "PostgreSQL, " + self._pg_settings(url)
        return url

    @staticmethod
    def _pg_settings(url: str) -> str:
        try:
            import psycopg
        except ImportError as exc:
            raise SystemExit(f"bench_store: PostgreSQL needs psycopg ({exc})") from None
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            shown = [f"{name}={conn.execute(f'SHOW {name}').fetchone()[0]}"
                     for name in ("fsync", "synchronous_commit", "full_page_writes")]
        return ", ".join([version, *shown])

    def close(self) -> None:
        import shutil

        try:
            if self.pg is not None:
                self.pg.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="sqlite,postgresql",
                    help="comma-separated: sqlite, postgresql (default: both)")
    ap.add_argument("--pg-url", help="a PostgreSQL database to use (default: a throwaway cluster)")
    ap.add_argument("--ops", type=int, default=1000, help="TOTP verifications and key logins")
    ap.add_argument("--lockout-ops", type=int, default=200, help="failed guesses per process")
    ap.add_argument("--procs", type=int, default=8, help="processes on the lockout counter")
    ap.add_argument("--dir", help="where the SQLite file (and a started cluster) go "
                                  "(default: the system's temporary directory; not a tmpfs, "
                                  "or the flush costs nothing)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"sqlite", "postgresql"}
    if unknown or not engines:
        ap.error(f"--engines: sqlite and/or postgresql, not {sorted(unknown) or 'nothing'}")

    where = Engines(args.dir)
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                f"Python {platform.python_version()}",
                     "load_average": [round(x, 2) for x in os.getloadavg()], "engines": {}}
    try:
        for engine in engines:
            target = where.sqlite() if engine == "sqlite" else where.postgresql(args.pg_url)
            results["engines"][engine] = {
                "settings": where.notes[engine],
                "totp": bench_totp(target, args.ops),
                "key_login": bench_key_login(target, engine, args.ops),
                "key_login_no_flush": bench_key_login(target, engine, args.ops, flush=False),
                "lockout": bench_lockout(target, args.lockout_ops, args.procs),
            }
    finally:
        where.close()
    if {"sqlite", "postgresql"} <= set(results["engines"]):
        s, p = results["engines"]["sqlite"], results["engines"]["postgresql"]
        results["ratio_postgresql_to_sqlite"] = {
            op: {"ops_per_s": round(p[op]["ops_per_s"] / s[op]["ops_per_s"], 2),
                 "p99": round(p[op]["p99_ms"] / s[op]["p99_ms"], 2)}
            for op in ("totp", "key_login", "lockout")}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    report(results, args)
    return 0


def report(results: dict, args) -> None:
    print(f"the store on {results['machine']}, load average {results['load_average'][0]} "
          f"({args.ops} TOTP verifications and key logins; {args.procs} processes x "
          f"{args.lockout_ops} failed guesses on one lockout counter)")
    for engine, r in results["engines"].items():
        print(f"  {engine}: {r['settings']}")
    print(f"  {'operation':<22} {'engine':<11} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for op, label in (("totp", "TOTP verification"), ("key_login", "key-login write set"),
                      ("lockout", f"lockout, {args.procs} procs")):
        for engine, r in results["engines"].items():
            x = r[op]
            print(f"  {label:<22} {engine:<11} {x['ops_per_s']:>9.1f} {x['p50_ms']:>8.2f} "
                  f"{x['p99_ms']:>8.2f}")
    ratio = results.get("ratio_postgresql_to_sqlite")
    if ratio:
        print("  postgresql / sqlite: " + "; ".join(
            f"{op} ops/s x{v['ops_per_s']}, p99 x{v['p99']}" for op, v in ratio.items()))
    print("  where a key login's time goes (mean ms per login; 'no flush': the commit does not "
          "wait for the disk):")
    print(f"  {'engine':<22} " + " ".join(f"{p:>15}" for p in PHASES) + f" {'total':>8}")
    for engine, r in results["engines"].items():
        for key, label in (("key_login", engine), ("key_login_no_flush", f"{engine} no flush")):
            ph = r[key]["phases_ms"]
            print(f"  {label:<22} " + " ".join(f"{ph[p]:>15.3f}" for p in PHASES)
                  + f" {sum(ph.values()):>8.3f}")


if __name__ == "__main__":
    sys.exit(main())
