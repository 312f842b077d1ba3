"""Delivery of one-time codes to people: by email, SMS, voice call or a messaging app.

This module only delivers a code that has already been made; generating, storing and
checking codes happen elsewhere. A `Message` says what to send and where;
`Delivery.send(message)` hands it to the channel's gateway and, if that fails, to the
channel's fallbacks in turn, and returns a `Receipt` naming the channel that delivered. If
every channel fails it raises `DeliveryError`, whose message is written for people
("could not send the code by SMS: the gateway answered 503").

Nothing secret is logged. Log records carry the channel, the gateway, the destination
masked (`+44•••••123`, `a•••@nhs.net`) and the outcome. They never carry the code, a
message's text, or a gateway's password or token, and neither do exception messages.

### Configuration: the `[delivery]` table of the policy file

```toml
[delivery]
sender_name = "NHS Trust"          # the name in texts, emails and calls   [token-agent]
fallback = { messaging = "sms" }   # channel -> the channel tried when it fails

[delivery.email]
gateway = "smtp"                   # smtp | outbox                                 [smtp]
host = "smtp.trust.nhs.example"    #                                               [localhost]
port = 587                         #                           [25; 465 with security = "tls"]
security = "starttls"              # none | starttls | tls                         [starttls]
username = "agent"                 # optional: log in to the mail server
password_file = "/etc/token-agent/smtp.secret"   # needed with username
from = "MFA <noreply@trust.nhs.example>"         # required with gateway = "smtp"
timeout = 10                       # seconds                                       [10]

[delivery.sms]                     # [delivery.voice] and [delivery.messaging] have the same keys
gateway = "http"                   # http | outbox                                 [http]
url = "https://gateway.example/v1/messages"      # required with gateway = "http"
token_file = "/etc/token-agent/sms.token"        # optional: sent as "Authorization: Bearer ..."
timeout = 10                       # seconds                                       [10]

[delivery.voice]                   # also: phone call approval ("press #"), optional
url = "https://gateway.example/v1/messages"
call_url = "https://gateway.example/v1/calls"    # starts an approval call
webhook_secret_file = "/etc/token-agent/voice-webhook.secret"  # signs the gateway's result

[delivery.messaging]               # the channel `fallback` above sends on to SMS
url = "https://messaging.example/v1/messages"
token_file = "/etc/token-agent/messaging.token"

[delivery.outbox]                  # development machines only, see below
dir = "/var/lib/token-agent/outbox"
```

* A channel (`email`, `sms`, `voice`, `messaging`) without a table is not configured:
  sending a code on it fails with "no gateway configured for sms: add [delivery.sms] to the
  policy file".
* Secrets never go in the policy file. A `password` or `token` key is an error; put the
  secret, on one line, in a file only the agent can read and name it with `password_file` or
  `token_file`. The file is read each time a code is sent, so it can be replaced without a
  restart.
* `security = "none"` sends mail unencrypted and is allowed only to a mail server on this
  machine (`host` is `localhost`, `127.0.0.1` or `::1`). In the same way an `http://` URL is
  allowed only to this machine; anywhere else use `https://`. Certificates are checked
  against the system's trusted roots.
* `fallback` maps a channel to the channel tried when it fails. Chains are allowed
  (`messaging = "sms"`, `sms = "voice"`); a cycle is an error, and so is falling back
  between email and a phone channel (an email address is not a phone number). The
  `Receipt` names the channel that delivered, and in `fell_back_from` the one asked for.
* `timeout` is in seconds, above 0 and at most 120. Paths must be absolute.
* Destinations: an email address, or a phone number in E.164 (`+447700900123`) or UK
  national form (`07700 900123`), which is sent as E.164.
* Every problem in the table is reported at once, each with its key path
  (`delivery.email.port: ...`).

The HTTP gateway POSTs JSON to `url` and expects a 2xx answer, preferably `{"id": "..."}`
(the gateway's message ID; without one the request's `reference` stands in):

```json
{"channel": "sms", "to": "+447700900123", "text": "123456 is your NHS Trust sign-in code. It expires in 10 minutes. Never share it.", "reference": "<uuid4>"}
{"channel": "voice", "to": "+447700900123", "say": "This is NHS Trust. Your sign-in code is 1, 2, 3, 4, 5, 6. Again: 1, 2, 3, 4, 5, 6. Enter it on the screen, then press hash.", "gather": {"finish_on_key": "#"}, "reference": "<uuid4>"}
```

**Phone call approval** (`call_url` and `webhook_secret_file` in `[delivery.voice]`, both or
neither; `token_agent.factors.voicecall`): the agent POSTs
`{"channel": "voice", "to": "+447700900123", "say": "...", "gather": {"num_digits": 1},
"call_id": "<id>", "reference": "<id>"}` to `call_url`; the gateway calls, reads `say` and
reports the key pressed to the organisation server's `/hooks/voice`, signed with the shared
secret of `webhook_secret_file` (HMAC-SHA256, see `voicecall.verify_webhook`).

Redirects are not followed (they would carry the bearer token elsewhere). Proxies named in
the environment (`https_proxy`, `no_proxy`) are used, except for gateways on this machine.

**The outbox** (`gateway = "outbox"` on any channel) writes every message, *code included*,
to a JSON file in `[delivery.outbox] dir` instead of sending it: `<UTC time>-<id>.json`,
mode 0600, written atomically (a temporary file, flushed to disk, then renamed) in a
directory of mode 0700 (created if missing; an existing directory other users can read is
refused). It stands in for the user's phone or mailbox on a developer's machine and in
tests. **Never use it in production**: anyone who can read the directory can sign in as
anyone who is sent a code.
"""

from __future__ import annotations

import dataclasses
import difflib
import http.client
import ipaddress
import json
import logging
import re
import smtplib
import socket
import ssl
import stat
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from . import kinds
from .atomicfile import write_private

log = logging.getLogger("token_agent.delivery")

