"""Issue a virtual NHS-style smartcard: keys, certificates from the simulated PKI, the PIV data
objects, the PIN, and the RA's records.

Certificate profile (both certificates are signed by the issuing CA with SHA-256):

* subject, the same in both: ``C=GB, O=<the CA's organisation>, OU=People, CN=<holder name>,
  serialNumber=<12-digit UUID>``. The holder's name is the common name exactly as given
  (e.g. "Dr Alice Smith"); the UUID is the X.520 serialNumber attribute (OID 2.5.4.5,
  PrintableString), which is where NHS smartcard certificates carry it. Read it back with
  :func:`certificate_uuid`.
* 9A, PIV Authentication: keyUsage digitalSignature (critical); extendedKeyUsage clientAuth
  and Microsoft smartcardLogon (1.3.6.1.4.1.311.20.2.2).
* 9C, Digital Signature: keyUsage digitalSignature + nonRepudiation (critical), no EKU.
* both: subjectAltName otherName UPN (1.3.6.1.4.1.311.20.2.3) ``<uuid>@sim.nhs.invalid``
  (a smartcard-logon certificate names its user there, and RFC 5280 / the CA/B-style
  profile that ``cryptography.x509.verification``'s ClientVerifier applies wants a SAN),
  basicConstraints CA:false (critical), subject and authority key identifiers, CRL
  Distribution Points = the ``file://`` URL of the CA's ``crl.der``, Authority Information
  Access caIssuers = the ``file://`` URL of ``issuing-ca.der``. Validity from now (less five
  minutes) for ``validity_days`` (730 by default: NHS cards' certificates are renewed every
  2 to 3 years), within the issuing CA's.

PIV data objects (``CardFile.objects``, keyed by tag in lower-case hex; each value is the
*content* of the object's template, i.e. what follows ``53 LL`` in a GET DATA answer; for the
discovery object, whose template is ``7E`` rather than ``53``, what follows ``7E LL``):

* ``5fc107`` CCC: ``F0 15 A0000001 16 FF 02 <14 random bytes>, F1 01 21, F2 01 21, F3 00,
  F4 01 00, F5 01 10, F6 00, F7 00, FA 00, FB 00, FC 00, FD 00, FE 00``.
* ``5fc102`` CHUID: ``30 19 <FASC-N>`` (agency 9999, system 9999, credential number = the
  card serial's last 6 digits, CS 0, ICI 1, person identifier = the 10-digit card serial,
  OC 3, OI 0000, POA 1; 5-bit BCD with odd parity and LRC), ``34 10 <GUID>`` (random per
  card, recorded by the RA), ``35 08 <expiry YYYYMMDD>``, ``3E 00`` (unsigned), ``FE 00``.
* ``7e`` discovery: ``4F 0B A0 00 00 03 08 00 00 10 00 01 00, 5F 2F 02 40 00`` (PIV AID;
  PIN usage policy: the PIV application PIN only).
* ``5fc10c`` key history: ``C1 01 00, C2 01 00, FE 00`` (no retired keys).
* ``5fc105`` (9A) and ``5fc10a`` (9C): ``70 LL <DER certificate> 71 01 00 FE 00``.
* ``5fc109`` printed information: ``01`` name, ``02`` employee affiliation "NHS-style Staff",
  ``04`` expiry ``YYYYMMMDD`` (e.g. ``2028JAN15``), ``05`` card serial, ``06`` issuer
  "NHS-style SimCA", ``07`` "UUID <uuid>", ``FE 00``.

Secrets: the PIN (4-8 digits, 3 tries) is the cardholder's; the PUK (8 random digits, never
shown to the cardholder) and the AES-128 management key are recorded with the RA
(:func:`simulators.card.pki.admin_credentials`).

Test variants: ``expired`` (the certificates ended yesterday), ``expiring`` (they end in
20 days), ``revoked`` (issued, then revoked with reason keyCompromise and the CRL
republished), ``untrusted`` (issued by a throwaway look-alike CA with the same names, not
chained to the trust anchor; the RA still records the card's credentials), ``blocked``
(no PIN tries left).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import uuid as uuid_module
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from . import piv, pki
from .apdu import PROTOCOL_T1, PROTOCOLS, TlvError, parse_tlvs, tlv
from .cardfile import (
    PIN_MAX_RETRIES,
    PROTOCOL_ATRS,
    PUK_MAX_RETRIES,
    CardFile,
    KeySlot,
    Secret,
)

ALGORITHMS = pki.ALGORITHMS
VARIANTS = ("expired", "revoked", "untrusted", "blocked", "expiring")
#: Microsoft smartcard logon EKU
OID_SMARTCARD_LOGON = ObjectIdentifier("1.3.6.1.4.1.311.20.2.2")
#: Microsoft user principal name (an otherName of subjectAltName)
OID_UPN = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
UPN_DOMAIN = "sim.nhs.invalid"
ORGANISATIONAL_UNIT = "People"
#: PIV data object tags (hex, lower case), as keys of ``CardFile.objects``
TAG_CHUID = "5fc102"
TAG_CCC = "5fc107"
TAG_DISCOVERY = "7e"
TAG_KEY_HISTORY = "5fc10c"
TAG_PRINTED_INFO = "5fc109"
CERT_TAGS = {"9a": "5fc105", "9c": "5fc10a"}
EXPIRING_DAYS_LEFT = 20
MAX_NAME_LENGTH = 64  # X.520 ub-common-name

# --- input checks --------------------------------------------------------------------------------


def validate_name(name: str) -> str:
    """The holder's name, stripped: 1 to 64 printable characters."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("the holder's name must not be empty")
    name = name.strip()
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"the holder's name is longer than {MAX_NAME_LENGTH} characters")
    if not name.isprintable():
        raise ValueError("the holder's name contains control characters")
    return name


