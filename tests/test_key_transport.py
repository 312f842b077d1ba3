"""The virtual key's transports: TCP server + HTTP control (simulators.key.transport), and the
host-side driver and discovery (drivers.fido.sim, drivers.fido.discovery), with python-fido2's
own CtapHidDevice on top."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request

import fido2.hid
import pytest
from fido2.ctap import CtapError
from fido2.ctap2 import Ctap2
from fido2.hid import CTAPHID, CtapHidDevice

from drivers.fido import discovery
from drivers.fido.sim import (
    FRAME_HEADER,
    SocketHidConnection,
    list_sim_descriptors,
    open_sim_connection,
    parse_sim_keys,
    sim_address,
    sim_descriptor,
)
from simulators.key.base import KeepaliveStatus
from simulators.key.control import CONTROL_HEADER
from simulators.key.ctaphid import MAX_MESSAGE, Cmd, HidError, frame_message
from simulators.key.transport import KeyServer, open_in_process_device
from sim_key_double import (
    ECHO,
    KEEPALIVE_CANCEL,
    NEEDS_TOUCH,
    double_key,
    wait_until_waiting,
)

HAVE_AUTHENTICATOR = importlib.util.find_spec("simulators.key.authenticator") is not None


@pytest.fixture
def served():
    """A key with the CtapApp double, manual presence, served on ephemeral ports."""
    key, app = double_key("manual", msg_timeout=0.2)
    server = KeyServer(key, port=0, control_port=0).start()
    yield server, app
    server.stop()
    key.close()


def tcp_device(server: KeyServer, **kwargs) -> CtapHidDevice:
    return CtapHidDevice(
        sim_descriptor("127.0.0.1", server.port),
        SocketHidConnection("127.0.0.1", server.port, **kwargs),
    )


def control(
    server: KeyServer, path: str, method: str = "POST", body=None, headers=None
) -> tuple[int, dict]:
    """One control request; by default with the header every state change needs."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.control_port}{path}", data=data, method=method,
        headers={CONTROL_HEADER: "1"} if headers is None else headers,
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def connect(server: KeyServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=2)




def call_in_thread(fn):
    """Run fn() in a thread; returns (thread, outcome list: [result] or [exception])."""
    outcome: list = []

    def run():
        try:
            outcome.append(fn())
        except BaseException as e:  # noqa: BLE001 (recorded for the assertion)
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


# -- python-fido2 over TCP ------------------------------------------------------------------


def test_python_fido2_over_tcp(served):
    server, app = served
    device = tcp_device(server)
    try:
        assert device.ping(b"over tcp") == b"over tcp"
        message = os.urandom(MAX_MESSAGE)
        assert device.ping(message) == message
        assert device.call(CTAPHID.CBOR, bytes((ECHO,)) + b"abc") == b"\x00abc"
    finally:
        device.close()


def test_tcp_round_trip_adds_well_under_a_millisecond(served):
    server, _ = served
    device = tcp_device(server)
    try:
        request = bytes((ECHO,)) + os.urandom(150)  # 3 reports each way, as getAssertion
        for _ in range(20):
            device.call(CTAPHID.CBOR, request)
        times = []
        for _ in range(200):
            started = time.perf_counter()
            device.call(CTAPHID.CBOR, request)
            times.append(time.perf_counter() - started)
        assert statistics.median(times) < 0.001
    finally:
        device.close()


def test_cancel_over_tcp(served):
    server, app = served
    device = tcp_device(server)
    event = threading.Event()

    def on_keepalive(status):
        if status == KeepaliveStatus.UPNEEDED:
            event.set()

    try:
        answer = device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,)), event, on_keepalive)
        assert answer == bytes((KEEPALIVE_CANCEL,))
        assert app.cancelled.is_set()
    finally:
        device.close()


def test_each_connection_is_a_handle_and_the_first_is_a_plug_in(served):
    server, app = served
    connect(server).close()  # a reachability probe sends nothing: not a plug-in
    assert app.power_ups == 0
    first = tcp_device(server)
    assert app.power_ups == 1
    second = tcp_device(server)
    assert app.power_ups == 1
    assert server.status()["handles"] == 2
    first.close()
    second.close()
    deadline = time.monotonic() + 2
    while server.status()["handles"]:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    tcp_device(server).close()
    assert app.power_ups == 2


# -- malformed frames -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        (63).to_bytes(2, "big") + bytes(63),  # wrong length
        (65).to_bytes(2, "big") + bytes(65),
        FRAME_HEADER + bytes(10),  # truncated, then closed
        b"\x00",  # half a header
        b"GET / HTTP/1.1\r\n\r\n",  # someone pointed a browser at it
    ],
)
def test_malformed_frames_close_that_connection_only(served, garbage):
    server, _ = served
    device = tcp_device(server)
    try:
        bad = connect(server)
        bad.sendall(garbage)
        bad.shutdown(socket.SHUT_WR)
        assert bad.recv(100) == b""  # the server closed it
        bad.close()
        assert device.ping(b"still serving") == b"still serving"
        fresh = tcp_device(server)
        assert fresh.ping(b"new connection") == b"new connection"
        fresh.close()
    finally:
        device.close()


