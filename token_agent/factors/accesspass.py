"""Temporary access passes: after a lost or stolen device, an administrator issues one so
that the user can sign in once and set up new methods (``/admin/users/NAME``, ``token-agent
admin access-pass``).

* Generated here, never chosen: 16 characters from the backup codes' alphabet without
  look-alikes (31 symbols: about 79 bits), shown in groups of four (``k7dm-4x2q-h9tn-3wxe``);
  spaces, dashes and case do not matter when it is typed.
* Shown once, to the administrator who issued it; stored as a keyed hash
  (``SecretKeys.code_hash``), as app passwords and backup codes are. Never in a log line, an
  audit event or an outcome.
* Single use: ``verify`` ends it (one conditional UPDATE), so a second sign-in with it fails,
  also when two servers race.
* Short-lived: it expires ``DEFAULT_HOURS`` (8: one working shift) after it is issued, or as
  the administrator chooses, from ``MIN_HOURS`` (1) to ``MAX_HOURS`` (24: a pass read over the
  phone in the evening still works the next morning, and no longer). An expired pass is
  refused; its end is recorded (``access_pass.expired``) when a sign-in or an administrator's
  page finds it past its time.
* One open pass per user: a new pass replaces the open one (``access_pass.replaced``); an
  administrator can revoke it (``access_pass.revoked``).
* Failures count against the user's own lockout scope ``access_pass:USER_ID`` (the
  ``[lockout]`` rules, apart from the password's), so a pass cannot be guessed.
* At sign-in (``ceremonies/passlogin.py``) a pass is the primary factor *and* satisfies MFA
  for that sign-in only: the user can then set up methods (``reauth`` accepts the sign-in as
  multi-factor); nothing is remembered for re-verification on the device.

Audit events: ``access_pass.issued`` (actor, expiry), ``verify.access_pass`` (each check),
``access_pass.used``, ``access_pass.expired``, ``access_pass.replaced``,
``access_pass.revoked``; never the pass.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from ..outcome import Reason
from ..secretbox import equal
from . import FactorContext, FactorError, Verification, checked, refused

KIND = "access_pass"
LABEL = "temporary access pass"
LENGTH = 16
ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"  # no 0/o, 1/l/i (the backup codes' alphabet)
DEFAULT_HOURS = 8
MIN_HOURS = 1
MAX_HOURS = 24
#: how many of a user's latest passes a typed pass is compared with (to tell "used" or
#: "expired" from "wrong": only to someone who typed that very pass)
RECENT = 5


@dataclass(frozen=True)
class AccessPass:
    """A pass as the administrators' pages show it (never its value nor its hash)."""

    id: int
    issued_by: str
    created_at: float
    expires_at: float
    ended_at: float | None
    end_reason: str | None

    def state(self, now: float) -> str:
        """``open``, ``used``, ``expired``, ``replaced`` or ``revoked``."""
        if self.end_reason:
            return self.end_reason
        return "expired" if self.expires_at <= now else "open"

    @classmethod
    def of(cls, row: dict) -> "AccessPass":
        return cls(int(row["id"]), row["issued_by"], float(row["created_at"]),
                   float(row["expires_at"]), row["ended_at"], row["end_reason"])


def _normalise(typed: str) -> str:
    return "".join(ch for ch in str(typed).lower() if ch not in " -\t")


def _format(raw: str) -> str:
    return "-".join(raw[i:i + 4] for i in range(0, len(raw), 4))


def _purpose(user_id: str) -> str:
    return f"access_pass:{user_id}"


def scope(user_id: str) -> str:
    """The lockout scope of a user's passes."""
    return f"access_pass:{user_id}"


def check_hours(hours: object) -> int:
    """``hours`` as a whole number from ``MIN_HOURS`` to ``MAX_HOURS``; ``FactorError``
    otherwise (a message for people)."""
    try:
        value = int(str(hours).strip())
    except ValueError:
        value = 0
    if not MIN_HOURS <= value <= MAX_HOURS:
        raise FactorError(Reason.METHOD_NOT_ALLOWED,
                          f"a temporary access pass lasts {MIN_HOURS} to {MAX_HOURS} hours: "
                          "enter a whole number of hours in that range")
    return value


