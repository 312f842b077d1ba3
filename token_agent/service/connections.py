"""The service's sockets and connections: listening, accepting, admitting, reading and
writing. What a request *does* is the request handlers' (``handlers/``, dispatched by
``server.py``); this module only gets messages in and out, and keeps the sockets usable
whatever a local user throws at them. It knows the service only as ``host.Host``.

Two sockets (``protocol.py``, Framing): the public one, for every local user, and the login
socket, for root and the login services only (its mode and group keep the others out; a
peer that is not a login service is turned away there too). A flood on the public socket —
connect/close loops, idle connections held open, thousands of requests pipelined — never
reaches the login socket's backlog, accept loop or connection limit, so PAM logins do not
share fate with unprivileged callers.

Each socket has an accept loop that does no work that can block: it reads the peer's
credentials (``SO_PEERCRED``, no lookup), applies the connection limits by uid, and hands
the connection to its own threads (reading, writing); the user name and groups are looked
up on the connection's reader thread. The loop survives any exception, and reports a
heartbeat that the service's health check (and systemd's watchdog) relies on.

Limits on the public socket (``[service]`` in config.toml): ``max_connections`` in all, an
eighth of them kept for root and the login services; ``max_connections_per_user`` for one
uid; and when the ordinary users' share is full, a uid holding fewer connections than
another takes that other's oldest idle connection (no ceremony running), so that a few
accounts cannot pool their allowances to shut everyone else out. A connection that sends no
request for ``idle_timeout`` seconds, runs no ceremony and subscribed to no events is
closed. The login socket has its own ``max_connections``.
"""

from __future__ import annotations

import errno
import grp
import itertools
import logging
import os
import queue
import select
import socket
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import protocol
from .authz import Peer, credentials
from .errors import RequestError

if TYPE_CHECKING:
    from .host import Host

log = logging.getLogger("token_agent.service")

#: messages waiting for a client that does not read, before it is disconnected
SEND_QUEUE = 1024
#: the accept loop's wake-up (it checks for a stop this often) and its heartbeat
ACCEPT_TICK = 0.2
#: a listener whose accept loop has not beaten for this long is unhealthy
HEARTBEAT_LIMIT = 10.0

PUBLIC = "public"
LOGIN = "login"


class ListenError(Exception):
    """A socket cannot be listened on: the message says why and what to do."""


def error_message(code: str, message: str, rid: int | None = None) -> bytes:
    return protocol.encode({"id": rid, "ok": False, "error": {"code": code, "message": message}})


# --------------------------------------------------------------------------- connections


