"""`token-agent server init|run|workstation-token|workstation-revoke|workstations` (the
organisation's server, ``token_agent.orgserver``) and `token-agent workstation join|status`
(a workstation joining it, ``token_agent.organisation.joining``). Thin over those."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import exitcodes
from . import main
from .common import Context, emit, fail, json_option, pass_ctx, say


def _data_dir(ctx: Context) -> Path:
    """The data directory (as every command finds it), without opening the store."""
    from ..config import ConfigError
    from ..datadir import StoreUrlError, locate

    try:
        return locate(ctx.data_dir, config_path=ctx.config_path, config=ctx.config(),
                      store_url=ctx.store_url).path
    except (ConfigError, StoreUrlError) as e:
        fail(str(e), exitcodes.USAGE)


def _need_server_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        fail("the organisation's server needs the `server` extra: pip install "
             "'token-agent[server]'", exitcodes.USAGE)


# --------------------------------------------------------------------------- server


@main.group("server")
def server_group() -> None:
    """The organisation's server: its CA and TLS certificate, serving, and its workstations."""


@server_group.command("init")
@click.option("--dir", "directory", type=click.Path(file_okay=False), metavar="DIR",
              help="Where the CA and the TLS files go (default: [server] dir of config.toml, "
                   "else <data_dir>/server).")
@click.option("--hostname", "hostnames", multiple=True, metavar="NAME",
              help="A host name or IP address the workstations use to reach this server, for "
                   "its TLS certificate (repeatable; default: localhost and 127.0.0.1).")
@click.option("--ca-cert", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="The organisation's own workstation CA certificate (PEM), instead of a new one.")
@click.option("--ca-key", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="... and its private key (PEM, unencrypted; copied 0600).")
@click.option("--cert", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="The server's own TLS certificate (PEM), issued by that CA.")
@click.option("--key", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="... and its private key.")
@json_option
@pass_ctx
def server_init(ctx: Context, directory: str | None, hostnames: tuple[str, ...],
                ca_cert: str | None, ca_key: str | None, cert: str | None, key: str | None,
                as_json: bool) -> None:
    """Create the organisation's workstation CA (EC P-256, 10 years) and the server's TLS
    certificate (from that CA, for --hostname), private keys 0600; or take the
    organisation's own (--ca-cert/--ca-key, --cert/--key). Existing files are never
    replaced (exit 9)."""
    from ..orgconfig import CA_CERT_FILE, CA_KEY_FILE, TLS_CERT_FILE, TLS_KEY_FILE
    from ..organisation import pki

    if bool(ca_cert) != bool(ca_key):
        fail("--ca-cert and --ca-key go together", exitcodes.USAGE)
    if bool(cert) != bool(key):
        fail("--cert and --key go together", exitcodes.USAGE)
    if cert and not ca_cert:
        fail("--cert needs the CA that issued it (--ca-cert and --ca-key): workstations trust "
             "the server through that CA", exitcodes.USAGE)
    if cert and hostnames:
        fail("--hostname is for a certificate made here; with --cert the names are in it",
             exitcodes.USAGE)
    target = Path(directory) if directory else ctx.config().server.directory(_data_dir(ctx))
    files = {"ca_cert": target / CA_CERT_FILE, "ca_key": target / CA_KEY_FILE,
             "tls_cert": target / TLS_CERT_FILE, "tls_key": target / TLS_KEY_FILE}
    present = [str(p) for p in files.values() if p.exists()]
    if present:
        fail(f"{', '.join(present)} exist already: nothing was changed (move them away to "
             "start again)", exitcodes.CONFLICT)
    try:
        if ca_cert:
            the_ca, the_ca_key = pki.read_cert(ca_cert), pki.read_key(ca_key)
            pki.check_ca(the_ca, the_ca_key, what=f"--ca-cert {ca_cert}")
        else:
            the_ca_key, the_ca = pki.make_ca()
        if cert:
            tls, tls_key = pki.read_cert(cert), pki.read_key(key)
            pki.check_key_matches(tls_key, tls, what=f"--key {key}")
            if not pki.issued_by(tls, the_ca):
                raise pki.PkiError(f"--cert {cert} was not issued by the CA: workstations "
                                   "trust the server through that CA only")
        else:
            tls_key, tls = pki.issue_server_cert(the_ca_key, the_ca,
                                                 list(hostnames) or list(pki.DEFAULT_HOSTNAMES))
    except pki.PkiError as e:
        fail(str(e), exitcodes.USAGE)
    try:
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        pki.write_key(files["ca_key"], the_ca_key, exclusive=True)
        pki.write_key(files["tls_key"], tls_key, exclusive=True)
        pki.write_cert(files["ca_cert"], the_ca)
        pki.write_cert(files["tls_cert"], tls)
    except OSError as e:
        for p in files.values():  # nothing half-written
            p.unlink(missing_ok=True)
        fail(f"cannot write the server's files in {target}: {e}", exitcodes.ERROR)
    data = {"dir": str(target), "files": {k: str(v) for k, v in files.items()},
            "ca_hash": pki.ca_hash(the_ca), "ca_subject": the_ca.subject.rfc4514_string(),
            "server_names": _names(tls), "created_ca": not ca_cert}
    emit(as_json, {"server": data}, lambda: "\n".join([
        f"server files in {target}:",
        f"  workstation CA  {files['ca_cert']} (key {files['ca_key']}, 0600)",
        f"  TLS certificate {files['tls_cert']} for {', '.join(data['server_names'])} "
        f"(key {files['tls_key']}, 0600)",
        f"CA hash (join tokens carry it): {data['ca_hash']}",
        "next: `token-agent server run` (with [server] dir set when this is not "
        "<data_dir>/server), then `token-agent server workstation-token --name NAME`"]))


