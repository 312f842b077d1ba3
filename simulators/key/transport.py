"""Transports of the virtual key: in-process python-fido2 connections, and a TCP server with
an HTTP control interface.

* :class:`InProcessConnection` / :func:`open_in_process_device`: python-fido2's real
  :class:`fido2.hid.CtapHidDevice` framing code drives a :class:`VirtualKey` in the same
  process (no sockets, no threads of its own).
* :func:`open_tcp_device`: the same python-fido2 device over TCP, to a :class:`KeyServer`.
* :class:`KeyServer`: the key on TCP (frames as in :mod:`drivers.fido.sim`: 2-byte length 64,
  then the 64-byte report, both directions). A TCP connection becomes a handle of the key
  when its first report arrives, so a connection that only probes reachability (connect,
  close) is not a plug-in; the first handle while none is open is (the key powers up).
  With ``single_host=True`` a connection's first report closes every earlier handle's
  connection (their hosts read EOF) and so is always that plug-in (see
  :mod:`simulators.key.device`).
  Plus an HTTP control interface compatible with python-fido2's device-test "Pico
  controller" (``/usbN/touch/on`` ...), see :meth:`KeyServer.control`.

Both servers bind to 127.0.0.1 by default. They have no authentication: whoever reaches the
HID port can use the key and whoever reaches the control port can touch it, so never bind
them to an address other machines can reach, and never run a simulator on a production
workstation. The control port keeps web pages in the developer's own browser out (see
:func:`refuse_request`): nothing changes on GET, a state change needs POST with the header
``X-Token-Agent-Sim: 1``, and Host and Origin must be loopback with the control port.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import select
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from fido2.hid import CtapHidDevice
from fido2.hid.base import CtapHidConnection, HidDescriptor

from drivers.fido.sim import (
    FRAME_HEADER,
    SIM_PID,
    SIM_VID,
    FrameError,
    FrameReader,
    format_address,
)

from .base import PresenceMode
from .control import CONTROL_HEADER, DEFAULT_CONTROL_PORT, DEFAULT_HID_PORT, LOOPBACK
from .ctaphid import REPORT_SIZE
from .device import KeyHandle, VirtualKey

logger = logging.getLogger(__name__)

#: largest control request body accepted (a fault plan is a few dozen bytes)
MAX_CONTROL_BODY = 64 * 1024

#: socket send buffer per HID connection: a host that falls this far behind (about 2,000
#: reports; Linux doubles it) is disconnected rather than allowed to stall the key
SEND_BUFFER = 128 * 1024

_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


class InProcessConnection(CtapHidConnection):
    """A python-fido2 connection over a :class:`KeyHandle` of a key in this process.

    ``read_packet`` blocks (``read_timeout`` seconds, None: forever, then TimeoutError) and
    raises ``OSError(ENODEV)`` once the key is unplugged, as a removed USB key does.
    """

    def __init__(self, handle: KeyHandle, read_timeout: float | None = None) -> None:
        self.handle = handle
        self.read_timeout = read_timeout

    def read_packet(self) -> bytes:
        return self.handle.read(self.read_timeout)

    def write_packet(self, data: bytes) -> None:
        self.handle.write(data)

    def close(self) -> None:
        self.handle.close()


def in_process_descriptor(key: VirtualKey) -> HidDescriptor:
    return HidDescriptor(
        f"inproc:{id(key):x}", SIM_VID, SIM_PID, REPORT_SIZE, REPORT_SIZE,
        key.product_name, key.serial_number,
    )  # fmt: skip


def open_in_process_device(
    key: VirtualKey, *, read_timeout: float | None = None
) -> CtapHidDevice:
    """Open a handle on ``key`` and wrap it in python-fido2's :class:`CtapHidDevice` (which
    sends CTAPHID_INIT on the broadcast channel). Close it with ``device.close()``."""
    connection = InProcessConnection(key.open(), read_timeout)
    try:
        return CtapHidDevice(in_process_descriptor(key), connection)
    except Exception:
        connection.close()
        raise


def open_tcp_device(
    host: str = LOOPBACK, port: int = DEFAULT_HID_PORT, *, read_timeout: float | None = None
) -> CtapHidDevice:
    """Connect to a key served on TCP (a :class:`KeyServer`, or ``token-agent sim key
    serve``) and wrap the connection in python-fido2's :class:`CtapHidDevice`, as
    :func:`open_in_process_device` does in process. Close it with ``device.close()``."""
    from drivers.fido.sim import SocketHidConnection, sim_descriptor

    connection = SocketHidConnection(host, port, read_timeout=read_timeout)
    try:
        return CtapHidDevice(sim_descriptor(host, port), connection)
    except Exception:
        connection.close()
        raise


class _Connection:
    """One TCP connection to the HID port; its reader thread feeds the key."""

    def __init__(self, server: KeyServer, sock: socket.socket, peer: Any) -> None:
        self.server = server
        self.sock = sock
        self.peer = format_address(*peer[:2]) if isinstance(peer, tuple) else str(peer)
        self.handle: KeyHandle | None = None
        self._send_lock = threading.Lock()
        self._down = False
        self.thread = threading.Thread(
            target=self._run, name=f"sim-key-conn-{self.peer}", daemon=True
        )

    def _run(self) -> None:
        reader = FrameReader(self.sock)
        try:
            while True:
                report = reader.read_frame()
                if report is None:
                    break
                if self.handle is None:
                    self.handle = self.server.key.open(on_report=self._send, on_close=self.shutdown)
                self.handle.write(report)
        except FrameError as e:
            logger.warning("HID connection from %s broke the framing (%s): closing it", self.peer, e)
        except OSError as e:
            if not self._down:
                logger.info("HID connection from %s ended: %s", self.peer, e)
        except Exception:
            logger.exception("HID connection from %s failed", self.peer)
        finally:
            if self.handle is not None:
                self.handle.close()
            self._down = True
            self.sock.close()
            self.server._forget(self)

    def _send(self, report: bytes) -> None:
        """Deliver a report from the key; never blocks (a host that stops reading until its
        socket buffer is full is disconnected)."""
        frame = FRAME_HEADER + report
        with self._send_lock:
            if self._down:
                return
            try:
                sent = self.sock.send(frame, _MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.shutdown()
                return
        if sent != len(frame):
            logger.warning("host at %s is not reading its reports: disconnecting it", self.peer)
            self.shutdown()

    def shutdown(self) -> None:
        """End the connection (the reader thread then cleans up)."""
        self._down = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ListenError(OSError):
    """A port of the key server cannot be bound (taken, or not allowed): ``role`` is "HID"
    or "control", ``host`` and ``port`` what was asked for; ``errno`` the bind's."""

    def __init__(self, error: OSError, role: str, host: str, port: int) -> None:
        super().__init__(error.errno, f"cannot listen on {format_address(host, port)} "
                                      f"({role} port): {error.strerror}")
        self.role, self.host, self.port = role, host, port


