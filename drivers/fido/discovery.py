"""Finding and opening FIDO authenticators: USB keys through python-fido2's own hidraw
backend, plus simulated keys named by ``TOKEN_AGENT_SIM_KEYS`` (see :mod:`drivers.fido.sim`).

No policy here: which key to use, and what to do when there is none, is the caller's call.
"""

from __future__ import annotations

import glob
import logging
import os
import struct
from collections.abc import Callable, Iterable, Mapping

import fido2.hid
from fido2.hid import CtapHidDevice
from fido2.hid.base import CtapHidConnection, HidDescriptor, parse_report_descriptor

from .channel import SharedHidDevice
from .sim import (
    is_sim_path,
    list_sim_descriptors,
    open_sim_connection,
    parse_sim_keys,
    sim_address,
    sim_descriptor,
)

logger = logging.getLogger(__name__)

SIM_KEYS_ENV = "TOKEN_AGENT_SIM_KEYS"

# python-fido2's platform backend, captured before install_into_fido2 can replace the
# module attributes.
_hid_list_descriptors = fido2.hid.list_descriptors
_hid_get_descriptor = fido2.hid.get_descriptor
_hid_open_connection = fido2.hid.open_connection


def sim_addresses(environ: Mapping[str, str] | None = None) -> list[tuple[str, int]]:
    """The simulated keys named by ``TOKEN_AGENT_SIM_KEYS`` (ValueError if malformed)."""
    environ = os.environ if environ is None else environ
    return parse_sim_keys(environ.get(SIM_KEYS_ENV, ""))


def list_usb_descriptors() -> list[HidDescriptor]:
    """python-fido2's descriptors of the FIDO keys on USB hidraw; [] where there is no
    hidraw (containers, CI) or it cannot be read."""
    try:
        return list(_hid_list_descriptors())
    except OSError as e:
        logger.debug("no hidraw FIDO devices listed: %s", e)
        return []


#: where Linux puts the hidraw nodes, and what sysfs says about each (readable by everyone)
HIDRAW_NODES = "/dev/hidraw*"
SYSFS_HIDRAW = "/sys/class/hidraw"


def _is_fido_hidraw(node: str) -> bool:
    """Whether the hidraw ``node`` is a FIDO device, from its HID report descriptor in sysfs
    (usage page 0xF1D0), which needs no access to the node itself."""
    sysfs = os.path.join(SYSFS_HIDRAW, os.path.basename(node), "device", "report_descriptor")
    try:
        with open(sysfs, "rb") as f:
            parse_report_descriptor(f.read())
    except (OSError, ValueError, struct.error):
        return False
    return True


def unopenable_usb_keys() -> list[str]:
    """The hidraw nodes of FIDO keys that are plugged in but that this process may not open
    for reading and writing (their permissions or ACL leave it out): the keys python-fido2's
    listing passes over in silence. [] where there is no hidraw."""
    return [node for node in sorted(glob.glob(HIDRAW_NODES))
            if _is_fido_hidraw(node) and not os.access(node, os.R_OK | os.W_OK)]


def list_descriptors(environ: Mapping[str, str] | None = None) -> list[HidDescriptor]:
    """USB keys, then the simulated keys from ``TOKEN_AGENT_SIM_KEYS`` that answer now."""
    return list_usb_descriptors() + list_sim_descriptors(sim_addresses(environ))


def open_connection(descriptor: HidDescriptor) -> CtapHidConnection:
    """Open a descriptor from :func:`list_descriptors`: ``sim:`` paths over TCP, the rest
    through python-fido2's hidraw backend."""
    if is_sim_path(descriptor.path):
        return open_sim_connection(descriptor)
    return _hid_open_connection(descriptor)


def open_device(descriptor: HidDescriptor) -> CtapHidDevice:
    """A python-fido2 device for a descriptor (its connection is closed if INIT fails),
    that ignores other programs' reports and re-allocates a lost channel
    (:class:`~drivers.fido.channel.SharedHidDevice`)."""
    connection = open_connection(descriptor)
    try:
        return SharedHidDevice(descriptor, connection)
    except Exception:
        connection.close()
        raise


def list_devices(environ: Mapping[str, str] | None = None) -> list[CtapHidDevice]:
    """Open every listed key; a key that fails to open is logged and left out."""
    devices = []
    for descriptor in list_descriptors(environ):
        try:
            devices.append(open_device(descriptor))
        except Exception as e:
            logger.warning("cannot open FIDO device %s: %s", descriptor.path, e)
    return devices


def install_into_fido2(addresses: Iterable[tuple[str, int]]) -> Callable[[], None]:
    """Make python-fido2's discovery see only the given simulated keys: replaces
    ``fido2.hid.list_descriptors``, ``get_descriptor`` and ``open_connection`` (which
    ``fido2.hid.open_device`` and ``CtapHidDevice.list_devices`` call). Code that imported
    those names before the call keeps the originals. Returns a function that restores them.
    """
    keys = list(addresses)
    saved = (fido2.hid.list_descriptors, fido2.hid.get_descriptor, fido2.hid.open_connection)

    def list_sim_only() -> list[HidDescriptor]:
        return list_sim_descriptors(keys)

    def get_sim_descriptor(path: str | bytes) -> HidDescriptor:
        address = sim_address(path)
        if address not in keys:
            raise ValueError(f"{path!r} is not one of the installed simulated keys")
        return sim_descriptor(*address)

    fido2.hid.list_descriptors = list_sim_only
    fido2.hid.get_descriptor = get_sim_descriptor
    fido2.hid.open_connection = open_sim_connection

    def restore() -> None:
        (fido2.hid.list_descriptors, fido2.hid.get_descriptor, fido2.hid.open_connection) = saved

    return restore
