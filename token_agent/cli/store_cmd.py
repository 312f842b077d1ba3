"""`token-agent store check` and `token-agent store migrate --to URL`: thin over
``token_agent.store.check`` and ``token_agent.store.copy``."""

from __future__ import annotations

import click

from .. import exitcodes
from . import main
from .common import Context, emit, fail, json_option, pass_ctx


@main.group("store")
def store_group() -> None:
    """The credential store: check it, or move it to a PostgreSQL database."""


@store_group.command("check")
@json_option
@pass_ctx
def store_check(ctx: Context, as_json: bool) -> None:
    """Report the engine, where the store is, its schema version, the time of a round trip,
    the engine's integrity checks and the audit chain. Exit 0 when all is well, 7 when a
    problem was found (each one listed)."""
    from ..store.check import check_store

    report = check_store(ctx.store())

    def text() -> str:
        lines = [f"engine:          {report['engine']}",
                 f"location:        {report['location']}",
                 f"schema version:  {report['schema_version']} (this token-agent writes "
                 f"{report['code_schema_version']})",
                 f"round trip:      {report['round_trip_ms']} ms",
                 f"audit chain:     {report['audit_events']} events verified"
                 if report["audit_events"] is not None else "audit chain:     NOT verified"]
        lines += [f"problem:         {p}" for p in report["problems"]]
        lines.append("store OK" if report["ok"] else f"{len(report['problems'])} problem(s)")
        return "\n".join(lines)

    if not report["ok"]:
        click.echo(text(), err=True)
        fail(f"the store has {len(report['problems'])} problem(s): "
             + "; ".join(report["problems"]), exitcodes.STORE, reason="store-problems",
             data={"store": report})
    emit(as_json, {"store": report}, text)


@store_group.command("migrate")
@click.option("--to", "url", required=True, metavar="URL",
              help="The empty PostgreSQL database to copy the store into "
                   "(postgresql://USER@HOST/DBNAME; no password in it: [store] password_file "
                   "of config.toml, or libpq's PGPASSFILE / ~/.pgpass).")
@json_option
@pass_ctx
def store_migrate(ctx: Context, url: str, as_json: bool) -> None:
    """Copy the store in force (normally the data directory's SQLite file) into an empty
    PostgreSQL database: users, methods, secrets (still encrypted), settings, sessions and
    the audit log, ids and hashes unchanged, in one transaction. Then compare the row counts
    and verify the audit chain on the copy. A database that holds data is refused (exit 9)
    and left as it was. Afterwards, point the agents at it with [store] url, and give every
    machine that uses it the data directory's key file (it encrypts the TOTP secrets)."""
    from ..store import Store, StoreError
    from ..store.copy import StoreNotEmpty, copy_store
    from ..store.url import redact, url_problem

    if problem := url_problem(url):
        fail(f"--to: the store's URL {problem}", exitcodes.USAGE)
    source = ctx.store()
    try:
        target = Store.open(url, create=True, password_file=ctx.config().store.password_file)
    except StoreError as e:
        fail(str(e), exitcodes.STORE)
    try:
        report = copy_store(source, target)
    except StoreNotEmpty as e:
        fail(str(e), exitcodes.CONFLICT, reason="not-empty")
    except StoreError as e:
        fail(f"store migrate to {redact(url)}: {e}", exitcodes.STORE)
    finally:
        target.close()
    emit(as_json, {"migrated": report.to_dict()}, lambda: "\n".join(
        [f"copied {report.source} to {report.target} (schema version {report.schema_version}):"]
        + [f"  {table:22} {n}" for table, n in report.rows.items()]
        + [f"audit chain verified on the copy: {report.audit_events} events",
           "next: set [store] url in config.toml on every machine that uses it, and give "
           "them the data directory's key file (it encrypts the TOTP secrets)"]))
