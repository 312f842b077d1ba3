"""Validate a smartcard's authentication certificate before the card's PIN is asked for.

When a card is inserted, its PIV Authentication (9A) certificate is read and checked here,
*before* any PIN prompt: a card that would be refused anyway must not cost the holder a PIN
try, nor train them to type their PIN into anything that asks. :func:`validate_card_certificate`
is pure (no prompts, no card I/O) and fast (a fraction of a millisecond to a few milliseconds
with a cached CRL). It checks, in this order:

1. the certificate parses (``malformed``);
2. it chains to a configured trust anchor through the configured (or, if allowed, the
   certificate's caIssuers ``file://``) intermediates, with valid signatures, with
   :mod:`cryptography.x509.verification` (``untrusted``). The chain is verified at the current
   time clamped into the certificate's own validity, so that a card from a trusted authority
   that has merely expired is told "expired", while one from anybody else is told "untrusted";
3. its validity dates (``not-yet-valid``, ``expired``);
4. keyUsage digitalSignature and, by default, extendedKeyUsage clientAuth
   (``wrong-key-usage``);
5. the holder: the subject's common name and its serialNumber, the 12-digit NHS-style UUID
   (``no-uuid``, ``malformed``);
6. revocation, against the issuing CA's CRL (``revoked``, ``crl-stale``, ``crl-unavailable``);
7. an expiry warning when the certificate ends within ``expiry_warning_days`` (NHS cards'
   certificates are renewed every 2 to 3 years, with renewal prompts in the last 90 days).

Revocation and the CRL
----------------------
The CRL comes from ``policy.crl_sources`` (file paths, ``file://``, ``http://`` or
``https://`` URLs) or, when none are configured, from the certificate's CRL Distribution
Points. Each source is tried in turn until one gives a usable CRL: parsed (DER or PEM), issued
by the certificate's issuer (same name) and signed by the issuing CA's key, thisUpdate not in
the future. A CRL that fails any of these is treated like an unreachable one (someone able to
replace the CRL could as well delete it), so a CRL signed by another CA never counts.

With ``crl_cache_dir`` set, a fetched CRL is kept there (atomically written, keyed by its
source) and reused without refetching while it is younger than ``crl_max_age`` seconds (by the
wall clock) and not past its nextUpdate (with ``crl_max_age`` None: until its nextUpdate).
When a refetch fails, the cached copy is used, subject to the stale rule below. Note that a
card revoked after its CRL was cached is accepted until the cache is refreshed: bound that
window with ``crl_max_age`` (an hour, say) rather than relying on the CA's nextUpdate alone.

*Fail closed by default.* A CRL past its nextUpdate cannot prove that the card has not been
revoked since, and an unreachable CRL proves nothing at all, so both refuse the card
(``on_stale_crl="refuse"``, ``on_unreachable_crl="refuse"``). Setting either to ``"warn"``
accepts the card with a warning instead: it keeps clinicians working through a CRL outage at
the cost of accepting, during the outage, a card revoked since the last good CRL (a stolen
card, say). A card listed in a stale CRL is refused whatever the setting.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from .atomicfile import write_private

__all__ = [
    "CardCertificateError",
    "CardIdentity",
    "CardTrustPolicy",
    "REASONS",
    "format_date",
    "validate_card_certificate",
]

CrlBehaviour = Literal["refuse", "warn"]
Reason = Literal["not-yet-valid", "expired", "untrusted", "revoked", "crl-stale",
                 "crl-unavailable", "wrong-key-usage", "no-uuid", "malformed"]  # fmt: skip
#: every reason :class:`CardCertificateError` may carry
REASONS: tuple[str, ...] = get_args(Reason)

#: how far in the future a CRL's thisUpdate may be (clock skew between CA and workstation)
CRL_CLOCK_SKEW = dt.timedelta(minutes=5)
#: the largest CRL fetched over http(s) or read from a file
CRL_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT = 3.0
_UUID = re.compile(r"[0-9]{12}")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")  # fmt: skip
_REASON_WORDS = {
    x509.ReasonFlags.unspecified: "no reason given",
    x509.ReasonFlags.key_compromise: "key compromise",
    x509.ReasonFlags.ca_compromise: "CA compromise",
    x509.ReasonFlags.affiliation_changed: "affiliation changed",
    x509.ReasonFlags.superseded: "superseded",
    x509.ReasonFlags.cessation_of_operation: "cessation of operation",
    x509.ReasonFlags.certificate_hold: "certificate on hold",
    x509.ReasonFlags.privilege_withdrawn: "privilege withdrawn",
    x509.ReasonFlags.aa_compromise: "attribute authority compromise",
    x509.ReasonFlags.remove_from_crl: "removed from CRL",
}


class CardCertificateError(Exception):
    """The card's certificate is refused.

    ``reason`` is one of :data:`REASONS` (for programs); ``message`` is for the person at the
    workstation; ``detail`` (possibly empty) is technical, for logs."""

    def __init__(self, reason: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class CardIdentity:
    """Who a validated card certificate names, and what the holder should be told.

    ``holder_name`` is the subject's common name, ``uuid`` the subject's serialNumber (12
    digits), ``issuer`` the issuing CA's name (RFC 4514), ``warnings`` messages for the holder
    (expiring certificate, CRL accepted under a "warn" policy), ``public_key`` the key that must
    verify the card's signature over the login challenge."""

    holder_name: str
    uuid: str
    certificate_serial: int
    not_after: dt.datetime
    issuer: str
    warnings: tuple[str, ...]
    public_key: CertificatePublicKeyTypes = field(repr=False, compare=False)


