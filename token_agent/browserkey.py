"""The relying party for WebAuthn in a browser: sign-in and key enrolment on the web pages.

At a workstation the agent is both the WebAuthn client and the relying party
(``ceremonies/key.py``). In a browser the browser is the client: the server sends the
options, ``navigator.credentials.get`` / ``create`` asks the security key or passkey, and
the browser posts back what the authenticator signed. Everything the relying party decides
is decided by the same code as at a workstation:

* the checks of the response: :mod:`token_agent.webauthn` (client data type, challenge and
  origin; RP ID hash, user presence and, when the organisation requires it, user
  verification; the signature with the stored public key; attestation at enrolment);
* which enrolled credential answered (of this user, enrolled for this RP ID), its user
  handle, a suspended key, the signature counter and clone detection (the key is flagged
  and refused), and the ``login.key`` audit event: ``ceremonies.key.settle_assertions``;
* at enrolment, the attestation policy, the stored record and the ``enrol.key`` event:
  ``ceremonies.key.verify_enrolment`` / ``save_enrolment``.

The browser's RP ID (``[web] rp_id``, the site's host name) differs from the workstations'
(the ``rp_id`` setting): a credential is bound to its RP ID by the authenticator, so keys
enrolled at workstations are not offered here, and keys enrolled here not there.

The challenge of a ceremony is kept by the server, never taken from the client: a
:class:`Challenge` (random 32 bytes, an expiry, the user and RP ID it is for) lives in the
sign-in conversation's memory (a sign-in runs in one replica) or, for an enrolment, in the
web session's stored page state (:meth:`Challenge.to_json` / :meth:`Challenge.from_json`).
It is used once: :func:`finish_assertion` / :func:`finish_registration` spend it before
checking anything, so a replayed or failed response cannot be tried again.

User names are not revealed: for a user name that is unknown, disabled or without a key for
this RP ID, the options carry one decoy credential ID derived from the user name with the
organisation's secret key (the same on every replica and every time), so the options look
like those of a user with one key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping

from .ceremonies.key import (
    ALGORITHMS,
    EnrolError,
    KeySettings,
    enrolment_warnings,
    key_failure,
    save_enrolment,
    settle_assertions,
    verify_enrolment,
)
from .outcome import Factor, LoginOutcome, Reason
from .store import CredentialExists, InvalidValue, UnknownUser

if TYPE_CHECKING:
    from .agent import Agent
    from .store import User

#: how long a challenge can be answered (seconds); the browser is asked to give up sooner
CHALLENGE_SECONDS = 300.0
#: the ``timeout`` the browser is given (milliseconds)
BROWSER_TIMEOUT_MS = 120_000
#: the transports a browser may report for a new credential (WebAuthn's AuthenticatorTransport)
TRANSPORTS = ("usb", "nfc", "ble", "smart-card", "hybrid", "internal")
#: bounds of the posted fields (characters of base64url): far above any real authenticator's
MAX_FIELD = {"credential_id": 1400, "client_data_json": 4096, "authenticator_data": 8192,
             "signature": 1400, "user_handle": 128, "attestation_object": 16384}
#: what the person is told when the browser gave no answer (cancelled, timed out, no key)
NO_ANSWER = ("Your browser did not get an answer from a security key or passkey (it was "
             "cancelled, timed out, or no key holds a sign-in for this site). Try again, or "
             "use your password.")
BROWSER = "browser"  # the ``via`` of the audit events
#: what the person is told when they chose their password instead
PASSWORD_INSTEAD = ("You chose not to use a security key. Sign in again with your password, "
                    "or choose another way to sign in.")
#: keys a user may enrol on the site, at most (a signed-in session cannot fill the store)
MAX_KEYS = 20
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str, field_name: str = "field") -> bytes:
    if not isinstance(text, str):
        raise ResponseError(f"{field_name} is missing")
    bound = MAX_FIELD.get(field_name, 16384)
    if len(text) > bound:
        raise ResponseError(f"{field_name} is too long")
    text = text.strip().rstrip("=")
    if not _B64URL.fullmatch(text):
        raise ResponseError(f"{field_name} is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ResponseError(f"{field_name} is not base64url") from None


class ResponseError(ValueError):
    """The browser's posted response is malformed (a field missing, too long, not base64url)."""