def validate_uuid(uuid: str) -> str:
    """The NHS user id: exactly 12 digits (0-9)."""
    if not isinstance(uuid, str) or not re.fullmatch(r"[0-9]{12}", uuid):
        got = f"{len(uuid)} characters" if isinstance(uuid, str) else type(uuid).__name__
        if isinstance(uuid, str) and uuid.isascii() and uuid.isdigit():
            got = f"{len(uuid)} digits"
        raise ValueError(f"the UUID must be exactly 12 digits (got {got})")
    return uuid


def validate_pin(pin: str) -> str:
    """The card PIN: 4 to 8 digits (0-9). The PIN itself is never put in the message."""
    if not isinstance(pin, str) or not re.fullmatch(r"[0-9]{4,8}", pin):
        if isinstance(pin, str) and pin.isascii() and pin.isdigit():
            raise ValueError(f"the PIN must be 4 to 8 digits (got {len(pin)} digits)")
        raise ValueError("the PIN must be 4 to 8 digits (0-9 only)")
    return pin


# --- TLV -----------------------------------------------------------------------------------------
# The card's own BER-TLV codec (simulators.card.apdu), so that issuance writes what the card
# reads with the same code.


def parse_tlv(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, value) pairs of a run of BER-TLVs (one level; ValueError if malformed)."""
    try:
        return parse_tlvs(data)
    except TlvError as e:
        raise ValueError(str(e)) from None


# --- PIV objects ---------------------------------------------------------------------------------


def fascn(*, agency: str = "9999", system: str = "9999", credential: str = "999999",
          cs: str = "0", ici: str = "1", person: str = "0000000000", oc: str = "3",
          oi: str = "0000", poa: str = "1") -> bytes:  # fmt: skip
    """A 25-byte FASC-N (TIG SCEPACS): 40 five-bit characters (4 data bits, least significant
    first, and an odd parity bit): SS agency FS system FS credential FS CS FS ICI FS person
    organisation-category organisation POA ES LRC. The defaults give the well-known
    non-federal "all nines" FASC-N."""
    fields = {"agency": (agency, 4), "system": (system, 4), "credential": (credential, 6),
              "cs": (cs, 1), "ici": (ici, 1), "person": (person, 10), "oc": (oc, 1),
              "oi": (oi, 4), "poa": (poa, 1)}  # fmt: skip
    for label, (value, width) in fields.items():
        if not re.fullmatch(rf"[0-9]{{{width}}}", value):
            raise ValueError(f"FASC-N {label} must be {width} digits")

    def char(value: int) -> list[int]:
        bits = [(value >> i) & 1 for i in range(4)]
        return bits + [1 - sum(bits) % 2]

    ss, fs, es = [1, 1, 0, 1, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]
    chars = [ss]
    for value in (agency, system, credential, cs, ici):
        chars += [char(int(d)) for d in value] + [fs]
    chars += [char(int(d)) for d in person + oc + oi + poa] + [es]
    lrc = [0, 0, 0, 0]
    for c in chars:
        lrc = [a ^ b for a, b in zip(lrc, c[:4])]
    chars.append(lrc + [1 - sum(lrc) % 2])
    bits = "".join(str(b) for c in chars for b in c)
    return int(bits, 2).to_bytes(25, "big")


def chuid(*, card_serial: str, guid: bytes, expiry: dt.date) -> bytes:
    """The CHUID's content: FASC-N (from the card serial), GUID, expiration date, empty
    signature, FE."""
    return piv.build_chuid(
        guid, expiry.strftime("%Y%m%d"),
        fascn=fascn(credential=card_serial[-6:], person=card_serial[-10:].zfill(10)),
    )


def ccc(card_id: bytes) -> bytes:
    """The Card Capability Container's content (``card_id``: 14 bytes)."""
    return piv.build_ccc(card_id)


