"""`token-agent sim key serve --single-host` (issue 13): a new host connection closes the earlier
ones and powers the key up, as the emulated keys some authenticator test suites expect; the
default keeps several connections at once, as hidraw does. Real TCP connections, python-fido2's
CTAPHID framing and CTAP2 client on top."""

from __future__ import annotations

import errno
import time

import pytest
from click.testing import CliRunner
from fido2.ctap import CtapError
from fido2.ctap2 import Ctap2
from fido2.ctap2.pin import ClientPin
from fido2.hid import CtapHidDevice

from drivers.fido.channel import ChannelFilter
from drivers.fido.sim import SocketHidConnection, sim_descriptor
from key_helpers import PIN
from simulators.key.authenticator import RESET_WINDOW, VirtualAuthenticator
from simulators.key.base import UserPresence
from simulators.key.control import KeyControl
from simulators.key.device import VirtualKey, create_virtual_key
from simulators.key.transport import KeyServer, open_in_process_device
from test_authenticator import Clock  # the authenticator's clock, moved by the test
from token_agent.cli import main

WRONG_PIN = "000000"
ERR = CtapError.ERR


class Host:
    """One host on its own TCP connection: python-fido2's CtapHidDevice (which sends
    CTAPHID_INIT at once: the connection's first report) over the driver's socket connection,
    through the driver's ChannelFilter, which skips the reports the key broadcasts for the
    other hosts' channels (as libfido2 does on hidraw)."""

    def __init__(self, port: int) -> None:
        self.connection = SocketHidConnection("127.0.0.1", port, read_timeout=5)
        self.device = CtapHidDevice(
            sim_descriptor("127.0.0.1", port), ChannelFilter(self.connection)
        )
        self.ctap2 = Ctap2(self.device)

    def client_pin(self) -> ClientPin:
        return ClientPin(self.ctap2)

    def reads_eof(self) -> bool:
        """True if the key closed this connection: the socket reads end-of-file between
        frames (read_packet's ConnectionResetError "closed the connection", not a timeout)."""
        for _ in range(100):  # reports still queued for this host, then the end
            try:
                self.connection.read_packet()
            except ConnectionResetError as e:
                return "closed the connection" in str(e)
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.device.close()


@pytest.fixture
def serve():
    """``serve(key, single_host=...)``: a KeyServer on an ephemeral port, stopped at teardown."""
    started: list[tuple[KeyServer, VirtualKey]] = []

    def start(key: VirtualKey, **kwargs) -> KeyServer:
        server = KeyServer(key, port=0, control_port=None, **kwargs).start()
        started.append((server, key))
        return server

    yield start
    for server, key in started:
        server.stop()
        key.close()


def wait_for_connections(server: KeyServer, count: int) -> None:
    deadline = time.monotonic() + 2
    while server.connection_count != count:
        assert time.monotonic() < deadline, f"{server.connection_count} connections, not {count}"
        time.sleep(0.005)


def block_pin_auth(host: Host) -> None:
    """Three wrong PINs in a row: PIN_INVALID, PIN_INVALID, PIN_AUTH_BLOCKED; then even the
    right PIN is refused until a power-up."""
    for expected in (ERR.PIN_INVALID, ERR.PIN_INVALID, ERR.PIN_AUTH_BLOCKED):
        with pytest.raises(CtapError) as raised:
            host.client_pin().get_pin_token(WRONG_PIN)
        assert raised.value.code == expected
    with pytest.raises(CtapError) as raised:
        host.client_pin().get_pin_token(PIN)
    assert raised.value.code == ERR.PIN_AUTH_BLOCKED


