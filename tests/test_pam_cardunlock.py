"""The cardholder's self-service card unlock through the service and PAM: the "Forgot your
card PIN?" path of a card login (``token_agent/service/selfunlock.py``) and the op
``card.self-unlock``, over the library ``token_agent.ceremonies.cardunlock``.

Everything is real: a card issued by the simulated PKI in vpcd's reader behind the machine's
pcscd (the ``pcscd`` fixture), ``token-agent serve`` in a subprocess, ``pamtester`` on a pty
through pam_python (``pam_stack`` of tests/test_pam.py), the RA's credentials in a private
file (``file:`` RA source, the card setting ``card_ra_source``), and the one-time codes in the
delivery outbox (the holder's "phone")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulators.card.card import VirtualCard
from simulators.card.issuance import issue_card
from simulators.card.pki import admin_credentials, init_ca, issuing_cert_path, root_cert_path
from test_pam import pam_service, pam_services, pam_stack, pamtester, sockdir  # noqa: F401
from test_service import PASSWORD, World, services, socket_dir  # noqa: F401  (fixtures)

CARD_PIN = "739154"
WRONG_PIN = "000000"
NEW_PIN = "5318642"
UUID = "555100000777"
HOLDER = "Dr Locked Out"
PHONE = "+447700900123"
PIN_PROMPT = "Enter the PIN for your card: "
OFFER = "Forgot your card PIN? Unlock it now? [y/N]: "
CODE_PROMPT = "Enter the code sent to"
NEW_PIN_PROMPT = "New card PIN (6 to 8 digits): "
AGAIN_PROMPT = "New card PIN again: "
PASSWORD_PROMPT = "Your password: "
SPONSOR = "Your card is locked: ask your sponsor to unlock it."
UNLOCKED = "Your card is unlocked. Log in with your new PIN."


@pytest.fixture
def ca(tmp_path) -> Path:
    """A CA of the test's own (its RA knows one card per holder)."""
    directory = tmp_path / "ca"
    init_ca(directory)
    return directory


