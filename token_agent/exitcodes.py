"""Exit codes of the `token-agent` command, stable for scripts (documented in README)."""

from __future__ import annotations

from .outcome import Reason

OK = 0
ERROR = 1  # anything unexpected, or a refused request that fits no code below
USAGE = 2  # bad arguments (click's own code)
AUTH_FAILED = 3  # authentication refused: wrong PIN, unknown user or credential, bad signature...
NO_DEVICE = 4  # no key, key removed, or the key failed
TIMEOUT = 5  # no touch in time (also the touch asked before a PIN try), or cancelled (Ctrl-C)
LOCKED = 6  # PIN blocked / too many wrong PINs: needs a power cycle, a reset or an administrator
STORE = 7  # the credential store cannot be used (unwritable, corrupt, newer schema)
NOT_FOUND = 8  # the user, credential or setting named does not exist
CONFLICT = 9  # it exists already (user, key name, key or contact already enrolled)
ENROL_REQUIRED = 10  # the policy requires a second factor and the user has none set up yet
DELIVERY = 11  # a one-time code could not be sent (gateway down, not configured), or sent too often
ORGANISATION = 12  # this workstation belongs to an organisation: users and methods are managed
                   # through its server, not a local store (or it has not joined it yet)
SERVER_UNAVAILABLE = 13  # no server of the organisation answered

REASON_CODES: dict[Reason, int] = {
    Reason.UNKNOWN_USER: AUTH_FAILED,
    Reason.USER_DISABLED: AUTH_FAILED,
    Reason.NO_CREDENTIAL: AUTH_FAILED,
    Reason.UNKNOWN_CREDENTIAL: AUTH_FAILED,
    Reason.WRONG_USER: AUTH_FAILED,
    Reason.CREDENTIAL_FLAGGED: AUTH_FAILED,
    Reason.CLONE_SUSPECTED: AUTH_FAILED,
    Reason.VERIFICATION_FAILED: AUTH_FAILED,
    Reason.UV_REQUIRED: AUTH_FAILED,
    Reason.WRONG_PIN: AUTH_FAILED,
    Reason.PIN_REQUIRED: AUTH_FAILED,
    Reason.AMBIGUOUS: AUTH_FAILED,
    Reason.PIN_BLOCKED: LOCKED,
    Reason.PIN_AUTH_BLOCKED: LOCKED,
    Reason.TIMEOUT: TIMEOUT,
    Reason.PRESENCE_REQUIRED: TIMEOUT,
    Reason.CANCELLED: TIMEOUT,
    Reason.DEVICE_REMOVED: NO_DEVICE,
    Reason.NO_DEVICE: NO_DEVICE,
    Reason.DEVICE_ERROR: NO_DEVICE,
    Reason.CERT_EXPIRED: AUTH_FAILED,
    Reason.CERT_NOT_YET_VALID: AUTH_FAILED,
    Reason.CERT_REVOKED: AUTH_FAILED,
    Reason.CERT_UNTRUSTED: AUTH_FAILED,
    Reason.CERT_INVALID: AUTH_FAILED,
    Reason.REVOCATION_UNKNOWN: AUTH_FAILED,
    Reason.WRONG_PUK: AUTH_FAILED,
    Reason.SPONSOR_NOT_AUTHORISED: AUTH_FAILED,
    Reason.PUK_BLOCKED: LOCKED,
    Reason.PIN_NOT_BLOCKED: ERROR,
    Reason.TOO_MANY_ATTEMPTS: LOCKED,
    Reason.NOT_SUPPORTED_CARD: NO_DEVICE,
    Reason.PCSC_UNAVAILABLE: NO_DEVICE,
    Reason.WRONG_PASSWORD: AUTH_FAILED,
    Reason.WRONG_CODE: AUTH_FAILED,
    Reason.CODE_EXPIRED: AUTH_FAILED,
    Reason.CODE_REPLAYED: AUTH_FAILED,
    Reason.METHOD_LOCKED: LOCKED,
    Reason.METHOD_NOT_ALLOWED: AUTH_FAILED,
    Reason.NOT_CONFIRMED: AUTH_FAILED,
    Reason.ALREADY_ENROLLED: CONFLICT,
    Reason.ENROLMENT_REQUIRED: ENROL_REQUIRED,
    Reason.DELIVERY_FAILED: DELIVERY,
    Reason.RESEND_THROTTLED: DELIVERY,
    Reason.PUSH_DENIED: AUTH_FAILED,
    Reason.PUSH_WRONG_NUMBER: AUTH_FAILED,
    Reason.PUSH_EXPIRED: TIMEOUT,
    Reason.LEGACY_NOT_ALLOWED: AUTH_FAILED,
    # the organisation's server: none answered (or it refuses this workstation), or it was
    # lost mid-login (try again: nothing was signed in)
    Reason.SERVER_UNAVAILABLE: SERVER_UNAVAILABLE,
    Reason.SERVER_LOST: SERVER_UNAVAILABLE,
}
