"""The whole login the policy asks for: the primary factor, then, when the policy wants
one, a second factor: the user's preferred one, with "use a different method" offered; and,
once enforcement has started, a user with no second factor sets one up before anything else.

    outcome = login(agent, "alice", interaction=terminal, device=Device("unmanaged", ...))

The person is reached only through an :class:`Interaction` (the terminal for the CLI; the
service's socket and the PAM conversation later), so the same flow, and the same policy,
decide everywhere. Devices are reached only through the ``key_login`` / ``card_login``
callables the caller gives (the CLI opens the key or the card through ``drivers/``), which
return the key or card ceremony's own :class:`~token_agent.outcome.LoginOutcome`.

Order of a login
1. the user: unknown or disabled users are refused (recorded), after the same prompt a known
   user would get (the password, checked against a decoy hash so that it takes as long; or
   the key or card ceremony);
2. the primary factor: ``primary`` if given, else the preferred method when it is a primary
   one (password, key, card), else the password, else a key, else a card;
3. the policy decision (``token_agent.policy.decide``) from the user's class and methods,
   the primary factor (a key with user verification or a card with its PIN satisfies MFA),
   the device (managed / unmanaged, its id), the network, the last second factor on this
   device and whether device and network were seen before;
4. when enforcement requires it and the user has no second factor: enrolment, now
   (authenticator app, a code by email / SMS / voice / messaging, or a security key);
   completing it counts as this login's second factor;
5. otherwise, when a second factor is required: the chosen method's challenge;
6. on success: the device and network are remembered, the second factor's time is recorded
   for re-verification, an unusual login is recorded as an alert, and one ``login`` audit
   event says what was used; the warnings of the key or card ceremonies used (a smartcard
   certificate to renew: ``card_expiry_warning_days``) are told to the person
   (``Interaction.info``) and carried in the outcome's ``warnings``.

What the person is told: until a first factor has succeeded, whoever is at the prompt may be
a stranger, so every failure says the same :data:`NOT_AUTHENTICATED` ("Authentication
failed.") whatever the reason: an unknown user, a wrong password, no key enrolled, tries left,
a lock and its end time all look alike (:func:`shown_before_first_factor`). Only failures
about the device in the person's hand or their own action (no key found, a wrong key PIN,
cancelled) keep their words. After a first factor the messages are detailed again. The
outcome's ``reason`` and the audit log keep the full story for administrators.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .. import kinds, sightings
from . import unusual
from .secondfactor import second_factor
from ..factors import usable_methods
from ..outcome import Factor, LoginOutcome, Reason
from ..store import UnknownUser

if TYPE_CHECKING:
    from ..agent import Agent
    from ..policy import Decision

log = logging.getLogger("token_agent.login")

#: the primary factors (policy names), in the order a user's usual one is looked for
PRIMARY_METHODS = tuple(k.policy for k in kinds.PRIMARY)


class Interaction(Protocol):
    """How a login talks to the person. Every method may return ``None`` for "no answer"
    (end of input, cancelled), which ends the login as cancelled."""

    def info(self, message: str) -> None: ...

    def secret(self, prompt: str) -> str | None: ...

    def text(self, prompt: str) -> str | None: ...

    def choose(self, prompt: str, options: list[tuple[str, str]], default: str) -> str | None: ...

    def show_qr(self, uri: str) -> None: ...


@dataclass(frozen=True)
class Device:
    """Where the login happens: ``kind`` managed | unmanaged, a stable ``device_id``, the
    client's network address (None: unknown), and ``joined``: a workstation joined to the
    organisation, which only the organisation's server may say (from the workstation's
    certificate), never a caller's own claim."""

    kind: str = "managed"
    device_id: str | None = None
    network: str | None = None
    joined: bool = False

    def to_json(self) -> dict:
        return {"kind": self.kind, "device_id": self.device_id, "network": self.network,
                "joined": self.joined}