def _load_certificates(blob: bytes) -> list[x509.Certificate]:
    """Certificates from PEM (one or more) or DER bytes (ValueError if none)."""
    if b"-----BEGIN" in blob:
        return x509.load_pem_x509_certificates(blob)
    return [x509.load_der_x509_certificate(blob)]


@functools.lru_cache(maxsize=32)
def _parsed(blobs: tuple[bytes, ...]) -> tuple[x509.Certificate, ...]:
    certs: list[x509.Certificate] = []
    for blob in blobs:
        certs.extend(_load_certificates(blob))
    return tuple(certs)


@dataclass(frozen=True)
class CardTrustPolicy:
    """What a card certificate must satisfy. Immutable and hashable: build it once.

    * ``anchors``: trust anchors, PEM (one or more certificates each) or DER; at least one.
    * ``intermediates``: CA certificates that may complete a chain (the issuing CA).
    * ``fetch_ca_issuers``: also read the certificate's Authority Information Access caIssuers
      when it is a ``file://`` URL (never a network URL). Off by default.
    * ``crl_sources``: where the CRL is (paths, ``file://``, ``http(s)://``); empty: the
      certificate's CRL Distribution Points.
    * ``crl_cache_dir``: where fetched CRLs are cached (None: no cache, fetch every time).
    * ``crl_max_age``: seconds a cached CRL is reused before refetching (None: until its
      nextUpdate).
    * ``on_stale_crl`` / ``on_unreachable_crl``: "refuse" (default: fail closed) or "warn"
      (accept with a warning); see the module docstring for the trade-off.
    * ``expiry_warning_days``: warn when the certificate ends within this many days.
    * ``require_eku_client_auth``: require extendedKeyUsage clientAuth.
    * ``crl_fetch_timeout``: seconds allowed for an http(s) CRL fetch.

    ValueError when the anchors or intermediates do not parse, or a setting is out of range.
    """

    anchors: tuple[bytes, ...]
    intermediates: tuple[bytes, ...] = ()
    crl_sources: tuple[str, ...] = ()
    crl_cache_dir: Path | None = None
    crl_max_age: float | None = None
    on_stale_crl: CrlBehaviour = "refuse"
    on_unreachable_crl: CrlBehaviour = "refuse"
    expiry_warning_days: int = 90
    require_eku_client_auth: bool = True
    fetch_ca_issuers: bool = False
    crl_fetch_timeout: float = DEFAULT_FETCH_TIMEOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchors", tuple(bytes(a) for a in self.anchors))
        object.__setattr__(self, "intermediates", tuple(bytes(i) for i in self.intermediates))
        object.__setattr__(self, "crl_sources", tuple(str(s) for s in self.crl_sources))
        if self.crl_cache_dir is not None:
            object.__setattr__(self, "crl_cache_dir", Path(self.crl_cache_dir))
        if not self.anchors:
            raise ValueError("a card trust policy needs at least one trust anchor")
        try:
            _parsed(self.anchors)
        except ValueError as e:
            raise ValueError(f"a trust anchor is not a certificate: {e}") from None
        try:
            _parsed(self.intermediates)
        except ValueError as e:
            raise ValueError(f"an intermediate is not a certificate: {e}") from None
        for name in ("on_stale_crl", "on_unreachable_crl"):
            if getattr(self, name) not in ("refuse", "warn"):
                raise ValueError(f"{name} must be 'refuse' or 'warn', not {getattr(self, name)!r}")
        if self.expiry_warning_days < 0:
            raise ValueError("expiry_warning_days must not be negative")
        if self.crl_max_age is not None and self.crl_max_age < 0:
            raise ValueError("crl_max_age must not be negative")
        if self.crl_fetch_timeout <= 0:
            raise ValueError("crl_fetch_timeout must be positive")

    @classmethod
    def from_files(
        cls,
        anchor_paths: Iterable[str | os.PathLike],
        intermediate_paths: Iterable[str | os.PathLike] = (),
        **settings,
    ) -> "CardTrustPolicy":
        """A policy from certificate files (PEM or DER); ``settings`` are the other fields.

        ValueError names a file that cannot be read or does not hold a certificate."""

        def read(paths: Iterable[str | os.PathLike], what: str) -> tuple[bytes, ...]:
            blobs = []
            for path in paths:
                try:
                    blob = Path(path).read_bytes()
                    _load_certificates(blob)
                except OSError as e:
                    raise ValueError(f"cannot read the {what} {path}: {e.strerror or e}") from None
                except ValueError as e:
                    raise ValueError(f"the {what} {path} is not a certificate: {e}") from None
                blobs.append(blob)
            return tuple(blobs)

        if "crl_sources" in settings:
            settings["crl_sources"] = tuple(str(s) for s in settings["crl_sources"])
        return cls(anchors=read(anchor_paths, "trust anchor"),
                   intermediates=read(intermediate_paths, "intermediate certificate"),
                   **settings)  # fmt: skip


