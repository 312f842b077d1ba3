"""Re-authentication before a method is bound or removed (NIST SP 800-63B §6.1.2.1).

Adding, replacing or removing an authentication method, or choosing the preferred one, is
allowed only after the user has recently logged in (the policy login flow,
``ceremonies/login.py``) at the level the policy requires of them:

* **multi-factor** when MFA applies to the user (``policy.decide``: their class enforces it,
  or they turned it on, and its date is reached) and they hold a second factor the policy
  accepts. A login in which the policy skipped the second factor (a trusted network, the
  re-verification window) is one factor only and is not enough: log in with a key or card
  and its PIN, or ask for the second factor (``login.start`` with ``step_up``,
  ``token-agent`` asks for it by itself);
* **single-factor** otherwise (MFA does not apply, or it applies but the user has no second
  factor yet: the login flow itself enrols one then, after the primary factor);
* **none** when the user has no usable method at all (nothing confirmed and unsuspended):
  there is nothing to authenticate with, so the first method may be set up without a login.
  From then on every change needs one.

"Recently" is ``[reverification] bind_minutes`` of the policy (default 5 minutes). The
service keeps the last successful login of each connection (``Authenticated``) and checks it
here; the command line runs the login just before the change. Administrators (root, the
admin group, agent users with the role ``admin``) are not asked: they act for others, as
before, and each change is recorded with its actor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .agent import Agent
    from .outcome import LoginOutcome

#: the levels ``required_level`` returns
NONE, SINGLE, MULTI = "none", "single-factor", "multi-factor"


class ReauthRequired(Exception):
    """The change needs a (more) recent or stronger login first; ``message`` says which."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.message = message
        #: a short code for the audit log: no-login, other-user, stale, single-factor
        self.why = why


@dataclass(frozen=True)
class Authenticated:
    """A successful login: who, whether it was multi-factor, how, and when (``clock``)."""

    username: str
    user_id: str
    multi_factor: bool
    method: str
    at: float

    @classmethod
    def of(cls, outcome: "LoginOutcome", clock: Callable[[], float] = time.monotonic
           ) -> "Authenticated | None":
        if not outcome.ok or outcome.user_id is None:
            return None
        return cls(outcome.user or "", outcome.user_id, outcome.multi_factor, outcome.method,
                   clock())


def required_level(agent: "Agent", user) -> str:
    """The login a change of ``user``'s methods needs now: ``NONE``, ``SINGLE`` or ``MULTI``."""
    from .ceremonies.login import Device, explain_for
    from .factors import usable_methods

    if not usable_methods(agent.store, user.id):
        return NONE
    decision = explain_for(agent, user.username, device=Device())
    if decision.enforced and not decision.must_enrol:
        return MULTI
    return SINGLE


def max_age(agent: "Agent") -> float:
    """Seconds a login counts for a change of methods (``[reverification] bind_minutes``)."""
    return agent.policy.reverification.bind_minutes * 60.0


def check(agent: "Agent", user, auth: Authenticated | None, *, now: float | None = None,
          where: str = "on this connection", hint: str | None = None) -> str:
    """Whether ``auth`` allows changing ``user``'s methods now: returns how (``"first-method"``
    or ``"login"``), or raises ``ReauthRequired`` saying what to do (``hint``, else the
    service's way: ``login.start`` on the same connection)."""
    level = required_level(agent, user)
    if level == NONE:
        return "first-method"
    limit = max_age(agent)
    need = "a multi-factor login" if level == MULTI else "a login"
    how = hint or (f"log in as {user.username} {where} first (login.start"
                   + (" with step_up: your second factor" if level == MULTI else "")
                   + f"), then try again within {limit / 60:g} min")
    if auth is None:
        raise ReauthRequired(f"changing {user.username}'s methods needs {need}: {how}",
                             "no-login")
    if auth.user_id != user.id:
        raise ReauthRequired(f"the login {where} is {auth.username}'s, not "
                             f"{user.username}'s: {how}", "other-user")
    elapsed = (time.monotonic() if now is None else now) - auth.at
    if elapsed > limit or elapsed < 0:
        raise ReauthRequired(f"the login {where} was {elapsed / 60:.1f} min ago, more than "
                             f"{limit / 60:g} min: {how}", "stale")
    if level == MULTI and not auth.multi_factor:
        raise ReauthRequired(f"MFA applies to {user.username}: changing their methods needs "
                             f"a multi-factor login, and the login {where} ({auth.method}) was "
                             f"one factor: {how}", "single-factor")
    return "login"
