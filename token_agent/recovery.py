"""A forgotten password, reset by the user with two of their verified methods.

    token = start(agent, "alice")            # the browser keeps the token (a cookie)
    reset = current(agent, token)
    prompt = choose(agent, reset, "totp")    # "Enter the code from your authenticator app"
    proof = prove(agent, current(agent, token), "123456")
    ...                                      # a second, different method
    finish(agent, current(agent, token), "new password", "new password")

Which methods count: the user's confirmed, unflagged authenticator apps (``totp``) and
contacts (``sms``, ``voice``, ``email``, ``messaging``: a code is sent to them), their
backup codes (one backup code at most: the codes are one method), and the security keys and
passkeys enrolled on the pages (``token_agent.browserkey``: the pages' RP ID; the browser's
options carry a decoy credential for a name without one, as at sign-in, and the challenge is
kept in the reset and spent once). Two *distinct* methods
must be proven, each through its factor's own verify function, so every failure counts
on that method's lockout (in its "unfamiliar" scope: a reset page is never the user's
own workstation). A user who holds fewer than two such methods is refused once they
prove the one they have, and is told, on their email and SMS contacts, that a reset was
asked for and refused; after a reset they are told that it happened.

No user enumeration: until a method is proven, an unknown user, a disabled one and one
without the method chosen see the same pages, in the same time:

* the methods offered first are the same for everyone (the kinds the organisation can
  check, not the user's);
* a code is sent *in the background* ("If the account has a mobile number for text
  messages, we have sent a code to it"), so the answer does not wait for the gateway;
* every failure says the same sentence, with no tries left or lock times;
* each step takes at least ``FLOOR_SECONDS`` (the work is padded to it), so that a store
  write or a code check more or less does not show.

The reset's state is server-side (``recovery_resets``, keyed by the SHA-256 of the token):
the user, the methods proven, the method asked for now; the browser holds only the token.
A reset lasts ``RESET_TTL`` seconds and allows ``MAX_FAILURES`` wrong codes; the pages add
rate limits per user name and per address (``web/recovery.py``).

The new password follows the project's rules (``factors.password.check_new_password``)
and is set by ``factors.password.set_password`` (what ``token-agent enrol password`` does);
the password's lockout is cleared, every web session of the user ends, and the audit log
gets ``recovery.*`` events (never a code or a password).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from .factors import FactorError, backup, codes, lockout, password, totp, usable_methods
from . import kinds
from .kinds import label_of_store
from .outcome import Reason
from .store import UnknownCredential, UnknownUser

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("token_agent.recovery")

RESET_TTL = 15 * 60
MAX_FAILURES = 5
#: every step (start, choose, prove) takes at least this long, whatever it found
FLOOR_SECONDS = 0.4
@dataclass(frozen=True)
class Way:
    """A kind of method that can prove who someone is here (its policy name), what the
    methods page offers and what the code page then says (the same for everyone)."""

    kind: str
    offer: str
    prompt: str

    @property
    def store_kind(self) -> str:
        return kinds.by_policy(self.kind).store


#: the methods that can prove who someone is here, in the order offered
WAYS: tuple[Way, ...] = (
    Way("totp", "A code from your authenticator app",
        "Enter the 6-digit code your authenticator app shows now."),
    Way("sms", "A code sent by text message to your mobile phone",
        "If the account has a mobile number for text messages, we have sent a code to it. "
        "Enter the code from the text message."),
    Way("voice", "A code read out in a phone call",
        "If the account has a phone number for calls, we are calling it now to read out a "
        "code. Enter the code you hear."),
    Way("email", "A code sent to your email address",
        "If the account has an email address, we have sent a code to it. Enter the code from "
        "the email."),
    Way("messaging", "A code sent to your messaging app",
        "If the account has a messaging app number, we have sent a code to it. Enter the code "
        "from the message."),
    Way("backup", "One of your backup codes", "Enter one of your backup codes. Each code "
        "works once."),
    Way("key", "Your security key or passkey",
        "Use your security key or passkey. Your browser will ask you to touch the key, or to "
        "confirm with its PIN, your fingerprint or your face."),
)


def way(kind: str | None) -> Way | None:
    return next((w for w in WAYS if w.kind == kind), None)


WRONG = ("That code did not work. Check it and try again, ask for a new code, or choose "
         "another method.")
EXPIRED = "Your password reset has expired or was not started. Start again."
TOO_MANY = "Too many wrong codes for this reset. Start again in a few minutes."
STARTED, PROVEN, DONE, REFUSED = "started", "proven", "done", "refused"


class ResetError(Exception):
    """The reset cannot go on (expired, unknown, in the wrong step): start again."""

    def __init__(self, message: str = EXPIRED) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Reset:
    id: str
    user_id: str | None
    username: str
    expires_at: float
    proven: tuple[int, ...]  # the methods proven, by id
    proven_kinds: tuple[str, ...]
    failures: int
    step_kind: str | None
    step_method: int | None
    state: str
    #: the security key step's challenge and options (``browserkey``), kept server-side
    key: dict | None = None

    @property
    def proofs(self) -> int:
        return len(self.proven)


@dataclass(frozen=True)
class Proof:
    ok: bool
    state: str  # started (prove another), proven (choose the password), refused
    message: str


@contextlib.contextmanager
def _padded(floor: float = FLOOR_SECONDS) -> Iterator[None]:
    """Run the block, then wait until ``floor`` seconds have passed since it started."""
    start = time.monotonic()
    try:
        yield
    finally:
        left = floor - (time.monotonic() - start)
        if left > 0:
            time.sleep(left)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _ctx(agent: "Agent"):
    # failures on the reset page count in the methods' "unfamiliar" lockout scopes
    return dataclasses.replace(agent.factors(), familiar=False)


# --------------------------------------------------------------------------- the steps


def start(agent: "Agent", username: str) -> str:
    """Start a reset for ``username`` (whoever it is); returns the token for the browser."""
    store = agent.store
    name = (username or "").strip()[:256] or "-"
    with _padded():
        try:
            user = store.get_user(name)
        except (UnknownUser, ValueError):
            user = None
        can = user is not None and not user.disabled
        token = secrets.token_urlsafe(32)
        now = agent.now()
        store.add_reset(_hash(token), user.id if can else None, name, now=now,
                        expires_at=now + RESET_TTL)
        store.record_event("recovery.started", user_id=user.id if user else None,
                           username=None if user else name, outcome="started",
                           detail={"known": user is not None,
                                   "disabled": bool(user and user.disabled)})
    return token


def current(agent: "Agent", token: str | None) -> Reset:
    """The reset the browser's token names; ``ResetError`` when there is none (or it
    expired, or is finished)."""
    if not token or len(token) > 200:
        raise ResetError()
    row = agent.store.get_reset(_hash(token))
    if row is None or row["expires_at"] <= agent.now() or row["state"] == DONE:
        raise ResetError()
    return _reset_of(row)


def _reset_of(row: dict) -> Reset:
    data = json.loads(row["proofs"] or "{}")
    if not isinstance(data, dict):
        data = {}
    return Reset(id=row["id"], user_id=row["user_id"], username=row["username"],
                 expires_at=row["expires_at"], proven=tuple(data.get("methods", ())),
                 proven_kinds=tuple(data.get("kinds", ())), failures=int(data.get("failures", 0)),
                 step_kind=row["step_kind"], step_method=row["step_method"], state=row["state"],
                 key=data.get("key") if isinstance(data.get("key"), dict) else None)


def cancel(agent: "Agent", token: str | None) -> None:
    if token and len(token) <= 200:
        agent.store.delete_reset(_hash(token))


def _eligible(agent: "Agent", user_id: str, rp_id: str | None = None) -> list:
    """The user's methods that can prove who they are here (backup codes only with codes
    left; security keys only those enrolled for the pages' ``rp_id``, when given)."""
    ctx = agent.factors()
    site_keys = set()
    if rp_id is not None:
        from . import browserkey

        site_keys = {c.id for c in browserkey.browser_keys(
            agent, agent.store.get_user_by_id(user_id), rp_id)}
    out = []
    for m in usable_methods(agent.store, user_id):
        if m.kind not in {w.store_kind for w in WAYS}:
            continue
        if m.kind == "backup_codes" and backup.remaining(ctx, user_id) == 0:
            continue
        if m.kind == "fido2" and m.id not in site_keys:
            continue
        out.append(m)
    return out


