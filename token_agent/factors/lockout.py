"""Failed attempts and growing lockouts, per method (``method:ID``) or per password
(``password:USER_ID``).

``attempt()`` is called *before* a secret is checked: it refuses when the scope is locked,
and otherwise counts the attempt as a failure at once. ``succeeded()`` then clears the count;
``failed()`` leaves it. Counting first means that guesses made in parallel cannot exceed the
limit, and that a crash in the middle of a check counts as a failure (fail closed).

The schedule (``[lockout]`` of the policy; the figures are in the README, from
``benchmarks/lockout_figures.py``):

* every ``max_failures`` consecutive failures lock the scope for ``base_seconds *
  2**(level-1)`` (capped at ``max_seconds``), the level growing with each lockout;
* the level *decays*: it goes down by one for each ``decay_hours`` without a failure after
  the last lock ran out, so that a user who mistyped a few times last month does not start
  again at a day-long lock;
* ``limit`` (at most 100, NIST SP 800-63B §5.2.2) consecutive failures, counted since the last
  success whatever the locks in between, lock the scope *until an administrator unlocks it*
  (``locked_until`` is ``PERMANENT``);
* failures from a device or network the user never logged in from (``unfamiliar``, the login
  flow decides from its sightings) count in a scope of their own (``SCOPE:unfamiliar``), with
  its own temporary locks, so that a stranger's guesses never lock the user out of their
  own workstation; and at most ``unfamiliar_limit`` of them count before that scope locks for
  good. Both scopes together never get more than ``limit`` consecutive failures: when their
  sum reaches it, both lock until reset. So a stranger gets at most ``unfamiliar_limit``
  guesses, and the user keeps ``limit - unfamiliar_limit`` tries from their own devices.

An administrator's ``unlock`` clears a scope (with its unfamiliar twin), or every scope of a
user. The card's and the key's own PIN counters are theirs: nothing here counts them. A lock
is per method: the user's other methods (a key, a card, another second factor) still work.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..store import Store

if TYPE_CHECKING:
    from ..rules import LockoutRules

#: ``locked_until`` of a scope locked until an administrator unlocks it (year 3000: JSON-safe)
PERMANENT = 32503680000.0
#: the suffix of the scope counting failures from unfamiliar devices and networks
UNFAMILIAR = ":unfamiliar"


@dataclass(frozen=True)
class LockState:
    scope: str
    failures: int
    level: int
    locked_until: float | None
    last_failure_at: float | None = None

    def locked(self, now: float) -> bool:
        return self.locked_until is not None and self.locked_until > now

    @property
    def permanent(self) -> bool:
        """Locked until an administrator unlocks it (``limit`` consecutive failures)."""
        return self.locked_until is not None and self.locked_until >= PERMANENT

    def to_json(self) -> dict:
        return {"scope": self.scope, "failures": self.failures, "level": self.level,
                "locked_until": self.locked_until, "until_reset": self.permanent}


class Locked(Exception):
    """The scope is locked until ``until`` (seconds since the epoch)."""

    def __init__(self, message: str, *, scope: str, until: float) -> None:
        super().__init__(message)
        self.message = message
        self.scope = scope
        self.until = until


def method_scope(method_id: int) -> str:
    return f"method:{int(method_id)}"


def password_scope(user_id: str) -> str:
    return f"password:{user_id}"


def unfamiliar(scope: str) -> str:
    """The scope counting ``scope``'s failures from unfamiliar devices and networks."""
    return scope if scope.endswith(UNFAMILIAR) else scope + UNFAMILIAR


def scope_for(scope: str, familiar: bool) -> str:
    """``scope`` for an attempt from a familiar device and network, else its twin."""
    return scope if familiar else unfamiliar(scope)


def _twin(scope: str) -> str:
    return scope[:-len(UNFAMILIAR)] if scope.endswith(UNFAMILIAR) else scope + UNFAMILIAR


def cap(rules: "LockoutRules", scope: str) -> int:
    """Consecutive failures after which ``scope`` locks until reset (by itself)."""
    if scope.endswith(UNFAMILIAR):
        return min(rules.limit, rules.unfamiliar_limit)
    return rules.limit


def lock_duration(level: int, base_seconds: int, max_seconds: int) -> float:
    """Seconds of the ``level``-th lockout (1, 2, ...): doubling, capped
    (``LockoutRules.delay``, the one definition)."""
    from ..rules import lock_seconds

    return float(lock_seconds(max(level, 1), base_seconds, max_seconds))


def describe_until(until: float, now: float) -> str:
    """"for 2 min (until 10:42 UTC)"."""
    if until >= PERMANENT:
        return "until an administrator unlocks it"
    left = max(0, int(until - now + 0.999))
    if left < 120:
        span = f"{left} s"
    elif left < 7200:
        span = f"{(left + 59) // 60} min"
    else:
        span = f"{left / 3600:.1f} h"
    at = _dt.datetime.fromtimestamp(until, _dt.timezone.utc).strftime("%H:%M UTC")
    return f"for {span} (until {at})"


def state(store: Store, scope: str) -> LockState:
    return _state(scope, store.get_lockout(scope))


def _state(scope: str, row: dict | None) -> LockState:
    if row is None:
        return LockState(scope, 0, 0, None)
    return LockState(scope, row["failures"], row["level"], row["locked_until"],
                     row["last_failure_at"])