# ---------------------------------------------------------------------------- challenges
@dataclass
class Challenge:
    """The server's half of one browser ceremony: what it asked, for whom, until when."""

    purpose: str  # "get" | "create"
    challenge: bytes
    rp_id: str
    expires: float
    user_id: str | None = None  # None: usernameless sign-in, or an unknown user name
    username: str | None = None  # the user name as asked (None: usernameless)
    used: bool = False

    def spend(self, now: float, purpose: str, rp_id: str) -> tuple[str, str] | None:
        """Use the challenge up: None when it was fresh and for ``purpose`` and ``rp_id``;
        else (a reason code, why it cannot be answered). Spent either way."""
        used, self.used = self.used, True
        if used:
            return "challenge-used", "this security key request was answered already: start again"
        if self.purpose != purpose or self.rp_id != rp_id:
            return "wrong-request", "this security key request is not for this page: start again"
        if now > self.expires:
            return "expired", "this security key request has expired: start again"
        return None

    def to_json(self) -> dict:
        return {"purpose": self.purpose, "challenge": b64url(self.challenge),
                "rp_id": self.rp_id, "expires": self.expires, "user_id": self.user_id,
                "username": self.username, "used": self.used}

    @classmethod
    def from_json(cls, data: Any) -> "Challenge | None":
        """The challenge kept in a web session (None when there is none or it is damaged)."""
        try:
            return cls(purpose=str(data["purpose"]), challenge=unb64url(data["challenge"]),
                       rp_id=str(data["rp_id"]), expires=float(data["expires"]),
                       user_id=data.get("user_id"), username=data.get("username"),
                       used=bool(data.get("used", False)))
        except (KeyError, TypeError, ValueError):
            return None


def _challenge(agent: "Agent", purpose: str, rp_id: str, user, username) -> Challenge:
    return Challenge(purpose=purpose, challenge=os.urandom(32), rp_id=rp_id,
                     expires=agent.now() + CHALLENGE_SECONDS,
                     user_id=user.id if user is not None else None, username=username)


def _resolve(agent: "Agent", user: "User | str | None") -> tuple["User | None", str | None]:
    """(the store's user or None, the user name as asked or None for usernameless)."""
    if user is None:
        return None, None
    if isinstance(user, str):
        try:
            return agent.store.get_user(user), user
        except UnknownUser:
            return None, user
    return user, user.username


def browser_keys(agent: "Agent", user, rp_id: str) -> list:
    """The user's keys enrolled for ``rp_id`` (the ones a browser on this site can use)."""
    if user is None:
        return []
    return [c for c in agent.store.list_fido_credentials(user.id) if c.rp_id == rp_id]


def _decoy_id(agent: "Agent", username: str, rp_id: str) -> bytes:
    """The credential ID shown for a user name with no key here: the same every time."""
    return agent.keys.code_hash(f"webauthn-decoy:{rp_id}", username.casefold())


def _descriptor(cred_id: bytes, transports=()) -> dict:
    d: dict = {"type": "public-key", "id": b64url(cred_id)}
    if transports:
        d["transports"] = [t for t in transports if t in TRANSPORTS]
    return d


# ---------------------------------------------------------------------------- sign-in
def assertion_options(agent: "Agent", user: "User | str | None", rp_id: str
                      ) -> tuple[dict, Challenge]:
    """The options for ``navigator.credentials.get`` (PublicKeyCredentialRequestOptionsJSON)
    and the challenge to keep. ``user``: a store user or a user name (the sign-in page's),
    or None for a usernameless sign-in with a passkey (a discoverable credential says who it
    is). A user name that cannot sign in with a key here gets a decoy credential ID."""
    user, username = _resolve(agent, user)
    settings = KeySettings.from_store(agent.store)
    state = _challenge(agent, "get", rp_id, user, username)
    options: dict = {"challenge": b64url(state.challenge), "rpId": rp_id,
                     "timeout": BROWSER_TIMEOUT_MS,
                     "userVerification": settings.user_verification}
    if username is not None:
        creds = browser_keys(agent, user if user is not None and not user.disabled else None,
                               rp_id)
        options["allowCredentials"] = [_descriptor(c.credential_id, c.transports)
                                       for c in creds] or \
            [_descriptor(_decoy_id(agent, username, rp_id), ("usb", "nfc", "hybrid"))]
    else:
        options["allowCredentials"] = []
    return options, state


@dataclass(frozen=True)
class BrowserAssertion:
    """One assertion as a browser posted it (AuthenticatorAssertionResponse, in bytes)."""

    credential_id: bytes
    client_data_json: bytes
    authenticator_data: bytes
    signature: bytes
    user_handle: bytes | None = None


def _pick(response: Mapping, flat: str, *nested: str) -> Any:
    """A field of the posted form (``flat``) or of AuthenticationResponseJSON (``nested``)."""
    value = response.get(flat)
    if value not in (None, ""):
        return value
    inner = response.get("response")
    for name in nested:
        if name in response and response.get(name) not in (None, ""):
            return response[name]
        if isinstance(inner, Mapping) and inner.get(name) not in (None, ""):
            return inner[name]
    return None