# --- messages ------------------------------------------------------------------------------------


def format_date(when: dt.datetime) -> str:
    """A date as people write it in the UK, whatever the locale: "21 November 2026" (UTC)."""
    when = when.astimezone(dt.timezone.utc)
    return f"{when.day} {_MONTHS[when.month - 1]} {when.year}"


def _untrusted(detail: str) -> CardCertificateError:
    return CardCertificateError("untrusted", "Card not issued by a trusted authority", detail)


# --- chain ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _store(anchors: tuple[bytes, ...]) -> Store:
    return Store(list(_parsed(anchors)))


#: the WebPKI end-entity policy without its EKU rule: key usage is checked here instead, so that
#: a certificate for the wrong purpose is told "wrong key usage", not "untrusted"
_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()


@functools.lru_cache(maxsize=64)
def _ca_issuers_file(path: str, mtime_ns: int) -> tuple[x509.Certificate, ...]:
    return tuple(_load_certificates(Path(path).read_bytes()))


def _aia_intermediates(cert: x509.Certificate) -> list[x509.Certificate]:
    """The certificates at the caIssuers ``file://`` URLs of ``cert`` (unreadable ones
    skipped: the chain check then says what is missing)."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    found: list[x509.Certificate] = []
    for access in aia:
        if access.access_method != x509.oid.AuthorityInformationAccessOID.CA_ISSUERS:
            continue
        location = access.access_location
        if not isinstance(location, x509.UniformResourceIdentifier):
            continue
        path = _file_url_path(location.value)
        if path is None:
            continue
        try:
            found.extend(_ca_issuers_file(str(path), path.stat().st_mtime_ns))
        except (OSError, ValueError):
            continue
    return found


def _verify_chain(cert: x509.Certificate, policy: CardTrustPolicy,
                  at: dt.datetime) -> list[x509.Certificate]:  # fmt: skip
    """The verified chain, leaf first (``untrusted`` if there is none at ``at``)."""
    intermediates = list(_parsed(policy.intermediates))
    if policy.fetch_ca_issuers and not any(i.subject == cert.issuer for i in intermediates):
        intermediates.extend(_aia_intermediates(cert))
    verifier = (
        PolicyBuilder()
        .store(_store(policy.anchors))
        .time(at)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        return list(verifier.verify(cert, intermediates).chain)
    except VerificationError as e:
        raise _untrusted(str(e)) from None


# --- key usage and subject -----------------------------------------------------------------------


def _check_key_usage(cert: x509.Certificate, policy: CardTrustPolicy) -> None:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.digital_signature:
        raise CardCertificateError(
            "wrong-key-usage",
            "This card's certificate cannot be used to log in: it does not allow digital "
            "signatures (wrong key usage)",
            "keyUsage digitalSignature missing")  # fmt: skip
    if policy.require_eku_client_auth:
        try:
            purposes = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            purposes = []
        if ExtendedKeyUsageOID.CLIENT_AUTH not in purposes:
            raise CardCertificateError(
                "wrong-key-usage",
                "This card's certificate cannot be used to log in: it is not a client "
                "authentication certificate (wrong key usage)",
                "extendedKeyUsage clientAuth missing; has "
                + (", ".join(p.dotted_string for p in purposes) or "no extendedKeyUsage"))


def _single_attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        return None
    return values[0].value


# --- CRLs ----------------------------------------------------------------------------------------


class _CrlUnusable(Exception):
    """One CRL source gave nothing usable (the message says why)."""


def _file_url_path(url: str) -> Path | None:
    """The local path of a ``file://`` URL, None for any other URL or a remote host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        return None
    return Path(urllib.request.url2pathname(parts.path))


