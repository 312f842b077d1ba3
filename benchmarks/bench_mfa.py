"""Speed of the second factors and of a whole password + TOTP login.

    .venv/bin/python benchmarks/bench_mfa.py [--n 2000] [--logins 30]

1. TOTP: ``match_step`` alone (the RFC 6238 computation and the constant-time comparison of
   the three codes of the ±1 window), and ``factors.totp.verify`` as the agent runs it: the
   lockout's counted-first attempt, decrypting the secret, the match, the conditional
   time-step update and the audit event, committed with ``synchronous=FULL`` (every commit
   is on disk). Successful verifications need a new time step each (a replay is refused), so
   a fake clock moves on 30 s per verification; failures use a wrong code.
2. One-time codes (email / SMS / voice / messaging), ``factors.codes.verify_code``: a code is
   sent through an in-memory gateway (delivery is not what is measured), then verified.
3. ``token-agent login --user U --device unmanaged`` as a process, password + TOTP answered on
   standard input: wall time from start to exit, one user per run (each user's TOTP step is
   accepted once), median and p95.

Figures go to the README ("Second factors and the MFA policy": Speed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from token_agent.factors import FactorContext, LockoutRules  # noqa: E402
from token_agent.factors import codes, password, totp  # noqa: E402
from token_agent.secretbox import SecretKeys  # noqa: E402
from token_agent.store import Store  # noqa: E402


class _Clock:
    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


class _MemoryDelivery:
    """Delivers to a list (what a user's phone would show), for the benchmark only."""

    def __init__(self) -> None:
        self.sent = []

    def configured_channels(self):
        return ("email", "sms", "voice", "messaging")

    def send(self, message):
        from token_agent.delivery import Receipt, mask_destination

        self.sent.append(message)
        return Receipt(channel=message.channel, gateway="memory", message_id=str(len(self.sent)),
                       fell_back_from=None,
                       destination_hint=mask_destination(message.channel, message.destination))


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s ({seconds / n * 1e6:,.1f} µs each)"


def bench_totp(tmp: Path, n: int) -> dict:
    store = Store.open(tmp / "totp.db")
    clock = _Clock(1_800_000_000.0)
    ctx = FactorContext(store, SecretKeys.load_or_create(tmp),
                        lockout=LockoutRules(max_failures=100), clock=clock)
    user = store.add_user("bench-totp")
    pending = totp.begin_enrol(ctx, user.id)
    totp.confirm_enrol(ctx, user.id, totp.code_at(pending.secret, clock.t))
    secret = pending.secret

    # match_step alone
    codes_at = [totp.code_at(secret, clock.t + 30 * i) for i in range(n)]
    t0 = time.perf_counter()
    for i in range(n):
        totp.match_step(secret, codes_at[i], now=clock.t + 30 * i, last_step=-1)
    match_s = time.perf_counter() - t0

    # verify, successes: each on a new step
    samples = []
    for i in range(n):
        clock.t += 30
        code = totp.code_at(secret, clock.t)
        t0 = time.perf_counter()
        result = totp.verify(ctx, user.id, code)
        samples.append(time.perf_counter() - t0)
        assert result.ok, result
    ok_s = sum(samples)
    ok_median = statistics.median(samples)

    # verify, failures (wrong code); unlock every 90 so the lockout never bites
    from token_agent.factors import lockout

    fail_samples = []
    for i in range(n):
        if i % 90 == 0:
            lockout.unlock(store, user.id)
        t0 = time.perf_counter()
        result = totp.verify(ctx, user.id, "000000" if i % 2 else "999999")
        fail_samples.append(time.perf_counter() - t0)
    store.close()
    return {"match_step": _rate(n, match_s), "verify_ok": _rate(n, ok_s),
            "verify_ok_median_ms": round(ok_median * 1000, 3),
            "verify_wrong": _rate(n, sum(fail_samples)),
            "verify_wrong_median_ms": round(statistics.median(fail_samples) * 1000, 3)}


def bench_codes(tmp: Path, n: int) -> dict:
    store = Store.open(tmp / "codes.db")
    clock = _Clock(1_800_000_000.0)
    delivery = _MemoryDelivery()
    ctx = FactorContext(store, SecretKeys.load_or_create(tmp), delivery=delivery, clock=clock)
    user = store.add_user("bench-codes")
    method, _ = codes.add_contact(ctx, user.id, "sms", "+447700900123")
    codes.confirm_contact(ctx, user.id, "sms", delivery.sent[-1].code)
    method = store.get_method(method.id)
    verify_samples, send_samples = [], []
    for _ in range(n):
        clock.t += 3600  # past every throttle
        t0 = time.perf_counter()
        codes.send_code(ctx, method)
        send_samples.append(time.perf_counter() - t0)
        code = delivery.sent[-1].code
        t0 = time.perf_counter()
        result = codes.verify_code(ctx, method, code)
        verify_samples.append(time.perf_counter() - t0)
        assert result.ok, result
    store.close()
    return {"verify_ok": _rate(n, sum(verify_samples)),
            "verify_ok_median_ms": round(statistics.median(verify_samples) * 1000, 3),
            "send_median_ms (memory gateway)": round(statistics.median(send_samples) * 1000, 3)}


def bench_cli_login(tmp: Path, runs: int) -> dict:
    data = tmp / "cli"
    data.mkdir()
    env = {**os.environ, "TOKEN_AGENT_DATA_DIR": str(data)}
    env.pop("TOKEN_AGENT_POLICY", None)
    store = Store.open(data / "token-agent.db")
    ctx = FactorContext(store, SecretKeys.load_or_create(data))
    secrets_ = []
    for i in range(runs):
        user = store.add_user(f"clinician{i:03d}")
        password.set_password(ctx, user.id, "correct horse battery")
        pending = totp.begin_enrol(ctx, user.id)
        totp.confirm_enrol(ctx, user.id, totp.code_at(pending.secret, time.time() - 30))
        secrets_.append(pending.secret)
    store.close()
    # the sources byte-compiled, as an installed package's are (scripts/setup.sh does it too)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "token_agent", "drivers",
                    "simulators"], cwd=ROOT, check=True, capture_output=True)
    exe = Path(sys.executable).parent / "token-agent"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "token_agent"]
    walls = []
    for i in range(runs):
        code = totp.code_at(secrets_[i], time.time())
        t0 = time.perf_counter()
        proc = subprocess.run([*command, "login", "--user", f"clinician{i:03d}", "--device",
                               "unmanaged", "--device-id", f"bench-{i}"],
                              input=f"correct horse battery\n{code}\n", capture_output=True,
                              text=True, env=env, timeout=60)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"login {i} failed ({proc.returncode}): {proc.stderr}")
        assert "password + totp" in proc.stdout, proc.stdout
    walls.sort()
    return {"runs": runs, "median_ms": round(statistics.median(walls) * 1000, 1),
            "p95_ms": round(walls[max(0, int(len(walls) * 0.95) - 1)] * 1000, 1),
            "min_ms": round(walls[0] * 1000, 1), "max_ms": round(walls[-1] * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="verifications per measurement")
    ap.add_argument("--logins", type=int, default=30, help="CLI logins")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mfa-") as d:
        tmp = Path(d)
        print(f"python {sys.version.split()[0]}, store on {tmp} (synchronous=FULL)")
        for name, result in (("TOTP", bench_totp(tmp, args.n)),
                             ("one-time codes (SMS)", bench_codes(tmp, args.n)),
                             ("CLI login, password + TOTP", bench_cli_login(tmp, args.logins))):
            print(f"\n{name}")
            for k, v in result.items():
                print(f"  {k:<34} {v}")


if __name__ == "__main__":
    main()
