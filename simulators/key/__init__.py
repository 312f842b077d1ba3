"""The virtual FIDO2 security key: a CTAP 2.1 authenticator behind CTAPHID framing.

    from simulators.key import create_virtual_key, KeyServer, open_in_process_device

    key = create_virtual_key(presence="auto")          # in memory; state_file=... to persist
    device = open_in_process_device(key)               # a python-fido2 CtapHidDevice
    with KeyServer(key, port=0, control_port=0) as s:  # or over TCP, as its own process would
        device = open_tcp_device(s.host, s.port)       # a CtapHidDevice over the socket
        KeyControl(s.control_port).touch()             # its HTTP control interface

See README.md, "The virtual FIDO2 key", for the command line, the control interface and the
fault injection. The names are imported on first use, so that importing a submodule (as the
`token-agent` command does for its constants) does not load the whole simulator.
"""

from importlib import import_module

_EXPORTS = {
    "FaultPlan": ".base",
    "PresenceMode": ".base",
    "UserPresence": ".base",
    "VirtualKey": ".device",
    "create_virtual_key": ".device",
    "KeyControl": ".control",
    "KeyServer": ".transport",
    "open_in_process_device": ".transport",
    "open_tcp_device": ".transport",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
