"""FIDO2 security keys: what they are, their PIN, their discoverable credentials, and the
WebAuthn operations, over python-fido2.

    from drivers.fido.keys import list_keys, open_single_key

    for info in list_keys():                       # USB keys + TOKEN_AGENT_SIM_KEYS
        print(info.product, info.aaguid, info.pin_retries)

    with open_single_key(on_touch=lambda: print("Touch your security key"), timeout=30) as key:
        response = key.make_credential(options, origin="https://trust.example",
                                       pin_provider=ask_pin, on_touch=tell_touch)

Touches: every operation that may wait for the user's touch takes ``on_touch`` (called once,
when the key reports that it waits for a touch with KEEPALIVE UPNEEDED, and never otherwise),
``timeout`` (seconds; counted afresh when the key asks for the touch, and not while
``pin_provider`` runs) and ``cancel`` (a :class:`threading.Event` the caller may set from any
thread). Both end the wait the way the specification wants, with CTAPHID_CANCEL: python-fido2
sends it when the event it was given is set, which it checks before reading each packet; a
key that waits for a touch sends KEEPALIVE every ~100 ms, so the cancel goes out within about
that. The timeout raises :class:`~drivers.fido.errors.TouchTimeout`, the caller's cancel
:class:`~drivers.fido.errors.Cancelled`. A key that goes silent (answers neither the request
nor the cancel) has its connection closed :data:`ABANDON_GRACE` seconds later, which ends
the call with :class:`~drivers.fido.errors.KeyCommunicationError`.

Ctrl-C (KeyboardInterrupt) during a call is python-fido2's own business: it sends
CTAPHID_CANCEL and re-raises; nothing here catches it.

Errors: everything raised for a key's failure is a
:class:`~drivers.fido.errors.FidoKeyError` with a message for the user. This module is a
driver: no policy, no store, no user interface (callers give the callbacks).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlparse

from fido2.client import ClientError, DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.ctap import STATUS, CtapDevice, CtapError
from fido2.ctap2 import Ctap2, Info
from fido2.ctap2.credman import CredentialManagement
from fido2.ctap2.pin import ClientPin
from fido2.hid import ConnectionFailure
from fido2.hid.base import HidDescriptor
from fido2.rpid import verify_rp_id
from fido2.webauthn import (
    AuthenticationResponse,
    PublicKeyCredentialCreationOptions,
    PublicKeyCredentialRequestOptions,
    RegistrationResponse,
)

from . import discovery
from .errors import (
    MAX_PIN_BYTES,
    Cancelled,
    FidoKeyError,
    KeyCommunicationError,
    KeyRemoved,
    NoCredentials,
    NoKeyFound,
    PinAlreadySet,
    PinPolicyViolation,
    PinRequired,
    ResetNotAllowed,
    TouchTimeout,
    UnsupportedKey,
    translate,
)

__all__ = [
    "ABANDON_GRACE",
    "DEFAULT_TIMEOUT",
    "FidoKey",
    "KeyInfo",
    "ResidentCredential",
    "list_keys",
    "open_single_key",
    "select_key",
]

logger = logging.getLogger(__name__)

#: seconds a touch is waited for unless the caller says otherwise
DEFAULT_TIMEOUT = 30.0
#: seconds a key may stay silent after it was sent CTAPHID_CANCEL before its connection is
#: closed (a key waiting for a touch sends KEEPALIVE every ~100 ms, so only a broken or
#: hung key gets there)
ABANDON_GRACE = 3.0
#: path prefixes of simulated keys: over TCP (drivers.fido.sim) and in-process (tests)
SIMULATOR_PATH_PREFIXES = ("sim:", "inproc:")

ERR = CtapError.ERR
_FAILURES = (CtapError, ClientError, ConnectionFailure, OSError, ValueError, KeyError)

OnTouch = Callable[[], None]
PinProvider = Callable[[], "str | None"]


# --------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class KeyInfo:
    """What a key says about itself (authenticatorGetInfo), plus its PIN retries.

    ``pin_retries`` is None when no PIN is set (or the key has no PIN support);
    ``remaining_discoverable`` is None when the key does not say.
    """

    path: str
    product: str | None
    serial: str | None
    aaguid: str
    versions: list[str]
    extensions: list[str]
    options: dict[str, bool]
    algorithms: list[int]
    pin_set: bool
    pin_retries: int | None
    min_pin_length: int
    remaining_discoverable: int | None
    firmware_version: int | None
    pin_protocols: list[int] = field(default_factory=list)
    force_pin_change: bool = False

    @property
    def supports_selection(self) -> bool:
        """authenticatorSelection is a CTAP 2.1 command (2.0 keys get the makeCredential
        probe instead, see :func:`select_key`)."""
        return "FIDO_2_1" in self.versions

    @property
    def is_simulator(self) -> bool:
        return self.path.startswith(SIMULATOR_PATH_PREFIXES)

    @property
    def supports_pin(self) -> bool:
        return "clientPin" in self.options

    @property
    def supports_credential_management(self) -> bool:
        return bool(self.options.get("credMgmt") or self.options.get("credentialMgmtPreview"))

    @classmethod
    def from_info(
        cls, descriptor: HidDescriptor | None, info: Info, pin_retries: int | None
    ) -> KeyInfo:
        path = descriptor.path if descriptor is not None else ""
        if isinstance(path, bytes):
            path = path.decode("utf-8", "replace")
        pin_set = info.options.get("clientPin") is True
        return cls(
            path=path,
            product=descriptor.product_name if descriptor is not None else None,
            serial=descriptor.serial_number if descriptor is not None else None,
            aaguid=str(info.aaguid),
            versions=list(info.versions),
            extensions=list(info.extensions),
            options=dict(info.options),
            algorithms=[a["alg"] for a in info.algorithms if isinstance(a, Mapping) and "alg" in a],
            pin_set=pin_set,
            pin_retries=pin_retries if pin_set else None,
            min_pin_length=info.min_pin_length,
            remaining_discoverable=info.remaining_disc_creds,
            firmware_version=info.firmware_version or None,
            pin_protocols=list(info.pin_uv_protocols),
            force_pin_change=bool(info.force_pin_change),
        )

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "product": self.product,
            "serial": self.serial,
            "aaguid": self.aaguid,
            "versions": list(self.versions),
            "extensions": list(self.extensions),
            "options": dict(self.options),
            "algorithms": list(self.algorithms),
            "pin_set": self.pin_set,
            "pin_retries": self.pin_retries,
            "min_pin_length": self.min_pin_length,
            "remaining_discoverable": self.remaining_discoverable,
            "supports_selection": self.supports_selection,
            "is_simulator": self.is_simulator,
            "firmware_version": self.firmware_version,
            "pin_protocols": list(self.pin_protocols),
            "force_pin_change": self.force_pin_change,
        }


@dataclass(frozen=True)
class ResidentCredential:
    """A discoverable credential stored on a key (credentialManagement)."""

    rp_id: str
    rp_name: str | None
    user_id: bytes
    user_name: str | None
    display_name: str | None
    credential_id: bytes
    public_key: dict  # COSE_Key
    cred_protect: int | None

    def to_json(self) -> dict:
        return {
            "rp_id": self.rp_id,
            "rp_name": self.rp_name,
            "user_id": self.user_id.hex(),
            "user_name": self.user_name,
            "display_name": self.display_name,
            "credential_id": self.credential_id.hex(),
            "algorithm": self.public_key.get(3),
            "cred_protect": self.cred_protect,
        }


# --------------------------------------------------------------------------- touch waits
class _OperationEvent(threading.Event):
    """The event python-fido2 is given for one operation.

    Set by the operation's timer. The caller's cancel events are
    looked at by :meth:`is_set` itself: python-fido2 calls it before reading every packet
    (and a key waiting for a touch sends one every ~100 ms), so the cancel is noticed without
    a thread of its own and without polling.
    """

    def __init__(self, external: Sequence[threading.Event], on_external: Callable[[], None]):
        super().__init__()
        self._external = tuple(external)
        self._on_external = on_external

    def is_set(self) -> bool:
        if super().is_set():
            return True
        if any(e.is_set() for e in self._external):
            self._on_external()
            return True
        return False

    def wait(self, timeout: float | None = None) -> bool:
        super().wait(timeout)
        return self.is_set()


class _Watch:
    """Timeout, cancel and touch prompt of one operation on one key."""

    def __init__(
        self,
        timeout: float,
        cancel: Sequence[threading.Event],
        on_abandon: Callable[[], None],
        on_touch: OnTouch | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self.timeout = timeout
        self.reason: str | None = None  # "timeout" or "cancel" (a caller's event)
        self.abandoned = False
        self.event = _OperationEvent(cancel, lambda: self._signal("cancel"))
        self._on_abandon = on_abandon
        self._on_touch = on_touch
        self._prompted = False
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self._abandon_timer: threading.Timer | None = None
        self._done = False

    # the countdown
    def arm(self) -> None:
        """(Re)start the countdown at the full timeout."""
        with self._lock:
            self._cancel_timer()
            if self._done or self.reason is not None:
                return
            self._timer = _timer(self.timeout, lambda: self._signal("timeout"))

    def pause(self) -> None:
        with self._lock:
            self._cancel_timer()

    def close(self) -> None:
        with self._lock:
            self._done = True
            self._cancel_timer()
            if self._abandon_timer is not None:
                self._abandon_timer.cancel()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _signal(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            if not self._done and self._abandon_timer is None:
                self._abandon_timer = _timer(ABANDON_GRACE, self._abandon)
        self.event.set()

    def _abandon(self) -> None:
        with self._lock:
            if self._done:
                return
            self.abandoned = True
        logger.warning("the key did not answer a cancel within %.1f s: closing it", ABANDON_GRACE)
        self._on_abandon()

    # the touch prompt
    def touch_requested(self) -> None:
        """The key waits for a touch: the user gets the full timeout from now on, and is told
        once per operation."""
        self.arm()
        with self._lock:
            if self._prompted or self._on_touch is None:
                return
            self._prompted = True
        self._on_touch()

    def on_keepalive(self, status: int) -> None:
        if status == STATUS.UPNEEDED:
            self.touch_requested()

    # outcome
    def error(self) -> FidoKeyError:
        """The error for an operation ended by this watch."""
        if self.reason == "timeout":
            return TouchTimeout(self.timeout)
        return Cancelled()

    def raise_if_signalled(self) -> None:
        if self.event.is_set():
            raise self.error()


def _timer(seconds: float, action: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.name = "fido-key-timer"
    timer.start()
    return timer


def _events(
    cancel: threading.Event | Sequence[threading.Event | None] | None,
) -> list[threading.Event]:
    if cancel is None:
        return []
    if isinstance(cancel, threading.Event):
        return [cancel]
    return [e for e in cancel if e is not None]


class _Once:
    """``on_touch`` shared by several keys' operations: called at most once."""

    def __init__(self, callback: OnTouch | None) -> None:
        self._callback = callback
        self._lock = threading.Lock()
        self._called = False

    def __call__(self) -> None:
        with self._lock:
            if self._called or self._callback is None:
                return
            self._called = True
        self._callback()


