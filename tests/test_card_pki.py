"""The simulated NHS-style PKI (simulators.card.pki), card issuance (simulators.card.issuance)
and their commands (`token-agent sim ca ...`, `token-agent sim card issue|show`)."""

from __future__ import annotations

import datetime as dt
import json
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from simulators.card import issuance, pki
from simulators.card.apdu import PROTOCOLS
from simulators.card.cardfile import CardFile
from token_agent import exitcodes
from token_agent.cli import main
from token_agent.cli import sim_card as sim_card_cli

NAME = "Dr Alice Smith"
UUID = "555123456789"
PIN = "1234"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def verify_chain(ca_dir: Path, cert: x509.Certificate, at: dt.datetime | None = None):
    """Validate root -> issuing -> card certificate with cryptography's client verifier."""
    ca = pki.load_ca(ca_dir)
    builder = PolicyBuilder().store(Store([ca.root_cert]))
    if at is not None:
        builder = builder.time(at)
    return builder.build_client_verifier().verify(cert, [ca.issuing_cert])


def issue(ca_dir: Path, out: Path, **kwargs) -> CardFile:
    args = {"name": NAME, "uuid": UUID, "pin": PIN, "algorithm": "ECCP256"} | kwargs
    return issuance.issue_card(ca_dir, out=out, **args)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    """A CA with RSA keys (as NHS cards' PKI), shared by the read-only tests."""
    directory = tmp_path_factory.mktemp("pki") / "ca"
    pki.init_ca(directory)
    return directory


@pytest.fixture(scope="module")
def cards(ca_dir, tmp_path_factory) -> dict[str, CardFile]:
    """One card of each algorithm and of each variant, from ``ca_dir``."""
    out = tmp_path_factory.mktemp("cards")
    issued = {
        "RSA2048": issue(ca_dir, out / "rsa.card", algorithm="RSA2048"),
        "ECCP256": issue(ca_dir, out / "ec.card", name="Dr Bob Jones", uuid="555000000001"),
    }
    for variant in issuance.VARIANTS:
        issued[variant] = issue(ca_dir, out / f"{variant}.card", uuid="555000000002",
                                variant=variant)  # fmt: skip
    return issued


# --- the CA --------------------------------------------------------------------------------------


def test_init_ca_layout_and_certificates(ca_dir):
    assert mode(ca_dir) == 0o700
    for name in (pki.ROOT_KEY, pki.ISSUING_KEY, pki.STATE):
        assert mode(ca_dir / name) == 0o600, name
    ca = pki.load_ca(ca_dir)
    assert pki.trust_anchors(ca_dir) == ca_dir / "root-ca.pem"
    root, issuing = ca.root_cert, ca.issuing_cert
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "NHS-style Simulated Root CA"  # fmt: skip
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    issuing.verify_directly_issued_by(root)
    for cert, path_length in ((root, 1), (issuing, 0)):
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical and constraints.value.ca
        assert constraints.value.path_length == path_length
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
        assert not usage.value.digital_signature
        assert cert.not_valid_before_utc < now() - dt.timedelta(days=29)
    assert root.not_valid_after_utc > now() + dt.timedelta(days=19 * 365)
    assert issuing.not_valid_after_utc > now() + dt.timedelta(days=9 * 365)
    # the first CRL is published at once, empty
    first = pki.load_crl(pki.crl_path(ca_dir))
    assert first.is_signature_valid(issuing.public_key())


def test_init_ca_refuses_a_directory_holding_a_ca(ca_dir):
    with pytest.raises(pki.CaExists, match="already holds a CA"):
        pki.init_ca(ca_dir)


def test_load_ca_errors(tmp_path, fresh_ca):
    with pytest.raises(pki.PkiError, match="no CA directory at .*sim ca init"):
        pki.load_ca(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pki.PkiError, match="not a simulated CA directory .*root-ca.pem"):
        pki.trust_anchors(tmp_path / "empty")
    pki.state_path(fresh_ca).write_text("{not json")
    with pytest.raises(pki.PkiError, match="state.json is corrupt"):
        pki.load_ca(fresh_ca)
    with pytest.raises(pki.PkiError, match="corrupt"):
        issue(fresh_ca, tmp_path / "x.card")
    assert not (tmp_path / "x.card").exists()


