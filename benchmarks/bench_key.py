"""Benchmark: makeCredential and getAssertion on the virtual key through python-fido2.

Measures the whole path a host sees: python-fido2's Ctap2 and CtapHidDevice (real CTAPHID
framing) over (a) the in-process connection and (b) the TCP socket transport, against a
virtual key with automatic user presence and no state file (so no fsync per operation).

    python benchmarks/bench_key.py [--iterations N] [--json]

Reports operations per second and median / p95 latency per operation and transport.
The target of issue 2 is getAssertion over the socket at a median of 2 ms or less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fido2.ctap2 import Ctap2  # noqa: E402
from fido2.hid import CtapHidDevice  # noqa: E402

from drivers.fido.sim import SocketHidConnection, sim_descriptor  # noqa: E402
from simulators.key.device import create_virtual_key  # noqa: E402
from simulators.key.transport import KeyServer, open_in_process_device  # noqa: E402

RP = {"id": "bench.example", "name": "Bench"}
USER = {"id": b"bench-user", "name": "bench"}
PARAMS = [{"type": "public-key", "alg": -7}]


def measure(fn, iterations: int) -> dict:
    for _ in range(min(20, iterations)):  # warm-up: caches, TCP slow start, lazy imports
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    times.sort()
    return {
        "iterations": iterations,
        "ops_per_s": round(iterations / total, 1),
        "median_ms": round(statistics.median(times) * 1000, 3),
        "p95_ms": round(times[int(len(times) * 0.95) - 1] * 1000, 3),
    }


def run(device: CtapHidDevice, iterations: int) -> dict:
    ctap = Ctap2(device)
    cdh = os.urandom(32)
    made = ctap.make_credential(cdh, RP, USER, PARAMS)
    cred_id = made.auth_data.credential_data.credential_id
    allow = [{"type": "public-key", "id": cred_id}]
    return {
        "makeCredential": measure(lambda: ctap.make_credential(cdh, RP, USER, PARAMS), iterations),
        "getAssertion": measure(lambda: ctap.get_assertion(RP["id"], cdh, allow), iterations),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    key = create_virtual_key(presence="auto")
    device = open_in_process_device(key)
    try:
        results["in-process"] = run(device, args.iterations)
    finally:
        device.close()

    key = create_virtual_key(presence="auto")
    with KeyServer(key, port=0, control_port=0) as server:
        descriptor = sim_descriptor("127.0.0.1", server.port)
        device = CtapHidDevice(descriptor, SocketHidConnection("127.0.0.1", server.port))
        try:
            results["tcp-socket"] = run(device, args.iterations)
        finally:
            device.close()

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"virtual key benchmark on {results['machine']}")
    print(f"{'transport':<12} {'operation':<15} {'ops/s':>9} {'median ms':>10} {'p95 ms':>8}")
    for transport in ("in-process", "tcp-socket"):
        for op, r in results[transport].items():
            print(f"{transport:<12} {op:<15} {r['ops_per_s']:>9} {r['median_ms']:>10} {r['p95_ms']:>8}")
    target = results["tcp-socket"]["getAssertion"]["median_ms"]
    verdict = "meets" if target <= 2.0 else "MISSES"
    print(f"getAssertion over the socket: median {target} ms ({verdict} the 2 ms target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