class _Interaction(UserInteraction):
    """python-fido2's user interaction for one operation: PIN from ``pin_provider`` (None or
    empty -> :class:`PinRequired`), touch prompt through the watch."""

    def __init__(self, watch: _Watch, pin_provider: PinProvider | None) -> None:
        self._watch = watch
        self._pin_provider = pin_provider

    def prompt_up(self) -> None:
        self._watch.touch_requested()

    def request_pin(self, permissions, rp_id) -> str:  # noqa: ANN001 (python-fido2's signature)
        self._watch.pause()  # typing a PIN is not waiting for a touch
        try:
            pin = self._pin_provider() if self._pin_provider is not None else None
        finally:
            self._watch.arm()
        self._watch.raise_if_signalled()
        if not pin:
            raise PinRequired()
        return pin

    def request_uv(self, permissions, rp_id) -> bool:  # noqa: ANN001
        return True


# --------------------------------------------------------------------------- the key
class FidoKey:
    """One FIDO2 security key, open. Wraps a python-fido2 :class:`CtapHidDevice`.

    Use as a context manager (or call :meth:`close`). Operations on one key run one at a
    time (a lock serialises them); every failure is a :class:`FidoKeyError`.

    :param device: an open device (``drivers.fido.discovery.open_device``,
        ``simulators.key.open_in_process_device``, ...); the key takes ownership and closes it.
    """

    def __init__(self, device: CtapDevice) -> None:
        self._device = device
        self._lock = threading.RLock()
        self._ctap2_cache: Ctap2 | None = None
        self._closed = False
        self._dead: FidoKeyError | None = None  # removed, or abandoned: why it is unusable

    @classmethod
    def open(cls, descriptor: HidDescriptor) -> FidoKey:
        """Open a key from ``drivers.fido.discovery.list_descriptors``."""
        try:
            return cls(discovery.open_device(descriptor))
        except _FAILURES as e:
            raise translate(e) from e

    # -- identity and life cycle -------------------------------------------------------
    @property
    def device(self) -> CtapDevice:
        return self._device

    @property
    def descriptor(self) -> HidDescriptor | None:
        return getattr(self._device, "descriptor", None)

    @property
    def path(self) -> str:
        path = self.descriptor.path if self.descriptor is not None else ""
        return path.decode("utf-8", "replace") if isinstance(path, bytes) else path

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection (idempotent; may be called from another thread to end a call
        in progress, which then fails)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._device.close()
        except Exception as e:  # noqa: BLE001 (closing a removed device may fail; nothing to do)
            logger.debug("closing %s: %s", self.path, e)

    def __enter__(self) -> FidoKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FidoKey({self.path!r}{', closed' if self._closed else ''})"

    # -- information -------------------------------------------------------------------
    def info(self) -> KeyInfo:
        """getInfo (fresh) and, when a PIN is set, the PIN retries left."""
        with self._operation():
            ctap2 = self._ctap2()
            info = ctap2.get_info()
            retries = None
            if info.options.get("clientPin") is True:
                retries = ClientPin(ctap2).get_pin_retries()[0]
            return KeyInfo.from_info(self.descriptor, info, retries)

    def pin_retries(self) -> int:
        """PIN retries left (getPINRetries). Keys differ when no PIN is set: some answer
        (8), others PIN_NOT_SET, raised as :class:`PinNotSet`."""
        with self._operation():
            ctap2 = self._ctap2()
            self._need_pin_support(ctap2.info)
            return ClientPin(ctap2).get_pin_retries()[0]

    # -- PIN ---------------------------------------------------------------------------
    def set_pin(self, new: str) -> None:
        """Set the first PIN. :class:`PinAlreadySet` if it has one (use :meth:`change_pin`),
        :class:`PinPolicyViolation` if the key will not take it."""
        with self._operation(not_allowed=PinAlreadySet):
            ctap2 = self._ctap2()
            info = ctap2.get_info()
            self._need_pin_support(info)
            if info.options.get("clientPin") is True:
                raise PinAlreadySet()
            _check_new_pin(new, info.min_pin_length)
            ClientPin(ctap2).set_pin(new)

    def change_pin(self, old: str, new: str) -> None:
        """Change the PIN. :class:`WrongPin` (with the tries left) if ``old`` is wrong."""
        with self._operation():
            ctap2 = self._ctap2()
            info = ctap2.get_info()
            self._need_pin_support(info)
            if not old:
                raise PinRequired()
            _check_new_pin(new, info.min_pin_length)
            ClientPin(ctap2).change_pin(old, new)

    # -- credential management ----------------------------------------------------------
    def list_credentials(self, pin: str) -> list[ResidentCredential]:
        """The discoverable credentials on the key, every relying party (needs the PIN)."""
        with self._operation():
            credman = self._credman(pin)
            found: list[ResidentCredential] = []
            R = CredentialManagement.RESULT
            for rp in credman.enumerate_rps():
                rp_entity = rp.get(R.RP) or {}
                for cred in credman.enumerate_creds(rp[R.RP_ID_HASH]):
                    user = cred.get(R.USER) or {}
                    found.append(
                        ResidentCredential(
                            rp_id=rp_entity.get("id", ""),
                            rp_name=rp_entity.get("name"),
                            user_id=bytes(user.get("id", b"")),
                            user_name=user.get("name"),
                            display_name=user.get("displayName"),
                            credential_id=bytes(cred[R.CREDENTIAL_ID]["id"]),
                            public_key=dict(cred.get(R.PUBLIC_KEY) or {}),
                            cred_protect=cred.get(R.CRED_PROTECT),
                        )
                    )
            return found

    def delete_credential(self, pin: str, credential_id: bytes) -> None:
        """Delete one discoverable credential. :class:`NoCredentials` if the key has none
        with that ID."""
        with self._operation(no_credentials="There is no such sign-in on this key."):
            credman = self._credman(pin)
            credman.delete_cred({"type": "public-key", "id": bytes(credential_id)})

    # -- reset -------------------------------------------------------------------------
    def reset(
        self,
        *,
        on_touch: OnTouch | None,
        timeout: float = DEFAULT_TIMEOUT,
        cancel: threading.Event | None = None,
    ) -> None:
        """Factory reset: erases the PIN and every credential. The key must have been
        plugged in less than 10 seconds ago (else :class:`ResetNotAllowed`) and asks for a
        touch."""
        with self._operation(
            timeout=timeout, cancel=cancel, on_touch=on_touch, not_allowed=ResetNotAllowed
        ) as watch:
            ctap2 = self._ctap2()
            ctap2.reset(event=watch.event, on_keepalive=watch.on_keepalive)
            self._ctap2_cache = None  # its cached getInfo says a PIN is set

    # -- WebAuthn ----------------------------------------------------------------------
    def make_credential(
        self,
        options: PublicKeyCredentialCreationOptions | Mapping[str, Any],
        *,
        origin: str,
        pin_provider: PinProvider | None,
        on_touch: OnTouch | None,
        timeout: float = DEFAULT_TIMEOUT,
        cancel: threading.Event | None = None,
    ) -> RegistrationResponse:
        """Register a credential (WebAuthn create) through python-fido2's ``Fido2Client``,
        with client data ``{type: webauthn.create, challenge, origin}``.

        ``pin_provider`` is called (once) only if the key needs its PIN; it returns the PIN,
        or None to give up (:class:`PinRequired`). ``options.timeout`` is ignored: ``timeout``
        governs. ValueError if the RP ID is not valid for ``origin`` (a caller's mistake).
        """
        options = PublicKeyCredentialCreationOptions.from_dict(options)
        _check_rp_id(options.rp.id, origin)
        options = replace(options, timeout=None)
        with self._operation(timeout=timeout, cancel=cancel, on_touch=on_touch) as watch:
            client = self._client(origin, watch, pin_provider)
            return client.make_credential(options, event=watch.event)

    def get_assertion(
        self,
        options: PublicKeyCredentialRequestOptions | Mapping[str, Any],
        *,
        origin: str,
        pin_provider: PinProvider | None,
        on_touch: OnTouch | None,
        timeout: float = DEFAULT_TIMEOUT,
        cancel: threading.Event | None = None,
    ) -> list[AuthenticationResponse]:
        """Authenticate (WebAuthn get) through ``Fido2Client``; every assertion the key
        returns (several for a usernameless request when the key holds several accounts of
        the RP). Same callbacks and rules as :meth:`make_credential`."""
        options = PublicKeyCredentialRequestOptions.from_dict(options)
        _check_rp_id(options.rp_id or urlparse(origin).hostname, origin)
        options = replace(options, timeout=None)
        with self._operation(timeout=timeout, cancel=cancel, on_touch=on_touch) as watch:
            client = self._client(origin, watch, pin_provider)
            selection = client.get_assertion(options, event=watch.event)
            return [selection.get_response(i) for i in range(len(selection.get_assertions()))]

    # -- selection ---------------------------------------------------------------------
    def select(
        self,
        *,
        on_touch: OnTouch | None,
        timeout: float = DEFAULT_TIMEOUT,
        cancel: threading.Event | Sequence[threading.Event] | None = None,
    ) -> None:
        """Wait for a touch on this key (it blinks): authenticatorSelection on CTAP 2.1 keys;
        on 2.0 keys the usual probe, a makeCredential with an empty pinUvAuthParam that the
        key answers after a touch; on U2F-only keys a U2F register poll. Returns when
        touched."""
        with self._operation(timeout=timeout, cancel=cancel, on_touch=on_touch) as watch:
            ctap2 = self._ctap2_or_none()
            if ctap2 is None:
                watch.touch_requested()  # U2F keys do not say; they always wait
                collector = DefaultClientDataCollector("https://localhost")
                Fido2Client(self._device, collector).selection(watch.event)
            elif "FIDO_2_1" in ctap2.info.versions:
                ctap2.selection(event=watch.event, on_keepalive=watch.on_keepalive)
            else:
                # What python-fido2's Fido2Client.selection does for 2.0 keys, with keepalives.
                try:
                    ctap2.make_credential(
                        b"\0" * 32,
                        {"id": "example.com", "name": "example.com"},
                        {"id": b"dummy", "name": "dummy"},
                        [{"type": "public-key", "alg": -7}],
                        pin_uv_param=b"",
                        event=watch.event,
                        on_keepalive=watch.on_keepalive,
                    )
                except CtapError as e:
                    if e.code not in (ERR.PIN_NOT_SET, ERR.PIN_INVALID, ERR.PIN_AUTH_INVALID):
                        raise

    # -- internals ---------------------------------------------------------------------
    @contextmanager
    def _operation(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cancel: threading.Event | Sequence[threading.Event | None] | None = None,
        on_touch: OnTouch | None = None,
        not_allowed: type[FidoKeyError] | None = None,
        no_credentials: str | None = None,
    ) -> Iterator[_Watch]:
        """Run one operation: one at a time, with a watch (timeout, cancel, touch prompt),
        and python-fido2's and the OS's exceptions translated."""
        with self._lock:
            self._check_usable()
            events = _events(cancel)
            if any(e.is_set() for e in events):
                raise Cancelled()
            watch = _Watch(timeout, events, self._abandon, on_touch)
            watch.arm()
            try:
                yield watch
            except FidoKeyError as e:
                if isinstance(e, KeyRemoved):
                    self._died(e)
                raise
            except _FAILURES as e:
                raise self._failure(e, watch, not_allowed, no_credentials) from e
            finally:
                watch.close()

    def _failure(
        self,
        exc: Exception,
        watch: _Watch,
        not_allowed: type[FidoKeyError] | None,
        no_credentials: str | None,
    ) -> FidoKeyError:
        if watch.abandoned:
            return self._died(
                KeyCommunicationError(
                    "The security key stopped answering. Remove it, insert it again, and retry."
                )
            )
        ctap = exc.cause if isinstance(exc, ClientError) else exc
        code = ctap.code if isinstance(ctap, CtapError) else None
        if code == ERR.PIN_INVALID:
            return translate(ctap, retries=self._retries_after_failure())
        if code == ERR.NOT_ALLOWED and not_allowed is not None:
            return not_allowed(ctap_code=code)
        if code == ERR.NO_CREDENTIALS and no_credentials is not None:
            return NoCredentials(no_credentials, ctap_code=code)
        error = translate(
            exc, min_pin_length=self._cached_min_pin_length(), timeout=watch.timeout
        )
        if watch.reason is not None and isinstance(error, (Cancelled, TouchTimeout)):
            return watch.error()  # our timer or the caller's cancel, not the key's doing
        if isinstance(error, KeyRemoved):
            self._died(error)
        return error

    def _retries_after_failure(self) -> int | None:
        try:
            return ClientPin(self._ctap2()).get_pin_retries()[0]
        except Exception as e:  # noqa: BLE001 (the wrong PIN is the error to report)
            logger.debug("cannot read PIN retries after a wrong PIN: %s", e)
            return None

    def _cached_min_pin_length(self) -> int | None:
        return self._ctap2_cache.info.min_pin_length if self._ctap2_cache is not None else None

    def _abandon(self) -> None:
        """Called by a watch's timer when the key ignores a cancel: closing the connection
        makes the blocked read fail (simulators, and most OS backends)."""
        self.close()

    def _died(self, error: FidoKeyError) -> FidoKeyError:
        self._dead = error
        self.close()
        return error

    def _check_usable(self) -> None:
        if self._dead is not None:
            raise type(self._dead)(self._dead.message)
        if self._closed:
            raise ValueError("the FidoKey is closed")

    def _ctap2_or_none(self) -> Ctap2 | None:
        if self._ctap2_cache is None:
            if not self._device.capabilities & 0x04:  # CAPABILITY.CBOR
                return None
            self._ctap2_cache = Ctap2(self._device)
        return self._ctap2_cache

    def _ctap2(self) -> Ctap2:
        ctap2 = self._ctap2_or_none()
        if ctap2 is None:
            raise UnsupportedKey(
                "This security key only supports the older U2F standard, not FIDO2. "
                "Use a FIDO2 key."
            )
        return ctap2

    @staticmethod
    def _need_pin_support(info: Info) -> None:
        if not ClientPin.is_supported(info):
            raise UnsupportedKey("This security key does not support a PIN.")

    def _credman(self, pin: str) -> CredentialManagement:
        ctap2 = self._ctap2()
        if not CredentialManagement.is_supported(ctap2.info):
            raise UnsupportedKey(
                "This security key cannot list or delete the sign-ins stored on it."
            )
        self._need_pin_support(ctap2.info)
        if not pin:
            raise PinRequired()
        client_pin = ClientPin(ctap2)
        token = client_pin.get_pin_token(pin, ClientPin.PERMISSION.CREDENTIAL_MGMT)
        return CredentialManagement(ctap2, client_pin.protocol, token)

    def _client(
        self, origin: str, watch: _Watch, pin_provider: PinProvider | None
    ) -> Fido2Client:
        return Fido2Client(
            self._device,
            client_data_collector=DefaultClientDataCollector(origin),
            user_interaction=_Interaction(watch, pin_provider),
        )


