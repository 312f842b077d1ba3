"""pytest fixtures for testing your own login code against token-agent's simulators.

Installed with token-agent (entry point ``pytest11``, name ``token_agent_simulators``): in an
environment where token-agent is installed, every test suite can use these fixtures without
importing anything (README.md, "Testing your own login code"). Each fixture is a thin layer
over the simulators' public API (README.md, "The virtual FIDO2 key" and "The virtual
NHS-style smartcard"), and cleans up after the test.

The virtual FIDO2 key:

* ``virtual_key``: a :class:`simulators.key.VirtualKey` in memory
  (:func:`simulators.key.create_virtual_key`; presence ``auto``). Options with the marker
  ``@pytest.mark.virtual_key(presence="manual", touch_timeout=2, state_file=...)``. Control it
  from the test: ``virtual_key.presence.touch()``, ``.presence.set_mode("deny")``,
  ``.set_faults(unplug_after_reports=3)``, ``.unplug()``, ``.plug()``, ``.power_cycle()``.
* ``virtual_key_device``: python-fido2's :class:`fido2.hid.CtapHidDevice` on ``virtual_key``,
  in process (:func:`simulators.key.open_in_process_device`): give it to ``Fido2Client``,
  ``Ctap2``, ``ClientPin``.
* ``virtual_key_server``: ``virtual_key`` served on TCP with its HTTP control interface
  (:class:`simulators.key.KeyServer` on free loopback ports): a :class:`ServedKey`, with
  ``address``, ``control_url``, ``control`` (a :class:`simulators.key.KeyControl`) and
  ``open_device()``.
* ``virtual_key_factory``: ``virtual_key_factory(state_file=None, presence="auto", **options)``
  makes more keys (same options as ``create_virtual_key``).

The virtual NHS-style smartcard:

* ``nhs_pki``: a simulated NHS-style PKI (root and issuing CA) in a temporary directory: a
  :class:`SimulatedPki`, which issues and revokes cards.
* ``virtual_card``: a :class:`simulators.card.card.VirtualCard` issued by ``nhs_pki`` to
  "Dr Alice Smith", UUID 555123456789, PIN 1234 (RSA 2048). Options with the marker
  ``@pytest.mark.virtual_card(name=..., uuid=..., pin=..., algorithm="ECCP256", variant=...)``.
* ``virtual_card_connection``: a connected, pyscard-like
  :class:`simulators.card.card.InProcessCardConnection` to ``virtual_card``.
* ``pcscd_card``: ``virtual_card`` inserted into the machine's real pcscd through vsmartcard's
  vpcd (a :class:`PcscdCard` with the ``reader`` name): any PC/SC client sees it.
* ``pcscd_service``: the machine's pcscd with vpcd's readers, for the session
  (:class:`simulators.card.pcscd.LockedPcscd`). When it cannot be had the test fails, naming
  the Debian packages to install and what to run; it never skips.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: the card ``virtual_card`` issues unless its marker says otherwise
DEFAULT_CARD = {"name": "Dr Alice Smith", "uuid": "555123456789", "pin": "1234"}
#: the Debian packages pcscd_card needs
PCSC_PACKAGES = "pcscd vsmartcard-vpcd"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "virtual_key(**options): options for the virtual_key fixture, as create_virtual_key "
        "takes them (presence, touch_timeout, state_file, msg_timeout, serial_number, single_host)",
    )
    config.addinivalue_line(
        "markers",
        "virtual_card(**options): options for the virtual_card fixture, as SimulatedPki.issue "
        "takes them (name, uuid, pin, algorithm, variant, validity_days)",
    )


def _marker_options(request: pytest.FixtureRequest, name: str) -> dict[str, Any]:
    marker = request.node.get_closest_marker(name)
    return dict(marker.kwargs) if marker else {}


# -- the virtual FIDO2 key -------------------------------------------------------------------------


@pytest.fixture
def virtual_key_factory():
    """``virtual_key_factory(state_file=None, presence="auto", **options)``: a new
    :class:`simulators.key.VirtualKey` (:func:`simulators.key.create_virtual_key`), closed
    at teardown."""
    from simulators.key import create_virtual_key

    keys = []

    def make(state_file=None, presence="auto", **options):
        key = create_virtual_key(state_file, presence, **options)
        keys.append(key)
        return key

    yield make
    for key in keys:
        key.close()


@pytest.fixture
def virtual_key(request, virtual_key_factory):
    """A virtual FIDO2 key in memory (options: ``@pytest.mark.virtual_key(...)``)."""
    return virtual_key_factory(**_marker_options(request, "virtual_key"))


@pytest.fixture
def virtual_key_device(virtual_key):
    """python-fido2's ``CtapHidDevice`` on ``virtual_key``, in process."""
    from simulators.key import open_in_process_device

    device = open_in_process_device(virtual_key)
    yield device
    device.close()


@dataclass
class ServedKey:
    """What ``virtual_key_server`` gives: the key on TCP, and its control interface."""

    key: Any  # simulators.key.VirtualKey
    server: Any  # simulators.key.KeyServer
    control: Any  # simulators.key.KeyControl
    _devices: list = field(default_factory=list, repr=False)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def control_port(self) -> int:
        return self.server.control_port

    @property
    def address(self) -> str:
        """``host:port`` of the HID reports (what ``TOKEN_AGENT_SIM_KEYS`` takes)."""
        return f"{self.host}:{self.port}"

    @property
    def control_url(self) -> str:
        return self.control.url

    def open_device(self, read_timeout: float | None = None):
        """A new python-fido2 ``CtapHidDevice`` over TCP (:func:`simulators.key.open_tcp_device`),
        closed at teardown."""
        from simulators.key import open_tcp_device

        device = open_tcp_device(self.host, self.port, read_timeout=read_timeout)
        self._devices.append(device)
        return device

    def _close_devices(self) -> None:
        for device in self._devices:
            try:
                device.close()
            except OSError:
                pass


