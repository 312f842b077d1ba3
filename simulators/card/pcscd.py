"""The real pcscd, with vsmartcard's vpcd reader driver, for the virtual card: found running,
started by socket activation, or started here (``pcscd --foreground --auto-exit``, root only).

    pcscd = Pcscd(log=Path("pcscd.log")).start()   # PcscdUnavailable says what to do
    reader = pcscd.reader(0)                        # "Virtual PCD 00 00"
    ...
    pcscd.stop()                                    # stops it only if it was started here

Used by the demonstration (``token_agent.demo``) and by the test suite's pcscd fixture.
pcscd is one per machine (its socket is /run/pcscd/pcscd.comm) and so are vpcd's slots.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .vpcd import find_reader

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
