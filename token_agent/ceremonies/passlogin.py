"""A sign-in with a temporary access pass (``factors/accesspass.py``): ``login(...,
primary="access_pass")`` runs it.

The person gives the user name and the pass (``Interaction.secret``). The pass is the
primary factor and satisfies MFA for this sign-in only: the outcome carries two factors (so
``reauth`` lets the user set up new methods straight away), no policy second factor is
asked, and nothing is recorded for re-verification on the device (the next sign-in asks for
the methods the policy wants, which the user has set up meanwhile). The pass is used up.

As for every sign-in before a first factor, the person is told only "Authentication
failed." for an unknown or disabled user, a wrong pass, a used or expired one, or a lock;
the audit log and the outcome's ``reason`` keep the story. An unknown user's attempt does
the keyed hash a known user's does (``accesspass.decoy``), and every failure takes at least
``FAILURE_FLOOR`` seconds, so that the few store writes a known user's check makes (the
lockout, the expiry) do not tell, by the time the answer takes, who exists or holds a pass.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from .. import sightings
from ..outcome import Factor, LoginOutcome, Reason
from .unusual import where_detail

if TYPE_CHECKING:
    from ..agent import Agent
    from .login import Device, Interaction

#: the ``primary`` of ``login()`` that means a temporary access pass
ACCESS_PASS = "access_pass"
PROMPT = "Temporary access pass"
#: the least time a failed sign-in with a pass takes (seconds)
FAILURE_FLOOR = 0.25


def login_with_pass(agent: "Agent", user, username: str, *, interaction: "Interaction",
                    device: "Device", fail, on_success: Callable[[Any, str], None] | None
                    ) -> LoginOutcome:
    """The sign-in (``fail``: the login's ``_Fail``, which records and masks failures)."""
    from ..factors import accesspass
    from ..policy import network_key
    from .login import CANCELLED_MESSAGE, familiar

    typed = interaction.secret(PROMPT)
    if typed is None:
        return fail(Reason.CANCELLED, CANCELLED_MESSAGE)
    started = time.monotonic()

    def failed(reason: Reason, message: str, **detail) -> LoginOutcome:
        outcome = fail(reason, message, primary=ACCESS_PASS, **detail)
        time.sleep(max(0.0, started + FAILURE_FLOOR - time.monotonic()))
        return outcome

    store = agent.store
    if user is None or user.disabled:
        accesspass.decoy(agent.factors(), typed)
        if user is None:
            return failed(Reason.UNKNOWN_USER, f"no user {username!r}")
        return failed(Reason.USER_DISABLED, f"{user.username} is disabled")
    ctx = replace(agent.factors(), familiar=familiar(agent, user, device))
    result = accesspass.verify(ctx, user.id, typed)
    if not result.ok:
        return failed(result.reason or Reason.VERIFICATION_FAILED, result.message,
                      **({"tries_left": result.tries_left} if result.tries_left is not None
                         else {}))
    net = None
    if device.network:
        try:
            net = network_key(agent.policy, device.network)
        except ValueError:
            net = None
    with store.transaction():
        sightings.record_login(store, user.id, device_id=device.device_id, network=net,
                               now=agent.now())
        store.record_event("login", user_id=user.id, outcome="success",
                           detail={"primary": ACCESS_PASS, "second": None,
                                   "mfa_required": False, "alert": False,
                                   "access_pass": True, **where_detail(device, net)})
        if on_success is not None:
            on_success(user, ACCESS_PASS)
    return LoginOutcome(ok=True, method=ACCESS_PASS, user=user.username, user_id=user.id,
                        factors=(Factor.KNOWLEDGE, Factor.POSSESSION),
                        message="signed in with a temporary access pass: set up your "
                                "methods now, the pass cannot be used again",
                        detail={"primary": ACCESS_PASS, "second": None, "access_pass": True})
