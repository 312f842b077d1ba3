"""The data directory, found by one lookup for the command line and the service alike
(``paths.py`` has the rules), and its store opened for a command that writes (created when
missing) or one that only reads (never created: ``StoreMissing``, saying where it looked
and why).

    where = locate(explicit, config_path=None)     # DataDir(path, source)
    store = open_store(where, create=False)        # StoreMissing when there is none
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .paths import DATA_DIR_ENV, choose_data_dir, data_dir, store_path


@dataclass(frozen=True)
class DataDir:
    path: Path
    #: which rule chose it (``paths.choose_data_dir``)
    source: str

    @property
    def store_path(self) -> Path:
        return store_path(self.path)

    def why(self) -> str:
        """Why the agent looks there, for messages."""
        if self.source == "the default":
            return ("by default: none of --data-dir, TOKEN_AGENT_DATA_DIR, [store] data_dir in "
                    "a config.toml, XDG_DATA_HOME is set")
        return f"because of {self.source}"


def locate(explicit: str | os.PathLike[str] | None = None,
           environ: Mapping[str, str] | None = None, *,
           config_path: str | os.PathLike[str] | None = None, config=None) -> DataDir:
    """The data directory by the rules of ``paths.py``. The configuration file (``config``,
    else the one ``config.load_config(config_path)`` finds) is read only when neither
    ``explicit`` (``--data-dir``) nor ``TOKEN_AGENT_DATA_DIR`` decides; ``ConfigError``
    when it is wrong or cannot be read. Creates nothing."""
    env = os.environ if environ is None else environ
    configured = source = None
    if (explicit is None or str(explicit) == "") and not env.get(DATA_DIR_ENV):
        if config is None:
            from .config import load_config

            config = load_config(config_path, env)
        configured, source = config.store.data_dir, config.source
    path, why = choose_data_dir(explicit, env, configured=configured, config_source=source)
    return DataDir(path, why)


def open_store(where: DataDir, *, create: bool, **options):
    """The store of ``where``: with ``create`` (a command that writes) the directory and the
    store are created when missing; without it nothing is created and a missing store is
    ``StoreMissing``, naming the file and why it was looked for there. ``options`` go to
    ``Store.open``."""
    from .store import Store, StoreMissing

    directory = data_dir(where.path, {}, create=create)
    try:
        return Store.open(store_path(directory), create=create, **options)
    except StoreMissing as e:
        raise StoreMissing(
            f"no token-agent store at {e.path} (looked there {where.why()}); nothing was "
            "created. A command that writes creates it (e.g. `token-agent users add NAME`); "
            "or name the right data directory with --data-dir, TOKEN_AGENT_DATA_DIR or "
            "[store] data_dir in config.toml", path=e.path) from None
