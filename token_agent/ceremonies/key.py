"""Enrol a FIDO2 security key for a user, and log in with one.

The agent plays both WebAuthn roles for its own relying party (one RP ID per organisation,
so a key enrolled on one workstation works on every workstation sharing the store): it builds
the options and the client data, talks to the key through ``drivers.fido``, then checks the
response itself (``token_agent.webauthn``) before anything is written. A ceremony's writes
(credential, signature counter, audit event) go into the store in one transaction.
"""

from __future__ import annotations

import hmac
import logging
import os
import shlex
import time
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from fido2.webauthn import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialCreationOptions,
    PublicKeyCredentialDescriptor,
    PublicKeyCredentialParameters,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialType,
    PublicKeyCredentialUserEntity,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)
from fido2.utils import websafe_encode

from drivers.fido import errors as key_errors
from drivers.fido.keys import FidoKey

from .. import webauthn
from .keypresence import PinGuard, PresenceRequired
from ..orgsettings import DEFAULT_RP_ID, DEFAULT_RP_NAME
from ..outcome import Factor, LoginOutcome, Reason
from ..store import SignCountRegression, Store, UnknownUser

log = logging.getLogger("token_agent.key")

#: COSE algorithms asked for at enrolment, in order of preference: ES256, EdDSA, RS256.
ALGORITHMS = (-7, -8, -257)


@dataclass(frozen=True)
class KeySettings:
    """The organisation's FIDO2 settings, kept in the store (``token-agent settings``)."""

    rp_id: str = DEFAULT_RP_ID
    rp_name: str = DEFAULT_RP_NAME
    user_verification: str = "preferred"
    attestation: webauthn.AttestationPolicy = field(default_factory=webauthn.AttestationPolicy)

    @property
    def origin(self) -> str:
        return f"https://{self.rp_id}"

    @classmethod
    def from_store(cls, store: Store) -> "KeySettings":
        from .. import orgsettings

        values = orgsettings.in_force(store.list_settings(),  # one query
                                      ("rp_id", "rp_name", "user_verification",
                                       "attestation_roots", "allowed_aaguids"))
        return cls(
            rp_id=values["rp_id"],
            rp_name=values["rp_name"],
            user_verification=values["user_verification"],
            attestation=webauthn.AttestationPolicy(
                roots_pem=tuple(values["attestation_roots"]),
                allowed_aaguids=tuple(values["allowed_aaguids"]),
            ),
        )


class _PinTracker:
    """Wraps the caller's PIN provider: remembers whether a PIN was given (so a UV flag can be
    attributed to knowledge rather than a biometric), never the PIN itself."""

    def __init__(self, provider: Callable[[], str | None]) -> None:
        self._provider = provider
        self.used = False

    def __call__(self) -> str | None:
        pin = self._provider()
        if pin:
            self.used = True
        return pin


@dataclass(frozen=True)
class EnrolResult:
    username: str
    name: str
    credential_id: bytes
    aaguid: str
    discoverable: bool
    user_verified: bool
    attestation_format: str
    attestation_trusted: bool
    warnings: tuple[str, ...]
    registration: dict  # the WebAuthn RegistrationResponseJSON
    challenge: bytes
    origin: str
    rp_id: str

    def to_json(self, *, export: bool = False) -> dict:
        data = {
            "user": self.username,
            "name": self.name,
            "credential_id": self.credential_id.hex(),
            "aaguid": self.aaguid,
            "discoverable": self.discoverable,
            "user_verified": self.user_verified,
            "attestation_format": self.attestation_format,
            "attestation_trusted": self.attestation_trusted,
            "warnings": list(self.warnings),
        }
        if export:
            data["webauthn"] = {
                "registration": self.registration,
                "challenge": websafe_encode(self.challenge),
                "origin": self.origin,
                "rp_id": self.rp_id,
            }
        return data


def pin_not_set(key_path: str) -> key_errors.PinNotSet:
    """The key's PinNotSet as enrolment says it: with the exact command that sets the PIN
    (the CLI without a terminal, the service: neither sets a PIN itself)."""
    return key_errors.PinNotSet(
        "This key has no PIN yet, and enrolling it needs one. Set a PIN on it first, then "
        f"enrol it again: token-agent keys pin set --key {shlex.quote(key_path)}")


