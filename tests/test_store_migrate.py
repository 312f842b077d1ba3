"""Issue 14: ``token-agent store migrate --to URL`` and ``token-agent store check``, through
the real command against the session's own PostgreSQL (``pg_server``).

A workstation's SQLite store with a user of every kind of secret is copied into an empty
PostgreSQL database: the counts and the audit chain are verified, the copied secrets still
work with the data directory's key file (a TOTP code and a password are accepted through the
PostgreSQL store), a non-empty target is refused untouched, and ``store check`` reports the
engine, the schema version and the audit chain, and says what is wrong when it is."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from json_shapes import check_output
from test_cli_datadir import clean_env
from test_cli_datadir import run as run_cli
from token_agent import exitcodes
from token_agent.agent import Agent
from token_agent.factors import backup, password, totp
from token_agent.store import SCHEMA_VERSION, Store
from token_agent.store.copy import COPY_ORDER, NOT_COPIED, row_counts
from token_agent.store.url import STORE_URL_ENV

pytestmark = [pytest.mark.sqlite_only,  # the source is a SQLite file by design
              pytest.mark.store_contract]

PASSWORD = "correct horse battery staple"


def run(env: dict, *args, expect: int | None = 0, input: str = "") -> subprocess.CompletedProcess:
    proc = run_cli(env, *args, expect=expect, input=input)
    if "--json" in args:
        check_output(args, proc.stdout, proc.returncode)  # the README's shapes
    return proc


@pytest.fixture
def env(tmp_path: Path) -> dict:
    return clean_env(tmp_path, TOKEN_AGENT_DATA_DIR=str(tmp_path / "data"))


@pytest.fixture
def source(env: dict) -> dict:
    """A SQLite store with a bit of everything; returns what the test needs to know."""
    data = Path(env["TOKEN_AGENT_DATA_DIR"])
    agent = Agent.open(data, environ={})
    try:
        ctx, store = agent.factors(), agent.store
        alice = store.add_user("alice", roles=["clinician"])
        bob = store.add_user("bob")
        password.set_password(ctx, alice.id, PASSWORD)
        e = totp.begin_enrol(ctx, alice.id)
        assert totp.confirm_enrol(ctx, alice.id, totp.code_at(e.secret, time.time() - 30),
                                  name=e.method.name).ok
        backup.generate(ctx, bob.id)
        store.add_fido_credential(bob.id, name="yubikey", credential_id=b"\x01" * 32,
                                  public_key=b"\x02" * 77, aaguid=bytes(16), rp_id="localhost",
                                  sign_count=7, discoverable=True, uv_enrolled=True,
                                  attestation_format="none", attestation_trusted=False)
        store.add_session("s" * 32, bob.id, method="fido2")
        store.set_setting("rp_id", "workstation.example.nhs.uk")
        for i in range(5):
            store.record_event("test.event", outcome="success", user_id=alice.id,
                               detail={"n": i})
        return {"secret": e.secret, "counts": row_counts(store),
                "events": store.verify_events()}
    finally:
        agent.close()


def test_copy_order_names_every_table(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store, store.connection("list tables") as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    assert tables == set(COPY_ORDER) | set(NOT_COPIED)


def test_migrate_then_use_the_copy(env: dict, source: dict, pg_url: str) -> None:
    proc = run(env, "store", "migrate", "--to", pg_url, "--json")
    out = json.loads(proc.stdout)["migrated"]
    assert out["rows"] == source["counts"] and out["audit_events"] == source["events"]
    assert out["schema_version"] == SCHEMA_VERSION and "@" in out["target"]
    # the copy is what the agent now uses: check it, then log in with the copied secrets
    pg_env = {**env, STORE_URL_ENV: pg_url}
    check = json.loads(run(pg_env, "store", "check", "--json").stdout)["store"]
    assert check["ok"] and check["engine"] == "postgresql"
    assert check["schema_version"] == check["code_schema_version"] == SCHEMA_VERSION
    assert check["audit_events"] == source["events"]
    code = totp.code_at(source["secret"], time.time())
    run(pg_env, "verify", "totp", "--user", "alice", "--code", code)
    run(pg_env, "verify", "totp", "--user", "alice", "--code", code,
        expect=exitcodes.AUTH_FAILED)  # replayed: the step moved on the copy
    run(pg_env, "verify", "password", "--user", "alice", "--code-stdin", input=PASSWORD + "\n")
    with Store.open(pg_url) as copy:
        assert copy.get_user("ALICE").roles == ["clinician"]
        assert copy.get_fido_credential(b"\x01" * 32).sign_count == 7
        assert copy.get_setting("rp_id") == "workstation.example.nhs.uk"
        # ids the database generates follow the copied ones
        method = copy.add_method(copy.get_user("bob").id, "email", "work")
        assert method.id > max(m.id for m in copy.list_methods(copy.get_user("alice").id))
        assert copy.verify_events() > source["events"]  # the verifications were recorded


def test_a_target_that_holds_data_is_refused_untouched(env: dict, source: dict,
                                                        pg_url: str) -> None:
    with Store.open(pg_url) as target:
        target.add_user("someone-else")
        before = row_counts(target)
    proc = run(env, "store", "migrate", "--to", pg_url, "--json", expect=exitcodes.CONFLICT)
    error = json.loads(proc.stdout)["error"]
    assert error["reason"] == "not-empty" and "not empty" in error["message"]
    with Store.open(pg_url) as target:
        assert row_counts(target) == before


def test_migrate_refuses_a_password_in_the_url(env: dict, source: dict) -> None:
    proc = run(env, "store", "migrate", "--to", "postgresql://u:hunter22@db/x",
               expect=exitcodes.USAGE)
    assert "password" in proc.stderr and "hunter22" not in proc.stderr


def test_store_check_on_sqlite_and_a_broken_chain(env: dict, source: dict) -> None:
    check = json.loads(run(env, "store", "check", "--json").stdout)["store"]
    assert check["ok"] and check["engine"] == "sqlite" and check["audit_events"] == source["events"]
    path = Path(env["TOKEN_AGENT_DATA_DIR"]) / "token-agent.db"
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_events_no_update")
    conn.execute("UPDATE audit_events SET detail = '{\"n\": 99}' WHERE id = 2")
    conn.commit()
    conn.close()
    proc = run(env, "store", "check", "--json", expect=exitcodes.STORE)
    doc = json.loads(proc.stdout)
    assert doc["error"]["reason"] == "store-problems"
    assert any("audit" in p and "2" in p for p in doc["store"]["problems"])


def test_store_check_when_the_server_is_down(env: dict, pg_server, pg_url: str) -> None:
    pg_env = {**env, STORE_URL_ENV: pg_url}
    run(pg_env, "users", "add", "carol")
    pg_server.stop()
    try:
        proc = run(pg_env, "store", "check", expect=exitcodes.STORE)
        assert "cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        pg_server.restart()
    assert json.loads(run(pg_env, "store", "check", "--json").stdout)["store"]["ok"]
