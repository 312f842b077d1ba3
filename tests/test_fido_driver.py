"""The FIDO2 driver layer (drivers.fido.keys, drivers.fido.errors) against the virtual key:
in-process (python-fido2's CtapHidDevice over the key's handle) and over TCP where the
transport matters (discovery, a key pulled out). Touches come from the test when the driver's
on_touch callback fires, so nothing waits on a sleep."""

from __future__ import annotations

import errno
import os
import json
import logging
import threading
import time
from dataclasses import replace

import pytest
from fido2.client import ClientError, PinRequiredError
from fido2.ctap import CtapError
from fido2.hid import ConnectionFailure
from fido2.server import Fido2Server

from drivers.fido import errors, keys
from drivers.fido.errors import (
    Cancelled,
    CredentialExcluded,
    FidoKeyError,
    KeyCommunicationError,
    KeyRemoved,
    NoCredentials,
    NoKeyFound,
    PinAlreadySet,
    PinAuthBlocked,
    PinBlocked,
    PinNotSet,
    PinPolicyViolation,
    PinRequired,
    ResetNotAllowed,
    TouchTimeout,
    WrongPin,
    translate,
)
from drivers.fido.keys import FidoKey, KeyInfo, list_keys, open_single_key, select_key
from drivers.fido.sim import SIM_PRODUCT_NAME
from simulators.key import KeyServer, open_in_process_device
from simulators.key.attestation import MODELS
from simulators.key.authenticator import VirtualAuthenticator
from simulators.key.base import Presence, UserPresence
from simulators.key.control import KeyControl
from simulators.key.device import VirtualKey

PIN = "4829-ward"
RP = {"id": "trust.nhs.example", "name": "Example Trust"}
ORIGIN = "https://trust.nhs.example"
ALICE = {"id": b"user-alice", "name": "alice", "displayName": "Dr Alice Smith"}
BOB = {"id": b"user-bob", "name": "bob", "displayName": "Dr Bob Jones"}
AAGUID = str(MODELS["ta-vk1"].aaguid)
ERR = CtapError.ERR

#: generous bound for "quickly": the operations under test take milliseconds
QUICK = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_key(virtual_key_factory):
    """``make_key(presence="auto", **kw)``: an in-process virtual key (the pytest plugin's
    ``virtual_key_factory``); all closed at the end."""
    return lambda presence="auto", **kw: virtual_key_factory(presence=presence, **kw)


@pytest.fixture
def open_key():
    """``open_key(virtual_key) -> FidoKey`` over the in-process connection; closed at the end."""
    opened: list[FidoKey] = []

    def open_(key) -> FidoKey:
        fk = FidoKey(open_in_process_device(key))
        opened.append(fk)
        return fk

    yield open_
    for fk in opened:
        fk.close()


def power_cycle(key, fk: FidoKey) -> FidoKey:
    """Reboot the key (its channels are forgotten) and open it again."""
    fk.close()
    key.power_cycle()
    return FidoKey(open_in_process_device(key))


class Toucher:
    """An on_touch callback that records its calls, checks the key really waits for a touch,
    and touches it from another thread (as the user would, after reading the prompt)."""

    def __init__(self, key, action=None) -> None:
        self.key = key
        self.calls = 0
        self.key_was_waiting: list[bool] = []
        self.action = action or key.presence.touch
        self.threads: list[threading.Thread] = []

    def __call__(self) -> None:
        self.calls += 1
        self.key_was_waiting.append(bool(self.key.presence.waiting))
        t = threading.Thread(target=self.action)
        t.start()
        self.threads.append(t)

    def join(self) -> None:
        for t in self.threads:
            t.join(QUICK)


def never_touch() -> None:
    raise AssertionError("on_touch called although the key did not ask for a touch")


def register(fk: FidoKey, server: Fido2Server, user=ALICE, *, rk=True, uv="discouraged",
             pin=PIN, on_touch=None, exclude=None, **kw):
    options, state = server.register_begin(
        user,
        credentials=exclude,
        resident_key_requirement="required" if rk else "discouraged",
        user_verification=uv,
    )
    response = fk.make_credential(
        options.public_key, origin=ORIGIN, pin_provider=lambda: pin, on_touch=on_touch, **kw
    )
    return server.register_complete(state, response).credential_data


def authenticate(fk: FidoKey, server: Fido2Server, creds, *, allow=True, uv="discouraged",
                 pin=PIN, on_touch=None, **kw):
    options, state = server.authenticate_begin(creds if allow else None, user_verification=uv)
    responses = fk.get_assertion(
        options.public_key, origin=ORIGIN, pin_provider=lambda: pin, on_touch=on_touch, **kw
    )
    for response in responses:
        server.authenticate_complete(state, creds, response)
    return responses