def decayed_level(current: LockState, now: float, decay_seconds: float) -> int:
    """The lock level once the quiet time since the last failure (or since the last lock
    ran out) is taken off: one level per ``decay_seconds``."""
    if current.level <= 0 or current.permanent:
        return current.level
    since = max(current.last_failure_at or 0.0, current.locked_until or 0.0)
    quiet = now - since
    if quiet <= 0 or decay_seconds <= 0:
        return current.level
    return max(0, current.level - int(quiet // decay_seconds))


def _locked_message(label: str, until: float, now: float) -> str:
    if until >= PERMANENT:
        return (f"too many failed attempts in a row: {label} locked until an administrator "
                "unlocks it (token-agent admin unlock); your other methods still work")
    return (f"too many failed attempts: {label} locked {describe_until(until, now)}; an "
            "administrator can unlock it")


def attempt(store: Store, scope: str, user_id: str, *, now: float, label: str,
            rules: "LockoutRules | None" = None, max_failures: int | None = None) -> LockState:
    """Count an attempt (as a failure until ``succeeded``); ``Locked`` if the scope is
    locked now, or has used up its consecutive failures (with its unfamiliar twin's).
    ``label`` names the method in the message ("authenticator app"). The attempt that
    brings the count to a multiple of ``max_failures`` (default: the rules') locks the
    scope at once, for as long as its failure would: so no attempt racing with it gets
    through before ``failed`` runs; ``succeeded`` clears the lock if it was right."""
    rules = rules or _default_rules()
    max_failures = max_failures or rules.max_failures
    refused: Locked | None = None
    with store.transaction():
        # The count and its threshold: the row made sure of, then read under a row lock
        # (with its twin's), then written, in one transaction (exact under concurrency).
        store.ensure_lockout(scope, user_id)
        rows = store.lock_lockouts((scope, _twin(scope)))
        current = _state(scope, rows.get(scope))
        if current.locked(now):
            raise Locked(_locked_message(label, current.locked_until, now), scope=scope,
                         until=current.locked_until)
        total = current.failures + _state(_twin(scope), rows.get(_twin(scope))).failures
        if current.failures >= cap(rules, scope) or total >= rules.limit:
            store.lock_until(scope, user_id, PERMANENT)  # committed: the lock is recorded
            refused = Locked(_locked_message(label, PERMANENT, now), scope=scope,
                             until=PERMANENT)
        else:
            level = decayed_level(current, now, rules.decay_hours * 3600.0)
            store.count_lockout_failure(scope, now=now, level=level)
            if (current.failures + 1) % max_failures == 0:
                store.lock_until(scope, user_id,
                                 now + lock_duration(level + 1, rules.base_seconds,
                                                     rules.max_seconds), level=level + 1)
    if refused is not None:
        raise refused
    return state(store, scope)


def failed(store: Store, scope: str, *,
           rules: "LockoutRules | None" = None) -> LockState:
    """After a failed check (already counted by ``attempt``, which also set the lock for a
    while at every ``max_failures`` consecutive failures): lock for good at the scope's cap;
    when the scope and its unfamiliar twin together reach ``limit``, both lock for good.
    Returns the state (``locked_until`` set when this failure, or its attempt, locked it)."""
    rules = rules or _default_rules()
    with store.transaction():
        rows = store.lock_lockouts((scope, _twin(scope)))
        row = rows.get(scope)
        current = _state(scope, row)
        twin = _state(_twin(scope), rows.get(_twin(scope)))
        if row is None:  # unlocked meanwhile
            return current
        if current.failures + twin.failures >= rules.limit:
            store.lock_until(scope, row["user_id"], PERMANENT)
            store.lock_until(_twin(scope), row["user_id"], PERMANENT)
        elif current.failures >= cap(rules, scope):
            store.lock_until(scope, row["user_id"], PERMANENT)
        # a temporary lock at a multiple of max_failures: set by attempt() already
        return state(store, scope)


def succeeded(store: Store, scope: str) -> None:
    """After a successful check: the count and the lockout level go back to zero."""
    store.clear_lockout(scope)


def tries_left(current: LockState, max_failures: int,
               rules: "LockoutRules | None" = None) -> int:
    """Failures left before the next lock (temporary, or for good)."""
    before_lock = max_failures - current.failures % max_failures
    return max(0, min(before_lock, cap(rules or _default_rules(), current.scope)
                      - current.failures))


def _default_rules() -> "LockoutRules":
    from ..rules import LockoutRules

    return LockoutRules()


def user_locks(store: Store, user_id: str) -> list[LockState]:
    """Every scope of a user with failures or a lockout."""
    rows = store.user_lockouts(user_id)
    return [LockState(r["scope"], r["failures"], r["level"], r["locked_until"],
                      r["last_failure_at"]) for r in rows]


def unlock(store: Store, user_id: str, scope: str | None = None) -> list[LockState]:
    """Clear one scope of the user (with its unfamiliar twin), or all of them (an
    administrator's action); returns what was cleared."""
    with store.transaction():
        cleared = [s for s in user_locks(store, user_id)
                   if scope is None or s.scope in (scope, unfamiliar(scope))]
        for s in cleared:
            store.clear_lockout(s.scope)
        return cleared
