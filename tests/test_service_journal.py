"""The service's logs under systemd, from a real `token-agent serve` (issue 12): when its
stderr is the journal stream named by JOURNAL_STREAM (its st_dev:st_ino), every line carries
its sd-daemon priority (``<6>`` info, ``<4>`` warning, ``<3>`` error, on each line of a
multi-line record); with JSON logs and journald's native socket there, each record arrives
there as journal fields (decoded here as journald would), and a socket that does not take
them sends the records back to stderr, prefixed. Without JOURNAL_STREAM naming stderr,
nothing changes. The records: "listening" (info, with fields), the warning about a bad
NOTIFY_SOCKET, and "reload refused" (error, a two-line message) after a SIGHUP with a wrong
configuration."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, token_agent_command
from token_agent.service.client import wait_until_serving

LISTENING = "token-agent service listening"
NOTIFY_WARNING = "NOTIFY_SOCKET 'not-a-path' is not a Unix socket path: ignored"
REFUSED = "reload refused, nothing changed"


@pytest.fixture
def short_dir():
    """Socket paths must stay short (108 bytes): a directory under /tmp."""
    d = Path(tempfile.mkdtemp(prefix="ta-journal-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Service:
    def __init__(self, tmp_path: Path, short_dir: Path, log_format: str) -> None:
        self.config = tmp_path / "config.toml"
        self.body = textwrap.dedent(f"""\
            [service]
            socket = "{short_dir / 'agent.sock'}"
            [store]
            data_dir = "{tmp_path / 'data'}"
            [policy]
            file = "{tmp_path / 'policy.toml'}"
            [cards]
            lock_command = "true"
            [logging]
            level = "info"
            format = "{log_format}"
        """)
        (tmp_path / "policy.toml").write_text("")
        self.config.write_text(self.body)
        self.socket = short_dir / "agent.sock"
        self.stderr = tmp_path / "stderr.log"
        self.proc: subprocess.Popen | None = None

    def start(self, journal_stream: str | None = None, **env: str) -> None:
        """Start it with stderr to a file; ``journal_stream``: "stderr" for that file's
        dev:ino, or a given value."""
        out = open(self.stderr, "wb")
        if journal_stream == "stderr":
            st = os.fstat(out.fileno())
            journal_stream = f"{st.st_dev}:{st.st_ino}"
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("TOKEN_AGENT_", "JOURNAL_STREAM", "NOTIFY_SOCKET"))}
        environ.update(PYTHONUNBUFFERED="1", NOTIFY_SOCKET="not-a-path", **env)
        if journal_stream is not None:
            environ["JOURNAL_STREAM"] = journal_stream
        self.proc = subprocess.Popen(
            token_agent_command() + ["serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO_ROOT, env=environ,
            start_new_session=True)
        out.close()
        wait_until_serving(self.socket, process=self.proc, timeout=20)

    def refuse_a_reload(self) -> None:
        """SIGHUP with a configuration with two mistakes: an error record of two lines."""
        self.config.write_text(self.body.replace('level = "info"', 'level = "loud"')
                               .replace("[cards]", "[cards]\nreaders = 7"))
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(15) == 0
        return self.stderr.read_text()

    def wait_for_stderr(self, text: str) -> None:
        deadline = time.monotonic() + 15
        while text not in self.stderr.read_text():
            assert time.monotonic() < deadline, f"{text!r} not in:\n{self.stderr.read_text()}"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def service(tmp_path, short_dir):
    made: list[Service] = []

    def make(log_format: str) -> Service:
        made.append(Service(tmp_path, short_dir, log_format))
        return made[-1]

    yield make
    for s in made:
        s.kill()


def decode(datagram: bytes) -> dict[str, str]:
    """journald's reading of a native datagram: ``NAME=value\\n``, or ``NAME\\n``, a 64-bit
    little-endian length, that many bytes, ``\\n``."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            name, _, value = line.partition(b"=")
            rest = after
        else:
            name = line
            (size,) = struct.unpack("<Q", after[:8])
            value, end = after[8:8 + size], after[8 + size:9 + size]
            assert end == b"\n", datagram
            rest = after[9 + size:]
        assert name and name == name.upper() and not name.startswith(b"_"), datagram
        fields[name.decode()] = value.decode()
    return fields


def entry(datagrams: list[bytes], message: str) -> dict[str, str]:
    found = [decode(d) for d in datagrams if decode(d)["MESSAGE"].startswith(message)]
    assert len(found) == 1, [decode(d) for d in datagrams]
    return found[0]


