"""What can go wrong with a smartcard through a PKCS#11 module, as exceptions for people.

The failures a card itself can have (wrong PIN, blocked PIN, removed card...) are the PC/SC
driver's own classes (:mod:`drivers.pcsc.errors`), so that the ceremonies treat a card the
same whichever path asked it. What only a PKCS#11 module can get wrong is added here, as
subclasses of :class:`~drivers.pcsc.errors.PcscError`:

* :class:`Pkcs11ModuleError`: the module is missing, is not a PKCS#11 module, or its
  C_Initialize failed; the message names the module and what to install or configure;
* :class:`NoToken`: the reader holds a card but the module shows no token for it (the card
  needs its vendor's PKCS#11 module);
* :class:`UnblockNotSupported`: the module can unblock no PIN (no SO login, no unlogged
  C_SetPIN): the card vendor's tool is needed.

:func:`translate` turns what python-pkcs11 raises into these.
"""

from __future__ import annotations

from drivers.pcsc.errors import (
    CardError,
    CardRemoved,
    InvalidPin,
    NoCard,
    NoReader,
    ObjectNotFound,
    PcscError,
    PinBlocked,
    PukBlocked,
    SecurityStatusNotSatisfied,
    WrongPin,
    WrongPuk,
)

__all__ = [
    "CardError",
    "CardRemoved",
    "InvalidPin",
    "NoCard",
    "NoReader",
    "NoToken",
    "ObjectNotFound",
    "PcscError",
    "PinBlocked",
    "PukBlocked",
    "Pkcs11ModuleError",
    "SecurityStatusNotSatisfied",
    "UnblockNotSupported",
    "WrongPin",
    "WrongPuk",
    "translate",
]

CONFIG_HINT = "set [cards] pkcs11_module to the card vendor's PKCS#11 module"


class Pkcs11ModuleError(PcscError):
    """The PKCS#11 module cannot be used (missing, not a PKCS#11 module, C_Initialize failed)."""

    code = "pkcs11_module"

    def __init__(self, module: str, problem: str) -> None:
        self.module = module
        super().__init__(f"The smartcard module {module} cannot be used: {problem}. Install "
                         f"OpenSC's module (sudo apt-get install opensc-pkcs11) or {CONFIG_HINT}.")

    def to_json(self) -> dict:
        return {**super().to_json(), "module": self.module}


class NoToken(PcscError):
    """The reader holds a card, but the module shows no token for it."""

    code = "no_token"

    def __init__(self, module: str, reader: str | None) -> None:
        self.module = module
        self.reader = reader
        where = f" in {reader}" if reader else ""
        super().__init__(f"The smartcard module {module} does not recognise the card{where}: "
                         f"the card may need its vendor's PKCS#11 module ({CONFIG_HINT}).")

    def to_json(self) -> dict:
        return {**super().to_json(), "module": self.module, "reader": self.reader}


class UnblockNotSupported(PcscError):
    """The module cannot unblock the PIN (no SO login and no unlogged C_SetPIN)."""

    code = "unblock_not_supported"

    def __init__(self, module: str, *, locked: bool = True) -> None:
        self.module = module
        state = "" if locked else " while the PIN is not locked"
        super().__init__(f"The smartcard module {module} cannot unblock this card's PIN{state} "
                         "(it offers no security-officer login): the card vendor's unlock tool "
                         "is needed.")

    def to_json(self) -> dict:
        return {**super().to_json(), "module": self.module}


def translate(exc: BaseException, *, what: str = "PIN") -> PcscError:
    """The :class:`PcscError` for an exception of python-pkcs11 (``what``: the secret a
    PIN-type failure is about). A :class:`PcscError` is returned as it is."""
    if isinstance(exc, PcscError):
        return exc
    from pkcs11 import exceptions as E  # noqa: N812

    if isinstance(exc, (E.DeviceRemoved, E.TokenNotPresent, E.SessionHandleInvalid,
                        E.SessionClosed)):  # fmt: skip
        return CardRemoved()
    if isinstance(exc, E.PinLocked):
        return PinBlocked()
    if isinstance(exc, (E.PinLenRange, E.PinInvalid)):
        return InvalidPin(f"The card does not take a {what} of that form (no try was spent).")
    if isinstance(exc, E.UserNotLoggedIn):
        return SecurityStatusNotSatisfied()
    if isinstance(exc, E.SlotIDInvalid):
        return NoReader()
    name = type(exc).__name__
    return PcscError(f"The smartcard operation failed (PKCS#11 {name}). Remove the card, "
                     "insert it again, and retry.")
