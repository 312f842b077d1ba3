"""The agent's own relying-party checks (token_agent.webauthn) on real responses from the
virtual key, and on every kind of tampering."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import serialization
from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.webauthn import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialCreationOptions,
    PublicKeyCredentialDescriptor,
    PublicKeyCredentialParameters,
    PublicKeyCredentialRequestOptions,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialUserEntity,
    UserVerificationRequirement,
)

from simulators.key import create_virtual_key, open_in_process_device
from simulators.key.attestation import MODELS, root_certificate
from token_agent import webauthn
from token_agent.webauthn import AttestationPolicy, VerificationError

RP_ID = "trust.nhs.example"
ORIGIN = f"https://{RP_ID}"
SIM_ROOT = root_certificate().public_bytes(serialization.Encoding.PEM).decode()


class NoPin(UserInteraction):
    def request_pin(self, permissions, rp_id):
        return None


@pytest.fixture(scope="module")
def client():
    device = open_in_process_device(create_virtual_key(presence="auto"))
    yield Fido2Client(device, client_data_collector=DefaultClientDataCollector(ORIGIN),
                      user_interaction=NoPin())
    device.close()


def register(client, challenge: bytes, alg: int = -7):
    return client.make_credential(PublicKeyCredentialCreationOptions(
        rp=PublicKeyCredentialRpEntity(name="Trust", id=RP_ID),
        user=PublicKeyCredentialUserEntity(name="alice", id=b"alice-handle"),
        challenge=challenge,
        pub_key_cred_params=[PublicKeyCredentialParameters(type="public-key", alg=alg)],
        attestation=AttestationConveyancePreference.DIRECT,
        authenticator_selection=AuthenticatorSelectionCriteria(
            user_verification=UserVerificationRequirement.DISCOURAGED),
    ))


def check_registration(response, expected, policy=AttestationPolicy(), **overrides):
    args = dict(rp_id=RP_ID, origin=ORIGIN, challenge=expected,
                client_data_json=bytes(response.response.client_data),
                attestation_object=bytes(response.response.attestation_object),
                require_uv=False, policy=policy)
    args.update(overrides)
    return webauthn.verify_registration(**args)


@pytest.fixture(scope="module")
def enrolled(client):
    challenge = os.urandom(32)
    response = register(client, challenge)
    return check_registration(response, challenge)


def assert_once(client, enrolled, challenge):
    return client.get_assertion(PublicKeyCredentialRequestOptions(
        challenge=challenge, rp_id=RP_ID,
        allow_credentials=[PublicKeyCredentialDescriptor(type="public-key",
                                                         id=enrolled.credential_id)],
        user_verification=UserVerificationRequirement.DISCOURAGED,
    )).get_response(0)


def check_assertion(enrolled, response, expected, **overrides):
    args = dict(public_key=enrolled.public_key, stored_sign_count=enrolled.sign_count,
                rp_id=RP_ID, origin=ORIGIN, challenge=expected,
                client_data_json=bytes(response.response.client_data),
                authenticator_data=bytes(response.response.authenticator_data),
                signature=response.response.signature, require_uv=False)
    args.update(overrides)
    return webauthn.verify_assertion(**args)


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


# ---------------------------------------------------------------- registration
def test_registration_is_verified_and_attestation_policy_applied(client):
    challenge = os.urandom(32)
    response = register(client, challenge)
    untrusted = check_registration(response, challenge)
    assert untrusted.attestation_format == "packed" and not untrusted.attestation_trusted
    assert untrusted.aaguid == str(MODELS["ta-vk1"].aaguid)
    trusted = check_registration(response, challenge, AttestationPolicy(roots_pem=(SIM_ROOT,)))
    assert trusted.attestation_trusted
    by_aaguid = check_registration(response, challenge,
                                   AttestationPolicy(allowed_aaguids=(untrusted.aaguid,)))
    assert by_aaguid.attestation_trusted
    other_root = _self_signed_root()
    with pytest.raises(VerificationError) as e:
        check_registration(response, challenge, AttestationPolicy(roots_pem=(other_root,)))
    assert e.value.reason == "untrusted-key"


def test_eddsa_registration_and_assertion(client):
    challenge = os.urandom(32)
    enrolled = check_registration(register(client, challenge, alg=-8), challenge)
    challenge = os.urandom(32)
    result = check_assertion(enrolled, assert_once(client, enrolled, challenge), challenge)
    assert result.sign_count > enrolled.sign_count and not result.counter_regressed


@pytest.mark.parametrize("what, reason", [
    ("challenge", "challenge-mismatch"),
    ("origin", "origin-mismatch"),
    ("rp_id", "rp-id-mismatch"),
    ("attestation", "bad-attestation"),
    ("client_data", "challenge-mismatch"),
])
def test_registration_tampering_is_refused(client, what, reason):
    challenge = os.urandom(32)
    response = register(client, challenge)
    att = bytes(response.response.attestation_object)
    kwargs = {
        "challenge": {"challenge": os.urandom(32)},
        "origin": {"origin": "https://evil.example"},
        "rp_id": {"rp_id": "evil.example"},
        # a byte inside the authenticator data (the counter): the attestation no longer signs it
        "attestation": {"attestation_object": att.replace(
            bytes(response.response.attestation_object.auth_data)[33:37],
            b"\x00\x00\x7f\x7f")},
        "client_data": {"client_data_json": bytes(response.response.client_data).replace(
            b'"challenge":"', b'"challenge":"A')},
    }[what]
    with pytest.raises(VerificationError) as e:
        check_registration(response, challenge, **kwargs)
    assert e.value.reason == reason


def test_uv_required_at_registration(client):
    challenge = os.urandom(32)
    response = register(client, challenge)  # no PIN on this key: no UV
    with pytest.raises(VerificationError) as e:
        check_registration(response, challenge, require_uv=True)
    assert e.value.reason == "user-not-verified"


# ---------------------------------------------------------------- assertions
def test_assertion_verifies_and_counter_moves(client, enrolled):
    challenge = os.urandom(32)
    first = check_assertion(enrolled, assert_once(client, enrolled, challenge), challenge)
    challenge2 = os.urandom(32)
    second = check_assertion(enrolled, assert_once(client, enrolled, challenge2), challenge2,
                             stored_sign_count=first.sign_count)
    assert second.sign_count > first.sign_count and not second.counter_regressed


def test_counter_regression_is_reported(client, enrolled):
    challenge = os.urandom(32)
    response = assert_once(client, enrolled, challenge)
    count = response.response.authenticator_data.counter
    result = check_assertion(enrolled, response, challenge, stored_sign_count=count)
    assert result.counter_regressed  # equal counts: not increasing
    result = check_assertion(enrolled, response, challenge, stored_sign_count=count + 100)
    assert result.counter_regressed


def test_zero_counters_are_not_a_regression():
    """Keys without a counter always send 0: that is no clone signal (WebAuthn 7.2 step 21)."""
    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from fido2 import cbor

    key = ec.generate_private_key(ec.SECP256R1())
    n = key.public_key().public_numbers()
    cose = cbor.encode({1: 2, 3: -7, -1: 1, -2: n.x.to_bytes(32, "big"),
                        -3: n.y.to_bytes(32, "big")})
    challenge = os.urandom(32)
    cdj = webauthn.client_data("webauthn.get", challenge, ORIGIN)

    def signed(counter: int) -> tuple[bytes, bytes]:
        auth = hashlib.sha256(RP_ID.encode()).digest() + b"\x01" + counter.to_bytes(4, "big")
        return auth, key.sign(auth + hashlib.sha256(cdj).digest(), ec.ECDSA(hashes.SHA256()))

    def verify(counter: int, stored: int) -> bool:
        auth, sig = signed(counter)
        return webauthn.verify_assertion(
            public_key=cose, stored_sign_count=stored, rp_id=RP_ID, origin=ORIGIN,
            challenge=challenge, client_data_json=cdj, authenticator_data=auth, signature=sig,
            require_uv=False).counter_regressed

    assert verify(0, 0) is False  # no counter on either side
    assert verify(0, 5) is True  # the key stopped counting: suspicious
    assert verify(6, 5) is False
    assert verify(5, 5) is True


@pytest.mark.parametrize("field, reason", [
    ("signature", "bad-signature"),
    ("authenticator_data_flags", "bad-signature"),
    ("authenticator_data_rp", "rp-id-mismatch"),
    ("client_data", "bad-signature"),
    ("challenge", "challenge-mismatch"),
    ("type", "client-data-type"),
    ("truncated", "auth-data-malformed"),
    ("garbage_client_data", "client-data-malformed"),
])
def test_assertion_tampering_is_refused(client, enrolled, field, reason):
    challenge = os.urandom(32)
    response = assert_once(client, enrolled, challenge)
    auth = bytes(response.response.authenticator_data)
    cdj = bytes(response.response.client_data)
    sig = response.response.signature
    overrides = {
        "signature": {"signature": flip(sig, len(sig) // 2)},
        "authenticator_data_flags": {"authenticator_data": auth[:32] + bytes([auth[32] | 0x04])
                                     + auth[33:]},
        "authenticator_data_rp": {"authenticator_data": flip(auth, 0)},
        "client_data": {"client_data_json": cdj.replace(b'"crossOrigin":false',
                                                        b'"crossOrigin":false ')},
        "challenge": {"challenge": flip(challenge, 0)},
        "type": {"client_data_json": cdj.replace(b"webauthn.get", b"webauthn.create")},
        "truncated": {"authenticator_data": auth[:30]},
        "garbage_client_data": {"client_data_json": b"{not json"},
    }[field]
    with pytest.raises(VerificationError) as e:
        check_assertion(enrolled, response, challenge, **overrides)
    assert e.value.reason == reason


def test_uv_required_at_login(client, enrolled):
    challenge = os.urandom(32)
    response = assert_once(client, enrolled, challenge)
    with pytest.raises(VerificationError) as e:
        check_assertion(enrolled, response, challenge, require_uv=True)
    assert e.value.reason == "user-not-verified"


def test_malformed_stored_key_is_a_clear_error():
    with pytest.raises(VerificationError) as e:
        webauthn.PublicKey({1: 2, 3: -7, -1: 1, -2: b"\0" * 32, -3: b"\0" * 32})
    assert e.value.reason == "key-malformed"
    with pytest.raises(VerificationError) as e:
        webauthn.PublicKey({1: 2, 3: -35, -1: 2})
    assert e.value.reason == "unsupported-key"


def _self_signed_root() -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other Vendor Root")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()
