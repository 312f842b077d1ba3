"""`token-agent policy check|explain|show`, `token-agent audit verify|tail` and
`token-agent admin reset-methods|access-pass|unlock|lockouts|clear-flag`."""

from __future__ import annotations

import datetime as _dt
import os

import click

from .. import admin_ops, exitcodes
from . import main
from .common import Context, emit, escape_controls, fail, json_option, pass_ctx, say

device_options = [
    click.option("--device", "device_kind", type=click.Choice(["managed", "unmanaged"]),
                 envvar="TOKEN_AGENT_DEVICE", default="managed", show_default=True,
                 help="Is this a managed (organisation) device? (env TOKEN_AGENT_DEVICE)"),
    click.option("--device-id", envvar="TOKEN_AGENT_DEVICE_ID",
                 help="The device's id (default: derived from this machine's machine-id)."),
    click.option("--network", metavar="ADDR", envvar="TOKEN_AGENT_NETWORK",
                 help="The client's IP address (default: unknown; env TOKEN_AGENT_NETWORK)."),
]


def with_device(func):
    for option in reversed(device_options):
        func = option(func)
    return func


def make_device(device_kind: str, device_id: str | None, network: str | None):
    import ipaddress

    from ..ceremonies.login import Device
    from ..sightings import workstation_device_id

    if network:
        try:
            ipaddress.ip_address(network)
        except ValueError:
            fail(f"--network {network!r} is not an IP address", exitcodes.USAGE)
    return Device(kind=device_kind, device_id=device_id or workstation_device_id(),
                  network=network or None)


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------- policy


@main.group()
def policy() -> None:
    """The organisation's MFA policy: check a file, explain a decision."""


@policy.command("check")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@json_option
@pass_ctx
def policy_check(ctx: Context, path: str | None, as_json: bool) -> None:
    """Validate a policy file (default: the one in force) and say what is wrong (writable by
    others than root included: the service would refuse it).

    Exit 0 when it is valid (warnings are printed), 2 when it is not."""
    from ..policy import check_policy_text

    target = path or ctx.policy_file()
    if target is None:
        emit(as_json, {"path": None, "valid": True, "errors": [], "warnings": []},
             "no policy file: the built-in defaults are in force")
        return
    try:
        text = open(target, encoding="utf-8").read()
    except OSError as e:
        fail(f"cannot read the policy file {target}: {e.strerror or e}", exitcodes.USAGE)
    except UnicodeDecodeError:
        fail(f"the policy file {target} is not UTF-8 text", exitcodes.USAGE)
    parsed, errors, warnings = check_policy_text(text, str(target))
    from ..filetrust import config_file_problems

    errors = [f"{target}: {p}" for p in config_file_problems(target, "policy file")] + errors
    if not errors and parsed is not None and parsed.delivery:
        from ..delivery import DeliveryConfigError, parse_delivery_config

        try:
            parse_delivery_config(parsed.delivery)
        except DeliveryConfigError as e:
            errors = [f"{target}: delivery: {m}" for m in e.errors]
    data = {"path": str(target), "valid": not errors, "errors": errors, "warnings": warnings}
    if not as_json:
        for w in warnings:
            say(f"warning: {w}")
        for e in errors:
            say(f"error: {e}")
    if errors:
        fail(f"{target}: not valid ({len(errors)} errors)", exitcodes.USAGE, reason="invalid",
             data=data)
    emit(as_json, data, f"{target}: valid" + (f" ({len(warnings)} warnings)" if warnings else ""))


@policy.command("explain")
@click.option("--user", "username", required=True)
@with_device
@click.option("--primary", type=click.Choice(["password", "key", "card"]),
              help="Explain as if the user logged in with this (default: their usual one).")
@click.option("--uv/--no-uv", "primary_uv", default=True, show_default=True,
              help="With --primary key/card: the key verified the PIN / the card's PIN was used.")
@click.option("--joined", is_flag=True,
              help="With --device managed: as if from a workstation joined to the organisation "
                   "(roaming: new to the user but not unusual inside a trusted network).")
