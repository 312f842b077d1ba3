"""The workstation's client of its organisation's servers: JSON over HTTPS and WebSocket
channels, both with mutual TLS (the workstation's key and certificate, the organisation's CA),
failing over between the replicas listed in ``[organisation] servers``.

    client = OrgClient.from_config(config, data_dir)       # JoinRequired when not joined
    answer = client.request("GET", "/v1/whoami")           # a dict
    channel = client.connect("/v1/ceremony")               # a Channel (wss)
    channel.send({"op": "login", ...}); channel.recv(timeout=30); channel.close()

Failover: a request goes to the servers in order (a channel: starting at the next of the
servers in turn, ``channel_order``) and moves on when one cannot be reached
(connection refused or reset, TLS failure, timeout) or answers 502, 503 or 504; a server that
failed is tried last for ``FAILED_PENALTY`` seconds. Requests must therefore be idempotent
(the server's are: a join token is single use, audit events carry their sequence numbers).
A server's JSON error answer is ``ServerRefused`` (no other server is asked: they share one
store and would answer the same). ``connect`` fails over on connecting only; once a channel
is open, its loss is ``ChannelClosed`` and the caller decides (``relay.py``).
"""

from __future__ import annotations

import functools
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import __version__
from .errors import ChannelClosed, JoinRequired, ServerRefused, ServerUnavailable

#: seconds a server that failed is tried after the others
FAILED_PENALTY = 30.0
#: HTTP statuses that mean "this replica cannot answer now, ask another"
RETRY_STATUSES = frozenset({502, 503, 504})
#: the largest answer read (bytes)
MAX_ANSWER = 16 * 1024 * 1024
USER_AGENT = f"token-agent/{__version__}"


