"""config.toml's organisation tables, parsed for ``config.py`` (which delegates here):

```toml
[server]                                # the organisation's server (token-agent server run)
listen = "0.0.0.0:8443"                 # host:port to serve HTTPS on ([::]:8443 for IPv6)
dir = "/var/lib/token-agent/server"     # the CA and TLS files [<data_dir>/server]
tls_cert = "server.pem"                 # the server's TLS certificate [<dir>/server.pem]
tls_key = "server.key"                  # its private key (0600) [<dir>/server.key]
client_ca = "ca.pem"                    # the workstation CA [<dir>/ca.pem]; its key ca.key
                                        # stays beside it (it issues the workstations' certificates)
workers = 16                            # threads running the store's work (1 to 256)
shutdown_timeout = 30                   # seconds SIGTERM waits for requests in flight (1 to 3600)

[organisation]                          # this workstation belongs to an organisation
servers = ["https://org1.example.nhs.uk:8443", "https://org2.example.nhs.uk:8443"]
timeout = 5                             # seconds to wait for a server (0.5 to 60)
dir = "/var/lib/token-agent/organisation"  # the workstation's key and certificates
                                        # [<data_dir>/organisation]
```

Relative paths are taken from the configuration file's directory, except ``tls_cert``,
``tls_key`` and ``client_ca``, taken from ``[server] dir``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .tomlcheck import show as _show

SERVER_KEYS = ("listen", "dir", "tls_cert", "tls_key", "client_ca", "workers",
               "shutdown_timeout")
ORGANISATION_KEYS = ("servers", "timeout", "dir")

DEFAULT_LISTEN = "0.0.0.0:8443"
SERVER_DIRNAME = "server"
ORGANISATION_DIRNAME = "organisation"
#: file names in the server's directory
CA_CERT_FILE, CA_KEY_FILE = "ca.pem", "ca.key"
TLS_CERT_FILE, TLS_KEY_FILE = "server.pem", "server.key"
#: file names in the workstation's organisation directory
WS_KEY_FILE, WS_CERT_FILE, WS_CA_FILE = "workstation.key", "workstation.pem", "ca.pem"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    dir: str | None = None  # None: <data_dir>/server
    tls_cert: str | None = None  # None: <dir>/server.pem
    tls_key: str | None = None  # None: <dir>/server.key
    client_ca: str | None = None  # None: <dir>/ca.pem
    workers: int = 16
    shutdown_timeout: float = 30.0

    def directory(self, data_dir: str | os.PathLike[str]) -> Path:
        return Path(self.dir) if self.dir else Path(data_dir) / SERVER_DIRNAME

    def files(self, data_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """The CA's certificate and key, and the TLS certificate and key."""
        d = self.directory(data_dir)

        def at(value: str | None, default: str) -> Path:
            return d / default if not value else (d / value if not Path(value).is_absolute()
                                                  else Path(value))

        ca = at(self.client_ca, CA_CERT_FILE)
        return {"ca_cert": ca, "ca_key": ca.with_name(CA_KEY_FILE) if self.client_ca
                else d / CA_KEY_FILE,
                "tls_cert": at(self.tls_cert, TLS_CERT_FILE),
                "tls_key": at(self.tls_key, TLS_KEY_FILE)}

    def host_port(self) -> tuple[str, int]:
        host, port = split_listen(self.listen)
        return host, port


@dataclass(frozen=True)
class OrganisationConfig:
    servers: tuple[str, ...] = ()  # empty: not an organisation's workstation
    timeout: float = 5.0
    dir: str | None = None  # None: <data_dir>/organisation

    @property
    def enabled(self) -> bool:
        return bool(self.servers)

    def directory(self, data_dir: str | os.PathLike[str]) -> Path:
        return Path(self.dir) if self.dir else Path(data_dir) / ORGANISATION_DIRNAME


def split_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); ``ValueError`` when it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port, e.g. \"0.0.0.0:8443\"")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. \"[::]:8443\"")
    return host, int(port)


def server_url_problem(url: str) -> str | None:
    """Why ``url`` is not an organisation server's address (https://host[:port]), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as e:
        return f"is not a URL ({e})"
    if parts.scheme != "https":
        return "must start with https:// (the organisation's server speaks TLS only)"
    if not parts.hostname:
        return "has no host name"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return "must be https://HOST[:PORT] only (no path, query or user)"
    return None


def parse_server(p: Any, t: Mapping[str, Any]) -> ServerConfig:
    """``[server]`` with ``config._Parser`` ``p`` (it collects the errors)."""
    listen = p.string(t, "listen", "server") or DEFAULT_LISTEN
    try:
        split_listen(listen)
    except ValueError as e:
        p.error("server.listen", str(e))
        listen = DEFAULT_LISTEN
    directory = p.path(t, "dir", "server")
    names = {}
    for key in ("tls_cert", "tls_key", "client_ca"):
        value = p.string(t, key, "server")
        if value is not None:
            value = os.path.expanduser(value)
        names[key] = value
    return ServerConfig(
        listen=listen, dir=directory, **names,
        workers=p.number(t, "workers", "server", 16, 1, 256, "", integer=True),
        shutdown_timeout=p.number(t, "shutdown_timeout", "server", 30.0, 1, 3600, " seconds"))


def parse_organisation(p: Any, t: Mapping[str, Any]) -> OrganisationConfig:
    """``[organisation]`` with ``config._Parser`` ``p``."""
    servers: list[str] = []
    listed = p.strings(t, "servers", "organisation", "server URL")
    if listed is not None and not listed and "servers" in t and isinstance(t["servers"], list):
        p.error("organisation.servers", "is empty: list the organisation's servers, e.g. "
                                        "[\"https://org1.example.nhs.uk:8443\"] (or leave the "
                                        "[organisation] table out)")
    for url in listed or ():
        if problem := server_url_problem(url):
            p.error("organisation.servers", f"{_show(url)} {problem}")
            continue
        servers.append(url.rstrip("/"))
    if t and "servers" not in t:
        p.error("organisation.servers", "is missing: an [organisation] table lists its servers")
    return OrganisationConfig(
        servers=tuple(servers),
        timeout=p.number(t, "timeout", "organisation", 5.0, 0.5, 60, " seconds"),
        dir=p.path(t, "dir", "organisation"))


__all__ = ["ServerConfig", "OrganisationConfig", "parse_server", "parse_organisation",
           "split_listen", "server_url_problem"]
