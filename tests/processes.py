"""Stopping the daemons the tests start (the virtual key server, pcscd)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM to the process's group, SIGKILL if it is still there after ``timeout`` seconds;
    returns its exit code. The process must have been started with ``start_new_session``."""
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout if sig == signal.SIGTERM else 5)
                break
            except subprocess.TimeoutExpired:
                continue
    return proc.returncode
