"""Card login through PAM on each card path: ``[cards] driver = "piv"`` (PIV spoken over PC/SC)
against ``driver = "pkcs11"`` (OpenSC's PKCS#11 module), in the same run, with the same card.

    sudo .venv/bin/python benchmarks/bench_card_paths.py [--runs 20] [--json]

Root: it writes a PAM service file into /etc/pam.d (removed at the end) and starts pcscd
itself. One virtual RSA 2048 card (issued by the simulated NHS-style PKI) stays in vpcd's
first reader. Two services run side by side, each with its own store holding the card's
enrolment, one per driver. Each run is one ``pamtester <service> alice authenticate`` process
(PAM ``primary=card``, the card's PIN on standard input), timed from start to exit; the runs
alternate between the two paths (piv, pkcs11, piv, ...), after one warm-up run of each (the
module's C_Initialize, the page cache). Median and p95 of each path.

APDUs per login, counted twice: from pcscd's own trace (``pcscd --foreground --apdu --debug``
when this benchmark starts pcscd: its "APDU:" lines while the run's pamtester runs) and at the
vpcd bridge (every command APDU that reaches the card). A pcscd already running (not started
here) gives no trace: then only the bridge's count is shown, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PIN = "739154"
UUID = "555123456789"
MODULE = ROOT / "pam" / "pam_token_agent.py"
PATHS = ("piv", "pkcs11")
#: how long a pcscd left by a test session (--auto-exit) is waited for, to start a traced one
STRAY_WAIT = 75.0


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile (p95 of 20 runs: the 19th fastest)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p * len(ordered)) - 1))]


def start_traced_pcscd(log: Path) -> subprocess.Popen | None:
    """pcscd with its APDU trace in ``log``, when none runs (one left by a test session with
    --auto-exit is waited for); None when another pcscd keeps running (no trace then)."""
    from simulators.card.pcscd import find_pcscd, running_pcscd

    deadline = time.monotonic() + STRAY_WAIT
    while running_pcscd():
        if time.monotonic() > deadline:
            return None
        time.sleep(1.0)
    out = open(log, "wb")  # noqa: SIM115 (kept open for the child)
    try:
        return subprocess.Popen([find_pcscd() or "pcscd", "--foreground", "--auto-exit", "--apdu",
                                 "--debug"], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()


def count_apdus(log: Path, start: int, end: int) -> int:
    """Command APDUs in pcscd's trace between two offsets of its log."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read(max(0, end - start)).decode(errors="replace")
    return sum(1 for line in text.splitlines() if " APDU: " in line)


