"""A small blocking client of the service (standard library only).

    from token_agent.service.client import Client, ServiceError

    with Client() as c:                               # the socket of config / env / default
        print(c.request("hello"))
        login = c.request("login.start", user="alice")["login"]
        for event in c.events():                      # prompts, infos, then the result
            if event["event"] == "prompt":
                c.request("login.answer", login=login, prompt=event["prompt"], value=ask(event))
            elif event["event"] == "result":
                break

    outcome = c.login("alice", answer=lambda prompt: "...")   # the same loop, ready-made

One connection, one thread: :meth:`Client.request` sends a request and reads until its
answer comes back, keeping the events that arrive meanwhile for :meth:`Client.events`.
Errors of the service raise :class:`ServiceError` (``code`` as in ``protocol.py``); a service
that cannot be reached, :class:`ServiceUnavailable` (a ``ServiceError`` with code
``unavailable``).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

MAX_LINE = 65536
SOCKET_ENV = "TOKEN_AGENT_SOCKET"


class ServiceError(Exception):
    """The service answered with an error, or could not be reached."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ServiceUnavailable(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


def default_socket_path() -> str:
    """``TOKEN_AGENT_SOCKET``, else the configuration's socket (``token_agent.config``),
    else ``/run/token-agent/agent.sock``."""
    if os.environ.get(SOCKET_ENV):
        return os.environ[SOCKET_ENV]
    try:
        from ..config import load_config

        return str(load_config().service.client_socket_path())
    except Exception:  # a broken config file: the root default
        return "/run/token-agent/agent.sock"


#: a full accept backlog (EAGAIN) is retried this long at most, whatever the timeout
CONNECT_PATIENCE = 10.0


def connect(path: str, timeout: float | None) -> socket.socket:
    """A connected socket. A service whose accept backlog is full (another program flooding
    its socket) answers EAGAIN at once: that is retried, with a growing pause, until
    ``timeout`` (at most ``CONNECT_PATIENCE`` seconds) runs out, instead of failing at the
    first try. A socket that is missing or refused fails at once."""
    patience = CONNECT_PATIENCE if timeout is None else min(timeout, CONNECT_PATIENCE)
    deadline = time.monotonic() + patience
    pause = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            return sock
        except (BlockingIOError, InterruptedError) as e:  # EAGAIN: the backlog is full
            sock.close()
            if time.monotonic() + pause > deadline:
                raise ServiceUnavailable(f"cannot connect to the token-agent service at "
                                         f"{path}: it is not accepting connections (tried "
                                         f"{patience:g} s: {e.strerror or e})") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        except OSError as e:
            sock.close()
            raise ServiceUnavailable(f"cannot connect to the token-agent service at "
                                     f"{path}: {e.strerror or e} (is `token-agent serve` "
                                     "running?)") from None