def test_load_ca_detects_a_mismatched_key(tmp_path, fresh_ca):
    other = tmp_path / "other"
    pki.init_ca(other, algorithm="ECCP256")
    (fresh_ca / pki.ISSUING_KEY).write_bytes((other / pki.ISSUING_KEY).read_bytes())
    with pytest.raises(pki.PkiError, match="does not match"):
        pki.load_ca(fresh_ca)


# --- issuing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RSA2048", "ECCP256"])
def test_issued_card_file_and_certificates(ca_dir, cards, algorithm):
    card = cards[algorithm]
    assert card.path is not None and mode(card.path) == 0o600
    loaded = CardFile.load(card.path)
    assert loaded == card
    assert set(loaded.keys) == {"9a", "9c"}
    assert all(slot.algorithm == algorithm for slot in loaded.keys.values())
    ca = pki.load_ca(ca_dir)
    for slot in ("9a", "9c"):
        cert = issuance.card_certificate(loaded, slot)
        key = serialization.load_pem_private_key(loaded.keys[slot].private_key_pem, None)
        assert key.public_key() == cert.public_key()
        if algorithm == "RSA2048":
            assert cert.public_key().key_size == 2048
        subject = {a.oid: a.value for a in cert.subject}
        assert subject == {
            NameOID.COUNTRY_NAME: "GB",
            NameOID.ORGANIZATION_NAME: "NHS-style Simulated Organisation",
            NameOID.ORGANIZATIONAL_UNIT_NAME: "People",
            NameOID.COMMON_NAME: loaded.holder_name,
            NameOID.SERIAL_NUMBER: loaded.holder_uuid,
        }
        assert issuance.certificate_uuid(cert) == loaded.holder_uuid
        assert issuance.certificate_holder(cert) == loaded.holder_name
        assert cert.issuer == ca.issuing_cert.subject
        cert.verify_directly_issued_by(ca.issuing_cert)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca.issuing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        url = points[0].full_name[0].value
        assert url == pki.crl_url(ca_dir) and url.startswith("file:///")
        assert Path(url.removeprefix("file://")).is_file()
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        upn = san.get_values_for_type(x509.OtherName)[0]
        assert upn.type_id == issuance.OID_UPN
        assert upn.value[2:].decode() == f"{loaded.holder_uuid}@sim.nhs.invalid"
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert dt.timedelta(days=729) < lifetime <= dt.timedelta(days=730, minutes=5)
    a = issuance.card_certificate(loaded, "9a")
    usage = a.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.content_commitment and not usage.value.key_cert_sign
    eku = a.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH, issuance.OID_SMARTCARD_LOGON]
    c = issuance.card_certificate(loaded, "9c")
    usage = c.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.content_commitment and usage.value.digital_signature
    with pytest.raises(x509.ExtensionNotFound):
        c.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert a.serial_number != c.serial_number


@pytest.mark.parametrize("algorithm", ["RSA2048", "ECCP256"])
def test_card_certificate_chains_to_the_trust_anchor(ca_dir, cards, algorithm):
    verified = verify_chain(ca_dir, issuance.card_certificate(cards[algorithm]))
    root = x509.load_pem_x509_certificate(pki.trust_anchors(ca_dir).read_bytes())
    assert [c.subject for c in verified.chain][-1] == root.subject
    assert len(verified.chain) == 3