# ---------------------------------------------------------------- errors: messages and translate
def test_wrong_pin_messages_count_tries_in_plain_words():
    assert WrongPin(3).message == "Wrong PIN — 3 tries left"
    assert str(WrongPin(1)) == "Wrong PIN — 1 try left"
    assert WrongPin(1).retries_left == 1 and WrongPin(1).ctap_code == 0x31
    assert str(WrongPin(None)) == "Wrong PIN."
    assert str(TouchTimeout(30)) == "No touch within 30 seconds."
    assert str(TouchTimeout(0.5)) == "No touch within 0.5 seconds."
    assert str(TouchTimeout(1)) == "No touch within 1 second."
    assert str(NoKeyFound()) == "No security key found. Insert your key and try again."
    assert "10 seconds" in str(ResetNotAllowed()) and "insert it again" in str(ResetNotAllowed())
    assert str(CredentialExcluded()) == "This key is already registered for this account."
    assert "at least 6 characters" in str(PinPolicyViolation(6))
    for cls in (KeyRemoved, Cancelled, PinAuthBlocked, PinBlocked, PinNotSet, PinRequired,
                NoCredentials, KeyCommunicationError, errors.OperationDenied,
                errors.KeyStoreFull, errors.UnsupportedKey):
        e = cls()
        assert isinstance(e, FidoKeyError) and e.message.endswith(".") and e.ctap_code is None
    json.dumps(WrongPin(2).to_json())
    assert WrongPin(2).to_json()["retries_left"] == 2
    assert WrongPin(2).to_json()["error"] == "wrong_pin"


@pytest.mark.parametrize(
    "code, cls",
    [
        (ERR.PIN_BLOCKED, PinBlocked),
        (ERR.PIN_AUTH_BLOCKED, PinAuthBlocked),
        (ERR.PIN_NOT_SET, PinNotSet),
        (ERR.PUAT_REQUIRED, PinRequired),
        (ERR.PIN_POLICY_VIOLATION, PinPolicyViolation),
        (ERR.OPERATION_DENIED, errors.OperationDenied),
        (ERR.CREDENTIAL_EXCLUDED, CredentialExcluded),
        (ERR.NO_CREDENTIALS, NoCredentials),
        (ERR.KEY_STORE_FULL, errors.KeyStoreFull),
        (ERR.KEEPALIVE_CANCEL, Cancelled),
        (ERR.USER_ACTION_TIMEOUT, TouchTimeout),
        (ERR.UNSUPPORTED_ALGORITHM, errors.UnsupportedKey),
        (ERR.UNSUPPORTED_OPTION, errors.UnsupportedKey),
        (ERR.INVALID_CBOR, KeyCommunicationError),
        (ERR.INVALID_COMMAND, KeyCommunicationError),
        (ERR.OTHER, KeyCommunicationError),
        (0xF3, KeyCommunicationError),  # vendor code python-fido2 does not name
    ],
)
def test_translate_ctap_codes(code, cls):
    for exc in (CtapError(code), ClientError(ClientError.ERR.BAD_REQUEST, CtapError(code))):
        e = translate(exc)
        assert type(e) is cls and e.ctap_code == code


def test_translate_pin_invalid_uses_the_retries_given():
    assert translate(CtapError(ERR.PIN_INVALID), retries=5).message == "Wrong PIN — 5 tries left"
    assert type(translate(CtapError(ERR.PIN_INVALID), retries=0)) is PinBlocked
    assert type(translate(CtapError(ERR.NOT_ALLOWED))) is FidoKeyError  # context decides
    assert translate(CtapError(ERR.PIN_POLICY_VIOLATION), min_pin_length=8).min_length == 8
    assert translate(CtapError(ERR.USER_ACTION_TIMEOUT), timeout=30).seconds == 30