def settle(log: Path, quiet: float = 0.3, timeout: float = 5.0) -> int:
    """The trace's size once it has stopped growing for ``quiet`` seconds."""
    size, since = log.stat().st_size, time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = log.stat().st_size
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="logins per path (default 20)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark writes a PAM service file to /etc/pam.d "
                         "and starts pcscd")
    if shutil.which("pamtester") is None or not any(
            Path(d, "pam_python.so").exists()
            for d in ("/lib/security", "/lib/x86_64-linux-gnu/security")):
        raise SystemExit("pamtester or pam_python.so is missing: apt-get install "
                         "libpam-python pamtester")

    from simulators.card.card import VirtualCard
    from simulators.card.issuance import issue_card
    from simulators.card.pcscd import LockedPcscd, Pcscd, wait_for_card
    from simulators.card.pki import init_ca, issuing_cert_path, root_cert_path
    from simulators.card.vpcd import VpcdBridge
    from token_agent.ceremonies.card import set_card_setting
    from token_agent.paths import store_path
    from token_agent.service.client import ServiceUnavailable, wait_until_serving
    from token_agent.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-card-paths-"))
    os.chmod(tmp, 0o755)
    trace = tmp / "pcscd.log"
    pcsc = LockedPcscd(tmp)
    pcsc._take_lock()  # the machine's pcscd and vpcd slots: not while the tests use them
    traced = start_traced_pcscd(trace)
    pam_name = f"token-agent-bench-{secrets.token_hex(4)}"
    pam_file = Path("/etc/pam.d") / pam_name
    services: dict[str, subprocess.Popen] = {}
    bridge = None
    try:
        Pcscd.start(pcsc)  # the lock is held already
        reader = pcsc.reader(0)
        ca = tmp / "ca"
        init_ca(ca)
        card_file = tmp / "alice.card"
        issue_card(ca, name="Dr Alice Smith", uuid=UUID, pin=PIN, out=card_file,
                   algorithm="RSA2048")
        bridge = VpcdBridge(VirtualCard.load(card_file), slot=0)
        bridge.insert()
        wait_for_card(pcsc.context, reader, present=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_AGENT_")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        for driver in PATHS:
            data = tmp / f"data-{driver}"
            data.mkdir(mode=0o700)
            with Store.open(store_path(data)) as store:
                set_card_setting(store, "card_trust_anchors", [str(root_cert_path(ca))])
                set_card_setting(store, "card_intermediates", [str(issuing_cert_path(ca))])
                alice = store.add_user("alice", display_name="Dr Alice Smith")
                store.add_card_identity(alice.id, uuid=UUID, holder_name="Dr Alice Smith")
            sock = tmp / f"{driver}.sock"
            config = tmp / f"{driver}.toml"
            config.write_text(f'[service]\nsocket = "{sock}"\nlogin_socket = ""\n'
                              f'[store]\ndata_dir = "{data}"\n'
                              f'[cards]\nreaders = ["Virtual PCD"]\nlock_command = ""\n'
                              f'driver = "{driver}"\n[logging]\nlevel = "info"\n')
            log = open(tmp / f"{driver}.log", "wb")  # noqa: SIM115
            services[driver] = subprocess.Popen(
                [sys.executable, "-m", "token_agent", "serve", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                wait_until_serving(sock, process=services[driver])
            except ServiceUnavailable as e:
                raise SystemExit(f"the {driver} service did not start: {e}: "
                                 f"{(tmp / f'{driver}.log').read_text()[-2000:]}") from None
        pam_files = {}
        for driver in PATHS:
            pam_files[driver] = f"{pam_name}-{driver}"
            (Path("/etc/pam.d") / pam_files[driver]).write_text(
                f"auth requisite pam_python.so {MODULE} socket={tmp / f'{driver}.sock'} "
                "primary=card\naccount required pam_permit.so\n")

        walls: dict[str, list[float]] = {d: [] for d in PATHS}
        traced_apdus: dict[str, list[int]] = {d: [] for d in PATHS}
        bridge_apdus: dict[str, list[int]] = {d: [] for d in PATHS}
        order = [d for _ in range(args.runs + 1) for d in PATHS]
        for i, driver in enumerate(order):
            before = settle(trace) if traced else 0
            sent = bridge.counts["apdu"]
            t = time.perf_counter()
            run = subprocess.run(["pamtester", pam_files[driver], "alice", "authenticate"],
                                 input=PIN + "\n", capture_output=True, text=True, timeout=60)
            wall = time.perf_counter() - t
            if run.returncode != 0:
                raise SystemExit(f"run {i} ({driver}) failed ({run.returncode}): "
                                 f"{run.stdout}{run.stderr}\n" + "\n".join(
                                     f"--- {d} service ---\n"
                                     f"{(tmp / f'{d}.log').read_text()[-3000:]}" for d in PATHS))
            if i < len(PATHS):
                continue  # one warm-up login on each path
            walls[driver].append(wall * 1000)
            after = settle(trace) if traced else 0
            bridge_apdus[driver].append(bridge.counts["apdu"] - sent)
            if traced:
                traced_apdus[driver].append(count_apdus(trace, before, after))

        results: dict = {"paths": {}}
        for driver in PATHS:
            w = walls[driver]
            results["paths"][driver] = {
                "runs": len(w), "median_ms": round(statistics.median(w), 1),
                "p95_ms": round(percentile(w, 0.95), 1), "min_ms": round(min(w), 1),
                "max_ms": round(max(w), 1),
                "apdus_per_login_pcscd_trace": (statistics.median(traced_apdus[driver])
                                                if traced else None),
                "apdus_per_login_vpcd_bridge": statistics.median(bridge_apdus[driver]),
                "apdus_range_vpcd_bridge": [min(bridge_apdus[driver]),
                                            max(bridge_apdus[driver])]}
        results["apdu_source"] = ("pcscd --apdu trace (and the vpcd bridge)" if traced else
                                  "the vpcd bridge only: a pcscd not started here was running")
        results["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "kernel": platform.release(), "card": "virtual RSA2048 via vpcd",
                              "module": "opensc-pkcs11.so"}
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print(f"pamtester ... alice authenticate (primary=card), {args.runs} runs per path, "
                  "alternating, after one warm-up each")
            for driver, r in results["paths"].items():
                traced_text = ("" if r["apdus_per_login_pcscd_trace"] is None else
                               f"{r['apdus_per_login_pcscd_trace']:g} (pcscd trace), ")
                print(f"  {driver:7s} median {r['median_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms"
                      f"  (min {r['min_ms']:.1f}, max {r['max_ms']:.1f})   APDUs per login: "
                      f"{traced_text}{r['apdus_per_login_vpcd_bridge']:g} (vpcd bridge)")
            print(f"  APDUs counted from: {results['apdu_source']}")
            print(f"  machine: {results['machine']}")
        return 0
    finally:
        for name in list(pam_file.parent.glob(f"{pam_name}*")):
            name.unlink(missing_ok=True)
        for proc in services.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if bridge is not None:
            bridge.remove()
        pcsc.stop()
        if traced is not None and traced.poll() is None:
            os.killpg(traced.pid, signal.SIGTERM)
            try:
                traced.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(traced.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
