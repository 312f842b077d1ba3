"""The virtual card behind the real pcscd: simulators.card.vpcd's bridge to vsmartcard's vpcd,
seen by PC/SC clients (pyscard), the `sim card insert/remove` commands, and the bridge's
behaviour with a misbehaving vpcd (a fake one in the test)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_port, token_agent_command
from pcsc_helpers import CardConnection, wait_for_card
from simulators.card.card import VirtualCard
from simulators.card.cardfile import CardFile
from simulators.card.vpcd import (
    SlotBusy,
    VpcdBridge,
    VpcdNotListening,
    ask_holder,
    find_reader,
    reader_name,
    slot_port,
)

SELECT_PIV = bytes.fromhex("00A4040009A0000003080000100000")  # with Le
GET_AUTH_CERT = bytes.fromhex("00CB3FFF055C035FC10500")
VERIFY_STATUS = bytes.fromhex("0020008000")


def verify(pin: str) -> bytes:
    return bytes.fromhex("0020008008") + pin.encode().ljust(8, b"\xff")


def copy_card(source: Path, target: Path) -> Path:
    shutil.copyfile(source, target)
    os.chmod(target, 0o600)
    return target


@pytest.fixture
def card_path(issued_cards, tmp_path) -> Path:
    return copy_card(issued_cards["alice"], tmp_path / "alice.card")


@pytest.fixture
def other_card_path(issued_cards, tmp_path) -> Path:
    return copy_card(issued_cards["bob"], tmp_path / "bob.card")


def load_card(path: Path, **options) -> VirtualCard:
    return VirtualCard.load(path, **options)


class CountingCard:
    """A card whose save() calls are counted (the bridge's own saves, apart from the
    card's autosave)."""

    def __init__(self, card: VirtualCard) -> None:
        self._card = card
        self.saves = 0

    def save(self):
        self.saves += 1
        return self._card.save()

    def __getattr__(self, name):
        return getattr(self._card, name)


def test_slot_ports_and_reader_names():
    assert slot_port(0) == 35963 and slot_port(1) == 35964
    assert reader_name(0) == "Virtual PCD 00 00" and reader_name(1) == "Virtual PCD 00 01"
    readers = ["Yubico YubiKey 00 00", "Virtual PCD 01 00", "Virtual PCD 01 01"]
    assert find_reader(readers, 1) == "Virtual PCD 01 01"
    assert find_reader(readers[:1], 0) is None
    with pytest.raises(ValueError):
        slot_port(-1)
    with pytest.raises(ValueError):
        VpcdBridge(object(), port=35963, slot=1)
    assert VpcdBridge(object(), slot=1).port == 35964
    assert VpcdBridge(object(), port=35964).slot == 1


# -- through pcscd -------------------------------------------------------------------------------


def test_insert_and_remove_seen_by_pcsc(pcscd, vpcd_insert, card_path):
    from smartcard.System import readers

    reader = pcscd.reader(0)
    assert reader in [str(r) for r in readers()]
    card = load_card(card_path)
    bridge = vpcd_insert(card)
    assert bridge.inserted
    waited, atr = wait_for_card(pcscd.context, reader, present=True)
    assert atr == card.atr
    assert bridge.wait_powered(2)
    assert bridge.counts["atr"] >= 1 and bridge.counts["power_on"] >= 1
    assert bridge.remove() is True
    assert not bridge.inserted and bridge.end_reason == "removed"
    wait_for_card(pcscd.context, reader, present=False)
    assert bridge.remove() is False  # idempotent


def test_atr_through_pyscard_card_request(pcscd, vpcd_insert, card_path):
    from smartcard.CardRequest import CardRequest
    from smartcard.CardType import ATRCardType

    card = load_card(card_path)
    vpcd_insert(card)
    service = CardRequest(timeout=5, cardType=ATRCardType(list(card.atr))).waitforcard()
    service.connection.connect()
    try:
        assert bytes(service.connection.getATR()) == card.atr
        data, sw1, sw2 = service.connection.transmit(list(SELECT_PIV))
        assert (sw1, sw2) == (0x90, 0x00) and data[0] == 0x61
    finally:
        service.connection.disconnect()
        service.connection.release()


def test_apdus_through_pcscd(pcscd, vpcd_insert, card_path):
    card = load_card(card_path)
    vpcd_insert(card)
    reader = pcscd.reader(0)
    wait_for_card(pcscd.context, reader)
    with CardConnection(pcscd.context, reader) as conn:
        assert conn.status_atr() == card.atr
        data, sw = conn.transmit(SELECT_PIV)
        assert sw == 0x9000 and data[:1] == b"\x61"
        data, sw = conn.transmit(GET_AUTH_CERT)  # over 256 bytes: 61xx + GET RESPONSE
        assert sw == 0x9000
        stored = CardFile.load(card_path).objects["5fc105"]
        assert data[0] == 0x53 and data.endswith(stored)
        assert conn.transmit(VERIFY_STATUS)[1] == 0x63C3
        assert conn.transmit(verify("9999"))[1] == 0x63C2
        assert conn.transmit(VERIFY_STATUS)[1] == 0x63C2
        assert conn.transmit(verify("1234"))[1] == 0x9000
        assert conn.transmit(VERIFY_STATUS)[1] == 0x9000


def test_retries_survive_removal(pcscd, vpcd_insert, card_path):
    """The bridge saves the card's state when the card comes out (here the card does not
    save by itself: autosave off), and the next insertion starts from it."""
    reader = pcscd.reader(0)
    card = CountingCard(load_card(card_path, autosave=False))
    bridge = vpcd_insert(card)
    wait_for_card(pcscd.context, reader)
    with CardConnection(pcscd.context, reader) as conn:
        conn.transmit(SELECT_PIV)
        assert conn.transmit(verify("0000"))[1] == 0x63C2
    assert CardFile.load(card_path).pin.retries_left == 3  # not saved yet
    bridge.remove()
    assert card.saves == 1
    assert CardFile.load(card_path).pin.retries_left == 2  # saved back on removal
    wait_for_card(pcscd.context, reader, present=False)

    vpcd_insert(load_card(card_path))
    wait_for_card(pcscd.context, reader)
    with CardConnection(pcscd.context, reader) as conn:
        conn.transmit(SELECT_PIV)
        assert conn.transmit(VERIFY_STATUS)[1] == 0x63C2


def test_two_slots(pcscd, vpcd_insert, card_path, other_card_path):
    vpcd_insert(load_card(card_path), slot=0)
    vpcd_insert(load_card(other_card_path), slot=1)
    for slot, path in ((0, card_path), (1, other_card_path)):
        reader = pcscd.reader(slot)
        wait_for_card(pcscd.context, reader)
        with CardConnection(pcscd.context, reader) as conn:
            conn.transmit(SELECT_PIV)
            data, sw = conn.transmit(GET_AUTH_CERT)
            assert sw == 0x9000 and data.endswith(CardFile.load(path).objects["5fc105"])


def test_second_card_in_an_occupied_slot_is_refused(pcscd, vpcd_insert, card_path,
                                                    other_card_path):  # fmt: skip
    vpcd_insert(load_card(card_path))
    other = VpcdBridge(load_card(other_card_path), accept_timeout=1.5)
    with pytest.raises(SlotBusy, match="another card is in that slot"):
        other.insert()
    assert not other.inserted
    # the first card is unaffected
    reader = pcscd.reader(0)
    wait_for_card(pcscd.context, reader)
    with CardConnection(pcscd.context, reader) as conn:
        assert conn.transmit(SELECT_PIV)[1] == 0x9000


def test_card_pulled_mid_session(pcscd, vpcd_insert, card_path):
    reader = pcscd.reader(0)
    bridge = vpcd_insert(load_card(card_path))
    wait_for_card(pcscd.context, reader)
    conn = CardConnection(pcscd.context, reader)
    try:
        assert conn.transmit(SELECT_PIV)[1] == 0x9000
        bridge.remove()
        with pytest.raises(RuntimeError):
            conn.transmit_raw(VERIFY_STATUS)
    finally:
        try:
            conn.close()
        except Exception:
            pass
    wait_for_card(pcscd.context, reader, present=False)


def test_not_listening(card_path):
    port = free_port()
    with pytest.raises(VpcdNotListening, match="is pcscd running with vsmartcard-vpcd"):
        VpcdBridge(load_card(card_path), port=port).insert()


# -- a fake vpcd: what the bridge does with whatever arrives ---------------------------------------


class FakeVpcd:
    """A listening socket standing in for vpcd; the test drives the accepted connection."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.conn: socket.socket | None = None
        self._accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            self.conn, _ = self.server.accept()
        except OSError:
            return
        self.conn.settimeout(5)
        self._accepted.set()

    def accept(self, timeout: float = 5) -> socket.socket:
        assert self._accepted.wait(timeout), "the bridge did not connect"
        return self.conn

    def again(self) -> None:
        self._accepted.clear()
        threading.Thread(target=self._accept, daemon=True).start()

    def send(self, payload: bytes) -> None:
        self.conn.sendall(struct.pack(">H", len(payload)) + payload)

    def recv(self) -> bytes:
        header = self._recvn(2)
        return self._recvn(struct.unpack(">H", header)[0])

    def _recvn(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def close(self) -> None:
        for s in (self.conn, self.server):
            if s is not None:
                s.close()


@pytest.fixture
def fake_vpcd():
    fake = FakeVpcd()
    yield fake
    fake.close()


def _insert_on(fake: FakeVpcd, card, **options) -> VpcdBridge:
    bridge = VpcdBridge(card, port=fake.port, **options)
    errors = []

    def insert():
        try:
            bridge.insert(timeout=5)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=insert)
    t.start()
    fake.accept()
    fake.send(b"\x04")  # vpcd's first presence poll
    assert fake.recv() == card.atr
    t.join(5)
    assert not errors, errors
    return bridge


def test_protocol_with_a_fake_vpcd(fake_vpcd, card_path):
    card = CountingCard(load_card(card_path))
    bridge = _insert_on(fake_vpcd, card)
    assert bridge.connected
    fake_vpcd.send(b"\x01")  # power on: no answer
    fake_vpcd.send(b"\x04")
    assert fake_vpcd.recv() == card.atr
    assert bridge.wait_powered(1) and card.powered
    fake_vpcd.send(SELECT_PIV)
    assert fake_vpcd.recv()[-2:] == b"\x90\x00"
    fake_vpcd.send(verify("1234"))
    assert fake_vpcd.recv() == b"\x90\x00"
    fake_vpcd.send(b"\x02")  # reset: no answer; the security status is gone
    fake_vpcd.send(SELECT_PIV)
    assert fake_vpcd.recv()[-2:] == b"\x90\x00"
    fake_vpcd.send(VERIFY_STATUS)
    assert fake_vpcd.recv() == b"\x63\xc3"
    assert bridge.counts["reset"] == 1 and bridge.counts["apdu"] == 4
    fake_vpcd.send(b"\x00")
    fake_vpcd.send(b"\x04")
    assert fake_vpcd.recv() == card.atr
    assert not card.powered and not bridge.powered
    bridge.remove()
    assert card.saves == 1


def test_malformed_input_from_vpcd(fake_vpcd, card_path):
    card = CountingCard(load_card(card_path))
    bridge = _insert_on(fake_vpcd, card)
    conn = fake_vpcd.conn
    conn.sendall(b"\x00\x00")  # an empty message
    fake_vpcd.send(b"\x03")  # unknown controls
    fake_vpcd.send(b"\xff")
    fake_vpcd.send(b"\x00\xa4")  # too short to be an APDU: the card answers it
    assert fake_vpcd.recv() == b"\x67\x00"
    # a message split across TCP segments, byte by byte
    for byte in struct.pack(">H", len(SELECT_PIV)) + SELECT_PIV:
        conn.sendall(bytes([byte]))
        time.sleep(0.001)
    assert fake_vpcd.recv()[-2:] == b"\x90\x00"
    # two messages in one segment
    conn.sendall(struct.pack(">H", 1) + b"\x04" + struct.pack(">H", 1) + b"\x04")
    assert fake_vpcd.recv() == card.atr and fake_vpcd.recv() == card.atr
    # the largest message the framing allows
    fake_vpcd.send(b"\x00\xcb\x3f\xff" + bytes(0xFFFF - 4))
    assert len(fake_vpcd.recv()) == 2
    assert bridge.counts["ignored"] == 3 and bridge.inserted
    # a header, half a payload, and vpcd goes away
    conn.sendall(b"\x01\x00" + bytes(10))
    conn.close()
    assert bridge.wait(5)
    assert not bridge.inserted and bridge.end_reason == "vpcd closed the connection"
    assert card.saves == 1  # saved when vpcd dropped it
    assert bridge.remove() is False


def test_a_failing_card_does_not_stop_the_bridge(fake_vpcd, card_path):
    card = CountingCard(load_card(card_path))
    answers = iter([RuntimeError("boom"), b"", b"\x90"])

    def transmit(apdu):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    bridge = _insert_on(fake_vpcd, card)
    card.transmit = transmit
    for _ in range(3):
        fake_vpcd.send(SELECT_PIV)
        assert fake_vpcd.recv() == b"\x6f\x00"
    assert bridge.inserted
    bridge.remove()


def test_reconnects_when_vpcd_comes_back(fake_vpcd, card_path):
    card = CountingCard(load_card(card_path))
    bridge = _insert_on(fake_vpcd, card, reconnect=True)
    fake_vpcd.again()
    fake_vpcd.conn.close()  # pcscd stopped
    fake_vpcd.accept()  # ... and the card is back when vpcd listens again
    fake_vpcd.send(b"\x04")
    assert fake_vpcd.recv() == card.atr
    assert bridge.inserted and bridge.counts["connections"] == 2
    assert card.saves == 0
    bridge.remove()
    assert card.saves == 1 and not bridge.inserted


def test_a_card_that_vpcd_never_takes(fake_vpcd, card_path):
    bridge = VpcdBridge(load_card(card_path), port=fake_vpcd.port)
    with pytest.raises(SlotBusy):
        bridge.insert(timeout=0.5)  # the fake accepts but never polls
    assert not bridge.inserted


# -- token-agent sim card insert / remove, as processes -----------------------------------------


@pytest.fixture
def cli_env(tmp_path_factory) -> dict:
    """The commands' environment: their own runtime directory (control sockets), so that a
    developer's own inserted cards are not touched."""
    run_dir = tmp_path_factory.mktemp("run")
    return dict(os.environ, TOKEN_AGENT_RUNTIME_DIR=str(run_dir), PYTHONUNBUFFERED="1")


class InsertProcess:
    def __init__(self, card: Path, env: dict, log: Path, *args: str) -> None:
        self.log = log
        self.env = env
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                token_agent_command() + ["sim", "card", "insert", str(card), *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                env=env, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None and text not in self.output():
                pytest.fail(f"insert exited ({self.process.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} from insert within {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    def exit_code(self, timeout: float = 15) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


@pytest.fixture
def insert_process(cli_env, tmp_path):
    started: list[InsertProcess] = []

    def start(card: Path, *args: str) -> InsertProcess:
        proc = InsertProcess(card, cli_env, tmp_path / f"insert-{len(started)}.log", *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def token_agent(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(token_agent_command() + list(args), env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_cli_insert_and_remove(pcscd, insert_process, cli_env, card_path):
    reader = pcscd.reader(1)
    proc = insert_process(card_path, "--slot", "1")
    proc.wait_for("inserted in slot 1 (Virtual PCD 00 01, vpcd 127.0.0.1:35964)")
    assert "token-agent sim card remove --slot 1" in proc.output()
    wait_for_card(pcscd.context, reader)
    status = ask_holder(port=35964, environ=cli_env)
    assert status["card"] == str(card_path) and status["pid"] == proc.process.pid
    assert status["inserted"] and status["slot"] == 1
    with CardConnection(pcscd.context, reader) as conn:
        conn.transmit(SELECT_PIV)
        assert conn.transmit(verify("4321"))[1] == 0x63C2

    result = token_agent(cli_env, "sim", "card", "remove", "--slot", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed from slot 1" in result.stdout and "state is saved" in result.stdout
    assert proc.exit_code() == 0, proc.output()
    assert "removed from slot 1" in proc.output() and "by `token-agent sim card remove`" in \
        proc.output()
    assert CardFile.load(card_path).pin.retries_left == 2
    wait_for_card(pcscd.context, reader, present=False)

    result = token_agent(cli_env, "sim", "card", "remove", "--slot", "1")
    assert result.returncode == 8
    assert "no card is inserted in slot 1" in result.stderr


def test_cli_insert_ends_on_sigterm(pcscd, insert_process, cli_env, card_path):
    proc = insert_process(card_path)
    proc.wait_for("inserted in slot 0")
    wait_for_card(pcscd.context, pcscd.reader(0))
    socket_path = Path(cli_env["TOKEN_AGENT_RUNTIME_DIR"]) / "sim-card-127.0.0.1-35963.sock"
    assert socket_path.exists()
    proc.process.send_signal(signal.SIGTERM)
    assert proc.exit_code() == 0, proc.output()
    assert "state saved to" in proc.output()
    assert not socket_path.exists()
    wait_for_card(pcscd.context, pcscd.reader(0), present=False)


def test_cli_insert_into_an_occupied_slot(pcscd, insert_process, cli_env, card_path,
                                          other_card_path):  # fmt: skip
    first = insert_process(card_path)
    first.wait_for("inserted in slot 0")
    second = insert_process(other_card_path)
    assert second.exit_code() == 9, second.output()
    assert "already holds a card" in second.output() and str(card_path) in second.output()
    assert "token-agent sim card remove --slot 0" in second.output()
    assert first.process.poll() is None
    assert token_agent(cli_env, "sim", "card", "remove").returncode == 0
    assert first.exit_code() == 0


def test_cli_a_stale_control_socket_is_ignored(pcscd, insert_process, cli_env, card_path):
    run_dir = Path(cli_env["TOKEN_AGENT_RUNTIME_DIR"])
    run_dir.mkdir(mode=0o700, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(run_dir / "sim-card-127.0.0.1-35963.sock"))
    stale.close()  # its process "died": the file stays, nobody listens
    result = token_agent(cli_env, "sim", "card", "remove")
    assert result.returncode == 8, result.stderr
    proc = insert_process(card_path)
    proc.wait_for("inserted in slot 0")
    assert token_agent(cli_env, "sim", "card", "remove").returncode == 0
    assert proc.exit_code() == 0


def test_cli_insert_without_vpcd(cli_env, card_path):
    port = free_port()
    result = token_agent(cli_env, "sim", "card", "insert", str(card_path), "--port", str(port))
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"cannot connect to vpcd at 127.0.0.1:{port}" in result.stderr
    assert "is pcscd running with vsmartcard-vpcd?" in result.stderr


def test_cli_insert_a_bad_card_file(cli_env, tmp_path):
    bad = tmp_path / "bad.card"
    bad.write_text("{}")
    result = token_agent(cli_env, "sim", "card", "insert", str(bad), "--port", str(free_port()))
    assert result.returncode == 1
    assert "cannot load the card" in result.stderr


# -- the pcscd fixture's decisions (without touching the machine's pcscd) ---------------------------


def test_pcscd_unavailable_fails_in_ci_and_skips_elsewhere(monkeypatch):
    import pcsc_helpers

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="need pcscd with vsmartcard-vpcd: why"):
        pcsc_helpers.unavailable("why")
    for value in ("", "false", "0"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception):
            pcsc_helpers.unavailable("why")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        pcsc_helpers.unavailable("why")


@pytest.mark.parametrize("situation,expected", [
    ("not installed", "sudo apt-get install -y pcscd vsmartcard-vpcd opensc"),
    ("no vpcd", "vsmartcard-vpcd is not installed"),
    ("not root", "only root can start it: start pcscd: `sudo systemctl start pcscd.socket"),
])
def test_pcscd_service_says_what_to_do(monkeypatch, tmp_path, situation, expected):
    import pcsc_helpers
    from simulators.card import pcscd

    monkeypatch.setattr(pcscd, "establish_context", lambda: None)  # pcscd not running
    monkeypatch.setattr(pcscd, "find_pcscd",
                        lambda: None if situation == "not installed" else "/usr/sbin/pcscd")
    monkeypatch.setattr(pcscd, "vpcd_configured", lambda: situation != "no vpcd")
    monkeypatch.setattr(pcscd.os, "geteuid", lambda: 1000)
    service = pcsc_helpers.PcscdService(tmp_path)
    with pytest.raises(pcsc_helpers.PcscdUnavailable, match=re.escape(expected)):
        service._start()
    assert service.process is None  # nothing started