def _fetch(source: str, timeout: float) -> bytes:
    """The bytes at a CRL source (path, file:// or http(s):// URL)."""
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response:  # noqa: S310
                data = response.read(CRL_MAX_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise _CrlUnusable(f"cannot fetch {source}: {getattr(e, 'reason', e)}") from None
    else:
        if scheme == "file":
            path = _file_url_path(source)
            if path is None:
                raise _CrlUnusable(f"cannot fetch {source}: not a local file URL")
        elif len(scheme) > 1:  # a one-letter "scheme" is a Windows drive
            raise _CrlUnusable(f"cannot fetch {source}: unsupported URL scheme {scheme!r}")
        else:
            path = Path(source)
        try:
            with open(path, "rb") as f:
                data = f.read(CRL_MAX_BYTES + 1)
        except OSError as e:
            raise _CrlUnusable(f"cannot read {source}: {e.strerror or e}") from None
    if len(data) > CRL_MAX_BYTES:
        raise _CrlUnusable(f"{source} is larger than {CRL_MAX_BYTES} bytes")
    return data


def fetch_crl(source: str, timeout: float = DEFAULT_FETCH_TIMEOUT) -> bytes:
    """The CRL at ``source`` (path, ``file://`` or ``http(s)://``), checked to parse; what an
    organisation server hands its workstations for offline card logins. ``ValueError``
    saying why it cannot be had."""
    try:
        data = _fetch(source, timeout)
        _parse_crl(data, source)
    except _CrlUnusable as e:
        raise ValueError(str(e)) from None
    return data


def _parse_crl(data: bytes, source: str) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise _CrlUnusable(f"{source} is not a CRL: {e}") from None


def _check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, source: str,
               now: dt.datetime) -> None:  # fmt: skip
    """That ``crl`` is the issuing CA's own (name and signature) and already in force."""
    if crl.issuer != issuer.subject:
        raise _CrlUnusable(f"{source} is the CRL of {crl.issuer.rfc4514_string()}, "
                           f"not of the card's issuer {issuer.subject.rfc4514_string()}")
    try:
        valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise _CrlUnusable(f"{source} is not signed by the card's issuing CA")
    if crl.last_update_utc > now + CRL_CLOCK_SKEW:
        raise _CrlUnusable(f"{source} is not in force yet (thisUpdate "
                           f"{crl.last_update_utc.isoformat()})")  # fmt: skip


