"""`token-agent serve`, `token-agent config check` and `token-agent service status|sessions|events`."""

from __future__ import annotations

import sys
import time

import click

from .. import exitcodes
from . import main
from .common import Context, emit, fail, json_option, pass_ctx
from .jsonout import emit_line, json_command

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), metavar="PATH",
    help="The configuration file (default: TOKEN_AGENT_CONFIG, /etc/token-agent/config.toml, "
         "~/.config/token-agent/config.toml, else built-in defaults).")
socket_option = click.option(
    "--socket", "socket_path", type=click.Path(dir_okay=False), metavar="PATH",
    help="The service's socket (default: TOKEN_AGENT_SOCKET, the configuration's "
         "[service] socket, /run/token-agent/agent.sock for root).")


def _load_config(config_path: str | None, *, strict: bool = False):
    """The configuration, or exit 2 (``strict``: the service's, see ``filetrust.py``)."""
    from ..config import ConfigError, load_config

    try:
        return load_config(config_path, strict=strict)
    except ConfigError as e:
        for line in e.errors[:-1]:
            click.echo(f"token-agent: {line}", err=True)
        fail(e.errors[-1] if e.errors else str(e), exitcodes.USAGE, reason="invalid-config")


def _from_command_line(name: str) -> bool:
    """Whether the root group's option ``name`` was given on the command line (not taken
    from its environment variable): the command line beats the configuration file, which
    beats the environment."""
    from click.core import ParameterSource

    root = click.get_current_context().find_root()
    return root.get_parameter_source(name) is ParameterSource.COMMANDLINE


# --------------------------------------------------------------------------- serve


