"""Crash-safe writes for the simulators' state files (virtual key state, card files)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: str | os.PathLike, payload: bytes) -> Path:
    """Replace ``path`` with ``payload``, atomically and with mode 0600.

    The bytes go to a temporary file in the same directory, are fsync'd, and the file is
    renamed over the old one, then the directory is fsync'd: a crash at any point leaves the
    old content or the new one, never a mix, and no temporary file behind on error.
    """
    target = Path(path)
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target
