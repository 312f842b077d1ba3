"""`token-agent card ...` through the real pcscd + vpcd with issued virtual cards: status,
enrol, login, change-pin, a sponsor's unlock (the sponsor authenticating with a virtual
security key), settings, and `card watch --json` in a subprocess while cards come and go."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time

import pytest
from click.testing import CliRunner
from fido2.hid import CtapHidDevice

from conftest import token_agent_command
from drivers.fido.sim import SocketHidConnection, sim_descriptor
from json_shapes import check_output
from pcsc_helpers import wait_for_card
from simulators.card.card import VirtualCard
from simulators.card.pki import issuing_cert_path, root_cert_path
from simulators.key import KeyServer, create_virtual_key
from test_card_login import ALICE_UUID, PIN, card, pki  # noqa: F401,F811  (fixtures)
from token_agent import exitcodes
from token_agent.cli import main

KEY_PIN = "246810"


@pytest.fixture
def sim_key():
    key = create_virtual_key(presence="auto")
    with KeyServer(key, port=0, control_port=0) as server:
        holder = CtapHidDevice(sim_descriptor("127.0.0.1", server.port),
                               SocketHidConnection("127.0.0.1", server.port))
        try:
            yield f"127.0.0.1:{server.port}"
        finally:
            holder.close()


@pytest.fixture
def env(tmp_path, pki, sim_key):
    return {"TOKEN_AGENT_SIM_KEYS": sim_key, "TOKEN_AGENT_DATA_DIR": str(tmp_path / "data")}


@pytest.fixture
def cli(env, pki):
    runner = CliRunner()

    def run(*args, input=None, expect=0):
        result = runner.invoke(main, list(args), input=input, env=env, catch_exceptions=False)
        assert result.exit_code == expect, (result.exit_code, result.output, result.stderr)
        if "--json" in args:  # what README "JSON output" documents
            check_output(args, result.stdout, result.exit_code)
        return result

    run("card", "settings", "set", "card_trust_anchors", str(root_cert_path(pki["ca"])))
    run("card", "settings", "set", "card_intermediates", str(issuing_cert_path(pki["ca"])))
    run("users", "add", "alice", "--display-name", "Dr Alice Smith")
    return run


@pytest.fixture
def insert(vpcd_insert, pcscd, card):  # noqa: F811
    def put(key: str, slot: int = 0):
        bridge = vpcd_insert(VirtualCard.load(card(key)), slot=slot)
        wait_for_card(pcscd.context, pcscd.reader(slot), True)
        return bridge
    return put


def test_status_enrol_login(cli, insert, pcscd):
    insert("alice")
    status = json.loads(cli("card", "status", "--json").stdout)
    assert status["reader"] == pcscd.reader(0) and status["card_present"]
    assert (status["holder_name"], status["uuid"]) == ("Dr Alice Smith", ALICE_UUID)
    assert status["trusted"] and status["verdict"] == "valid" and status["pin_retries"] == 3
    assert status["user"] is None
    cli("card", "login", "--pin-stdin", input=PIN + "\n", expect=exitcodes.AUTH_FAILED)
    cli("card", "enrol", "--user", "alice")
    cli("card", "enrol", "--user", "alice", expect=exitcodes.CONFLICT)
    result = cli("card", "login", "--pin-stdin", "--json", input=PIN + "\n")
    outcome = json.loads(result.stdout)
    assert outcome["ok"] and outcome["user"] == "alice" and outcome["multi_factor"]
    assert PIN not in result.stderr
    wrong = cli("card", "login", "--pin-stdin", "--reader", pcscd.reader(0), input="9999\n",
                expect=exitcodes.AUTH_FAILED)
    assert "Wrong PIN \N{EM DASH} 2 tries left" in wrong.stderr
    text = cli("card", "status").stdout
    assert "PIN tries:    2" in text and "alice" in text


def test_untrusted_card_status_and_login(cli, insert):
    insert("untrusted")
    status = json.loads(cli("card", "status", "--json").stdout)
    assert not status["trusted"] and status["verdict"] == "untrusted"
    # refused before the PIN: nothing on stdin is read, no try spent
    result = cli("card", "login", "--pin-stdin", "--json", input="", expect=exitcodes.AUTH_FAILED)
    assert json.loads(result.stdout)["reason"] == "certificate-untrusted"
    assert json.loads(cli("card", "status", "--json").stdout)["pin_retries"] == 3


def test_no_card(cli, pcscd):
    result = cli("card", "status", "--reader", pcscd.reader(1), expect=exitcodes.NO_DEVICE)
    assert "Insert your smartcard" in result.stderr


def test_change_pin(cli, insert):
    insert("alice")
    cli("card", "enrol", "--user", "alice")
    cli("card", "change-pin", "--pin-stdin", input="1234\n12\n", expect=exitcodes.USAGE)
    cli("card", "change-pin", "--pin-stdin", input="0000\n5678\n", expect=exitcodes.AUTH_FAILED)
    cli("card", "change-pin", "--pin-stdin", input="1234\n5678\n")
    cli("card", "login", "--pin-stdin", input="5678\n")


def test_sponsor_unlock(cli, insert, pki):
    insert("alice")
    cli("card", "enrol", "--user", "alice")
    for bad in ("9999", "9998", "9997"):
        cli("card", "login", "--pin-stdin", input=bad + "\n", expect=exitcodes.LOCKED if bad == "9997" else exitcodes.AUTH_FAILED)
    locked = cli("card", "login", "--pin-stdin", input=PIN + "\n", expect=exitcodes.LOCKED)
    assert "ask your sponsor" in locked.stderr
    cli("users", "add", "sam", "--role", "sponsor")
    cli("keys", "pin", "set", "--pin-stdin", input=KEY_PIN + "\n")
    cli("enrol", "key", "--user", "sam", "--pin-stdin", input=KEY_PIN + "\n")
    # alice is no sponsor
    cli("enrol", "key", "--user", "alice", "--pin-stdin", input=KEY_PIN + "\n")
    cli("card", "unlock", "--sponsor", "alice", "--ra", f"simulated:{pki['ca']}", "--pin-stdin",
        input=f"{KEY_PIN}\n4321\n", expect=exitcodes.AUTH_FAILED)
    cli("card", "unlock", "--sponsor", "sam", "--pin-stdin", input=f"{KEY_PIN}\n4321\n",
        expect=exitcodes.USAGE)  # no PUK source
    cli("card", "unlock", "--sponsor", "sam", "--ra", "nosuch:x", "--pin-stdin",
        input=f"{KEY_PIN}\n4321\n", expect=exitcodes.USAGE)  # an unknown RA source
    cli("card", "unlock", "--sponsor", "sam", "--ra", f"simulated:{pki['ca']}", "--puk-stdin",
        "--pin-stdin", input=f"{KEY_PIN}\n4321\n", expect=exitcodes.USAGE)  # two PUK sources
    result = cli("card", "unlock", "--sponsor", "sam", "--ra", f"simulated:{pki['ca']}",
                 "--pin-stdin", "--json", input=f"{KEY_PIN}\n4321\n")
    data = json.loads(result.stdout)
    assert data["ok"] and data["card_uuid"] == ALICE_UUID and data["sponsor"] == "sam"
    assert "4321" not in result.stderr and KEY_PIN not in result.output
    cli("card", "login", "--pin-stdin", input="4321\n")


def test_settings(cli):
    cli("card", "settings", "set", "card_on_stale_crl", "sometimes", expect=exitcodes.USAGE)
    cli("card", "settings", "set", "card_provision_on_first_use", "true")
    cli("card", "settings", "set", "card_lock_command", "xdg-screensaver", "lock")
    shown = json.loads(cli("card", "settings", "show", "--json").stdout)
    assert shown["card_provision_on_first_use"] is True
    assert shown["card_lock_command"] == "xdg-screensaver lock"


def test_watch_prints_insert_remove_and_lock(env, insert, pcscd, tmp_path):
    marker = tmp_path / "locked"
    wait_for_card(pcscd.context, pcscd.reader(0), False)  # no card left by an earlier test
    proc = subprocess.Popen(
        [*token_agent_command(), "card", "watch", "--json", "--reader", pcscd.reader(0),
         "--lock-on-remove", "--lock-command", f"touch {marker}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env})
    seen: list[dict] = []
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put("")],
                     daemon=True).start()

    def until(kind: str) -> dict:
        """The next line of that kind (others, e.g. a reader appearing, are kept in seen)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            assert line, f"watch ended; saw {seen}"
            seen.extend(check_output(["card", "watch", "--json"], line, 0, lines=True))
            if seen[-1]["event"] == kind:
                return seen[-1]
        raise AssertionError(f"no {kind} event; saw {seen}")

    try:
        assert until("reader-present")["reader"] == pcscd.reader(0)
        bridge = insert("alice")
        assert until("card-inserted")["atr"]
        bridge.remove()
        lock = until("lock-started")
        assert until("card-removed")["reader"] == pcscd.reader(0)
        assert lock["latency_ms"] >= 0  # from the watcher seeing the removal
        deadline = time.monotonic() + 5
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