KeyLogin = Callable[[str], LoginOutcome]  # username -> the key ceremony's outcome
CardLogin = Callable[[str], LoginOutcome]


class _Cancelled(Exception):
    pass


#: a failure before any factor succeeded, whatever its reason (see the module docstring)
NOT_AUTHENTICATED = "Authentication failed."
CANCELLED_MESSAGE = "cancelled: no answer"
#: failures about the device in the person's hand or their own action: their words help and
#: say nothing about the account, so they are shown even before a factor succeeded
DEVICE_REASONS = frozenset({
    Reason.CANCELLED, Reason.TIMEOUT, Reason.NO_DEVICE, Reason.DEVICE_REMOVED,
    Reason.DEVICE_ERROR, Reason.WRONG_PIN, Reason.PIN_BLOCKED, Reason.PIN_AUTH_BLOCKED,
    Reason.PIN_REQUIRED, Reason.PCSC_UNAVAILABLE, Reason.NOT_SUPPORTED_CARD,
    Reason.CERT_EXPIRED, Reason.CERT_NOT_YET_VALID, Reason.CERT_REVOKED, Reason.CERT_UNTRUSTED,
    Reason.CERT_INVALID, Reason.REVOCATION_UNKNOWN, Reason.WRONG_PUK, Reason.PUK_BLOCKED,
    Reason.PRESENCE_REQUIRED,
})


def shown_before_first_factor(outcome: LoginOutcome, username: str | None = None
                              ) -> LoginOutcome:
    """A failed outcome as a caller that has not proved anything yet may see it: the generic
    message (unless the failure is about the device or the person's action), no tries left,
    lock times or user id, and the user name as asked. The ``reason`` stays."""
    if outcome.ok:
        return outcome
    device = outcome.reason in DEVICE_REASONS
    return LoginOutcome.failure(
        outcome.method, outcome.reason, outcome.message if device else NOT_AUTHENTICATED,
        user=username if username is not None else (outcome.user if device else None),
        detail={k: v for k, v in outcome.detail.items() if k in ("primary", "second")})


def _no_reader(name: str) -> str:
    return f"no {kinds.by_policy(name).label} reader is available here"


def _decoy_primary(username: str, primary: str | None, interaction: Interaction,
                   key_login: KeyLogin | None, card_login: CardLogin | None
                   ) -> LoginOutcome | None:
    """For a user who cannot log in (unknown, disabled, no primary method): the primary
    factor's prompt all the same, so the person sees and waits what a known user would. Its
    result is ignored but for what the person may be told: the device's outcome of a key or
    card, a cancel (None otherwise)."""
    from ..factors import password as password_factor

    if primary in ("key", "card"):
        runner = key_login if primary == "key" else card_login
        if runner is None:
            return LoginOutcome.failure(primary, Reason.NO_DEVICE, _no_reader(primary))
        return runner(username)
    typed = interaction.secret("Password")
    if typed is None:
        return LoginOutcome.failure("login", Reason.CANCELLED, CANCELLED_MESSAGE)
    password_factor.decoy(typed)
    return None


def _ask(value: str | None) -> str:
    if value is None:
        raise _Cancelled()
    return value


def facts_for(agent: "Agent", user, *, device: Device, primary: str | None,
              primary_multi_factor: bool = False, legacy: bool = False):
    """The policy's view of this login (``policy.LoginFacts``)."""
    from ..policy import LoginFacts, network_key

    store = agent.store
    # a device used as a one-factor primary (a key without PIN) cannot also be the second
    # factor; as a multi-factor primary it is the user's method that satisfies MFA
    methods = tuple(sorted({kinds.by_store(m.kind).policy for m in usable_methods(store, user.id)
                            if m.kind != "password"
                            and (primary_multi_factor or kinds.by_store(m.kind).policy != primary)}))
    net = None
    if device.network:
        net = network_key(agent.policy, device.network)
    last = sightings.last_verified(store, user.id, device.device_id)
    now = agent.now()
    return LoginFacts(
        user_class=user.user_class, mfa_enabled=user.mfa_enabled,
        mfa_source=user.mfa_source, methods=methods,
        primary=primary, primary_multi_factor=primary_multi_factor, device=device.kind,
        device_joined=device.joined,
        network=device.network, device_id=device.device_id,
        now=_dt.datetime.fromtimestamp(now, _dt.timezone.utc),
        last_verified_at=None if last is None else _dt.datetime.fromtimestamp(last, _dt.timezone.utc),
        device_seen=sightings.seen(store, user.id, "device", device.device_id),
        network_seen=sightings.seen(store, user.id, "network", net),
        has_history=sightings.has_history(store, user.id), legacy=legacy), net


