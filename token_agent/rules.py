"""The lockout and one-time code rules, defined once: their defaults, their bounds and how
they combine. The policy parses ``[lockout]`` and ``[codes]`` into these very classes
(``policy.Lockout`` and ``policy.Codes`` are them), and the factors run on them
(``FactorContext.lockout``, ``FactorContext.codes``): the two layers cannot disagree.

A rule out of its bounds is refused when the object is made (``ValueError``, naming the key and
the bounds), so no caller can run the factors on rules the policy would refuse. The policy
reports the same bounds as errors in a policy file (``bounds``, ``problems``).
This module imports nothing of ``token_agent``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Bound:
    """The allowed values of one rule: ``low..high`` (whole numbers), or for hours more than
    ``low`` and at most ``high``; ``unit`` as error messages say it."""

    low: float
    high: float
    unit: str = ""
    hours: bool = False

    def check(self, value: Any) -> str | None:
        """None when ``value`` is allowed, else why not (for people)."""
        if self.hours:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return (f"must be a number of hours (more than {self.low:g}, at most "
                        f"{self.high:g}), not {type(value).__name__}")
            if not (math.isfinite(value) and self.low < value <= self.high):
                return (f"is out of range: allowed more than {self.low:g} and at most "
                        f"{self.high:g} hours")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            return (f"must be a whole number from {self.low:g} to {self.high:g}{self.unit}, "
                    f"not {type(value).__name__}")
        if not self.low <= value <= self.high:
            return f"is out of range: allowed {self.low:g} to {self.high:g}{self.unit}"
        return None


def _rule(default: Any, low: float, high: float, unit: str = "", *, hours: bool = False):
    return field(default=default, metadata={"bound": Bound(low, high, unit, hours)})


class _Rules:
    """What both rule sets share: bounds per field, checks on construction."""

    @classmethod
    def bounds(cls) -> dict[str, Bound]:
        """Each rule's name -> its bounds."""
        return {f.name: f.metadata["bound"] for f in fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def defaults(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The value of each rule: ``given``'s, else its default."""
        out = {f.name: given.get(f.name, f.default) for f in fields(cls)}  # type: ignore[arg-type]
        return out

    @classmethod
    def problems(cls, values: dict[str, Any]) -> list[tuple[str, str]]:
        """``(key, why)`` for every rule of ``values`` (all rules, as ``defaults`` gives them)
        out of its bounds, or inconsistent with another."""
        out = []
        for name, bound in cls.bounds().items():
            why = bound.check(values[name])
            if why:
                out.append((name, f"{values[name]!r} {why}"))
        return out or cls._cross(values)

    @classmethod
    def _cross(cls, values: dict[str, Any]) -> list[tuple[str, str]]:
        return []

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        problems = self.problems(values)
        if problems:
            raise ValueError("; ".join(f"{type(self).__name__}.{k}: {why}" for k, why in problems))


@dataclass(frozen=True)
class LockoutRules(_Rules):
    """How many failures lock a method, and for how long (doubling each time, capped); how
    many in a row lock it for good (of them, how many from unfamiliar devices or networks);
    how fast the lock level decays (``factors/lockout.py``). Policy ``[lockout]``."""

    #: failed second-factor attempts before the method locks (NIST SP 800-63B: at most 100)
    max_failures: int = _rule(10, 1, 100)
    #: the first lockout; each further one doubles
    base_seconds: int = _rule(60, 1, 86400, " seconds")
    #: the longest lockout (at least base_seconds)
    max_seconds: int = _rule(86400, 1, 604800, " seconds")
    #: failed password attempts before the password locks
    password_max_failures: int = _rule(10, 1, 100)
    #: consecutive failures of one method, then locked until an administrator unlocks it
    limit: int = _rule(100, 1, 100)
    #: of those, at most this many from unfamiliar devices or networks (counted apart);
    #: None: half of ``limit`` (at least 1)
    unfamiliar_limit: int | None = _rule(None, 1, 100)
    #: the lockout level goes down by one for each this many hours without a failure
    decay_hours: float = _rule(24.0, 0, 720, hours=True)

    def __post_init__(self) -> None:
        if self.unfamiliar_limit is None:
            object.__setattr__(self, "unfamiliar_limit", half_of(self.limit))
        super().__post_init__()

    @classmethod
    def defaults(cls, given: dict[str, Any]) -> dict[str, Any]:
        out = super().defaults(given)
        if out["unfamiliar_limit"] is None and isinstance(out["limit"], int):
            out["unfamiliar_limit"] = half_of(out["limit"])
        return out

    @classmethod
    def _cross(cls, values: dict[str, Any]) -> list[tuple[str, str]]:
        out = []
        if values["max_seconds"] < values["base_seconds"]:
            out.append(("max_seconds", f"{values['max_seconds']} is less than "
                                       f"lockout.base_seconds ({values['base_seconds']})"))
        if values["unfamiliar_limit"] > values["limit"]:
            out.append(("unfamiliar_limit", f"{values['unfamiliar_limit']} is more than "
                                            f"lockout.limit ({values['limit']})"))
        return out

    def delay(self, level: int) -> int:
        """Seconds of the ``level``-th lockout (1 for the first): ``base_seconds``, doubled for
        each further lockout, at most ``max_seconds``; 0 before the first."""
        return lock_seconds(level, self.base_seconds, self.max_seconds)


def lock_seconds(level: int, base_seconds: int, max_seconds: int) -> int:
    """Seconds of the ``level``-th lockout (``LockoutRules.delay``)."""
    if level < 1:
        return 0
    return min(base_seconds * 2 ** min(level - 1, 40), max_seconds)


def half_of(limit: int) -> int:
    """The default ``unfamiliar_limit`` of ``limit``: half of it, at least 1."""
    return max(1, limit // 2)


@dataclass(frozen=True)
class CodeRules(_Rules):
    """One-time codes sent by email / SMS / voice / messaging (``factors/codes.py``). Policy
    ``[codes]``."""

    #: digits
    length: int = _rule(6, 6, 8, " digits")
    #: how long a code is valid
    ttl_seconds: int = _rule(600, 60, 3600, " seconds")
    #: minimum gap between two sends (less than ttl_seconds)
    resend_seconds: int = _rule(30, 0, 3600, " seconds")
    #: sends per ttl window
    max_sends: int = _rule(5, 1, 20)

    @classmethod
    def _cross(cls, values: dict[str, Any]) -> list[tuple[str, str]]:
        if values["resend_seconds"] >= values["ttl_seconds"]:
            return [("resend_seconds", f"{values['resend_seconds']} must be less than "
                                       f"codes.ttl_seconds ({values['ttl_seconds']})")]
        return []