def offered(agent: "Agent", reset: Reset, rp_id: str | None = None) -> list[tuple[str, str]]:
    """The methods to choose from: before any proof, every kind the organisation can check
    (the same list for everyone; a security key when the pages' ``rp_id`` is given); after
    one, the kinds this user holds and has not proven."""
    delivery = agent.delivery
    channels = set(delivery.configured_channels()) if delivery is not None else set()
    ways = [w for w in WAYS if w.kind in ("totp", "backup") or w.kind in channels
            or w.kind == "key" and rp_id is not None]
    if reset.proofs and reset.user_id is not None:
        held = _eligible(agent, reset.user_id, rp_id)
        left = {m.kind for m in held if m.id not in reset.proven}
        ways = [w for w in ways if w.store_kind in left]
    return [(w.kind, w.offer) for w in ways]


def prompt(reset: Reset) -> str:
    """What the code page says for the method asked for now."""
    chosen = way(reset.step_kind)
    if chosen is None:
        raise ResetError("Choose a method first.")
    return chosen.prompt


def _method_for(agent: "Agent", reset: Reset, kind: str):
    if reset.user_id is None:
        return None
    wanted = way(kind).store_kind
    held = [m for m in _eligible(agent, reset.user_id)
            if m.kind == wanted and m.id not in reset.proven]
    if not held:
        return None
    preferred = agent.store.preferred_method(reset.user_id)
    return next((m for m in held if preferred is not None and m.id == preferred.id), held[0])


