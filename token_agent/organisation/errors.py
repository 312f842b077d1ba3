"""What can go wrong between a workstation and its organisation's server (``client.py``)."""

from __future__ import annotations


class OrganisationError(Exception):
    """Base class; the message is meant for a person."""


class JoinRequired(OrganisationError):
    """This workstation has not joined its organisation (no key or certificate yet)."""


class ServerUnavailable(OrganisationError):
    """No server answered. ``attempts``: ``(server, reason)`` for each one tried."""

    def __init__(self, attempts: list[tuple[str, str]], message: str | None = None) -> None:
        self.attempts = list(attempts)
        tried = "; ".join(f"{server}: {reason}" for server, reason in self.attempts)
        super().__init__(message or (
            "The organisation's server cannot be reached" + (f" ({tried})" if tried else "")
            + ". Check the network, or ask the organisation's administrator whether the "
            "servers are running."))


class ServerRefused(OrganisationError):
    """A server answered with an error: the HTTP ``status``, a stable ``error`` code (e.g.
    ``workstation-revoked``, ``join-token-used``) and its ``message`` for a person."""

    def __init__(self, status: int, error: str, message: str, *, server: str | None = None
                 ) -> None:
        self.status = status
        self.error = error
        self.message = message
        self.server = server
        super().__init__(message)


class ChannelClosed(OrganisationError):
    """A WebSocket channel ended: ``code`` (e.g. 1000 normal, 1012 the server is restarting,
    4403 the workstation is refused) and ``reason`` as the server gave them (None when the
    connection was lost without a close frame)."""

    def __init__(self, message: str, *, code: int | None = None, reason: str | None = None,
                 server: str | None = None) -> None:
        self.code = code
        self.reason = reason
        self.server = server
        super().__init__(message)


class JoinError(OrganisationError):
    """A join that cannot go on: a malformed token, a server whose CA is not the one the
    token names, a certificate that does not fit the key. Nothing was written."""