def discovery() -> bytes:
    """The discovery object's content (inside ``7E``): PIV AID and PIN usage policy (PIV
    PIN only)."""
    return piv.build_discovery_object()


def key_history() -> bytes:
    """The key history object's content: no retired keys, with or without certificates."""
    return piv.build_key_history()


def certificate_object(cert_der: bytes) -> bytes:
    """A certificate object's content: certificate, CertInfo 00 (not compressed), FE."""
    return piv.build_certificate_object(cert_der)


def printed_information(*, name: str, uuid: str, card_serial: str, expiry: dt.date) -> bytes:
    """The printed information object's content (what is printed on the card)."""
    months = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
    expires = f"{expiry.year:04d}{months[expiry.month - 1]}{expiry.day:02d}"
    return (tlv(0x01, name.encode("utf-8")[:125]) + tlv(0x02, b"NHS-style Staff")
            + tlv(0x04, expires.encode()) + tlv(0x05, card_serial.encode())
            + tlv(0x06, b"NHS-style SimCA") + tlv(0x07, f"UUID {uuid}".encode())
            + tlv(0xFE, b""))  # fmt: skip


# --- certificates --------------------------------------------------------------------------------


def holder_subject(name: str, uuid: str, organisation: str) -> x509.Name:
    """``C=GB, O=organisation, OU=People, CN=name, serialNumber=uuid``."""
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, pki.COUNTRY),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ORGANISATIONAL_UNIT),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, uuid),
    ])  # fmt: skip


def _key_usage(*, digital_signature: bool = False, non_repudiation: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=non_repudiation,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                         decipher_only=False)  # fmt: skip


def holder_upn(uuid: str) -> str:
    """The user principal name in the certificates' subjectAltName: ``<uuid>@sim.nhs.invalid``."""
    return f"{uuid}@{UPN_DOMAIN}"


def _subject_alt_name(uuid: str) -> x509.SubjectAlternativeName:
    upn = holder_upn(uuid).encode("utf-8")
    if len(upn) >= 0x80:
        raise ValueError("UPN too long")
    utf8_string = bytes([0x0C, len(upn)]) + upn  # DER UTF8String
    return x509.SubjectAlternativeName([x509.OtherName(OID_UPN, utf8_string)])


def _profile(slot: str, uuid: str) -> list[tuple[x509.ExtensionType, bool]]:
    extensions: list[tuple[x509.ExtensionType, bool]] = [(_subject_alt_name(uuid), False)]
    if slot == "9a":
        return extensions + [
            (_key_usage(digital_signature=True), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, OID_SMARTCARD_LOGON]),
             False),
        ]  # fmt: skip
    return extensions + [(_key_usage(digital_signature=True, non_repudiation=True), True)]


