"""Where the agent gets a card's administrative credentials (the registration authority's
PUK and management key), for a sponsor's unlock (``card unlock --ra SPEC``) and the
cardholder's self-service unlock (``ceremonies/cardunlock.py``).

    source = load_source("file:/etc/token-agent/ra.toml")
    creds = source.credentials(uuid="5f3c...", serial="0000000001")
    creds.puk                     # never shown, never logged, never in an audit event

A source is named by a spec string ``NAME:ARGUMENT``; ``NAME`` is looked up in the entry
points group ``token_agent.ra_sources`` (a callable taking ``ARGUMENT`` and returning a
:class:`RaSource`). ``file`` is built in (:class:`FileRaSource`); the simulated PKI's RA
registers itself as ``simulated`` (``simulators/card/ra.py``, in pyproject.toml), so the
agent never imports the simulators. An organisation's real RA (a CMS, an HSM-backed
service) is one more entry point.

The file source is a private file (owned by the running user or root, mode 0600 or
stricter: not readable, let alone writable, by group or others; not a symbolic link), TOML
(``.toml``) or JSON (anything else)::

    [cards."0000000001"]            # the card serial, the CHUID GUID or the holder's UUID
    uuid = "5f3c..."                # optional: the holder's UUID (lookups by UUID)
    guid = "0123..."                # optional: the card's CHUID GUID (lookups by GUID)
    puk = "12345678"
    management_key_algorithm = "AES128"   # or "3DES"
    management_key = "00112233..."        # hex

A lookup by UUID that matches several cards is refused (name the card by its serial).
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from .filetrust import UntrustedPath, read_private_file

ENTRY_POINT_GROUP = "token_agent.ra_sources"
#: the environment variable naming the RA source (a spec), before the store setting
ENV = "TOKEN_AGENT_RA"
SETTING = "card_ra_source"
ALGORITHMS = {"AES128": 16, "3DES": 24}
_PUK_RE = re.compile(r"[0-9]{6,8}")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")


class RaError(Exception):
    """The RA's credentials cannot be had (source not configured, unreadable, malformed);
    the message says which source and why, never a secret."""


class UnknownCard(RaError):
    """The source has no credentials for this card."""


@dataclass(frozen=True)
class RaCredentials:
    """A card's administrative credentials. ``repr`` hides the secrets."""

    puk: str = field(repr=False)
    management_key_algorithm: str = "AES128"
    management_key: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.puk, str) or not _PUK_RE.fullmatch(self.puk):
            raise RaError("a PUK is 6 to 8 digits")
        if self.management_key_algorithm not in ALGORITHMS:
            raise RaError(f"unknown management key algorithm {self.management_key_algorithm!r} "
                          f"({' or '.join(ALGORITHMS)})")
        if self.management_key and len(self.management_key) != \
                ALGORITHMS[self.management_key_algorithm]:
            raise RaError(f"a {self.management_key_algorithm} management key is "
                          f"{ALGORITHMS[self.management_key_algorithm]} bytes")


@runtime_checkable
class RaSource(Protocol):
    """Gives a card's credentials; ``UnknownCard`` / ``RaError`` when it cannot."""

    name: str

    def credentials(self, *, uuid: str, serial: str | None = None) -> RaCredentials: ...


