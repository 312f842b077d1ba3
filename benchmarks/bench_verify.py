"""Benchmark: verifying one assertion: the agent vs py_webauthn vs python-fido2's Fido2Server.

The same assertions (from the virtual key, ES256) are verified by each in one run. For each
verifier the input is what it naturally gets: the agent its stored CBOR public key and the
raw fields; py_webauthn the AuthenticationResponseJSON (a dict) and the public key bytes;
Fido2Server the parsed response and the stored AttestedCredentialData.

    python benchmarks/bench_verify.py [--assertions N] [--rounds R] [--json]

Target of issue 3: the agent at least 2x faster than py_webauthn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fido2 import cbor  # noqa: E402
from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction  # noqa: E402
from fido2.server import Fido2Server  # noqa: E402
from webauthn import verify_authentication_response  # noqa: E402

from simulators.key import create_virtual_key, open_in_process_device  # noqa: E402
from token_agent import webauthn as agent  # noqa: E402

RP = {"id": "bench.nhs.example", "name": "Bench"}
ORIGIN = "https://bench.nhs.example"


class NoPin(UserInteraction):
    def request_pin(self, permissions, rp_id):
        return None


def make_assertions(n: int):
    device = open_in_process_device(create_virtual_key(presence="auto"))
    client = Fido2Client(device, client_data_collector=DefaultClientDataCollector(ORIGIN),
                         user_interaction=NoPin())
    server = Fido2Server(RP)
    options, state = server.register_begin({"id": b"u", "name": "u"},
                                           user_verification="discouraged")
    cred = server.register_complete(state, client.make_credential(options.public_key))
    cred = cred.credential_data
    out = []
    for _ in range(n):
        options, state = server.authenticate_begin([cred], user_verification="discouraged")
        response = client.get_assertion(options.public_key).get_response(0)
        out.append((state, response, options.public_key.challenge))
    device.close()
    return cred, out


def interleaved(runs: dict, rounds: int) -> dict:
    """Time each (fn, items) in turn, round after round, so that every verifier sees the
    same machine (this one has neighbours: a lone run can be 30% off); median per name."""
    samples: dict = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (fn, items) in runs.items():
            start = time.perf_counter()
            for item in items:
                fn(item)
            samples[name].append((time.perf_counter() - start) / len(items))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assertions", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cred, assertions = make_assertions(args.assertions)
    stored_key = cbor.encode(dict(cred.public_key))
    server = Fido2Server(RP)
    agent_items = [
        (ch, bytes(r.response.client_data), bytes(r.response.authenticator_data),
         r.response.signature) for _, r, ch in assertions
    ]
    pyw_items = [(dict(r), ch) for _, r, ch in assertions]
    fido_items = [(state, r) for state, r, _ in assertions]

    def by_agent(item):
        challenge, cdj, auth, sig = item
        agent.verify_assertion(public_key=stored_key, stored_sign_count=0, rp_id=RP["id"],
                               origin=ORIGIN, challenge=challenge, client_data_json=cdj,
                               authenticator_data=auth, signature=sig, require_uv=False)

    def by_py_webauthn(item):
        response_json, challenge = item
        verify_authentication_response(
            credential=response_json, expected_challenge=challenge, expected_rp_id=RP["id"],
            expected_origin=ORIGIN, credential_public_key=stored_key,
            credential_current_sign_count=0, require_user_verification=False)

    def by_fido2_server(item):
        state, response = item
        server.authenticate_complete(state, [cred], response)

    for fn, items in ((by_agent, agent_items), (by_py_webauthn, pyw_items),
                      (by_fido2_server, fido_items)):
        fn(items[0])  # each verifier accepts the same assertions before timing
    public_key = agent.load_public_key(stored_key)
    signed = [(sig, auth + hashlib.sha256(cdj).digest()) for _, cdj, auth, sig in agent_items]
    times = interleaved({
        "agent": (by_agent, agent_items),
        "py_webauthn": (by_py_webauthn, pyw_items),
        "fido2_server": (by_fido2_server, fido_items),
        # the floor every verifier shares: one signature check by OpenSSL on the same data
        "signature_only": (lambda item: public_key.verify(*item), signed),
    }, args.rounds)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "assertions": args.assertions,
        **{f"{name}_us": t * 1e6 for name, t in times.items()},
    }
    for name in ("agent", "py_webauthn", "fido2_server"):
        results[f"{name}_overhead_us"] = results[f"{name}_us"] - results["signature_only_us"]
    results["speedup_vs_py_webauthn"] = results["py_webauthn_us"] / results["agent_us"]
    results["speedup_vs_fido2_server"] = results["fido2_server_us"] / results["agent_us"]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"assertion verification on {results['machine']} ({args.assertions} ES256 "
          f"assertions, median of {args.rounds} rounds)")
    for name in ("agent", "py_webauthn", "fido2_server"):
        per = results[f"{name}_us"]
        print(f"  {name:<13} {per:8.1f} us per assertion  {1e6 / per:9.0f} per second  "
              f"({results[f'{name}_overhead_us']:5.1f} us beyond the signature check)")
    print(f"  the signature check alone (OpenSSL, shared by all): "
          f"{results['signature_only_us']:.1f} us")
    speedup = results["speedup_vs_py_webauthn"]
    print(f"  agent vs py_webauthn: {speedup:.2f}x "
          f"({'meets' if speedup >= 2 else 'MISSES'} the 2x target); "
          f"vs Fido2Server: {results['speedup_vs_fido2_server']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
