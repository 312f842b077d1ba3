"""The organisation's MFA enforcement policy: parsing, validation, decisions and explanations.

The policy is a TOML file. token-agent looks for it, first match wins:

1. the command line's explicit path;
2. ``TOKEN_AGENT_POLICY`` (a path; it must then exist);
3. ``[policy] file`` in config.toml (``config.py``; it must then exist);
4. ``/etc/token-agent/policy.toml``, if it exists;
5. ``$XDG_CONFIG_HOME/token-agent/policy.toml`` (only an absolute ``XDG_CONFIG_HOME`` counts)
   or ``~/.config/token-agent/policy.toml``, if it exists;
6. otherwise the built-in defaults below.

The command line and the service use this one lookup, so they agree on the policy in force.

Every table and key is optional; the defaults are in brackets. Unknown tables and keys are
errors (with a suggestion for a likely misspelling), as are values of the wrong type or out
of range. ``token-agent policy check`` lists the errors, and the warnings of a policy that
is accepted but weaker than the standards advise.

.. code-block:: toml

    [enforcement]
    from = 2024-07-16            # TOML date or datetime, or an ISO 8601 string [none: enforced
                                 # since always]; a date is midnight UTC, a datetime without
                                 # an offset is UTC
    new_accounts_mfa = true      # [true] new accounts of a class that enforces MFA start
                                 # with MFA turned on (so it applies before the from date)

    [classes.internal]           # request handlers, admins
    enforce = true               # [internal: true; external, contributor: false, so MFA is
                                 # optional: the user's own choice]
    minimum = "email"            # [email] weakest method accepted for this class; when set,
                                 # it must be one of methods.allowed
    new_accounts_mfa = true      # [the class's enforce, when enforcement.new_accounts_mfa is
                                 # true; else false] MFA on for the class's new accounts
    [classes.external]           # requesters: their new accounts start without MFA
    [classes.contributor]

    [methods]
    allowed = ["email", "sms", "voice", "messaging", "totp", "push", "key", "card"]  # [all]
    allow_backup_codes = true    # [true] backup codes accepted as a fallback

    [reverification]
    unmanaged_hours = 8          # [8] a second factor again after this many hours on an
                                 # unmanaged device (more than 0, at most 720)
    managed_hours = 8            # [8] the same for a managed device outside the trusted networks
    trusted_networks = ["10.0.0.0/8"]  # [[]] a managed device inside one: no second factor
    bind_minutes = 5             # [5] adding, replacing or removing a method needs a login
                                 # this recent (multi-factor when MFA applies; 1..60)

    [unusual_login]
    enabled = true               # [true] a new device or network: second factor and alert
    ipv4_prefix = 24             # [24] networks are compared by this prefix (8..32), so a new
                                 # DHCP lease in the same /24 is not a new network
    ipv6_prefix = 64             # [64] (16..128)

    [lockout]
    max_failures = 10            # [10] failed second-factor attempts before the method locks
                                 # (1..100: NIST SP 800-63B allows at most 100)
    base_seconds = 60            # [60] the first lockout (1..86400); each further one doubles
    max_seconds = 86400          # [86400] the longest lockout (base_seconds..604800)
    password_max_failures = 10   # [10] the same for the password (1..100)
    limit = 100                  # [100] consecutive failures of one method (since its last
                                 # success), then it stays locked until an administrator
                                 # unlocks it (1..100: NIST SP 800-63B allows at most 100)
    unfamiliar_limit = 50        # [half of limit] of those, at most this many from devices
                                 # or networks the user never logged in from; they are
                                 # counted and locked apart, so a stranger cannot lock the
                                 # user out of their own workstation (1..limit)
    decay_hours = 24             # [24] the lockout level goes down by one for each this many
                                 # hours without a failure (more than 0, at most 720)

    [codes]                      # one-time codes sent by email, SMS, voice, messaging
    length = 6                   # [6] digits (6..8)
    ttl_seconds = 600            # [600] how long a code is valid (60..3600)
    resend_seconds = 30          # [30] minimum gap between two sends (0..3600, less than ttl)
    max_sends = 5                # [5] sends per ttl window (1..20)

    [legacy]
    app_passwords = false        # [false] app passwords for legacy applications (no MFA)

    [offline]                    # logins at an organisation's workstation while no server
    max_hours = 12               # answers: [12] hours after the user's last online login
                                 # there that a key or card login is still accepted from the
                                 # workstation's cache (0: no offline logins; at most 168)

    [delivery]                   # how codes are sent: validated by the delivery module

Method names: ``password`` (the primary factor only), ``key`` (FIDO2 security key),
``card`` (smartcard), ``totp`` (authenticator app), ``push`` (push approval with number
matching), ``email``, ``sms``, ``voice``, ``messaging`` (one-time codes), ``backup``
(backup codes) and ``app_password`` (legacy applications). Their strength, weakest first:
email (1) < sms = voice = messaging (2) < totp = push (3) < key = card (4, phishing
resistant). A class's ``minimum`` keeps the weaker ones out for that class. Backup codes
(strength 2) are a recovery method: when allowed they are always accepted as a fallback,
whatever the class minimum, and never offered as the normal method. App passwords are not a
second factor at all.

Warnings (the policy is accepted): email allowed (NIST SP 800-63B does not accept email as
an out-of-band authenticator); sms or voice allowed (restricted authenticators: offer an
alternative); more than 10 failures before lockout; a ``lockout.unfamiliar_limit`` as large
as ``lockout.limit`` (strangers could lock the user out of their own workstation); a
``reverification.bind_minutes`` over 15; re-verification after more than 12 hours
(the NIST AAL2 reauthentication limit); a public or very broad trusted network (shorter
than /8 for IPv4 or /32 for IPv6); app passwords on (they bypass MFA).

How a login is decided (``decide``), in this order:

1. MFA applies when the user's class enforces it or it is on for the account itself (the
   class's default for new accounts, an administrator or the user turned it on: the rule says
   which, from ``LoginFacts.mfa_source``), and the enforcement date has been reached (an
   account's own MFA applies at once). Before it, or when it does not apply, no second factor
   is asked; a user with no usable method is invited to enrol.
2. MFA applies and the user holds no usable method: they must enrol one first.
3. A primary factor that is multi-factor by itself (a key with user verification, a card with
   its PIN) satisfies MFA when that method is allowed: no second challenge.
4. A new device or a new network (compared by prefix) for this user: second factor required,
   and an alert recorded when the user has logged in before. Roaming is not unusual: a new
   device that is a joined workstation of the organisation (``LoginFacts.device_joined``,
   a managed device) inside a trusted network, or such a workstation on a trusted network
   new to the user, raises no alert and asks no second factor for that reason; unknown or
   unmanaged devices and networks outside the trusted ones still do.
5. A managed device inside a trusted network: no second factor.
6. Otherwise a second factor when the last one on this device is older than the
   re-verification hours (or there is none).

A legacy application may sign in with an app password, without a second factor, only when
``[legacy] app_passwords = true``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import Any, Union

from . import kinds
from .rules import CodeRules, LockoutRules
from .filetrust import check_config_file
from .paths import config_file, expand_home
from .store import MFA_SOURCES, USER_CLASSES
from .tomlcheck import TableParser, kind as _kind, show as _show, suggest as _suggest

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# --- methods ------------------------------------------------------------------------------

#: every method name the policy knows (``token_agent.kinds``)
METHODS = tuple(k.policy for k in kinds.ALL)
#: the methods that can be a second factor (and be listed in ``methods.allowed``), strongest first
SECOND_FACTORS = tuple(k.policy for k in kinds.SECOND_FACTORS)
#: strength of each second-factor method (and of backup codes); higher is stronger
STRENGTH: dict[str, int] = {k.policy: k.strength for k in kinds.ALL if k.strength is not None}
#: methods that resist phishing
PHISHING_RESISTANT = frozenset(k.policy for k in kinds.ALL if k.phishing_resistant)
#: primary factors of a login
PRIMARY_FACTORS = tuple(k.policy for k in kinds.PRIMARY)
#: device kinds of a login
DEVICE_KINDS = ("managed", "unmanaged")

#: the default for ``[classes.NAME] enforce``
DEFAULT_ENFORCE = {"internal": True, "external": False, "contributor": False}

#: the system-wide policy file
SYSTEM_POLICY_PATH = Path("/etc/token-agent/policy.toml")
#: environment variable naming the policy file
POLICY_ENV = "TOKEN_AGENT_POLICY"
_POLICY_FILENAME = "policy.toml"


def method_from_store_kind(kind: str) -> str:
    """The policy's name of a store method kind (``fido2`` -> ``key``, ``smartcard`` -> ``card``,
    ``backup_codes`` -> ``backup``; the others are the same)."""
    return kinds.policy_of_store(kind)


def _order(methods: Iterable[str]) -> tuple[str, ...]:
    """Second-factor methods, strongest first (ties in ``SECOND_FACTORS`` order), no duplicates."""
    chosen = set(methods)
    return tuple(m for m in SECOND_FACTORS if m in chosen)


# --- the policy ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Enforcement:
    #: when MFA enforcement starts (aware, UTC); None: enforced since always
    start: datetime | None = None
    #: new accounts of a class that enforces MFA start with MFA turned on (a class's own
    #: ``new_accounts_mfa`` overrides it: ``Policy.new_account_mfa``)
    new_accounts_mfa: bool = True


@dataclass(frozen=True)
class ClassPolicy:
    name: str
    #: MFA enforced for every user of the class (otherwise: the user's own choice)
    enforce: bool
    #: the weakest method accepted for this class
    minimum: str = "email"
    #: MFA on for the class's new accounts (None: as the class's ``enforce``)
    new_accounts_mfa: bool | None = None

    def __post_init__(self) -> None:
        if self.new_accounts_mfa is None:
            object.__setattr__(self, "new_accounts_mfa", self.enforce)


@dataclass(frozen=True)
class Methods:
    #: second-factor methods allowed, strongest first
    allowed: tuple[str, ...] = SECOND_FACTORS
    #: backup codes accepted as a fallback
    allow_backup_codes: bool = True


@dataclass(frozen=True)
class Reverification:
    #: hours before an unmanaged device needs a second factor again
    unmanaged_hours: float = 8
    #: hours before a managed device outside the trusted networks needs one again
    managed_hours: float = 8
    #: networks in which a managed device needs no second factor
    trusted_networks: tuple[IPNetwork, ...] = ()
    #: minutes a login counts for changing the user's methods (``token_agent/reauth.py``)
    bind_minutes: int = 5

    def trusted_network_of(self, address: str | None) -> IPNetwork | None:
        """The trusted network that holds ``address`` (an IP address), or None."""
        if not address:
            return None
        addr = _address(address)
        for net in self.trusted_networks:
            if addr.version == net.version and addr in net:
                return net
        return None


@dataclass(frozen=True)
class UnusualLogin:
    enabled: bool = True
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64


#: ``[lockout]`` and ``[codes]``: the very rules the factors run on (``token_agent.rules``)
Lockout = LockoutRules
Codes = CodeRules


@dataclass(frozen=True)
class Offline:
    #: hours after a user's last online login at a workstation during which that workstation
    #: accepts their key or card from its cache when no organisation server answers (0: never)
    max_hours: int = 12


#: the longest offline window a policy may set (a week)
MAX_OFFLINE_HOURS = 168


@dataclass(frozen=True)
class Legacy:
    #: app passwords for legacy applications (they bypass MFA)
    app_passwords: bool = False


def _default_classes() -> tuple[ClassPolicy, ...]:
    return tuple(ClassPolicy(name, DEFAULT_ENFORCE.get(name, False)) for name in USER_CLASSES)


@dataclass(frozen=True)
class Policy:
    enforcement: Enforcement = field(default_factory=Enforcement)
    #: one per user class, in ``USER_CLASSES`` order
    classes: tuple[ClassPolicy, ...] = field(default_factory=_default_classes)
    methods: Methods = field(default_factory=Methods)
    reverification: Reverification = field(default_factory=Reverification)
    unusual_login: UnusualLogin = field(default_factory=UnusualLogin)
    lockout: Lockout = field(default_factory=Lockout)
    codes: Codes = field(default_factory=Codes)
    legacy: Legacy = field(default_factory=Legacy)
    offline: Offline = field(default_factory=Offline)
    #: the ``[delivery]`` table as written (validated by the delivery module)
    delivery: dict[str, Any] = field(default_factory=dict, hash=False)
    #: where the policy came from (a file path, or None for the built-in defaults)
    source: str | None = field(default=None, compare=False)

    def class_policy(self, user_class: str) -> ClassPolicy:
        """The settings of one user class (``ValueError`` for an unknown class)."""
        for cp in self.classes:
            if cp.name == user_class:
                return cp
        if user_class in USER_CLASSES:
            return ClassPolicy(user_class, DEFAULT_ENFORCE.get(user_class, False))
        raise ValueError(f"unknown user class {user_class!r}: one of {', '.join(USER_CLASSES)}")

    def new_account_mfa(self, user_class: str) -> bool:
        """Whether a new account of ``user_class`` starts with MFA turned on."""
        return bool(self.class_policy(user_class).new_accounts_mfa)

    def allowed_for(self, user_class: str) -> tuple[str, ...]:
        """Second-factor methods acceptable for a class, strongest first (no backup codes)."""
        floor = STRENGTH[self.class_policy(user_class).minimum]
        return tuple(m for m in self.methods.allowed if STRENGTH[m] >= floor)

    def to_json(self) -> dict[str, Any]:
        """The effective policy (defaults filled in) as JSON-compatible data."""
        start = self.enforcement.start
        return {
            "source": self.source,
            "enforcement": {"from": _when(start) if start else None,
                            "new_accounts_mfa": self.enforcement.new_accounts_mfa},
            "classes": {cp.name: {"enforce": cp.enforce, "minimum": cp.minimum,
                                  "new_accounts_mfa": cp.new_accounts_mfa}
                        for cp in self.classes},
            "methods": {"allowed": list(self.methods.allowed),
                        "allow_backup_codes": self.methods.allow_backup_codes},
            "reverification": {
                "unmanaged_hours": self.reverification.unmanaged_hours,
                "managed_hours": self.reverification.managed_hours,
                "trusted_networks": [str(n) for n in self.reverification.trusted_networks],
                "bind_minutes": self.reverification.bind_minutes,
            },
            "unusual_login": {"enabled": self.unusual_login.enabled,
                              "ipv4_prefix": self.unusual_login.ipv4_prefix,
                              "ipv6_prefix": self.unusual_login.ipv6_prefix},
            "lockout": {"max_failures": self.lockout.max_failures,
                        "base_seconds": self.lockout.base_seconds,
                        "max_seconds": self.lockout.max_seconds,
                        "password_max_failures": self.lockout.password_max_failures,
                        "limit": self.lockout.limit,
                        "unfamiliar_limit": self.lockout.unfamiliar_limit,
                        "decay_hours": self.lockout.decay_hours},
            "codes": {"length": self.codes.length, "ttl_seconds": self.codes.ttl_seconds,
                      "resend_seconds": self.codes.resend_seconds,
                      "max_sends": self.codes.max_sends},
            "legacy": {"app_passwords": self.legacy.app_passwords},
            "offline": {"max_hours": self.offline.max_hours},
            "delivery": self.delivery,
        }


#: the built-in policy, used when no policy file exists
DEFAULT_POLICY = Policy()


class PolicyError(ValueError):
    """A policy that cannot be used; ``errors`` lists every problem, one per line."""

    def __init__(self, errors: list[str] | str):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


# --- parsing ------------------------------------------------------------------------------

_KEYS: dict[str, tuple[str, ...]] = {
    "enforcement": ("from", "new_accounts_mfa"),
    "classes": USER_CLASSES,
    "methods": ("allowed", "allow_backup_codes"),
    "reverification": ("unmanaged_hours", "managed_hours", "trusted_networks", "bind_minutes"),
    "unusual_login": ("enabled", "ipv4_prefix", "ipv6_prefix"),
    "lockout": ("max_failures", "base_seconds", "max_seconds", "password_max_failures",
                "limit", "unfamiliar_limit", "decay_hours"),
    "codes": ("length", "ttl_seconds", "resend_seconds", "max_sends"),
    "legacy": ("app_passwords",),
    "offline": ("max_hours",),
    "delivery": (),
}
_CLASS_KEYS = ("enforce", "minimum", "new_accounts_mfa")


def _when(moment: datetime) -> str:
    moment = moment.astimezone(timezone.utc)
    if moment.time() == time(0, 0):
        return moment.date().isoformat()
    return moment.isoformat().replace("+00:00", "Z")


class _Parser(TableParser):
    def __init__(self, source: str):
        super().__init__(source, _KEYS, free=("classes", "delivery"))

    def integer(self, tbl: Mapping[str, Any], key: str, path: str, default: int,
                lo: int, hi: int, unit: str = "") -> int:
        if key not in tbl:
            return default
        value = tbl[key]
        where = f"{path}.{key}"
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(where, f"{_show(value)} must be a whole number from {lo} to {hi}{unit}, "
                              f"not {_kind(value)}")
            return default
        if not lo <= value <= hi:
            self.error(where, f"{value} is out of range: allowed {lo} to {hi}{unit}")
            return default
        return value

    def hours(self, tbl: Mapping[str, Any], key: str, path: str, default: float) -> float:
        if key not in tbl:
            return default
        value = tbl[key]
        where = f"{path}.{key}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(where, f"{_show(value)} must be a number of hours (more than 0, at most "
                              f"720), not {_kind(value)}")
            return default
        if not (math.isfinite(value) and 0 < value <= 720):
            self.error(where, f"{_show(value)} is out of range: allowed more than 0 and at most "
                              f"720 hours")
            return default
        return value


def _parse_rules(p: _Parser, data: Mapping[str, Any], table: str, cls):
    """``[lockout]`` or ``[codes]``: each rule within its bounds, then checked against the
    others, by the definitions of ``token_agent.rules`` (an invalid table: errors recorded,
    the defaults returned)."""
    t = p.table(data, table)
    given = {}
    for name, bound in cls.bounds().items():
        if name not in t:
            continue
        if bound.hours:
            given[name] = p.hours(t, name, table, cls.defaults({})[name])
        else:
            given[name] = p.integer(t, name, table, cls.defaults({})[name], int(bound.low),
                                    int(bound.high), bound.unit)
    values = cls.defaults(given)
    problems = cls.problems(values)
    for key, why in problems:
        p.error(f"{table}.{key}", why)
    return cls() if problems else cls(**values)


def _parse_start(p: _Parser, value: Any) -> datetime | None:
    where = "enforcement.from"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            p.error(where, f"{_show(value)} is not a date or datetime "
                           f"(write 2024-07-16 or 2024-07-16T08:00:00Z)")
            return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
    if isinstance(value, date):
        return datetime.combine(value, time(0, 0), tzinfo=timezone.utc)
    p.error(where, f"{_show(value)} must be a date or datetime (2024-07-16 or "
                   f"2024-07-16T08:00:00Z), not {_kind(value)}")
    return None


def _parse_allowed(p: _Parser, value: Any) -> tuple[str, ...] | None:
    where = "methods.allowed"
    if not isinstance(value, list):
        p.error(where, f"{_show(value)} must be an array of method names "
                       f"({', '.join(SECOND_FACTORS)}), not {_kind(value)}")
        return None
    ok = True
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, str):
            p.error(where, f"{_show(item)} is not a method name (a string, one of "
                           f"{', '.join(SECOND_FACTORS)})")
            ok = False
        elif item == "password":
            p.error(where, '"password" is the primary factor, not a second factor')
            ok = False
        elif item == "backup":
            p.error(where, '"backup": backup codes are turned on and off by '
                           'methods.allow_backup_codes, not listed here')
            ok = False
        elif item == "app_password":
            p.error(where, '"app_password": app passwords are not a second factor; they are '
                           'turned on by legacy.app_passwords')
            ok = False
        elif item not in SECOND_FACTORS:
            hint = _suggest(item, SECOND_FACTORS) or f"one of {', '.join(SECOND_FACTORS)}"
            p.error(where, f"{_show(item)} is not a method ({hint})")
            ok = False
        elif item in seen:
            p.error(where, f"{_show(item)} is listed twice")
            ok = False
        else:
            seen.add(item)
    return _order(seen) if ok else None


def _parse_networks(p: _Parser, value: Any) -> tuple[IPNetwork, ...]:
    where = "reverification.trusted_networks"
    if not isinstance(value, list):
        p.error(where, f"{_show(value)} must be an array of networks (e.g. [\"10.0.0.0/8\"]), "
                       f"not {_kind(value)}")
        return ()
    nets: list[IPNetwork] = []
    for item in value:
        if not isinstance(item, str):
            p.error(where, f"{_show(item)} is not a network (a string such as \"10.0.0.0/8\")")
            continue
        try:
            nets.append(ipaddress.ip_network(item.strip()))
        except ValueError:
            try:
                loose = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                p.error(where, f"{_show(item)} is not a network in CIDR notation "
                               f"(such as 10.0.0.0/8 or fd00::/8)")
            else:
                p.error(where, f"{_show(item)} has host bits set (did you mean {loose}?)")
    return tuple(nets)


def _parse_classes(p: _Parser, tbl: Mapping[str, Any], new_accounts_mfa: bool = True
                   ) -> tuple[tuple[ClassPolicy, ...], set[str]]:
    """The classes, and the names of those whose minimum was written explicitly.
    ``new_accounts_mfa``: ``[enforcement] new_accounts_mfa`` (a class without its own: MFA on
    for its new accounts when this is true and the class enforces MFA)."""
    explicit: set[str] = set()
    for name in tbl:
        if name not in USER_CLASSES:
            hint = _suggest(name, USER_CLASSES) or f"one of {', '.join(USER_CLASSES)}"
            p.error(f"classes.{name}", f"unknown user class ({hint})")
    result = []
    for name in USER_CLASSES:
        enforce = DEFAULT_ENFORCE.get(name, False)
        minimum = "email"
        sub = tbl.get(name, {})
        path = f"classes.{name}"
        if not isinstance(sub, dict):
            p.error(path, f"must be a table ([{path}]), not {_kind(sub)}")
            sub = {}
        p.unknown({k: v for k, v in sub.items() if k not in _CLASS_KEYS}, path, _CLASS_KEYS, "key")
        enforce = p.boolean(sub, "enforce", path, enforce)
        if "minimum" in sub:
            value = sub["minimum"]
            if isinstance(value, str) and value in SECOND_FACTORS:
                minimum = value
                explicit.add(name)
            elif value == "backup":
                p.error(f"{path}.minimum", '"backup" cannot be a minimum: backup codes are a '
                                           'fallback, accepted whatever the minimum')
            elif isinstance(value, str) and value in ("password", "app_password"):
                p.error(f"{path}.minimum", f"{_show(value)} is not a second factor")
            else:
                hint = (_suggest(value, SECOND_FACTORS) if isinstance(value, str) else "") \
                    or f"one of {', '.join(SECOND_FACTORS)}"
                p.error(f"{path}.minimum", f"{_show(value)} is not a method ({hint})")
        new_mfa = p.boolean(sub, "new_accounts_mfa", path, enforce and new_accounts_mfa)
        result.append(ClassPolicy(name, enforce, minimum, new_mfa))
    return tuple(result), explicit


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate a policy written in TOML; ``PolicyError`` lists every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([f"{source}: not valid TOML: {exc}"]) from None
    p = _Parser(source)
    for key, value in data.items():
        if key not in _KEYS:
            p.unknown({key: value}, "", _KEYS, "table" if isinstance(value, dict) else "key")

    t = p.table(data, "enforcement")
    start = _parse_start(p, t["from"]) if "from" in t else None
    enforcement = Enforcement(start, p.boolean(t, "new_accounts_mfa", "enforcement", True))

    classes, explicit_minimum = _parse_classes(p, p.table(data, "classes"),
                                               enforcement.new_accounts_mfa)

    t = p.table(data, "methods")
    allowed = _parse_allowed(p, t["allowed"]) if "allowed" in t else SECOND_FACTORS
    methods = Methods(allowed if allowed is not None else SECOND_FACTORS,
                      p.boolean(t, "allow_backup_codes", "methods", True))

    t = p.table(data, "reverification")
    reverification = Reverification(
        p.hours(t, "unmanaged_hours", "reverification", 8),
        p.hours(t, "managed_hours", "reverification", 8),
        _parse_networks(p, t["trusted_networks"]) if "trusted_networks" in t else (),
        p.integer(t, "bind_minutes", "reverification", 5, 1, 60, " minutes"),
    )

    t = p.table(data, "unusual_login")
    unusual = UnusualLogin(p.boolean(t, "enabled", "unusual_login", True),
                           p.integer(t, "ipv4_prefix", "unusual_login", 24, 8, 32),
                           p.integer(t, "ipv6_prefix", "unusual_login", 64, 16, 128))

    lockout = _parse_rules(p, data, "lockout", LockoutRules)
    codes = _parse_rules(p, data, "codes", CodeRules)

    t = p.table(data, "legacy")
    legacy = Legacy(p.boolean(t, "app_passwords", "legacy", False))

    t = p.table(data, "offline")
    offline = Offline(p.integer(t, "max_hours", "offline", Offline.max_hours, 0,
                                MAX_OFFLINE_HOURS, " hours"))

    delivery = p.table(data, "delivery")

    # Cross-checks: only when methods.allowed itself was readable.
    if allowed is not None:
        listed = ", ".join(allowed) or "none"
        if not allowed:
            enforcing = [cp.name for cp in classes if cp.enforce]
            if enforcing:
                p.error("methods.allowed", f"is empty, but MFA is enforced for class "
                                           f"{', '.join(enforcing)}: allow at least one method")
        for cp in classes:
            if cp.name not in explicit_minimum or cp.minimum in allowed:
                continue
            where = f"classes.{cp.name}.minimum"
            if not any(STRENGTH[m] >= STRENGTH[cp.minimum] for m in allowed):
                p.error(where, f"{_show(cp.minimum)} is stronger than every allowed method "
                               f"({listed}): users of class {cp.name} could never satisfy it")
            else:
                p.error(where, f"{_show(cp.minimum)} is not in methods.allowed ({listed})")

    if p.errors:
        raise PolicyError(p.errors)
    return Policy(enforcement, classes, methods, reverification, unusual, lockout, codes,
                  legacy, offline, dict(delivery), source)


def load_policy(path: str | os.PathLike[str], *, strict: bool = False) -> Policy:
    """Read and parse a policy file; ``PolicyError`` when it is missing, unreadable or invalid.
    A file that others than root (or the running user) can change (``filetrust.py``) is
    refused with ``strict`` (the service), else warned about on stderr."""
    path = Path(path)
    if path.exists():
        problems = check_config_file(path, "policy file", strict=strict)
        if problems:
            raise PolicyError([f"{path}: {p}" for p in problems])
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError([f"{path}: policy file not found"]) from None
    except IsADirectoryError:
        raise PolicyError([f"{path}: is a directory, not a policy file"]) from None
    except PermissionError:
        raise PolicyError([f"{path}: cannot read the policy file: permission denied"]) from None
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read the policy file: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError([f"{path}: the policy file is not UTF-8 text"]) from None
    return parse_policy(text, str(path))


def policy_warnings(policy: Policy) -> list[str]:
    """What an accepted policy does that the standards advise against, one line each."""
    out: list[str] = []

    def warn(path: str, message: str) -> None:
        out.append(f"{policy.source}: {path}: {message}" if policy.source else f"{path}: {message}")

    allowed = policy.methods.allowed
    if "email" in allowed:
        warn("methods.allowed", "email is allowed: NIST SP 800-63B does not accept email as an "
                                "out-of-band authenticator")
    restricted = [m for m in ("sms", "voice") if m in allowed]
    if restricted:
        tail = ""
        if not any(STRENGTH[m] > 2 for m in allowed):
            tail = " (this policy allows nothing stronger)"
        warn("methods.allowed", f"{' and '.join(restricted)} allowed: restricted authenticators "
                                f"(NIST SP 800-63B): offer an alternative{tail}")
    for key in ("max_failures", "password_max_failures"):
        value = getattr(policy.lockout, key)
        if value > 10:
            warn(f"lockout.{key}", f"{value} failed attempts before locking: more than 10 (common "
                                   f"practice; NIST SP 800-63B allows at most 100)")
    if policy.lockout.unfamiliar_limit >= policy.lockout.limit:
        warn("lockout.unfamiliar_limit", f"{policy.lockout.unfamiliar_limit}, as many as "
                                         "lockout.limit: failures from unfamiliar devices can "
                                         "lock the user out of their own workstation too")
    for key in ("unmanaged_hours", "managed_hours"):
        value = getattr(policy.reverification, key)
        if value > 12:
            warn(f"reverification.{key}", f"{value:g} h is longer than the NIST AAL2 "
                                          f"reauthentication limit: 12 h")
    if policy.reverification.bind_minutes > 15:
        warn("reverification.bind_minutes", f"{policy.reverification.bind_minutes} minutes: a "
                                            "login that old still lets a method be added or "
                                            "removed (15 or less advised)")
    for net in policy.reverification.trusted_networks:
        broad = net.prefixlen < (8 if net.version == 4 else 32)
        if broad:
            warn("reverification.trusted_networks",
                 f"{net} is a very broad range: every managed device inside it skips the second "
                 f"factor")
        elif not net.is_private:
            warn("reverification.trusted_networks",
                 f"{net} is a public range: every managed device inside it skips the second "
                 f"factor; list only your organisation's own networks")
    if policy.legacy.app_passwords:
        warn("legacy.app_passwords", "true: app passwords bypass MFA for legacy apps")
    return out


def check_policy_text(text: str, source: str = "<policy>"
                      ) -> tuple[Policy | None, list[str], list[str]]:
    """``(policy or None, errors, warnings)`` for ``token-agent policy check``."""
    try:
        policy = parse_policy(text, source)
    except PolicyError as exc:
        return None, list(exc.errors), []
    return policy, [], policy_warnings(policy)


def default_policy_path(environ: Mapping[str, str] | None = None, *,
                        system_path: str | os.PathLike[str] = SYSTEM_POLICY_PATH,
                        configured: str | os.PathLike[str] | None = None) -> Path | None:
    """The policy file to use when none is given, or None for the built-in defaults.

    ``TOKEN_AGENT_POLICY`` if set (whether or not the file exists: a named file that is
    missing is an error, not a silent fallback); else ``configured`` (config.toml's
    ``[policy] file``, named so too); else ``system_path`` (``/etc/token-agent/policy.toml``)
    if it exists; else the user's ``$XDG_CONFIG_HOME/token-agent/policy.toml`` (absolute
    ``XDG_CONFIG_HOME`` only) or ``~/.config/token-agent/policy.toml`` if it exists. Empty
    variables count as unset.
    """
    env = os.environ if environ is None else environ
    named = env.get(POLICY_ENV)
    if named:
        return expand_home(named, env)
    if configured is not None and str(configured) != "":
        return expand_home(configured, env)
    return config_file(_POLICY_FILENAME, system_path, env)


def policy_path_in_force(explicit_path: str | os.PathLike[str] | None = None,
                         environ: Mapping[str, str] | None = None, *,
                         system_path: str | os.PathLike[str] = SYSTEM_POLICY_PATH,
                         configured: str | os.PathLike[str] | None = None) -> Path | None:
    """The policy file in force (the module docstring's order), or None for the defaults."""
    if explicit_path is not None and str(explicit_path) != "":
        return Path(explicit_path)
    return default_policy_path(environ, system_path=system_path, configured=configured)


def resolve_policy(explicit_path: str | os.PathLike[str] | None = None,
                   environ: Mapping[str, str] | None = None, *,
                   system_path: str | os.PathLike[str] = SYSTEM_POLICY_PATH,
                   strict: bool = False,
                   configured: str | os.PathLike[str] | None = None) -> Policy:
    """The policy in force: the explicit file, else ``default_policy_path`` (``configured``:
    config.toml's ``[policy] file``), else the defaults (``strict``: see ``load_policy``)."""
    path = policy_path_in_force(explicit_path, environ, system_path=system_path,
                                configured=configured)
    return DEFAULT_POLICY if path is None else load_policy(path, strict=strict)


# --- decisions ----------------------------------------------------------------------------

def _address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(str(address).strip())
    except ValueError:
        raise ValueError(f"{address!r} is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def network_key(policy: Policy, address: str) -> str:
    """The network of ``address`` at the policy's prefix length, e.g. ``"10.1.2.0/24"``.

    IPv4-mapped IPv6 addresses count as IPv4; an IPv6 zone (``%eth0``) is dropped.
    ``ValueError`` for something that is not an IP address.
    """
    addr = _address(address)
    if addr.version == 4:
        net = ipaddress.IPv4Network((int(addr), policy.unusual_login.ipv4_prefix), strict=False)
    else:
        net = ipaddress.IPv6Network((int(addr), policy.unusual_login.ipv6_prefix), strict=False)
    return str(net)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class LoginFacts:
    """What is known about one login (or one question about a user)."""

    #: internal | external | contributor
    user_class: str
    #: MFA on for the account itself (matters only where the class does not enforce MFA)
    mfa_enabled: bool
    #: method names the user holds, confirmed and usable
    methods: tuple[str, ...]
    #: the primary factor used: "password", "key", "card", or None (just asking)
    primary: str | None = None
    #: a key with user verification, or a card with its PIN
    primary_multi_factor: bool = False
    #: "managed" | "unmanaged"
    device: str = "unmanaged"
    #: the device is a workstation joined to the organisation (its certificate was checked
    #: by the organisation's server); only for a managed device
    device_joined: bool = False
    #: the client's IP address, or None (unknown)
    network: str | None = None
    device_id: str | None = None
    now: datetime = field(default_factory=_utc_now)
    #: when this user last completed a second factor on this device
    last_verified_at: datetime | None = None
    #: this device_id was seen before for this user
    device_seen: bool = False
    #: this network (reduced by ``network_key``) was seen before for this user
    network_seen: bool = False
    #: the user has logged in successfully before (on any device)
    has_history: bool = False
    #: a legacy application is asking (app password)
    legacy: bool = False
    #: who set ``mfa_enabled`` (``store.MFA_SOURCES``: new-account, admin, user; None: not
    #: recorded), for the rule's words
    mfa_source: str | None = None

    def __post_init__(self) -> None:
        if self.user_class not in USER_CLASSES:
            raise ValueError(f"unknown user class {self.user_class!r}: one of "
                             f"{', '.join(USER_CLASSES)}")
        if self.mfa_source is not None and self.mfa_source not in MFA_SOURCES:
            raise ValueError(f"unknown MFA source {self.mfa_source!r}: one of "
                             f"{', '.join(MFA_SOURCES)} or None")
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}: one of {', '.join(METHODS)}")
        object.__setattr__(self, "methods", methods)
        if self.primary is not None and self.primary not in PRIMARY_FACTORS:
            raise ValueError(f"unknown primary factor {self.primary!r}: one of "
                             f"{', '.join(PRIMARY_FACTORS)} or None")
        if self.primary_multi_factor and self.primary not in ("key", "card"):
            raise ValueError("primary_multi_factor needs primary 'key' (with user verification) "
                             "or 'card' (with PIN)")
        if self.device not in DEVICE_KINDS:
            raise ValueError(f"unknown device kind {self.device!r}: one of "
                             f"{', '.join(DEVICE_KINDS)}")
        if self.device_joined and self.device != "managed":
            raise ValueError("device_joined needs device 'managed': a joined workstation is a "
                             "managed device")
        if self.network is not None:
            _address(self.network)
        for name in ("now", "last_verified_at"):
            value = getattr(self, name)
            if value is not None and (value.tzinfo is None or value.utcoffset() is None):
                raise ValueError(f"{name} must be an aware datetime (UTC), not a naive one")


@dataclass(frozen=True)
class Decision:
    #: a second factor is needed for this login (after the primary)
    mfa_required: bool
    #: MFA applies to this user (class enforcement or the user's choice) and its date is reached
    enforced: bool
    #: MFA applies and the user has no usable method: they must set one up first
    must_enrol: bool
    #: MFA does not apply (yet) and the user has no usable method: invite them to enrol
    invite_enrol: bool
    #: second factors acceptable for this user now, strongest first, backup codes last
    allowed_methods: tuple[str, ...]
    #: the allowed methods the user holds, same order
    usable_methods: tuple[str, ...]
    #: an unusual login (new device or network for a user with history) to record
    alert: bool
    #: legacy access with an app password is permitted
    app_password_allowed: bool
    #: one line per rule that applied, in order
    rules: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "mfa_required": self.mfa_required,
            "enforced": self.enforced,
            "must_enrol": self.must_enrol,
            "invite_enrol": self.invite_enrol,
            "allowed_methods": list(self.allowed_methods),
            "usable_methods": list(self.usable_methods),
            "alert": self.alert,
            "app_password_allowed": self.app_password_allowed,
            "rules": list(self.rules),
        }


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


