"""``hello`` (who the caller is, the service's state) and ``events.subscribe``."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from ... import __version__
from .. import protocol
from .common import check_args

if TYPE_CHECKING:
    from ..connections import Connection
    from ..host import Host


def op_hello(svc: Host, conn: Connection, args: dict) -> dict:
    check_args(args, {})
    peer = conn.peer
    connections, ceremonies, subscribers = svc.counts()
    counts: dict[str, int] = {"active": 0, "locked": 0, "ended": 0}
    for s in svc.store.list_sessions():
        counts[s.state] = counts.get(s.state, 0) + 1
    return {"version": protocol.VERSION, "agent": __version__,
            "peer": {"uid": peer.uid, "pid": peer.pid, "user": peer.user,
                     "roles": svc.rules.roles(peer, svc.store)},
            "service": {"pid": os.getpid(), "uptime_s": round(time.time() - svc.started_at, 3),
                        "connections": connections, "ceremonies": ceremonies,
                        "threads": threading.active_count(),
                        "subscribers": subscribers,
                        "sessions": counts, "readers": svc.cards.readers(),
                        "watching_readers": svc.cards.watcher is not None}}


def op_events_subscribe(svc: Host, conn: Connection, args: dict) -> dict:
    check_args(args, {})
    conn.subscribed_admin = svc.rules.is_admin(conn.peer, svc.store)
    conn.subscribed = True
    return {}
