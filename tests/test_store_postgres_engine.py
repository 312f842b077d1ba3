"""PostgresEngine (token_agent/store/postgres.py) and the PostgreSQL schema
(token_agent/store/schema_pg.py), driven directly against a real PostgreSQL 15 cluster
(tests/pgserver.py): migrations, types and constraints, the append-only audit table,
identification (another program's database, a newer schema), passwords, and faults (the
server restarted, killed mid-transaction, busy, unreachable)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import psycopg
import pytest

from store_raw import database_behind_a_password
from token_agent.store import SCHEMA_VERSION, InvalidValue, SchemaTooNew, StoreError, StoreFileError
from token_agent.store.engine import Migration, split_script
from token_agent.store.pgconn import translate
from token_agent.store.postgres import IntegrityViolation, PostgresEngine, StoreUnavailable
from token_agent.store.schema_pg import SCRIPTS

LATEST = max(SCRIPTS)


@pytest.fixture
def engines():
    made: list[PostgresEngine] = []

    def make(url: str, **options) -> PostgresEngine:
        engine = PostgresEngine(url, **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@contextmanager
def mapped(engine: PostgresEngine, action: str):
    """Driver errors as the store will see them: ``engine.error``."""
    try:
        yield
    except psycopg.Error as exc:
        error = engine.error(exc, action)
        assert error is not None
        raise error from exc


def script_step(n: int):
    """A migration step as ``migrations.py`` gives it: a function running the script
    through the store's connection (``?`` rules and all)."""
    def step(conn) -> None:
        for statement in split_script(SCRIPTS[n]):
            conn.execute(statement)
    return step


def migrate(engine: PostgresEngine, upto: int = LATEST, as_function: bool = False) -> int:
    """What StoreCore's migration runner does, through the engine's seam."""
    with engine.connect() as conn:
        with mapped(engine, "identify the database"):
            version = engine.prepare(conn, LATEST)
        for n in range(version + 1, upto + 1):
            with mapped(engine, f"apply schema migration {n}"):
                engine.begin(conn)
                try:
                    engine.lock_schema(conn)
                    if engine.schema_version(conn) >= n:
                        engine.rollback(conn)
                        continue
                    step = script_step(n) if as_function else SCRIPTS[n]
                    engine.run_step(conn, Migration(n, f"step {n}", sqlite="", postgresql=step))
                    engine.set_schema_version(conn, n)
                    engine.commit(conn)
                except BaseException:
                    if engine.in_transaction(conn):
                        engine.rollback(conn)
                    raise
        return engine.schema_version(conn)


def add_user(conn, user_id: str, username: str, handle: bytes | None = None) -> None:
    conn.execute("INSERT INTO users (id, username, display_name, user_handle, created_at, "
                 "disabled) VALUES (?, ?, ?, ?, ?, ?)",
                 (user_id, username, username.title(), handle or user_id.encode(), time.time(),
                  False))


