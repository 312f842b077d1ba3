"""The relying party's key login, tested against token-agent's virtual FIDO2 key (fixtures
from token-agent's pytest plugin: nothing to import, nothing to configure)."""

from __future__ import annotations

import shutil
from contextlib import closing

import pytest
from fido2.client import ClientError, DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.utils import websafe_decode, websafe_encode

from login_rp import ClonedKey, LoginError, LoginServer
from simulators.key import open_in_process_device


class Clinician(UserInteraction):
    """The person at the keyboard: touches the key when it asks (keepalive UPNEEDED)."""

    def __init__(self, key=None) -> None:
        self.key, self.prompts = key, 0

    def prompt_up(self) -> None:
        self.prompts += 1
        if self.key is not None:
            self.key.presence.touch()


def client_for(device, rp: LoginServer, user: UserInteraction | None = None) -> Fido2Client:
    return Fido2Client(device, client_data_collector=DefaultClientDataCollector(rp.origin),
                       user_interaction=user or Clinician())


def register(rp: LoginServer, client: Fido2Client, name: str = "alice") -> None:
    options = rp.begin_registration(name, "Dr Alice Smith")
    rp.finish_registration(name, dict(client.make_credential(options["publicKey"])))


def log_in(rp: LoginServer, client: Fido2Client, name: str = "alice") -> str:
    options = rp.begin_login(name)
    response = client.get_assertion(options["publicKey"]).get_response(0)
    return rp.finish_login(name, dict(response))


def test_register_then_log_in(virtual_key_device):
    rp = LoginServer()
    client = client_for(virtual_key_device, rp)
    register(rp, client)
    assert log_in(rp, client) == "alice"
    assert log_in(rp, client) == "alice"  # the counter moves on


@pytest.mark.virtual_key(presence="manual")
def test_the_user_touches_when_the_key_asks(virtual_key, virtual_key_device):
    rp = LoginServer()
    user = Clinician(virtual_key)
    client = client_for(virtual_key_device, rp, user)
    register(rp, client)
    assert log_in(rp, client) == "alice"
    assert user.prompts == 2  # one touch each time, asked for by the key


def test_no_touch_no_login(virtual_key, virtual_key_device):
    rp = LoginServer()
    client = client_for(virtual_key_device, rp)
    register(rp, client)
    virtual_key.presence.set_mode("never")  # nobody touches the key...
    virtual_key.presence.timeout = 0.5      # ...and it gives up after half a second
    with pytest.raises(ClientError) as e:
        client.get_assertion(rp.begin_login("alice")["publicKey"])
    assert e.value.code == ClientError.ERR.TIMEOUT


@pytest.mark.virtual_key(presence="deny")
def test_the_user_refuses(virtual_key_device):
    rp = LoginServer()
    with pytest.raises(ClientError):
        register(rp, client_for(virtual_key_device, rp))
    assert not rp.accounts["alice"].credentials


def test_a_changed_signature_is_refused(virtual_key_device):
    rp = LoginServer()
    client = client_for(virtual_key_device, rp)
    register(rp, client)
    options = rp.begin_login("alice")
    response = dict(client.get_assertion(options["publicKey"]).get_response(0))
    signature = bytearray(websafe_decode(response["response"]["signature"]))
    signature[-1] ^= 0x01
    response["response"] = {**response["response"], "signature": websafe_encode(bytes(signature))}
    with pytest.raises(LoginError, match="(?i)invalid ?signature"):
        rp.finish_login("alice", response)


def test_a_cloned_key_is_refused(virtual_key_factory, tmp_path):
    rp = LoginServer()
    genuine = virtual_key_factory(state_file=tmp_path / "key.json")
    with closing(open_in_process_device(genuine)) as device:
        client = client_for(device, rp)
        register(rp, client)
        shutil.copy(tmp_path / "key.json", tmp_path / "clone.json")  # its secrets copied
        assert log_in(rp, client) == "alice"
    clone = virtual_key_factory(state_file=tmp_path / "clone.json")
    with closing(open_in_process_device(clone)) as device:
        with pytest.raises(ClonedKey):
            log_in(rp, client_for(device, rp))


def test_the_key_pulled_out_mid_login(virtual_key, virtual_key_device):
    rp = LoginServer()
    client = client_for(virtual_key_device, rp)
    register(rp, client)
    virtual_key.set_faults(unplug_after_reports=1)  # gone as the request arrives
    with pytest.raises((ClientError, OSError)):
        log_in(rp, client)
    assert not virtual_key.powered


def test_over_tcp_with_the_control_interface(virtual_key_server):
    """The same key on a TCP port, touched through its HTTP control interface (as a test
    driving a browser or another process would)."""
    control = virtual_key_server.control
    control.set_presence("manual")

    class TouchByHttp(UserInteraction):
        def prompt_up(self) -> None:
            control.touch()

    rp = LoginServer()
    client = client_for(virtual_key_server.open_device(), rp, TouchByHttp())
    register(rp, client)
    assert log_in(rp, client) == "alice"
    assert control.status()["presence"] == "manual"
