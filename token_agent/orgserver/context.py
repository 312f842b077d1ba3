"""What every request of one server replica shares: the agent (store, key file, policy),
the configuration and the organisation's CA. The app is stateless: everything that must be
the same on every replica is in the store; what is here is read at start."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..organisation import pki


class ServerSetupError(Exception):
    """The server cannot start: its files are missing or wrong; the message says what to do."""


@dataclass
class ServerContext:
    """One per replica (``ServerContext.open``)."""

    #: ``token_agent.agent.Agent``: the store (shared by the worker threads, each with a
    #: connection of its own on PostgreSQL: ``store/core.py``) and the policy
    agent: Any
    #: ``token_agent.config.Config``
    config: Any
    #: the workstation CA: certificate and private key (issues workstation certificates)
    ca_cert: Any
    ca_key: Any
    #: the files in use (``ca_cert``, ``ca_key``, ``tls_cert``, ``tls_key``)
    files: dict[str, Path]
    #: this replica, for answers and logs: host:pid
    server_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    clock: Any = time.time
    #: workstation id -> when this replica last wrote its last-seen time
    _touched: dict[int, float] = field(default_factory=dict, repr=False)
    _touch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def store(self) -> Any:
        return self.agent.store

    @property
    def ca_pem(self) -> str:
        return pki.cert_pem(self.ca_cert).decode("ascii")

    @property
    def ca_hash(self) -> str:
        return pki.ca_hash(self.ca_cert)

    @classmethod
    def open(cls, agent: Any, config: Any) -> "ServerContext":
        """The context over an open agent; ``ServerSetupError`` when the CA or the TLS
        files are missing or do not fit together."""
        files = server_files(config, agent.data_dir)
        ca_cert, ca_key = load_ca(files)
        return cls(agent=agent, config=config, ca_cert=ca_cert, ca_key=ca_key, files=files)

    def close(self) -> None:
        self.agent.close()


def server_files(config: Any, data_dir: str | os.PathLike[str]) -> dict[str, Path]:
    return config.server.files(data_dir)


def load_ca(files: dict[str, Path]) -> tuple[Any, Any]:
    """The CA's certificate and key, and a check that the TLS files are there and that the
    server's certificate was issued by that CA (a workstation trusts nothing else)."""
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ServerSetupError(f"the server's files are missing ({', '.join(missing)}): run "
                               "`token-agent server init --dir DIR` first (and set [server] "
                               "dir in config.toml when DIR is not <data_dir>/server)")
    for name in ("ca_key", "tls_key"):
        mode = files[name].stat().st_mode & 0o777
        if mode & 0o077:
            raise ServerSetupError(f"the private key {files[name]} can be read by others (mode "
                                   f"0o{mode:o}): make it private (chmod 600 {files[name]})")
    try:
        ca_cert = pki.read_cert(files["ca_cert"])
        ca_key = pki.read_key(files["ca_key"])
        pki.check_ca(ca_cert, ca_key, what=f"the workstation CA {files['ca_cert']}")
        tls_cert = pki.read_cert(files["tls_cert"])
        pki.check_key_matches(pki.read_key(files["tls_key"]), tls_cert,
                              what=str(files["tls_key"]))
    except pki.PkiError as e:
        raise ServerSetupError(str(e)) from None
    if not pki.issued_by(tls_cert, ca_cert):
        raise ServerSetupError(f"the server's certificate {files['tls_cert']} was not issued by "
                               f"the workstation CA {files['ca_cert']}: workstations trust "
                               "that CA only (issue the server's certificate from it)")
    return ca_cert, ca_key
