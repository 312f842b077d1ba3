"""The service's key pool (token_agent/service/keys.py): keys opened once and kept open,
the key holding a user's credential found silently and then remembered, a ceremony waiting
for that key while it is busy, and keys that die dropped and found again."""

from __future__ import annotations

import threading
import time

import pytest
from fido2.ctap2 import Ctap2
from fido2.ctap2.pin import ClientPin
from fido2.hid import CtapHidDevice

from drivers.fido.discovery import SIM_KEYS_ENV
from drivers.fido.errors import NoCredentials, NoKeyFound
from drivers.fido.keys import open_single_key
from drivers.fido.sim import SocketHidConnection, sim_descriptor
from simulators.key.device import create_virtual_key
from simulators.key.transport import KeyServer
from token_agent.ceremonies.devices import make_key_login
from token_agent.ceremonies.key import enrol_key
from token_agent.outcome import Reason
from token_agent.service.keys import Busy, KeyPool
from token_agent.store import Store

PIN = "246810"
RP = "token-agent.local"


def _set_pin(port: int) -> None:
    dev = CtapHidDevice(sim_descriptor("127.0.0.1", port), SocketHidConnection("127.0.0.1", port))
    try:
        ClientPin(Ctap2(dev)).set_pin(PIN)
    finally:
        dev.close()


@pytest.fixture
def world(tmp_path):
    keys = [create_virtual_key(presence="auto") for _ in range(2)]
    servers = [KeyServer(k, port=0, control_port=None) for k in keys]
    for s in servers:
        s.__enter__()
    store = Store.open(tmp_path / "s.db")
    env = {SIM_KEYS_ENV: ",".join(f"127.0.0.1:{s.port}" for s in servers)}
    for name, server in zip(("alice", "bob"), servers):
        _set_pin(server.port)
        store.add_user(name)
        with open_single_key({SIM_KEYS_ENV: f"127.0.0.1:{server.port}"}, on_touch=None) as k:
            enrol_key(store, k, name, pin_provider=lambda: PIN)
    pool = KeyPool(env, rescan_seconds=0.0)
    yield store, pool, servers, keys
    pool.close()
    store.close()
    for s in servers:
        try:
            s.__exit__(None, None, None)
        except Exception:
            pass


def _ids(store, name):
    return [c.credential_id for c in store.list_fido_credentials(store.get_user(name).id)]


def _login(store, pool, name, pin=PIN):
    return make_key_login(store, pin_provider=lambda: pin, on_touch=None, timeout=5,
                          open_key=lambda: pool.acquire(rp_id=RP, credential_ids=_ids(store, name),
                                                        timeout=5))(name)


def test_each_user_gets_the_key_holding_their_credential_and_keys_stay_open(world):
    store, pool, servers, _ = world
    for name in ("alice", "bob", "alice", "bob"):
        outcome = _login(store, pool, name)
        assert outcome.ok and outcome.user == name, outcome
    assert len(pool.paths()) == 2
    held = {p: e.key for p, e in pool._entries.items()}
    assert _login(store, pool, "alice").ok
    assert {p: e.key for p, e in pool._entries.items()} == held  # the same open keys
    with pytest.raises(NoCredentials):
        pool.acquire(rp_id=RP, credential_ids=[b"\x07" * 32], timeout=1)


def test_wrong_pins_count_across_logins_as_on_a_plugged_in_key(world):
    """Kept open, the key's own rule holds across logins: three wrong PINs in a row block
    it until it is re-plugged (CTAP 2.1 PIN_AUTH_BLOCKED), however many logins they took."""
    store, pool, _, _ = world
    reasons = [_login(store, pool, "alice", pin="000000").reason for _ in range(3)]
    assert reasons[:2] == [Reason.WRONG_PIN, Reason.WRONG_PIN]
    assert reasons[2] in (Reason.WRONG_PIN, Reason.PIN_AUTH_BLOCKED)
    assert _login(store, pool, "alice").reason is Reason.PIN_AUTH_BLOCKED


