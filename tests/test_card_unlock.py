"""The cardholder's own unlock of a locked card (token_agent/ceremonies/cardunlock.py,
`token-agent card self-unlock`) and the sponsor's `card unlock --ra SPEC`, through the real
pcscd + vpcd with cards issued by the simulated PKI; the one-time codes go through the test
SMS gateway (test_delivery.GatewayServer) and are read back from it.

Attacks: a wrong code, a wrong password, a card not locked (no PIN try can be bought), an
unknown card, an untrusted / expired / revoked card, a card that is not the genuine card
(its management key does not match the RA's: a copied certificate) which must not spend the
card's attempts nor make a code be sent, the per-card limit, and the PUK never in an audit
event, a log record, an outcome or the command's output."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time

import pytest

from conftest import environ_for_agent, token_agent_command
from drivers.pcsc.piv import PivSession
from pcsc_helpers import wait_for_card
from simulators.card.card import VirtualCard
from simulators.card.pki import admin_credentials, issuing_cert_path, root_cert_path
from test_card_login import ALICE_UUID, BOB_UUID, PIN, card, pki  # noqa: F401 (fixtures)
from test_mfa_login import PASSWORD, World, world  # noqa: F401 (fixture)
from test_recovery import add_sms, code_in, gateway, texts_to  # noqa: F401 (fixture)
from token_agent import exitcodes, rasource
from token_agent.ceremonies import cardunlock
from token_agent.ceremonies.card import login_with_card, set_card_setting
from token_agent.outcome import Reason
from token_agent.store import Store

MOBILE = "+447700900123"
NEW_PIN = "24681357"


class Script:
    """An Interaction: answers in order to secret(), the default to choose(); records."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []
        self.infos: list[str] = []
        self.chose: list = []

    def info(self, message):
        self.infos.append(message)

    def secret(self, prompt):
        self.prompts.append(prompt)
        if not self.answers:
            return None
        answer = self.answers.pop(0)
        return answer() if callable(answer) else answer

    text = secret

    def choose(self, prompt, options, default):
        self.chose.append((prompt, options, default))
        return default

    def show_qr(self, uri):
        pass


@pytest.fixture
def w(world, gateway, pki) -> World:  # noqa: F811
    made = world(f'[codes]\nresend_seconds = 0\n[delivery]\nsender_name = "NHS Trust"\n'
                 f'[delivery.sms]\nurl = "{gateway.url}"\ntimeout = 5\n')
    made.gateway = gateway
    set_card_setting(made.store, "card_trust_anchors", [str(root_cert_path(pki["ca"]))])
    set_card_setting(made.store, "card_intermediates", [str(issuing_cert_path(pki["ca"]))])
    alice = made.add_user("alice")
    made.store.add_card_identity(alice.id, uuid=ALICE_UUID, holder_name="Dr Alice Smith")
    add_sms(made, alice)
    made.alice = alice
    made.puk = admin_credentials(pki["ca"], ALICE_UUID)[0]
    made.secrets.append(made.puk)
    return made


@pytest.fixture
def ra(pki):  # noqa: F811
    return rasource.load_source(f"simulated:{pki['ca']}")


@pytest.fixture
def insert(vpcd_insert, pcscd, card):  # noqa: F811
    """``insert(key, lock=True)``: the card in slot 0 (locked by three wrong PINs); its
    PivSession over pcscd."""
    sessions = []

    def put(key: str = "alice", lock: bool = True) -> PivSession:
        vpcd_insert(VirtualCard.load(card(key)), slot=0)
        wait_for_card(pcscd.context, pcscd.reader(0), True)
        session = PivSession.open(pcscd.reader(0))
        sessions.append(session)
        if lock:
            for bad in ("9999", "9998", "9997"):
                try:
                    session.verify_pin(bad)
                except Exception:  # noqa: BLE001 - WrongPin, then PinBlocked
                    pass
            assert session.pin_retries() == 0
        return session

    yield put
    for s in sessions:
        s.close()


def the_code(w) -> callable:
    """An answer: the newest code texted to alice's mobile."""
    return lambda: code_in(texts_to(w, MOBILE)[-1])


def events(w):
    return w.store.list_events(kind="card.self-unlock", limit=1000)


