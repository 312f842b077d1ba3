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

At start: half-done enrolments (methods still unconfirmed after
``config.STALE_ENROLMENT_SECONDS``, left by a crash or an abandoned enrolment) are removed
and recorded (``service.cleanup``); the card-bound sessions kept in the store are bound again
to their card when it is still in its reader (the certificate's serial is read again), and
locked, with the lock command, when it is not.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable

from drivers.fido.errors import FidoKeyError

from .. import __version__
from ..ceremonies.choices import parse_second
from ..config import STALE_ENROLMENT_SECONDS, Config
from ..datadir import locate
from ..outcome import LoginOutcome, Reason
from ..usernames import RULE, is_username
from . import protocol
from .authz import Rules
from .cards import CardWatch
from .ceremony import Ceremony, NamedLocks, SocketInteraction, once
from .connections import LOGIN, PUBLIC, Connection, Listener, ListenError, admit
from .refusals import Refusals, UnknownLogins
from .storesize import StoreSizeAlarm
from .workers import WorkerPool

log = logging.getLogger("token_agent.service")

#: seconds stop() waits for the ceremonies to end after cancelling them
STOP_GRACE = 5.0
#: logins and enrolments running at once on one connection (a PAM conversation needs one)
CEREMONIES_PER_CONNECTION = 2
#: the CLI's method names (``methods prefer|remove KIND``) -> store kinds
METHOD_KINDS = {"password": "password", "key": "fido2", "card": "smartcard", "totp": "totp",
                "email": "email", "sms": "sms", "voice": "voice", "messaging": "messaging",
                "push": "push", "app-password": "app_password", "backup": "backup_codes"}


class ServiceStartError(Exception):
    """The service cannot start (socket in use, store unusable, ...): the message says why."""


class RequestError(Exception):
    """A request answered with an error (``protocol.ERROR_CODES``)."""

    def __init__(self, code: str, message: str) -> None:
        assert code in protocol.ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


class _Cancelled(Exception):
    """A ceremony found cancelled at its commit: nothing of it is written."""


class KeyBusy(FidoKeyError):
    """Every key is in use by other ceremonies (for longer than the touch timeout)."""

    code = "key_busy"
    default_message = ("The security key is in use by another login: finish that one, or try "
                       "again in a moment.")


# --------------------------------------------------------------------------- the service


class Service:
    def __init__(self, config: Config, *, socket_path: str | os.PathLike[str] | None = None,
                 data_dir: str | os.PathLike[str] | None = None,
                 policy_path: str | os.PathLike[str] | None = None,
                 environ: dict[str, str] | None = None) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.socket_path = config.service.socket_path(self.environ, socket_path)
        # the command line's lookup (token_agent/paths.py): --data-dir, TOKEN_AGENT_DATA_DIR,
        # [store] data_dir, STATE_DIRECTORY, XDG_DATA_HOME, ~/.local/share
        self.data_dir = locate(data_dir, self.environ, config=config).path
        self._policy_override = policy_path
        self.policy_path = policy_path if policy_path is not None else config.policy.file
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
        # the registry's limits (_new_ceremony) keep it below its size; the slack covers a
        # worker still returning from a ceremony that has just ended
        self.workers = WorkerPool(cfg.max_ceremonies + CEREMONIES_PER_CONNECTION,
                                  name="token-agent-worker")
        self.login_socket_path = cfg.login_socket_path(self.socket_path)
        self.cards = CardWatch(self)  # the readers, card logins, card-bound sessions
        self._device = None
        self._ops: dict[str, Callable[[Connection, dict], dict]] = {
            "hello": self.op_hello,
            "login.start": self.op_login_start,
            "login.answer": self.op_login_answer,
            "login.cancel": self.op_login_cancel,
            "session.state": self.op_session_state,
            "methods.list": self.op_methods_list,
            "methods.prefer": self.op_methods_prefer,
            "methods.remove": self.op_methods_remove,
            "enrol.totp": self.op_enrol_totp,
            "enrol.totp.confirm": self.op_enrol_totp_confirm,
            "enrol.backup-codes": self.op_enrol_backup_codes,
            "enrol.key": self.op_enrol_key,
            "policy.explain": self.op_policy_explain,
            "admin.unlock": self.op_admin_unlock,
            "admin.reset-methods": self.op_admin_reset_methods,
            "events.subscribe": self.op_events_subscribe,
        }

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
        self._device = Device(ws.device, ws.effective_device_id(), ws.network)
        self._listeners = [Listener(self, self.socket_path, kind=PUBLIC, mode=cfg.socket_mode)]
        if self.login_socket_path is not None:
            group = cfg.login_socket_group
            self._listeners.append(Listener(self, self.login_socket_path, kind=LOGIN,
                                            mode=0o660 if group else 0o600, group=group))
        try:
            for listener in self._listeners:  # another service on it: stop before the store
                listener.check()
            self.agent = Agent.open(self.data_dir, environ=self.environ, policy=resolve_policy(
                self.policy_path, self.environ, strict=True))  # strict: filetrust.py
        except ListenError as e:
            raise ServiceStartError(str(e)) from None
        except Exception as e:
            raise ServiceStartError(str(e)) from e
        alarm = StoreSizeAlarm(self.store.path, self.config.store.size_warning_mb)
        self.store.after_event = alarm.check
        self.store.event_gate = self.unknown_logins.gate  # counted: refusals.py
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
            "store": str(self.store.path),
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
                self._record_cancel(c, "shutdown")
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

        policy = resolve_policy(self._policy_override or config.policy.file, self.environ,
                                strict=True)
        ws = config.workstation
        self._device = type(self._device)(ws.device, ws.effective_device_id(), ws.network)
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

    def _connection_closed(self, conn: Connection) -> None:
        with self._lock:
            self._connections.pop(conn.id, None)
            mine = list(conn.ceremonies.values())
        for c in mine:
            if not c.done.is_set() and c.abandon("disconnect"):
                log.info("client went away mid-ceremony: cancelled",
                         extra={"login": c.id, "conn": conn.id, "op": c.op})
                self._record_cancel(c, "disconnect")

    # ------------------------------------------------------------------ requests

    def dispatch(self, conn: Connection, op: str, args: dict) -> dict:
        handler = self._ops.get(op)
        if handler is None:
            raise RequestError("bad-request", f"unknown op {op!r}")
        if self.stopping.is_set():
            raise RequestError("unavailable", "the service is stopping")
        log.debug("request", extra={"conn": conn.id, "op": op, "peer_uid": conn.peer.uid})
        return handler(conn, args)

    @staticmethod
    def _args(args: dict, spec: dict[str, tuple[type | tuple, bool]]) -> dict:
        """Check the arguments: ``spec`` name -> (types, required). Unknown, missing or
        wrongly typed arguments, and a ``user`` that is not a user name
        (``token_agent.usernames``), are a bad-request naming them (never their values)."""
        unknown = sorted(set(args) - set(spec))
        if unknown:
            raise RequestError("bad-request", f"unknown argument(s): {', '.join(unknown)}")
        out = {}
        for name, (types, required) in spec.items():
            if name not in args or args[name] is None:
                if required:
                    raise RequestError("bad-request", f"missing argument {name!r}")
                out[name] = None
                continue
            value = args[name]
            if isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                        else (types,)):
                raise RequestError("bad-request", f"argument {name!r} has the wrong type")
            if not isinstance(value, types):
                raise RequestError("bad-request", f"argument {name!r} has the wrong type")
            if name == "user" and not is_username(value):  # never audited, logged or echoed
                raise RequestError("bad-request", f"argument 'user' is not a user name ({RULE})")
            out[name] = value
        return out

    def _refuse(self, conn: Connection, op: str, target: str | None, why: str,
                code: str = "forbidden", **detail) -> RequestError:
        """Record a refusal (audit ``service.refused``, a log line; repeats are counted:
        ``refusals.py``) and return the error (``code``: forbidden, reauth-required)."""
        self.refusals.refused(conn.peer, op, target, **detail)
        return RequestError(code, why)

    def _agent_user(self, username: str):
        from ..store import UnknownUser

        try:
            return self.store.get_user(username)
        except UnknownUser:
            return None

    def _user_op(self, conn: Connection, op: str, username: str):
        """Authorise an op on ``username``'s methods: admins for anyone, a user for their own
        agent user (which must exist). Returns the user."""
        peer = conn.peer
        if self.rules.is_admin(peer, self.store):
            user = self._agent_user(username)
            if user is None:
                raise RequestError("not-found", f"no user {username!r}")
            return user
        user = self._agent_user(username) if self.rules.is_self(peer, username) else None
        if user is None or user.username != peer.user:
            raise self._refuse(conn, op, username,
                               f"{peer.user or f'uid {peer.uid}'} may not do {op} for {username}")
        return user

    def _binding_op(self, conn: Connection, op: str, username: str):
        """``_user_op`` for an op that adds, replaces or removes a method: a caller who is
        not an admin needs a recent login of that user on this connection, at the level
        the policy requires (``token_agent/reauth.py``), unless it is the user's first
        method."""
        from ..reauth import ReauthRequired, check

        user = self._user_op(conn, op, username)
        if self.rules.is_admin(conn.peer, self.store):
            return user
        try:
            check(self.agent, user, conn.authenticated)
        except ReauthRequired as e:
            raise self._refuse(conn, op, user.username, e.message, "reauth-required",
                               reauth=e.why) from None
        return user

    def _admin_op(self, conn: Connection, op: str, username: str | None):
        if not self.rules.is_admin(conn.peer, self.store):
            raise self._refuse(conn, op, username, f"{op} is for administrators only")
        if username is None:
            return None
        user = self._agent_user(username)
        if user is None:
            raise RequestError("not-found", f"no user {username!r}")
        return user

    def _actor(self, conn: Connection) -> str:
        return conn.peer.user or f"uid {conn.peer.uid}"

    # ------------------------------------------------------------------ ops

    def op_hello(self, conn: Connection, args: dict) -> dict:
        self._args(args, {})
        peer = conn.peer
        with self._lock:
            connections, ceremonies = len(self._connections), len(self._ceremonies)
            subscribers = sum(1 for c in self._connections.values() if c.subscribed)
        counts: dict[str, int] = {"active": 0, "locked": 0, "ended": 0}
        for s in self.store.list_sessions():
            counts[s.state] = counts.get(s.state, 0) + 1
        return {"version": protocol.VERSION, "agent": __version__,
                "peer": {"uid": peer.uid, "pid": peer.pid, "user": peer.user,
                         "roles": self.rules.roles(peer, self.store)},
                "service": {"pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 3),
                            "connections": connections, "ceremonies": ceremonies,
                            "threads": threading.active_count(),
                            "subscribers": subscribers,
                            "sessions": counts, "readers": self.cards.readers(),
                            "watching_readers": self.cards.watcher is not None}}

    # -- logins --------------------------------------------------------------------------------

    def _device_of(self, conn: Connection, spec: dict | None):
        from ..ceremonies.login import Device

        if spec is None:
            return self._device
        if not isinstance(spec, dict):
            raise RequestError("bad-request", "argument 'device' must be an object")
        d = self._args(spec, {"kind": (str, False), "device_id": (str, False),
                              "network": (str, False)})
        kind = d["kind"] or self._device.kind
        if kind not in ("managed", "unmanaged"):
            raise RequestError("bad-request", "device.kind must be managed or unmanaged")
        if d["network"] is not None:
            try:
                ipaddress.ip_address(d["network"].split("%", 1)[0])
            except ValueError:
                raise RequestError("bad-request", "device.network must be an IP address") \
                    from None
        return Device(kind, d["device_id"] or self._device.device_id,
                      d["network"] if d["network"] is not None else self._device.network)

    def op_login_start(self, conn: Connection, args: dict) -> dict:
        a = self._args(args, {"user": (str, False), "primary": (str, False),
                              "second": (str, False), "device": (dict, False),
                              "service": (str, False), "step_up": (bool, False)})
        peer = conn.peer
        if a["primary"] is not None and a["primary"] not in ("password", "key", "card"):
            raise RequestError("bad-request", "primary must be password, key or card")
        if a["second"] is not None:
            try:
                parse_second(a["second"])
            except ValueError as e:
                raise RequestError("bad-request", f"second: {e}") from None
        privileged = self.rules.is_login_service(peer) or self.rules.is_admin(peer, self.store)
        user = a["user"]
        if user is None and not privileged:
            user = peer.user  # a user's own screen locker: themselves
            if user is None:
                raise self._refuse(conn, "login.start", None, "no user name for this uid")
        if user is not None and not privileged and not self.rules.is_self(peer, user):
            raise self._refuse(conn, "login.start", user,
                               f"{peer.user or f'uid {peer.uid}'} may only log in as themselves")
        if a["device"] is not None and not privileged:
            # a user's own screen locker: the workstation's device, whatever it says
            log.info("device of an ordinary caller's login ignored",
                     extra={"peer_uid": peer.uid, "user": user})
            a["device"] = None
        if user is None and a["primary"] == "password":
            raise RequestError("bad-request", "a password login needs a user")
        device = self._device_of(conn, a["device"])
        c = self._new_ceremony(conn, "login", "login.start", user)
        self._launch(c, self._run_login, a, device)
        log.info("login started", extra={"login": c.id, "user": user, "primary": a["primary"],
                                         "peer_uid": peer.uid, "service": a["service"]})
        return {"login": c.id}

    def _new_ceremony(self, conn: Connection, kind: str, op: str, user: str | None) -> Ceremony:
        """Register a ceremony, within the limits: ``CEREMONIES_PER_CONNECTION`` on one
        connection; for callers who are not root or a login service,
        ``max_ceremonies_per_user`` per uid and, all of them together, ``max_ceremonies``
        less the quarter kept for root and the login services. Over a limit: ``busy``."""
        cfg = self.config.service
        c = Ceremony(conn, kind, op, user, prompt_timeout=cfg.prompt_timeout)
        c.on_timeout = lambda cause: self._record_cancel(c, cause)
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

    def _launch(self, c: Ceremony, run: Callable[..., None], *args: Any) -> None:
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

    def _find_ceremony(self, conn: Connection, login_id: str, *, any_if_admin: bool) -> Ceremony:
        with self._lock:
            c = conn.ceremonies.get(login_id)
            other = self._ceremonies.get(login_id) if c is None and any_if_admin else None
        if other is not None and self.rules.is_admin(conn.peer, self.store):
            c = other
        if c is None or c.done.is_set():
            raise RequestError("not-found", f"no login {login_id!r} in progress on this "
                                            "connection")
        return c

    def op_login_answer(self, conn: Connection, args: dict) -> dict:
        a = self._args(args, {"login": (str, True), "prompt": (int, True),
                              "value": (str, False)})
        c = self._find_ceremony(conn, a["login"], any_if_admin=False)
        if not c.answer(a["prompt"], a["value"]):  # the value is never logged
            raise RequestError("not-found", f"prompt {a['prompt']} of login {a['login']} is not "
                                            "waiting for an answer")
        return {}

    def op_login_cancel(self, conn: Connection, args: dict) -> dict:
        a = self._args(args, {"login": (str, True)})
        c = self._find_ceremony(conn, a["login"], any_if_admin=True)
        if c.abandon("login.cancel"):
            log.info("login cancelled", extra={"login": c.id, "peer_uid": conn.peer.uid})
            self._record_cancel(c, "login.cancel", by=conn)
        return {}

    def _record_cancel(self, c: Ceremony, cause: str, by: Connection | None = None) -> None:
        peer = (by or c.conn).peer
        try:
            self.store.record_event("service.cancel", username=c.user, outcome="cancelled",
                                    detail={"op": c.op, "login": c.id, "cause": cause,
                                            "peer_uid": peer.uid})
        except Exception as e:
            log.error("cannot record a cancellation: %s", e)

    def _key_runner(self, c: Ceremony, ui: SocketInteraction) -> Callable[[str | None], LoginOutcome]:
        from ..ceremonies.devices import make_key_login

        timeout = self.config.keys.timeout
        asked: dict[str, str | None] = {"user": None}
        runner = make_key_login(self.store, pin_provider=ui.key_pin, on_touch=ui.touch,
                                timeout=timeout, cancel=c.cancel,
                                open_key=lambda: self._open_key(c, ui, timeout,
                                                                username=asked["user"]),
                                presence=self._pin_guard(c, ui, timeout))

        def run(name: str | None) -> LoginOutcome:
            asked["user"] = name
            with c.unlocked():
                return runner(name)

        return run

    def _pin_guard(self, c: Ceremony, ui: SocketInteraction, timeout: float):
        """Who must touch the key before its PIN is tried in this ceremony
        (``ceremonies/keypresence.py``): a caller other than the login service (a user's own
        screen locker, ``enrol.key``) always, the login service when few tries are left."""
        from ..ceremonies.keypresence import PinGuard

        return PinGuard(trusted=self.rules.is_login_service(c.conn.peer), on_touch=ui.touch,
                        timeout=timeout, cancel=c.cancel)

    def _open_key(self, c: Ceremony, ui: SocketInteraction, timeout: float, *,
                  username: str | None = None):
        """The key for this ceremony from the service's key pool (``service/keys.py``), its
        device lock held until the ceremony ends: for a user with keys enrolled, the key
        holding one of the user's credentials (waiting while it serves another ceremony);
        else the only free key, or the one the person touches."""
        from drivers.fido.errors import Cancelled

        from .keys import Busy

        ids, rp_id = self._credentials_of(username) if username is not None else ([], None)
        try:
            return self.keys.acquire(rp_id=rp_id, credential_ids=ids, timeout=timeout,
                                     cancel=c.cancel, on_touch=ui.touch)
        except Busy:
            if c.cancel.is_set():
                raise Cancelled() from None
            raise KeyBusy() from None

    def _credentials_of(self, username: str) -> tuple[list[bytes], str]:
        from ..ceremonies.key import KeySettings

        user = self._agent_user(username)
        rp_id = KeySettings.from_store(self.store).rp_id
        if user is None:
            return [], rp_id
        return [cr.credential_id for cr in self.store.list_fido_credentials(user.id)
                if cr.rp_id == rp_id], rp_id

    def _run_login(self, c: Ceremony, a: dict, device) -> None:
        from ..ceremonies.login import login, shown_before_first_factor

        started = time.perf_counter()
        ui = SocketInteraction(c)
        card_used: list = []
        outcome: LoginOutcome | None = None
        session_id = uuid.uuid4().hex

        def record_session(user, method: str) -> None:
            # inside the transaction of the login's success: both are written, or neither
            if c.cancel.is_set():  # the client left (or a cancel came) before the success
                raise _Cancelled()
            self._session_row(session_id, user.id, method, device, card_used)

        try:
            key_runner = self._key_runner(c, ui)
            card_runner = self.cards.runner(c, ui, card_used)
            username = c.user
            primary = a["primary"]
            if username is None:
                first = card_runner(None) if primary == "card" else key_runner(None)
                if not first.ok:
                    outcome = shown_before_first_factor(first)  # no factor yet: no details
                else:
                    username = c.user = first.user
                    primary = "card" if primary == "card" else "key"
                    if primary == "card":
                        card_runner = once(first, card_runner)
                    else:
                        key_runner = once(first, key_runner)
            if outcome is None:
                with c.user_locked(self.user_locks.get(username)):
                    outcome = login(self.agent, username, interaction=ui, device=device,
                                    primary=primary, second=a["second"], key_login=key_runner,
                                    card_login=card_runner, cancel=c.cancel,
                                    on_success=record_session, step_up=bool(a["step_up"]))
        except Exception as e:
            outcome = self._unexpected(c, e, "login")
        if outcome.ok:
            from ..reauth import Authenticated

            c.conn.authenticated = Authenticated.of(outcome)  # before its result goes out
            try:
                self.cards.bind_session(session_id, outcome, card_used)
            except Exception:
                log.exception("cannot bind the session to its card", extra={"login": c.id})
        self._finish(c, outcome.to_json() | ({"session": session_id} if outcome.ok else {}),
                     ok=outcome.ok, user=outcome.user or c.user, method=outcome.method,
                     reason=outcome.reason.value if outcome.reason else None, started=started)

    def _unexpected(self, c: Ceremony, e: Exception, method: str) -> LoginOutcome:
        """The outcome of a ceremony that raised: cancelled when it was cancelled (whatever
        the cancel broke on its way out), else the agent's own failure (logged, recorded)."""
        if c.cancel.is_set() or isinstance(e, _Cancelled):
            log.info("ceremony ended by its cancellation", extra={
                "login": c.id, "cause": c.cancel_cause, "error": type(e).__name__})
            reason, message = Reason.CANCELLED, "cancelled"
        else:
            log.exception("the %s failed unexpectedly", c.kind, extra={"login": c.id})
            reason = Reason.INTERNAL_ERROR
            message = f"the {c.kind} failed unexpectedly: see the service's log"
        try:
            user = self._agent_user(c.user) if c.user else None
            self.store.record_event(c.op.replace(".start", ""), user_id=user.id if user else None,
                                    username=None if user else c.user, outcome="failure",
                                    detail={"reason": reason.value, "via": "service"})
        except Exception as err:
            log.error("cannot record the failure: %s", err)
        return LoginOutcome.failure(method, reason, message, user=c.user)

    def _finish(self, c: Ceremony, outcome: dict, *, ok: bool, user: str | None,
                method: str | None, reason: str | None, started: float) -> None:
        with self._lock:  # over for hello's count and for login.answer before its result
            self._ceremonies.pop(c.id, None)
            c.conn.ceremonies.pop(c.id, None)
        try:
            c.send({"event": "result", "outcome": outcome})
            elapsed = round((time.perf_counter() - started) * 1000, 1)
            log.info("login finished" if c.kind == "login" else "enrolment finished",
                     extra={"login": c.id, "op": c.op, "user": user, "ok": ok,
                            "method": method, "reason": reason, "ms": elapsed,
                            "cancelled": c.cancel_cause})
            self.broadcast({"event": "login.finished", "login": c.id, "user": user, "ok": ok,
                            "method": method, "at": time.time()}, admins_only=True)
        finally:
            c.done.set()

    # -- sessions ------------------------------------------------------------------------------

    def _session_row(self, sid: str, user_id: str, method: str, device, card_used: list) -> None:
        """Record the session of a successful login (inside its transaction); one that used
        a card is bound to it (reader, ATR, certificate serial)."""
        card = self.cards.card_of(card_used)
        if card is None:
            self.store.add_session(sid, user_id, method=method, device_id=device.device_id)
            return
        card_outcome, reader, atr = card
        self.store.add_session(sid, user_id, method=method, device_id=device.device_id,
                               card_reader=reader, card_atr=atr.hex(),
                               card_serial=card_outcome.credential_id)

    @staticmethod
    def _session_json(s) -> dict:
        card = None
        if s.card_reader is not None:
            card = {"reader": s.card_reader, "atr": s.card_atr,
                    "certificate_serial": s.card_serial}
        return {"id": s.id, "user": s.username, "method": s.method, "created_at": s.created_at,
                "state": s.state, "end_reason": s.end_reason, "device_id": s.device_id,
                "card": card}

    def op_session_state(self, conn: Connection, args: dict) -> dict:
        a = self._args(args, {"user": (str, False)})
        peer = conn.peer
        username = a["user"]
        privileged = self.rules.is_login_service(peer) or self.rules.is_admin(peer, self.store)
        if not privileged:
            if username is None:
                username = peer.user
            if username is None or not self.rules.is_self(peer, username):
                raise self._refuse(conn, "session.state", username,
                                   "you may only see your own sessions")
        if username is None:
            sessions = self.store.list_sessions()
        else:
            user = self._agent_user(username)
            sessions = [] if user is None else self.store.list_sessions(user.id)
        return {"sessions": [self._session_json(s) for s in sessions[-500:]]}

    # -- methods and enrolment -----------------------------------------------------------------

    def op_methods_list(self, conn: Connection, args: dict) -> dict:
        from ..factors import LABELS, POLICY_NAMES, lockout

        a = self._args(args, {"user": (str, True)})
        user = self._user_op(conn, "methods.list", a["user"])
        with self.user_locks.holding(user.username):
            locks = {s.scope: s for s in lockout.user_locks(self.store, user.id)}
            methods = []
            for m in self.store.list_methods(user.id):  # as `token-agent methods list --json`
                lock = locks.get(f"method:{m.id}")
                methods.append({
                    "id": m.id, "kind": POLICY_NAMES.get(m.kind, m.kind),
                    "label": LABELS.get(m.kind, m.kind), "name": m.name,
                    "preferred": m.preferred, "confirmed": m.confirmed,
                    "created_at": m.created_at, "last_used_at": m.last_used_at,
                    "flagged": m.flagged, "flag_reason": m.flag_reason,
                    "locked_until": lock.locked_until if lock else None,
                    "failures": lock.failures if lock else 0})
        return {"methods": methods}

    def _method_of(self, user, kind: str, name: str | None):
        if kind not in METHOD_KINDS:
            raise RequestError("bad-request", f"kind must be one of {', '.join(METHOD_KINDS)}")
        method = self.store.find_method(user.id, METHOD_KINDS[kind], name)
        if method is None:
            raise RequestError("not-found", f"{user.username} has no {kind} method"
                               + (f" named {name!r}" if name else ""))
        return method

    def op_methods_prefer(self, conn: Connection, args: dict) -> dict:
        from ..store import InvalidValue

        a = self._args(args, {"user": (str, True), "kind": (str, True), "name": (str, False)})
        user = self._binding_op(conn, "methods.prefer", a["user"])
        with self.user_locks.holding(user.username):
            method = self._method_of(user, a["kind"], a["name"])
            try:
                with self.store.transaction():
                    self.store.set_preferred_method(user.id, method.id)
                    self.store.record_event("method.preferred", user_id=user.id,
                                            outcome="success",
                                            detail={"kind": method.kind, "name": method.name,
                                                    "actor": self._actor(conn)})
            except InvalidValue as e:
                raise RequestError("conflict", str(e)) from None
        return {}

    def op_methods_remove(self, conn: Connection, args: dict) -> dict:
        a = self._args(args, {"user": (str, True), "kind": (str, True), "name": (str, False)})
        user = self._binding_op(conn, "methods.remove", a["user"])
        with self.user_locks.holding(user.username):
            method = self._method_of(user, a["kind"], a["name"])
            with self.store.transaction():
                self.store.remove_method(method.id)
                self.store.record_event("method.removed", user_id=user.id, outcome="success",
                                        detail={"kind": method.kind, "name": method.name,
                                                "actor": self._actor(conn)})
        return {}

    def op_enrol_totp(self, conn: Connection, args: dict) -> dict:
        from ..factors import FactorError, totp
        from ..store import CredentialExists

        a = self._args(args, {"user": (str, True), "name": (str, False)})
        user = self._binding_op(conn, "enrol.totp", a["user"])
        with self.user_locks.holding(user.username):
            try:
                pending = totp.begin_enrol(self.agent.factors(), user.id,
                                           **({"name": a["name"]} if a["name"] else {}))
            except CredentialExists as e:
                raise RequestError("conflict", str(e)) from None
            except FactorError as e:
                raise RequestError("bad-request", e.message) from None
        # the secret goes to the client only; never to a log
        return {"uri": pending.uri, "secret": pending.secret, "text": totp.qr_terminal(pending.uri),
                "method": pending.method.name}

    def op_enrol_totp_confirm(self, conn: Connection, args: dict) -> dict:
        from ..factors import FactorError, totp

        a = self._args(args, {"user": (str, True), "code": (str, True), "name": (str, False)})
        user = self._binding_op(conn, "enrol.totp.confirm", a["user"])
        with self.user_locks.holding(user.username):
            try:
                result = totp.confirm_enrol(self.agent.factors(), user.id, a["code"],
                                            name=a["name"])
            except FactorError as e:
                raise RequestError("not-found", e.message) from None
        return {"ok": result.ok, "message": result.message,
                "reason": result.reason.value if result.reason else None}

    def op_enrol_backup_codes(self, conn: Connection, args: dict) -> dict:
        from ..factors import backup

        a = self._args(args, {"user": (str, True)})
        user = self._binding_op(conn, "enrol.backup-codes", a["user"])
        with self.user_locks.holding(user.username), self.store.transaction():
            _method, codes = backup.generate(self.agent.factors(), user.id)
            if conn.client_gone():  # nobody to show them to: the old codes stay
                raise RequestError("unavailable", "the client left before it got its codes: "
                                                  "nothing was changed")
        return {"codes": codes}

    def op_enrol_key(self, conn: Connection, args: dict) -> dict:
        a = self._args(args, {"user": (str, True), "name": (str, False)})
        user = self._binding_op(conn, "enrol.key", a["user"])
        c = self._new_ceremony(conn, "enrol", "enrol.key", user.username)
        self._launch(c, self._run_enrol_key, a["name"])
        log.info("key enrolment started", extra={"login": c.id, "user": user.username,
                                                 "peer_uid": conn.peer.uid})
        return {"login": c.id}

    def _run_enrol_key(self, c: Ceremony, name: str | None) -> None:
        from drivers.fido.errors import FidoKeyError

        from ..ceremonies.key import EnrolError, device_failure, enrol_key
        from ..store import CredentialExists

        started = time.perf_counter()
        ui = SocketInteraction(c)
        timeout = self.config.keys.timeout
        outcome: dict[str, Any]
        reason = None
        try:
            with c.user_locked(self.user_locks.get(c.user)):
                with c.unlocked():
                    held = self._open_key(c, ui, timeout)
                with held as key:
                    with c.unlocked():  # the key's wait for a touch holds no user lock
                        result = enrol_key(self.store, key, c.user, name=name,
                                           pin_provider=ui.key_pin, on_touch=ui.touch,
                                           timeout=timeout, cancel=c.cancel,
                                           presence=self._pin_guard(c, ui, timeout))
            outcome = {"ok": True, "method": "key", "reason": None, "message": "enrolled",
                       **result.to_json()}
        except EnrolError as e:
            reason = e.reason
            outcome = {"ok": False, "method": "key", "reason": e.reason, "message": e.message}
        except CredentialExists as e:
            reason = "conflict"
            outcome = {"ok": False, "method": "key", "reason": reason, "message": str(e)}
        except FidoKeyError as e:  # a cancel may break the key's exchange on its way out
            reason = (Reason.CANCELLED if c.cancel.is_set() else device_failure(e)).value
            outcome = {"ok": False, "method": "key", "reason": reason,
                       "message": "cancelled" if c.cancel.is_set() else e.message}
        except Exception as e:
            failed = self._unexpected(c, e, "key")  # recorded there
            reason, outcome = "recorded", {"ok": False, "method": "key",
                                           "reason": failed.reason.value,
                                           "message": failed.message}
        if not outcome["ok"] and reason not in ("verification-failed", "recorded"):
            try:
                user = self._agent_user(c.user)
                self.store.record_event("enrol.key", user_id=user.id if user else None,
                                        username=None if user else c.user, outcome="failure",
                                        detail={"reason": reason, "via": "service"})
            except Exception as e:
                log.error("cannot record the failed enrolment: %s", e)
        self._finish(c, outcome, ok=outcome["ok"], user=c.user, method="key",
                     reason=outcome["reason"], started=started)

    # -- policy and administration -------------------------------------------------------------

    def op_policy_explain(self, conn: Connection, args: dict) -> dict:
        from ..ceremonies.login import _choose_primary, explain_for
        from ..policy import explain

        a = self._args(args, {"user": (str, True), "device": (dict, False)})
        peer = conn.peer
        if self.rules.is_login_service(peer) and not self.rules.is_admin(peer, self.store):
            user = self._agent_user(a["user"])
            if user is None:
                raise RequestError("not-found", f"no user {a['user']!r}")
        else:
            user = self._user_op(conn, "policy.explain", a["user"])
        device = self._device_of(conn, a["device"])
        with self.user_locks.holding(user.username):
            first = _choose_primary(self.agent, user, None) or "password"
            decision = explain_for(self.agent, user.username, device=device, primary=first,
                                   primary_multi_factor=first in ("key", "card"))
        return {**decision.to_json(), "text": explain(decision), "user": user.username,
                "primary": first, "device": device.to_json()}

    def op_admin_unlock(self, conn: Connection, args: dict) -> dict:
        from ..factors import KINDS, lockout

        a = self._args(args, {"user": (str, True), "kind": (str, False)})
        user = self._admin_op(conn, "admin.unlock", a["user"])
        with self.user_locks.holding(user.username):
            scopes = None
            if a["kind"]:
                store_kind = KINDS.get(a["kind"], a["kind"].replace("-", "_"))
                if store_kind == "password":
                    scopes = {lockout.password_scope(user.id)}
                elif store_kind == "app_password":
                    scopes = {f"app_password:{user.id}"}
                else:
                    scopes = {lockout.method_scope(m.id)
                              for m in self.store.list_methods(user.id, store_kind)}
            with self.store.transaction():
                cleared = [s for scope in (scopes or [None])
                           for s in lockout.unlock(self.store, user.id, scope)]
                self.store.record_event("admin.unlock", user_id=user.id, outcome="success",
                                        detail={"actor": self._actor(conn),
                                                "scopes": [s.scope for s in cleared]})
        return {"cleared": [s.to_json() for s in cleared]}

    def op_admin_reset_methods(self, conn: Connection, args: dict) -> dict:
        a = self._args(args, {"user": (str, True)})
        user = self._admin_op(conn, "admin.reset-methods", a["user"])
        with self.user_locks.holding(user.username):
            with self.store.transaction():
                removed = self.store.remove_all_methods(user.id)
                self.store.record_event("admin.reset-methods", user_id=user.id,
                                        outcome="success",
                                        detail={"actor": self._actor(conn), "removed": len(removed),
                                                "kinds": sorted({m.kind for m in removed})})
        return {"removed": len(removed)}

    # -- events --------------------------------------------------------------------------------

    def op_events_subscribe(self, conn: Connection, args: dict) -> dict:
        self._args(args, {})
        conn.subscribed_admin = self.rules.is_admin(conn.peer, self.store)
        conn.subscribed = True
        return {}

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
