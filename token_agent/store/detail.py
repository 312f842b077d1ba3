"""The rules for an audit event's detail: no key that looks like a secret (PIN, password,
code, secret, token, ...) is accepted, so secrets never reach the audit table; an event is
never refused for its size (strings past ``MAX_DETAIL_STRING`` characters and a detail past
``MAX_DETAIL_BYTES`` are cut, with a marker giving the original length)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidValue
from .records import MAX_DETAIL_BYTES, MAX_DETAIL_STRING

#: words that make a detail key look like a secret
SECRET_WORDS = frozenset({
    "pin", "pins", "puk", "password", "passwords", "passwd", "pwd", "passphrase", "passcode",
    "code", "codes", "otp", "totp", "hotp", "secret", "secrets", "token", "tokens",
    "private", "privkey", "seed", "cookie", "authorization",
})
#: stems that make a single fused word (``newpin``, ``authtoken``) look like a secret
SECRET_STEMS = ("pin", "password", "passwd", "passphrase", "passcode", "pwd", "code", "otp",
                "secret", "token", "puk")
#: words that make a secret-looking key describe a secret rather than carry it
#: (``pin_retries``, ``error_code``, ``token_type``)
#: (words that could as well go with the secret itself, like ``wrong``, ``new`` or ``sent``,
#: are deliberately not here: ``wrong_pin`` and ``sent_code`` are refused)
METADATA_WORDS = frozenset({
    "retries", "tries", "attempts", "remaining", "left", "length", "len", "count", "blocked",
    "status", "state", "error", "exit", "type", "kind", "policy", "required", "configured",
    "enabled", "disabled", "supported", "changed", "expired", "expires", "expiry", "age",
    "format", "id", "is", "has",
})


_ACRONYM_RE = re.compile(r"([A-Z]+)([A-Z][a-z])")
_CAMEL_RE = re.compile(r"([a-z0-9])([A-Z])")
_WORD_SPLIT_RE = re.compile(r"[^a-z0-9]+")


def _key_words(key: str) -> list[str]:
    spaced = _ACRONYM_RE.sub(r"\1_\2", key)
    spaced = _CAMEL_RE.sub(r"\1_\2", spaced)
    return [w for w in _WORD_SPLIT_RE.split(spaced.lower()) if w]


@functools.lru_cache(maxsize=1024)  # a pure function of the key; the same keys come back
def secret_looking(key: str) -> bool:
    """Whether a detail key looks like it would hold a secret.

    The key is split into words (``_``, ``-``, ``.``, spaces, camelCase). It looks like a
    secret when a word is a secret word (``pin``, ``password``, ``code``, ``secret``,
    ``token``, ``otp``, ...) or begins or ends with one (``newpin``, ``authtoken``), unless
    another word says it is about the secret rather than the secret itself (``pin_retries``,
    ``error_code``, ``token_type``, ``code_length``).
    """
    words = _key_words(key)
    suspicious = [w for w in words
                  if w in SECRET_WORDS or any(w.startswith(s) or w.endswith(s) for s in SECRET_STEMS)]
    if not suspicious:
        return False
    return not any(w in METADATA_WORDS for w in words if w not in suspicious)


def _cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and a marker giving its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[truncated: {len(text)} characters]"


def check_detail(detail: Mapping[str, Any] | None, *, truncate: bool = False) -> str:
    """Validate an audit detail and return its canonical JSON text.

    Raises ``InvalidValue`` (a ``ValueError``) when the detail is not a JSON object of JSON
    values with string keys, or has a key at any depth that looks like a secret
    (``secret_looking``): secrets never reach the audit table. A detail larger than
    ``MAX_DETAIL_BYTES`` raises too, unless ``truncate`` (what ``record_event`` does: an
    event is never lost for its size): then every string longer than ``MAX_DETAIL_STRING``
    characters is cut, with the marker ``...[truncated: N characters]``, and a detail still
    too large becomes ``{"truncated": true, "original_bytes": N, "head": "<the start of
    its JSON text>"}``.
    """
    if detail is None:
        return "{}"
    if not isinstance(detail, Mapping):
        raise InvalidValue(f"audit detail must be a dict, not {type(detail).__name__}")

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise InvalidValue(f"audit detail key {k!r} at {where or 'top level'} is not a string")
                if secret_looking(k):
                    raise InvalidValue(
                        f"audit detail key {k!r} looks like a secret (PIN, password, code, secret, "
                        "token): secrets must never be recorded; record a fact about it instead "
                        "(e.g. 'pin_retries', 'code_length')")
                out[k] = walk(v, f"{where}.{k}" if where else k)
            return out
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            return _cut(value, MAX_DETAIL_STRING) if truncate else value
        if value is None or isinstance(value, (int, float, bool)):
            return value
        raise InvalidValue(
            f"audit detail value at {where!r} is a {type(value).__name__}, not a JSON value")

    def dumps(value: Any) -> str:
        try:
            return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except ValueError as exc:
            raise InvalidValue(f"audit detail is not valid JSON: {exc}") from None

    text = dumps(walk(detail, ""))
    size = len(text.encode())
    if size > MAX_DETAIL_BYTES:
        if not truncate:
            raise InvalidValue(f"audit detail is larger than {MAX_DETAIL_BYTES} bytes")
        text = dumps({"truncated": True, "original_bytes": size,
                      "head": text[:MAX_DETAIL_BYTES // 4]})
    return text