class Phone:
    """The delivery outbox: the codes the holder's phone received."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def messages(self) -> list[dict]:
        if not self.dir.exists():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"),
                                                          key=lambda p: p.stat().st_mtime_ns)]

    def last_code(self) -> str:
        found = [m for m in self.messages() if m.get("code")]
        assert found, f"no code in the outbox {self.dir}"
        return found[-1]["code"]


class Setup:
    def __init__(self, services, world, phone, card, svc, ra_file):
        self.services, self.world, self.phone, self.card, self.svc = \
            services, world, phone, card, svc
        self.ra_file = ra_file


def make_setup(services, ca, tmp_path, *, ra: bool = True, name: str = "svc",  # noqa: F811
               cards: str = "") -> Setup:
    """The user ``locky`` (password, a verified mobile, the card enrolled), the card issued
    in ``tmp_path``, the service started watching vpcd's reader (``cards``: more of its
    ``[cards]`` table); with ``ra``, the RA's credentials file configured as the card
    setting ``card_ra_source``."""
    from token_agent.ceremonies.card import set_card_setting
    from token_agent.factors import codes
    from token_agent.rasource import write_file

    outbox = tmp_path / "outbox"
    services.policy.write_text(f'[delivery.sms]\ngateway = "outbox"\n'
                               f'[delivery.email]\ngateway = "outbox"\n'
                               f'[delivery.outbox]\ndir = "{outbox}"\n')
    card = tmp_path / "locky.card"
    issue_card(ca, name=HOLDER, uuid=UUID, pin=CARD_PIN, out=card, algorithm="ECCP256",
               overwrite=True)
    puk, algorithm, key = admin_credentials(ca, UUID)
    services.secrets.extend([CARD_PIN, NEW_PIN, puk, key.hex()])
    world = World(services)
    store = world.store
    set_card_setting(store, "card_trust_anchors", [str(root_cert_path(ca))])
    set_card_setting(store, "card_intermediates", [str(issuing_cert_path(ca))])
    ra_file = None
    if ra:
        ra_file = write_file(tmp_path / "ra.json", {UUID: {
            "uuid": UUID, "puk": puk, "management_key_algorithm": algorithm,
            "management_key": key.hex()}})
        set_card_setting(store, "card_ra_source", f"file:{ra_file}")
    user = world.user("locky", password=True)
    store.add_card_identity(user.id, uuid=UUID, holder_name=HOLDER)
    phone = Phone(outbox)
    ctx = world.agent.factors()
    codes.add_contact(ctx, user.id, "sms", PHONE)
    assert codes.confirm_contact(ctx, user.id, "sms", phone.last_code()).ok
    svc = services(name=name, cards='readers = ["Virtual PCD"]\nlock_command = "true"\n'
                   + cards)
    return Setup(services, world, phone, card, svc, ra_file)


@pytest.fixture
def insert(vpcd_insert, pcscd):
    from pcsc_helpers import wait_for_card

    def put(path: Path):
        bridge = vpcd_insert(VirtualCard.load(path))
        wait_for_card(pcscd.context, pcscd.reader(0), True)
        return bridge

    return put


@pytest.fixture
def setup(services, ca, tmp_path):  # noqa: F811
    s = make_setup(services, ca, tmp_path)
    yield s
    s.world.close()


def lock_card(path: Path) -> None:
    """Three wrong PINs, straight to the card file (VERIFY through the simulator)."""
    card = VirtualCard.load(path)
    card.power_on()
    select = bytes.fromhex("00A4040009A0000003080000100000")
    assert card.transmit(select)[-2:] == b"\x90\x00"
    wrong = bytes.fromhex("0020008008") + WRONG_PIN.encode() + b"\xff\xff"
    for _ in range(3):
        card.transmit(wrong)
    assert card.transmit(bytes.fromhex("0020008000"))[-2:] == b"\x69\x83"  # blocked
    card.power_off()
    card.save()


def events(world, kind: str) -> list:
    return [e for e in world.store.list_events(kind=kind, limit=100)]


# --------------------------------------------------------------------------- PAM


OPENSC_CONF = """\
app default {
    framework pkcs15 { use_file_caching = no; }
    pkcs11 { user_pin_unblock_style = set_pin_in_unlogged_session; }
}
"""


@pytest.fixture(params=["piv", "pkcs11"])
def any_path(request, services, ca, tmp_path, monkeypatch):  # noqa: F811
    """The setup on each path of ``[cards] driver``: "piv", and "pkcs11" (OpenSC's PKCS#11
    module, which reaches the virtual card through its PIV driver, configured by OPENSC_CONF
    in the service's environment to unblock with C_SetPIN in an unlogged session)."""
    if request.param == "piv":
        s = make_setup(services, ca, tmp_path, cards='driver = "piv"')
    else:
        conf = tmp_path / "opensc.conf"
        conf.write_text(OPENSC_CONF)
        (tmp_path / "home").mkdir()
        monkeypatch.setenv("OPENSC_CONF", str(conf))
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        s = make_setup(services, ca, tmp_path, cards='driver = "pkcs11"')
    s.path = request.param
    yield s
    s.world.close()


def test_pam_three_wrong_pins_then_forgot_pin_unlocks_and_logs_in(any_path, insert,
                                                                  pam_service):  # noqa: F811
    """On both card paths (PIV; PKCS#11 through OpenSC's module)."""
    setup = any_path
    service = pam_service(setup.svc.socket, "primary=card")
    insert(setup.card)
    for _ in range(2):
        run = pamtester(service, "locky", [(PIN_PROMPT, WRONG_PIN)])
        assert run.pam_result == "PAM_AUTH_ERR" and "Forgot" not in run.output, run
        assert PIN_PROMPT in run.output and "Wrong PIN" in run.output, run.output
    # the third wrong PIN locks the card: the same login offers the unlock
    run = pamtester(service, "locky", [
        (PIN_PROMPT, WRONG_PIN), (OFFER, "y"), (CODE_PROMPT, setup.phone.last_code),
        (PASSWORD_PROMPT, PASSWORD), (NEW_PIN_PROMPT, NEW_PIN), (AGAIN_PROMPT, NEW_PIN),
        (PIN_PROMPT, NEW_PIN)])
    assert run.returncode == 0 and run.pam_result == "PAM_SUCCESS", run
    assert "Your card is locked. Forgot your card PIN?" in run.output
    assert UNLOCKED in run.output, run.output
    code = setup.phone.last_code()
    setup.services.secrets.append(code)  # looked for in the service's stderr at teardown
    for secret in (NEW_PIN, PASSWORD, code):
        assert secret not in run.output
    [unlocked] = events(setup.world, "card.self-unlock")
    assert unlocked.outcome == "success" and unlocked.detail["user"] == "locky"
    assert unlocked.detail["card_driver"] == setup.path
    assert unlocked.detail["card_proof"] == ("management-key" if setup.path == "piv" else "none")
    assert "puk" not in json.dumps(unlocked.detail).lower()
    # and the new PIN goes on working
    run = pamtester(service, "locky", [(PIN_PROMPT, NEW_PIN)])
    assert run.pam_result == "PAM_SUCCESS", run


def test_pam_declined_is_the_plain_locked_failure(setup, insert, pam_service):  # noqa: F811
    service = pam_service(setup.svc.socket, "primary=card")
    lock_card(setup.card)
    insert(setup.card)
    sent = len(setup.phone.messages())
    run = pamtester(service, "locky", [(OFFER, "")])  # Enter: the default, no
    assert run.pam_result == "PAM_MAXTRIES", run
    assert SPONSOR in run.output and "Enter the PIN" not in run.output, run.output
    assert len(setup.phone.messages()) == sent  # no code was sent
    assert events(setup.world, "card.self-unlock") == []
    run = pamtester(service, "locky", [(OFFER, "no")])
    assert run.pam_result == "PAM_MAXTRIES" and SPONSOR in run.output, run


def test_pam_wrong_code_leaves_the_card_locked(setup, insert, pam_service):  # noqa: F811
    service = pam_service(setup.svc.socket, "primary=card")
    lock_card(setup.card)
    insert(setup.card)

    def wrong_code() -> str:
        code = setup.phone.last_code()
        return f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"

    run = pamtester(service, "locky", [(OFFER, "yes"), (CODE_PROMPT, wrong_code)])
    assert run.pam_result == "PAM_MAXTRIES", run
    assert "Your password" not in run.output and "New card PIN" not in run.output, run.output
    [failed] = events(setup.world, "card.self-unlock")
    assert failed.outcome == "failure" and failed.detail["reason"] == "wrong-code"
    # still locked: the next login offers again, no PIN asked
    run = pamtester(service, "locky", [(OFFER, "n")])
    assert run.pam_result == "PAM_MAXTRIES" and "Enter the PIN" not in run.output, run


def test_pam_no_offer_without_an_ra_source(services, ca, tmp_path, insert,  # noqa: F811
                                           pam_service):  # noqa: F811
    s = make_setup(services, ca, tmp_path, ra=False)
    try:
        service = pam_service(s.svc.socket, "primary=card")
        lock_card(s.card)
        insert(s.card)
        run = pamtester(service, "locky", [])
        assert run.pam_result == "PAM_MAXTRIES", run
        assert SPONSOR in run.output and "Forgot" not in run.output, run.output
    finally:
        s.world.close()


def test_pam_no_offer_for_someone_elses_card(setup, insert, pam_service):  # noqa: F811
    """Logging in as another user with locky's locked card: the card login fails as before,
    nothing is offered (no codes sent to locky, no attempt spent)."""
    setup.world.user("other", password=True)
    service = pam_service(setup.svc.socket, "primary=card")
    lock_card(setup.card)
    insert(setup.card)
    run = pamtester(service, "other", [])
    assert run.pam_result in ("PAM_MAXTRIES", "PAM_AUTH_ERR"), run
    assert "Forgot" not in run.output, run.output
    assert events(setup.world, "card.self-unlock") == []


# --------------------------------------------------------------------------- the socket op


def test_socket_self_unlock_op_and_who_may_ask(setup, insert):
    from test_service import nobody

    lock_card(setup.card)
    insert(setup.card)
    # someone who is not locky may not start it for locky (nobody: uid 65534)
    [refused] = nobody(setup.svc.socket, ("card.self-unlock", {"user": "locky"}))
    assert not refused["ok"] and refused["code"] == "forbidden", refused
    # root (a login service) for locky's card, naming another user: refused before any question
    setup.world.user("other", password=True)
    prompts = []
    with setup.svc.client() as c:
        login = c.request("card.self-unlock", user="other")["login"]
        outcome = c.run_ceremony(login, lambda e: prompts.append(e) or None)
    assert not outcome["ok"] and outcome["reason"] == "credential-of-another-user", outcome
    assert prompts == []
    # locky's own unlock
    answers = {"Your password": PASSWORD, "New card PIN (6 to 8 digits)": NEW_PIN,
               "New card PIN again": NEW_PIN}

    def answer(event):
        if event["message"].startswith("Enter the code sent to"):
            return setup.phone.last_code()
        return answers[event["message"]]

    with setup.svc.client() as c:
        login = c.request("card.self-unlock", user="locky")["login"]
        outcome = c.run_ceremony(login, answer)
    assert outcome["ok"] and outcome["action"] == "self-unlock", outcome
    assert outcome["message"] == UNLOCKED
    with setup.svc.client() as c:
        again = c.login("locky", lambda e: NEW_PIN, primary="card")
    assert again["ok"] and again["method"] == "card", again


def test_socket_self_unlock_without_an_ra_source_is_unavailable(services, ca, tmp_path,  # noqa: F811
                                                               insert):
    from token_agent.service.client import ServiceError

    s = make_setup(services, ca, tmp_path, ra=False)
    try:
        with s.svc.client() as c:
            with pytest.raises(ServiceError) as e:
                c.request("card.self-unlock", user="locky")
        assert e.value.code == "unavailable" and "not set up" in e.value.message
    finally:
        s.world.close()
