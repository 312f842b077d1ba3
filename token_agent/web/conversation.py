"""A sign-in in progress: the login flow (``ceremonies/login.py``) running in a thread of
its own, talking to the person through pages.

The login flow asks its questions through an ``Interaction`` (a password, a code, a choice of
method) and blocks until they are answered. Here each question becomes a ``Prompt`` that the
next page shows; the page's form answers it. So the browser runs exactly the flow the
terminal, the service and PAM run, with the same policy, lockouts and audit: nothing of it is
written again for the web.

    conv = conversations.start(run)        # run(conv) -> LoginOutcome, in a new thread
    state = conv.wait_turn(2.0)            # a prompt to show, the outcome, or still busy
    conv.answer({"answer": "123456"})      # the page's form answers the current prompt

A sign-in in progress lives in the memory of the replica that started it (its thread is
there); a load balancer in front of several replicas keeps a browser on one replica for the
few minutes a sign-in takes (the session that results is in the store, for every replica).
Limits: ``limit`` sign-ins in progress per replica, ``PER_ADDRESS`` per client address, and an
unanswered prompt ends the sign-in as cancelled after ``answer_timeout`` seconds: a stranger
can hold neither memory nor threads for long.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("token_agent.web.signin")

#: sign-ins in progress per client address, at most
PER_ADDRESS = 8
#: info lines kept for the next page, at most
MAX_INFO = 20


@dataclass
class Prompt:
    """One question of the flow. ``kind``: ``secret`` | ``text`` | ``choose`` or a custom kind
    rendered by ``signin/prompt_<kind>.html``; ``label``: the question; ``options``: the
    choices of ``choose`` (value, label); ``data``: what a custom kind's page needs."""

    kind: str
    label: str
    options: list[tuple[str, str]] = field(default_factory=list)
    default: str | None = None
    data: dict = field(default_factory=dict)


class Busy(Exception):
    """Too many sign-ins in progress (on this replica, or from this address)."""


class Conversation:
    def __init__(self, conv_id: str, address: str, answer_timeout: float,
                 purpose: str = "sign-in", user_id: str | None = None) -> None:
        self.id = conv_id
        self.address = address
        self.purpose = purpose
        #: the session's user, for a re-authentication
        self.user_id = user_id
        self.answer_timeout = answer_timeout
        self.cancel_event = threading.Event()
        self._cond = threading.Condition()
        self._prompt: Prompt | None = None
        self._answer: dict | None = None
        self._answered = False
        self._infos: list[dict] = []
        self.outcome: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.turn = 0
        self.last_active = time.monotonic()
        #: what a custom step keeps between its prompt and the answer (e.g. a challenge)
        self.state: dict = {}

    # ---- the flow's side (its thread)
    def ask(self, prompt: Prompt) -> dict | None:
        """Show ``prompt`` and wait for the page's answer (a dict of the form's fields), or
        None: cancelled, or no answer in time."""
        with self._cond:
            self._prompt, self._answer, self._answered = prompt, None, False
            self.turn += 1
            self._cond.notify_all()
            deadline = time.monotonic() + self.answer_timeout
            while not self._answered and not self.cancel_event.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.info("a sign-in got no answer in %.0f s: cancelled", self.answer_timeout)
                    self.cancel_event.set()
                    break
                self._cond.wait(min(left, 1.0))
            self._prompt = None
            answer = self._answer if self._answered else None
            self._answer, self._answered = None, False
            return answer

    def tell(self, message: str, **extra: Any) -> None:
        """An info line for the person (shown on the next page)."""
        with self._cond:
            self._infos.append({"text": str(message), **extra})
            del self._infos[:-MAX_INFO]
            self._cond.notify_all()

    def _finish(self, outcome: Any, error: BaseException | None) -> None:
        with self._cond:
            self.outcome, self.error, self.done = outcome, error, True
            self._prompt = None
            self._cond.notify_all()

    # ---- the pages' side
    def wait_turn(self, timeout: float) -> Prompt | None:
        """Wait up to ``timeout`` s for the flow to ask something or finish: the prompt to
        show (None: finished, see ``done``, or still busy)."""
        self.last_active = time.monotonic()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.done and (self._prompt is None or self._answered):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return None if self.done else self._prompt

    def current(self) -> Prompt | None:
        with self._cond:
            return None if (self.done or self._answered) else self._prompt

    def infos(self) -> list[dict]:
        with self._cond:
            return list(self._infos)

    def clear_infos(self) -> None:
        with self._cond:
            self._infos.clear()

    def answer(self, values: dict | None, turn: int | None = None) -> bool:
        """Answer the current prompt (None: cancel). ``turn``: the prompt the page showed; an
        answer to an older prompt (a form sent twice) is ignored. False when ignored."""
        self.last_active = time.monotonic()
        with self._cond:
            if values is None:
                self.cancel_event.set()
                self._cond.notify_all()
                return True
            if self._prompt is None or self._answered or (turn is not None and turn != self.turn):
                return False
            self._answer, self._answered = values, True
            self._cond.notify_all()
            return True

    def cancel(self) -> None:
        self.answer(None)


class Conversations:
    """The sign-ins in progress on this replica."""

    def __init__(self, *, limit: int, answer_timeout: float) -> None:
        self.limit = limit
        self.answer_timeout = answer_timeout
        self._lock = threading.Lock()
        self._all: dict[str, Conversation] = {}

    def start(self, run: Callable[[Conversation], Any], *, address: str,
              purpose: str = "sign-in", user_id: str | None = None) -> Conversation:
        """A new conversation running ``run(conv)`` in a thread; ``Busy`` past the limits."""
        self.purge()
        with self._lock:
            live = [c for c in self._all.values() if not c.done]
            if len(live) >= self.limit:
                raise Busy("too many sign-ins in progress on this server")
            if sum(1 for c in live if c.address == address) >= PER_ADDRESS:
                raise Busy("too many sign-ins in progress from this address")
            conv = Conversation(secrets.token_urlsafe(32), address, self.answer_timeout,
                                purpose, user_id)
            self._all[conv.id] = conv

        def main() -> None:
            outcome, error = None, None
            try:
                outcome = run(conv)
            except BaseException as e:  # noqa: BLE001  (reported to the page, logged)
                log.exception("a sign-in failed unexpectedly")
                error = e
            conv._finish(outcome, error)

        threading.Thread(target=main, name=f"web-{purpose}", daemon=True).start()
        return conv

    def get(self, conv_id: str | None) -> Conversation | None:
        if not conv_id:
            return None
        with self._lock:
            return self._all.get(conv_id)

    def drop(self, conv: Conversation) -> None:
        conv.cancel()
        with self._lock:
            self._all.pop(conv.id, None)

    def purge(self) -> None:
        """Forget finished sign-ins nobody came back for, and cancel abandoned ones."""
        now = time.monotonic()
        with self._lock:
            for conv_id, conv in list(self._all.items()):
                idle = now - conv.last_active
                if conv.done and idle > 120:
                    del self._all[conv_id]
                elif not conv.done and idle > self.answer_timeout + 60:
                    conv.cancel_event.set()

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for c in self._all.values() if not c.done)
