"""``WebSocket /v1/ceremony``: a login or a key enrolment run by this replica for a joined
workstation (``organisation/remote.py``; the messages: ``organisation/protocol.py``).

The workstation is the one of the client certificate (``auth.require_workstation``); the
ceremony runs in a worker thread of its own pool (:data:`CEREMONY_THREADS`: a ceremony waits
for a person for minutes, and must not hold the threads that answer other requests), talking
through the WebSocket with :class:`_SocketChannel`. The final message is sent, then the
socket is closed normally. A workstation that leaves, or goes silent past the ceremony's
timeouts, ends it as cancelled.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..organisation import protocol
from ..organisation.protocol import ProtocolError
from . import auth

log = logging.getLogger("token_agent.orgserver")

#: ceremonies one replica runs at once (each a thread, most of its time waiting)
CEREMONY_THREADS = 256
#: seconds the workstation has to send its first message
FIRST_MESSAGE_TIMEOUT = 10.0
_limiter: anyio.CapacityLimiter | None = None


def _ceremony_limiter() -> anyio.CapacityLimiter:
    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(CEREMONY_THREADS)
    return _limiter


class ChannelGone(Exception):
    """The workstation closed the WebSocket (or it broke)."""


async def _receive(websocket: WebSocket, timeout: float | None) -> dict:
    try:
        with anyio.fail_after(timeout) if timeout is not None else _no_timeout():
            message = await websocket.receive()
    except TimeoutError:
        raise
    if message["type"] == "websocket.disconnect":
        raise ChannelGone(f"closed ({message.get('code')})")
    text = message.get("text")
    if text is None:
        text = message.get("bytes") or b""
    return protocol.decode(text)


class _no_timeout:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _SocketChannel:
    """The ceremony's synchronous channel (``remote.Conversation``) over the WebSocket, used
    from the ceremony's worker thread."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.gone = False

    def send(self, message: dict) -> None:
        if self.gone:
            raise ChannelGone("closed")
        try:
            anyio.from_thread.run(self.websocket.send_text, protocol.encode(message))
        except Exception as e:  # noqa: BLE001 (a closed or broken socket)
            self.gone = True
            raise ChannelGone(type(e).__name__) from None

    def recv(self, timeout: float | None = None) -> dict:
        if self.gone:
            raise ChannelGone("closed")
        try:
            return anyio.from_thread.run(_receive, self.websocket, timeout)
        except (TimeoutError, ProtocolError):
            raise
        except Exception as e:  # noqa: BLE001
            self.gone = True
            raise ChannelGone(type(e).__name__) from None


async def ceremony(websocket: WebSocket) -> None:
    from ..organisation.remote import Timeouts, run_ceremony

    ctx = websocket.app.state.ctx
    try:
        workstation = auth.require_workstation(websocket.scope)
    except auth.WorkstationRefused as e:  # the middleware answers these before; never twice
        await websocket.accept()
        await websocket.close(code=auth.WS_REFUSED, reason=e.error)
        return
    await websocket.accept()
    peer = websocket.client.host if websocket.client else None
    try:
        first: Any = await _receive(websocket, FIRST_MESSAGE_TIMEOUT)
    except TimeoutError:
        await _finish(websocket, protocol.final_error(
            "protocol", f"no first message within {FIRST_MESSAGE_TIMEOUT:g} s"))
        return
    except ProtocolError as e:
        await _finish(websocket, protocol.final_error("protocol", e.message))
        return
    except (ChannelGone, WebSocketDisconnect):
        return
    keys = getattr(ctx.config, "keys", None)
    service = getattr(ctx.config, "service", None)
    timeouts = Timeouts(prompt=float(getattr(service, "prompt_timeout", 120.0) or 120.0),
                        device=float(getattr(keys, "timeout", 30.0) or 30.0))
    channel = _SocketChannel(websocket)
    log.info("ceremony started", extra={"workstation": workstation.name, "peer": peer,
                                        "op": first.get("op") if isinstance(first, dict)
                                        else None})
    final = await anyio.to_thread.run_sync(
        partial(run_ceremony, ctx.agent, channel, first, workstation.name, peer,
                timeouts=timeouts), limiter=_ceremony_limiter())
    if not channel.gone:
        await _finish(websocket, final)


async def _finish(websocket: WebSocket, final: dict) -> None:
    try:
        await websocket.send_text(protocol.encode(final))
        await websocket.close(code=1000)
    except Exception:  # noqa: BLE001 (the workstation left already)
        pass


ROUTES = [WebSocketRoute("/v1/ceremony", ceremony)]
