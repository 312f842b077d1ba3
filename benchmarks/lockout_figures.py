"""How many guesses the lockout lets through, per hour, day and year: the real lockout code
(``token_agent/factors/lockout.py``) on a real store, a fake clock, and a guesser who knows
only the username and guesses again the moment a lock runs out.

    .venv/bin/python benchmarks/lockout_figures.py [--markdown]

Rows: one method guessed from the user's own workstation (a familiar device); from devices
and networks the user never logged in from (counted apart); both together (the most anyone
gets); and the schedule before issue 11 (no limit, no decay, one count for everybody), with
the default policy's ``[lockout]`` in each case. Figures go to the README ("Second factors
and the MFA policy": Lockout).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from token_agent.factors import LockoutRules, lockout  # noqa: E402
from token_agent.policy import DEFAULT_POLICY  # noqa: E402
from token_agent.store import Store  # noqa: E402

HOUR, DAY, YEAR = 3600.0, 86400.0, 365 * 86400.0
MARKS = (("1 hour", HOUR), ("1 day", DAY), ("1 week", 7 * DAY), ("1 year", YEAR))
#: never more guesses than this in one simulation (the old schedule: ~3,750 a year)
MAX_GUESSES = 20000


class OldSchedule(LockoutRules):
    """The schedule before issue 11 (no limit, no decay): outside the bounds a policy may set,
    so made without their checks, for the comparison alone."""

    def __post_init__(self) -> None:
        pass


def policy_rules() -> LockoutRules:
    """The default policy's ``[lockout]``: the very rules the factors run on."""
    return DEFAULT_POLICY.lockout


def simulate(store: Store, user_id: str, scopes: list[str], rules: LockoutRules,
             horizon: float = YEAR) -> list[float]:
    """Guess on ``scopes`` in turn, each as soon as it is not locked, for ``horizon``
    seconds; returns the times (from 0) of the failures counted."""
    t0 = 1_700_000_000.0
    now = t0
    times: list[float] = []
    while now - t0 < horizon and len(times) < MAX_GUESSES:
        next_free = None
        for scope in scopes:
            try:
                lockout.attempt(store, scope, user_id, now=now, label="password", rules=rules)
            except lockout.Locked as e:
                if e.until < lockout.PERMANENT:
                    next_free = e.until if next_free is None else min(next_free, e.until)
                continue
            lockout.failed(store, scope, rules=rules)
            times.append(now - t0)
            next_free = now
            break
        if next_free is None:  # every scope locked until an administrator unlocks it
            break
        now = max(now + 1.0, next_free)  # a guess a second at most
    return times


def count_before(times: list[float], mark: float) -> int:
    return sum(1 for t in times if t < mark)


def when(times: list[float], n: int) -> str:
    if len(times) < n:
        return "never"
    t = times[n - 1]
    return f"{t / 3600:.1f} h" if t < 2 * DAY else f"{t / DAY:.1f} days"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    rules = policy_rules()
    before = OldSchedule(**{**asdict(rules), "limit": 10 ** 9, "unfamiliar_limit": 10 ** 9,
                            "decay_hours": 10 ** 9})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "token-agent.db")
        try:
            for i, (label, scopes, r) in enumerate((
                    ("from the user's workstation (familiar)", ["password:{u}"], rules),
                    ("from unfamiliar devices or networks", ["password:{u}:unfamiliar"], rules),
                    ("both together (the most anyone gets)",
                     ["password:{u}:unfamiliar", "password:{u}"], rules),
                    ("before issue 11 (no limit, no decay, one count)", ["password:{u}"],
                     before))):
                user = store.add_user(f"user{i}")
                times = simulate(store, user.id, [s.format(u=user.id) for s in scopes], r)
                rows.append((label, [count_before(times, m) for _, m in MARKS],
                             when(times, 100)))
        finally:
            store.close()
    head = ["guesses of one method"] + [m for m, _ in MARKS] + ["100th failure"]
    p = DEFAULT_POLICY.lockout
    print(f"[lockout] max_failures={p.max_failures} base_seconds={p.base_seconds} "
          f"max_seconds={p.max_seconds} limit={p.limit} unfamiliar_limit={p.unfamiliar_limit} "
          f"decay_hours={p.decay_hours:g}")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("| " + " | ".join("---" for _ in head) + " |")
        for label, counts, hundredth in rows:
            print(f"| {label} | " + " | ".join(f"{c:,}" for c in counts) + f" | {hundredth} |")
    else:
        print(f"{head[0]:<50}" + "".join(f"{h:>10}" for h in head[1:-1]) + f"{head[-1]:>15}")
        for label, counts, hundredth in rows:
            print(f"{label:<50}" + "".join(f"{c:>10,}" for c in counts) + f"{hundredth:>15}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
