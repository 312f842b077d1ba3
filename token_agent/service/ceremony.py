"""A ceremony in progress (a login, a key enrolment) and how it reaches the person: the
prompts and messages of ``token_agent.ceremonies.login.Interaction`` as events on the
connection that started it, answered by ``login.answer``.

Locks (``protocol.py``, Concurrency): one per user, so that the requests concerning one
user are handled one after another, and one per device (a key's path, a reader), so that a
device serves one ceremony at a time. A ceremony holds its user's lock while it works (store
reads and writes, the password hash) and gives it up while it waits for the person (a
prompt) or for a device (a touch): a login left at a prompt holds nothing but itself.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connections import Connection

log = logging.getLogger("token_agent.service")

KEY_PIN_PROMPT = "Enter the PIN for your security key"
CARD_PIN_PROMPT = "Enter the PIN for your card"
TOUCH_MESSAGE = "Touch your security key"


class NamedLocks:
    """One lock per name (a user, a device path), made on first use."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def get(self, name: str) -> threading.Lock:
        key = str(name).casefold()
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock

    @contextmanager
    def holding(self, name: str, timeout: float = -1) -> Any:
        lock = self.get(name)
        if not lock.acquire(timeout=timeout):
            raise TimeoutError(f"{name} is busy")
        try:
            yield lock
        finally:
            lock.release()


class _Prompt:
    __slots__ = ("id", "kind", "event", "value", "answered")

    def __init__(self, pid: int, kind: str) -> None:
        self.id = pid
        self.kind = kind
        self.event = threading.Event()
        self.value: str | None = None
        self.answered = False


class Ceremony:
    """One login or enrolment, run on its own thread, talking through its connection."""

    def __init__(self, conn: "Connection", kind: str, op: str, user: str | None, *,
                 prompt_timeout: float) -> None:
        self.id = secrets.token_hex(6)
        self.conn = conn
        self.kind = kind  # "login" | "enrol"
        self.op = op
        self.user = user
        self.prompt_timeout = prompt_timeout
        self.cancel = threading.Event()
        self.cancel_cause: str | None = None
        self.done = threading.Event()
        self.started = time.monotonic()
        self.thread: threading.Thread | None = None
        self._prompts: dict[int, _Prompt] = {}
        self._guard = threading.Lock()
        self._ids = itertools.count(1)
        self._user_lock: threading.Lock | None = None
        self._holding = False
        #: called (with the cause) when a prompt's wait ends the ceremony
        self.on_timeout: Callable[[str], None] | None = None

    # -- the user's lock -----------------------------------------------------------------------

    @contextmanager
    def user_locked(self, lock: threading.Lock):
        """Hold ``lock`` (the user's) for the ceremony, except while it waits."""
        lock.acquire()
        self._user_lock, self._holding = lock, True
        try:
            yield
        finally:
            if self._holding:
                lock.release()
            self._user_lock, self._holding = None, False

    @contextmanager
    def unlocked(self):
        """Give the user's lock up for a wait (a prompt, a device), take it back after."""
        lock = self._user_lock if self._holding else None
        if lock is not None:
            self._holding = False
            lock.release()
        try:
            yield
        finally:
            if lock is not None:
                lock.acquire()
                self._holding = True

    # -- prompts -------------------------------------------------------------------------------

    def ask(self, kind: str, message: str, options: list[tuple[str, str]] | None = None,
            default: str | None = None) -> str | None:
        """Send a prompt and wait for its answer (None: no answer, cancelled, timed out)."""
        if self.cancel.is_set():
            return None
        prompt = _Prompt(next(self._ids), kind)
        with self._guard:
            self._prompts[prompt.id] = prompt
        event: dict[str, Any] = {"event": "prompt", "login": self.id, "prompt": prompt.id,
                                 "kind": kind, "message": message}
        if kind == "choose":
            event["options"] = [[k, label] for k, label in options or []]
            event["default"] = default
        try:
            if self.cancel.is_set() or not self.conn.send(event):
                return None
            log.debug("prompt sent", extra={"login": self.id, "prompt": prompt.id,
                                            "kind": kind})
            with self.unlocked():
                answered = prompt.event.wait(self.prompt_timeout)
            if not answered:
                log.info("prompt not answered in time: the login is cancelled",
                         extra={"login": self.id, "prompt": prompt.id,
                                "timeout_s": self.prompt_timeout})
                if self.abandon("prompt-timeout") and self.on_timeout is not None:
                    self.on_timeout("prompt-timeout")
                return None
            return prompt.value
        finally:
            with self._guard:
                self._prompts.pop(prompt.id, None)

    def answer(self, pid: int, value: str | None) -> bool:
        """Answer a waiting prompt; False when no such prompt waits."""
        with self._guard:
            prompt = self._prompts.get(pid)
            if prompt is None or prompt.answered:
                return False
            prompt.answered = True
            prompt.value = value
        prompt.event.set()
        return True

    def abandon(self, cause: str) -> bool:
        """Cancel: every waiting prompt gets no answer, the cancel event is set (a key gets
        CTAPHID_CANCEL). False when it was already cancelled."""
        first = not self.cancel.is_set()
        if first:
            self.cancel_cause = cause
        self.cancel.set()
        with self._guard:
            waiting = list(self._prompts.values())
        for prompt in waiting:
            if not prompt.answered:
                prompt.answered = True
                prompt.value = None
                prompt.event.set()
        return first

    def send(self, message: dict) -> bool:
        return self.conn.send({**message, "login": self.id})


class SocketInteraction:
    """``token_agent.ceremonies.login.Interaction`` over the socket."""

    def __init__(self, ceremony: Ceremony) -> None:
        self.ceremony = ceremony

    def info(self, message: str) -> None:
        # never logged: an info may carry what only the person may see (a TOTP key to type)
        self.ceremony.send({"event": "info", "message": message})

    def secret(self, prompt: str) -> str | None:
        return self.ceremony.ask("secret", prompt)

    def text(self, prompt: str) -> str | None:
        return self.ceremony.ask("text", prompt)

    def choose(self, prompt: str, options: list[tuple[str, str]], default: str) -> str | None:
        return self.ceremony.ask("choose", prompt, options, default)

    def show_qr(self, uri: str) -> None:
        from ..factors.totp import qr_terminal

        self.ceremony.send({"event": "qr", "uri": uri, "text": qr_terminal(uri)})

    # the device callbacks of token_agent.ceremonies.devices

    def key_pin(self) -> str | None:
        return self.secret(KEY_PIN_PROMPT)

    def card_pin(self) -> str | None:
        return self.secret(CARD_PIN_PROMPT)

    def touch(self) -> None:
        self.info(TOUCH_MESSAGE)


def pin_guard(svc, c: Ceremony, ui: SocketInteraction, timeout: float):
    """Who must touch the key before its PIN is tried in this ceremony
    (``ceremonies/keypresence.py``): a caller other than the login service (a user's own
    screen locker, ``enrol.key``) always, the login service when few tries are left."""
    from ..ceremonies.keypresence import PinGuard

    return PinGuard(trusted=svc.rules.is_login_service(c.conn.peer), on_touch=ui.touch,
                    timeout=timeout, cancel=c.cancel)
