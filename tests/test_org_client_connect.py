"""OrgClient.connect against replicas that misbehave during the WebSocket upgrade (issue 15's
shift-change hang): a replica that completes TLS (1.3, with session tickets, as uvicorn's
does) and then does not answer the upgrade must cost the workstation its connect timeout,
then the next replica is tried; it must never hang the login.

The cause found with the benchmark: websockets' receiving thread was blocked inside
``SSLSocket.recv`` (the session tickets made the socket readable; the read consumed them and
waited for data), ``connect`` closed the socket at its timeout and joined that thread with no
timeout: the login waited until the server dropped the connection."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from token_agent.organisation import pki
from token_agent.organisation.client import OrgClient, client_ssl_context
from token_agent.organisation.errors import ServerUnavailable


class SilentTlsServer:
    """Accepts TLS 1.3 connections (session tickets sent, as by default), reads the
    upgrade request, and never answers: the connection stays open until ``close``."""

    def __init__(self, tmp_path) -> None:
        ca_key, ca_cert = pki.make_ca("test CA")
        key, cert = pki.issue_server_cert(ca_key, ca_cert, ["127.0.0.1"])
        self.ca_file = pki.write_cert(tmp_path / "ca.pem", ca_cert)
        cert_file = pki.write_cert(tmp_path / "server.pem", cert)
        key_file = pki.write_key(tmp_path / "server.key", key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(cert_file), str(key_file))
        assert ctx.num_tickets > 0  # the condition of the hang: post-handshake tickets
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.requests: list[bytes] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                conn = self.ctx.wrap_socket(raw, server_side=True)
                conn.settimeout(5)
                self.requests.append(conn.recv(65536))  # the upgrade request: not answered
            except OSError:
                raw.close()
                continue
            self.held.append(conn)

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        for conn in self.held:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def silent(tmp_path):
    server = SilentTlsServer(tmp_path)
    yield server
    server.close()


def test_a_replica_silent_after_tls_costs_the_connect_timeout_not_a_hang(silent):
    client = OrgClient([f"https://127.0.0.1:{silent.port}"],
                       ssl_context=client_ssl_context(silent.ca_file), timeout=1.0)
    result: dict = {}

    def connect() -> None:
        started = time.monotonic()
        try:
            result["channel"] = client.connect("/v1/ceremony")
        except BaseException as e:  # noqa: BLE001 (looked at below)
            result["error"] = e
        result["seconds"] = time.monotonic() - started

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "connect() hung past its 1 s timeout (the shift-change hang)"
    assert silent.requests and silent.requests[0].startswith(b"GET /v1/ceremony")
    assert isinstance(result.get("error"), ServerUnavailable), result
    assert result["seconds"] < 5


def test_the_next_replica_is_tried_after_a_silent_one(silent, tmp_path):
    """A silent replica first, a refusing port second: both are tried in turn, within the
    timeouts, and the failure names both (the relay's caller then goes offline)."""
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    client = OrgClient([f"https://127.0.0.1:{silent.port}", f"https://127.0.0.1:{dead_port}"],
                       ssl_context=client_ssl_context(silent.ca_file), timeout=1.0)
    done = threading.Event()
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            client.connect("/v1/ceremony")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        done.set()

    threading.Thread(target=connect, daemon=True).start()
    assert done.wait(10), "connect() hung on the silent replica"
    assert isinstance(errors[0], ServerUnavailable)
    assert [s for s, _ in errors[0].attempts] == client.servers


def test_a_connection_lost_during_the_upgrade_fails_over(monkeypatch, silent):
    """websockets raises ConnectionClosedError when the upgrade cannot be sent (the
    benchmark's "SSL internal error" on the write): that replica failed to connect, the
    next is tried, instead of the login failing with an internal error."""
    import websockets.sync.client as wsclient
    from websockets.exceptions import ConnectionClosedError

    calls: list[str] = []

    def failing_connect(uri, **kwargs):
        calls.append(uri)
        raise ConnectionClosedError(None, None)

    monkeypatch.setattr(wsclient, "connect", failing_connect)
    client = OrgClient(["https://127.0.0.1:1", "https://127.0.0.1:2"],
                       ssl_context=client_ssl_context(silent.ca_file), timeout=1.0)
    with pytest.raises(ServerUnavailable) as raised:
        client.connect("/v1/ceremony")
    assert len(calls) == 2
    assert len(raised.value.attempts) == 2


def test_channels_are_spread_over_the_replicas_and_a_failed_one_goes_last(monkeypatch, silent):
    import websockets.sync.client as wsclient

    firsts: list[str] = []
    down = {"wss://127.0.0.1:2/v1/ceremony"}

    class Ws:
        def close(self):
            pass

    def fake_connect(uri, **kwargs):
        if not firsts or firsts[-1] is None:
            firsts[-1:] = [uri]
        if uri in down:
            raise ConnectionRefusedError()
        return Ws()

    monkeypatch.setattr(wsclient, "connect", fake_connect)
    client = OrgClient(["https://127.0.0.1:1", "https://127.0.0.1:2", "https://127.0.0.1:3"],
                       ssl_context=client_ssl_context(silent.ca_file), timeout=1.0)
    down.clear()
    servers = []
    for _ in range(4):
        firsts.append(None)
        servers.append(client.connect("/v1/ceremony").server)
    assert servers == ["https://127.0.0.1:1", "https://127.0.0.1:2", "https://127.0.0.1:3",
                       "https://127.0.0.1:1"]
    down.add("wss://127.0.0.1:2/v1/ceremony")
    got = []
    for _ in range(4):
        firsts.append(None)
        got.append(client.connect("/v1/ceremony").server)
    assert "https://127.0.0.1:2" not in got
    assert client.channel_order()[-1] == "https://127.0.0.1:2"  # tried last for a while
