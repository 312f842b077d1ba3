"""The service's local API: messages on its Unix socket.

Framing
    A Unix stream socket (default ``/run/token-agent/agent.sock``; ``config.toml``
    ``[service] socket``, or ``TOKEN_AGENT_SOCKET``), and a second one with the same
    protocol for root and the login services only (``[service] login_socket``, default
    ``login.sock`` beside the first, mode 0600 or 0660 with ``login_socket_group``; others
    are turned away there with ``forbidden``): a local user's flood on the public socket
    cannot reach it. Each message is one JSON object encoded as UTF-8 on one line, ending
    with ``\\n``; a line longer than ``MAX_LINE`` bytes, one nested deeper than
    ``MAX_DEPTH`` levels, or one that is not a JSON object, is answered with the error
    ``bad-request`` and the connection is closed. Either side may close at any time; the
    service survives a client that goes away in the middle of a ceremony (the ceremony is
    cancelled and recorded). A connection over the limits (``[service] max_connections``,
    ``max_connections_per_user``) gets the error ``unavailable`` and is closed; so is one
    that sends no request for ``idle_timeout`` seconds while it runs no ceremony and
    subscribed to no events, and an idle one of a user holding many connections when another
    user needs room. Errors that belong to no request (framing, no integer id, too many
    connections, idle) carry ``"id": null``.

Requests and responses
    The client sends ``{"id": N, "op": "NAME", ...arguments}`` (N: an integer the client
    chooses, echoed back). The service answers every request exactly once, in any order
    relative to other requests on the same connection:

        {"id": N, "ok": true, "result": {...}}
        {"id": N, "ok": false, "error": {"code": "CODE", "message": "for people"}}

    Error codes: ``bad-request`` (malformed, unknown op, missing, unknown or wrong argument,
    a ``user`` that is not a user name: 1 to 64 ASCII letters, digits and . _ - @,
    ``token_agent/usernames.py``; never recorded, and the message does not repeat it),
    ``forbidden`` (the caller may not do this: recorded in the audit log),
    ``reauth-required`` (a change of methods needs a recent login on this connection first:
    see "Changing methods"; recorded as ``forbidden`` is), ``not-found`` (user, method,
    login), ``conflict``, ``unavailable`` (store, devices), ``busy`` (over a ceremony
    limit: two running on one connection, ``max_ceremonies_per_user`` for one local user,
    or the share of ``max_ceremonies`` local users may take; root and the login services
    keep a quarter of the pool), ``internal``.

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
    * everything else: ``forbidden``, recorded as a ``service.refused`` audit event
      (detail: ``op``, ``peer_uid``, ``peer_pid``, ``peer_user``, ``target``); past the
      first 3 of one caller and op in a minute, refusals are counted and recorded as one
      ``service.refused`` event with outcome ``repeated`` (detail ``op``, ``peer_uid``,
      ``peer_user``, ``count``, ``targets``, ``first_at``, ``last_at``) when the minute
      ends or the service stops (``refusals.py``).

    In detail: ``hello`` and ``events.subscribe`` are for anyone (``login.finished`` goes to
    admins only). ``login.start`` with ``user`` null from a caller who may only log
    themselves in is a login of the caller's own user; its ``device`` is taken from root,
    login services and admins only (for the others it is ignored: the workstation's).
    ``session.state`` and ``policy.explain``: a user for their own agent user, login
    services and admins for anyone. ``card.self-unlock``: root, login services and admins
    for any user's card; any other local user for their own card only (``user`` null or
    their own name; the card in the reader must be that user's, checked before anything is
    asked); the attempts are counted per card by the library (3 a day). ``login.answer`` only on the connection that started the login;
    ``login.cancel`` there, or by an admin from anywhere.

Changing methods (NIST SP 800-63B §6.1.2.1; ``token_agent/reauth.py``)
    ``enrol.totp``, ``enrol.totp.confirm``, ``enrol.backup-codes``, ``enrol.key``,
    ``methods.remove`` and ``methods.prefer`` by a caller who is not an admin need a
    successful ``login.start`` of that same user *on the same connection*, at most
    ``[reverification] bind_minutes`` (policy, default 5) minutes old, and multi-factor
    when MFA applies to the user and they hold a second factor (``login.start`` with
    ``"step_up": true`` asks for the second factor even where the policy would skip it).
    A login on another connection does not count. Otherwise the error ``reauth-required``,
    recorded as ``service.refused`` with the detail ``reauth``: no-login | other-user |
    stale | single-factor. Exceptions: a user with no usable method at all may
    set up the first one without a login (there is nothing to authenticate with); the
    login flow's own enrolment of a required second factor (inside ``login.start``); and
    admins, who act for any user (each change is recorded with its ``actor``).

Operations
    ``hello`` {} -> {"version": 1, "agent": "0.1.0", "peer": {"uid", "pid", "user",
    "roles": [...]}, "service": {"pid", "uptime_s", "connections", "ceremonies", "threads",
    "subscribers", "sessions": {"active": N, "locked": N, "ended": N},
    "readers": {READER: card_present}, "watching_readers": bool}}  (roles: "root", "login-service", "admin", "user")

    ``login.start`` {"user": str | null, "primary": "password"|"key"|"card"|null,
    "second": METHOD | "CHANNEL:NAME" | null, "device": {"kind": "managed"|"unmanaged",
    "device_id": str|null, "network": str|null} | null, "service": str|null,
    "step_up": bool|null}
    -> {"login": LOGIN_ID}
        (LOGIN_ID: a string; ``second``: a second factor instead of the preferred one, a
        channel meaning its preferred contact, or one contact by name, e.g. "sms:alternate
        phone" (``ceremonies/choices.py``; the second factor's "choose" prompt has one
        option per contact, keyed so when a channel has several); ``service``: the PAM
        service name, for the logs; ``step_up``: ask for the second factor when MFA applies
        even where the policy would skip it, to re-authenticate before changing methods)
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
                                 (a successful login's outcome also has "session": SESSION_ID;
                                 a failure before any factor succeeded has the message
                                 "Authentication failed." whatever its reason, no user_id and
                                 no tries_left: ``ceremonies.login.shown_before_first_factor``;
                                 every outcome has "warnings": [str], for the person, e.g.
                                 "Your card's certificate expires on 21 November 2026 (in 20
                                 days): ask your registration authority to renew it" when it
                                 ends within the card setting ``card_expiry_warning_days``
                                 (default 90); a success sends each warning as an "info"
                                 event first, so that PAM shows it as PAM_TEXT_INFO)

        "Forgot your card PIN?" (``service/selfunlock.py``): a card login that finds the
        card locked (reason ``pin-blocked``, before a PIN is asked or at the wrong PIN that
        locked it) asks, when an RA credentials source is configured (the service's
        ``$TOKEN_AGENT_RA`` or the card setting ``card_ra_source``), the card's holder is
        enrolled here and is the login's user: the "text" prompt "Your card is locked.
        Forgot your card PIN? Unlock it now? [y/N]". "y" or "yes" runs the self-service
        unlock (``ceremonies/cardunlock.py``) in the same login, holding the same reader:
        its prompts come on as this login's ("Where should we send a one-time code?"
        (choose, several contacts only), "Enter the code sent to ...", "Your password" (or
        the key's ceremony for a user without a password), "New card PIN (6 to 8 digits)",
        "New card PIN again"), then the info "Your card is unlocked. Log in with your new
        PIN." and the card's PIN prompt again: the login goes on with the new PIN. Any other
        answer: the login fails as it would have ("Your card is locked: ask your sponsor to
        unlock it.", reason ``pin-blocked``). A failed unlock ends the login with the
        unlock's message, reason ``pin-blocked`` (the card stays locked) or ``cancelled``;
        the audit event ``card.self-unlock`` has the unlock's own reason. No RA source, a
        card of someone else or not enrolled here: no question, the plain failure. On a
        workstation joined to an organisation's server, the offer comes when the server's
        outcome says it can unlock the card (``detail.self_unlock``: it has an RA source),
        and the unlock runs through the server (ceremony op ``card.self-unlock``).

        The login waits for each prompt's answer (``prompt_timeout``, default 120 s, then
        it is cancelled). Exactly one ``result`` event ends every login. The PIN prompts
        say "Enter the PIN for your security key" / "Enter the PIN for your card"; the key
        asking for a touch is the info "Touch your security key". Cancellations (login.cancel,
        a client gone, a prompt timed out, the service stopping) are recorded as the audit
        event ``service.cancel`` (detail ``cause``: login.cancel | disconnect |
        prompt-timeout | shutdown). A successful login marks its connection as
        authenticated for that user (see "Changing methods").

    ``login.answer`` {"login": ID, "prompt": PID, "value": str | null} -> {}
        null: no answer (the login ends as cancelled). A secret answer is never logged.

    ``login.cancel`` {"login": ID} -> {}   (the key gets CTAPHID_CANCEL; result follows)

    ``session.state`` {"user": str | null} -> {"sessions": [SESSION...]}
        The sessions the service holds (successful logins; card-bound ones end or lock when
        their card leaves), kept in the store, so they survive a restart:
        SESSION = {"id", "user", "method", "created_at", "state": "active"|"locked"|"ended",
        "end_reason": str|null, "device_id", "card": {"reader", "atr", "certificate_serial"}
        | null}   (user null: every session for login services and admins, else the
        caller's own; a session whose card leaves is "locked", end_reason card-removed)

    ``methods.list`` {"user"} -> {"methods": [...]}  (as ``token-agent methods list --json``)
    ``methods.prefer`` {"user", "kind", "name"|null} -> {}
    ``methods.remove`` {"user", "kind", "name"|null} -> {}
    ``enrol.totp`` {"user", "name"|null} -> {"uri", "secret", "text", "method"}   (QR text for a
        terminal; method: the pending method's name)
    ``enrol.totp.confirm`` {"user", "code", "name"|null} -> {"ok", "message", "reason"}
    ``enrol.backup-codes`` {"user"} -> {"codes": [...]}
    ``enrol.key`` {"user", "name"|null} -> {"login": ID}  (a ceremony: prompts and result
        events as for ``login.start``; the result's outcome is the enrolment's: {"ok",
        "method": "key", "reason", "message"} and, when ok, ``EnrolResult.to_json()``)
        A key ceremony (this, or ``login.start``) from a caller that is not a login service
        asks for a touch on the key before its PIN ("Touch your security key"), as does any
        caller's when the key has 3 or fewer PIN tries left; without it the outcome's reason
        is "presence-required" and no PIN was asked (ceremonies/keypresence.py). A key with
        no PIN yet is given none over the socket: the outcome fails (reason "device-error")
        and its message gives the command that sets one (`token-agent keys pin set --key
        PATH`), as the CLI does without a terminal.
    ``policy.explain`` {"user", "device"|null} -> Decision.to_json() + {"text", "user",
        "primary", "device"}
    ``admin.unlock`` {"user", "kind"|null} -> {"cleared": [...]}          (admins only)
    ``admin.reset-methods`` {"user", "include_password"|null} -> {"removed": N}  (admins only)
        every method of the user but the password; the password too when
        "include_password" is true (as `token-agent admin reset-methods --include-password`)

    ``card.self-unlock`` {"user": str | null} -> {"login": ID}   (a ceremony: prompts and
        result events as for ``login.start``) The cardholder's own unlock of the locked card
        in a reader (the questions of "Forgot your card PIN?" above, without the offer); the
        result's outcome is ``CardActionOutcome.to_json()`` + ``"method": "card"``: {"ok",
        "action": "self-unlock", "reason", "message", "card_uuid", "holder_name",
        "certificate_serial", "sponsor": null, "detail", "method"}; a card that is not
        ``user``'s: reason ``credential-of-another-user``, nothing asked. ``unavailable``
        when no RA credentials source is configured. No session is opened: log in afterwards.
        On a workstation joined to an organisation's server it is run by the server, with
        the server's RA source (the new PIN asked and kept here; the server's own reasons,
        e.g. ``internal-error`` "not set up" when it has no RA source;
        ``server-unavailable`` when no server answers).

    ``events.subscribe`` {} -> {}   then, on this connection, for as long as it is open:
        {"event": "card.inserted", "reader", "atr", "at"}
        {"event": "card.removed", "reader", "at"}
        {"event": "session.locked", "session", "user", "reader", "reason", "latency_ms", "at"}
        {"event": "service.readers", "state": "lost"|"back", "at"}
        {"event": "login.finished", "login", "user", "ok", "method", "at"}  (admins only;
                                 also for enrol.key ceremonies)
        ("at": seconds since the epoch; for card events, when the watcher saw the change)

Concurrency
    Each connection has its own thread; requests for different users run at the same time,
    requests concerning one user are handled one after another (one lock per user), and a
    device (a key, a reader) serves one ceremony at a time. A stuck client (one that never
    answers a prompt) holds nothing but its own login, which times out: a ceremony gives its
    user's lock up while it waits for a prompt's answer or a device, so even another login
    of the same user goes ahead. A client that does not read what it is sent is
    disconnected once its queue of messages is full.
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1
MAX_LINE = 65536
#: how deep a message's arrays and objects may nest (requests need 3)
MAX_DEPTH = 16
DEFAULT_SOCKET = "/run/token-agent/agent.sock"
SOCKET_ENV = "TOKEN_AGENT_SOCKET"

ERROR_CODES = ("bad-request", "forbidden", "reauth-required", "not-found", "conflict",
               "unavailable", "busy", "internal")
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


def nesting_depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not
    count). Linear, no recursion: measured before the text is parsed."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def decode(line: bytes) -> dict[str, Any]:
    """One line (with or without its ``\\n``) back into a message."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes")
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH:  # only then is the scan needed
        try:
            depth = nesting_depth(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"not a JSON line: {exc}") from None
        if depth > MAX_DEPTH:
            raise ProtocolError(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message
