"""``card.self-unlock``: the cardholder's self-service unlock of the locked card in a reader,
as a ceremony of its own (prompts and a result, as ``enrol.key``). The same unlock is offered
inside a card login (``service/selfunlock.py``); both run the library's
``ceremonies.cardunlock.self_unlock`` holding the reader's lock."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING

from ...outcome import Reason
from ..ceremony import SocketInteraction
from ..errors import RequestError
from ..selfunlock import ra_source
from .common import check_args, refuse
from .login import _key_runner

if TYPE_CHECKING:
    from ..ceremony import Ceremony
    from ..connections import Connection
    from ..host import Host

log = logging.getLogger("token_agent.service")

NOT_SET_UP = ("the self-service card unlock is not set up here (no RA credentials source): "
              "ask your sponsor to unlock your card")


def op_card_self_unlock(svc: Host, conn: Connection, args: dict) -> dict:
    """Root, the login services and admins: for the card of any user (``user`` null: whoever
    holds the card in the reader). Anyone else: only for their own card (``user`` null or
    their own name), checked against the card's holder before anything is asked."""
    a = check_args(args, {"user": (str, False)})
    peer = conn.peer
    privileged = svc.rules.is_login_service(peer) or svc.rules.is_admin(peer, svc.store)
    user = a["user"]
    if not privileged:
        if user is None:
            user = peer.user
            if user is None:
                raise refuse(svc, conn, "card.self-unlock", None, "no user name for this uid")
        elif not svc.rules.is_self(peer, user):
            raise refuse(svc, conn, "card.self-unlock", user,
                         f"{peer.user or f'uid {peer.uid}'} may only unlock their own card")
    # a joined workstation: the organisation's server runs it, with its RA source
    if getattr(svc, "org", None) is None and ra_source(svc) is None:
        raise RequestError("unavailable", NOT_SET_UP)
    c = svc.new_ceremony(conn, "unlock", "card.self-unlock", user)
    svc.launch(c, partial(_run_self_unlock, svc), user)
    log.info("card self-unlock started", extra={"login": c.id, "user": user,
                                                "peer_uid": peer.uid})
    return {"login": c.id}


def _run_self_unlock(svc: Host, c: Ceremony, user: str | None) -> None:
    from drivers.pcsc import errors as card_errors

    from ...ceremonies.card import CardActionOutcome, device_failure
    from ..cards import ReaderWaitCancelled
    from ..selfunlock import run_self_unlock

    started = time.perf_counter()
    ui = SocketInteraction(c)

    def failed(reason: Reason, message: str) -> CardActionOutcome:
        return CardActionOutcome(ok=False, action="self-unlock", reason=reason, message=message)

    try:
        if getattr(svc, "org", None) is not None:
            from ..org import run_self_unlock as run_at_server

            data = run_at_server(svc, c, ui, user)
            data["method"] = "card"
            svc.finish(c, data, ok=bool(data.get("ok")), user=user, method="card",
                       reason=data.get("reason"), started=started)
            return
        ra = ra_source(svc)
        if ra is None:  # set up when the op came, gone since
            result = failed(Reason.INTERNAL_ERROR, NOT_SET_UP)
        else:
            try:
                with svc.cards.reader_held(c) as (reader, _atr):
                    result = run_self_unlock(svc, c, ui, reader, ra=ra, expect_user=user,
                                             key_login=_key_runner(svc, c, ui))
            except ReaderWaitCancelled:
                result = failed(Reason.CANCELLED, "cancelled")
            except card_errors.PcscError as e:
                result = failed(device_failure(e), e.message)
    except Exception as e:
        outcome = svc.unexpected(c, e, "card")
        result = failed(outcome.reason or Reason.INTERNAL_ERROR, outcome.message)
    data = result.to_json()
    data["method"] = "card"
    svc.finish(c, data, ok=result.ok, user=user, method="card",
               reason=result.reason.value if result.reason else None, started=started)
