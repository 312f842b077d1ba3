"""Log in with an NHS-style smartcard, change its PIN, and a sponsor's unlock of a blocked card.

A card login, in this order (each step only when the one before passed):

1. read the authentication certificate (PIV slot 9A) and validate it with the organisation's
   trust policy (``token_agent.cardtrust``: chain to the anchors, dates, key usage, CRL):
   an expired, revoked or untrusted card is refused *before any PIN is asked*;
2. a card with no PIN tries left is refused ("Your card is locked: ask your sponsor to
   unlock it"), also before the PIN is asked;
3. the PIN (from ``pin_provider``; never logged, never stored), VERIFY on the card;
4. challenge-response: a fresh 32-byte random challenge, signed by the card's 9A key, the
   signature verified with the certificate's public key (proof that the card holds the key
   the certificate names: a copied certificate does not log in);
5. only then is the holder identified, by the UUID in the certificate, and mapped to a user:
   an enrolled smartcard identity (``Store.add_card_identity``), or, when the setting
   ``card_provision_on_first_use`` allows, a user created from the certificate (username =
   the UUID, display name = the holder's name).

A card with its PIN is two factors (possession + knowledge). The outcome is the same
:class:`~token_agent.outcome.LoginOutcome` as a key login (method ``"card"``); every success
and every failure is one audit event (``login.card``), written in one transaction with the
identity's last use (and, when provisioning, the new user and identity).

Settings (``token-agent card settings set KEY VALUE``, validated by :func:`set_card_setting`):
the ``card_*`` settings of the one schema, ``token_agent/orgsettings.py`` (trust anchors,
intermediates, CRL sources and age, stale / unreachable CRL behaviour, expiry warning,
provisioning on first use, lock command), with their defaults and validation.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from drivers.pcsc import errors as card_errors
from drivers.pkcs11 import errors as pkcs11_errors

from .. import orgsettings
from ..cardopen import session_driver
from ..orgsettings import DEFAULT_LOCK_COMMAND
from ..outcome import Factor, LoginOutcome, Reason
from ..store import Store, UserExists

if TYPE_CHECKING:
    from drivers.pcsc.piv import PivSession

    from ..cardtrust import CardIdentity, CardTrustPolicy

log = logging.getLogger("token_agent.card")

METHOD = "card"
SPONSOR_ROLES = ("sponsor", "ra")
PIN_RE = re.compile(r"[0-9]{4,8}")
#: setting -> (default, description): the smartcard settings of the schema (``orgsettings``)
CARD_SETTINGS: dict[str, tuple[Any, str]] = {
    name: (orgsettings.get(name).default, orgsettings.get(name).description)
    for name in orgsettings.CARD}


def card_setting_name(key: str) -> str:
    """A setting's one name (``card_trust_anchors``): the name without ``card_``
    (``trust_anchors``, what `card settings show` printed before) is accepted too."""
    return key if key in CARD_SETTINGS or f"card_{key}" not in CARD_SETTINGS else f"card_{key}"


def is_list_setting(key: str) -> bool:
    name = card_setting_name(key)
    return name in CARD_SETTINGS and orgsettings.get(name).is_list


def check_card_setting(key: str, value: Any) -> Any:
    """The validated value of a card setting (``ValueError`` when it is not acceptable)."""
    if key not in CARD_SETTINGS:
        raise ValueError(f"unknown card setting {key!r} (settable: {', '.join(CARD_SETTINGS)})")
    return orgsettings.check(key, value)


def set_card_setting(store: Store, key: str, value: Any) -> Any:
    """Validate and store one card setting; returns the stored value."""
    key = card_setting_name(key)
    value = check_card_setting(key, value)
    store.set_setting(key, value)
    return value


def enrol_card(store: Store, user, identity: "CardIdentity"):
    """Enrol the holder of a validated card (``identity``) for ``user``: the card identity
    and the event ``enrol.card``, in one transaction. ``CredentialExists`` when that card is
    enrolled already. Returns the stored identity."""
    with store.transaction():
        ident = store.add_card_identity(user.id, uuid=identity.uuid,
                                        holder_name=identity.holder_name)
        store.record_event("enrol.card", user_id=user.id, outcome="success",
                           detail={"uuid": identity.uuid, "provisioned": False})
    return ident


@dataclass(frozen=True)
class CardSettings:
    """The organisation's smartcard settings, from the store (one query)."""

    trust_anchors: tuple[str, ...] = ()
    intermediates: tuple[str, ...] = ()
    crl_sources: tuple[str, ...] = ()
    crl_max_age: int = 3600
    on_stale_crl: str = "refuse"
    on_unreachable_crl: str = "refuse"
    expiry_warning_days: int = 90
    provision_on_first_use: bool = False
    lock_command: str = DEFAULT_LOCK_COMMAND
    crl_cache_dir: str | None = None
    ra_source: str = ""

    @classmethod
    def from_store(cls, store: Store) -> "CardSettings":
        values = orgsettings.in_force(store.list_settings(), orgsettings.CARD)
        local = getattr(store, "local_dir", None)  # the data directory (not on PostgreSQL)
        cache = str(Path(local) / "crl-cache") if local is not None else None
        return cls(
            trust_anchors=tuple(values["card_trust_anchors"]),
            intermediates=tuple(values["card_intermediates"]),
            crl_sources=tuple(values["card_crl_sources"]),
            crl_max_age=values["card_crl_max_age"],
            on_stale_crl=values["card_on_stale_crl"],
            on_unreachable_crl=values["card_on_unreachable_crl"],
            expiry_warning_days=values["card_expiry_warning_days"],
            provision_on_first_use=values["card_provision_on_first_use"],
            lock_command=values["card_lock_command"],
            crl_cache_dir=cache,
            ra_source=values["card_ra_source"],
        )

    def to_json(self) -> dict:
        return asdict(self)

    def to_settings(self) -> dict[str, Any]:
        """The settings by the names `card settings set` takes (``card_trust_anchors``...),
        lists as lists; ``crl_cache_dir`` is not one of them (it is the data directory's)."""
        data = self.to_json()
        data.pop("crl_cache_dir")
        return {f"card_{k}": list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @property
    def lock_argv(self) -> list[str]:
        return shlex.split(self.lock_command) if self.lock_command else []

    def trust_policy(self) -> "CardTrustPolicy":
        """The trust policy these settings describe (``ValueError`` when no anchor is set)."""
        from ..cardtrust import CardTrustPolicy

        if not self.trust_anchors:
            raise ValueError("no smartcard trust anchors are configured (token-agent card "
                             "settings set card_trust_anchors ROOT.pem)")

        def blobs(items: tuple[str, ...], what: str) -> tuple[bytes, ...]:
            out = []
            for item in items:
                if "-----BEGIN" in item:
                    out.append(item.encode())
                    continue
                try:
                    out.append(Path(item).read_bytes())
                except OSError as e:
                    raise ValueError(f"cannot read the {what} {item}: {e.strerror or e}") from None
            return tuple(out)

        return CardTrustPolicy(
            anchors=blobs(self.trust_anchors, "trust anchor"),
            intermediates=blobs(self.intermediates, "intermediate certificate"),
            fetch_ca_issuers=not self.intermediates,
            crl_sources=self.crl_sources, crl_cache_dir=self.crl_cache_dir,
            crl_max_age=self.crl_max_age, on_stale_crl=self.on_stale_crl,
            on_unreachable_crl=self.on_unreachable_crl,
            expiry_warning_days=self.expiry_warning_days)


# --------------------------------------------------------------------------- failures

_DEVICE_FAILURES: tuple[tuple[str, Reason], ...] = (
    ("WrongPin", Reason.WRONG_PIN),
    ("InvalidPin", Reason.WRONG_PIN),  # not 4-8 digits: cost no try
    ("PinBlocked", Reason.PIN_BLOCKED),
    ("WrongPuk", Reason.WRONG_PUK),
    ("PukBlocked", Reason.PUK_BLOCKED),
    ("CardRemoved", Reason.DEVICE_REMOVED),
    ("NoCard", Reason.NO_DEVICE),
    ("NoReader", Reason.NO_DEVICE),
    ("PcscUnavailable", Reason.PCSC_UNAVAILABLE),
    ("NotPivCard", Reason.NOT_SUPPORTED_CARD),
    # the PKCS#11 path (drivers/pkcs11/errors.py): a card its module does not recognise, or
    # cannot unblock, is a card not supported here; a module that cannot be loaded is the
    # card service missing (both exit 4, as the other device failures)
    ("NoToken", Reason.NOT_SUPPORTED_CARD),
    ("UnblockNotSupported", Reason.NOT_SUPPORTED_CARD),
    ("Pkcs11ModuleError", Reason.PCSC_UNAVAILABLE),
)


def device_failure(e: Exception) -> Reason:
    """The login failure reason for an error of the card, of PC/SC or of a PKCS#11 module."""
    for name, reason in _DEVICE_FAILURES:
        cls = getattr(card_errors, name, None) or getattr(pkcs11_errors, name, None)
        if cls is not None and isinstance(e, cls):
            return reason
    return Reason.DEVICE_ERROR


def certificate_failure(reason: str) -> Reason:
    """The login failure reason for a ``CardCertificateError.reason`` of the trust module."""
    r = (reason or "").lower().replace("_", "-")
    if "not-yet" in r:
        return Reason.CERT_NOT_YET_VALID
    if "expired" in r:
        return Reason.CERT_EXPIRED
    if "revoked" in r:
        return Reason.CERT_REVOKED
    if "crl" in r or "revocation" in r:
        return Reason.REVOCATION_UNKNOWN
    if "untrusted" in r or "trust" in r or "chain" in r or "issuer" in r:
        return Reason.CERT_UNTRUSTED
    return Reason.CERT_INVALID


def _serial_hex(serial: Any) -> str:
    if isinstance(serial, int):
        return f"{serial:x}"
    return str(serial).lower()


def _serial_bytes(serial_hex: str) -> bytes | None:
    text = serial_hex if len(serial_hex) % 2 == 0 else "0" + serial_hex
    try:
        return bytes.fromhex(text)
    except ValueError:
        return serial_hex.encode()


def key_algorithm(public_key) -> str:
    """The PIV algorithm of a certificate's public key: RSA2048 or ECCP256 (ValueError else)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == 2048:
        return "RSA2048"
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1":
        return "ECCP256"
    raise ValueError(f"unsupported card key ({type(public_key).__name__})")


def verify_signature(public_key, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is the card's signature of ``message`` (SHA-256; for RSA PKCS#1
    v1.5 or PSS with MGF1-SHA256 and any salt length, both secure for a fresh challenge: a
    PKCS#11 module may allow only PSS; ECDSA for P-256)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            try:
                public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            except InvalidSignature:
                public_key.verify(signature, message,
                                  padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                              salt_length=padding.PSS.AUTO), hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def _public_key(identity, cert_der: bytes):
    key = getattr(identity, "public_key", None)
    if key is not None and hasattr(key, "public_bytes"):
        return key
    from cryptography import x509

    return x509.load_der_x509_certificate(cert_der).public_key()


def _certificate_subject(cert_der: bytes) -> tuple[str | None, str | None, str]:
    """(UUID, holder name, serial hex) of a card certificate, without validating it."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(cert_der)
    uuids = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(uuids[0].value) if uuids else None, str(names[0].value) if names else None,
            f"{cert.serial_number:x}")