def issue(ctx: FactorContext, user_id: str, *, actor: str,
          hours: int = DEFAULT_HOURS) -> tuple[AccessPass, str]:
    """A new pass for the user, replacing an open one; returns it and the pass (shown once).
    ``actor``: the administrator, recorded. ``FactorError`` for a lifetime out of range;
    ``UnknownUser``."""
    hours = check_hours(hours)
    store = ctx.store
    user = store.get_user_by_id(user_id)
    raw = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
    now = ctx.now()
    expires = now + hours * 3600.0
    with store.transaction():
        new_id, replaced = store.add_access_pass(
            user.id, ctx.keys.code_hash(_purpose(user.id), raw), issued_by=actor,
            created_at=now, expires_at=expires)
        for old in replaced:
            store.record_event("access_pass.replaced", user_id=user.id, outcome="success",
                               detail={"actor": actor, "pass_id": old})
        store.record_event("access_pass.issued", user_id=user.id, outcome="success",
                           detail={"actor": actor, "pass_id": new_id, "hours": hours,
                                   "expires_at": expires})
    return AccessPass(new_id, actor, now, expires, None, None), _format(raw)


def expire(ctx: FactorContext, user_id: str) -> list[AccessPass]:
    """End the user's open passes past their time, each recorded as ``access_pass.expired``."""
    store = ctx.store
    with store.transaction():
        ended = [AccessPass.of(r) for r in store.end_access_passes(user_id, "expired", ctx.now())]
        for p in ended:
            store.record_event("access_pass.expired", user_id=user_id, outcome="expired",
                               detail={"pass_id": p.id, "expires_at": p.expires_at})
    return ended


def revoke(ctx: FactorContext, user_id: str, *, actor: str) -> list[AccessPass]:
    """End the user's open pass now (an administrator's action, recorded)."""
    store = ctx.store
    expire(ctx, user_id)
    with store.transaction():
        ended = [AccessPass.of(r) for r in store.end_access_passes(user_id, "revoked", ctx.now())]
        for p in ended:
            store.record_event("access_pass.revoked", user_id=user_id, outcome="success",
                               detail={"actor": actor, "pass_id": p.id})
    return ended


def list_(ctx: FactorContext, user_id: str, limit: int = 5) -> list[AccessPass]:
    """The user's latest passes, newest first (expired ones recorded as such first)."""
    expire(ctx, user_id)
    return [AccessPass.of(r) for r in ctx.store.access_passes(user_id, limit)]


def open_pass(ctx: FactorContext, user_id: str) -> AccessPass | None:
    """The user's open pass, or None."""
    now = ctx.now()
    return next((p for p in list_(ctx, user_id, 1) if p.state(now) == "open"), None)


def decoy(ctx: FactorContext, typed: str | None) -> None:
    """The work of a check without a user to check it for (an unknown user's sign-in): the
    keyed hash, compared with as many rows as a user's check compares."""
    digest = ctx.keys.code_hash(_purpose("-"), _normalise(typed or ""))
    for _ in range(RECENT):
        equal(bytes(32), digest)


def verify(ctx: FactorContext, user_id: str, typed: str) -> Verification:
    """Check and use a pass typed by the user (under the lockout ``scope(user_id)``): the
    open pass, unexpired, matches: it is used up (``access_pass.used``). A pass used, expired,
    replaced or revoked is refused, as is a wrong one; every refusal counts as a failure."""
    store = ctx.store
    expire(ctx, user_id)
    recent = store.access_passes(user_id, RECENT)
    if not recent:
        return refused(ctx, KIND, user_id, Reason.NO_CREDENTIAL,
                       "no temporary access pass was issued for this user")
    digest = ctx.keys.code_hash(_purpose(user_id), _normalise(typed))

    def check():
        now = ctx.now()
        match = None
        for row in recent:  # every row compared: the time does not say which matched
            if equal(row["pass_hash"], digest) and match is None:
                match = row
        if match is None:
            return False, Reason.WRONG_CODE, "wrong temporary access pass", {}
        found = AccessPass.of(match)
        state = found.state(now)
        if state == "used":
            return (False, Reason.CODE_REPLAYED, "this temporary access pass was used "
                    "already: ask your administrator for a new one", {"pass_id": found.id})
        if state != "open":
            return (False, Reason.CODE_EXPIRED, f"this temporary access pass is {state}: ask "
                    "your administrator for a new one", {"pass_id": found.id})
        with store.transaction():
            if not store.use_access_pass(found.id, now):
                return (False, Reason.CODE_REPLAYED, "this temporary access pass was used "
                        "already: ask your administrator for a new one", {"pass_id": found.id})
            store.record_event("access_pass.used", user_id=user_id, outcome="success",
                               detail={"pass_id": found.id, "issued_by": found.issued_by})
        return True, None, "temporary access pass accepted", {"pass_id": found.id}

    return checked(ctx, kind=KIND, method=None, user_id=user_id, check=check,
                   scope=scope(user_id), label=LABEL)
