"""The service's and the workstation's configuration: ``config.toml``.

Where it is read from, first match wins:

1. ``--config PATH`` (``token-agent serve --config``, ``token-agent config check PATH``);
2. ``TOKEN_AGENT_CONFIG`` (a file named here or with ``--config`` must exist: a missing
   one is an error, not a silent fallback to the defaults);
3. ``/etc/token-agent/config.toml``, if it exists;
4. ``$XDG_CONFIG_HOME/token-agent/config.toml`` (absolute ``XDG_CONFIG_HOME`` only), else
   ``~/.config/token-agent/config.toml``, if it exists;
5. otherwise the built-in defaults below.

Every table and key is optional. The file is validated as a whole when the service starts
(and by ``token-agent config check``): every problem is reported with its key path (an
unknown key with a suggestion for a misspelt one, a wrong type, a value out of range), and
the service does not start with a wrong file (exit 2), nor with a file (or directory) that
others than root or its own user can change (``filetrust.py``; other commands warn). Relative paths are taken from the
directory of the file; ``~`` is the home directory.

```toml
[service]
socket = "/run/token-agent/agent.sock"  # root's default; others: $RUNTIME_DIRECTORY/agent.sock
                                        # (systemd), else $XDG_RUNTIME_DIR/token-agent/agent.sock;
                                        # clients fall back to root's when theirs is missing
                                        # (TOKEN_AGENT_SOCKET overrides the file; --socket both)
socket_mode = 0o666                     # anyone may connect: SO_PEERCRED decides what they may do
login_service_users = ["gdm"]           # may start a login for any user (display managers, PAM) [none]
admin_group = "token-agent-admin"       # members are administrators of the service
prompt_timeout = 120                    # seconds a login waits for each answer (1 to 3600)
max_connections = 256                   # connections at once on the socket (1 to 65536);
                                        # more are refused, an eighth is kept for root and
                                        # the login services; when it is full, a user holding
                                        # fewer connections than another takes one of that
                                        # other's idle ones (so users cannot pool them)
max_connections_per_user = 16           # connections one local user may hold (1 to 65536)
idle_timeout = 60                       # seconds a connection may stay without a request, a
                                        # ceremony or a subscription before it is closed (1 to 3600)
max_ceremonies = 64                     # logins and enrolments at once (1 to 4096): the worker
                                        # pool's size; a quarter is kept for root and the login
                                        # services; more are refused ("busy")
max_ceremonies_per_user = 4             # ... started by one local user at once (1 to 4096)
login_socket = "/run/token-agent/login.sock"  # a second socket for root and the login services
                                        # only, so that no local user's flood on the first one
                                        # can stop a login [login.sock beside the socket, or
                                        # NAME-login.sock beside NAME.sock; "" = none]
login_socket_group = "token-agent-login"  # its group (mode 0660; the service's user must be a
                                        # member); the login services join it [none: 0600, root only]

[store]
data_dir = "/var/lib/token-agent"       # the command line reads it too; --data-dir and
                                        # TOKEN_AGENT_DATA_DIR win over it [STATE_DIRECTORY
                                        # (systemd), $XDG_DATA_HOME/token-agent, ~/.local/share/...]
size_warning_mb = 1024                  # the service logs a warning (at most hourly) when the
                                        # store file (with its -wal) grows past this; 0 = never
                                        # (0 to 1048576; not for a PostgreSQL store)
url = "postgresql://token_agent@db.example.nhs.uk/token_agent"  # the store on a PostgreSQL
                                        # server instead of the SQLite file in data_dir, which
                                        # keeps the key file; never with a password in it
                                        # [--store-url, TOKEN_AGENT_STORE_URL win; none: SQLite]
password_file = "/etc/token-agent/store-password"  # the database password (a private file:
                                        # 0600 or 0400) [libpq's PGPASSFILE, ~/.pgpass, peer]

[policy]
file = "/etc/token-agent/policy.toml"   # [--policy, TOKEN_AGENT_POLICY, this, /etc, ~/.config]

[workstation]
device = "managed"                      # managed | unmanaged: what the policy is told [managed]
device_id = "ws-ward-7-bay-3"           # [derived from /etc/machine-id]
network = "10.1.2.3"                    # the workstation's address, for trusted networks [none]

[keys]
simulators = ["127.0.0.1:35962"]        # simulated keys (what TOKEN_AGENT_SIM_KEYS says) [none]
timeout = 30                            # seconds to wait for a touch (1 to 300)

[cards]
readers = ["Virtual PCD"]               # readers to watch: names or name prefixes [all]
lock_command = "loginctl lock-session"  # run when a session's card leaves; "" = none
                                        # [the card setting card_lock_command]
driver = "auto"                         # how cards are asked: piv (the PIV applet over PC/SC)
                                        # | pkcs11 (the card vendor's PKCS#11 module) | auto
                                        # (PIV when the card answers the PIV SELECT, else
                                        # PKCS#11 on the same reader) [auto]
pkcs11_module = "opensc-pkcs11.so"      # the PKCS#11 module: a file name the dynamic loader
                                        # finds (OpenSC's [default]), or a vendor module's path

[server]                                # the organisation's server: see orgconfig.py
listen = "0.0.0.0:8443"

[organisation]                          # this workstation belongs to an organisation
servers = ["https://org1.example.nhs.uk:8443"]  # (orgconfig.py: timeout, dir)

[web]                                   # the server's pages: see webconfig.py
public_url = "https://login.trust.nhs.uk:8443"

[logging]
level = "info"                          # debug | info | warning | error
format = "text"                         # text | json (one object per line: ts, level, logger,
                                        # message and the record's fields; under systemd,
                                        # sent to journald as journal fields)
```

``token-agent config check [PATH]`` prints the problems (exit 2) or "ok" with warnings
(exit 0): simulated keys configured (development machines only), no lock command, a socket
mode that shuts out login services or lets others write to a socket in a shared directory.

    config = load_config()                    # or load_config("/etc/token-agent/config.toml")
    config.service.socket_path()              # the socket to listen on / connect to
    config, errors, warnings = check_config_text(text, "config.toml")
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .filetrust import check_config_file
from .orgconfig import (
    ORGANISATION_KEYS, SERVER_KEYS, OrganisationConfig, ServerConfig, parse_organisation,
    parse_server,
)
from .webconfig import WEB_KEYS, WebConfig, parse_web
from .paths import APP_DIRNAME, config_file, expand_home, home
from .tomlcheck import TableParser, kind as _kind, show as _show, suggest as _suggest

CONFIG_ENV = "TOKEN_AGENT_CONFIG"
SOCKET_ENV = "TOKEN_AGENT_SOCKET"
SYSTEM_CONFIG_PATH = Path("/etc/token-agent/config.toml")
ROOT_SOCKET = "/run/token-agent/agent.sock"
CONFIG_FILENAME = "config.toml"
SOCKET_FILENAME = "agent.sock"
LOGIN_SOCKET_FILENAME = "login.sock"

DEVICE_KINDS = ("managed", "unmanaged")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_ADMIN_GROUP = "token-agent-admin"
#: half-done enrolments (unconfirmed methods) older than this are removed at start
STALE_ENROLMENT_SECONDS = 600


class ConfigError(ValueError):
    """A configuration that cannot be used; ``errors`` lists every problem, one per line."""

    def __init__(self, errors: list[str] | str):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------- the values


def default_socket(environ: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """The socket when nothing names one: ``/run/token-agent/agent.sock`` for root; for a
    systemd service with ``RuntimeDirectory=`` (``RUNTIME_DIRECTORY`` set), ``agent.sock``
    in it; else ``$XDG_RUNTIME_DIR/token-agent/agent.sock`` (``/run/user/UID`` when unset)."""
    env = os.environ if environ is None else environ
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return ROOT_SOCKET
    systemd = (env.get("RUNTIME_DIRECTORY") or "").split(":")[0]
    if systemd and Path(systemd).is_absolute():
        return str(Path(systemd) / SOCKET_FILENAME)
    runtime = env.get("XDG_RUNTIME_DIR")
    if not runtime or not Path(runtime).is_absolute():
        runtime = f"/run/user/{uid}"
    return str(Path(runtime) / APP_DIRNAME / SOCKET_FILENAME)


@dataclass(frozen=True)
class ServiceConfig:
    socket: str | None = None  # None: default_socket()
    socket_mode: int = 0o666
    login_service_users: tuple[str, ...] = ()
    admin_group: str = DEFAULT_ADMIN_GROUP
    prompt_timeout: float = 120.0
    max_connections: int = 256
    max_connections_per_user: int = 16
    idle_timeout: float = 60.0
    max_ceremonies: int = 64
    max_ceremonies_per_user: int = 4
    login_socket: str | None = None  # None: LOGIN_SOCKET_FILENAME beside the socket; "": none
    login_socket_group: str | None = None  # None: mode 0600 (root and the service's user)

    def socket_path(self, environ: Mapping[str, str] | None = None,
                    explicit: str | os.PathLike[str] | None = None) -> Path:
        """The socket: ``explicit`` (``--socket``), else ``TOKEN_AGENT_SOCKET``, else the
        file's ``socket``, else :func:`default_socket`."""
        env = os.environ if environ is None else environ
        if explicit is not None and str(explicit) != "":
            return Path(os.path.abspath(os.path.expanduser(os.fspath(explicit))))
        if env.get(SOCKET_ENV):
            return Path(os.path.abspath(os.path.expanduser(env[SOCKET_ENV])))
        if self.socket:
            return Path(self.socket)
        return Path(default_socket(env))

    def login_socket_path(self, socket_path: Path) -> Path | None:
        """The login services' socket (``login_socket``; by default ``login.sock`` beside
        ``socket_path``, ``NAME-login.sock`` beside a socket not called ``agent.sock``), or
        None when ``login_socket = ""`` turns it off."""
        if self.login_socket == "":
            return None
        if self.login_socket:
            return Path(self.login_socket)
        if socket_path.name == SOCKET_FILENAME:
            return socket_path.parent / LOGIN_SOCKET_FILENAME
        return socket_path.parent / f"{socket_path.stem}-{LOGIN_SOCKET_FILENAME}"

    def client_socket_path(self, environ: Mapping[str, str] | None = None,
                           explicit: str | os.PathLike[str] | None = None) -> Path:
        """The socket a client connects to: as :meth:`socket_path`, except that a user
        whose own default socket does not exist reaches the system service's
        (``/run/token-agent/agent.sock``) when that one exists."""
        env = os.environ if environ is None else environ
        path = self.socket_path(env, explicit)
        named = (explicit is not None and str(explicit) != "") or env.get(SOCKET_ENV) \
            or self.socket
        if not named and not path.exists() and Path(ROOT_SOCKET).exists():
            return Path(ROOT_SOCKET)
        return path


