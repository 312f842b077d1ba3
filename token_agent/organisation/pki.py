"""The organisation's certificates: the workstation CA, the server's TLS certificate, the
workstations' keys, CSRs and certificates (``cryptography``; no ASGI, no store).

* ``make_ca(name)`` -> (key, cert): EC P-256, 10 years, ``basicConstraints CA:TRUE,
  pathlen 0``, ``keyCertSign`` and ``cRLSign``;
* ``issue_server_cert(ca_key, ca_cert, hostnames)``: the server's TLS certificate (SANs: DNS
  names and IP addresses), ``serverAuth``, 2 years;
* ``make_key()`` / ``make_csr(key, name)``: a workstation's EC P-256 key and its CSR;
* ``issue_workstation_cert(ca_key, ca_cert, csr, name)``: checks the CSR (signature, key type:
  EC P-256 or RSA >= 2048 only) and issues ``CN=name`` (the name the server took from the
  join token, never the CSR's subject), ``clientAuth``, 2 years;
* ``fingerprint(cert)``: SHA-256 of the DER, hex (how the server finds a workstation);
  ``ca_hash(cert)``: the same for the CA, the second half of a join token.

Private keys are written 0600 and atomically (``write_key``); PEM text in and out.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..atomicfile import write_private

CA_YEARS = 10
SERVER_CERT_DAYS = 730
WORKSTATION_CERT_DAYS = 730
MIN_RSA_BITS = 2048
DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class PkiError(ValueError):
    """A key, certificate or CSR that cannot be used; the message says why."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _serial() -> int:
    return x509.random_serial_number()


def make_key() -> ec.EllipticCurvePrivateKey:
    """A new EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_key(path: str | os.PathLike[str], key: PrivateKey, *, exclusive: bool = False) -> Path:
    """Write a private key, PEM, mode 0600, atomically."""
    return write_private(path, key_pem(key), exclusive=exclusive)


def write_cert(path: str | os.PathLike[str], cert: x509.Certificate | bytes) -> Path:
    """Write a certificate (PEM; public, but written the same careful way, 0644)."""
    data = cert if isinstance(cert, bytes) else cert_pem(cert)
    target = write_private(path, data)
    os.chmod(target, 0o644)
    return target


def load_cert(data: bytes | str) -> x509.Certificate:
    """The first certificate of PEM text (``PkiError`` when there is none)."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError as e:
        raise PkiError(f"not a PEM certificate ({e})") from None


def read_cert(path: str | os.PathLike[str]) -> x509.Certificate:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise PkiError(f"cannot read the certificate {path}: {e.strerror or e}") from None
    try:
        return load_cert(raw)
    except PkiError as e:
        raise PkiError(f"{path}: {e}") from None


