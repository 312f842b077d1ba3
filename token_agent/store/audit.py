"""The audit area: audit events (``audit_events``).

Append-only (triggers refuse UPDATE and DELETE) and hash-chained: each record carries the
SHA-256 of its predecessor's hash and its own content; ``verify_events`` finds an edited,
removed or reordered record.

The chain's head (``audit_head``, migration 6: one row, the id and hash of the last event)
serialises the appends: ``record_event`` reads it under a row lock (``engine.for_update``;
SQLite's ``BEGIN IMMEDIATE`` already holds the only write lock), writes the event with id
``last_id + 1`` and ``prev_hash = hash``, and moves the head, in one transaction. So many
writers on a shared database keep one gap-free chain (ids never come from a sequence, which
has gaps after rollbacks), ``audit verify`` keeps its meaning, and a removed tail is found
(the head names an event that is gone). A trigger refuses a DELETE of the head. One chain
with a serialised append was chosen over a chain per writer: an append is a short
transaction, so the lock costs little, and one order of events is what an auditor reads. A plain hash chain does not stop someone who can rewrite the
whole database from rewriting the whole chain; anchoring it elsewhere is for later. Detail
keys that look like secrets are refused (``detail.check_detail``): secrets never reach the
audit table. An event is never refused for its size: strings of its detail past
``MAX_DETAIL_STRING`` characters, a detail past ``MAX_DETAIL_BYTES`` and a user name past
``MAX_USERNAME_LEN`` are cut, with a marker giving the original length (``record_event``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..usernames import MAX_USERNAME_LEN
from .detail import _cut, check_detail
from .engine import Row
from .errors import AuditChainBroken, InvalidValue
from .records import EVENT_KIND_RE, OUTCOME_RE, AuditEvent

_GENESIS_HASH = bytes(32)


def _event_hash(prev: bytes, event_id: int, at: float, kind: str, outcome: str,
                user_id: str | None, username: str | None, credential_id: bytes | None,
                detail_text: str) -> bytes:
    canonical = json.dumps(
        [event_id, at, kind, outcome, user_id, username,
         credential_id.hex() if credential_id is not None else None, detail_text],
        separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(prev + canonical.encode("ascii")).digest()




class AuditArea:
    """Audit events (a mixin of ``Store``)."""

    @staticmethod
    def _event(row: Row) -> AuditEvent:
        return AuditEvent(
            id=row["id"], at=row["at"], kind=row["kind"], outcome=row["outcome"],
            user_id=row["user_id"], username=row["username"],
            credential_id=None if row["credential_id"] is None else bytes(row["credential_id"]),
            detail=json.loads(row["detail"]), hash=bytes(row["hash"]))

    def record_event(self, kind: str, *, user_id: str | None = None, username: str | None = None,
                     credential_id: bytes | None = None, outcome: str,
                     detail: Mapping[str, Any] | None = None) -> int:
        """Append an audit event (timestamped now) and return its id.

        ``kind``: lowercase, e.g. ``"login.key"``, ``"enrol.key"``; ``outcome``: lowercase
        word, e.g. ``"success"``, ``"failure"``, ``"refused"``. ``user_id`` need not exist
        (events outlive users and record attempts for unknown ones); when it does, the
        user's current username is stored with the event, unless ``username`` is given
        (e.g. the name typed for an unknown user). ``detail`` is a JSON object checked by
        ``check_detail``: a key that looks like a secret raises ``InvalidValue`` (a
        ``ValueError``) and nothing is written. Nothing is refused for its size: a detail
        too large is cut (``check_detail(..., truncate=True)``), and so are a ``username``
        or ``user_id`` longer than ``MAX_USERNAME_LEN`` characters, with the marker
        ``...[truncated: N characters]``; the hash chain covers what is stored. Returns 0,
        writing nothing, when ``event_gate`` counts the event instead.
        """
        if not isinstance(kind, str) or not EVENT_KIND_RE.fullmatch(kind):
            raise InvalidValue(f"invalid event kind {kind!r}: lowercase letters, digits and . _ : -")
        if not isinstance(outcome, str) or not OUTCOME_RE.fullmatch(outcome):
            raise InvalidValue(f"invalid event outcome {outcome!r}: a lowercase word")
        detail_text = check_detail(detail, truncate=True)
        if self.event_gate is not None and not self.event_gate(kind, outcome, username, detail):
            return 0
        if user_id is not None:
            user_id = _cut(str(user_id), MAX_USERNAME_LEN)
        cred = None if credential_id is None else bytes(credential_id)
        with self.transaction(), self._using("record an audit event") as conn:
            if username is None and user_id is not None:
                row = conn.execute("SELECT username FROM users WHERE id = ?", (user_id,)).fetchone()
                username = None if row is None else row["username"]
            if username is not None:
                username = _cut(str(username), MAX_USERNAME_LEN)
            # Appended under the head's row lock: one gap-free chain, whoever else appends.
            head = conn.execute("SELECT last_id, hash FROM audit_head WHERE id = 1"
                                + self._engine.for_update).fetchone()
            if head is None:
                raise AuditChainBroken(f"token-agent store {self._where}: the audit chain's head "
                                       "is missing: the store was tampered with; nothing was "
                                       "recorded", event_id=None)
            prev = bytes(head["hash"])
            event_id = int(head["last_id"]) + 1
            at = self._now()
            digest = _event_hash(prev, event_id, at, kind, outcome, user_id, username, cred, detail_text)
            conn.execute(
                "INSERT INTO audit_events (id, at, kind, outcome, user_id, username, credential_id, "
                "detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (event_id, at, kind, outcome, user_id, username, cred, detail_text, prev, digest))
            conn.execute("UPDATE audit_head SET last_id = ?, hash = ? WHERE id = 1",
                         (event_id, digest))
        if self.after_event is not None:
            self.after_event()
        return event_id

    def list_events(self, user_id: str | None = None, kind: str | None = None,
                    limit: int = 100, *, credential_id: bytes | None = None) -> list[AuditEvent]:
        """The latest ``limit`` events matching the filters, newest first."""
        clauses, args = [], []
        if user_id is not None:
            clauses.append("user_id = ?"); args.append(user_id)  # noqa: E702
        if kind is not None:
            clauses.append("kind = ?"); args.append(kind)  # noqa: E702
        if credential_id is not None:
            clauses.append("credential_id = ?"); args.append(bytes(credential_id))  # noqa: E702
        where = ("WHERE " + " AND ".join(clauses) + " ") if clauses else ""
        with self._using("list audit events") as conn:
            rows = conn.execute(f"SELECT * FROM audit_events {where}ORDER BY id DESC LIMIT ?",
                                (*args, int(limit))).fetchall()
        return [self._event(r) for r in rows]

    def search_events(self, *, user_id: str | None = None, kind: str | None = None,
                      outcome: str | None = None, since: float | None = None,
                      until: float | None = None, before_id: int | None = None,
                      limit: int = 50) -> list[AuditEvent]:
        """Events matching every filter given, newest first, at most ``limit``: ``kind``
        exactly or as a family (``login`` also finds ``login.card``, ``login.unusual``),
        ``since`` <= at < ``until`` (seconds), ids below ``before_id`` (the next page)."""
        clauses, args = [], []
        if user_id is not None:
            clauses.append("user_id = ?"); args.append(user_id)  # noqa: E702
        if kind:
            family = kind.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            clauses.append("(kind = ? OR kind LIKE ? ESCAPE '\\')")
            args.extend([kind, family + ".%"])
        if outcome:
            clauses.append("outcome = ?"); args.append(outcome)  # noqa: E702
        if since is not None:
            clauses.append("at >= ?"); args.append(float(since))  # noqa: E702
        if until is not None:
            clauses.append("at < ?"); args.append(float(until))  # noqa: E702
        if before_id is not None:
            clauses.append("id < ?"); args.append(int(before_id))  # noqa: E702
        where = ("WHERE " + " AND ".join(clauses) + " ") if clauses else ""
        with self._using("search audit events") as conn:
            rows = conn.execute(f"SELECT * FROM audit_events {where}ORDER BY id DESC LIMIT ?",
                                (*args, max(1, int(limit)))).fetchall()
        return [self._event(r) for r in rows]

    def verify_events(self) -> int:
        """Check the audit events' hash chain; return how many events were verified.

        Raises ``AuditChainBroken`` at the first record that was edited, removed (a gap in
        the ids, or the last ones missing: the chain's head, ``audit_head``, names the last
        event appended) or moved, or when the head does not match the last event.
        """
        with self._using("verify the audit events") as conn:
            prev, expected_id, count = _GENESIS_HASH, 1, 0
            for row in conn.execute("SELECT * FROM audit_events ORDER BY id"):
                eid = row["id"]
                if eid != expected_id:
                    raise AuditChainBroken(f"audit event {expected_id} is missing (next is {eid})",
                                           event_id=expected_id)
                if bytes(row["prev_hash"]) != prev:
                    raise AuditChainBroken(f"audit event {eid} does not follow event {eid - 1}",
                                           event_id=eid)
                cred = None if row["credential_id"] is None else bytes(row["credential_id"])
                digest = _event_hash(prev, eid, row["at"], row["kind"], row["outcome"], row["user_id"],
                                     row["username"], cred, row["detail"])
                if digest != bytes(row["hash"]):
                    raise AuditChainBroken(f"audit event {eid} was altered", event_id=eid)
                prev, expected_id, count = digest, eid + 1, count + 1
            head = conn.execute("SELECT last_id, hash FROM audit_head WHERE id = 1").fetchone()
            if head is None:
                raise AuditChainBroken("the audit chain's head is missing", event_id=None)
            last_id = int(head["last_id"])
            if last_id > count:
                raise AuditChainBroken(f"audit events {count + 1} to {last_id} are missing",
                                       event_id=count + 1)
            if last_id < count:
                raise AuditChainBroken(f"audit events {last_id + 1} to {count} are not in the "
                                       "chain's head: they were added behind the store's back",
                                       event_id=last_id + 1)
            if bytes(head["hash"]) != prev:
                raise AuditChainBroken(f"the audit chain's head does not match event {count}",
                                       event_id=count or None)
            return count
