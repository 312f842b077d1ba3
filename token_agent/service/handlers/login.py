"""Logins: ``login.start`` (a ceremony run on the worker pool, its prompts answered by
``login.answer``), ``login.cancel``, and the key and card runners a login uses."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from ...ceremonies.choices import parse_second
from ...ceremonies.login import PRIMARY_METHODS
from ...outcome import LoginOutcome
from ..ceremony import SocketInteraction, pin_guard
from ..errors import CeremonyCancelled, KeyBusy, RequestError
from .common import agent_user, check_args, device_of, refuse
from .sessions import session_row

if TYPE_CHECKING:
    from ..ceremony import Ceremony
    from ..connections import Connection
    from ..host import Host

log = logging.getLogger("token_agent.service")


def op_login_start(svc: Host, conn: Connection, args: dict) -> dict:
    a = check_args(args, {"user": (str, False), "primary": (str, False),
                          "second": (str, False), "device": (dict, False),
                          "service": (str, False), "step_up": (bool, False)})
    peer = conn.peer
    if a["primary"] is not None and a["primary"] not in PRIMARY_METHODS:
        raise RequestError("bad-request", f"primary must be one of {', '.join(PRIMARY_METHODS)}")
    if a["second"] is not None:
        try:
            parse_second(a["second"])
        except ValueError as e:
            raise RequestError("bad-request", f"second: {e}") from None
    privileged = svc.rules.is_login_service(peer) or svc.rules.is_admin(peer, svc.store)
    user = a["user"]
    if user is None and not privileged:
        user = peer.user  # a user's own screen locker: themselves
        if user is None:
            raise refuse(svc, conn, "login.start", None, "no user name for this uid")
    if user is not None and not privileged and not svc.rules.is_self(peer, user):
        raise refuse(svc, conn, "login.start", user,
                     f"{peer.user or f'uid {peer.uid}'} may only log in as themselves")
    if a["device"] is not None and not privileged:
        # a user's own screen locker: the workstation's device, whatever it says
        log.info("device of an ordinary caller's login ignored",
                 extra={"peer_uid": peer.uid, "user": user})
        a["device"] = None
    if user is None and a["primary"] == "password":
        raise RequestError("bad-request", "a password login needs a user")
    device = device_of(svc, conn, a["device"])
    c = svc.new_ceremony(conn, "login", "login.start", user)
    svc.launch(c, partial(_run_login, svc), a, device)
    log.info("login started", extra={"login": c.id, "user": user, "primary": a["primary"],
                                     "peer_uid": peer.uid, "service": a["service"]})
    return {"login": c.id}


def op_login_answer(svc: Host, conn: Connection, args: dict) -> dict:
    a = check_args(args, {"login": (str, True), "prompt": (int, True),
                          "value": (str, False)})
    c = svc.find_ceremony(conn, a["login"], any_if_admin=False)
    if not c.answer(a["prompt"], a["value"]):  # the value is never logged
        raise RequestError("not-found", f"prompt {a['prompt']} of login {a['login']} is not "
                                        "waiting for an answer")
    return {}


def op_login_cancel(svc: Host, conn: Connection, args: dict) -> dict:
    a = check_args(args, {"login": (str, True)})
    c = svc.find_ceremony(conn, a["login"], any_if_admin=True)
    if c.abandon("login.cancel"):
        log.info("login cancelled", extra={"login": c.id, "peer_uid": conn.peer.uid})
        svc.record_cancel(c, "login.cancel", by=conn)
    return {}


def _key_runner(svc: Host, c: Ceremony,
                ui: SocketInteraction) -> Callable[[str | None], LoginOutcome]:
    from ...ceremonies.devices import make_key_login

    timeout = svc.config.keys.timeout
    asked: dict[str, str | None] = {"user": None}
    runner = make_key_login(svc.store, pin_provider=ui.key_pin, on_touch=ui.touch,
                            timeout=timeout, cancel=c.cancel,
                            open_key=lambda: open_key(svc, c, ui, timeout,
                                                      username=asked["user"]),
                            presence=pin_guard(svc, c, ui, timeout))

    def run(name: str | None) -> LoginOutcome:
        asked["user"] = name
        with c.unlocked():
            return runner(name)

    return run


def open_key(svc: Host, c: Ceremony, ui: SocketInteraction, timeout: float, *,
             username: str | None = None):
    """The key for this ceremony from the service's key pool (``service/keys.py``), its
    device lock held until the ceremony ends: for a user with keys enrolled, the key
    holding one of the user's credentials (waiting while it serves another ceremony);
    else the only free key, or the one the person touches."""
    from drivers.fido.errors import Cancelled

    from ..keys import Busy

    ids, rp_id = _credentials_of(svc, username) if username is not None else ([], None)
    try:
        return svc.keys.acquire(rp_id=rp_id, credential_ids=ids, timeout=timeout,
                                cancel=c.cancel, on_touch=ui.touch)
    except Busy:
        if c.cancel.is_set():
            raise Cancelled() from None
        raise KeyBusy() from None


def _credentials_of(svc: Host, username: str) -> tuple[list[bytes], str]:
    from ...ceremonies.key import KeySettings

    user = agent_user(svc, username)
    rp_id = KeySettings.from_store(svc.store).rp_id
    if user is None:
        return [], rp_id
    return [cr.credential_id for cr in svc.store.list_fido_credentials(user.id)
            if cr.rp_id == rp_id], rp_id


def _run_login(svc: Host, c: Ceremony, a: dict, device) -> None:
    started = time.perf_counter()
    ui = SocketInteraction(c)
    card_used: list = []
    outcome: LoginOutcome | None = None
    session_id = uuid.uuid4().hex

    def record_session(user, method: str) -> None:
        # inside the transaction of the login's success: both are written, or neither
        if c.cancel.is_set():  # the client left (or a cancel came) before the success
            raise CeremonyCancelled()
        session_row(svc, session_id, user.id, method, device, card_used)

    try:
        if getattr(svc, "org", None) is not None:  # the organisation's server runs it
            outcome = _org_login(svc, c, a, ui, device, session_id, card_used)
        else:
            outcome = _local_login(svc, c, a, ui, device, card_used, record_session)
    except Exception as e:
        outcome = svc.unexpected(c, e, "login")
    if outcome.ok:
        from ...reauth import Authenticated

        c.conn.authenticated = Authenticated.of(outcome)  # before its result goes out
        try:
            svc.cards.bind_session(session_id, outcome, card_used)
        except Exception:
            log.exception("cannot bind the session to its card", extra={"login": c.id})
    svc.finish(c, outcome.to_json() | ({"session": session_id} if outcome.ok else {}),
               ok=outcome.ok, user=outcome.user or c.user, method=outcome.method,
               reason=outcome.reason.value if outcome.reason else None, started=started)


def _org_login(svc: Host, c: Ceremony, a: dict, ui: SocketInteraction, device,
               session_id: str, card_used: list) -> LoginOutcome:
    """The login run by the organisation's server (``service/org.py``); its session row
    here, naming the organisation's user."""
    from ..org import offer_self_unlock, run_login

    used: list = []

    def login() -> LoginOutcome:
        outcome, found = run_login(svc, c, a, ui)
        used[:] = found
        return outcome

    outcome = offer_self_unlock(svc, c, ui, login(), login)
    if outcome.ok:
        with svc.store.transaction():
            if c.cancel.is_set():  # the client left before the success
                raise CeremonyCancelled()
            user = svc.store.mirror_user(outcome.user_id, outcome.user)
            card_used.extend(used)
            session_row(svc, session_id, user.id, outcome.method, device, card_used)
    return outcome


def _local_login(svc: Host, c: Ceremony, a: dict, ui: SocketInteraction, device,
                 card_used: list, record_session) -> LoginOutcome:
    from ...ceremonies.login import login_or_tap

    key_runner = _key_runner(svc, c, ui)
    card_runner = svc.cards.runner(c, ui, card_used, key_login=key_runner)

    def on_user(name: str):
        c.user = name
        return c.user_locked(svc.user_locks.get(name))

    return login_or_tap(svc.agent, c.user, primary=a["primary"], key_login=key_runner,
                        card_login=card_runner, on_user=on_user, interaction=ui,
                        device=device, second=a["second"], cancel=c.cancel,
                        on_success=record_session, step_up=bool(a["step_up"]))
