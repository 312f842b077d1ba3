"""Organisation settings kept in the store, with their validation.

| key | meaning | default |
| --- | --- | --- |
| rp_id | the WebAuthn relying party ID: one per organisation, so every workstation sharing the store accepts the same keys | token-agent.local |
| rp_name | the relying party's name, shown by some keys | token-agent |
| user_verification | whether key logins must verify the user's PIN: required, preferred, discouraged | preferred |
| attestation_roots | PEM certificates a key's attestation must chain to (`trust add-root`) | none |
| allowed_aaguids | key models accepted without a chain to a root (`trust add-aaguid`) | none |

With no attestation roots and no AAGUIDs every key model is accepted (and recorded as such).
"""

from __future__ import annotations

import re
import uuid


from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Store

SETTABLE = {
    "rp_id": "the relying party ID (a domain name, e.g. trust.nhs.uk)",
    "rp_name": "the relying party's display name",
    "user_verification": "required | preferred | discouraged",
}
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def set_setting(store: Store, key: str, value: str) -> str:
    """Validate and store one setting; returns the stored value."""
    if key not in SETTABLE:
        raise ValueError(f"unknown setting {key!r} (settable: {', '.join(SETTABLE)})")
    if key == "rp_id":
        value = value.strip().lower()
        if not _DOMAIN.match(value) or "." not in value and value != "localhost":
            raise ValueError(f"{value!r} is not a domain name usable as a relying party ID")
    elif key == "user_verification" and value not in ("required", "preferred", "discouraged"):
        raise ValueError("user_verification must be required, preferred or discouraged")
    elif key == "rp_name" and not value.strip():
        raise ValueError("rp_name must not be empty")
    store.set_setting(key, value)
    return value


def add_trusted_root(store: Store, pem_or_der: bytes) -> str:
    """Add an attestation root certificate; returns its SHA-256 fingerprint (hex)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    try:
        cert = x509.load_pem_x509_certificate(pem_or_der)
    except ValueError:
        try:
            cert = x509.load_der_x509_certificate(pem_or_der)
        except ValueError:
            raise ValueError("not an X.509 certificate (PEM or DER)") from None
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    roots = list(store.get_setting("attestation_roots", []))
    if pem not in roots:
        roots.append(pem)
        store.set_setting("attestation_roots", roots)
    return cert.fingerprint(hashes.SHA256()).hex()


def remove_trusted_root(store: Store, fingerprint: str) -> None:
    roots = list(store.get_setting("attestation_roots", []))
    kept = [p for p in roots if _fingerprint(p) != fingerprint.lower()]
    if len(kept) == len(roots):
        raise KeyError(f"no trusted root with fingerprint {fingerprint}")
    store.set_setting("attestation_roots", kept)


def add_allowed_aaguid(store: Store, aaguid: str) -> str:
    value = str(uuid.UUID(aaguid))  # ValueError if malformed
    allowed = list(store.get_setting("allowed_aaguids", []))
    if value not in allowed:
        allowed.append(value)
        store.set_setting("allowed_aaguids", allowed)
    return value


def remove_allowed_aaguid(store: Store, aaguid: str) -> None:
    value = str(uuid.UUID(aaguid))
    allowed = list(store.get_setting("allowed_aaguids", []))
    if value not in allowed:
        raise KeyError(f"AAGUID {value} is not on the list")
    store.set_setting("allowed_aaguids", [a for a in allowed if a != value])


def _fingerprint(pem: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(pem.encode()).fingerprint(hashes.SHA256()).hex()


def trust_list(store: Store) -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    roots = []
    for pem in store.get_setting("attestation_roots", []):
        cert = x509.load_pem_x509_certificate(pem.encode())
        roots.append({"subject": cert.subject.rfc4514_string(),
                      "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
                      "not_after": cert.not_valid_after_utc.isoformat()})
    return {"attestation_roots": roots,
            "allowed_aaguids": list(store.get_setting("allowed_aaguids", []))}


def show(store: Store) -> dict:
    from .ceremonies.key import KeySettings

    s = KeySettings.from_store(store)
    return {"rp_id": s.rp_id, "rp_name": s.rp_name, "user_verification": s.user_verification,
            "attestation_enforced": s.attestation.enforced, **trust_list(store)}
