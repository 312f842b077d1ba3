"""The password and the second factors: enrol, verify, list, remove.

Each factor has its own module with its rules; what it stores is read and written through
the store's methods (its tables, queries and migrations are in ``token_agent.store``:
``secrets.py``, ``codes.py``, ``push.py``, ``lockouts.py``):

| module | method kind(s) | what is stored |
| --- | --- | --- |
| ``password`` | password | scrypt hash |
| ``totp`` | totp | the secret, AES-GCM encrypted; the last accepted time step |
| ``codes`` | email, sms, voice, messaging | the destination; codes sent, as keyed hashes |
| ``push`` | push | the companion app's Ed25519 public key; requests and answers |
| ``apppasswords`` | app_password | keyed hash |
| ``backup`` | backup_codes | ten keyed hashes, each used once |

Every verification goes through ``lockout``: an attempt counts before its result is known
(so parallel guesses cannot exceed the limit, and a crash mid-check counts as a failure),
a success clears the count, and ``max_failures`` failures lock the method for a time that
doubles at each further lockout; ``limit`` consecutive failures lock it until an
administrator unlocks it, and failures from unfamiliar devices or networks count apart
(``lockout``). Results are :class:`Verification` records with a stable
``reason`` (``token_agent.outcome.Reason``) and a message for people; nothing secret is in
them, in a log line or in the audit log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..kinds import label_of_store
from ..outcome import Reason
from ..rules import CodeRules, LockoutRules  # the policy's [lockout] and [codes], the same classes
from ..store import Method, Store

if TYPE_CHECKING:
    from ..delivery import Delivery
    from ..secretbox import SecretKeys

@dataclass
class FactorContext:
    """What every factor operation needs: the store, the secret keys, the rules, the
    delivery gateways (for sent codes), the organisation's name (in QR codes and texts) and
    a clock (tests move it)."""

    store: Store
    keys: "SecretKeys"
    lockout: LockoutRules = field(default_factory=LockoutRules)
    codes: CodeRules = field(default_factory=CodeRules)
    delivery: "Delivery | None" = None
    issuer: str = "token-agent"
    clock: Callable[[], float] = time.time
    #: the attempt comes from a device and network the user logged in from before (the
    #: login flow says; elsewhere, this machine): False counts failures apart
    familiar: bool = True

    def now(self) -> float:
        return float(self.clock())


@dataclass(frozen=True)
class Verification:
    """The result of checking one factor. ``tries_left`` is how many more failures lock the
    method (None when unknown); ``locked_until`` is set when it is locked."""

    ok: bool
    kind: str
    method: Method | None = None
    reason: Reason | None = None
    message: str = ""
    tries_left: int | None = None
    locked_until: float | None = None
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"ok": self.ok, "kind": self.kind,
                "method": None if self.method is None else self.method.name,
                "reason": None if self.reason is None else self.reason.value,
                "message": self.message, "tries_left": self.tries_left,
                "locked_until": self.locked_until, **({"detail": self.detail} if self.detail else {})}


class FactorError(Exception):
    """An operation on a factor was refused (bad input, not enrolled, not allowed...);
    ``reason`` is a stable code, the message is for people."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def usable_methods(store: Store, user_id: str) -> list[Method]:
    """The user's confirmed, unflagged methods."""
    return [m for m in store.list_methods(user_id) if m.confirmed and not m.flagged]


def refused(ctx: FactorContext, kind: str, user_id: str, reason: Reason, message: str, *,
            outcome: str = "failure", **detail) -> Verification:
    """A verification refused before any secret was checked (nothing enrolled, not allowed),
    recorded as the audit event ``verify.<kind>``."""
    ctx.store.record_event(f"verify.{kind}", user_id=user_id, outcome=outcome,
                           detail={"reason": reason.value, **detail})
    return Verification(False, kind, None, reason, message)


def checked(ctx: FactorContext, *, kind: str, method: Method | None, user_id: str,
            check: Callable[[], tuple[bool, Reason | None, str, dict]],
            scope: str | None = None, max_failures: int | None = None,
            label: str | None = None) -> Verification:
    """Run ``check()`` under the lockout of ``scope`` (default: the method's) and record the
    audit event ``verify.<kind>``. ``check`` returns ``(ok, reason, message, detail)``;
    ``detail`` goes to the audit log (never a secret: the store refuses secret-looking
    keys). A locked scope is refused without calling ``check``."""
    from . import lockout

    label = label or label_of_store(kind)
    scope = lockout.scope_for(scope or lockout.method_scope(method.id), ctx.familiar)
    limit = max_failures or ctx.lockout.max_failures
    store = ctx.store
    name = {"method": method.name} if method is not None else {}
    now = ctx.now()
    try:
        lockout.attempt(store, scope, user_id, now=now, label=label, rules=ctx.lockout,
                        max_failures=limit)
    except lockout.Locked as e:
        store.record_event(f"verify.{kind}", user_id=user_id, outcome="refused",
                           detail={"reason": Reason.METHOD_LOCKED.value, **name})
        return Verification(False, kind, method, Reason.METHOD_LOCKED, e.message, tries_left=0,
                            locked_until=e.until)
    try:
        ok, reason, message, detail = check()
    except BaseException:
        raise  # the attempt stays counted: fail closed
    if ok:
        with store.transaction():
            lockout.succeeded(store, scope)
            if method is not None:
                store.touch_method(method.id, now)
            store.record_event(f"verify.{kind}", user_id=user_id, outcome="success",
                               detail={**name, **detail})
        return Verification(True, kind, method, None, message or f"{label} accepted",
                            detail=detail)
    current = lockout.failed(store, scope, rules=ctx.lockout)
    left = lockout.tries_left(current, limit, ctx.lockout)
    with store.transaction():
        store.record_event(f"verify.{kind}", user_id=user_id, outcome="failure",
                           detail={"reason": reason.value if reason else None, **name,
                                   "tries_left": left, **detail})
        if current.locked(now):
            store.record_event(f"lockout.{kind}", user_id=user_id, outcome="locked",
                               detail={**name, "level": current.level,
                                       "locked_until": current.locked_until,
                                       "until_reset": current.permanent,
                                       "unfamiliar": not ctx.familiar})
    if current.locked(now):
        message = (f"{message}; too many failed attempts: {label} locked "
                   f"{lockout.describe_until(current.locked_until, now)}")
        return Verification(False, kind, method, reason, message, tries_left=0,
                            locked_until=current.locked_until, detail=detail)
    return Verification(False, kind, method, reason,
                        f"{message} — {left} {'try' if left == 1 else 'tries'} left", tries_left=left,
                        detail=detail)