def test_translate_client_and_os_errors():
    assert type(translate(PinRequiredError())) is PinRequired
    assert type(translate(ClientError(ClientError.ERR.TIMEOUT))) is TouchTimeout
    assert type(translate(ClientError(ClientError.ERR.DEVICE_INELIGIBLE))) is NoCredentials
    unconfigured = ClientError(
        ClientError.ERR.CONFIGURATION_UNSUPPORTED, "User verification not configured/supported"
    )
    assert type(translate(unconfigured)) is PinNotSet
    # what a removed key raises: hidraw ENODEV (and the in-process simulator), the TCP socket
    assert type(translate(OSError(errno.ENODEV, "no device"))) is KeyRemoved
    assert type(translate(ConnectionResetError(errno.ECONNRESET, "reset"))) is KeyRemoved
    assert type(translate(ConnectionFailure("Wrong channel"))) is KeyCommunicationError
    assert type(translate(TimeoutError())) is KeyCommunicationError
    assert "permission" in str(translate(PermissionError(errno.EACCES, "denied")))
    assert type(translate(ValueError("bad CBOR"))) is KeyCommunicationError
    already = Cancelled()
    assert translate(already) is already


# ---------------------------------------------------------------- discovery and info
def test_list_keys_finds_a_simulator_through_the_environment(make_key):
    key = make_key()
    with KeyServer(key, port=0, control_port=None) as server:
        environ = {"TOKEN_AGENT_SIM_KEYS": f"127.0.0.1:{server.port}"}
        found = [k for k in list_keys(environ) if k.is_simulator]
        assert len(found) == 1
        info = found[0]
        assert isinstance(info, KeyInfo)
        assert info.path == f"sim:127.0.0.1:{server.port}"
        assert info.product == SIM_PRODUCT_NAME
        assert info.aaguid == AAGUID
        assert info.versions == ["U2F_V2", "FIDO_2_0", "FIDO_2_1"]
        assert set(info.extensions) == {
            "credProtect", "hmac-secret", "largeBlobKey", "minPinLength"
        }
        assert info.options["clientPin"] is False and info.options["credMgmt"] is True
        assert info.algorithms == [-7, -8]
        assert info.pin_set is False and info.pin_retries is None
        assert info.min_pin_length == 4 and info.remaining_discoverable == 25
        assert info.supports_selection and info.is_simulator
        assert info.firmware_version
        data = info.to_json()
        assert json.loads(json.dumps(data)) == data
        assert data["aaguid"] == AAGUID and data["is_simulator"] is True

        with FidoKey.open(discovery_descriptor(environ)) as fk:
            fk.set_pin(PIN)
        (info,) = [k for k in list_keys(environ) if k.is_simulator]
        assert info.pin_set is True and info.pin_retries == 8


def discovery_descriptor(environ):
    from drivers.fido.discovery import list_descriptors

    (descriptor,) = [d for d in list_descriptors(environ) if str(d.path).startswith("sim:")]
    return descriptor


def test_list_keys_skips_a_failing_key_and_an_absent_one(make_key, caplog, free_port):
    good, bad = make_key(), make_key()
    with KeyServer(good, port=0, control_port=None) as s1, \
            KeyServer(bad, port=0, control_port=None) as s2:
        addresses = [f"127.0.0.1:{p}" for p in (s1.port, s2.port, free_port())]
        environ = {"TOKEN_AGENT_SIM_KEYS": ",".join(addresses)}
        bad.set_faults(fail_next=1, fail_status=0x7F)  # its getInfo fails
        with caplog.at_level(logging.WARNING, logger="drivers.fido.keys"):
            found = [k.path for k in list_keys(environ) if k.is_simulator]
        assert found == [f"sim:127.0.0.1:{s1.port}"]
        assert f"127.0.0.1:{s2.port}" in caplog.text


def test_info_of_an_in_process_key(make_key, open_key):
    fk = open_key(make_key())
    info = fk.info()
    assert info.path.startswith("inproc:") and info.is_simulator
    with pytest.raises(PinNotSet):  # the simulator answers getPINRetries only with a PIN
        fk.pin_retries()


# ---------------------------------------------------------------- PIN
def test_set_change_pin_and_retries(make_key, open_key):
    key = make_key()
    fk = open_key(key)
    with pytest.raises(PinNotSet):
        fk.change_pin(PIN, "new-pin-1")
    with pytest.raises(PinPolicyViolation) as short:
        fk.set_pin("123")
    assert short.value.min_length == 4 and "at least 4 characters" in str(short.value)
    with pytest.raises(PinPolicyViolation):
        fk.set_pin("x" * 64)
    fk.set_pin(PIN)
    info = fk.info()
    assert info.pin_set and info.pin_retries == 8 and fk.pin_retries() == 8
    with pytest.raises(PinAlreadySet):
        fk.set_pin("another-pin")

    fk.change_pin(PIN, "new-pin-1")
    with pytest.raises(WrongPin):
        fk.change_pin(PIN, "new-pin-2")  # the old PIN is no longer the PIN
    assert fk.pin_retries() == 7
    fk.change_pin("new-pin-1", PIN)  # a right PIN restores the retries
    assert fk.pin_retries() == 8


