"""The store an offline login's key and card ceremonies see (``CacheStore``): one user,
read from the cached bundle; what the ceremonies write (a key's counter and flag, a card's
last use) goes back into the bundle, and their audit events into the outbox, all inside the
cache's one local transaction. ``RecordingKey`` keeps the assertions the key returned, so the
events carry the key's own proof of its counter (``ingest.py`` checks it)."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from ..store import FidoCredential, SignCountRegression, SmartcardIdentity, UnknownUser, User

if TYPE_CHECKING:
    from .cache import OfflineCache


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class RecordingKey:
    """The key as the ceremony sees it, keeping the assertions it returned: the offline
    ``login.key`` and ``key.clone-suspected`` events carry the one used (authenticator data,
    client data, signature; nothing secret), so the server checks the counter a workstation
    reports against the key's own signature instead of taking its word."""

    def __init__(self, key) -> None:
        self._key = key
        self.assertions: dict[bytes, Any] = {}

    def assert_credentials(self, *args, **kwargs):
        responses = self._key.assert_credentials(*args, **kwargs)
        for r in responses:
            self.assertions[bytes(r.credential_id)] = r
        return responses

    def __getattr__(self, name: str) -> Any:
        return getattr(self._key, name)


def assertion_detail(response) -> dict[str, str]:
    """An assertion as an event's detail carries it (base64)."""
    return {"authenticator_data": _b64(response.authenticator_data),
            "client_data": _b64(response.client_data_json),
            "signature": _b64(response.signature)}


class CacheStore:
    """The part of ``Store`` the key and card ceremonies use, over one user's cached bundle:
    reads from the bundle, writes (counter, flag, last card use) into it, audit events into
    the outbox, all inside the cache's local transaction."""

    def __init__(self, cache: "OfflineCache", bundle: dict[str, Any], now: float) -> None:
        self._cache = cache
        self._bundle = bundle
        self._now = now
        u = bundle["user"]
        self.local_dir = None
        self._user = User(id=u["id"], username=u["username"], display_name=u["display_name"],
                          roles=[], user_handle=_unb64(u["user_handle"]), created_at=0.0,
                          disabled=bool(u["disabled"]), user_class=u["user_class"],
                          mfa_enabled=bool(u["mfa_enabled"]), mfa_source=u.get("mfa_source"))
        self._counts: dict[bytes, int] = {}
        #: the ceremony's key (a ``RecordingKey``), for the assertions in the events
        self.key: RecordingKey | None = None

    # the user
    def get_user(self, username: str) -> User:
        if username.lower() != self._user.username.lower():
            raise UnknownUser(f"no user {username!r} in the offline cache")
        return self._user

    def get_user_by_id(self, user_id: str) -> User:
        if user_id != self._user.id:
            raise UnknownUser(f"no user {user_id!r} in the offline cache")
        return self._user

    # keys
    def _cred(self, c: dict[str, Any]) -> FidoCredential:
        return FidoCredential(
            id=0, user_id=self._user.id, name=c["name"],
            credential_id=bytes.fromhex(c["credential_id"]),
            public_key=_unb64(c["public_key"]), aaguid=c.get("aaguid", ""),
            sign_count=int(c["sign_count"]), rp_id=c["rp_id"], discoverable=True,
            uv_enrolled=bool(c.get("uv_enrolled")), attestation_format="",
            attestation_trusted=False,
            transports=["usb"], created_at=0.0, last_used_at=None, flagged=bool(c["flagged"]),
            flag_reason=c.get("flag_reason"))

    def _raw(self, credential_id: bytes) -> dict[str, Any] | None:
        for c in self._bundle.get("credentials", ()):
            if c["credential_id"] == bytes(credential_id).hex():
                return c
        return None

    def list_fido_credentials(self, user_id: str | None = None) -> list[FidoCredential]:
        return [self._cred(c) for c in self._bundle.get("credentials", ())]

    def get_fido_credential(self, credential_id: bytes) -> FidoCredential | None:
        raw = self._raw(credential_id)
        return None if raw is None else self._cred(raw)

    def record_fido_use(self, credential_id: bytes, sign_count: int,
                        used_at: float | None = None) -> FidoCredential:
        with self.transaction():
            raw = self._raw(credential_id)
            stored = int(raw["sign_count"])
            if not (stored < sign_count or (stored == 0 and sign_count == 0)):
                raise SignCountRegression(
                    f"signature counter of key {raw['name']!r} did not increase (stored "
                    f"{stored}, received {sign_count})", stored=stored, received=sign_count)
            raw["sign_count"] = int(sign_count)
            self._counts[bytes(credential_id)] = int(sign_count)
            self._save()
            return self._cred(raw)

    def flag_fido_credential(self, credential_id: bytes, reason: str) -> FidoCredential:
        with self.transaction():
            raw = self._raw(credential_id)
            raw["flagged"], raw["flag_reason"] = True, reason
            self._save()
            return self._cred(raw)

    # cards
    def _ident(self, c: dict[str, Any]) -> SmartcardIdentity:
        return SmartcardIdentity(id=0, user_id=self._user.id, name=c["name"], uuid=c["uuid"],
                                 holder_name=c["holder_name"],
                                 certificate_serial=c.get("certificate_serial"),
                                 issuer=c.get("issuer"), created_at=0.0,
                                 last_used_at=c.get("last_used_at"), flagged=bool(c["flagged"]),
                                 flag_reason=c.get("flag_reason"))

    def _raw_card(self, uuid: str) -> dict[str, Any] | None:
        for c in self._bundle.get("cards", ()):
            if c["uuid"] == uuid:
                return c
        return None

    def get_card_identity(self, uuid: str) -> SmartcardIdentity | None:
        raw = self._raw_card(uuid)
        return None if raw is None else self._ident(raw)

    def get_user_by_card_uuid(self, uuid: str) -> User | None:
        return self._user if self._raw_card(uuid) is not None else None

    def record_card_use(self, uuid: str, *, certificate_serial: str, issuer: str,
                        used_at: float | None = None,
                        not_after: float | None = None) -> SmartcardIdentity:
        """As ``Store.record_card_use``; ``not_after`` (the certificate's end, for the
        administrators' card report) is the organisation's store's business, not the
        workstation's cache's: it is not kept here."""
        with self.transaction():
            raw = self._raw_card(uuid)
            raw.update(certificate_serial=certificate_serial, issuer=issuer,
                       last_used_at=self._now if used_at is None else used_at)
            self._save()
            return self._ident(raw)

    # writes
    def transaction(self):
        return self._cache.transaction()

    def _save(self) -> None:
        self._cache.update_bundle(self._user.username, self._bundle)

    def record_event(self, kind: str, *, user_id: str | None = None,
                     username: str | None = None, credential_id: bytes | None = None,
                     outcome: str, detail: dict | None = None) -> int:
        detail = dict(detail or {})
        cred = None if credential_id is None else bytes(credential_id)
        if kind == "login.key" and outcome == "success" and cred in self._counts:
            detail["sign_count"] = self._counts[cred]  # for the server's reconciliation
        if kind in ("login.key", "key.clone-suspected") and self.key is not None \
                and cred in self.key.assertions and (outcome == "success" or kind != "login.key"):
            detail["assertion"] = assertion_detail(self.key.assertions[cred])
        if user_id == self._user.id and username is None:
            username = self._user.username
        return self._cache.queue({"kind": kind, "user_id": user_id, "username": username,
                                  "credential_id": None if cred is None else cred.hex(),
                                  "outcome": outcome, "detail": detail, "at": self._now},
                                 now=self._now)