def _send_in_background(agent: "Agent", method) -> None:
    ctx = _ctx(agent)

    def send() -> None:
        try:
            codes.send_code(ctx, method, purpose="login")
        except FactorError as e:  # recorded as code.sent by send_code; never shown
            log.info("no reset code sent (%s)", e.reason.value)
        except Exception:  # noqa: BLE001 - a background thread: logged, the page is uniform
            log.exception("sending a reset code failed")

    threading.Thread(target=send, name="recovery-send", daemon=True).start()


def _data(reset: Reset, *, methods=None, proven_kinds=None, failures=None,
          key: dict | None = None) -> str:
    data = {"methods": list(reset.proven if methods is None else methods),
            "kinds": list(reset.proven_kinds if proven_kinds is None else proven_kinds),
            "failures": reset.failures if failures is None else failures}
    if key is not None:
        data["key"] = key
    return json.dumps(data)


def choose(agent: "Agent", reset: Reset, kind: str, rp_id: str | None = None) -> str:
    """Ask for ``kind`` next (sending its code in the background when it is a contact the
    user holds; for a security key, the browser's options: a decoy credential for a user
    name without a key here, as at sign-in); returns what to tell the person.
    ``ResetError`` for a kind not offered."""
    if reset.state != STARTED:
        raise ResetError()
    if kind not in dict(offered(agent, reset, rp_id)):
        raise ResetError("Choose one of the methods listed.")
    with _padded():
        method = None if kind == "key" else _method_for(agent, reset, kind)
        key = None
        if kind == "key":
            from . import browserkey

            options, state = browserkey.assertion_options(agent, reset.username, rp_id)
            key = {"options": options, "challenge": state.to_json()}
        agent.store.update_reset(reset.id, expect_state=STARTED, now=agent.now(),
                                 step_kind=kind, proofs=_data(reset, key=key),
                                 step_method=None if method is None else method.id)
        if method is not None and kind in codes.CHANNELS:
            _send_in_background(agent, method)
        agent.store.record_event("recovery.method", user_id=reset.user_id,
                                 username=None if reset.user_id else reset.username,
                                 outcome="asked", detail={"kind": kind,
                                                          "held": method is not None})
    return way(kind).prompt