def test_wrong_pins_down_to_pin_auth_blocked_and_pin_blocked(make_key, open_key):
    key = make_key()
    fk = open_key(key)
    fk.set_pin(PIN)
    seen = []

    def attempt():
        with pytest.raises(FidoKeyError) as e:
            fk.change_pin("wrong-pin", "new-pin-1")
        seen.append(str(e.value))
        return e.value

    assert isinstance(attempt(), WrongPin) and seen[-1] == "Wrong PIN — 7 tries left"
    assert attempt().retries_left == 6
    assert isinstance(attempt(), PinAuthBlocked)  # third in a row
    assert "remove the key, insert it again" in seen[-1]
    assert isinstance(attempt(), PinAuthBlocked)  # still, until a power cycle
    assert fk.pin_retries() == 5

    fk = power_cycle(key, fk)
    assert attempt().retries_left == 4
    assert attempt().retries_left == 3
    assert isinstance(attempt(), PinAuthBlocked)
    fk = power_cycle(key, fk)
    assert attempt().message == "Wrong PIN — 1 try left"
    blocked = attempt()
    assert isinstance(blocked, PinBlocked) and "can only be reset" in str(blocked)
    fk = power_cycle(key, fk)
    with pytest.raises(PinBlocked):
        fk.change_pin(PIN, "new-pin-1")  # even the right PIN
    assert fk.info().pin_retries == 0
    fk.close()


def test_wrong_pin_in_get_assertion_says_tries_left(make_key, open_key):
    fk = open_key(make_key())
    fk.set_pin(PIN)
    server = Fido2Server(RP)
    cred = register(fk, server, uv="required")
    with pytest.raises(WrongPin) as e:
        authenticate(fk, server, [cred], uv="required", pin="not-the-pin")
    assert e.value.retries_left == 7 and e.value.ctap_code == ERR.PIN_INVALID
    authenticate(fk, server, [cred], uv="required")


def test_pin_required_when_the_provider_gives_none(make_key, open_key):
    fk = open_key(make_key())
    fk.set_pin(PIN)
    server = Fido2Server(RP)
    with pytest.raises(PinRequired):
        register(fk, server, uv="required", pin=None)
    with pytest.raises(PinRequired):
        register(fk, server, uv="required", pin="")
    assert fk.pin_retries() == 8  # nothing was tried
    with pytest.raises(PinRequired):
        fk.list_credentials("")


def test_uv_required_on_a_key_without_pin_says_set_a_pin(make_key, open_key):
    fk = open_key(make_key())
    with pytest.raises(PinNotSet):
        register(fk, Fido2Server(RP), uv="required")


# ---------------------------------------------------------------- credentials
def test_list_and_delete_credentials(make_key, open_key):
    fk = open_key(make_key())
    fk.set_pin(PIN)
    server = Fido2Server(RP)
    alice = register(fk, server, ALICE)
    bob = register(fk, server, BOB)

    creds = fk.list_credentials(PIN)
    assert {c.user_name for c in creds} == {"alice", "bob"}
    by_user = {c.user_name: c for c in creds}
    a = by_user["alice"]
    assert a.rp_id == RP["id"] and a.rp_name == RP["name"]
    assert a.user_id == ALICE["id"] and a.display_name == ALICE["displayName"]
    assert a.credential_id == alice.credential_id
    assert a.public_key[3] == -7 and a.public_key == dict(alice.public_key)
    assert a.cred_protect in (None, 1)
    assert json.dumps(a.to_json())

    fk.delete_credential(PIN, bob.credential_id)
    assert [c.user_name for c in fk.list_credentials(PIN)] == ["alice"]
    with pytest.raises(NoCredentials) as gone:
        fk.delete_credential(PIN, bob.credential_id)
    assert "no such sign-in" in str(gone.value)
    with pytest.raises(WrongPin) as wrong:
        fk.list_credentials("not-the-pin")
    assert wrong.value.retries_left == 7
    assert fk.info().remaining_discoverable == 24


def test_list_credentials_needs_a_pin_set(make_key, open_key):
    fk = open_key(make_key())
    with pytest.raises(PinNotSet):
        fk.list_credentials(PIN)


# ---------------------------------------------------------------- reset
def clocked_key(presence: str = "auto"):
    clock = Clock()
    up = UserPresence(presence)
    app = VirtualAuthenticator(None, up, clock=clock)
    return VirtualKey(app, up), clock


