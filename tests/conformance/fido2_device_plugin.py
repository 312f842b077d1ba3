"""pytest plugin: run python-fido2's device test suite (``tests/device`` in its sdist) against
the virtual key instead of USB keys.

The suite's conftest does ``from fido2.hid import list_descriptors, open_connection,
open_device`` (names bound at import), so python-fido2's discovery must be replaced *before*
that conftest is imported. This plugin is loaded with ``-p fido2_device_plugin`` (its
directory on PYTHONPATH) and does the replacement in ``pytest_load_initial_conftests``, which
pytest calls for ``-p`` plugins before it imports any conftest.

It is loaded by its bare module name, not as ``tests.conformance...``: the sdist's own tests
are the package ``tests``, and importing ours under that name first would shadow it.

The suite's ``PicoController`` drives ``--controller`` with plain GETs (``urlopen(url)``),
which the virtual key's control interface refuses for anything that changes state (a web page
can send a GET). :func:`adapt_controller` makes its requests POSTs with the
``X-Token-Agent-Sim`` header through ``simulators.key.control.KeyControl``, so the suite runs
unchanged against a controller that stays strict for everyone else.

Configuration: ``TOKEN_AGENT_CONFORMANCE_KEY=host:port`` (the virtual key's socket).
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

ENV = "TOKEN_AGENT_CONFORMANCE_KEY"
PREFLIGHT_TIMEOUT = 15.0  # seconds for the key to show up in fido2.hid.list_descriptors()
_installed: list[tuple[str, int]] = []


def parse_address(value: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{ENV} must be host:port, not {value!r}")
    return host.strip("[]"), int(port)


def install() -> list[tuple[str, int]]:
    """Replace python-fido2's HID discovery with the virtual key named by the environment."""
    value = os.environ.get(ENV)
    if not value:
        raise pytest.UsageError(f"{ENV}=host:port is not set (the virtual key to test)")
    try:
        address = parse_address(value)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if "tests.device.conftest" in sys.modules:
        raise pytest.UsageError(
            "the device suite's conftest was imported before fido2_device_plugin: "
            "load the plugin with -p so it can replace fido2.hid discovery first"
        )

    import fido2.hid

    before = fido2.hid.list_descriptors
    try:
        from drivers.fido.discovery import install_into_fido2
    except ImportError as e:
        raise pytest.UsageError(
            f"cannot import drivers.fido.discovery.install_into_fido2: {e}"
        ) from None
    install_into_fido2([address])
    if fido2.hid.list_descriptors is before:
        raise pytest.UsageError("install_into_fido2 did not replace fido2.hid.list_descriptors")
    _installed[:] = [address]
    return _installed


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    install()


def pytest_report_header(config):
    keys = ", ".join(f"{h}:{p}" for h, p in _installed) or "none"
    return f"token-agent conformance: fido2.hid discovery sees only the virtual key(s) {keys}"


def adapt_controller() -> None:
    """Send the suite's controller requests (``PicoController._request(path)``) as the
    virtual key's control interface requires: GET for ``/`` (its reachability check), POST
    with the custom header for the touch and power paths."""
    from urllib.parse import urlsplit

    suite = sys.modules.get("tests.device")
    controller = getattr(suite, "PicoController", None)
    if controller is None or not callable(getattr(controller, "_request", None)):
        raise pytest.UsageError(
            "the device suite's tests.device.PicoController._request was not found: "
            "the fido2 sdist changed, adapt fido2_device_plugin.adapt_controller"
        )
    from simulators.key.control import KeyControl

    def _request(self, path):
        url = urlsplit(self.base_url)
        control = KeyControl(port=url.port or 80, host=url.hostname or "127.0.0.1")
        return json.dumps(control.request("GET" if path == "/" else "POST", path)).encode()

    controller._request = _request


def pytest_sessionstart(session):
    """Adapt the suite's controller, and fail fast if the virtual key is not discoverable:
    the suite itself would poll for a device forever."""
    if not _installed:
        return
    adapt_controller()
    import fido2.hid

    deadline = time.monotonic() + PREFLIGHT_TIMEOUT
    found: list = []
    error = None
    while time.monotonic() < deadline:
        try:
            found = list(fido2.hid.list_descriptors())
            error = None
        except Exception as e:  # report it below, with the address
            error = e
        if found:
            return
        time.sleep(0.2)
    where = ", ".join(f"{h}:{p}" for h, p in _installed)
    detail = f" (last error: {error!r})" if error else ""
    pytest.exit(f"no virtual key found by fido2.hid.list_descriptors() at {where}{detail}", 3)