class EnrolError(Exception):
    """Enrolment refused; ``reason`` is a stable code, the message is for people;
    ``recorded``: the ceremony recorded the refusal in the audit log already (else the front
    end has ``admin_ops.enrol_failed`` record it)."""

    def __init__(self, reason: str, message: str, *, recorded: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.recorded = recorded


def enrol_key(
    store: Store,
    key: FidoKey,
    username: str,
    *,
    name: str | None = None,
    pin_provider: Callable[[], str | None],
    on_touch: Callable[[], None] | None = None,
    timeout: float = 30.0,
    cancel: threading.Event | None = None,
    settings: KeySettings | None = None,
    presence: PinGuard | None = None,
    new_pin: Callable[[int], str | None] | None = None,
) -> EnrolResult:
    """Register ``key`` for ``username``. Raises EnrolError, drivers' FidoKeyError, or the
    store's errors; writes nothing unless every check passed. ``presence``: who must touch
    the key before its PIN is tried (:mod:`.keypresence`); by default, a caller that is not
    the login service.

    A key that can have a PIN but has none yet cannot verify its user, which ``preferred``
    (the default) and ``required`` want: the key gets its first PIN here, as a browser does.
    ``new_pin(min_length)`` (a person at a terminal: the key's minimum PIN length checked,
    the PIN typed twice) gives it; the PIN is set on the key and used for this enrolment.
    Without ``new_pin``, or when it gives None, :class:`~drivers.fido.errors.PinNotSet`
    says which command sets the PIN (:func:`pin_not_set`)."""
    settings = settings or KeySettings.from_store(store)
    user = store.get_user(username)
    existing = store.list_fido_credentials(user.id)
    name = name or f"key {len(existing) + 1}"
    if any(c.name == name for c in existing):
        raise EnrolError("name-taken", f"{username} already has a key named {name!r}")
    challenge = os.urandom(32)
    options = PublicKeyCredentialCreationOptions(
        rp=PublicKeyCredentialRpEntity(name=settings.rp_name, id=settings.rp_id),
        user=PublicKeyCredentialUserEntity(
            name=user.username, id=user.user_handle, display_name=user.display_name or user.username
        ),
        challenge=challenge,
        pub_key_cred_params=[
            PublicKeyCredentialParameters(type=PublicKeyCredentialType.PUBLIC_KEY, alg=alg)
            for alg in ALGORITHMS
        ],
        timeout=int(timeout * 1000),
        exclude_credentials=[
            PublicKeyCredentialDescriptor(type=PublicKeyCredentialType.PUBLIC_KEY, id=c.credential_id)
            for c in existing
        ],
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            user_verification=UserVerificationRequirement(settings.user_verification),
        ),
        attestation=AttestationConveyancePreference.DIRECT,
        extensions={"credProps": True},
    )
    presence = presence or PinGuard(trusted=False, on_touch=on_touch, timeout=timeout,
                                    cancel=cancel)

    def register(provider: Callable[[], str | None]):
        pins = _PinTracker(presence.pin_provider(key, provider))
        return key.make_credential(options, origin=settings.origin, pin_provider=pins,
                                   on_touch=on_touch, timeout=timeout, cancel=cancel)

    try:
        response = register(pin_provider)
    except key_errors.PinNotSet:
        first = new_pin(key.info().min_pin_length) if new_pin is not None else None
        if not first:
            raise pin_not_set(key.path) from None
        key.set_pin(first)
        log.info("first PIN set on key %s for the enrolment of %s", key.path, username)
        response = register(lambda: first)
    check = verify_enrolment(
        store, user, settings=settings, rp_id=settings.rp_id, origin=settings.origin,
        challenge=challenge, client_data_json=bytes(response.response.client_data),
        attestation_object=bytes(response.response.attestation_object),
        credential_id=response.raw_id)
    cred_props = (response.client_extension_results or {}).get("credProps") or {}
    discoverable = bool(cred_props.get("rk", False))
    warnings = enrolment_warnings(settings, check)
    save_enrolment(store, user, name=name, check=check, rp_id=settings.rp_id,
                   discoverable=discoverable, transports=["usb"], cancel=cancel)
    log.info("enrolled key %r for %s (aaguid %s)", name, username, check.aaguid)
    return EnrolResult(
        username=user.username, name=name, credential_id=check.credential_id,
        aaguid=check.aaguid, discoverable=discoverable, user_verified=check.user_verified,
        attestation_format=check.attestation_format,
        attestation_trusted=check.attestation_trusted, warnings=tuple(warnings),
        registration=dict(response), challenge=challenge, origin=settings.origin,
        rp_id=settings.rp_id,
    )


