"""The methods area: authentication methods of every kind (``methods``), FIDO2 credentials
(``fido2_credentials``) and smartcard identities (``smartcard_identities``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

from .engine import Row
from .errors import CredentialExists, InvalidValue, SignCountRegression, UnknownCredential
from .records import (
    KIND_FIDO2, KIND_PASSWORD, MAX_CREDENTIAL_ID_LEN, MAX_NAME_LEN, METHOD_KINDS, FidoCredential,
    Method, _b64url,
)


class MethodsArea:
    """Methods of any kind, FIDO2 credentials, smartcard identities (a mixin of ``Store``)."""

    _METHOD_SELECT = ("SELECT id, user_id, kind, name, created_at, last_used_at, flagged, "
                      "flag_reason, preferred, confirmed FROM methods ")

    @staticmethod
    def _method(row: Row) -> Method:
        return Method(id=row["id"], user_id=row["user_id"], kind=row["kind"], name=row["name"],
                      created_at=row["created_at"], last_used_at=row["last_used_at"],
                      flagged=bool(row["flagged"]), flag_reason=row["flag_reason"],
                      preferred=bool(row["preferred"]), confirmed=bool(row["confirmed"]))

    def add_method(self, user_id: str, kind: str, name: str, *, confirmed: bool = True) -> Method:
        """Add a row to ``methods`` (the kind's own table is the caller's, in the same
        transaction). ``CredentialExists`` if the user has a method of that kind and name."""
        if kind not in METHOD_KINDS:
            raise InvalidValue(f"unknown method kind {kind!r}")
        name = self._check_method_name(name)
        with self.transaction(), self._using("add an authentication method") as conn:
            user = self.get_user_by_id(user_id)
            row = conn.execute("SELECT name FROM methods WHERE user_id = ? AND kind = ? "
                               "AND lower(name) = lower(?)",
                               (user.id, kind, name)).fetchone()
            if row is not None:
                raise CredentialExists(f"user {user.username!r} already has a {kind} method named "
                                       f"{row['name']!r}")
            method_id = conn.execute(
                "INSERT INTO methods (user_id, kind, name, created_at, confirmed) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                (user.id, kind, name, self._now(), int(bool(confirmed)))).fetchone()[0]
            return self.get_method(method_id)

    def get_method(self, method_id: int) -> Method:
        """The method with that id; ``UnknownCredential`` if none."""
        with self._using("read an authentication method") as conn:
            row = conn.execute(self._METHOD_SELECT + "WHERE id = ?", (int(method_id),)).fetchone()
        if row is None:
            raise UnknownCredential(f"unknown authentication method {method_id}")
        return self._method(row)

    def list_methods(self, user_id: str, kind: str | None = None) -> list[Method]:
        """The user's methods (of one kind, or all), in order of enrolment."""
        with self._using("list authentication methods") as conn:
            if kind is None:
                rows = conn.execute(self._METHOD_SELECT + "WHERE user_id = ? ORDER BY id",
                                    (user_id,)).fetchall()
            else:
                rows = conn.execute(self._METHOD_SELECT + "WHERE user_id = ? AND kind = ? ORDER BY id",
                                    (user_id, kind)).fetchall()
        return [self._method(r) for r in rows]

    def find_method(self, user_id: str, kind: str, name: str | None = None) -> Method | None:
        """The user's method of that kind (and name, case-insensitive; else the first)."""
        for m in self.list_methods(user_id, kind):
            if name is None or m.name.casefold() == name.casefold():
                return m
        return None

    def confirm_method(self, method_id: int) -> Method:
        """Mark a method confirmed (usable)."""
        with self.transaction(), self._using("confirm an authentication method") as conn:
            method = self.get_method(method_id)
            conn.execute("UPDATE methods SET confirmed = 1 WHERE id = ?", (method.id,))
            return self.get_method(method.id)

    def touch_method(self, method_id: int, used_at: float | None = None) -> None:
        """Record that a method was used now."""
        with self.transaction(), self._using("record the use of a method") as conn:
            conn.execute("UPDATE methods SET last_used_at = ? WHERE id = ?",
                         (self._now() if used_at is None else float(used_at), int(method_id)))

    def set_preferred_method(self, user_id: str, method_id: int) -> Method:
        """Make a confirmed method of the user their preferred one (the only one)."""
        with self.transaction(), self._using("set the preferred method") as conn:
            method = self.get_method(method_id)
            if method.user_id != user_id:
                raise UnknownCredential(f"method {method_id} is not this user's")
            if not method.confirmed:
                raise InvalidValue(f"method {method.name!r} is not confirmed yet")
            conn.execute("UPDATE methods SET preferred = 0 WHERE user_id = ? AND preferred = 1",
                         (user_id,))
            conn.execute("UPDATE methods SET preferred = 1 WHERE id = ?", (method.id,))
            return self.get_method(method.id)

    def preferred_method(self, user_id: str) -> Method | None:
        """The user's preferred method, if they chose one."""
        with self._using("read the preferred method") as conn:
            row = conn.execute(self._METHOD_SELECT + "WHERE user_id = ? AND preferred = 1",
                               (user_id,)).fetchone()
        return None if row is None else self._method(row)

    def remove_method(self, method_id: int) -> Method:
        """Remove a method of any kind (its details and pending challenges go with it)."""
        with self.transaction(), self._using("remove an authentication method") as conn:
            method = self.get_method(method_id)
            conn.execute("DELETE FROM methods WHERE id = ?", (method.id,))
            conn.execute("DELETE FROM lockouts WHERE scope = ?", (f"method:{method.id}",))
            return method

    def remove_all_methods(self, user_id: str, *, keep_password: bool = True) -> list[Method]:
        """Remove every method of a user (a lost device: the admin's reset), the password
        too unless ``keep_password``; their lockouts, device verifications and pending
        requests go with them. Returns what was removed."""
        with self.transaction(), self._using("remove a user's methods") as conn:
            removed = [m for m in self.list_methods(self.get_user_by_id(user_id).id)
                       if not (keep_password and m.kind == KIND_PASSWORD)]
            for m in removed:
                conn.execute("DELETE FROM methods WHERE id = ?", (m.id,))
                conn.execute("DELETE FROM lockouts WHERE scope = ?", (f"method:{m.id}",))
            conn.execute("DELETE FROM verifications WHERE user_id = ?", (user_id,))
            return removed

    # ---------------------------------------------------------------- FIDO2 credentials

    _FIDO_SELECT = (
        "SELECT m.id, m.user_id, m.name, m.created_at, m.last_used_at, m.flagged, m.flag_reason, "
        "f.credential_id, f.public_key, f.aaguid, f.sign_count, f.rp_id, f.discoverable, "
        "f.uv_enrolled, f.attestation_format, f.attestation_trusted, f.transports "
        "FROM fido2_credentials f JOIN methods m ON m.id = f.method_id ")

    @staticmethod
    def _fido(row: Row) -> FidoCredential:
        return FidoCredential(
            id=row["id"], user_id=row["user_id"], name=row["name"],
            credential_id=bytes(row["credential_id"]), public_key=bytes(row["public_key"]),
            aaguid=row["aaguid"], sign_count=row["sign_count"], rp_id=row["rp_id"],
            discoverable=bool(row["discoverable"]), uv_enrolled=bool(row["uv_enrolled"]),
            attestation_format=row["attestation_format"],
            attestation_trusted=bool(row["attestation_trusted"]),
            transports=list(json.loads(row["transports"])), created_at=row["created_at"],
            last_used_at=row["last_used_at"], flagged=bool(row["flagged"]),
            flag_reason=row["flag_reason"])

    @staticmethod
    def _check_method_name(name: str) -> str:
        if (not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LEN
                or not name.isprintable()):
            raise InvalidValue(f"invalid name {name!r}: 1 to {MAX_NAME_LEN} printable characters")
        return name.strip()

    @staticmethod
    def _check_aaguid(aaguid: str | bytes) -> str:
        try:
            if isinstance(aaguid, (bytes, bytearray)):
                return str(uuid.UUID(bytes=bytes(aaguid)))
            return str(uuid.UUID(aaguid))
        except (ValueError, TypeError, AttributeError):
            raise InvalidValue(f"invalid AAGUID {aaguid!r}: a UUID string or 16 bytes") from None

    def add_fido_credential(
        self, user_id: str, *, name: str, credential_id: bytes, public_key: bytes,
        aaguid: str | bytes, rp_id: str, sign_count: int = 0, discoverable: bool,
        uv_enrolled: bool, attestation_format: str, attestation_trusted: bool,
        transports: Iterable[str] = (), created_at: float | None = None,
    ) -> FidoCredential:
        """Enrol a FIDO2 credential for a user.

        ``UnknownUser`` if ``user_id`` is unknown; ``CredentialExists`` if the credential id
        is already enrolled (for anyone) or the user already has a FIDO2 credential of that
        name (compared case-insensitively). ``aaguid`` may be a UUID string or 16 bytes
        (``fido2``'s ``Aaguid``); it is stored in canonical form.
        """
        name = self._check_method_name(name)
        if not isinstance(credential_id, (bytes, bytearray)) or not 1 <= len(credential_id) <= MAX_CREDENTIAL_ID_LEN:
            raise InvalidValue(f"credential id must be 1 to {MAX_CREDENTIAL_ID_LEN} bytes")
        if not isinstance(public_key, (bytes, bytearray)) or not public_key:
            raise InvalidValue("public key must be non-empty bytes (the CBOR-encoded COSE key)")
        aaguid_s = self._check_aaguid(aaguid)
        if not isinstance(rp_id, str) or not rp_id or len(rp_id) > 253:
            raise InvalidValue(f"invalid relying party id {rp_id!r}")
        if isinstance(sign_count, bool) or not isinstance(sign_count, int) or not 0 <= sign_count <= 0xFFFFFFFF:
            raise InvalidValue(f"invalid signature counter {sign_count!r}: 0 to 2**32-1")
        if not isinstance(attestation_format, str) or not attestation_format:
            raise InvalidValue("attestation format must be a non-empty string (e.g. 'packed', 'none')")
        transport_list = list(transports)
        if not all(isinstance(t, str) and t for t in transport_list):
            raise InvalidValue(f"transports must be non-empty strings: {transport_list!r}")
        credential_id = bytes(credential_id)
        with self.transaction(), self._using("add a FIDO2 credential") as conn:
            user = self.get_user_by_id(user_id)
            if self.get_fido_credential(credential_id) is not None:
                raise CredentialExists(f"this key's credential ({_b64url(credential_id)[:16]}...) is "
                                       "already enrolled")
            row = conn.execute("SELECT name FROM methods WHERE user_id = ? AND kind = ? "
                               "AND lower(name) = lower(?)",
                               (user.id, KIND_FIDO2, name)).fetchone()
            if row is not None:
                raise CredentialExists(f"user {user.username!r} already has a key named {row['name']!r}")
            method_id = conn.execute(
                "INSERT INTO methods (user_id, kind, name, created_at) VALUES (?, ?, ?, ?) RETURNING id",
                (user.id, KIND_FIDO2, name, self._now() if created_at is None else float(created_at))
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO fido2_credentials (method_id, credential_id, public_key, aaguid, sign_count, "
                "rp_id, discoverable, uv_enrolled, attestation_format, attestation_trusted, transports) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (method_id, credential_id, bytes(public_key), aaguid_s, sign_count, rp_id,
                 int(bool(discoverable)), int(bool(uv_enrolled)), attestation_format,
                 int(bool(attestation_trusted)), json.dumps(transport_list)))
            return self._fido_by_method(method_id)

    def _fido_by_method(self, method_id: int) -> FidoCredential:
        with self._using("read a FIDO2 credential") as conn:
            row = conn.execute(self._FIDO_SELECT + "WHERE m.id = ?", (method_id,)).fetchone()
        if row is None:
            raise UnknownCredential(f"unknown credential {method_id}")
        return self._fido(row)

    def get_fido_credential(self, credential_id: bytes) -> FidoCredential | None:
        """The FIDO2 credential with that credential id, or ``None``."""
        with self._using("read a FIDO2 credential") as conn:
            row = conn.execute(self._FIDO_SELECT + "WHERE f.credential_id = ?",
                               (bytes(credential_id),)).fetchone()
        return None if row is None else self._fido(row)

    def _require_fido(self, credential_id: bytes) -> FidoCredential:
        cred = self.get_fido_credential(credential_id)
        if cred is None:
            raise UnknownCredential(f"unknown credential {_b64url(bytes(credential_id))}: it was "
                                    "never enrolled here or has been deleted")
        return cred

    def list_fido_credentials(self, user_id: str | None = None) -> list[FidoCredential]:
        """FIDO2 credentials, of one user or of everyone, in order of enrolment."""
        with self._using("list FIDO2 credentials") as conn:
            if user_id is None:
                rows = conn.execute(self._FIDO_SELECT + "ORDER BY m.id").fetchall()
            else:
                rows = conn.execute(self._FIDO_SELECT + "WHERE m.user_id = ? ORDER BY m.id",
                                    (user_id,)).fetchall()
        return [self._fido(r) for r in rows]

    def record_fido_use(self, credential_id: bytes, sign_count: int,
                        used_at: float | None = None) -> FidoCredential:
        """Record a successful assertion: the new signature counter and the time of use.

        The counter must increase, unless it is zero and so is the stored one (a key without
        counters); otherwise ``SignCountRegression`` and nothing is written (the check and
        the write are one step, so two logins racing with one counter value cannot both
        pass). ``UnknownCredential`` if there is no such credential.
        """
        if isinstance(sign_count, bool) or not isinstance(sign_count, int) or not 0 <= sign_count <= 0xFFFFFFFF:
            raise InvalidValue(f"invalid signature counter {sign_count!r}: 0 to 2**32-1")
        with self.transaction(), self._using("record the use of a FIDO2 credential") as conn:
            cred = self._require_fido(credential_id)
            # One conditional UPDATE: its rowcount decides, whoever else raced with this value.
            moved = conn.execute(
                "UPDATE fido2_credentials SET sign_count = ? WHERE method_id = ? "
                "AND (sign_count < ? OR (sign_count = 0 AND ? = 0))",
                (sign_count, cred.id, sign_count, sign_count)).rowcount
            if moved != 1:
                stored = self._fido_by_method(cred.id).sign_count
                raise SignCountRegression(
                    f"signature counter of key {cred.name!r} did not increase (stored "
                    f"{stored}, received {sign_count}): the key may have been cloned",
                    stored=stored, received=sign_count)
            conn.execute("UPDATE methods SET last_used_at = ? WHERE id = ?",
                         (self._now() if used_at is None else float(used_at), cred.id))
            return self._fido_by_method(cred.id)

    def flag_fido_credential(self, credential_id: bytes, reason: str) -> FidoCredential:
        """Flag a credential as suspect (e.g. counter regression), with a reason."""
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidValue("a flag needs a reason")
        with self.transaction(), self._using("flag a FIDO2 credential") as conn:
            cred = self._require_fido(credential_id)
            conn.execute("UPDATE methods SET flagged = 1, flag_reason = ? WHERE id = ?",
                         (reason.strip(), cred.id))
            return self._fido_by_method(cred.id)

    def clear_flag(self, credential_id: bytes) -> FidoCredential:
        """Remove a credential's flag (an administrator's decision)."""
        with self.transaction(), self._using("clear the flag of a FIDO2 credential") as conn:
            cred = self._require_fido(credential_id)
            conn.execute("UPDATE methods SET flagged = 0, flag_reason = NULL WHERE id = ?", (cred.id,))
            return self._fido_by_method(cred.id)

    def remove_fido_credential(self, user_id: str, name: str) -> FidoCredential:
        """Remove the user's FIDO2 credential of that name (case-insensitive); returns it.
        ``UnknownUser`` / ``UnknownCredential`` when there is no such user / credential."""
        with self.transaction(), self._using("remove a FIDO2 credential") as conn:
            user = self.get_user_by_id(user_id)
            row = conn.execute(self._FIDO_SELECT + "WHERE m.user_id = ? AND m.kind = ? "
                               "AND lower(m.name) = lower(?)",
                               (user.id, KIND_FIDO2, name)).fetchone()
            if row is None:
                raise UnknownCredential(f"user {user.username!r} has no key named {name!r}")
            cred = self._fido(row)
            conn.execute("DELETE FROM methods WHERE id = ?", (cred.id,))
            return cred