def _is_stale(crl: x509.CertificateRevocationList, now: dt.datetime) -> bool:
    """Past its nextUpdate (or without one: then it cannot say how long it holds)."""
    next_update = crl.next_update_utc
    return next_update is None or next_update < now


def _cache_path(cache_dir: Path, source: str) -> Path:
    return cache_dir / (hashlib.sha256(source.encode("utf-8")).hexdigest()[:32] + ".crl")


@functools.lru_cache(maxsize=64)
def _cached_crl(path: str, mtime_ns: int, size: int) -> x509.CertificateRevocationList:
    """A cache file's CRL, parsed once per version of the file."""
    return x509.load_der_x509_crl(Path(path).read_bytes())


def _read_cache(cache_dir: Path,
                source: str) -> tuple[x509.CertificateRevocationList, float] | None:  # fmt: skip
    """The cached CRL of ``source`` and when it was fetched (epoch seconds), or None."""
    path = _cache_path(cache_dir, source)
    try:
        st = path.stat()
        return _cached_crl(str(path), st.st_mtime_ns, st.st_size), st.st_mtime
    except (OSError, ValueError):
        return None


def _write_cache(cache_dir: Path, source: str, crl: x509.CertificateRevocationList) -> None:
    """Store a CRL (DER) atomically; a cache that cannot be written is no reason to refuse."""
    path = _cache_path(cache_dir, source)
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, crl.public_bytes(serialization.Encoding.DER))
    except OSError:
        return


def _crl_from_source(source: str, issuer: x509.Certificate, policy: CardTrustPolicy,
                     now: dt.datetime) -> x509.CertificateRevocationList:  # fmt: skip
    """A checked CRL from one source: the cache while it is fresh, else a fetch, else the
    (stale) cache. :class:`_CrlUnusable` when there is none."""
    cached = None
    if policy.crl_cache_dir is not None:
        cached = _read_cache(policy.crl_cache_dir, source)
        if cached is not None:
            crl, fetched_at = cached
            try:
                _check_crl(crl, issuer, source, now)
            except _CrlUnusable:
                cached = None
            else:
                young = policy.crl_max_age is None or time.time() - fetched_at <= policy.crl_max_age
                if young and not _is_stale(crl, now):
                    return crl
    try:
        crl = _parse_crl(_fetch(source, policy.crl_fetch_timeout), source)
        _check_crl(crl, issuer, source, now)
    except _CrlUnusable:
        if cached is not None:
            return cached[0]  # the caller applies the stale rule
        raise
    if policy.crl_cache_dir is not None:
        _write_cache(policy.crl_cache_dir, source, crl)
    return crl


def _distribution_points(cert: x509.Certificate) -> list[str]:
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    return [name.value for point in points for name in (point.full_name or ())
            if isinstance(name, x509.UniformResourceIdentifier)]  # fmt: skip


