"""Benchmark: the virtual smartcard behind the real pcscd.

1. APDU round trip: pyscard's SCardTransmit -> pcscd -> vsmartcard's vpcd -> the bridge
   (simulators.card.vpcd) -> the virtual card, and back; median and p99 over N APDUs of two
   kinds: VERIFY without data (the PIN retries query, 2-byte answer) and GET DATA of the
   CHUID (a short object); and the authentication certificate (about 1.2 KB: one GET DATA
   and four GET RESPONSEs, timed as a whole). With ``--no-quickack`` as well: the same without TCP_QUICKACK,
   to show the ~40 ms delayed-ACK trap it avoids.
2. Insertion seen by a PC/SC client: from the bridge's connect to SCardGetStatusChange
   reporting SCARD_STATE_PRESENT (and removal: disconnect to SCARD_STATE_EMPTY), median of M
   insertions, with a random pause between them so that pcscd's 400 ms presence poll is met
   at a random phase, as a person inserting a card would.

    python benchmarks/bench_card.py [--apdus 2000] [--insertions 20] [--no-quickack] [--json]

Needs pcscd with vsmartcard-vpcd: the one running, or (as root) one it starts itself, as the
test suite does (tests/pcsc_helpers.py). Targets (issue 4): 0.5 ms median APDU round trip,
300 ms insertion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pcsc_helpers import (  # noqa: E402
    CardConnection,
    PcscdService,
    PcscdUnavailable,
    wait_for_card,
)
from simulators.card.vpcd import VpcdBridge  # noqa: E402

SELECT_PIV = bytes.fromhex("00A4040009A0000003080000100000")
VERIFY_STATUS = bytes.fromhex("0020008000")
GET_CHUID = bytes.fromhex("00CB3FFF055C035FC10200")
GET_AUTH_CERT = bytes.fromhex("00CB3FFF055C035FC10500")


def issue(directory: Path) -> Path:
    """A freshly issued card file (RSA 2048, PIN 1234)."""
    from simulators.card.issuance import issue_card
    from simulators.card.pki import init_ca

    init_ca(directory / "ca")
    path = directory / "bench.card"
    issue_card(directory / "ca", name="Dr Bench Mark", uuid="555000000042", pin="1234",
               out=path)
    return path


def load(path: Path):
    from simulators.card.card import VirtualCard

    return VirtualCard.load(path)


def stats(times: list[float]) -> dict:
    times = sorted(times)
    n = len(times)
    return {
        "n": n,
        "median_ms": round(statistics.median(times) * 1000, 3),
        "p95_ms": round(times[max(0, int(n * 0.95) - 1)] * 1000, 3),
        "p99_ms": round(times[max(0, int(n * 0.99) - 1)] * 1000, 3),
        "max_ms": round(times[-1] * 1000, 3),
    }


def bench_apdus(service: PcscdService, card_path: Path, apdus: int, quickack: bool) -> dict:
    reader = service.reader(0)
    bridge = VpcdBridge(load(card_path), quickack=quickack)
    bridge.insert()
    try:
        wait_for_card(service.context, reader)
        results = {}
        with CardConnection(service.context, reader) as conn:
            data, sw = conn.transmit(SELECT_PIV)
            assert sw == 0x9000, hex(sw)
            for name, apdu, chained in (
                    ("VERIFY (retries query)", VERIFY_STATUS, False),
                    ("GET DATA (CHUID)", GET_CHUID, False),
                    ("GET DATA (auth. certificate, 61xx chained)", GET_AUTH_CERT, True)):
                count = apdus if quickack else max(20, apdus // 50)
                if chained:
                    count = max(20, count // 4)
                send = (lambda a: conn.transmit(a)) if chained else conn.transmit_raw
                for _ in range(min(20, count)):  # warm-up
                    send(apdu)
                times = []
                for _ in range(count):
                    t0 = time.perf_counter()
                    response = send(apdu)
                    times.append(time.perf_counter() - t0)
                if chained:
                    data, sw = response
                    sw = f"{sw:04X} ({len(data)} bytes)"
                else:
                    sw = response[-2:].hex().upper()
                results[name] = {**stats(times), "sw": sw}
        return results
    finally:
        bridge.remove()


def bench_insertion(service: PcscdService, card_path: Path, insertions: int) -> dict:
    reader = service.reader(0)
    card = load(card_path)
    inserted, removed = [], []
    rng = random.SystemRandom()
    for _ in range(insertions):
        wait_for_card(service.context, reader, present=False)
        time.sleep(rng.uniform(0, 0.4))  # a random phase of pcscd's 400 ms poll
        bridge = VpcdBridge(card)
        t0 = time.perf_counter()
        bridge.insert()
        wait_for_card(service.context, reader, present=True)
        inserted.append(time.perf_counter() - t0)
        time.sleep(rng.uniform(0, 0.4))
        t0 = time.perf_counter()
        bridge.remove()
        wait_for_card(service.context, reader, present=False)
        removed.append(time.perf_counter() - t0)
    return {"insertion": stats(inserted), "removal": stats(removed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apdus", type=int, default=2000)
    parser.add_argument("--insertions", type=int, default=20)
    parser.add_argument("--no-quickack", action="store_true",
                        help="also measure APDUs without TCP_QUICKACK (the 40 ms trap)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-card-") as tmp:
        tmp_path = Path(tmp)
        service = PcscdService(tmp_path / "pcscd")
        try:
            service.start()
        except PcscdUnavailable as e:
            print(f"bench_card: pcscd with vsmartcard-vpcd is needed: {e}", file=sys.stderr)
            return 2
        try:
            card_path = issue(tmp_path)
            results: dict = {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                           f"Python {platform.python_version()}",
                "pcscd": "started by the benchmark" if service.started_here else "already running",
                "apdu_round_trip": bench_apdus(service, card_path, args.apdus, True),
            }
            if args.no_quickack:
                results["apdu_round_trip_without_quickack"] = bench_apdus(
                    service, card_path, args.apdus, False)
            results.update(bench_insertion(service, card_path, args.insertions))
        finally:
            service.stop()

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"machine: {results['machine']}; pcscd {results['pcscd']}")
    print("APDU round trip, pyscard -> pcscd -> vpcd -> virtual card (target: median <= 0.5 ms)")
    for key in ("apdu_round_trip", "apdu_round_trip_without_quickack"):
        for name, r in results.get(key, {}).items():
            label = name + (" without TCP_QUICKACK" if "without" in key else "")
            print(f"  {label:60s} n={r['n']:5d}  median {r['median_ms']:8.3f} ms  "
                  f"p99 {r['p99_ms']:8.3f} ms  max {r['max_ms']:8.3f} ms  SW {r['sw']}")
    for name, target in (("insertion", " (target: <= 300 ms)"), ("removal", "")):
        r = results[name]
        print(f"card {name} seen by SCardGetStatusChange{target}: n={r['n']}  median "
              f"{r['median_ms']:.0f} ms  p95 {r['p95_ms']:.0f} ms  max {r['max_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
