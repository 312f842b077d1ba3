"""Organisation settings kept in the store: setting them, and the trust lists of key models.
Each setting is declared once, with its type, default, validation and description, in
``orgsettings.py`` (the schema): this module, the card settings (``ceremonies/card.py``), the
key ceremonies and the agent read it.

With no attestation roots and no AAGUIDs every key model is accepted (and recorded as such).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from . import orgsettings

if TYPE_CHECKING:
    from .store import Store

#: what ``token-agent settings set`` takes: the key settings (the card ones have ``card
#: settings set``, the trust lists ``trust ...``), with their descriptions
SETTABLE = {name: orgsettings.get(name).description for name in orgsettings.SETTABLE
            if name not in orgsettings.CARD}


def set_setting(store: Store, key: str, value: str) -> str:
    """Validate and store one setting; returns the stored value."""
    if key not in SETTABLE:
        raise ValueError(f"unknown setting {key!r} (settable: {', '.join(SETTABLE)})")
    value = orgsettings.check(key, value)
    store.set_setting(key, value)
    return value


def _list(store: Store, key: str) -> list:
    return orgsettings.in_force(store.list_settings(), (key,))[key]


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
    roots = _list(store, "attestation_roots")
    if pem not in roots:
        roots.append(pem)
        store.set_setting("attestation_roots", roots)
    return cert.fingerprint(hashes.SHA256()).hex()


def remove_trusted_root(store: Store, fingerprint: str) -> None:
    roots = _list(store, "attestation_roots")
    kept = [p for p in roots if _fingerprint(p) != fingerprint.lower()]
    if len(kept) == len(roots):
        raise KeyError(f"no trusted root with fingerprint {fingerprint}")
    store.set_setting("attestation_roots", kept)


def add_allowed_aaguid(store: Store, aaguid: str) -> str:
    value = str(uuid.UUID(aaguid))  # ValueError if malformed
    allowed = _list(store, "allowed_aaguids")
    if value not in allowed:
        allowed.append(value)
        store.set_setting("allowed_aaguids", allowed)
    return value


def remove_allowed_aaguid(store: Store, aaguid: str) -> None:
    value = str(uuid.UUID(aaguid))
    allowed = _list(store, "allowed_aaguids")
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
    for pem in _list(store, "attestation_roots"):
        cert = x509.load_pem_x509_certificate(pem.encode())
        roots.append({"subject": cert.subject.rfc4514_string(),
                      "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
                      "not_after": cert.not_valid_after_utc.isoformat()})
    return {"attestation_roots": roots,
            "allowed_aaguids": _list(store, "allowed_aaguids")}


def show(store: Store) -> dict:
    from .ceremonies.key import KeySettings

    s = KeySettings.from_store(store)
    return {"rp_id": s.rp_id, "rp_name": s.rp_name, "user_verification": s.user_verification,
            "attestation_enforced": s.attestation.enforced, **trust_list(store)}