def tables(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("as_function", [False, True], ids=["script", "function"])
def test_migrations_build_the_schema_with_postgresql_types(pg_url, engines, as_function):
    engine = engines(pg_url)
    assert migrate(engine, as_function=as_function) == LATEST == SCHEMA_VERSION
    assert migrate(engine) == LATEST  # a second run changes nothing
    with engine.connect() as conn:
        assert engine.check_integrity(conn) == []
        info = engine.info(conn)
        columns = {(r["table_name"], r["column_name"]): (r["data_type"], r["is_identity"])
                   for r in conn.execute(
                       "SELECT table_name, column_name, data_type, is_identity "
                       "FROM information_schema.columns WHERE table_schema = 'public'")}
        history = conn.execute("SELECT key, value FROM token_agent_meta ORDER BY key").fetchall()
    assert info["engine"] == "postgresql" and info["server_version"].startswith("15")
    assert info["user"] == "postgres" and info["database"] in pg_url
    assert info["schema_version"] == LATEST and info["socket"] is True
    assert info["pool_max_size"] == 4 and info["lock_timeout"] == "10s"
    assert history == [("application", "token-agent"), ("schema_version", str(LATEST))]
    assert columns[("audit_events", "id")] == ("bigint", "NO")  # from the head, no sequence
    assert columns[("methods", "id")] == ("bigint", "YES")
    assert columns[("otp_challenges", "id")] == ("bigint", "YES")
    assert columns[("fido2_credentials", "sign_count")][0] == "bigint"
    assert columns[("fido2_credentials", "method_id")][0] == "bigint"
    assert columns[("users", "user_handle")][0] == "bytea"
    assert columns[("users", "created_at")][0] == "double precision"
    assert columns[("users", "mfa_source")][0] == "text"  # migration 5's ALTER
    assert columns[("audit_head", "hash")][0] == "bytea"
    assert columns[("workstations", "id")] == ("bigint", "YES")  # migration 7
    assert columns[("workstations", "token_hash")][0] == "bytea"


def test_two_processes_migrating_at_once_take_turns(pg_url, engines):
    """The advisory lock: the second waits, then finds each version done (without it, the
    second CREATE TABLE fails on the catalog's unique index)."""
    first, second = engines(pg_url), engines(pg_url)
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}

    def run(i: int, engine: PostgresEngine) -> None:
        barrier.wait()
        try:
            results[i] = migrate(engine)
        except Exception as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, e)) for i, e in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {0: LATEST, 1: LATEST}
    assert tables(pg_url)["token_agent_meta"] == 2


def test_types_and_constraints(pg_url, engines):
    engine = engines(pg_url)
    migrate(engine)
    with engine.connect() as conn:
        add_user(conn, "u1", "Alice")
        row = conn.execute("SELECT disabled, pg_typeof(disabled)::text AS t, user_handle "
                           "FROM users WHERE lower(username) = lower(?)", ("ALICE",)).fetchone()
        assert row["disabled"] == 0 and row[0] == 0 and row["t"] == "integer"  # a bool: 0
        assert row["user_handle"] == b"u1" and type(row[2]) is bytes
        assert row.keys() == ["disabled", "t", "user_handle"]
        method_id = conn.execute(
            "INSERT INTO methods (user_id, kind, name, created_at, preferred) "
            "VALUES (?, ?, ?, ?, ?) RETURNING id", ("u1", "fido2", "Blue key", 1.5, True)
        ).fetchone()["id"]
        conn.execute("INSERT INTO fido2_credentials (method_id, credential_id, public_key, "
                     "aaguid, sign_count, rp_id, discoverable, uv_enrolled, attestation_format, "
                     "attestation_trusted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (method_id, b"\x01" * 16, b"pk", "0" * 32, 2**32 - 1, "example.org",
                      True, False, "none", 0))
        assert conn.execute("SELECT sign_count FROM fido2_credentials").fetchone()[0] == 2**32 - 1
        assert conn.execute("SELECT preferred FROM methods").fetchone()[0] == 1
        won = conn.execute("UPDATE fido2_credentials SET sign_count = ? WHERE method_id = ? "
                           "AND sign_count < ?", (5, method_id, 5))
        assert won.rowcount == 0

        def refused(sql, params, constraint):
            with pytest.raises(IntegrityViolation) as raised:
                with mapped(engine, "write"):
                    conn.execute(sql, params)
            assert raised.value.constraint == constraint, raised.value
            assert pg_url.split("?")[0] in str(raised.value)
            return raised.value

        refused("UPDATE fido2_credentials SET sign_count = ?", (2**32,),
                "fido2_credentials_sign_count_check")
        refused("INSERT INTO users (id, username, display_name, user_handle, created_at) "
                "VALUES (?, ?, ?, ?, ?)", ("u2", "aLiCe", "x", b"u2", 1.0),
                "users_username_nocase")
        refused("INSERT INTO users (id, username, display_name, user_handle, created_at) "
                "VALUES (?, ?, ?, ?, ?)", ("u3", "bob", "x", b"", 1.0),
                "users_user_handle_check")
        refused("INSERT INTO methods (user_id, kind, name, created_at) VALUES (?, ?, ?, ?)",
                ("u1", "fido2", "BLUE KEY", 1.0), "methods_name_nocase")
        refused("INSERT INTO methods (user_id, kind, name, created_at, preferred) "
                "VALUES (?, ?, ?, ?, ?)", ("u1", "totp", "phone", 1.0, 1),
                "methods_one_preferred")
        refused("INSERT INTO methods (user_id, kind, name, created_at, flagged) "
                "VALUES (?, ?, ?, ?, ?)", ("u1", "totp", "phone", 1.0, 2),
                "methods_flagged_check")
        refused("INSERT INTO methods (user_id, kind, name, created_at) VALUES (?, ?, ?, ?)",
                ("nobody", "totp", "phone", 1.0), "methods_user_id_fkey")
        refused("UPDATE users SET mfa_source = ?", ("someone",), "users_mfa_source_check")
        # ON DELETE CASCADE, as on SQLite
        conn.execute("DELETE FROM users WHERE id = ?", ("u1",))
        assert conn.execute("SELECT count(*) FROM fido2_credentials").fetchone()[0] == 0


