"""A CTAPHID device that shares its key with other programs, as libfido2 and browsers do.

hidraw delivers every input report of a key to every open handle of it: while a browser, a
key manager or ``token-agent keys info`` talks to the key, this program's handle receives
their answers and keepalives too, on their channels. python-fido2's ``CtapHidDevice`` raises
``ConnectionFailure("Wrong channel")`` at the first such report, and the rest of its own
answer is then left unread (every later call reads stale reports). Here:

* :class:`ChannelFilter` (a connection wrapper) drops every report that is not for the
  channel this handle last wrote on; while allocating a channel (CTAPHID_INIT on the
  broadcast channel) it keeps only the INIT answer that carries its own nonce;
* :class:`SharedHidDevice` re-allocates a channel the key has forgotten (a power cycle, or a
  key that evicts old channels: ERR_INVALID_CHANNEL) and sends the command again, once.
  The key rejected that command before doing anything with it, so sending it again is safe.

No policy here: this is the transport, for every user of :mod:`drivers.fido`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fido2.ctap import STATUS, CtapError
from fido2.hid import CTAPHID, TYPE_INIT, CtapHidDevice
from fido2.hid.base import CtapHidConnection, HidDescriptor

logger = logging.getLogger(__name__)

BROADCAST = b"\xff\xff\xff\xff"
_INIT = TYPE_INIT | CTAPHID.INIT
_NONCE = slice(7, 15)  # an INIT request's or answer's nonce: after CID(4), CMD(1), BCNT(2)


class ChannelFilter(CtapHidConnection):
    """Wraps a connection; :meth:`read_packet` returns only reports for this handle."""

    def __init__(self, inner: CtapHidConnection) -> None:
        self.inner = inner
        self._channel: bytes | None = None
        self._nonce: bytes | None = None
        self._lock = threading.Lock()
        #: reports dropped because they were for another program (for tests and logs)
        self.dropped = 0

    def write_packet(self, data: bytes) -> None:
        with self._lock:
            self._channel = bytes(data[:4])
            if self._channel == BROADCAST and data[4] == _INIT:
                self._nonce = bytes(data[_NONCE])
        self.inner.write_packet(data)

    def read_packet(self) -> bytes:
        while True:
            report = self.inner.read_packet()
            with self._lock:
                channel, nonce = self._channel, self._nonce
            if channel is None or self._ours(report, channel, nonce):
                return report
            self.dropped += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("dropped a report for channel %s (ours: %s)",
                             report[:4].hex(), channel.hex())

    @staticmethod
    def _ours(report: bytes, channel: bytes, nonce: bytes | None) -> bool:
        if report[:4] != channel:
            return False
        if channel != BROADCAST:
            return True
        # another program's channel allocation is answered on the broadcast channel too
        return report[4] == _INIT and report[_NONCE] == nonce

    def close(self) -> None:
        self.inner.close()


class SharedHidDevice(CtapHidDevice):
    """python-fido2's ``CtapHidDevice`` over a :class:`ChannelFilter`, which also gets a new
    channel when the key has forgotten its own (``channel_resets`` counts them)."""

    def __init__(self, descriptor: HidDescriptor, connection: CtapHidConnection) -> None:
        self.channel_resets = 0
        super().__init__(descriptor, ChannelFilter(connection))

    @property
    def connection(self) -> ChannelFilter:
        return self._connection  # type: ignore[return-value]

    def call(
        self,
        cmd: int,
        data: bytes = b"",
        event: threading.Event | None = None,
        on_keepalive: Callable[[STATUS], None] | None = None,
    ) -> bytes:
        try:
            return super().call(cmd, data, event, on_keepalive)
        except CtapError as e:
            if e.code != CtapError.ERR.INVALID_CHANNEL or cmd == CTAPHID.INIT:
                raise
        logger.info("key %s forgot our CTAPHID channel %08x (power cycle?): allocating a new "
                    "one", self.descriptor.path, self._channel_id)
        self._allocate_channel()
        return super().call(cmd, data, event, on_keepalive)

    def _allocate_channel(self) -> None:
        """CTAPHID_INIT on the broadcast channel, as the constructor does."""
        CtapHidDevice.__init__(self, self.descriptor, self._connection)
        self.channel_resets += 1

