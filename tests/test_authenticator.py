"""The virtual key's CTAP 2.1 behaviour, driven through python-fido2's real client and HID
framing code over the in-process connection (and, for malformed input, raw CBOR)."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.client import ClientError, DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.ctap import CtapError
from fido2.ctap1 import ApduError, Ctap1
from fido2.ctap2 import Ctap2
from fido2.ctap2.credman import CredentialManagement
from fido2.ctap2.extensions import HmacSecretExtension
from fido2.ctap2 import pin as fido2_pin
from fido2.ctap2.pin import ClientPin, PinProtocolV1, PinProtocolV2
from fido2.server import Fido2Server
from fido2.webauthn import AttestationObject

from simulators.key.attestation import MODELS, OID_FIDO_AAGUID, root_certificate
from simulators.key.authenticator import VirtualAuthenticator
from simulators.key.base import PresenceMode, Request, UserPresence
from simulators.key.device import VirtualKey
from simulators.key.state import StateFileError
from simulators.key.transport import open_in_process_device

PIN = "4829-ward"
RP = {"id": "trust.nhs.example", "name": "Example Trust"}
ORIGIN = "https://trust.nhs.example"
ERR = CtapError.ERR


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PinUI(UserInteraction):
    def __init__(self, pin: str | None = PIN) -> None:
        self.pin = pin

    def request_pin(self, permissions, rp_id):
        return self.pin


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def app(tmp_path, clock):
    return VirtualAuthenticator(tmp_path / "key.json", UserPresence("auto"), clock=clock)


@pytest.fixture
def key(app):
    return VirtualKey(app, app.presence)


@pytest.fixture
def device(key):
    dev = open_in_process_device(key)
    yield dev
    dev.close()


@pytest.fixture
def ctap(device):
    return Ctap2(device)


def client(device, pin: str | None = PIN, **kw) -> Fido2Client:
    return Fido2Client(
        device,
        client_data_collector=DefaultClientDataCollector(ORIGIN),
        user_interaction=PinUI(pin),
        **kw,
    )


def register(device, *, rk=False, alg=None, uv="discouraged", pin=PIN, extensions=None,
             user=None, attestation="none"):
    server = Fido2Server(RP, attestation=attestation)
    options, state = server.register_begin(
        user or {"id": b"user-alice", "name": "alice", "displayName": "Dr Alice Smith"},
        resident_key_requirement="required" if rk else "discouraged",
        user_verification=uv,
    )
    public_key = dict(options.public_key)
    if alg is not None:
        public_key["pubKeyCredParams"] = [{"type": "public-key", "alg": alg}]
    if extensions:
        public_key["extensions"] = extensions
    result = client(device, pin).make_credential(public_key)
    return server, server.register_complete(state, result).credential_data, result


def authenticate(device, server, creds, *, allow=True, uv="discouraged", pin=PIN):
    options, state = server.authenticate_begin(creds if allow else None, user_verification=uv)
    response = client(device, pin).get_assertion(options.public_key).get_response(0)
    server.authenticate_complete(state, creds, response)
    return response


def raw(app, cmd: int, params: dict | bytes | None = None) -> tuple[int, object]:
    payload = bytes([cmd]) + (
        params if isinstance(params, bytes) else cbor.encode(params) if params is not None else b""
    )
    out = app.cbor(payload, Request())
    return out[0], (cbor.decode(out[1:]) if len(out) > 1 else None)


def power_cycle(key, device):
    device.close()
    key.power_cycle()
    return open_in_process_device(key)


# ---------------------------------------------------------------- getInfo and attestation
def test_get_info_claims_only_what_is_implemented(ctap):
    info = ctap.get_info()
    assert info.versions == ["U2F_V2", "FIDO_2_0", "FIDO_2_1"]
    assert set(info.extensions) == {"credProtect", "hmac-secret", "largeBlobKey", "minPinLength"}
    assert str(info.aaguid) == str(MODELS["ta-vk1"].aaguid)
    assert info.options["clientPin"] is False and info.options["credMgmt"] is True
    assert "uv" not in info.options and "bioEnroll" not in info.options
    assert info.options["largeBlobs"] is True and info.max_large_blob == 2048
    assert "ep" not in info.options
    assert info.pin_uv_protocols == [2, 1]
    assert {a["alg"] for a in info.algorithms} == {-7, -8}
    assert info.min_pin_length == 4 and info.remaining_disc_creds == 25


def test_packed_attestation_chains_to_the_simulator_root(device):
    _server, cred, result = register(device, attestation="direct")
    att: AttestationObject = result.response.attestation_object
    assert att.fmt == "packed"
    leaf = x509.load_der_x509_certificate(att.att_stmt["x5c"][0])
    root = root_certificate()
    root.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    aaguid_ext = leaf.extensions.get_extension_for_oid(OID_FIDO_AAGUID).value.value
    assert aaguid_ext == b"\x04\x10" + cred.aaguid
    leaf.public_key().verify(
        att.att_stmt["sig"], att.auth_data + result.response.client_data.hash,
        ec.ECDSA(hashes.SHA256()),
    )


# ---------------------------------------------------------------- credentials
@pytest.mark.parametrize("alg", [-7, -8])
@pytest.mark.parametrize("rk", [False, True])
def test_register_and_authenticate(device, alg, rk):
    server, cred, _ = register(device, rk=rk, alg=alg)
    assert cred.public_key[3] == alg
    response = authenticate(device, server, [cred])
    assert response.response.authenticator_data.flags & 0x01  # UP


def test_signature_counter_increases(device):
    server, cred, _ = register(device)
    counters = [
        authenticate(device, server, [cred]).response.authenticator_data.counter for _ in range(3)
    ]
    assert counters == sorted(counters) and len(set(counters)) == 3


def test_usernameless_login_with_discoverable_credentials(device, ctap):
    ClientPin(ctap).set_pin(PIN)
    server, alice, _ = register(device, rk=True, uv="required")
    _, bob, _ = register(device, rk=True, uv="required",
                         user={"id": b"user-bob", "name": "bob", "displayName": "Bob"})
    options, state = server.authenticate_begin(user_verification="required")
    selection = client(device).get_assertion(options.public_key)
    responses = selection.get_assertions()
    assert len(responses) == 2  # getNextAssertion delivered the second
    handles = {r.user["id"] for r in responses}
    assert handles == {b"user-alice", b"user-bob"}
    assert {r.user.get("name") for r in responses} == {"alice", "bob"}  # uv: names returned


def test_key_handle_is_bound_to_rp_and_device(device, tmp_path):
    server, cred, _ = register(device)
    other = Fido2Server({"id": "evil.example", "name": "Evil"})
    options, _ = other.authenticate_begin([cred], user_verification="discouraged")
    with pytest.raises(ClientError, match="DEVICE_INELIGIBLE"):
        Fido2Client(
            device,
            client_data_collector=DefaultClientDataCollector("https://evil.example"),
            user_interaction=PinUI(),
        ).get_assertion(options.public_key)
    second = VirtualKey(VirtualAuthenticator(tmp_path / "other.json"), UserPresence())
    dev2 = open_in_process_device(second)
    options, _ = server.authenticate_begin([cred], user_verification="discouraged")
    with pytest.raises(ClientError, match="DEVICE_INELIGIBLE"):
        client(dev2).get_assertion(options.public_key)


def test_exclude_list_refuses_a_second_enrolment(device):
    server, cred, _ = register(device)
    options, _ = server.register_begin({"id": b"user-alice", "name": "alice"}, [cred],
                                       user_verification="discouraged")
    with pytest.raises(ClientError, match="CREDENTIAL_EXCLUDED"):
        client(device).make_credential(options.public_key)


def test_capacity_full(tmp_path):
    app = VirtualAuthenticator(tmp_path / "k.json", capacity=2)
    dev = open_in_process_device(VirtualKey(app, app.presence))
    for i in range(2):
        register(dev, rk=True, user={"id": b"u%d" % i, "name": f"u{i}"})
    with pytest.raises(ClientError, match="KEY_STORE_FULL"):
        register(dev, rk=True, user={"id": b"u9", "name": "u9"})
    # the same user again replaces its credential rather than filling the store
    register(dev, rk=True, user={"id": b"u0", "name": "u0 again"})
    assert len(app.state.credentials) == 2


def test_cred_protect_hides_credentials_without_uv(device, ctap):
    ClientPin(ctap).set_pin(PIN)
    server, cred, result = register(device, rk=True, uv="required",
                                    extensions={"credentialProtectionPolicy":
                                                "userVerificationRequired"})
    assert result.response.attestation_object.auth_data.extensions == {"credProtect": 3}
    # Without UV the credential is invisible, even when named in allowCredentials
    options, _ = server.authenticate_begin([cred], user_verification="discouraged")
    app_client = client(device, pin=None)
    with pytest.raises(ClientError, match="DEVICE_INELIGIBLE"):
        app_client.get_assertion(options.public_key)
    authenticate(device, server, [cred], uv="required")


def test_deleted_discoverable_credential_no_longer_signs(device, ctap):
    ClientPin(ctap).set_pin(PIN)
    server, cred, _ = register(device, rk=True, uv="required")
    pin = ClientPin(ctap)
    token = pin.get_pin_token(PIN, ClientPin.PERMISSION.CREDENTIAL_MGMT)
    credman = CredentialManagement(ctap, pin.protocol, token)
    assert credman.get_metadata()[1] == 1
    credman.delete_cred({"id": cred.credential_id, "type": "public-key"})
    options, _ = server.authenticate_begin([cred], user_verification="discouraged")
    with pytest.raises(ClientError, match="DEVICE_INELIGIBLE"):
        client(device).get_assertion(options.public_key)


@pytest.mark.parametrize("protocol", [PinProtocolV1, PinProtocolV2])
def test_hmac_secret_is_stable_and_depends_on_uv(device, ctap, protocol, monkeypatch):
    monkeypatch.setattr(ClientPin, "PROTOCOLS", [protocol])  # negotiate only this protocol
    ClientPin(ctap).set_pin(PIN)
    ext = [HmacSecretExtension(allow_hmac_secret=True)]
    server = Fido2Server(RP)
    options, state = server.register_begin({"id": b"u", "name": "u"}, user_verification="required")
    result = client(device, extensions=ext).make_credential(
        {**options["publicKey"], "extensions": {"hmacCreateSecret": True}}
    )
    cred = server.register_complete(state, result).credential_data
    salt = os.urandom(32)

    def secret(uv: str, pin: str | None = PIN) -> bytes:
        opts, _ = server.authenticate_begin([cred], user_verification=uv)
        r = client(device, pin, extensions=ext).get_assertion(
            {**opts["publicKey"], "extensions": {"hmacGetSecret": {"salt1": salt}}}
        ).get_response(0)
        return r.client_extension_results.hmac_get_secret.output1

    with_uv = secret("required")
    assert secret("required") == with_uv
    assert secret("discouraged", None) != with_uv


# ---------------------------------------------------------------- PIN rules
def test_pin_lockout_sequence(key, device, ctap):
    ClientPin(ctap).set_pin(PIN)
    pin = ClientPin(ctap)
    expected = 8
    assert pin.get_pin_retries() == (8, False)
    for attempt in range(3):
        expected -= 1
        with pytest.raises(CtapError) as e:
            pin.get_pin_token("0000")
        assert e.value.code == (ERR.PIN_AUTH_BLOCKED if attempt == 2 else ERR.PIN_INVALID)
        assert pin.get_pin_retries()[0] == expected
    assert pin.get_pin_retries() == (5, True)  # powerCycleState
    with pytest.raises(CtapError, match="PIN_AUTH_BLOCKED"):
        pin.get_pin_token(PIN)  # even the right PIN, and no retry is spent
    assert pin.get_pin_retries()[0] == 5

    for _ in range(2):  # power cycles let us spend the rest
        device = power_cycle(key, device)
        pin = ClientPin(Ctap2(device))
        for _ in range(3 if expected > 2 else expected):
            expected -= 1
            with pytest.raises(CtapError):
                pin.get_pin_token("0000")
    assert expected == 0
    with pytest.raises(CtapError, match="PIN_BLOCKED"):
        pin.get_pin_token(PIN)
    device = power_cycle(key, device)
    pin = ClientPin(Ctap2(device))
    with pytest.raises(CtapError, match="PIN_BLOCKED"):
        pin.get_pin_token(PIN)  # survives power cycles: only reset helps
    Ctap2(device).reset()
    assert Ctap2(device).get_info().options["clientPin"] is False


def test_pin_policy(ctap, monkeypatch):
    pin = ClientPin(ctap)
    # python-fido2 refuses short PINs itself; pad without its check to reach the key's own.
    monkeypatch.setattr(fido2_pin, "_pad_pin", lambda p: p.encode().ljust(64, b"\0"))
    with pytest.raises(CtapError, match="PIN_POLICY_VIOLATION"):
        pin.set_pin("123")  # fewer than 4 code points
    monkeypatch.undo()
    pin.set_pin("£€¥₹")  # 4 code points, 11 bytes: counted in code points
    with pytest.raises(CtapError, match="NOT_ALLOWED"):
        pin.set_pin(PIN)  # setPIN only when no PIN is set
    pin.change_pin("£€¥₹", PIN)
    assert pin.get_pin_token(PIN)


def test_token_expires_and_power_cycle_clears_it(key, device, ctap, clock, app):
    pin = ClientPin(ctap)
    pin.set_pin(PIN)
    token = pin.get_pin_token(PIN, ClientPin.PERMISSION.CREDENTIAL_MGMT)
    CredentialManagement(ctap, pin.protocol, token).get_metadata()
    clock.now += 601  # beyond the maximum usage period
    with pytest.raises(CtapError, match="PIN_AUTH_INVALID"):
        CredentialManagement(ctap, pin.protocol, token).get_metadata()
    token = pin.get_pin_token(PIN, ClientPin.PERMISSION.CREDENTIAL_MGMT)
    device = power_cycle(key, device)
    ctap = Ctap2(device)
    with pytest.raises(CtapError, match="PIN_AUTH_INVALID"):
        CredentialManagement(ctap, pin.protocol, token).get_metadata()


def test_permissions_and_rp_binding(ctap, device):
    pin = ClientPin(ctap)
    pin.set_pin(PIN)
    server, cred, _ = register(device)
    token = pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, "other.example")
    with pytest.raises(CtapError, match="PIN_AUTH_INVALID"):
        CredentialManagement(ctap, pin.protocol, token).get_metadata()  # no cm permission
    cdh = os.urandom(32)
    allow = [{"type": "public-key", "id": cred.credential_id}]
    with pytest.raises(CtapError, match="PIN_AUTH_INVALID"):  # token bound to another RP
        ctap.get_assertion(RP["id"], cdh, allow, None, None,
                           pin.protocol.authenticate(token, cdh), pin.protocol.VERSION)
    token = pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, RP["id"])
    assertion = ctap.get_assertion(RP["id"], cdh, allow, None, None,
                                   pin.protocol.authenticate(token, cdh), pin.protocol.VERSION)
    assert assertion.auth_data.flags & 0x05 == 0x05  # UP and UV
    with pytest.raises(CtapError, match="PIN_AUTH_INVALID"):  # permissions spent by the use
        ctap.get_assertion(RP["id"], cdh, allow, None, None,
                           pin.protocol.authenticate(token, cdh), pin.protocol.VERSION)


# ---------------------------------------------------------------- reset
def test_reset_only_within_ten_seconds_and_with_a_touch(key, device, ctap, clock, app):
    register(device, rk=True)
    clock.now += 10.5
    with pytest.raises(CtapError, match="NOT_ALLOWED"):
        ctap.reset()
    device = power_cycle(key, device)
    app.presence.set_mode(PresenceMode.DENY)
    with pytest.raises(CtapError, match="OPERATION_DENIED"):
        Ctap2(device).reset()
    app.presence.set_mode(PresenceMode.AUTO)
    old_ids = [c.id for c in app.state.credentials]
    Ctap2(device).reset()
    assert app.state.credentials == [] and old_ids


def test_reset_invalidates_key_handles(device, ctap):
    server, cred, _ = register(device)
    ctap.reset()
    options, _ = server.authenticate_begin([cred], user_verification="discouraged")
    with pytest.raises(ClientError, match="DEVICE_INELIGIBLE"):
        client(device).get_assertion(options.public_key)


# ---------------------------------------------------------------- user presence
def test_denied_and_timed_out_presence(tmp_path):
    presence = UserPresence("deny", timeout=0.3)
    app = VirtualAuthenticator(None, presence)
    dev = open_in_process_device(VirtualKey(app, presence))
    with pytest.raises(ClientError) as e:
        register(dev)
    assert e.value.cause.code == ERR.OPERATION_DENIED
    presence.set_mode("never")
    with pytest.raises(ClientError) as e:
        register(dev)
    assert e.value.cause.code == ERR.USER_ACTION_TIMEOUT


def test_manual_touch_completes_a_waiting_request():
    presence = UserPresence("manual", timeout=5)
    app = VirtualAuthenticator(None, presence)
    dev = open_in_process_device(VirtualKey(app, presence))
    seen = []

    def on_keepalive(status):
        seen.append(status)
        if status == 2 and len(seen) == 1:
            threading.Timer(0.05, presence.touch).start()

    Ctap2(dev).selection(on_keepalive=on_keepalive)
    assert seen[0] == 2  # UPNEEDED came first


# ---------------------------------------------------------------- malformed input
def test_malformed_cbor_and_parameters(app):
    assert raw(app, 0x01, b"\xa1\x01")[0] == ERR.INVALID_CBOR  # truncated map
    assert raw(app, 0x01, b"\x01")[0] == ERR.CBOR_UNEXPECTED_TYPE  # not a map
    assert raw(app, 0x42)[0] == ERR.INVALID_COMMAND
    assert raw(app, 0x01, {1: b"x" * 32})[0] == ERR.MISSING_PARAMETER
    assert raw(app, 0x01, {1: "not bytes", 2: {}, 3: {}, 4: []})[0] == ERR.CBOR_UNEXPECTED_TYPE
    good = {1: b"\0" * 32, 2: {"id": "a.example"}, 3: {"id": b"u"}}
    assert raw(app, 0x01, {**good, 4: [{"type": "public-key", "alg": -257}]})[0] == \
        ERR.UNSUPPORTED_ALGORITHM
    ok_params = [{"type": "public-key", "alg": -7}]
    assert raw(app, 0x01, {**good, 4: ok_params, 7: {"up": False}})[0] == ERR.INVALID_OPTION
    assert raw(app, 0x01, {**good, 4: ok_params, 7: {"uv": True}})[0] == ERR.INVALID_OPTION
    assert raw(app, 0x01, {**good, 4: ok_params, 8: b"x" * 16})[0] == ERR.MISSING_PARAMETER
    assert raw(app, 0x01, {**good, 4: ok_params, 8: b"x" * 16, 9: 3})[0] == ERR.INVALID_PARAMETER
    assert raw(app, 0x02, {1: "a.example", 2: b"\0" * 32, 3: [{"id": 1}]})[0] == \
        ERR.MISSING_PARAMETER
    assert raw(app, 0x06, {1: 2, 2: 0x20})[0] == ERR.INVALID_SUBCOMMAND
    assert raw(app, 0x06, {1: 2, 2: 3, 3: {1: 2, -1: 1, -2: b"\0" * 32, -3: b"\0" * 32},
                           4: b"", 5: b""})[0] == ERR.INVALID_PARAMETER  # point not on curve
    assert raw(app, 0x08)[0] == ERR.NOT_ALLOWED  # getNextAssertion with nothing pending
    assert raw(app, 0x0A, {1: 1})[0] == ERR.PUAT_REQUIRED
    status, info = raw(app, 0x04)
    assert status == 0 and info[3] == MODELS["ta-vk1"].aaguid.bytes


# ---------------------------------------------------------------- persistence
def test_state_survives_restart_and_is_private(tmp_path):
    path = tmp_path / "key.json"
    app = VirtualAuthenticator(path)
    dev = open_in_process_device(VirtualKey(app, app.presence))
    ClientPin(Ctap2(dev)).set_pin(PIN)
    server, cred, _ = register(dev, rk=True, uv="required")
    counter = app.state.counter
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert PIN not in path.read_text()

    again = VirtualAuthenticator(path)  # a restarted simulator
    dev2 = open_in_process_device(VirtualKey(again, again.presence))
    assert Ctap2(dev2).get_info().options["clientPin"] is True
    response = authenticate(dev2, server, [cred], allow=False, uv="required")
    assert response.response.authenticator_data.counter > counter


def test_corrupt_state_file_is_a_clear_error(tmp_path):
    path = tmp_path / "key.json"
    path.write_text("{not json")
    with pytest.raises(StateFileError, match="cannot read"):
        VirtualAuthenticator(path)
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(StateFileError, match="unsupported state format"):
        VirtualAuthenticator(path)


def test_interrupted_save_keeps_the_old_state(tmp_path, monkeypatch):
    path = tmp_path / "key.json"
    app = VirtualAuthenticator(path)
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    app.state.counter += 5
    with pytest.raises(OSError):
        app.store.save()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["key.json"]  # no temporary left behind


# ---------------------------------------------------------------- CTAP1 / U2F
def test_u2f_register_and_authenticate(device):
    u2f = Ctap1(device)
    assert u2f.get_version() == "U2F_V2"
    app_param, challenge = os.urandom(32), os.urandom(32)
    reg = u2f.register(challenge, app_param)
    reg.verify(app_param, challenge)
    with pytest.raises(ApduError) as e:
        u2f.authenticate(challenge, app_param, reg.key_handle, check_only=True)
    assert e.value.code == 0x6985  # known handle
    with pytest.raises(ApduError) as e:
        u2f.authenticate(challenge, os.urandom(32), reg.key_handle)
    assert e.value.code == 0x6A80  # another app's handle
    sig = u2f.authenticate(challenge, app_param, reg.key_handle)
    sig.verify(app_param, challenge, reg.public_key)


def test_zero_length_pin_auth_probe(app, ctap):
    """Platforms send an empty pinUvAuthParam to make the user pick a key (CTAP 2.1 6.1.2)."""
    probe = {1: b"\0" * 32, 2: {"id": "a.example"}, 3: {"id": b"u"},
             4: [{"type": "public-key", "alg": -7}], 8: b"", 9: 2}
    assert raw(app, 0x01, probe)[0] == ERR.PIN_NOT_SET
    ClientPin(ctap).set_pin(PIN)
    assert raw(app, 0x01, probe)[0] == ERR.PIN_INVALID
    assert raw(app, 0x02, {1: "a.example", 2: b"\0" * 32, 6: b"", 7: 1})[0] == ERR.PIN_INVALID
    app.presence.set_mode("deny")
    assert raw(app, 0x01, probe)[0] == ERR.OPERATION_DENIED  # the touch comes first