def explain_for(agent: "Agent", username: str, *, device: Device,
                primary: str | None = None, primary_multi_factor: bool = False) -> "Decision":
    """The decision the policy would take for this user now (``policy explain``)."""
    from ..policy import decide

    user = agent.store.get_user(username)
    facts, _ = facts_for(agent, user, device=device, primary=primary,
                         primary_multi_factor=primary_multi_factor)
    return decide(agent.policy, facts)


def familiar(agent: "Agent", user, device: Device) -> bool:
    """Whether a login comes from a device (and network, when known) this user logged in
    from before: the lockout counts failures from elsewhere apart."""
    from ..policy import network_key

    store = agent.store
    if not sightings.seen(store, user.id, "device", device.device_id):
        return False
    if not device.network:
        return True
    try:
        return sightings.seen(store, user.id, "network", network_key(agent.policy,
                                                                     device.network))
    except ValueError:
        return False


def _choose_primary(agent: "Agent", user, requested: str | None, ctx=None) -> str | None:
    """``requested``, else the preferred primary method, else the password, a key, a card;
    a locked password is passed over for a key or card the user holds (a lock on one
    method never blocks the others)."""
    store = agent.store
    have = {kinds.by_store(m.kind).policy for m in usable_methods(store, user.id)}
    if requested is not None:
        return requested
    password_locked = False
    if ctx is not None and "password" in have and have & {"key", "card"}:
        from ..factors import lockout

        scope = lockout.scope_for(lockout.password_scope(user.id), ctx.familiar)
        if lockout.state(store, scope).locked(ctx.now()):
            password_locked = True
            have.discard("password")
    preferred = store.preferred_method(user.id)
    if preferred is not None and kinds.by_store(preferred.kind).policy in PRIMARY_METHODS \
            and not (password_locked and preferred.kind == "password"):
        return kinds.by_store(preferred.kind).policy
    for name in PRIMARY_METHODS:
        if name in have:
            return name
    return None


