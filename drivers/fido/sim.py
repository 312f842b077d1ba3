"""Host side of the virtual key's socket: python-fido2 connections to simulated keys.

Wire format, both directions, one TCP connection per open device: every 64-byte HID report
travels as a frame ``LENGTH(2 bytes, big-endian) = 64 | REPORT(64 bytes)``. The key sends
every report to every connection (as hidraw sends every input report to every open file):
hosts keep the reports for their own CTAPHID channel.

Keys are named by ``TOKEN_AGENT_SIM_KEYS=127.0.0.1:35962[,host:port...]`` and appear as
:class:`fido2.hid.base.HidDescriptor` with the path ``"sim:HOST:PORT"``. This module is a
driver: no policy, no retries.
"""

from __future__ import annotations

import errno
import socket
import threading

from fido2.hid.base import CtapHidConnection, HidDescriptor

REPORT_SIZE = 64
FRAME_HEADER = REPORT_SIZE.to_bytes(2, "big")
FRAME_SIZE = len(FRAME_HEADER) + REPORT_SIZE
PATH_PREFIX = "sim:"
#: USB identity of the virtual key (pid.codes test VID/PID), as its descriptors report it
SIM_VID = 0x1209
SIM_PID = 0x0001
SIM_PRODUCT_NAME = "token-agent virtual FIDO2 key"

#: seconds allowed for connecting (and for the reachability probe of list_sim_descriptors)
CONNECT_TIMEOUT = 2.0
PROBE_TIMEOUT = 0.25


class FrameError(ConnectionError):
    """The peer broke the framing (a length other than 64, or a frame cut short)."""


def encode_frame(report: bytes) -> bytes:
    """One report as a frame; shorter reports are zero-padded to 64 bytes."""
    if len(report) > REPORT_SIZE:
        raise ValueError(f"HID report of {len(report)} bytes exceeds {REPORT_SIZE}")
    return FRAME_HEADER + bytes(report).ljust(REPORT_SIZE, b"\0")


class FrameReader:
    """Reads frames from a connected socket (buffered: one recv may carry several)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def read_frame(self) -> bytes | None:
        """The next report; None if the peer closed the connection between two frames.
        Raises :class:`FrameError` on a bad length or a frame cut short, and the socket's
        OSError (including TimeoutError) as they come."""
        if not self._fill(len(FRAME_HEADER)):
            if self._buffer:
                raise FrameError("connection closed in the middle of a frame header")
            return None
        length = int.from_bytes(self._buffer[:2], "big")
        if length != REPORT_SIZE:
            raise FrameError(f"frame length {length}, expected {REPORT_SIZE}")
        if not self._fill(FRAME_SIZE):
            raise FrameError(
                f"connection closed after {len(self._buffer) - 2} of {REPORT_SIZE} report bytes"
            )
        report = bytes(self._buffer[2:FRAME_SIZE])
        del self._buffer[:FRAME_SIZE]
        return report

    def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            chunk = self._sock.recv(65536)
            if not chunk:
                return False
            self._buffer += chunk
        return True


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError if malformed."""
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, as [::1]:{port}")
    if not sep or not host or any(c.isspace() for c in host):
        raise ValueError(f"{value!r} is not host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return host, int(port)


class SimKeysError(ValueError):
    """``TOKEN_AGENT_SIM_KEYS`` is malformed; the message names the variable and the entry."""


def parse_sim_keys(value: str) -> list[tuple[str, int]]:
    """Parse ``TOKEN_AGENT_SIM_KEYS``: comma-separated ``host:port`` entries (duplicates
    dropped, order kept). An empty or blank value is no keys. SimKeysError (a ValueError)
    names the bad entry."""
    if not value.strip():
        return []
    addresses: list[tuple[str, int]] = []
    for index, entry in enumerate(value.split(","), 1):
        if not entry.strip():
            raise SimKeysError(f"TOKEN_AGENT_SIM_KEYS entry {index} is empty in {value!r}")
        try:
            address = parse_address(entry)
        except ValueError as e:
            raise SimKeysError(f"TOKEN_AGENT_SIM_KEYS entry {index}: {e}") from None
        if address not in addresses:
            addresses.append(address)
    return addresses


def sim_descriptor(host: str, port: int) -> HidDescriptor:
    """The python-fido2 descriptor of the simulated key at host:port (path ``sim:HOST:PORT``)."""
    address = format_address(host, port)
    return HidDescriptor(
        PATH_PREFIX + address, SIM_VID, SIM_PID, REPORT_SIZE, REPORT_SIZE,
        SIM_PRODUCT_NAME, address,
    )  # fmt: skip


def is_sim_path(path: str | bytes) -> bool:
    return isinstance(path, str) and path.startswith(PATH_PREFIX)


def sim_address(path: str | bytes) -> tuple[str, int]:
    """(host, port) from a ``sim:HOST:PORT`` path; ValueError if it is not one."""
    if not is_sim_path(path):
        raise ValueError(f"{path!r} is not a simulated key path (sim:HOST:PORT)")
    return parse_address(path[len(PATH_PREFIX) :])


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def list_sim_descriptors(
    addresses: list[tuple[str, int]], timeout: float = PROBE_TIMEOUT
) -> list[HidDescriptor]:
    """Descriptors of the simulated keys that accept a TCP connection right now (each
    probed with a connect of at most ``timeout`` seconds; the probe sends nothing, which the
    key does not count as an open handle)."""
    found = []
    for host, port in addresses:
        try:
            _connect(host, port, timeout).close()
        except OSError:
            continue
        found.append(sim_descriptor(host, port))
    return found


class SocketHidConnection(CtapHidConnection):
    """A :class:`fido2.hid.base.CtapHidConnection` to a simulated key over TCP.

    :param read_timeout: seconds :meth:`read_packet` waits (None: forever, as hidraw does);
        on expiry it raises TimeoutError.

    When the key goes away (unplugged, server stopped) reads and writes raise
    ConnectionError (an OSError), as a removed USB device fails with ENODEV.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float | None = None,
    ) -> None:
        self.address = (host, port)
        self._sock = _connect(host, port, connect_timeout)
        self._sock.settimeout(read_timeout)
        self._reader = FrameReader(self._sock)
        self._write_lock = threading.Lock()
        self._closed = False

    def write_packet(self, data: bytes) -> None:
        self._check_open()
        frame = encode_frame(data)
        with self._write_lock:
            try:
                self._sock.sendall(frame)
            except OSError as e:
                raise self._gone(e) from e

    def read_packet(self) -> bytes:
        self._check_open()
        try:
            report = self._reader.read_frame()
        except TimeoutError:
            raise
        except OSError as e:
            raise self._gone(e) from e
        if report is None:
            raise ConnectionResetError(
                errno.ECONNRESET,
                f"virtual key at {format_address(*self.address)} closed the connection "
                "(unplugged or stopped)",
            )
        return report

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "the connection to the virtual key is closed")

    def _gone(self, cause: OSError) -> ConnectionError:
        if isinstance(cause, ConnectionError):
            return cause
        return ConnectionError(
            errno.ECONNRESET,
            f"connection to the virtual key at {format_address(*self.address)} failed: {cause}",
        )


def open_sim_connection(
    descriptor: HidDescriptor, *, read_timeout: float | None = None
) -> SocketHidConnection:
    """Open a connection for a descriptor from :func:`sim_descriptor`."""
    host, port = sim_address(descriptor.path)
    return SocketHidConnection(host, port, read_timeout=read_timeout)
