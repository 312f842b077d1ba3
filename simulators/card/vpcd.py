"""The virtual card behind the real pcscd: the card side of vsmartcard's vpcd protocol.

vsmartcard's reader driver (Debian ``vsmartcard-vpcd``) runs inside pcscd and *listens*, one
TCP port per slot: 35963 for the reader pcscd names "Virtual PCD 00 00", 35964 for
"Virtual PCD 00 01". A virtual card *connects* to it; the connection is the card being in
the reader, closing it is pulling the card out. Messages go both ways as a 2-byte big-endian
length, then the payload. From vpcd, a 1-byte payload is a control: 0x00 power off, 0x01
power on, 0x02 reset (none answered), 0x04 get ATR (answered with the ATR); anything longer
is a command APDU, answered with the response APDU (data and status word).

pcscd asks for the ATR every 400 ms as its card-presence poll, so an insertion or removal is
seen by PC/SC clients within 0-400 ms. vpcd accepts one card per slot at a time (listen
backlog 0): a second card connecting to an occupied slot is left pending, never served;
:meth:`VpcdBridge.insert` notices (nothing arrives within ``accept_timeout``) and says so.

Speed: vpcd sends a message's length and payload without TCP_NODELAY (in two ``send``
calls in Debian's 3.3), so the second segment waits for the card side's ACK, which Linux
delays by up to 40 ms: every APDU would cost ~40 ms. The bridge sets TCP_QUICKACK after every
``recv`` (the kernel clears it again on its own, so once is not enough) and TCP_NODELAY for
its own answers; an APDU round trip from a PC/SC client is then well under a millisecond.

:class:`CardHolder` is what ``token-agent sim card insert`` runs: a bridge plus a control
socket (a Unix socket per slot in the user's runtime directory) through which
``token-agent sim card remove`` in another process removes the card, after its state is
saved. vpcd listens on all interfaces: it belongs on development and test machines only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
#: vpcd's port for slot 0 (Debian's /etc/reader.conf.d/vpcd: CHANNELID 0x8C7B)
BASE_PORT = 35963
#: slots Debian's vpcd configuration provides (one port each, from BASE_PORT)
DEFAULT_SLOTS = 2
#: pcscd's name for vpcd's readers (FRIENDLYNAME in the driver's configuration)
READER_PREFIX = "Virtual PCD"

CTRL_OFF = 0x00
CTRL_ON = 0x01
CTRL_RESET = 0x02
CTRL_ATR = 0x04

#: answered to an APDU the card could not handle (it raised, or its answer cannot be framed)
SW_NO_PRECISE_DIAGNOSIS = b"\x6f\x00"
MAX_PAYLOAD = 0xFFFF

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only

#: environment variable naming the directory of the holders' control sockets (tests)
RUNTIME_DIR_ENV = "TOKEN_AGENT_RUNTIME_DIR"


class Card(Protocol):
    """What the bridge needs of a card (:class:`simulators.card.card.VirtualCard`)."""

    @property
    def atr(self) -> bytes: ...

    def power_on(self) -> bytes: ...

    def power_off(self) -> None: ...

    def reset(self) -> bytes: ...

    def transmit(self, apdu: bytes) -> bytes: ...

    def save(self) -> Any: ...


class VpcdError(Exception):
    """The card could not be put into, or kept in, the virtual reader."""


class VpcdNotListening(VpcdError):
    """Nothing accepts connections on vpcd's port: pcscd with vsmartcard-vpcd is not running."""


class SlotBusy(VpcdError):
    """The slot already holds a card (vpcd does not accept a second one)."""


def slot_port(slot: int, base_port: int = BASE_PORT) -> int:
    """vpcd's TCP port for reader slot ``slot`` (0 -> 35963, 1 -> 35964)."""
    if not isinstance(slot, int) or slot < 0 or base_port + slot > 65535:
        raise ValueError(f"invalid vpcd slot {slot!r}")
    return base_port + slot


def reader_name(slot: int = 0) -> str:
    """pcscd's name for vpcd's reader ``slot`` when vpcd is its first reader driver:
    "Virtual PCD 00 00", "Virtual PCD 00 01"."""
    return f"{READER_PREFIX} 00 {slot:02X}"


def find_reader(readers, slot: int = 0) -> str | None:
    """The name, among ``readers`` (e.g. ``smartcard.System.readers()``), of vpcd's reader for
    ``slot``, whatever index pcscd gave the driver ("Virtual PCD 01 00" when another reader
    driver came first); None if there is none."""
    suffix = f" {slot:02X}"
    for reader in map(str, readers):
        if reader.startswith(READER_PREFIX + " ") and reader.endswith(suffix):
            return reader
    return None


