"""The agent's parts held together: the store, the secret keys, the policy, the delivery
gateways and a clock. The CLI opens one per command; the service (later) one per process.

    agent = Agent.open(data_dir=None, policy_path=None)
    ctx = agent.factors()          # what token_agent.factors' functions take
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .factors import FactorContext
from .policy import Policy, resolve_policy
from .secretbox import SecretKeys
from .store import Store



@dataclass
class Agent:
    store: Store
    keys: SecretKeys
    policy: Policy
    data_dir: Path
    clock: Callable[[], float] = time.time
    _delivery: object = field(default=None, repr=False)
    _delivery_loaded: bool = field(default=False, repr=False)
    _factors: FactorContext | None = field(default=None, repr=False)

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str] | None = None, *,
             policy_path: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None, store: Store | None = None,
             policy: Policy | None = None, clock: Callable[[], float] = time.time,
             where=None) -> "Agent":
        """Open the store (or use ``store``), the data directory's key file, and the policy
        (``policy``, else ``policy_path``, else the default policy file, else the built-in
        defaults). The data directory and the store are ``where`` (a ``datadir.DataDir``:
        the SQLite file in it, or its PostgreSQL URL), else ``data_dir``, else
        ``store.local_dir`` (its file's directory), else found as the command line and the
        service find them (``datadir.locate``); the directory is created when missing. Raises
        ``StoreError``, ``SecretError``, ``PolicyError``, ``ConfigError``."""
        from .datadir import locate, open_store
        from .paths import data_dir as resolve_dir

        env = os.environ if environ is None else environ
        if where is None and (data_dir is not None or store is None or store.local_dir is None):
            where = locate(data_dir, env)  # a PostgreSQL store: this machine's directory
        directory = resolve_dir(where.path, env) if where is not None else store.local_dir
        pol = policy if policy is not None else resolve_policy(policy_path, env)
        keys = SecretKeys.load_or_create(directory, dict(env))
        if store is None:
            store = open_store(where, create=True)
        return cls(store=store, keys=keys, policy=pol, data_dir=directory, clock=clock)

    def now(self) -> float:
        return float(self.clock())

    @property
    def delivery(self):
        """The delivery gateways of the policy's ``[delivery]`` table (None when it has none);
        built on first use (``DeliveryConfigError`` when the table is wrong)."""
        if not self._delivery_loaded:
            from .delivery import Delivery, parse_delivery_config

            table = self.policy.delivery
            self._delivery = Delivery(parse_delivery_config(table)) if table else None
            self._delivery_loaded = True
        return self._delivery

    @property
    def issuer(self) -> str:
        """The organisation's name, in authenticator apps and messages (setting rp_name)."""
        from . import orgsettings

        return orgsettings.in_force(self.store.list_settings(), ("rp_name",))["rp_name"]

    def factors(self) -> FactorContext:
        if self._factors is None:
            p = self.policy
            self._factors = FactorContext(
                store=self.store, keys=self.keys,
                lockout=p.lockout, codes=p.codes,
                delivery=self.delivery, issuer=self.issuer, clock=self.clock)
        return self._factors

    def close(self) -> None:
        self.store.close()
