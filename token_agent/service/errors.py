"""The service's exceptions, below everything that raises or catches them (the connections,
the handlers, the service itself): ``server.py`` re-exports the public ones."""

from __future__ import annotations

from drivers.fido.errors import FidoKeyError

from . import protocol


class ServiceStartError(Exception):
    """The service cannot start (socket in use, store unusable, ...): the message says why."""


class RequestError(Exception):
    """A request answered with an error (``protocol.ERROR_CODES``)."""

    def __init__(self, code: str, message: str) -> None:
        assert code in protocol.ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


class CeremonyCancelled(Exception):
    """A ceremony found cancelled at its commit: nothing of it is written."""


class KeyBusy(FidoKeyError):
    """Every key is in use by other ceremonies (for longer than the touch timeout)."""

    code = "key_busy"
    default_message = ("The security key is in use by another login: finish that one, or try "
                       "again in a moment.")
