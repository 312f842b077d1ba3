"""The virtual key checks its input as CTAP 2.1 asks (issue 13): each malformed command is
sent as raw CBOR through python-fido2's CtapHidDevice, so it crosses the key's real CTAPHID
framing (in-process handle), and the CTAP status byte of the answer is checked."""

from __future__ import annotations

import pytest
from fido2 import cbor
from fido2.ctap import CtapError
from fido2.ctap2 import Ctap2
from fido2.ctap2.pin import ClientPin
from fido2.hid import CTAPHID, CtapHidDevice
from fido2.webauthn import AuthenticatorData

from simulators.key.authenticator import VirtualAuthenticator
from simulators.key.base import UserPresence
from simulators.key.device import VirtualKey
from simulators.key.transport import open_in_process_device

ERR = CtapError.ERR
OK = 0x00
MAKE_CREDENTIAL, GET_ASSERTION, GET_INFO, CONFIG = 0x01, 0x02, 0x04, 0x0D
SET_MIN_PIN_LENGTH = 0x03  # authenticatorConfig subcommand

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
