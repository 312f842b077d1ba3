"""Benchmark: smartcard login and lock through the real pcscd (issue 5's targets).

Per cycle, with one virtual card (issued by the simulated NHS-style PKI) and one vpcd reader:

1. **card inserted -> PIN prompt ready**: from the bridge's connect (the card going in) to the
   moment ``login_with_card`` calls its PIN provider, i.e. the card seen by the ReaderWatcher,
   the PIV application selected, the 9A certificate read and validated (chain, dates, key
   usage, CRL from the CA's file, cached) and the PIN tries read. Also reported from the
   watcher's ``card-inserted`` event (``at``) to the prompt: the agent's own share.
2. **card removed -> lock action started**: from the bridge's disconnect (the card coming
   out) to the lock action's start, through a CardSessionManager bound to the logged-in
   session and driven by the ReaderWatcher (the same lock callable as the tests). Also
   reported from the watcher seeing the removal (``ReaderEvent.at``) to the lock.

A random pause between cycles meets pcscd's 400 ms presence poll at a random phase, as a
person inserting a card would. Median and max over the cycles.

    python benchmarks/bench_card_login.py [--cycles 20] [--algorithm RSA2048|ECCP256] [--json]

Needs pcscd with vsmartcard-vpcd (the one running, or, as root, one it starts itself, as the
test suite does). Target: removal -> lock started in 250 ms or less.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pcsc_helpers import PcscdService, wait_for_card  # noqa: E402

from drivers.pcsc.piv import PivSession  # noqa: E402
from drivers.pcsc.readers import ReaderWatcher  # noqa: E402
from simulators.card.card import VirtualCard  # noqa: E402
from simulators.card.issuance import issue_card  # noqa: E402
from simulators.card.pki import init_ca, issuing_cert_path, root_cert_path  # noqa: E402
from simulators.card.vpcd import VpcdBridge  # noqa: E402
from token_agent.cardsession import CardSessionManager  # noqa: E402
from token_agent.ceremonies.card import login_with_card, set_card_setting  # noqa: E402
from token_agent.store import Store  # noqa: E402

PIN = "1234"
UUID = "555123456789"


def summary(values: list[float]) -> dict:
    return {"median_ms": round(statistics.median(values), 1), "max_ms": round(max(values), 1),
            "min_ms": round(min(values), 1), "n": len(values)}


def run(service: PcscdService, workdir: Path, cycles: int, algorithm: str) -> dict:
    ca = workdir / "ca"
    init_ca(ca)
    card_path = workdir / "alice.card"
    issue_card(ca, name="Dr Alice Smith", uuid=UUID, pin=PIN, out=card_path, algorithm=algorithm)
    (workdir / "data").mkdir(mode=0o700)
    store = Store.open(workdir / "data" / "token-agent.db")
    set_card_setting(store, "card_trust_anchors", [str(root_cert_path(ca))])
    set_card_setting(store, "card_intermediates", [str(issuing_cert_path(ca))])
    alice = store.add_user("alice")
    store.add_card_identity(alice.id, uuid=UUID, holder_name="Dr Alice Smith")
    reader = service.reader(0)

    lock_called = threading.Event()
    lock_times: list[float] = []

    def lock(_session) -> None:  # the tests' lock: a callable that records when it started
        lock_times.append(time.monotonic())
        lock_called.set()

    manager = CardSessionManager(lock)
    inserted_at: list[float] = []
    inserted_seen = threading.Event()

    def on_event(event) -> None:
        if event.kind == "card-inserted" and event.reader == reader:
            inserted_at.append(event.at)
            inserted_seen.set()
        manager.handle(event)

    to_prompt, seen_to_prompt, to_lock, seen_to_lock = [], [], [], []
    with ReaderWatcher(on_event, readers_filter=[reader]):
        for _ in range(cycles):
            time.sleep(random.uniform(0.0, 0.4))
            inserted_seen.clear()
            lock_called.clear()
            card = VirtualCard.load(card_path)
            bridge = VpcdBridge(card, slot=0)
            t_insert = time.monotonic()
            bridge.insert()
            if not inserted_seen.wait(5.0):
                raise RuntimeError("the watcher did not see the card")
            prompt: list[float] = []

            def pins() -> str:
                prompt.append(time.monotonic())
                return PIN

            session = PivSession.open(reader)
            outcome = login_with_card(store, session, pin_provider=pins)
            if not outcome.ok:
                raise RuntimeError(f"login failed: {outcome.message}")
            manager.start_session(outcome, reader=reader, atr=session.atr)
            session.close()
            to_prompt.append((prompt[0] - t_insert) * 1000)
            seen_to_prompt.append((prompt[0] - inserted_at[-1]) * 1000)
            time.sleep(random.uniform(0.0, 0.4))
            t_remove = time.monotonic()
            bridge.remove()
            if not lock_called.wait(5.0):
                raise RuntimeError("the lock action did not start")
            to_lock.append((lock_times[-1] - t_remove) * 1000)
            seen_to_lock.append(manager.lock_latencies_ms[-1])
            wait_for_card(service.context, reader, present=False)
            time.sleep(1.0)  # let pcscd settle before the next insertion
    store.close()
    return {
        "inserted_to_pin_prompt": summary(to_prompt),
        "watcher_seen_to_pin_prompt": summary(seen_to_prompt),
        "removed_to_lock_started": summary(to_lock),
        "watcher_seen_removal_to_lock_started": summary(seen_to_lock),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--algorithm", default="RSA2048", choices=["RSA2048", "ECCP256"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        service = PcscdService(tmp_path / "pcscd")
        service.start()
        try:
            results = run(service, tmp_path, args.cycles, args.algorithm)
        finally:
            service.stop()
    results["machine"] = {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                          "algorithm": args.algorithm, "cycles": args.cycles}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, s in results.items():
            if name != "machine":
                print(f"{name:40s} median {s['median_ms']:7.1f} ms   max {s['max_ms']:7.1f} ms"
                      f"   (n={s['n']})")
        print(results["machine"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
