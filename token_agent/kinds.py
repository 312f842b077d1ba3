"""The registry of method kinds: every kind of authentication method, defined once.

Each :class:`Kind` carries its three names and what the rest of the agent needs to know about
it:

| store | policy | CLI | label | strength | factor | primary | second | at login | phishing-resistant |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| password | password | password | password | - | knowledge | yes | no | no | no |
| fido2 | key | key | security key | 4 | possession | yes | yes | no | yes |
| smartcard | card | card | smartcard | 4 | possession | yes | yes | no | yes |
| totp | totp | totp | authenticator app | 3 | possession | no | yes | yes | no |
| email | email | email | email code | 1 | possession | no | yes | yes | no |
| sms | sms | sms | text message code | 2 | possession | no | yes | yes | no |
| voice | voice | voice | phone call code | 2 | possession | no | yes | yes | no |
| messaging | messaging | messaging | messaging app code | 2 | possession | no | yes | yes | no |
| push | push | push | push approval | 3 | possession | no | yes | no | no |
| app_password | app_password | app-password | app password | - | knowledge | no | no | no | no |
| backup_codes | backup | backup | backup codes | 2 | possession | no | fallback | no | no |

* the **store** name is ``methods.kind`` in the database (``token_agent.store.KIND_*``);
* the **policy** name is what policy.toml (``methods.allowed``, ``classes.*.minimum``),
  ``--second``/``login.start``'s ``second``, decisions and ``methods list`` use;
* the **CLI** name is what ``token-agent methods prefer|remove KIND``, ``verify KIND``,
  ``admin unlock --method KIND`` and the service's ``methods.prefer|remove`` ``kind`` take.

The policy, the login flow (``ceremonies/login.py``, ``choices.py``, ``firstlogin.py``), the
factors, ``admin_ops`` and so the CLI and the service read this table; none keeps a table of
its own. This module imports nothing of ``token_agent``, so every layer may import it.

Adding a second factor today means: its factor module in ``token_agent/factors/`` (enrol,
verify), one entry here, and one migration if it needs tables of its own. Still needed by
hand, honestly: the store's ``KIND_*`` constant and ``METHOD_KINDS`` tuple (the methods
table's CHECK constraint lists the kinds, so that needs the migration too); the branch in
the login flow that runs it (``ceremonies/login.py``'s second-factor dispatch) and in
``token-agent verify`` (``cli/mfa.py``); its enrol command (``cli/mfa.py``) and service
request (``service/handlers/methods.py``), since each factor's enrolment asks different
things; a lockout scope of its own, if it has one, in ``admin_ops.unlock`` (the password's and
app passwords' are special there); and the README's method tables.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the factor types (``token_agent.outcome.Factor`` by the same upper-case name)
POSSESSION = "possession"
KNOWLEDGE = "knowledge"


class UnknownKind(ValueError):
    """A name that is no method kind; the message names the valid ones."""


@dataclass(frozen=True)
class Kind:
    #: ``methods.kind`` in the store
    store: str
    #: the policy's name
    policy: str
    #: the command line's (and the service's ``methods.*``) name
    cli: str
    #: what people call it
    label: str
    #: ``POSSESSION`` or ``KNOWLEDGE``: what it proves
    factor: str
    #: strength as a second factor (higher is stronger); None: never a second factor
    strength: int | None = None
    #: can be the primary factor of a login
    primary: bool = False
    #: a second factor the policy may list in ``methods.allowed`` (and asks for normally)
    second: bool = False
    #: a recovery method, accepted as a second factor only as a fallback (backup codes)
    fallback: bool = False
    #: a destination codes are sent to (several per user, chosen as ``CHANNEL:NAME``)
    contact: bool = False
    #: a contact: the channel's name in messages ("sent by SMS") and what its destination is
    #: (``enrol sms --help``)
    channel: str | None = None
    destination: str | None = None
    #: can be set up at the login prompt when the policy requires a second factor
    enrol_at_login: bool = False
    #: resists phishing (bound to the relying party or a card's own key)
    phishing_resistant: bool = False
    #: a long-lived secret that ``token-agent verify`` never takes on the command line
    secret: bool = False
    #: checked by ``token-agent verify KIND`` (keys and cards have their own ceremonies,
    #: push its own command)
    verifiable: bool = False

    def __post_init__(self) -> None:
        if self.factor not in (POSSESSION, KNOWLEDGE):
            raise ValueError(f"{self.store}: factor must be {POSSESSION} or {KNOWLEDGE}")
        if self.contact != (self.channel is not None) or self.contact != bool(self.destination):
            raise ValueError(f"{self.store}: a channel and a destination exactly for a contact")
        if (self.second or self.fallback) != (self.strength is not None):
            raise ValueError(f"{self.store}: a strength exactly when it can be a second factor")


PASSWORD = Kind("password", "password", "password", "password", KNOWLEDGE, primary=True,
                secret=True, verifiable=True)
KEY = Kind("fido2", "key", "key", "security key", POSSESSION, 4, primary=True, second=True,
           phishing_resistant=True)
CARD = Kind("smartcard", "card", "card", "smartcard", POSSESSION, 4, primary=True, second=True,
            phishing_resistant=True)
TOTP = Kind("totp", "totp", "totp", "authenticator app", POSSESSION, 3, second=True,
            enrol_at_login=True, verifiable=True)
EMAIL = Kind("email", "email", "email", "email code", POSSESSION, 1, second=True, contact=True,
             channel="email", destination="an email address", enrol_at_login=True,
             verifiable=True)
SMS = Kind("sms", "sms", "sms", "text message code", POSSESSION, 2, second=True, contact=True,
           channel="SMS", destination="a mobile number for text messages", enrol_at_login=True,
           verifiable=True)
VOICE = Kind("voice", "voice", "voice", "phone call code", POSSESSION, 2, second=True,
             contact=True, channel="voice call", destination="a phone number for voice calls",
             enrol_at_login=True, verifiable=True)
MESSAGING = Kind("messaging", "messaging", "messaging", "messaging app code", POSSESSION, 2,
                 second=True, contact=True, channel="messaging app",
                 destination="a mobile number for a messaging app", enrol_at_login=True,
                 verifiable=True)
PUSH = Kind("push", "push", "push", "push approval", POSSESSION, 3, second=True)
APP_PASSWORD = Kind("app_password", "app_password", "app-password", "app password", KNOWLEDGE,
                    secret=True, verifiable=True)
BACKUP_CODES = Kind("backup_codes", "backup", "backup", "backup codes", POSSESSION, 2,
                    fallback=True, verifiable=True)

#: every kind, in the store's order (``token_agent.store.METHOD_KINDS``)
ALL: tuple[Kind, ...] = (PASSWORD, KEY, CARD, TOTP, EMAIL, SMS, VOICE, MESSAGING, PUSH,
                         APP_PASSWORD, BACKUP_CODES)

_BY_STORE = {k.store: k for k in ALL}
_BY_POLICY = {k.policy: k for k in ALL}
_BY_CLI = {k.cli: k for k in ALL}


def _unknown(what: str, name: object, names) -> UnknownKind:
    return UnknownKind(f"unknown method kind {name!r} ({what} name): one of {', '.join(names)}")


def _lookup(table: dict[str, Kind], what: str, name: str) -> Kind:
    kind = table.get(name) if isinstance(name, str) else None
    if kind is None:
        raise _unknown(what, name, table)
    return kind


def by_store(name: str) -> Kind:
    """The kind stored as ``name`` (``fido2``); ``UnknownKind`` otherwise."""
    return _lookup(_BY_STORE, "store", name)


def by_policy(name: str) -> Kind:
    """The kind the policy calls ``name`` (``key``); ``UnknownKind`` otherwise."""
    return _lookup(_BY_POLICY, "policy", name)


def by_cli(name: str) -> Kind:
    """The kind the command line calls ``name`` (``app-password``); ``UnknownKind`` otherwise."""
    return _lookup(_BY_CLI, "command-line", name)


def by_any(name: str) -> Kind:
    """The kind named ``name`` by the command line, the policy or the store, in that order
    (``admin unlock --method`` takes all three); ``UnknownKind`` otherwise."""
    for table in (_BY_CLI, _BY_POLICY, _BY_STORE):
        if isinstance(name, str) and name in table:
            return table[name]
    raise _unknown("command-line", name, _BY_CLI)


def get_store(name: str) -> Kind | None:
    """The kind stored as ``name``, or None."""
    return _BY_STORE.get(name)


def get_policy(name: str) -> Kind | None:
    """The kind the policy calls ``name``, or None."""
    return _BY_POLICY.get(name)


def label_of_store(name: str) -> str:
    """The label of a store kind, or the name itself when it is no kind (an event's kind)."""
    k = _BY_STORE.get(name)
    return k.label if k else name


def policy_of_store(name: str) -> str:
    """The policy's name of a store kind, or the name itself when it is no kind."""
    k = _BY_STORE.get(name)
    return k.policy if k else name


def store_of_policy(name: str) -> str:
    """The store's name of a policy method, or the name itself when it is no kind."""
    k = _BY_POLICY.get(name)
    return k.store if k else name


#: second factors, strongest first (ties in registry order): the policy's default
#: ``methods.allowed`` and the order of its menus
SECOND_FACTORS: tuple[Kind, ...] = tuple(sorted((k for k in ALL if k.second),
                                                key=lambda k: -(k.strength or 0)))
#: the primary factors of a login
PRIMARY: tuple[Kind, ...] = tuple(k for k in ALL if k.primary)
#: the contact channels
CONTACTS: tuple[Kind, ...] = tuple(k for k in ALL if k.contact)
#: what may be set up at the login prompt, strongest first
ENROL_AT_LOGIN: tuple[Kind, ...] = tuple(k for k in SECOND_FACTORS if k.enrol_at_login)
