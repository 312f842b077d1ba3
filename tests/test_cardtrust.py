"""Card certificate validation before the PIN (token_agent.cardtrust), against the simulated
NHS-style PKI (simulators.card.pki / issuance)."""

from __future__ import annotations

import datetime as dt
import http.server
import shutil
import statistics
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulators.card import issuance, pki
from token_agent.cardtrust import (
    REASONS,
    CardCertificateError,
    CardTrustPolicy,
    format_date,
    validate_card_certificate,
)

NAME = "Dr Alice Smith"
UUID = "555123456789"
PIN = "1234"


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def card_der(card, slot: str = "9a") -> bytes:
    return der(issuance.card_certificate(card, slot))


def issue(ca_dir: Path, out: Path, **kwargs):
    args = {"name": NAME, "uuid": UUID, "pin": PIN, "algorithm": "ECCP256"} | kwargs
    return issuance.issue_card(ca_dir, out=out, **args)


def policy(ca_dir: Path, **settings) -> CardTrustPolicy:
    return CardTrustPolicy.from_files([pki.trust_anchors(ca_dir)], [pki.issuing_cert_path(ca_dir)],
                                      **settings)  # fmt: skip


def refused(cert_der: bytes, trust: CardTrustPolicy, **kwargs) -> CardCertificateError:
    with pytest.raises(CardCertificateError) as info:
        validate_card_certificate(cert_der, trust, **kwargs)
    assert info.value.reason in REASONS
    return info.value


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    """An RSA CA (as NHS cards' PKI) with one card of each kind, shared read-only."""
    directory = tmp_path_factory.mktemp("pki") / "ca"
    pki.init_ca(directory)
    return directory


