"""A throwaway PostgreSQL cluster (Debian's PostgreSQL 15) for tests and benchmarks.

Importable without pytest (``benchmarks/`` use it too)::

    server = PgServer.start(base_dir)          # initdb + start, about 1-2 s
    server.create_database("t1")
    url = server.url("t1")                     # postgresql://postgres@/t1?host=SOCKDIR&port=PORT
    ...
    server.restart()                           # stop (fast) and start again, data kept
    server.kill()                              # immediate stop: no shutdown checkpoint,
                                               # open transactions die with it
    server.stop()

The cluster lives in ``base_dir/cluster`` (``data/``, ``sock/``, ``log``). It listens on a
private Unix socket directory only (``listen_addresses=''``; the port only names the socket
file), with ``trust`` authentication there: only its owner (and root) can enter the socket
directory. ``fsync`` is off unless ``start(durable=True)`` (a test cluster never outlives the machine's page cache), but
``synchronous_commit`` stays on: a commit is in the WAL before it returns, so ``kill()``
loses exactly the transactions that were not committed.

A watchdog process stops and deletes the cluster when the process that started it is gone,
however it went: a test session killed with SIGKILL leaves no server behind.

PostgreSQL refuses to run as root: as root, every PostgreSQL program runs as the
unprivileged ``postgres`` user (``runuser``), which then must be able to reach ``base_dir``
(a root ``mktemp -d`` is 0700: ``chmod 711`` it); as any other user, as that user.

``add_role(name, password)`` adds a login role that must give its password (SCRAM) on the
socket, for the wrong-password tests. Anything that goes wrong raises ``PgServerError``,
naming the step and with the tail of the server's log.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

#: the superuser of the cluster (initdb -U)
SUPERUSER = "postgres"
#: the system user PostgreSQL runs as when we are root
SYSTEM_USER = "postgres"
#: socket paths are limited to 107 bytes (sun_path)
_SOCKET_PATH_MAX = 100
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PgServerError(RuntimeError):
    """PostgreSQL could not be set up, started or stopped; the message names the step and
    gives the tail of the server's log."""


def find_bindir() -> Path:
    """PostgreSQL's programs: ``TOKEN_AGENT_PG_BINDIR``, else Debian's
    ``/usr/lib/postgresql/VERSION/bin`` (15 preferred, else the newest), else ``initdb``
    on PATH."""
    env = os.environ.get("TOKEN_AGENT_PG_BINDIR")
    if env:
        return Path(env)
    preferred = Path("/usr/lib/postgresql/15/bin")
    if (preferred / "initdb").exists():
        return preferred
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PgServerError(
        "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb and no initdb on "
        "PATH (Debian: apt-get install postgresql; scripts/setup.sh does it as root), or set "
        "TOKEN_AGENT_PG_BINDIR to the directory of initdb and pg_ctl")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"not a plain PostgreSQL name (a-z, 0-9, _): {name!r}")
    return name


#: the watchdog (``PgServer._watch``): argv pg_ctl, data directory, user to run as ("" for
#: ourselves), cluster directory; stdin is the pipe whose end means "the test session is gone"
_WATCHDOG = """
import os, shutil, subprocess, sys
pg_ctl, data, run_as, cluster = sys.argv[1:5]
while sys.stdin.buffer.read(4096):
    pass
if os.path.exists(os.path.join(data, "postmaster.pid")):
    argv = [pg_ctl, "-D", data, "-m", "immediate", "-w", "-t", "60", "stop"]
    if run_as:
        argv = ["runuser", "-u", run_as, "--", *argv]
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=90, cwd="/")
shutil.rmtree(cluster, ignore_errors=True)
"""


