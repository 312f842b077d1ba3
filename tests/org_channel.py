"""An in-memory ceremony channel pair (the WebSocket's stand-in for the library tests):
every message goes through JSON both ways, and each side records what it sent."""

from __future__ import annotations

import queue
import threading

from token_agent.organisation import protocol


class ChannelClosed(Exception):
    pass


_CLOSED = object()


class MemChannel:
    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, name: str) -> None:
        self.inbox, self.outbox, self.server = inbox, outbox, name
        self.sent: list[str] = []  # the JSON text of every message sent
        self.closed = False
        #: ``tamper(message) -> text | None``: what actually goes out (None: as it is)
        self.tamper = None
        self.drop_after: int | None = None  # close after sending this many messages

    def send(self, message: dict) -> None:
        if self.closed:
            raise ChannelClosed("closed")
        text = protocol.encode(message)
        if self.tamper is not None:
            text = self.tamper(message) or text
        self.sent.append(text)
        self.outbox.put(text)
        if self.drop_after is not None and len(self.sent) >= self.drop_after:
            self.close()

    def recv(self, timeout: float | None = None) -> dict:
        if self.closed:
            raise ChannelClosed("closed")
        try:
            text = self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError() from None
        if text is _CLOSED:
            self.inbox.put(_CLOSED)
            raise ChannelClosed("the other side closed")
        return protocol.decode(text)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.outbox.put(_CLOSED)


def pair() -> tuple[MemChannel, MemChannel]:
    """(workstation's end, server's end)."""
    a, b = queue.Queue(), queue.Queue()
    return MemChannel(a, b, "mem://server"), MemChannel(b, a, "mem://workstation")


class ServerThread:
    """``remote.run_ceremony`` on a thread for one channel: reads the first message, runs,
    sends the final one (what ``orgserver/ceremony_ws.py`` does over a WebSocket)."""

    def __init__(self, agent, end: MemChannel, workstation="ws1", peer="10.0.0.7",
                 timeouts=None) -> None:
        from token_agent.organisation.remote import run_ceremony

        self.final = None
        self.error = None

        def run():
            try:
                first = end.recv(timeout=10)
                self.final = run_ceremony(agent, end, first, workstation, peer,
                                          timeouts=timeouts)
                try:
                    end.send(self.final)
                except ChannelClosed:
                    pass
            except Exception as e:  # noqa: BLE001
                self.error = e
            finally:
                end.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout=30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server's ceremony did not end"
        if self.error is not None:
            raise self.error
        return self.final
