"""tests/pgserver.py: the throwaway PostgreSQL cluster the store's tests and benchmarks run on
(Debian's PostgreSQL 15, started as the postgres user when we are root)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from pgserver import PgServer, PgServerError

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_is_private_and_runs_unprivileged(pg_server, pg_url, request):
    with psycopg.connect(pg_url) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()[0]
        listen = conn.execute("SHOW listen_addresses").fetchone()[0]
        fsync = conn.execute("SHOW fsync").fetchone()[0]
        dbname = conn.execute("SELECT current_database()").fetchone()[0]
    assert int(version) // 10000 == 15
    assert listen == ""  # no TCP at all: the socket only
    assert fsync == "off"
    assert pg_url.startswith("postgresql://postgres@/") and dbname in pg_url
    st = pg_server.socket_dir.stat()
    # with --store-engine postgresql the suite's subprocesses of other users (nobody, the
    # service's user) enter it too (conftest._store_on_postgresql): 0711, never listable
    opened = request.config.getoption("store_engine") == "postgresql"
    assert stat.S_IMODE(st.st_mode) == (0o711 if opened else 0o700)
    if os.geteuid() == 0:  # PostgreSQL refuses root: the server is the postgres user's
        assert pwd.getpwuid(pg_server.data_dir.stat().st_uid).pw_name == "postgres"
        assert pwd.getpwuid(st.st_uid).pw_name == "postgres"


def test_databases_are_created_and_dropped(pg_server):
    url = pg_server.create_database("pgserver_made")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (a int)")
    held = psycopg.connect(url)  # a session still open: dropped all the same (FORCE)
    pg_server.drop_database("pgserver_made")
    held.close()
    names = [r[0] for r in pg_server.execute("SELECT datname FROM pg_database")]
    assert "pgserver_made" not in names
    with pytest.raises(ValueError):
        pg_server.create_database("x; DROP DATABASE postgres")


def test_password_role_must_give_its_password(pg_server):
    pg_server.add_role("pgserver_pw", "right'pass")
    url = pg_server.url("postgres", user="pgserver_pw")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url, password="wrong", connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(url, connect_timeout=5)
    with psycopg.connect(url, password="right'pass") as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "pgserver_pw"
    with psycopg.connect(pg_server.url("postgres")) as conn:  # everyone else: trusted
        assert conn.execute("SELECT current_user").fetchone()[0] == "postgres"


def test_restart_keeps_data_and_kill_loses_the_open_transaction(pg_server, pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (a int)")
        conn.execute("INSERT INTO t VALUES (1)")
    pg_server.restart()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (3)")  # committed just before the kill: kept
    open_tx = psycopg.connect(pg_url)
    open_tx.execute("INSERT INTO t VALUES (2)")  # never committed
    pg_server.kill()
    assert not pg_server.running()
    with pytest.raises(psycopg.OperationalError):
        open_tx.execute("SELECT 1")
    pg_server.restart()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT a FROM t ORDER BY a").fetchall() == [(1,), (3,)]


def test_a_server_that_cannot_start_names_the_step_and_its_log():
    base = Path(tempfile.mkdtemp(prefix="token-agent-pg-"))
    base.chmod(0o711)
    server = PgServer.start(base)
    try:
        conf = server.data_dir / "postgresql.conf"
        server._write_as_owner(conf, conf.read_text() + "\nshared_buffers = 'lots'\n")
        with pytest.raises(PgServerError) as raised:
            server.restart()
        message = str(raised.value)
        assert "pg_ctl start failed" in message
        assert "server log (tail)" in message and "shared_buffers" in message
        with pytest.raises(PgServerError, match="exists already"):
            PgServer.start(base)
    finally:
        server.remove()
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: PgServer's reachability check")
def test_root_is_told_to_make_the_directory_reachable():
    private = Path(tempfile.mkdtemp(prefix="token-agent-pg-"))  # 0700, root's
    try:
        with pytest.raises(PgServerError, match=r"cannot enter .*chmod o\+x"):
            PgServer.start(private / "pg")
        assert not (private / "pg" / "cluster").exists()
    finally:
        shutil.rmtree(private)


def test_the_fixture_fails_never_skips_without_postgresql():
    """No PostgreSQL (here: its programs not where they are said to be): the tests that
    need it error out, naming the step; none is skipped."""
    env = dict(os.environ, TOKEN_AGENT_PG_BINDIR="/nonexistent/postgresql/bin")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
         "tests/test_pgserver.py::test_databases_are_created_and_dropped"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "1 error" in output and "skipped" not in output, output
    assert "PostgreSQL initdb failed" in output, output


def test_a_killed_session_leaves_no_server_behind():
    """A test session killed outright (SIGKILL: no teardown runs) leaves no PostgreSQL
    running and no cluster on disk: the watchdog stops and deletes it."""
    import signal
    import time

    base = Path(tempfile.mkdtemp(prefix="token-agent-pg-"))
    base.chmod(0o711)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; sys.path.insert(0, sys.argv[1]); from pgserver import PgServer; "
         "s = PgServer.start(sys.argv[2]); "
         "print((s.data_dir / 'postmaster.pid').read_text().split()[0], flush=True); "
         "time.sleep(600)", str(ROOT / "tests"), str(base)],
        stdout=subprocess.PIPE, text=True)
    try:
        postmaster = int(child.stdout.readline())
        os.kill(postmaster, 0)  # it runs
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(postmaster, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"postmaster {postmaster} still runs 30 s after its session was killed")
        deadline = time.monotonic() + 10
        while (base / "cluster").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (base / "cluster").exists()
    finally:
        child.kill()
        shutil.rmtree(base, ignore_errors=True)