CHANNELS = tuple(k.store for k in kinds.CONTACTS)
PHONE_CHANNELS = tuple(k.store for k in kinds.CONTACTS if k is not kinds.EMAIL)
PURPOSES = ("login", "enrol")
DEFAULT_SENDER_NAME = "token-agent"

#: how each channel is named in messages for people
CHANNEL_LABELS = {k.store: k.channel for k in kinds.CONTACTS}

DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 120.0
_MAX_SECRET_FILE = 4096
_MAX_RESPONSE = 64 * 1024
_MASK = "\u2022"  # •


# --------------------------------------------------------------------------- errors


class DeliveryConfigError(ValueError):
    """The `[delivery]` table is not valid; `errors` lists every problem with its key path."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        count = len(self.errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(
            f"the [delivery] settings of the policy file have {count} "
            f"problem{'' if count == 1 else 's'}:\n{lines}"
        )


class DeliveryError(Exception):
    """A code could not be delivered. `str(error)` is a message for people.

    `channel` is the channel asked for; `reason` the last failure without the "could not
    send" preamble; `failures` each (channel, reason) tried, in order.
    """

    def __init__(self, channel: str, message: str, *, reason: str | None = None,
                 failures: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.channel = channel
        self.message = message
        self.reason = reason if reason is not None else message
        self.failures = failures or ((channel, self.reason),)


def _failure(channel: str, reason: str) -> DeliveryError:
    label = CHANNEL_LABELS.get(channel, channel)
    return DeliveryError(channel, f"could not send the code by {label}: {reason}", reason=reason)


# --------------------------------------------------------------------------- messages


def _check_channel(channel: object) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r} (the channels are {', '.join(CHANNELS)})")
    return channel  # type: ignore[return-value]


def _check_display_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty text")
    if len(value) > 60:
        raise ValueError(f"{what} must be at most 60 characters long")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} must be on one line, without control characters")
    return value


def _expiry(seconds: int) -> str:
    if seconds < 60:
        n, unit = seconds, "second"
    else:
        n, unit = seconds // 60, "minute"  # rounded down: never promise more time than there is
    return f"{n} {unit}{'' if n == 1 else 's'}"


@dataclass(frozen=True, repr=False)
class Message:
    """One code to deliver. Its repr shows neither the code nor the whole destination."""

    channel: str
    destination: str
    code: str
    purpose: str = "login"  # "login" | "enrol"
    ttl_seconds: int = 600
    sender_name: str = DEFAULT_SENDER_NAME

    def __post_init__(self) -> None:
        _check_channel(self.channel)
        if not isinstance(self.destination, str) or not self.destination.strip():
            raise ValueError("a message needs a destination (an email address or a phone number)")
        # the error messages never repeat the code
        if not isinstance(self.code, str) or not re.fullmatch(r"[0-9]{4,12}", self.code):
            raise ValueError("a code must be 4 to 12 digits (0-9)")
        if self.purpose not in PURPOSES:
            raise ValueError(f"purpose must be login or enrol, not {self.purpose!r}")
        if (not isinstance(self.ttl_seconds, int) or isinstance(self.ttl_seconds, bool)
                or self.ttl_seconds <= 0):
            raise ValueError("ttl_seconds must be a whole number of seconds above 0")
        _check_display_name(self.sender_name, "sender_name")

    def __repr__(self) -> str:
        return (f"Message(channel={self.channel!r}, "
                f"destination={mask_destination(self.channel, self.destination)!r}, code=<hidden>, "
                f"purpose={self.purpose!r}, ttl_seconds={self.ttl_seconds}, "
                f"sender_name={self.sender_name!r})")

    @property
    def expires_in(self) -> str:
        """The lifetime in words: "10 minutes"."""
        return _expiry(self.ttl_seconds)

    def spoken_code(self) -> str:
        """The code digit by digit, as a voice reads it: "1, 2, 3, 4, 5, 6"."""
        return ", ".join(self.code)

    def subject(self) -> str | None:
        """An email's subject line (None for the other channels)."""
        if self.channel != "email":
            return None
        return "Your sign-in code" if self.purpose == "login" else "Your code to confirm your email address"

    def text(self) -> str:
        """What is sent: an email's body, a text message, or the script a voice call reads."""
        sender, code = self.sender_name, self.code
        if self.channel == "email":
            if self.purpose == "login":
                intro = f"Your {sender} sign-in code is:"
                unexpected = "If you did not try to sign in, tell your IT service desk."
            else:
                intro = f"Your {sender} code to confirm this email address is:"
                unexpected = "If you did not ask to add this email address, tell your IT service desk."
            return (f"{intro}\n\n    {code}\n\n"
                    f"It expires in {self.expires_in}. Never share it: nobody from {sender} or "
                    f"your IT service desk will ever ask you for it.\n\n"
                    f"{unexpected}\n")
        if self.channel == "voice":
            spoken = self.spoken_code()
            what = ("Your sign-in code" if self.purpose == "login"
                    else "Your code to confirm this phone number")
            return (f"This is {sender}. {what} is {spoken}. Again: {spoken}. "
                    f"Enter it on the screen, then press hash.")
        what = "sign-in code" if self.purpose == "login" else "code to confirm this phone number"
        return f"{code} is your {sender} {what}. It expires in {self.expires_in}. Never share it."


@dataclass(frozen=True)
class Receipt:
    """A delivered code: where it went (masked) and the gateway's message ID."""

    channel: str  # the channel that delivered, after any fallback
    gateway: str  # "smtp" | "http" | "outbox"
    message_id: str
    fell_back_from: str | None  # the channel asked for, when another one delivered
    destination_hint: str  # the destination masked, e.g. "+44•••••123"


# --------------------------------------------------------------------------- destinations


