"""Interop: the registration and the assertions the agent produces, exported as WebAuthn
JSON, are accepted by two independent relying parties, py_webauthn and python-fido2's
Fido2Server, and rejected by both once one byte of the signature, the client data or the
authenticator data changes."""

from __future__ import annotations

import copy
import json

import pytest
import webauthn as py_webauthn
from fido2.server import Fido2Server
from fido2.utils import websafe_decode, websafe_encode
from fido2.webauthn import AuthenticationResponse, RegistrationResponse
from webauthn.helpers.exceptions import InvalidAuthenticationResponse, InvalidRegistrationResponse

from token_agent.ceremonies.key import enrol_key, login_with_key

from key_helpers import PIN, Keyring

RP_ID = "interop-trust.nhs.example"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One enrolment and two logins by the agent, exported as they would be for another RP."""
    from token_agent.store import Store

    tmp = tmp_path_factory.mktemp("interop")
    with Store.open(tmp / "store.db") as store:
        store.add_user("alice", display_name="Dr Alice Smith")
        store.set_setting("rp_id", RP_ID)
        _, key, _ = Keyring(tmp).new()
        enrolment = enrol_key(store, key, "alice", pin_provider=lambda: PIN)
        logins = [login_with_key(store, key, username="alice", pin_provider=lambda: PIN,
                                 export=True) for _ in range(2)]
        assert all(o.ok for o in logins)
        # through JSON and back, as a file handed to another system would be
        registration = json.loads(json.dumps(enrolment.to_json(export=True)["webauthn"]))
        assertions = [json.loads(json.dumps(o.detail["webauthn"])) for o in logins]
        return registration, assertions


def pyw_register(reg: dict):
    return py_webauthn.verify_registration_response(
        credential=reg["registration"], expected_challenge=websafe_decode(reg["challenge"]),
        expected_origin=reg["origin"], expected_rp_id=reg["rp_id"],
        require_user_verification=True,
    )


def pyw_authenticate(reg_result, data: dict, sign_count: int = 0):
    return py_webauthn.verify_authentication_response(
        credential=data["assertion"], expected_challenge=websafe_decode(data["challenge"]),
        expected_origin=data["origin"], expected_rp_id=data["rp_id"],
        credential_public_key=reg_result.credential_public_key,
        credential_current_sign_count=sign_count, require_user_verification=True,
    )


def fido_server(rp_id: str) -> Fido2Server:
    return Fido2Server({"id": rp_id, "name": "Independent RP"})


def fido_register(reg: dict):
    state = {"challenge": reg["challenge"], "user_verification": "required"}
    response = RegistrationResponse.from_dict(reg["registration"])
    return fido_server(reg["rp_id"]).register_complete(state, response).credential_data


def fido_authenticate(credential, data: dict):
    state = {"challenge": data["challenge"], "user_verification": "required"}
    response = AuthenticationResponse.from_dict(data["assertion"])
    return fido_server(data["rp_id"]).authenticate_complete(state, [credential], response)


def test_py_webauthn_accepts_the_agents_registration_and_assertions(exported):
    registration, assertions = exported
    result = pyw_register(registration)
    assert result.user_verified and str(getattr(result.fmt, "value", result.fmt)) == "packed"
    count = result.sign_count
    for assertion in assertions:
        verified = pyw_authenticate(result, assertion, count)
        assert verified.new_sign_count > count and verified.user_verified
        count = verified.new_sign_count


def test_fido2_server_accepts_the_agents_registration_and_assertions(exported):
    registration, assertions = exported
    credential = fido_register(registration)
    for assertion in assertions:
        assert fido_authenticate(credential, assertion) == credential


def _flip_b64(value: str, index: int) -> str:
    raw = bytearray(websafe_decode(value))
    raw[index % len(raw)] ^= 0x01
    return websafe_encode(bytes(raw))


@pytest.mark.parametrize("field, index", [
    ("signature", -1),
    ("signature", 10),
    ("clientDataJSON", 20),
    ("authenticatorData", 0),  # RP ID hash
    ("authenticatorData", 32),  # flags
    ("authenticatorData", 36),  # counter
])
def test_both_verifiers_reject_a_changed_assertion(exported, field, index):
    registration, assertions = exported
    tampered = copy.deepcopy(assertions[0])
    response = tampered["assertion"]["response"]
    response[field] = _flip_b64(response[field], index)
    with pytest.raises(InvalidAuthenticationResponse):
        pyw_authenticate(pyw_register(registration), tampered)
    with pytest.raises(Exception) as e:  # Fido2Server raises ValueError or InvalidSignature
        fido_authenticate(fido_register(registration), tampered)
    assert type(e.value).__name__ in ("ValueError", "InvalidSignature")


@pytest.mark.parametrize("field, index", [
    ("clientDataJSON", 20),
    ("attestationObject", -5),  # inside the credential public key / authenticator data
])
def test_both_verifiers_reject_a_changed_registration(exported, field, index):
    registration, _ = exported
    tampered = copy.deepcopy(registration)
    response = tampered["registration"]["response"]
    response[field] = _flip_b64(response[field], index)
    with pytest.raises(InvalidRegistrationResponse):
        pyw_register(tampered)
    tampered_server = Fido2Server({"id": RP_ID, "name": "RP"}, attestation="direct",
                                  verify_attestation=_packed_verifier())
    state = {"challenge": tampered["challenge"], "user_verification": "required"}
    with pytest.raises(Exception) as e:
        tampered_server.register_complete(
            state, RegistrationResponse.from_dict(tampered["registration"]))
    assert type(e.value).__name__ in ("ValueError", "InvalidSignature", "InvalidData")


def _packed_verifier():
    """Fido2Server verifies attestation only when given a verifier: check the packed
    signature (no trust decision), as an RP that looks at attestation would."""
    from fido2.attestation import PackedAttestation

    def verify(attestation_object, client_data_hash):
        PackedAttestation().verify(attestation_object.att_stmt, attestation_object.auth_data,
                                   client_data_hash)

    return verify
