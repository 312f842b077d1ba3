"""A simulated NHS-style PKI, kept in one directory: a root CA, an issuing CA, the registration
authority's records of the cards it issued, and the CRL it publishes.

NHS smartcards carry certificates issued by the organisation's CA; a registration authority
(RA) issues the cards, keeps each card's administrative credentials (the cardholder has no
PUK: a sponsor or RA unlocks a blocked card), and revokes cards. This module is that CA and RA
for development and tests. Its private keys are stored unencrypted (mode 0600): it is test
material and must never sign anything a production system trusts.

Layout of a CA directory (created with mode 0700):

============== ===================================================================
root-ca.pem    the root CA certificate: the trust anchor (:func:`trust_anchors`)
root-ca.key    its private key (PKCS#8 PEM, 0600)
issuing-ca.pem the issuing CA certificate (signed by the root); also issuing-ca.der,
               which the cards' Authority Information Access extension points at
issuing-ca.key its private key (PKCS#8 PEM, 0600)
state.json     next card serial, CRL number, issued cards (with the RA's copy of each
               card's PUK and management key) and revocations (0600)
crl.der        the current CRL, signed by the issuing CA (also crl.pem); the cards'
               CRL Distribution Points extension names it as a ``file://`` URL
============== ===================================================================

Root: self-signed, ``CA:true, pathlen:1``, keyCertSign + cRLSign, 20 years. Issuing CA:
``CA:true, pathlen:0``, keyCertSign + cRLSign, 10 years. Both are backdated by 30 days, so
that certificates made "in the past" for tests (an expired card) still fall inside their
issuer's validity. The card certificates' profile is in :mod:`simulators.card.issuance`.

Every change to ``state.json`` happens under an exclusive lock on ``.lock`` in the
directory, and the file is replaced atomically.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ..atomicfile import write_private

PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]

STATE_FORMAT = 1
ROOT_CERT = "root-ca.pem"
ROOT_KEY = "root-ca.key"
ISSUING_CERT = "issuing-ca.pem"
ISSUING_CERT_DER = "issuing-ca.der"
ISSUING_KEY = "issuing-ca.key"
STATE = "state.json"
CRL_DER = "crl.der"
CRL_PEM = "crl.pem"
LOCK = ".lock"

DEFAULT_ROOT_NAME = "NHS-style Simulated Root CA"
DEFAULT_ISSUING_NAME = "NHS-style Simulated Issuing CA"
DEFAULT_ORGANISATION = "NHS-style Simulated Organisation"
COUNTRY = "GB"
ALGORITHMS = ("RSA2048", "ECCP256")
ROOT_VALIDITY_DAYS = 20 * 365
ISSUING_VALIDITY_DAYS = 10 * 365
#: CA certificates start this long before they are made (see the module docstring).
CA_BACKDATE = dt.timedelta(days=30)
#: card serial numbers are this many digits (never 12, so never mistaken for a UUID)
CARD_SERIAL_DIGITS = 10
#: ``issuer`` of a card issued by this CA, and of one from a throwaway untrusted CA
ISSUER_THIS_CA = "this-ca"
ISSUER_UNTRUSTED = "untrusted"

#: RFC 5280 CRLReason names (as in the ASN.1) accepted by :func:`revoke`
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}


class PkiError(Exception):
    """The CA directory is missing, corrupt or cannot do what was asked."""


class CaExists(PkiError):
    """``init_ca`` was pointed at a directory that already holds a CA."""


class UnknownCard(PkiError):
    """No card issued by this CA matches the UUID, serial or GUID given."""


class AlreadyRevoked(PkiError):
    """Every certificate asked to be revoked is revoked already."""


# --- paths ---------------------------------------------------------------------------------------


def root_cert_path(directory: str | os.PathLike) -> Path:
    """The root CA certificate (PEM)."""
    return Path(directory) / ROOT_CERT


def issuing_cert_path(directory: str | os.PathLike) -> Path:
    """The issuing CA certificate (PEM): the intermediate a verifier needs beside the root."""
    return Path(directory) / ISSUING_CERT


def crl_path(directory: str | os.PathLike) -> Path:
    """The current CRL (DER), where the cards' CRL Distribution Points point."""
    return Path(directory) / CRL_DER


def crl_pem_path(directory: str | os.PathLike) -> Path:
    """The current CRL, PEM."""
    return Path(directory) / CRL_PEM


def state_path(directory: str | os.PathLike) -> Path:
    """The CA and RA state (JSON, 0600: it holds the cards' administrative credentials)."""
    return Path(directory) / STATE