@pytest.fixture
def virtual_key_server(virtual_key):
    """``virtual_key`` served on TCP (127.0.0.1, free ports) with its HTTP control interface."""
    from simulators.key import KeyControl, KeyServer

    with KeyServer(virtual_key, port=0, control_port=0) as server:
        served = ServedKey(virtual_key, server, KeyControl(server.control_port, server.host))
        yield served
        served._close_devices()


# -- the virtual NHS-style smartcard ---------------------------------------------------------------


@dataclass
class SimulatedPki:
    """What ``nhs_pki`` gives: a simulated NHS-style PKI in :attr:`directory`
    (:func:`simulators.card.pki.init_ca`)."""

    directory: Path
    _count: Any = field(default_factory=itertools.count, repr=False)

    @property
    def root_certificate(self) -> Path:
        """The root CA certificate (PEM): the trust anchor."""
        from simulators.card import pki

        return pki.root_cert_path(self.directory)

    @property
    def issuing_certificate(self) -> Path:
        """The issuing CA certificate (PEM): the intermediate a verifier needs."""
        from simulators.card import pki

        return pki.issuing_cert_path(self.directory)

    @property
    def crl(self) -> Path:
        """The current CRL (DER)."""
        from simulators.card import pki

        return pki.crl_path(self.directory)

    def issue(self, name: str = DEFAULT_CARD["name"], uuid: str = DEFAULT_CARD["uuid"],
              pin: str = DEFAULT_CARD["pin"], *, out: str | Path | None = None,
              **options: Any) -> Path:
        """Issue a card (:func:`simulators.card.issuance.issue_card`; ``options``:
        ``algorithm="RSA2048"|"ECCP256"``, ``variant="expired"|"expiring"|"revoked"|
        "untrusted"|"blocked"``, ``validity_days``); returns its card file."""
        from simulators.card.issuance import issue_card

        if out is None:
            out = self.directory.parent / f"card-{uuid}-{next(self._count)}.card"
        issue_card(self.directory, name=name, uuid=uuid, pin=pin, out=out, **options)
        return Path(out)

    def load(self, card_file: str | Path):
        """The :class:`simulators.card.card.VirtualCard` in ``card_file``."""
        from simulators.card.card import VirtualCard

        return VirtualCard.load(card_file)

    def revoke(self, uuid: str, reason: str = "keyCompromise") -> None:
        """Revoke every card of ``uuid`` and publish a new CRL
        (:func:`simulators.card.pki.revoke`)."""
        from simulators.card import pki

        pki.revoke(self.directory, uuid=uuid, reason=reason)


@pytest.fixture
def nhs_pki(tmp_path_factory) -> SimulatedPki:
    """A simulated NHS-style PKI (RSA 2048) in a directory of its own."""
    from simulators.card.pki import init_ca

    directory = tmp_path_factory.mktemp("nhs-pki") / "ca"
    init_ca(directory)
    return SimulatedPki(directory)


@pytest.fixture
def virtual_card(request, nhs_pki):
    """A virtual card issued by ``nhs_pki`` (options: ``@pytest.mark.virtual_card(...)``)."""
    options = {**DEFAULT_CARD, **_marker_options(request, "virtual_card")}
    return nhs_pki.load(nhs_pki.issue(**options))


@pytest.fixture
def virtual_card_connection(virtual_card):
    """A connected, pyscard-like connection to ``virtual_card``, in process."""
    from simulators.card.card import InProcessCardConnection

    connection = InProcessCardConnection(virtual_card)
    connection.connect()
    yield connection
    connection.disconnect()


def start_pcscd(log_dir: Path, unavailable) -> Any:
    """The session's :class:`simulators.card.pcscd.LockedPcscd`, started; when pcscd cannot
    be had, ``unavailable(message)`` (which fails or skips the test)."""
    from simulators.card.pcscd import LockedPcscd, PcscdUnavailable

    service = LockedPcscd(log_dir)
    try:
        service.start()
    except PcscdUnavailable as e:
        unavailable(str(e))
    return service


def _fail_without_pcscd(message: str) -> None:
    pytest.fail(
        f"this test needs pcscd with vsmartcard-vpcd's virtual readers (Debian: "
        f"`sudo apt-get install -y {PCSC_PACKAGES}`, then `sudo systemctl restart pcscd`, or "
        f"run the tests as root so that pcscd is started here): {message}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def pcscd_service(tmp_path_factory):
    """The machine's pcscd with vpcd's readers, for the whole session: found running, or
    started here (root). Fails, saying what to install or run, when it cannot be had."""
    service = start_pcscd(tmp_path_factory.mktemp("pcscd"), _fail_without_pcscd)
    yield service
    service.stop()


@dataclass
class PcscdCard:
    """What ``pcscd_card`` gives: a virtual card in a vpcd reader of the real pcscd."""

    reader: str  # as pcscd names it, e.g. "Virtual PCD 00 00"
    card: Any  # simulators.card.card.VirtualCard
    bridge: Any  # simulators.card.vpcd.VpcdBridge


@pytest.fixture
def pcscd_card(pcscd_service, virtual_card):
    """``virtual_card`` in vpcd's first reader of the real pcscd, seen as present by PC/SC
    clients when the test starts; removed at teardown."""
    from simulators.card.pcscd import insert_card, remove_card, wait_for_card

    reader = pcscd_service.reader(0)
    bridge = insert_card(pcscd_service, virtual_card, slot=0)
    try:
        wait_for_card(pcscd_service.context, reader, present=True)
        yield PcscdCard(reader, virtual_card, bridge)
    finally:
        remove_card(bridge)
