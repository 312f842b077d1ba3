"""Where token-agent keeps its files.

The data directory holds the store (``token-agent.db`` and SQLite's ``-wal`` and ``-shm``
files beside it). It is chosen, first match wins, from:

1. an explicit directory (the command line's ``--data-dir DIR``);
2. ``TOKEN_AGENT_DATA_DIR``;
3. ``$XDG_DATA_HOME/token-agent`` (the XDG base-directory spec: only an absolute
   ``XDG_DATA_HOME`` counts, a relative one is ignored);
4. ``~/.local/share/token-agent``.

A directory that does not exist is created with mode 0700 whatever the umask (it will hold
the credential store); the permissions of an existing directory are left as they are, but
the store and the key file refuse a directory that is a symbolic link, is another user's or
is writable by others (``filetrust.py``).
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


def data_dir(explicit: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None) -> Path:
    """The data directory (absolute), created with mode 0700 when missing.

    ``explicit`` (``--data-dir``) wins over ``TOKEN_AGENT_DATA_DIR``, which wins over
    ``$XDG_DATA_HOME/token-agent``, then ``~/.local/share/token-agent``. Empty variables count
    as unset. ``environ`` defaults to ``os.environ`` (tests pass their own). ``~`` is expanded
    in the explicit and ``TOKEN_AGENT_DATA_DIR`` forms.

    Raises ``NotADirectoryError`` when the path exists and is not a directory, and the
    ``OSError`` of ``mkdir`` when it cannot be created.
    """
    env = os.environ if environ is None else environ
    if explicit is not None and str(explicit) != "":
        chosen = expand_home(explicit, env)
    elif env.get(DATA_DIR_ENV):
        chosen = expand_home(env[DATA_DIR_ENV], env)
    elif env.get("XDG_DATA_HOME") and Path(env["XDG_DATA_HOME"]).is_absolute():
        chosen = Path(env["XDG_DATA_HOME"]) / APP_DIRNAME
    else:
        chosen = home(env) / ".local" / "share" / APP_DIRNAME
    chosen = Path(os.path.abspath(chosen))
    _ensure_private_dir(chosen)
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
