"""The token-agent service: one long-running process that owns the devices and the store,
watches the smartcard readers, runs the policy, and serves the API of ``protocol.py`` on a
Unix socket.

    service = Service(load_config(), socket_path=None)   # or the config's socket
    service.start()           # store opened and cleaned up, readers watched, socket listening
    ...                       # (token-agent serve: until SIGTERM / SIGINT)
    service.reload(config)    # (SIGHUP) the policy read again, the rules and timeouts replaced
    service.stop()            # listener closed, ceremonies cancelled, devices and store closed

Threads: one accepting connections per socket (``connections.py``: the public socket and
the login services' own); two per connection (reading and answering requests; writing, from
a bounded queue, so that a client that does not read never stalls whoever sends to it: when
its queue is full it is disconnected); a bounded pool of workers for the ceremonies
(``workers.py``: a ceremony over the limits is refused as ``busy``, never queued); the
PC/SC watcher's. Everything is bounded by ``[service]`` in config.toml: connections
(``max_connections``, ``max_connections_per_user``, ``idle_timeout``) and ceremonies
(``max_ceremonies``, ``max_ceremonies_per_user``, two per connection). The store is one
``Store`` shared by the threads (its calls are serialised and every transaction is short;
nothing waits for a person or a device inside one). The readers, card logins and card-bound
sessions are ``cards.py``'s.

This module keeps the service's life cycle (start, reload, stop), the registry of its
connections and ceremonies, and the dispatch of a request to its handler
(``handlers/``: ``handlers.OPS``, by area). The connections, cards and handlers see the
service as ``host.Host`` and import nothing of this module; its exceptions are
``errors.py``'s (``ServiceStartError``, ``RequestError`` and ``KeyBusy`` are re-exported).

At start: half-done enrolments (methods still unconfirmed after
``config.STALE_ENROLMENT_SECONDS``, left by a crash or an abandoned enrolment) are removed
and recorded (``service.cleanup``); the card-bound sessions kept in the store are bound again
to their card when it is still in its reader (the certificate's serial is read again), and
locked, with the lock command, when it is not.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from .. import __version__
from ..config import STALE_ENROLMENT_SECONDS, Config
from ..datadir import locate
from ..outcome import LoginOutcome, Reason
from .authz import Rules
from .cards import CardWatch
from .ceremony import Ceremony, NamedLocks
from .connections import LOGIN, PUBLIC, Connection, Listener, ListenError, admit
from .errors import CeremonyCancelled, KeyBusy, RequestError, ServiceStartError
from .handlers import OPS
from .handlers.common import agent_user
from .org import LOCAL_OPS, OrgLink, local_op_refusal
from .refusals import Refusals, UnknownLogins
from .storesize import StoreSizeAlarm
from .workers import WorkerPool

__all__ = ["Service", "ServiceStartError", "RequestError", "KeyBusy"]

log = logging.getLogger("token_agent.service")

#: seconds stop() waits for the ceremonies to end after cancelling them
STOP_GRACE = 5.0
#: logins and enrolments running at once on one connection (a PAM conversation needs one)
CEREMONIES_PER_CONNECTION = 2


# --------------------------------------------------------------------------- the service


class Service:
    def __init__(self, config: Config, *, socket_path: str | os.PathLike[str] | None = None,
                 data_dir: str | os.PathLike[str] | None = None,
                 policy_path: str | os.PathLike[str] | None = None,
                 environ: dict[str, str] | None = None, store_url: str | None = None) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.socket_path = config.service.socket_path(self.environ, socket_path)
        # the command line's lookup (token_agent/paths.py): --data-dir, TOKEN_AGENT_DATA_DIR,
        # [store] data_dir, STATE_DIRECTORY, XDG_DATA_HOME, ~/.local/share; the store's URL:
        # --store-url, TOKEN_AGENT_STORE_URL, [store] url (else the SQLite file in data_dir)
        self.where = locate(data_dir, self.environ, config=config, store_url=store_url)
        self.data_dir = self.where.path
        self._policy_override = policy_path  # --policy; else the lookup of policy.py
        self.device_env = config.keys.environ(self.environ)
        from .keys import KeyPool

        self.keys = KeyPool(self.device_env)  # the keys this service owns, kept open
        self.rules = Rules(config.service.login_service_users, config.service.admin_group)
        self.agent = None
        self.user_locks = NamedLocks()
        self.refusals = Refusals(lambda: self.store)
        self.unknown_logins = UnknownLogins(lambda: self.store)
        self.device_locks = NamedLocks()
        self.started_at = time.time()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[int, Connection] = {}
        self._ceremonies: dict[str, Ceremony] = {}
        self._listeners: list[Listener] = []
        self._login_uids = self.rules.login_service_uids()
        cfg = config.service
        # the registry's limits (new_ceremony) keep it below its size; the slack covers a
        # worker still returning from a ceremony that has just ended
        self.workers = WorkerPool(cfg.max_ceremonies + CEREMONIES_PER_CONNECTION,
                                  name="token-agent-worker")
        self.login_socket_path = cfg.login_socket_path(self.socket_path)
        self.cards = CardWatch(self)  # the readers, card logins, card-bound sessions
        self.device = None
        self.org = None  # OrgLink: [organisation] servers run the logins (service/org.py)

    # ------------------------------------------------------------------ start / stop

    @property
    def store(self):
        return self.agent.store

    def start(self) -> "Service":
        from ..agent import Agent
        from ..ceremonies.login import Device
        from ..policy import resolve_policy

        ws = self.config.workstation
        cfg = self.config.service
        self.device = Device(ws.device, ws.effective_device_id(), ws.network)
        self._listeners = [Listener(self, self.socket_path, kind=PUBLIC, mode=cfg.socket_mode)]
        if self.login_socket_path is not None:
            group = cfg.login_socket_group
            self._listeners.append(Listener(self, self.login_socket_path, kind=LOGIN,
                                            mode=0o660 if group else 0o600, group=group))
        try:
            for listener in self._listeners:  # another service on it: stop before the store
                listener.check()
            self.agent = Agent.open(where=self.where, environ=self.environ, policy=resolve_policy(
                self._policy_override, self.environ, configured=self.config.policy.file,
                strict=True))  # strict: filetrust.py
            self.org = OrgLink.open(self.config, self.data_dir)
        except ListenError as e:
            raise ServiceStartError(str(e)) from None
        except Exception as e:
            raise ServiceStartError(str(e)) from e
        self.store.event_gate = self.unknown_logins.gate  # counted: refusals.py
        if self.store.path is not None:  # a file (PostgreSQL's disk is its server's to watch)
            alarm = StoreSizeAlarm(self.store.path, self.config.store.size_warning_mb)
            self.store.after_event = alarm.check
            alarm.check()
        try:
            self._cleanup()
            self.cards.start()
            for listener in self._listeners:
                listener.open()
            for listener in self._listeners:
                listener.start()
        except BaseException as e:
            self.stop()
            if isinstance(e, ListenError):
                raise ServiceStartError(str(e)) from None
            raise
        log.info("token-agent service listening", extra={
            "socket": str(self.socket_path),
            "login_socket": str(self.login_socket_path) if self.login_socket_path else None,
            "store": self.store.location,
            "policy": self.agent.policy.source or "built-in", "version": __version__,
            "pid": os.getpid()})
        return self

    def healthy(self) -> str | None:
        """None when the service serves; else what is wrong (an accept loop dead or stuck),
        for the main loop, which then exits so that it is restarted, and for the watchdog,
        which then stops its pings."""
        if self.stopping.is_set():
            return None
        for listener in self._listeners:
            if not listener.healthy():
                return f"the accept loop of {listener.path} is not running"
        return None

    def stop(self) -> None:
        """Close the listeners, cancel the ceremonies, stop watching, close the store. Safe
        from any state: before or during start, twice, from a signal's loop; each step's
        failure is logged and the next step still runs."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("token-agent service stopping")
        for step in (self._close_listeners, self._end_ceremonies, self._close_connections,
                     self.cards.stop, self.keys.close, self._close_store):
            try:
                step()
            except Exception:  # noqa: BLE001: stopping goes on whatever a step did
                log.exception("while stopping (%s)", getattr(step, "__name__", step))
        log.info("token-agent service stopped")

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()

    def _end_ceremonies(self) -> None:
        with self._lock:
            ceremonies = list(self._ceremonies.values())
        for c in ceremonies:
            if c.abandon("shutdown"):
                self.record_cancel(c, "shutdown")
        deadline = time.monotonic() + STOP_GRACE
        for c in ceremonies:
            c.done.wait(max(0.0, deadline - time.monotonic()))
        self.workers.shutdown(timeout=max(0.1, deadline - time.monotonic()))

    def _close_connections(self) -> None:
        with self._lock:
            connections = list(self._connections.values())
        for conn in connections:
            conn.close(flush=1.0)  # the results of the cancelled ceremonies go out first

    def _close_store(self) -> None:
        if self.org is not None:
            self.org.close()
        if self.agent is not None:
            self.refusals.close()
            self.unknown_logins.close()
            self.agent.close()

    def reload(self, config: Config) -> list[str]:
        """Apply a new configuration (SIGHUP) without a restart: the policy file is read
        again, and the login services, admin group, prompt and idle timeouts, connection
        and per-user limits, workstation and logging take effect for what starts from now
        on. The sockets, the worker pool's size, the store, the keys and the cards need a
        restart: returns the tables whose change was not applied. A policy that does not
        load leaves everything as it was (PolicyError)."""
        from ..policy import resolve_policy

        policy = resolve_policy(self._policy_override, self.environ,
                                configured=config.policy.file, strict=True)
        ws = config.workstation
        self.device = type(self.device)(ws.device, ws.effective_device_id(), ws.network)
        self.rules = Rules(config.service.login_service_users, config.service.admin_group)
        self._login_uids = self.rules.login_service_uids()
        agent = self.agent
        agent.policy, agent._factors, agent._delivery_loaded = policy, None, False
        old = self.config
        fixed = ("socket", "socket_mode", "login_socket", "login_socket_group", "max_ceremonies")
        pending = [f"service.{k}" for k in fixed
                   if getattr(old.service, k) != getattr(config.service, k)]
        pending += [name for name, before, after in (
            ("store", old.store, config.store), ("keys", old.keys, config.keys),
            ("cards", old.cards, config.cards)) if before != after]
        from dataclasses import replace

        self.config = replace(config, service=replace(config.service, **{
                                  k: getattr(old.service, k) for k in fixed}),
                              store=old.store, keys=old.keys, cards=old.cards)
        log.info("configuration and policy reloaded", extra={
            "policy": policy.source or "built-in", "needs_restart": pending})
        return pending

    # ------------------------------------------------------------------ connections

    def admit(self, conn: Connection) -> bool:
        """The accept loops' admission (``connections.admit``): True and the connection is
        registered; an idle connection may be closed to make room for it."""
        cfg = self.config.service
        with self._lock:
            ok, evict = admit(list(self._connections.values()), conn.peer.uid,
                              listener=conn.listener, login_uids=self._login_uids,
                              limit=cfg.max_connections, per_user=cfg.max_connections_per_user)
            if ok:
                self._connections[conn.id] = conn
        if evict is not None:
            log.warning("connection closed to make room for another user's", extra={
                "conn": evict.id, "peer_uid": evict.peer.uid, "for_uid": conn.peer.uid})
            evict.close_soon("unavailable",
                             "connection closed: another user needed room (connect again)")
        return ok

    def connection_closed(self, conn: Connection) -> None:
        with self._lock:
            self._connections.pop(conn.id, None)
            mine = list(conn.ceremonies.values())
        for c in mine:
            if not c.done.is_set() and c.abandon("disconnect"):
                log.info("client went away mid-ceremony: cancelled",
                         extra={"login": c.id, "conn": conn.id, "op": c.op})
                self.record_cancel(c, "disconnect")

    # ------------------------------------------------------------------ requests

    def dispatch(self, conn: Connection, op: str, args: dict) -> dict:
        handler = OPS.get(op)
        if handler is None:
            raise RequestError("bad-request", f"unknown op {op!r}")
        if self.org is not None and op in LOCAL_OPS:
            raise RequestError("forbidden", local_op_refusal(self.org.servers))
        if self.stopping.is_set():
            raise RequestError("unavailable", "the service is stopping")
        log.debug("request", extra={"conn": conn.id, "op": op, "peer_uid": conn.peer.uid})
        return handler(self, conn, args)

    # ------------------------------------------------------------------ ceremonies

    def new_ceremony(self, conn: Connection, kind: str, op: str, user: str | None) -> Ceremony:
        """Register a ceremony, within the limits: ``CEREMONIES_PER_CONNECTION`` on one
        connection; for callers who are not root or a login service,
        ``max_ceremonies_per_user`` per uid and, all of them together, ``max_ceremonies``
        less the quarter kept for root and the login services. Over a limit: ``busy``."""
        cfg = self.config.service
        c = Ceremony(conn, kind, op, user, prompt_timeout=cfg.prompt_timeout)
        c.on_timeout = lambda cause: self.record_cancel(c, cause)
        is_login_service = self.rules.is_login_service
        privileged = is_login_service(conn.peer)
        with self._lock:
            if conn.closed.is_set():
                raise RequestError("unavailable", "the connection is closing")
            if len(conn.ceremonies) >= CEREMONIES_PER_CONNECTION:
                raise RequestError("busy", f"{CEREMONIES_PER_CONNECTION} logins or enrolments "
                                           "are already running on this connection: wait for "
                                           "their results")
            if not privileged:
                running = [x for x in self._ceremonies.values()
                           if not is_login_service(x.conn.peer)]
                if sum(1 for x in running if x.conn.peer.uid == conn.peer.uid) \
                        >= cfg.max_ceremonies_per_user:
                    raise RequestError("busy", f"you have {cfg.max_ceremonies_per_user} logins "
                                               "or enrolments running already: finish or "
                                               "cancel one first")
                if len(running) >= max(1, cfg.max_ceremonies - cfg.max_ceremonies // 4):
                    raise RequestError("busy", "the service is running as many logins as it "
                                               "may for local users: try again in a moment")
            self._ceremonies[c.id] = c
            conn.ceremonies[c.id] = c
        return c

    def launch(self, c: Ceremony, run: Callable[..., None], *args: Any) -> None:
        """Run a registered ceremony on the worker pool, or unregister it and say busy."""
        if self.workers.submit(run, c, *args):
            return
        with self._lock:
            self._ceremonies.pop(c.id, None)
            c.conn.ceremonies.pop(c.id, None)
        c.done.set()
        log.warning("no worker free for a ceremony: refused", extra={
            "op": c.op, "peer_uid": c.conn.peer.uid})
        raise RequestError("busy", "the service is busy: try again in a moment")

    def find_ceremony(self, conn: Connection, login_id: str, *, any_if_admin: bool) -> Ceremony:
        with self._lock:
            c = conn.ceremonies.get(login_id)
            other = self._ceremonies.get(login_id) if c is None and any_if_admin else None
        if other is not None and self.rules.is_admin(conn.peer, self.store):
            c = other
        if c is None or c.done.is_set():
            raise RequestError("not-found", f"no login {login_id!r} in progress on this "
                                            "connection")
        return c

    def record_cancel(self, c: Ceremony, cause: str, by: Connection | None = None) -> None:
        peer = (by or c.conn).peer
        try:
            self.store.record_event("service.cancel", username=c.user, outcome="cancelled",
                                    detail={"op": c.op, "login": c.id, "cause": cause,
                                            "peer_uid": peer.uid})
        except Exception as e:
            log.error("cannot record a cancellation: %s", e)

    def unexpected(self, c: Ceremony, e: Exception, method: str) -> LoginOutcome:
        """The outcome of a ceremony that raised: cancelled when it was cancelled (whatever
        the cancel broke on its way out), else the agent's own failure (logged, recorded)."""
        if c.cancel.is_set() or isinstance(e, CeremonyCancelled):
            log.info("ceremony ended by its cancellation", extra={
                "login": c.id, "cause": c.cancel_cause, "error": type(e).__name__})
            reason, message = Reason.CANCELLED, "cancelled"
        else:
            log.exception("the %s failed unexpectedly", c.kind, extra={"login": c.id})
            reason = Reason.INTERNAL_ERROR
            message = f"the {c.kind} failed unexpectedly: see the service's log"
        try:
            user = agent_user(self, c.user) if c.user else None
            self.store.record_event(c.op.replace(".start", ""), user_id=user.id if user else None,
                                    username=None if user else c.user, outcome="failure",
                                    detail={"reason": reason.value, "via": "service"})
        except Exception as err:
            log.error("cannot record the failure: %s", err)
        return LoginOutcome.failure(method, reason, message, user=c.user)

    def finish(self, c: Ceremony, outcome: dict, *, ok: bool, user: str | None,
               method: str | None, reason: str | None, started: float) -> None:
        with self._lock:  # over for hello's count and for login.answer before its result
            self._ceremonies.pop(c.id, None)
            c.conn.ceremonies.pop(c.id, None)
        try:
            c.send({"event": "result", "outcome": outcome})
            elapsed = round((time.perf_counter() - started) * 1000, 1)
            what = {"login": "login finished", "enrol": "enrolment finished"}.get(
                c.kind, f"{c.kind} finished")
            log.info(what, extra={"login": c.id, "op": c.op, "user": user, "ok": ok,
                                  "method": method, "reason": reason, "ms": elapsed,
                                  "cancelled": c.cancel_cause})
            self.broadcast({"event": "login.finished", "login": c.id, "user": user, "ok": ok,
                            "method": method, "at": time.time()}, admins_only=True)
        finally:
            c.done.set()

    # ------------------------------------------------------------------ events

    def counts(self) -> tuple[int, int, int]:
        """The connections, ceremonies and event subscribers, for hello."""
        with self._lock:
            return (len(self._connections), len(self._ceremonies),
                    sum(1 for c in self._connections.values() if c.subscribed))

    def broadcast(self, event: dict, *, admins_only: bool = False) -> None:
        with self._lock:
            targets = [c for c in self._connections.values()
                       if c.subscribed and (c.subscribed_admin or not admins_only)]
        for conn in targets:
            conn.send(event)

    # ------------------------------------------------------------------ cleanup at start

    def _cleanup(self) -> None:
        """Remove half-done enrolments (unconfirmed methods older than
        ``STALE_ENROLMENT_SECONDS``) and record each (``service.cleanup``)."""
        store = self.store
        cutoff = time.time() - STALE_ENROLMENT_SECONDS
        removed = 0
        for user in store.list_users():
            for m in store.list_methods(user.id):
                if m.confirmed or m.created_at >= cutoff:
                    continue
                with store.transaction():
                    store.remove_method(m.id)
                    store.record_event("service.cleanup", user_id=user.id, outcome="removed",
                                       detail={"kind": m.kind, "name": m.name,
                                               "age_seconds": round(time.time() - m.created_at),
                                               "why": "enrolment never confirmed"})
                removed += 1
        if removed:
            log.info("removed half-done enrolments", extra={"removed": removed})