def parse_assertion(response: Mapping) -> BrowserAssertion:
    """The assertion from the sign-in form's fields (``credential_id``, ``client_data_json``,
    ``authenticator_data``, ``signature``, ``user_handle``, base64url, filled by
    ``webauthn.js``), or from WebAuthn's AuthenticationResponseJSON. ResponseError when
    malformed."""
    handle = _pick(response, "user_handle", "userHandle")
    return BrowserAssertion(
        credential_id=unb64url(_pick(response, "credential_id", "rawId", "id"), "credential_id"),
        client_data_json=unb64url(_pick(response, "client_data_json", "clientDataJSON"),
                                  "client_data_json"),
        authenticator_data=unb64url(_pick(response, "authenticator_data", "authenticatorData"),
                                    "authenticator_data"),
        signature=unb64url(_pick(response, "signature", "signature"), "signature"),
        user_handle=unb64url(handle, "user_handle") if handle else None,
    )


def browser_error(response: Mapping) -> str | None:
    """The browser's own failure the page posted instead of an assertion (the DOMException's
    name, e.g. ``NotAllowedError``), or None."""
    error = response.get("error")
    if isinstance(error, str) and error.strip():
        return error.strip()[:64]
    return None


def finish_assertion(agent: "Agent", user: "User | str | None", state: Challenge,
                     response: Mapping, origin: str, rp_id: str) -> LoginOutcome:
    """Check the browser's answer to :func:`assertion_options` and sign the user in with it:
    the same outcome, checks, counter update, clone detection and audit events as a key at a
    workstation (``ceremonies.key.settle_assertions``), for ``rp_id`` and ``origin`` (the
    site's own, from the configuration, never the request's). ``user`` as given to
    :func:`assertion_options`; the challenge is spent whatever happens."""
    store = agent.store
    user, username = _resolve(agent, user)

    def fail(reason: Reason, message: str, who=None, cred=None) -> LoginOutcome:
        return key_failure(store, reason, message, username=username, user=who, cred=cred,
                           via=BROWSER)

    problem = state.spend(agent.now(), "get", rp_id)
    if problem is not None:
        code, message = problem
        return fail(Reason.TIMEOUT if code == "expired" else Reason.VERIFICATION_FAILED,
                    message, user)
    if state.username != username or state.user_id != (user.id if user else None):
        return fail(Reason.VERIFICATION_FAILED, "this security key request was made for "
                    "another sign-in: start again", user)
    error = browser_error(response)
    if error is not None:
        return fail(Reason.CANCELLED, PASSWORD_INSTEAD if error == "use-password" else NO_ANSWER,
                    user)
    try:
        assertion = parse_assertion(response)
    except ResponseError as e:
        return fail(Reason.VERIFICATION_FAILED, f"the browser's answer is malformed: {e}", user)
    if username is not None:
        # a sign-in for a user name: only that user's keys, and nobody's for a user name
        # that cannot sign in (whose options carried a decoy)
        if user is None:
            return fail(Reason.UNKNOWN_USER, f"no user {username!r}")
        if user.disabled:
            return fail(Reason.USER_DISABLED, f"{user.username} is disabled", user)
        creds = browser_keys(agent, user, rp_id)
        if not creds:
            return fail(Reason.NO_CREDENTIAL, f"{user.username} has no security key enrolled "
                        "for this site", user)
    else:
        creds = []
    settings = KeySettings.from_store(store)
    # the browser does not say whether the key checked a PIN or a fingerprint: either makes
    # the key a second factor; it is counted as the PIN (what security keys mostly use)
    outcome, _ = settle_assertions(
        store, [assertion], user=user, username=username, rp_id=rp_id, origin=origin,
        challenge=state.challenge, require_uv=settings.user_verification == "required",
        uv_factor=lambda: Factor.KNOWLEDGE, via=BROWSER, enrolled=creds)
    if outcome.ok:
        outcome = replace(outcome, detail={**outcome.detail, "via": BROWSER})
    return outcome


# ---------------------------------------------------------------------------- enrolment
def registration_options(agent: "Agent", user: "User", rp_id: str, *,
                         rp_name: str | None = None) -> tuple[dict, Challenge]:
    """The options for ``navigator.credentials.create`` (PublicKeyCredentialCreationOptions
    JSON) to enrol a key or passkey for ``user`` on this site, and the challenge to keep (in
    the web session: :meth:`Challenge.to_json`). The user's keys for this RP ID are excluded
    (a key cannot be enrolled twice); a discoverable credential is preferred (a passkey signs
    in without a user name); attestation is asked for only when the organisation checks it."""
    settings = KeySettings.from_store(agent.store)
    state = _challenge(agent, "create", rp_id, user, user.username)
    options = {
        "rp": {"id": rp_id, "name": rp_name or settings.rp_name},
        "user": {"id": b64url(user.user_handle), "name": user.username,
                 "displayName": user.display_name or user.username},
        "challenge": b64url(state.challenge),
        "pubKeyCredParams": [{"type": "public-key", "alg": alg} for alg in ALGORITHMS],
        "timeout": BROWSER_TIMEOUT_MS,
        "excludeCredentials": [_descriptor(c.credential_id, c.transports)
                               for c in browser_keys(agent, user, rp_id)],
        "authenticatorSelection": {"residentKey": "preferred", "requireResidentKey": False,
                                   "userVerification": settings.user_verification},
        "attestation": "direct" if settings.attestation.enforced else "none",
        "extensions": {"credProps": True},
    }
    return options, state