class Connection:
    """One client: its peer, its reader thread (requests) and writer thread (answers and
    events, from a bounded queue)."""

    _ids = itertools.count(1)

    def __init__(self, service: "Host", sock: socket.socket, creds: tuple[int, int, int],
                 listener: str = PUBLIC) -> None:
        self.id = next(self._ids)
        self.service = service
        self.sock = sock
        pid, uid, gid = creds
        #: the kernel's word at once; the names are looked up on the reader thread
        self.peer = Peer(pid, uid, gid, None, (gid,))
        self.listener = listener
        self.opened = time.monotonic()
        self.last_request = self.opened
        self.subscribed = False
        self.subscribed_admin = False
        #: the last successful login on this connection (``reauth.Authenticated``)
        self.authenticated = None
        self.ceremonies: dict[str, Any] = {}  # id -> ceremony.Ceremony
        self.closed = threading.Event()
        self._queue: "queue.Queue[bytes | None]" = queue.Queue(SEND_QUEUE)
        self._close_lock = threading.Lock()
        self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                       name=f"token-agent-conn-{self.id}")
        self.writer = threading.Thread(target=self._write_loop, daemon=True,
                                       name=f"token-agent-send-{self.id}")

    def start(self) -> None:
        """Start both threads (``RuntimeError`` when the system refuses a thread: the
        caller closes the connection)."""
        self.writer.start()
        self.reader.start()

    @property
    def busy(self) -> bool:
        """Running a ceremony or subscribed: not idle, whatever the clock says."""
        return bool(self.ceremonies) or self.subscribed

    # -- sending -------------------------------------------------------------------------------

    def send(self, message: dict) -> bool:
        """Queue a message; False when the connection is closed (or has just been closed
        because its client stopped reading)."""
        if self.closed.is_set():
            return False
        try:
            data = protocol.encode(message)
        except (protocol.ProtocolError, TypeError, ValueError) as e:
            log.error("message not sent: %s", e, extra={"conn": self.id})
            return False
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            log.warning("client does not read its messages: disconnected",
                        extra={"conn": self.id, "peer_uid": self.peer.uid})
            self.close()
            return False
        return True

    def close_soon(self, code: str, message: str) -> None:
        """Send an error that belongs to no request, then close, without waiting (the
        writer closes the connection once the error is out)."""
        self.send({"id": None, "ok": False, "error": {"code": code, "message": message}})
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            self.close()

    def _write_loop(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                self.close()  # the end of what was queued: close (once) and stop
                break
            try:
                self.sock.sendall(data)  # a socket error (EPIPE too: Python ignores SIGPIPE)
            except OSError:
                self.close()
                break

    # -- reading -------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            if not self._identify():
                return
            self._read_requests()
        except Exception:  # noqa: BLE001: a connection's failure is its own
            log.exception("connection failed", extra={"conn": self.id})
        finally:
            self.close()

    def _identify(self) -> bool:
        """Look the peer's names up; on the login socket, turn away who is no login
        service."""
        p = self.peer
        self.peer = Peer.resolve(p.pid, p.uid, p.gid)
        if self.listener == LOGIN and not self.service.rules.is_login_service(self.peer):
            log.warning("not a login service: turned away from the login socket",
                        extra={"conn": self.id, "peer_uid": p.uid, "peer_user": self.peer.user})
            self.send({"id": None, "ok": False, "error": {
                "code": "forbidden", "message": "this socket is for root and the login "
                                                "services: use the service's public socket"}})
            self._drain_then_close()
            return False
        return True

    def _read_requests(self) -> None:
        idle = self.service.config.service.idle_timeout
        self.sock.settimeout(min(idle, 5.0))
        buffer = b""
        while not self.closed.is_set():
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                chunk = None
            except OSError:
                return
            if chunk == b"":
                return
            if chunk:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    self.last_request = time.monotonic()
                    if not self._handle_line(line):
                        return
                if len(buffer) > protocol.MAX_LINE:
                    self._bad_framing(f"line longer than {protocol.MAX_LINE} bytes")
                    return
            if not self.busy and time.monotonic() - self.last_request >= idle:
                log.info("idle connection closed", extra={"conn": self.id,
                                                          "peer_uid": self.peer.uid})
                self.send({"id": None, "ok": False, "error": {
                    "code": "unavailable",
                    "message": f"no request for {idle:g} s: connection closed (connect again)"}})
                self._drain_then_close()
                return

    def _bad_framing(self, why: str) -> None:
        self.send({"id": None, "ok": False,
                   "error": {"code": "bad-request", "message": why}})
        log.info("bad message: connection closed", extra={"conn": self.id, "why": why})
        self._drain_then_close()

    def _drain_then_close(self) -> None:
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            pass
        if self.writer.is_alive():
            self.writer.join(2.0)
        self.close()

    def _handle_line(self, line: bytes) -> bool:
        try:
            message = protocol.decode(line)
        except protocol.ProtocolError as e:
            self._bad_framing(str(e))
            return False
        rid = message.get("id")
        if isinstance(rid, bool) or not isinstance(rid, int):
            self.send({"id": None, "ok": False, "error": {
                "code": "bad-request", "message": "every request needs an integer id"}})
            return True
        op = message.get("op")
        try:
            if not isinstance(op, str):
                raise RequestError("bad-request", "every request needs an op (a string)")
            args = {k: v for k, v in message.items() if k not in ("id", "op")}
            result = self.service.dispatch(self, op, args)
        except RequestError as e:
            self.send({"id": rid, "ok": False, "error": {"code": e.code, "message": e.message}})
            return True
        except Exception as e:  # noqa: BLE001: answered, logged, the connection carries on
            from ..store import StoreError

            if isinstance(e, StoreError):
                log.error("store error in %s: %s", op, e, extra={"conn": self.id})
                error = {"code": "unavailable", "message": f"the store cannot be used: {e}"}
            else:
                log.exception("internal error in %s", op, extra={"conn": self.id})
                error = {"code": "internal", "message": f"internal error ({type(e).__name__})"}
            self.send({"id": rid, "ok": False, "error": error})
            return True
        self.send({"id": rid, "ok": True, "result": result})
        return True

    def client_gone(self) -> bool:
        """Whether the client has closed its end (checked without reading a request)."""
        return self.closed.is_set() or _hung_up(self.sock)

    # -- closing -------------------------------------------------------------------------------

    def close(self, flush: float = 0.0) -> None:
        """Close; with ``flush`` seconds, let the writer send what is queued first."""
        if flush and not self.closed.is_set() and threading.current_thread() is not self.writer:
            try:
                self._queue.put(None, timeout=flush)
            except queue.Full:
                pass
            if self.writer.is_alive():
                self.writer.join(flush)
        with self._close_lock:
            if self.closed.is_set():
                return
            self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self.service.connection_closed(self)
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- admission


def admit(conns: list[Connection], uid: int, *, listener: str, login_uids: frozenset[int],
          limit: int, per_user: int) -> tuple[bool, Connection | None]:
    """Whether a new connection of ``uid`` on ``listener`` is let in, and which connection
    (if any) must be closed to make room for it (see the module's text). ``conns``: every
    open connection."""
    mine = [c for c in conns if c.listener == listener]
    if listener == LOGIN:
        return len(mine) < limit, None
    if len(mine) >= limit:
        return False, None
    if uid in login_uids:
        return True, None
    ordinary = [c for c in mine if c.peer.uid not in login_uids]
    held: dict[int, list[Connection]] = {}
    for c in ordinary:
        held.setdefault(c.peer.uid, []).append(c)
    have = len(held.get(uid, ()))
    if have >= per_user:
        return False, None
    if len(ordinary) < max(1, limit - limit // 8):
        return True, None
    # the ordinary users' share is full: take an idle connection of whoever holds the most,
    # if they hold more than this uid will after it is let in
    heaviest = max((u for u in held if u != uid), key=lambda u: len(held[u]), default=None)
    if heaviest is None or len(held[heaviest]) <= have + 1:
        return False, None
    idle = [c for c in held[heaviest] if not c.ceremonies]
    if not idle:
        return False, None
    return True, min(idle, key=lambda c: c.opened)


# --------------------------------------------------------------------------- listeners


class Listener:
    """One listening socket and its accept loop."""

    def __init__(self, service: "Host", path: Path, *, kind: str, mode: int,
                 group: str | None = None) -> None:
        self.service = service
        self.path = path
        self.kind = kind
        self.mode = mode
        self.group = group
        self.heartbeat = time.monotonic()
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._thread: threading.Thread | None = None

    # -- the socket file -----------------------------------------------------------------------

    def check(self) -> None:
        """Refuse a socket another service listens on; remove one left by a dead service."""
        path = self.path
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ListenError(f"{path} exists and is not a socket: move it aside or "
                                  f"choose another socket ([service] {self._key})")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a socket left by a service that died
                log.info("removed a stale socket", extra={"socket": str(path)})
            else:
                raise ListenError(f"another token-agent service is listening on {path}")
            finally:
                probe.close()

    @property
    def _key(self) -> str:
        return "login_socket" if self.kind == LOGIN else "socket"

    def open(self) -> None:
        path = self.path
        parent = path.parent
        if not parent.is_dir():
            try:
                parent.mkdir(parents=True, mode=0o755)
                os.chmod(parent, 0o755)
            except OSError as e:
                raise ListenError(f"cannot create the socket's directory {parent}: "
                                  f"{e.strerror or e}") from None
        self.check()
        gid = -1
        if self.group is not None:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ListenError(f"[service] login_socket_group: no group {self.group!r} "
                                  f"(create it: groupadd --system {self.group})") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            sock.bind(str(path))
            bound = True
            if gid != -1:
                try:
                    os.chown(path, -1, gid)
                except PermissionError:
                    raise ListenError(
                        f"cannot give {path} to the group {self.group}: the service's user "
                        f"must be a member (usermod -aG {self.group} token-agent, or "
                        f"SupplementaryGroups={self.group} in the unit)") from None
            os.chmod(path, self.mode)
            sock.listen(socket.SOMAXCONN)
        except (OSError, ListenError) as e:
            sock.close()
            if bound:
                try:
                    path.unlink()
                except OSError:
                    pass
            if isinstance(e, ListenError):
                raise
            raise ListenError(f"cannot listen on {path}: {e.strerror or e}") from None
        sock.settimeout(ACCEPT_TICK)
        self._inode = path.stat().st_ino
        self._sock = sock

    def unlink(self) -> None:
        """Remove the socket file if it is still ours."""
        try:
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        except OSError:
            pass

    # -- the accept loop -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"token-agent-accept-{self.kind}")
        self._thread.start()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        self.unlink()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def healthy(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()
                and time.monotonic() - self.heartbeat < HEARTBEAT_LIMIT)

    def _loop(self) -> None:
        stopping = self.service.stopping
        while not stopping.is_set():
            self.heartbeat = time.monotonic()
            listener = self._sock
            if listener is None:
                break
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError as e:
                if stopping.is_set() or self._sock is None:
                    break
                log.error("cannot accept a connection on %s: %s", self.path, e.strerror or e)
                time.sleep(0.1 if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                              errno.ENOMEM) else 0.5)
                continue
            try:
                self._take(sock)
            except Exception:  # noqa: BLE001: the loop outlives any one connection
                log.exception("a connection could not be set up: closed")
                _close_quietly(sock)

    def _take(self, sock: socket.socket) -> None:
        if _hung_up(sock):  # a connect/close flood: nothing to serve, no thread spent on it
            _close_quietly(sock)
            return
        try:
            creds = credentials(sock)
        except OSError as e:
            log.warning("no peer credentials: connection refused (%s)", e)
            _close_quietly(sock)
            return
        sock.setblocking(True)
        conn = Connection(self.service, sock, creds, self.kind)
        if not self.service.admit(conn):
            log.warning("too many connections: refused", extra={
                "peer_uid": creds[1], "peer_pid": creds[0], "socket": self.kind})
            _refuse_quietly(sock, "too many connections: try again")
            return
        try:
            conn.start()
        except RuntimeError as e:  # the system's task limit
            log.error("cannot start a connection's threads: %s", e)
            _refuse_quietly(sock, "the service is overloaded: try again")
            conn.close()
            return
        log.debug("connection", extra={"conn": conn.id, "peer_uid": creds[1],
                                       "peer_pid": creds[0], "socket": self.kind})


def _hung_up(sock: socket.socket) -> bool:
    """Whether the client already closed its end (EOF waiting), without waiting: poll(2)
    first, since a socket with a timeout would make even a MSG_DONTWAIT recv wait for it."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLHUP)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except (OSError, ValueError):
        return True


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _refuse_quietly(sock: socket.socket, message: str) -> None:
    """Tell a turned-away client why, without ever waiting for it."""
    try:
        sock.setblocking(False)
        sock.send(error_message("unavailable", message), socket.MSG_NOSIGNAL)
    except OSError:
        pass
    _close_quietly(sock)
