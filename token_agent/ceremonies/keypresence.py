"""Who must touch a security key before its PIN may be tried.

A key's PIN retries are few (8) and shared by everyone who can reach the key: three wrong
PINs block it until it is re-plugged, and eight erase it for good (only a reset, which
destroys every credential on it, makes it usable again). A process running as an ordinary
user (a script, malware) could otherwise spend them through the service's ``enrol.key`` or a
user's own screen locker, or by running the CLI, with nobody at the workstation.

The rule (issue 11 item 6), applied before the first PIN attempt of every ceremony that
may spend a PIN try (login, enrolment, the CLI's PIN change and credential listing):

* a caller that is not trusted to have a person in front of the key (anyone but the login
  service, i.e. root and ``[service] login_service_users``; the CLI unless run as root) must
  first get a touch on the key (authenticatorSelection on CTAP 2.1 keys, the usual
  makeCredential probe on 2.0 keys: ``FidoKey.select`` in ``drivers.fido``);
* any caller, the login service too, must get that touch when the key has
  :data:`LOW_PIN_RETRIES` or fewer retries left, so that the last tries before a reset are
  only ever spent by a person at the key.

Without the touch (nobody touched within the timeout) the ceremony ends with
:class:`PresenceRequired` (reason ``presence-required``) and no PIN was asked for or sent.
One touch counts for the rest of its ceremony (a :class:`PinGuard` is made per ceremony).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from drivers.fido import errors as key_errors

log = logging.getLogger("token_agent.key")

#: at or below this many PIN retries left (of 8), every caller must touch the key first
LOW_PIN_RETRIES = 3


class PresenceRequired(key_errors.FidoKeyError):
    """The key's PIN may only be tried after a touch, and nobody touched it."""

    code = "presence_required"
    default_message = (
        "Touch your security key before its PIN is tried: nobody touched it, so no PIN was "
        "sent to it."
    )


class PinGuard:
    """Per ceremony: whether this caller must touch the key before a PIN try, and whether it
    already has (``present``).

    :param trusted: the caller is the login service (root, ``login_service_users``), or the
        CLI run as root: a person is assumed at the key while many retries are left.
    :param on_touch: called when the key waits for the touch (tell the person).
    """

    def __init__(self, *, trusted: bool, on_touch: Callable[[], None] | None = None,
                 timeout: float = 30.0, cancel: threading.Event | None = None) -> None:
        self.trusted = trusted
        self.on_touch = on_touch
        self.timeout = timeout
        self.cancel = cancel
        self.present = False

    def before_pin(self, key) -> None:
        """Call before a PIN is asked for and sent to ``key``: returns when a PIN try may be
        spent; raises :class:`PresenceRequired` (no touch), ``PinBlocked`` (no retries
        left: nothing to touch for), or the key's errors (``Cancelled`` ...)."""
        if self.present:
            return
        try:
            retries = key.pin_retries()
        except key_errors.PinNotSet:
            return  # no PIN: no try to spend (the operation reports PinNotSet itself)
        if retries == 0:
            raise key_errors.PinBlocked()
        low = retries <= LOW_PIN_RETRIES
        if self.trusted and not low:
            return
        why = (f"{retries} PIN tries left" if low else "the caller is not the login service")
        log.info("a touch is required before the PIN of key %s is tried (%s)", key.path, why)
        try:
            key.select(on_touch=self.on_touch, timeout=self.timeout, cancel=self.cancel)
        except key_errors.TouchTimeout:
            message = PresenceRequired.default_message
            if low:
                message += f" It has only {retries} PIN tries left."
            raise PresenceRequired(message) from None
        self.present = True

    def pin_provider(self, key, provider: Callable[[], str | None]) -> Callable[[], str | None]:
        """``provider`` behind :meth:`before_pin`: the driver calls it when, and only when, the
        key needs its PIN, so a ceremony that needs no PIN needs no extra touch."""

        def guarded() -> str | None:
            self.before_pin(key)
            return provider()

        return guarded
