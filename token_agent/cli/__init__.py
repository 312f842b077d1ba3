"""The `token-agent` command line. Thin: every command calls the library; no logic lives here
that a test cannot reach through the library itself."""

from __future__ import annotations

import logging

import click

from .. import __version__
from .. import exitcodes
from .cancel import CancellingGroup
from .common import Context, fail
from .jsonout import JsonGroup


class RootGroup(JsonGroup, CancellingGroup):
    """--json errors as one object (:class:`JsonGroup`, click's usage errors included); Ctrl-C
    is "Cancelled." and exit 5 (:class:`CancellingGroup`); a malformed
    TOKEN_AGENT_SIM_KEYS, met by whichever command looks for keys, is a usage error."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ValueError as e:
            from drivers.fido.sim import SimKeysError

            if not isinstance(e, SimKeysError):
                raise
            fail(f"{e} (expected comma-separated host:port entries, e.g. "
                 "TOKEN_AGENT_SIM_KEYS=127.0.0.1:35962,127.0.0.1:35964)", exitcodes.USAGE)


@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="token-agent")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where the credential store lives (default: TOKEN_AGENT_DATA_DIR, else "
                   "[store] data_dir of config.toml, else $XDG_DATA_HOME/token-agent, else "
                   "~/.local/share/token-agent).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="The configuration file, for its [store] data_dir and [policy] file "
                   "(default: as `serve` "
                   "finds it: TOKEN_AGENT_CONFIG, /etc/token-agent/config.toml, "
                   "~/.config/token-agent/config.toml).")
@click.option("--store-url", metavar="URL",
              help="The store on a PostgreSQL server, e.g. postgresql://token_agent@db/token_agent "
                   "(default: TOKEN_AGENT_STORE_URL, else [store] url of config.toml, else the "
                   "SQLite file in the data directory). Never with a password in it: "
                   "[store] password_file, or libpq's PGPASSFILE / ~/.pgpass.")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), envvar="TOKEN_AGENT_POLICY",
              help="The MFA policy file (TOML; default: config.toml's [policy] file, then "
                   "/etc/token-agent/policy.toml, then ~/.config/token-agent/policy.toml, else "
                   "built-in defaults; env TOKEN_AGENT_POLICY).")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens to stderr.")
@click.pass_context
def main(ctx: click.Context, data_dir: str | None, config_path: str | None,
         store_url: str | None, policy_path: str | None, verbose: bool) -> None:
    """Local authentication agent: FIDO2 keys, smartcards, MFA policy, simulators."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(data_dir, policy_path, config_path, store_url)
    ctx.call_on_close(ctx.obj.close)


@main.group()
def sim() -> None:
    """Simulated devices for development and tests (never on a production workstation)."""


from . import admin, auth, keys, sim_key, users  # noqa: E402,F401  (register the commands)
from . import sim_card  # noqa: E402,F401
from . import sim_card_reader  # noqa: E402,F401  (sim card insert, remove)
from . import card  # noqa: E402,F401  (card status, login, watch, change-pin, unlock)
from . import mfa  # noqa: E402,F401  (enrol/verify second factors, methods, approve, send-code)
from . import policy_cmd  # noqa: E402,F401  (policy check/explain/show, audit, admin)
from . import service_cmd  # noqa: E402,F401  (serve, config check, service status/sessions/events)
from . import store_cmd  # noqa: E402,F401  (store check, store migrate)
from . import org_cmd  # noqa: E402,F401  (server ..., workstation join/status)