@dataclass(frozen=True)
class BrowserEnrolment:
    name: str
    credential_id: bytes
    aaguid: str
    discoverable: bool
    user_verified: bool
    attestation_trusted: bool
    warnings: tuple[str, ...] = field(default=())


def _discoverable(response: Mapping) -> bool:
    """credProps.rk as the browser reports it (informational: nothing signs it)."""
    value = response.get("discoverable")
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    results = response.get("clientExtensionResults")
    if isinstance(results, Mapping):
        props = results.get("credProps")
        return bool(isinstance(props, Mapping) and props.get("rk") is True)
    return False


def _transports(response: Mapping) -> list[str]:
    value = response.get("transports")
    if value is None and isinstance(response.get("response"), Mapping):
        value = response["response"].get("transports")
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        return []
    return sorted({t.strip() for t in value if isinstance(t, str) and t.strip() in TRANSPORTS})


def finish_registration(agent: "Agent", user: "User", state: Challenge | None,
                        response: Mapping, origin: str, rp_id: str, *,
                        name: str) -> BrowserEnrolment:
    """Check the browser's answer to :func:`registration_options` and store the key as the
    user's method ``name``. Raises :class:`~token_agent.ceremonies.key.EnrolError` (reason
    and a message for people) when anything is wrong; refusals of the key itself are in the
    audit log. The challenge is spent whatever happens (the caller also removes it from the
    session)."""
    store = agent.store
    if state is None:
        raise EnrolError("no-challenge", "There is no security key request to answer: start "
                         "again.")
    problem = state.spend(agent.now(), "create", rp_id)
    if problem is not None:
        code, message = problem
        raise EnrolError(code, message[0].upper() + message[1:] + ".")
    if state.user_id != user.id:
        raise EnrolError("wrong-user", "This security key request was made for another "
                         "account: start again.")
    if browser_error(response) is not None:
        raise EnrolError("cancelled", "Your browser did not create a key (it was cancelled, "
                         "timed out, or the key is enrolled already). Try again.")
    name = (name or "").strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise EnrolError("bad-name", "Give the key a name of 1 to 64 characters, such as "
                         "'blue key' or 'work laptop'.")
    held = store.list_fido_credentials(user.id)
    if len([c for c in held if c.rp_id == rp_id]) >= MAX_KEYS:
        raise EnrolError("too-many", f"You have {MAX_KEYS} security keys for this site, the "
                         "most you can have: remove one you no longer use first.")
    if any(c.name.casefold() == name.casefold() for c in held):
        raise EnrolError("name-taken", f"You already have a key named {name!r}: choose "
                         "another name.")
    try:
        credential_id = unb64url(_pick(response, "credential_id", "rawId", "id"),
                                 "credential_id")
        client_data_json = unb64url(_pick(response, "client_data_json", "clientDataJSON"),
                                    "client_data_json")
        attestation_object = unb64url(_pick(response, "attestation_object",
                                            "attestationObject"), "attestation_object")
    except ResponseError as e:
        raise EnrolError("malformed", f"The browser's answer is malformed ({e}): try again.") \
            from None
    settings = KeySettings.from_store(store)
    check = verify_enrolment(store, user, settings=settings, rp_id=rp_id, origin=origin,
                             challenge=state.challenge, client_data_json=client_data_json,
                             attestation_object=attestation_object,
                             credential_id=credential_id, via=BROWSER)
    discoverable = _discoverable(response)
    try:
        save_enrolment(store, user, name=name, check=check, rp_id=rp_id,
                       discoverable=discoverable, transports=_transports(response), via=BROWSER)
    except CredentialExists as e:
        raise EnrolError("exists", f"{e}.") from None
    except InvalidValue as e:
        raise EnrolError("invalid", str(e)) from None
    return BrowserEnrolment(
        name=name, credential_id=check.credential_id, aaguid=check.aaguid,
        discoverable=discoverable, user_verified=check.user_verified,
        attestation_trusted=check.attestation_trusted,
        warnings=tuple(enrolment_warnings(settings, check)))
