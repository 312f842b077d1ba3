"""The schema of the organisation's settings: each setting declared once, with its name, type,
default, validation and description.

The settings live in the store (``settings`` table, JSON values; the store knows no names of
its own); every workstation sharing the store shares them. Every caller
goes through this schema: ``token-agent settings set|show``, ``token-agent card settings
set|show``, ``token-agent trust ...`` (``settings.py``), the key ceremonies
(``KeySettings.from_store``), the card ceremonies and the service (``CardSettings.from_store``)
and the agent's issuer name. Values are checked when set *and* when read, so a value written by
other means (an older version, a shared database edited by hand) is refused with the setting's
name instead of being used.

The declarations are ``SETTINGS`` below (``token-agent settings list`` prints them):
``rp_id``, ``rp_name``, ``user_verification`` (keys); ``attestation_roots``,
``allowed_aaguids`` (set by ``trust add-root|add-aaguid`` only); and the smartcard settings
``card_*`` (``card settings set`` takes them with or without the prefix). ``settings set NAME
VALUE...`` takes every setting but the trust lists. This module imports nothing of ``token_agent``.
"""

from __future__ import annotations

import re
import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

DEFAULT_RP_ID = "token-agent.local"
DEFAULT_RP_NAME = "token-agent"
UV_POLICIES = ("required", "preferred", "discouraged")
DEFAULT_LOCK_COMMAND = "loginctl lock-session"
CRL_BEHAVIOURS = ("refuse", "warn")

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)"
                     r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class UnknownSetting(ValueError):
    """A name that is no setting; the message names the valid ones."""


@dataclass(frozen=True)
class Setting:
    name: str
    #: text, choice, integer, boolean, list
    type: str
    default: Any
    description: str
    #: the value as stored from what was given (``ValueError``: not acceptable)
    check: Callable[[Any], Any]
    #: set with ``settings set`` (else only by its own commands: ``trust ...``)
    settable: bool = True

    @property
    def is_list(self) -> bool:
        return self.type == "list"


def _rp_id(value: Any) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text is None or not _DOMAIN.match(text) or ("." not in text and text != "localhost"):
        raise ValueError(f"{value!r} is not a domain name usable as a relying party ID")
    return text


def _rp_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("rp_name must not be empty")
    return value


