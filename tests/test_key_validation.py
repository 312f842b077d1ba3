"""The virtual key checks its input as CTAP 2.1 asks (issue 13): each malformed command is
sent as raw CBOR through python-fido2's CtapHidDevice, so it crosses the key's real CTAPHID
framing (in-process handle), and the CTAP status byte of the answer is checked. Where two
channels are needed, a raw CTAPHID host allocates them with two CTAPHID_INITs."""

from __future__ import annotations

import hashlib

import pytest
from fido2 import cbor
from fido2.ctap import CtapError
from fido2.ctap2 import Ctap2
from fido2.ctap2.pin import ClientPin
from fido2.hid import CTAPHID, CtapHidDevice
from fido2.webauthn import AuthenticatorData

from simulators.key.authenticator import VirtualAuthenticator
from simulators.key.base import UserPresence
from simulators.key.ctaphid import Cmd
from simulators.key.device import VirtualKey
from simulators.key.transport import open_in_process_device
from sim_key_double import RawHost

ERR = CtapError.ERR
OK = 0x00
MAKE_CREDENTIAL, GET_ASSERTION, GET_INFO, GET_NEXT_ASSERTION = 0x01, 0x02, 0x04, 0x08
CRED_MGMT, CONFIG = 0x0A, 0x0D
SET_MIN_PIN_LENGTH = 0x03  # authenticatorConfig subcommand
# credentialManagement subcommands
ENUMERATE_RPS_BEGIN, ENUMERATE_RPS_NEXT = 0x02, 0x03
ENUMERATE_CREDS_BEGIN, ENUMERATE_CREDS_NEXT = 0x04, 0x05

PIN = "4829-ward"
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


# ---------------------------------------------------------------- pubKeyCredParams
@pytest.mark.parametrize(
    "cred_params, status",
    [
        ([{"alg": -7}], ERR.INVALID_CBOR),
        ([{"type": "public-key"}], ERR.INVALID_CBOR),
        ([*ES256, {"type": "public-key"}], ERR.INVALID_CBOR),
        ([*ES256, {"alg": -8}], ERR.INVALID_CBOR),
        ([{"type": "public-key", "alg": "-7"}], ERR.CBOR_UNEXPECTED_TYPE),
        ([{"type": "public-key", "alg": True}], ERR.CBOR_UNEXPECTED_TYPE),
        ([*ES256, {"type": "public-key", "alg": [-8]}], ERR.CBOR_UNEXPECTED_TYPE),
        ([*ES256, {"type": b"public-key", "alg": -8}], ERR.CBOR_UNEXPECTED_TYPE),
        ([*ES256, {"type": 1, "alg": -8}], ERR.CBOR_UNEXPECTED_TYPE),
        ([*ES256, "public-key"], ERR.CBOR_UNEXPECTED_TYPE),
        ([], ERR.UNSUPPORTED_ALGORITHM),
        ([{"type": "public-key", "alg": -257}], ERR.UNSUPPORTED_ALGORITHM),
    ],
    ids=["no-type", "no-alg", "no-alg-after-a-good-one", "no-type-after-a-good-one",
         "alg-text", "alg-bool", "alg-array-after-a-good-one", "type-bytes-after-a-good-one",
         "type-int-after-a-good-one", "element-not-a-map", "empty", "only-unsupported"],
)
def test_every_pub_key_cred_param_is_checked(device, cred_params, status):
    assert send(device, MAKE_CREDENTIAL, make_credential({4: cred_params}))[0] == status


def test_first_supported_algorithm_is_chosen_and_unknown_types_are_passed_over(device):
    cred_params = [
        {"type": "public-key", "alg": -257},  # RS256: not supported
        {"type": "future-key-type", "alg": -7},  # a type this key does not know
        {"type": "public-key", "alg": -8},  # EdDSA: chosen
        {"type": "public-key", "alg": -7},
    ]
    status, answer = send(device, MAKE_CREDENTIAL, make_credential({4: cred_params}))
    assert status == OK
    auth_data = AuthenticatorData(answer[2])
    assert auth_data.credential_data.public_key[3] == -8