def no_puk_anywhere(w, caplog, *texts):
    audit = json.dumps([e.to_dict() for e in w.store.list_events(limit=10 ** 6)])
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    for where in (audit, logged, *texts):
        assert w.puk not in where and NEW_PIN not in where


def test_self_unlock_then_login_with_the_new_pin(w, insert, ra, caplog):
    caplog.set_level(logging.DEBUG)
    session = insert()
    script = Script(the_code(w), PASSWORD, NEW_PIN, NEW_PIN)
    outcome = cardunlock.self_unlock(w.agent, session, interaction=script, ra=ra)
    assert outcome.ok, outcome
    assert outcome.message == cardunlock.UNLOCKED and outcome.card_uuid == ALICE_UUID
    assert outcome.detail["user"] == "alice" and outcome.detail["card_proof"] == "management-key"
    assert script.prompts == ["Enter the code sent to +447•••••123", cardunlock.PASSWORD_PROMPT,
                              cardunlock.NEW_PIN_PROMPT, cardunlock.NEW_PIN_AGAIN] \
        or script.prompts[1:] == [cardunlock.PASSWORD_PROMPT, cardunlock.NEW_PIN_PROMPT,
                                  cardunlock.NEW_PIN_AGAIN]
    assert script.prompts[0].startswith("Enter the code")
    assert session.pin_retries() == 3
    login = login_with_card(w.store, session, pin_provider=lambda: NEW_PIN)
    assert login.ok and login.user == "alice", login
    [event] = events(w)
    assert event.outcome == "success" and event.user_id == w.alice.id
    assert event.detail["uuid"] == ALICE_UUID and event.detail["attempt"] == 1
    no_puk_anywhere(w, caplog, json.dumps(outcome.to_json()))


def test_new_pin_must_be_6_to_8_digits_and_typed_twice(w, insert, ra):
    session = insert()
    script = Script(the_code(w), PASSWORD, "1234", NEW_PIN, "13572468", NEW_PIN, NEW_PIN)
    outcome = cardunlock.self_unlock(w.agent, session, interaction=script, ra=ra)
    assert outcome.ok, outcome
    assert script.infos == ["A card PIN is 6 to 8 digits.", "The two PINs are not the same."]
    session.verify_pin(NEW_PIN)


def test_wrong_code_and_wrong_password_leave_the_card_locked(w, insert, ra, caplog):
    caplog.set_level(logging.DEBUG)
    email = w.store.add_method(w.alice.id, "email", "work email", confirmed=True)
    w.store.add_contact(email.id, "email", "alice@example.org", now=w.clock())
    session = insert()
    wrong = Script("000000", PASSWORD, NEW_PIN, NEW_PIN)
    outcome = cardunlock.self_unlock(w.agent, session, interaction=wrong, ra=ra)
    assert not outcome.ok and outcome.reason is Reason.WRONG_CODE
    assert wrong.prompts[1:] == [] and wrong.chose[0][0] == cardunlock.CHOOSE_PROMPT
    outcome = cardunlock.self_unlock(w.agent, session, ra=ra,
                                     interaction=Script(the_code(w), "not the password"))
    assert not outcome.ok and outcome.reason is Reason.WRONG_PASSWORD
    assert session.pin_retries() == 0
    assert sorted(e.detail["reason"] for e in events(w)) == ["wrong-code", "wrong-password"]
    no_puk_anywhere(w, caplog)


def test_a_card_not_locked_is_refused_before_anything_is_asked_or_sent(w, insert, ra):
    session = insert(lock=False)
    script = Script(the_code(w), PASSWORD, NEW_PIN, NEW_PIN)
    outcome = cardunlock.self_unlock(w.agent, session, interaction=script, ra=ra)
    assert not outcome.ok and outcome.reason is Reason.PIN_NOT_BLOCKED
    assert outcome.message == "Your card is not locked: log in with your PIN or change it."
    assert script.prompts == [] and texts_to(w, MOBILE) == []
    assert session.pin_retries() == 3  # no try spent


def test_unknown_card_refused_like_login(w, insert, ra):
    session = insert("bob")
    script = Script(the_code(w))
    outcome = cardunlock.self_unlock(w.agent, session, interaction=script, ra=ra)
    assert not outcome.ok and outcome.reason is Reason.UNKNOWN_USER
    assert outcome.message == (f"the card of Dr Bob Jones (UUID {BOB_UUID}) is not enrolled "
                               "here: ask an administrator")
    assert script.prompts == [] and texts_to(w, MOBILE) == []