def login(agent: "Agent", username: str, *, interaction: Interaction, device: Device,
          primary: str | None = None, second: str | None = None,
          key_login: KeyLogin | None = None, card_login: CardLogin | None = None,
          push_timeout: float = 60.0, cancel: threading.Event | None = None,
          on_success: Callable[[Any, str], None] | None = None,
          step_up: bool = False) -> LoginOutcome:
    """Run the login the policy asks for. Always returns an outcome; every failure and the
    success are recorded in the audit log. ``on_success(user, method)`` runs inside the
    transaction that records the success (the service records its session there: both
    are written, or neither). ``step_up``: when MFA applies to the user, ask for the second
    factor even where the policy would skip it (a trusted network, the re-verification
    window): the re-authentication before a method is changed (``token_agent/reauth.py``)."""
    from .passlogin import ACCESS_PASS, login_with_pass

    store = agent.store
    if primary is not None and primary not in PRIMARY_METHODS + (ACCESS_PASS,):
        return LoginOutcome.failure("login", Reason.METHOD_NOT_ALLOWED, f"{primary} is not a "
                                    f"primary factor ({', '.join(PRIMARY_METHODS)})")
    try:
        user = store.get_user(username)
    except UnknownUser:
        user = None
    fail = _Fail(store, user, username, unusual.where_of(agent, device))
    if primary == ACCESS_PASS:  # a temporary access pass: ceremonies/passlogin.py
        return login_with_pass(agent, user, username, interaction=interaction, device=device,
                               fail=fail, on_success=on_success)
    if user is None or user.disabled or _choose_primary(agent, user, primary) is None:
        # nothing this person types can log them in: the same prompt as for anyone, then the
        # same failure (the audit log says why)
        seen = _decoy_primary(username, primary or "password", interaction, key_login,
                              card_login)
        if user is None:
            reason, message = Reason.UNKNOWN_USER, f"no user {username!r}"
        elif user.disabled:
            reason, message = Reason.USER_DISABLED, f"{user.username} is disabled"
        else:
            reason, message = Reason.NO_CREDENTIAL, (f"{user.username} has no password, key or "
                                                     "card to log in with: ask an administrator")
        return fail(reason, message, shown=seen)
    notices: list = []  # an unusual login's notice, sent once it is over (ceremonies/unusual.py)
    outcome = None
    try:
        outcome = _login(agent, user, interaction=interaction, device=device, primary=primary,
                         second=second, key_login=key_login, card_login=card_login,
                         push_timeout=push_timeout, cancel=cancel, fail=fail,
                         on_success=on_success, step_up=step_up, notices=notices)
    except _Cancelled:
        outcome = fail(Reason.CANCELLED, CANCELLED_MESSAGE)
    finally:
        unusual.finish(agent, notices, signed_in=bool(outcome and outcome.ok))
    return outcome


def login_or_tap(agent: "Agent", username: str | None, *, primary: str | None,
                 key_login: KeyLogin | None, card_login: CardLogin | None,
                 on_user: Callable[[str], Any] | None = None, **options) -> LoginOutcome:
    """:func:`login`, also without a user name (tap-and-go): then the key's (or, with
    ``primary="card"``, the card's) ceremony comes first and says who it is, and the policy
    flow goes on with that user, the device's outcome counting as its primary factor.
    ``on_user(name)``: called with the user once known, returning a context manager held
    for the policy flow (the service's user lock), or None."""
    import contextlib

    if username is None:
        runner = card_login if primary == "card" else key_login
        if runner is None:
            return LoginOutcome.failure(primary or "key", Reason.NO_DEVICE,
                                        _no_reader(primary or "key"))
        first = runner(None)
        if not first.ok:
            return shown_before_first_factor(first)  # no factor yet: no details
        username = first.user
        primary = "card" if primary == "card" else "key"
        if primary == "card":
            card_login = _once(first, card_login)
        else:
            key_login = _once(first, key_login)
    held = on_user(username) if on_user is not None else None
    with held if held is not None else contextlib.nullcontext():
        return login(agent, username, primary=primary, key_login=key_login,
                     card_login=card_login, **options)


def _once(first: LoginOutcome, then: Callable[[str], LoginOutcome]) -> Callable[[str], LoginOutcome]:
    """A runner that returns ``first`` at its first call and calls ``then`` afterwards (the
    device ceremony of a usernameless login, done before the policy flow asks for it)."""
    used = []

    def run(name: str) -> LoginOutcome:
        if not used:
            used.append(True)
            return first
        return then(name)

    return run


