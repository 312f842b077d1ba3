"""The service's logs under systemd: priorities journald understands, standard library only.

When systemd connects stderr to the journal it says so in ``JOURNAL_STREAM=DEVICE:INODE``
(the stream's ``st_dev:st_ino``, systemd.exec(5)); a process whose fd 2 still has those is
writing to the journal. Then:

* each line written to stderr starts with its sd-daemon priority, ``<3>`` for an error,
  ``<4>`` a warning, ``<6>`` info, ``<7>`` debug (sd-daemon(3)), which journald strips and
  stores as the entry's PRIORITY (without it everything is stored at info);
* with ``[logging] format = "json"``, and journald's native socket there
  (``/run/systemd/journal/socket``; ``TOKEN_AGENT_JOURNAL_SOCKET`` names another, for tests),
  each record is sent as one datagram of journal fields (the native protocol,
  systemd.journal-fields(7)): MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, CODE_FILE, CODE_LINE,
  CODE_FUNC, LOGGER, THREAD_NAME, EXCEPTION_TEXT, and the record's own fields as
  ``TOKEN_AGENT_<NAME>`` (``user=alice`` is ``TOKEN_AGENT_USER=alice``; lists and objects as
  JSON), so that ``journalctl -u token-agent TOKEN_AGENT_USER=alice -o json`` finds them. A
  record the socket does not take goes to stderr, with its prefix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: seconds a record may wait for the journal to take it (then it goes to stderr)
SEND_TIMEOUT = 1.0
#: after such a wait, records go to the journal only if it takes them at once, this long
STALLED_FOR = 30.0
SOCKET_ENV = "TOKEN_AGENT_JOURNAL_SOCKET"
IDENTIFIER = "token-agent"


def syslog_priority(levelno: int) -> int:
    """LOG_CRIT 2, LOG_ERR 3, LOG_WARNING 4, LOG_INFO 6, LOG_DEBUG 7 (LOG_NOTICE 5 unused)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd named in ``JOURNAL_STREAM``."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's StringIO)
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class PriorityPrefix(logging.Formatter):
    """Another formatter's text with ``<N>`` before every line of it (a traceback's lines
    included: a line without one would be stored at info)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


_NAME_INVALID = re.compile(r"[^A-Z0-9_]")


def field_name(name: str) -> str:
    """A journal field name: upper case letters, digits and ``_``, starting with a letter,
    at most 64 characters."""
    name = _NAME_INVALID.sub("_", name.upper()).lstrip("_0123456789") or "FIELD"
    return name[:64]


def encode_fields(fields: list[tuple[str, str]]) -> bytes:
    """The native protocol's datagram: ``NAME=value\\n``, or, for a value with a newline,
    ``NAME\\n`` + its length as 64-bit little-endian + the value + ``\\n``."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Records as native journal entries on ``path``; a record that cannot be sent is written
    by ``fallback`` (stderr, prefixed) instead."""

    def __init__(self, path: str, fallback: logging.Handler) -> None:
        super().__init__()
        self.path = path
        self.fallback = fallback
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # a journal that does not read (hung, or its queue of net.unix.max_dgram_qlen
        # datagrams full) must not stop the service: a record waits this long, then goes to
        # stderr
        self.sock.settimeout(SEND_TIMEOUT)
        self._stalled_until = 0.0

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        from .logs import _plain, record_fields

        fields = [("MESSAGE", record.getMessage()),
                  ("PRIORITY", str(syslog_priority(record.levelno))),
                  ("SYSLOG_IDENTIFIER", IDENTIFIER),
                  ("CODE_FILE", record.pathname), ("CODE_LINE", str(record.lineno)),
                  ("CODE_FUNC", record.funcName), ("LOGGER", record.name),
                  ("THREAD_NAME", record.threadName or "")]
        if record.exc_info:
            fields.append(("EXCEPTION_TEXT", logging.Formatter().formatException(record.exc_info)))
        for key, value in record_fields(record).items():
            value = _plain(value)
            if value is None:
                continue  # a field the record does not have this time
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            fields.append(("TOKEN_AGENT_" + field_name(key), text))
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode_fields(self.fields(record))
            if time.monotonic() < self._stalled_until:  # not reading lately: no waiting
                self.sock.sendto(data, socket.MSG_DONTWAIT, self.path)
            else:
                self.sock.sendto(data, self.path)
        except TimeoutError:  # the journal is not reading: stderr, for a while
            self._stalled_until = time.monotonic() + STALLED_FOR
            self.fallback.handle(record)
        except OSError:  # journald gone, restarting or not reading, or too big for a datagram
            self.fallback.handle(record)
        except Exception:  # noqa: BLE001  (logging's own convention)
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        self.fallback.close()
        super().close()


def journal_socket(environ: Mapping[str, str] | None = None) -> str:
    return (os.environ if environ is None else environ).get(SOCKET_ENV) or JOURNAL_SOCKET


def handler_for(formatter: logging.Formatter, stream: TextIO | None = None,
                native: bool = False, environ: Mapping[str, str] | None = None
                ) -> logging.Handler:
    """The handler for the service's records: on ``stream`` (stderr) with ``formatter``,
    prefixed with priorities when the stream is the journal, or, with ``native`` (JSON
    logs), the journal's socket when that is there too."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if not stream_is_journal(stream, environ):
        handler.setFormatter(formatter)
        return handler
    handler.setFormatter(PriorityPrefix(formatter))
    path = journal_socket(environ)
    if native and os.path.exists(path):
        return JournalHandler(path, handler)
    return handler
