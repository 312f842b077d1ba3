"""`token-agent sim key ...`: the client commands against an in-process KeyServer, and
`serve` as a real process."""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from fido2.ctap2 import Ctap2
from fido2.hid import CTAPHID, CtapHidDevice

from drivers.fido.sim import SocketHidConnection, sim_descriptor
from simulators.key.control import KeyControl, SimulatorNotRunning
from simulators.key.transport import KeyServer
from sim_key_double import NEEDS_TOUCH, double_key, wait_until_waiting
from token_agent.cli import main

REPO = Path(__file__).resolve().parent.parent
HAVE_AUTHENTICATOR = importlib.util.find_spec("simulators.key.authenticator") is not None


@pytest.fixture
def served():
    key, app = double_key("manual")
    server = KeyServer(key, port=0, control_port=0).start()
    yield server, app
    server.stop()
    key.close()


def cli(server_or_port, *args: str):
    port = server_or_port if isinstance(server_or_port, int) else server_or_port.control_port
    return CliRunner().invoke(main, ["sim", "key", *args, "--control-port", str(port)])


def test_status(served):
    server, _ = served
    result = cli(server, "status")
    assert result.exit_code == 0, result.output
    assert "powered:           yes" in result.output
    assert "presence:          manual" in result.output
    result = cli(server, "status", "--json")
    state = json.loads(result.output)
    assert state["hid"]["port"] == server.port and state["powered"] is True


def test_touch_press_release_presence(served):
    server, app = served
    device = CtapHidDevice(
        sim_descriptor("127.0.0.1", server.port), SocketHidConnection("127.0.0.1", server.port)
    )
    try:
        answer: list[bytes] = []
        thread = threading.Thread(
            target=lambda: answer.append(device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,))))
        )
        thread.start()
        wait_until_waiting(app)
        assert cli(server, "status").output.count("waiting for touch: yes") == 1
        result = cli(server, "touch")
        assert result.exit_code == 0 and "touched" in result.output
        thread.join(2)
        assert answer == [b"\x00"]

        assert cli(server, "press").exit_code == 0
        assert device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,))) == b"\x00"
        assert cli(server, "release").exit_code == 0
        assert cli(server, "presence", "deny").exit_code == 0
        assert device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,))) == b"\x27"
        assert cli(server, "presence", "sometimes").exit_code == 2  # click's usage error
    finally:
        device.close()


def test_power_commands(served):
    server, app = served
    assert cli(server, "power-cycle").exit_code == 0
    assert app.power_ups == 1
    assert cli(server, "unplug").exit_code == 0
    assert not server.key.powered and not server.listening
    result = cli(server, "power-cycle")
    assert result.exit_code == 1 and "unplugged" in result.output
    assert cli(server, "plug").exit_code == 0
    assert server.key.powered and server.listening


def test_fault_command(served):
    server, _ = served
    result = cli(server, "fault", "--fail-next", "2", "--status", "0x31", "--delay", "0.25",
                 "--drop", "1", "--corrupt", "3", "--unplug-after", "9")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert server.key.faults.as_dict() == {
        "fail_next": 2, "fail_status": 0x31, "delay": 0.25, "drop_reports": 1,
        "corrupt_reports": 3, "unplug_after_reports": 9,
    }  # fmt: skip
    assert "fail_status=0x31" in result.output
    result = cli(server, "fault", "--clear")
    assert result.exit_code == 0
    assert server.key.faults.as_dict()["fail_next"] == 0
    assert cli(server, "fault").exit_code == 2  # nothing asked
    assert cli(server, "fault", "--fail-next", "1", "--status", "0x100").exit_code == 2
    assert cli(server, "fault", "--unplug-after", "0").exit_code == 2


@pytest.mark.parametrize(
    "args", [("status",), ("touch",), ("press",), ("release",), ("presence", "auto"),
             ("power-cycle",), ("unplug",), ("plug",), ("fault", "--clear")]  # fmt: skip
)
def test_client_commands_exit_2_when_no_simulator_runs(args, free_port):
    result = cli(free_port(), *args)
    assert result.exit_code == 2
    assert "no virtual key control interface" in result.output


def test_control_client_errors(free_port):
    with pytest.raises(SimulatorNotRunning):
        KeyControl(port=free_port()).status()


@pytest.mark.skipif(not HAVE_AUTHENTICATOR, reason="simulators.key.authenticator not present")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_runs_until_signalled(sim_key_factory, signum):
    server = sim_key_factory(presence="manual")  # `token-agent sim key serve` (tests/conftest.py)
    assert KeyControl(port=server.control_port).status()["presence"] == "manual"
    device = CtapHidDevice(
        sim_descriptor("127.0.0.1", server.port), SocketHidConnection("127.0.0.1", server.port)
    )
    assert "FIDO_2_0" in Ctap2(device).get_info().versions
    device.close()
    server.process.send_signal(signum)
    assert server.process.wait(10) == 0, server.output()
    output = server.output()  # complete now (the banner may follow the first control answer)
    assert f"HID reports on 127.0.0.1:{server.port}," in output
    assert "virtual FIDO2 key: stopped" in output


@pytest.mark.parametrize("option, other, role", [("--port", "--control-port", "HID"),
                                                  ("--control-port", "--port", "control")])
def test_serve_reports_a_taken_port(tmp_path, option, other, role):
    """The taken address:port is named, with the option that changes it (issue 12)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "token_agent", "sim", "key", "serve", option, str(port),
             other, "0"],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 9  # exitcodes.CONFLICT, as for a card slot already taken
    assert (f"token-agent: 127.0.0.1:{port} (the {role} port) is already in use" in
            result.stderr), result.stderr
    assert f"choose another with {option} PORT" in result.stderr
    assert "Traceback" not in result.stderr
