"""The `token-agent` command line. Thin: every command calls the library; no logic lives here
that a test cannot reach through the library itself."""

from __future__ import annotations

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="token-agent")
def main() -> None:
    """Local authentication agent: FIDO2 keys, smartcards, MFA policy, simulators."""


@main.group()
def sim() -> None:
    """Simulated devices for development and tests (never on a production workstation)."""


from . import sim_key  # noqa: E402,F401  (registers `sim key ...`)