def _check_new_pin(pin: str, min_length: int) -> None:
    if not isinstance(pin, str):
        raise TypeError("the PIN must be a str")
    if len(pin) < min_length or len(pin.encode("utf-8")) > MAX_PIN_BYTES:
        raise PinPolicyViolation(min_length, ctap_code=None)


def _check_rp_id(rp_id: str | None, origin: str) -> None:
    if not rp_id or not verify_rp_id(rp_id, origin):
        raise ValueError(f"RP ID {rp_id!r} is not valid for the origin {origin!r}")


# --------------------------------------------------------------------------- several keys
def select_key(
    keys: Sequence[FidoKey],
    *,
    on_touch: OnTouch | None,
    timeout: float = DEFAULT_TIMEOUT,
    cancel: threading.Event | None = None,
) -> FidoKey:
    """Let the user pick one of several keys by touching it.

    One key is returned at once (no touch). Otherwise every key is asked at the same time
    (:meth:`FidoKey.select`: they blink and wait for a touch); ``on_touch`` is called once,
    when the first asks; the first key touched is returned and the others are cancelled
    (CTAPHID_CANCEL) and waited for. The keys stay open: closing the others is the caller's.

    Raises :class:`TouchTimeout` if nobody touches a key within ``timeout`` seconds,
    :class:`Cancelled` if ``cancel`` is set, :class:`NoKeyFound` if there are no keys or all
    of them failed (removed, refused).
    """
    if not keys:
        raise NoKeyFound()
    if len(keys) == 1:
        return keys[0]
    if cancel is not None and cancel.is_set():
        raise Cancelled()

    stop = threading.Event()  # a key was chosen: the others end their wait
    prompt = _Once(on_touch)
    lock = threading.Lock()
    winner: list[FidoKey] = []
    failures: dict[int, FidoKeyError] = {}

    def wait_for(index: int, key: FidoKey) -> None:
        try:
            key.select(on_touch=prompt, timeout=timeout, cancel=_events([cancel, stop]))
        except FidoKeyError as e:
            failures[index] = e
            if not isinstance(e, (Cancelled, TouchTimeout)):
                logger.info("key %s left out of the selection: %s", key.path, e)
        except Exception as e:  # noqa: BLE001 (a thread must not die silently)
            logger.exception("selecting key %s failed", key.path)
            failures[index] = translate(e)
        else:
            with lock:
                if not winner:
                    winner.append(key)
            stop.set()

    threads = [
        threading.Thread(target=wait_for, args=(i, k), name=f"fido-select-{i}", daemon=True)
        for i, k in enumerate(keys)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + ABANDON_GRACE + 5.0)
        if t.is_alive():
            logger.warning("a key did not end its selection wait; leaving it")

    if winner:
        return winner[0]
    if cancel is not None and cancel.is_set():
        raise Cancelled()
    if any(isinstance(e, TouchTimeout) for e in failures.values()):
        raise TouchTimeout(timeout)
    raise NoKeyFound()


