"""`token-agent settings ...` and `token-agent trust ...`: the organisation's configuration."""

from __future__ import annotations

import click

from .. import exitcodes, settings as org_settings
from . import main
from .common import Context, emit, fail, json_option, pass_ctx


@main.group()
def settings() -> None:
    """Organisation settings kept in the store (relying party, user verification)."""


@settings.command("show")
@json_option
@pass_ctx
def settings_show(ctx: Context, as_json: bool) -> None:
    """Show the settings in force."""
    try:
        data = org_settings.show(ctx.store())
    except ValueError as e:  # a stored value the schema refuses (orgsettings.py)
        fail(str(e), exitcodes.USAGE)
    emit(as_json, data, lambda: "\n".join(
        f"{k:<20} {v}" for k, v in data.items() if k not in ("attestation_roots",))
        + f"\nattestation_roots    {len(data['attestation_roots'])} (token-agent trust list)")


@settings.command("set")
@click.argument("key", type=click.Choice(sorted(org_settings.SETTABLE)))
@click.argument("value")
@json_option
@pass_ctx
def settings_set(ctx: Context, key: str, value: str, as_json: bool) -> None:
    """Set a setting."""
    try:
        stored = org_settings.set_setting(ctx.store(create=True), key, value)
    except ValueError as e:
        fail(str(e), exitcodes.USAGE)
    emit(as_json, {key: stored}, f"{key} = {stored}")


@main.group()
def trust() -> None:
    """Which key models the organisation accepts (attestation roots, AAGUIDs)."""


@trust.command("list")
@json_option
@pass_ctx
def trust_list(ctx: Context, as_json: bool) -> None:
    """List trusted attestation roots and allowed AAGUIDs."""
    data = org_settings.trust_list(ctx.store())
    emit(as_json, data, lambda: "\n".join(
        [f"root   {r['fingerprint'][:16]}…  {r['subject']}" for r in data["attestation_roots"]]
        + [f"aaguid {a}" for a in data["allowed_aaguids"]]) or "nothing configured: any key "
        "model is accepted")


@trust.command("add-root")
@click.argument("certificate", type=click.File("rb"))
@json_option
@pass_ctx
def trust_add_root(ctx: Context, certificate, as_json: bool) -> None:
    """Trust keys whose attestation chains to CERTIFICATE (PEM or DER file, - for stdin)."""
    try:
        fingerprint = org_settings.add_trusted_root(ctx.store(create=True), certificate.read())
    except ValueError as e:
        fail(str(e), exitcodes.USAGE)
    emit(as_json, {"added_root": fingerprint}, f"trusted root {fingerprint}")


@trust.command("remove-root")
@click.argument("fingerprint")
@json_option
@pass_ctx
def trust_remove_root(ctx: Context, fingerprint: str, as_json: bool) -> None:
    """Stop trusting a root (by its SHA-256 fingerprint, from `trust list --json`)."""
    try:
        org_settings.remove_trusted_root(ctx.store(), fingerprint)
    except KeyError as e:
        fail(str(e.args[0]), exitcodes.NOT_FOUND)
    emit(as_json, {"removed_root": fingerprint}, "removed")


@trust.command("add-aaguid")
@click.argument("aaguid")
@json_option
@pass_ctx
def trust_add_aaguid(ctx: Context, aaguid: str, as_json: bool) -> None:
    """Accept a key model by its AAGUID (its attestation must still verify)."""
    try:
        value = org_settings.add_allowed_aaguid(ctx.store(create=True), aaguid)
    except ValueError:
        fail(f"{aaguid!r} is not an AAGUID (a UUID)", exitcodes.USAGE)
    emit(as_json, {"added_aaguid": value}, f"allowed {value}")


@trust.command("remove-aaguid")
@click.argument("aaguid")
@json_option
@pass_ctx
def trust_remove_aaguid(ctx: Context, aaguid: str, as_json: bool) -> None:
    """Stop accepting a key model by its AAGUID."""
    try:
        org_settings.remove_allowed_aaguid(ctx.store(), aaguid)
    except ValueError:
        fail(f"{aaguid!r} is not an AAGUID (a UUID)", exitcodes.USAGE)
    except KeyError as e:
        fail(str(e.args[0]), exitcodes.NOT_FOUND)
    emit(as_json, {"removed_aaguid": aaguid}, "removed")