def client_ssl_context(ca_file: str | Path, cert_file: str | Path | None = None,
                       key_file: str | Path | None = None) -> ssl.SSLContext:
    """TLS for talking to the organisation's servers: their certificate must chain to the
    organisation's CA (``ca_file``) and name the host; ours (``cert_file``, ``key_file``)
    is presented when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate is not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _legacy_flag() -> dict:
    """websockets 17 wants ``legacy=True`` to hand back the connection itself (older
    versions always did, and have no such argument)."""
    import inspect

    from websockets.sync.client import connect

    return {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


_LEGACY = _legacy_flag()


@functools.cache
def _connection_class():
    """websockets' sync ``ClientConnection`` whose ``close_socket`` also shuts the socket
    down. websockets wakes its receiving thread only when that thread waits in ``select``;
    over TLS it can instead be blocked inside ``SSLSocket.recv``: the server's TLS 1.3
    session tickets make the socket readable, the read consumes them and then waits for
    application data on the blocking socket. A ``close()`` from another thread does not wake
    that read (Linux keeps the descriptor alive for the call), so when the server does not
    answer the upgrade in time, ``connect`` closed the socket and then waited in
    ``recv_events_thread.join()`` with no timeout: the login hung until the server closed
    the connection (a minute, or never). ``shutdown`` ends the blocked read at once."""
    from websockets.sync.client import ClientConnection

    class _ShutdownConnection(ClientConnection):
        def close_socket(self) -> None:
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:  # not connected any more, or closed already
                pass
            super().close_socket()

    return _ShutdownConnection


class OrgClient:
    """See the module docstring. Thread-safe: each request opens its own connection."""

    def __init__(self, servers: list[str] | tuple[str, ...], *, ssl_context: ssl.SSLContext,
                 timeout: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not servers:
            raise ValueError("an OrgClient needs at least one server")
        self.servers = [s.rstrip("/") for s in servers]
        self.ssl_context = ssl_context
        self.timeout = float(timeout)
        self._clock = clock
        self._failed: dict[str, float] = {}
        self._lock = threading.Lock()
        self._turn = -1  # the server the last channel started at (``channel_order``)

    @classmethod
    def from_config(cls, config, data_dir: str | Path) -> "OrgClient":
        """The client of the organisation named in ``config`` (``[organisation]``), with the
        key and certificates ``workstation join`` saved under its directory. ``ConfigError``
        when the configuration names no servers, ``JoinRequired`` before the join."""
        from ..config import ConfigError
        from ..orgconfig import WS_CA_FILE, WS_CERT_FILE, WS_KEY_FILE

        org = config.organisation
        if not org.enabled:
            raise ConfigError("config.toml has no [organisation] servers: this workstation "
                              "does not belong to an organisation")
        directory = org.directory(data_dir)
        files = [directory / WS_KEY_FILE, directory / WS_CERT_FILE, directory / WS_CA_FILE]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise JoinRequired(
                f"this workstation has not joined its organisation yet ({', '.join(missing)} "
                "missing): ask the organisation's administrator for a join token, then run "
                "`token-agent workstation join --server URL --token TOKEN`")
        try:
            ctx = client_ssl_context(files[2], files[1], files[0])
        except (OSError, ssl.SSLError) as e:
            raise JoinRequired(f"this workstation's organisation files in {directory} cannot "
                               f"be used ({e}): join again with `token-agent workstation "
                               "join --server URL --token TOKEN`") from None
        return cls(list(org.servers), ssl_context=ctx, timeout=org.timeout)

    # ------------------------------------------------------------------ failover order

    def order(self) -> list[str]:
        """The servers to try, in order: those that did not fail in the last
        ``FAILED_PENALTY`` seconds first (as configured), then the others."""
        now = self._clock()
        with self._lock:
            recent = {s for s, at in self._failed.items() if now - at < FAILED_PENALTY}
        return ([s for s in self.servers if s not in recent]
                + [s for s in self.servers if s in recent])

    def channel_order(self) -> list[str]:
        """The servers to try for a channel: as :meth:`order`, the ones that did not fail
        recently taken in turn (each channel starts at the next one), so that the ceremonies
        of a workstation are spread over the replicas instead of all going to the first (one
        replica's process busy, the others idle, in the benchmark's shift change)."""
        servers = self.order()
        now = self._clock()
        with self._lock:
            healthy = sum(1 for s in servers
                          if now - self._failed.get(s, float("-inf")) >= FAILED_PENALTY)
            self._turn = (self._turn + 1) % max(1, healthy)
            turn = self._turn
        return servers[turn:healthy] + servers[:turn] + servers[healthy:]

    def _mark(self, server: str, failed: bool) -> None:
        with self._lock:
            if failed:
                self._failed[server] = self._clock()
            else:
                self._failed.pop(server, None)

    # ------------------------------------------------------------------ HTTPS

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """``method path`` with ``body`` as JSON; the answer's JSON object. Raises
        ``ServerUnavailable`` when no server answers, ``ServerRefused`` on an error answer."""
        payload = None if body is None else json.dumps(body).encode()
        attempts: list[tuple[str, str]] = []
        for server in self.order():
            try:
                status, data = self._one(server, method, path, payload)
            except (OSError, http.client.HTTPException) as e:
                attempts.append((server, failure_reason(e)))
                self._mark(server, True)
                continue
            if status in RETRY_STATUSES:
                attempts.append((server, f"HTTP {status}"))
                self._mark(server, True)
                continue
            self._mark(server, False)
            return self._answer(server, status, data)
        raise ServerUnavailable(attempts)

    def _one(self, server: str, method: str, path: str, payload: bytes | None
             ) -> tuple[int, bytes]:
        parts = urlsplit(server)
        conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443,
                                           timeout=self.timeout, context=self.ssl_context)
        try:
            headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read(MAX_ANSWER + 1)
            if len(data) > MAX_ANSWER:
                raise http.client.HTTPException("the answer is too large")
            return resp.status, data
        finally:
            conn.close()

    @staticmethod
    def _answer(server: str, status: int, data: bytes) -> dict:
        try:
            obj = json.loads(data) if data else {}
        except ValueError:
            obj = None
        if 200 <= status < 300:
            if not isinstance(obj, dict):
                raise ServerRefused(status, "bad-answer", f"the organisation's server {server} "
                                    "gave an answer that is not a JSON object", server=server)
            return obj
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            message = obj.get("message") if isinstance(obj.get("message"), str) else obj["error"]
            raise ServerRefused(status, obj["error"], message, server=server)
        raise ServerRefused(status, f"http-{status}", f"the organisation's server {server} "
                            f"answered HTTP {status}", server=server)

    # ------------------------------------------------------------------ WebSocket

    def connect(self, path: str) -> "Channel":
        """A WebSocket channel to ``path`` on the first server that accepts it (failover on
        connecting only). ``ServerUnavailable`` when none does; ``ServerRefused`` when one
        refuses the upgrade with an HTTP error other than 502/503/504."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        attempts: list[tuple[str, str]] = []
        for server in self.channel_order():
            parts = urlsplit(server)
            uri = f"wss://{parts.netloc}{path}"
            try:
                ws = connect(uri, ssl=self.ssl_context, open_timeout=self.timeout,
                             proxy=None, compression=None, user_agent_header=USER_AGENT,
                             close_timeout=self.timeout, ping_interval=None,
                             create_connection=_connection_class(), **_LEGACY)
            except InvalidStatus as e:
                status = e.response.status_code
                if status in RETRY_STATUSES:
                    attempts.append((server, f"HTTP {status}"))
                    self._mark(server, True)
                    continue
                self._mark(server, False)
                self._answer(server, status, bytes(e.response.body or b""))
                raise  # _answer always raises for an error status
            except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed) as e:
                # ConnectionClosed: the connection failed while the upgrade was sent (a TLS
                # error on the write): this replica failed to connect, the next one is tried
                attempts.append((server, failure_reason(e)))
                self._mark(server, True)
                continue
            self._mark(server, False)
            return Channel(ws, server)
        raise ServerUnavailable(attempts)