def test_card_secrets_and_ra_records(ca_dir, cards):
    card = cards["RSA2048"]
    assert card.pin.matches(PIN) and not card.pin.matches("4321")
    assert card.pin.retries_left == card.pin.max_retries == 3
    puk, algorithm, management_key = pki.admin_credentials(ca_dir, card.serial)
    assert len(puk) == 8 and puk.isdigit() and card.puk.matches(puk)
    assert algorithm == card.management_key_algorithm == "AES128"
    assert management_key == card.management_key and len(management_key) == 16
    record = pki.load_ca(ca_dir).find_card(card.serial)
    assert (record.holder_name, record.uuid, record.algorithm) == (NAME, UUID, "RSA2048")
    assert record.card_file == str(card.path.resolve())
    assert record.certificate_serials == {
        slot: f"{issuance.card_certificate(card, slot).serial_number:x}" for slot in ("9a", "9c")}
    assert record.guid == issuance.card_guid(card)
    # by GUID (what a blocked card still shows), and by UUID when the holder has one card
    assert pki.admin_credentials(ca_dir, record.guid)[0] == puk
    dashed = "-".join((record.guid[:8], record.guid[8:12], record.guid[12:16],
                       record.guid[16:20], record.guid[20:]))  # fmt: skip
    assert pki.admin_credentials(ca_dir, dashed)[0] == puk
    assert pki.admin_credentials(ca_dir, UUID)[0] == puk
    with pytest.raises(pki.PkiError, match="holds 5 cards .*name the card by its serial"):
        pki.admin_credentials(ca_dir, "555000000002")
    with pytest.raises(pki.UnknownCard, match="no card with serial, GUID or UUID"):
        pki.admin_credentials(ca_dir, "999999999999")
    shown = json.dumps(issuance.describe_card(card))
    assert puk not in shown and management_key.hex() not in shown
    # card serials are numbered by the CA, 10 digits (never taken for a 12-digit UUID)
    serials = [c.serial for c in cards.values()]
    assert len(set(serials)) == len(serials) and all(len(s) == 10 for s in serials)


def test_piv_objects(cards):
    card = cards["ECCP256"]
    cert = issuance.card_certificate(card)
    expiry = cert.not_valid_after_utc.date()
    assert set(card.objects) == {"5fc102", "5fc107", "7e", "5fc10c", "5fc105", "5fc10a",
                                 "5fc109"}  # fmt: skip
    chuid = issuance.parse_tlv(card.objects["5fc102"])
    assert [tag for tag, _ in chuid] == [0x30, 0x34, 0x35, 0x3E, 0xFE]
    fields = dict(chuid)
    assert fields[0x30] == issuance.fascn(credential=card.serial[-6:], person=card.serial)
    assert len(fields[0x34]) == 16 and fields[0x34].hex() == issuance.card_guid(card)
    assert fields[0x35] == expiry.strftime("%Y%m%d").encode()
    assert fields[0x3E] == b"" and fields[0xFE] == b""
    ccc = dict(issuance.parse_tlv(card.objects["5fc107"]))
    assert ccc[0xF0][:7] == bytes.fromhex("A000000116FF02") and len(ccc[0xF0]) == 21
    assert ccc[0xF1] == ccc[0xF2] == b"\x21" and ccc[0xFE] == b""
    assert card.objects["7e"] == bytes.fromhex("4F0BA0000003080000100001005F2F024000")
    assert card.objects["5fc10c"] == bytes.fromhex("C10100C20100FE00")
    for slot, tag in issuance.CERT_TAGS.items():
        content = card.objects[tag]
        der = issuance.card_certificate(card, slot).public_bytes(serialization.Encoding.DER)
        assert content == b"\x70\x82" + len(der).to_bytes(2, "big") + der + \
            bytes.fromhex("710100FE00")  # fmt: skip
    printed = dict(issuance.parse_tlv(card.objects["5fc109"]))
    months = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
    assert printed[0x01] == b"Dr Bob Jones"
    assert printed[0x04] == f"{expiry.year}{months[expiry.month - 1]}{expiry.day:02d}".encode()
    assert printed[0x05] == card.serial.encode()
    assert printed[0x07] == b"UUID 555000000001"
    assert all(len(printed[t]) <= limit for t, limit in ((0x02, 20), (0x06, 15), (0x07, 20)))


def test_fascn_encoding():
    # the well-known non-federal FASC-N (agency 9999, system 9999, credential 999999)
    assert issuance.fascn() == bytes.fromhex("d4e739da739ced39ce739d836858210842108421c84210c3eb")
    assert len(issuance.fascn(credential="000001", person="0000000001")) == 25
    with pytest.raises(ValueError, match="credential must be 6 digits"):
        issuance.fascn(credential="12345")


