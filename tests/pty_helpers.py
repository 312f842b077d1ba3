"""The `token-agent` CLI on a pseudo-terminal, as a person at a keyboard runs it.

``PtySession`` starts the command in a new session whose controlling terminal is the pty's
slave side (stdin and stderr on it, stdout on a pipe), so that typing ``\\x03`` on the
master side is a real Ctrl-C: the kernel's line discipline sends SIGINT to the foreground
process group. The slave stays open here, so its termios flags (echo on or off) can be read
while the command runs and after it exits."""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import termios
import threading
import time

from conftest import REPO_ROOT, token_agent_command

CTRL_C = b"\x03"


def _take_terminal() -> None:  # in the child, after setsid: the pty becomes its terminal
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtySession:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, self.slave = os.openpty()
        self._output = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.process = subprocess.Popen(
            token_agent_command() + list(args), stdin=self.slave, stderr=self.slave,
            stdout=subprocess.PIPE, cwd=REPO_ROOT, env=dict(os.environ, **env),
            start_new_session=True, preexec_fn=_take_terminal)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.master], [], [], 0.05)[0]:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self._output += data

    @property
    def terminal(self) -> str:
        """Everything written to the terminal (stderr and the echo) so far."""
        with self._lock:
            return self._output.decode(errors="replace")

    def echo_on(self) -> bool:
        return bool(termios.tcgetattr(self.slave)[3] & termios.ECHO)

    def wait_for(self, predicate, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"waited for {what}; exit {self.process.poll()}, "
                             f"terminal:\n{self.terminal}")

    def wait_for_text(self, text: str, timeout: float = 20.0) -> None:
        self.wait_for(lambda: text in self.terminal, repr(text), timeout)

    def wait_for_hidden_prompt(self, text: str) -> None:
        """``text`` shown and the terminal's echo turned off (the prompt is reading)."""
        self.wait_for(lambda: text in self.terminal and not self.echo_on(),
                      f"{text!r} with echo off")

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        """Wait for the exit: ``(exit code, stdout, terminal)``."""
        try:
            stdout, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            stdout, _ = self.process.communicate()
            raise AssertionError(f"still running after {timeout} s; terminal:\n{self.terminal}")
        time.sleep(0.1)  # the reader drains what is left
        return self.process.returncode, stdout.decode(errors="replace"), self.terminal

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._stop.set()
        self._reader.join()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
