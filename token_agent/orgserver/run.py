"""``token-agent server run``: the app on uvicorn with mutual TLS (client certificates
optional in the handshake, verified against the workstation CA when sent; ``auth.py``
refuses requests without one), the TLS extension (``tlsext.py``), no proxy headers (the
peer address is the one the policy sees).

SIGTERM (or SIGINT) is uvicorn's graceful shutdown: the socket stops accepting, requests in
flight finish (for at most ``[server] shutdown_timeout`` seconds; the store's transactions
commit or roll back whole, never half), WebSockets are closed with 1012 (a ceremony in
progress fails cleanly, and the workstation fails over), then the process exits 0."""

from __future__ import annotations

import logging
import signal
import ssl
import sys
from typing import Any

import uvicorn

from .app import build_app
from .tlsext import TLSH11Protocol, TLSWebSocketProtocol

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            # one line on stderr for people and scripts (tests wait for it)
            print(f"token-agent server: listening on {self.url}", file=sys.stderr, flush=True)
            web = getattr(getattr(self.config.app, "state", None), "web", None)
            if web is not None:
                from ..web import missing_assets

                print(f"token-agent server: pages at {web.origin}/account (self-service) and "
                      f"{web.origin}/admin", file=sys.stderr, flush=True)
                if missing := missing_assets():
                    log.warning("the NHS.UK frontend's files are missing (%s): the pages work "
                                "without their styles; run scripts/setup.sh (npm) to fetch them",
                                ", ".join(missing))


def uvicorn_config(ctx: Any, *, listen: str | None = None) -> tuple[uvicorn.Config, str]:
    from ..orgconfig import split_listen

    server_cfg = ctx.config.server
    host, port = split_listen(listen or server_cfg.listen)
    files = ctx.files
    config = uvicorn.Config(
        build_app(ctx), host=host, port=port,
        ssl_certfile=str(files["tls_cert"]), ssl_keyfile=str(files["tls_key"]),
        ssl_ca_certs=str(files["ca_cert"]), ssl_cert_reqs=ssl.CERT_OPTIONAL,
        http=TLSH11Protocol, ws=TLSWebSocketProtocol, lifespan="on",
        proxy_headers=False, server_header=False, access_log=False, log_config=None,
        timeout_graceful_shutdown=int(server_cfg.shutdown_timeout) or 1,
        loop="asyncio")
    config.load()
    # No TLS 1.3 session tickets (the workstations never resume a session): a ticket arrives
    # after the handshake, while the workstation's client (websockets.sync) writes its
    # upgrade request from one thread and reads from another on the same TLS connection;
    # OpenSSL's connection is not safe for that, and the benchmark's shift change showed it
    # ("SSL internal error" on the write, "bad record mac" on the read, upgrades lost).
    config.ssl.num_tickets = 0
    shown = f"[{host}]" if ":" in host else host
    return config, f"https://{shown}:{port}"


def serve(ctx: Any, *, listen: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the exit status (0 after a graceful shutdown, 1 when the
    server could not start, e.g. its port is taken)."""
    config, url = uvicorn_config(ctx, listen=listen)
    server = _Server(config, url)
    stopped: list[int] = []
    # uvicorn re-raises the signal it caught once it has shut down; these handlers (which
    # it restores first) take it, so that a graceful stop exits 0
    previous = {sig: signal.signal(sig, lambda s, f: stopped.append(s))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit:  # uvicorn exits on a startup failure (port in use, ...)
        server.started = False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        print(f"token-agent: the server could not start on {url} (the error above says why; "
              "[server] listen or --listen chooses the address)", file=sys.stderr, flush=True)
        return 1
    log.info("token-agent server %s stopped (%s)", url,
             ", ".join(signal.Signals(s).name for s in stopped) or "no signal")
    return 0
