"""The virtual key checks its input as CTAP 2.1 asks (issue 13): each malformed command is
sent as raw CBOR through python-fido2's CtapHidDevice, so it crosses the key's real CTAPHID
framing (in-process handle), and the CTAP status byte of the answer is checked."""

from __future__ import annotations

import pytest
from fido2 import cbor
from fido2.ctap import CtapError
from fido2.hid import CTAPHID, CtapHidDevice

from simulators.key.authenticator import VirtualAuthenticator
from simulators.key.base import UserPresence
from simulators.key.device import VirtualKey
from simulators.key.transport import open_in_process_device

ERR = CtapError.ERR
OK = 0x00
MAKE_CREDENTIAL, GET_ASSERTION = 0x01, 0x02

RP = {"id": "trust.nhs.example", "name": "Example Trust"}
USER = {"id": b"user-alice", "name": "alice", "displayName": "Dr Alice Smith"}
ES256 = [{"type": "public-key", "alg": -7}]


@pytest.fixture
def key():
    app = VirtualAuthenticator(None, UserPresence("auto"))
    key = VirtualKey(app, app.presence)
    yield key
    key.close()


@pytest.fixture
def device(key):
    dev = open_in_process_device(key)
    yield dev
    dev.close()


def send(device: CtapHidDevice, cmd: int, params: dict | None = None) -> tuple[int, object]:
    """One CTAPHID_CBOR message: the command byte and ``params`` as CBOR; returns the status
    byte and the decoded answer (None when there is none)."""
    payload = bytes([cmd]) + (cbor.encode(params) if params is not None else b"")
    out = device.call(CTAPHID.CBOR, payload)
    return out[0], (cbor.decode(out[1:]) if len(out) > 1 else None)


def make_credential(changes: dict | None = None) -> dict:
    """makeCredential parameters, well formed but for ``changes``."""
    return {1: b"\x01" * 32, 2: dict(RP), 3: dict(USER), 4: list(ES256), **(changes or {})}


# ---------------------------------------------------------------- makeCredential entities
def test_well_formed_make_credential_succeeds(device):
    assert send(device, MAKE_CREDENTIAL, make_credential())[0] == OK


@pytest.mark.parametrize(
    "rp, user",
    [
        ({"id": 42}, USER),
        ({"id": b"trust.nhs.example"}, USER),
        ({**RP, "name": 7}, USER),
        ({**RP, "name": b"Example Trust"}, USER),
        (RP, {**USER, "name": 1}),
        (RP, {**USER, "name": b"alice"}),
        (RP, {**USER, "displayName": ["Dr", "Alice"]}),
        (RP, {**USER, "displayName": b"Dr Alice Smith"}),
        (RP, {**USER, "id": "user-alice"}),
    ],
    ids=["rp.id-int", "rp.id-bytes", "rp.name-int", "rp.name-bytes", "user.name-int",
         "user.name-bytes", "user.displayName-array", "user.displayName-bytes", "user.id-text"],
)
def test_entity_member_of_the_wrong_type_is_cbor_unexpected_type(device, rp, user):
    status, _ = send(device, MAKE_CREDENTIAL, make_credential({2: rp, 3: user}))
    assert status == ERR.CBOR_UNEXPECTED_TYPE


def test_entity_without_id_is_missing_parameter(device):
    assert send(device, MAKE_CREDENTIAL, make_credential({2: {"name": "x"}}))[0] == \
        ERR.MISSING_PARAMETER
    assert send(device, MAKE_CREDENTIAL, make_credential({3: {"name": "x"}}))[0] == \
        ERR.MISSING_PARAMETER
