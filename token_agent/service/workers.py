"""A bounded pool of worker threads for the service's ceremonies (logins, key enrolments).

    pool = WorkerPool(64, name="token-agent-worker")
    if not pool.submit(run, ceremony):     # False: every worker is busy, or no thread could
        refuse("busy")                     # be started (the caller says so; nothing queues)
    pool.shutdown(timeout=5)

Nothing ever waits in a queue: a task either gets a worker at once or ``submit`` returns
False, so a flood of requests costs the flooder a refusal and nobody else a wait. Workers
are started on demand, kept for ``idle_seconds`` after their last task (so a burst of logins
does not start a thread per login), and never more than ``size`` of them exist. A thread
that the system refuses to start (``RuntimeError: can't start new thread`` under a task
limit) is a refused task, never an exception in the caller.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("token_agent.service")


class WorkerPool:
    def __init__(self, size: int, *, name: str = "worker", idle_seconds: float = 30.0) -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.size = size
        self.name = name
        self.idle_seconds = idle_seconds
        self._guard = threading.Lock()
        self._idle: list["_Worker"] = []
        self._workers: set["_Worker"] = set()
        self._busy = 0
        self._closed = False
        self._serial = 0

    @property
    def busy(self) -> int:
        """Tasks running now."""
        with self._guard:
            return self._busy

    @property
    def threads(self) -> int:
        """Worker threads alive now (busy or idle)."""
        with self._guard:
            return len(self._workers)

    def submit(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on a worker now; False when all ``size`` are busy, the pool is
        shut down, or no thread could be started."""
        with self._guard:
            if self._closed or self._busy >= self.size:
                return False
            self._busy += 1
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self._serial += 1
                worker = _Worker(self, f"{self.name}-{self._serial}")
                self._workers.add(worker)
                fresh = True
            else:
                fresh = False
            worker.task = (fn, args)
        if fresh:
            try:
                worker.thread.start()
            except RuntimeError as e:  # the system's task limit: refused, not raised
                log.error("cannot start a worker thread: %s", e)
                with self._guard:
                    self._workers.discard(worker)
                    self._busy -= 1
                return False
        worker.wake.set()
        return True

    def shutdown(self, timeout: float = 5.0) -> None:
        """Refuse new tasks; idle workers end at once, busy ones after their task."""
        with self._guard:
            self._closed = True
            idle, self._idle = self._idle, []
            workers = list(self._workers)
        for w in idle:
            w.task = None
            w.wake.set()
        for w in workers:
            if w.thread.is_alive():
                w.thread.join(timeout)

    # -- the workers' side ---------------------------------------------------------------------

    def _done(self, worker: "_Worker") -> bool:
        """A task ended: back to the idle list (True) or end the thread (pool closed)."""
        with self._guard:
            self._busy -= 1
            if self._closed:
                self._workers.discard(worker)
                return False
            worker.wake.clear()
            self._idle.append(worker)
            return True

    def _expire(self, worker: "_Worker") -> bool:
        """An idle worker's wait ran out: end it unless a task was given to it meanwhile."""
        with self._guard:
            if worker in self._idle:
                self._idle.remove(worker)
                self._workers.discard(worker)
                return True
            return False


class _Worker:
    def __init__(self, pool: WorkerPool, name: str) -> None:
        self.pool = pool
        self.task: tuple[Callable[..., Any], tuple] | None = None
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while True:
            if not self.wake.wait(self.pool.idle_seconds):
                if self.pool._expire(self):
                    return
                self.wake.wait()  # a task was handed over while the wait ran out
            task, self.task = self.task, None
            if task is None:  # shut down while idle
                return
            fn, args = task
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001: a task's failure never kills its worker
                log.exception("a service task failed")
            if not self.pool._done(self):
                return
