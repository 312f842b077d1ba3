"""Smartcard identities (``smartcard_identities``): the holder UUID in a card's
authentication certificate; part of the methods area."""

from __future__ import annotations

from .engine import Row
from .errors import CredentialExists, InvalidValue, UnknownCredential
from .records import CARD_UUID_RE, KIND_SMARTCARD, SmartcardIdentity, User


class CardsArea:
    """Smartcard identities (a mixin of ``Store``)."""

    # ---------------------------------------------------------------- smartcard identities

    _CARD_SELECT = (
        "SELECT m.id, m.user_id, m.name, m.created_at, m.last_used_at, m.flagged, m.flag_reason, "
        "c.uuid, c.holder_name, c.certificate_serial, c.issuer, c.cert_not_after "
        "FROM smartcard_identities c JOIN methods m ON m.id = c.method_id ")

    @staticmethod
    def _card(row: Row) -> SmartcardIdentity:
        return SmartcardIdentity(
            id=row["id"], user_id=row["user_id"], name=row["name"], uuid=row["uuid"],
            holder_name=row["holder_name"], certificate_serial=row["certificate_serial"],
            issuer=row["issuer"], created_at=row["created_at"], last_used_at=row["last_used_at"],
            flagged=bool(row["flagged"]), flag_reason=row["flag_reason"],
            cert_not_after=row["cert_not_after"])

    @staticmethod
    def _check_card_uuid(card_uuid: str) -> str:
        if not isinstance(card_uuid, str) or not CARD_UUID_RE.fullmatch(card_uuid):
            raise InvalidValue(f"invalid card holder UUID {card_uuid!r}: 1 to 64 letters, "
                               "digits and . _ : -")
        return card_uuid

    def add_card_identity(self, user_id: str, *, uuid: str, holder_name: str,
                          name: str | None = None) -> SmartcardIdentity:
        """Enrol the smartcard holder ``uuid`` (from the card certificate) for a user; ``name``
        defaults to ``"card <uuid>"``. ``CredentialExists`` if the UUID is enrolled already
        (for anyone) or the user has a method of that name; ``UnknownUser``."""
        card_uuid = self._check_card_uuid(uuid)
        holder = self._check_display_name(holder_name)
        name = self._check_method_name(f"card {card_uuid}" if name is None else name)
        with self.transaction(), self._using("add a smartcard identity") as conn:
            user = self.get_user_by_id(user_id)
            owner = self.get_user_by_card_uuid(card_uuid)
            if owner is not None:
                raise CredentialExists(f"the card holder {card_uuid} is already enrolled "
                                       f"(user {owner.username!r})")
            row = conn.execute("SELECT name FROM methods WHERE user_id = ? AND kind = ? "
                               "AND lower(name) = lower(?)",
                               (user.id, KIND_SMARTCARD, name)).fetchone()
            if row is not None:
                raise CredentialExists(f"user {user.username!r} already has a card named {row['name']!r}")
            method_id = conn.execute(
                "INSERT INTO methods (user_id, kind, name, created_at) VALUES (?, ?, ?, ?) RETURNING id",
                (user.id, KIND_SMARTCARD, name, self._now())).fetchone()[0]
            conn.execute("INSERT INTO smartcard_identities (method_id, uuid, holder_name) "
                         "VALUES (?, ?, ?)", (method_id, card_uuid, holder))
            return self._card_by_method(method_id)

    def _card_by_method(self, method_id: int) -> SmartcardIdentity:
        with self._using("read a smartcard identity") as conn:
            row = conn.execute(self._CARD_SELECT + "WHERE m.id = ?", (method_id,)).fetchone()
        if row is None:
            raise UnknownCredential(f"unknown smartcard identity {method_id}")
        return self._card(row)

    def get_card_identity(self, uuid: str) -> SmartcardIdentity | None:
        """The smartcard identity of that holder UUID, or ``None``."""
        with self._using("read a smartcard identity") as conn:
            row = conn.execute(self._CARD_SELECT + "WHERE c.uuid = ?", (str(uuid),)).fetchone()
        return None if row is None else self._card(row)

    def get_user_by_card_uuid(self, uuid: str) -> User | None:
        """The user for whom that card holder UUID is enrolled, or ``None``."""
        ident = self.get_card_identity(uuid)
        return None if ident is None else self.get_user_by_id(ident.user_id)

    def list_card_identities(self, user_id: str | None = None) -> list[SmartcardIdentity]:
        """Smartcard identities, of one user or of everyone, in order of enrolment."""
        with self._using("list smartcard identities") as conn:
            if user_id is None:
                rows = conn.execute(self._CARD_SELECT + "ORDER BY m.id").fetchall()
            else:
                rows = conn.execute(self._CARD_SELECT + "WHERE m.user_id = ? ORDER BY m.id",
                                    (user_id,)).fetchall()
        return [self._card(r) for r in rows]

    def record_card_use(self, uuid: str, *, certificate_serial: str, issuer: str,
                        used_at: float | None = None,
                        not_after: float | None = None) -> SmartcardIdentity:
        """Record a successful card login: the certificate used (its serial, issuer and, when
        given, the end of its validity, seconds since the epoch) and the time."""
        with self.transaction(), self._using("record the use of a smartcard") as conn:
            ident = self.get_card_identity(uuid)
            if ident is None:
                raise UnknownCredential(f"the card holder {uuid} is not enrolled")
            conn.execute("UPDATE smartcard_identities SET certificate_serial = ?, issuer = ?, "
                         "cert_not_after = coalesce(?, cert_not_after) WHERE method_id = ?",
                         (str(certificate_serial), str(issuer),
                          None if not_after is None else float(not_after), ident.id))
            conn.execute("UPDATE methods SET last_used_at = ? WHERE id = ?",
                         (self._now() if used_at is None else float(used_at), ident.id))
            return self._card_by_method(ident.id)

    def remove_card_identity(self, user_id: str, *, uuid: str | None = None,
                             name: str | None = None) -> SmartcardIdentity:
        """Remove the user's smartcard identity given by holder ``uuid`` or by ``name``
        (exactly one); returns it. ``UnknownUser`` / ``UnknownCredential``."""
        if (uuid is None) == (name is None):
            raise InvalidValue("name the card identity to remove by uuid or by name (one of them)")
        with self.transaction(), self._using("remove a smartcard identity") as conn:
            user = self.get_user_by_id(user_id)
            if uuid is not None:
                row = conn.execute(self._CARD_SELECT + "WHERE m.user_id = ? AND c.uuid = ?",
                                   (user.id, str(uuid))).fetchone()
            else:
                row = conn.execute(self._CARD_SELECT + "WHERE m.user_id = ? AND m.kind = ? "
                                   "AND lower(m.name) = lower(?)", (user.id, KIND_SMARTCARD, name)).fetchone()
            if row is None:
                raise UnknownCredential(f"user {user.username!r} has no card "
                                        f"{uuid if uuid is not None else repr(name)}")
            ident = self._card(row)
            conn.execute("DELETE FROM methods WHERE id = ?", (ident.id,))
            return ident
