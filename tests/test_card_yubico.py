"""Interoperability: Yubico's yubico-piv-tool (Debian ``yubico-piv-tool``) against an issued
virtual card in vpcd's reader, behind the real pcscd.

yubico-piv-tool connects with T=1 only and SELECTs the PIV application without Le, accepting
nothing but ``90 00`` with the data: it works only because the card answers as the T=1 card
its ATR announces (a T=0 card's ``61xx`` made it fail with "Failed selecting application").
It also asks for a YubiKey's firmware version (INS FD) and serial number (INS F8, after
SELECTing Yubico's management application): the card is no YubiKey and answers 6D00 and 6A82,
which yubico-piv-tool reports as "No data available" and carries on.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from card_tools import PIN, InsertedCard, insert_issued, require_tools, run
from card_tools import tool_env as make_tool_env
from conftest import token_agent_command
from pcsc_helpers import wait_for_card
from simulators.card.card import VirtualCard
from simulators.card.cardfile import NHS_T0_ATR
from simulators.card.issuance import TAG_CCC, TAG_CHUID, card_certificate
from simulators.card.pki import init_ca
from token_agent import exitcodes

READER = "Virtual PCD 00 00"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    require_tools(["yubico-piv-tool"], "yubico-piv-tool")
    directory = tmp_path_factory.mktemp("yubico-ca") / "ca"
    init_ca(directory)
    return directory


@pytest.fixture
def issued(pcscd, vpcd_insert, ca_dir, tmp_path):
    def make(algorithm: str = "RSA2048", **issue) -> InsertedCard:
        return insert_issued(pcscd, vpcd_insert, ca_dir, tmp_path / f"alice-{algorithm}.card",
                             algorithm=algorithm, **issue)  # fmt: skip

    return make


@pytest.fixture
def piv_tool(tmp_path):
    env = make_tool_env(tmp_path)

    def tool(*args: str, check: bool = True):
        return run(env, "yubico-piv-tool", "-r", READER, *args, check=check)

    return tool


def _fields(output: str) -> dict[str, str]:
    """yubico-piv-tool's "Name:\\tvalue" lines (the first of each name)."""
    fields: dict[str, str] = {}
    for line in output.splitlines():
        name, sep, value = line.strip().partition(":\t")
        if sep:
            fields.setdefault(name, value)
    return fields


def test_status_shows_the_chuid_and_the_certificates(issued, piv_tool):
    card = issued()
    result = piv_tool("-a", "status")
    output = result.stdout
    fields = _fields(output)
    issued_file = card.file
    assert fields["CHUID"] == issued_file.objects[TAG_CHUID].hex(), output
    assert fields["CCC"] == issued_file.objects[TAG_CCC].hex(), output
    assert fields["PIN tries left"] == "3", output
    # not a YubiKey: no firmware version or serial number, said plainly
    assert fields["Version"] == "No data available", output
    assert fields["Serial Number"] == "No data available", output
    for slot in ("9a", "9c"):
        cert = card_certificate(issued_file, slot)
        block = output.split(f"Slot {slot}:", 1)[1].split("Slot ", 1)[0]
        slot_fields = _fields(block)
        assert slot_fields["Algorithm"] == "RSA2048", block
        assert "CN=Dr Alice Smith" in slot_fields["Subject DN"], block
        assert "serialNumber=555123456789" in slot_fields["Subject DN"], block
        der = cert.public_bytes(serialization.Encoding.DER)
        assert slot_fields["Fingerprint"] == hashlib.sha256(der).hexdigest(), block
    assert "Slot 9d:" not in output and "Slot 9e:" not in output


@pytest.mark.parametrize("key_format", ["DER", "PEM"])
def test_read_certificate_gives_back_the_issued_certificate(issued, piv_tool, tmp_path,
                                                            key_format):  # fmt: skip
    card = issued()
    out = tmp_path / f"9a.{key_format.lower()}"
    piv_tool("-a", "read-certificate", "-s", "9a", "-K", key_format, "-o", str(out))
    expected = card_certificate(card.file, "9a")
    if key_format == "DER":
        assert out.read_bytes() == expected.public_bytes(serialization.Encoding.DER)
    else:
        assert out.read_bytes() == expected.public_bytes(serialization.Encoding.PEM)
        assert x509.load_pem_x509_certificate(out.read_bytes()) == expected