def _names(cert) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in san]


@server_group.command("run")
@click.option("--listen", metavar="HOST:PORT",
              help="Where to listen (default: [server] listen of config.toml, 0.0.0.0:8443).")
@pass_ctx
def server_run(ctx: Context, listen: str | None) -> None:
    """Serve the organisation's API over HTTPS with mutual TLS, on the store of config.toml
    ([store] url: PostgreSQL for several replicas) until SIGTERM or SIGINT: requests in flight
    finish, then exit 0."""
    _need_server_extra()
    import logging

    from ..orgconfig import split_listen
    from ..orgserver.context import ServerContext, ServerSetupError
    from ..orgserver.run import serve

    if listen is not None:
        try:
            split_listen(listen)
        except ValueError as e:
            fail(f"--listen: {e}", exitcodes.USAGE)
    config = ctx.config()
    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.getLogger("token_agent").setLevel(logging.INFO)
    agent = ctx.agent(create=True)
    try:
        server_ctx = ServerContext.open(agent, config)
    except ServerSetupError as e:
        fail(str(e), exitcodes.USAGE)
    sys.exit(serve(server_ctx, listen=listen))


def _server_ca_hash(ctx: Context) -> str:
    from ..organisation import pki

    ca_file = ctx.config().server.files(_data_dir(ctx))["ca_cert"]
    try:
        return pki.ca_hash(pki.read_cert(ca_file))
    except pki.PkiError as e:
        fail(f"{e}: run `token-agent server init` first, or set [server] dir (or "
             "client_ca) in config.toml", exitcodes.NOT_FOUND)


@server_group.command("workstation-token")
@click.option("--name", required=True, help="The workstation's name (its certificate's CN): "
              "letters, digits and . _ -, at most 64.")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True, max=720), default=24.0,
              show_default=True, help="How long the token can be used (at most 720).")
@json_option
@pass_ctx
def workstation_token(ctx: Context, name: str, hours: float, as_json: bool) -> None:
    """Make a one-time join token for a workstation and print it, once (the store keeps its
    hash only). A new token for a name replaces its unused one; a joined workstation must be
    revoked first (exit 9)."""
    _need_server_extra()
    from ..orgserver.join import issue_join_token
    from ..store import InvalidValue, StoreError, WorkstationExists

    ca_hash = _server_ca_hash(ctx)
    try:
        token, ws = issue_join_token(ctx.store(create=True), ca_hash, name, hours)
    except WorkstationExists as e:
        fail(str(e), exitcodes.CONFLICT)
    except (InvalidValue, ValueError) as e:
        fail(str(e), exitcodes.USAGE)
    except StoreError as e:
        fail(str(e), exitcodes.STORE)
    emit(as_json, {"workstation": ws.to_dict(), "token": token}, lambda: "\n".join([
        f"join token for {ws.name} (one use, valid {hours:g} h; shown once):", token,
        "on the workstation, as the service's user: token-agent workstation join "
        "--server https://THIS-SERVER:PORT --token-stdin  (then paste it)"]))


@server_group.command("workstation-revoke")
@click.argument("name")
@json_option
@pass_ctx
def workstation_revoke(ctx: Context, name: str, as_json: bool) -> None:
    """Cut a workstation off: its certificate is refused from its next request on (and an
    unused join token for it stops working)."""
    from ..store import StoreError, UnknownWorkstation

    from .. import admin_ops
    from .policy_cmd import _actor

    try:
        ws = admin_ops.revoke_workstation(ctx.store(), name, _actor())
    except UnknownWorkstation as e:
        fail(str(e), exitcodes.NOT_FOUND)
    except StoreError as e:
        fail(str(e), exitcodes.STORE)
    emit(as_json, {"workstation": ws.to_dict()}, f"revoked {ws.name}: its certificate is "
         "refused from its next request on")


@server_group.command("workstations")
@json_option
@pass_ctx
def workstations(ctx: Context, as_json: bool) -> None:
    """List the organisation's workstations: state (pending, joined, revoked), when they
    joined and were last seen, and from where."""
    from .jsonout import iso_time

    found = ctx.store().list_workstations()

    def text() -> str:
        if not found:
            return "no workstations (token-agent server workstation-token --name NAME)"
        lines = [f"{'NAME':24} {'STATE':8} {'JOINED':20} {'LAST SEEN':20} ADDRESS"]
        for w in found:
            lines.append(f"{w.name:24} {w.state:8} "
                         f"{iso_time(w.joined_at) if w.joined_at else '-':20} "
                         f"{iso_time(w.last_seen_at) if w.last_seen_at else '-':20} "
                         f"{w.last_address or '-'}")
        return "\n".join(lines)

    emit(as_json, {"workstations": [w.to_dict() for w in found]}, text)