def test_tlv_round_trip_and_errors():
    data = issuance.tlv(0x5FC102, b"x" * 300) + issuance.tlv(0x5F2F, b"\x40\x00") + \
        issuance.tlv(0x01, b"") + issuance.tlv(0x70, b"y" * 200)  # fmt: skip
    assert issuance.parse_tlv(data) == [(0x5FC102, b"x" * 300), (0x5F2F, b"\x40\x00"),
                                        (0x01, b""), (0x70, b"y" * 200)]  # fmt: skip
    for bad in (b"\x5f", b"\x5f\xc1", b"\x70", b"\x70\x05abc", b"\x70\x82\x01"):
        with pytest.raises(ValueError):
            issuance.parse_tlv(bad)


# --- variants ------------------------------------------------------------------------------------


def test_variant_expired(ca_dir, cards):
    cert = issuance.card_certificate(cards["expired"])
    assert cert.not_valid_after_utc < now() - dt.timedelta(hours=23)
    with pytest.raises(VerificationError, match="not valid at validation time"):
        verify_chain(ca_dir, cert)
    # only the date is wrong: the chain validates while the certificate was current
    verify_chain(ca_dir, cert, at=cert.not_valid_after_utc - dt.timedelta(hours=1))
    assert issuance.describe_card(cards["expired"])["certificates"]["9a"]["status"] == "expired"


def test_variant_expiring(ca_dir, cards):
    cert = issuance.card_certificate(cards["expiring"])
    assert now() + dt.timedelta(days=1) < cert.not_valid_after_utc < now() + dt.timedelta(days=30)
    verify_chain(ca_dir, cert)
    assert issuance.describe_card(cards["expiring"])["certificates"]["9a"]["days_left"] < 30


def test_variant_revoked(ca_dir, cards):
    card = cards["revoked"]
    verify_chain(ca_dir, issuance.card_certificate(card))  # the chain is fine: the CRL says no
    listed = pki.load_crl(pki.crl_path(ca_dir))
    assert listed.is_signature_valid(pki.load_ca(ca_dir).issuing_cert.public_key())
    for slot in ("9a", "9c"):
        entry = listed.get_revoked_certificate_by_serial_number(
            issuance.card_certificate(card, slot).serial_number)
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason == x509.ReasonFlags.key_compromise
    for other in ("RSA2048", "ECCP256", "expired", "expiring", "blocked"):
        serial = issuance.card_certificate(cards[other]).serial_number
        assert listed.get_revoked_certificate_by_serial_number(serial) is None
    ca = pki.load_ca(ca_dir)
    assert ca.card_status(ca.find_card(card.serial)) == "revoked"


def test_variant_untrusted(ca_dir, cards):
    cert = issuance.card_certificate(cards["untrusted"])
    real = pki.load_ca(ca_dir).issuing_cert
    assert cert.issuer == real.subject  # a look-alike: same names, other keys
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(real)
    with pytest.raises(VerificationError):
        verify_chain(ca_dir, cert)
    ca = pki.load_ca(ca_dir)
    record = ca.find_card(cards["untrusted"].serial)
    assert record.issuer == pki.ISSUER_UNTRUSTED and ca.card_status(record) == "untrusted"
    assert pki.admin_credentials(ca_dir, record.card_serial)[2] == cards["untrusted"].management_key


def test_variant_blocked(ca_dir, cards):
    card = CardFile.load(cards["blocked"].path)
    assert card.pin.retries_left == 0 and card.pin.blocked
    assert card.pin.matches(PIN)  # the PIN is set; the tries are used up
    verify_chain(ca_dir, issuance.card_certificate(card))
    assert issuance.describe_card(card)["pin_blocked"]


# --- revocation and CRLs -------------------------------------------------------------------------