class Channel:
    """One WebSocket to one server: JSON objects both ways."""

    def __init__(self, ws: Any, server: str) -> None:
        self._ws = ws
        #: the server this channel goes to
        self.server = server

    def _closed(self, exc: BaseException | None = None) -> ChannelClosed:
        from websockets.exceptions import ConnectionClosed

        code = reason = None
        if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
            code, reason = exc.rcvd.code, exc.rcvd.reason
        text = (f"the organisation's server {self.server} closed the channel"
                + (f" ({code}: {reason})" if code is not None and reason else
                   f" ({code})" if code is not None else
                   " (the connection was lost)"))
        return ChannelClosed(text, code=code, reason=reason, server=self.server)

    def send(self, message: dict) -> None:
        """Send one JSON object; ``ChannelClosed`` when the channel is gone."""
        from websockets.exceptions import ConnectionClosed

        try:
            self._ws.send(json.dumps(message))
        except (ConnectionClosed, OSError) as e:
            raise self._closed(e) from None

    def recv(self, timeout: float | None = None) -> dict:
        """The next JSON object; ``TimeoutError`` after ``timeout`` seconds (the channel
        stays usable); ``ChannelClosed`` when it ended (or sent something not a JSON
        object: then it is closed)."""
        from websockets.exceptions import ConnectionClosed

        try:
            text = self._ws.recv(timeout=timeout)
        except TimeoutError:
            raise
        except (ConnectionClosed, OSError) as e:
            raise self._closed(e) from None
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            self.close()
            raise ChannelClosed(f"the organisation's server {self.server} sent a message that "
                                "is not a JSON object; the channel was closed",
                                code=None, reason="bad message", server=self.server)
        return obj

    def close(self) -> None:
        try:
            self._ws.close()
        except Exception:  # noqa: BLE001  (closing a broken channel)
            pass

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