def _check_revocation(cert: x509.Certificate, issuer: x509.Certificate, policy: CardTrustPolicy,
                      now: dt.datetime, warnings: list[str]) -> None:  # fmt: skip
    sources = list(policy.crl_sources) or _distribution_points(cert)
    problems: list[str] = []
    crl = None
    for source in sources:
        try:
            crl = _crl_from_source(source, issuer, policy, now)
            break
        except _CrlUnusable as e:
            problems.append(str(e))
    if crl is None:
        detail = "; ".join(problems) or \
            "no CRL source configured and the certificate names no CRL distribution point"
        if policy.on_unreachable_crl == "warn":
            warnings.append("The card's revocation status could not be checked (the "
                            "certificate revocation list is unavailable)")  # fmt: skip
            return
        raise CardCertificateError(
            "crl-unavailable",
            "Cannot check whether this card has been revoked: the certificate revocation list "
            "is unavailable", detail)  # fmt: skip

    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is not None:
        try:
            flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            flag = x509.ReasonFlags.unspecified
        raise CardCertificateError(
            "revoked",
            f"This card has been revoked (on {format_date(entry.revocation_date_utc)}, "
            f"{_REASON_WORDS.get(flag, flag.value)})",
            f"serial {cert.serial_number:x} listed in the CRL of "
            f"{crl.issuer.rfc4514_string()}")  # fmt: skip

    if _is_stale(crl, now):
        due = crl.next_update_utc
        when = f"was due on {format_date(due)}" if due else "is not announced"
        if policy.on_stale_crl == "warn":
            warnings.append(f"The card's revocation status may be out of date (the certificate "
                            f"revocation list's next update {when})")  # fmt: skip
            return
        raise CardCertificateError(
            "crl-stale",
            f"Cannot check whether this card has been revoked: the certificate revocation list "
            f"is out of date (its next update {when})",
            f"CRL thisUpdate {crl.last_update_utc.isoformat()}, nextUpdate "
            f"{due.isoformat() if due else 'absent'}")  # fmt: skip


# --- the check -----------------------------------------------------------------------------------


def validate_card_certificate(cert_der: bytes, policy: CardTrustPolicy, *,
                              now: dt.datetime | None = None) -> CardIdentity:  # fmt: skip
    """Validate a card's authentication certificate (DER) against ``policy`` at ``now``
    (default: the current time; a naive datetime is taken as UTC).

    Returns the holder's :class:`CardIdentity`; raises :class:`CardCertificateError` with the
    reason and a message for the holder. Call it before asking for the card's PIN."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    try:
        cert = x509.load_der_x509_certificate(bytes(cert_der))
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
        public_key = cert.public_key()
    except (ValueError, TypeError) as e:
        raise CardCertificateError(
            "malformed", "The card's certificate cannot be read: it is damaged or not a "
            "certificate", str(e)) from None  # fmt: skip

    # the chain, at now clamped into the certificate's validity (see the module docstring)
    chain = _verify_chain(cert, policy, min(max(now, not_before), not_after))
    if now < not_before:
        raise CardCertificateError(
            "not-yet-valid",
            f"Certificate not valid until {format_date(not_before)}: check this computer's "
            "date and time", f"notBefore {not_before.isoformat()}")  # fmt: skip
    if now > not_after:
        raise CardCertificateError(
            "expired",
            f"Certificate expired on {format_date(not_after)}: the card must be renewed in "
            "person by a registration authority", f"notAfter {not_after.isoformat()}")  # fmt: skip
    _check_key_usage(cert, policy)

    holder = _single_attribute(cert, NameOID.COMMON_NAME)
    uuid = _single_attribute(cert, NameOID.SERIAL_NUMBER)
    if uuid is None or not _UUID.fullmatch(uuid):
        raise CardCertificateError(
            "no-uuid", "This card's certificate does not carry a valid user ID (UUID)",
            f"subject serialNumber {uuid!r}, expected 12 digits")  # fmt: skip
    if not holder or not holder.strip():
        raise CardCertificateError(
            "malformed", "This card's certificate does not name its holder",
            "subject has no single commonName")  # fmt: skip

    warnings: list[str] = []
    _check_revocation(cert, chain[1] if len(chain) > 1 else chain[0], policy, now, warnings)

    left = not_after - now
    if left <= dt.timedelta(days=policy.expiry_warning_days):
        days = -(-left // dt.timedelta(days=1))  # whole days, rounded up
        within = "within a day" if days <= 1 else f"in {days} days"
        warnings.insert(0, f"Your card's certificate expires on {format_date(not_after)} "
                           f"({within}): ask your registration authority to renew it")  # fmt: skip
    return CardIdentity(
        holder_name=holder.strip(),
        uuid=uuid,
        certificate_serial=cert.serial_number,
        not_after=not_after,
        issuer=cert.issuer.rfc4514_string(),
        warnings=tuple(warnings),
        public_key=public_key,
    )
