"""What the parts below the service (connections, cards, request handlers) may use of it:
a :class:`typing.Protocol` that ``server.Service`` satisfies, so that none of them imports
``server.py`` (nothing imports upward)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..config import Config
    from ..outcome import LoginOutcome
    from .authz import Rules
    from .keys import KeyPool
    from .refusals import Refusals

# the modules that use Host are named in strings here, never imported (they import this one)
Connection = Ceremony = Any  # connections.Connection, ceremony.Ceremony


class Host(Protocol):
    config: "Config"
    rules: "Rules"
    agent: Any  # token_agent.agent.Agent, once started
    keys: "KeyPool"
    cards: Any  # cards.CardWatch
    refusals: "Refusals"
    user_locks: Any  # ceremony.NamedLocks
    device_locks: Any
    device: Any  # token_agent.ceremonies.login.Device, the workstation's
    org: Any  # service.org.OrgLink of an organisation's workstation, else None
    stopping: threading.Event
    started_at: float

    @property
    def store(self) -> Any: ...

    # connections (connections.py)
    def admit(self, conn: Connection) -> bool: ...
    def connection_closed(self, conn: Connection) -> None: ...
    def dispatch(self, conn: Connection, op: str, args: dict) -> dict: ...
    def broadcast(self, event: dict, *, admins_only: bool = False) -> None: ...
    def counts(self) -> tuple[int, int, int]: ...

    # ceremonies (the request handlers)
    def new_ceremony(self, conn: Connection, kind: str, op: str,
                     user: str | None) -> Ceremony: ...
    def launch(self, c: Ceremony, run: Callable[..., None], *args: Any) -> None: ...
    def find_ceremony(self, conn: Connection, login_id: str, *,
                      any_if_admin: bool) -> Ceremony: ...
    def record_cancel(self, c: Ceremony, cause: str,
                      by: Connection | None = None) -> None: ...
    def unexpected(self, c: Ceremony, e: Exception, method: str) -> "LoginOutcome": ...
    def finish(self, c: Ceremony, outcome: dict, *, ok: bool, user: str | None,
               method: str | None, reason: str | None, started: float) -> None: ...
