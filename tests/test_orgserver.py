"""The organisation's server (issue 15, part A): `server init`, join tokens, mutual TLS,
revocation, failover and SIGTERM, with real TLS, a real PostgreSQL store and the server as a
separate process (`token-agent server run`)."""

from __future__ import annotations

import json
import stat

import pytest

from orgtest import join_workstation, org_server, start_org_server  # noqa: F401  (fixture)


def test_a_workstation_joins_and_is_known(org_server, tmp_path):
    ws = join_workstation(tmp_path / "ws1", org_server, "ws1")
    for name in ("workstation.key",):
        assert stat.S_IMODE((ws.org_dir / name).stat().st_mode) == 0o600
    assert ws.client().request("GET", "/v1/whoami")["workstation"] == "ws1"
    listed = json.loads(org_server.cli("server", "workstations", "--json").stdout)
    assert [(w["name"], w["state"]) for w in listed["workstations"]] == [("ws1", "joined")]
