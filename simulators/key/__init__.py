"""The virtual FIDO2 security key: a CTAP 2.1 authenticator behind CTAPHID framing.

    from simulators.key import create_virtual_key, KeyServer, open_in_process_device

    key = create_virtual_key(presence="auto")          # in memory; state_file=... to persist
    device = open_in_process_device(key)               # a python-fido2 CtapHidDevice
    with KeyServer(key, port=0, control_port=0) as s:  # or over TCP, as its own process would
        ...

See README.md, "The virtual FIDO2 key", for the command line, the control interface and the
fault injection.
"""

from .base import FaultPlan, PresenceMode, UserPresence
from .device import VirtualKey, create_virtual_key
from .transport import KeyServer, open_in_process_device

__all__ = [
    "FaultPlan",
    "KeyServer",
    "PresenceMode",
    "UserPresence",
    "VirtualKey",
    "create_virtual_key",
    "open_in_process_device",
]