def test_host_that_never_reads_is_dropped_without_blocking_the_key(served):
    server, _ = served
    idle = socket.socket()
    idle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    idle.connect(("127.0.0.1", server.port))
    idle.sendall(FRAME_HEADER + frame_message(0xFFFFFFFF, Cmd.INIT, os.urandom(8))[0])
    assert len(idle.recv(66, socket.MSG_WAITALL)) == 66  # its INIT answer: now it is a handle
    device = tcp_device(server)
    try:
        message = os.urandom(MAX_MESSAGE)
        for _ in range(60):  # ~7,800 reports broadcast to the idle connection too
            assert device.ping(message) == message
        assert idle.recv(1 << 20)  # what it had been sent before the key gave up on it
        deadline = time.monotonic() + 2
        while server.connection_count != 1:  # its reader thread is cleaning up
            assert time.monotonic() < deadline, "the idle connection was not dropped"
            time.sleep(0.005)
    finally:
        device.close()
        idle.close()


# -- unplug, faults -------------------------------------------------------------------------


def test_unplug_mid_transaction_over_tcp(served):
    server, app = served
    device = tcp_device(server)
    thread, outcome = call_in_thread(lambda: device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,))))
    wait_until_waiting(app)
    assert control(server, "/usb6/power/off")[0] == 200
    thread.join(2)
    assert not thread.is_alive()
    assert isinstance(outcome[0], ConnectionError), outcome
    with pytest.raises(ConnectionRefusedError):
        connect(server)
    assert server.status()["powered"] is False
    assert control(server, "/usb6/power/on")[0] == 200
    device = tcp_device(server)
    assert device.ping(b"back") == b"back"
    device.close()


def test_fault_unplug_after_reports_over_tcp(served):
    server, _ = served
    device = tcp_device(server)
    server.key.set_faults(unplug_after_reports=1)
    with pytest.raises(ConnectionError):
        device.ping(b"into the void")
    with pytest.raises(ConnectionRefusedError):
        connect(server)
    assert list_sim_descriptors([("127.0.0.1", server.port)]) == []
    server.key.plug()
    assert list_sim_descriptors([("127.0.0.1", server.port)]) != []


def test_dropped_report_times_out_the_reader(served):
    server, _ = served
    device = tcp_device(server, read_timeout=0.2)
    try:
        server.key.set_faults(drop_reports=1)
        with pytest.raises(TimeoutError):
            device.ping(b"dropped")
    finally:
        device.close()


def test_fault_fail_next_over_tcp_reaches_ctap2_as_ctap_error(served):
    server, _ = served
    device = tcp_device(server)
    try:
        status, _ = control(server, "/faults", body={"fail_next": 1, "fail_status": 0x31})
        assert status == 200
        with pytest.raises(CtapError) as raised:
            Ctap2(device, strict_cbor=False).get_info()
        assert raised.value.code == 0x31
    finally:
        device.close()


# -- HTTP control ---------------------------------------------------------------------------


def test_control_status(served):
    server, _ = served
    status, state = control(server, "/", "GET")
    assert status == 200
    assert state["powered"] is True and state["presence"] == "manual"
    assert state["waiting_for_touch"] is False
    assert state["connections"] == 0
    assert state["hid"]["port"] == server.port and state["hid"]["listening"] is True
    assert state["faults"]["fail_next"] == 0


def test_control_touch_and_pico_button(served):
    server, app = served
    device = tcp_device(server)
    try:
        for approve in ("/touch", "/usb6/touch/on"):
            thread, outcome = call_in_thread(
                lambda: device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,)))
            )
            wait_until_waiting(app)
            assert control(server, "/", "GET")[1]["waiting_for_touch"] is True
            assert control(server, approve)[0] == 200
            thread.join(2)
            assert outcome == [b"\x00"]
        # the Pico button is held: approved at once, until released
        assert device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,))) == b"\x00"
        assert control(server, "/usb6/touch/off")[0] == 200
        assert control(server, "/press")[0] == 200
        assert device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,))) == b"\x00"
        assert control(server, "/release")[0] == 200
        assert control(server, "/presence/deny")[1]["presence"] == "deny"
        assert device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,))) == b"\x27"
    finally:
        device.close()


