"""Enrol a key and log in with it (token_agent.ceremonies.key), against the virtual key through
python-fido2's HID framing, with a real SQLite store: the happy paths and every bad input."""

from __future__ import annotations

import dataclasses
import shutil
import threading

import pytest
from cryptography.hazmat.primitives import serialization

from drivers.fido import errors as key_errors
from drivers.fido.keys import FidoKey
from simulators.key.attestation import root_certificate
from simulators.key.transport import open_in_process_device
from token_agent import settings as org
from token_agent.ceremonies.key import EnrolError, KeySettings, enrol_key, login_with_key
from token_agent.ceremonies.keypresence import PinGuard
from token_agent.outcome import Factor, Reason
from token_agent.store import Store

from key_helpers import PIN, Keyring

@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "store.db") as s:
        s.add_user("alice", display_name="Dr Alice Smith", roles=["clinician"])
        s.add_user("bob", display_name="Bob Jones")
        yield s


@pytest.fixture
def keys(tmp_path):
    return Keyring(tmp_path)


def pin(value=PIN):
    return lambda: value


def enrol(store, key, user="alice", **kw):
    return enrol_key(store, key, user, pin_provider=kw.pop("pin_provider", pin()), **kw)


def login(store, key, user="alice", **kw):
    return login_with_key(store, key, username=user, pin_provider=kw.pop("pin_provider", pin()),
                          **kw)


def events(store, kind):
    return [e for e in store.list_events(kind=kind)]


# ---------------------------------------------------------------- happy paths
def test_enrol_then_login_with_pin_is_multi_factor(store, keys):
    _, key, _ = keys.new()
    result = enrol(store, key, name="blue key")
    assert result.discoverable and result.user_verified and result.name == "blue key"
    assert not result.attestation_trusted and result.warnings  # no trust list configured
    stored = store.list_fido_credentials(store.get_user("alice").id)
    assert [c.name for c in stored] == ["blue key"]

    outcome = login(store, key)
    assert outcome.ok and outcome.user == "alice" and outcome.credential == "blue key"
    assert outcome.factors == (Factor.POSSESSION, Factor.KNOWLEDGE) and outcome.multi_factor
    after = store.get_fido_credential(result.credential_id)
    assert after.sign_count == outcome.detail["sign_count"] > stored[0].sign_count
    assert after.last_used_at is not None
    assert [e.outcome for e in events(store, "login.key")] == ["success"]


def test_usernameless_tap_and_go(store, keys):
    _, key, _ = keys.new()
    enrol(store, key)
    outcome = login_with_key(store, key, pin_provider=pin())
    assert outcome.ok and outcome.user == "alice"


def test_without_uv_a_key_is_one_factor(store, keys):
    store.set_setting("user_verification", "discouraged")
    _, key, _ = keys.new(pin=None)
    result = enrol(store, key)
    assert not result.user_verified
    outcome = login(store, key, pin_provider=lambda: None)
    assert outcome.ok and outcome.factors == (Factor.POSSESSION,) and not outcome.multi_factor


def test_uv_required_policy_refuses_a_key_without_pin(store, keys):
    store.set_setting("user_verification", "required")
    _, key, _ = keys.new(pin=None)
    with pytest.raises(key_errors.PinNotSet, match="Set a PIN"):  # no way to verify the user
        enrol(store, key, pin_provider=lambda: None)
    assert store.list_fido_credentials() == []


def test_backup_key_and_exclude_list(store, keys):
    _, key1, _ = keys.new()
    _, key2, _ = keys.new()
    enrol(store, key1, name="main")
    enrol(store, key2, name="backup")
    with pytest.raises(key_errors.CredentialExcluded, match="already registered"):
        enrol(store, key1, name="again")  # already enrolled: the exclude list stops it
    assert login(store, key2).credential == "backup"
    with pytest.raises(EnrolError) as e:
        enrol(store, key2, name="main")
    assert e.value.reason == "name-taken"


def test_attestation_trust_list(store, keys):
    other = keys.new()[1]
    org.add_allowed_aaguid(store, "00000000-0000-0000-0000-000000000001")
    with pytest.raises(EnrolError) as e:
        enrol(store, other)
    assert e.value.reason == "untrusted-key"
    assert store.list_fido_credentials() == []  # nothing written
    org.add_trusted_root(store, root_certificate().public_bytes(serialization.Encoding.PEM))
    assert enrol(store, other).attestation_trusted


def test_one_store_many_workstations(store, keys, tmp_path):
    """The RP ID is the organisation's: a second agent on the same store accepts the key."""
    _, key, _ = keys.new()
    enrol(store, key)
    with Store.open(tmp_path / "store.db") as other_workstation:
        assert login(other_workstation, key).ok


# ---------------------------------------------------------------- bad input
def test_unknown_user(store, keys):
    _, key, _ = keys.new()
    outcome = login(store, key, user="mallory")
    assert not outcome.ok and outcome.reason is Reason.UNKNOWN_USER
    assert events(store, "login.key")[0].outcome == "failure"


def test_no_key_enrolled(store, keys):
    _, key, _ = keys.new()
    assert login(store, key, user="bob").reason is Reason.NO_CREDENTIAL