def trust_anchors(directory: str | os.PathLike) -> Path:
    """The trust anchor of the simulated PKI: the root certificate's path (PEM).

    Checks that the directory holds a CA (:class:`PkiError` otherwise)."""
    _check_directory(Path(directory))
    return root_cert_path(directory)


def crl_url(directory: str | os.PathLike) -> str:
    """The ``file://`` URL of the CA's CRL, as written in the card certificates."""
    return crl_path(Path(directory).resolve()).as_uri()


def issuing_cert_url(directory: str | os.PathLike) -> str:
    """The ``file://`` URL of the issuing CA certificate (DER), for AIA caIssuers."""
    return (Path(directory).resolve() / ISSUING_CERT_DER).as_uri()


# --- the state -----------------------------------------------------------------------------------


def utcnow() -> dt.datetime:
    """Now, UTC, to the second (certificates and CRLs carry seconds)."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


@dataclass
class IssuedCard:
    """The RA's record of one card it issued.

    ``puk`` and ``management_key`` (hex) are the card's administrative credentials: the RA's
    copy, used to unlock a blocked card (:func:`admin_credentials`). They are never shown
    unless asked for (:meth:`public_json`)."""

    card_serial: str
    holder_name: str
    uuid: str
    algorithm: str
    certificate_serials: dict[str, str]  # slot ("9a", "9c") -> certificate serial, hex
    guid: str  # the CHUID GUID, 32 hex digits
    not_before: str  # ISO 8601, UTC (of the 9A certificate)
    not_after: str
    issued_at: str
    variant: str | None
    issuer: str  # ISSUER_THIS_CA or ISSUER_UNTRUSTED
    card_file: str | None
    puk: str
    management_key_algorithm: str
    management_key: str  # hex

    def public_json(self) -> dict:
        """The record without the PUK and management key."""
        data = asdict(self)
        del data["puk"], data["management_key"]
        return data


@dataclass
class Revocation:
    """One revoked certificate."""

    certificate_serial: str  # hex
    card_serial: str
    uuid: str
    slot: str
    revoked_at: str  # ISO 8601, UTC
    reason: str  # a key of REVOCATION_REASONS


@dataclass
class CaState:
    """Everything in ``state.json``."""

    created_at: str
    algorithm: str
    organisation: str
    next_card_serial: int = 1
    crl_number: int = 0
    cards: list[IssuedCard] = field(default_factory=list)
    revoked: list[Revocation] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: object) -> "CaState":
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"not a CA state of format {STATE_FORMAT}")
        return cls(
            created_at=str(data["created_at"]),
            algorithm=str(data["algorithm"]),
            organisation=str(data["organisation"]),
            next_card_serial=int(data["next_card_serial"]),
            crl_number=int(data["crl_number"]),
            cards=[IssuedCard(**card) for card in data["cards"]],
            revoked=[Revocation(**entry) for entry in data["revoked"]],
        )

    def revoked_serials(self) -> set[str]:
        return {entry.certificate_serial for entry in self.revoked}


@dataclass
class CertificateAuthority:
    """A loaded CA: its two certificates and keys, and the RA state.

    ``directory`` is None for a throwaway CA that lives in memory only (the untrusted
    variant of a card)."""

    directory: Path | None
    root_cert: x509.Certificate
    root_key: PrivateKey
    issuing_cert: x509.Certificate
    issuing_key: PrivateKey
    state: CaState

    # -- the RA's records --

    def allocate_card_serial(self) -> str:
        """The next card serial number (10 digits), counted in the state."""
        serial = f"{self.state.next_card_serial:0{CARD_SERIAL_DIGITS}d}"
        self.state.next_card_serial += 1
        return serial

    def record_card(self, card: IssuedCard) -> None:
        self.state.cards.append(card)

    def find_card(self, ident: str) -> IssuedCard:
        """The card with this card serial, CHUID GUID (hex, dashes allowed) or holder UUID.

        A UUID names a person, who may hold several cards: then the card serial is needed."""
        ident = ident.strip()
        by_serial = [c for c in self.state.cards if c.card_serial == ident]
        if by_serial:
            return by_serial[-1]
        guid = ident.replace("-", "").lower()
        by_guid = [c for c in self.state.cards if c.guid == guid]
        if by_guid:
            return by_guid[-1]
        by_uuid = [c for c in self.state.cards if c.uuid == ident]
        if len(by_uuid) == 1:
            return by_uuid[0]
        if by_uuid:
            serials = ", ".join(c.card_serial for c in by_uuid)
            raise PkiError(f"UUID {ident} holds {len(by_uuid)} cards (serials {serials}): "
                           "name the card by its serial")  # fmt: skip
        raise UnknownCard(f"no card with serial, GUID or UUID {ident!r} was issued by the CA "
                          f"in {self.directory}")  # fmt: skip

    def card_status(self, card: IssuedCard, now: dt.datetime | None = None) -> str:
        """"revoked", "expired", "not yet valid", "untrusted" or "valid"."""
        now = now or utcnow()
        if card.issuer != ISSUER_THIS_CA:
            return "untrusted"
        revoked = self.state.revoked_serials()
        if any(serial in revoked for serial in card.certificate_serials.values()):
            return "revoked"
        if dt.datetime.fromisoformat(card.not_after) < now:
            return "expired"
        if dt.datetime.fromisoformat(card.not_before) > now:
            return "not yet valid"
        return "valid"

    # -- certificates --

    def issue_certificate(
        self,
        public_key,
        subject: x509.Name,
        *,
        not_before: dt.datetime,
        not_after: dt.datetime,
        extensions: list[tuple[x509.ExtensionType, bool]],
        crl_distribution_url: str | None,
        ca_issuers_url: str | None,
    ) -> x509.Certificate:
        """An end-entity certificate signed by the issuing CA.

        Adds BasicConstraints CA:false (critical), Subject and Authority Key Identifiers,
        CRL Distribution Points and Authority Information Access (caIssuers) when their URLs
        are given; ``extensions`` are the profile's own (key usage and so on). The validity is
        clamped to the issuing CA's."""
        not_before = max(not_before, self.issuing_cert.not_valid_before_utc)
        not_after = min(not_after, self.issuing_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.issuing_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_aki(self.issuing_cert), critical=False)
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        if crl_distribution_url:
            point = x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(crl_distribution_url)],
                relative_name=None, reasons=None, crl_issuer=None)  # fmt: skip
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        if ca_issuers_url:
            access = x509.AccessDescription(x509.oid.AuthorityInformationAccessOID.CA_ISSUERS,
                                            x509.UniformResourceIdentifier(ca_issuers_url))
            builder = builder.add_extension(x509.AuthorityInformationAccess([access]),
                                            critical=False)  # fmt: skip
        return builder.sign(self.issuing_key, _signature_hash(self.issuing_key))