def test_control_power_cycle_unplug_plug(served):
    server, app = served
    device = tcp_device(server)
    assert control(server, "/power-cycle")[0] == 200
    assert app.power_ups == 2
    with pytest.raises(CtapError) as raised:  # its channel was forgotten
        device.ping(b"x")
    assert raised.value.code == HidError.INVALID_CHANNEL
    assert control(server, "/unplug")[1]["powered"] is False
    assert control(server, "/power-cycle")[0] == 409
    with pytest.raises(ConnectionRefusedError):
        connect(server)
    assert control(server, "/plug")[1]["hid"]["listening"] is True
    fresh = tcp_device(server)
    assert fresh.ping(b"y") == b"y"
    fresh.close()
    device.close()


def test_control_faults(served):
    server, _ = served
    status, state = control(server, "/faults", body={"delay": 0.5, "drop_reports": 2})
    assert status == 200
    assert state["faults"]["delay"] == 0.5 and state["faults"]["drop_reports"] == 2
    assert control(server, "/faults", "GET")[1]["drop_reports"] == 2
    assert control(server, "/faults/clear")[1]["faults"]["delay"] == 0.0
    for bad in ({"delay": -1}, {"nonsense": 1}, [1, 2], b"{not json"):
        status, answer = control(server, "/faults", body=bad)
        assert status == 400 and answer["ok"] is False and answer["error"]


def test_control_errors(served):
    server, _ = served
    assert control(server, "/nowhere", "GET")[0] == 404
    assert control(server, "/nowhere")[0] == 404
    assert control(server, "/touch", "GET")[0] == 405
    assert control(server, "/", "POST")[0] == 405
    status, answer = control(server, "/presence/sometimes")
    assert status == 400 and "sometimes" in answer["error"]
    assert control(server, "/usb6/power/sideways")[0] == 404


def raw_control(server: KeyServer, request: bytes) -> tuple[int, dict, dict]:
    """Send one hand-written HTTP request (any Host, Origin); returns status, JSON, headers."""
    import http.client

    with socket.create_connection(("127.0.0.1", server.control_port), timeout=5) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read()), dict(response.getheaders())


def test_control_refuses_what_a_web_page_can_send(served):
    """Issue 11f: a page in the developer's browser must not unplug or reconfigure the key:
    a GET (image, link), a plain form POST (no custom header), a rebound DNS name (Host), a
    cross-site fetch (Origin). Bounded: each attempt once, on loopback, state checked after."""
    server, _ = served
    port = server.control_port
    before = control(server, "/", "GET")[1]
    # GET never changes state: 405 with Allow: POST, on every action path and Pico path
    for path in ("/usb0/power/off", "/usb0/touch/on", "/unplug", "/power-cycle", "/presence/deny"):
        status, answer, headers = raw_control(
            server, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        )
        assert (status, headers.get("Allow")) == (405, "POST"), (path, answer)
    # POST without the header: what an HTML form or a no-cors fetch sends
    for path in ("/usb0/power/off", "/unplug", "/presence/deny", "/faults/clear"):
        assert control(server, path, headers={})[0] == 403, path
    form = (f"POST /unplug HTTP/1.1\r\nHost: localhost:{port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 0\r\n\r\n")
    assert raw_control(server, form.encode())[0] == 403
    # DNS rebinding: the browser sends the attacker's name (or another port) as Host
    for host in (f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}",
                 f"localhost:{port}x", ""):
        request = (f"POST /unplug HTTP/1.1\r\nHost: {host}\r\n{CONTROL_HEADER}: 1\r\n"
                   "Content-Length: 0\r\n\r\n")
        status, answer, _ = raw_control(server, request.encode())
        assert status == 403 and "Host" in answer["error"], host
    no_host = f"POST /unplug HTTP/1.0\r\n{CONTROL_HEADER}: 1\r\nContent-Length: 0\r\n\r\n"
    assert raw_control(server, no_host.encode())[0] == 403
    # a cross-site Origin, even with the header (a CORS preflight would never be granted)
    for origin in ("https://evil.example", "null", f"http://evil.example:{port}",
                   "http://localhost:8080", f"https://127.0.0.1:{port}"):
        headers = {CONTROL_HEADER: "1", "Origin": origin}
        status, answer = control(server, "/unplug", headers=headers)
        assert status == 403 and "origin" in answer["error"], origin
    after = control(server, "/", "GET")[1]
    assert after["powered"] is True and after["presence"] == before["presence"] == "manual"
    assert after["faults"] == before["faults"]
    # what the CLI and KeyControl send works; a same-origin Origin and IPv6/localhost names too
    assert control(server, "/presence/deny")[1]["presence"] == "deny"
    for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
        request = (f"POST /presence/auto HTTP/1.1\r\nHost: {host}\r\n{CONTROL_HEADER}: 1\r\n"
                   f"Origin: http://{host}\r\nContent-Length: 0\r\n\r\n")
        status, answer, _ = raw_control(server, request.encode())
        assert (status, answer["presence"]) == (200, "auto"), host
    assert control(server, "/usb0/power/off")[1]["powered"] is False
    assert control(server, "/usb0/power/on")[1]["powered"] is True