def _not_listening_message(host: str, port: int, error: BaseException) -> str:
    return (f"cannot connect to vpcd at {host}:{port} ({error}): is pcscd running with "
            "vsmartcard-vpcd? (Debian: apt-get install pcscd vsmartcard-vpcd; "
            "then `sudo systemctl start pcscd`, or run `pcscd -f` as root)")


class VpcdBridge:
    """A card in one vpcd reader slot: :meth:`insert` connects to vpcd, :meth:`remove`
    disconnects and saves the card's state (``card.save()``).

    ``VpcdBridge(card)`` is slot 0 (127.0.0.1:35963); ``slot=1`` is 35964; ``port=`` names
    any port (a test's fake vpcd). With ``reconnect=True`` the card stays "in the reader"
    when vpcd closes the connection (pcscd stopped or restarted): the bridge connects again
    whenever vpcd listens, until :meth:`remove`. Without it, vpcd closing the connection is a
    removal: the state is saved and :meth:`wait` returns.

    One thread per inserted card serves vpcd; the card is only used from it (and from
    :meth:`remove` once that thread has ended). Usable as a context manager (insert, remove).
    """

    def __init__(self, card: Card, host: str = DEFAULT_HOST, port: int | None = None, *,
                 slot: int | None = None, reconnect: bool = False,
                 accept_timeout: float = 3.0, connect_timeout: float = 2.0,
                 save: bool = True, quickack: bool = True) -> None:  # fmt: skip
        if port is None:
            port = slot_port(0 if slot is None else slot)
        elif slot is not None and slot_port(slot) != port:
            raise ValueError(f"slot {slot} is port {slot_port(slot)}, not {port}")
        if not 0 < port <= 65535:
            raise ValueError(f"invalid port {port}")
        self.card = card
        self.host = host
        self.port = port
        self.reconnect = reconnect
        self.accept_timeout = accept_timeout
        self.connect_timeout = connect_timeout
        self.save_on_remove = save
        #: TCP_QUICKACK after every recv; False only to measure what it saves (~40 ms an APDU)
        self.quickack = quickack and _TCP_QUICKACK is not None
        #: complete messages received from vpcd, by kind (for tests and diagnostics)
        self.counts = {"atr": 0, "power_on": 0, "power_off": 0, "reset": 0, "apdu": 0,
                       "ignored": 0, "connections": 0}  # fmt: skip
        #: whether vpcd last powered the card on (or reset it) rather than off
        self.powered = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._accepted = threading.Event()  # vpcd served the current connection
        self._powered = threading.Event()
        self._out = threading.Event()  # the card is out of the reader
        self._out.set()
        self._end_reason: str | None = None
        self._used = False

    # -- public API --------------------------------------------------------------------------

    @property
    def slot(self) -> int | None:
        """The vpcd slot of :attr:`port` (35963 -> 0), None for a port outside vpcd's."""
        slot = self.port - BASE_PORT
        return slot if 0 <= slot < 256 else None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def inserted(self) -> bool:
        """True from :meth:`insert` until the card is removed (or vpcd dropped it and the
        bridge does not reconnect)."""
        return not self._out.is_set()

    @property
    def connected(self) -> bool:
        """True while vpcd serves the card's connection (False while reconnecting)."""
        return self._sock is not None and self._accepted.is_set()

    @property
    def end_reason(self) -> str | None:
        """Why the card last came out: "removed" or "vpcd closed the connection"."""
        return self._end_reason

    def insert(self, timeout: float | None = None) -> "VpcdBridge":
        """Put the card into the reader: connect to vpcd, and wait until vpcd serves the
        connection (its first presence poll, within 400 ms). Raises
        :class:`VpcdNotListening` when nothing listens, :class:`SlotBusy` when vpcd does
        not take the card within ``timeout`` (default ``accept_timeout``): another card is
        in that slot. Returns self."""
        timeout = self.accept_timeout if timeout is None else timeout
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise VpcdError(f"the card is already in the reader at {self.address}")
            self._stop.clear()
            self._accepted.clear()
            self._powered.clear()
            self.powered = False
            self._end_reason = None
            self._used = False  # vpcd has served this insertion at least once
        sock = self._connect()
        with self._lock:
            self._sock = sock
            self._out.clear()
            self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True,
                                            name=f"vpcd-card-{self.port}")
            self._thread.start()
        if not self._accepted.wait(timeout) and not self._out.is_set():
            self._abort()
            raise SlotBusy(
                f"vpcd at {self.address} has not taken the card within {timeout:g} s: "
                f"another card is in that slot (a `token-agent sim card insert`, or another "
                f"virtual card), or pcscd is not polling the reader")
        if self._out.is_set() and not self._accepted.is_set():
            raise VpcdError(f"vpcd at {self.address} closed the connection at once")
        logger.info("card inserted into vpcd %s", self.address)
        return self

    def wait_powered(self, timeout: float | None = None) -> bool:
        """Wait until pcscd has powered the card up (it does right after seeing it)."""
        return self._powered.wait(timeout)

    def remove(self, timeout: float = 10.0) -> bool:
        """Pull the card out: close the connection, end the bridge's thread, save the card's
        state (``card.save()``; its errors propagate, after the card is out). Returns False
        if the card was not in the reader (nothing to do; an earlier removal by vpcd has
        already saved the state)."""
        with self._lock:
            thread = self._thread
            self._thread = None
            self._stop.set()
            sock = self._sock
        if thread is None:
            return False
        _shutdown(sock)
        thread.join(timeout)
        if thread.is_alive():
            raise VpcdError(f"the bridge to {self.address} did not stop within {timeout:g} s")
        if self._end_reason is not None:  # vpcd had dropped it already (state saved then)
            return False
        self._end_reason = "removed"
        logger.info("card removed from vpcd %s", self.address)
        try:
            if self.save_on_remove:
                self.card.save()
        finally:
            self._out.set()
        return True

    stop = remove

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the card is out of the reader (:meth:`remove`, or vpcd closed the
        connection and the bridge does not reconnect). True if it is out."""
        return self._out.wait(timeout)

    def __enter__(self) -> "VpcdBridge":
        return self.insert()

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "inserted" if self.inserted else "out"
        return f"<VpcdBridge {self.address} {state}>"

    # -- the connection ------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except ConnectionRefusedError as e:
            raise VpcdNotListening(_not_listening_message(self.host, self.port, e)) from None
        except socket.timeout as e:
            # vpcd's backlog is 0: the kernel drops the handshake while another connection
            # waits to be accepted
            raise SlotBusy(f"vpcd at {self.address} does not answer ({e}): another card "
                           "waits for that slot") from None
        except OSError as e:
            raise VpcdNotListening(_not_listening_message(self.host, self.port, e)) from None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.quickack:
            _quickack(sock)
        self.counts["connections"] += 1
        return sock

    def _abort(self) -> None:
        """Undo an insert that vpcd never took (no save: the card was never used)."""
        with self._lock:
            thread = self._thread
            self._thread = None
            self._stop.set()
            sock = self._sock
        _shutdown(sock)
        if thread is not None:
            thread.join(5)
        self._end_reason = "not taken"
        self._out.set()

    def _run(self, sock: socket.socket) -> None:
        while True:
            try:
                self._serve(sock)
            except Exception:  # never let the bridge thread die with the card "inserted"
                logger.exception("vpcd bridge %s failed", self.address)
            finally:
                with self._lock:
                    if self._sock is sock:
                        self._sock = None
                _close(sock)
            if self._stop.is_set():
                return
            self.powered = False
            self._powered.clear()
            if not self.reconnect:
                break
            logger.warning("vpcd %s closed the connection (pcscd stopped or restarted?): "
                           "the card stays in and reconnects when vpcd listens", self.address)
            sock = self._reconnect_loop()
            if sock is None:
                return
        # vpcd ended it and we do not reconnect: that is a removal
        self._end_reason = "vpcd closed the connection"
        logger.warning("vpcd %s closed the connection: the card is out", self.address)
        if self.save_on_remove and self._used:
            try:
                self.card.save()
            except Exception:
                logger.exception("could not save the card's state")
        with self._lock:
            if self._thread is threading.current_thread():
                self._thread = None
        self._out.set()

    def _reconnect_loop(self) -> socket.socket | None:
        while not self._stop.wait(0.25):
            try:
                sock = self._connect()
            except VpcdError:
                continue
            with self._lock:
                if self._stop.is_set():
                    _close(sock)
                    return None
                self._sock = sock
                self._accepted.clear()
            logger.warning("vpcd %s is back: the card is in the reader again", self.address)
            return sock
        return None

    def _serve(self, sock: socket.socket) -> None:
        """Answer vpcd's messages until the connection ends."""
        buffer = bytearray()
        recv = sock.recv
        quickack = self.quickack
        while True:
            # one message: 2-byte length, payload
            while True:
                if len(buffer) >= 2:
                    length = (buffer[0] << 8) | buffer[1]
                    if len(buffer) >= 2 + length:
                        break
                try:
                    chunk = recv(65538)
                except OSError:
                    return
                if not chunk:
                    if buffer:
                        logger.warning("vpcd %s closed mid-message (%d bytes pending)",
                                       self.address, len(buffer))
                    return
                if quickack:
                    try:
                        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                    except OSError:
                        pass
                buffer += chunk
            payload = bytes(buffer[2:2 + length])
            del buffer[:2 + length]
            if not self._accepted.is_set():
                self._used = True
                self._accepted.set()
            answer = self._handle(payload)
            if answer is not None:
                try:
                    sock.sendall(struct.pack(">H", len(answer)) + answer)
                except OSError:
                    return

    def _handle(self, payload: bytes) -> bytes | None:
        """The answer to one message from vpcd (None: no answer)."""
        card = self.card
        if len(payload) == 1:
            control = payload[0]
            if control == CTRL_ATR:
                self.counts["atr"] += 1
                return self._atr()
            if control == CTRL_ON:
                self.counts["power_on"] += 1
                self._call(card.power_on)
                self.powered = True
                self._powered.set()
            elif control == CTRL_OFF:
                self.counts["power_off"] += 1
                self._call(card.power_off)
                self.powered = False
                self._powered.clear()
            elif control == CTRL_RESET:
                self.counts["reset"] += 1
                self._call(card.reset)
                self.powered = True
                self._powered.set()
            else:
                self.counts["ignored"] += 1
                logger.warning("vpcd %s: unknown control 0x%02X ignored", self.address, control)
            return None
        if not payload:
            self.counts["ignored"] += 1
            logger.warning("vpcd %s: empty message ignored", self.address)
            return None
        self.counts["apdu"] += 1
        try:
            response = bytes(card.transmit(payload))
        except Exception:
            logger.exception("the card failed on APDU %s", payload[:5].hex())
            return SW_NO_PRECISE_DIAGNOSIS
        if not 2 <= len(response) <= MAX_PAYLOAD:
            logger.error("the card's answer to APDU %s has %d bytes: not framed",
                         payload[:5].hex(), len(response))
            return SW_NO_PRECISE_DIAGNOSIS
        return response

    def _atr(self) -> bytes:
        try:
            atr = bytes(self.card.atr)
        except Exception:
            logger.exception("the card has no ATR")
            atr = b""
        # an empty answer makes vpcd drop the connection; never send one
        return atr if 0 < len(atr) <= MAX_PAYLOAD else b"\x3b\x00"

    def _call(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception:
            logger.exception("the card failed on %s", getattr(action, "__name__", action))


def _quickack(sock: socket.socket) -> None:
    if _TCP_QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    _shutdown(sock)
    try:
        sock.close()
    except OSError:
        pass


# -- holding a card for another process to remove ------------------------------------------------


class NoHolder(VpcdError):
    """No process holds a card in that slot."""


def runtime_dir(environ=None) -> Path:
    """The directory of the holders' control sockets, created 0700 and checked to be ours:
    ``$TOKEN_AGENT_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/token-agent``, else
    ``/tmp/token-agent-<uid>``."""
    env = os.environ if environ is None else environ
    if env.get(RUNTIME_DIR_ENV):
        path = Path(env[RUNTIME_DIR_ENV])
    elif env.get("XDG_RUNTIME_DIR") and Path(env["XDG_RUNTIME_DIR"]).is_absolute():
        path = Path(env["XDG_RUNTIME_DIR"]) / "token-agent"
    else:
        path = Path("/tmp") / f"token-agent-{os.getuid()}"
    path = Path(os.path.abspath(path))
    try:
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise VpcdError(f"{path} is not a directory")
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise VpcdError(f"{path} is not a private directory of this user "
                        f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o})")
    return path