class CardRefused(Exception):
    """A card refused before any PIN is asked: ``reason`` and the ``message`` to show."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def check_certificate(cert_der: bytes, settings: CardSettings, *,
                      policy: "CardTrustPolicy | None" = None, now=None,
                      facts: dict[str, Any]) -> "CardIdentity":
    """The card's identity from its certificate, validated with the trust policy (``policy``,
    else the settings'), as every card ceremony does first: :class:`CardRefused` for an
    expired, revoked or untrusted card, or when no trust anchor is configured. ``facts`` gains
    the certificate's UUID, holder and serial when they can be read, even when it is refused."""
    from ..cardtrust import CardCertificateError, validate_card_certificate

    try:
        if policy is None:
            policy = settings.trust_policy()
    except ValueError as e:
        raise CardRefused(Reason.CERT_UNTRUSTED, str(e)) from None
    try:
        return validate_card_certificate(cert_der, policy, now=now)
    except CardCertificateError as e:
        try:
            card_uuid, holder, serial = _certificate_subject(cert_der)
            facts.update({"uuid": card_uuid, "holder_name": holder, "certificate_serial": serial})
        except ValueError:
            pass
        raise CardRefused(certificate_failure(e.reason), e.message) from None


# --------------------------------------------------------------------------- login


def login_with_card(
    store: Store,
    session: "PivSession",
    *,
    pin_provider: Callable[[], str | None],
    policy: "CardTrustPolicy | None" = None,
    provision: bool | None = None,
    settings: CardSettings | None = None,
    now=None,
) -> LoginOutcome:
    """Authenticate the holder of the card in ``session`` (see the module docstring). Always
    returns an outcome; every success and failure is recorded in the audit log. ``provision``
    overrides the setting ``card_provision_on_first_use``; ``policy`` the trust settings."""
    started = time.perf_counter()
    settings = settings or CardSettings.from_store(store)
    if provision is None:
        provision = settings.provision_on_first_use
    facts: dict[str, Any] = {}  # what the audit events and the outcome may say about the card
    facts["card_driver"] = session_driver(session)  # the card path: piv or pkcs11
    user = None

    def fail(reason: Reason, message: str) -> LoginOutcome:
        store.record_event("login.card", user_id=user.id if user else None, outcome="failure",
                           credential_id=_serial_bytes(facts["certificate_serial"])
                           if "certificate_serial" in facts else None,
                           detail={"reason": reason.value, **facts})
        log.info("card login failed: %s (%s)", reason.value, message)
        return LoginOutcome.failure(METHOD, reason, message,
                                    user=user.username if user else None,
                                    user_id=user.id if user else None, detail=dict(facts))

    # 1. the certificate, validated before anything else
    try:
        cert_der = session.certificate("9a")
    except card_errors.PcscError as e:
        return fail(device_failure(e), e.message)
    try:
        identity = check_certificate(cert_der, settings, policy=policy, now=now, facts=facts)
    except CardRefused as e:
        return fail(e.reason, e.message)
    serial = _serial_hex(identity.certificate_serial)
    facts.update({"uuid": identity.uuid, "holder_name": identity.holder_name,
                  "certificate_serial": serial, "issuer": str(identity.issuer),
                  "not_after": identity.not_after.isoformat()
                  if hasattr(identity.not_after, "isoformat") else str(identity.not_after)})
    warnings = [str(w) for w in (identity.warnings or ())]
    user = store.get_user_by_card_uuid(identity.uuid)  # for the audit events only, until step 5
    try:
        public_key = _public_key(identity, cert_der)
        algorithm = key_algorithm(public_key)
    except ValueError as e:
        return fail(Reason.CERT_INVALID, str(e))

    # 2-4. PIN tries left, the PIN, VERIFY, challenge-response
    try:
        if session.pin_retries() == 0:
            return fail(Reason.PIN_BLOCKED, card_errors.PinBlocked.default_message)
        facts["prompt_ready_ms"] = round((time.perf_counter() - started) * 1000, 3)
        pin = pin_provider()
        if not pin:
            return fail(Reason.CANCELLED, "no PIN was given")
        try:
            session.verify_pin(pin)
        finally:
            pin = None
        challenge = os.urandom(32)
        signature = session.sign("9a", challenge, algorithm=algorithm)
    except card_errors.PcscError as e:
        return fail(device_failure(e), e.message)
    if not verify_signature(public_key, signature, challenge):
        return fail(Reason.VERIFICATION_FAILED,
                    "the card's signature does not match its certificate: card refused")

    # 5. who it is
    ident = store.get_card_identity(identity.uuid)
    provisioned = False
    if ident is None and not provision:
        return fail(Reason.UNKNOWN_USER,
                    f"the card of {identity.holder_name} (UUID {identity.uuid}) is not "
                    "enrolled here: ask an administrator")
    if ident is not None:
        user = store.get_user_by_id(ident.user_id)
        if user.disabled:
            return fail(Reason.USER_DISABLED, f"{user.username} is disabled")
        if ident.flagged:
            return fail(Reason.CREDENTIAL_FLAGGED,
                        f"this card is suspended ({ident.flag_reason}): ask an administrator")
    try:
        with store.transaction():
            if ident is None:
                user = store.add_user(identity.uuid, display_name=identity.holder_name)
                ident = store.add_card_identity(user.id, uuid=identity.uuid,
                                                holder_name=identity.holder_name)
                store.record_event("enrol.card", user_id=user.id, outcome="success",
                                   detail={"provisioned": True, **facts})
                provisioned = True
            ident = store.record_card_use(identity.uuid, certificate_serial=serial,
                                          issuer=str(identity.issuer),
                                          not_after=identity.not_after.timestamp()
                                          if hasattr(identity.not_after, "timestamp") else None)
            store.record_event("login.card", user_id=user.id,
                               credential_id=_serial_bytes(serial), outcome="success",
                               detail={"credential": ident.name, "provisioned": provisioned,
                                       "warnings": warnings, **facts})
    except UserExists:
        user = None
        return fail(Reason.UNKNOWN_USER, f"cannot provision the card of {identity.holder_name}: "
                                         f"a user named {identity.uuid} exists already")
    detail = {**facts, "warnings": warnings, "provisioned": provisioned,
              "ceremony_ms": round((time.perf_counter() - started) * 1000, 3)}
    log.info("card login: %s (card holder %s)", user.username, identity.uuid)
    return LoginOutcome(
        ok=True, method=METHOD, user=user.username, user_id=user.id,
        factors=(Factor.POSSESSION, Factor.KNOWLEDGE), credential=ident.name,
        credential_id=serial, user_verified=True, detail=detail,
        message="; ".join(warnings), warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------- PIN management


@dataclass(frozen=True)
class CardActionOutcome:
    """The result of a card administration (``unlock``, ``change-pin``)."""

    ok: bool
    action: str
    reason: Reason | None = None
    message: str = ""
    card_uuid: str | None = None
    holder_name: str | None = None
    certificate_serial: str | None = None
    sponsor: str | None = None
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data["reason"] = self.reason.value if self.reason else None
        return data


def check_new_pin(pin: str) -> str:
    """A new card PIN: 4 to 8 digits (the NHS-style profile). ValueError otherwise."""
    if not isinstance(pin, str) or not PIN_RE.fullmatch(pin):
        raise ValueError("a card PIN is 4 to 8 digits")
    return pin


def unlock_card(store: Store, session: "PivSession", *, sponsor: str,
                sponsor_outcome: LoginOutcome, puk: str, new_pin: str) -> CardActionOutcome:
    """A sponsor's unlock of a card: RESET RETRY COUNTER with the card's PUK (the RA's
    credential) and a new PIN. The sponsor must have just authenticated (``sponsor_outcome``:
    a successful login of ``sponsor``) and hold the role ``sponsor`` or ``ra``; nobody unlocks
    their own card. Recorded in the audit log (``card.unlock``), success or not.
    ``ValueError`` for a new PIN that is not 4-8 digits (nothing is sent to the card)."""
    check_new_pin(new_pin)
    facts: dict[str, Any] = {"sponsor": sponsor}
    sponsor_user = None

    def done(ok: bool, reason: Reason | None = None, message: str = "") -> CardActionOutcome:
        store.record_event("card.unlock", user_id=sponsor_user.id if sponsor_user else None,
                           username=None if sponsor_user else sponsor,
                           outcome="success" if ok else "failure",
                           detail={**facts, **({"reason": reason.value} if reason else {})})
        return CardActionOutcome(ok=ok, action="unlock", reason=reason, message=message,
                                 card_uuid=facts.get("uuid"), holder_name=facts.get("holder_name"),
                                 certificate_serial=facts.get("certificate_serial"),
                                 sponsor=sponsor)

    if not sponsor_outcome.ok or (sponsor_outcome.user or "").lower() != sponsor.lower():
        why = sponsor_outcome.message if not sponsor_outcome.ok else "it was another user's login"
        return done(False, Reason.SPONSOR_NOT_AUTHORISED,
                    f"the sponsor {sponsor} did not authenticate: {why}")
    sponsor_user = store.get_user_by_id(sponsor_outcome.user_id)
    facts["sponsor_method"] = sponsor_outcome.method
    if not set(sponsor_user.roles) & set(SPONSOR_ROLES):
        return done(False, Reason.SPONSOR_NOT_AUTHORISED,
                    f"{sponsor_user.username} is not a sponsor (needs the role "
                    f"{' or '.join(SPONSOR_ROLES)})")
    try:
        cert_der = session.certificate("9a")
        card_uuid, holder, serial = _certificate_subject(cert_der)
        facts.update({"uuid": card_uuid, "holder_name": holder, "certificate_serial": serial})
        holder_user = store.get_user_by_card_uuid(card_uuid) if card_uuid else None
        if holder_user is not None:
            facts["holder_user"] = holder_user.username
            if holder_user.id == sponsor_user.id:
                return done(False, Reason.SPONSOR_NOT_AUTHORISED,
                            "a sponsor cannot unlock their own card")
        session.unblock_pin(puk, new_pin)
    except card_errors.PcscError as e:
        return done(False, device_failure(e), e.message)
    except ValueError as e:
        return done(False, Reason.CERT_INVALID, f"unreadable card certificate: {e}")
    log.info("card %s unlocked by sponsor %s", facts.get("uuid"), sponsor_user.username)
    return done(True, message=f"the card of {facts.get('holder_name')} is unlocked with a new PIN")


def change_card_pin(store: Store, session: "PivSession", *, old_pin: str,
                    new_pin: str) -> CardActionOutcome:
    """The cardholder's PIN change (CHANGE REFERENCE DATA), recorded as ``card.change-pin``.
    ``ValueError`` for a new PIN that is not 4-8 digits."""
    check_new_pin(new_pin)
    facts: dict[str, Any] = {}
    user = None

    def done(ok: bool, reason: Reason | None = None, message: str = "") -> CardActionOutcome:
        store.record_event("card.change-pin", user_id=user.id if user else None,
                           outcome="success" if ok else "failure",
                           detail={**facts, **({"reason": reason.value} if reason else {})})
        return CardActionOutcome(ok=ok, action="change-pin", reason=reason, message=message,
                                 card_uuid=facts.get("uuid"), holder_name=facts.get("holder_name"),
                                 certificate_serial=facts.get("certificate_serial"))

    try:
        card_uuid, holder, serial = _certificate_subject(session.certificate("9a"))
        facts.update({"uuid": card_uuid, "holder_name": holder, "certificate_serial": serial})
        user = store.get_user_by_card_uuid(card_uuid) if card_uuid else None
        session.change_pin(old_pin, new_pin)
    except card_errors.PcscError as e:
        return done(False, device_failure(e), e.message)
    except ValueError as e:
        return done(False, Reason.CERT_INVALID, f"unreadable card certificate: {e}")
    return done(True, message="PIN changed")