# -- driver and discovery -------------------------------------------------------------------


def test_parse_sim_keys():
    assert parse_sim_keys("") == [] and parse_sim_keys("  ") == []
    assert parse_sim_keys("127.0.0.1:35962") == [("127.0.0.1", 35962)]
    assert parse_sim_keys(" localhost:1 , [::1]:2,localhost:1") == [("localhost", 1), ("::1", 2)]
    for bad in ("127.0.0.1", "127.0.0.1:", ":35962", "host:0", "host:65536", "host:port",
                "a:1,,b:2", "::1:35962", "two words:1"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_sim_keys(bad)


def test_sim_descriptor_paths_round_trip():
    for host, port in (("127.0.0.1", 35962), ("::1", 4)):
        descriptor = sim_descriptor(host, port)
        assert descriptor.path.startswith("sim:")
        assert descriptor.report_size_in == descriptor.report_size_out == 64
        assert sim_address(descriptor.path) == (host, port)
    with pytest.raises(ValueError):
        sim_address("/dev/hidraw0")


def test_discovery_lists_and_opens_sim_keys_from_the_environment(served, free_port):
    server, _ = served
    dead = free_port()
    env = {discovery.SIM_KEYS_ENV: f"127.0.0.1:{server.port},127.0.0.1:{dead}"}
    descriptors = discovery.list_descriptors(env)
    sims = [d for d in descriptors if d.path.startswith("sim:")]
    assert [d.path for d in sims] == [f"sim:127.0.0.1:{server.port}"]  # the dead one is absent
    connection = discovery.open_connection(sims[0])
    assert isinstance(connection, SocketHidConnection)
    device = CtapHidDevice(sims[0], connection)
    assert device.ping(b"found") == b"found"
    device.close()
    devices = discovery.list_devices(env)
    assert [d.descriptor.path for d in devices if d.descriptor.path.startswith("sim:")] == [
        sims[0].path
    ]
    for d in devices:
        d.close()
    with pytest.raises(ValueError):
        discovery.list_descriptors({discovery.SIM_KEYS_ENV: "nonsense"})


def test_install_into_fido2(served):
    server, _ = served
    restore = discovery.install_into_fido2([("127.0.0.1", server.port)])
    try:
        paths = [d.path for d in fido2.hid.list_descriptors()]
        assert paths == [f"sim:127.0.0.1:{server.port}"]
        device = fido2.hid.open_device(paths[0])  # calls the replaced module globals
        assert device.ping(b"via fido2.hid") == b"via fido2.hid"
        device.close()
        with pytest.raises(ValueError):
            fido2.hid.get_descriptor("sim:127.0.0.1:1")
        devices = list(CtapHidDevice.list_devices())
        assert len(devices) == 1
        devices[0].close()
    finally:
        restore()
    assert fido2.hid.list_descriptors is discovery._hid_list_descriptors


def test_socket_connection_errors(served):
    server, _ = served
    connection = open_sim_connection(sim_descriptor("127.0.0.1", server.port))
    connection.close()
    with pytest.raises(OSError):
        connection.read_packet()
    with pytest.raises(OSError):
        connection.write_packet(bytes(64))
    server.key.unplug()
    with pytest.raises(ConnectionRefusedError):
        SocketHidConnection("127.0.0.1", server.port)


# -- the real authenticator -----------------------------------------------------------------


@pytest.mark.skipif(not HAVE_AUTHENTICATOR, reason="simulators.key.authenticator not present")
def test_real_authenticator_over_tcp_and_in_process():
    from simulators.key.device import create_virtual_key

    key = create_virtual_key(presence="auto")
    try:
        with KeyServer(key, port=0, control_port=0) as server:
            device = tcp_device(server)
            info = Ctap2(device).get_info()
            assert "FIDO_2_1" in info.versions or "FIDO_2_0" in info.versions
            device.close()
        local = open_in_process_device(key)
        assert Ctap2(local).get_info() == info
        local.close()
    finally:
        key.close()


@pytest.mark.skipif(not HAVE_AUTHENTICATOR, reason="simulators.key.authenticator not present")
def test_real_authenticator_cancel_is_keepalive_cancel():
    from simulators.key.device import create_virtual_key

    key = create_virtual_key(presence="manual")
    try:
        with KeyServer(key, port=0, control_port=0) as server:
            device = tcp_device(server)
            event = threading.Event()

            def on_keepalive(status):
                if status == KeepaliveStatus.UPNEEDED:
                    event.set()

            with pytest.raises(CtapError) as raised:
                Ctap2(device).selection(event=event, on_keepalive=on_keepalive)
            assert raised.value.code == CtapError.ERR.KEEPALIVE_CANCEL
            device.close()
    finally:
        key.close()