def test_revoke_and_crl(tmp_path, fresh_ca):
    alice = issue(fresh_ca, tmp_path / "alice.card")
    bob = issue(fresh_ca, tmp_path / "bob.card", name="Dr Bob Jones", uuid="555000000009")
    first = pki.load_crl(pki.crl_path(fresh_ca))
    assert len(first) == 0

    revoked = pki.revoke(fresh_ca, serial=alice.serial, reason="affiliationChanged")
    assert [(r.card_serial, r.slot, r.reason) for r in revoked] == [
        (alice.serial, "9a", "affiliationChanged"), (alice.serial, "9c", "affiliationChanged")]
    crl = pki.load_crl(pki.crl_path(fresh_ca))
    pem = pki.load_crl(pki.crl_pem_path(fresh_ca))
    assert crl.public_bytes(serialization.Encoding.DER) == \
        pem.public_bytes(serialization.Encoding.DER)  # fmt: skip
    issuing = pki.load_ca(fresh_ca).issuing_cert
    assert crl.issuer == issuing.subject and crl.is_signature_valid(issuing.public_key())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    assert now() - dt.timedelta(minutes=1) <= crl.last_update_utc <= now()
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=7)
    assert {r.serial_number for r in crl} == {
        issuance.card_certificate(alice, s).serial_number for s in ("9a", "9c")}
    assert pki.load_ca(fresh_ca).card_status(pki.load_ca(fresh_ca).find_card(bob.serial)) == \
        "valid"  # fmt: skip

    with pytest.raises(pki.AlreadyRevoked):
        pki.revoke(fresh_ca, serial=alice.serial)
    with pytest.raises(pki.UnknownCard):
        pki.revoke(fresh_ca, uuid="000000000000")
    with pytest.raises(ValueError, match="unknown revocation reason"):
        pki.revoke(fresh_ca, uuid="555000000009", reason="tired")
    with pytest.raises(ValueError, match="exactly one"):
        pki.revoke(fresh_ca)

    # one certificate by its serial, without publishing: the CRL stays as it was
    bob_sign = issuance.card_certificate(bob, "9c").serial_number
    pki.revoke(fresh_ca, serial=f"{bob_sign:x}", publish_crl=False)
    assert len(pki.load_crl(pki.crl_path(fresh_ca))) == 2
    pki.crl(fresh_ca)
    assert pki.load_crl(pki.crl_path(fresh_ca)).get_revoked_certificate_by_serial_number(bob_sign)
    # the rest of bob's cards by UUID
    assert [r.slot for r in pki.revoke(fresh_ca, uuid="555000000009")] == ["9a"]
    entries = pki.load_crl(pki.crl_path(fresh_ca))
    assert len(entries) == 4
    assert entries.get_revoked_certificate_by_serial_number(bob_sign).extensions.\
        get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    state = json.loads(pki.state_path(fresh_ca).read_text())
    assert [r["reason"] for r in state["revoked"]] == ["affiliationChanged"] * 2 + \
        ["keyCompromise"] * 2  # fmt: skip


def test_revoke_refuses_an_untrusted_card(tmp_path, fresh_ca):
    rogue = issue(fresh_ca, tmp_path / "rogue.card", variant="untrusted")
    with pytest.raises(pki.PkiError, match="not issued by this CA"):
        pki.revoke(fresh_ca, serial=rogue.serial)
    with pytest.raises(pki.PkiError, match="not issued by this CA"):
        pki.revoke(fresh_ca, uuid=UUID)


