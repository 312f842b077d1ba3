"""One crash-safe way for the agent to write a private file (companion files, QR codes,
the developer outbox, the CRL cache).

``write_private(path, payload)`` writes to a temporary file in the same directory (mode 0600
whatever the umask), flushes it to disk, renames it over ``path`` and flushes the directory:
a crash leaves the old content or the new one, never a mix, and no temporary file is left
behind on error. ``exclusive=True`` refuses to replace an existing file (``FileExistsError``),
atomically (a hard link, not a check-then-rename). The simulators have their own copy
(``simulators/atomicfile.py``): they are a product of their own and do not import the agent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: str | os.PathLike[str], payload: bytes, *,
                  exclusive: bool = False) -> Path:
    """Replace (or, with ``exclusive``, create) ``path`` with ``payload``, atomically, mode
    0600. The directory must exist. Raises ``OSError`` (nothing is left half-written)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, target)  # FileExistsError when it exists: never overwritten
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # the file is in place; only its durability across a power cut is less certain
    return target