class _Fail:
    """Ends a login: the failure recorded in full (the audit event ``login``, the service's
    log), and the outcome the person is shown: before a first factor has succeeded
    (``first_factor_done()``), :func:`shown_before_first_factor`."""

    def __init__(self, store, user, username: str, where: dict | None = None) -> None:
        self.store, self.user, self.username = store, user, username
        self.where = where or {}  # where the login came from (unusual.where_of)
        self.first_done = False

    def first_factor_done(self) -> None:
        self.first_done = True

    def __call__(self, reason: Reason, message: str, *, shown: LoginOutcome | None = None,
                 **detail) -> LoginOutcome:
        """``shown``: for a login that could not succeed, what the person saw fail instead
        (the device's outcome, a cancel)."""
        user = self.user
        recorded = {"reason": reason.value, **self.where, **detail}
        if user is None:
            self.store.record_event("login", username=self.username, outcome="failure",
                                    detail=recorded)
        else:
            self.store.record_event("login", user_id=user.id, outcome="failure",
                                    detail=recorded)
        log.info("login failed for %s: %s", user.username if user else self.username,
                 reason.value)
        outcome = LoginOutcome.failure("login", reason, message,
                                       user=user.username if user else None,
                                       user_id=user.id if user else None, detail=detail)
        if self.first_done:
            return outcome
        masked = shown_before_first_factor(outcome, self.username)
        if shown is not None and shown.reason in DEVICE_REASONS:
            return replace(masked, message=shown.message)
        return masked


