"""The smartcard login, tested against token-agent's virtual NHS-style card: in process (fast),
and in a reader of the machine's real pcscd, where pyscard (or any PC/SC client) sees it."""

from __future__ import annotations

import pytest

from card_login import CardLoginError, card_login


def trust(pki) -> dict:
    return {"issuing_ca_pem": pki.issuing_certificate.read_bytes(),
            "root_pem": pki.root_certificate.read_bytes()}


def test_card_login(nhs_pki, virtual_card_connection):
    assert card_login(virtual_card_connection, "1234", **trust(nhs_pki)) == "555123456789"


@pytest.mark.virtual_card(name="Dr Bob Jones", uuid="555987654321", pin="8642",
                          algorithm="ECCP256")
def test_card_login_with_an_ecc_card(nhs_pki, virtual_card_connection):
    assert card_login(virtual_card_connection, "8642", **trust(nhs_pki)) == "555987654321"


def test_a_wrong_pin_costs_a_try(nhs_pki, virtual_card_connection):
    with pytest.raises(CardLoginError, match=r"wrong PIN \(2 tries left\)"):
        card_login(virtual_card_connection, "9999", **trust(nhs_pki))
    with pytest.raises(CardLoginError, match=r"wrong PIN \(1 tries left\)"):
        card_login(virtual_card_connection, "9998", **trust(nhs_pki))
    assert card_login(virtual_card_connection, "1234", **trust(nhs_pki)) == "555123456789"


@pytest.mark.virtual_card(variant="untrusted")
def test_a_card_from_another_ca_is_refused(nhs_pki, virtual_card_connection):
    with pytest.raises(CardLoginError, match="does not chain"):
        card_login(virtual_card_connection, "1234", **trust(nhs_pki))


@pytest.mark.virtual_card(variant="expired")
def test_an_expired_card_is_refused(nhs_pki, virtual_card_connection):
    with pytest.raises(CardLoginError, match="not valid now"):
        card_login(virtual_card_connection, "1234", **trust(nhs_pki))


def test_card_login_through_pcscd(nhs_pki, pcscd_card):
    from smartcard.System import readers

    reader = next(r for r in readers() if str(r) == pcscd_card.reader)
    connection = reader.createConnection()
    connection.connect()
    try:
        assert card_login(connection, "1234", **trust(nhs_pki)) == "555123456789"
    finally:
        connection.disconnect()
