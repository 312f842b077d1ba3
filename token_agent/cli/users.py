"""`token-agent users ...`"""

from __future__ import annotations

import click

from .. import exitcodes
from . import main
from .common import Context, emit, fail, json_option, pass_ctx, say


def _user_json(user, credentials=None) -> dict:
    data = {
        "id": user.id,
        "username": user.username,
        "display_name": user.display_name,
        "roles": list(user.roles),
        "user_class": user.user_class,
        "mfa_enabled": user.mfa_enabled,
        "mfa_source": user.mfa_source,
        "disabled": user.disabled,
        "created_at": user.created_at,
    }
    if credentials is not None:
        data["keys"] = [
            {
                "name": c.name,
                "credential_id": c.credential_id.hex(),
                "aaguid": c.aaguid,
                "discoverable": c.discoverable,
                "sign_count": c.sign_count,
                "attestation_trusted": c.attestation_trusted,
                "last_used_at": c.last_used_at,
                "flagged": c.flagged,
                "flag_reason": c.flag_reason,
            }
            for c in credentials
        ]
    return data


@main.group()
def users() -> None:
    """Manage users."""


@users.command("add")
@click.argument("username")
@click.option("--display-name", help="The name people see, e.g. 'Dr Alice Smith'.")
@click.option("--role", "roles", multiple=True, help="A role (repeatable).")
@click.option("--class", "user_class", type=click.Choice(["internal", "external", "contributor"]),
              default="internal", show_default=True,
              help="The MFA policy's user class: internal (request handlers, admins), external "
                   "(requesters), contributor.")
@json_option
@pass_ctx
def add(ctx: Context, username: str, display_name: str | None, roles: tuple[str, ...],
        user_class: str, as_json: bool) -> None:
    """Add a user. MFA is on for the new account as the policy's new-accounts default for
    the class says (by default: on for a class that enforces MFA, internal; off for
    external and contributor)."""
    from ..accounts import add_account
    from ..store import StoreError, UserExists

    try:
        user = add_account(ctx.agent(create=True), username, display_name=display_name,
                           roles=roles, user_class=user_class)  # the first user starts the store
    except UserExists as e:
        fail(str(e), exitcodes.CONFLICT)
    except (StoreError, ValueError) as e:
        fail(str(e), exitcodes.USAGE if isinstance(e, ValueError) else exitcodes.STORE)
    emit(as_json, _user_json(user), f"added {user.username} ({user.id})")


@users.command("list")
@json_option
@pass_ctx
def list_(ctx: Context, as_json: bool) -> None:
    """List users."""
    all_users = ctx.store().list_users()
    emit(as_json, {"users": [_user_json(u) for u in all_users]},
         lambda: "\n".join(f"{u.username:<24} {u.display_name or '':<28} {','.join(u.roles)}"
                           for u in all_users) or "no users")


@users.command("set")
@click.argument("username")
@click.option("--class", "user_class", type=click.Choice(["internal", "external", "contributor"]))
@click.option("--mfa", type=click.Choice(["on", "off"]),
              help="MFA for the account itself, where the policy leaves it optional for the "
                   "class (a class that enforces MFA still does: a warning says so).")
@click.option("--disable/--enable", "disabled", default=None, help="Refuse (or allow) their logins.")
@click.option("--display-name")
@json_option
@pass_ctx
def set_(ctx: Context, username: str, user_class: str | None, mfa: str | None,
         disabled: bool | None, display_name: str | None, as_json: bool) -> None:
    """Change a user's class, MFA setting, display name, or disable them. Recorded, with who
    set the MFA setting (the user, when they run it for themself; else an administrator)."""
    from ..accounts import change_account
    from ..store import UnknownUser

    try:
        user, warnings = change_account(
            ctx.agent(), username, user_class=user_class, display_name=display_name,
            mfa=None if mfa is None else mfa == "on", disabled=disabled,
            by="user" if _running_as(username) else "admin")
    except UnknownUser as e:
        fail(str(e), exitcodes.NOT_FOUND)
    for warning in warnings:
        say(f"warning: {warning}")
    emit(as_json, {**_user_json(user), "warnings": warnings},
         f"{user.username}: class {user.user_class}, MFA {'on' if user.mfa_enabled else 'off'}"
         f"{', disabled' if user.disabled else ''}")


def _running_as(username: str) -> bool:
    """Whether this command runs as the (non-root) local account of ``username``."""
    import os
    import pwd

    uid = os.getuid()
    try:
        return uid != 0 and pwd.getpwuid(uid).pw_name.lower() == username.lower()
    except KeyError:
        return False


@users.command("show")
@click.argument("username")
@json_option
@pass_ctx
def show(ctx: Context, username: str, as_json: bool) -> None:
    """Show a user and their keys."""
    from ..store import UnknownUser

    store = ctx.store()
    try:
        user = store.get_user(username)
    except UnknownUser as e:
        fail(str(e), exitcodes.NOT_FOUND)
    creds = store.list_fido_credentials(user.id)
    from ..kinds import KEY, label_of_store
    from ..policy import own_mfa

    others = [m for m in store.list_methods(user.id) if m.kind != KEY.store]

    def text() -> str:
        lines = [f"{user.username}  {user.display_name or ''}",
                 f"  id     {user.id}", f"  roles  {', '.join(user.roles) or '-'}",
                 f"  class  {user.user_class}, MFA "
                 f"{own_mfa(user.mfa_enabled, user.mfa_source)}"
                 f"{', DISABLED' if user.disabled else ''}"]
        for m in others:
            lines.append(f"  {label_of_store(m.kind):<18} {m.name!r}"
                         f"{' (preferred)' if m.preferred else ''}"
                         f"{' (not confirmed)' if not m.confirmed else ''}")
        for c in creds:
            state = f"  SUSPENDED: {c.flag_reason}" if c.flagged else ""
            lines.append(f"  key    {c.name!r} aaguid {c.aaguid} counter {c.sign_count}"
                         f"{' discoverable' if c.discoverable else ''}{state}")
        if not creds:
            lines.append("  no keys enrolled")
        return "\n".join(lines)

    data = _user_json(user, creds)
    data["methods"] = [{"kind": m.kind, "name": m.name, "preferred": m.preferred,
                        "confirmed": m.confirmed, "last_used_at": m.last_used_at}
                       for m in store.list_methods(user.id)]
    emit(as_json, data, text)


@users.command("remove")
@click.argument("username")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_ctx
def remove(ctx: Context, username: str, yes: bool, as_json: bool) -> None:
    """Remove a user and their enrolled credentials (the audit log is kept)."""
    from ..store import UnknownUser

    if not yes and not click.confirm(f"Remove {username} and their keys?", err=True):
        fail("not removed", exitcodes.ERROR)
    try:
        ctx.store().remove_user(username)
    except UnknownUser as e:
        fail(str(e), exitcodes.NOT_FOUND)
    emit(as_json, {"removed": username}, f"removed {username}")