def test_unknown_or_deleted_credential(store, keys):
    _, key, _ = keys.new()
    enrol(store, key)
    alice = store.get_user("alice")
    store.remove_fido_credential(alice.id, "key 1")
    assert login(store, key).reason is Reason.NO_CREDENTIAL
    assert login_with_key(store, key, pin_provider=pin()).reason is Reason.UNKNOWN_CREDENTIAL
    # enrolled here, but wiped from the key
    enrol(store, key)
    credential_id = store.list_fido_credentials(alice.id)[0].credential_id
    key.delete_credential(PIN, credential_id)
    assert login(store, key).reason is Reason.UNKNOWN_CREDENTIAL


def test_another_users_key(store, keys):
    _, key_a, _ = keys.new()
    _, key_b, _ = keys.new()
    enrol(store, key_a, user="alice")
    enrol(store, key_b, user="bob")
    outcome = login(store, key_b, user="alice")  # bob's key offered for alice
    assert not outcome.ok and outcome.reason is Reason.UNKNOWN_CREDENTIAL


def test_wrong_rp_id(store, keys):
    _, key, _ = keys.new()
    enrol(store, key)
    store.set_setting("rp_id", "other-trust.nhs.example")
    assert login(store, key).reason is Reason.NO_CREDENTIAL
    settings = KeySettings.from_store(store)
    # the key's credential is scoped to the old RP ID: the key finds nothing for the new one
    assert login_with_key(store, key, pin_provider=pin(), settings=settings).reason is \
        Reason.UNKNOWN_CREDENTIAL


def test_tampered_signature_is_refused(store, keys, monkeypatch):
    _, key, _ = keys.new()
    result = enrol(store, key)
    real = FidoKey.assert_credentials

    def tampered(self, **kw):
        responses = real(self, **kw)
        sig = bytearray(responses[0].signature)
        sig[-1] ^= 0x01
        return [dataclasses.replace(responses[0], signature=bytes(sig))]

    monkeypatch.setattr(FidoKey, "assert_credentials", tampered)
    before = store.get_fido_credential(result.credential_id).sign_count
    outcome = login(store, key)
    assert outcome.reason is Reason.VERIFICATION_FAILED
    assert store.get_fido_credential(result.credential_id).sign_count == before  # not written


def test_cloned_key_is_detected_and_suspended(store, keys, tmp_path):
    vkey, key, path = keys.new()
    enrol(store, key)
    clone_file = tmp_path / "clone.json"
    shutil.copy(path, clone_file)  # an attacker copies the key's secrets
    assert login(store, key).ok and login(store, key).ok  # the genuine key moves on
    _, clone, _ = keys.new(state=clone_file)
    outcome = login(store, clone)
    assert outcome.reason is Reason.CLONE_SUSPECTED and "cloned" in outcome.message
    cred = store.list_fido_credentials(store.get_user("alice").id)[0]
    assert cred.flagged and "counter" in cred.flag_reason
    assert [e.outcome for e in events(store, "key.clone-suspected")] == ["refused"]
    # from now on even the genuine key is refused until an administrator clears the flag
    assert login(store, key).reason is Reason.CREDENTIAL_FLAGGED


def test_key_pulled_out_mid_login(store, keys):
    vkey, key, _ = keys.new(presence="manual")
    vkey.presence.set_mode("auto")
    result = enrol(store, key)
    vkey.presence.set_mode("manual")
    before = store.get_fido_credential(result.credential_id)
    outcome = login(store, key, on_touch=vkey.unplug)  # pulled out while it asks for a touch
    assert outcome.reason is Reason.DEVICE_REMOVED
    assert store.get_fido_credential(result.credential_id) == before


def test_touch_timeout(store, keys):
    vkey, key, _ = keys.new()
    enrol(store, key)
    vkey.presence.set_mode("never")
    # the login service (trusted): the PIN goes first, then the assertion's touch times out
    outcome = login(store, key, timeout=0.5, presence=PinGuard(trusted=True))
    assert outcome.reason is Reason.TIMEOUT
    # anyone else must touch before the PIN is tried (ceremonies/keypresence.py)
    outcome = login(store, key, timeout=0.5)
    assert outcome.reason is Reason.PRESENCE_REQUIRED


def test_cancel(store, keys):
    vkey, key, _ = keys.new()
    enrol(store, key)
    vkey.presence.set_mode("manual")
    cancel = threading.Event()
    outcome = login(store, key, on_touch=cancel.set, cancel=cancel)
    assert outcome.reason is Reason.CANCELLED


def test_wrong_pin_down_to_blocked(store, keys):
    vkey, key, _ = keys.new()
    enrol(store, key)
    outcomes = [login(store, key, pin_provider=pin("000000")) for _ in range(3)]
    assert [o.reason for o in outcomes] == [Reason.WRONG_PIN, Reason.WRONG_PIN,
                                            Reason.PIN_AUTH_BLOCKED]
    assert "7 tries left" in outcomes[0].message and "6 tries left" in outcomes[1].message
    for _ in range(2):
        vkey.power_cycle()
        key = FidoKey(open_in_process_device(vkey))
        for _ in range(3):
            last = login(store, key, pin_provider=pin("000000"))
            if last.reason is Reason.PIN_BLOCKED:
                break
    assert last.reason is Reason.PIN_BLOCKED
    assert login(store, key).reason is Reason.PIN_BLOCKED  # even the right PIN
