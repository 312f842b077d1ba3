"""Adding a user and changing their class or MFA flag, as the MFA policy has it (``token-agent
users add|set``).

A new account's own MFA flag is the policy's default for its class
(``Policy.new_account_mfa``: ``[classes.NAME] new_accounts_mfa``, else on for a class that
enforces MFA when ``[enforcement] new_accounts_mfa`` is true): a requester (class
``external``) starts without MFA, an internal user with it, even before the enforcement
date. The store records who set the flag (``User.mfa_source``: ``new-account``, ``admin``,
``user``), so that ``policy explain`` names the real source. Turning a user's MFA off while
their class enforces it is accepted (it matters if the class stops enforcing it) with a
warning: the class still asks them for a second factor. Each change is one audit event
(``user.added``, ``user.changed``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .agent import Agent
    from .policy import Policy
    from .store import User


def add_account(agent: "Agent", username: str, *, display_name: str | None = None,
                roles: Iterable[str] = (), user_class: str = "internal") -> "User":
    """Add a user of ``user_class`` with the class's new-account MFA default (recorded).
    ``UserExists``, ``StoreError`` / ``ValueError`` from the store."""
    store = agent.store
    with store.transaction():
        user = store.add_user(username, display_name=display_name, roles=roles,
                              user_class=user_class,
                              mfa_enabled=agent.policy.new_account_mfa(user_class))
        store.record_event("user.added", user_id=user.id, outcome="success",
                           detail={"user_class": user.user_class,
                                   "mfa_enabled": user.mfa_enabled,
                                   "mfa_source": user.mfa_source})
    return user


def change_account(agent: "Agent", username: str, *, user_class: str | None = None,
                   mfa: bool | None = None, disabled: bool | None = None,
                   display_name: str | None = None, by: str = "admin"
                   ) -> tuple["User", list[str]]:
    """Change a user (``None`` keeps a value); ``by``: who sets the MFA flag (``admin`` or
    ``user``). Returns the user and warnings for whoever made the change. ``UnknownUser``."""
    store = agent.store
    with store.transaction():
        user = store.update_user(username, user_class=user_class, display_name=display_name,
                                 mfa_enabled=mfa, disabled=disabled, mfa_source=by)
        detail = {k: v for k, v in (("user_class", user_class),
                                    ("mfa", None if mfa is None else ("on" if mfa else "off")),
                                    ("disabled", disabled)) if v is not None}
        if mfa is not None:
            detail["mfa_source"] = by
        store.record_event("user.changed", user_id=user.id, outcome="success", detail=detail)
    warnings = []
    if mfa is False:
        enforced = class_enforcement(agent.policy, user.user_class,
                                     datetime.fromtimestamp(agent.now(), timezone.utc))
        if enforced:
            warnings.append(f"MFA is off for {user.username}'s account, but class "
                            f"{user.user_class} {enforced}: {user.username} still needs a "
                            "second factor (the account's setting applies only where the "
                            "class leaves MFA optional)")
    return user, warnings


def class_enforcement(policy: "Policy", user_class: str, now: datetime) -> str | None:
    """"enforces MFA" (with its start date when that is after ``now``) when the class
    enforces MFA and allows a method to do it with, else None."""
    if not policy.class_policy(user_class).enforce or not policy.allowed_for(user_class):
        return None
    start = policy.enforcement.start
    if start is not None and now < start:
        return f"enforces MFA from {start.date().isoformat()}"
    return "enforces MFA"
