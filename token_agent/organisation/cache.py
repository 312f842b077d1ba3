"""The workstation's offline cache, encrypted: what ``offline.login`` checks a key or card
against when no organisation server answers.

``OfflineCache.open(org_dir)`` opens ``<org_dir>/offline-cache.db`` (``store/wscache.py``:
SQLite, 0600, WAL) and the cache's key file ``<org_dir>/secrets.key`` (32 random bytes,
0600, ``secretbox.SecretKeys``; never ``TOKEN_AGENT_KEY_FILE``: this key is the
workstation's own). Every bundle, TOTP hash list and outbox event is AES-256-GCM encrypted
with the row's identity as associated data (a ciphertext moved to another user's row does
not decrypt); rows are found by a keyed hash of the user name, so the file names nobody in
clear. A copy of the file without the key file gives away neither who logs in here nor
their credentials.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..secretbox import SecretError, SecretKeys
from ..store.wscache import FILENAME, WorkstationCache


class CacheError(Exception):
    """The cache cannot be used (its key file, a damaged row)."""


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


class OfflineCache:
    """The encrypted cache: bundles, TOTP hashes, consumed steps, the outbox."""

    def __init__(self, db: WorkstationCache, keys: SecretKeys) -> None:
        self.db = db
        self._keys = keys

    @classmethod
    def open(cls, org_dir: str | os.PathLike[str]) -> "OfflineCache":
        """The cache of the organisation directory ``org_dir`` (created when missing, 0700)."""
        org_dir = Path(org_dir)
        org_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            keys = SecretKeys.load_or_create(org_dir, environ={})
        except SecretError as exc:
            raise CacheError(f"the offline cache's key cannot be used: {exc}") from None
        return cls(WorkstationCache.open(org_dir / FILENAME), keys)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "OfflineCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self):
        """One local transaction (``WorkstationCache.transaction``)."""
        return self.db.transaction()

    # ------------------------------------------------------------ names and blobs

    def user_key(self, username: str) -> str:
        """The row key of a user: a keyed hash of the lower-cased name (names are compared
        case-insensitively, as in the store)."""
        return self._keys.code_hash("offline-user", username.lower()).hex()

    def _seal(self, what: str, key: str, data: Any) -> bytes:
        return self._keys.encrypt(_json(data), aad=f"{what}:{key}".encode())

    def _open(self, what: str, key: str, blob: bytes) -> Any:
        try:
            return json.loads(self._keys.decrypt(blob, aad=f"{what}:{key}".encode()))
        except (SecretError, ValueError) as exc:
            raise CacheError(f"the offline cache's {what} cannot be read ({exc}): it is "
                             "rebuilt at the user's next online login") from None

    # ------------------------------------------------------------ bundles

    def store_bundle(self, bundle: dict[str, Any], *, now: float) -> None:
        """Keep the bundle of an online login that just succeeded (``now``). What happened
        here offline and the server may not know yet is kept: a credential's counter is the
        higher of the two, and a key suspended here stays suspended while events wait in the
        outbox. The authenticator-app steps the server has seen used (``totp_last_steps``)
        are consumed here too, so cached hashes never accept a code used online."""
        username = bundle["user"]["username"]
        key = self.user_key(username)
        with self.transaction():
            try:
                old = self.bundle(username)
            except CacheError:
                old = None  # unreadable: replaced
            if old is not None:
                before = {c["credential_id"]: c for c in old.get("credentials", ())}
                waiting = self.pending_count() > 0
                for cred in bundle.get("credentials", ()):
                    mine = before.get(cred["credential_id"])
                    if mine is None:
                        continue
                    cred["sign_count"] = max(int(cred["sign_count"]), int(mine["sign_count"]))
                    if waiting and mine.get("flagged") and not cred.get("flagged"):
                        cred["flagged"], cred["flag_reason"] = True, mine.get("flag_reason")
            for method, step in (bundle.get("totp_last_steps") or {}).items():
                self.consume_totp_step(username, method, int(step))
            self.db.put_bundle(key, self._seal("bundle", key, bundle), now=now,
                               online_login_at=now)
            self.purge(now)

    def bundle(self, username: str) -> dict[str, Any] | None:
        """The user's cached bundle (with ``last_online_login_at``), or None."""
        key = self.user_key(username)
        row = self.db.get_bundle(key)
        if row is None:
            return None
        bundle = self._open("bundle", key, row[0])
        bundle["last_online_login_at"] = row[1]
        return bundle

    def update_bundle(self, username: str, bundle: dict[str, Any]) -> None:
        """Write back a bundle changed offline (a counter), its online login time unchanged."""
        key = self.user_key(username)
        data = {k: v for k, v in bundle.items() if k != "last_online_login_at"}
        self.db.replace_bundle_blob(key, self._seal("bundle", key, data))

    def forget(self, username: str) -> None:
        self.db.forget_user(self.user_key(username))

    def purge(self, now: float) -> int:
        """Forget the users whose last online login here is older than any policy's offline
        window (``policy.MAX_OFFLINE_HOURS``): their entries can never log anyone in again.
        Done at each ``store_bundle``; how many were forgotten."""
        from ..policy import MAX_OFFLINE_HOURS

        return self.db.forget_older_than(float(now) - MAX_OFFLINE_HOURS * 3600.0)

    # ------------------------------------------------------------ TOTP

    def store_totp(self, username: str, hashes: dict[str, Any], *, now: float) -> None:
        key = self.user_key(username)
        self.db.put_totp(key, self._seal("totp", key, hashes), now=now)

    def totp(self, username: str) -> dict[str, Any] | None:
        key = self.user_key(username)
        blob = self.db.get_totp(key)
        return None if blob is None else self._open("totp", key, blob)

    def totp_last_step(self, username: str, method: str) -> int:
        return self.db.totp_last_step(self.user_key(username), method)

    def consume_totp_step(self, username: str, method: str, step: int) -> bool:
        return self.db.consume_totp_step(self.user_key(username), method, step)

    # ------------------------------------------------------------ trust (cards)

    def store_trust(self, trust: dict[str, Any]) -> None:
        self.db.put_meta("trust", self._seal("meta", "trust", trust))

    def trust(self) -> dict[str, Any] | None:
        blob = self.db.get_meta("trust")
        return None if blob is None else self._open("meta", "trust", blob)

    # ------------------------------------------------------------ outbox

    def queue(self, event: dict[str, Any], *, now: float) -> int:
        """Queue one audit event for the server (inside the caller's transaction, with the
        change it records); its ``seq``. The event is sealed under its position in the
        queue's order of creation (``created_at``) and read back by ``pending``."""
        return self.db.outbox_add(self._seal("outbox", "event", event), now=now)

    def pending(self, limit: int = 100) -> list[dict[str, Any]]:
        """The oldest queued events, each with its ``seq``, in order."""
        return [{**self._open("outbox", "event", blob), "seq": seq}
                for seq, blob in self.db.outbox_batch(limit)]

    def acknowledged(self, seq: int) -> int:
        """The server recorded every event up to ``seq``: drop them; how many."""
        return self.db.outbox_delete_through(seq)

    def pending_count(self) -> int:
        return self.db.outbox_count()