# --------------------------------------------------------------------------- workstation


@main.group("workstation")
def workstation_group() -> None:
    """This workstation's membership of an organisation."""


@workstation_group.command("join")
@click.option("--server", "server", required=True, metavar="URL",
              help="One of the organisation's servers, https://HOST:PORT.")
@click.option("--token", metavar="TOKEN",
              help="The join token `server workstation-token` printed (it shows in the process "
                   "list while this runs: prefer --token-stdin).")
@click.option("--token-stdin", is_flag=True, help="Read the join token from standard input.")
@json_option
@pass_ctx
def workstation_join(ctx: Context, server: str, token: str | None, token_stdin: bool,
                     as_json: bool) -> None:
    """Join the organisation: make this workstation's key pair (it never leaves; 0600, the
    running user's: run this as the service's user), send a certificate request with the
    one-time token, check the server's CA against the token and keep the certificate under
    the organisation directory. config.toml is not changed: the [organisation] table to add
    is printed."""
    from ..organisation.errors import JoinError, ServerRefused, ServerUnavailable
    from ..organisation.joining import join_organisation

    if bool(token) == token_stdin:
        fail("give the join token with --token or --token-stdin (one of them)", exitcodes.USAGE)
    if token_stdin:
        if sys.stdin.isatty():
            say("Join token:")
        token = sys.stdin.readline().strip()
    config = ctx.config()
    org_dir = config.organisation.directory(_data_dir(ctx))
    try:
        joined = join_organisation(server, token or "", org_dir,
                                   timeout=max(config.organisation.timeout, 10.0))
    except JoinError as e:
        fail(str(e), exitcodes.USAGE if "not a join token" in str(e) or "--server" in str(e)
             else exitcodes.AUTH_FAILED, reason="join-refused")
    except ServerRefused as e:
        fail(e.message, exitcodes.AUTH_FAILED if e.status in (401, 403) else exitcodes.ERROR,
             reason=e.error)
    except ServerUnavailable as e:
        fail(str(e), exitcodes.SERVER_UNAVAILABLE)
    except OSError as e:
        fail(f"cannot write this workstation's organisation files in {org_dir}: {e}",
             exitcodes.ERROR)
    configured = server.rstrip("/") in config.organisation.servers
    joined["configured"] = configured
    lines = [f"joined as {joined['name']} through {joined['server']}",
             f"  key and certificate in {joined['dir']}",
             f"  certificate fingerprint {joined['fingerprint']}"]
    if not configured:
        lines += ["add to config.toml (list every replica of the organisation's server):",
                  "[organisation]", f"servers = [\"{joined['server']}\"]"]
    emit(as_json, {"joined": joined}, "\n".join(lines))


@workstation_group.command("status")
@click.option("--no-check", is_flag=True, help="Do not ask the servers.")
@json_option
@pass_ctx
def workstation_status(ctx: Context, no_check: bool, as_json: bool) -> None:
    """This workstation's organisation: its servers, its certificate, and what each server
    says of it (ok, workstation-revoked, unreachable...). Exit 12 when it has not joined, 13
    when no server answers, 3 when they refuse it."""
    from ..organisation.joining import workstation_status as status
    from .jsonout import iso_time

    config = ctx.config()
    data = status(config, _data_dir(ctx), check=not no_check)

    def text() -> str:
        lines = [f"organisation servers: {', '.join(data['servers']) or '(none configured)'}"]
        if not data["joined"]:
            lines.append(f"not joined (nothing in {data['dir']})")
        else:
            lines += [f"joined as {data['name']} (certificate {data['fingerprint'][:16]}..., "
                      f"valid until {iso_time(data['not_after'])})"]
        for c in data.get("checks", []):
            lines.append(f"  {c['server']}: {c['state']}"
                         + (f" ({c['message']})" if c.get("message") else ""))
        return "\n".join(lines)

    if not data["joined"]:
        click.echo(text(), err=True)
        fail("this workstation has not joined an organisation: `token-agent workstation join "
             "--server URL --token-stdin`", exitcodes.ORGANISATION, reason="not-joined",
             data={"workstation": data})
    checks = data.get("checks")
    if checks and not any(c["state"] == "ok" for c in checks):
        click.echo(text(), err=True)
        refused = [c for c in checks if c["state"] != "unreachable"]
        if refused:
            fail(f"the organisation's servers refuse this workstation: {refused[0]['message']}",
                 exitcodes.AUTH_FAILED, reason=refused[0]["state"],
                 data={"workstation": data})
        fail("no server of the organisation answered", exitcodes.SERVER_UNAVAILABLE,
             data={"workstation": data})
    emit(as_json, {"workstation": data}, text)

