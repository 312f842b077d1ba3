"""A smartcard whose certificate must be renewed soon: the policy login (`token-agent login`,
the service's `login.start`, PAM through the service) tells the holder, as the direct
`card login` does, within `card_expiry_warning_days` (90 by default; NHS cards prompt 90
days ahead), and says nothing for a certificate that has longer to run.

Everything runs for real: cards issued by the simulated PKI in vpcd's reader behind the
machine's pcscd (the ``pcscd`` fixture: it fails in CI and skips elsewhere, saying why), the
CLI in a subprocess, ``token-agent serve`` in a subprocess, and ``pamtester`` on a pty
through pam_python (the ``pam_stack`` fixture of tests/test_pam.py: root, pamtester and
libpam-python). PAM's card login runs on each path of ``[cards] driver`` (piv, pkcs11 through
OpenSC's module, auto)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from simulators.card.card import VirtualCard
from simulators.card.issuance import issue_card
from simulators.card.pki import init_ca, issuing_cert_path, root_cert_path
from test_pam import pam_service, pam_services, pam_stack, pamtester, sockdir  # noqa: F401
from test_service import services, socket_dir, world  # noqa: F401  (fixtures)

CARD_PIN = "739154"
SOON_UUID, LATER_UUID = "555100000020", "555100000200"
RENEW = "ask your registration authority to renew it"


@pytest.fixture(scope="module")
def cards(tmp_path_factory) -> dict:
    """Two cards of one CA: ``soon`` (its certificate ends in 20 days) and ``later`` (in
    200 days)."""
    directory = tmp_path_factory.mktemp("renewal")
    ca = directory / "ca"
    init_ca(ca)
    soon, later = directory / "soon.card", directory / "later.card"
    issue_card(ca, name="Dr Soon Renewal", uuid=SOON_UUID, pin=CARD_PIN, out=soon,
               algorithm="ECCP256", variant="expiring")
    issue_card(ca, name="Dr Later Renewal", uuid=LATER_UUID, pin=CARD_PIN, out=later,
               algorithm="ECCP256", validity_days=200)
    return {"ca": ca, "soon": soon, "later": later}


@pytest.fixture
def insert(vpcd_insert, pcscd):
    """``insert(path)``: the card file in vpcd's first reader, seen by pcscd."""
    from pcsc_helpers import wait_for_card

    def put(path: Path):
        bridge = vpcd_insert(VirtualCard.load(path))
        wait_for_card(pcscd.context, pcscd.reader(0), True)
        return bridge

    return put


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(tmp_path, cards):
    env = environ_for_agent()
    env["TOKEN_AGENT_DATA_DIR"] = str(tmp_path / "data")
    env["TOKEN_AGENT_POLICY"] = str(tmp_path / "policy.toml")
    (tmp_path / "policy.toml").write_text("")

    def run(*args: str, input: str | None = None, expect: int = 0):
        proc = subprocess.run([*token_agent_command(), *args], input=input, env=env,
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    run("card", "settings", "set", "card_trust_anchors", str(root_cert_path(cards["ca"])))
    run("card", "settings", "set", "card_intermediates", str(issuing_cert_path(cards["ca"])))
    run("users", "add", "soon", "--display-name", "Dr Soon Renewal")
    run("users", "add", "later", "--display-name", "Dr Later Renewal")
    return run


def test_cli_login_warns_of_a_certificate_to_renew(cli, cards, insert):
    bridge = insert(cards["soon"])
    cli("card", "enrol", "--user", "soon")
    text = cli("login", "--user", "soon", "--primary", "card", "--pin-stdin",
               input=CARD_PIN + "\n")
    assert text.stdout.startswith("logged in: soon with card"), text.stdout
    [line] = [line for line in text.stderr.splitlines() if "expires on" in line]
    assert "Your card's certificate expires on" in line and "(in 20 days)" in line \
        and RENEW in line, text.stderr
    data = json.loads(cli("login", "--user", "soon", "--primary", "card", "--pin-stdin",
                          "--json", input=CARD_PIN + "\n").stdout)
    assert data["ok"] and data["user"] == "soon"
    assert len(data["warnings"]) == 1 and "(in 20 days)" in data["warnings"][0], data
    bridge.remove()

    bridge = insert(cards["later"])
    cli("card", "enrol", "--user", "later")
    quiet = cli("login", "--user", "later", "--primary", "card", "--pin-stdin", "--json",
                input=CARD_PIN + "\n")
    assert json.loads(quiet.stdout)["warnings"] == [] and "expires" not in quiet.stderr
    # the window is the card setting card_expiry_warning_days (90 days by default)
    cli("card", "settings", "set", "card_expiry_warning_days", "365")
    wide = cli("login", "--user", "later", "--primary", "card", "--pin-stdin", "--json",
               input=CARD_PIN + "\n")
    [warning] = json.loads(wide.stdout)["warnings"]
    assert "(in 200 days)" in warning or "(in 199 days)" in warning, warning
    assert warning in wide.stderr
    bridge.remove()


# --------------------------------------------------------------------------- the service


@pytest.fixture
def card_service(request, services, world, cards):  # noqa: F811
    """The real service watching vpcd's reader; the users soon and later, each with their
    card enrolled. Its ``[cards] driver``: the test's parameter (indirect), else "auto"."""
    from token_agent.ceremonies.card import set_card_setting

    store = world.store
    set_card_setting(store, "card_trust_anchors", [str(root_cert_path(cards["ca"]))])
    set_card_setting(store, "card_intermediates", [str(issuing_cert_path(cards["ca"]))])
    for name, uuid, holder in (("soon", SOON_UUID, "Dr Soon Renewal"),
                               ("later", LATER_UUID, "Dr Later Renewal")):
        user = store.add_user(name, display_name=holder)
        store.add_card_identity(user.id, uuid=uuid, holder_name=holder)
    services.secrets.append(CARD_PIN)
    driver = getattr(request, "param", "auto")
    return services(cards=f'readers = ["Virtual PCD"]\nlock_command = "true"\n'
                          f'driver = "{driver}"')


def test_service_login_result_and_info_carry_the_warning(card_service, cards, insert):
    bridge = insert(cards["soon"])
    events = []
    with card_service.client() as c:
        outcome = c.login("soon", lambda _e: CARD_PIN, primary="card", on_event=events.append)
    assert outcome["ok"] and outcome["user"] == "soon", outcome
    [warning] = outcome["warnings"]
    assert "(in 20 days)" in warning and RENEW in warning
    assert [e["message"] for e in events if e["event"] == "info"] == [warning]
    bridge.remove()

    bridge = insert(cards["later"])
    events.clear()
    with card_service.client() as c:
        outcome = c.login("later", lambda _e: CARD_PIN, primary="card", on_event=events.append)
    assert outcome["ok"] and outcome["warnings"] == [], outcome
    assert not [e for e in events if e["event"] == "info"], events
    bridge.remove()


# --------------------------------------------------------------------------- PAM


@pytest.mark.parametrize("card_service, used", [("piv", "piv"), ("pkcs11", "pkcs11"),
                                                ("auto", "piv")], indirect=["card_service"])
def test_pam_shows_the_warning_as_info_text(card_service, cards, insert, pam_service,  # noqa: F811
                                            world, used):  # noqa: F811
    """PAM primary=card on each path of [cards] driver ("auto" takes PIV for this card):
    the same login, the same words; the audit says which path asked the card."""
    service = pam_service(card_service.socket, "primary=card")
    bridge = insert(cards["soon"])
    run = pamtester(service, "soon", [("Enter the PIN for your card: ", CARD_PIN)])
    assert run.returncode == 0 and run.pam_result == "PAM_SUCCESS", run
    [line] = [line for line in run.output.splitlines() if "expires on" in line]
    assert line.startswith("Your card's certificate expires on") and "(in 20 days)" in line \
        and RENEW in line, run.output
    assert CARD_PIN not in run.output
    bridge.remove()

    bridge = insert(cards["later"])
    run = pamtester(service, "later", [("Enter the PIN for your card: ", CARD_PIN)])
    assert run.returncode == 0 and run.pam_result == "PAM_SUCCESS", run
    assert "expires" not in run.output, run.output
    bridge.remove()
    logins = world.store.list_events(kind="login.card")
    assert [(e.outcome, e.detail["card_driver"]) for e in logins] == [("success", used)] * 2
