"""The data directory, found by one lookup for the command line and the service alike
(``paths.py`` has the rules), and its store opened for a command that writes (created when
missing) or one that only reads (never created: ``StoreMissing``, saying where it looked
and why).

    where = locate(explicit, config_path=None)     # DataDir(path, source, store_url, ...)
    store = open_store(where, create=False)        # StoreMissing when there is none

The store is the SQLite file in the data directory, unless a PostgreSQL URL is named:
``--store-url`` (``locate(store_url=...)``), else ``TOKEN_AGENT_STORE_URL``, else ``[store]
url`` of config.toml. The data directory is still where the key file lives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .paths import DATA_DIR_ENV, choose_data_dir, data_dir, store_path
from .store.url import STORE_URL_ENV, url_problem


class StoreUrlError(ValueError):
    """A store URL named on the command line or in the environment is wrong."""


@dataclass(frozen=True)
class DataDir:
    path: Path
    #: which rule chose it (``paths.choose_data_dir``)
    source: str
    #: the PostgreSQL store's URL (None: the SQLite file in ``path``), and what named it
    store_url: str | None = None
    store_url_source: str | None = None
    #: the file holding the PostgreSQL password ([store] password_file)
    password_file: str | None = None

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
           config_path: str | os.PathLike[str] | None = None, config=None,
           store_url: str | None = None) -> DataDir:
    """The data directory by the rules of ``paths.py``. The configuration file (``config``,
    else the one ``config.load_config(config_path)`` finds) is read unless the
    command line or the environment decides both the directory (``explicit``, ``--data-dir``,
    or ``TOKEN_AGENT_DATA_DIR``) and the store's URL; ``ConfigError``
    when it is wrong or cannot be read. The store's URL: ``store_url`` (``--store-url``), else
    ``TOKEN_AGENT_STORE_URL``, else ``[store] url`` (``StoreUrlError`` when the one named is
    not a password-free postgresql:// URL). Creates nothing."""
    env = os.environ if environ is None else environ
    configured = source = None

    def cfg():
        nonlocal config
        if config is None:
            from .config import load_config

            config = load_config(config_path, env)
        return config

    if (explicit is None or str(explicit) == "") and not env.get(DATA_DIR_ENV):
        configured, source = cfg().store.data_dir, cfg().source
    path, why = choose_data_dir(explicit, env, configured=configured, config_source=source)
    url, url_source = store_url or None, "--store-url"
    if url is None and env.get(STORE_URL_ENV):
        url, url_source = env[STORE_URL_ENV], STORE_URL_ENV
    if url is not None:
        if problem := url_problem(url):
            raise StoreUrlError(f"{url_source}: the store's URL {problem}")
    else:
        url, url_source = cfg().store.url, f"[store] url in {cfg().source}"
        if url is None:
            url_source = None
    password_file = cfg().store.password_file if url is not None else None
    return DataDir(path, why, url, url_source, password_file)


def open_store(where: DataDir, *, create: bool, **options):
    """The store of ``where``: with ``create`` (a command that writes) the directory and the
    store are created when missing; without it nothing is created and a missing store is
    ``StoreMissing``, naming the file and why it was looked for there. ``options`` go to
    ``Store.open``."""
    from .store import Store, StoreMissing

    directory = data_dir(where.path, {}, create=create)
    if where.store_url is not None:
        try:
            store = Store.open(where.store_url, create=create, password_file=where.password_file,
                               **options)
        except StoreMissing as e:
            raise StoreMissing(
                f"{e} (named by {where.store_url_source}); nothing was created. A command "
                "that writes creates the schema (e.g. `token-agent users add NAME`), or "
                "`token-agent store migrate --to URL` copies a SQLite store there",
                path=e.path) from None
        store.local_dir = directory  # the CRL cache stays on this machine
        return store
    try:
        return Store.open(store_path(directory), create=create, **options)
    except StoreMissing as e:
        raise StoreMissing(
            f"no token-agent store at {e.path} (looked there {where.why()}); nothing was "
            "created. A command that writes creates it (e.g. `token-agent users add NAME`); "
            "or name the right data directory with --data-dir, TOKEN_AGENT_DATA_DIR or "
            "[store] data_dir in config.toml", path=e.path) from None