def read_key(path: str | os.PathLike[str]) -> PrivateKey:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise PkiError(f"cannot read the private key {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"{path}: not an unencrypted PEM private key ({e})") from None
    check_key_type(key.public_key(), what=str(path))
    return key  # type: ignore[return-value]


def check_key_type(public_key, *, what: str = "the key") -> None:
    """``PkiError`` unless EC P-256 or RSA of at least 2048 bits."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise PkiError(f"{what}: an EC key on {public_key.curve.name}; only P-256 "
                           "(secp256r1) is accepted")
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise PkiError(f"{what}: an RSA key of {public_key.key_size} bits; at least "
                           f"{MIN_RSA_BITS} are needed")
        return
    raise PkiError(f"{what}: a {type(public_key).__name__.removesuffix('PublicKey')} key; "
                   "only EC P-256 or RSA of at least 2048 bits is accepted")


def fingerprint(cert: x509.Certificate | bytes | str) -> str:
    """SHA-256 of the certificate's DER, lower-case hex."""
    if not isinstance(cert, x509.Certificate):
        cert = load_cert(cert)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


#: the CA's hash in a join token is its certificate's fingerprint
ca_hash = fingerprint


def _name(common_name: str, organisation: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organisation:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    return x509.Name(attrs)


def _sign(ca_key: PrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA256()


def make_ca(name: str = "token-agent workstation CA", *, years: int = CA_YEARS
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed workstation CA: EC P-256, valid ``years``."""
    key = make_key()
    now = _now()
    subject = _name(name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(_serial())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=365 * years + years // 4))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def check_ca(cert: x509.Certificate, key: PrivateKey | None = None, *, what: str = "the CA"
             ) -> None:
    """``PkiError`` unless ``cert`` is a CA certificate in its validity (and ``key`` its
    private key)."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PkiError(f"{what} is not a CA certificate (basicConstraints CA:TRUE missing)")
    check_key_type(cert.public_key(), what=what)
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError(f"{what} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} "
                       f"to {cert.not_valid_after_utc:%Y-%m-%d})")
    if key is not None and not _same_key(key, cert):
        raise PkiError(f"{what}'s private key does not belong to its certificate")


def _same_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]


def _san(hostnames: list[str] | tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not h or any(c.isspace() for c in h) or "/" in h:
                raise PkiError(f"{h!r} is neither a host name nor an IP address") from None
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _leaf(ca_key: PrivateKey, ca_cert: x509.Certificate, name: str, public_key, *,
          days: int, usage, key_agreement: bool, san=None) -> x509.Certificate:
    """An end-entity certificate ``CN=name`` issued by the CA: valid from five minutes ago
    (clocks differ) for ``days`` but never past the CA, for one extended key usage (a
    server's or a workstation's), with no extension taken from a request."""
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(_name(name)).issuer_name(ca_cert.subject)
               .public_key(public_key).serial_number(_serial())
               .not_valid_before(now - _dt.timedelta(minutes=5))
               .not_valid_after(min(now + _dt.timedelta(days=days),
                                    ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=key_agreement, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.add_extension(_aki(ca_cert), critical=False).sign(ca_key, hashes.SHA256())


def issue_server_cert(ca_key: PrivateKey, ca_cert: x509.Certificate,
                      hostnames: list[str] | tuple[str, ...] = DEFAULT_HOSTNAMES, *,
                      days: int = SERVER_CERT_DAYS
                      ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and TLS server certificate for ``hostnames`` (DNS names or IP addresses),
    issued by the CA."""
    if not hostnames:
        raise PkiError("the server's certificate needs at least one host name or address")
    key = make_key()
    cert = _leaf(ca_key, ca_cert, hostnames[0], key.public_key(), days=days,
                 usage=ExtendedKeyUsageOID.SERVER_AUTH, key_agreement=True,
                 san=_san(hostnames))
    return key, cert


def make_csr(key: PrivateKey, name: str) -> x509.CertificateSigningRequest:
    """A CSR for a workstation (the subject is a hint only: the server sets the name)."""
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(_name(name))
            .sign(key, hashes.SHA256()))


def csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


#: the longest CSR accepted (PEM characters); an RSA-4096 CSR is about 1,700
MAX_CSR_CHARS = 8192


def load_csr(text: str) -> x509.CertificateSigningRequest:
    """A CSR from PEM text, checked: its signature (proof of possession of the key) and its
    key type (EC P-256 or RSA >= 2048 bits). ``PkiError`` otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise PkiError("the CSR is missing")
    if len(text) > MAX_CSR_CHARS:
        raise PkiError(f"the CSR is too long (more than {MAX_CSR_CHARS} characters)")
    try:
        csr = x509.load_pem_x509_csr(text.encode("ascii", "strict"))
    except (ValueError, UnicodeEncodeError) as e:
        raise PkiError(f"not a PEM certificate signing request ({e})") from None
    check_key_type(csr.public_key(), what="the CSR's key")
    try:
        ok = csr.is_signature_valid
    except (InvalidSignature, ValueError, TypeError):
        ok = False
    if not ok:
        raise PkiError("the CSR's signature does not verify with its own key")
    return csr


def issue_workstation_cert(ca_key: PrivateKey, ca_cert: x509.Certificate,
                           csr: x509.CertificateSigningRequest, name: str, *,
                           days: int = WORKSTATION_CERT_DAYS) -> x509.Certificate:
    """A client certificate ``CN=name`` for the CSR's key (checked by ``load_csr``). The
    subject is ``name``, whatever the CSR asked for; no extension of the CSR is copied."""
    check_key_type(csr.public_key(), what="the CSR's key")
    return _leaf(ca_key, ca_cert, name, csr.public_key(), days=days,
                 usage=ExtendedKeyUsageOID.CLIENT_AUTH, key_agreement=False)


def common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``cert``'s signature verifies with the CA's key (and names it as issuer)."""
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def check_key_matches(key: PrivateKey, cert: x509.Certificate, *, what: str) -> None:
    if not _same_key(key, cert):
        raise PkiError(f"{what}: the private key does not belong to the certificate")
