"""Moving a store to another engine: ``token-agent store migrate --to URL``.

``copy_store(source, target)`` copies every row of every table, ids included, from an open
store (a workstation's SQLite file) into an open, *empty* store of the same schema version
(a new PostgreSQL database, which ``Store.open(url)`` has just brought to the schema):

* nothing is decrypted or re-encrypted: secrets stay as they are at rest (TOTP secrets
  under the data directory's key file, which every machine using the store then needs;
  passwords, codes and app passwords as keyed hashes);
* the source is read inside one write transaction (so nothing changes it while it is
  copied) and the target is written inside one transaction: all or nothing;
* afterwards the row count of every table is compared, and the audit chain is verified on
  the target (same events, same hashes, same head); any difference is an error, and then
  nothing stays written on the target;
* a target that holds any row (a user, a method, an audit event, a setting, ...) is refused
  untouched, as is a target of another schema version.

``COPY_ORDER`` lists every table a store has, parents before children; ``test_store_copy``
checks it against the schema, so that a table added by a migration cannot be forgotten here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import StoreError

if TYPE_CHECKING:
    from . import Store

#: every table with data, parents first (foreign keys); the audit head last: it is updated,
#: not inserted (each store has its own row from migration 6)
COPY_ORDER: tuple[str, ...] = (
    "users", "user_roles", "methods", "fido2_credentials", "smartcard_identities",
    "password_credentials", "totp_credentials", "contact_methods", "otp_challenges",
    "push_devices", "push_requests", "push_pairings", "push_nonces",
    "app_passwords", "backup_codes", "lockouts", "sightings",
    "verifications", "sessions", "settings", "audit_events", "workstations",
    "org_deliveries", "access_passes", "voice_calls",
)
#: tables a store fills itself: the schema's own history, and the audit chain's head; and
#: what is only worth its moment: the web pages' browser sessions (signing in again on the
#: new store is the safe way), rate-limit counters and password resets in progress
NOT_COPIED: tuple[str, ...] = ("schema_history", "audit_head", "web_sessions", "web_throttle",
                               "recovery_resets")
#: tables whose ``id`` the engine generates (PostgreSQL's identity sequences move past the
#: copied ids)
GENERATED_IDS: tuple[str, ...] = ("methods", "otp_challenges", "backup_codes", "workstations",
                                  "access_passes")


class StoreNotEmpty(StoreError):
    """The target of ``store migrate`` already holds data."""

    def __init__(self, message: str, *, counts: dict[str, int]) -> None:
        super().__init__(message)
        self.counts = counts


class CopyMismatch(StoreError):
    """After a copy, the target differs from the source (nothing stays written)."""


@dataclass
class CopyReport:
    source: str
    target: str
    schema_version: int
    rows: dict[str, int] = field(default_factory=dict)
    audit_events: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target,
                "schema_version": self.schema_version, "rows": dict(self.rows),
                "audit_events": self.audit_events}


def row_counts(store: "Store") -> dict[str, int]:
    """The number of rows of every copied table."""
    with store.connection("count the rows of each table") as conn:
        return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in COPY_ORDER}


def copy_store(source: "Store", target: "Store") -> CopyReport:
    """Copy ``source`` into the empty ``target`` and verify the copy (module docstring).
    Raises ``StoreNotEmpty``, ``CopyMismatch``, ``AuditChainBroken`` (the source's own
    chain is broken: nothing is copied) or another ``StoreError``."""
    if source.schema_version != target.schema_version:
        raise StoreError(f"the source store is at schema version {source.schema_version} and the "
                         f"target at {target.schema_version}: open both with this token-agent")
    found = {t: n for t, n in row_counts(target).items() if n}
    if found:
        listed = ", ".join(f"{n} in {t}" for t, n in found.items())
        raise StoreNotEmpty(f"the target store {target.location} is not empty ({listed}): "
                            "store migrate copies into an empty database only; nothing was "
                            "written", counts=found)
    report = CopyReport(source.location, target.location, source.schema_version)
    with source.transaction():  # nothing writes to the source while it is copied
        events = source.verify_events()
        with target.transaction(), source.connection("read the store") as src, \
                target.connection("write the copy") as dst:
            for table in COPY_ORDER:
                cur = src.execute(f"SELECT * FROM {table}")
                rows = cur.fetchall()
                report.rows[table] = len(rows)
                if not rows:
                    continue
                columns = list(rows[0].keys())
                dst.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' for _ in columns)})",
                    [tuple(r[c] for c in columns) for r in rows])
            for table in GENERATED_IDS:
                target.engine.ids_copied(dst, table, "id")
            head = src.execute("SELECT last_id, hash FROM audit_head WHERE id = 1").fetchone()
            dst.execute("UPDATE audit_head SET last_id = ?, hash = ? WHERE id = 1",
                        (head["last_id"], head["hash"]))
            copied = row_counts(target)
            if copied != report.rows:
                wrong = {t: (report.rows[t], copied[t]) for t in COPY_ORDER
                         if copied[t] != report.rows[t]}
                raise CopyMismatch(f"the copy differs from the source (table: source rows, "
                                   f"copied rows): {wrong}; nothing was written")
            verified = target.verify_events()
            if verified != events:
                raise CopyMismatch(f"the source has {events} audit events and the copy "
                                   f"{verified}; nothing was written")
            report.audit_events = verified
    return report

