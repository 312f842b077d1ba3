"""A user's recent sign-ins, from the audit log: where and how, and which were unusual (the
account's "Recent sign-ins" page, ``/account/activity``).

Every login records one ``login`` event (``ceremonies/login.py``) saying how (the primary
factor, the second factor and, for a contact or an app, the method's name) and where (the
device's kind, a joined workstation or not, a reference to the device, the network at the
policy's prefix length); an unusual login also records ``login.unusual`` just before
(``ceremonies/unusual.py``). Only the user's own events are read.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import kinds
from .store import Store

#: the most sign-ins listed
LIMIT = 50

#: a failed login's reason, in words for the person whose account it is
_REASONS = {
    "wrong-password": "wrong password",
    "wrong-code": "wrong code",
    "code-expired": "the code had expired",
    "code-replayed": "a code already used",
    "method-locked": "locked after too many failed attempts",
    "cancelled": "cancelled, or no answer",
    "timeout": "no answer in time",
    "push-denied": "denied on the phone",
    "enrolment-required": "no second factor set up",
    "user-disabled": "the account is disabled",
}


@dataclass(frozen=True)
class SignIn:
    """One sign-in: when (seconds since the epoch), whether it succeeded, how and where in
    words, the network and device reference, and whether it was unusual."""

    at: float
    ok: bool
    how: str
    where: str
    network: str | None
    device_ref: str | None
    unusual: bool
    result: str

    def to_json(self) -> dict:
        return {"at": self.at, "ok": self.ok, "how": self.how, "where": self.where,
                "network": self.network, "device_ref": self.device_ref,
                "unusual": self.unusual, "result": self.result}


#: primary factors of sign-ins that are no method kind
_OTHER_LABELS = {"access_pass": "temporary access pass"}


def _label(policy_name: str | None) -> str | None:
    if not policy_name:
        return None
    k = kinds.get_policy(policy_name)
    return k.label if k else _OTHER_LABELS.get(policy_name, policy_name)


def _how(detail: dict) -> str:
    first, second = _label(detail.get("primary")), _label(detail.get("second"))
    if second and detail.get("second_method") and detail["second_method"] != second:
        second = f"{second} ({detail['second_method']})"
    return " + ".join(p for p in (first, second) if p) or "not known"


def _where(detail: dict) -> str:
    kind = detail.get("device")
    if detail.get("joined"):
        what = "a joined workstation"
    elif kind == "managed":
        what = "a managed device"
    elif kind == "unmanaged":
        what = "a web browser or personal device"
    else:
        what = "not recorded"
    network = detail.get("network")
    return what + (f", network {network}" if network else "")


def recent(store: Store, user_id: str, *, limit: int = LIMIT) -> list[SignIn]:
    """The user's latest ``limit`` sign-ins, newest first. A sign-in is unusual when its
    login said so (``alert``), or when a ``login.unusual`` alert was recorded for the user
    between the sign-in before it and this one (in the audit log's order: the alert comes
    first, within the same login)."""
    logins = store.list_events(user_id=user_id, kind="login", limit=limit)
    alerts = [e.id for e in store.list_events(user_id=user_id, kind="login.unusual",
                                              limit=limit)]
    out = []
    for i, e in enumerate(logins):
        earlier = logins[i + 1].id if i + 1 < len(logins) else 0
        d = e.detail
        alerted = bool(d.get("alert")) or any(earlier < a < e.id for a in alerts)
        ok = e.outcome == "success"
        signed = "confirmed it was you" if d.get("step_up") else "signed in"
        result = signed if ok else "failed: " + _REASONS.get(
            d.get("reason"), (d.get("reason") or "refused").replace("-", " "))
        out.append(SignIn(at=e.at, ok=ok, how=_how(d), where=_where(d),
                          network=d.get("network"), device_ref=d.get("device_ref"),
                          unusual=alerted, result=result))
    return out