def mask_destination(channel: str, destination: str) -> str:
    """The destination with most of it hidden, fit for logs and screens.

    Phone numbers keep their first 2 and last 3 digits (`07•••••123`, `+44•••••123`), email
    addresses the first character and the domain (`a•••@nhs.net`). The number of dots is
    fixed, so the length is not given away either.
    """
    _check_channel(channel)
    value = destination.strip() if isinstance(destination, str) else ""
    if channel == "email":
        local, at, domain = value.rpartition("@")
        if not at or not local or not domain:
            return _MASK * 3
        return f"{local[0]}{_MASK * 3}@{domain}"
    digits = re.sub(r"[^0-9]", "", value)
    if len(digits) < 7:
        return _MASK * 5
    prefix = "+" if value.startswith("+") else ""
    return f"{prefix}{digits[:2]}{_MASK * 5}{digits[-3:]}"


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TLD = re.compile(r"[a-z]{2,63}|xn--[a-z0-9-]{1,59}")
_PHONE_HELP = "use the international format (+447700900123) or a UK number (07700900123)"


def _validate_email(value: str) -> str:
    v = value.strip()
    if not v:
        raise ValueError("the email address is empty")
    if any(c.isspace() for c in v) or v.count("@") != 1:
        raise ValueError("not an email address: it needs one @ and no spaces, like name@trust.nhs.uk")
    local, domain = v.split("@")
    if not local or len(local) > 64 or not _LOCAL_PART.fullmatch(local):
        raise ValueError("not an email address: the part before the @ is not valid")
    domain = domain.lower()
    labels = domain.split(".")
    if (len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels)
            or not _TLD.fullmatch(labels[-1])):
        raise ValueError("not an email address: the part after the @ is not a domain name (like nhs.net)")
    address = f"{local}@{domain}"
    if len(address) > 254:
        raise ValueError("the email address is too long (at most 254 characters)")
    return address


def _validate_phone(value: str) -> str:
    v = value.strip()
    if not v:
        raise ValueError(f"the phone number is empty: {_PHONE_HELP}")
    if v.startswith(("+", "00")):
        v = v.replace("(0)", "")  # "+44 (0)7700 900123"
    compact = re.sub(r"[\s().\-]", "", v)
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    if compact.startswith("+"):
        digits = compact[1:]
        if digits.startswith("440"):  # "+44 07700 900123": the national 0 does not belong
            digits = "44" + digits[3:]
        if not re.fullmatch(r"[1-9][0-9]{7,14}", digits):
            raise ValueError(f"not a phone number: an international number is + and 8 to 15 digits; "
                             f"{_PHONE_HELP}")
        return "+" + digits
    if re.fullmatch(r"0[1-9][0-9]{8,9}", compact):
        return "+44" + compact[1:]
    raise ValueError(f"not a phone number: {_PHONE_HELP}")


def validate_destination(channel: str, destination: str) -> str:
    """The destination checked and normalised for its channel.

    Email: a plain address (`name@trust.nhs.uk`, no display name), domain lower-cased.
    Phone channels: an E.164 number (`+447700900123`); UK national numbers (`07700 900123`)
    become E.164. Text messages (SMS, a messaging app) go to mobiles only: a UK landline or
    office phone (`020 7946 0018`) is refused for them, with :data:`LANDLINE_REFUSED`. Raises ValueError with a message for people (which does not repeat the
    destination, as it may end up in logs).
    """
    _check_channel(channel)
    if not isinstance(destination, str):
        raise ValueError("a destination must be text")
    if channel == "email":
        return _validate_email(destination)
    number = _validate_phone(destination)
    if channel in TEXT_CHANNELS and is_uk_landline(number):
        raise ValueError(LANDLINE_REFUSED)
    return number


#: the channels whose messages only a mobile phone receives
TEXT_CHANNELS = ("sms", "messaging")
#: why a landline is refused for texts (NHSmail's guide: "The use of the office phone option
#: is not recommended or supported"; "(Note: The office phone option is not supported.)")
LANDLINE_REFUSED = ("Office phones and landlines cannot receive text messages: enter a mobile "
                    "number (UK mobile numbers start 07)")


def is_uk_landline(number: str) -> bool:
    """Whether an E.164 number is a UK number that is not a mobile: a landline or office
    phone (01, 02, 03) or a non-geographic one (05, 08, 09). UK mobiles start 07."""
    return number.startswith("+44") and len(number) > 3 and number[3] != "7"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SmtpSettings:
    from_address: str  # the From header, as written in the policy ("MFA <noreply@...>")
    host: str = "localhost"
    port: int = 25
    security: str = "starttls"  # none | starttls | tls
    username: str | None = None
    password_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def envelope_from(self) -> str:
        return parseaddr(self.from_address)[1]


@dataclass(frozen=True)
class HttpSettings:
    url: str
    token_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    #: [delivery.voice] only: where approval calls are started, and the file holding the
    #: secret the gateway signs its webhook with
    call_url: str | None = None
    webhook_secret_file: Path | None = None


@dataclass(frozen=True)
class OutboxSettings:
    dir: Path


@dataclass(frozen=True)
class ChannelConfig:
    channel: str
    gateway: str  # "smtp" (email), "http" (phone channels) or "outbox"
    smtp: SmtpSettings | None = None
    http: HttpSettings | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    channels: Mapping[str, ChannelConfig] = field(default_factory=lambda: MappingProxyType({}))
    fallback: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    sender_name: str = DEFAULT_SENDER_NAME
    outbox: OutboxSettings | None = None

    def fallback_chain(self, channel: str) -> tuple[str, ...]:
        """The channel, then its fallbacks in order (a cycle, if one got in, is cut)."""
        chain = [channel]
        while (nxt := self.fallback.get(chain[-1])) is not None and nxt not in chain:
            chain.append(nxt)
        return tuple(chain)


def _is_loopback(host: str) -> bool:
    h = host.strip().strip("[]").lower().rstrip(".")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


_HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host.lower()))


