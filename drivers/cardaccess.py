"""Opening a smartcard on one of the two card paths, behind one function.

    from drivers.cardaccess import open_card

    with open_card("Virtual PCD 00 00", driver="auto") as card:   # PivSession or Pkcs11CardSession
        card.certificate("9a"); card.verify_pin(pin); card.sign("9a", challenge, algorithm=alg)

* ``"piv"``: PIV spoken directly over PC/SC (:class:`drivers.pcsc.piv.PivSession`);
* ``"pkcs11"``: through a PKCS#11 module (:class:`drivers.pkcs11.Pkcs11CardSession`),
  ``pkcs11_module`` or :data:`DEFAULT_PKCS11_MODULE` (OpenSC's);
* ``"auto"``: PIV when the card answers the PIV SELECT, else (the card refuses it,
  :class:`~drivers.pcsc.errors.NotPivCard`) PKCS#11 on the same reader.

Both sessions have the card-session interface the ceremonies use: ``driver`` ("piv" or
"pkcs11"), ``reader``, ``certificate("9a")``, ``pin_retries()`` (None: unknown),
``verify_pin``, ``sign``, ``unblock_pin``, ``change_pin``, ``close``, context manager.
"""

from __future__ import annotations

from typing import Any

from drivers.pcsc.errors import NoCard, NotPivCard

__all__ = ["DEFAULT_PKCS11_MODULE", "DRIVERS", "open_card"]

DRIVERS = ("piv", "pkcs11", "auto")
DEFAULT_PKCS11_MODULE = "opensc-pkcs11.so"


def _pkcs11(reader: str | None, module: str | None) -> Any:
    from drivers.pkcs11 import Pkcs11CardSession

    return Pkcs11CardSession.open(reader, module=module or DEFAULT_PKCS11_MODULE)


def open_card(reader: str | None = None, *, driver: str = "piv",
              pkcs11_module: str | None = None) -> Any:  # fmt: skip
    """A card session on ``reader`` (None: the one card inserted) by ``driver`` (one of
    :data:`DRIVERS`). Errors are :class:`~drivers.pcsc.errors.PcscError`: ``NoReader``,
    ``NoCard``, ``NotPivCard`` (driver "piv"), ``NoToken`` / ``Pkcs11ModuleError`` (PKCS#11).
    ``ValueError`` for an unknown driver."""
    if driver not in DRIVERS:
        raise ValueError(f"unknown card driver {driver!r} (choose from {', '.join(DRIVERS)})")
    if driver == "pkcs11":
        return _pkcs11(reader, pkcs11_module)
    from drivers.pcsc import piv

    if driver == "piv":
        return piv.open_card(reader)
    # auto
    if reader:
        try:
            return piv.PivSession.open(reader)
        except NotPivCard:
            return _pkcs11(reader, pkcs11_module)
    from drivers.pcsc.readers import list_readers
    from drivers.pcsc.errors import NoReader

    readers = list_readers()
    if not readers:
        raise NoReader()
    not_piv: list[str] = []
    for name in readers:
        try:
            return piv.PivSession.open(name)
        except NoCard:
            continue
        except NotPivCard:
            not_piv.append(name)
    if not not_piv:
        raise NoCard()
    return _pkcs11(not_piv[0] if len(not_piv) == 1 else None, pkcs11_module)
