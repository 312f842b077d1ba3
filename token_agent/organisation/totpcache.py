"""Authenticator-app codes checked offline, without the secret ever leaving the server.

Server (``hashes_for``): for each confirmed authenticator app of the user, the code of every
30-second step from now to the end of the offline window (``[offline] max_hours``) is hashed
with PBKDF2-HMAC-SHA256 under a random salt of the app's and the step's number (so no two
hashes share a salt and nothing can be precomputed), ``ITERATIONS`` rounds: 1.7 to 2.0 ms a
hash on the development machine (``measure()``, 2 cores), so 12 hours (1442 steps) cost
about 2.6 s of the server's time per app (3.2 s measured for the whole ``POST
/v1/offline/totp`` over TLS), asked for apart from the login, after it. A 6-digit code has
a million values: someone holding a decrypted cache needs about half an hour of one core
per step to find a code, and a code alone logs nobody in (it is only a second factor, after
a key or card).

Workstation (``check``): a typed code is hashed for the steps around now (one either side,
as online) and compared in constant time with the cached hashes; a match of a step later
than the last one used is accepted, and that step and every earlier one are consumed
(``WorkstationCache.consume_totp_step``); a match at or before it is a replay.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from typing import TYPE_CHECKING, Any

from ..factors import totp as totp_factor
from ..secretbox import equal

if TYPE_CHECKING:
    from ..agent import Agent

#: PBKDF2 rounds per code hash (about 1.8 ms here; ``measure``)
ITERATIONS = 6000
SALT_LEN = 16
HASH_LEN = 16
#: steps accepted either side of now (as online: ``factors.totp.WINDOW``)
WINDOW = totp_factor.WINDOW

OK, REPLAYED, WRONG, MALFORMED = (totp_factor.OK, totp_factor.REPLAYED, totp_factor.WRONG,
                                  totp_factor.MALFORMED)
_DIGITS = re.compile(r"[0-9]+")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def code_hash(code: str, salt: bytes, step: int, iterations: int = ITERATIONS) -> bytes:
    """The slow hash of ``code`` for ``step`` under the app's ``salt``."""
    return hashlib.pbkdf2_hmac("sha256", code.encode("ascii"), salt + int(step).to_bytes(8, "big"),
                               int(iterations), HASH_LEN)


def measure(samples: int = 50) -> float:
    """Milliseconds one code hash takes here."""
    salt = os.urandom(SALT_LEN)
    started = time.perf_counter()
    for i in range(samples):
        code_hash("123456", salt, i)
    return (time.perf_counter() - started) / samples * 1000


def hashes_for(agent: "Agent", user, *, hours: float | None = None,
               now: float | None = None) -> dict[str, Any]:
    """The hashes of the user's authenticator-app codes for the offline window (``hours``:
    the policy's ``[offline] max_hours``): ``{"user_id", "apps": [{"method", "name",
    "digits", "period", "algorithm", "iterations", "salt", "first_step", "hashes"}]}``.
    Steps already used online (``last_step``) are left out. The secret is decrypted here
    and goes nowhere else."""
    from ..factors import usable_methods
    from ..store import KIND_TOTP

    store, keys = agent.store, agent.keys
    now = agent.now() if now is None else float(now)
    hours = agent.policy.offline.max_hours if hours is None else hours
    apps = []
    for method in usable_methods(store, user.id):
        if method.kind != KIND_TOTP:
            continue
        row = store.totp_credential(method.id)
        if row is None:
            continue
        secret = keys.decrypt(bytes(row["secret_enc"]),
                              aad=f"totp:{int(method.id)}".encode()).decode()
        period, digits, algorithm = int(row["period"]), int(row["digits"]), row["algorithm"]
        now_step = totp_factor.time_step(now, period)
        first = max(now_step - WINDOW, int(row["last_step"]) + 1)
        last = totp_factor.time_step(now + hours * 3600, period) + WINDOW
        salt = os.urandom(SALT_LEN)
        otp = totp_factor._totp(secret, digits, period, algorithm)
        hashes = b"".join(code_hash(otp.generate_otp(step), salt, step)
                          for step in range(first, last + 1)) if hours > 0 else b""
        apps.append({"method": str(method.id), "name": method.name, "digits": digits,
                     "period": period, "algorithm": algorithm, "iterations": ITERATIONS,
                     "salt": _b64(salt), "first_step": first, "hashes": _b64(hashes)})
    return {"user_id": user.id, "apps": apps}


def match(app: dict[str, Any], code: str, *, now: float, last_step: int) -> tuple[str, int | None]:
    """Match a typed ``code`` against one app's cached hashes for the steps around ``now``:
    ``("ok", step)`` for a step later than ``last_step``, ``("replayed", step)`` for one at
    or before it, ``("wrong", None)``, ``("malformed", None)``. Every candidate step in the
    cache is hashed and compared (constant time, no early return)."""
    digits, period = int(app["digits"]), int(app["period"])
    typed = totp_factor.normalise_code(code)
    if len(typed) != digits or not _DIGITS.fullmatch(typed):
        return MALFORMED, None
    salt, hashes = _unb64(app["salt"]), _unb64(app["hashes"])
    first, iterations = int(app["first_step"]), int(app["iterations"])
    count = len(hashes) // HASH_LEN
    now_step = totp_factor.time_step(now, period)
    hits = []
    for step in range(now_step - WINDOW, now_step + WINDOW + 1):
        index = step - first
        if not 0 <= index < count:
            continue
        stored = hashes[index * HASH_LEN:(index + 1) * HASH_LEN]
        hits.append((step, equal(code_hash(typed, salt, step, iterations), stored)))
    return totp_factor.classify_hits(hits, last_step)
