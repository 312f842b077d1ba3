"""The cardholder's own unlock (token_agent/ceremonies/cardunlock.py) on the PKCS#11 path:
the card opened through OpenSC's real PKCS#11 module (drivers/pkcs11) over the real pcscd,
locked by three wrong PINs over PKCS#11, unlocked with a code, the password, a new PIN and the
RA's PUK (OpenSC's unlogged C_SetPIN, configured as test_card_pkcs11.py does), then a login
with the new PIN over PKCS#11. A PKCS#11 session cannot prove the card with its management key:
the event says ``card_proof: "none"``."""

from __future__ import annotations

import json

import pytest

from drivers.cardaccess import open_card
from drivers.pcsc.errors import PinBlocked, WrongPin
from simulators.card.pki import admin_credentials, issuing_cert_path, root_cert_path
from test_card_pkcs11 import ALICE_UUID, ca_dir, issued, module, own_home  # noqa: F401
from test_mfa_login import PASSWORD, world  # noqa: F401 (fixture)
from test_recovery import add_sms, code_in, gateway, texts_to  # noqa: F401 (fixture)
from token_agent import rasource
from token_agent.ceremonies import cardunlock
from token_agent.ceremonies.card import login_with_card, set_card_setting

MOBILE = "+447700900123"
NEW_PIN = "86420975"


class Script:
    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def info(self, message):
        pass

    def secret(self, prompt):
        self.prompts.append(prompt)
        answer = self.answers.pop(0) if self.answers else None
        return answer() if callable(answer) else answer

    text = secret

    def choose(self, prompt, options, default):
        return default

    def show_qr(self, uri):
        pass


def test_self_unlock_over_pkcs11(world, gateway, issued, module, ca_dir):  # noqa: F811
    w = world(f'[codes]\nresend_seconds = 0\n[delivery.sms]\nurl = "{gateway.url}"\n')
    w.gateway = gateway
    set_card_setting(w.store, "card_trust_anchors", [str(root_cert_path(ca_dir))])
    set_card_setting(w.store, "card_intermediates", [str(issuing_cert_path(ca_dir))])
    alice = w.add_user("alice")
    w.store.add_card_identity(alice.id, uuid=ALICE_UUID, holder_name="Dr Alice Smith")
    add_sms(w, alice)
    card = issued()
    puk = admin_credentials(ca_dir, ALICE_UUID)[0]
    w.secrets.append(puk)
    session = open_card(card.reader, driver="pkcs11", pkcs11_module=module)
    try:
        assert session.driver == "pkcs11"
        for bad in ("999999", "999998", "999997"):
            with pytest.raises((WrongPin, PinBlocked)):
                session.verify_pin(bad)
        assert session.pin_retries() == 0
        script = Script(lambda: code_in(texts_to(w, MOBILE)[-1]), PASSWORD, NEW_PIN, NEW_PIN)
        outcome = cardunlock.self_unlock(w.agent, session, interaction=script,
                                         ra=rasource.load_source(f"simulated:{ca_dir}"))
        assert outcome.ok, outcome
        assert outcome.detail["card_driver"] == "pkcs11"
        assert outcome.detail["card_proof"] == "none"
        login = login_with_card(w.store, session, pin_provider=lambda: NEW_PIN)
        assert login.ok and login.user == "alice", login
    finally:
        session.close()
    audit = json.dumps([e.to_dict() for e in w.store.list_events(limit=10 ** 6)])
    assert puk not in audit and NEW_PIN not in audit