class _Table:
    """One TOML table being checked: reads keys, collects problems under its path."""

    def __init__(self, data: Mapping[str, Any], path: str, errors: list[str]):
        self.data, self.path, self.errors = data, path, errors

    def error(self, key: str | None, problem: str) -> None:
        self.errors.append(f"{self.path}.{key}: {problem}" if key else f"{self.path}: {problem}")

    def check_keys(self, known: tuple[str, ...], secrets: Mapping[str, str] = MappingProxyType({}),
                   what: str = "key", known_are: str | None = None) -> None:
        """Report unknown keys (with the nearest known one) and secrets put in the file."""
        for key, value in self.data.items():
            if key in secrets:
                self.error(key, secrets[key])
            elif key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = (f"did you mean {close[0]}?" if close
                        else known_are or f"known keys: {', '.join(known)}")
                kind = what if what != "key" else ("table" if isinstance(value, Mapping) else "key")
                self.error(key, f"unknown {kind} ({hint})")

    def text(self, key: str, default: str | None = None) -> str | None:
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, str) or not value.strip():
            self.error(key, f"must be a non-empty string (got {_shown(value)})")
            return None
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            self.error(key, "must be on one line, without control characters")
            return None
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str | None:
        value = self.text(key, default)
        if value is not None and value not in choices:
            self.error(key, f"must be {' or '.join(choices)} (got {value!r})")
            return None
        return value

    def path_value(self, key: str) -> Path | None:
        value = self.text(key)
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute():
            self.error(key, f"must be an absolute path (got {value!r})")
            return None
        return p

    def timeout(self) -> float | None:
        if "timeout" not in self.data:
            return DEFAULT_TIMEOUT
        value = self.data["timeout"]
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not 0 < value <= MAX_TIMEOUT):
            self.error("timeout", f"must be a number of seconds above 0 and at most {MAX_TIMEOUT:g} "
                                  f"(got {_shown(value)})")
            return None
        return float(value)


def _shown(value: object) -> str:
    if isinstance(value, (dict, list)):
        return "a table" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _secret_keys(file_key: str) -> dict[str, str]:
    nouns = {"password": "a password", "passwd": "a password", "token": "a token", "api_key": "a token",
             "apikey": "a token", "secret": "a secret"}
    return {key: (f"{noun} does not go in the policy file: put it, on one line, in a file only the agent "
                  f"can read, and name that file with {file_key}") for key, noun in nouns.items()}


def _table(parent: _Table, key: str) -> _Table | None:
    value = parent.data[key]
    if not isinstance(value, Mapping):
        parent.error(key, f"must be a table ([{parent.path}.{key}]), not {_shown(value)}")
        return None
    return _Table(value, f"{parent.path}.{key}", parent.errors)


