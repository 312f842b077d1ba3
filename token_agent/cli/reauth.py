"""Before a command adds, replaces or removes one of a user's methods (``enrol ...``, ``card
enrol``, ``methods prefer|remove``): an administrator goes ahead; anyone else first logs in
as that user with the policy login flow (its second factor too when MFA applies to them),
unless it is the user's first method (``token_agent/reauth.py``).

Administrators here are those of the service (``token_agent/service/authz.py``): root, the
members of ``[service] admin_group`` (config.toml) and the agent user of the caller's name
with the role ``admin``. The login's answers come from the terminal or, in scripts, one
line of standard input each, before the command's own input (e.g. the new password)."""

from __future__ import annotations

import os

from .. import exitcodes
from .common import Context, fail, say


def caller_is_admin(ctx: Context) -> bool:
    """Whether whoever runs this command is an administrator of the agent."""
    from ..config import ConfigError, load_config
    from ..service.authz import Peer, Rules

    if os.getuid() == 0:
        return True
    try:
        service = load_config(ctx.config_path).service  # token-agent --config, else as serve
        rules = Rules(service.login_service_users, service.admin_group)
    except ConfigError as e:
        say(f"warning: config.toml cannot be read ({e}): the default admin group applies")
        rules = Rules()
    return rules.is_admin(Peer.current(), ctx.store())


def require_login(ctx: Context, user, *, pin_stdin: bool = False) -> str:
    """Return how a change of ``user``'s methods is allowed now (``"admin"``,
    ``"first-method"``, ``"login"``), after a login as ``user`` when one is needed; exit
    with the login's code when it fails."""
    from .. import reauth
    from .auth import policy_login
    from .policy_cmd import make_device

    if caller_is_admin(ctx):
        return "admin"
    agent = ctx.agent()
    level = reauth.required_level(agent, user)
    if level == reauth.NONE:
        return reauth.check(agent, user, None)
    say(f"Changing {user.username}'s methods needs a login as {user.username} first"
        + (" with a second factor" if level == reauth.MULTI else "") + ".")
    env = os.environ  # the device as `login` takes it from its environment
    kind = env.get("TOKEN_AGENT_DEVICE") or "managed"
    if kind not in ("managed", "unmanaged"):
        fail(f"TOKEN_AGENT_DEVICE={kind!r}: managed or unmanaged", exitcodes.USAGE)
    device = make_device(kind, env.get("TOKEN_AGENT_DEVICE_ID"), env.get("TOKEN_AGENT_NETWORK"))
    outcome = policy_login(ctx, user.username, device=device, pin_stdin=pin_stdin,
                           step_up=level == reauth.MULTI)
    if not outcome.ok:
        fail(f"nothing changed: the login failed: {outcome.message}",
             exitcodes.REASON_CODES.get(outcome.reason, exitcodes.AUTH_FAILED))
    try:
        return reauth.check(agent, user, reauth.Authenticated.of(outcome), where="just now",
                            hint="log in with your second factor (a key or card with its "
                                 "PIN, or a second factor when asked) and try again")
    except reauth.ReauthRequired as e:
        fail(f"nothing changed: {e.message}", exitcodes.AUTH_FAILED)
