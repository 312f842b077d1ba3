"""The client certificate, handed to the ASGI app: uvicorn (0.55) verifies it in the TLS
handshake but does not pass it on, so these protocol subclasses (``Config(http=..., ws=...)``
take a class) wrap the app, per connection, to put the ASGI TLS extension in the scope:
``scope["extensions"]["tls"] = {"client_cert_chain": [PEM of the peer's certificate],
"tls_version": 0x0304, ...}``. Python's ``ssl`` gives the peer's own certificate only, so
the chain holds that one certificate; an empty list when the client sent none."""

from __future__ import annotations

import ssl
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def tls_extension(transport: Any) -> dict[str, Any] | None:
    """The ASGI TLS extension's fields for a connection, or None when it is not TLS."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    der = sslobj.getpeercert(binary_form=True)
    cipher = sslobj.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _VERSIONS.get(sslobj.version() or ""),
        "cipher_suite": None,
        "cipher_name": cipher[0] if cipher else None,
    }


def with_tls(app: Any, transport: Any) -> Any:
    """``app`` with the connection's TLS extension added to each scope."""
    tls = tls_extension(transport)
    if tls is None:
        return app

    async def tls_app(scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": dict(tls)}
        await app(scope, receive, send)

    return tls_app


class TLSH11Protocol(H11Protocol):
    """uvicorn's h11 HTTP protocol, with the TLS extension."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = with_tls(self.app, transport)


class TLSWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol (made by the HTTP protocol on an upgrade, on the same
    TLS transport), with the TLS extension."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = with_tls(self.app, transport)