@dataclass
class PgServer:
    base_dir: Path
    bindir: Path
    port: int
    #: the system user the server runs as (``postgres`` when we are root, else ourselves)
    run_as: str | None
    timings: dict[str, float] = field(default_factory=dict)
    #: fsync and full-page writes on (``start(durable=True)``)
    durable: bool = False

    # ------------------------------------------------------------------ paths

    @property
    def cluster_dir(self) -> Path:
        return self.base_dir / "cluster"

    @property
    def data_dir(self) -> Path:
        return self.cluster_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.cluster_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self.cluster_dir / "log"

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def start(cls, base_dir: str | os.PathLike, port: int | None = None, *,
              durable: bool = False) -> PgServer:
        """initdb a new cluster in ``base_dir/cluster`` and start it (waiting until it
        accepts connections). ``durable``: fsync and full-page writes on, as a production
        server has them (benchmarks); off by default, for tests."""
        base_dir = Path(base_dir).resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        run_as = SYSTEM_USER if os.geteuid() == 0 else None
        server = cls(base_dir, find_bindir(), port or _free_port(), run_as)
        server.durable = durable
        server._init()
        server._start()
        server._watch()
        return server

    def _watch(self) -> None:
        """A watchdog process (its own session) that stops the cluster and deletes it once
        this process is gone, however it went (SIGKILL included), so that a killed test
        session leaves no server behind. It waits for the end of a pipe whose only writer
        is this process (Python's pipes are not inherited by the programs it runs)."""
        read_end, write_end = os.pipe()
        try:
            subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(self.bindir / "pg_ctl"),
                 str(self.data_dir), self.run_as or "", str(self.cluster_dir)],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, env=dict(os.environ, LC_ALL="C"))
        finally:
            os.close(read_end)
        self._watchdog_pipe = write_end  # closed with this process

    def _init(self) -> None:
        if self.cluster_dir.exists():
            raise PgServerError(f"set-up: {self.cluster_dir} exists already; give PgServer.start "
                                f"a new directory")
        entry = pwd.getpwnam(self.run_as) if self.run_as else None
        if entry:
            self._check_reachable(entry)
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > _SOCKET_PATH_MAX:
            raise PgServerError(f"set-up: the socket path {socket_path} is too long for a Unix "
                                f"socket; give PgServer.start a shorter directory")
        self.cluster_dir.mkdir(mode=0o700)
        self.socket_dir.mkdir(mode=0o700)
        if entry:
            for path in (self.cluster_dir, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        started = time.monotonic()
        self._run("initdb", [
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "-A", "trust",
            "-U", SUPERUSER, "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        ], timeout=120)  # fmt: skip
        self.timings["initdb"] = time.monotonic() - started

    def _check_reachable(self, entry: pwd.struct_passwd) -> None:
        """As root: the ``postgres`` user must be able to enter every directory above the
        cluster (root's temporary directories are 0700)."""
        for directory in reversed(self.cluster_dir.parents):
            st = directory.stat()
            if st.st_uid == entry.pw_uid:
                ok = st.st_mode & 0o100
            elif st.st_gid == entry.pw_gid:
                ok = st.st_mode & 0o010
            else:
                ok = st.st_mode & 0o001
            if not ok:
                raise PgServerError(
                    f"set-up: the {self.run_as} user (PostgreSQL refuses to run as root) cannot "
                    f"enter {directory} (mode {oct(st.st_mode & 0o777)}): run chmod o+x "
                    f"{directory}, or give PgServer.start a directory it can reach")

    def _start(self) -> None:
        started = time.monotonic()
        options = (f"-k {self.socket_dir} -p {self.port} -c listen_addresses='' "
                   + ("" if self.durable else "-c fsync=off -c full_page_writes=off ")
                   + "-c max_connections=200")
        self._run("pg_ctl start", [
            str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
            "-o", options, "-w", "-t", "60", "start",
        ], timeout=90)  # fmt: skip
        self.timings["start"] = time.monotonic() - started

    def running(self) -> bool:
        """Whether the server runs (``pg_ctl status``)."""
        proc = self._run("pg_ctl status", [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir),
                                           "status"], check=False)
        return proc.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: open sessions are ended, a clean shutdown); the data
        stays: ``restart()`` starts it again. Nothing happens when it is not running."""
        if not self.data_dir.exists() or not self.running():
            return
        self._run(f"pg_ctl stop -m {mode}", [
            str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60",
            "stop",
        ], timeout=90)  # fmt: skip

    def kill(self) -> None:
        """Stop at once (``-m immediate``: every server process quits without a shutdown
        checkpoint, as a crash would; open transactions are lost, recovered at the next
        start)."""
        self.stop("immediate")

    def restart(self) -> None:
        """Stop (when running) and start again, keeping the data; the port and socket stay."""
        self.stop()
        self._start()

    def remove(self) -> None:
        """Stop the server and delete its cluster directory (and let the watchdog go)."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.cluster_dir, ignore_errors=True)
            pipe, self._watchdog_pipe = getattr(self, "_watchdog_pipe", None), None
            if pipe is not None:
                os.close(pipe)

    # ------------------------------------------------------------------ connections

    def url(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """A libpq URL for ``dbname`` on the private socket (no password: ``trust``, or the
        role's password from elsewhere)."""
        return (f"postgresql://{quote(user, safe='')}@/{quote(dbname, safe='')}"
                f"?host={quote(str(self.socket_dir), safe='')}&port={self.port}")

    def connect_kwargs(self, dbname: str = "postgres", user: str = SUPERUSER) -> dict:
        return {"host": str(self.socket_dir), "port": self.port, "user": user,
                "dbname": dbname}

    def execute(self, sql: str, dbname: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser (autocommit); its rows, if any."""
        import psycopg

        try:
            with psycopg.connect(**self.connect_kwargs(dbname), autocommit=True,
                                 connect_timeout=10) as conn:
                cur = conn.execute(sql)
                return cur.fetchall() if cur.description else []
        except psycopg.Error as e:
            raise PgServerError(f"{sql.split()[0]} on {dbname}: {e}\n{self.log_tail()}") from e

    def create_database(self, name: str, owner: str | None = None) -> str:
        """A new empty database (owned by ``owner``, a role, when given); returns its URL."""
        started = time.monotonic()
        owned = f" OWNER {_check_name(owner)}" if owner else ""
        self.execute(f"CREATE DATABASE {_check_name(name)}{owned}")
        self.timings["create_database"] = time.monotonic() - started
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop the database, ending its sessions first (``WITH (FORCE)``)."""
        self.execute(f"DROP DATABASE IF EXISTS {_check_name(name)} WITH (FORCE)")

    def add_role(self, name: str, password: str, require_password: bool = True) -> None:
        """A login role with this password; with ``require_password`` it must give the
        password (SCRAM-SHA-256) on the socket, where every other role is trusted."""
        literal = password.replace("'", "''")
        self.execute(f"CREATE ROLE {_check_name(name)} LOGIN PASSWORD '{literal}'")
        if require_password:
            hba = self.data_dir / "pg_hba.conf"
            line = f"local all {name} scram-sha-256\n"
            self._write_as_owner(hba, line + hba.read_text())
            self.execute("SELECT pg_reload_conf()")
            time.sleep(0.2)  # the postmaster reloads on SIGHUP, asynchronously

    def _write_as_owner(self, path: Path, text: str) -> None:
        st = path.stat()
        path.write_text(text)
        os.chown(path, st.st_uid, st.st_gid)

    # ------------------------------------------------------------------ helpers

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "server log (tail):\n" + "\n".join(text.splitlines()[-lines:])

    def _run(self, step: str, argv: list[str], timeout: float = 60,
             check: bool = True) -> subprocess.CompletedProcess:
        if self.run_as:
            argv = ["runuser", "-u", self.run_as, "--", *argv]
        try:
            proc = subprocess.run(argv, cwd=self.cluster_dir, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=timeout,
                                  env=dict(os.environ, LC_ALL="C"))
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PgServerError(f"PostgreSQL {step} failed: {e}\n{self.log_tail()}") from e
        if check and proc.returncode != 0:
            raise PgServerError(
                f"PostgreSQL {step} failed (exit {proc.returncode}): `{' '.join(argv)}`\n"
                f"{(proc.stdout + proc.stderr).strip()}\n{self.log_tail()}")
        return proc
