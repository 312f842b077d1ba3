"""The real pcscd, with vsmartcard's vpcd reader driver, for the virtual card: found running,
started by socket activation, or started here (``pcscd --foreground --auto-exit``, root only).

    pcscd = Pcscd(log=Path("pcscd.log")).start()   # PcscdUnavailable says what to do
    reader = pcscd.reader(0)                        # "Virtual PCD 00 00"
    ...
    pcscd.stop()                                    # stops it only if it was started here

Used by the demonstration (``token_agent.demo``), by the test suite's pcscd fixture and by the
pytest plugin (:mod:`simulators.pytest_plugin`). pcscd is one per machine (its socket is
/run/pcscd/pcscd.comm) and so are vpcd's slots: :class:`LockedPcscd` takes turns with other
test sessions through an exclusive ``flock`` on :data:`LOCK_FILE`; :func:`insert_card` and
:func:`remove_card` put virtual cards into vpcd's readers the way pcscd notices reliably.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .vpcd import VpcdBridge, find_reader

#: vpcd's reader configuration as Debian's vsmartcard-vpcd installs it
VPCD_CONF = Path("/etc/reader.conf.d/vpcd")
START_TIMEOUT = 15.0

INSTALL_HINT = ("install the PC/SC stack: `sudo apt-get install -y pcscd vsmartcard-vpcd opensc` "
                "(scripts/setup.sh does this when run as root)")
START_HINT = ("start pcscd: `sudo systemctl start pcscd.socket pcscd` (Debian's pcscd, which "
              "loads vsmartcard-vpcd's reader configuration), or run as root so that pcscd "
              "can be started in the foreground here")


class PcscdUnavailable(Exception):
    """pcscd with the vpcd reader cannot be used here; the message says what to do."""


def find_pcscd() -> str | None:
    """pcscd's path (it lives in /usr/sbin, often not on a user's PATH), or None."""
    return shutil.which("pcscd") or next(
        (p for p in ("/usr/sbin/pcscd", "/sbin/pcscd") if os.path.exists(p)), None)


def running_pcscd() -> list[str]:
    """The pcscd processes running now, as "pid N (parent M: its command, started T s after
    boot)": for messages about a pcscd this session did not start."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "pcscd":
                continue
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            ppid, started = stat[1], int(stat[19]) / os.sysconf("SC_CLK_TCK")
            parent = (Path("/proc") / ppid / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        found.append(f"pid {entry.name} (parent {ppid}: {parent.decode(errors='replace')[:120].strip()}"
                     f", started {started:.0f} s after boot)")
    return found


def vpcd_configured() -> bool:
    return VPCD_CONF.exists()


def _scard():
    from smartcard import scard

    return scard


def establish_context():
    """A PC/SC context (SCARD_SCOPE_USER), or None when pcscd does not answer."""
    scard = _scard()
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        return None
    return context


def release_context(context) -> None:
    if context is not None:
        _scard().SCardReleaseContext(context)


def list_readers(context) -> list[str]:
    scard = _scard()
    hresult, readers = scard.SCardListReaders(context, [])
    if hresult != scard.SCARD_S_SUCCESS:
        return []
    return list(readers)


class Pcscd:
    """The machine's pcscd while it is used here: holds a PC/SC context (which also keeps an
    ``--auto-exit`` pcscd alive) and, when it started pcscd, the process."""

    def __init__(self, log: Path | None = None) -> None:
        self.log = log
        self.process: subprocess.Popen | None = None  # set when started here
        #: the pcscd found running at start (``running_pcscd``), when not started here
        self.found_running: list[str] = []
        self.context = None

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def reader(self, slot: int = 0) -> str:
        name = find_reader(list_readers(self.context), slot)
        if name is None:
            raise PcscdUnavailable(f"pcscd has no vpcd reader for slot {slot}: "
                                   f"{list_readers(self.context)}")
        return name

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace") if self.log else ""
        except OSError:
            return ""

    def start(self) -> "Pcscd":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        context = establish_context()  # also starts a socket-activated pcscd
        if context is not None:
            self.found_running = running_pcscd()
        if context is None:
            pcscd = find_pcscd()
            if pcscd is None:
                raise PcscdUnavailable(f"pcscd is not installed: {INSTALL_HINT}")
            if not vpcd_configured():
                raise PcscdUnavailable(f"vsmartcard-vpcd is not installed ({VPCD_CONF} is "
                                       f"missing): {INSTALL_HINT}")
            if os.geteuid() != 0:
                raise PcscdUnavailable(f"pcscd is not running and only root can start it: "
                                       f"{START_HINT}")
            out = subprocess.DEVNULL
            if self.log is not None:
                self.log.parent.mkdir(parents=True, exist_ok=True)
                out = open(self.log, "wb")  # noqa: SIM115 (kept open for the child's lifetime)
            try:
                # --auto-exit: should this process die without stopping it, pcscd exits on its
                # own a minute after its last client
                self.process = subprocess.Popen(
                    [pcscd, "--foreground", "--auto-exit"], stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            finally:
                if out is not subprocess.DEVNULL:
                    out.close()
            deadline = time.monotonic() + START_TIMEOUT
            while context is None:
                if self.process.poll() is not None:
                    raise PcscdUnavailable(
                        f"pcscd exited at once (code {self.process.returncode}); its output:\n"
                        f"{self.output()}")
                if time.monotonic() > deadline:
                    raise PcscdUnavailable(f"pcscd did not answer within {START_TIMEOUT:g} s; "
                                           f"its output:\n{self.output()}")
                time.sleep(0.05)
                context = establish_context()
        self.context = context
        deadline = time.monotonic() + START_TIMEOUT
        while find_reader(list_readers(context), 0) is None:
            if time.monotonic() > deadline:
                hint = ("restart pcscd so that it loads vsmartcard-vpcd's reader (`sudo "
                        "systemctl restart pcscd`)" if not self.started_here else INSTALL_HINT)
                raise PcscdUnavailable(
                    f"pcscd runs but shows no 'Virtual PCD' reader (readers: "
                    f"{list_readers(context)}): {hint}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Release the context; stop pcscd if it was started here (SIGTERM, then SIGKILL)."""
        release_context(self.context)
        self.context = None
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# -- taking turns with other test sessions ------------------------------------------------------

#: serialises the machine's pcscd and vpcd slots between concurrent test sessions
LOCK_FILE = Path(tempfile.gettempdir()) / "token-agent-pcsc-tests.lock"
LOCK_TIMEOUT = 900.0
#: names a file descriptor, open on :data:`LOCK_FILE` and holding its lock, that a test session
#: hands to a test session it runs itself (``subprocess.Popen(..., pass_fds=[fd])``): the child
#: uses that lock instead of waiting for its parent to let go
LOCK_FD_ENV = "TOKEN_AGENT_PCSC_LOCK_FD"


def _inherited_lock_fd() -> int | None:
    """The descriptor named by :data:`LOCK_FD_ENV`, if it is open on :data:`LOCK_FILE`."""
    value = os.environ.get(LOCK_FD_ENV, "")
    if not value.isdigit():
        return None
    try:
        held, lock = os.fstat(int(value)), os.stat(LOCK_FILE)
    except OSError:
        return None
    if (held.st_dev, held.st_ino) != (lock.st_dev, lock.st_ino):
        return None
    return os.dup(int(value))  # the same open file description: it holds the lock already


class LockedPcscd(Pcscd):
    """:class:`Pcscd` for a test session: started under an exclusive lock on
    :data:`LOCK_FILE` (another session using pcscd and vpcd's slots is waited for, up to
    :data:`LOCK_TIMEOUT` seconds), released by :meth:`stop`. ``log_dir`` gets pcscd.log."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log=Path(log_dir) / "pcscd.log")
        self.log_dir = Path(log_dir)
        self._lock_fd: int | None = None

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the lock while started (see :data:`LOCK_FD_ENV`)."""
        return self._lock_fd

    def start(self) -> "LockedPcscd":
        self._take_lock()
        super().start()
        return self

    def _take_lock(self) -> None:
        fd = _inherited_lock_fd()
        if fd is None:
            fd = os.open(LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o666)
        deadline = time.monotonic() + LOCK_TIMEOUT
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise PcscdUnavailable(
                        f"another test session has held {LOCK_FILE} (the machine's pcscd and "
                        f"vpcd slots) for {LOCK_TIMEOUT:g} s") from None
                if not told:
                    print(f"\n[pcscd] waiting for another test session's card tests "
                          f"({LOCK_FILE})", file=sys.stderr)
                    told = True
                time.sleep(0.5)
        self._lock_fd = fd

    def stop(self) -> None:
        super().stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock (unless a child still holds a copy)
            self._lock_fd = None


# -- cards in vpcd's readers ----------------------------------------------------------------------


def reader_state(context, reader: str) -> tuple[int, bytes]:
    """(event state flags, ATR) of ``reader`` right now."""
    scard = _scard()
    hresult, states = scard.SCardGetStatusChange(context, 0, [(reader, scard.SCARD_STATE_UNAWARE)])
    if hresult != scard.SCARD_S_SUCCESS:
        raise RuntimeError(f"SCardGetStatusChange: {scard.SCardGetErrorMessage(hresult)}")
    return states[0][1], bytes(states[0][2])


def wait_for_card(context, reader: str, present: bool = True, timeout: float = 5.0
                  ) -> tuple[float, bytes]:  # fmt: skip
    """Wait, with SCardGetStatusChange, until ``reader`` reports a card present (or absent);
    returns (seconds waited, ATR). Raises TimeoutError."""
    scard = _scard()
    start = time.monotonic()
    deadline = start + timeout
    state, atr = reader_state(context, reader)
    want = scard.SCARD_STATE_PRESENT if present else scard.SCARD_STATE_EMPTY
    while not state & want:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{reader}: card still {'absent' if present else 'present'} "
                               f"after {timeout:g} s (state 0x{state:x})")
        hresult, states = scard.SCardGetStatusChange(
            context, max(1, int(left * 1000)), [(reader, state & ~scard.SCARD_STATE_CHANGED)])
        if hresult == scard.SCARD_E_TIMEOUT:
            continue
        if hresult != scard.SCARD_S_SUCCESS:
            raise RuntimeError(f"SCardGetStatusChange: {scard.SCardGetErrorMessage(hresult)}")
        state, atr = states[0][1], bytes(states[0][2])
    return time.monotonic() - start, atr


#: seconds between a slot's last removal and the next insertion (see insert_card)
REINSERT_GAP = 1.2
_last_removal: dict[int, float] = {}


def insert_card(pcscd: Pcscd, card, slot: int = 0, **options) -> VpcdBridge:
    """Put ``card`` (a :class:`simulators.card.card.VirtualCard`) into vpcd's reader ``slot``:
    a :class:`VpcdBridge` (``options`` go to it), inserted. Take it out with
    :func:`remove_card`.

    Before inserting, it waits until pcscd has seen the slot empty: a card taken out just
    before is only noticed at pcscd's next presence poll (up to 400 ms), and a card put in
    before that poll is never reported as a new insertion. It also leaves
    :data:`REINSERT_GAP` seconds after the slot's last removal: seen here, pcscd (1.9.9 with
    vpcd) can miss a card put back about a second after one was pulled out mid-transaction."""
    wait_for_card(pcscd.context, pcscd.reader(slot), present=False)
    gap = _last_removal.get(slot, 0.0) + REINSERT_GAP - time.monotonic()
    if gap > 0:
        time.sleep(gap)
    bridge = VpcdBridge(card, slot=slot, **options)
    bridge.requested_at = time.monotonic()  # for tests that time what follows insertion
    bridge.insert()
    return bridge


def remove_card(bridge: VpcdBridge) -> None:
    """Take the card out (its state saved) and note when, for the next :func:`insert_card`.
    A card whose state cannot be saved (a test broke its file) is out regardless."""
    try:
        bridge.remove()
    except Exception:
        pass
    _last_removal[bridge.slot if bridge.slot is not None else 0] = time.monotonic()