# --- keys and CA certificates --------------------------------------------------------------------


def generate_key(algorithm: str) -> PrivateKey:
    """A new private key: "RSA2048" (e = 65537) or "ECCP256" (NIST P-256)."""
    if algorithm == "RSA2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "ECCP256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _signature_hash(key: PrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA256()


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, COUNTRY),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])  # fmt: skip


def _ca_certificate(subject: x509.Name, key: PrivateKey, issuer_cert: x509.Certificate | None,
                    issuer_key: PrivateKey, path_length: int, not_before: dt.datetime,
                    days: int) -> x509.Certificate:  # fmt: skip
    public_key = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    aki = (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
           if issuer_cert is None else _aki(issuer_cert))  # fmt: skip
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False)  # fmt: skip
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer_cert is None else issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .sign(issuer_key, _signature_hash(issuer_key))
    )


def make_ca(
    *,
    name: str = DEFAULT_ROOT_NAME,
    issuing_name: str = DEFAULT_ISSUING_NAME,
    organisation: str = DEFAULT_ORGANISATION,
    algorithm: str = "RSA2048",
    directory: Path | None = None,
) -> CertificateAuthority:
    """A new root and issuing CA in memory (nothing is written): what :func:`init_ca` saves,
    and the throwaway CA of an untrusted card."""
    for label, value in (("root CA name", name), ("issuing CA name", issuing_name),
                         ("organisation", organisation)):  # fmt: skip
        if not value or not value.strip():
            raise ValueError(f"the {label} must not be empty")
        if len(value) > 64:
            raise ValueError(f"the {label} is longer than 64 characters")
    now = utcnow()
    root_key = generate_key(algorithm)
    issuing_key = generate_key(algorithm)
    start = now - CA_BACKDATE
    root_cert = _ca_certificate(_ca_name(name, organisation), root_key, None, root_key, 1,
                                start, ROOT_VALIDITY_DAYS)  # fmt: skip
    issuing_cert = _ca_certificate(_ca_name(issuing_name, organisation), issuing_key, root_cert,
                                   root_key, 0, start, ISSUING_VALIDITY_DAYS)  # fmt: skip
    state = CaState(created_at=now.isoformat(), algorithm=algorithm, organisation=organisation)
    return CertificateAuthority(directory, root_cert, root_key, issuing_cert, issuing_key, state)