def test_stale_crl(tmp_path, fresh_ca):
    path = pki.crl(fresh_ca, next_update_days=-2)
    assert path == pki.crl_path(fresh_ca)
    stale = pki.load_crl(path)
    assert stale.next_update_utc < now() - dt.timedelta(days=1)
    assert stale.last_update_utc < stale.next_update_utc
    assert pki.describe_ca(fresh_ca)["crl"]["stale"]
    # elsewhere, leaving the published one alone
    elsewhere = pki.crl(fresh_ca, next_update_days=-1, out=tmp_path / "old.der")
    assert elsewhere == tmp_path / "old.der" and (tmp_path / "old.pem").is_file()
    fresh = pki.load_crl(pki.crl(fresh_ca, next_update_days=30))
    assert fresh.next_update_utc > now() + dt.timedelta(days=29)
    numbers = [c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
               for c in (stale, pki.load_crl(elsewhere), fresh)]  # fmt: skip
    assert numbers == sorted(set(numbers)) and len(numbers) == 3


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "message"), [
    ("uuid", "55512345678", r"UUID must be exactly 12 digits \(got 11 digits\)"),
    ("uuid", "5551234567890", r"UUID must be exactly 12 digits \(got 13 digits\)"),
    ("uuid", "55512345678a", r"UUID must be exactly 12 digits \(got 12 characters\)"),
    ("uuid", "５５５１２３４５６７８９", "UUID must be exactly 12 digits"),
    ("pin", "123", r"PIN must be 4 to 8 digits \(got 3 digits\)"),
    ("pin", "123456789", r"PIN must be 4 to 8 digits \(got 9 digits\)"),
    ("pin", "12a4", r"PIN must be 4 to 8 digits \(0-9 only\)"),
    ("name", "  ", "name must not be empty"),
    ("name", "x" * 65, "longer than 64"),
    ("name", "Dr\nEvil", "control characters"),
    ("algorithm", "RSA1024", "unknown key algorithm"),
    ("variant", "lost", "unknown variant"),
    ("validity_days", 0, "validity_days"),
])  # fmt: skip
def test_bad_input(tmp_path, fresh_ca, field, value, message):
    before = pki.state_path(fresh_ca).read_bytes()
    with pytest.raises(ValueError, match=message) as raised:
        issue(fresh_ca, tmp_path / "bad.card", **{field: value})
    if field == "pin":
        assert value not in str(raised.value)
    assert not (tmp_path / "bad.card").exists()
    assert pki.state_path(fresh_ca).read_bytes() == before


def test_unknown_ca_dir_and_existing_card_file(tmp_path, fresh_ca):
    with pytest.raises(pki.PkiError, match="no CA directory"):
        issue(tmp_path / "nowhere", tmp_path / "x.card")
    (tmp_path / "taken.card").write_text("mine")
    with pytest.raises(FileExistsError, match="exists already"):
        issue(fresh_ca, tmp_path / "taken.card")
    assert (tmp_path / "taken.card").read_text() == "mine"
    issue(fresh_ca, tmp_path / "taken.card", overwrite=True)
    assert CardFile.load(tmp_path / "taken.card").holder_uuid == UUID