class JournalReader:
    """A journal's socket read all the time, as journald reads its own (the kernel queues
    only net.unix.max_dgram_qlen datagrams, 10 by default, for a reader that does not)."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.got: list[bytes] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stopped.is_set():
            try:
                self.got.append(self.sock.recv(65536))
            except socket.timeout:
                continue

    def until(self, message: str, timeout: float = 15) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while not any(decode(d)["MESSAGE"].startswith(message) for d in list(self.got)):
            assert time.monotonic() < deadline, \
                f"no {message!r} among {[decode(d) for d in self.got]}"
            time.sleep(0.02)
        return list(self.got)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


def test_json_records_arrive_as_journal_fields(service, short_dir):
    journal = JournalReader(short_dir / "journal.socket")
    try:
        svc = service("json")
        svc.start("stderr", TOKEN_AGENT_JOURNAL_SOCKET=str(short_dir / "journal.socket"))
        journal.until(LISTENING)
        svc.refuse_a_reload()
        datagrams = journal.until(REFUSED)
        stderr = svc.stop()
    finally:
        journal.close()

    listening = entry(datagrams, LISTENING)
    assert listening["PRIORITY"] == "6" and listening["SYSLOG_IDENTIFIER"] == "token-agent"
    assert listening["TOKEN_AGENT_SOCKET"] == str(svc.socket)
    assert listening["TOKEN_AGENT_PID"] == str(svc.proc.pid)
    assert listening["LOGGER"] == "token_agent.service"
    assert listening["CODE_FILE"].endswith("server.py") and listening["CODE_LINE"].isdigit()
    assert listening["CODE_FUNC"] == "start"

    assert entry(datagrams, NOTIFY_WARNING)["PRIORITY"] == "4"

    refused = entry(datagrams, REFUSED)
    assert refused["PRIORITY"] == "3"
    assert refused["MESSAGE"].count("\n") == 1  # two problems, one a line
    errors = json.loads(refused["TOKEN_AGENT_ERRORS"])
    assert len(errors) == 2 and "\n".join(errors) in refused["MESSAGE"]
    raw = next(d for d in datagrams if decode(d)["PRIORITY"] == "3")
    assert raw.startswith(b"MESSAGE\n")  # the multi-line value in the binary length form

    for message in (LISTENING, NOTIFY_WARNING, REFUSED):  # sent there, not also to stderr
        assert message not in stderr


def test_json_records_go_back_to_stderr_when_the_socket_refuses_them(service, short_dir):
    not_a_socket = short_dir / "journal.socket"
    not_a_socket.write_text("")
    svc = service("json")
    svc.start("stderr", TOKEN_AGENT_JOURNAL_SOCKET=str(not_a_socket))
    svc.refuse_a_reload()
    svc.wait_for_stderr(REFUSED)
    lines = svc.stop().splitlines()
    listening = [line for line in lines if LISTENING in line]
    assert len(listening) == 1 and listening[0].startswith("<6>{")
    assert json.loads(listening[0][3:])["socket"] == str(svc.socket)
    assert any(line.startswith("<4>{") and "NOTIFY_SOCKET" in line for line in lines)
    assert any(line.startswith("<3>{") and REFUSED in line for line in lines)


def test_text_lines_carry_their_priority_when_stderr_is_the_journal(service):
    svc = service("text")
    svc.start("stderr")
    svc.refuse_a_reload()
    svc.wait_for_stderr(REFUSED)
    lines = svc.stop().splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>") for line in lines), lines
    assert any(line.startswith("<6>") and LISTENING in line for line in lines)
    assert any(line.startswith("<4>") and NOTIFY_WARNING in line for line in lines)
    refused = [i for i, line in enumerate(lines) if REFUSED in line]
    assert len(refused) == 1 and lines[refused[0]].startswith("<3>")
    assert lines[refused[0] + 1].startswith("<3>")  # the message's second line too


@pytest.mark.parametrize("journal_stream", [None, "1:2", "not-a-stream"])
def test_no_prefixes_when_stderr_is_not_the_journal(service, short_dir, journal_stream):
    path = short_dir / "journal.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(path))
        svc = service("json")
        svc.start(journal_stream, TOKEN_AGENT_JOURNAL_SOCKET=str(path))
        lines = svc.stop().splitlines()
        journal.setblocking(False)
        with pytest.raises(BlockingIOError):
            journal.recv(65536)
    assert any(LISTENING in line for line in lines)
    assert all(line.startswith("{") for line in lines), lines


def test_a_journal_that_does_not_read_does_not_stop_the_service(service, short_dir):
    """The journal's socket is there but nobody reads it (a hung journald): its queue fills
    (net.unix.max_dgram_qlen datagrams), and the service still starts and answers at once,
    its records going to stderr."""
    path = short_dir / "journal.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(path))
        svc = service("json")
        started = time.monotonic()
        svc.start("stderr", TOKEN_AGENT_JOURNAL_SOCKET=str(path))
        took = time.monotonic() - started
        stderr = svc.stop()
    assert took < 10, f"the service took {took:.1f} s to start with a journal not reading"
    assert any(LISTENING in line for line in stderr.splitlines()), stderr
