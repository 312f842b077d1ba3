"""The authenticator app (TOTP, RFC 6238): a second factor (something you have).

Enrolment
    ``begin_enrol`` makes a random 160-bit secret, stores it AES-GCM encrypted (the
    associated data is ``totp:METHOD_ID``, so a ciphertext moved to another row does not
    decrypt) in a method that is *not confirmed* yet, and returns the ``otpauth://`` URI
    (shown as a QR code: ``qr_terminal`` / ``write_qr``). ``confirm_enrol`` takes the first
    code the app shows: a valid one confirms the method (and makes it the preferred method
    when the user has none). Running ``begin_enrol`` again replaces a pending enrolment of
    the same name; a confirmed method of that name is a ``store.CredentialExists``.

Verification
    A code is accepted for the current time step and one step either side (``window``),
    compared in constant time against every candidate. The last accepted step is kept per
    method: a code of that step or an earlier one is a replay (``Reason.CODE_REPLAYED``),
    and the check and the update of the step are one transaction with a conditional
    ``UPDATE``, so two verifications of one code running together cannot both succeed.
    Every check runs under the method's lockout (``factors.checked``).

Several authenticator apps, no name given
    The code is first matched (without writing anything) against each app whose method is
    not locked. If it matches one (valid or replayed), only that one is checked, under its
    own lockout. If it matches none, each unlocked app is checked, so a wrong code counts
    one failure against each of them; the answer is the one closest to a lockout. When every
    app is locked, the answer is the first one's lockout. Locked apps are never matched, so
    a locked app cannot be probed through another one.

The secret and the codes are never logged, never in an audit record and never in a
``Verification``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

import pyotp

from ..atomicfile import write_private
from ..kinds import TOTP
from ..outcome import Reason
from ..secretbox import SecretError, equal
from ..store import KIND_TOTP, Method
from . import (
    FactorContext, FactorError, Verification, checked, lockout, refused, usable_methods,
)

log = logging.getLogger(__name__)

NAME = "authenticator app"
LABEL = TOTP.label
DIGITS = 6
PERIOD = 30
ALGORITHM = "SHA1"
WINDOW = 1
#: what the schema accepts (``totp_credentials``)
DIGITS_RANGE = (6, 8)
PERIOD_RANGE = (15, 120)
ALGORITHMS = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256, "SHA512": hashlib.sha512}

_SPACES_RE = re.compile(r"\s+")
_DIGITS_RE = re.compile(r"[0-9]+")

# match_step results
OK = "ok"
REPLAYED = "replayed"
WRONG = "wrong"
MALFORMED = "malformed"


# --------------------------------------------------------------------------- pure functions


def _algorithm(algorithm: str) -> str:
    name = str(algorithm).upper().replace("-", "")
    if name not in ALGORITHMS:
        raise ValueError(f"unknown TOTP algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
    return name


def _check_params(digits: int, period: int, algorithm: str) -> tuple[int, int, str]:
    """Validated ``(digits, period, ALGORITHM)``; ``ValueError`` otherwise."""
    if isinstance(digits, bool) or not isinstance(digits, int) \
            or not DIGITS_RANGE[0] <= digits <= DIGITS_RANGE[1]:
        raise ValueError(f"TOTP codes have {DIGITS_RANGE[0]} to {DIGITS_RANGE[1]} digits, "
                         f"not {digits!r}")
    if isinstance(period, bool) or not isinstance(period, int) \
            or not PERIOD_RANGE[0] <= period <= PERIOD_RANGE[1]:
        raise ValueError(f"a TOTP period is {PERIOD_RANGE[0]} to {PERIOD_RANGE[1]} seconds, "
                         f"not {period!r}")
    return digits, period, _algorithm(algorithm)


def _totp(secret: str, digits: int, period: int, algorithm: str) -> pyotp.TOTP:
    return pyotp.TOTP(secret, digits=digits, digest=ALGORITHMS[_algorithm(algorithm)],
                      interval=period)


def new_secret() -> str:
    """A new random secret: 32 base32 characters (160 bits, RFC 4226's recommendation)."""
    return pyotp.random_base32()


def provisioning_uri(secret: str, account: str, issuer: str, digits: int = DIGITS,
                     period: int = PERIOD, algorithm: str = ALGORITHM) -> str:
    """``otpauth://totp/Issuer:account?secret=...&issuer=...&algorithm=...&digits=...&period=...``
    (the Key URI format authenticator apps read from a QR code). ``algorithm``, ``digits``
    and ``period`` are always written, defaults included, so no app has to guess them."""
    digits, period, algorithm = _check_params(digits, period, algorithm)
    uri = _totp(secret, digits, period, algorithm).provisioning_uri(name=account,
                                                                    issuer_name=issuer)
    present = {k for k, _ in parse_qsl(urlsplit(uri).query)}
    extra = [f"{k}={v}" for k, v in (("algorithm", algorithm), ("digits", digits),
                                     ("period", period)) if k not in present]
    return uri + "".join("&" + e for e in extra)


def code_at(secret: str, for_time: float, digits: int = DIGITS, period: int = PERIOD,
            algorithm: str = ALGORITHM) -> str:
    """The code of ``secret`` at ``for_time`` (seconds since the epoch): for tests and demos."""
    digits, period, algorithm = _check_params(digits, period, algorithm)
    return _totp(secret, digits, period, algorithm).at(for_time)


def time_step(now: float, period: int = PERIOD) -> int:
    """The RFC 6238 time step of ``now``."""
    return int(float(now) // int(period))


def normalise_code(code: object) -> str:
    """The code as typed, without spaces (``"123 456"`` -> ``"123456"``)."""
    return _SPACES_RE.sub("", code) if isinstance(code, str) else ""


def match_step(secret: str, code: str, *, now: float, last_step: int | None,
               digits: int = DIGITS, period: int = PERIOD, algorithm: str = ALGORITHM,
               window: int = WINDOW) -> tuple[str, int | None]:
    """Match ``code`` against the steps ``now_step - window .. now_step + window``.

    Returns ``("malformed", None)`` when the code is not ``digits`` ASCII digits,
    ``("ok", step)`` for a match later than ``last_step``, ``("replayed", step)`` for a match
    at ``last_step`` or before, ``("wrong", None)`` otherwise. Every candidate is compared
    (constant time, no early return). Pure: nothing is read or written.
    """
    digits, period, algorithm = _check_params(digits, period, algorithm)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"the window is a number of steps >= 0, not {window!r}")
    typed = normalise_code(code)
    if len(typed) != digits or not _DIGITS_RE.fullmatch(typed):
        return MALFORMED, None
    otp = _totp(secret, digits, period, algorithm)
    now_step = time_step(now, period)
    steps = [step for step in range(now_step - window, now_step + window + 1)
             if step >= 0]  # before 1970: no such step (not secret-dependent)
    return classify_hits([(step, equal(otp.generate_otp(step), typed)) for step in steps],
                         last_step)


def classify_hits(hits: list[tuple[int, bool]], last_step: int | None
                  ) -> tuple[str, int | None]:
    """The verdict on a typed code from ``(step, matched)`` for every candidate step (all
    compared first, in constant time): ``("ok", step)`` for the latest match later than
    ``last_step``, else ``("replayed", step)`` for a match at or before it, else
    ``("wrong", None)``. One rule for online codes and the offline hashes
    (``organisation/totpcache.py``)."""
    last = -1 if last_step is None else int(last_step)
    fresh: int | None = None
    stale: int | None = None
    for step, hit in hits:
        if hit and step > last:
            fresh = step  # the latest fresh match wins
        elif hit:
            stale = step
    if fresh is not None:
        return OK, fresh
    if stale is not None:
        return REPLAYED, stale
    return WRONG, None


# --------------------------------------------------------------------------- QR codes


def _qr(uri: str):
    import segno

    return segno.make(uri, error="m")


def qr_terminal(uri: str) -> str:
    """The QR code of ``uri`` as text for a terminal (half-block characters, quiet zone
    included). It holds the secret: show it only to the user enrolling."""
    out = io.StringIO()
    _qr(uri).terminal(out=out, compact=True)
    return out.getvalue()


def qr_svg(uri: str) -> str:
    """The QR code of ``uri`` as SVG markup to put inline in a web page: no script, no
    ``style`` attribute (a strict Content-Security-Policy allows it), black on a white quiet
    zone, titled for screen readers. It holds the secret: show it only to the user
    enrolling."""
    svg = _qr(uri).svg_inline(scale=5, border=4, dark="#000", light="#fff",
                              title="QR code to scan with your authenticator app",
                              svgclass="app-qr", lineclass=None, omitsize=True)
    return svg.replace("<svg ", '<svg role="img" ', 1)


def write_qr(uri: str, path: str | os.PathLike[str]) -> Path:
    """Write the QR code of ``uri`` to ``path`` (PNG or SVG, by its suffix), mode 0600 (it
    holds the secret): written to a private temporary file, then moved into place."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("png", "svg"):
        raise ValueError(f"a QR code file is .png or .svg, not {path.name!r}")
    buf = io.BytesIO()
    _qr(uri).save(buf, kind=kind, scale=5, border=4)
    write_private(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------- enrolment


@dataclass(frozen=True)
class TotpEnrolment:
    """A started enrolment: the (unconfirmed) method, the secret and its ``otpauth://`` URI
    (both shown once to the user, neither in ``repr``)."""

    method: Method
    secret: str = field(repr=False)
    uri: str = field(repr=False)
    digits: int = DIGITS
    period: int = PERIOD
    algorithm: str = ALGORITHM

    def to_json(self, include_secret: bool = True) -> dict:
        data = {"method": self.method.name, "method_id": self.method.id,
                "confirmed": self.method.confirmed, "digits": self.digits,
                "period": self.period, "algorithm": self.algorithm}
        if include_secret:
            data.update(secret=self.secret, uri=self.uri)
        return data


def _aad(method_id: int) -> bytes:
    return f"totp:{int(method_id)}".encode()


def list_(ctx: FactorContext, user_id: str) -> list[Method]:
    """The user's authenticator apps, confirmed or not, in order of enrolment."""
    return ctx.store.list_methods(user_id, KIND_TOTP)


def begin_enrol(ctx: FactorContext, user_id: str, *, name: str = NAME, digits: int = DIGITS,
                period: int = PERIOD, algorithm: str = ALGORITHM) -> TotpEnrolment:
    """Start enrolling an authenticator app: a new secret, stored encrypted in an
    unconfirmed method (replacing a pending one of that name). Recorded as ``enrol.totp``
    ``started``. ``store.CredentialExists`` if a confirmed app has that name."""
    digits, period, algorithm = _check_params(digits, period, algorithm)
    store = ctx.store
    user = store.get_user_by_id(user_id)
    secret = new_secret()
    with store.transaction():
        existing = store.find_method(user.id, KIND_TOTP, name)
        replaced = existing is not None and not existing.confirmed
        if replaced:
            store.remove_method(existing.id)
        method = store.add_method(user.id, KIND_TOTP, name, confirmed=False)
        store.add_totp_credential(method.id,
                                  secret_enc=ctx.keys.encrypt(secret.encode(), aad=_aad(method.id)),
                                  digits=digits, period=period, algorithm=algorithm)
        store.record_event("enrol.totp", user_id=user.id, outcome="started",
                           detail={"method": method.name, "digits": digits, "period": period,
                                   "algorithm": algorithm, "replaced": replaced})
    log.info("authenticator-app enrolment started for user %s (method %d)", user.id, method.id)
    uri = provisioning_uri(secret, user.username, ctx.issuer, digits, period, algorithm)
    return TotpEnrolment(method, secret, uri, digits, period, algorithm)


def _check_code(ctx: FactorContext, method: Method, code: str,
                on_ok: Callable[[], None] | None = None,
                ok_message: str | None = None) -> Callable[[], tuple]:
    """The ``check`` for ``factors.checked``: read, match and advance ``last_step`` in one
    transaction (``on_ok`` runs in it too, after a success)."""
    store = ctx.store

    def check():
        now = ctx.now()
        with store.transaction():
            row = store.totp_credential(method.id)
            if row is None:
                return (False, Reason.VERIFICATION_FAILED,
                        f"authenticator app {method.name!r} has no stored secret: remove it and "
                        "enrol it again", {})
            try:
                secret = ctx.keys.decrypt(bytes(row["secret_enc"]), aad=_aad(method.id)).decode()
            except (SecretError, UnicodeDecodeError) as e:
                log.error("authenticator app (method %d): the stored secret cannot be read: %s",
                          method.id, e)
                return (False, Reason.VERIFICATION_FAILED,
                        f"the secret of authenticator app {method.name!r} cannot be read ({e}): "
                        "restore the key file, or remove the app and enrol it again", {})
            period = row["period"]
            result, step = match_step(secret, code, now=now, last_step=row["last_step"],
                                      digits=row["digits"], period=period,
                                      algorithm=row["algorithm"])
            if result == OK:
                if not store.advance_totp_step(method.id, step):
                    result = REPLAYED
                elif on_ok is not None:
                    on_ok()
        if result == OK:
            return (True, None, ok_message or f"{LABEL} accepted",
                    {"time_step_offset": step - time_step(now, period)})
        if result == REPLAYED:
            return False, Reason.CODE_REPLAYED, "this code was already used: wait for the next one", {}
        return False, Reason.WRONG_CODE, "wrong code", {}

    return check


def _pending(ctx: FactorContext, user_id: str, name: str | None) -> Method | None:
    pending = [m for m in list_(ctx, user_id) if not m.confirmed
               and (name is None or m.name.casefold() == name.casefold())]
    return pending[-1] if pending else None  # the latest enrolment


def pending_enrolment(ctx: FactorContext, user_id: str) -> TotpEnrolment | None:
    """The user's latest started enrolment that is not confirmed yet, with its secret and
    URI read back from the store (a web page shows the same QR code again after a wrong
    code: the secret stays on the server, never in a form the browser could change);
    None when none is waiting. Nothing is recorded."""
    method = _pending(ctx, user_id, None)
    if method is None:
        return None
    row = ctx.store.totp_credential(method.id)
    if row is None:
        return None
    try:
        secret = ctx.keys.decrypt(bytes(row["secret_enc"]), aad=_aad(method.id)).decode()
    except (SecretError, UnicodeDecodeError) as e:
        raise FactorError(Reason.VERIFICATION_FAILED,
                          f"the pending authenticator app's secret cannot be read ({e}): "
                          "start again") from None
    user = ctx.store.get_user_by_id(user_id)
    uri = provisioning_uri(secret, user.username, ctx.issuer, row["digits"], row["period"],
                           row["algorithm"])
    return TotpEnrolment(method, secret, uri, row["digits"], row["period"], row["algorithm"])


def confirm_enrol(ctx: FactorContext, user_id: str, code: str, *,
                  name: str | None = None) -> Verification:
    """Confirm a pending enrolment with the first code the app shows (under the method's
    lockout). On success the method is usable, becomes the preferred method when the user
    has none, and ``enrol.totp`` ``success`` is recorded. Without a name, the latest pending
    enrolment. ``FactorError(NO_CREDENTIAL)`` when none is waiting."""
    store = ctx.store
    method = _pending(ctx, user_id, name)
    if method is None:
        raise FactorError(Reason.NO_CREDENTIAL,
                          "no authenticator app enrolment is waiting for a code: run "
                          "`token-agent enrol totp` first")
    became_preferred: list[bool] = []

    def on_ok() -> None:
        store.confirm_method(method.id)
        if store.preferred_method(user_id) is None:
            store.set_preferred_method(user_id, method.id)
            became_preferred.append(True)

    result = checked(ctx, kind=KIND_TOTP, method=method, user_id=user_id,
                     check=_check_code(ctx, method, code, on_ok,
                                       f"{LABEL} {method.name!r} confirmed"))
    if not result.ok:
        return result
    store.record_event("enrol.totp", user_id=user_id, outcome="success",
                       detail={"method": method.name, "preferred": bool(became_preferred)})
    log.info("authenticator app confirmed for user %s (method %d)", user_id, method.id)
    return dataclasses.replace(result, method=store.get_method(method.id))


#: codes a person may type to confirm an enrolment before it stops asking (each wrong one
#: counts against the pending app's own lockout, which its confirmation clears: never
#: against the password or the user's other methods)
CONFIRM_ATTEMPTS = 3
#: the failures worth asking for another code (a lock, or no enrolment waiting, is not)
RETRY_REASONS = (Reason.WRONG_CODE, Reason.CODE_REPLAYED)


def confirm_enrol_asking(ctx: FactorContext, user_id: str,
                         ask: Callable[[Verification | None], str | None], *,
                         name: str | None = None,
                         attempts: int = CONFIRM_ATTEMPTS) -> Verification | None:
    """:func:`confirm_enrol` with the codes ``ask(previous)`` gives (``previous``: None the
    first time, then the failed result, to show): a mistyped or replayed code is asked
    again, up to ``attempts`` codes. The last result; None when no code was given at all
    (``ask`` returned None: the person stopped)."""
    result = None
    for _ in range(attempts):
        code = ask(result)
        if not code:
            break
        result = confirm_enrol(ctx, user_id, code, name=name)
        if result.ok or result.reason not in RETRY_REASONS:
            break
    return result


# --------------------------------------------------------------------------- verification


def _peek(ctx: FactorContext, method: Method, code: str) -> str:
    """What ``code`` would be for ``method`` now, without writing anything (``"error"`` when
    the secret cannot be read: the real check reports it)."""
    try:
        row = ctx.store.totp_credential(method.id)
        if row is None:
            return "error"
        secret = ctx.keys.decrypt(bytes(row["secret_enc"]), aad=_aad(method.id)).decode()
        return match_step(secret, code, now=ctx.now(), last_step=row["last_step"],
                          digits=row["digits"], period=row["period"], algorithm=row["algorithm"])[0]
    except (SecretError, UnicodeDecodeError, ValueError):
        return "error"


def _verify_one(ctx: FactorContext, user_id: str, method: Method, code: str) -> Verification:
    return checked(ctx, kind=KIND_TOTP, method=method, user_id=user_id,
                   check=_check_code(ctx, method, code))


def verify(ctx: FactorContext, user_id: str, code: str, *, name: str | None = None) -> Verification:
    """Check a code from the user's authenticator app (the one named, or any confirmed one:
    see the module's docstring for several apps)."""
    store = ctx.store
    methods = [m for m in usable_methods(store, user_id) if m.kind == KIND_TOTP
               and (name is None or m.name.casefold() == name.casefold())]
    if not methods:
        pending = [m for m in list_(ctx, user_id) if not m.confirmed
                   and (name is None or m.name.casefold() == name.casefold())]
        which = "no authenticator app" if name is None else f"no authenticator app named {name!r}"
        message = f"{which} is set up"
        if pending:
            message += " (an enrolment is waiting for its first code)"
        return refused(ctx, KIND_TOTP, user_id, Reason.NO_CREDENTIAL, message,
                       **({"method": name} if name is not None else {}))
    if len(methods) == 1:
        return _verify_one(ctx, user_id, methods[0], code)
    now = ctx.now()
    unlocked = [m for m in methods
                if not lockout.state(store, lockout.method_scope(m.id)).locked(now)]
    if not unlocked:
        return _verify_one(ctx, user_id, methods[0], code)  # refused: locked
    peeks = [(m, _peek(ctx, m, code)) for m in unlocked]  # every unlocked app is matched
    for wanted in (OK, REPLAYED):
        hit = next((m for m, r in peeks if r == wanted), None)
        if hit is not None:
            return _verify_one(ctx, user_id, hit, code)
    results = [_verify_one(ctx, user_id, m, code) for m in unlocked]
    if any(r.ok for r in results):  # a code that became valid in between
        return next(r for r in results if r.ok)
    return min(results, key=lambda r: 10 ** 9 if r.tries_left is None else r.tries_left)


# --------------------------------------------------------------------------- removal


def remove(ctx: FactorContext, user_id: str, name: str | None = None) -> Method:
    """Remove an authenticator app (the one named, or the user's only one), confirmed or
    pending; recorded as ``remove.totp``."""
    store = ctx.store
    methods = [m for m in list_(ctx, user_id)
               if name is None or m.name.casefold() == name.casefold()]
    if not methods:
        raise FactorError(Reason.NO_CREDENTIAL,
                          "no authenticator app is set up" if name is None
                          else f"no authenticator app named {name!r}")
    if len(methods) > 1:
        raise FactorError(Reason.AMBIGUOUS,
                          "several authenticator apps are set up: name the one to remove ("
                          + ", ".join(repr(m.name) for m in methods) + ")")
    method = methods[0]
    with store.transaction():
        store.remove_method(method.id)
        store.record_event("remove.totp", user_id=user_id, outcome="success",
                           detail={"method": method.name, "confirmed": method.confirmed})
    log.info("authenticator app removed for user %s (method %d)", user_id, method.id)
    return method