def _validity(variant: str | None, validity_days: int,
              now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:  # fmt: skip
    length = dt.timedelta(days=validity_days)
    if variant == "expired":
        not_after = now - dt.timedelta(days=1)
        return not_after - length, not_after
    if variant == "expiring":
        not_after = now + dt.timedelta(days=EXPIRING_DAYS_LEFT)
        return min(now - dt.timedelta(minutes=5), not_after - length), not_after
    start = now - dt.timedelta(minutes=5)
    return start, start + length


# --- issuing a card ------------------------------------------------------------------------------


def issue_card(
    ca_dir: str | os.PathLike,
    *,
    name: str,
    uuid: str,
    pin: str,
    out: str | os.PathLike,
    algorithm: str = "RSA2048",
    variant: str | None = None,
    validity_days: int = 730,
    overwrite: bool = False,
    protocol: str = PROTOCOL_T1,
    piv_enabled: bool = True,
) -> CardFile:
    """Issue a card for ``name`` (UUID ``uuid``) from the CA in ``ca_dir``, save it to ``out``
    (0600) and record it with the RA. Returns the saved :class:`CardFile`. ``protocol`` is the
    transmission protocol the card announces in its ATR and follows: "t1" (the default, as
    PIV cards) or "t0" (the ``61xx`` + GET RESPONSE convention, for clients that must handle
    both). ``piv_enabled`` False: the card refuses SELECT of the PIV application (6A82), as a
    card with only a proprietary applet (reached through its vendor's PKCS#11 module) does.

    ValueError for bad input (name, UUID, PIN, algorithm, variant, validity, protocol),
    FileExistsError when ``out`` exists and ``overwrite`` is false, :class:`pki.PkiError` for
    the CA directory."""
    name = validate_name(name)
    uuid = validate_uuid(uuid)
    pin = validate_pin(pin)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown key algorithm {algorithm!r} "
                         f"(choose from {', '.join(ALGORITHMS)})")  # fmt: skip
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if not isinstance(validity_days, int) or not 1 <= validity_days <= 3650:
        raise ValueError("validity_days must be 1 to 3650")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown transmission protocol {protocol!r} "
                         f"(choose from {', '.join(PROTOCOLS)})")  # fmt: skip
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists already (overwrite it explicitly)")
    if out.exists() and out.is_dir():
        raise FileExistsError(f"{out} is a directory")

    with pki.transaction(ca_dir) as ca:
        card_serial = ca.allocate_card_serial()
        signer = ca
        issuer = pki.ISSUER_THIS_CA
        if variant == "untrusted":
            signer = pki.make_ca(name=ca.root_cert.subject.get_attributes_for_oid(
                                     NameOID.COMMON_NAME)[0].value,
                                 issuing_name=ca.issuing_cert.subject.get_attributes_for_oid(
                                     NameOID.COMMON_NAME)[0].value,
                                 organisation=ca.state.organisation,
                                 algorithm=ca.state.algorithm)  # fmt: skip
            issuer = pki.ISSUER_UNTRUSTED
        now = pki.utcnow()
        not_before, not_after = _validity(variant, validity_days, now)
        subject = holder_subject(name, uuid, ca.state.organisation)
        keys: dict[str, KeySlot] = {}
        certs: dict[str, x509.Certificate] = {}
        for slot in ("9a", "9c"):
            key = pki.generate_key(algorithm)
            keys[slot] = KeySlot(algorithm, pki.private_key_pem(key))
            certs[slot] = signer.issue_certificate(
                key.public_key(), subject, not_before=not_before, not_after=not_after,
                extensions=_profile(slot, uuid), crl_distribution_url=pki.crl_url(ca_dir),
                ca_issuers_url=pki.issuing_cert_url(ca_dir))  # fmt: skip
        expiry = certs["9a"].not_valid_after_utc.date()
        guid = uuid_module.uuid4().bytes
        objects = {
            TAG_CCC: ccc(secrets.token_bytes(14)),
            TAG_CHUID: chuid(card_serial=card_serial, guid=guid, expiry=expiry),
            TAG_DISCOVERY: discovery(),
            TAG_KEY_HISTORY: key_history(),
            TAG_PRINTED_INFO: printed_information(name=name, uuid=uuid, card_serial=card_serial,
                                                  expiry=expiry),  # fmt: skip
        }
        for slot, cert in certs.items():
            objects[CERT_TAGS[slot]] = certificate_object(
                cert.public_bytes(serialization.Encoding.DER))
        puk = f"{secrets.randbelow(10**8):08d}"
        management_key = secrets.token_bytes(16)
        pin_secret = Secret.new(pin, PIN_MAX_RETRIES)
        if variant == "blocked":
            pin_secret.retries_left = 0
        card = CardFile(
            serial=card_serial, holder_name=name, holder_uuid=uuid, pin=pin_secret,
            puk=Secret.new(puk, PUK_MAX_RETRIES), management_key_algorithm="AES128",
            management_key=management_key, keys=keys, objects=objects,
            atr=PROTOCOL_ATRS[protocol], protocol=protocol,
            piv_enabled=bool(piv_enabled))  # fmt: skip
        ca.record_card(pki.IssuedCard(
            card_serial=card_serial, holder_name=name, uuid=uuid, algorithm=algorithm,
            certificate_serials={slot: f"{c.serial_number:x}" for slot, c in certs.items()},
            guid=guid.hex(), not_before=certs["9a"].not_valid_before_utc.isoformat(),
            not_after=certs["9a"].not_valid_after_utc.isoformat(), issued_at=now.isoformat(),
            variant=variant, issuer=issuer, card_file=str(out.resolve()), puk=puk,
            management_key_algorithm="AES128", management_key=management_key.hex()))  # fmt: skip
        card.save(out)
    if variant == "revoked":
        pki.revoke(ca_dir, serial=card_serial, reason="keyCompromise")
    return card