def verify_enrolment(store: Store, user, *, settings: KeySettings, rp_id: str, origin: str,
                     challenge: bytes, client_data_json: bytes, attestation_object: bytes,
                     credential_id: bytes, via: str | None = None) -> webauthn.RegistrationCheck:
    """The relying party's checks of a registration for ``rp_id`` / ``origin`` under the
    organisation's settings (user verification, attestation policy); a refusal is recorded
    (``enrol.key`` refused) and raised as :class:`EnrolError` (``recorded=True``).
    ``credential_id``: the one the client says it made, which must be the attested one."""
    try:
        check = webauthn.verify_registration(
            rp_id=rp_id,
            origin=origin,
            challenge=challenge,
            client_data_json=client_data_json,
            attestation_object=attestation_object,
            require_uv=settings.user_verification == "required",
            policy=settings.attestation,
        )
    except webauthn.VerificationError as e:
        store.record_event("enrol.key", user_id=user.id, outcome="refused",
                           detail={"reason": e.reason, **({"via": via} if via else {})})
        raise EnrolError(e.reason, e.message, recorded=True) from None
    if not hmac.compare_digest(check.credential_id, bytes(credential_id)):
        raise EnrolError("verification-failed", "credential ID differs from the attested one")
    return check


def enrolment_warnings(settings: KeySettings, check: webauthn.RegistrationCheck) -> list[str]:
    """What the person enrolling a key is told about it."""
    warnings = []
    if not settings.attestation.enforced:
        warnings.append("no attestation roots or AAGUIDs are configured: any key model is "
                        "accepted (token-agent trust add-root / add-aaguid)")
    if not check.user_verified:
        warnings.append("the key did not verify a PIN at enrolment: it counts as one factor")
    return warnings


def save_enrolment(store: Store, user, *, name: str, check: webauthn.RegistrationCheck,
                   rp_id: str, discoverable: bool, transports: Sequence[str],
                   cancel: threading.Event | None = None, via: str | None = None) -> None:
    """Store a verified registration as the user's key ``name``, with its ``enrol.key``
    audit event, in one transaction (whoever carried the ceremony: the agent talking to a
    key, or a browser: ``via="browser"``). The store's ``CredentialExists`` when the
    credential or the name is taken."""
    with store.transaction():
        if cancel is not None and cancel.is_set():  # the person left: nobody to give it to
            raise key_errors.Cancelled()
        store.add_fido_credential(
            user.id,
            name=name,
            credential_id=check.credential_id,
            public_key=check.public_key,
            aaguid=check.aaguid,
            sign_count=check.sign_count,
            rp_id=rp_id,
            discoverable=discoverable,
            uv_enrolled=check.user_verified,
            attestation_format=check.attestation_format,
            attestation_trusted=check.attestation_trusted,
            transports=list(transports),
        )
        store.record_event(
            "enrol.key", user_id=user.id, credential_id=check.credential_id, outcome="success",
            detail={"name": name, "aaguid": check.aaguid,
                    "discoverable": discoverable, "attestation_trusted": check.attestation_trusted,
                    **({"via": via} if via else {})},
        )


_DEVICE_FAILURES: tuple[tuple[type, Reason], ...] = (
    (key_errors.WrongPin, Reason.WRONG_PIN),
    (key_errors.PinAuthBlocked, Reason.PIN_AUTH_BLOCKED),
    (key_errors.PinBlocked, Reason.PIN_BLOCKED),
    (key_errors.PinRequired, Reason.PIN_REQUIRED),
    (key_errors.TouchTimeout, Reason.TIMEOUT),
    (key_errors.Cancelled, Reason.CANCELLED),
    (key_errors.KeyRemoved, Reason.DEVICE_REMOVED),
    (key_errors.NoKeyFound, Reason.NO_DEVICE),
    (key_errors.NoCredentials, Reason.UNKNOWN_CREDENTIAL),
    (PresenceRequired, Reason.PRESENCE_REQUIRED),
)


def device_failure(e: key_errors.FidoKeyError) -> Reason:
    """The login failure reason for an error of the key itself."""
    for cls, reason in _DEVICE_FAILURES:
        if isinstance(e, cls):
            return reason
    return Reason.DEVICE_ERROR