# ---------------------------------------------------------------- clientDataHash
@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_client_data_hash_not_32_bytes_is_invalid_length(device, length):
    status, answer = send(device, MAKE_CREDENTIAL, make_credential({2: RP}))
    assert status == OK
    cred_id = AuthenticatorData(answer[2]).credential_data.credential_id
    assertion = {1: RP["id"], 2: b"\x02" * 32, 3: [{"type": "public-key", "id": cred_id}]}
    assert send(device, GET_ASSERTION, assertion)[0] == OK

    bad_hash = b"\x03" * length
    assert send(device, MAKE_CREDENTIAL, make_credential({1: bad_hash}))[0] == \
        ERR.INVALID_LENGTH
    assert send(device, GET_ASSERTION, {**assertion, 2: bad_hash})[0] == ERR.INVALID_LENGTH


# ---------------------------------------------------------------- setMinPINLength
def set_min_pin_length(device, rp_ids: list[str], pin_token=None) -> int:
    """authenticatorConfig setMinPINLength with minPinLengthRPIDs, authenticated with a
    (protocol, token) pair when given (the message of CTAP 2.1 section 6.11)."""
    sub_params = {2: rp_ids}
    params = {1: SET_MIN_PIN_LENGTH, 2: sub_params}
    if pin_token is not None:
        protocol, token = pin_token
        message = b"\xff" * 32 + bytes([CONFIG, SET_MIN_PIN_LENGTH]) + cbor.encode(sub_params)
        params.update({3: protocol.VERSION, 4: protocol.authenticate(token, message)})
    return send(device, CONFIG, params)[0]


@pytest.mark.parametrize("with_pin", [False, True], ids=["no-pin", "pin"])
def test_min_pin_length_rp_ids_beyond_the_announced_maximum_is_key_store_full(device, with_pin):
    status, info = send(device, GET_INFO)
    assert status == OK
    maximum = info[0x10]  # maxRPIDsForSetMinPINLength
    assert maximum >= 1
    pin_token = None
    if with_pin:
        client_pin = ClientPin(Ctap2(device))
        client_pin.set_pin(PIN)
        token = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.AUTHENTICATOR_CFG)
        pin_token = (client_pin.protocol, token)
    rp_ids = [f"rp{i}.nhs.example" for i in range(maximum + 1)]
    assert set_min_pin_length(device, rp_ids, pin_token) == ERR.KEY_STORE_FULL
    assert set_min_pin_length(device, rp_ids[:maximum], pin_token) == OK


# ---------------------------------------------------------------- continuation and channels
class Channel:
    """One CTAPHID channel of a raw host: a handle shared by several channels gets every
    report, so python-fido2's CtapHidDevice (which takes another channel's report for an
    error) cannot share it; :class:`RawHost` reads only its channel's reports, as a host on
    hidraw must."""

    def __init__(self, host: RawHost) -> None:
        self.host = host
        self.cid = host.allocate()  # CTAPHID_INIT on the broadcast channel

    def send(self, cmd: int, params: dict | None = None) -> tuple[int, object]:
        payload = bytes([cmd]) + (cbor.encode(params) if params is not None else b"")
        self.host.send(self.cid, Cmd.CBOR, payload)
        reply, data = self.host.receive(self.cid)
        assert reply == Cmd.CBOR, f"CTAPHID answer 0x{reply:02x} {data.hex()}"
        return data[0], (cbor.decode(data[1:]) if len(data) > 1 else None)


@pytest.fixture
def two_channels(key, device):
    """Opens, when called, two channels from two CTAPHID_INIT allocations on one raw handle.
    Call it after the set-up through ``device``: every handle gets every report, so
    ``device`` is not used afterwards. (It stays open, so the key does not power up again
    when the raw handle opens.)"""
    hosts = []

    def open_channels() -> tuple[Channel, Channel]:
        host = RawHost(key)
        hosts.append(host)
        a, b = Channel(host), Channel(host)
        assert a.cid != b.cid
        return a, b

    yield open_channels
    for host in hosts:
        host.close()