@json_option
@pass_ctx
def policy_explain(ctx: Context, username: str, device_kind: str, device_id: str | None,
                   network: str | None, primary: str | None, primary_uv: bool, joined: bool,
                   as_json: bool) -> None:
    """Print what the policy decides for a user's login, and the rules that made it."""
    import dataclasses

    from ..policy import explain
    from ..store import UnknownUser

    if joined and device_kind != "managed":
        fail("--joined needs --device managed: a joined workstation is a managed device; "
             "drop --joined or use --device managed", exitcodes.USAGE)
    agent = ctx.agent()
    device = dataclasses.replace(make_device(device_kind, device_id, network), joined=joined)
    try:
        user = agent.store.get_user(username)
    except UnknownUser as e:
        fail(str(e), exitcodes.NOT_FOUND)
    first, decision = admin_ops.explain_login(agent, user, device, primary, primary_uv)
    data = {"user": user.username, "user_class": user.user_class, "primary": first,
            "device": device.to_json(), "policy_file": agent.policy.source,
            **decision.to_json()}
    emit(as_json, data, lambda: (
        f"{user.username} ({user.user_class}), primary factor {first}, {device.kind} device"
        f"{' (joined workstation)' if device.joined else ''}"
        f"{', network ' + device.network if device.network else ''}\n" + explain(decision)))


@policy.command("show")
@json_option
@pass_ctx
def policy_show(ctx: Context, as_json: bool) -> None:
    """Show the policy in force, defaults filled in, as a policy file (TOML: the same keys as
    the file; it can be saved as one) and which file it came from. The [delivery] table is
    not shown (it may hold gateway credentials): only the names of its channels."""
    pol = ctx.policy()  # no store needed
    data = admin_ops.effective_policy(pol)
    channels = data.pop("delivery_channels")
    source = data.pop("source")
    warnings = data.pop("warnings")

    def text() -> str:
        from .tomlout import dumps

        allowed = set(data["methods"]["allowed"])
        # a class's default minimum (email) that the methods leave out is not written: the
        # file could not say it (policy check refuses it) and means the same without it
        classes = {name: {**c, "minimum": c["minimum"] if c["minimum"] in allowed else None}
                   for name, c in data["classes"].items()}
        toml = {**data, "enforcement": {**data["enforcement"], "from": pol.enforcement.start},
                "classes": classes}
        header = [f"the policy in force: {source or 'built-in defaults (no policy file)'}",
                  "[delivery]: " + (f"channels {', '.join(channels)} (not shown)" if channels
                                    else "none configured")]
        header += [f"warning: {w}" for w in warnings]
        return dumps(toml, header=header)

    emit(as_json, {**data, "source": source, "delivery_channels": channels,
                   "warnings": warnings}, text)


# --------------------------------------------------------------------------- audit


@main.group()
def audit() -> None:
    """The append-only, hash-chained audit log."""


@audit.command("verify")
@json_option
@pass_ctx
def audit_verify(ctx: Context, as_json: bool) -> None:
    """Check the audit log's hash chain: exit 0 when intact, 1 (naming the first bad record)
    when a record was edited, removed or reordered."""
    intact, count, message = admin_ops.verify_audit(ctx.store())
    if not intact:
        fail(message, exitcodes.ERROR, reason="audit-chain-broken",
             data={"intact": False, "event_id": count})
    emit(as_json, {"intact": True, "events": count}, message)