def _choice(name: str, options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            if len(options) == 2:
                raise ValueError(f"{name} must be one of {', '.join(options)}")
            raise ValueError(f"{name} must be {', '.join(options[:-1])} or {options[-1]}")
        return value
    return check


def _items(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    return [str(i).strip() for i in items if str(i).strip()]


def _certificates(value: Any) -> list[str]:
    from cryptography import x509

    items = _items(value)
    for item in items:
        if "-----BEGIN" in item:
            try:
                x509.load_pem_x509_certificates(item.encode())
            except ValueError:
                raise ValueError("not a PEM certificate") from None
        elif not Path(item).is_file():
            raise ValueError(f"{item}: no such file")
    return items


def _crl_sources(value: Any) -> list[str]:
    items = _items(value)
    for item in items:
        if "://" in item and not item.startswith(("file://", "http://", "https://")):
            raise ValueError(f"{item}: a CRL source is a file path or a file/http(s) URL")
    return items


def _pem_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "-----BEGIN" in v
                                              for v in value):
        raise ValueError("attestation_roots must be a list of PEM certificates")
    return list(value)


def _aaguids(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError("allowed_aaguids must be a list of AAGUIDs")
    try:
        return [str(uuid.UUID(v)) for v in value]
    except (TypeError, ValueError, AttributeError):
        raise ValueError("allowed_aaguids must be a list of AAGUIDs (UUIDs)") from None


def _whole(name: str) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a whole number")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a whole number") from None
        if not 0 <= number <= 3650 * 86400:
            raise ValueError(f"{name} must not be negative")
        return number
    return check


def _yes_no(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a yes/no value (true, false)")


def _command(value: Any) -> str:
    text = str(value).strip()
    if text and not shlex.split(text):
        raise ValueError("card_lock_command must be a command line (or empty: no lock)")
    return text


def _ra_source(value: Any) -> str:
    text = str(value).strip()
    name, sep, argument = text.partition(":")
    if text and (not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not argument):
        raise ValueError("card_ra_source is NAME:ARGUMENT (file:/etc/token-agent/ra.toml), "
                         "or empty")
    return text


#: every setting, once
SETTINGS: tuple[Setting, ...] = (
    Setting("rp_id", "text", DEFAULT_RP_ID,
            "the WebAuthn relying party ID (a domain name, e.g. trust.nhs.uk): one per "
            "organisation, so every workstation sharing the store accepts the same keys", _rp_id),
    Setting("rp_name", "text", DEFAULT_RP_NAME,
            "the relying party's display name, shown by some keys (and the issuer in "
            "authenticator apps)", _rp_name),
    Setting("user_verification", "choice", "preferred",
            "whether key logins must verify the user's PIN: required | preferred | discouraged",
            _choice("user_verification", UV_POLICIES)),
    Setting("attestation_roots", "list", [],
            "PEM certificates a key's attestation must chain to (trust add-root)", _pem_list,
            settable=False),
    Setting("allowed_aaguids", "list", [],
            "key models accepted without a chain to a root (trust add-aaguid)", _aaguids,
            settable=False),
    Setting("card_trust_anchors", "list", [],
            "root CA certificates: paths to PEM/DER files, or PEM text", _certificates),
    Setting("card_intermediates", "list", [],
            "issuing CA certificates: paths, or PEM text", _certificates),
    Setting("card_crl_sources", "list", [], "CRLs: file paths or URLs", _crl_sources),
    Setting("card_crl_max_age", "integer", 3600, "seconds a fetched CRL is reused",
            _whole("card_crl_max_age")),
    Setting("card_on_stale_crl", "choice", "refuse",
            "refuse | warn when the CRL is past its nextUpdate",
            _choice("card_on_stale_crl", CRL_BEHAVIOURS)),
    Setting("card_on_unreachable_crl", "choice", "refuse", "refuse | warn when no CRL can be had",
            _choice("card_on_unreachable_crl", CRL_BEHAVIOURS)),
    Setting("card_expiry_warning_days", "integer", 90,
            "warn when the certificate ends within this many days",
            _whole("card_expiry_warning_days")),
    Setting("card_provision_on_first_use", "boolean", False,
            "create the user at a card's first login", _yes_no),
    Setting("card_lock_command", "text", DEFAULT_LOCK_COMMAND,
            "command run when a session's card is removed", _command),
    Setting("card_ra_source", "text", "",
            "where the RA's card PUKs come from, NAME:ARGUMENT (file:/etc/token-agent/ra.toml); "
            "empty: no self-service card unlock", _ra_source),
)

_BY_NAME = {s.name: s for s in SETTINGS}
#: the names ``settings set`` takes
SETTABLE = tuple(s.name for s in SETTINGS if s.settable)
#: the smartcard settings (``card settings set|show``)
CARD = tuple(s.name for s in SETTINGS if s.name.startswith("card_"))


def get(name: str) -> Setting:
    """The setting ``name``; ``UnknownSetting`` otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise UnknownSetting(f"unknown setting {name!r} (settable: {', '.join(SETTABLE)})") \
            from None


def check(name: str, value: Any) -> Any:
    """The value to store for ``name`` given ``value`` (``ValueError`` when not acceptable)."""
    return get(name).check(value)


def in_force(stored: Mapping[str, Any], names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The values in force of ``names`` (default: all) from ``stored`` (``Store.list_settings``):
    the stored value, checked, else the default. ``ValueError`` naming the setting for a stored
    value the schema refuses."""
    out = {}
    for name in names or tuple(_BY_NAME):
        s = get(name)
        if name not in stored:
            out[name] = list(s.default) if s.is_list else s.default
            continue
        try:
            out[name] = s.check(stored[name])
        except ValueError as e:
            raise ValueError(f"setting {name} in the store is not valid: {e}") from None
    return out