def _text(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise RaError(f"{where}: {what} must be a string")
    return value


class FileRaSource:
    """The RA's credentials from a private TOML or JSON file (see the module docstring).
    The file is read (and checked) at each lookup, so an edit takes effect at once."""

    name = "file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not str(path):
            raise RaError("the file RA source needs a path (file:/etc/token-agent/ra.toml)")
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileRaSource({str(self.path)!r})"

    def _load(self) -> dict[str, dict]:
        what = "RA credentials file"
        try:
            raw = read_private_file(self.path, what)
            st = os.stat(self.path, follow_symlinks=False)
        except UntrustedPath as e:
            raise RaError(str(e)) from None
        except FileNotFoundError:
            raise RaError(f"{what} {self.path} does not exist") from None
        except OSError as e:
            raise RaError(f"cannot read the {what} {self.path}: {e.strerror or e}") from None
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise RaError(f"{what} {self.path} can be read by its group or others (mode "
                          f"{mode:04o}): it holds PUKs; chmod 600 {self.path}")
        try:
            text = raw.decode("utf-8")
            if self.path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (UnicodeDecodeError, ValueError) as e:
            # the parsers' messages quote no values (tomllib / json say where, not what)
            kind = "TOML" if self.path.suffix == ".toml" else "JSON"
            where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise RaError(f"{what} {self.path} is not valid {kind}{where}") from None
        cards = data.get("cards") if isinstance(data, dict) else None
        if not isinstance(cards, dict) or not all(isinstance(v, dict) for v in cards.values()):
            raise RaError(f"{what} {self.path} has no [cards] table of cards "
                          "(cards.SERIAL = {puk, management_key_algorithm, management_key})")
        return cards

    def _entry(self, key: str, entry: dict) -> RaCredentials:
        where = f"{self.path}: card {key}"
        puk = _text(entry.get("puk"), "puk", where)
        algorithm = _text(entry.get("management_key_algorithm", "AES128"),
                          "management_key_algorithm", where)
        hexkey = _text(entry.get("management_key", ""), "management_key", where)
        if hexkey and not _HEX_RE.fullmatch(hexkey):
            raise RaError(f"{where}: management_key is not hexadecimal")
        try:
            return RaCredentials(puk, algorithm, bytes.fromhex(hexkey))
        except RaError as e:
            raise RaError(f"{where}: {e}") from None

    def credentials(self, *, uuid: str, serial: str | None = None) -> RaCredentials:
        cards = self._load()
        for key in (serial, uuid):
            if key and key in cards:
                return self._entry(key, cards[key])
        if serial:  # the card named by its CHUID GUID (what a PIV card tells about itself)
            guid = serial.replace("-", "").lower()
            by_guid = [k for k, v in cards.items() if str(v.get("guid", "")).lower() == guid]
            if len(by_guid) == 1:
                return self._entry(by_guid[0], cards[by_guid[0]])
        by_uuid = [k for k, v in cards.items() if uuid and v.get("uuid") == uuid]
        if len(by_uuid) == 1:
            return self._entry(by_uuid[0], cards[by_uuid[0]])
        if by_uuid:
            raise RaError(f"{self.path}: the holder {uuid} has {len(by_uuid)} cards: the card "
                          "must be named by its serial")
        raise UnknownCard(f"the RA credentials file {self.path} has no card "
                          f"{serial or uuid}" + (f" (holder {uuid})" if serial else ""))


def available() -> dict[str, Callable[[str], RaSource]]:
    """The RA sources by name: ``file`` and the ones entry points register."""
    from importlib.metadata import entry_points

    found: dict[str, Callable[[str], RaSource]] = {"file": FileRaSource}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name != "file":
            found[ep.name] = ep  # loaded only when used
    return found


def load_source(spec: str) -> RaSource:
    """The source a spec names (``file:/etc/token-agent/ra.toml``,
    ``simulated:/path/to/ca``); ``RaError`` for an unknown name or a bad argument."""
    name, sep, argument = (spec or "").partition(":")
    name = name.strip()
    if not sep or not name or not argument:
        raise RaError(f"an RA source is NAME:ARGUMENT (e.g. file:/etc/token-agent/ra.toml), "
                      f"not {spec!r}")
    sources = available()
    factory = sources.get(name)
    if factory is None:
        raise RaError(f"unknown RA source {name!r} (known: {', '.join(sorted(sources))})")
    if hasattr(factory, "load") and not isinstance(factory, type):
        try:
            factory = factory.load()
        except Exception as e:  # noqa: BLE001 - a plugin that does not import
            raise RaError(f"the RA source {name!r} cannot be loaded: {e}") from None
    source = factory(argument)
    if not callable(getattr(source, "credentials", None)):
        raise RaError(f"the RA source {name!r} gives no credentials()")
    return source


def configured_spec(store=None) -> str | None:
    """The configured RA source: ``$TOKEN_AGENT_RA``, else the store setting
    ``card_ra_source`` (empty: none)."""
    spec = os.environ.get(ENV, "").strip()
    if spec:
        return spec
    if store is not None:
        try:
            value = store.get_setting(SETTING)
        except Exception:  # noqa: BLE001 - an unknown setting: not configured
            value = None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def configured_source(agent_or_store) -> RaSource:
    """The source :func:`configured_spec` names; ``RaError`` when none is configured."""
    store = getattr(agent_or_store, "store", agent_or_store)
    spec = configured_spec(store)
    if spec is None:
        raise RaError(f"no RA credentials source is configured (set {ENV}=file:PATH, or "
                      f"token-agent card settings set {SETTING} file:PATH)")
    return load_source(spec)


def write_file(path: str | os.PathLike[str], cards: dict[str, dict]) -> Path:
    """Write a file source (TOML when ``path`` ends in ``.toml``, else JSON), mode 0600,
    created exclusively of the old one (written to a new file, then renamed)."""
    path = Path(path)
    if path.suffix == ".toml":
        lines = []
        for key, entry in cards.items():
            lines.append(f"[cards.{json.dumps(str(key))}]")
            for k, v in entry.items():
                lines.append(f"{k} = {json.dumps(str(v))}")
            lines.append("")
        text = "\n".join(lines)
    else:
        text = json.dumps({"cards": cards}, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