@main.command("serve")
@socket_option
@config_option
@pass_ctx
def serve(ctx: Context, socket_path: str | None, config_path: str | None) -> None:
    """Run the service in the foreground: it owns the keys, the readers and the store, runs
    the policy, and serves the local API on a Unix socket. SIGTERM or SIGINT stop it
    cleanly (exit 0); SIGHUP reads the configuration and the policy again. Under systemd
    (Type=notify) it says when it is ready, and pings the watchdog while it serves; a service
    that can no longer accept connections exits 1, so that it is restarted."""
    import signal
    import threading

    from ..service.logs import setup_logging
    from ..datadir import StoreUrlError
    from ..service.server import Service, ServiceStartError

    config_path = config_path or ctx.config_path  # `serve --config` or `token-agent --config`
    config = _load_config(config_path, strict=True)
    setup_logging(config.logging.level, config.logging.format)
    policy_path = ctx.policy_path if _from_command_line("policy_path") else None
    try:
        service = Service(config, socket_path=socket_path, data_dir=ctx.data_dir,
                          policy_path=policy_path, store_url=ctx.store_url)
    except StoreUrlError as e:
        fail(str(e), exitcodes.USAGE)
    stop = threading.Event()
    hup = threading.Event()

    def on_signal(signum, _frame) -> None:
        (hup if signum == signal.SIGHUP else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        service.start()
    except ServiceStartError as e:
        from ..policy import PolicyError
        from ..secretbox import SecretError
        from ..store import StoreError

        cause = e.__cause__
        code = exitcodes.ERROR
        if isinstance(cause, PolicyError):
            code = exitcodes.USAGE
        elif isinstance(cause, (StoreError, SecretError, OSError)):
            code = exitcodes.STORE
        fail(str(e), code)
    from ..service.lifecycle import serve_until_stopped
    from ..service.sdnotify import Notifier

    sys.exit(serve_until_stopped(service, stop, hup, notifier=Notifier.from_environ(),
                                 reload=lambda: _reload(service, config_path)))


def _reload(service, config_path: str | None) -> None:
    """SIGHUP: the configuration and the policy read again; a wrong file changes nothing."""
    import logging

    from ..config import ConfigError, load_config
    from ..policy import PolicyError
    from ..service.logs import setup_logging

    log = logging.getLogger("token_agent.service")
    try:
        config = load_config(config_path, strict=True)
        service.reload(config)
    except (ConfigError, PolicyError) as e:
        log.error("reload refused, nothing changed: %s", e, extra={"errors": e.errors})
        return
    setup_logging(config.logging.level, config.logging.format)


# --------------------------------------------------------------------------- config


@main.group("config")
def config_group() -> None:
    """The service's and the workstation's configuration (config.toml)."""


@config_group.command("check")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@json_option
def config_check(path: str | None, as_json: bool) -> None:
    """Validate a configuration file (default: the one in force). Exit 0 when it can be
    used (warnings are printed), 2 when it cannot (every problem is listed)."""
    from ..config import ConfigError, check_config_text, config_path, read_config_file

    target = config_path(path)
    if target is None:
        emit(as_json, {"file": None, "errors": [], "warnings": []},
             "no configuration file: the built-in defaults apply")
        return
    try:
        text = read_config_file(target, strict=True)  # what the service would refuse
    except ConfigError as e:
        config, errors, warnings = None, e.errors, []
    else:
        config, errors, warnings = check_config_text(text, str(target))
    data = {"file": str(target), "errors": errors, "warnings": warnings}
    if config is not None:
        data["config"] = config.to_json()
    if not as_json:
        for line in errors:
            click.echo(f"error: {line}", err=True)
        for line in warnings:
            click.echo(f"warning: {line}", err=True)
    if errors:
        fail(f"{target}: cannot be used ({len(errors)} errors)", exitcodes.USAGE,
             reason="invalid-config", data=data)
    emit(as_json, data, f"{target}: ok")


# --------------------------------------------------------------------------- service (client)


@main.group("service")
def service_group() -> None:
    """Talk to the running service (`token-agent serve`) over its socket."""


def _client(socket_path: str | None, config_path: str | None):
    from ..service.client import Client, ServiceError

    if socket_path is None:
        socket_path = str(_load_config(config_path).service.client_socket_path())
    try:
        return Client(socket_path)
    except ServiceError as e:
        fail(e.message, exitcodes.ERROR, reason=e.code)


def _call(client, op: str, **args):
    from ..service.client import ServiceError

    try:
        return client.request(op, **args)
    except ServiceError as e:
        fail(f"{op}: {e.message} ({e.code})", exitcodes.ERROR, reason=e.code)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@service_group.command("status")
@socket_option
@config_option
@json_option
def service_status(socket_path: str | None, config_path: str | None, as_json: bool) -> None:
    """The service's version, who you are to it, and what it holds now."""
    with _client(socket_path, config_path) as client:
        hello = _call(client, "hello")
    service = hello.get("service", {})
    peer = hello["peer"]

    def text() -> str:
        sessions = service.get("sessions", {})
        readers = service.get("readers", {})
        return "\n".join([
            f"token-agent service {hello['agent']} (protocol {hello['version']}), pid "
            f"{service.get('pid')}, up {service.get('uptime_s', 0):.0f} s",
            f"you: {peer.get('user') or 'uid ' + str(peer['uid'])} "
            f"({', '.join(peer.get('roles') or []) or 'no role'})",
            f"connections {service.get('connections')}, ceremonies in progress "
            f"{service.get('ceremonies')}",
            "sessions: " + ", ".join(f"{n} {k}" for k, n in sorted(sessions.items())),
            "readers: " + (", ".join(f"{r} ({'card' if present else 'empty'})"
                                     for r, present in sorted(readers.items()))
                           or ("none" if service.get("watching_readers") else "not watched")),
        ])

    # "version" of the output is the JSON format's: the protocol's is protocol_version
    emit(as_json, {**{k: v for k, v in hello.items() if k != "version"},
                   "protocol_version": hello.get("version")}, text)


@service_group.command("sessions")
@click.option("--user", "username", help="Only this user's sessions.")
@socket_option
@config_option
@json_option
def service_sessions(username: str | None, socket_path: str | None, config_path: str | None,
                     as_json: bool) -> None:
    """The sessions the service holds (kept across its restarts)."""
    with _client(socket_path, config_path) as client:
        sessions = _call(client, "session.state", user=username)["sessions"]
    emit(as_json, {"sessions": sessions}, lambda: "\n".join(
        f"{s['id'][:12]}  {s['user']:<16} {s['method']:<14} {s['state']:<7} "
        f"{_when(s['created_at'])}"
        + (f"  card in {s['card']['reader']}" if s.get("card") else "")
        for s in sessions) or "no sessions")


@service_group.command("events")
@socket_option
@config_option
@json_command(always=True, stream=True)
def service_events(socket_path: str | None, config_path: str | None) -> None:
    """Print the service's events (cards, sessions locked, logins) as JSON lines until
    Ctrl-C."""
    from ..service.client import ServiceError

    client = _client(socket_path, config_path)
    try:
        _call(client, "events.subscribe")
        for event in client.events():
            emit_line(event)
    except KeyboardInterrupt:
        pass
    except ServiceError as e:
        fail(e.message, exitcodes.ERROR, reason=e.code)
    finally:
        client.close()