@pytest.mark.parametrize("single_host", [True, False], ids=["single-host", "default"])
def test_reset_right_after_a_reconnect(serve, single_host):
    """The first host connected more than 10 s ago (the authenticator's clock says so), so
    its reset is refused; a reconnect powers a single-host key up and the reset succeeds at
    once, the first connection reading EOF. By default the first connection stays open and
    working, so the second is no plug-in and the reset window stays shut."""
    clock = Clock()
    presence = UserPresence("auto")
    key = VirtualKey(VirtualAuthenticator(None, presence, clock=clock), presence)
    server = serve(key, single_host=single_host)
    first = Host(server.port)
    first.client_pin().set_pin(PIN)
    clock.now += RESET_WINDOW + 1
    with pytest.raises(CtapError) as raised:
        first.ctap2.reset()
    assert raised.value.code == ERR.NOT_ALLOWED

    second = Host(server.port)
    if single_host:
        second.ctap2.reset()
        assert second.ctap2.get_info().options["clientPin"] is False  # the PIN is gone
        assert first.reads_eof()
        wait_for_connections(server, 1)
        assert key.status()["handles"] == 1 and key.status()["single_host"] is True
    else:
        with pytest.raises(CtapError) as raised:
            second.ctap2.reset()
        assert raised.value.code == ERR.NOT_ALLOWED
        assert first.device.ping(b"first") == b"first"  # both connections work at once
        assert second.device.ping(b"second") == b"second"
        assert server.connection_count == 2 and key.status()["single_host"] is False
        first.close()
    second.close()


@pytest.mark.parametrize("single_host", [True, False], ids=["single-host", "default"])
def test_pin_auth_blocked_and_a_reconnect(serve, single_host):
    """PIN_AUTH_BLOCKED (3 wrong PINs in a row) lasts until a power-up: a new connection is
    one on a single-host key, and the right PIN works there; by default, while the first
    connection stays open, the second one finds the key still blocked."""
    server = serve(create_virtual_key(presence="auto"), single_host=single_host)
    first = Host(server.port)
    first.client_pin().set_pin(PIN)
    block_pin_auth(first)

    second = Host(server.port)
    if single_host:
        assert second.client_pin().get_pin_token(PIN)
        assert first.reads_eof()
    else:
        with pytest.raises(CtapError) as raised:
            second.client_pin().get_pin_token(PIN)
        assert raised.value.code == ERR.PIN_AUTH_BLOCKED
        assert first.ctap2.get_info().versions  # the first connection still works
        assert second.client_pin().get_pin_retries()[0] == 5  # 8 - 3
        first.close()
    second.close()


def test_single_host_key_in_process():
    """The same on the in-process transport: a new python-fido2 device closes the earlier
    one (its reads fail with ENODEV, as an unplugged key's) and powers the key up."""
    key = create_virtual_key(presence="auto", single_host=True)
    try:
        first = open_in_process_device(key, read_timeout=5)
        ClientPin(Ctap2(first)).set_pin(PIN)
        for _ in range(3):
            with pytest.raises(CtapError):
                ClientPin(Ctap2(first)).get_pin_token(WRONG_PIN)
        second = open_in_process_device(key, read_timeout=5)
        with pytest.raises(OSError) as raised:
            first.ping(b"gone")
        assert raised.value.errno == errno.ENODEV
        assert ClientPin(Ctap2(second)).get_pin_token(PIN)
        assert key.handle_count == 1
        second.close()
    finally:
        key.close()


def test_serve_single_host_process(sim_key_factory):
    """`token-agent sim key serve --single-host` as a real process: says so in its banner and
    status, closes the earlier connection when a new host connects, and that power-up lifts
    PIN_AUTH_BLOCKED."""
    server = sim_key_factory(presence="auto", args=["--single-host"])
    assert KeyControl(port=server.control_port).status()["single_host"] is True
    result = CliRunner().invoke(
        main, ["sim", "key", "status", "--control-port", str(server.control_port)]
    )
    assert result.exit_code == 0 and "; single host" in result.output, result.output
    first = Host(server.port)
    first.client_pin().set_pin(PIN)
    block_pin_auth(first)
    second = Host(server.port)
    assert second.client_pin().get_pin_token(PIN)
    assert first.reads_eof()
    second.close()
    deadline = time.monotonic() + 5
    while "single host)" not in server.output():  # the banner may follow the first answer
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
