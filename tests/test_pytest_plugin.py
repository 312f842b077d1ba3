"""token-agent's pytest plugin (simulators/pytest_plugin.py), as this suite loads it through its
``pytest11`` entry point: its fixtures, driven with python-fido2 and pyscard, and its failure
when pcscd is missing (a failure naming the packages, never a skip). The plugin used from a
fresh venv outside the repository: tests/test_plugin_outside.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
from fido2.ctap import CtapError
from fido2.ctap2 import Ctap2

import simulators.pytest_plugin as plugin


def test_the_plugin_is_loaded_through_its_entry_point(request):
    (entry,) = [e for e in entry_points(group="pytest11") if e.name == "token_agent_simulators"]
    assert entry.value == "simulators.pytest_plugin"
    assert request.config.pluginmanager.get_plugin("token_agent_simulators") is plugin


def test_virtual_key_device_is_a_ctap2_device(virtual_key, virtual_key_device):
    info = Ctap2(virtual_key_device).get_info()
    assert "FIDO_2_1" in info.versions
    assert virtual_key.handle_count == 1  # the device's own handle on the key


def test_fault_injection_and_presence_in_process(virtual_key, virtual_key_device):
    ctap = Ctap2(virtual_key_device)
    virtual_key.set_faults(fail_next=1, fail_status=0x31)
    with pytest.raises(CtapError) as e:
        ctap.get_info()
    assert e.value.code == 0x31
    assert "FIDO_2_1" in ctap.get_info().versions  # one failure only
    virtual_key.presence.set_mode("deny")
    with pytest.raises(CtapError) as e:
        ctap.selection()
    assert e.value.code == CtapError.ERR.OPERATION_DENIED


@pytest.mark.virtual_key(presence="manual", touch_timeout=0.3)
def test_the_marker_sets_the_keys_options(virtual_key, virtual_key_device):
    assert virtual_key.presence.mode.value == "manual" and virtual_key.presence.timeout == 0.3
    with pytest.raises(CtapError) as e:
        Ctap2(virtual_key_device).selection()  # nobody touches
    assert e.value.code == CtapError.ERR.USER_ACTION_TIMEOUT


def test_virtual_key_server_and_its_control_interface(virtual_key, virtual_key_server):
    device = virtual_key_server.open_device(read_timeout=5)
    assert "FIDO_2_1" in Ctap2(device).get_info().versions
    control = virtual_key_server.control
    status = control.status()
    assert status["connections"] == 1 and status["hid"]["port"] == virtual_key_server.port
    assert virtual_key_server.address == f"127.0.0.1:{virtual_key_server.port}"
    assert virtual_key_server.control_url == f"http://127.0.0.1:{virtual_key_server.control_port}"
    control.set_presence("deny")
    assert virtual_key.presence.mode.value == "deny"  # the same key as the in-process fixture
    control.unplug()
    with pytest.raises(OSError):
        Ctap2(device).get_info()
    control.plug()
    assert "FIDO_2_1" in Ctap2(virtual_key_server.open_device(read_timeout=5)).get_info().versions


def test_nhs_pki_and_virtual_card_in_process(nhs_pki, virtual_card, virtual_card_connection):
    from cryptography import x509

    from simulators.card.issuance import card_certificate

    data, sw1, sw2 = virtual_card_connection.transmit(
        bytes.fromhex("00A4040009A0000003080000100000"))
    assert sw1 in (0x90, 0x61)
    cert = card_certificate(virtual_card.card)
    issuing = x509.load_pem_x509_certificate(nhs_pki.issuing_certificate.read_bytes())
    cert.verify_directly_issued_by(issuing)
    assert virtual_card.card.holder_uuid == plugin.DEFAULT_CARD["uuid"]
    nhs_pki.revoke(virtual_card.card.holder_uuid)
    crl = x509.load_der_x509_crl(nhs_pki.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


@pytest.mark.virtual_card(name="Dr Bob Jones", uuid="555987654321", algorithm="ECCP256")
def test_the_marker_sets_the_cards_options(virtual_card):
    assert (virtual_card.card.holder_name, virtual_card.card.holder_uuid) == \
        ("Dr Bob Jones", "555987654321")
    assert virtual_card.card.keys["9a"].algorithm == "ECCP256"


def test_pcscd_card_is_in_the_real_pcscd(pcscd_card):
    from smartcard.System import readers

    (reader,) = [r for r in readers() if str(r) == pcscd_card.reader]
    connection = reader.createConnection()
    connection.connect()
    try:
        assert bytes(connection.getATR()) == pcscd_card.card.atr
        _, sw1, _ = connection.transmit(list(bytes.fromhex("00A4040009A0000003080000100000")))
        assert sw1 in (0x90, 0x61)
    finally:
        connection.disconnect()
    assert pcscd_card.bridge.inserted


def test_without_pcscd_the_fixture_fails_with_the_packages_to_install(tmp_path):
    """In another pytest, pcscd neither runs nor is installed: ``pcscd_card`` errors with the
    Debian packages and what to run, and nothing is skipped."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        from simulators.card import pcscd
        pcscd.establish_context = lambda: None   # pcscd does not answer ...
        pcscd.find_pcscd = lambda: None          # ... and is not installed
        pcscd.LOCK_FILE = pcscd.Path({str(tmp_path / "lock")!r})  # not this session's lock
    """))
    (tmp_path / "test_card.py").write_text("def test_card(pcscd_card):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 error" in proc.stdout and "skipped" not in proc.stdout, proc.stdout
    assert "sudo apt-get install -y pcscd vsmartcard-vpcd" in proc.stdout, proc.stdout
    assert "pcscd is not installed" in proc.stdout, proc.stdout


def test_the_readmes_example_test_file_passes(tmp_path):
    """README.md, "Testing your own login code": its test file, as it stands, in a directory
    of its own, run by pytest with this venv (where token-agent is installed)."""
    from readme_blocks import blocks

    (example,) = [b for b in blocks() if b.section == "Testing your own login code"
                  and b.lang == "python"]
    assert example.text.startswith("# test_login.py\n")
    (tmp_path / "test_login.py").write_text(example.text)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout.splitlines()[-1], proc.stdout
