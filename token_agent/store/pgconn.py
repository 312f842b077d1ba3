"""The store's SQL on psycopg 3 (``postgres.py``'s connections): ``?`` placeholders become
``%s`` (and a literal ``%`` becomes ``%%``), rows are read by column name or by index (as
``sqlite3.Row``), and Python bools go as 0/1 (the store's INTEGER 0/1 columns)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg


@functools.lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    """The store's SQL (``?`` placeholders) in psycopg's format: ``?`` outside string
    literals, quoted identifiers, ``$$`` bodies and comments becomes ``%s``; every ``%``
    becomes ``%%`` (psycopg gives it back as ``%``: queries always go with parameters)."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in ("'", '"'):
            end = i + 1
            while end < n:
                if sql[end] == ch:
                    if end + 1 < n and sql[end + 1] == ch:  # '' or "" inside
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i:end + 1].replace("%", "%%"))
            i = end + 1
        elif ch == "$" and sql.startswith("$$", i):  # a function body: as written
            end = sql.find("$$", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif ch == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif ch == "?":
            out.append("%s")
            i += 1
        elif ch == "%":
            out.append("%%")
            i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _params(params: Sequence[Any]) -> tuple:
    """Python bools as 0/1 (INTEGER columns, as on SQLite)."""
    return tuple(int(p) if p is True or p is False else p for p in params)


class PgRow:
    """A row readable by column name (``row["id"]``) or index (``row[0]``), like
    ``sqlite3.Row``; iterates over its values."""

    __slots__ = ("_values", "_names", "_index")

    def __init__(self, values: Sequence[Any], names: list[str], index: dict[str, int]) -> None:
        self._values = tuple(values)
        self._names = names
        self._index = index

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._index[key]]
            except KeyError:
                lowered = key.lower()
                if lowered in self._index:
                    return self._values[self._index[lowered]]
                raise IndexError(f"no column named {key!r}") from None
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PgRow):
            return self._values == other._values
        if isinstance(other, tuple):
            return self._values == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"PgRow({dict(zip(self._names, self._values))!r})"


def row_factory(cursor: Any) -> Any:
    description = cursor.description
    if description is None:
        return tuple
    names = [d.name for d in description]
    index = {name: i for i, name in reversed(list(enumerate(names)))}
    return lambda values: PgRow(values, names, index)


class PgConnection:
    """A pooled psycopg connection with the store's SQL rules (``engine.Connection``)."""

    def __init__(self, raw: psycopg.Connection) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        try:
            return self.raw.execute(translate(sql), _params(params))
        except psycopg.Error as exc:
            exc.token_agent_statement = sql  # type: ignore[attr-defined]
            raise

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> psycopg.Cursor:
        cur = self.raw.cursor()
        try:
            cur.executemany(translate(sql), [_params(p) for p in params])
        except psycopg.Error as exc:
            exc.token_agent_statement = sql  # type: ignore[attr-defined]
            raise
        return cur