def test_verify_pin_right_then_wrong_counts_down(issued, piv_tool):
    card = issued()
    right = piv_tool("-a", "verify-pin", "-P", PIN)
    assert "Successfully verified PIN." in right.stdout + right.stderr
    assert card.verify_status() == 0x63C3
    wrong = piv_tool("-a", "verify-pin", "-P", "9999", check=False)
    assert wrong.returncode != 0
    assert "2 tries left" in wrong.stdout + wrong.stderr, wrong
    assert card.file.pin.retries_left == 2  # the card saved it at once
    assert _fields(piv_tool("-a", "status").stdout)["PIN tries left"] == "2"
    wrong = piv_tool("-a", "verify-pin", "-P", "0000", check=False)
    assert wrong.returncode != 0 and "1 tries left" in wrong.stdout + wrong.stderr, wrong
    assert card.verify_status() == 0x63C1
    piv_tool("-a", "verify-pin", "-P", PIN)  # the right PIN restores the tries
    assert card.file.pin.retries_left == 3


@pytest.mark.parametrize("algorithm,verified", [("RSA2048", "Successful RSA verification."),
                                                ("ECCP256", "Successful ECDSA verification.")])
def test_test_signature_verifies(issued, piv_tool, tmp_path, algorithm, verified):
    issued(algorithm)
    cert = tmp_path / "9a.pem"
    piv_tool("-a", "read-certificate", "-s", "9a", "-o", str(cert))
    result = piv_tool("-a", "verify-pin", "-P", PIN, "-a", "test-signature", "-s", "9a",
                      "-i", str(cert))  # fmt: skip
    assert verified in result.stdout + result.stderr, result


def test_a_t0_card_issued_by_the_cli_is_refused_by_yubico_piv_tool(
        pcscd, vpcd_insert, ca_dir, tmp_path, piv_tool):  # fmt: skip
    """`token-agent sim card issue --protocol t0`: a card whose ATR announces T=0 only.
    yubico-piv-tool connects with T=1 only, so pcscd refuses it the card
    (SCARD_E_PROTO_MISMATCH), as it would a real T=0 card; OpenSC takes it
    (test_card_opensc.py)."""
    path = tmp_path / "tara.card"
    issued = subprocess.run(
        [*token_agent_command(), "sim", "card", "issue", "--ca", str(ca_dir), "--name",
         "Dr Tara Smith", "--uuid", "555444555666", "--pin-stdin", "--out", str(path),
         "--protocol", "t0", "--json"],
        input=f"{PIN}\n", capture_output=True, text=True, timeout=60)  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    info = json.loads(issued.stdout)
    assert (info["protocol"], info["atr"]) == ("t0", NHS_T0_ATR.hex())
    shown = subprocess.run([*token_agent_command(), "sim", "card", "show", str(path)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert f"protocol:     T=0 (ATR {NHS_T0_ATR.hex()})" in shown.stdout, shown
    bad = subprocess.run([*token_agent_command(), "sim", "card", "issue", "--ca", str(ca_dir),
                          "--name", "Dr Tara Smith", "--uuid", "555444555666", "--pin-stdin",
                          "--out", str(tmp_path / "x.card"), "--protocol", "t2"],
                         input=f"{PIN}\n", capture_output=True, text=True, timeout=60)
    assert bad.returncode == exitcodes.USAGE and "t2" in bad.stderr
    vpcd_insert(VirtualCard.load(path))
    wait_for_card(pcscd.context, pcscd.reader(0))
    result = piv_tool("-a", "status", "-v", check=False)
    assert result.returncode != 0
    assert "rc=8010000f" in result.stderr, result