def _login(agent, user, *, interaction, device, primary, second, key_login, card_login,
           push_timeout, cancel, fail, on_success, step_up=False, notices=None) -> LoginOutcome:
    from ..factors import password as password_factor
    from ..policy import decide

    store = agent.store
    # failures from a device or network this user never logged in from count apart
    # (factors/lockout.py): a stranger's guesses do not lock the user out of their workstation
    ctx = replace(agent.factors(), familiar=familiar(agent, user, device))
    first = _choose_primary(agent, user, primary, ctx)  # one: login() saw to it

    # --- 2. the primary factor
    factors: list[Factor] = []
    primary_multi = False
    device_then_password = False  # a key without PIN, then the password
    primary_outcome: LoginOutcome | None = None
    if first == "password":
        typed = _ask(interaction.secret("Password"))
        result = password_factor.verify(ctx, user.id, typed)
        if not result.ok:
            return fail(result.reason or Reason.WRONG_PASSWORD, result.message, primary="password",
                        **({"tries_left": result.tries_left} if result.tries_left is not None else {}))
        factors.append(Factor.KNOWLEDGE)
        fail.first_factor_done()
    else:
        runner = key_login if first == "key" else card_login
        if runner is None:
            return fail(Reason.NO_DEVICE, _no_reader(first))
        primary_outcome = runner(user.username)
        if not primary_outcome.ok:
            return fail(primary_outcome.reason or Reason.VERIFICATION_FAILED,
                        primary_outcome.message, primary=first)
        factors.extend(primary_outcome.factors)
        primary_multi = primary_outcome.multi_factor
        fail.first_factor_done()
        if not primary_multi:
            # a key that verified no PIN is one factor (something you have): the password is
            # the other, before any second factor the policy asks for (NIST SP 800-63B: two
            # possession factors are not multi-factor)
            if password_factor.get(ctx, user.id) is None:
                return fail(Reason.UV_REQUIRED,
                            f"this {kinds.by_policy(first).label} did not verify your PIN, and you have no "
                            "password to go with it: set a PIN on the key and try again",
                            primary=first)
            typed = _ask(interaction.secret("Password"))
            result = password_factor.verify(ctx, user.id, typed)
            if not result.ok:
                return fail(result.reason or Reason.WRONG_PASSWORD, result.message,
                            primary=first,
                            **({"tries_left": result.tries_left}
                               if result.tries_left is not None else {}))
            factors.append(Factor.KNOWLEDGE)
            device_then_password = True

    # --- 3. the policy
    # a key without PIN and the password: decided as a password login whose second factor,
    # the key, is already done (when the policy accepts a key for this user)
    facts, net = facts_for(agent, user, device=device,
                           primary="password" if device_then_password else first,
                           primary_multi_factor=primary_multi)
    decision = decide(agent.policy, facts)
    if step_up and decision.enforced and not decision.mfa_required and len(set(factors)) < 2:
        decision = replace(decision, mfa_required=True, rules=decision.rules + (
            "step-up: a second factor to re-authenticate before a change of methods",))
    if decision.alert:  # recorded, and the user told by email or text message
        notices.append(unusual.alert(agent, user, primary=first, device=device, network=net,
                                     facts=facts))
    second_used = second_name = None  # the second factor: its policy name, its method's name
    devices_used = [primary_outcome]  # the device ceremonies' outcomes, for their warnings
    if decision.invite_enrol:
        interaction.info("Your organisation asks you to set up a second factor: "
                         "token-agent enrol totp (or sms, email, key)")
    if decision.mfa_required and device_then_password and first in decision.allowed_methods:
        second_used = "password"  # the key was the possession factor, the password the other
    elif decision.mfa_required:
        from .firstlogin import enrol_at_login

        if decision.must_enrol and "backup" in decision.usable_methods:
            # the user's only acceptable factor is their backup codes: one of them proves it
            # is them, then they must set up a real second factor before anything else
            from ..factors import backup

            v = backup.verify(ctx, user.id, _ask(interaction.secret("Backup code")))
            if v.ok:
                interaction.info(v.message)
                v = enrol_at_login(agent, user, interaction, decision, second)
        elif decision.must_enrol:
            v = enrol_at_login(agent, user, interaction, decision, second)
        else:
            v = second_factor(agent, user, interaction, decision, second=second,
                               key_login=key_login, card_login=card_login,
                               push_timeout=push_timeout, cancel=cancel, device=device, ctx=ctx)
        if isinstance(v, LoginOutcome):  # a failure already recorded, or a device factor
            if not v.ok:
                return v if v.method == "login" else fail(
                    v.reason or Reason.VERIFICATION_FAILED, v.message, primary=first,
                    second=v.method)
            second_used = v.method
            devices_used.append(v)
            factors.extend(f for f in v.factors if f not in factors)
        elif not v.ok:
            return fail(v.reason or Reason.VERIFICATION_FAILED, v.message, primary=first,
                        second=kinds.policy_of_store(v.kind),
                        **({"tries_left": v.tries_left} if v.tries_left is not None else {}))
        else:
            second_used = kinds.policy_of_store(v.kind)
            second_name = v.method.name if v.method is not None else None
            used = kinds.get_store(v.kind)
            factor = Factor[(used.factor if used else kinds.POSSESSION).upper()]
            if factor not in factors:
                factors.append(factor)

    if decision.mfa_required and len(set(factors)) < 2:
        return fail(Reason.VERIFICATION_FAILED,
                    f"{first} and {second_used} are the same kind of factor: multi-factor "
                    "authentication needs two different kinds", primary=first, second=second_used)

    # --- 6. success
    now = agent.now()
    method = "+".join(m for m in (first, second_used) if m)
    with store.transaction():
        sightings.record_login(store, user.id, device_id=device.device_id, network=net, now=now)
        if second_used is not None or primary_multi:  # a second factor was completed here
            sightings.record_verification(store, user.id, device.device_id,
                                          second_used or first, now)
        store.record_event("login", user_id=user.id, outcome="success",
                           detail={"primary": first, "second": second_used,
                                   "second_method": second_name, "mfa_required":
                                   decision.mfa_required, "alert": decision.alert,
                                   "step_up": step_up, **unusual.where_detail(device, net)})
        if on_success is not None:
            on_success(user, method)
    detail = {"primary": first, "second": second_used, "decision": decision.to_json()}
    if primary_outcome is not None:
        detail["primary_credential"] = primary_outcome.credential
    warnings = tuple(dict.fromkeys(w for o in devices_used if o is not None for w in o.warnings))
    for warning in warnings:
        interaction.info(warning)
    return LoginOutcome(ok=True, method=method,
                        user=user.username, user_id=user.id, factors=tuple(factors),
                        credential=primary_outcome.credential if primary_outcome else None,
                        user_verified=bool(primary_outcome and primary_outcome.user_verified),
                        message="logged in", detail=detail, warnings=warnings)
