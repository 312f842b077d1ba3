"""The server's side of the outbox: a workstation's offline events recorded in the
organisation's audit log, each exactly once, and reconciled with the store.

``ingest(agent, workstation, events)`` takes one batch (``POST /v1/audit``), in ``seq``
order. Each event is one transaction: its (workstation, seq) claimed in ``org_deliveries``
(``ON CONFLICT DO NOTHING``: a batch sent again, by a retry or to another replica, is
acknowledged without recording anything twice), its audit record (detail plus
``{"workstation", "offline": true, "at"}``, ``at`` being the workstation's time of the event)
and the reconciliation:

* a key's counter is only ever taken from the key's own signature: the event carries the
  assertion (authenticator data, client data, signature), checked here against the stored
  public key (``webauthn.verify_assertion``); an event without one, or whose signature does
  not verify, is recorded and changes nothing (a workstation cannot push a counter up, or
  suspend someone's key, by saying so);
* an offline key login whose signed counter is higher than the stored one advances it; one
  whose counter is at or below the stored one, at a time later than the credential's last
  recorded use, means two keys answer with one credential: the credential is flagged
  (suspended) and ``key.clone-suspected`` recorded. An offline use earlier than the stored
  one (the key was used online since, with a higher counter) is only recorded;
* a ``key.clone-suspected`` the workstation recorded (the counter went backwards against
  its cache) suspends the credential here too, when its signed counter is at or below the
  stored one (the workstation's cache never runs ahead of the server once its earlier events
  are in, and they come first);
* an offline authenticator-app code advances the app's last step (the code, and earlier
  ones, cannot be used again online), at most to the server's current step plus one (a
  workstation cannot consume an app's future codes).

An event the audit log cannot take (a malformed kind, a secret-looking detail key) is
recorded as ``offline.rejected`` and acknowledged, so one bad event never blocks the queue.
A batch whose shape is wrong (no list, a ``seq`` that is not a positive whole number) is
refused whole (``IngestError``) and nothing is written.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import TYPE_CHECKING, Any

from ..store import KIND_TOTP, InvalidValue, SignCountRegression, StoreError, UnknownCredential

if TYPE_CHECKING:
    from ..agent import Agent

log = logging.getLogger("token_agent.ingest")

MAX_BATCH = 500


class IngestError(ValueError):
    """A batch that cannot be read; nothing of it was recorded."""


def _check(events: Any) -> list[dict[str, Any]]:
    if not isinstance(events, list):
        raise IngestError("events must be a list")
    if len(events) > MAX_BATCH:
        raise IngestError(f"at most {MAX_BATCH} events a batch, not {len(events)}")
    seen = set()
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            raise IngestError(f"events[{i}] must be an object")
        seq = e.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq < 2 ** 62:
            raise IngestError(f"events[{i}].seq must be a positive whole number")
        if seq in seen:
            raise IngestError(f"events[{i}].seq {seq} is repeated")
        seen.add(seq)
    return sorted(events, key=lambda e: e["seq"])


def _text(value: Any, limit: int = 255) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def ingest(agent: "Agent", workstation: str, events: Any) -> int:
    """Record a batch of ``workstation``'s events; the highest ``seq`` now recorded (to
    acknowledge), 0 for an empty batch. ``IngestError`` for a batch of the wrong shape."""
    ordered = _check(events)
    acknowledged = 0
    for event in ordered:
        _one(agent, workstation, event)
        acknowledged = event["seq"]
    return acknowledged


def _one(agent: "Agent", workstation: str, event: dict[str, Any]) -> None:
    store = agent.store
    seq = event["seq"]
    at = event.get("at")
    at = float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None
    detail = event.get("detail") if isinstance(event.get("detail"), dict) else {}
    user_id, username = _text(event.get("user_id")), _text(event.get("username"))
    cred_hex = _text(event.get("credential_id"), 2046)
    try:
        credential_id = bytes.fromhex(cred_hex) if cred_hex else None
    except ValueError:
        credential_id = None
    kind, outcome = event.get("kind"), event.get("outcome")
    where = {"workstation": workstation, "offline": True, "at": at}
    with store.transaction():
        if not store.claim_delivery(workstation, seq, agent.now()):
            return  # recorded before: acknowledged again, nothing written
        try:
            with store.transaction():  # a savepoint: a refused event leaves the claim
                event_id = store.record_event(kind, user_id=user_id, username=username,
                                              credential_id=credential_id, outcome=outcome,
                                              detail={**detail, **where})
        except (InvalidValue, TypeError) as exc:
            event_id = store.record_event(
                "offline.rejected", user_id=user_id, username=username, outcome="refused",
                detail={**where, "seq": seq, "kind": _text(kind, 64), "why": str(exc)[:200]})
            store.set_delivery_event(workstation, seq, event_id)
            return
        store.set_delivery_event(workstation, seq, event_id)
        if outcome == "success" and user_id is not None:
            if kind == "login.key" and credential_id is not None:
                _reconcile_key(store, workstation, user_id, credential_id, detail, at)
            elif kind == "verify.totp":
                _reconcile_totp(store, user_id, detail, agent.now())
        elif kind == "key.clone-suspected" and credential_id is not None and user_id is not None:
            _suspend(store, workstation, user_id, credential_id, detail)


def _signed_count(cred, detail: dict[str, Any]) -> int | None:
    """The counter in the event's assertion, when the credential's public key verifies its
    signature (the challenge is the workstation's: the signature proves which counter the key
    reached, not when); None otherwise."""
    from .. import webauthn

    proof = detail.get("assertion")
    if not isinstance(proof, dict):
        return None
    try:
        auth, client = (base64.b64decode(proof[k], validate=True)
                        for k in ("authenticator_data", "client_data"))
        signature = base64.b64decode(proof["signature"], validate=True)
        challenge = _unb64url(json.loads(client)["challenge"])
        check = webauthn.verify_assertion(
            public_key=cred.public_key, stored_sign_count=0, rp_id=cred.rp_id,
            origin=f"https://{cred.rp_id}", challenge=challenge, client_data_json=client,
            authenticator_data=auth, signature=signature, require_uv=False)
    except Exception as e:  # noqa: BLE001  (malformed or forged: the event changes nothing)
        log.warning("an offline assertion for credential %s does not verify: %s", cred.name, e)
        return None
    return check.sign_count


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _reconcile_key(store, workstation: str, user_id: str, credential_id: bytes,
                   detail: dict[str, Any], at: float | None) -> None:
    cred = store.get_fido_credential(credential_id)
    if cred is None or cred.user_id != user_id:
        return
    count = _signed_count(cred, detail)
    if count is None:
        return
    if count > cred.sign_count or (count == 0 and cred.sign_count == 0):
        try:
            store.record_fido_use(credential_id, count,
                                  max(at or 0.0, cred.last_used_at or 0.0) or None)
        except (SignCountRegression, UnknownCredential):
            pass
        return
    if at is not None and cred.last_used_at is not None and at <= cred.last_used_at:
        return  # an offline use before the last one the server saw: nothing wrong
    why = (f"signature counter went from {cred.sign_count} to {count} at workstation "
           f"{workstation} (offline): possibly a cloned key")
    store.flag_fido_credential(credential_id, why)
    store.record_event("key.clone-suspected", user_id=user_id, credential_id=credential_id,
                       outcome="refused",
                       detail={"credential": cred.name, "stored_count": cred.sign_count,
                               "presented_count": count, "workstation": workstation,
                               "offline": True, "at": at})


def _suspend(store, workstation: str, user_id: str, credential_id: bytes,
             detail: dict[str, Any]) -> None:
    """The workstation caught a counter regression against its cache: the key is suspended
    here too (the event itself is recorded already)."""
    cred = store.get_fido_credential(credential_id)
    if cred is None or cred.user_id != user_id or cred.flagged:
        return
    count = _signed_count(cred, detail)
    if count is None or (count > cred.sign_count and not (count == cred.sign_count == 0)):
        return
    store.flag_fido_credential(
        credential_id, f"signature counter went from {cred.sign_count} to {count} at "
                       f"workstation {workstation} (offline): possibly a cloned key")


def _reconcile_totp(store, user_id: str, detail: dict[str, Any], now: float) -> None:
    method_id, step = detail.get("method_id"), detail.get("step")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (method_id, step)):
        return
    try:
        method = store.get_method(method_id)
    except StoreError:
        return
    if method.user_id != user_id or method.kind != KIND_TOTP:
        return
    row = store.totp_credential(method_id)
    if row is None or step > int(now // int(row["period"])) + 1:
        log.warning("an offline TOTP step %d of method %d is in the future: ignored", step,
                    method_id)
        return
    store.advance_totp_step(method_id, step)
