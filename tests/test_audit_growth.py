"""Issue 11, item 3: the audit log cannot be used to fill the disk or forge lines.

* user names are checked wherever they come in (``token_agent.usernames``): a bad one is a
  ``bad-request`` on the socket (never audited, never echoed) and exit 2 from the CLI;
* refused requests are counted per (caller, op), not recorded one by one
  (``token_agent/service/refusals.py``): a 2-second flood from ``nobody`` with 7 KB names
  and with valid ones grows the store by less than 100 KB, and the count comes out in one
  summary event at stop; so are the logins of unknown users (``nobody`` logging itself in
  again and again, with no agent user);
* an oversize audit detail or user name is cut with a marker, never dropped, and the hash
  chain still verifies;
* ``audit tail`` escapes control characters (a name with a newline and ESC forges nothing);
* the service warns when the store grows past ``[store] size_warning_mb``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from conftest import REPO_ROOT, environ_for_agent
from test_cli_mfa import cli  # noqa: F401  (fixture)
from test_service import (IS_ROOT, NOBODY, services, socket_dir, wait_for,  # noqa: F401
                          world)
from token_agent.service.client import ServiceError

HUGE = "A" * 7000
FLOOD_SECONDS = 2.0


def store_bytes(data: Path) -> int:
    """The store file and its write-ahead log; with ``--store-engine postgresql``, the
    test's database (``pg_database_size``)."""
    url = os.environ.get("TOKEN_AGENT_STORE_URL")
    if url:
        import psycopg

        with psycopg.connect(url) as conn:
            return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return sum(p.stat().st_size for p in (data / "token-agent.db", data / "token-agent.db-wal")
               if p.exists())