def test_a_ceremony_waits_for_the_users_key_while_it_is_busy(world):
    store, pool, _, _ = world
    held = pool.acquire(rp_id=RP, credential_ids=_ids(store, "alice"), timeout=5)
    with held:
        with pytest.raises(Busy):
            pool.acquire(rp_id=RP, credential_ids=_ids(store, "alice"), timeout=0.3)
        # bob's key is another one: not delayed by alice's
        other = pool.acquire(rp_id=RP, credential_ids=_ids(store, "bob"), timeout=1)
        assert other.key is not held.key
        with other:
            pass
        result = {}
        waiter = threading.Thread(target=lambda: result.update(
            key=pool.acquire(rp_id=RP, credential_ids=_ids(store, "alice"), timeout=5)))
        waiter.start()
        time.sleep(0.2)
        assert not result  # still waiting for alice's key
    waiter.join(5)
    assert result["key"].key is held.key
    with result["key"]:
        pass


def test_a_key_that_dies_is_dropped_and_found_again(world):
    store, pool, servers, keys = world
    assert _login(store, pool, "alice").ok
    port = servers[0].port
    servers[0].__exit__(None, None, None)  # the first key is pulled out
    outcomes = {name: _login(store, pool, name) for name in ("alice", "bob")}
    failed = [n for n, o in outcomes.items() if not o.ok]
    assert len(failed) == 1, outcomes  # the other user's key is untouched
    assert outcomes[failed[0]].reason in (Reason.DEVICE_REMOVED, Reason.DEVICE_ERROR,
                                          Reason.NO_DEVICE, Reason.UNKNOWN_CREDENTIAL)
    assert len(pool.paths()) == 1  # dropped
    # plugged in again (same simulator, same port): found at the next scan, and it works
    servers[0] = KeyServer(keys[0], port=port, control_port=None).__enter__()
    outcome = _login(store, pool, failed[0])
    assert outcome.ok, outcome
    assert len(pool.paths()) == 2


def test_a_key_slow_to_open_does_not_stall_the_others(world):
    """A device that accepts but never answers (here: a TCP listener posing as a simulated
    key) keeps a scan busy; logins on the keys already open go on meanwhile."""
    import socket

    store, pool, servers, _ = world
    assert _login(store, pool, "alice").ok and _login(store, pool, "bob").ok
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    accepted = []
    threading.Thread(target=lambda: accepted.append(mute.accept()), daemon=True).start()
    try:
        pool.environ = {SIM_KEYS_ENV: pool.environ[SIM_KEYS_ENV]
                        + f",127.0.0.1:{mute.getsockname()[1]}"}
        pool._scanned = float("-inf")
        scanning = threading.Thread(target=pool.scan, daemon=True)
        scanning.start()
        deadline = time.monotonic() + 5
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert accepted and scanning.is_alive()  # the scan is stuck on the mute "key"
        result = {}
        login = threading.Thread(target=lambda: result.update(o=_login(store, pool, "alice")),
                                 daemon=True)
        started = time.monotonic()
        login.start()
        login.join(2.0)
        assert not login.is_alive(), "the login waited for the stuck scan"
        assert result["o"].ok and time.monotonic() - started < 1.0
    finally:
        mute.close()
        for conn, _addr in accepted:
            conn.close()


def test_finding_a_users_key_does_not_wait_for_a_key_busy_with_someone_else(world):
    """The shift change: the first login of each person at a workstation asks the keys which
    holds their credential; a key busy with another person's ceremony is not waited for
    while a free key may answer (it was: each busy key in turn, up to the timeout)."""
    store, pool, _, _ = world
    held = pool.acquire(rp_id=RP, credential_ids=_ids(store, "alice"), timeout=5)
    with held:
        started = time.monotonic()
        other = pool.acquire(rp_id=RP, credential_ids=_ids(store, "bob"), timeout=3)
        took = time.monotonic() - started
        assert other.key is not held.key
        with other:
            pass
    assert took < 1.0, f"bob's key was found only after {took:.1f} s"
    # and a person whose key is the busy one still gets it when it comes free
    assert _login(store, pool, "alice").ok