@dataclass(frozen=True)
class StoreConfig:
    data_dir: str | None = None  # None: token_agent.paths rules
    size_warning_mb: int = 1024  # 0: never
    url: str | None = None  # a postgresql:// URL (store/url.py); None: SQLite in data_dir
    password_file: str | None = None  # the PostgreSQL password's file


@dataclass(frozen=True)
class PolicyConfig:
    file: str | None = None  # None: the policy module's own lookup


@dataclass(frozen=True)
class WorkstationConfig:
    device: str = "managed"
    device_id: str | None = None  # None: sightings.workstation_device_id()
    network: str | None = None

    def effective_device_id(self) -> str:
        if self.device_id:
            return self.device_id
        from .sightings import workstation_device_id

        return workstation_device_id()


@dataclass(frozen=True)
class KeysConfig:
    simulators: tuple[str, ...] = ()
    timeout: float = 30.0

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with ``TOKEN_AGENT_SIM_KEYS`` set from
        ``simulators`` when the file names any."""
        from drivers.fido.discovery import SIM_KEYS_ENV

        env = dict(os.environ if base is None else base)
        if self.simulators:
            env[SIM_KEYS_ENV] = ",".join(self.simulators)
        return env


#: ``[cards] driver``: drivers.cardaccess.DRIVERS (not imported: the config needs no driver)
CARD_DRIVERS = ("piv", "pkcs11", "auto")
#: ``[cards] pkcs11_module``'s default: drivers.cardaccess.DEFAULT_PKCS11_MODULE
DEFAULT_PKCS11_MODULE = "opensc-pkcs11.so"


@dataclass(frozen=True)
class CardsConfig:
    readers: tuple[str, ...] | None = None  # None: every reader
    lock_command: str | None = None  # None: the card setting card_lock_command; "": none
    driver: str = "auto"  # CARD_DRIVERS: how a card is asked (token_agent.cardopen)
    pkcs11_module: str = DEFAULT_PKCS11_MODULE  # a bare file name, or an absolute path


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    service: ServiceConfig = field(default_factory=ServiceConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    workstation: WorkstationConfig = field(default_factory=WorkstationConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    cards: CardsConfig = field(default_factory=CardsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    organisation: OrganisationConfig = field(default_factory=OrganisationConfig)
    web: WebConfig = field(default_factory=WebConfig)
    #: the file it came from (None: built-in defaults)
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["service"]["socket_mode"] = f"0o{self.service.socket_mode:o}"
        return data


DEFAULT_CONFIG = Config()


# --------------------------------------------------------------------------- parsing

_KEYS: dict[str, tuple[str, ...]] = {
    "service": ("socket", "socket_mode", "login_service_users", "admin_group", "prompt_timeout",
                "max_connections", "max_connections_per_user", "idle_timeout", "max_ceremonies",
                "max_ceremonies_per_user", "login_socket", "login_socket_group"),
    "store": ("data_dir", "size_warning_mb", "url", "password_file"),
    "policy": ("file",),
    "workstation": ("device", "device_id", "network"),
    "keys": ("simulators", "timeout"),
    "cards": ("readers", "lock_command", "driver", "pkcs11_module"),
    "logging": ("level", "format"),
    "server": SERVER_KEYS,
    "organisation": ORGANISATION_KEYS,
    "web": WEB_KEYS,
}


class _Parser(TableParser):
    def __init__(self, source: str, base: Path | None, environ: Mapping[str, str]):
        super().__init__(source, _KEYS)
        self.base = base
        self.env = environ

    def string(self, tbl: Mapping[str, Any], key: str, path: str, *, empty_ok: bool = False
               ) -> str | None:
        if key not in tbl:
            return None
        value = tbl[key]
        if not isinstance(value, str):
            self.error(f"{path}.{key}", f"{_show(value)} must be a string, not {_kind(value)}")
            return None
        if not value.strip() and not empty_ok:
            self.error(f"{path}.{key}", "must not be empty (leave the key out for the default)")
            return None
        return value.strip()

    def choice(self, tbl: Mapping[str, Any], key: str, path: str, choices: tuple[str, ...],
               default: str) -> str:
        if key not in tbl:
            return default
        value = tbl[key]
        where = f"{path}.{key}"
        if not isinstance(value, str):
            self.error(where, f"{_show(value)} must be one of {', '.join(choices)}, not "
                              f"{_kind(value)}")
            return default
        if value.lower() not in choices:
            hint = _suggest(value.lower(), choices)
            self.error(where, f"{_show(value)} is not one of {', '.join(choices)}"
                              + (f" ({hint})" if hint else ""))
            return default
        return value.lower()

    def number(self, tbl: Mapping[str, Any], key: str, path: str, default: float,
               lo: float, hi: float, unit: str, *, integer: bool = False) -> Any:
        if key not in tbl:
            return default
        value = tbl[key]
        where = f"{path}.{key}"
        what = "a whole number" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
            self.error(where, f"{_show(value)} must be {what} from {lo:g} to {hi:g}{unit}, not "
                              f"{_kind(value)}")
            return default
        if not (math.isfinite(value) and lo <= value <= hi):
            self.error(where, f"{_show(value)} is out of range: allowed {lo:g} to {hi:g}{unit}")
            return default
        return int(value) if integer else float(value)

    def strings(self, tbl: Mapping[str, Any], key: str, path: str, what: str
                ) -> tuple[str, ...] | None:
        if key not in tbl:
            return None
        value = tbl[key]
        where = f"{path}.{key}"
        if not isinstance(value, list):
            self.error(where, f"{_show(value)} must be an array of {what}s, not {_kind(value)}")
            return None
        out: list[str] = []
        for item in value:
            if not isinstance(item, str) or not item.strip():
                self.error(where, f"{_show(item)} is not {what_article(what)} (a non-empty string)")
                continue
            if item.strip() in out:
                self.error(where, f"{_show(item)} is listed twice")
                continue
            out.append(item.strip())
        return tuple(out)

    def store_url(self, tbl: Mapping[str, Any], key: str, path: str) -> str | None:
        from .store.url import url_problem

        text = self.string(tbl, key, path)
        if text is not None and (problem := url_problem(text)):
            self.error(f"{path}.{key}", f"the store's URL {problem}")
            return None
        return text

    def path(self, tbl: Mapping[str, Any], key: str, path: str) -> str | None:
        text = self.string(tbl, key, path)
        if text is None:
            return None
        p = Path(text)
        parts = p.parts
        if parts and parts[0] == "~":
            p = home(self.env).joinpath(*parts[1:])
        elif not p.is_absolute():
            p = (self.base or Path.cwd()) / p
        return os.path.abspath(p)


def what_article(what: str) -> str:
    return ("an " if what[:1] in "aeio" else "a ") + what


_USER_RE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@$")


def _parse_service(p: _Parser, t: Mapping[str, Any]) -> ServiceConfig:
    socket = p.path(t, "socket", "service")
    mode = 0o666
    if "socket_mode" in t:
        value = t["socket_mode"]
        where = "service.socket_mode"
        parsed: int | None = None
        if isinstance(value, bool):
            parsed = None
        elif isinstance(value, int):
            parsed = value
        elif isinstance(value, str):
            text = value.strip().lower().removeprefix("0o")
            if text and all(c in "01234567" for c in text):
                parsed = int(text, 8)
        if parsed is None:
            p.error(where, f"{_show(value)} must be a file mode: an octal integer such as "
                           f"0o666 or 0o660 (or the string \"0660\"), not {_kind(value)}")
        elif not 0 <= parsed <= 0o777:
            p.error(where, f"0o{parsed:o} is out of range: allowed 0o000 to 0o777 (permission "
                           f"bits only)")
        elif not parsed & 0o600 == 0o600:
            p.error(where, f"0o{parsed:o} does not let the service's own user read and write "
                           f"its socket (needs 0o600 at least)")
        else:
            mode = parsed
    users = p.strings(t, "login_service_users", "service", "user name") or ()
    for name in users:
        if not set(name) <= _USER_RE_CHARS:
            p.error("service.login_service_users", f"{_show(name)} is not a user name")
    users = tuple(u for u in users if set(u) <= _USER_RE_CHARS)
    group = p.string(t, "admin_group", "service") or DEFAULT_ADMIN_GROUP
    login_socket = None
    if "login_socket" in t:
        login_socket = "" if t["login_socket"] == "" else p.path(t, "login_socket", "service")
    login_group = p.string(t, "login_socket_group", "service")
    if login_group is not None and not set(login_group) <= _USER_RE_CHARS:
        p.error("service.login_socket_group", f"{_show(login_group)} is not a group name")
        login_group = None

    def count(key: str, default: int) -> int:
        return p.number(t, key, "service", default, 1, 65536 if "connections" in key else 4096,
                        "", integer=True)

    return ServiceConfig(
        socket=socket, socket_mode=mode, login_service_users=users, admin_group=group,
        prompt_timeout=p.number(t, "prompt_timeout", "service", 120.0, 1, 3600, " seconds"),
        max_connections=count("max_connections", 256),
        max_connections_per_user=count("max_connections_per_user", 16),
        idle_timeout=p.number(t, "idle_timeout", "service", 60.0, 1, 3600, " seconds"),
        max_ceremonies=count("max_ceremonies", 64),
        max_ceremonies_per_user=count("max_ceremonies_per_user", 4),
        login_socket=login_socket, login_socket_group=login_group)


def _parse_workstation(p: _Parser, t: Mapping[str, Any]) -> WorkstationConfig:
    device = p.choice(t, "device", "workstation", DEVICE_KINDS, "managed")
    device_id = p.string(t, "device_id", "workstation")
    if device_id is not None and (len(device_id) > 128 or not device_id.isprintable()):
        p.error("workstation.device_id", f"{_show(device_id)} must be 1 to 128 printable "
                                         f"characters")
        device_id = None
    network = p.string(t, "network", "workstation")
    if network is not None:
        try:
            network = str(ipaddress.ip_address(network.split("%", 1)[0]))
        except ValueError:
            hint = " (a network? give the workstation's own address)" if "/" in network else ""
            p.error("workstation.network", f"{_show(network)} is not an IP address{hint}")
            network = None
    return WorkstationConfig(device=device, device_id=device_id, network=network)


def _parse_keys(p: _Parser, t: Mapping[str, Any]) -> KeysConfig:
    from drivers.fido.sim import parse_address

    good = []
    for item in p.strings(t, "simulators", "keys", "host:port address") or ():
        try:
            parse_address(item)
        except ValueError as e:
            p.error("keys.simulators", f"{_show(item)} is not host:port, e.g. "
                                       f"\"127.0.0.1:35962\" ({e})")
            continue
        good.append(item)
    return KeysConfig(simulators=tuple(good),
                      timeout=p.number(t, "timeout", "keys", 30.0, 1, 300, " seconds"))


def _parse_cards(p: _Parser, t: Mapping[str, Any]) -> CardsConfig:
    readers = p.strings(t, "readers", "cards", "reader name")
    if readers is not None and not readers and not any(
            e.startswith(f"{p.source}: cards.readers") for e in p.errors):
        p.error("cards.readers", "is empty: no reader would be watched (leave it out to watch "
                                 "every reader)")
    lock = p.string(t, "lock_command", "cards", empty_ok=True)
    if lock:
        import shlex

        try:
            if not shlex.split(lock):
                raise ValueError("empty")
        except ValueError as e:
            p.error("cards.lock_command", f"{_show(lock)} is not a command line ({e})")
            lock = None
    driver = p.choice(t, "driver", "cards", CARD_DRIVERS, "auto")
    module = p.string(t, "pkcs11_module", "cards")
    if module is not None and ("/" in module or module.startswith("~")):
        module = p.path(t, "pkcs11_module", "cards")  # a path: from the file's directory
    elif module is not None and module in (".", ".."):
        p.error("cards.pkcs11_module", f"{_show(module)} is not a module's file name or path")
        module = None
    return CardsConfig(readers=readers, lock_command=lock, driver=driver,
                       pkcs11_module=module or DEFAULT_PKCS11_MODULE)


def parse_config(text: str, source: str = "<config>", *,
                 environ: Mapping[str, str] | None = None) -> Config:
    """Parse and validate ``config.toml`` text; ``ConfigError`` lists every problem.
    Relative paths are taken from the directory of ``source`` when it is a file path."""
    env = os.environ if environ is None else environ
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    base = Path(source).parent if not source.startswith("<") else None
    p = _Parser(source, base, env)
    for key, value in data.items():
        if key not in _KEYS:
            hint = _suggest(key, _KEYS) or f"known: {', '.join(_KEYS)}"
            what = "table" if isinstance(value, dict) else "key"
            p.error(key, f"unknown {what} ({hint})")
    service = _parse_service(p, p.table(data, "service"))
    t = p.table(data, "store")
    store = StoreConfig(p.path(t, "data_dir", "store"),
                        p.number(t, "size_warning_mb", "store", 1024, 0, 1048576, " MB",
                                 integer=True),
                        p.store_url(t, "url", "store"), p.path(t, "password_file", "store"))
    policy = PolicyConfig(p.path(p.table(data, "policy"), "file", "policy"))
    workstation = _parse_workstation(p, p.table(data, "workstation"))
    keys = _parse_keys(p, p.table(data, "keys"))
    cards = _parse_cards(p, p.table(data, "cards"))
    t = p.table(data, "logging")
    logging_ = LoggingConfig(p.choice(t, "level", "logging", LOG_LEVELS, "info"),
                             p.choice(t, "format", "logging", LOG_FORMATS, "text"))
    server = parse_server(p, p.table(data, "server"))
    organisation = parse_organisation(p, p.table(data, "organisation"))
    web = parse_web(p, p.table(data, "web"))
    if p.errors:
        raise ConfigError(p.errors)
    return Config(service, store, policy, workstation, keys, cards, logging_, server,
                  organisation, web, None if source.startswith("<") else source)


def config_warnings(config: Config) -> list[str]:
    """What an accepted configuration does that deserves a second look, one line each."""
    out: list[str] = []
    prefix = f"{config.source}: " if config.source else ""
    if config.keys.simulators:
        out.append(f"{prefix}keys.simulators: simulated keys are accepted: development and test "
                   "machines only, never a production workstation")
    if config.cards.lock_command == "":
        out.append(f"{prefix}cards.lock_command: empty: removing a card ends its session but "
                   "does not lock the screen")
    module = config.cards.pkcs11_module
    if config.cards.driver != "piv" and os.path.isabs(module) and not os.path.isfile(module):
        out.append(f"{prefix}cards.pkcs11_module: {module} does not exist: cards that need "
                   "PKCS#11 cannot log in until it is installed")
    mode = config.service.socket_mode
    if config.service.login_service_users and not mode & 0o006:
        out.append(f"{prefix}service.socket_mode: 0o{mode:o} lets only the service's own user "
                   "and group connect: the login services "
                   f"({', '.join(config.service.login_service_users)}) and users' screen "
                   "lockers cannot reach the service unless they are in its group")
    if config.service.prompt_timeout > 600:
        out.append(f"{prefix}service.prompt_timeout: {config.service.prompt_timeout:g} s: a "
                   "login left at a prompt holds its device that long")
    if config.logging.level == "debug":
        out.append(f"{prefix}logging.level: debug: every request and prompt is logged (what "
                   "and who, never a value); keep it for diagnosis")
    return out


def check_config_text(text: str, source: str = "<config>", *,
                      environ: Mapping[str, str] | None = None
                      ) -> tuple[Config | None, list[str], list[str]]:
    """``(config or None, errors, warnings)`` for ``token-agent config check``."""
    try:
        config = parse_config(text, source, environ=environ)
    except ConfigError as exc:
        return None, list(exc.errors), []
    return config, [], config_warnings(config)


def read_config_file(path: str | os.PathLike[str], *, strict: bool = False) -> str:
    """The text of a configuration file; ``ConfigError`` when it cannot be read. A file that
    others than root (or the running user) can change (``filetrust.py``) is refused with
    ``strict`` (the service), else warned about on stderr."""
    path = Path(path)
    if path.exists():
        problems = check_config_file(path, "configuration file", strict=strict)
        if problems:
            raise ConfigError([f"{path}: {p}" for p in problems])
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: configuration file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a configuration file"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: cannot read the configuration file: permission denied"]
                          ) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the configuration file: "
                           f"{exc.strerror or exc}"]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the configuration file is not UTF-8 text"]) from None


def config_path(explicit: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None, *,
                system_path: str | os.PathLike[str] = SYSTEM_CONFIG_PATH) -> Path | None:
    """The file to read (see the module docstring), or None for the built-in defaults."""
    env = os.environ if environ is None else environ

    def expand(text: str) -> Path:
        return Path(os.path.abspath(expand_home(text, env)))

    if explicit is not None and str(explicit) != "":
        return expand(os.fspath(explicit))
    if env.get(CONFIG_ENV):
        return expand(env[CONFIG_ENV])
    return config_file(CONFIG_FILENAME, system_path, env)


def load_config(explicit: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None, *,
                system_path: str | os.PathLike[str] = SYSTEM_CONFIG_PATH,
                strict: bool = False) -> Config:
    """The configuration in force (see the module docstring); ``ConfigError`` when the file
    is missing (named explicitly or by ``TOKEN_AGENT_CONFIG``), unreadable or invalid, or
    with ``strict`` (the service) writable by others (``read_config_file``)."""
    path = config_path(explicit, environ, system_path=system_path)
    if path is None:
        return DEFAULT_CONFIG
    return parse_config(read_config_file(path, strict=strict), str(path), environ=environ)
