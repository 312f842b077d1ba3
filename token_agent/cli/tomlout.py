"""TOML for people and files: what `policy show` and `card settings show` print (valid TOML,
read back by ``tomllib``; the standard library has no writer)."""

from __future__ import annotations

import datetime as _dt
import math
import re
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    out = ['"']
    for c in text:
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def value(v: Any) -> str:
    """One TOML value (``ValueError`` for what TOML cannot hold: None, NaN, a table)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v} has no TOML form")
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, _dt.datetime):
        if v.tzinfo is not None and v.utcoffset() == _dt.timedelta(0):
            return v.strftime("%Y-%m-%dT%H:%M:%SZ")
        return v.isoformat()
    if isinstance(v, _dt.date):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(i) for i in v) + "]"
    raise ValueError(f"{type(v).__name__} has no TOML value form")


def dumps(data: dict[str, Any], *, header: list[str] | None = None, _path: str = "") -> str:
    """``data`` as a TOML document: its plain keys first, then one ``[table]`` per nested
    dict. A None value has no TOML form: it is written as a comment (``# key: not set``).
    ``header``: comment lines first."""
    lines = [f"# {h}" if h else "#" for h in (header or [])]
    tables = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif v is None:
            lines.append(f"# {_key(k)}: not set")
        else:
            lines.append(f"{_key(k)} = {value(v)}")
    for k, v in tables:
        name = f"{_path}.{_key(k)}" if _path else _key(k)
        if lines:
            lines.append("")
        if not v or any(not isinstance(i, dict) for i in v.values()):
            lines.append(f"[{name}]")  # a table of tables only needs no header of its own
        body = dumps(v, _path=name)
        if body:
            lines.append(body)
    return "\n".join(lines)
