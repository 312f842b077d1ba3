"""A warning in the service's log when the store grows past ``[store] size_warning_mb``.

The store grows with the audit log, which nothing prunes; a disk that fills stops every
login. ``StoreSizeAlarm(path, limit_mb).check()`` looks at the size of the store file with
its ``-wal`` (at most every ``CHECK_EVERY`` seconds, whatever the rate of calls) and logs a
warning (``store is larger than its configured size``, with the size, the limit and the
file) when it is past the limit, at most once every ``REPEAT_EVERY`` seconds. The service
checks when it starts and after every audit event it records. A limit of 0 turns it off.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("token_agent.service")

#: seconds between two looks at the file's size
CHECK_EVERY = 10.0
#: seconds between two warnings
REPEAT_EVERY = 3600.0
MB = 1024 * 1024


class StoreSizeAlarm:
    def __init__(self, path: str | os.PathLike[str], limit_mb: int, *,
                 check_every: float = CHECK_EVERY, repeat_every: float = REPEAT_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.limit = int(limit_mb) * MB
        self.check_every = check_every
        self.repeat_every = repeat_every
        self._clock = clock
        self._lock = threading.Lock()
        self._checked: float | None = None
        self._warned: float | None = None

    def size(self) -> int:
        """Bytes of the store file and its write-ahead log."""
        total = 0
        for p in (self.path, Path(f"{self.path}-wal")):
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total

    def check(self) -> bool:
        """Look at the size (unless looked at less than ``check_every`` s ago); warn when
        past the limit (unless warned less than ``repeat_every`` s ago). Whether it warned."""
        if self.limit <= 0:
            return False
        now = self._clock()
        with self._lock:
            if self._checked is not None and now - self._checked < self.check_every:
                return False
            self._checked = now
            if self._warned is not None and now - self._warned < self.repeat_every:
                return False
            size = self.size()
            if size <= self.limit:
                return False
            self._warned = now
        log.warning("store is larger than its configured size ([store] size_warning_mb): "
                    "look at what fills the audit log (token-agent audit tail), then make room "
                    "or raise the limit", extra={
                        "store": str(self.path), "size_mb": round(size / MB, 1),
                        "limit_mb": self.limit // MB})
        return True