def _parse_email(t: _Table, has_outbox: bool) -> ChannelConfig | None:
    t.check_keys(("gateway", "host", "port", "security", "username", "password_file", "from", "timeout"),
                 _secret_keys("password_file"))
    bad = len(t.errors)
    gateway = t.choice("gateway", ("smtp", "outbox"), "smtp")
    host = t.text("host", "localhost")
    if host is not None:
        host = host.strip().lower()
        if not _valid_host(host):
            t.error("host", f"is not a host name or IP address (got {host!r})")
            host = None
    security = t.choice("security", ("none", "starttls", "tls"), "starttls")
    port: int | None = 465 if security == "tls" else 25
    if "port" in t.data:
        value = t.data["port"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            t.error("port", f"must be a whole number from 1 to 65535 (got {_shown(value)})")
            port = None
        else:
            port = value
    username = t.text("username")
    password_file = t.path_value("password_file")
    from_address = t.text("from")
    if from_address is not None:
        _name, addr = parseaddr(from_address)
        try:
            _validate_email(addr)
        except ValueError:
            t.error("from", f"is not an address like \"MFA <noreply@trust.nhs.uk>\" (got {from_address!r})")
            from_address = None
    timeout = t.timeout()

    if gateway == "smtp":
        if "from" not in t.data:
            t.error("from", "missing: the sender of the emails, like \"MFA <noreply@trust.nhs.uk>\"")
        if security == "none" and host is not None and not _is_loopback(host):
            t.error("security", f"\"none\" sends codes unencrypted, so it is allowed only to a mail server "
                                f"on this machine (host localhost, 127.0.0.1 or ::1), not {host}: "
                                f"use starttls or tls")
        if "username" in t.data and "password_file" not in t.data:
            t.error("password_file", "missing: needed with username (the file holding the SMTP password)")
        if "password_file" in t.data and "username" not in t.data:
            t.error("username", "missing: needed with password_file (the SMTP user name)")
    elif gateway == "outbox" and not has_outbox:
        t.error("gateway", "\"outbox\" needs a [delivery.outbox] table with dir")
    if len(t.errors) > bad:
        return None
    if gateway == "outbox":
        return ChannelConfig("email", "outbox")
    assert host is not None and port is not None and security is not None and timeout is not None
    return ChannelConfig("email", "smtp", smtp=SmtpSettings(
        from_address=from_address or "", host=host, port=port, security=security, username=username,
        password_file=password_file, timeout=timeout))


def _url_problem(url: str) -> str | None:
    if any(c.isspace() for c in url):
        return "must not contain spaces"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme.lower() not in ("http", "https"):
        got = f"{parts.scheme}://" if parts.scheme else "a URL without a scheme"
        return f"must be an https:// URL (or http:// to this machine), not {got}"
    if parts.username is not None or parts.password is not None:
        return "must not contain a user name or password: put the token in a file named by token_file"
    host = parts.hostname
    if not host or not _valid_host(host):
        return "has no valid host name"
    if parts.scheme.lower() == "http" and not _is_loopback(host):
        return (f"http:// would send codes unencrypted, so it is allowed only to this machine "
                f"(localhost, 127.0.0.1 or ::1), not {host}: use https://")
    return None


def _parse_phone(channel: str, t: _Table, has_outbox: bool) -> ChannelConfig | None:
    calls = ("call_url", "webhook_secret_file") if channel == "voice" else ()
    t.check_keys(("gateway", "url", "token_file", "timeout", *calls), _secret_keys("token_file"))
    bad = len(t.errors)
    gateway = t.choice("gateway", ("http", "outbox"), "http")
    url = t.text("url")
    if url is not None and (problem := _url_problem(url)):
        t.error("url", problem)  # the URL itself is not repeated: it might hold a secret
        url = None
    token_file = t.path_value("token_file")
    timeout = t.timeout()
    call_url = t.text("call_url") if calls else None
    if call_url is not None and (problem := _url_problem(call_url)):
        t.error("call_url", problem)
        call_url = None
    webhook_secret_file = t.path_value("webhook_secret_file") if calls else None
    if calls and ("call_url" in t.data) != ("webhook_secret_file" in t.data):
        missing = "webhook_secret_file" if "call_url" in t.data else "call_url"
        t.error(missing, "missing: phone call approval needs both call_url (where calls are "
                         "started) and webhook_secret_file (the secret the gateway signs its "
                         "results with)")
    if calls and "call_url" in t.data and gateway != "http":
        t.error("call_url", "phone call approval needs gateway = \"http\"")
    if gateway == "http" and "url" not in t.data:
        t.error("url", "missing: the gateway's address, like \"https://gateway.example/v1/messages\"")
    elif gateway == "outbox" and not has_outbox:
        t.error("gateway", "\"outbox\" needs a [delivery.outbox] table with dir")
    if len(t.errors) > bad:
        return None
    if gateway == "outbox":
        return ChannelConfig(channel, "outbox")
    assert url is not None and timeout is not None
    return ChannelConfig(channel, "http", http=HttpSettings(
        url=url, token_file=token_file, timeout=timeout, call_url=call_url,
        webhook_secret_file=webhook_secret_file))


def _parse_fallback(top: _Table, channels: set[str]) -> dict[str, str]:
    value = top.data["fallback"]
    if not isinstance(value, Mapping):
        top.error("fallback", f"must be a table like {{ messaging = \"sms\" }}, not {_shown(value)}")
        return {}
    t = _Table(value, f"{top.path}.fallback", top.errors)
    t.check_keys(CHANNELS, what="channel", known_are=f"the channels are {', '.join(CHANNELS)}")
    edges: dict[str, str] = {}
    for src, dst in value.items():
        if src not in CHANNELS:
            continue
        if dst not in CHANNELS:
            close = difflib.get_close_matches(dst, CHANNELS, n=1, cutoff=0.6) if isinstance(dst, str) else []
            hint = f"did you mean {close[0]}?" if close else f"the channels are {', '.join(CHANNELS)}"
            t.error(src, f"{_shown(dst)} is not a channel ({hint})")
            continue
        if src == dst:
            t.error(src, "a channel cannot fall back to itself")
            continue
        if (src == "email") != (dst == "email"):
            t.error(src, f"{src} cannot fall back to {dst}: a code for {src} goes to "
                         f"{'an email address' if src == 'email' else 'a phone number'}, "
                         f"one for {dst} to {'an email address' if dst == 'email' else 'a phone number'}")
            continue
        problems = [f"[delivery.{c}]" for c in (src, dst) if c not in channels]
        if problems:
            t.error(src, f"{' and '.join(problems)} {'is' if len(problems) == 1 else 'are'} not configured")
            continue
        edges[src] = dst
    seen_cycles: set[frozenset[str]] = set()
    for start in edges:
        chain = [start]
        while (nxt := edges.get(chain[-1])) is not None:
            if nxt in chain:
                cycle = chain[chain.index(nxt):] + [nxt]
                key = frozenset(cycle)
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    top.error("fallback", f"the fallbacks go round in a circle ({' -> '.join(cycle)}), "
                                          f"so sending would never end: remove one of them")
                break
            chain.append(nxt)
    return edges


def parse_delivery_config(table: Mapping[str, Any] | None) -> DeliveryConfig:
    """Check the policy file's `[delivery]` table (as parsed by tomllib) and build the config.

    No table means no channel is configured. Raises DeliveryConfigError listing every
    problem, each with its key path.
    """
    if table is None:
        return DeliveryConfig()
    errors: list[str] = []
    if not isinstance(table, Mapping):
        raise DeliveryConfigError([f"delivery: must be a table ([delivery]), not {_shown(table)}"])
    top = _Table(table, "delivery", errors)
    top.check_keys(("sender_name", "fallback", *CHANNELS, "outbox"),
                   known_are=f"the channels are {', '.join(CHANNELS)}; the other tables and keys "
                             f"outbox, fallback and sender_name")

    sender_name = DEFAULT_SENDER_NAME
    if "sender_name" in table:
        value = top.text("sender_name")
        if value is not None:
            try:
                sender_name = _check_display_name(value, "sender_name")
            except ValueError as exc:
                top.error("sender_name", str(exc).removeprefix("sender_name "))

    outbox: OutboxSettings | None = None
    if "outbox" in table and (t := _table(top, "outbox")) is not None:
        t.check_keys(("dir",))
        if "dir" not in t.data:
            t.error("dir", "missing: the directory the messages are written to")
        elif (d := t.path_value("dir")) is not None:
            outbox = OutboxSettings(dir=d)

    channels: dict[str, ChannelConfig] = {}
    for channel in CHANNELS:
        if channel not in table or (t := _table(top, channel)) is None:
            continue
        has_outbox = "outbox" in table
        parsed = _parse_email(t, has_outbox) if channel == "email" else _parse_phone(channel, t, has_outbox)
        if parsed is not None:
            channels[channel] = parsed

    fallback: dict[str, str] = {}
    if "fallback" in table:
        fallback = _parse_fallback(top, {c for c in CHANNELS if c in table})

    if errors:
        raise DeliveryConfigError(errors)
    return DeliveryConfig(channels=MappingProxyType(channels), fallback=MappingProxyType(fallback),
                          sender_name=sender_name, outbox=outbox)


# --------------------------------------------------------------------------- gateways


def _read_secret(channel: str, path: Path, key: str, table: str, what: str) -> str:
    """A password or token from its file, checked; errors name the file, never its content."""
    where = f"{key} in [delivery.{table}]"
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_SECRET_FILE + 1)
    except FileNotFoundError:
        raise _failure(channel, f"the {what} file {path} does not exist ({where})") from None
    except PermissionError:
        raise _failure(channel, f"the agent may not read the {what} file {path} ({where})") from None
    except OSError as exc:
        raise _failure(channel, f"the {what} file {path} cannot be read: {exc.strerror} ({where})") from None
    if len(data) > _MAX_SECRET_FILE:
        raise _failure(channel, f"the {what} file {path} is too big to hold a {what} ({where})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _failure(channel, f"the {what} file {path} is not UTF-8 text ({where})") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise _failure(channel, f"the {what} file {path} is empty ({where})")
    if "\n" in text or "\r" in text:
        raise _failure(channel, f"the {what} file {path} must hold the {what} on one line ({where})")
    return text


class Gateway:
    """Sends one message; returns the message ID, or raises DeliveryError."""

    name: ClassVar[str] = ""
    channels: ClassVar[tuple[str, ...]] = CHANNELS

    def send(self, message: Message) -> str:
        raise NotImplementedError

    def _destination(self, message: Message) -> str:
        if message.channel not in self.channels:
            raise ValueError(f"the {self.name} gateway does not send {message.channel} messages")
        try:
            return validate_destination(message.channel, message.destination)
        except ValueError as exc:
            raise _failure(message.channel, str(exc)) from None


class SmtpGateway(Gateway):
    """Email through an SMTP server (smtplib), with STARTTLS or TLS and optional login."""

    name = "smtp"
    channels = ("email",)

    def __init__(self, settings: SmtpSettings):
        self.settings = settings

    def build(self, message: Message, to: str) -> EmailMessage:
        s = self.settings
        mail = EmailMessage()
        mail["Subject"] = message.subject() or "Your sign-in code"
        mail["From"] = s.from_address
        mail["To"] = to
        mail["Date"] = formatdate(usegmt=True)
        # a domain given: make_msgid would otherwise look up this machine's name
        mail["Message-ID"] = make_msgid(domain=s.envelope_from.rpartition("@")[2] or "localhost")
        mail["Auto-Submitted"] = "auto-generated"
        mail.set_content(message.text())
        return mail

    def send(self, message: Message) -> str:
        to = self._destination(message)
        s = self.settings
        fail = lambda reason: _failure("email", reason)  # noqa: E731
        password = None
        if s.username:
            if s.password_file is None:
                raise fail("username is set but password_file is not ([delivery.email])")
            password = _read_secret("email", s.password_file, "password_file", "email", "SMTP password")
        mail = self.build(message, to)
        server = f"the mail server at {s.host}:{s.port}"
        hint = mask_destination("email", to)
        context = ssl.create_default_context()
        client: smtplib.SMTP | None = None
        try:
            if s.security == "tls":
                client = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout, context=context)
            else:
                client = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
            client.ehlo()
            if s.security == "starttls":
                if not client.has_extn("starttls"):
                    raise fail(f"{server} does not offer STARTTLS: set security = \"tls\" if it expects "
                               f"TLS from the start, or use another server")
                client.starttls(context=context)
                client.ehlo()
            if s.username:
                if not client.has_extn("auth"):
                    raise fail(f"{server} does not offer logging in (AUTH), but username is set")
                client.login(s.username, password or "")
            client.send_message(mail, from_addr=s.envelope_from, to_addrs=[to])
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                pass
        except DeliveryError:
            raise
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [str(code) for code, _resp in exc.recipients.values()]
            why = ", ".join(codes) or "no reason given"
            raise fail(f"{server} refused the address {hint} ({why})") from None
        except smtplib.SMTPSenderRefused as exc:
            raise fail(f"{server} refused the sender {s.envelope_from} ({exc.smtp_code}): "
                       f"check from in [delivery.email]") from None
        except smtplib.SMTPAuthenticationError as exc:
            raise fail(f"{server} did not accept the user name and password ({exc.smtp_code}): "
                       f"check username and password_file in [delivery.email]") from None
        except smtplib.SMTPDataError as exc:
            raise fail(f"{server} refused the message ({exc.smtp_code})") from None
        except smtplib.SMTPNotSupportedError:
            raise fail(f"{server} does not support what the settings ask for (STARTTLS or AUTH)") from None
        except smtplib.SMTPConnectError as exc:
            raise fail(f"{server} is not accepting mail ({exc.smtp_code})") from None
        except smtplib.SMTPServerDisconnected as exc:
            if isinstance(exc.__context__, TimeoutError):  # smtplib reports a read timeout so
                raise fail(f"{server} did not answer within {s.timeout:g} s") from None
            raise fail(f"{server} closed the connection unexpectedly") from None
        except smtplib.SMTPResponseException as exc:
            raise fail(f"{server} answered {exc.smtp_code}") from None
        except smtplib.SMTPException as exc:
            # e.g. "No suitable authentication method found."; smtplib's own words, no secrets
            raise fail(f"{server}: {exc}") from None
        except ssl.SSLCertVerificationError as exc:
            raise fail(f"{server} presented a certificate that cannot be trusted "
                       f"({exc.verify_message or 'verification failed'})") from None
        except ssl.SSLError as exc:
            raise fail(f"the TLS connection to {server} failed ({exc.reason or 'TLS error'}): "
                       f"check security in [delivery.email]") from None
        except TimeoutError:
            raise fail(f"{server} did not answer within {s.timeout:g} s") from None
        except ConnectionRefusedError:
            raise fail(f"nothing is listening at {s.host}:{s.port} (connection refused)") from None
        except socket.gaierror:
            raise fail(f"the mail server's name {s.host} cannot be resolved") from None
        except OSError as exc:
            raise fail(f"cannot talk to {server}: {exc.strerror or type(exc).__name__}") from None
        finally:
            if client is not None:
                client.close()
        return str(mail["Message-ID"])


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are refused: they would take the bearer token somewhere else."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


