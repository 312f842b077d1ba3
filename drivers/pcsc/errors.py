"""What can go wrong with a smartcard through PC/SC, as exceptions with messages for people.

Every exception here is a :class:`PcscError`: ``str(e)`` and ``e.message`` are plain sentences
a clinician can act on, ``e.sw`` is the status word the card answered (None when the failure
did not come from the card), ``e.scard_code`` the PC/SC error code (``SCARD_E_...``, None when
it did not come from PC/SC) and ``e.code`` a stable short name for scripts and JSON output.

:func:`translate` turns what pyscard raises (``smartcard.Exceptions.*``, or an ``SCARD_E_...``
result code) into these. This module is part of a driver: it decides no policy, it only says
what happened.
"""

from __future__ import annotations

__all__ = [
    "CardError",
    "CardRemoved",
    "InvalidPin",
    "ManagementKeyRejected",
    "NoCard",
    "NoReader",
    "NotPivCard",
    "ObjectNotFound",
    "PcscError",
    "PcscUnavailable",
    "PinBlocked",
    "PukBlocked",
    "SecurityStatusNotSatisfied",
    "WrongPin",
    "WrongPuk",
    "from_scard_code",
    "translate",
]

# PC/SC result codes (winscard / pcsc-lite), as unsigned 32-bit values
SCARD_E_CANCELLED = 0x80100002
SCARD_E_INVALID_HANDLE = 0x80100003
SCARD_E_UNKNOWN_READER = 0x80100009
SCARD_E_TIMEOUT = 0x8010000A
SCARD_E_SHARING_VIOLATION = 0x8010000B
SCARD_E_NO_SMARTCARD = 0x8010000C
SCARD_E_NOT_TRANSACTED = 0x80100016
SCARD_E_READER_UNAVAILABLE = 0x80100017
SCARD_E_NO_SERVICE = 0x8010001D
SCARD_E_SERVICE_STOPPED = 0x8010001E
SCARD_E_NO_READERS_AVAILABLE = 0x8010002E
SCARD_F_COMM_ERROR = 0x80100013
SCARD_F_INTERNAL_ERROR = 0x80100001
SCARD_W_UNRESPONSIVE_CARD = 0x80100066
SCARD_W_UNPOWERED_CARD = 0x80100067
SCARD_W_RESET_CARD = 0x80100068
SCARD_W_REMOVED_CARD = 0x80100069

#: codes meaning the PC/SC service itself is gone (or our context died with it)
SERVICE_GONE = frozenset({SCARD_E_NO_SERVICE, SCARD_E_SERVICE_STOPPED, SCARD_F_COMM_ERROR,
                          SCARD_E_INVALID_HANDLE})


class PcscError(Exception):
    """A smartcard operation failed.

    :param message: what to tell the user (each subclass has a default).
    :param sw: the status word the card answered, if the failure came from the card.
    :param scard_code: the PC/SC error code, if the failure came from PC/SC.
    """

    #: stable short name of the failure, for scripts and JSON output
    code = "card_error"
    default_message = "The smartcard operation failed. Remove the card, insert it again, and retry."

    def __init__(self, message: str | None = None, *, sw: int | None = None,
                 scard_code: int | None = None) -> None:  # fmt: skip
        self.message = message or self.default_message
        self.sw = None if sw is None else int(sw)
        self.scard_code = None if scard_code is None else int(scard_code) & 0xFFFFFFFF
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        extra = ""
        if self.sw is not None:
            extra += f", sw=0x{self.sw:04X}"
        if self.scard_code is not None:
            extra += f", scard_code=0x{self.scard_code:08X}"
        return f"{type(self).__name__}({self.message!r}{extra})"

    def to_json(self) -> dict:
        """``{"error": code, "message": ..., "sw": int | None, "scard_code": int | None}``
        plus subclass fields."""
        return {"error": self.code, "message": self.message, "sw": self.sw,
                "scard_code": self.scard_code}


class NoReader(PcscError):
    """No smartcard reader is connected (or the one asked for is not there)."""

    code = "no_reader"
    default_message = "No smartcard reader found. Connect your card reader and try again."


class NoCard(PcscError):
    """The reader is empty."""

    code = "no_card"
    default_message = "Insert your smartcard."


class CardRemoved(PcscError):
    """The card left the reader (or was reset by someone else) during an operation."""

    code = "card_removed"
    default_message = "The card was removed before the operation finished."


class PcscUnavailable(PcscError):
    """The PC/SC service (pcscd) does not answer."""

    code = "pcsc_unavailable"
    default_message = "The smartcard service (pcscd) is not running."


class NotPivCard(PcscError):
    """The card does not have the PIV application (not one of ours)."""

    code = "not_piv_card"
    default_message = "This card is not a supported smartcard (no PIV application)."


class _WrongSecret(PcscError):
    what = "PIN"

    def __init__(self, retries_left: int | None, *, sw: int | None = None,
                 several: bool = False) -> None:  # fmt: skip
        self.retries_left = retries_left
        if retries_left is None:
            # the card (e.g. through a PKCS#11 module's token flags) does not give the count:
            # say what is known, never invent a number
            tries = ("more than one try left (the card does not say how many)" if several
                     else "the card does not say how many tries are left")
        elif retries_left == 1:
            tries = "1 try left"
        else:
            tries = f"{retries_left} tries left"
        super().__init__(f"Wrong {self.what} \N{EM DASH} {tries}", sw=sw)

    def to_json(self) -> dict:
        return {**super().to_json(), "retries_left": self.retries_left}


class WrongPin(_WrongSecret):
    """The PIN was wrong; ``retries_left`` tries remain (at least 1), or None when the card
    does not say how many (``several``: it says more than one)."""

    code = "wrong_pin"
    what = "PIN"


class PinBlocked(PcscError):
    """No PIN tries remain: the card needs an administrative unlock."""

    code = "pin_blocked"
    default_message = "Your card is locked: ask your sponsor to unlock it."


class WrongPuk(_WrongSecret):
    """The PUK (unblocking code) was wrong; ``retries_left`` tries remain."""

    code = "wrong_puk"
    what = "unlock code (PUK)"


class PukBlocked(PcscError):
    """No PUK tries remain: the card cannot be unlocked any more and must be replaced."""

    code = "puk_blocked"
    default_message = ("The card's unlock code is blocked: the card cannot be unlocked and "
                       "must be replaced.")


class SecurityStatusNotSatisfied(PcscError):
    """The card refused because the PIN (or the management key) was not verified first."""

    code = "not_verified"
    default_message = "The card needs the PIN first."


class InvalidPin(PcscError):
    """The PIN (or PUK) has a form the card does not take (it cost no try)."""

    code = "invalid_pin"
    default_message = "The PIN must be 4 to 8 digits."


class ManagementKeyRejected(PcscError):
    """The card's administrative (management) key was wrong, or the card's proof was."""

    code = "management_key_rejected"
    default_message = ("The card did not accept its administrative key: check that it is "
                       "the key issued with this card.")


class ObjectNotFound(PcscError):
    """The card has no such data object (e.g. no certificate in that slot)."""

    code = "object_not_found"
    default_message = "The card does not hold the requested data (certificate or object)."


class CardError(PcscError):
    """The card answered a status word that means failure (other than the above)."""

    code = "card_error"

    def __init__(self, sw: int, message: str | None = None) -> None:
        text = message or (f"The card refused the operation (status {sw:04X}). Remove the "
                           "card, insert it again, and retry.")
        super().__init__(text, sw=sw)


def from_scard_code(code: int, context: str = "") -> PcscError:
    """The :class:`PcscError` for a PC/SC result code (``SCARD_E_...``)."""
    code = int(code) & 0xFFFFFFFF
    if code in (SCARD_E_NOT_TRANSACTED, SCARD_W_REMOVED_CARD, SCARD_W_RESET_CARD,
                SCARD_W_UNPOWERED_CARD, SCARD_W_UNRESPONSIVE_CARD):
        return CardRemoved(scard_code=code)
    if code == SCARD_E_NO_SMARTCARD:
        return NoCard(scard_code=code)
    if code in (SCARD_E_READER_UNAVAILABLE, SCARD_E_UNKNOWN_READER,
                SCARD_E_NO_READERS_AVAILABLE):
        return NoReader(scard_code=code)
    if code in (SCARD_E_NO_SERVICE, SCARD_E_SERVICE_STOPPED, SCARD_F_COMM_ERROR):
        return PcscUnavailable(scard_code=code)
    if code == SCARD_E_SHARING_VIOLATION:
        return PcscError("The card is in use by another program. Close it and try again.",
                         scard_code=code)
    if code == SCARD_E_TIMEOUT:
        return PcscError("The smartcard did not answer in time. Remove the card, insert it "
                         "again, and retry.", scard_code=code)
    detail = f" ({context})" if context else ""
    return PcscError(f"The smartcard operation failed (PC/SC error 0x{code:08X}{detail}). "
                     "Remove the card, insert it again, and retry.", scard_code=code)


def translate(exc: BaseException) -> PcscError:
    """The :class:`PcscError` for an exception pyscard raised (``CardConnectionException``,
    ``NoCardException``, ``EstablishContextException``, ``ListReadersException``, ...) or
    for an int PC/SC code; a :class:`PcscError` is returned as it is."""
    if isinstance(exc, PcscError):
        return exc
    if isinstance(exc, int):
        return from_scard_code(exc)
    code = getattr(exc, "hresult", None)
    try:
        from smartcard import Exceptions as E  # noqa: N812
    except ImportError:  # pragma: no cover - pyscard is a dependency of this driver
        E = None  # noqa: N806
    if code not in (None, -1, 0):
        return from_scard_code(code, str(exc))
    if E is not None:
        if isinstance(exc, E.NoCardException):
            return NoCard()
        if isinstance(exc, (E.NoReadersException, E.InvalidReaderException)):
            return NoReader()
        if isinstance(exc, E.EstablishContextException):
            return PcscUnavailable()
        if isinstance(exc, E.CardConnectionException):
            text = str(exc).lower()
            if "removed" in text or "transaction failed" in text or "reset" in text:
                return CardRemoved()
            if "no smart card" in text:
                return NoCard()
            if "service" in text:
                return PcscUnavailable()
            return PcscError()
    if isinstance(exc, OSError):
        return PcscError(f"The smartcard could not be reached: {exc}")
    return PcscError()