def test_audit_table_is_append_only_and_its_head_stays(pg_url, engines):
    engine = engines(pg_url)
    migrate(engine, upto=5)
    with engine.connect() as conn:  # events from before migration 6: the head starts there
        for event_id in (1, 2):
            conn.execute("INSERT INTO audit_events (id, at, kind, outcome, prev_hash, hash) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (event_id, 1.0, "login", "ok", bytes(32), bytes([event_id]) * 32))
    migrate(engine)
    with engine.connect() as conn:
        assert tuple(conn.execute("SELECT last_id, hash FROM audit_head").fetchone()) \
            == (2, b"\x02" * 32)
        for sql in ("UPDATE audit_events SET outcome = 'refused'",
                    "DELETE FROM audit_events WHERE id = 2",
                    "TRUNCATE audit_events"):
            with pytest.raises(IntegrityViolation, match="audit events are append-only"):
                with mapped(engine, "change the audit log"):
                    conn.execute(sql)
        for sql in ("DELETE FROM audit_head", "TRUNCATE audit_head"):
            with pytest.raises(IntegrityViolation, match="head cannot be removed"):
                with mapped(engine, "remove the head"):
                    conn.execute(sql)
        # the head moves (an append), under a row lock
        engine.begin(conn)
        head = conn.execute("SELECT last_id, hash FROM audit_head WHERE id = 1"
                            + engine.for_update).fetchone()
        conn.execute("INSERT INTO audit_events (id, at, kind, outcome, prev_hash, hash) "
                     "VALUES (?, ?, ?, ?, ?, ?)",
                     (head["last_id"] + 1, 2.0, "login", "ok", head["hash"], b"\x03" * 32))
        conn.execute("UPDATE audit_head SET last_id = ?, hash = ? WHERE id = 1",
                     (head["last_id"] + 1, b"\x03" * 32))
        engine.commit(conn)
        assert conn.execute("SELECT count(*) FROM audit_events").fetchone()[0] == 3
    with engine.connect() as conn:
        assert engine.check_integrity(conn) == []
    # a disabled trigger is an integrity problem
    with psycopg.connect(pg_url, autocommit=True) as raw:
        raw.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_delete")
    with engine.connect() as conn:
        assert engine.check_integrity(conn) == ["trigger disabled: audit_events_no_delete"]


# --------------------------------------------------------------------------- identification


def test_another_programs_database_is_refused_untouched(pg_url, engines):
    with psycopg.connect(pg_url, autocommit=True) as raw:
        raw.execute("CREATE TABLE patients (id int PRIMARY KEY, name text)")
        raw.execute("INSERT INTO patients VALUES (1, 'Ada')")
    before = tables(pg_url)
    engine = engines(pg_url)
    with pytest.raises(StoreFileError) as raised:
        migrate(engine)
    assert raised.value.reason == "foreign"
    assert "public.patients" in str(raised.value) and "not a token-agent store" in str(raised.value)
    assert tables(pg_url) == before == {"patients": 1}


def test_a_newer_schema_is_refused(pg_url, engines):
    migrate(engines(pg_url))
    with psycopg.connect(pg_url, autocommit=True) as raw:
        raw.execute("UPDATE token_agent_meta SET value = %s WHERE key = 'schema_version'",
                    (str(LATEST + 1),))
    engine = engines(pg_url)
    with pytest.raises(SchemaTooNew) as raised:
        migrate(engine)
    assert raised.value.found == LATEST + 1 and raised.value.known == LATEST
    assert "upgrade token-agent" in str(raised.value)


# --------------------------------------------------------------------------- passwords


@pytest.mark.parametrize("url", [
    "postgresql://alice:s3cret-pw@db.example.org/store",
    "postgresql://alice@db.example.org/store?password=s3cret-pw",
    "postgresql://alice@db.example.org/store?sslmode=require&sslpassword=s3cret-pw",
])
def test_a_password_in_the_url_is_refused(url):
    with pytest.raises(InvalidValue) as raised:
        PostgresEngine(url)
    message = str(raised.value)
    assert "carries a password" in message and "password_file" in message
    assert "s3cret-pw" not in message


def test_password_file_and_a_wrong_password(pg_server, engines, tmp_path):
    with database_behind_a_password(pg_server, tmp_path, "pw") as (role, url, _, good, wrong):
        assert migrate(engines(url, password_file=good)) == LATEST  # the role owns the database

        engine = engines(url, password_file=wrong, connect_timeout=2)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as raised:
            with engine.connect() as conn:
                conn.execute("SELECT 1")
        assert raised.value.reason == "auth"
        assert time.monotonic() - started < 5
        assert "authentication failed" in str(raised.value) and role in str(raised.value)
        assert "horse" not in str(raised.value)

        with pytest.raises(StoreUnavailable) as raised:  # no password at all
            with engines(url, connect_timeout=2).connect():
                pass
        assert raised.value.reason == "auth"

        good.chmod(0o644)
        with pytest.raises(InvalidValue, match="chmod 600"):
            PostgresEngine(url, password_file=good)


# --------------------------------------------------------------------------- faults


def test_the_pool_reconnects_after_a_server_restart(pg_server, pg_url, engines):
    engine = engines(pg_url)
    migrate(engine)
    with engine.connect() as conn:
        before = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    pg_server.restart()
    with engine.connect() as conn:
        add_user(conn, "u1", "after-restart")
        after = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert after != before
    assert tables(pg_url)["users"] == 1


def test_server_killed_mid_transaction(pg_server, pg_url, engines):
    engine = engines(pg_url)
    migrate(engine)
    with engine.connect() as conn:
        add_user(conn, "u0", "committed")
    with pytest.raises(StoreUnavailable) as raised:
        with engine.connect() as conn:
            engine.begin(conn)
            add_user(conn, "u1", "half-written")
            conn.execute("UPDATE users SET display_name = ? WHERE id = ?", ("x", "u0"))
            pg_server.kill()
            try:
                with mapped(engine, "add a user"):
                    add_user(conn, "u2", "never")
            finally:
                assert not engine.in_transaction(conn)
    error = raised.value
    assert error.reason == "connection lost"
    assert pg_url.split("?")[0] in str(error) and "add a user" in str(error)
    assert "nothing of it was written" in str(error)
    with pytest.raises(StoreUnavailable) as raised:  # the server is down: said so
        with engine.connect():
            pass
    assert raised.value.reason == "unreachable" and "cannot connect" in str(raised.value)
    pg_server.restart()
    with engine.connect() as conn:
        rows = conn.execute("SELECT id, display_name FROM users ORDER BY id").fetchall()
    assert rows == [("u0", "Committed")]


def test_a_lock_held_too_long_is_busy(pg_url, engines):
    first = engines(pg_url)
    migrate(first)
    second = engines(pg_url, lock_timeout=0.3)
    with first.connect() as holder:
        first.begin(holder)
        holder.execute("SELECT * FROM audit_head" + first.for_update)
        with second.connect() as conn:
            second.begin(conn)
            with pytest.raises(StoreUnavailable) as raised:
                with mapped(second, "record an audit event"):
                    conn.execute("SELECT * FROM audit_head" + second.for_update)
            assert raised.value.reason == "busy" and "0.3 s" in str(raised.value)
            assert second.in_transaction(conn)  # aborted, to be rolled back by the store
            second.rollback(conn)
        first.rollback(holder)


def test_an_unreachable_server_is_said_at_once(tmp_path, engines):
    engine = engines(f"postgresql://postgres@/x?host={tmp_path}&port=5", connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        with engine.connect():
            pass
    assert raised.value.reason == "unreachable"
    assert "No such file or directory" in str(raised.value)
    assert time.monotonic() - started < 3


def test_a_missing_database(pg_server, engines):
    engine = engines(pg_server.url("no_such_db"))
    with pytest.raises(StoreUnavailable) as raised:
        with engine.connect():
            pass
    assert raised.value.reason == "no database" and "createdb" in str(raised.value)


# --------------------------------------------------------------------------- SQL rules


def test_question_marks_and_literal_percent_signs(pg_url, engines):
    engine = engines(pg_url)
    migrate(engine)
    assert translate("SELECT '?%', ? -- it's ?\n, \"a?\", $$ ? % $$, ?") == \
        "SELECT '?%%', %s -- it's ?\n, \"a?\", $$ ? %% $$, %s"
    with engine.connect() as conn:
        conn.execute("INSERT INTO settings (key, value, updated_at) VALUES (?, '100% sure?', ?)",
                     ("k1", 1.0))
        conn.executemany("INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?)",
                         [("k2", "50%", 2.0), ("k3", "it's ?", 3.0)])
        rows = conn.execute("SELECT key, value FROM settings WHERE value LIKE '%?%' OR "
                            "value = ? ORDER BY key", ("50%",)).fetchall()
        assert [tuple(r) for r in rows] == [("k1", "100% sure?"), ("k2", "50%"),
                                            ("k3", "it's ?")]
        assert conn.execute("SELECT 'a%b'").fetchone()[0] == "a%b"
        add_user(conn, "u1", "alice")
        for role in ("nurse", "admin"):
            conn.execute("INSERT INTO user_roles (user_id, role) VALUES (?, ?)", ("u1", role))
        joined = conn.execute(f"SELECT {engine.string_agg('role', ',')} FROM user_roles "
                              "WHERE user_id = ?", ("u1",)).fetchone()[0]
        assert sorted(joined.split(",")) == ["admin", "nurse"]
        updated = conn.execute("UPDATE settings SET value = ? WHERE key LIKE 'k%'", ("x",))
        assert updated.rowcount == 3


def test_errors_that_are_not_the_drivers_are_left_alone(pg_url, engines):
    engine = engines(pg_url)
    assert engine.error(ValueError("x"), "do") is None
    assert isinstance(engine.error(psycopg.ProgrammingError("bad"), "do"), StoreError)
    with engine.connect() as conn:
        conn.execute("SELECT 1")
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(StoreError, match="is closed"):
        with engine.connect():
            pass


def test_psycopg_is_needed_only_for_postgresql():
    """The SQLite store (and the PostgreSQL DDL module) never import psycopg; without it,
    the PostgreSQL engine says which extra to install."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import token_agent.store, token_agent.store.schema_pg, token_agent.store.engine\n"
        "assert 'psycopg' not in sys.modules and 'psycopg_pool' not in sys.modules\n"
        "sys.modules['psycopg'] = None\n"
        "try:\n"
        "    import token_agent.store.postgres\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'token-agent[postgresql]'" in proc.stdout
