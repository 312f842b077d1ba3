"""Both card paths on one card, through the real pcscd and OpenSC's PKCS#11 module: a PIV
session after a PKCS#11 one (OpenSC keeps its own handle on the card while its module is
loaded) still finds the card powered. With the PIV session's close unpowering the card
(pyscard's default disposition), pcscd answered every later PIV connect with
SCARD_W_UNPOWERED_CARD ("The card was removed...") while OpenSC held its handle: an "auto"
service that once used PKCS#11, or two services on the two paths, could no longer log in with
PIV. The session's close resets the card instead, which clears the PIN's verified state too."""

from __future__ import annotations

import pytest

from card_tools import PIN, insert_issued
from drivers.cardaccess import open_card
from drivers.pcsc.errors import SecurityStatusNotSatisfied
from simulators.card.pki import init_ca


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("paths") / "ca"
    init_ca(path)
    return path


def test_piv_after_pkcs11_on_the_same_card(pcscd, vpcd_insert, ca_dir, tmp_path):
    card = insert_issued(pcscd, vpcd_insert, ca_dir, tmp_path / "alice.card")
    used = []
    for _ in range(3):
        for driver in ("piv", "pkcs11"):
            with open_card(card.reader, driver=driver) as session:
                assert session.driver == driver
                session.certificate("9a")
                session.verify_pin(PIN)
                used.append(driver)
    assert used == ["piv", "pkcs11"] * 3
    assert card.bridge.counts["power_off"] == 0  # reset, never unpowered, while both are used
    # the reset clears the PIN's verified state: a new PIV session must VERIFY again
    with open_card(card.reader, driver="piv") as session:
        with pytest.raises(SecurityStatusNotSatisfied):
            session.sign("9a", b"\0" * 32, algorithm="RSA2048")