#: an account's own MFA flag, on or off, in words, by who set it (``LoginFacts.mfa_source``)
_OWN_MFA = {
    True: {"user": "turned on by the user", "admin": "turned on by an administrator",
           "new-account": "on since the account was created (new_accounts_mfa for its class)",
           None: "turned on for this account"},
    False: {"user": "turned off by the user", "admin": "turned off by an administrator",
            "new-account": "off since the account was created (new_accounts_mfa for its class)",
            None: "not turned on for this account"},
}


def own_mfa(enabled: bool, source: str | None) -> str:
    """The account's own MFA flag and who set it, in words ("turned on by an administrator")."""
    return _OWN_MFA[bool(enabled)].get(source, _OWN_MFA[bool(enabled)][None])


def decide(policy: Policy, facts: LoginFacts) -> Decision:
    """Apply the policy to one login; every rule that applied is in ``Decision.rules``."""
    rules: list[str] = []
    cls = facts.user_class
    cp = policy.class_policy(cls)
    normal = policy.allowed_for(cls)
    allowed = normal + (("backup",) if normal and policy.methods.allow_backup_codes else ())
    held = set(facts.methods)
    usable = tuple(m for m in allowed if m in held)
    usable_normal = tuple(m for m in usable if m != "backup")
    acceptable = ", ".join(normal) or "none"
    mfa_required = False
    must_enrol = False
    invite_enrol = False

    # Unusual login: computed for everyone, so that the alert is recorded whatever else applies.
    news: list[str] = []
    if facts.device_id and not facts.device_seen:
        news.append(f"new device {facts.device_id}")
    if facts.network and not facts.network_seen:
        news.append(f"new network {network_key(policy, facts.network)}")
    what = " and ".join(news) + " for this user"
    trusted = (policy.reverification.trusted_network_of(facts.network)
               if facts.device == "managed" else None)
    # Roaming: a joined workstation of the organisation inside a trusted network is a place the
    # organisation vouches for, new to this user or not.
    roaming = (bool(news) and policy.unusual_login.enabled and facts.device_joined
               and trusted is not None)
    roaming_rule = (f"{what}: a joined workstation of the organisation in trusted network "
                    f"{trusted}: roaming, not unusual (no alert)")
    unusual = bool(news) and policy.unusual_login.enabled and not roaming
    alert = unusual and facts.has_history
    alert_note = "alert recorded" if alert else "first login: no history to compare, no alert"

    def unusual_rule(words: str) -> None:
        if unusual:
            rules.append(words)
        elif roaming:
            rules.append(roaming_rule)

    # 1. Does MFA apply?
    start = policy.enforcement.start
    started = start is None or facts.now >= start
    applies = cp.enforce or facts.mfa_enabled
    own = own_mfa(facts.mfa_enabled, facts.mfa_source)
    if cp.enforce:
        why = f"class {cls}: MFA enforced"
    elif facts.mfa_enabled:
        why = f"class {cls}: MFA optional, {own}"
    else:
        why = f"class {cls}: MFA optional and {own}: no second factor"
    if not normal and applies:
        enforced = False
        rules.append(f"{why}, but the policy allows no second-factor method for this class: "
                     f"MFA cannot apply")
    elif applies and not started and not facts.mfa_enabled:
        # the date holds back the class's enforcement; an account whose own MFA is on (a new
        # account, or a user who turned it on) has it at once
        enforced = False
        rules.append(f"{why} from {_when(start)}, not yet (now {_when(facts.now)}): "
                     f"no second factor")
    elif applies and not started:
        enforced = True
        rules.append(f"class {cls}: MFA from {_when(start)} for the class, but already on for "
                     f"this account ({own})")
    elif applies:
        enforced = True
        rules.append(f"{why} since {_when(start)}" if start else why)
    else:
        enforced = False
        rules.append(why)
    if cp.enforce and normal and not facts.mfa_enabled and facts.mfa_source in ("admin", "user"):
        # somebody turned it off: say that it changes nothing while the class enforces it
        rules.append(f"the account's own MFA setting is off ({own}): class {cls} enforces MFA "
                     f"regardless{f' from {_when(start)}' if not started else ''}")

    if not enforced:
        if not usable_normal and normal:
            invite_enrol = True
            rules.append(f"no second-factor method set up: invite the user to enrol "
                         f"(acceptable: {acceptable})")
        unusual_rule(f"{what}: {alert_note} (MFA does not apply: no second factor)")
    else:
        mf_primary = facts.primary in ("key", "card") and facts.primary_multi_factor
        if not usable_normal:
            # 2. Nothing to challenge with: enrol first.
            must_enrol = True
            mfa_required = True
            not_accepted = [m for m in facts.methods if m not in allowed and m in STRENGTH]
            extra = (f"; held but not accepted for class {cls}: {', '.join(not_accepted)}"
                     if not_accepted else "")
            if "backup" in usable:
                rules.append(f"no second-factor method set up, only backup codes: the user may "
                             f"sign in with a backup code and must then set up one of: "
                             f"{acceptable}{extra}")
            else:
                rules.append(f"no usable second-factor method: the user must set one up before "
                             f"anything else (acceptable: {acceptable}){extra}")
            unusual_rule(f"{what}: {alert_note}")
        elif mf_primary and facts.primary in normal:
            # 3. The primary is two factors by itself.
            how = "with user verification" if facts.primary == "key" else "with PIN"
            rules.append(f"primary factor {facts.primary} {how} satisfies MFA: no second challenge")
            unusual_rule(f"{what}: {alert_note}")
        else:
            if mf_primary:
                rules.append(f"primary factor {facts.primary}: not an allowed method for class "
                             f"{cls}, so it does not satisfy MFA by itself")
            elif facts.primary == "key":
                rules.append("primary factor key without user verification: one factor only")
            elif facts.primary == "card":
                rules.append("primary factor card without PIN: one factor only")
            if unusual:
                # 4. New device or network.
                mfa_required = True
                rules.append(f"{what}: second factor required and {alert_note}")
            elif trusted is not None:
                # 5. Managed device at the office (4. roaming: a joined one new to the user).
                if roaming:
                    rules.append(roaming_rule)
                rules.append(f"managed device in trusted network {trusted}: no second factor")
            else:
                # 6. Re-verification.
                if facts.device == "managed":
                    limit = policy.reverification.managed_hours
                    label = ("managed device outside the trusted networks" if facts.network
                             else "managed device, network unknown")
                else:
                    limit = policy.reverification.unmanaged_hours
                    label = "unmanaged device"
                last = facts.last_verified_at
                if last is None:
                    mfa_required = True
                    rules.append(f"{label}: no second factor on record for this device: "
                                 f"second factor required")
                else:
                    elapsed = (facts.now - last).total_seconds()
                    if elapsed < 0:
                        mfa_required = True
                        rules.append(f"{label}: last second factor recorded in the future "
                                     f"(clock changed?): second factor required")
                    elif elapsed > limit * 3600:
                        mfa_required = True
                        rules.append(f"{label}: last second factor {_hours(elapsed)} ago, more "
                                     f"than {limit:g} h: second factor required")
                    else:
                        rules.append(f"{label}: last second factor {_hours(elapsed)} ago, within "
                                     f"{limit:g} h: no second factor")
    if unusual is False and news and not policy.unusual_login.enabled:
        rules.append("unusual-login checks are off ([unusual_login] enabled = false)")

    app_password_allowed = policy.legacy.app_passwords
    if facts.legacy:
        if app_password_allowed:
            mfa_required = False
            rules.append("legacy application: app passwords allowed ([legacy] app_passwords = "
                         "true): no second factor (app passwords bypass MFA)")
        else:
            rules.append("legacy application: app passwords are not allowed ([legacy] "
                         "app_passwords = false): sign in with MFA instead")

    return Decision(mfa_required, enforced, must_enrol, invite_enrol, allowed, usable, alert,
                    app_password_allowed, tuple(rules))


def explain(decision: Decision) -> str:
    """The decision in words, for ``token-agent policy explain``."""
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    def names(methods: tuple[str, ...]) -> str:
        return ", ".join(m + " (fallback)" if m == "backup" else m for m in methods) or "none"

    lines = [
        f"second factor: {'required' if decision.mfa_required else 'not required'}",
        f"MFA applies: {yes(decision.enforced)}",
    ]
    if decision.must_enrol:
        lines.append("must enrol: yes, a second factor must be set up first")
    if decision.invite_enrol:
        lines.append("invite to enrol: yes")
    lines += [
        f"acceptable methods: {names(decision.allowed_methods)}",
        f"the user's usable methods: {names(decision.usable_methods)}",
        f"unusual-login alert: {yes(decision.alert)}",
        f"app passwords for legacy applications: "
        f"{'allowed' if decision.app_password_allowed else 'not allowed'}",
        "rules applied:",
    ]
    lines += [f"  {i}. {rule}" for i, rule in enumerate(decision.rules, 1)]
    return "\n".join(lines)