def holder_socket(host: str = DEFAULT_HOST, port: int = BASE_PORT, environ=None) -> Path:
    """The control socket of the process holding a card at vpcd ``host:port``."""
    return runtime_dir(environ) / f"sim-card-{host}-{port}.sock"


def ask_holder(host: str = DEFAULT_HOST, port: int = BASE_PORT, command: str = "status",
               timeout: float = 15.0, environ=None) -> dict:
    """Send ``command`` ("status" or "remove") to the process holding a card at
    ``host:port``; its answer (a dict). Raises :class:`NoHolder` when no process holds one
    (a stale socket is deleted)."""
    path = holder_socket(host, port, environ)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise NoHolder(f"no card is inserted at vpcd {host}:{port}") from None
        except ConnectionRefusedError:
            try:
                path.unlink()  # its process died without cleaning up
            except FileNotFoundError:
                pass
            raise NoHolder(f"no card is inserted at vpcd {host}:{port}") from None
        sock.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise VpcdError(f"the process holding the card at {host}:{port} did not answer: {e}")
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise VpcdError(f"unexpected answer from the card holder at {path}: {data[:200]!r}")
    if not isinstance(answer, dict):
        raise VpcdError(f"unexpected answer from the card holder at {path}: {answer!r}")
    return answer


