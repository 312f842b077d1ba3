"""Issue 11 item 7: the service's key pool keeps working when another program uses the key.

hidraw delivers every input report to every open handle of the key, and the virtual key does
the same on purpose (``simulators/key/device.py``: ``_broadcast``). Before the fix, one
``token-agent keys info`` while the service held the key made every later service login fail
with ``device-error`` (python-fido2 raises "Wrong channel" on a foreign report), and a
power-cycle of the key broke the pool for good (its channel was gone: INVALID_CHANNEL).

Here the service runs as its own process, the key in this process (``KeyServer``), and a
second program uses the key between and during service logins: a plain python-fido2 client
(its own process) and the CLI's ``keys info``. Every loop is bounded (count and time).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from fido2.ctap2 import Ctap2
from fido2.hid import CtapHidDevice

from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from drivers.fido.sim import SocketHidConnection, sim_descriptor
from key_helpers import serve_key
from simulators.key.device import create_virtual_key
from simulators.key.transport import KeyServer
from test_service import KEY_PIN, services, socket_dir, world  # noqa: F401
from token_agent.ceremonies.key import enrol_key

LOGINS = 10

#: a python-fido2 client of its own: getInfo and the PIN retries, as a browser or a key
#: manager would ask them
FIDO2_CLIENT = textwrap.dedent("""
    import sys
    from fido2.ctap2 import Ctap2
    from fido2.ctap2.pin import ClientPin
    from fido2.hid import CtapHidDevice
    from drivers.fido.sim import SocketHidConnection, sim_descriptor
    port = int(sys.argv[1])
    dev = CtapHidDevice(sim_descriptor("127.0.0.1", port), SocketHidConnection("127.0.0.1", port))
    try:
        ctap2 = Ctap2(dev)
        ctap2.get_info()
        print(ClientPin(ctap2).get_pin_retries()[0])
    finally:
        dev.close()
""")


def _env(server) -> dict:
    env = environ_for_agent()
    return env | {"TOKEN_AGENT_SIM_KEYS": f"127.0.0.1:{server.port}",
                  "PYTHONPATH": str(REPO_ROOT)}


def fido2_client(server) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FIDO2_CLIENT, str(server.port)],
                          capture_output=True, text=True, timeout=30, env=_env(server))


def keys_info(server) -> subprocess.CompletedProcess:
    return subprocess.run(token_agent_command() + ["keys", "info", "--json"],
                          capture_output=True, text=True, timeout=30, env=_env(server))


@pytest.fixture
def shared_key(world):
    vkey, server = serve_key(KEY_PIN)
    world.user("alice", mfa=False)
    from drivers.fido.keys import open_single_key

    with open_single_key({"TOKEN_AGENT_SIM_KEYS": f"127.0.0.1:{server.port}"},
                         on_touch=None) as key:
        enrol_key(world.store, key, "alice", pin_provider=lambda: KEY_PIN)
    yield vkey, server
    server.__exit__(None, None, None)


def test_service_logins_survive_other_programs_on_the_key(services, world, shared_key):
    vkey, server = shared_key
    svc = services(f'[keys]\nsimulators = ["127.0.0.1:{server.port}"]\ntimeout = 10\n')

    def login(c) -> dict:
        return c.login("alice", lambda e: KEY_PIN, primary="key", timeout=30)

    with svc.client() as c:
        assert login(c)["ok"]  # the service holds the key open from now on
        assert server.connection_count == 1

        # between logins: a python-fido2 client, then the CLI, before each login
        outcomes = []
        for i in range(LOGINS):
            other = fido2_client(server) if i % 2 == 0 else keys_info(server)
            assert other.returncode == 0, other.stderr
            outcomes.append(login(c))
        failed = [o for o in outcomes if not o["ok"]]
        assert not failed, f"{len(failed)}/{LOGINS} logins failed after another program: " \
                           f"{failed[0]['reason']}: {failed[0]['message']}"

        # during logins: the other programs loop (bounded) while the service logs in
        stop = threading.Event()
        others: list[subprocess.CompletedProcess] = []

        def other_programs() -> None:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                others.append(fido2_client(server) if len(others) % 2 == 0
                              else keys_info(server))

        thread = threading.Thread(target=other_programs, daemon=True)
        thread.start()
        try:
            started = time.monotonic()
            outcomes = []
            while len(outcomes) < LOGINS or (len(others) < 4 and time.monotonic() - started < 30):
                outcomes.append(login(c))
        finally:
            stop.set()
            thread.join(40)
        failed = [o for o in outcomes if not o["ok"]]
        assert not failed, f"{len(failed)}/{len(outcomes)} logins failed while another " \
                           f"program used the key: {failed[0]['reason']}: {failed[0]['message']}"
        assert len(others) >= 4
        print(f"\n{len(outcomes)} service logins while {len(others)} other programs used the "
              f"key ({sum(o.returncode == 0 for o in others)} of them succeeded)")
        # the CLI goes through the same driver: it too copes with the service's reports
        assert all(o.returncode == 0 for o in others[1::2]), [o.stderr for o in others[1::2]]

        # a power cycle of the key (all channels forgotten): the pool gets a new channel
        for _ in range(3):
            vkey.power_cycle()
            outcome = login(c)
            assert outcome["ok"], outcome
            assert login(c)["ok"]


def test_the_driver_ignores_other_channels_and_gets_a_new_channel_after_a_power_cycle():
    """The transport underneath, without the service: our device and a plain python-fido2
    device (which raises "Wrong channel" on the first foreign report) on one key."""
    from fido2.hid import ConnectionFailure

    from drivers.fido.discovery import open_device

    vkey = create_virtual_key(presence="auto")
    with KeyServer(vkey, port=0, control_port=None) as server:
        ours = open_device(sim_descriptor("127.0.0.1", server.port))
        other = open_device(sim_descriptor("127.0.0.1", server.port))  # e.g. the CLI
        plain = CtapHidDevice(sim_descriptor("127.0.0.1", server.port),
                              SocketHidConnection("127.0.0.1", server.port))
        try:
            assert plain.ping(b"plain") == b"plain"
            for i in range(20):  # interleaved: each one's answers reach the others too
                assert other.ping(b"other %d" % i) == b"other %d" % i
                assert ours.ping(b"ours %d" % i) == b"ours %d" % i
            assert ours.connection.dropped >= 20 and other.connection.dropped >= 20
            # python-fido2 alone trips over the others' reports (what the pool used to do)
            with pytest.raises(ConnectionFailure, match="Wrong channel"):
                plain.ping(b"again")
            for cycle in range(1, 4):
                vkey.power_cycle()  # every channel forgotten
                assert Ctap2(ours).get_info().versions
                assert ours.channel_resets == cycle
        finally:
            for device in (ours, other, plain):
                device.close()