@audit.command("tail")
@click.option("-n", "count", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("--user", "username", help="Only this user's events.")
@click.option("--kind", help="Only events of this kind (e.g. login, verify.totp).")
@json_option
@pass_ctx
def audit_tail(ctx: Context, count: int, username: str | None, kind: str | None,
               as_json: bool) -> None:
    """Show the latest audit events, oldest first (control characters in them escaped, as
    \\n, \\x1b...: a recorded name cannot forge a line)."""
    store = ctx.store()
    user_id = None
    if username:
        from ..store import UnknownUser

        try:
            user_id = store.get_user(username).id
        except UnknownUser as e:
            fail(str(e), exitcodes.NOT_FOUND)
    events = list(reversed(store.list_events(user_id=user_id, kind=kind, limit=count)))
    emit(as_json, {"events": [e.to_dict() for e in events]}, lambda: "\n".join(escape_controls(
        f"{e.id:>6} {_when(e.at)} {e.kind:<22} {e.outcome:<8} {e.username or '-':<16} "
        + " ".join(f"{k}={v}" for k, v in sorted(e.detail.items())))
        for e in events) or "no events")


# --------------------------------------------------------------------------- admin


@main.group()
def admin() -> None:
    """Administrators' actions on users' methods (each one recorded)."""


def _admin_user(ctx: Context, username: str):
    from ..store import UnknownUser

    try:
        return ctx.store().get_user(username)
    except UnknownUser as e:
        fail(str(e), exitcodes.NOT_FOUND)


def _actor() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or str(os.getuid())


@admin.command("reset-methods")
@click.argument("username")
@click.option("--include-password", is_flag=True, help="Remove the password too.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_ctx
def admin_reset_methods(ctx: Context, username: str, include_password: bool, yes: bool,
                        as_json: bool) -> None:
    """A lost or stolen device: remove every method of the user (keys, card identities,
    authenticator apps, phones, companion apps, app passwords, backup codes) so they set up
    new ones at their next login. Recorded in the audit log."""
    user = _admin_user(ctx, username)
    if not yes and not click.confirm(f"Remove every authentication method of {user.username}?",
                                     err=True):
        fail("nothing removed", exitcodes.ERROR)
    removed = admin_ops.reset_methods(ctx.store(), user, _actor(),
                                      include_password=include_password)
    emit(as_json, {"user": user.username, "removed": [m.to_dict() for m in removed]},
         f"removed {len(removed)} methods of {user.username}: they must set up new ones")


@admin.command("access-pass")
@click.argument("username")
@click.option("--hours", type=click.IntRange(1, 24), default=8, show_default=True,
              help="How long the pass lasts (1 to 24 hours).")
@click.option("--revoke", is_flag=True, help="End the user's open pass instead.")
@json_option
@pass_ctx
def admin_access_pass(ctx: Context, username: str, hours: int, revoke: bool,
                      as_json: bool) -> None:
    """A lost device: issue a temporary access pass (single use, shown once) with which the
    user signs in once to set up new methods; a newer pass replaces an open one. Recorded."""
    from ..factors import accesspass

    user = _admin_user(ctx, username)
    factors = ctx.agent().factors()
    if revoke:
        ended = accesspass.revoke(factors, user.id, actor=_actor())
        emit(as_json, {"user": user.username, "revoked": len(ended)},
             f"{user.username}: {len(ended)} open temporary access pass revoked")
        return
    issued, value = accesspass.issue(factors, user.id, actor=_actor(), hours=hours)
    emit(as_json, {"user": user.username, "access_pass": value, "expires_at": issued.expires_at},
         f"temporary access pass for {user.username} (single use, until "
         f"{_when(issued.expires_at)}; shown only now): {value}")


@admin.command("unlock")
@click.argument("username")
@click.option("--method", "kind", help="Only this method kind (e.g. totp, sms, password, key, app-password).")
@json_option
@pass_ctx
def admin_unlock(ctx: Context, username: str, kind: str | None, as_json: bool) -> None:
    """Clear a user's lockouts (all, or of one method kind). Recorded."""
    from ..kinds import UnknownKind

    user = _admin_user(ctx, username)
    try:
        cleared = admin_ops.unlock(ctx.store(), user, kind, _actor())
    except UnknownKind as e:
        fail(str(e), exitcodes.USAGE)
    emit(as_json, {"user": user.username, "cleared": [c.to_json() for c in cleared]},
         f"unlocked {user.username}: {len(cleared)} lockouts cleared")


@admin.command("lockouts")
@click.argument("username")
@json_option
@pass_ctx
def admin_lockouts(ctx: Context, username: str, as_json: bool) -> None:
    """Show a user's failure counts and lockouts."""
    import time

    from ..factors import lockout

    user = _admin_user(ctx, username)
    states = lockout.user_locks(ctx.store(), user.id)
    now = time.time()
    emit(as_json, {"user": user.username, "lockouts": [s.to_json() for s in states]}, lambda: "\n".join(
        f"{s.scope:<48} failures {s.failures}, level {s.level}"
        + (", locked until an administrator unlocks it" if s.permanent
           else f", locked until {_when(s.locked_until)}" if s.locked(now) else "")
        for s in states) or f"{user.username}: no failures recorded")


@admin.command("clear-flag")
@click.argument("username")
@click.option("--key", "key_name", required=True, help="The suspended key's name.")
@json_option
@pass_ctx
def admin_clear_flag(ctx: Context, username: str, key_name: str, as_json: bool) -> None:
    """Lift the suspension of a key (e.g. after a counter regression was explained)."""
    user = _admin_user(ctx, username)
    store = ctx.store()
    cred = next((c for c in store.list_fido_credentials(user.id)
                 if c.name.casefold() == key_name.casefold()), None)
    if cred is None:
        fail(f"{user.username} has no key named {key_name!r}", exitcodes.NOT_FOUND)
    with store.transaction():
        store.clear_flag(cred.credential_id)
        store.record_event("admin.clear-flag", user_id=user.id, credential_id=cred.credential_id,
                           outcome="success", detail={"actor": _actor(), "credential": cred.name})
    emit(as_json, {"user": user.username, "key": cred.name, "flagged": False},
         f"key {cred.name!r} of {user.username} is usable again")