def test_concurrent_issuance_gets_distinct_serials(tmp_path, fresh_ca):
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            issue(fresh_ca, tmp_path / f"c{i}.card", uuid=f"55500000010{i}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    records = pki.load_ca(fresh_ca).state.cards
    assert sorted(c.card_serial for c in records) == [f"{n:010d}" for n in range(1, 5)]


# --- the commands --------------------------------------------------------------------------------


@pytest.fixture
def cli():
    runner = CliRunner()

    def run(*args: str, expect: int = 0, input: str | None = None):
        result = runner.invoke(main, ["sim", *args], input=input, catch_exceptions=False)
        assert result.exit_code == expect, (result.exit_code, result.stdout, result.stderr)
        return result

    return run


def test_cli_lists_match_the_library():
    assert sim_card_cli.ALGORITHMS == issuance.ALGORITHMS
    assert sim_card_cli.VARIANTS == issuance.VARIANTS
    assert sim_card_cli.PROTOCOLS == PROTOCOLS
    assert sim_card_cli.REVOCATION_REASONS == tuple(pki.REVOCATION_REASONS)


def test_cli_ca_and_card(cli, tmp_path):
    ca = tmp_path / "ca"
    card = tmp_path / "alice.card"
    created = json.loads(cli("ca", "init", "--dir", str(ca), "--algorithm", "ECCP256",
                             "--json").stdout)  # fmt: skip
    assert created["trust_anchor"] == str(ca / "root-ca.pem")
    assert "already holds a CA" in cli("ca", "init", "--dir", str(ca),
                                       expect=exitcodes.CONFLICT).stderr  # fmt: skip

    issued = cli("card", "issue", "--ca", str(ca), "--name", NAME, "--uuid", UUID, "--pin", PIN,
                 "--out", str(card), "--algorithm", "ECCP256")  # fmt: skip
    assert "simulated test cards only" in issued.stderr and "6-8 digit" in issued.stderr
    assert f"to {NAME} (UUID {UUID})" in issued.stdout and mode(card) == 0o600
    assert "exists already" in cli("card", "issue", "--ca", str(ca), "--name", NAME, "--uuid",
                                   UUID, "--pin", PIN, "--out", str(card),
                                   expect=exitcodes.CONFLICT).stderr  # fmt: skip
    piped = cli("card", "issue", "--ca", str(ca), "--name", "Dr Bob Jones", "--uuid",
                "555000000001", "--pin-stdin", "--out", str(tmp_path / "bob.card"), "--variant",
                "blocked", "--algorithm", "ECCP256", "--json", input="123456\n")  # fmt: skip
    assert json.loads(piped.stdout)["pin_blocked"] and "command line" not in piped.stderr

    shown = cli("card", "show", str(card), "--json").stdout
    info = json.loads(shown)
    assert (info["holder_name"], info["uuid"], info["pin_retries_left"]) == (NAME, UUID, 3)
    assert info["certificates"]["9a"]["status"] == "valid"
    puk, _, management_key = pki.admin_credentials(ca, info["serial"])
    assert puk not in shown and management_key.hex() not in shown
    text = cli("card", "show", str(card)).stdout
    assert f"UUID:         {UUID}" in text and "3 of 3 tries left" in text and puk not in text

    listing = cli("ca", "show", "--dir", str(ca), "--json").stdout
    assert [c["uuid"] for c in json.loads(listing)["cards"]] == [UUID, "555000000001"]
    assert puk not in listing and "puk" not in listing
    secret = json.loads(cli("ca", "show", "--dir", str(ca), "--json",
                            "--show-admin-secrets").stdout)  # fmt: skip
    assert secret["cards"][0]["puk"] == puk
    assert f"PUK {puk}" in cli("ca", "show", "--dir", str(ca), "--show-admin-secrets").stdout
    assert puk not in cli("ca", "show", "--dir", str(ca)).stdout

    out = cli("ca", "revoke", "--dir", str(ca), "--uuid", UUID, "--reason", "superseded").stdout
    assert "superseded" in out and "CRL published" in out
    assert "revoked already" in cli("ca", "revoke", "--dir", str(ca), "--uuid", UUID,
                                    expect=exitcodes.CONFLICT).stderr  # fmt: skip
    cli("ca", "revoke", "--dir", str(ca), "--serial", "0000000099", expect=exitcodes.NOT_FOUND)
    cli("ca", "revoke", "--dir", str(ca), expect=exitcodes.USAGE)
    cli("ca", "revoke", "--dir", str(ca), "--uuid", UUID, "--reason", "bored",
        expect=exitcodes.USAGE)  # fmt: skip
    crl = json.loads(cli("ca", "crl", "--dir", str(ca), "--next-update-days", "-1",
                         "--json").stdout)  # fmt: skip
    assert crl["entries"] == 2 and crl["path"] == str(pki.crl_path(ca))
    assert "STALE" in cli("ca", "show", "--dir", str(ca)).stdout
    assert "revoked" in cli("ca", "show", "--dir", str(ca)).stdout


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--uuid", "55512345678"], exitcodes.USAGE, "exactly 12 digits"),
    (["--pin", "123"], exitcodes.USAGE, "4 to 8 digits"),
    (["--ca", "{tmp}/nowhere"], exitcodes.ERROR, "no CA directory"),
])  # fmt: skip
def test_cli_issue_errors(cli, tmp_path, args, code, message):
    base = {"--ca": str(tmp_path), "--name": NAME, "--uuid": UUID, "--pin": PIN,
            "--out": str(tmp_path / "x.card")}  # fmt: skip
    base.update(zip(args[::2], [a.format(tmp=tmp_path) for a in args[1::2]]))
    result = cli("card", "issue", *[x for kv in base.items() for x in kv], expect=code)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.card").exists()


def test_cli_show_errors(cli, tmp_path):
    (tmp_path / "junk.card").write_text("{}")
    assert "not a virtual card file" in cli("card", "show", str(tmp_path / "junk.card"),
                                            expect=exitcodes.ERROR).stderr  # fmt: skip
    assert "no CA directory" in cli("ca", "show", "--dir", str(tmp_path / "none"),
                                    expect=exitcodes.ERROR).stderr  # fmt: skip
    cli("card", "issue", "--ca", str(tmp_path), expect=exitcodes.USAGE)  # missing options