class KeyServer:
    """Serve a :class:`VirtualKey` on TCP, with an HTTP control interface.

    :param key: the key to serve (the server does not close it).
    :param host: address both servers bind to; loopback by default, keep it so (no auth).
    :param port: HID port (0: an ephemeral port, read it back from :attr:`port`).
    :param control_port: HTTP control port (0: ephemeral; None: no control interface).
    :param single_host: if True, make the key single-host (``key.single_host``): a new
        connection, at its first report, closes the earlier ones and powers the key up, as
        the emulated keys some authenticator test suites expect. None (default): leave the key
        as it was made (``create_virtual_key(single_host=...)``); a plain key takes several
        connections at once, as hidraw does.

    While the key is unplugged the HID port is closed, so a connect is refused, as a
    removed key is absent; plugging it back in listens again on the same port.
    """

    def __init__(
        self,
        key: VirtualKey,
        *,
        host: str = LOOPBACK,
        port: int = DEFAULT_HID_PORT,
        control_port: int | None = DEFAULT_CONTROL_PORT,
        single_host: bool | None = None,
    ) -> None:
        self.key = key
        if single_host is not None:
            key.single_host = single_host
        self.host = host
        self.port = port
        self.control_port = control_port
        self._listen_lock = threading.RLock()  # listener state; never held while joining threads that need _lock
        self._listener: socket.socket | None = None
        self._waker: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the connection set
        self._connections: set[_Connection] = set()
        self._http: _ControlServer | None = None
        self._http_thread: threading.Thread | None = None
        self._running = False

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> KeyServer:
        """Bind and start serving. Raises OSError if a port is taken."""
        if self._running:
            raise RuntimeError("the key server is already running")
        self._running = True
        try:
            self._listen()
            if not self.key.powered:
                self._stop_listening()  # the port is known; it opens on plug()
            if self.control_port is not None:
                try:
                    self._http = _ControlServer((self.host, self.control_port), self)
                except OSError as e:
                    raise ListenError(e, "control", self.host, self.control_port) from e
                self.control_port = self._http.server_address[1]
                self._http_thread = threading.Thread(
                    target=self._http.serve_forever,
                    kwargs={"poll_interval": 0.05},  # how long stop() waits for it
                    name="sim-key-control",
                    daemon=True,
                )
                self._http_thread.start()
        except BaseException:
            self.stop()
            raise
        self.key.add_power_listener(self._on_power)
        logger.info(
            "virtual key: HID on %s, control %s", format_address(self.host, self.port),
            f"http://{format_address(self.host, self.control_port)}/"
            if self.control_port is not None else "off",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop both servers and drop every connection (idempotent)."""
        self._running = False
        self.key.remove_power_listener(self._on_power)
        self._stop_listening()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.shutdown()
        for connection in connections:
            if connection.thread is not threading.current_thread():
                connection.thread.join(timeout=5)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None

    def __enter__(self) -> KeyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def listening(self) -> bool:
        return self._listener is not None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def status(self) -> dict:
        """The key's status plus the servers' (what ``GET /`` answers)."""
        return {
            "ok": True,
            **self.key.status(),
            "connections": self.connection_count,
            "hid": {"host": self.host, "port": self.port, "listening": self.listening},
            "control": {"host": self.host, "port": self.control_port},
        }

    # -- HID port ------------------------------------------------------------------------

    def _listen(self) -> None:
        with self._listen_lock:
            if self._listener is not None:
                return
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen(16)
            except OSError as e:
                sock.close()
                raise ListenError(e, "HID", self.host, self.port) from e
            self.port = sock.getsockname()[1]
            waker, wake = socket.socketpair()
            self._listener, self._waker = sock, wake
            self._accept_thread = threading.Thread(
                target=self._accept_loop, args=(sock, waker), name="sim-key-accept", daemon=True
            )
            self._accept_thread.start()

    def _stop_listening(self) -> None:
        with self._listen_lock:
            listener, wake, thread = self._listener, self._waker, self._accept_thread
            self._listener = self._waker = self._accept_thread = None
        if listener is None:
            return
        wake.send(b"\0")
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        listener.close()
        wake.close()

    def _accept_loop(self, listener: socket.socket, waker: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([listener, waker], [], [])
                if waker in ready:
                    return
                try:
                    sock, peer = listener.accept()
                except OSError as e:
                    logger.warning("accepting a HID connection failed: %s", e)
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                connection = _Connection(self, sock, peer)
                with self._lock:
                    self._connections.add(connection)
                connection.thread.start()
        finally:
            waker.close()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _on_power(self, plugged: bool) -> None:
        if plugged:
            if self._running:
                self._listen()
            return
        self._stop_listening()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.shutdown()

    # -- control -------------------------------------------------------------------------

    _PICO = re.compile(r"/usb(\d+)/(touch|power)/(on|off)")
    _ACTIONS = ("/touch", "/press", "/release", "/power-cycle", "/unplug", "/plug", "/faults")

    def control(self, method: str, path: str, body: Any = None) -> tuple[int, dict]:
        """Carry out one control request; returns (HTTP status, JSON object).

        ``GET /`` status; ``GET /faults``; python-fido2's Pico controller paths
        ``/usbN/touch/on|off`` (hold / release the button) and ``/usbN/power/off|on``
        (unplug / plug in; N is accepted and ignored: one key per server); and POST
        ``/touch`` (a tap), ``/press``, ``/release``, ``/presence/<mode>``,
        ``/power-cycle``, ``/unplug``, ``/plug``, ``/faults`` (JSON object of FaultPlan
        fields), ``/faults/clear``. Nothing changes state on GET (405, ``Allow: POST``).
        Over HTTP, :func:`refuse_request` also checks Host, Origin and :data:`CONTROL_HEADER`.
        """
        path = path.rstrip("/") or "/"
        key, presence = self.key, self.key.presence
        if path == "/" or (path == "/faults" and method == "GET"):
            if method != "GET":
                return _method_not_allowed("GET")
            return HTTPStatus.OK, self.status() if path == "/" else {"ok": True, **key.faults.as_dict()}
        pico = self._PICO.fullmatch(path)
        if pico is not None:
            if method != "POST":
                return _method_not_allowed("POST")
            what, state = pico.group(2), pico.group(3)
            action = {
                ("touch", "on"): presence.press,
                ("touch", "off"): presence.release,
                ("power", "on"): self._plug,
                ("power", "off"): key.unplug,
            }[(what, state)]
            return self._act(action)
        if method != "POST":
            if path in self._ACTIONS or path.startswith(("/presence/", "/faults/")):
                return _method_not_allowed("POST")
            return _error(HTTPStatus.NOT_FOUND, f"no such control path: {path}")
        if path == "/touch":
            return self._act(presence.touch)
        if path == "/press":
            return self._act(presence.press)
        if path == "/release":
            return self._act(presence.release)
        if path == "/power-cycle":
            if not key.powered:
                return _error(HTTPStatus.CONFLICT, "the key is unplugged: plug it in first")
            return self._act(key.power_cycle)
        if path == "/unplug":
            return self._act(key.unplug)
        if path == "/plug":
            return self._act(self._plug)
        if path.startswith("/presence/"):
            mode = path[len("/presence/") :]
            try:
                mode = PresenceMode(mode)
            except ValueError:
                modes = ", ".join(m.value for m in PresenceMode)
                return _error(HTTPStatus.BAD_REQUEST, f"unknown presence mode {mode!r} ({modes})")
            return self._act(lambda: presence.set_mode(mode))
        if path == "/faults/clear":
            return self._act(key.faults.clear)
        if path == "/faults":
            if not isinstance(body, dict):
                return _error(HTTPStatus.BAD_REQUEST, "expected a JSON object of FaultPlan fields")
            try:
                key.set_faults(**body)
            except ValueError as e:
                return _error(HTTPStatus.BAD_REQUEST, str(e))
            return HTTPStatus.OK, self.status()
        return _error(HTTPStatus.NOT_FOUND, f"no such control path: {path}")

    def _plug(self) -> None:
        self.key.plug()
        if self._running:
            self._listen()  # also after a plug-in whose re-listen failed (port taken)

    def _act(self, action) -> tuple[int, dict]:
        try:
            action()
        except OSError as e:
            logger.error("control action failed: %s", e)
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, str(e))
        return HTTPStatus.OK, self.status()


#: names a browser may use for this machine's loopback interface
_LOOPBACK_NAMES = ("localhost", "localhost.")


def _is_loopback_host(host: str, bound: str) -> bool:
    host = host.lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if address.is_loopback:
        return True
    try:  # an explicit, non-wildcard address the server was told to bind to
        return not ipaddress.ip_address(bound).is_unspecified and address == ipaddress.ip_address(bound)
    except ValueError:
        return False


def refuse_request(
    method: str, headers: Any, port: int, bound: str = LOOPBACK
) -> tuple[int, dict] | None:
    """Why an HTTP control request must be refused, or None. Against a web page in the
    developer's browser (CSRF, DNS rebinding): Host must name loopback (or the bound address)
    with the control port; Origin, when sent, must be that same loopback origin; and every
    request but GET must carry ``X-Token-Agent-Sim: 1``, a header a page cannot add to a
    cross-site request without a CORS preflight, which this server never grants."""
    host = headers.get("Host")
    parts = urlsplit(f"//{host}") if host else None
    try:
        host_ok = (
            parts is not None
            and parts.port == port
            and _is_loopback_host(parts.hostname or "", bound)
        )
    except ValueError:  # a port that is not a number
        host_ok = False
    if not host_ok:
        return _error(HTTPStatus.FORBIDDEN, f"Host must be a loopback address with port {port}")
    origin = headers.get("Origin")
    if origin is not None:
        o = urlsplit(origin)
        try:
            origin_ok = (
                o.scheme == "http" and o.port == port and _is_loopback_host(o.hostname or "", bound)
            )
        except ValueError:
            origin_ok = False
        if not origin_ok:
            return _error(HTTPStatus.FORBIDDEN, "cross-origin requests are refused")
    if method != "GET" and headers.get(CONTROL_HEADER) != "1":
        return _error(HTTPStatus.FORBIDDEN, f"state-changing requests need the header {CONTROL_HEADER}: 1")
    return None


def _error(status: HTTPStatus, message: str) -> tuple[int, dict]:
    return status, {"ok": False, "error": message}


def _method_not_allowed(allowed: str) -> tuple[int, dict]:
    return HTTPStatus.METHOD_NOT_ALLOWED, {"ok": False, "error": f"use {allowed}", "allow": allowed}


class _ControlServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], key_server: KeyServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _ControlHandler)
        self.key_server = key_server


class _ControlHandler(BaseHTTPRequestHandler):
    server: _ControlServer
    server_version = "token-agent-sim-key"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        server = self.server
        refusal = refuse_request(
            method, self.headers, server.server_address[1], server.key_server.host
        )
        if refusal is not None:
            logger.warning("control %s %s refused: %s", method, self.path[:200], refusal[1]["error"])
            self._reply(*refusal)
            return
        try:
            body = self._read_body()
        except ValueError as e:
            self._reply(*_error(HTTPStatus.BAD_REQUEST, str(e)))
            return
        try:
            status, payload = self.server.key_server.control(method, urlsplit(self.path).path, body)
        except Exception as e:  # a bug: answer, log, keep serving
            logger.exception("control request %s %s failed", method, self.path)
            status, payload = _error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {e}")
        self._reply(status, payload)

    def _read_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if not length:
            return None
        try:
            size = int(length)
        except ValueError:
            raise ValueError("bad Content-Length") from None
        if not 0 <= size <= MAX_CONTROL_BODY:
            raise ValueError(f"request body over {MAX_CONTROL_BODY} bytes")
        raw = self.rfile.read(size)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"request body is not JSON: {e}") from None

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if "allow" in payload:
            self.send_header("Allow", payload["allow"])
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.info("control %s: " + format, self.client_address[0], *args)
