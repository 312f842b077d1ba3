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

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlparse

from fido2.ctap import STATUS, CtapDevice, CtapError
from fido2.ctap2 import Ctap2, Info
from fido2.ctap2.credman import CredentialManagement
from fido2.ctap2.pin import ClientPin
from fido2.hid import ConnectionFailure
from fido2.hid.base import HidDescriptor
from fido2.utils import websafe_encode
from fido2.webauthn import (
    AuthenticationResponse,
    AuthenticatorAssertionResponse,
    AuthenticatorAttachment,
    AuthenticatorData,
    CollectedClientData,
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
    PinNotSet,
    PinPolicyViolation,
    PinRequired,
    ResetNotAllowed,
    TouchTimeout,
    UnsupportedKey,
    _client_error,
    translate,
)

__all__ = [
    "ABANDON_GRACE",
    "Assertion",
    "DEFAULT_TIMEOUT",
    "FidoKey",
    "KeyInfo",
    "ResidentCredential",
    "check_new_pin",
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
_BASE_FAILURES = (CtapError, ConnectionFailure, OSError, ValueError, KeyError)


def _failures() -> tuple[type[BaseException], ...]:
    """What a key operation may raise, for ``except``: python-fido2's ClientError joins
    once ``fido2.client`` is loaded (only Fido2Client raises it; the module is not imported
    here because it is the costliest of python-fido2 and logins do not need it)."""
    client_error = _client_error()
    return _BASE_FAILURES + ((client_error,) if client_error is not None else ())

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


@dataclass(frozen=True)
class Assertion:
    """One assertion from a key, with the client data it signed (WebAuthn's
    AuthenticatorAssertionResponse, in plain bytes)."""

    credential_id: bytes
    client_data_json: bytes
    authenticator_data: bytes
    signature: bytes
    user_handle: bytes | None = None

    def to_json(self) -> dict:
        """WebAuthn's AuthenticationResponseJSON (base64url fields), for another RP."""
        response = {
            "clientDataJSON": websafe_encode(self.client_data_json),
            "authenticatorData": websafe_encode(self.authenticator_data),
            "signature": websafe_encode(self.signature),
        }
        if self.user_handle is not None:
            response["userHandle"] = websafe_encode(self.user_handle)
        return {
            "id": websafe_encode(self.credential_id),
            "rawId": websafe_encode(self.credential_id),
            "type": "public-key",
            "response": response,
            "authenticatorAttachment": "cross-platform",
            "clientExtensionResults": {},
        }

    def to_response(self) -> AuthenticationResponse:
        """The same as python-fido2's ``AuthenticationResponse``."""
        return AuthenticationResponse(
            raw_id=self.credential_id,
            response=AuthenticatorAssertionResponse(
                client_data=CollectedClientData(self.client_data_json),
                authenticator_data=AuthenticatorData(self.authenticator_data),
                signature=self.signature,
                user_handle=self.user_handle,
            ),
            authenticator_attachment=AuthenticatorAttachment.CROSS_PLATFORM,
        )


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


class _Interaction:  # duck-types fido2.client.UserInteraction (not imported: see _failures)
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
        """Open a key from ``drivers.fido.discovery.list_descriptors``, ready for use: the
        channel is allocated (CTAPHID_INIT) and, for a FIDO2 key, what it is (getInfo) read,
        so that the operations that follow only do their own round trips."""
        try:
            key = cls(discovery.open_device(descriptor))
        except _failures() as e:
            raise translate(e) from e
        try:
            key._ctap2_or_none()
        except _failures() as e:
            key.close()
            raise translate(e) from e
        return key

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
            check_new_pin(new, info.min_pin_length)
            ClientPin(ctap2).set_pin(new)

    def change_pin(self, old: str, new: str) -> None:
        """Change the PIN. :class:`WrongPin` (with the tries left) if ``old`` is wrong."""
        with self._operation():
            ctap2 = self._ctap2()
            info = ctap2.get_info()
            self._need_pin_support(info)
            if not old:
                raise PinRequired()
            check_new_pin(new, info.min_pin_length)
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
        """Authenticate (WebAuthn get) with WebAuthn request options; every assertion the
        key returns, as python-fido2 ``AuthenticationResponse`` objects. A convenience over
        :meth:`assert_credentials`, which the agent's login uses directly."""
        options = PublicKeyCredentialRequestOptions.from_dict(options)
        assertions = self.assert_credentials(
            rp_id=options.rp_id or urlparse(origin).hostname or "",
            challenge=options.challenge,
            allow=[c.id for c in options.allow_credentials or ()],
            user_verification=options.user_verification,
            origin=origin, pin_provider=pin_provider, on_touch=on_touch, timeout=timeout,
            cancel=cancel,
        )
        return [a.to_response() for a in assertions]

    def assert_credentials(
        self,
        *,
        rp_id: str,
        challenge: bytes,
        allow: Sequence[bytes] = (),
        user_verification: str | None = "preferred",
        origin: str,
        pin_provider: PinProvider | None,
        on_touch: OnTouch | None,
        timeout: float = DEFAULT_TIMEOUT,
        cancel: threading.Event | None = None,
    ) -> list[Assertion]:
        """Authenticate (WebAuthn get): the client data ``{type: webauthn.get, challenge,
        origin}``, then getAssertion for ``rp_id`` over the credential IDs in ``allow``
        (empty: the key's discoverable credentials). Returns every assertion the key gives
        (several for a usernameless request when the key holds several accounts of the RP).
        ``user_verification``: ``required``, ``preferred`` (used when the key has a PIN) or
        ``discouraged``. Same callbacks and rules as :meth:`make_credential`.

        This is the login path, so it talks CTAP2 directly (getKeyAgreement and
        getPinUvAuthToken only when user verification is wanted, then getAssertion) rather
        than through ``Fido2Client``, which asks the key for its getInfo three times per call
        and costs more to import than the whole ceremony takes; nor does it build python-fido2's
        WebAuthn dataclasses, whose construction costs about half a millisecond each. What it
        decides is what ``Fido2Client`` decides, except that ``preferred`` user verification
        on a key without a PIN proceeds without it (WebAuthn's meaning of *preferred*) instead
        of failing.
        """
        _check_rp_id(rp_id, origin)
        client_data = CollectedClientData.create(
            type=CollectedClientData.TYPE.GET, challenge=challenge, origin=origin
        )
        client_data_hash = hashlib.sha256(client_data).digest()
        with self._operation(
            timeout=timeout, cancel=cancel, on_touch=on_touch,
            no_credentials="This key holds no credential for this sign-in.",
        ) as watch:
            ctap2 = self._ctap2()
            info = ctap2.info  # what the key is, read when it was opened
            # A PIN is only ever removed by a reset, which a later getPinToken reports
            # (PIN_NOT_SET); a PIN set since the key was opened shows only in a fresh getInfo.
            current = dict(info.options)
            if not any(current.get(k) for k in ("uv", "clientPin", "bioEnroll")):
                current = self._current_options(ctap2)
            pin_param = pin_protocol = None
            ga_options = None
            if self._wants_uv(current, user_verification):
                if current.get("uv") and not ClientPin.is_token_supported(info):
                    ga_options = {"uv": True}  # built-in UV, CTAP 2.0 style
                else:
                    protocol, token = self._uv_token(ctap2, watch, pin_provider, rp_id,
                                                     bool(current.get("uv")))
                    pin_param = protocol.authenticate(token, client_data_hash)
                    pin_protocol = protocol.VERSION
            descriptors = [
                {"type": "public-key", "id": cred_id} for cred_id in allow
                if not info.max_cred_id_length or len(cred_id) <= info.max_cred_id_length
            ]
            if allow and not descriptors:
                raise NoCredentials("This key holds no credential for this sign-in.")
            chunk = info.max_creds_in_list or len(descriptors) or 1
            if len(descriptors) > chunk:  # too many for one request: find the key's own first
                descriptors = self._preflight(ctap2, rp_id, client_data_hash, descriptors,
                                              chunk, pin_param, pin_protocol, watch)
            request = {1: rp_id, 2: client_data_hash}
            for field_key, value in ((3, descriptors), (5, ga_options), (6, pin_param),
                                     (7, pin_protocol)):
                if value:
                    request[field_key] = value
            first = ctap2.send_cbor(Ctap2.CMD.GET_ASSERTION, request, event=watch.event,
                                    on_keepalive=watch.on_keepalive)
            answers = [first] + [
                ctap2.send_cbor(Ctap2.CMD.GET_NEXT_ASSERTION)
                for _ in range(1, _count(first.get(5)))
            ]
            return [_assertion(a, bytes(client_data), descriptors) for a in answers]

    @staticmethod
    def _current_options(ctap2: Ctap2) -> dict:
        """getInfo's options as they are now (a PIN may have been set since the key was
        opened, by us or by another program), read without parsing the whole Info, which
        python-fido2 makes expensive (milliseconds) and a login does not need."""
        options = ctap2.send_cbor(Ctap2.CMD.GET_INFO).get(0x04, {})
        if not isinstance(options, Mapping):
            raise KeyCommunicationError("The security key sent a malformed getInfo answer.")
        return dict(options)

    @staticmethod
    def _wants_uv(options: Mapping[str, Any], requirement: str | None) -> bool:
        """Whether to verify the user, and whether that is possible (else PinNotSet)."""
        configured = any(options.get(k) for k in ("uv", "clientPin", "bioEnroll"))
        required = requirement == "required" or bool(options.get("alwaysUv"))
        if required and not configured:
            raise PinNotSet()
        return required or (requirement in ("preferred", None) and configured)

    def _uv_token(
        self, ctap2: Ctap2, watch: _Watch, pin_provider: PinProvider | None, rp_id: str,
        uv_builtin: bool,
    ) -> tuple[Any, bytes]:
        """A pinUvAuthToken with the getAssertion permission: built-in UV where the key has
        it, else the PIN from ``pin_provider`` (the countdown is paused while it runs)."""
        client_pin = ClientPin(ctap2)
        permission = ClientPin.PERMISSION.GET_ASSERTION
        if uv_builtin and ClientPin.is_token_supported(ctap2.info):
            token = client_pin.get_uv_token(permission, rp_id, watch.event, watch.on_keepalive)
            return client_pin.protocol, token
        pin = _Interaction(watch, pin_provider).request_pin(permission, rp_id)
        return client_pin.protocol, client_pin.get_pin_token(pin, permission, rp_id)

    @staticmethod
    def _preflight(ctap2: Ctap2, rp_id: str, client_data_hash: bytes, allow: list[dict],
                   chunk: int, pin_param: bytes | None, pin_protocol: int | None,
                   watch: _Watch) -> list[dict]:
        """The allow-list entries this key holds, asked silently (up=false) in chunks the
        key accepts, as browsers do; NO_CREDENTIALS if none."""
        for start in range(0, len(allow), chunk):
            part = allow[start:start + chunk]
            try:
                found = ctap2.get_assertion(
                    rp_id, client_data_hash, part, None, {"up": False}, pin_param, pin_protocol,
                    event=watch.event,
                )
            except CtapError as e:
                if e.code == ERR.NO_CREDENTIALS:
                    continue
                raise
            return [found.credential or part[0]]
        raise CtapError(ERR.NO_CREDENTIALS)

    def holds_credential(self, rp_id: str, credential_ids: Sequence[bytes], *,
                         timeout: float = 5.0) -> bool:
        """Whether this key holds one of ``credential_ids`` for ``rp_id``, asked silently
        (getAssertion with up=false, as browsers' pre-flight does: no touch, no PIN; a key may
        count it on its signature counter, which only moves on). False for a key that cannot
        say."""
        if not credential_ids:
            return False
        client_data_hash = hashlib.sha256(b"token-agent pre-flight").digest()
        try:
            with self._operation(timeout=timeout, no_credentials="") as watch:
                ctap2 = self._ctap2()
                info = ctap2.info
                descriptors = [{"type": "public-key", "id": c} for c in credential_ids
                               if not info.max_cred_id_length or len(c) <= info.max_cred_id_length]
                if not descriptors:
                    return False
                chunk = info.max_creds_in_list or len(descriptors)
                self._preflight(ctap2, rp_id, client_data_hash, descriptors, chunk, None, None,
                                watch)
                return True
        except NoCredentials:
            return False
        except FidoKeyError as e:
            logger.info("key %s could not be asked for its credentials: %s", self.path, e)
            return False

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
                from fido2.client import DefaultClientDataCollector, Fido2Client

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
            except _failures() as e:
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
        client_error = _client_error()
        ctap = exc.cause if client_error and isinstance(exc, client_error) else exc
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
        if isinstance(error, KeyRemoved) or isinstance(exc, ConnectionFailure):
            # a framing failure leaves the connection out of step with the key (unread
            # reports of the answer): closed, so that its holder opens the key afresh
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

    def _client(self, origin: str, watch: _Watch, pin_provider: PinProvider | None):
        from fido2.client import DefaultClientDataCollector, Fido2Client

        return Fido2Client(
            self._device,
            client_data_collector=DefaultClientDataCollector(origin),
            user_interaction=_Interaction(watch, pin_provider),
        )


def _count(value: object) -> int:
    """numberOfCredentials (getAssertion's 0x05), 1 when absent."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _assertion(answer: Mapping[int, Any], client_data_json: bytes,
               descriptors: Sequence[Mapping[str, Any]]) -> Assertion:
    """An :class:`Assertion` from a getAssertion / getNextAssertion answer (its CBOR map),
    read here rather than through python-fido2's AssertionResponse, whose parsing resolves
    type hints on every call (about a millisecond in a fresh process)."""
    credential, auth_data, signature = answer.get(1), answer.get(2), answer.get(3)
    if credential is None and len(descriptors) == 1:  # the key may omit it (CTAP 2.1 6.2.2)
        credential = descriptors[0]
    user = answer.get(4)
    if not (isinstance(credential, Mapping) and isinstance(credential.get("id"), bytes)
            and isinstance(auth_data, bytes) and isinstance(signature, bytes)
            and (user is None or isinstance(user, Mapping))):
        raise KeyCommunicationError("The security key sent a malformed assertion.")
    handle = user.get("id") if user is not None else None
    return Assertion(
        credential_id=credential["id"],
        client_data_json=client_data_json,
        authenticator_data=auth_data,
        signature=signature,
        user_handle=handle if isinstance(handle, bytes) else None,
    )


def check_new_pin(pin: str, min_length: int) -> None:
    """The CTAP rules for a new PIN (at least ``min_length`` code points, the key's
    getInfo minPINLength; at most 63 bytes of UTF-8): :class:`PinPolicyViolation` if
    ``pin`` breaks them. The key may still refuse it."""
    if not isinstance(pin, str):
        raise TypeError("the PIN must be a str")
    if len(pin) < min_length or len(pin.encode("utf-8")) > MAX_PIN_BYTES:
        raise PinPolicyViolation(min_length, ctap_code=None)


def _check_rp_id(rp_id: str | None, origin: str) -> None:
    if rp_id and origin == f"https://{rp_id}":
        return  # the origin is the RP ID itself: valid, no public-suffix lookup needed
    from fido2.rpid import verify_rp_id

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


def open_key_for(
    rp_id: str,
    credential_ids: Sequence[bytes],
    environ: Mapping[str, str] | None = None,
    *,
    on_touch: OnTouch | None,
    timeout: float = DEFAULT_TIMEOUT,
    cancel: threading.Event | None = None,
) -> FidoKey:
    """The key to use for a login whose credentials are known: with one key, that key; with
    several, the ones holding one of ``credential_ids`` (asked silently, no touch), and among
    several of those the one the user touches. :class:`NoKeyFound` without keys,
    :class:`NoCredentials` when none holds the credentials. The others are closed."""
    keys = open_keys(environ)
    if not keys:
        raise NoKeyFound()
    chosen = None
    try:
        if len(keys) == 1:
            chosen = keys[0]
            return chosen
        holding = [k for k in keys if k.holds_credential(rp_id, credential_ids)]
        if not holding:
            raise NoCredentials("None of the security keys here holds a credential for this "
                                "sign-in.")
        chosen = holding[0] if len(holding) == 1 else select_key(
            holding, on_touch=on_touch, timeout=timeout, cancel=cancel)
        return chosen
    finally:
        for key in keys:
            if key is not chosen:
                key.close()


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