class CardHolder:
    """A card held in a vpcd slot by a long-running process, removable from others.

    :meth:`start` refuses a slot another holder has (:class:`SlotBusy`), binds the control
    socket (:func:`holder_socket`, in a 0700 directory: only this user's processes can reach
    it), then inserts the card. The socket answers one line per connection: ``status`` (a
    JSON object describing the card) and ``remove`` (the card is removed and its state saved
    before the answer, ``{"removed": true, ...}``). :meth:`wait` returns when the card is out
    (removed through the socket, by :meth:`remove`, or vpcd closed without reconnect).
    """

    def __init__(self, bridge: VpcdBridge, info: dict | None = None, environ=None) -> None:
        self.bridge = bridge
        self.info = dict(info or {})
        self.socket_path = holder_socket(bridge.host, bridge.port, environ)
        self._environ = environ
        self._server: socket.socket | None = None
        self._inode: int | None = None
        self._thread: threading.Thread | None = None
        self._remove_lock = threading.Lock()
        self._removed = threading.Event()
        self.removed_by: str | None = None

    def status(self) -> dict:
        return {**self.info, "pid": os.getpid(), "host": self.bridge.host,
                "port": self.bridge.port, "slot": self.bridge.slot,
                "inserted": self.bridge.inserted, "connected": self.bridge.connected}  # fmt: skip

    def start(self) -> "CardHolder":
        try:
            other = ask_holder(self.bridge.host, self.bridge.port, "status", timeout=5,
                               environ=self._environ)  # fmt: skip
        except NoHolder:
            pass
        else:
            raise SlotBusy(f"slot {self.bridge.slot} (vpcd {self.bridge.address}) already "
                           f"holds a card: {other.get('card', '?')} (pid {other.get('pid')})")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(str(self.socket_path))
        except OSError as e:
            server.close()
            if e.errno == errno.EADDRINUSE:
                raise SlotBusy(f"slot {self.bridge.slot} is being taken by another process "
                               f"({self.socket_path} exists)") from None
            raise VpcdError(f"cannot create the control socket {self.socket_path}: {e}")
        os.chmod(self.socket_path, 0o600)
        self._inode = os.stat(self.socket_path).st_ino
        server.listen(8)
        self._server = server
        try:
            self.bridge.insert()
        except BaseException:
            self._close_server()
            raise
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"card-holder-{self.bridge.port}")
        self._thread.start()
        return self

    def remove(self, by: str = "this process") -> bool:
        """Remove the card (state saved) and close the control socket; idempotent."""
        with self._remove_lock:
            if self._removed.is_set():
                return False
            try:
                self.bridge.remove()
            finally:
                self.removed_by = by
                self._close_server()
                self._removed.set()
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the card is out; True if it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._removed.is_set():
                return True
            if not self.bridge.inserted:
                self._close_server()
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._removed.wait(0.2 if left is None else min(0.2, left))

    def _close_server(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        try:  # only our own socket file (a stale one may have been replaced by another holder)
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        except OSError:
            pass
        try:
            server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        server.close()

    def _accept_loop(self) -> None:
        server = self._server
        while server is not None:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                data = b""
                while b"\n" not in data and len(data) < 256:
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    data += chunk
                command = data.split(b"\n", 1)[0].strip().decode("ascii", "replace")
                if command == "status":
                    answer = self.status()
                elif command == "remove":
                    try:
                        removed = self.remove(by="token-agent sim card remove")
                        answer = {**self.status(), "removed": removed}
                    except Exception as e:  # the card is out; its state may not be saved
                        answer = {**self.status(), "removed": True, "error": str(e)}
                else:
                    answer = {"error": f"unknown command {command!r}"}
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass
