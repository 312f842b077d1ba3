"""What can go wrong with a FIDO2 security key, as exceptions with messages for people.

Every exception here is a :class:`FidoKeyError`: ``str(e)`` and ``e.message`` are plain
sentences a clinician can act on (shown as they are by the command line), ``e.ctap_code`` is
the CTAP status byte the key answered (None when the failure did not come from the key), and
``e.code`` is a stable short name for scripts and JSON output.

:func:`translate` turns what python-fido2 and the operating system raise (``CtapError``,
``ClientError``, ``fido2.hid.ConnectionFailure``, ``OSError``) into these. This module is part
of a driver: it decides no policy (whether to retry, what to record), it only says what
happened.
"""

from __future__ import annotations

import sys

from fido2.ctap import CtapError
from fido2.hid import ConnectionFailure

__all__ = [
    "Cancelled",
    "CredentialExcluded",
    "FidoKeyError",
    "KeyCommunicationError",
    "KeyRemoved",
    "KeyStoreFull",
    "NoCredentials",
    "NoKeyFound",
    "OperationDenied",
    "PinAlreadySet",
    "PinAuthBlocked",
    "PinBlocked",
    "PinNotSet",
    "PinPolicyViolation",
    "PinRequired",
    "ResetNotAllowed",
    "TouchTimeout",
    "UnsupportedKey",
    "WrongPin",
    "translate",
]

ERR = CtapError.ERR

#: longest PIN CTAP 2.1 accepts, in UTF-8 bytes
MAX_PIN_BYTES = 63


class FidoKeyError(Exception):
    """A security key operation failed.

    :param message: what to tell the user (each subclass has a default).
    :param ctap_code: the CTAP status the key answered, if the failure came from the key.
    """

    #: stable short name of the failure, for scripts and JSON output
    code = "key_error"
    default_message = (
        "The security key operation failed. Remove the key, insert it again, and retry."
    )

    def __init__(self, message: str | None = None, *, ctap_code: int | None = None) -> None:
        self.message = message or self.default_message
        self.ctap_code = None if ctap_code is None else int(ctap_code)
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        code = f", ctap_code=0x{self.ctap_code:02X}" if self.ctap_code is not None else ""
        return f"{type(self).__name__}({self.message!r}{code})"

    def to_json(self) -> dict:
        """``{"error": code, "message": ..., "ctap_code": int | None}`` plus subclass fields."""
        return {"error": self.code, "message": self.message, "ctap_code": self.ctap_code}


class NoKeyFound(FidoKeyError):
    """No security key is plugged in (or none answers)."""

    code = "no_key"
    default_message = "No security key found. Insert your key and try again."


class KeyRemoved(FidoKeyError):
    """The key went away (unplugged, or its connection dropped) during an operation."""

    code = "key_removed"
    default_message = "The security key was removed before the operation finished."


class TouchTimeout(FidoKeyError):
    """Nobody touched the key in time (our timeout, or the key's own USER_ACTION_TIMEOUT).

    :param seconds: how long the user had, if known.
    """

    code = "touch_timeout"

    def __init__(self, seconds: float | None = None, *, ctap_code: int | None = None) -> None:
        self.seconds = seconds
        if seconds is None:
            message = "The security key was not touched in time."
        else:
            unit = "second" if seconds == 1 else "seconds"
            message = f"No touch within {seconds:g} {unit}."
        super().__init__(message, ctap_code=ctap_code)

    def to_json(self) -> dict:
        return {**super().to_json(), "seconds": self.seconds}


class Cancelled(FidoKeyError):
    """The operation was cancelled (by the caller, or the key reported a cancel)."""

    code = "cancelled"
    default_message = "The operation was cancelled."


class WrongPin(FidoKeyError):
    """The PIN was wrong; ``retries_left`` more tries before the PIN is blocked (None if the
    key could not say)."""

    code = "wrong_pin"

    def __init__(
        self, retries_left: int | None = None, *, ctap_code: int | None = ERR.PIN_INVALID
    ) -> None:
        self.retries_left = retries_left
        if retries_left is None:
            message = "Wrong PIN."
        else:
            message = f"Wrong PIN — {retries_left} {'try' if retries_left == 1 else 'tries'} left"
        super().__init__(message, ctap_code=ctap_code)

    def to_json(self) -> dict:
        return {**super().to_json(), "retries_left": self.retries_left}


class PinAuthBlocked(FidoKeyError):
    """Three wrong PINs in a row: the key refuses PINs until it is power-cycled."""

    code = "pin_auth_blocked"
    default_message = (
        "Too many wrong PINs in a row: remove the key, insert it again, and retry."
    )


class PinBlocked(FidoKeyError):
    """No PIN retries left: only a reset (which erases the key) makes it usable again."""

    code = "pin_blocked"
    default_message = (
        "This key's PIN is blocked after too many wrong attempts. It can only be reset, "
        "which erases everything on it."
    )


class PinNotSet(FidoKeyError):
    """The operation needs a PIN, and the key has none yet."""

    code = "pin_not_set"
    default_message = "This key has no PIN yet. Set a PIN on it first, then try again."


class PinAlreadySet(FidoKeyError):
    """Setting a PIN on a key that already has one (change it instead)."""

    code = "pin_already_set"
    default_message = "This key already has a PIN. Change it instead of setting a new one."


class PinRequired(FidoKeyError):
    """The key needs its PIN for this, and none was given."""

    code = "pin_required"
    default_message = "This key needs its PIN for this, and no PIN was given."


class PinPolicyViolation(FidoKeyError):
    """The key does not accept the new PIN (too short, too long, or not allowed).

    :param min_length: the key's minimum PIN length in characters, if known.
    """

    code = "pin_policy"

    def __init__(
        self, min_length: int | None = None, *, ctap_code: int | None = ERR.PIN_POLICY_VIOLATION
    ) -> None:
        self.min_length = min_length
        if min_length is None:
            message = "The key does not accept this PIN. Choose a different, longer one."
        else:
            message = (
                f"The key does not accept this PIN. A PIN must be at least {min_length} "
                f"characters long (and at most {MAX_PIN_BYTES} bytes)."
            )
        super().__init__(message, ctap_code=ctap_code)

    def to_json(self) -> dict:
        return {**super().to_json(), "min_length": self.min_length}


class ResetNotAllowed(FidoKeyError):
    """The key refused a reset: CTAP only allows one within 10 s of power-up."""

    code = "reset_not_allowed"
    default_message = (
        "A key can only be reset within 10 seconds of being plugged in: remove it, insert it "
        "again, and run the reset at once."
    )


class OperationDenied(FidoKeyError):
    """The key (or its user) refused the operation."""

    code = "operation_denied"
    default_message = "The security key refused the operation."


class CredentialExcluded(FidoKeyError):
    """makeCredential found one of the excluded credentials: the key is already registered."""

    code = "credential_excluded"
    default_message = "This key is already registered for this account."


class NoCredentials(FidoKeyError):
    """The key holds no credential that fits the request."""

    code = "no_credentials"
    default_message = (
        "This key is not registered for this account, or the sign-in was deleted from it."
    )


class KeyStoreFull(FidoKeyError):
    """The key has no room left for another discoverable credential."""

    code = "key_store_full"
    default_message = (
        "This key is full: it has no room for another sign-in. Delete one you no longer use, "
        "or use another key."
    )


class UnsupportedKey(FidoKeyError):
    """The key lacks a feature the operation needs (CTAP2, PIN, credential management, an
    algorithm or option)."""

    code = "unsupported_key"
    default_message = "This security key does not support what is needed here. Use another key."


class KeyCommunicationError(FidoKeyError):
    """The key answered something malformed, or talking to it failed in a way that is not a
    removal."""

    code = "key_communication"
    default_message = (
        "The security key gave an unexpected answer. Remove it, insert it again, and retry."
    )


# --------------------------------------------------------------------------- translation
_SIMPLE: dict[int, type[FidoKeyError]] = {
    ERR.PIN_BLOCKED: PinBlocked,
    ERR.PIN_AUTH_BLOCKED: PinAuthBlocked,
    ERR.PIN_NOT_SET: PinNotSet,
    ERR.PUAT_REQUIRED: PinRequired,
    ERR.OPERATION_DENIED: OperationDenied,
    ERR.CREDENTIAL_EXCLUDED: CredentialExcluded,
    ERR.NO_CREDENTIALS: NoCredentials,
    ERR.KEY_STORE_FULL: KeyStoreFull,
    ERR.KEEPALIVE_CANCEL: Cancelled,
    ERR.UNSUPPORTED_ALGORITHM: UnsupportedKey,
    ERR.UNSUPPORTED_OPTION: UnsupportedKey,
    ERR.INVALID_SUBCOMMAND: UnsupportedKey,
}

_TIMEOUTS = {ERR.USER_ACTION_TIMEOUT, ERR.ACTION_TIMEOUT}

# INVALID_COMMAND is left to KeyCommunicationError: python-fido2 raises it for an answer with
# the wrong CTAPHID command byte (a garbled report), and commands a key may not know are only
# sent after getInfo says it knows them.

_NOT_ALLOWED_MESSAGE = "The security key does not allow this operation now."

def translate(
    exc: BaseException,
    *,
    retries: int | None = None,
    min_pin_length: int | None = None,
    timeout: float | None = None,
) -> FidoKeyError:
    """The :class:`FidoKeyError` for an exception raised while talking to a key.

    :param exc: a ``CtapError``, a ``ClientError`` (its ``cause`` is used when it is a
        ``CtapError``), ``fido2.hid.ConnectionFailure``, an ``OSError``, or anything else
        (which becomes :class:`KeyCommunicationError`). A :class:`FidoKeyError` is returned
        as it is.
    :param retries: PIN retries left, for :class:`WrongPin` (query getPINRetries after the
        failure and pass it here).
    :param min_pin_length: the key's minimum PIN length, for :class:`PinPolicyViolation`.
    :param timeout: the touch timeout in force, for :class:`TouchTimeout`.

    Context-dependent statuses are translated generically here (NOT_ALLOWED to a base
    :class:`FidoKeyError`); callers that know the context (a reset, a setPIN) map them first.
    """
    if isinstance(exc, FidoKeyError):
        return exc
    if isinstance(exc, CtapError):
        return _from_ctap(exc, retries, min_pin_length, timeout)
    ClientError = _client_error()
    if ClientError is not None and isinstance(exc, ClientError):
        cause = exc.cause
        if isinstance(cause, CtapError):
            return _from_ctap(cause, retries, min_pin_length, timeout)
        if isinstance(cause, BaseException) and not isinstance(cause, ClientError):
            return translate(
                cause, retries=retries, min_pin_length=min_pin_length, timeout=timeout
            )
        return _from_client(exc, timeout)
    if isinstance(exc, ConnectionFailure):
        return KeyCommunicationError()
    if isinstance(exc, OSError):
        return _from_os(exc)
    # anything else (ValueError, KeyError, struct.error...) is python-fido2 failing to parse
    # what the key sent
    return KeyCommunicationError()


def _from_ctap(
    exc: CtapError, retries: int | None, min_pin_length: int | None, timeout: float | None
) -> FidoKeyError:
    code = int(exc.code)
    if code == ERR.PIN_INVALID:
        if retries == 0:
            return PinBlocked(ctap_code=code)
        return WrongPin(retries, ctap_code=code)
    if code == ERR.PIN_POLICY_VIOLATION:
        return PinPolicyViolation(min_pin_length, ctap_code=code)
    if code in _TIMEOUTS:
        return TouchTimeout(timeout, ctap_code=code)
    if code == ERR.NOT_ALLOWED:
        return FidoKeyError(_NOT_ALLOWED_MESSAGE, ctap_code=code)
    cls = _SIMPLE.get(code)
    if cls is not None:
        return cls(ctap_code=code)
    return KeyCommunicationError(ctap_code=code)


def _client_error():
    """python-fido2's ClientError, if its client module is loaded: only its Fido2Client
    raises one, and importing it costs more than a whole login (so it is not done here)."""
    module = sys.modules.get("fido2.client")
    return module.ClientError if module is not None else None


def _from_client(exc, timeout: float | None) -> FidoKeyError:
    from fido2.client import ClientError, PinRequiredError

    if isinstance(exc, PinRequiredError):
        return PinRequired()
    code = exc.code
    if code == ClientError.ERR.TIMEOUT:
        return TouchTimeout(timeout)
    if code == ClientError.ERR.DEVICE_INELIGIBLE:
        return NoCredentials()
    if code == ClientError.ERR.CONFIGURATION_UNSUPPORTED:
        detail = str(exc.cause or "")
        if "not configured" in detail:  # UV asked for, and the key has no PIN set
            return PinNotSet()
        return UnsupportedKey()
    return FidoKeyError()


def _from_os(exc: OSError) -> FidoKeyError:
    if isinstance(exc, PermissionError):
        return KeyCommunicationError(
            "This security key cannot be opened: permission denied. Ask IT to install the "
            "token-agent udev rules, then remove the key and insert it again."
        )
    if isinstance(exc, TimeoutError):  # a read timeout: the key is there but silent
        return KeyCommunicationError(
            "The security key stopped answering. Remove it, insert it again, and retry."
        )
    # ENODEV / EIO from hidraw, ECONNRESET from a simulator's socket, EBADF on a handle the
    # key closed: all a key that is no longer there
    return KeyRemoved()