def _verify(agent: "Agent", reset: Reset, code: str):
    ctx = _ctx(agent)
    kind = reset.step_kind
    if kind == "totp":
        return totp.verify(ctx, reset.user_id, code)
    if kind == "backup":
        return backup.verify(ctx, reset.user_id, code)
    try:
        method = agent.store.get_method(reset.step_method)
    except UnknownCredential:  # removed since its code was sent: a failure like any other
        return None
    return codes.verify_code(ctx, method, code, purpose="login")


def _save(agent: "Agent", reset: Reset, *, state: str, methods, proven_kinds, failures: int,
          step: bool = True) -> None:
    values = {"proofs": _data(reset, methods=methods, proven_kinds=proven_kinds,
                              failures=failures, key=None if step else reset.key),
              "state": state}
    if step:
        values.update(step_kind=None, step_method=None)
    if not agent.store.update_reset(reset.id, expect_state=STARTED, now=agent.now(), **values):
        raise ResetError()


def prove(agent: "Agent", reset: Reset, code: str, rp_id: str | None = None) -> Proof:
    """Check ``code`` for the method asked for now. The same failure for everyone until a
    method is proven; after the first proof, a user with fewer than two methods is refused
    (and told on their contacts); after the second, the reset is ``proven``."""
    if reset.state != STARTED or reset.step_kind in (None, "key"):
        raise ResetError()
    with _padded():
        result = None
        if reset.user_id is not None and (reset.step_method is not None):
            result = _verify(agent, reset, (code or "")[:64])
        ok = bool(result and result.ok)
        reason = None if ok or result is None or result.reason is None else result.reason.value
        method_id = None
        if ok:
            method_id = result.method.id if result.method is not None else reset.step_method
        return _settle(agent, reset, method_id, reason, rp_id)


def key_options(reset: Reset) -> dict:
    """The browser's options of the security key step (``navigator.credentials.get``)."""
    if reset.step_kind != "key" or reset.key is None:
        raise ResetError("Choose a method first.")
    return reset.key["options"]


def prove_key(agent: "Agent", reset: Reset, response: dict, origin: str, rp_id: str) -> Proof:
    """Check the browser's answer of the security key step (``browserkey.finish_assertion``:
    the same checks, counter and audit as a key sign-in). The challenge is spent first, once
    (a conditional update of the reset), so an answer cannot be replayed."""
    from . import browserkey

    if reset.state != STARTED or reset.step_kind != "key" or reset.key is None:
        raise ResetError()
    with _padded():
        spent = agent.store.update_reset(
            reset.id, expect_state=STARTED, expect_step="key", now=agent.now(),
            step_kind=None, step_method=None, proofs=_data(reset))
        state = browserkey.Challenge.from_json(reset.key.get("challenge"))
        if not spent or state is None:
            raise ResetError()
        outcome = browserkey.finish_assertion(agent, reset.username, state, response, origin,
                                              rp_id)
        method_id = None
        if outcome.ok and reset.user_id is not None and outcome.user_id == reset.user_id:
            user = agent.store.get_user_by_id(reset.user_id)
            method_id = next((c.id for c in browserkey.browser_keys(agent, user, rp_id)
                              if c.credential_id.hex() == outcome.credential_id), None)
        reason = None if method_id is not None else (
            outcome.reason.value if outcome.reason else "verification-failed")
        fresh = current_by_id(agent, reset.id)
        return _settle(agent, fresh, method_id, reason, rp_id, kind="key")


def current_by_id(agent: "Agent", reset_id: str) -> Reset:
    row = agent.store.get_reset(reset_id)
    if row is None:
        raise ResetError()
    return _reset_of(row)


