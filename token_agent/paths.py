"""Where token-agent keeps its files.

The data directory holds the store (``token-agent.db`` and SQLite's ``-wal`` and ``-shm``
files beside it). The command line and the service choose it alike, first match wins:

1. an explicit directory (the command line's ``--data-dir DIR``);
2. ``TOKEN_AGENT_DATA_DIR``;
3. ``[store] data_dir`` of the configuration file (``config.toml``, found as the service
   finds it: ``--config``, ``TOKEN_AGENT_CONFIG``, ``/etc/token-agent/config.toml``, the
   user's ``~/.config/token-agent/config.toml``; see ``config.py``);
4. ``$STATE_DIRECTORY`` (set by systemd for a unit with ``StateDirectory=``: the service);
5. ``$XDG_DATA_HOME/token-agent`` (the XDG base-directory spec: only an absolute
   ``XDG_DATA_HOME`` counts, a relative one is ignored);
6. ``~/.local/share/token-agent``.

``choose_data_dir`` applies these rules (without reading the configuration file itself:
``datadir.locate`` does that, only when 1 and 2 do not decide) and says which one decided.
A command that writes creates a missing directory with mode 0700 whatever the umask (it will
hold the credential store); one that only reads creates nothing (``data_dir(...,
create=False)``, ``Store.open(..., create=False)``). The permissions of an existing
directory are left as they are, but the store and the key file refuse a directory that is a
symbolic link, is another user's or is writable by others (``filetrust.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: environment variable naming the data directory
DATA_DIR_ENV = "TOKEN_AGENT_DATA_DIR"
#: name of the store file inside the data directory
STORE_FILENAME = "token-agent.db"
#: name of the application's directory under ``$XDG_DATA_HOME``
APP_DIRNAME = "token-agent"


def choose_data_dir(explicit: str | os.PathLike[str] | None = None,
                    environ: Mapping[str, str] | None = None, *,
                    configured: str | os.PathLike[str] | None = None,
                    config_source: str | None = None) -> tuple[Path, str]:
    """The data directory (absolute) by the rules of the module docstring, and which rule
    chose it (``"--data-dir"``, ``"TOKEN_AGENT_DATA_DIR"``, ``"[store] data_dir in
    FILE"``, ``"STATE_DIRECTORY"``, ``"XDG_DATA_HOME"``, ``"the default"``). ``configured``
    is the configuration file's ``[store] data_dir`` (read from ``config_source``). Empty
    values count as unset; ``~`` is expanded in the explicit and ``TOKEN_AGENT_DATA_DIR``
    forms. Creates and checks nothing."""
    env = os.environ if environ is None else environ
    state = (env.get("STATE_DIRECTORY") or "").split(":")[0]
    if explicit is not None and str(explicit) != "":
        chosen, why = expand_home(explicit, env), "--data-dir"
    elif env.get(DATA_DIR_ENV):
        chosen, why = expand_home(env[DATA_DIR_ENV], env), DATA_DIR_ENV
    elif configured is not None and str(configured) != "":
        chosen = expand_home(configured, env)
        why = f"[store] data_dir in {config_source}" if config_source else "[store] data_dir"
    elif state and Path(state).is_absolute():
        chosen, why = Path(state), "STATE_DIRECTORY"
    elif env.get("XDG_DATA_HOME") and Path(env["XDG_DATA_HOME"]).is_absolute():
        chosen, why = Path(env["XDG_DATA_HOME"]) / APP_DIRNAME, "XDG_DATA_HOME"
    else:
        chosen, why = home(env) / ".local" / "share" / APP_DIRNAME, "the default"
    return Path(os.path.abspath(chosen)), why


def data_dir(explicit: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None, *,
             configured: str | os.PathLike[str] | None = None,
             config_source: str | None = None, create: bool = True) -> Path:
    """The data directory (absolute) of ``choose_data_dir``; with ``create`` (the default)
    created with mode 0700 when missing. ``environ`` defaults to ``os.environ`` (tests pass
    their own).

    Raises ``NotADirectoryError`` when the path exists and is not a directory, and the
    ``OSError`` of ``mkdir`` when it cannot be created.
    """
    chosen, _ = choose_data_dir(explicit, environ, configured=configured,
                                config_source=config_source)
    if create:
        _ensure_private_dir(chosen)
    elif chosen.exists() and not chosen.is_dir():
        raise NotADirectoryError(f"data directory {chosen} exists and is not a directory")
    return chosen


def store_path(data_dir: str | os.PathLike[str]) -> Path:
    """The store file inside a data directory: ``data_dir / "token-agent.db"``."""
    return Path(data_dir) / STORE_FILENAME


def home(env: Mapping[str, str]) -> Path:
    """``$HOME`` of ``env``, else the account's home directory."""
    value = env.get("HOME")
    return Path(value) if value else Path.home()


def expand_home(path: str | os.PathLike[str], env: Mapping[str, str]) -> Path:
    """``~`` at the start of ``path`` as ``env``'s home directory (``~user`` as usual)."""
    path = Path(path)
    parts = path.parts
    if parts and parts[0] == "~":
        return home(env).joinpath(*parts[1:])
    return path.expanduser()


def config_file(filename: str, system_path: str | os.PathLike[str],
                environ: Mapping[str, str] | None = None) -> Path | None:
    """Where a configuration file is looked for when none is named: ``system_path``
    (``/etc/token-agent/...``) if it is a file, else the user's
    ``$XDG_CONFIG_HOME/token-agent/FILENAME`` (an absolute ``XDG_CONFIG_HOME`` only) or
    ``~/.config/token-agent/FILENAME`` if it is a file, else None."""
    env = os.environ if environ is None else environ
    system = Path(system_path)
    if system.is_file():
        return system
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home(env) / ".config"
    user = base / APP_DIRNAME / filename
    return user if user.is_file() else None


def _ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) if needed; a directory we create gets 0700."""
    if path.is_dir():
        return
    if path.exists():
        raise NotADirectoryError(f"data directory {path} exists and is not a directory")
    # Missing parents get 0700 too (the XDG spec's rule for directories an application
    # creates); mkdir's mode is filtered by the umask, so chmod afterwards.
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # created concurrently by someone else: leave it as it is
        os.chmod(d, 0o700)
