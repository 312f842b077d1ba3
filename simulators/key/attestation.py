"""Simulator models and their packed-attestation certificate chains.

Every model of virtual key has a fixed AAGUID and an attestation certificate issued by the
token-agent simulator attestation root. The keys and certificates ship with the package
(``simulators/key/data/``): they are test material, published on purpose, and identify a key
as *simulated*. A relying party must never trust the simulator root in production; the agent
lets an administrator add it explicitly for test deployments.

``python -m simulators.key.attestation --regenerate`` makes a new chain (the AAGUIDs stay).
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

DATA_DIR = Path(__file__).parent / "data"
ROOT_CERT = DATA_DIR / "attestation-root.pem"
#: id-fido-gen-ce-aaguid: the AAGUID extension of a FIDO attestation certificate.
OID_FIDO_AAGUID = ObjectIdentifier("1.3.6.1.4.1.45724.1.1.4")


@dataclass(frozen=True)
class Model:
    """A model of virtual key: what getInfo and the attestation say it is."""

    name: str
    aaguid: uuid.UUID
    firmware_version: int
    product: str  # USB product string


MODELS: dict[str, Model] = {
    "ta-vk1": Model(
        name="ta-vk1",
        aaguid=uuid.UUID("5a1e7c2e-8f0b-4c6a-9d1e-70ce7a6e0001"),
        firmware_version=0x0100,
        product="token-agent Virtual Key VK1",
    ),
}
DEFAULT_MODEL = "ta-vk1"


@dataclass(frozen=True)
class AttestationIdentity:
    """The attestation key and the certificate chain (leaf first, root excluded)."""

    private_key: ec.EllipticCurvePrivateKey
    chain: tuple[bytes, ...]  # DER certificates: [leaf] (the root is the trust anchor)


def _files(model: str) -> tuple[Path, Path]:
    return DATA_DIR / f"attestation-{model}-key.pem", DATA_DIR / f"attestation-{model}.pem"


@lru_cache(maxsize=None)
def load_identity(model: str = DEFAULT_MODEL) -> AttestationIdentity:
    if model not in MODELS:
        raise ValueError(f"unknown simulator model {model!r} (known: {', '.join(MODELS)})")
    key_file, cert_file = _files(model)
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return AttestationIdentity(key, (cert.public_bytes(serialization.Encoding.DER),))


def root_certificate() -> x509.Certificate:
    """The simulator attestation root: add it to a trust list only on test deployments."""
    return x509.load_pem_x509_certificate(ROOT_CERT.read_bytes())


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "token-agent simulators"),
    ]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def regenerate() -> None:
    """Write a new attestation root and one attestation certificate per model."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = _name("token-agent Simulator Attestation Root (TEST ONLY)")
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * 30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    ROOT_CERT.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    for model in MODELS.values():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            # Packed attestation requires OU "Authenticator Attestation" (WebAuthn 8.2.1).
            .subject_name(_name(f"{model.product} Attestation", "Authenticator Attestation"))
            .issuer_name(root_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365 * 25))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.UnrecognizedExtension(OID_FIDO_AAGUID, b"\x04\x10" + model.aaguid.bytes),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
            )
            .sign(root_key, hashes.SHA256())
        )
        key_file, cert_file = _files(model.name)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    load_identity.cache_clear()


if __name__ == "__main__":  # pragma: no cover - maintenance tool
    import sys

    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python -m simulators.key.attestation --regenerate")
    regenerate()
    print(f"wrote a new simulator attestation chain under {DATA_DIR}")
