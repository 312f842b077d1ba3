"""The service's logs: structured records on stderr, never a secret.

``text``: ``2026-12-01T09:00:00.123Z INFO token_agent.service: login finished login=3 user=alice``
(the record's fields after the message, ``key=value``); ``json``: one object per line with
``ts``, ``level``, ``logger``, ``message`` and the record's fields (what ``extra=`` gave),
for log shippers. Under systemd, each line starts with its priority (``<3>``...), and JSON
records are sent to journald as journal fields (:mod:`token_agent.service.journal`).

Nothing secret is logged: the service never passes a PIN, password, code, TOTP secret or a
prompt's answer to a log call, and as a second line of defence a field whose name looks like
a secret (``token_agent.store.secret_looking``: ``pin``, ``password``, ``code``, ``secret``,
...) is dropped from every record before it is written.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, TextIO

#: attributes every LogRecord has: not "extra" fields
_STANDARD = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
#: third-party loggers kept at INFO or above unless the level is debug (their debug records
#: carry device traffic)
QUIET_LOGGERS = ("fido2", "smartcard", "urllib3")


def _ts(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + \
        f".{int(created * 1000) % 1000:03d}Z"


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's extra fields, secret-looking names left out."""
    from ..store import secret_looking

    out = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_") or secret_looking(key):
            continue
        out[key] = value
    return out


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": _ts(record.created), "level": record.levelname.lower(),
                                "logger": record.name, "message": record.getMessage()}
        for key, value in record_fields(record).items():
            if key not in data:
                data[key] = _plain(value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_ts(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = record_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(_plain(value), separators=(",", ":"))
    return json.dumps(text) if (not text or any(c.isspace() or c in '"=' for c in text)) else text


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None
                  ) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) as ``fmt`` (text | json) at
    ``level``; replaces the handlers set before. Returns the handler. Under systemd, the
    lines carry their priority, and JSON records go to the journal as fields
    (:mod:`token_agent.service.journal`)."""
    from .journal import handler_for

    handler = handler_for(JsonFormatter() if fmt == "json" else TextFormatter(), stream,
                          native=fmt == "json")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()  # a journal handler's socket (a stream handler leaves its stream open)
    root.addHandler(handler)
    numeric = getattr(logging, level.upper(), logging.INFO)
    root.setLevel(numeric)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.INFO))
    return handler
