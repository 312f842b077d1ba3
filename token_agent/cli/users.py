"""`token-agent users ...`"""

from __future__ import annotations

import click

from .. import exitcodes
from . import main
from .common import Context, emit, fail, json_option, pass_ctx


def _user_json(user, credentials=None) -> dict:
    data = {
        "id": user.id,
        "username": user.username,
        "display_name": user.display_name,
        "roles": list(user.roles),
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
@json_option
@pass_ctx
def add(ctx: Context, username: str, display_name: str | None, roles: tuple[str, ...],
        as_json: bool) -> None:
    """Add a user."""
    from ..store import StoreError, UserExists

    try:
        user = ctx.store().add_user(username, display_name=display_name, roles=roles)
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
    emit(as_json, [_user_json(u) for u in all_users],
         lambda: "\n".join(f"{u.username:<24} {u.display_name or '':<28} {','.join(u.roles)}"
                           for u in all_users) or "no users")


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

    def text() -> str:
        lines = [f"{user.username}  {user.display_name or ''}",
                 f"  id     {user.id}", f"  roles  {', '.join(user.roles) or '-'}"]
        for c in creds:
            state = f"  SUSPENDED: {c.flag_reason}" if c.flagged else ""
            lines.append(f"  key    {c.name!r} aaguid {c.aaguid} counter {c.sign_count}"
                         f"{' discoverable' if c.discoverable else ''}{state}")
        if not creds:
            lines.append("  no keys enrolled")
        return "\n".join(lines)

    emit(as_json, _user_json(user, creds), text)


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