# --------------------------------------------------------------------------- discovery
def list_keys(environ: Mapping[str, str] | None = None) -> list[KeyInfo]:
    """Every key found (USB hidraw, then the simulators named by ``TOKEN_AGENT_SIM_KEYS`` in
    ``environ``, default ``os.environ``), each opened, asked getInfo and its PIN retries, and
    closed. A key that fails is logged and left out. ValueError if ``TOKEN_AGENT_SIM_KEYS``
    is malformed."""
    found = []
    for descriptor in discovery.list_descriptors(environ):
        try:
            with FidoKey.open(descriptor) as key:
                found.append(key.info())
        except FidoKeyError as e:
            logger.warning("FIDO key %s left out: %s", descriptor.path, e)
    return found


def open_keys(environ: Mapping[str, str] | None = None) -> list[FidoKey]:
    """Open every key found (as :func:`list_keys` finds them); failures are logged and left
    out. The caller closes them."""
    keys = []
    for descriptor in discovery.list_descriptors(environ):
        try:
            keys.append(FidoKey.open(descriptor))
        except FidoKeyError as e:
            logger.warning("FIDO key %s left out: %s", descriptor.path, e)
    return keys


def open_single_key(
    environ: Mapping[str, str] | None = None,
    *,
    on_touch: OnTouch | None,
    timeout: float = DEFAULT_TIMEOUT,
    cancel: threading.Event | None = None,
) -> FidoKey:
    """The one key to use: :class:`NoKeyFound` if there is none, the key itself if there is
    one, and the key the user touches (:func:`select_key`) if there are several; the others
    are closed."""
    keys = open_keys(environ)
    if not keys:
        raise NoKeyFound()
    chosen = None
    try:
        chosen = select_key(keys, on_touch=on_touch, timeout=timeout, cancel=cancel)
        return chosen
    finally:
        for key in keys:
            if key is not chosen:
                key.close()
