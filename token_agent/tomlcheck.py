"""What the policy file and the configuration file share when they check a TOML document:
values shown as they are written, their kinds named, misspellings suggested, and a parser
base that collects every problem with its key path (so that all of them are reported at
once) and refuses unknown tables and keys."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from datetime import date, datetime, time
from typing import Any


def show(value: Any) -> str:
    """A value as it would be written in TOML, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return repr(value)


def kind(value: Any) -> str:
    """What TOML calls the value's type, with its article ("an integer")."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime):
        return "a datetime"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, time):
        return "a time of day"
    return f"a {type(value).__name__}"


def suggest(word: str, choices: Iterable[str]) -> str:
    """"did you mean X?" for a likely misspelling of one of ``choices``, else ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else ""


class TableParser:
    """Collects ``errors`` as ``SOURCE: key.path: message``. ``keys`` names each top-level
    table's known keys; the tables in ``free`` have keys of their own (checked elsewhere)."""

    def __init__(self, source: str, keys: Mapping[str, Iterable[str]], *,
                 free: Iterable[str] = ()) -> None:
        self.source = source
        self.keys = {name: tuple(known) for name, known in keys.items()}
        self.free = frozenset(free)
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{self.source}: {path}: {message}")

    def unknown(self, tbl: Mapping[str, Any], path: str, known: Iterable[str], what: str) -> None:
        """Report every key of ``tbl`` (all unknown) with a suggestion or the known ones."""
        known = tuple(known)
        for key in tbl:
            where = f"{path}.{key}" if path else key
            hint = suggest(key, known)
            if not hint:
                hint = f"known: {', '.join(known)}" if known else "this table takes no keys"
            self.error(where, f"unknown {what} ({hint})")

    def table(self, data: Mapping[str, Any], name: str) -> dict[str, Any]:
        """Top-level table ``name`` (empty when absent), its unknown keys reported."""
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.error(name, f"must be a table ([{name}]), not {kind(value)}")
            return {}
        if name not in self.free:
            known = self.keys[name]
            self.unknown({k: v for k, v in value.items() if k not in known}, name, known, "key")
        return value

    def boolean(self, tbl: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        if key not in tbl:
            return default
        value = tbl[key]
        if not isinstance(value, bool):
            self.error(f"{path}.{key}", f"{show(value)} must be true or false, not {kind(value)}")
            return default
        return value