def login_with_key(
    store: Store,
    key: FidoKey,
    *,
    username: str | None = None,
    pin_provider: Callable[[], str | None],
    on_touch: Callable[[], None] | None = None,
    timeout: float = 30.0,
    cancel: threading.Event | None = None,
    settings: KeySettings | None = None,
    export: bool = False,
    presence: PinGuard | None = None,
) -> LoginOutcome:
    """Authenticate with a key: for ``username``, or usernameless (a discoverable credential
    says who it is). Always returns an outcome; failures are recorded in the audit log.
    ``presence`` as for :func:`enrol_key`."""
    started = time.perf_counter()
    settings = settings or KeySettings.from_store(store)

    def fail(reason: Reason, message: str, user=None, cred=None) -> LoginOutcome:
        return key_failure(store, reason, message, username=username, user=user, cred=cred)

    user = None
    creds = []
    allow: list[bytes] = []
    if username is not None:
        try:
            user = store.get_user(username)
        except UnknownUser:
            return fail(Reason.UNKNOWN_USER, f"no user {username!r}")
        if user.disabled:
            return fail(Reason.USER_DISABLED, f"{username} is disabled", user)
        creds = [c for c in store.list_fido_credentials(user.id) if c.rp_id == settings.rp_id]
        if not creds:
            return fail(Reason.NO_CREDENTIAL, f"{username} has no security key enrolled", user)
        allow = [c.credential_id for c in creds]

    challenge = os.urandom(32)
    presence = presence or PinGuard(trusted=False, on_touch=on_touch, timeout=timeout,
                                    cancel=cancel)
    pins = _PinTracker(presence.pin_provider(key, pin_provider))
    try:
        responses = key.assert_credentials(
            rp_id=settings.rp_id, challenge=challenge, allow=allow,
            user_verification=settings.user_verification, origin=settings.origin,
            pin_provider=pins, on_touch=on_touch, timeout=timeout, cancel=cancel,
        )
    except key_errors.FidoKeyError as e:
        reason = device_failure(e)
        if reason is Reason.UNKNOWN_CREDENTIAL:
            message = (f"this key holds no credential enrolled for {username}" if username
                       else "this key holds no account for this organisation")
        else:
            message = e.message
        return fail(reason, message, user)

    outcome, response = settle_assertions(
        store, responses, user=user, username=username, rp_id=settings.rp_id,
        origin=settings.origin, challenge=challenge,
        require_uv=settings.user_verification == "required",
        uv_factor=lambda: Factor.KNOWLEDGE if pins.used else Factor.INHERENCE, enrolled=creds)
    if not outcome.ok:
        return outcome
    detail = dict(outcome.detail)
    detail["ceremony_ms"] = round((time.perf_counter() - started) * 1000, 3)
    if export:
        detail["webauthn"] = {
            "assertion": response.to_json(),
            "challenge": websafe_encode(challenge),
            "origin": settings.origin,
            "rp_id": settings.rp_id,
        }
    return replace(outcome, detail=detail)


def key_failure(store: Store, reason: Reason, message: str, *, username: str | None = None,
                user=None, cred=None, via: str | None = None) -> LoginOutcome:
    """A failed key login: the ``login.key`` audit event, and its outcome. ``via``: where
    the assertion came from when not from a key the agent talked to (``"browser"``)."""
    extra = {"via": via} if via else {}
    store.record_event(
        "login.key", user_id=user.id if user else None,
        username=None if user else username,
        credential_id=cred.credential_id if cred else None, outcome="failure",
        detail={"reason": reason.value, **({"credential": cred.name} if cred else {}), **extra},
    )
    log.info("key login failed: %s (%s)", reason.value, message)
    return LoginOutcome.failure(
        "key", reason, message, user=user.username if user else None,
        user_id=user.id if user else None, credential=cred.name if cred else None,
    )