# --- the directory -------------------------------------------------------------------------------


def _write_public(path: Path, payload: bytes) -> None:
    write_private(path, payload)
    os.chmod(path, 0o644)


def _save_state(directory: Path, state: CaState) -> None:
    payload = json.dumps(state.to_json(), indent=1, sort_keys=True).encode("utf-8") + b"\n"
    write_private(state_path(directory), payload)


def init_ca(
    directory: str | os.PathLike,
    *,
    name: str = DEFAULT_ROOT_NAME,
    issuing_name: str = DEFAULT_ISSUING_NAME,
    organisation: str = DEFAULT_ORGANISATION,
    algorithm: str = "RSA2048",
) -> CertificateAuthority:
    """Create a simulated NHS-style PKI in ``directory``: root and issuing CA, empty state and
    a first (empty) CRL. The directory is created (0700) if needed; one that already holds a
    CA is refused (:class:`CaExists`)."""
    directory = Path(directory)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown key algorithm {algorithm!r} "
                         f"(choose from {', '.join(ALGORITHMS)})")  # fmt: skip
    existing = [n for n in (ROOT_CERT, ROOT_KEY, ISSUING_CERT, ISSUING_KEY, STATE)
                if (directory / n).exists()]  # fmt: skip
    if existing:
        raise CaExists(f"{directory} already holds a CA ({', '.join(existing)}); "
                       "choose another directory")  # fmt: skip
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory} exists and is not a directory")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise PkiError(f"cannot create the CA directory {directory}: {e}") from None
    ca = make_ca(name=name, issuing_name=issuing_name, organisation=organisation,
                 algorithm=algorithm, directory=directory)  # fmt: skip
    pem = serialization.Encoding.PEM
    try:
        with _locked(directory):
            write_private(directory / ROOT_KEY, private_key_pem(ca.root_key))
            write_private(directory / ISSUING_KEY, private_key_pem(ca.issuing_key))
            _write_public(directory / ROOT_CERT, ca.root_cert.public_bytes(pem))
            _write_public(directory / ISSUING_CERT, ca.issuing_cert.public_bytes(pem))
            _write_public(directory / ISSUING_CERT_DER,
                          ca.issuing_cert.public_bytes(serialization.Encoding.DER))
            _write_crl(ca, next_update_days=7, out=None)
            _save_state(directory, ca.state)
    except OSError as e:
        raise PkiError(f"cannot write the CA in {directory}: {e}") from None
    return ca


def _check_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise PkiError(f"no CA directory at {directory} "
                       f"(create one with `token-agent sim ca init --dir {directory}`)")
    missing = [n for n in (ROOT_CERT, ROOT_KEY, ISSUING_CERT, ISSUING_KEY, STATE)
               if not (directory / n).is_file()]  # fmt: skip
    if missing:
        raise PkiError(f"{directory} is not a simulated CA directory "
                       f"(missing {', '.join(missing)})")  # fmt: skip