def test_reset_within_the_window_after_power_cycle_and_not_after(open_key):
    key, clock = clocked_key()
    try:
        fk = open_key(key)
        fk.set_pin(PIN)
        register(fk, Fido2Server(RP))
        clock.now += 10.5  # past the 10 s window since power-up
        with pytest.raises(ResetNotAllowed) as late:
            fk.reset(on_touch=never_touch)
        assert late.value.ctap_code == ERR.NOT_ALLOWED
        assert "within 10 seconds of being plugged in" in str(late.value)
        assert fk.info().pin_set  # nothing erased

        fk = power_cycle(key, fk)  # the window opens again
        clock.now += 9.0
        fk.reset(on_touch=never_touch)  # auto presence: the key never asks
        info = fk.info()
        assert not info.pin_set and info.pin_retries is None and info.remaining_discoverable == 25
        fk.close()
    finally:
        key.close()


def test_reset_asks_for_a_touch(open_key):
    key, _clock = clocked_key("manual")
    try:
        fk = open_key(key)
        fk.set_pin(PIN)
        toucher = Toucher(key)
        fk.reset(on_touch=toucher)
        toucher.join()
        assert toucher.calls == 1 and toucher.key_was_waiting == [True]
        assert not fk.info().pin_set
        fk.close()
    finally:
        key.close()


# ---------------------------------------------------------------- register and log in
def test_register_and_authenticate_without_pin(make_key, open_key):
    fk = open_key(make_key())
    server = Fido2Server(RP)
    cred = register(fk, server, rk=False, on_touch=never_touch)
    (response,) = authenticate(fk, server, [cred], on_touch=never_touch)
    assert response.raw_id == cred.credential_id
    client_data = response.response.client_data
    assert client_data.type == "webauthn.get" and client_data.origin == ORIGIN
    assert not response.response.authenticator_data.is_user_verified()


def test_register_and_authenticate_with_pin(make_key, open_key):
    fk = open_key(make_key())
    fk.set_pin(PIN)
    server = Fido2Server(RP)
    asked = []

    def pin():
        asked.append(1)
        return PIN

    options, state = server.register_begin(ALICE, resident_key_requirement="required",
                                           user_verification="required")
    response = fk.make_credential(options.public_key, origin=ORIGIN, pin_provider=pin,
                                  on_touch=None)
    assert response.response.client_data.type == "webauthn.create"
    cred = server.register_complete(state, response).credential_data
    assert asked == [1]
    (assertion,) = authenticate(fk, server, [cred], uv="required")
    assert assertion.response.authenticator_data.is_user_verified()


def test_usernameless_login_returns_every_account(make_key, open_key):
    fk = open_key(make_key())
    fk.set_pin(PIN)
    server = Fido2Server(RP)
    creds = [register(fk, server, ALICE), register(fk, server, BOB)]
    responses = authenticate(fk, server, creds, allow=False, uv="required")
    assert {r.response.user_handle for r in responses} == {ALICE["id"], BOB["id"]}


def test_credential_excluded(make_key, open_key):
    fk = open_key(make_key())
    server = Fido2Server(RP)
    cred = register(fk, server)
    with pytest.raises(CredentialExcluded) as e:
        register(fk, server, exclude=[cred])
    assert str(e.value) == "This key is already registered for this account."


def test_rp_id_not_valid_for_the_origin_is_a_callers_mistake(make_key, open_key):
    fk = open_key(make_key())
    options, _ = Fido2Server(RP).register_begin(ALICE)
    with pytest.raises(ValueError):
        fk.make_credential(options.public_key, origin="https://elsewhere.example",
                           pin_provider=lambda: None, on_touch=None)


def test_unknown_credential_is_no_credentials(make_key, open_key):
    fk = open_key(make_key())
    server = Fido2Server(RP)
    register(fk, server)
    other = open_key(make_key())
    cred = register(other, server, rk=False)
    with pytest.raises(NoCredentials):
        authenticate(fk, server, [cred])


# ---------------------------------------------------------------- touches, timeouts, cancel
def test_on_touch_is_called_once_when_the_key_asks(make_key, open_key):
    key = make_key("manual")
    fk = open_key(key)
    fk.set_pin(PIN)
    server = Fido2Server(RP)
    toucher = Toucher(key)
    cred = register(fk, server, uv="required", on_touch=toucher)
    toucher.join()
    assert toucher.calls == 1 and toucher.key_was_waiting == [True]
    # with an allow list, python-fido2 first asks the key without presence (up=False)
    toucher = Toucher(key)
    authenticate(fk, server, [cred], uv="required", on_touch=toucher)
    toucher.join()
    assert toucher.calls == 1 and toucher.key_was_waiting == [True]


