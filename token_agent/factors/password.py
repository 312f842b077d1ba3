"""The password: a primary factor (something you know), one per user, stored as an scrypt
hash (``token_agent.secretbox``). Failures count against the user's password lockout
(``password_max_failures``, growing lock times), not against any other method."""

from __future__ import annotations

from ..outcome import Reason
from ..secretbox import SCRYPT_N, SCRYPT_P, SCRYPT_R, hash_password, needs_rehash
from ..secretbox import verify_password as _verify_hash
from ..store import KIND_PASSWORD, Method
from . import FactorContext, FactorError, Verification, checked, lockout, refused

MIN_LENGTH = 8  # NIST SP 800-63B: at least 8 characters when chosen by the user
MAX_LENGTH = 128
NAME = "password"
#: checked when there is no hash to check (an unknown or disabled user, no password set, the
#: password locked): the same scrypt work as a real check, and it never matches
_DECOY_HASH = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${'A' * 22}${'A' * 43}"


def decoy(password: str | None) -> None:
    """Spend the time of a password check without one, so that how long an answer takes
    says nothing about whether the user exists or has a password."""
    _verify_hash(password or "", _DECOY_HASH)


def check_new_password(password: str, username: str) -> str:
    """A new password must be 8 to 128 characters and not the username; returns it."""
    if not isinstance(password, str) or len(password) < MIN_LENGTH:
        raise FactorError(Reason.WRONG_PASSWORD,
                          f"a password needs at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise FactorError(Reason.WRONG_PASSWORD, f"a password is at most {MAX_LENGTH} characters")
    if password.casefold() == username.casefold():
        raise FactorError(Reason.WRONG_PASSWORD, "a password must not be the username")
    return password


def get(ctx: FactorContext, user_id: str) -> Method | None:
    return ctx.store.find_method(user_id, KIND_PASSWORD)


def set_password(ctx: FactorContext, user_id: str, password: str) -> Method:
    """Set (or replace) the user's password; recorded as ``enrol.password``."""
    store = ctx.store
    user = store.get_user_by_id(user_id)
    check_new_password(password, user.username)
    digest = hash_password(password)  # slow: outside the transaction
    now = ctx.now()
    with store.transaction():
        method = get(ctx, user.id)
        changed = method is not None
        if method is None:
            method = store.add_method(user.id, KIND_PASSWORD, NAME)
            store.add_password_credential(method.id, digest, now)
        else:
            store.set_password_hash(method.id, digest, now)
        store.record_event("enrol.password", user_id=user.id, outcome="success",
                           detail={"changed": changed})
    return method


def verify(ctx: FactorContext, user_id: str, password: str) -> Verification:
    """Check the user's password (under the password lockout)."""
    store = ctx.store
    method = get(ctx, user_id)
    if method is None:
        decoy(password)
        return refused(ctx, KIND_PASSWORD, user_id, Reason.NO_CREDENTIAL,
                       "no password is set for this user")
    stored = store.password_hash(method.id)

    def check():
        if _verify_hash(password, stored):
            return True, None, "password accepted", {}
        return False, Reason.WRONG_PASSWORD, "wrong password", {}

    result = checked(ctx, kind=KIND_PASSWORD, method=method, user_id=user_id, check=check,
                     scope=lockout.password_scope(user_id),
                     max_failures=ctx.lockout.password_max_failures)
    if result.reason is Reason.METHOD_LOCKED:
        decoy(password)  # refused unchecked: as slow as a check all the same
    if result.ok and needs_rehash(stored):
        new = hash_password(password)
        store.set_password_hash(method.id, new)
    return result