def _settle(agent: "Agent", reset: Reset, method_id: int | None, reason: str | None,
            rp_id: str | None, kind: str | None = None) -> Proof:
    """After a check: count a failure, or record the proof and move the reset on."""
    store = agent.store
    kind = kind or reset.step_kind
    ok = method_id is not None
    detail = {"kind": kind, "proofs": reset.proofs + ok}
    if reason is not None and not ok:
        detail["reason"] = reason
    store.record_event("recovery.proof", user_id=reset.user_id,
                       username=None if reset.user_id else reset.username,
                       outcome="success" if ok else "failure", detail=detail)
    if not ok:
        failures = reset.failures + 1
        if failures >= MAX_FAILURES:
            store.delete_reset(reset.id)
            raise ResetError(TOO_MANY)
        _save(agent, reset, state=STARTED, methods=reset.proven,
              proven_kinds=reset.proven_kinds, failures=failures, step=False)
        return Proof(False, STARTED, WRONG)
    methods = (*reset.proven, method_id)
    proven_kinds = (*reset.proven_kinds, kind)
    held = _eligible(agent, reset.user_id, rp_id)
    distinct = {m.id for m in held}
    if len(distinct) < 2:
        _save(agent, reset, state=REFUSED, methods=methods, proven_kinds=proven_kinds,
              failures=reset.failures)
        _refused(agent, reset, kind)
        return Proof(True, REFUSED, refused_message())
    if len(set(methods)) >= 2:
        _save(agent, reset, state=PROVEN, methods=methods, proven_kinds=proven_kinds,
              failures=reset.failures)
        return Proof(True, PROVEN, "You have proven two methods. Choose a new password.")
    _save(agent, reset, state=STARTED, methods=methods, proven_kinds=proven_kinds,
          failures=reset.failures)
    label = label_of_store(way(kind).store_kind).capitalize()
    return Proof(True, STARTED, f"{label} accepted. Now prove a second, different method.")


def refused_message() -> str:
    return ("You have only one sign-in method that this page can check (an authenticator "
            "app, a phone number, an email address, backup codes or a security key), so you "
            "cannot reset your password yourself. Contact your IT service desk: they will "
            "check who you are and reset it.")


def _refused(agent: "Agent", reset: Reset, kind: str) -> None:
    from . import notify

    user = agent.store.get_user_by_id(reset.user_id)
    agent.store.record_event("recovery.refused", user_id=user.id, outcome="refused",
                             detail={"reason": "one method", "kinds": list(reset.proven_kinds)
                                     + [kind]})
    notify.tell_user(agent, user, "Password reset refused",
                     "Someone asked to reset your password and proved one of your sign-in "
                     "methods. It was refused because you hold only one method. Your password "
                     "has not changed.")


def finish(agent: "Agent", reset: Reset, new_password: str, confirm: str) -> str:
    """Set the new password after two proofs; returns the username. ``FactorError``
    (a message for people) when the password breaks the rules or the two differ;
    ``ResetError`` when the reset is not proven."""
    from . import notify

    if reset.state != PROVEN or reset.user_id is None or len(set(reset.proven)) < 2:
        raise ResetError()
    if new_password != confirm:
        raise FactorError(Reason.WRONG_PASSWORD, "The two passwords are not the same: type "
                                                 "the new password twice.")
    store = agent.store
    user = store.get_user_by_id(reset.user_id)
    try:
        password.check_new_password(new_password, user.username)
    except FactorError as e:
        raise FactorError(e.reason, e.message[0].upper() + e.message[1:] + ".") from None
    if not store.update_reset(reset.id, expect_state=PROVEN, now=agent.now(), state=DONE):
        raise ResetError()  # finished by another request meanwhile
    password.set_password(agent.factors(), user.id, new_password)  # what the CLI calls
    lockout.unlock(store, user.id, lockout.password_scope(user.id))
    ended = store.end_web_sessions_of(user.id)
    store.delete_reset(reset.id)
    store.record_event("recovery.reset", user_id=user.id, outcome="success",
                       detail={"kinds": list(reset.proven_kinds), "web_sessions_ended": ended})
    notify.tell_user(agent, user, "Your password was reset",
                     "Your password was reset on the forgotten-password page, with two of your "
                     "sign-in methods. You were signed out everywhere.")
    return user.username