class Client:
    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = 30.0) -> None:
        """Connect to the service's socket at ``path``. ``timeout``: seconds a request (or
        :meth:`next_event`) waits for the service (None: for ever)."""
        self.path = os.fspath(path) if path is not None else default_socket_path()
        self.timeout = timeout
        self._sock = connect(self.path, timeout)
        self._buffer = b""
        self._ids = itertools.count(1)
        self._events: collections.deque[dict] = collections.deque()
        self._answers: dict[int, dict] = {}
        self.closed = False

    # -- plumbing ------------------------------------------------------------------------------

    def _read_message(self, deadline: float | None) -> dict:
        while b"\n" not in self._buffer:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no message from the service in time")
                self._sock.settimeout(left)
            else:
                self._sock.settimeout(None)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no message from the service in time") from None
            except OSError as e:
                raise ServiceUnavailable(f"connection to the service lost: {e}") from None
            if not chunk:
                self.closed = True
                raise ServiceUnavailable("the service closed the connection")
            self._buffer += chunk
            if b"\n" not in self._buffer and len(self._buffer) > MAX_LINE:
                raise ServiceError("bad-request", "the service sent a line that is too long")
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line.decode("utf-8"))

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    def send(self, op: str, **args: Any) -> int:
        """Send a request without waiting; returns its id (see :meth:`wait`)."""
        rid = next(self._ids)
        data = json.dumps({"id": rid, "op": op, **args}, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8") + b"\n"
        try:
            self._sock.sendall(data)
        except OSError as e:
            self._raise_parting_error()
            raise ServiceUnavailable(f"cannot send to the service: {e}") from None
        return rid

    def _raise_parting_error(self) -> None:
        """The service closed the connection: raise the error it sent before (e.g. too many
        connections), if any."""
        try:
            message = self._read_message(time.monotonic() + 0.5)
        except (ServiceError, TimeoutError, ValueError):
            return
        if message.get("id") is None and message.get("ok") is False:
            error = message.get("error") or {}
            raise ServiceError(error.get("code", "internal"), error.get("message", ""))

    def wait(self, rid: int, timeout: float | None = None) -> dict:
        """The result of request ``rid`` (``ServiceError`` for an error answer)."""
        deadline = self._deadline(timeout)
        while rid not in self._answers:
            message = self._read_message(deadline)
            if "id" in message and "event" not in message:
                if message["id"] is None and not message.get("ok", True):
                    error = message.get("error") or {}
                    raise ServiceError(error.get("code", "internal"), error.get("message", ""))
                self._answers[message["id"]] = message
            else:
                self._events.append(message)
        answer = self._answers.pop(rid)
        if answer.get("ok"):
            return answer.get("result") or {}
        error = answer.get("error") or {}
        raise ServiceError(error.get("code", "internal"), error.get("message", ""))

    def request(self, op: str, timeout: float | None = None, **args: Any) -> dict:
        """Send a request and return its result; :class:`ServiceError` on an error."""
        return self.wait(self.send(op, **args), timeout)

    # -- events --------------------------------------------------------------------------------

    def next_event(self, timeout: float | None = None, *, kind: str | None = None,
                   login: str | None = None) -> dict:
        """The next event (of ``kind``, of ``login``; others are kept); ``TimeoutError``."""
        deadline = self._deadline(timeout)
        while True:
            for event in list(self._events):
                if (kind is None or event.get("event") == kind) and \
                        (login is None or event.get("login") == login):
                    self._events.remove(event)
                    return event
            message = self._read_message(deadline)
            if "event" in message:
                self._events.append(message)
            elif "id" in message:
                if message["id"] is None and not message.get("ok", True):
                    error = message.get("error") or {}
                    raise ServiceError(error.get("code", "internal"), error.get("message", ""))
                self._answers[message["id"]] = message

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """The events, as they come, for ever (``timeout``: per event, None: no limit)."""
        while True:
            try:
                yield self.next_event(timeout if timeout is not None else 1e9)
            except TimeoutError:
                if timeout is not None:
                    return

    # -- a whole login -------------------------------------------------------------------------

    def run_ceremony(self, login: str, answer: Callable[[dict], str | None],
                     on_event: Callable[[dict], None] | None = None,
                     timeout: float | None = None) -> dict:
        """Answer the prompts of ``login`` with ``answer(prompt_event)`` until its result;
        returns the outcome. ``on_event`` sees every event of the login."""
        while True:
            event = self.next_event(timeout, login=login)
            if on_event is not None:
                on_event(event)
            if event["event"] == "prompt":
                self.request("login.answer", login=login, prompt=event["prompt"],
                             value=answer(event))
            elif event["event"] == "result":
                return event["outcome"]

    def login(self, user: str | None, answer: Callable[[dict], str | None], *,
              on_event: Callable[[dict], None] | None = None,
              timeout: float | None = None, **options: Any) -> dict:
        """``login.start`` then :meth:`run_ceremony`; returns the outcome."""
        login = self.request("login.start", user=user, **options)["login"]
        return self.run_ceremony(login, answer, on_event, timeout)

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            self.closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_until_serving(path: str | os.PathLike[str], *, process=None,
                       timeout: float = 30.0) -> None:
    """Wait until the service at ``path`` answers ``hello`` (a service just started).
    ``process``: its ``subprocess.Popen``, so that an exit is noticed at once. Raises
    ``ServiceUnavailable`` when it exits or does not answer within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ServiceUnavailable(f"the service exited (status {process.returncode}) "
                                     "before it answered")
        try:
            with Client(path, timeout=2) as client:
                client.request("hello")
            return
        except (ServiceError, OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"the service at {os.fspath(path)} did not answer "
                                         f"within {timeout:g} s") from None
            time.sleep(0.05)


def answers(*values: str | None) -> Callable[[dict], str | None]:
    """An ``answer`` callable giving ``values`` in order (None once they run out)."""
    queue = list(values)
    return lambda _event: queue.pop(0) if queue else None