@pytest.fixture(scope="module")
def cards(ca_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cards")
    issued = {
        "RSA2048": issue(ca_dir, out / "rsa.card", algorithm="RSA2048"),
        "ECCP256": issue(ca_dir, out / "ec.card", name="Dr Bob Jones", uuid="555000000001"),
    }
    for variant in ("expired", "expiring", "revoked", "untrusted"):
        issued[variant] = issue(ca_dir, out / f"{variant}.card", uuid="555000000002",
                                variant=variant)  # fmt: skip
    return issued


def custom_cert(ca_dir: Path, *, subject: x509.Name | None = None, eku=None,
                key_usage: dict | None = None, crl: bool = True) -> bytes:  # fmt: skip
    """A certificate from the CA's issuing key with a profile of one's choosing."""
    ca = pki.load_ca(ca_dir)
    key = pki.generate_key("ECCP256")
    usage = {"digital_signature": True, "content_commitment": False, "key_encipherment": False,
             "data_encipherment": False, "key_agreement": False, "key_cert_sign": False,
             "crl_sign": False, "encipher_only": False, "decipher_only": False}
    usage |= key_usage or {}
    extensions: list = [
        (x509.SubjectAlternativeName([x509.RFC822Name("alice@sim.nhs.invalid")]), False),
        (x509.KeyUsage(**usage), True),
    ]
    if eku is not None:
        extensions.append((x509.ExtendedKeyUsage(eku), False))
    now = pki.utcnow()
    cert = ca.issue_certificate(
        key.public_key(), subject or issuance.holder_subject(NAME, UUID, ca.state.organisation),
        not_before=now - dt.timedelta(minutes=5), not_after=now + dt.timedelta(days=365),
        extensions=extensions, crl_distribution_url=pki.crl_url(ca_dir) if crl else None,
        ca_issuers_url=None)  # fmt: skip
    return der(cert)


# --- good cards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RSA2048", "ECCP256"])
def test_good_card_gives_the_holder(ca_dir, cards, algorithm):
    cert = issuance.card_certificate(cards[algorithm])
    identity = validate_card_certificate(der(cert), policy(ca_dir))
    assert identity.holder_name == issuance.certificate_holder(cert)
    assert identity.uuid == issuance.certificate_uuid(cert)
    assert identity.certificate_serial == cert.serial_number
    assert identity.not_after == cert.not_valid_after_utc
    assert identity.issuer == cert.issuer.rfc4514_string()
    assert "NHS-style Simulated Issuing CA" in identity.issuer
    assert identity.warnings == ()
    assert identity.public_key == cert.public_key()


def test_pem_or_der_anchors_and_the_crl_from_a_configured_pem_file(ca_dir, cards):
    ca = pki.load_ca(ca_dir)
    trust = CardTrustPolicy(anchors=(der(ca.root_cert),), intermediates=(der(ca.issuing_cert),),
                            crl_sources=(str(pki.crl_pem_path(ca_dir)),))  # fmt: skip
    assert validate_card_certificate(card_der(cards["RSA2048"]), trust).uuid == UUID
    # the revoked card is in that PEM CRL too
    assert refused(card_der(cards["revoked"]), trust).reason == "revoked"


def test_intermediate_from_ca_issuers_only_when_allowed(ca_dir, cards):
    anchors_only = CardTrustPolicy.from_files([pki.trust_anchors(ca_dir)])
    assert refused(card_der(cards["RSA2048"]), anchors_only).reason == "untrusted"
    aia = CardTrustPolicy.from_files([pki.trust_anchors(ca_dir)], fetch_ca_issuers=True)
    assert validate_card_certificate(card_der(cards["RSA2048"]), aia).uuid == UUID


# --- dates ---------------------------------------------------------------------------------------


def test_expired_card(ca_dir, cards):
    cert = issuance.card_certificate(cards["expired"])
    error = refused(der(cert), policy(ca_dir))
    assert error.reason == "expired"
    assert error.message == (f"Certificate expired on {format_date(cert.not_valid_after_utc)}: "
                             "the card must be renewed in person by a registration authority")
    assert str(error) == error.message


def test_good_card_seen_after_its_end_is_expired_not_untrusted(ca_dir, cards):
    cert = issuance.card_certificate(cards["ECCP256"])
    later = cert.not_valid_after_utc + dt.timedelta(days=1)
    error = refused(der(cert), policy(ca_dir), now=later)
    assert error.reason == "expired"
    assert format_date(cert.not_valid_after_utc) in error.message


def test_not_yet_valid(ca_dir, cards):
    cert = issuance.card_certificate(cards["ECCP256"])
    error = refused(der(cert), policy(ca_dir), now=cert.not_valid_before_utc - dt.timedelta(days=2))
    assert error.reason == "not-yet-valid"
    assert format_date(cert.not_valid_before_utc) in error.message


def test_expiring_card_warns(ca_dir, cards):
    cert = issuance.card_certificate(cards["expiring"])
    identity = validate_card_certificate(der(cert), policy(ca_dir))
    assert identity.warnings == (
        f"Your card's certificate expires on {format_date(cert.not_valid_after_utc)} "
        f"(in {issuance.EXPIRING_DAYS_LEFT} days): ask your registration authority to renew it",)
    assert validate_card_certificate(der(cert), policy(ca_dir, expiry_warning_days=10)).warnings \
        == ()  # fmt: skip
    # a two-year card is warned about with a long enough window
    long_window = policy(ca_dir, expiry_warning_days=800)
    assert len(validate_card_certificate(card_der(cards["RSA2048"]), long_window).warnings) == 1


def test_format_date():
    assert format_date(dt.datetime(2026, 11, 21, 23, 0, tzinfo=dt.timezone.utc)) == \
        "21 November 2026"  # fmt: skip


# --- trust and key usage -------------------------------------------------------------------------


def test_untrusted_card(ca_dir, cards):
    error = refused(card_der(cards["untrusted"]), policy(ca_dir))
    assert error.reason == "untrusted"
    assert error.message == "Card not issued by a trusted authority"
    assert error.detail  # what the verifier said, for logs


def test_another_pkis_root_does_not_vouch(ca_dir, cards, fresh_ca):
    error = refused(card_der(cards["RSA2048"]), policy(fresh_ca))
    assert error.reason == "untrusted"


def test_signature_certificate_lacks_client_auth(ca_dir, cards):
    cert_9c = card_der(cards["ECCP256"], "9c")
    error = refused(cert_9c, policy(ca_dir))
    assert error.reason == "wrong-key-usage"
    assert "client authentication" in error.message
    # without the EKU requirement, 9C (digitalSignature) is acceptable
    relaxed = policy(ca_dir, require_eku_client_auth=False)
    assert validate_card_certificate(cert_9c, relaxed).uuid == "555000000001"


def test_wrong_eku_is_wrong_key_usage_not_untrusted(fresh_ca):
    cert = custom_cert(fresh_ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    error = refused(cert, policy(fresh_ca))
    assert error.reason == "wrong-key-usage"
    assert "1.3.6.1.5.5.7.3.1" in error.detail


def test_no_digital_signature_is_wrong_key_usage(fresh_ca):
    cert = custom_cert(fresh_ca, eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
                       key_usage={"digital_signature": False, "key_agreement": True})
    error = refused(cert, policy(fresh_ca))
    assert error.reason == "wrong-key-usage"
    assert "digital signatures" in error.message


def test_profile_cert_made_here_is_accepted(fresh_ca):
    cert = custom_cert(fresh_ca, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    assert validate_card_certificate(cert, policy(fresh_ca)).holder_name == NAME


@pytest.mark.parametrize("serial", [None, "12345", "5551234567890", "55512345678x"])
def test_no_uuid(fresh_ca, serial):
    attributes = [x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
                  x509.NameAttribute(NameOID.COMMON_NAME, NAME)]
    if serial is not None:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    cert = custom_cert(fresh_ca, subject=x509.Name(attributes),
                       eku=[ExtendedKeyUsageOID.CLIENT_AUTH])  # fmt: skip
    error = refused(cert, policy(fresh_ca))
    assert error.reason == "no-uuid"
    assert "UUID" in error.message


@pytest.mark.parametrize("blob", [b"", b"\x30\x03\x02\x01", b"not a certificate at all"])
def test_malformed(ca_dir, blob):
    error = refused(blob, policy(ca_dir))
    assert error.reason == "malformed"
    assert "cannot be read" in error.message


# --- revocation ----------------------------------------------------------------------------------


def test_revoked_card_says_when_and_why(ca_dir, cards):
    cert = issuance.card_certificate(cards["revoked"])
    entry = pki.load_crl(pki.crl_path(ca_dir)).get_revoked_certificate_by_serial_number(
        cert.serial_number)
    error = refused(der(cert), policy(ca_dir))
    assert error.reason == "revoked"
    assert error.message == (f"This card has been revoked (on "
                             f"{format_date(entry.revocation_date_utc)}, key compromise)")


def test_revoked_later_with_another_reason(fresh_ca, tmp_path):
    card = issue(fresh_ca, tmp_path / "a.card")
    trust = policy(fresh_ca)
    validate_card_certificate(card_der(card), trust)
    pki.revoke(fresh_ca, uuid=UUID, reason="affiliationChanged")
    error = refused(card_der(card), trust)
    assert error.reason == "revoked"
    assert "affiliation changed" in error.message


def test_stale_crl_refused_or_warned(fresh_ca, tmp_path):
    card = issue(fresh_ca, tmp_path / "a.card")
    pki.crl(fresh_ca, next_update_days=-1)
    next_update = pki.load_crl(pki.crl_path(fresh_ca)).next_update_utc
    error = refused(card_der(card), policy(fresh_ca))
    assert error.reason == "crl-stale"
    assert format_date(next_update) in error.message
    identity = validate_card_certificate(card_der(card), policy(fresh_ca, on_stale_crl="warn"))
    assert identity.uuid == UUID
    assert len(identity.warnings) == 1 and "out of date" in identity.warnings[0]


def test_card_listed_in_a_stale_crl_is_refused_even_when_warning(fresh_ca, tmp_path):
    card = issue(fresh_ca, tmp_path / "a.card")
    pki.revoke(fresh_ca, uuid=UUID, publish_crl=False)
    pki.crl(fresh_ca, next_update_days=-1)
    error = refused(card_der(card), policy(fresh_ca, on_stale_crl="warn"))
    assert error.reason == "revoked"


def test_unreachable_crl_refused_or_warned(ca_dir, cards, tmp_path):
    missing = tmp_path / "nowhere" / "crl.der"
    for source in (str(missing), missing.as_uri()):
        error = refused(card_der(cards["RSA2048"]), policy(ca_dir, crl_sources=(source,)))
        assert error.reason == "crl-unavailable"
        assert "revocation list is unavailable" in error.message
        assert str(missing) in error.detail
        warned = policy(ca_dir, crl_sources=(source,), on_unreachable_crl="warn")
        identity = validate_card_certificate(card_der(cards["RSA2048"]), warned)
        assert identity.uuid == UUID
        assert "could not be checked" in identity.warnings[0]


def test_distribution_point_gone(fresh_ca, tmp_path):
    card = issue(fresh_ca, tmp_path / "a.card")
    pki.crl_path(fresh_ca).unlink()
    assert refused(card_der(card), policy(fresh_ca)).reason == "crl-unavailable"


def test_no_crl_anywhere(fresh_ca):
    cert = custom_cert(fresh_ca, eku=[ExtendedKeyUsageOID.CLIENT_AUTH], crl=False)
    error = refused(cert, policy(fresh_ca))
    assert error.reason == "crl-unavailable"
    assert "no CRL distribution point" in error.detail


def test_later_sources_are_tried(ca_dir, cards, tmp_path):
    trust = policy(ca_dir, crl_sources=(str(tmp_path / "missing.crl"), str(pki.crl_path(ca_dir))))
    assert validate_card_certificate(card_der(cards["ECCP256"]), trust).warnings == ()


def test_crl_signed_by_another_ca_is_rejected(ca_dir, cards, tmp_path):
    # a look-alike CA: the same names, its own keys
    other = tmp_path / "other"
    pki.init_ca(other, algorithm="ECCP256")
    fake = tmp_path / "fake.crl"
    shutil.copy(pki.crl_path(other), fake)
    error = refused(card_der(cards["revoked"]), policy(ca_dir, crl_sources=(str(fake),)))
    assert error.reason == "crl-unavailable"
    assert "not signed by the card's issuing CA" in error.detail
    # nor is it cached
    cache = tmp_path / "cache"
    refused(card_der(cards["RSA2048"]), policy(ca_dir, crl_sources=(str(fake),),
                                               crl_cache_dir=cache))  # fmt: skip
    assert not cache.exists() or not list(cache.iterdir())


def test_crl_of_another_issuer_name_is_rejected(ca_dir, cards, tmp_path):
    other = tmp_path / "other"
    pki.init_ca(other, algorithm="ECCP256", issuing_name="Some Other Issuing CA")
    error = refused(card_der(cards["RSA2048"]),
                    policy(ca_dir, crl_sources=(str(pki.crl_path(other)),)))  # fmt: skip
    assert error.reason == "crl-unavailable"
    assert "Some Other Issuing CA" in error.detail


def test_garbage_crl(ca_dir, cards, tmp_path):
    junk = tmp_path / "junk.crl"
    junk.write_bytes(b"\x30\x82garbage")
    error = refused(card_der(cards["RSA2048"]), policy(ca_dir, crl_sources=(str(junk),)))
    assert error.reason == "crl-unavailable"
    assert "not a CRL" in error.detail


# --- the CRL cache -------------------------------------------------------------------------------


def test_cached_crl_reused_after_the_source_is_gone(fresh_ca, tmp_path):
    card = issue(fresh_ca, tmp_path / "a.card")
    cache = tmp_path / "cache"
    trust = policy(fresh_ca, crl_cache_dir=cache, crl_max_age=3600)
    assert validate_card_certificate(card_der(card), trust).warnings == ()
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".crl"  # no temporary files left behind
    pki.crl_path(fresh_ca).unlink()
    assert validate_card_certificate(card_der(card), trust).warnings == ()
    # without the cache, the same card cannot be checked
    assert refused(card_der(card), policy(fresh_ca)).reason == "crl-unavailable"


def test_cache_reused_until_max_age_then_refetched(fresh_ca, tmp_path):
    card = issue(fresh_ca, tmp_path / "a.card")
    cache = tmp_path / "cache"
    validate_card_certificate(card_der(card), policy(fresh_ca, crl_cache_dir=cache))
    pki.revoke(fresh_ca, uuid=UUID)
    # within its nextUpdate (the default max age) the cached CRL still says "not revoked"
    assert validate_card_certificate(card_der(card), policy(fresh_ca, crl_cache_dir=cache)).uuid
    # with a max age that has passed, the new CRL is fetched (and replaces the cached one)
    aged = policy(fresh_ca, crl_cache_dir=cache, crl_max_age=0)
    time.sleep(0.01)
    assert refused(card_der(card), aged).reason == "revoked"
    assert refused(card_der(card), policy(fresh_ca, crl_cache_dir=cache)).reason == "revoked"


def test_stale_cached_crl_is_refetched(fresh_ca, tmp_path):
    card = issue(fresh_ca, tmp_path / "a.card")
    cache = tmp_path / "cache"
    pki.crl(fresh_ca, next_update_days=-1)
    trust = policy(fresh_ca, crl_cache_dir=cache)
    assert refused(card_der(card), trust).reason == "crl-stale"
    pki.crl(fresh_ca)  # the CA publishes again
    assert validate_card_certificate(card_der(card), trust).warnings == ()


def test_stale_cache_and_unreachable_source(fresh_ca, tmp_path):
    card = issue(fresh_ca, tmp_path / "a.card")
    cache = tmp_path / "cache"
    validate_card_certificate(card_der(card), policy(fresh_ca, crl_cache_dir=cache))
    pki.crl_path(fresh_ca).unlink()
    after_next_update = pki.utcnow() + dt.timedelta(days=8)
    error = refused(card_der(card), policy(fresh_ca, crl_cache_dir=cache), now=after_next_update)
    assert error.reason == "crl-stale"


def test_crl_over_http_from_a_loopback_server(ca_dir, cards):
    payload = pki.crl_path(ca_dir).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/crl.der"
        trust = policy(ca_dir, crl_sources=(url,), crl_fetch_timeout=2)
        assert validate_card_certificate(card_der(cards["RSA2048"]), trust).uuid == UUID
        assert refused(card_der(cards["revoked"]), trust).reason == "revoked"
    finally:
        server.shutdown()
        server.server_close()


# --- the policy ----------------------------------------------------------------------------------


def test_policy_checks_its_settings(ca_dir, tmp_path):
    with pytest.raises(ValueError, match="at least one trust anchor"):
        CardTrustPolicy(anchors=())
    with pytest.raises(ValueError, match="not a certificate"):
        CardTrustPolicy(anchors=(b"junk",))
    with pytest.raises(ValueError, match="on_stale_crl"):
        policy(ca_dir, on_stale_crl="ignore")
    with pytest.raises(ValueError, match="cannot read the trust anchor"):
        CardTrustPolicy.from_files([tmp_path / "missing.pem"])
    (tmp_path / "junk.pem").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pem is not a certificate"):
        CardTrustPolicy.from_files([pki.trust_anchors(ca_dir)], [tmp_path / "junk.pem"])
    trust = policy(ca_dir)
    assert trust == policy(ca_dir) and hash(trust) == hash(policy(ca_dir))
    assert trust.on_stale_crl == trust.on_unreachable_crl == "refuse"  # fail closed
    assert trust.expiry_warning_days == 90


def test_validation_is_fast_with_a_cached_crl(ca_dir, cards, tmp_path):
    trust = policy(ca_dir, crl_cache_dir=tmp_path / "cache")
    cert = card_der(cards["RSA2048"])
    validate_card_certificate(cert, trust)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        validate_card_certificate(cert, trust)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.02, times  # a few ms at most; ~0.3 ms measured