@pytest.mark.parametrize("key,reason", [("untrusted", Reason.CERT_UNTRUSTED),
                                        ("expired", Reason.CERT_EXPIRED),
                                        ("revoked", Reason.CERT_REVOKED)])
def test_bad_certificates_refused_before_anything(w, insert, ra, key, reason):
    session = insert(key, lock=False)
    script = Script(the_code(w))
    outcome = cardunlock.self_unlock(w.agent, session, interaction=script, ra=ra)
    assert not outcome.ok and outcome.reason is reason, outcome
    assert script.prompts == []


def test_a_card_that_is_not_genuine_spends_no_attempt_and_gets_no_code(w, insert, ra, pki,
                                                                     tmp_path):
    """A certificate is public: copied into another card, it claims to be alice's card. That
    card does not hold alice's card's management key (modelled by an RA record whose key is
    not the card's): it is refused before the per-card count and before any code is sent."""
    session = insert()
    real = ra.credentials(uuid=ALICE_UUID)
    path = tmp_path / "ra.toml"
    rasource.write_file(path, {ALICE_UUID: {"puk": real.puk, "management_key_algorithm":
                                            real.management_key_algorithm,
                                            "management_key": "00" * len(real.management_key)}})
    for _ in range(cardunlock.MAX_ATTEMPTS + 2):
        outcome = cardunlock.self_unlock(w.agent, session, interaction=Script(the_code(w)),
                                         ra=rasource.load_source(f"file:{path}"))
        assert not outcome.ok and outcome.reason is Reason.VERIFICATION_FAILED
        assert outcome.message == cardunlock.NOT_GENUINE
    assert texts_to(w, MOBILE) == []
    # the genuine card still has all its attempts
    outcome = cardunlock.self_unlock(w.agent, session, ra=ra,
                                     interaction=Script(the_code(w), PASSWORD, NEW_PIN, NEW_PIN))
    assert outcome.ok and outcome.detail["attempt"] == 1, outcome


def test_three_attempts_per_card_per_day(w, insert, ra):
    session = insert()
    for answers in (("000000",), (the_code(w), "wrong password"), ("111111",)):
        outcome = cardunlock.self_unlock(w.agent, session, interaction=Script(*answers), ra=ra)
        assert not outcome.ok and outcome.reason in (Reason.WRONG_CODE, Reason.WRONG_PASSWORD)
    sent = len(texts_to(w, MOBILE))
    script = Script(the_code(w), PASSWORD, NEW_PIN, NEW_PIN)
    outcome = cardunlock.self_unlock(w.agent, session, interaction=script, ra=ra)
    assert not outcome.ok and outcome.reason is Reason.TOO_MANY_ATTEMPTS, outcome
    assert "Too many unlock attempts for this card" in outcome.message
    assert script.prompts == [] and len(texts_to(w, MOBILE)) == sent  # no code sent
    w.clock.advance(cardunlock.WINDOW + 1)
    outcome = cardunlock.self_unlock(w.agent, session, ra=ra,
                                     interaction=Script(the_code(w), PASSWORD, NEW_PIN, NEW_PIN))
    assert outcome.ok, outcome


def test_no_ra_configured_and_unknown_to_the_ra(w, insert, tmp_path, monkeypatch):
    monkeypatch.delenv(rasource.ENV, raising=False)
    session = insert()
    outcome = cardunlock.self_unlock(w.agent, session, interaction=Script())
    assert not outcome.ok and outcome.message == cardunlock.NOT_SET_UP
    path = rasource.write_file(tmp_path / "ra.json", {"1": {"puk": "12345678"}})
    w.store.set_setting(rasource.SETTING, f"file:{path}")
    outcome = cardunlock.self_unlock(w.agent, session, interaction=Script())
    assert not outcome.ok and outcome.reason is Reason.UNKNOWN_CREDENTIAL
    assert texts_to(w, MOBILE) == []