class HttpGateway(Gateway):
    """SMS, voice calls and messaging through an HTTP(S) JSON gateway (urllib)."""

    name = "http"
    channels = PHONE_CHANNELS

    def __init__(self, channel: str, settings: HttpSettings, sender_name: str | None = None):
        if channel not in PHONE_CHANNELS:
            raise ValueError(f"the http gateway sends {', '.join(PHONE_CHANNELS)}, not {channel}")
        problem = _url_problem(settings.url)
        if problem:
            raise ValueError(f"url {problem}")
        self.channel = channel
        self.settings = settings
        parts = urllib.parse.urlsplit(settings.url)
        self._where = f"{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        handlers: list[urllib.request.BaseHandler] = [
            _NoRedirects(),
            urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        ]
        if _is_loopback(parts.hostname or ""):
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    @staticmethod
    def payload(message: Message, to: str, reference: str) -> dict[str, Any]:
        if message.channel == "voice":
            return {"channel": "voice", "to": to, "say": message.text(),
                    "gather": {"finish_on_key": "#"}, "reference": reference}
        return {"channel": message.channel, "to": to, "text": message.text(), "reference": reference}

    def send(self, message: Message) -> str:
        if message.channel != self.channel:
            raise ValueError(f"this gateway sends {self.channel} messages, not {message.channel}")
        to = self._destination(message)
        reference = str(uuid.uuid4())
        return self._post(self.settings.url, self.payload(message, to, reference), reference)

    def start_call(self, destination: str, say: str, call_id: str) -> str:
        """Start a phone call approval (``call_url``): the gateway calls ``destination``,
        reads ``say`` and gathers one key; it reports the result to the webhook later.
        Returns the gateway's call ID; ``DeliveryError`` when the call cannot be started."""
        if self.settings.call_url is None:
            raise _failure(self.channel, "phone call approval is not configured: add call_url "
                                         "and webhook_secret_file to [delivery.voice]")
        try:
            to = validate_destination(self.channel, destination)
        except ValueError as exc:
            raise _failure(self.channel, str(exc)) from None
        payload = {"channel": "voice", "to": to, "say": say, "gather": {"num_digits": 1},
                   "call_id": call_id, "reference": call_id}
        return self._post(self.settings.call_url, payload, call_id)

    def _post(self, url: str, payload: dict[str, Any], reference: str) -> str:
        s = self.settings
        fail = lambda reason: _failure(self.channel, reason)  # noqa: E731
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "token-agent"}
        if s.token_file is not None:
            token = _read_secret(self.channel, s.token_file, "token_file", self.channel, "token").strip()
            if not re.fullmatch(r"[\x21-\x7e]+", token):
                raise fail(f"the token file {s.token_file} does not hold a token (one line of printable "
                           f"characters, no spaces) (token_file in [delivery.{self.channel}])")
            headers["Authorization"] = f"Bearer {token}"
        body = json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        parts = urllib.parse.urlsplit(url)
        where = f"{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        gateway = f"the gateway at {where}"
        try:
            with self._opener.open(request, timeout=s.timeout) as response:
                status = response.status
                raw = response.read(_MAX_RESPONSE + 1)
        except urllib.error.HTTPError as exc:
            exc.close()
            extra = ""
            if exc.code in (401, 403):
                extra = f": check token_file in [delivery.{self.channel}]"
            elif 300 <= exc.code < 400:
                extra = " (a redirect, which is not followed: check url)"
            raise fail(f"the gateway answered {exc.code}{extra}") from None
        except urllib.error.URLError as exc:
            raise fail(self._connection_problem(exc.reason, gateway)) from None
        except (TimeoutError, OSError) as exc:  # a timeout or reset while reading the answer
            raise fail(self._connection_problem(exc, gateway)) from None
        except http.client.HTTPException as exc:  # a garbled answer
            raise fail(f"{gateway} sent an answer that is not HTTP ({type(exc).__name__})") from None
        if not 200 <= status < 300:
            raise fail(f"the gateway answered {status}")
        if len(raw) > _MAX_RESPONSE:
            raise fail(f"{gateway} sent an answer too big to be one")
        if not raw.strip():
            return reference
        try:
            answer = json.loads(raw)
        except ValueError:
            # the answer may echo the text (and so the code): it is not quoted
            raise fail(f"{gateway} answered {status} but not with JSON") from None
        message_id = answer.get("id") if isinstance(answer, dict) else None
        if isinstance(message_id, (str, int)) and not isinstance(message_id, bool) and str(message_id):
            return str(message_id)[:200]
        return reference

    def _connection_problem(self, reason: object, gateway: str) -> str:
        if isinstance(reason, TimeoutError):
            return f"{gateway} did not answer within {self.settings.timeout:g} s"
        if isinstance(reason, ConnectionRefusedError):
            return f"nothing is listening at {self._where} (connection refused)"
        if isinstance(reason, socket.gaierror):
            return f"the gateway's name {self._where.rsplit(':', 1)[0]} cannot be resolved"
        if isinstance(reason, ssl.SSLCertVerificationError):
            return f"{gateway} presented a certificate that cannot be trusted ({reason.verify_message})"
        if isinstance(reason, ssl.SSLError):
            return f"the TLS connection to {gateway} failed ({reason.reason or 'TLS error'})"
        if isinstance(reason, OSError):
            return f"cannot talk to {gateway}: {reason.strerror or type(reason).__name__}"
        return f"cannot talk to {gateway}: {reason}"