def test_the_configured_driver_pkcs11_and_its_module(cli, insert, env, tmp_path, pcscd):
    """config.toml's [cards] driver = "pkcs11": the card commands ask the card through
    OpenSC's PKCS#11 module (the outcome says card_driver); a module that is not there, or
    that has no token in the reader named, is a clear message naming it, exit 4."""
    config = tmp_path / "config.toml"
    config.write_text('[cards]\ndriver = "pkcs11"\n')
    env["TOKEN_AGENT_CONFIG"] = str(config)
    insert("alice")
    status = json.loads(cli("card", "status", "--json").stdout)
    assert (status["holder_name"], status["uuid"]) == ("Dr Alice Smith", ALICE_UUID)
    assert status["trusted"] and status["reader"] == pcscd.reader(0)
    cli("card", "enrol", "--user", "alice")
    result = cli("card", "login", "--pin-stdin", "--json", input=PIN + "\n")
    outcome = json.loads(result.stdout)
    assert outcome["ok"] and outcome["user"] == "alice"
    assert outcome["detail"]["card_driver"] == "pkcs11" and PIN not in result.stderr
    # the module: a relative path is taken from the config file's directory
    config.write_text('[cards]\ndriver = "pkcs11"\npkcs11_module = "vendor/none.so"\n')
    for command in (("card", "status"), ("card", "login", "--pin-stdin")):
        failed = cli(*command, input=PIN + "\n", expect=exitcodes.NO_DEVICE)
        assert str(tmp_path / "vendor" / "none.so") in failed.stderr, failed.stderr
        assert PIN not in failed.stderr
    # "auto" takes PIV for this card: the wrong module is never loaded
    config.write_text('[cards]\ndriver = "auto"\npkcs11_module = "vendor/none.so"\n')
    outcome = json.loads(cli("card", "login", "--pin-stdin", "--json", input=PIN + "\n").stdout)
    assert outcome["ok"] and outcome["detail"]["card_driver"] == "piv"
    # the reader named is empty: as on the PIV path, exit 4
    config.write_text('[cards]\ndriver = "pkcs11"\n')
    empty = cli("card", "status", "--reader", pcscd.reader(1), expect=exitcodes.NO_DEVICE)
    assert "Insert your smartcard" in empty.stderr
