"""The workstations area: an organisation's joined workstations (``workstations``, schema
migration 7), on the server's store.

A name gets a row with ``add_join_token`` (the SHA-256 of a one-time token, never the token,
and its expiry); ``claim_join_token`` consumes the token with one conditional UPDATE (single
use whatever the number of replicas: a second claim finds it used) and ``complete_join``
records the certificate issued, both inside the caller's transaction so that a failed join
leaves the token unused. The server finds a workstation by its certificate's fingerprint
(``workstation_by_fingerprint``); ``revoke_workstation`` cuts it off.
"""

from __future__ import annotations

from .engine import Row
from .errors import InvalidValue, JoinTokenRefused, UnknownWorkstation, WorkstationExists
from .records import WORKSTATION_NAME_RE, Workstation

#: the last-seen time is written at most this often per workstation (seconds)
LAST_SEEN_INTERVAL = 60.0


def check_workstation_name(name: str) -> str:
    if not isinstance(name, str) or not WORKSTATION_NAME_RE.fullmatch(name):
        raise InvalidValue(f"invalid workstation name {name!r}: 1 to 64 letters, digits and "
                           ". _ - (starting with a letter or digit)")
    return name


class WorkstationsArea:
    """An organisation's workstations (a mixin of ``Store``)."""

    @staticmethod
    def _workstation(row: Row) -> Workstation:
        return Workstation(
            id=int(row["id"]), name=row["name"], token_expires_at=row["token_expires_at"],
            token_used_at=row["token_used_at"], cert_serial=row["cert_serial"],
            cert_fingerprint=row["cert_fingerprint"], cert_not_after=row["cert_not_after"],
            created_at=row["created_at"], joined_at=row["joined_at"],
            revoked_at=row["revoked_at"], last_seen_at=row["last_seen_at"],
            last_address=row["last_address"])

    def get_workstation(self, name: str) -> Workstation | None:
        """The workstation of that name (case-insensitive), or ``None``."""
        with self._using("read a workstation") as conn:
            row = conn.execute("SELECT * FROM workstations WHERE lower(name) = lower(?)",
                               (str(name),)).fetchone()
        return None if row is None else self._workstation(row)

    def workstation_by_fingerprint(self, fingerprint: str) -> Workstation | None:
        """The workstation whose certificate has that SHA-256 fingerprint (hex), or ``None``."""
        with self._using("find a workstation") as conn:
            row = conn.execute("SELECT * FROM workstations WHERE cert_fingerprint = ?",
                               (str(fingerprint).lower(),)).fetchone()
        return None if row is None else self._workstation(row)

    def list_workstations(self) -> list[Workstation]:
        """Every workstation, by name."""
        with self._using("list workstations") as conn:
            rows = conn.execute("SELECT * FROM workstations ORDER BY lower(name)").fetchall()
        return [self._workstation(r) for r in rows]

    def add_join_token(self, name: str, token_hash: bytes, expires_at: float) -> Workstation:
        """A new join token for ``name`` (its SHA-256 and expiry): a new row, or, for a
        workstation not joined yet or revoked, the token replaced (an older token stops
        working). ``WorkstationExists`` for a joined workstation not revoked."""
        check_workstation_name(name)
        if not isinstance(token_hash, bytes) or len(token_hash) != 32:
            raise InvalidValue("a join token's hash is 32 bytes (SHA-256)")
        with self.transaction(), self._using("record a join token") as conn:
            row = conn.execute(
                "SELECT * FROM workstations WHERE lower(name) = lower(?)"
                + self._engine.for_update, (name,)).fetchone()
            now = self._now()
            if row is None:
                conn.execute(
                    "INSERT INTO workstations (name, token_hash, token_expires_at, created_at) "
                    "VALUES (?, ?, ?, ?)", (name, token_hash, float(expires_at), now))
            else:
                current = self._workstation(row)
                if current.state == "joined":
                    raise WorkstationExists(
                        f"the workstation {current.name} has joined already: revoke it first "
                        f"(token-agent server workstation-revoke {current.name}) to join it "
                        "again")
                conn.execute(
                    "UPDATE workstations SET token_hash = ?, token_expires_at = ?, "
                    "token_used_at = NULL WHERE id = ?",
                    (token_hash, float(expires_at), current.id))
            found = self.get_workstation(name)
            assert found is not None
            return found

    def claim_join_token(self, token_hash: bytes, now: float) -> Workstation:
        """Consume the join token with that hash: one conditional UPDATE, so a token is used
        once whatever the number of servers. ``JoinTokenRefused`` (reason ``unknown``,
        ``used``, ``expired``) otherwise. Call inside a transaction with ``complete_join``."""
        with self.transaction(), self._using("use a join token") as conn:
            row = conn.execute(
                "UPDATE workstations SET token_used_at = ? WHERE token_hash = ? "
                "AND token_used_at IS NULL AND token_expires_at > ? RETURNING id",
                (float(now), bytes(token_hash), float(now))).fetchone()
            if row is not None:
                found = conn.execute("SELECT * FROM workstations WHERE id = ?",
                                     (row["id"],)).fetchone()
                return self._workstation(found)
            row = conn.execute("SELECT token_used_at, token_expires_at FROM workstations "
                               "WHERE token_hash = ?", (bytes(token_hash),)).fetchone()
        if row is None:
            raise JoinTokenRefused("this join token is not known to the organisation's server: "
                                   "ask its administrator for a new one", reason="unknown")
        if row["token_used_at"] is not None:
            raise JoinTokenRefused("this join token was used already: ask the organisation's "
                                   "administrator for a new one", reason="used")
        raise JoinTokenRefused("this join token has expired: ask the organisation's "
                               "administrator for a new one", reason="expired")

    def complete_join(self, workstation_id: int, *, cert_serial: str, cert_fingerprint: str,
                      cert_not_after: float, now: float) -> Workstation:
        """Record the certificate issued at a join (and clear a revocation)."""
        with self.transaction(), self._using("record a join") as conn:
            conn.execute(
                "UPDATE workstations SET cert_serial = ?, cert_fingerprint = ?, "
                "cert_not_after = ?, joined_at = ?, revoked_at = NULL WHERE id = ?",
                (str(cert_serial), str(cert_fingerprint).lower(), float(cert_not_after),
                 float(now), int(workstation_id)))
            row = conn.execute("SELECT * FROM workstations WHERE id = ?",
                               (int(workstation_id),)).fetchone()
        if row is None:
            raise UnknownWorkstation(f"no workstation with id {workstation_id}")
        return self._workstation(row)

    def revoke_workstation(self, name: str) -> Workstation:
        """Revoke the workstation (its certificate is refused from now on; an unused join
        token too). ``UnknownWorkstation`` when there is none of that name. Revoking twice
        keeps the first time."""
        with self.transaction(), self._using("revoke a workstation") as conn:
            conn.execute(
                "UPDATE workstations SET revoked_at = coalesce(revoked_at, ?), "
                "token_expires_at = CASE WHEN token_used_at IS NULL THEN 0 "
                "ELSE token_expires_at END WHERE lower(name) = lower(?)",
                (self._now(), str(name)))
            found = self.get_workstation(name)
        if found is None:
            raise UnknownWorkstation(f"no workstation named {name!r}: `token-agent server "
                                     "workstations` lists them")
        return found

    def touch_workstation(self, workstation_id: int, now: float, address: str | None) -> bool:
        """Remember when the workstation was last seen (and from where), at most once per
        ``LAST_SEEN_INTERVAL``; whether it wrote."""
        with self.transaction(), self._using("record a workstation's visit") as conn:
            cur = conn.execute(
                "UPDATE workstations SET last_seen_at = ?, last_address = ? WHERE id = ? "
                "AND (last_seen_at IS NULL OR last_seen_at < ?)",
                (float(now), address, int(workstation_id), float(now) - LAST_SEEN_INTERVAL))
            return bool(getattr(cur, "rowcount", 0))