def settle_assertions(
    store: Store,
    responses: Sequence,
    *,
    user,
    username: str | None,
    rp_id: str,
    origin: str,
    challenge: bytes,
    require_uv: bool,
    uv_factor: Callable[[], Factor],
    via: str | None = None,
    enrolled: Sequence = (),
) -> tuple[LoginOutcome, object | None]:
    """Everything a relying party decides about the assertions a key gave for ``challenge``,
    whoever carried them (the agent talking to a key, or a browser): which enrolled
    credential answered (one enrolled for ``rp_id``; of ``user`` when the login is for a
    user, else the one a discoverable credential names), its user handle, a suspended key,
    the WebAuthn checks (:func:`token_agent.webauthn.verify_assertion`), the signature
    counter (a regression flags the key as a suspected clone and refuses), and the audit
    event. ``responses``: objects with ``credential_id``, ``client_data_json``,
    ``authenticator_data``, ``signature`` and ``user_handle`` (bytes). ``uv_factor()``:
    what a verified user counts as (a PIN: knowledge; a biometric: inherence). ``enrolled``:
    the user's credentials when the caller has read them already. Returns the
    outcome and the response used (None on failure); failures are recorded."""

    def fail(reason: Reason, message: str, user=None, cred=None):
        return key_failure(store, reason, message, username=username, user=user, cred=cred,
                           via=via), None

    # Keep the responses from credentials this store knows, enrolled for this RP ID (a key
    # enrolled for the workstations' RP ID is not one a browser may use, and the reverse).
    by_id = {c.credential_id: c for c in enrolled}
    known = [(r, by_id.get(r.credential_id) or store.get_fido_credential(r.credential_id))
             for r in responses]
    known = [(r, c) for r, c in known if c is not None and c.rp_id == rp_id]
    if not known:
        return fail(Reason.UNKNOWN_CREDENTIAL,
                    "this key's credential is not enrolled here (unknown or removed)", user)
    if len(known) > 1:
        return fail(Reason.AMBIGUOUS, "this key holds several enrolled accounts: say which user",
                    user)
    response, cred = known[0]
    owner = user if user is not None and cred.user_id == user.id else \
        store.get_user_by_id(cred.user_id)
    if user is not None and owner.id != user.id:
        return fail(Reason.WRONG_USER, "the key answered with another user's credential", user, cred)
    user = owner
    if user.disabled:
        return fail(Reason.USER_DISABLED, f"{user.username} is disabled", user, cred)
    handle = response.user_handle
    if handle is not None and not hmac.compare_digest(handle, user.user_handle):
        return fail(Reason.VERIFICATION_FAILED, "the key's user handle does not match", user, cred)
    if cred.flagged:
        return fail(Reason.CREDENTIAL_FLAGGED,
                    f"key {cred.name!r} is suspended ({cred.flag_reason}): ask an administrator",
                    user, cred)
    try:
        check = webauthn.verify_assertion(
            public_key=cred.public_key,
            stored_sign_count=cred.sign_count,
            rp_id=rp_id,
            origin=origin,
            challenge=challenge,
            client_data_json=response.client_data_json,
            authenticator_data=response.authenticator_data,
            signature=response.signature,
            require_uv=require_uv,
        )
    except webauthn.VerificationError as e:
        reason = Reason.UV_REQUIRED if e.reason == "user-not-verified" else \
            Reason.VERIFICATION_FAILED
        return fail(reason, e.message, user, cred)

    def suspected_clone(stored: int, presented: int):
        why = f"signature counter went from {stored} to {presented}: possibly a cloned key"
        with store.transaction():
            store.flag_fido_credential(cred.credential_id, why)
            store.record_event("key.clone-suspected", user_id=user.id,
                               credential_id=cred.credential_id, outcome="refused",
                               detail={"credential": cred.name, "stored_count": stored,
                                       "presented_count": presented,
                                       **({"via": via} if via else {})})
        return fail(Reason.CLONE_SUSPECTED, why + "; the key is suspended", user, cred)

    if check.counter_regressed:
        return suspected_clone(cred.sign_count, check.sign_count)

    factors = [Factor.POSSESSION]
    if check.user_verified:
        factors.append(uv_factor())
    try:
        with store.transaction():
            # checks the counter again, atomically: two logins racing with one value fail
            store.record_fido_use(cred.credential_id, check.sign_count, time.time())
            store.record_event("login.key", user_id=user.id, credential_id=cred.credential_id,
                               outcome="success",
                               detail={"credential": cred.name,
                                       "user_verified": check.user_verified,
                                       **({"via": via} if via else {})})
    except SignCountRegression as e:
        return suspected_clone(e.stored, e.received)
    log.info("key login: %s with %r (uv=%s%s)", user.username, cred.name, check.user_verified,
             f", via {via}" if via else "")
    return LoginOutcome(
        ok=True, method="key", user=user.username, user_id=user.id, factors=tuple(factors),
        credential=cred.name, credential_id=cred.credential_id.hex(),
        user_verified=check.user_verified, detail={"sign_count": check.sign_count},
    ), response