# --- reading a card back -------------------------------------------------------------------------


def card_certificate(card: CardFile, slot: str = "9a") -> x509.Certificate:
    """The certificate in a card's 9A (or 9C) certificate object (ValueError if absent)."""
    tag = CERT_TAGS.get(slot.lower())
    if tag is None:
        raise ValueError(f"no certificate object for slot {slot!r}")
    content = card.objects.get(tag)
    if content is None:
        raise ValueError(f"the card has no certificate in slot {slot}")
    fields = dict(parse_tlv(content))
    if 0x70 not in fields:
        raise ValueError(f"the certificate object of slot {slot} has no certificate (70)")
    return x509.load_der_x509_certificate(fields[0x70])


def certificate_uuid(cert: x509.Certificate) -> str | None:
    """The holder's UUID in a card certificate's subject (serialNumber), or None."""
    values = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    return str(values[0].value) if values else None


def certificate_holder(cert: x509.Certificate) -> str | None:
    """The holder's name in a card certificate's subject (CN), or None."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def card_guid(card: CardFile) -> str | None:
    """The CHUID GUID (32 hex digits), or None."""
    content = card.objects.get(TAG_CHUID)
    if content is None:
        return None
    return dict(parse_tlv(content)).get(0x34, b"").hex() or None


def describe_card(card: CardFile, now: dt.datetime | None = None) -> dict:
    """What may be shown about a card: holder, UUID, serial, GUID, transmission protocol and
    ATR, certificates (subject,
    issuer, serial, validity, key usage), PIN and PUK tries left. Never a PIN, PUK or key."""
    now = now or pki.utcnow()
    certificates = {}
    for slot in CERT_TAGS:
        try:
            cert = card_certificate(card, slot)
        except ValueError as e:
            certificates[slot] = {"error": str(e)}
            continue
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        status = "expired" if end < now else "not yet valid" if start > now else "valid"
        certificates[slot] = {
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "holder_name": certificate_holder(cert),
            "uuid": certificate_uuid(cert),
            "not_before": start.isoformat(),
            "not_after": end.isoformat(),
            "status": status,
            "days_left": (end - now).days,
            "algorithm": card.keys[slot].algorithm if slot in card.keys else None,
        }
    return {
        "serial": card.serial,
        "holder_name": card.holder_name,
        "uuid": card.holder_uuid,
        "guid": card_guid(card),
        "protocol": card.protocol,
        "piv_enabled": card.piv_enabled,
        "atr": card.atr.hex(),
        "certificates": certificates,
        "pin_retries_left": card.pin.retries_left,
        "pin_max_retries": card.pin.max_retries,
        "pin_blocked": card.pin.blocked,
        "puk_retries_left": card.puk.retries_left,
        "objects": sorted(card.objects),
    }
