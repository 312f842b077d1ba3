"""Shared by the key tests: virtual keys as the agent's driver sees them."""

from __future__ import annotations

from fido2.ctap2 import Ctap2
from fido2.ctap2.pin import ClientPin

from drivers.fido.keys import FidoKey
from simulators.key.authenticator import VirtualAuthenticator
from simulators.key.base import UserPresence
from simulators.key.device import VirtualKey
from simulators.key.transport import open_in_process_device

PIN = "135790"


class Keyring:
    """Virtual keys for a test, each a FidoKey over the in-process HID connection."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.count = 0

    def new(self, *, presence="auto", pin=PIN, state=None, timeout=None):
        self.count += 1
        path = state or self.tmp_path / f"key{self.count}.json"
        presence_obj = UserPresence(presence, **({"timeout": timeout} if timeout else {}))
        vkey = VirtualKey(VirtualAuthenticator(path, presence_obj), presence_obj)
        device = open_in_process_device(vkey)
        if pin and not Ctap2(device).get_info().options["clientPin"]:
            ClientPin(Ctap2(device)).set_pin(pin)
        return vkey, FidoKey(device), path


def serve_key(pin: str, presence: str = "auto"):
    """A virtual key served on TCP by this process (a ``KeyServer``, no control port), its
    PIN set over a connection of its own, closed again: ``(vkey, server)``; the caller
    stops the server (``server.__exit__(None, None, None)``)."""
    from simulators.key.device import create_virtual_key
    from simulators.key.transport import KeyServer, open_tcp_device

    vkey = create_virtual_key(presence=presence)
    server = KeyServer(vkey, port=0, control_port=None).__enter__()
    device = open_tcp_device("127.0.0.1", server.port)
    try:
        ClientPin(Ctap2(device)).set_pin(pin)
    finally:
        device.close()
    return vkey, server
