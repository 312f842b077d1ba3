"""The service's local API: messages on its Unix socket.

Framing
    A Unix stream socket (default ``/run/token-agent/agent.sock``; ``config.toml``
    ``[service] socket``, or ``TOKEN_AGENT_SOCKET``). Each message is one JSON object encoded
    as UTF-8 on one line, ending with ``\\n``; a line longer than ``MAX_LINE`` bytes, or one
    that is not a JSON object, is answered with the error ``bad-request`` and the connection
    is closed. Either side may close at any time; the service survives a client that goes
    away in the middle of a ceremony (the ceremony is cancelled and recorded).

Requests and responses
    The client sends ``{"id": N, "op": "NAME", ...arguments}`` (N: an integer the client
    chooses, echoed back). The service answers every request exactly once, in any order
    relative to other requests on the same connection:

        {"id": N, "ok": true, "result": {...}}
        {"id": N, "ok": false, "error": {"code": "CODE", "message": "for people"}}

    Error codes: ``bad-request`` (malformed, unknown op, missing or wrong argument),
    ``forbidden`` (the caller may not do this: recorded in the audit log), ``not-found``
    (user, method, login), ``conflict``, ``unavailable`` (store, devices), ``internal``.

Events
    The service also sends messages without an ``id``: ``{"event": "NAME", ...}``, for the
    prompts of a ceremony started on this connection and, after ``events.subscribe``, for
    the event stream.

Who may ask what (the caller is known from ``SO_PEERCRED``, never from the message)
    * ``root`` (uid 0) and the configured login services (``[service] login_service_users``,
      e.g. ``gdm``): ``login.start`` for any user.
    * any local user: ``login.start`` for themselves (a screen locker runs as the user), and
      the ``methods.*`` / ``enrol.*`` ops for their own agent user (same username).
    * admins (uid 0, members of ``[service] admin_group``, or agent users with the role
      ``admin`` whose username is the caller's): every op, for any user.
    * everything else: ``forbidden``, recorded as a ``service.refused`` audit event.

Operations
    ``hello`` {} -> {"version": 1, "agent": "0.1.0", "peer": {"uid", "pid", "user",
    "roles": [...]}}  (roles: "root", "login-service", "admin", "user")

    ``login.start`` {"user": str | null, "primary": "password"|"key"|"card"|null,
    "second": METHOD | null, "device": {"kind": "managed"|"unmanaged", "device_id": str|null,
    "network": str|null} | null, "service": str|null} -> {"login": LOGIN_ID}
        Starts the login the policy asks for (``token_agent.ceremonies.login``), at once,
        on a worker thread. With no user: whoever taps a key (usernameless, ``primary`` key
        or null) or inserts a card (``primary`` card). The device defaults to the
        workstation's (``[workstation]`` in config.toml). Then, on this connection:

        {"event": "prompt", "login": ID, "prompt": PID, "kind": "secret"|"text"|"choose",
         "message": "Enter the PIN for your security key", "options": [[KEY, LABEL], ...],
         "default": KEY}         (options/default only for "choose")
        {"event": "info", "login": ID, "message": "Touch your security key"}
        {"event": "qr", "login": ID, "uri": "otpauth://...", "text": "<terminal QR>"}
        {"event": "result", "login": ID, "outcome": {LoginOutcome.to_json()}}

        The login waits for each prompt's answer (``prompt_timeout``, default 120 s, then
        it is cancelled). Exactly one ``result`` event ends every login.

    ``login.answer`` {"login": ID, "prompt": PID, "value": str | null} -> {}
        null: no answer (the login ends as cancelled). A secret answer is never logged.

    ``login.cancel`` {"login": ID} -> {}   (the key gets CTAPHID_CANCEL; result follows)

    ``session.state`` {"user": str | null} -> {"sessions": [SESSION...]}
        The sessions the service holds (successful logins; card-bound ones end or lock when
        their card leaves), kept in the store, so they survive a restart:
        SESSION = {"id", "user", "method", "created_at", "state": "active"|"locked"|"ended",
        "device_id", "card": {"reader", "atr", "certificate_serial"} | null}

    ``methods.list`` {"user"} -> {"methods": [...]}  (as ``token-agent methods list --json``)
    ``methods.prefer`` {"user", "kind", "name"|null} -> {}
    ``methods.remove`` {"user", "kind", "name"|null} -> {}
    ``enrol.totp`` {"user", "name"|null} -> {"uri", "secret", "text"}   (QR text for a terminal)
    ``enrol.totp.confirm`` {"user", "code", "name"|null} -> {"ok", "message"}
    ``enrol.backup-codes`` {"user"} -> {"codes": [...]}
    ``enrol.key`` {"user", "name"|null} -> {"login": ID}  (a ceremony: prompts and result
        events as for ``login.start``; the result's outcome is the enrolment's)
    ``policy.explain`` {"user", "device"|null} -> Decision.to_json() + {"text"}
    ``admin.unlock`` {"user", "kind"|null} -> {"cleared": [...]}          (admins only)
    ``admin.reset-methods`` {"user"} -> {"removed": N}                   (admins only)

    ``events.subscribe`` {} -> {}   then, on this connection, for as long as it is open:
        {"event": "card.inserted", "reader", "atr", "at"}
        {"event": "card.removed", "reader", "at"}
        {"event": "session.locked", "session", "user", "reader", "latency_ms", "at"}
        {"event": "service.readers", "state": "lost"|"back", "at"}
        {"event": "login.finished", "login", "user", "ok", "method", "at"}  (admins only)

Concurrency
    Each connection has its own thread; requests for different users run at the same time,
    requests concerning one user are handled one after another (one lock per user), and a
    device (a key, a reader) serves one ceremony at a time. A stuck client (one that never
    answers a prompt) holds nothing but its own login, which times out.
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1
MAX_LINE = 65536
DEFAULT_SOCKET = "/run/token-agent/agent.sock"
SOCKET_ENV = "TOKEN_AGENT_SOCKET"

ERROR_CODES = ("bad-request", "forbidden", "not-found", "conflict", "unavailable", "internal")
PROMPT_KINDS = ("secret", "text", "choose")


class ProtocolError(Exception):
    """A message that breaks the framing (too long, not JSON, not an object)."""


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line of JSON (compact, UTF-8, ``\\n``-terminated)."""
    line = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = line.encode("utf-8") + b"\n"
    if len(data) > MAX_LINE:
        raise ProtocolError(f"message of {len(data)} bytes is longer than {MAX_LINE}")
    return data


def decode(line: bytes) -> dict[str, Any]:
    """One line (with or without its ``\\n``) back into a message."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message
