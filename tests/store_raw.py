"""Reaching below the store in the contract tests, on either engine (SQLite or PostgreSQL):
through ``store.connection(action)`` and the engine's own SQL where the dialects differ, or
straight at the database a store target names (a SQLite path, a ``postgresql://`` URL)
before or after any ``Store`` is open. The tests use these as an attacker with access to the
database, or as a fault, would."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from token_agent.store.url import is_url


def is_pg(store: Any) -> bool:
    return store.engine.name == "postgresql"


def run(store: Any, sql: str, params: tuple = ()) -> int:
    """One statement on the store's own connection (outside a transaction: committed at
    once); returns its rowcount. The engine's errors come back as ``StoreError``s."""
    with store.connection("run a test statement") as conn:
        return conn.execute(sql, params).rowcount


def query(store: Any, sql: str, params: tuple = ()) -> list[tuple]:
    with store.connection("run a test query") as conn:
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                for row in conn.execute(sql, params).fetchall()]


def drop_append_only(store: Any) -> None:
    """What an attacker with the database's owner role does first: the audit table's
    UPDATE/DELETE triggers gone."""
    if is_pg(store):
        run(store, "ALTER TABLE audit_events DISABLE TRIGGER USER")
    else:
        run(store, "DROP TRIGGER audit_events_no_update")
        run(store, "DROP TRIGGER audit_events_no_delete")


def fail_audit_inserts_after(store: Any, last_id: int, message: str) -> None:
    """A fault in the middle of a transaction: inserting an audit event with an id above
    ``last_id`` fails (a trigger, in the engine's own dialect)."""
    if is_pg(store):
        run(store, "CREATE FUNCTION test_fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                   f"IF NEW.id > {int(last_id)} THEN RAISE EXCEPTION '{message}'; END IF; "
                   "RETURN NEW; END $$")
        run(store, "CREATE TRIGGER test_fault BEFORE INSERT ON audit_events "
                   "FOR EACH ROW EXECUTE FUNCTION test_fault()")
    else:
        run(store, f"CREATE TRIGGER test_fault BEFORE INSERT ON audit_events "
                   f"WHEN NEW.id > {int(last_id)} BEGIN SELECT RAISE(ABORT, '{message}'); END")


def remove_fault(store: Any) -> None:
    run(store, "DROP TRIGGER test_fault ON audit_events" if is_pg(store)
        else "DROP TRIGGER test_fault")


# ---------------------------------------------------------------- a target with no Store open


def create_foreign_table(target: str | os.PathLike) -> None:
    """Another program's database: one table of its own, one row."""
    if is_url(str(target)):
        import psycopg

        with psycopg.connect(str(target), autocommit=True) as conn:
            conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount INTEGER)")
            conn.execute("INSERT INTO invoices VALUES (1, 250)")
    else:
        conn = sqlite3.connect(target, isolation_level=None)
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount INTEGER)")
        conn.execute("INSERT INTO invoices VALUES (1, 250)")
        conn.close()


def fingerprint(target: str | os.PathLike) -> Any:
    """What 'left untouched' compares: a SQLite file's bytes and its directory's listing;
    a PostgreSQL database's tables (with their columns and rows), functions and triggers."""
    if not is_url(str(target)):
        path = Path(target)
        return (hashlib.sha256(path.read_bytes()).hexdigest(),
                sorted(p.name for p in path.parent.iterdir()))
    import psycopg

    with psycopg.connect(str(target), autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "ORDER BY tablename")]
        contents = {t: (conn.execute(
            "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) "
            "FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = %s", (t,)).fetchone()[0],
            sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"').fetchall()))) for t in tables}
        others = conn.execute(
            "SELECT (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = current_schema()), (SELECT count(*) FROM pg_trigger "
            "WHERE NOT tgisinternal), (SELECT count(*) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = current_schema())").fetchone()
        return contents, others


@contextmanager
def database_behind_a_password(pg_server: Any, tmp_path: Path, prefix: str) -> Iterator[tuple]:
    """A database owned by a new role that must give its password (the suite's cluster
    trusts every other role): yields ``(role, url, admin_url, good, wrong)``: the role's URL
    and the superuser's, and two password files (0600) holding the right and a wrong
    password. The database is dropped at the end."""
    role = f"{prefix}_{os.getpid()}"
    pg_server.add_role(role, "right horse battery")
    dbname = f"{role}_db"
    pg_server.create_database(dbname, owner=role)
    try:
        good, wrong = tmp_path / "good", tmp_path / "wrong"
        for path, text in ((good, "right horse battery\n"), (wrong, "wrong horse battery\n")):
            path.write_text(text)
            path.chmod(0o600)
        yield role, pg_server.url(dbname, user=role), pg_server.url(dbname), good, wrong
    finally:
        pg_server.drop_database(dbname)