def loop_as_nobody(socket_path: Path, seconds: float, body: str) -> dict:
    """Run ``body`` again and again for ``seconds`` as ``nobody`` (a child that drops to uid
    65534), on one connection ``c``; ``body`` sets ``key``, counted. Returns the counts."""
    script = textwrap.dedent(f"""
        import json, os, sys, time
        from token_agent.service.client import Client, ServiceError
        if os.geteuid() == 0:
            os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        assert os.geteuid() == {NOBODY}
        counts = {{}}
        deadline = time.monotonic() + float(sys.argv[2])
        i = 0
        with Client(sys.argv[1], timeout=15) as c:
            while time.monotonic() < deadline:
                i += 1
        BODY
        print(json.dumps(counts))
    """).replace("BODY", textwrap.indent(textwrap.dedent(body).strip("\n"), " " * 8))
    proc = subprocess.run([sys.executable, "-c", script, str(socket_path), str(seconds)],
                          cwd="/", capture_output=True, text=True, timeout=60 + seconds,
                          env=environ_for_agent()
                          | {"PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flood_as_nobody(socket_path: Path, seconds: float) -> dict:
    """``methods.list`` for a 7 KB name, for alice, and for a new valid 64-character name
    each time (all refused); the answers' codes counted by (kind of name, code)."""
    return loop_as_nobody(socket_path, seconds, """
        for kind, name in (("huge", "A" * 7000 + str(i)), ("alice", "alice"),
                           ("valid", "u" + str(i).zfill(63))):
            try:
                c.request("methods.list", user=name)
                code = "ok"
            except ServiceError as e:
                code = e.code
            key = kind + ":" + code
            counts[key] = counts.get(key, 0) + 1
    """)


def logins_as_nobody(socket_path: Path, seconds: float) -> dict:
    """``nobody`` (no agent user) logging itself in with a password, again and again; the
    results' reasons counted."""
    return loop_as_nobody(socket_path, seconds, """
        try:
            key = c.login(None, lambda prompt: "x", primary="password").get("reason") or "ok"
        except ServiceError as e:
            key = e.code
        counts[key] = counts.get(key, 0) + 1
    """)


# --------------------------------------------------------------------------- the flood


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become nobody (SO_PEERCRED test)")
def test_a_flood_of_refused_requests_barely_grows_the_store(services, world):
    world.user("alice", password=True)
    svc = services()
    world.store.record_event("test.mark", outcome="success")  # the WAL exists before we measure
    before = store_bytes(svc.data)
    counts = flood_as_nobody(svc.socket, FLOOD_SECONDS)
    grown = store_bytes(svc.data) - before
    print(f"flood: {counts}; store grew by {grown} bytes")
    assert sum(counts.values()) >= 150, counts   # the flood did happen
    assert grown < 100_000, f"the store grew by {grown} bytes in {FLOOD_SECONDS:g} s: {counts}"
    assert set(counts) == {"huge:bad-request", "alice:forbidden", "valid:forbidden"}, counts

    # the first refusals of each op are recorded in full, the rest counted: one summary at stop
    assert svc.signal(signal.SIGTERM) == 0
    refused = world.events("service.refused", peer_uid=NOBODY)
    full = [e for e in refused if e.outcome == "refused"]
    [summary] = [e for e in refused if e.outcome == "repeated"]
    assert len(full) == 3 and all(len(e.username) <= 64 for e in full)
    forbidden = counts["alice:forbidden"] + counts["valid:forbidden"]
    assert summary.detail["count"] == forbidden - 3
    assert summary.detail["op"] == "methods.list" and summary.detail["peer_user"] == "nobody"
    assert "alice" in summary.detail["targets"] and len(summary.detail["targets"]) <= 8
    assert not any(HUGE[:100] in json.dumps(e.to_dict()) for e in refused)
    assert HUGE[:100] not in svc.output()  # nor in the service's log
    assert world.store.verify_events() >= 5


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become nobody (SO_PEERCRED test)")
def test_a_flood_of_logins_by_an_unknown_account_barely_grows_the_store(services, world):
    svc = services()
    world.store.record_event("test.mark", outcome="success")
    before = store_bytes(svc.data)
    counts = logins_as_nobody(svc.socket, FLOOD_SECONDS)
    grown = store_bytes(svc.data) - before
    print(f"logins: {counts}; store grew by {grown} bytes")
    assert counts.get("unknown-user", 0) >= 10, counts   # the flood did happen (an unknown
    # user's login takes as long as a known one's: not thousands a second any more)
    assert grown < 100_000, f"the store grew by {grown} bytes in {FLOOD_SECONDS:g} s: {counts}"
    assert set(counts) == {"unknown-user"}, counts  # every login still answered as before

    assert svc.signal(signal.SIGTERM) == 0
    logins = world.store.list_events(kind="login", limit=100)
    full = [e for e in logins if e.outcome == "failure"]
    [summary] = [e for e in logins if e.outcome == "repeated"]
    # each says why, and where from (the login events' where-fields: device, network)
    assert len(full) == 3 and all(e.detail["reason"] == "unknown-user" for e in full)
    assert all(set(e.detail) <= {"reason", "device", "device_ref", "joined", "network"}
               for e in full)
    assert summary.detail["count"] == counts["unknown-user"] - 3
    assert summary.detail["users"] == ["nobody"] and summary.detail["reason"] == "unknown-user"
    assert world.store.verify_events() >= 5


def test_the_refusals_of_a_window_are_counted_and_summed_up():
    from token_agent.service.authz import Peer
    from token_agent.service.refusals import Refusals

    class Recorder:
        def __init__(self):
            self.events = []
            self.written = threading.Event()

        def record_event(self, kind, **kw):
            self.events.append((kind, kw["outcome"], kw["detail"]))
            self.written.set()

    now = [100.0]
    rec = Recorder()
    refusals = Refusals(lambda: rec, window=0.3, burst=2, clock=lambda: now[0])
    mallory = Peer(pid=7, uid=1234, gid=1234, user="mallory")
    for i in range(50):
        refusals.refused(mallory, "methods.list", f"user{i % 12}")
    refusals.refused(mallory, "admin.unlock", "alice")
    assert [o for _, o, _ in rec.events] == ["refused", "refused", "refused"]
    assert rec.events[2][2]["op"] == "admin.unlock"
    # the window closes: the timer writes one summary for the 48 counted
    rec.written.clear()
    now[0] += 1.0
    assert rec.written.wait(5.0)
    kind, outcome, detail = rec.events[3]
    assert (kind, outcome, detail["count"], detail["op"]) == \
        ("service.refused", "repeated", 48, "methods.list")
    assert detail["targets"] == [f"user{i}" for i in range(2, 10)]  # 8 distinct, in order
    # a new window: recorded in full again; close() writes what is counted at once
    for _ in range(5):
        refusals.refused(mallory, "methods.list", "alice")
    refusals.close()
    assert [o for _, o, _ in rec.events[4:]] == ["refused", "refused", "repeated"]
    assert rec.events[-1][2]["count"] == 3
    assert len(rec.events) == 7


# --------------------------------------------------------------------------- user names


def test_user_names_are_checked_on_the_socket(services, world):
    world.user("alice")
    svc = services()
    with svc.client() as c:
        for bad in (HUGE, "a" * 65, "bob\n  1 forged", "ålice", "", "x y"):
            with pytest.raises(ServiceError) as info:
                c.request("methods.list", user=bad)
            assert info.value.code == "bad-request", bad
            assert "is not a user name" in info.value.message
            assert bad[:20] not in info.value.message or not bad  # never echoed
        with pytest.raises(ServiceError) as info:
            c.request("login.start", user=HUGE)
        assert info.value.code == "bad-request"
        assert c.request("methods.list", user="alice") == {"methods": []}
    assert world.events("service.refused") == []
    assert HUGE[:100] not in svc.output()


def test_user_names_are_checked_by_the_cli(cli):  # noqa: F811
    for bad in ("a" * 65, "bob\nroot", "x y", "ålice", "bob\x1b[2J"):
        proc = cli("users", "add", bad, expect=2)
        assert "invalid username" in proc.stderr and len(proc.stderr) < 300, proc.stderr
        assert proc.stderr.count("\n") == 1 and "\x1b" not in proc.stderr  # escaped
    proc = cli("users", "add", HUGE, expect=2)
    assert "at most 64 characters" in proc.stderr and len(proc.stderr) < 300
    cli("users", "add", "a" * 64)
    cli("users", "add", "dr.alice_smith-2@example.nhs.uk")


def test_the_one_rule_for_user_names():
    from token_agent.usernames import MAX_USERNAME_LEN, check_username, is_username

    assert MAX_USERNAME_LEN == 64
    for good in ("alice", "a" * 64, "Alice.Smith", "a_b-c@d.e", "0"):
        assert is_username(good) and check_username(good) == good
    for bad in ("", "a" * 65, "a b", "a\n", "a\x1b", "å", "a/b", "a;b", None, 7):
        assert not is_username(bad)
        with pytest.raises(ValueError):
            check_username(bad)


# --------------------------------------------------------------------------- the store


def test_an_oversize_event_is_cut_not_dropped_and_the_chain_verifies(cli):  # noqa: F811
    from token_agent.store import MAX_DETAIL_BYTES, Store

    cli("users", "add", "alice")
    with Store.open(cli.db) as store:
        a = store.record_event("service.refused", username="y" * 7000, outcome="refused",
                               detail={"target": "x" * 50_000, "op": "methods.list"})
        b = store.record_event("test.big", outcome="failure",
                               detail={"items": ["z" * 1000] * 40})
        c = store.record_event("test.small", outcome="success", detail={"n": 1})
        events = {e.id: e for e in store.list_events(limit=10)}
        assert store.verify_events() >= 3
    ea, eb, ec = events[a], events[b], events[c]
    assert ea.username.startswith("y" * 64) and ea.username.endswith(
        "...[truncated: 7000 characters]") and len(ea.username) < 100
    assert ea.detail["op"] == "methods.list"
    assert ea.detail["target"] == "x" * 1024 + "...[truncated: 50000 characters]"
    assert eb.detail["truncated"] is True and eb.detail["original_bytes"] > MAX_DETAIL_BYTES
    assert eb.detail["head"].startswith('{"items":["zzz')
    assert ec.detail == {"n": 1}
    assert "audit log intact" in cli("audit", "verify").stdout


def test_audit_tail_escapes_control_characters(cli):  # noqa: F811
    from token_agent.store import Store

    cli("users", "add", "alice")
    forged = "bob\n    99 2026-01-01 00:00:00 login        success  alice"  # < 64
    with Store.open(cli.db) as store:
        store.record_event("login", username=forged, outcome="failure",
                           detail={"reason": "unknown-user\r\x1b[2K\x1b]0;owned\x07",
                                   "note": "\u202etxt.exe"})
    out = cli("audit", "tail").stdout
    lines = out.splitlines()
    assert len(lines) == 2, out  # user.added and the login: nothing forged
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out and "\u202e" not in out
    assert "bob\\n    99" in lines[1] and "\\r\\x1b[2K\\x1b]0;owned\\x07" in lines[1]
    assert "\\u202etxt.exe" in lines[1]
    # --json keeps the exact text (JSON escapes it)
    data = json.loads(cli("audit", "tail", "--json").stdout)
    assert data["events"][-1]["username"] == forged


# --------------------------------------------------------------------------- the size alarm


def test_the_size_alarm_warns_at_most_once_an_interval(tmp_path, caplog):
    from token_agent.service.storesize import StoreSizeAlarm

    db = tmp_path / "token-agent.db"
    db.write_bytes(b"\0" * 700_000)
    Path(f"{db}-wal").write_bytes(b"\0" * 400_000)  # 1.05 MB together
    now = [0.0]
    alarm = StoreSizeAlarm(db, 1, check_every=10, repeat_every=3600, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="token_agent.service"):
        assert alarm.check()
        assert not alarm.check()
        now[0] += 60
        assert not alarm.check()     # warned less than an hour ago
        now[0] += 3600
        assert alarm.check()
    warnings = [r for r in caplog.records if "larger than its configured size" in r.message]
    assert len(warnings) == 2 and warnings[0].limit_mb == 1 and warnings[0].size_mb == 1.0
    assert not StoreSizeAlarm(db, 2, clock=lambda: 0.0).check()   # under the limit
    assert not StoreSizeAlarm(db, 0, clock=lambda: 0.0).check()   # 0: never


@pytest.mark.sqlite_only  # the alarm watches the SQLite file (PostgreSQL's server has the disk)
def test_the_service_warns_when_the_store_is_past_its_size(services, world):
    for i in range(80):  # about 1.3 MB of audit events
        world.store.record_event("test.fill", outcome="success", detail={"pad": f"{i}" * 15000})
    svc = services(start=False)
    text = svc.config.read_text().replace("[store]\n", "[store]\nsize_warning_mb = 1\n")
    svc.config.write_text(text)
    svc.start()
    with svc.client() as c:
        c.request("hello")
    wait_for(lambda: "larger than its configured size" in svc.output(), what="the size warning")
    line = next(json.loads(s) for s in svc.output().splitlines()
                if "larger than its configured size" in s)
    assert line["level"] == "warning" and line["limit_mb"] == 1 and line["size_mb"] > 1


def test_size_warning_mb_in_the_configuration():
    from token_agent.config import ConfigError, parse_config

    assert parse_config("").store.size_warning_mb == 1024
    assert parse_config("[store]\nsize_warning_mb = 0\n").store.size_warning_mb == 0
    assert parse_config("[store]\nsize_warning_mb = 50\n").store.size_warning_mb == 50
    for bad in ("-1", "2000000", "1.5", '"1G"', "true"):
        with pytest.raises(ConfigError, match="store.size_warning_mb"):
            parse_config(f"[store]\nsize_warning_mb = {bad}\n")