def make_discoverable(device, rp: dict, user_id: bytes) -> None:
    user = {"id": user_id, "name": user_id.decode(), "displayName": user_id.decode()}
    params = make_credential({2: rp, 3: user, 7: {"rk": True}})
    assert send(device, MAKE_CREDENTIAL, params)[0] == OK


def test_get_next_assertion_continues_only_on_the_channel_of_get_assertion(device, two_channels):
    for user_id in (b"alice", b"bob", b"carol"):
        make_discoverable(device, RP, user_id)
    a, b = two_channels()
    status, first = a.send(GET_ASSERTION, {1: RP["id"], 2: b"\x04" * 32})
    assert status == OK and first[5] == 3  # numberOfCredentials
    seen = {first[4]["id"]}

    assert b.send(GET_NEXT_ASSERTION)[0] == ERR.NOT_ALLOWED
    status, second = a.send(GET_NEXT_ASSERTION)  # the other channel's try did not end it
    assert status == OK
    seen.add(second[4]["id"])
    assert b.send(GET_NEXT_ASSERTION)[0] == ERR.NOT_ALLOWED
    status, third = a.send(GET_NEXT_ASSERTION)
    assert status == OK
    seen.add(third[4]["id"])
    assert seen == {b"alice", b"bob", b"carol"}
    assert a.send(GET_NEXT_ASSERTION)[0] == ERR.NOT_ALLOWED  # all three given

    # And the other way round: what the second channel begins, the first cannot continue.
    assert b.send(GET_ASSERTION, {1: RP["id"], 2: b"\x05" * 32})[0] == OK
    assert a.send(GET_NEXT_ASSERTION)[0] == ERR.NOT_ALLOWED
    assert b.send(GET_NEXT_ASSERTION)[0] == OK


def test_credential_enumerations_continue_only_on_the_channel_that_began_them(
    device, two_channels
):
    other_rp = {"id": "gp.nhs.example", "name": "Example Practice"}
    make_discoverable(device, RP, b"alice")
    make_discoverable(device, RP, b"bob")
    make_discoverable(device, other_rp, b"alice")
    client_pin = ClientPin(Ctap2(device))
    client_pin.set_pin(PIN)
    protocol = client_pin.protocol
    token = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.CREDENTIAL_MGMT)

    def authenticated(sub: int, sub_params: dict | None = None) -> dict:
        message = bytes([sub]) + (cbor.encode(sub_params) if sub_params is not None else b"")
        params = {1: sub, 3: protocol.VERSION, 4: protocol.authenticate(token, message)}
        if sub_params is not None:
            params[2] = sub_params
        return params

    a, b = two_channels()
    status, first_rp = a.send(CRED_MGMT, authenticated(ENUMERATE_RPS_BEGIN))
    assert status == OK and first_rp[5] == 2  # totalRPs
    assert b.send(CRED_MGMT, {1: ENUMERATE_RPS_NEXT})[0] == ERR.NOT_ALLOWED
    status, second_rp = a.send(CRED_MGMT, {1: ENUMERATE_RPS_NEXT})
    assert status == OK
    assert {first_rp[3]["id"], second_rp[3]["id"]} == {RP["id"], other_rp["id"]}

    rp_hash = hashlib.sha256(RP["id"].encode()).digest()
    status, first_cred = a.send(CRED_MGMT, authenticated(ENUMERATE_CREDS_BEGIN, {1: rp_hash}))
    assert status == OK and first_cred[9] == 2  # totalCredentials
    assert b.send(CRED_MGMT, {1: ENUMERATE_CREDS_NEXT})[0] == ERR.NOT_ALLOWED
    status, second_cred = a.send(CRED_MGMT, {1: ENUMERATE_CREDS_NEXT})
    assert status == OK
    assert {first_cred[6]["id"], second_cred[6]["id"]} == {b"alice", b"bob"}