class OutboxGateway(Gateway):
    """Writes each message, code included, to a JSON file. Development machines only."""

    name = "outbox"

    def __init__(self, settings: OutboxSettings):
        self.settings = settings

    def _directory(self, channel: str) -> Path:
        d = self.settings.dir
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = d.stat()
        except OSError as exc:
            raise _failure(channel, f"the outbox directory {d} cannot be made: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise _failure(channel, f"the outbox {d} is not a directory")
        if st.st_mode & 0o077:
            raise _failure(channel, f"the outbox directory {d} is open to other users "
                                    f"(mode {stat.S_IMODE(st.st_mode):o}): run chmod 700 {d}")
        return d

    def send(self, message: Message) -> str:
        to = self._destination(message)
        directory = self._directory(message.channel)
        now = datetime.now(timezone.utc)
        message_id = uuid.uuid4().hex
        record: dict[str, Any] = {"channel": message.channel, "to": to}
        if message.subject() is not None:
            record["subject"] = message.subject()
        record.update({"text": message.text(), "code": message.code, "purpose": message.purpose,
                       "created_at": now.isoformat(timespec="microseconds").replace("+00:00", "Z"),
                       "id": message_id})
        final = directory / f"{now:%Y%m%dT%H%M%S%fZ}-{message_id}.json"
        text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
        try:
            write_private(final, text.encode("utf-8"))
        except OSError as exc:
            raise _failure(message.channel,
                           f"cannot write to the outbox {directory}: {exc.strerror}") from None
        return message_id


# --------------------------------------------------------------------------- delivery


class Delivery:
    """Sends messages on the configured channels, falling back as the policy says."""

    def __init__(self, config: DeliveryConfig):
        self.config = config
        self._gateways: dict[str, Gateway] = {}
        outbox = OutboxGateway(config.outbox) if config.outbox is not None else None
        for channel, cc in config.channels.items():
            if cc.gateway == "outbox":
                if outbox is None:
                    raise ValueError(f"[delivery.{channel}] uses the outbox, "
                                     f"but there is no [delivery.outbox]")
                self._gateways[channel] = outbox
            elif cc.gateway == "smtp" and cc.smtp is not None:
                self._gateways[channel] = SmtpGateway(cc.smtp)
            elif cc.gateway == "http" and cc.http is not None:
                self._gateways[channel] = HttpGateway(channel, cc.http)
            else:
                raise ValueError(f"[delivery.{channel}]: gateway {cc.gateway!r} without its settings")

    def call_gateway(self) -> "HttpGateway | None":
        """The voice channel's HTTP gateway when it can make approval calls, else None."""
        gateway = self._gateways.get("voice")
        if isinstance(gateway, HttpGateway) and gateway.settings.call_url is not None:
            return gateway
        return None

    def webhook_secret(self) -> bytes:
        """The secret the voice gateway signs its webhook with (read each time: it can be
        replaced without a restart); ``DeliveryError`` when missing or unreadable."""
        gateway = self.call_gateway()
        if gateway is None or gateway.settings.webhook_secret_file is None:
            raise DeliveryError("voice", "phone call approval is not configured",
                                reason="not configured")
        text = _read_secret("voice", gateway.settings.webhook_secret_file, "webhook_secret_file",
                            "voice", "webhook secret").strip()
        if len(text) < 16:
            raise _failure("voice", f"the webhook secret in {gateway.settings.webhook_secret_file} "
                                    "is too short (at least 16 characters)")
        return text.encode("utf-8")

    def configured_channels(self) -> tuple[str, ...]:
        return tuple(c for c in CHANNELS if c in self._gateways)

    def gateway(self, channel: str) -> Gateway | None:
        return self._gateways.get(channel)

    def message(self, channel: str, destination: str, code: str, *, purpose: str = "login",
                ttl_seconds: int = 600) -> Message:
        """A Message signed with the policy's sender_name."""
        return Message(channel, destination, code, purpose=purpose, ttl_seconds=ttl_seconds,
                       sender_name=self.config.sender_name)

    def send(self, message: Message) -> Receipt:
        """Send on the message's channel, then on its fallbacks in turn until one delivers.

        A message left with the default sender name is sent with the policy's sender_name.
        Raises DeliveryError (listing each failure) if none delivers.
        """
        first = message.channel
        if first not in self._gateways:
            raise DeliveryError(
                first, f"no gateway configured for {first}: add [delivery.{first}] to the policy file",
                reason="no gateway configured")
        if message.sender_name == DEFAULT_SENDER_NAME and self.config.sender_name != DEFAULT_SENDER_NAME:
            message = dataclasses.replace(message, sender_name=self.config.sender_name)
        try:
            to = validate_destination(first, message.destination)
        except ValueError as exc:
            raise _failure(first, str(exc)) from None
        hint = mask_destination(first, to)
        failures: list[tuple[str, str]] = []
        for channel in self.config.fallback_chain(first):
            gateway = self._gateways.get(channel)
            if gateway is None:
                failures.append((channel, "no gateway configured"))
                continue
            attempt = dataclasses.replace(message, channel=channel, destination=to)
            log.debug("sending a %s code by %s through the %s gateway to %s",
                      message.purpose, channel, gateway.name, hint)
            try:
                message_id = gateway.send(attempt)
            except DeliveryError as exc:
                failures.append((channel, exc.reason))
                log.warning("could not send a %s code by %s through the %s gateway to %s: %s",
                            message.purpose, channel, gateway.name, hint, exc.reason)
                continue
            fell_back_from = first if channel != first else None
            log.info("sent a %s code by %s through the %s gateway to %s (message %s%s)",
                     message.purpose, channel, gateway.name, hint, message_id,
                     f", after {first} failed" if fell_back_from else "")
            return Receipt(channel=channel, gateway=gateway.name, message_id=message_id,
                           fell_back_from=fell_back_from, destination_hint=hint)
        if len(failures) == 1:
            channel, reason = failures[0]
            raise DeliveryError(first, f"could not send the code by {CHANNEL_LABELS[channel]}: {reason}",
                                reason=reason, failures=tuple(failures))
        parts = [f"by {CHANNEL_LABELS[c]} ({r})" for c, r in failures]
        text = "could not send the code " + parts[0] + "".join(f", nor {p}" for p in parts[1:])
        raise DeliveryError(first, text, reason=failures[-1][1], failures=tuple(failures))
