"""The sessions of the logins: the row a successful login writes (bound to its card when it
used one) and ``session.state``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import agent_user, check_args, refuse

if TYPE_CHECKING:
    from ..connections import Connection
    from ..host import Host


def session_row(svc: Host, sid: str, user_id: str, method: str, device, card_used: list) -> None:
    """Record the session of a successful login (inside its transaction); one that used
    a card is bound to it (reader, ATR, certificate serial)."""
    card = svc.cards.card_of(card_used)
    if card is None:
        svc.store.add_session(sid, user_id, method=method, device_id=device.device_id)
        return
    card_outcome, reader, atr = card
    svc.store.add_session(sid, user_id, method=method, device_id=device.device_id,
                          card_reader=reader, card_atr=atr.hex(),
                          card_serial=card_outcome.credential_id)


def session_json(s) -> dict:
    card = None
    if s.card_reader is not None:
        card = {"reader": s.card_reader, "atr": s.card_atr,
                "certificate_serial": s.card_serial}
    return {"id": s.id, "user": s.username, "method": s.method, "created_at": s.created_at,
            "state": s.state, "end_reason": s.end_reason, "device_id": s.device_id,
            "card": card}


def op_session_state(svc: Host, conn: Connection, args: dict) -> dict:
    a = check_args(args, {"user": (str, False)})
    peer = conn.peer
    username = a["user"]
    privileged = svc.rules.is_login_service(peer) or svc.rules.is_admin(peer, svc.store)
    if not privileged:
        if username is None:
            username = peer.user
        if username is None or not svc.rules.is_self(peer, username):
            raise refuse(svc, conn, "session.state", username,
                         "you may only see your own sessions")
    if username is None:
        sessions = svc.store.list_sessions()
    else:
        user = agent_user(svc, username)
        sessions = [] if user is None else svc.store.list_sessions(user.id)
    return {"sessions": [session_json(s) for s in sessions[-500:]]}