def load_ca(directory: str | os.PathLike) -> CertificateAuthority:
    """The CA in ``directory`` (:class:`PkiError` if missing or corrupt)."""
    directory = Path(directory)
    _check_directory(directory)
    current = ""
    try:
        current = ROOT_CERT
        root_cert = x509.load_pem_x509_certificate((directory / ROOT_CERT).read_bytes())
        current = ISSUING_CERT
        issuing_cert = x509.load_pem_x509_certificate((directory / ISSUING_CERT).read_bytes())
        current = ROOT_KEY
        root_key = serialization.load_pem_private_key((directory / ROOT_KEY).read_bytes(), None)
        current = ISSUING_KEY
        issuing_key = serialization.load_pem_private_key(
            (directory / ISSUING_KEY).read_bytes(), None)
        current = STATE
        state = CaState.from_json(json.loads((directory / STATE).read_text("utf-8")))
    except OSError as e:
        raise PkiError(f"cannot read {directory / current}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise PkiError(f"{directory / current} is corrupt: {e}") from None
    if not isinstance(root_key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) or not \
            isinstance(issuing_key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):  # fmt: skip
        raise PkiError(f"{directory}: unsupported CA key type")
    if issuing_cert.public_key() != issuing_key.public_key():
        raise PkiError(f"{directory}: {ISSUING_KEY} does not match {ISSUING_CERT}")
    if issuing_cert.issuer != root_cert.subject:
        raise PkiError(f"{directory}: {ISSUING_CERT} was not issued by {ROOT_CERT}")
    return CertificateAuthority(directory, root_cert, root_key, issuing_cert, issuing_key, state)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise PkiError(f"cannot lock the CA directory {directory}: {e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def transaction(directory: str | os.PathLike) -> Iterator[CertificateAuthority]:
    """The CA, loaded under the directory's lock; its state is saved when the block ends
    without an exception (and left as it was otherwise)."""
    directory = Path(directory)
    _check_directory(directory)
    with _locked(directory):
        ca = load_ca(directory)
        yield ca
        try:
            _save_state(directory, ca.state)
        except OSError as e:
            raise PkiError(f"cannot save {state_path(directory)}: {e}") from None


# --- revocation and CRLs -------------------------------------------------------------------------


def revoke(
    directory: str | os.PathLike,
    *,
    uuid: str | None = None,
    serial: str | None = None,
    reason: str = "keyCompromise",
    publish_crl: bool = True,
) -> list[Revocation]:
    """Revoke a card's certificates and (by default) publish a new CRL.

    ``uuid``: every card of that holder still unrevoked; ``serial``: a card serial (both of
    its certificates), or one certificate's serial in hex. Returns what was revoked.
    :class:`UnknownCard` when nothing matches, :class:`AlreadyRevoked` when all of it is
    revoked already, :class:`PkiError` for a card this CA did not issue (untrusted variant).
    """
    if (uuid is None) == (serial is None):
        raise ValueError("give exactly one of uuid and serial")
    if reason not in REVOCATION_REASONS:
        raise ValueError(f"unknown revocation reason {reason!r} "
                         f"(choose from {', '.join(REVOCATION_REASONS)})")  # fmt: skip
    with transaction(directory) as ca:
        targets: list[tuple[IssuedCard, str, str]] = []  # (card, slot, certificate serial)
        if uuid is not None:
            cards = [c for c in ca.state.cards if c.uuid == uuid.strip()]
            what = f"UUID {uuid}"
        else:
            wanted = serial.strip()
            cards = [c for c in ca.state.cards if c.card_serial == wanted]
            what = f"card serial {wanted}"
            if not cards:
                hex_serial = wanted.lower().removeprefix("0x").replace(":", "")
                for card in ca.state.cards:
                    for slot, cert_serial in card.certificate_serials.items():
                        if cert_serial == hex_serial:
                            targets.append((card, slot, cert_serial))
                what = f"serial {wanted}"
        for card in cards:
            targets.extend((card, slot, s) for slot, s in sorted(card.certificate_serials.items()))
        if not targets:
            raise UnknownCard(f"no card with {what} was issued by the CA in {directory}")
        own = [t for t in targets if t[0].issuer == ISSUER_THIS_CA]
        if not own or (serial is not None and len(own) < len(targets)):
            foreign = next(c for c, _, _ in targets if c.issuer != ISSUER_THIS_CA)
            raise PkiError(f"card {foreign.card_serial} was not issued by this CA "
                           "(it is an untrusted-variant card): nothing to revoke")  # fmt: skip
        done = ca.state.revoked_serials()
        todo = [(c, slot, s) for c, slot, s in own if s not in done]
        if not todo:
            raise AlreadyRevoked(f"the certificates of {what} are revoked already")
        now = utcnow().isoformat()
        new = [Revocation(certificate_serial=s, card_serial=c.card_serial, uuid=c.uuid,
                          slot=slot, revoked_at=now, reason=reason)
               for c, slot, s in todo]  # fmt: skip
        ca.state.revoked.extend(new)
        if publish_crl:
            _write_crl(ca, next_update_days=7, out=None)
    return new


def crl(directory: str | os.PathLike, *, next_update_days: int = 7,
        out: str | os.PathLike | None = None) -> Path:  # fmt: skip
    """Publish a new CRL signed by the issuing CA, listing every revoked certificate, with the
    next CRL number. Written as DER to :func:`crl_path` (or ``out``) and as PEM beside it
    (``.pem``). Returns the DER file's path.

    thisUpdate is now and nextUpdate ``next_update_days`` later. Zero or a negative number
    makes a *stale* CRL (for tests): nextUpdate that many days in the past, thisUpdate one day
    before it."""
    with transaction(directory) as ca:
        return _write_crl(ca, next_update_days=next_update_days, out=out)


def _write_crl(ca: CertificateAuthority, *, next_update_days: int,
               out: str | os.PathLike | None) -> Path:  # fmt: skip
    assert ca.directory is not None
    now = utcnow()
    next_update = now + dt.timedelta(days=next_update_days)
    this_update = min(now, next_update - dt.timedelta(days=1))
    ca.state.crl_number += 1
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.issuing_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(ca.state.crl_number), critical=False)
        .add_extension(_aki(ca.issuing_cert), critical=False)
    )
    for entry in ca.state.revoked:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry.certificate_serial, 16))
            .revocation_date(dt.datetime.fromisoformat(entry.revoked_at))
        )
        if entry.reason != "unspecified":  # RFC 5280: omit reasonCode rather than unspecified
            revoked = revoked.add_extension(x509.CRLReason(REVOCATION_REASONS[entry.reason]),
                                            critical=False)  # fmt: skip
        builder = builder.add_revoked_certificate(revoked.build())
    signed = builder.sign(ca.issuing_key, _signature_hash(ca.issuing_key))
    der_path = Path(out) if out is not None else crl_path(ca.directory)
    try:
        _write_public(der_path, signed.public_bytes(serialization.Encoding.DER))
        _write_public(der_path.with_suffix(".pem"),
                      signed.public_bytes(serialization.Encoding.PEM))
    except OSError as e:
        raise PkiError(f"cannot write the CRL {der_path}: {e}") from None
    return der_path