def test_cli_self_unlock_and_sponsor_unlock_with_ra(insert, gateway, pki, tmp_path):  # noqa: F811
    """`card self-unlock` in a subprocess (answers on stdin, the RA from $TOKEN_AGENT_RA),
    then `card login` with the new PIN; exit codes for a card not locked and for no RA."""
    data = tmp_path / "data"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[codes]\nresend_seconds = 0\n[delivery.sms]\nurl = "{gateway.url}"\n')
    ra_file = tmp_path / "ra.toml"
    env = environ_for_agent()
    env.pop(rasource.ENV, None)
    env.update(TOKEN_AGENT_DATA_DIR=str(data), TOKEN_AGENT_POLICY=str(policy))

    def cli(*args, stdin="", expect=0):
        result = subprocess.run([*token_agent_command(), *args], env=env, input=stdin,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == expect, (args, result.stdout, result.stderr)
        return result

    cli("sim", "ca", "export-ra", "--dir", str(pki["ca"]), str(ra_file))
    cli("card", "settings", "set", "card_trust_anchors", str(root_cert_path(pki["ca"])))
    cli("card", "settings", "set", "card_intermediates", str(issuing_cert_path(pki["ca"])))
    cli("users", "add", "alice")
    cli("enrol", "password", "--user", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    insert(lock=False)
    cli("card", "enrol", "--user", "alice")
    cli("card", "self-unlock", "--ra", f"file:{ra_file}", expect=exitcodes.ERROR)  # not locked
    for bad in ("9999", "9998", "9997"):
        cli("card", "login", "--pin-stdin", stdin=bad + "\n", expect=exitcodes.AUTH_FAILED
            if bad != "9997" else exitcodes.LOCKED)
    assert cli("card", "self-unlock", expect=exitcodes.ERROR).stderr.strip().endswith(
        "ask your sponsor to unlock it.")  # no RA source configured
    cli("card", "self-unlock", "--ra", "nosuch:x", expect=exitcodes.USAGE)
    store = Store.open(data / "token-agent.db")  # alice's verified mobile (set up directly)
    method = store.add_method(store.get_user("alice").id, "sms", "mobile", confirmed=True)
    store.add_contact(method.id, "sms", MOBILE, now=time.time())
    store.close()
    env[rasource.ENV] = f"file:{ra_file}"
    puk = admin_credentials(pki["ca"], ALICE_UUID)[0]
    before = len(texts_to_gw(gateway))
    # the code is only known once sent: run the command with a pipe, answer as it asks
    proc = subprocess.Popen([*token_agent_command(), "card", "self-unlock", "--pin-stdin",
                             "--json"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait(lambda: len(texts_to_gw(gateway)) > before)
    code = code_in(texts_to_gw(gateway)[-1])
    out, err = proc.communicate(f"{code}\n{PASSWORD}\n{NEW_PIN}\n{NEW_PIN}\n", timeout=120)
    assert proc.returncode == 0, (out, err)
    result = json.loads(out)
    assert result["ok"] and result["action"] == "self-unlock" and result["card_uuid"] == ALICE_UUID
    for secret in (puk, NEW_PIN, PASSWORD, code):
        assert secret not in out and secret not in err
    cli("card", "login", "--pin-stdin", stdin=NEW_PIN + "\n")
    store = Store.open(data / "token-agent.db")
    audit = json.dumps([e.to_dict() for e in store.list_events(limit=10 ** 6)])
    store.close()
    assert '"card.self-unlock"' in audit and puk not in audit and NEW_PIN not in audit


def texts_to_gw(gateway):
    return [r.body["text"] for r in gateway.requests if r.body.get("to") == MOBILE]


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.05)



def test_an_interrupt_after_the_attempt_is_counted_still_leaves_its_audit_event(w, insert, ra):
    """Ctrl-C (or a client gone) at the password: the attempt was counted, so its one
    ``card.self-unlock`` event is written (reason cancelled) and the interrupt goes on; the
    card stays locked."""
    session = insert()

    def interrupt():
        raise KeyboardInterrupt

    script = Script(the_code(w), interrupt)
    with pytest.raises(KeyboardInterrupt):
        cardunlock.self_unlock(w.agent, session, interaction=script, ra=ra)
    got = events(w)
    assert [(e.outcome, e.detail["reason"], e.detail["attempt"]) for e in got] == \
        [("failure", "cancelled", 1)]
    assert session.pin_retries() == 0