def test_on_touch_is_not_called_when_the_key_does_not_ask(make_key, open_key):
    fk = open_key(make_key("auto"))
    server = Fido2Server(RP)
    cred = register(fk, server, on_touch=never_touch)
    authenticate(fk, server, [cred], on_touch=never_touch)


def test_touch_timeout(make_key, open_key):
    key = make_key("never")
    fk = open_key(key)
    server = Fido2Server(RP)
    prompts = []
    start = time.monotonic()
    with pytest.raises(TouchTimeout) as e:
        register(fk, server, on_touch=lambda: prompts.append(1), timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < QUICK
    assert str(e.value) == "No touch within 0.5 seconds." and e.value.seconds == 0.5
    assert prompts == [1]
    assert not key.presence.waiting  # the key got the cancel and stopped waiting
    key.presence.set_mode("auto")
    register(fk, server)  # and the key is still usable


def test_time_typing_the_pin_is_not_touch_time(make_key, open_key):
    fk = open_key(make_key("auto"))
    fk.set_pin(PIN)
    slow = threading.Event()

    def slow_pin():
        slow.wait(0.6)  # a user who types slower than the timeout
        return PIN

    options, _ = Fido2Server(RP).register_begin(ALICE, user_verification="required")
    fk.make_credential(options.public_key, origin=ORIGIN, pin_provider=slow_pin,
                       on_touch=None, timeout=0.3)


def test_caller_cancel(make_key, open_key):
    key = make_key("manual")
    fk = open_key(key)
    cancel = threading.Event()
    start = time.monotonic()
    with pytest.raises(Cancelled):
        register(fk, Fido2Server(RP), on_touch=cancel.set, cancel=cancel)
    assert time.monotonic() - start < QUICK
    assert not key.presence.waiting
    with pytest.raises(Cancelled):  # set before the call: the key is not even asked
        register(fk, Fido2Server(RP), on_touch=never_touch, cancel=cancel)
    key.presence.set_mode("auto")
    register(fk, Fido2Server(RP))


def test_key_unplugged_mid_operation_in_process(make_key, open_key):
    key = make_key("manual")
    fk = open_key(key)
    with pytest.raises(KeyRemoved) as e:
        register(fk, Fido2Server(RP), on_touch=key.unplug)
    assert str(e.value) == "The security key was removed before the operation finished."
    with pytest.raises(KeyRemoved):
        fk.info()


def test_key_unplugged_mid_operation_over_tcp(make_key):
    key = make_key("manual")
    with KeyServer(key, port=0, control_port=None) as server:
        environ = {"TOKEN_AGENT_SIM_KEYS": f"127.0.0.1:{server.port}"}
        with open_single_key(environ, on_touch=never_touch, timeout=5) as fk:
            with pytest.raises(KeyRemoved):
                register(fk, Fido2Server(RP), on_touch=key.unplug)
        assert [k for k in list_keys(environ) if k.is_simulator] == []  # the port is closed
        key.plug()
        assert [k.path for k in list_keys(environ) if k.is_simulator] == [environ_path(environ)]


def environ_path(environ):
    return "sim:" + environ["TOKEN_AGENT_SIM_KEYS"]


def test_key_unplugged_mid_operation_served_by_its_own_process(sim_key_factory):
    server = sim_key_factory(presence="manual")
    control = KeyControl(server.control_port)
    environ = {"TOKEN_AGENT_SIM_KEYS": server.address}
    with open_single_key(environ, on_touch=never_touch) as fk:
        start = time.monotonic()
        with pytest.raises(KeyRemoved):
            register(fk, Fido2Server(RP), on_touch=control.unplug, timeout=10)
        assert time.monotonic() - start < QUICK
    assert [k for k in list_keys(environ) if k.is_simulator] == []
    control.plug()
    (info,) = [k for k in list_keys(environ) if k.is_simulator]
    assert info.aaguid == AAGUID


def test_garbled_and_failed_answers_are_communication_errors(make_key, open_key):
    key = make_key()
    fk = open_key(key)
    key.set_faults(fail_next=1, fail_status=0x7F)
    with pytest.raises(KeyCommunicationError) as e:
        fk.info()
    assert e.value.ctap_code == 0x7F
    fk = open_key(key)
    key.set_faults(corrupt_reports=1)
    with pytest.raises(KeyCommunicationError):
        fk.pin_retries()


def test_a_key_that_goes_silent_is_abandoned(make_key, open_key, monkeypatch):
    monkeypatch.setattr(keys, "ABANDON_GRACE", 0.2)
    key = make_key("manual", touch_timeout=2.0)
    fk = open_key(key)

    def go_silent():
        key.set_faults(drop_reports=1_000_000)  # not even the keepalives get through

    start = time.monotonic()
    with pytest.raises(KeyCommunicationError) as e:
        register(fk, Fido2Server(RP), on_touch=go_silent, timeout=0.3)
    assert time.monotonic() - start < QUICK
    assert "stopped answering" in str(e.value)
    with pytest.raises(KeyCommunicationError):
        fk.info()  # closed: the user is told to reinsert it


# ---------------------------------------------------------------- several keys
def record_presence(key):
    """Wrap the key's button: returns (an Event set when a wait starts, the outcomes)."""
    started, outcomes = threading.Event(), []
    wait = key.presence.wait

    def recording_wait(request, timeout=None):
        started.set()
        outcome = wait(request, timeout)
        outcomes.append(outcome)
        return outcome

    key.presence.wait = recording_wait
    return started, outcomes


def test_select_key_returns_the_touched_key_and_cancels_the_other(make_key, open_key):
    first, second = make_key("manual"), make_key("manual")
    k1, k2 = open_key(first), open_key(second)
    first_waits, first_outcomes = record_presence(first)

    def touch_second_once_both_wait():
        assert first_waits.wait(QUICK)
        second.presence.touch()

    toucher = Toucher(second, touch_second_once_both_wait)
    chosen = select_key([k1, k2], on_touch=toucher, timeout=QUICK)
    toucher.join()
    assert chosen is k2
    assert toucher.calls == 1
    # the first key was waiting for a touch and got CTAPHID_CANCEL
    assert first_outcomes == [Presence.CANCELLED] and not first.presence.waiting
    assert k1.info().aaguid == AAGUID  # and its connection is in a good state


def test_select_key_with_a_ctap20_key_uses_the_makecredential_probe(make_key, open_key,
                                                                    monkeypatch):
    first, second = make_key("manual"), make_key("manual")
    k1, k2 = open_key(first), open_key(second)
    ctap2 = k2._ctap2()
    ctap2._info = replace(ctap2.info, versions=["U2F_V2", "FIDO_2_0"])  # as a 2.0 key says
    monkeypatch.setattr(ctap2, "selection", never_touch)  # a 2.0 key has no selection command
    first_waits, first_outcomes = record_presence(first)
    _, second_outcomes = record_presence(second)

    def touch_second_once_both_wait():
        assert first_waits.wait(QUICK)
        second.presence.touch()

    toucher = Toucher(second, touch_second_once_both_wait)
    assert select_key([k1, k2], on_touch=toucher, timeout=QUICK) is k2
    toucher.join()
    assert toucher.calls == 1
    assert second_outcomes == [Presence.APPROVED] and first_outcomes == [Presence.CANCELLED]
    assert k2.info().remaining_discoverable == 25  # the probe made no credential


def test_select_key_one_key_needs_no_touch(make_key, open_key):
    fk = open_key(make_key("never"))
    assert select_key([fk], on_touch=never_touch, timeout=0.2) is fk
    with pytest.raises(NoKeyFound):
        select_key([], on_touch=never_touch)


def test_select_key_timeout_cancel_and_all_removed(make_key, open_key):
    a, b = make_key("never"), make_key("never")
    ka, kb = open_key(a), open_key(b)
    start = time.monotonic()
    with pytest.raises(TouchTimeout):
        select_key([ka, kb], on_touch=None, timeout=0.4)
    assert time.monotonic() - start < QUICK
    assert not a.presence.waiting and not b.presence.waiting

    cancel = threading.Event()
    with pytest.raises(Cancelled):
        select_key([ka, kb], on_touch=cancel.set, timeout=QUICK, cancel=cancel)

    def pull_both():
        a.unplug()
        b.unplug()

    with pytest.raises(NoKeyFound):
        select_key([ka, kb], on_touch=pull_both, timeout=QUICK)


def test_open_single_key_over_tcp(make_key):
    one, two = make_key("manual"), make_key("manual")
    with KeyServer(one, port=0, control_port=None) as s1, \
            KeyServer(two, port=0, control_port=None) as s2:
        with pytest.raises(NoKeyFound):
            open_single_key({"TOKEN_AGENT_SIM_KEYS": ""}, on_touch=never_touch)
        single = {"TOKEN_AGENT_SIM_KEYS": f"127.0.0.1:{s1.port}"}
        with open_single_key(single, on_touch=never_touch) as fk:
            assert fk.path == f"sim:127.0.0.1:{s1.port}"
        both = {"TOKEN_AGENT_SIM_KEYS": f"127.0.0.1:{s1.port},127.0.0.1:{s2.port}"}
        toucher = Toucher(two)
        with open_single_key(both, on_touch=toucher, timeout=QUICK) as fk:
            toucher.join()
            assert fk.path == f"sim:127.0.0.1:{s2.port}"
            two.presence.set_mode("auto")
            register(fk, Fido2Server(RP))


def test_a_pin_set_by_another_program_is_used(make_key, open_key):
    """The login path keeps the key's getInfo from when it was opened; a PIN set since then
    (by another connection) must still be asked for when verification is preferred."""
    key = make_key()
    fk = open_key(key)
    server = Fido2Server(RP)
    cred = register(fk, server, rk=False)  # the key has no PIN yet: opened that way
    _set_pin_behind_the_drivers_back(key, PIN)
    asked = []
    (assertion,) = fk.get_assertion(
        server.authenticate_begin([cred], user_verification="preferred")[0].public_key,
        origin=ORIGIN, pin_provider=lambda: asked.append(1) or PIN, on_touch=None)
    assert asked == [1] and assertion.response.authenticator_data.is_user_verified()


def test_allow_list_longer_than_the_key_accepts(make_key, open_key):
    """More credentials than maxCredentialCountInList: found by a silent pre-flight."""
    fk = open_key(make_key())
    server = Fido2Server(RP)
    cred = register(fk, server, rk=False)
    from simulators.key.authenticator import MAX_CREDS_IN_LIST as chunk
    allow = [os.urandom(64) for _ in range(2 * chunk + 3)] + [cred.credential_id]
    (assertion,) = fk.assert_credentials(rp_id=RP["id"], challenge=os.urandom(32), allow=allow,
                                         user_verification="discouraged", origin=ORIGIN,
                                         pin_provider=None, on_touch=None)
    assert assertion.credential_id == cred.credential_id
    with pytest.raises(NoCredentials):
        fk.assert_credentials(rp_id=RP["id"], challenge=os.urandom(32), allow=allow[:-1],
                              user_verification="discouraged", origin=ORIGIN,
                              pin_provider=None, on_touch=None)


@pytest.mark.parametrize("answer", [
    {2: b"auth", 3: b"sig"},  # no credential, and more than one allowed
    {1: {"id": "not bytes"}, 2: b"auth", 3: b"sig"},
    {1: {"id": b"id"}, 2: "not bytes", 3: b"sig"},
    {1: {"id": b"id"}, 2: b"auth", 3: b"sig", 4: "not a map"},
])
def test_malformed_assertion_answers_are_refused(answer):
    from drivers.fido.keys import _assertion

    with pytest.raises(KeyCommunicationError, match="malformed"):
        _assertion(answer, b"{}", [{"id": b"a"}, {"id": b"b"}])


def test_assertion_json_round_trips_through_python_fido2(make_key, open_key):
    from fido2.webauthn import AuthenticationResponse

    fk = open_key(make_key())
    server = Fido2Server(RP)
    cred = register(fk, server, rk=False)
    (assertion,) = fk.assert_credentials(rp_id=RP["id"], challenge=os.urandom(32),
                                         allow=[cred.credential_id],
                                         user_verification="discouraged", origin=ORIGIN,
                                         pin_provider=None, on_touch=None)
    parsed = AuthenticationResponse.from_dict(assertion.to_json())
    assert parsed.raw_id == assertion.credential_id
    assert bytes(parsed.response.authenticator_data) == assertion.authenticator_data
    assert parsed.response.signature == assertion.signature


def _set_pin_behind_the_drivers_back(key, pin: str) -> None:
    """Another program sets the PIN: straight to the authenticator, not through this
    process's HID handles (python-fido2 cannot share a key between two open devices in
    one process: each sees the other's reports and stops at "Wrong channel")."""
    from fido2.ctap import CtapDevice
    from fido2.ctap2 import Ctap2
    from fido2.ctap2.pin import ClientPin

    from simulators.key.base import Request

    class Direct(CtapDevice):
        capabilities = 0x04

        def call(self, cmd, data=b"", event=None, on_keepalive=None):
            return key.app.cbor(data, Request())

        def close(self):
            pass

        @classmethod
        def list_devices(cls):
            return iter(())

    ClientPin(Ctap2(Direct())).set_pin(pin)