def load_crl(path: str | os.PathLike) -> x509.CertificateRevocationList:
    """A CRL file, DER or PEM (:class:`PkiError` if unreadable)."""
    try:
        data = Path(path).read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except (OSError, ValueError) as e:
        raise PkiError(f"cannot read the CRL {path}: {e}") from None


# --- the sponsor / RA side -----------------------------------------------------------------------

_HEX_MANAGEMENT_KEY = re.compile(r"[0-9a-f]+")


def admin_credentials(directory: str | os.PathLike, uuid_or_serial: str) -> tuple[str, str, bytes]:
    """The RA's copy of a card's administrative credentials, for a sponsor unlock:
    ``(puk, management_key_algorithm, management_key)``.

    The card is named by its serial, its CHUID GUID, or the holder's UUID when the holder has
    only one card (:class:`PkiError` otherwise, :class:`UnknownCard` for no card)."""
    card = load_ca(directory).find_card(uuid_or_serial)
    if not _HEX_MANAGEMENT_KEY.fullmatch(card.management_key):
        raise PkiError(f"{state_path(directory)}: the management key of card "
                       f"{card.card_serial} is corrupt")  # fmt: skip
    return card.puk, card.management_key_algorithm, bytes.fromhex(card.management_key)


def describe_ca(directory: str | os.PathLike, *, admin_secrets: bool = False) -> dict:
    """What ``sim ca show`` prints: the two CA certificates, the current CRL, the issued cards
    (with their status) and the revocations. The cards' PUKs and management keys only with
    ``admin_secrets``."""
    ca = load_ca(directory)
    now = utcnow()

    def cert_info(cert: x509.Certificate) -> dict:
        return {
            "subject": cert.subject.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        }

    crl_info: dict = {"path": str(crl_path(directory))}
    try:
        current = load_crl(crl_path(directory))
    except PkiError as e:
        crl_info["error"] = str(e)
    else:
        number = current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        next_update = current.next_update_utc
        crl_info.update({
            "number": number,
            "this_update": current.last_update_utc.isoformat(),
            "next_update": next_update.isoformat() if next_update else None,
            "stale": next_update is not None and next_update < now,
            "entries": len(current),
        })  # fmt: skip
    cards = []
    for card in ca.state.cards:
        info = asdict(card) if admin_secrets else card.public_json()
        info["status"] = ca.card_status(card, now)
        cards.append(info)
    return {
        "directory": str(Path(directory).resolve()),
        "algorithm": ca.state.algorithm,
        "organisation": ca.state.organisation,
        "created_at": ca.state.created_at,
        "root": cert_info(ca.root_cert),
        "issuing": cert_info(ca.issuing_cert),
        "trust_anchor": str(root_cert_path(directory)),
        "crl": crl_info,
        "next_card_serial": ca.state.next_card_serial,
        "cards": cards,
        "revoked": [asdict(entry) for entry in ca.state.revoked],
    }
