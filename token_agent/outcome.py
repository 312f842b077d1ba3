"""The structured result of a login, whatever the method: what the policy work builds on.

A login either identifies a user and says which authentication factors were satisfied, or
says why it failed with a stable ``reason`` code (for scripts, exit codes and the audit log)
and a ``message`` for people. A success may carry ``warnings`` for the person who logged in
(a smartcard certificate that must be renewed soon: ``card_expiry_warning_days``, a CRL
accepted under a "warn" setting). Nothing secret is ever part of an outcome.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field


class Factor(str, enum.Enum):
    """NIST SP 800-63B's authentication factors."""

    POSSESSION = "something-you-have"
    KNOWLEDGE = "something-you-know"
    INHERENCE = "something-you-are"


class Reason(str, enum.Enum):
    """Why a login failed. The value is the stable code scripts see."""

    UNKNOWN_USER = "unknown-user"
    USER_DISABLED = "user-disabled"
    NO_CREDENTIAL = "no-credential-enrolled"
    UNKNOWN_CREDENTIAL = "unknown-credential"
    WRONG_USER = "credential-of-another-user"
    CREDENTIAL_FLAGGED = "credential-flagged"
    CLONE_SUSPECTED = "counter-regression"
    VERIFICATION_FAILED = "verification-failed"
    UV_REQUIRED = "user-verification-required"
    WRONG_PIN = "wrong-pin"
    PIN_AUTH_BLOCKED = "pin-auth-blocked"  # too many wrong PINs in a row: power-cycle the key
    PIN_BLOCKED = "pin-blocked"
    PIN_REQUIRED = "pin-required"
    PRESENCE_REQUIRED = "presence-required"  # no touch before a PIN try (ceremonies/keypresence)
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    DEVICE_REMOVED = "device-removed"
    NO_DEVICE = "no-device"
    AMBIGUOUS = "ambiguous-account"
    DEVICE_ERROR = "device-error"
    INTERNAL_ERROR = "internal-error"  # the agent's own failure (its log says what)
    # smartcards (token_agent/ceremonies/card.py)
    CERT_EXPIRED = "certificate-expired"
    CERT_NOT_YET_VALID = "certificate-not-yet-valid"
    CERT_REVOKED = "certificate-revoked"
    CERT_UNTRUSTED = "certificate-untrusted"
    CERT_INVALID = "certificate-invalid"  # key usage, profile, no UUID, unreadable
    REVOCATION_UNKNOWN = "revocation-unknown"  # CRL stale or unreachable and the policy refuses
    NOT_SUPPORTED_CARD = "not-supported-card"
    PCSC_UNAVAILABLE = "pcsc-unavailable"
    WRONG_PUK = "wrong-puk"
    PUK_BLOCKED = "puk-blocked"
    SPONSOR_NOT_AUTHORISED = "sponsor-not-authorised"
    # the cardholder's own unlock (ceremonies/cardunlock.py): the card's PIN is not locked;
    # the card's attempts of the day are spent
    PIN_NOT_BLOCKED = "pin-not-blocked"
    TOO_MANY_ATTEMPTS = "too-many-attempts"
    # passwords and second factors (token_agent/factors/)
    WRONG_PASSWORD = "wrong-password"
    WRONG_CODE = "wrong-code"
    CODE_EXPIRED = "code-expired"
    CODE_REPLAYED = "code-replayed"
    METHOD_LOCKED = "method-locked"
    METHOD_NOT_ALLOWED = "method-not-allowed"
    NOT_CONFIRMED = "method-not-confirmed"
    ALREADY_ENROLLED = "already-enrolled"  # that destination, or a method of that name, exists
    ENROLMENT_REQUIRED = "enrolment-required"
    DELIVERY_FAILED = "delivery-failed"
    RESEND_THROTTLED = "resend-throttled"
    PUSH_DENIED = "push-denied"
    PUSH_WRONG_NUMBER = "push-wrong-number"
    PUSH_EXPIRED = "push-expired"
    LEGACY_NOT_ALLOWED = "legacy-access-not-allowed"
    # the organisation (token_agent/organisation/): no replica of the organisation's server
    # answered and no offline login applies ("use your key or card"); a replica answered,
    # then the connection was lost after the person had answered or touched something (the
    # login is not retried elsewhere: it fails, with no session)
    SERVER_UNAVAILABLE = "server-unavailable"
    SERVER_LOST = "server-lost"


@dataclass(frozen=True)
class LoginOutcome:
    ok: bool
    method: str  # "key", later "card", "totp", ...
    user: str | None = None  # username
    user_id: str | None = None
    factors: tuple[Factor, ...] = ()
    credential: str | None = None  # the credential's name, as enrolled
    credential_id: str | None = None  # hex
    user_verified: bool = False
    reason: Reason | None = None
    message: str = ""
    detail: dict = field(default_factory=dict)
    #: messages for the person, shown by every front end (the CLI, the service's result and
    #: info events, PAM's info text): e.g. "Your card's certificate expires on ..."
    warnings: tuple[str, ...] = ()

    @property
    def multi_factor(self) -> bool:
        """True when at least two distinct factors were satisfied."""
        return len(set(self.factors)) >= 2

    def to_json(self) -> dict:
        data = asdict(self)
        data["factors"] = [f.value for f in self.factors]
        data["reason"] = self.reason.value if self.reason else None
        data["multi_factor"] = self.multi_factor
        data["warnings"] = list(self.warnings)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "LoginOutcome":
        """The outcome :meth:`to_json` wrote (``multi_factor`` is recomputed, not trusted).
        ``ValueError`` / ``TypeError`` for anything else: unknown fields, wrong types, an
        unknown reason or factor."""
        if not isinstance(data, dict):
            raise TypeError("an outcome is a JSON object")
        known = {f for f in cls.__dataclass_fields__} | {"multi_factor"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")

        def text(name: str, optional: bool = True) -> str | None:
            value = data.get(name)
            if value is None and optional:
                return None
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string")
            return value

        ok = data.get("ok")
        if not isinstance(ok, bool):
            raise TypeError("ok must be true or false")
        factors = data.get("factors") or []
        warnings = data.get("warnings") or []
        detail = data.get("detail") or {}
        if not isinstance(factors, list) or not isinstance(warnings, list) \
                or not all(isinstance(w, str) for w in warnings):
            raise TypeError("factors and warnings must be lists")
        if not isinstance(detail, dict):
            raise TypeError("detail must be an object")
        if not isinstance(data.get("user_verified", False), bool):
            raise TypeError("user_verified must be true or false")
        reason = text("reason")
        return cls(ok=ok, method=text("method", optional=False) or "", user=text("user"),
                   user_id=text("user_id"), factors=tuple(Factor(f) for f in factors),
                   credential=text("credential"), credential_id=text("credential_id"),
                   user_verified=bool(data.get("user_verified", False)),
                   reason=None if reason is None else Reason(reason),
                   message=text("message") or "", detail=detail, warnings=tuple(warnings))

    @classmethod
    def failure(cls, method: str, reason: Reason, message: str, **kw) -> "LoginOutcome":
        return cls(ok=False, method=method, reason=reason, message=message, **kw)
