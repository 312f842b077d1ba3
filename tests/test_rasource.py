"""The RA credentials sources (token_agent/rasource.py): the private file (TOML and JSON; by
serial, GUID and UUID; refused when others may read or write it, when it is a link or
another user's, when it is malformed), the entry-point registry (the simulated PKI's RA,
registered by pyproject.toml, loaded by name), and `sim ca export-ra`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import REPO_ROOT
from simulators.card import pki
from simulators.card.issuance import issue_card
from token_agent import exitcodes, rasource
from token_agent.cli import main

PUK = "87654321"
KEY_HEX = "00112233445566778899aabbccddeeff"
UUID = "555123456789"


def private(path, text: str, mode: int = 0o600):
    path.write_text(text)
    os.chmod(path, mode)
    return path


def toml_file(tmp_path, **extra) -> os.PathLike:
    fields = {"uuid": UUID, "guid": "ab" * 16, "puk": PUK, "management_key_algorithm": "AES128",
              "management_key": KEY_HEX, **extra}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
    return private(tmp_path / "ra.toml", f'[cards."0000000007"]\n{body}\n')


def test_file_source_toml_by_serial_guid_and_uuid(tmp_path):
    source = rasource.load_source(f"file:{toml_file(tmp_path)}")
    assert isinstance(source, rasource.FileRaSource)
    for kw in ({"uuid": "x", "serial": "0000000007"}, {"uuid": "x", "serial": "AB" * 16},
               {"uuid": UUID, "serial": None}, {"uuid": UUID, "serial": "not-known"}):
        creds = source.credentials(**kw)
        assert creds.puk == PUK and creds.management_key == bytes.fromhex(KEY_HEX)
        assert creds.management_key_algorithm == "AES128"
    assert PUK not in repr(creds) and KEY_HEX not in repr(creds) and "AES128" in repr(creds)


def test_file_source_json(tmp_path):
    path = private(tmp_path / "ra.json", json.dumps({"cards": {UUID: {
        "puk": PUK, "management_key_algorithm": "3DES", "management_key": "01" * 24}}}))
    creds = rasource.FileRaSource(path).credentials(uuid=UUID)
    assert creds.management_key_algorithm == "3DES" and len(creds.management_key) == 24


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660])
def test_file_others_may_read_or_write_refused(tmp_path, mode):
    path = toml_file(tmp_path)
    os.chmod(path, mode)
    with pytest.raises(rasource.RaError) as e:
        rasource.FileRaSource(path).credentials(uuid=UUID)
    assert str(path) in str(e.value) and "chmod 600" in str(e.value)
    assert PUK not in str(e.value)


def test_file_link_and_other_owner_refused(tmp_path):
    path = toml_file(tmp_path)
    link = tmp_path / "link.toml"
    link.symlink_to(path)
    with pytest.raises(rasource.RaError, match="symbolic link"):
        rasource.FileRaSource(link).credentials(uuid=UUID)
    # another user's file: the tests run as root here (chown needs it)
    assert os.geteuid() == 0, "this test needs root to give the file to another user"
    os.chown(path, 65534, 65534)
    with pytest.raises(rasource.RaError, match="owned by"):
        rasource.FileRaSource(path).credentials(uuid=UUID)


def test_unknown_card_and_missing_file(tmp_path):
    source = rasource.FileRaSource(toml_file(tmp_path))
    with pytest.raises(rasource.UnknownCard, match="no card"):
        source.credentials(uuid="555000000000", serial="0000000099")
    with pytest.raises(rasource.RaError, match="does not exist"):
        rasource.FileRaSource(tmp_path / "none.toml").credentials(uuid=UUID)


@pytest.mark.parametrize("text,message", [
    ("[cards\npuk = '1'", "not valid TOML"),
    ("[other]\nx = 1\n", "no \\[cards\\] table"),
    (f'[cards."1"]\npuk = "12"\n', "6 to 8 digits"),
    (f'[cards."1"]\npuk = 12345678\n', "puk must be a string"),
    (f'[cards."1"]\npuk = "{PUK}"\nmanagement_key = "zz"\n', "not hexadecimal"),
    (f'[cards."1"]\npuk = "{PUK}"\nmanagement_key = "0011"\n', "16 bytes"),
    (f'[cards."1"]\npuk = "{PUK}"\nmanagement_key_algorithm = "DES"\n', "unknown management"),
])
def test_malformed_file(tmp_path, text, message):
    path = private(tmp_path / "ra.toml", text)
    with pytest.raises(rasource.RaError, match=message) as e:
        rasource.FileRaSource(path).credentials(uuid="1", serial="1")
    assert PUK not in str(e.value)


def test_two_cards_of_one_holder_need_the_serial(tmp_path):
    entry = {"uuid": UUID, "puk": PUK}
    path = private(tmp_path / "ra.json", json.dumps({"cards": {"1": entry, "2": entry}}))
    with pytest.raises(rasource.RaError, match="2 cards"):
        rasource.FileRaSource(path).credentials(uuid=UUID)
    assert rasource.FileRaSource(path).credentials(uuid=UUID, serial="2").puk == PUK


def test_specs_and_registry(tmp_path):
    for bad in ("", "file", "file:", ":x"):
        with pytest.raises(rasource.RaError, match="NAME:ARGUMENT"):
            rasource.load_source(bad)
    with pytest.raises(rasource.RaError, match="unknown RA source 'hsm'.*file, simulated"):
        rasource.load_source("hsm:slot0")
    # the simulated RA is found through the entry point pyproject.toml declares
    assert "simulated" in rasource.available()


def test_production_code_does_not_import_the_simulators():
    """Loading the agent's RA module and the unlock ceremony (and listing the sources)
    imports no module of simulators/; only using the simulated source does. The card commands
    and ceremonies do not name the simulators (the demo and `sim` commands do, by design)."""
    code = ("import sys, token_agent.rasource as r, "
            "token_agent.ceremonies.cardunlock; r.available(); "
            "print(sorted(m for m in sys.modules if m.startswith('simulators')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=True).stdout.strip()
    assert out == "[]"
    card_code = [REPO_ROOT / "token_agent" / "cli" / "card.py", REPO_ROOT / "token_agent" /
                 "rasource.py", *(REPO_ROOT / "token_agent" / "ceremonies").glob("*.py")]
    for path in card_code:
        assert not re.search(r"(from|import) simulators", path.read_text()), path


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ra")
    pki.init_ca(directory / "ca")
    for n, uuid in enumerate(("555123456789", "555987654321")):
        issue_card(directory / "ca", name=f"Dr {n}", uuid=uuid, pin="123456",
                   out=directory / f"{n}.card")
    return directory / "ca"


def test_simulated_source_via_entry_point(ca):
    source = rasource.load_source(f"simulated:{ca}")
    assert type(source).__module__ == "simulators.card.ra"
    assert source.credentials(uuid="555123456789") == rasource.RaCredentials(
        *pki.admin_credentials(ca, "555123456789"))
    with pytest.raises(rasource.UnknownCard):
        source.credentials(uuid="555000000000")


def test_sim_ca_export_ra(ca, tmp_path):
    runner = CliRunner()
    target = tmp_path / "ra.toml"
    result = runner.invoke(main, ["sim", "ca", "export-ra", "--dir", str(ca), str(target),
                                  "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["cards"]) == 2
    assert os.stat(target).st_mode & 0o777 == 0o600
    simulated = rasource.load_source(f"simulated:{ca}")
    from_file = rasource.load_source(f"file:{target}")
    for uuid in ("555123456789", "555987654321"):
        assert from_file.credentials(uuid=uuid) == simulated.credentials(uuid=uuid)
    card = pki.load_ca(ca).find_card("555123456789")
    assert from_file.credentials(uuid="?", serial=card.guid).puk == card.puk
    for secret in (card.puk, card.management_key):
        assert secret not in result.output
    again = runner.invoke(main, ["sim", "ca", "export-ra", "--dir", str(ca), str(target)])
    assert again.exit_code == exitcodes.CONFLICT and "--force" in again.output
    assert runner.invoke(main, ["sim", "ca", "export-ra", "--dir", str(ca), str(target),
                                "--force"]).exit_code == 0
