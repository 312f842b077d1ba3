"""The PKCS#11 card path (drivers/pkcs11, drivers/cardaccess.py) through the real pcscd and
OpenSC's real PKCS#11 module (opensc-pkcs11.so), against the virtual card in vpcd's reader.

python-pkcs11 keeps a loaded module per path for the whole process (C_Initialize once), and
OpenSC reads its configuration (``OPENSC_CONF``) at C_Initialize: this module loads its own
copy of opensc-pkcs11.so (a path of its own, so a fresh C_Initialize whatever loaded OpenSC
before) with a configuration of its own: ``user_pin_unblock_style =
set_pin_in_unlogged_session`` (what makes a sponsor unblock possible over OpenSC's PIV driver)
and no file cache. Every test also has its own HOME and XDG_CACHE_HOME.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from pathlib import Path

import pytest

from card_tools import PIN, insert_issued, require_tools
from drivers.cardaccess import DEFAULT_PKCS11_MODULE, DRIVERS, open_card
from drivers.pcsc.errors import (
    CardRemoved,
    InvalidPin,
    NoReader,
    PinBlocked,
    WrongPin,
    WrongPuk,
)
from drivers.pcsc.piv import PivSession
from drivers.pkcs11 import NoToken, Pkcs11CardSession, Pkcs11ModuleError, UnblockNotSupported
from pcsc_helpers import wait_for_card
from simulators.card.pki import admin_credentials, init_ca, issuing_cert_path, root_cert_path
from token_agent import exitcodes
from token_agent.ceremonies.card import device_failure, login_with_card, set_card_setting
from token_agent.outcome import Reason
from token_agent.store import Store

ALICE_UUID = "555123456789"
NEW_PIN = "654321"  # OpenSC's PIV driver takes a new PIN of 6-8 digits
OPENSC_CONF = """\
app default {
    framework pkcs15 { use_file_caching = no; }
    pkcs11 { user_pin_unblock_style = set_pin_in_unlogged_session; }
}
"""


def _system_module() -> str | None:
    candidates = ["/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
                  *sorted(glob.glob("/usr/lib/*/opensc-pkcs11.so")),
                  "/usr/lib/opensc-pkcs11.so", "/usr/lib64/opensc-pkcs11.so"]  # fmt: skip
    return next((p for p in candidates if os.path.exists(p)), None)


@pytest.fixture(scope="module", autouse=True)
def module(tmp_path_factory) -> str:
    """This module's own copy of OpenSC's PKCS#11 module, C_Initialized with OPENSC_CONF."""
    system = _system_module()
    require_tools([system or "opensc-pkcs11.so"], "opensc-pkcs11")
    directory = tmp_path_factory.mktemp("opensc")
    copy = directory / "opensc-pkcs11.so"
    shutil.copyfile(system, copy)
    conf = directory / "opensc.conf"
    conf.write_text(OPENSC_CONF)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENSC_CONF", str(conf))
        mp.setenv("HOME", str(directory))
        mp.delenv("OPENSC_DRIVER", raising=False)
        from drivers.pkcs11 import load_module

        load_module(str(copy))  # C_Initialize now, with this configuration
        yield str(copy)


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    for name in ("home", "cache"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pkcs11-ca") / "ca"
    init_ca(directory)
    return directory


@pytest.fixture
def store(tmp_path, ca_dir):
    (tmp_path / "data").mkdir(mode=0o700)
    s = Store.open(tmp_path / "data" / "token-agent.db")
    set_card_setting(s, "card_trust_anchors", [str(root_cert_path(ca_dir))])
    set_card_setting(s, "card_intermediates", [str(issuing_cert_path(ca_dir))])
    alice = s.add_user("alice", display_name="Dr Alice Smith")
    s.add_card_identity(alice.id, uuid=ALICE_UUID, holder_name="Dr Alice Smith")
    yield s
    s.close()


@pytest.fixture
def issued(pcscd, vpcd_insert, ca_dir, tmp_path):
    """``issued(algorithm="RSA2048", **issue)``: a card of Dr Alice Smith in slot 0."""
    count = iter(range(100))

    def make(algorithm: str = "RSA2048", **issue):
        path = tmp_path / f"alice-{algorithm}-{next(count)}.card"
        return insert_issued(pcscd, vpcd_insert, ca_dir, path, algorithm=algorithm, **issue)
    return make


class Pins:
    def __init__(self, *pins: str, on_call=None) -> None:
        self.pins = list(pins)
        self.calls = 0
        self.on_call = on_call

    def __call__(self) -> str:
        self.calls += 1
        if self.on_call:
            self.on_call()
        return self.pins.pop(0)


def never_asked():
    raise AssertionError("the PIN must not be asked for this card")


def pkcs11_session(card, module) -> Pkcs11CardSession:
    session = open_card(card.reader, driver="pkcs11", pkcs11_module=module)
    assert isinstance(session, Pkcs11CardSession) and session.driver == "pkcs11"
    assert session.reader == card.reader
    return session


# --- login -------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RSA2048", "ECCP256"])
def test_login_with_the_right_pin(store, issued, module, algorithm):
    card = issued(algorithm)
    with PivSession.open(card.reader) as piv:
        piv_certificate = piv.certificate("9a")
    session = pkcs11_session(card, module)
    # the authentication certificate (PIV 9A), not the signature one (9C: PIN always)
    assert session.certificate("9a") == piv_certificate
    assert session.pin_retries() is None  # the module does not say how many
    pins = Pins(PIN)
    started = time.perf_counter()
    outcome = login_with_card(store, session, pin_provider=pins)
    elapsed = time.perf_counter() - started
    assert outcome.ok, outcome
    assert (outcome.user, pins.calls) == ("alice", 1)
    assert outcome.detail["card_driver"] == "pkcs11"
    [event] = store.list_events(kind="login.card")
    assert event.outcome == "success" and event.detail["card_driver"] == "pkcs11"
    assert elapsed < 5, elapsed
    session.close()
    session.close()  # idempotent


def test_wrong_pin_down_to_locked_then_unblock(store, issued, module, ca_dir):
    card = issued()
    session = pkcs11_session(card, module)
    # a PIN of a form the card does not take: refused before the card, no try spent
    with pytest.raises(InvalidPin):
        session.verify_pin("1" * 65)
    with pytest.raises(InvalidPin):
        session.verify_pin("12")
    assert card.verify_status() == 0x63C3
    first = login_with_card(store, session, pin_provider=Pins("9999"))
    assert first.reason is Reason.WRONG_PIN
    assert first.message == ("Wrong PIN \N{EM DASH} more than one try left (the card does not "
                             "say how many)")
    assert card.verify_status() == 0x63C2
    second = login_with_card(store, session, pin_provider=Pins("9998"))
    assert second.reason is Reason.WRONG_PIN
    assert second.message == "Wrong PIN \N{EM DASH} 1 try left"
    assert session.pin_retries() == 1
    third = login_with_card(store, session, pin_provider=Pins("9997"))
    assert third.reason is Reason.PIN_BLOCKED
    assert third.message == "Your card is locked: ask your sponsor to unlock it."
    assert session.pin_retries() == 0
    # locked: refused before the PIN is asked
    fourth = login_with_card(store, session, pin_provider=never_asked)
    assert fourth.reason is Reason.PIN_BLOCKED
    with pytest.raises(PinBlocked):
        session.verify_pin(PIN)
    assert all(e.detail["card_driver"] == "pkcs11" for e in store.list_events(kind="login.card"))

    # the sponsor's unblock: OpenSC refuses the SO login, the unlogged C_SetPIN resets
    puk, _alg, _key = admin_credentials(ca_dir, card.file.serial)
    with pytest.raises(InvalidPin):  # a new PIN the module refuses for its length: no try
        session.unblock_pin(puk, "12")
    assert card.file.puk.retries_left == card.file.puk.max_retries
    wrong_puk = "00000000" if puk != "00000000" else "11111111"
    with pytest.raises(WrongPuk) as wrong:
        session.unblock_pin(wrong_puk, NEW_PIN)
    assert wrong.value.retries_left is None and "Wrong unlock code (PUK)" in wrong.value.message
    assert card.file.puk.retries_left == card.file.puk.max_retries - 1
    session.unblock_pin(puk, NEW_PIN)
    assert session.pin_retries() is None and card.verify_status() == 0x63C3
    assert card.file.puk.retries_left == card.file.puk.max_retries  # reset by the right PUK
    again = login_with_card(store, session, pin_provider=Pins(NEW_PIN))
    assert again.ok and again.user == "alice", again
    session.close()


def test_unblock_of_an_unlocked_card_is_refused_without_spending_tries(issued, module, ca_dir):
    card = issued()
    session = pkcs11_session(card, module)
    puk, _alg, _key = admin_credentials(ca_dir, card.file.serial)
    with pytest.raises(UnblockNotSupported) as refused:
        session.unblock_pin(puk, NEW_PIN)
    assert module in refused.value.message and "vendor's unlock tool" in refused.value.message
    assert "not locked" in refused.value.message
    assert puk not in refused.value.message and NEW_PIN not in refused.value.message
    assert device_failure(refused.value) is Reason.NOT_SUPPORTED_CARD
    assert card.verify_status() == 0x63C3  # no PIN try spent
    assert card.file.puk.retries_left == card.file.puk.max_retries  # nor a PUK try
    session.verify_pin(PIN)  # the PIN is unchanged
    session.close()


@pytest.mark.parametrize("variant,reason,words", [
    ("expired", Reason.CERT_EXPIRED, "Certificate expired on"),
    ("revoked", Reason.CERT_REVOKED, "revoked"),
    ("untrusted", Reason.CERT_UNTRUSTED, "trusted"),
])
def test_bad_certificates_are_refused_before_any_pin(store, issued, module, variant, reason,
                                                      words):  # fmt: skip
    card = issued(variant=variant)
    session = pkcs11_session(card, module)
    outcome = login_with_card(store, session, pin_provider=never_asked, provision=True)
    assert not outcome.ok and outcome.reason is reason, outcome
    assert words in outcome.message
    assert outcome.detail["card_driver"] == "pkcs11"
    assert card.verify_status() == 0x63C3  # no try spent
    session.close()


def test_card_pulled_out_mid_login(store, issued, module, pcscd):
    card = issued()
    session = pkcs11_session(card, module)
    outcome = login_with_card(store, session, pin_provider=Pins(PIN, on_call=card.bridge.remove))
    assert not outcome.ok and outcome.reason is Reason.DEVICE_REMOVED, outcome
    assert outcome.message == CardRemoved.default_message
    [event] = store.list_events()
    assert (event.kind, event.detail["reason"]) == ("login.card", "device-removed")
    assert store.get_card_identity(ALICE_UUID).last_used_at is None
    session.close()  # a removed card is no error
    wait_for_card(pcscd.context, pcscd.reader(0), False)
    time.sleep(1.0)  # pcscd settles before the next test inserts a card there


# --- the module, the slot, the path ------------------------------------------------------------


def test_module_missing_or_not_a_module(issued, tmp_path):
    card = issued()
    missing = str(tmp_path / "no-such-pkcs11.so")
    with pytest.raises(Pkcs11ModuleError) as e:
        open_card(card.reader, driver="pkcs11", pkcs11_module=missing)
    assert missing in e.value.message and "does not exist" in e.value.message
    assert "pkcs11_module" in e.value.message
    assert device_failure(e.value) is Reason.PCSC_UNAVAILABLE
    assert exitcodes.REASON_CODES[device_failure(e.value)] == exitcodes.NO_DEVICE
    fake = tmp_path / "fake-pkcs11.so"
    fake.write_bytes(b"not a shared object")
    with pytest.raises(Pkcs11ModuleError) as e:
        open_card(card.reader, driver="pkcs11", pkcs11_module=str(fake))
    assert str(fake) in e.value.message and "not a PKCS#11 module" in e.value.message
    with pytest.raises(Pkcs11ModuleError) as e:  # a library, but no C_GetFunctionList
        open_card(card.reader, driver="pkcs11", pkcs11_module="libc.so.6")
    assert "libc.so.6" in e.value.message and "not a PKCS#11 module" in e.value.message


def test_one_library_under_several_names_is_initialised_once(tmp_path):
    """A copy of the module, then the bare name the loader matches to the copy's soname; the
    module by a symbolic link, then by its own path: each pair is one library to dlopen,
    whose second C_Initialize would fail (CKR_CRYPTOKI_ALREADY_INITIALIZED, "cannot be
    used"). In a fresh process, so what this test module loaded does not count."""
    import subprocess
    import sys

    system = _system_module()
    require_tools([system or "opensc-pkcs11.so"], "opensc-pkcs11")
    link = tmp_path / "link-pkcs11.so"
    link.symlink_to(system)
    copy = tmp_path / "copy" / "opensc-pkcs11.so"
    copy.parent.mkdir()
    shutil.copyfile(system, copy)
    script = (
        "import sys\n"
        "from drivers.pkcs11.module import load_module\n"
        "c = load_module(sys.argv[3]); d = load_module('opensc-pkcs11.so')\n"
        "a = load_module(sys.argv[1]); b = load_module(sys.argv[2])\n"
        "print(a is b, c is d, a is c)\n")
    got = subprocess.run([sys.executable, "-c", script, str(link), system, str(copy)],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert got.returncode == 0, got.stderr
    # the copy and the bare name (the loader matches it to the loaded copy's soname) are one
    # library; the link and its target another, loaded beside it
    assert got.stdout.split() == ["True", "True", "False"], got.stdout


def test_a_card_the_module_does_not_recognise(issued, module):
    card = issued(piv_enabled=False)
    with pytest.raises(NoToken) as e:
        open_card(card.reader, driver="pkcs11", pkcs11_module=module)
    assert module in e.value.message and "vendor's PKCS#11 module" in e.value.message
    assert card.reader in e.value.message
    assert device_failure(e.value) is Reason.NOT_SUPPORTED_CARD
    assert exitcodes.REASON_CODES[device_failure(e.value)] == exitcodes.NO_DEVICE


def test_auto_picks_piv_then_pkcs11(issued, module, pcscd):
    assert DRIVERS == ("piv", "pkcs11", "auto") and DEFAULT_PKCS11_MODULE == "opensc-pkcs11.so"
    card = issued()
    for reader in (card.reader, None):
        with open_card(reader, driver="auto", pkcs11_module=module) as session:
            assert session.driver == "piv" and session.reader == card.reader
    card.bridge.remove()
    wait_for_card(pcscd.context, pcscd.reader(0), False)
    time.sleep(1.0)
    no_piv = issued(piv_enabled=False)
    # the card refuses the PIV SELECT: PKCS#11 on that reader, where OpenSC (a PIV driver
    # only, for this card) has no token: the honest result without the vendor's module
    for reader in (no_piv.reader, None):
        with pytest.raises(NoToken) as e:
            open_card(reader, driver="auto", pkcs11_module=module)
        assert module in e.value.message
    with pytest.raises(ValueError):
        open_card(no_piv.reader, driver="magic")


def test_a_reader_that_matches_no_slot(issued, module):
    card = issued()
    with pytest.raises(NoReader) as e:
        open_card("No Such Reader 00 00", driver="pkcs11", pkcs11_module=module)
    assert "No Such Reader 00 00" in e.value.message and module in e.value.message
    # the only token, when no reader is named
    with open_card(None, driver="pkcs11", pkcs11_module=module) as session:
        assert session.reader == card.reader


# --- the pieces, in process --------------------------------------------------------------------


def test_sim_card_issue_no_piv(ca_dir, tmp_path):
    from click.testing import CliRunner

    from simulators.card.card import InProcessCardConnection, VirtualCard
    from simulators.card.cardfile import CardFile
    from token_agent.cli import main

    out = tmp_path / "proprietary.card"
    result = CliRunner().invoke(main, ["sim", "card", "issue", "--ca", str(ca_dir), "--name",
                                       "Dr Carol Jones", "--uuid", "555000000009", "--pin",
                                       "123456", "--out", str(out), "--no-piv", "--json"],
                                catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '"piv_enabled": false' in result.stdout
    assert CardFile.load(out).piv_enabled is False
    with InProcessCardConnection(VirtualCard.load(out)) as connection:
        _data, sw1, sw2 = connection.transmit(list(bytes.fromhex("00A4040009A0000003080000100000")))
        assert (sw1, sw2) == (0x6A, 0x82)  # the PIV application is not there
    normal = tmp_path / "normal.card"
    CliRunner().invoke(main, ["sim", "card", "issue", "--ca", str(ca_dir), "--name",
                              "Dr Carol Jones", "--uuid", "555000000010", "--pin", "123456",
                              "--out", str(normal)], catch_exceptions=False)  # fmt: skip
    assert "piv_enabled" not in normal.read_text()  # older readers of card files unaffected
    assert CardFile.load(normal).piv_enabled is True


def test_wrong_pin_messages_with_and_without_a_count():
    assert WrongPin(2).message == "Wrong PIN \N{EM DASH} 2 tries left"
    assert WrongPin(1).message == "Wrong PIN \N{EM DASH} 1 try left"
    assert WrongPin(None, several=True).message == (
        "Wrong PIN \N{EM DASH} more than one try left (the card does not say how many)")
    assert WrongPin(None).message == ("Wrong PIN \N{EM DASH} the card does not say how many "
                                      "tries are left")
    assert WrongPin(None).to_json()["retries_left"] is None
    assert WrongPuk(None).message.startswith("Wrong unlock code (PUK) \N{EM DASH}")


def test_pss_and_pkcs1_signatures_both_verify():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from token_agent.ceremonies.card import verify_signature

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    challenge = os.urandom(32)
    for pad in (padding.PKCS1v15(), padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                salt_length=32),
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=0)):
        signature = key.sign(challenge, pad, hashes.SHA256())
        assert verify_signature(key.public_key(), signature, challenge)
        assert not verify_signature(key.public_key(), signature, os.urandom(32))
    sha1_pss = key.sign(challenge, padding.PSS(mgf=padding.MGF1(hashes.SHA1()), salt_length=20),
                        hashes.SHA1())
    assert not verify_signature(key.public_key(), sha1_pss, challenge)


def test_slot_descriptions_match_reader_names():
    from drivers.pkcs11.module import reader_matches

    assert reader_matches("Virtual PCD 00 00" + " " * 47, "Virtual PCD 00 00")
    assert not reader_matches("Virtual PCD 00 00" + " " * 47, "Virtual PCD 00 01")
    assert not reader_matches("Virtual PCD 00 0", "Virtual PCD 00 01")  # a short prefix is not it
    long_name = "Acme Corporation Contactless and Contact Smart Card Reader Model 9 [CCID] 00 00"
    assert reader_matches(long_name[:64], long_name)  # OpenSC truncates to 64 characters
    assert not reader_matches("", "Virtual PCD 00 00")


def test_removal_after_a_pkcs11_login_ends_the_bound_session(store, issued, module, pcscd):
    from drivers.pcsc.readers import ReaderWatcher
    from token_agent.cardsession import CardSessionManager

    card = issued()
    locked = []
    manager = CardSessionManager(lambda s: locked.append(s.user), store=store)
    session = pkcs11_session(card, module)
    assert session.atr == card.file.atr  # the card's ATR, through PC/SC, for the binding
    with ReaderWatcher(manager.handle):
        outcome = login_with_card(store, session, pin_provider=Pins(PIN))
        assert outcome.ok, outcome
        bound = manager.start_session(outcome, reader=card.reader, atr=session.atr)
        card.bridge.remove()
        deadline = time.monotonic() + 5
        while bound.state != "ended" and time.monotonic() < deadline:
            time.sleep(0.02)
    assert bound.state == "ended" and bound.end_reason == "card-removed"
    assert locked == ["alice"]
    with pytest.raises(CardRemoved):  # the PKCS#11 session is bound to the card that left
        session.sign("9a", b"challenge", algorithm="RSA2048")
    session.close()
    wait_for_card(pcscd.context, pcscd.reader(0), False)
    time.sleep(1.0)
