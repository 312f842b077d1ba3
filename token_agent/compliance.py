"""Who is compliant with the MFA policy: the administrators' users list (``/admin/users``) and
its CSV export (``/admin/users.csv``) read it from here, so both say the same.

A user's compliance comes from the policy's own decision (``policy.decide``) on what is known
of the account alone (class, own MFA flag, methods held: no device, no network), and the
strengths of ``token_agent.kinds``:

* ``not-enrolled``, "Enforced but not yet enrolled": MFA applies (or the class enforces it
  from a later date) and the user holds no second factor the policy accepts for their class
  (backup codes alone do not count: the login flow makes such a user set up a method);
* ``weak-only``, "Only weak methods": every acceptable second factor the user holds is weaker
  than an authenticator app (strength below ``STRONG``: codes by email, text message, phone
  call, messaging app);
* ``compliant``: the user holds an acceptable second factor of strength ``STRONG`` or more
  (an authenticator app, push approval, a security key, a smartcard);
* ``not-required``, "MFA not required": MFA does not apply to the user and they hold no
  second factor.

A disabled account keeps its status (``disabled`` says so): it cannot log in, but it would be
in the same state if enabled again.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import kinds

if TYPE_CHECKING:
    from .policy import Policy
    from .store import Method, Store, User

#: the weakest strength that counts as strong: an authenticator app's
STRONG = kinds.TOTP.strength or 3

NOT_ENROLLED, WEAK_ONLY, COMPLIANT, NOT_REQUIRED = (
    "not-enrolled", "weak-only", "compliant", "not-required")
#: every status, with its words for people, in the order of the filter's choices
STATUSES: dict[str, str] = {
    NOT_ENROLLED: "Enforced but not yet enrolled",
    WEAK_ONLY: "Only weak methods",
    COMPLIANT: "Compliant",
    NOT_REQUIRED: "MFA not required",
}


@dataclass(frozen=True)
class UserCompliance:
    """One user's line of the list."""

    username: str
    display_name: str
    user_class: str
    disabled: bool
    #: the account's own MFA flag, and its words with who set it ("turned on by an administrator")
    mfa_enabled: bool
    mfa_words: str
    #: MFA applies now (the policy's ``enforced``)
    mfa_applies: bool
    #: the class enforces MFA, with its start date when later ("enforces MFA from
    #: 2027-01-01"), or None
    class_enforcement: str | None
    #: the labels of the user's usable methods (password included), in order of enrolment
    methods: tuple[str, ...]
    #: the acceptable second factors held (policy names, strongest first)
    acceptable: tuple[str, ...]
    status: str

    @property
    def status_words(self) -> str:
        return STATUSES[self.status]

    def to_row(self) -> dict[str, str]:
        """The CSV's columns (``CSV_COLUMNS``), as text."""
        return {"username": self.username, "display_name": self.display_name,
                "class": self.user_class, "disabled": "yes" if self.disabled else "no",
                "mfa": self.mfa_words, "mfa_applies": "yes" if self.mfa_applies else "no",
                "class_enforcement": self.class_enforcement or "",
                "methods": "; ".join(self.methods),
                "acceptable_second_factors": "; ".join(self.acceptable),
                "compliance": self.status_words}


CSV_COLUMNS = ("username", "display_name", "class", "disabled", "mfa", "mfa_applies",
               "class_enforcement", "methods", "acceptable_second_factors", "compliance")


def assess(policy: "Policy", user: "User", methods: Iterable["Method"], now: float
           ) -> UserCompliance:
    """The compliance of ``user`` holding ``methods`` (their usable ones) at ``now``."""
    from .accounts import class_enforcement
    from .policy import LoginFacts, decide, own_mfa

    held = [m for m in methods if m.confirmed and not m.flagged]
    policy_names = tuple(sorted({kinds.by_store(m.kind).policy for m in held
                                 if m.kind != kinds.PASSWORD.store}))
    when = _dt.datetime.fromtimestamp(now, _dt.timezone.utc)
    decision = decide(policy, LoginFacts(user_class=user.user_class,
                                         mfa_enabled=user.mfa_enabled,
                                         mfa_source=user.mfa_source, methods=policy_names,
                                         now=when))
    acceptable = tuple(decision.usable_methods)
    # backup codes are a fallback: a user holding nothing else must still set up a method
    # (the login flow makes them, after one code)
    real = tuple(m for m in acceptable if m != kinds.BACKUP_CODES.policy)
    enforcement = class_enforcement(policy, user.user_class, when)
    if not real:
        required = decision.enforced or enforcement is not None
        status = NOT_ENROLLED if required else NOT_REQUIRED
    elif max(kinds.by_policy(m).strength or 0 for m in real) >= STRONG:
        status = COMPLIANT
    else:
        status = WEAK_ONLY
    return UserCompliance(
        username=user.username, display_name=user.display_name, user_class=user.user_class,
        disabled=user.disabled, mfa_enabled=user.mfa_enabled,
        mfa_words=own_mfa(user.mfa_enabled, user.mfa_source), mfa_applies=decision.enforced,
        class_enforcement=enforcement,
        methods=tuple(kinds.label_of_store(m.kind) for m in held),
        acceptable=acceptable, status=status)


def report(store: "Store", policy: "Policy", now: float, *, status: str | None = None,
           user_class: str | None = None, name: str | None = None) -> list[UserCompliance]:
    """Every user's compliance, by user name, filtered: ``status`` (one of ``STATUSES``),
    ``user_class``, ``name`` (a case-insensitive part of the user name or display name).
    ``ValueError`` for an unknown status or class."""
    from .store import USER_CLASSES

    if status and status not in STATUSES:
        raise ValueError(f"unknown compliance status {status!r}: one of {', '.join(STATUSES)}")
    if user_class and user_class not in USER_CLASSES:
        raise ValueError(f"unknown user class {user_class!r}: one of {', '.join(USER_CLASSES)}")
    wanted = (name or "").strip().casefold()
    out = []
    for user in sorted(store.list_users(), key=lambda u: u.username.casefold()):
        if user_class and user.user_class != user_class:
            continue
        if wanted and wanted not in user.username.casefold() \
                and wanted not in (user.display_name or "").casefold():
            continue
        line = assess(policy, user, store.list_methods(user.id), now)
        if status and line.status != status:
            continue
        out.append(line)
    return out


#: a cell starting with one of these is read as a formula by spreadsheets (CSV injection)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """``value`` safe for a spreadsheet: a leading ``= + - @`` (or tab, carriage return) is
    prefixed with ``'`` so that it is shown as text, never run as a formula (OWASP)."""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def to_csv(lines: Iterable[UserCompliance]) -> str:
    """The lines as CSV (a header row, then one row per user), every cell made safe."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for line in lines:
        row = line.to_row()
        writer.writerow([csv_cell(row[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def export_csv(store: "Store", policy: "Policy", now: float, *, actor: str, actor_id: str,
               via: str, status: str | None = None, user_class: str | None = None,
               name: str | None = None) -> str:
    """The filtered report as CSV (``to_csv``), its export recorded (``admin.export-users``:
    who, through which front end, which filters: personal data leaving the service)."""
    text = to_csv(report(store, policy, now, status=status, user_class=user_class, name=name))
    filters = {k: v for k, v in (("status", status), ("class", user_class), ("name", name))
               if v}
    store.record_event("admin.export-users", user_id=actor_id, outcome="success",
                       detail={"actor": actor, "via": via, **filters})
    return text
