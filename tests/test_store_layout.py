"""The store package's layout (issue 14): no SQL outside token_agent/store/ (no module of
the agent or the drivers calls ``.execute`` / ``.executemany`` / ``.executescript``, or
imports a database driver), no store module past 600 lines, and a SQLite store never
imports psycopg (the PostgreSQL DDL is loaded only by a PostgreSQL migration)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "token_agent" / "store"
SQL_CALLS = {"execute", "executemany", "executescript"}
DRIVERS = {"sqlite3", "psycopg", "psycopg_pool"}


def outside_the_store():
    for top in ("token_agent", "drivers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if STORE not in path.parents:
                yield path


def test_no_sql_outside_the_store():
    found = []
    for path in outside_the_store():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in SQL_CALLS):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.func.attr}(")
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            for name in names:
                if name.split(".")[0] in DRIVERS:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {name}")
    assert found == [], "SQL belongs in token_agent/store/ (an area's method):\n" + "\n".join(found)


def test_no_store_module_past_600_lines():
    long = {p.name: n for p in STORE.glob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_a_sqlite_store_never_imports_psycopg(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    code = (
        "import sys\n"
        "from token_agent.store import Store\n"
        f"with Store.open({str(data / 'token-agent.db')!r}) as s:\n"
        "    s.record_event('login.key', outcome='success')\n"
        "    assert s.verify_events() == 1\n"
        "print(sorted(m for m in sys.modules if m.startswith('psycopg')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
