"""Backup codes: ten one-time codes, shown once, stored as keyed hashes, each usable once.

A user holds at most one set (method kind ``backup_codes``); generating a new set replaces
the old one (its unused codes stop working). A code is 12 characters from an alphabet
without look-alikes (60 bits), shown in groups of four (``k7dm-4x2q-h9tn``); spaces, dashes
and case do not matter when it is typed. A use is recorded, and the number left is shown.
"""

from __future__ import annotations

import secrets

from ..outcome import Reason
from ..secretbox import equal
from ..store import KIND_BACKUP_CODES, Method
from . import FactorContext, Verification, checked, refused

COUNT = 10
LENGTH = 12
ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"  # no 0/o, 1/l/i
NAME = "backup codes"


def _normalise(code: str) -> str:
    return "".join(ch for ch in str(code).lower() if ch not in " -\t")


def _format(raw: str) -> str:
    return "-".join(raw[i:i + 4] for i in range(0, len(raw), 4))


def _purpose(method_id: int) -> str:
    return f"backup:{method_id}"


def get(ctx: FactorContext, user_id: str) -> Method | None:
    return ctx.store.find_method(user_id, KIND_BACKUP_CODES)


def generate(ctx: FactorContext, user_id: str) -> tuple[Method, list[str]]:
    """A new set of ten codes (replacing any earlier set); returns the method and the codes,
    which are shown once and never stored in clear."""
    store = ctx.store
    user = store.get_user_by_id(user_id)
    codes = ["".join(secrets.choice(ALPHABET) for _ in range(LENGTH)) for _ in range(COUNT)]
    with store.transaction():
        old = get(ctx, user.id)
        if old is not None:
            store.remove_method(old.id)
        method = store.add_method(user.id, KIND_BACKUP_CODES, NAME)
        store.add_backup_codes(method.id, [ctx.keys.code_hash(_purpose(method.id), c) for c in codes])
        store.record_event("enrol.backup_codes", user_id=user.id, outcome="success",
                           detail={"count": COUNT, "replaced": old is not None})
    return method, [_format(c) for c in codes]


def remaining(ctx: FactorContext, user_id: str) -> int:
    method = get(ctx, user_id)
    if method is None:
        return 0
    return ctx.store.unused_backup_codes(method.id)


def verify(ctx: FactorContext, user_id: str, code: str) -> Verification:
    """Use one backup code (under the method's lockout)."""
    store = ctx.store
    method = get(ctx, user_id)
    if method is None:
        return refused(ctx, KIND_BACKUP_CODES, user_id, Reason.NO_CREDENTIAL,
                       "no backup codes were generated for this user")

    def check():
        typed = _normalise(code)
        digest = ctx.keys.code_hash(_purpose(method.id), typed)
        with store.transaction():
            rows = store.backup_codes(method.id)
            match = None
            for row in rows:  # every row is compared: the time does not depend on which matched
                if equal(bytes(row["code_hash"]), digest) and match is None:
                    match = row
            if match is None:
                return False, Reason.WRONG_CODE, "wrong backup code", {}
            if match["used_at"] is not None:
                return False, Reason.CODE_REPLAYED, "this backup code was already used", {}
            if not store.use_backup_code(match["id"], ctx.now()):
                return False, Reason.CODE_REPLAYED, "this backup code was already used", {}
            left = sum(1 for r in rows if r["used_at"] is None) - 1
        message = f"backup code accepted; {left} left" + (
            ": generate new ones soon (token-agent enrol backup-codes)" if left <= 2 else "")
        return True, None, message, {"remaining": left}

    return checked(ctx, kind=KIND_BACKUP_CODES, method=method, user_id=user_id, check=check)
