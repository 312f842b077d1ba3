"""Shared fixtures.

* ``free_port()`` / fixture ``free_port``: a free TCP port on 127.0.0.1.
* ``sim_key_server``: a virtual FIDO2 key served as its own process
  (``token-agent sim key serve``) on free ports, with a fresh state file. Unpacks as
  ``host, port, control_port = sim_key_server``; also has ``.control_url``, ``.state``,
  ``.log`` (the process's stdout+stderr) and ``.process``. Options per test with the marker
  ``@pytest.mark.sim_key(presence="manual", args=[...])``.
* ``sim_key_factory``: the same, as a function, for tests that need several keys or
  control over when the key starts: ``sim_key_factory(presence="auto", state=None, args=())``.

* ``pg_server`` (session) / ``pg_url``: a throwaway PostgreSQL 15 cluster
  (``tests/pgserver.py``) and a fresh empty database on it per test; fails, never skips,
  when PostgreSQL cannot be started.

Every server is stopped at teardown; when a test fails, the server's output is added to the
report as a section ("sim key server ...").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

#: seconds to wait for a server's control port to answer ``GET /``
SIM_KEY_START_TIMEOUT = 20.0


STORE_ENGINE_ENV = "TOKEN_AGENT_TEST_STORE_ENGINE"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-engine", choices=("sqlite", "postgresql"),
        default=os.environ.get(STORE_ENGINE_ENV) or "sqlite",
        help="Run the suite with the store on this engine (default: sqlite, or "
             f"{STORE_ENGINE_ENV}). With postgresql, every test gets a fresh database on the "
             "session's own PostgreSQL (pg_server): the command line, the service and PAM reach "
             "it through TOKEN_AGENT_STORE_URL, and Store.open(path) in the test itself is "
             "redirected to it; tests marked sqlite_only (the SQLite file's own behaviour) "
             "are skipped, saying so.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sim_key(presence='auto', args=()): options for the sim_key_server fixture",
    )
    config.addinivalue_line(
        "markers",
        "sqlite_only: tests of the SQLite file itself (permissions, WAL, corruption): not run "
        "with --store-engine postgresql",
    )
    config.addinivalue_line(
        "markers",
        "store_contract: the store's contract suite, run on both engines by scripts/test.sh "
        "(pytest --store-engine postgresql -m store_contract)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if config.getoption("store_engine") != "postgresql":
        return
    skip = pytest.mark.skip(reason="sqlite_only: the SQLite file's own behaviour (the store's "
                                   "contract suite covers PostgreSQL)")
    for item in items:
        if item.get_closest_marker("sqlite_only"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _store_on_postgresql(request):
    """--store-engine postgresql: the test's store is a fresh PostgreSQL database."""
    if request.config.getoption("store_engine") != "postgresql" \
            or request.node.get_closest_marker("sqlite_only"):
        with pytest.MonkeyPatch.context() as mp:  # never a store URL of the caller's shell
            mp.delenv("TOKEN_AGENT_STORE_URL", raising=False)
            yield None
        return
    from token_agent.store import Store
    from token_agent.store.url import STORE_URL_ENV, is_url

    server = request.getfixturevalue("pg_server")
    first = request.getfixturevalue("pg_url")
    for directory in (server.cluster_dir, server.socket_dir):  # for the tests' subprocesses
        directory.chmod(0o711)  # that run as other users (nobody, the service's user, PAM)
    urls: dict[str, str] = {}
    created: list[str] = []
    opened: list = []  # closed at teardown: no pool left reconnecting to a dropped database
    opener = Store.open.__func__

    def open_on_postgresql(cls, target, **options):
        key = None
        if not is_url(str(target)):  # a SQLite path: this test's database instead
            key = os.path.abspath(os.fspath(target))
            if key not in urls:
                if not urls:
                    urls[key] = first
                else:  # a second store in one test: a database of its own
                    name = new_database_name()
                    created.append(name)
                    urls[key] = server.create_database(name)
            target = urls[key]
            options.pop("busy_timeout", None)
        store = opener(cls, target, **options)
        if key is not None:  # its local files where the SQLite file would be (datadir.open_store)
            store.local_dir = Path(key).parent
        opened.append(store)
        return store

    mp = pytest.MonkeyPatch()
    mp.setenv(STORE_URL_ENV, first)
    mp.setattr(Store, "open", classmethod(open_on_postgresql))
    try:
        yield first
    finally:
        mp.undo()
        for store in opened:
            try:
                store.close()
            except Exception:  # noqa: BLE001  (a test that broke its store on purpose)
                pass
        for name in created:
            server.drop_database(name)


def environ_for_agent(*drop: str) -> dict:
    """``os.environ`` without the caller's ``TOKEN_AGENT_*`` (nor names starting with
    ``drop``), for a subprocess that must not see the developer's settings; keeps
    TOKEN_AGENT_STORE_URL, which only ``--store-engine postgresql`` sets (the test's database)."""
    from token_agent.store.url import STORE_URL_ENV as keep

    return {k: v for k, v in os.environ.items()
            if k == keep or not k.startswith(("TOKEN_AGENT_", *drop))}


def store_contents(store) -> bytes:
    """Everything the store holds: its SQLite file and -wal, or every row of every table of
    its PostgreSQL database (``--store-engine postgresql``; the tests' URLs have no password)."""
    if store.path is None:
        import psycopg

        with psycopg.connect(store.location) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
            assert "audit_events" in tables
            return b"".join(repr(row).encode() for t in tables
                            for row in conn.execute(f'SELECT * FROM "{t}"'))
    wal = store.path.with_name(store.path.name + "-wal")
    return store.path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (bind to port 0, read it, close)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free TCP ports (all held open at once while choosing them)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(name="free_port")
def free_port_fixture():
    """A callable returning a free TCP port on 127.0.0.1 (a new one on every call)."""
    return free_port


def token_agent_command() -> list[str]:
    """How to run the ``token-agent`` CLI of this checkout, from the interpreter running pytest."""
    script = Path(sys.executable).parent / "token-agent"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "token_agent"]


@dataclass
class SimKeyServer:
    host: str
    port: int
    control_port: int
    state: Path
    log: Path
    process: subprocess.Popen = field(repr=False)
    command: list[str] = field(default_factory=list, repr=False)

    def __iter__(self):  # host, port, control_port = server
        return iter((self.host, self.port, self.control_port))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.control_port}"

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        """Stop the process (SIGTERM, then SIGKILL after 5 s); return its exit code."""
        from processes import stop_process_group

        return stop_process_group(self.process, 5)


def _control_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=1) as resp:
            resp.read()
        return True
    except urllib.error.HTTPError:
        return True  # it answered, even if not with 200
    except OSError:
        return False


def start_sim_key(
    directory: Path,
    presence: str = "auto",
    state: Path | None = None,
    args=(),
    host: str = "127.0.0.1",
    timeout: float = SIM_KEY_START_TIMEOUT,
) -> SimKeyServer:
    """Start ``token-agent sim key serve`` on free ports and wait until its control port
    answers ``GET /``. Raises RuntimeError (with the server's output) if it does not."""
    directory.mkdir(parents=True, exist_ok=True)
    state = state or directory / "key.json"
    last_error = ""
    for attempt in range(3):  # a free port can be taken between choosing and binding it
        port, control_port = free_ports(2, host)
        log = directory / f"sim-key-{port}.log"
        command = token_agent_command() + [
            "sim", "key", "serve",
            "--port", str(port),
            "--control-port", str(control_port),
            "--presence", presence,
            "--state", str(state),
            *map(str, args),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,  # its own process group: stop() ends its children too
            )
        server = SimKeyServer(host, port, control_port, state, log, proc, command)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _control_answers(server.control_url):
                return server
            time.sleep(0.05)
        exited = proc.poll()
        server.stop()
        what = (
            f"exited with code {exited}"
            if exited is not None
            else f"did not answer GET {server.control_url}/ within {timeout:.0f} s"
        )
        last_error = f"`{' '.join(command)}` {what}; its output:\n{server.output()}"
        if "address already in use" not in server.output().lower():
            break
    raise RuntimeError(f"virtual key server did not start: {last_error}")


@pytest.fixture
def sim_key_factory(request, tmp_path_factory):
    """Start virtual keys as processes: ``sim_key_factory(presence=..., state=..., args=...)``."""
    servers: list[SimKeyServer] = []
    request.node._sim_key_servers = servers

    def start(presence: str = "auto", state: Path | None = None, args=()) -> SimKeyServer:
        directory = tmp_path_factory.mktemp("sim-key")
        try:
            server = start_sim_key(directory, presence=presence, state=state, args=args)
        except RuntimeError as e:
            error = str(e)
        else:
            servers.append(server)
            return server
        pytest.fail(error, pytrace=False)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def sim_key_server(request, sim_key_factory) -> SimKeyServer:
    """One virtual key process with a fresh state file; see the module docstring."""
    marker = request.node.get_closest_marker("sim_key")
    options = dict(marker.kwargs) if marker else {}
    return sim_key_factory(**options)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    servers = getattr(item, "_sim_key_servers", None)
    if servers and report.failed:
        for server in servers:
            report.sections.append(
                (f"sim key server {server.address} ({report.when})", server.output()[-20000:])
            )
    return report


# -- the PC/SC stack for the card tests (pcscd + vsmartcard-vpcd); see tests/pcsc_helpers.py ----


@pytest.fixture(scope="session")
def pcscd_service(tmp_path_factory):
    """The machine's pcscd with vpcd's readers, for the whole session (started here when none
    runs and we are root; stopped at the end if started here). Without it the card tests fail
    in CI (``CI`` set) and skip elsewhere, saying what to install or run.

    It overrides the fixture of the same name in token-agent's pytest plugin
    (simulators/pytest_plugin.py, which always fails), so that the plugin's ``pcscd_card``
    and this suite's card tests share one pcscd and one session lock."""
    from pcsc_helpers import unavailable

    from simulators.pytest_plugin import start_pcscd

    service = start_pcscd(tmp_path_factory.mktemp("pcscd"), unavailable)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def pcscd(pcscd_service):
    """This suite's name for ``pcscd_service`` (a :class:`simulators.card.pcscd.LockedPcscd`)."""
    return pcscd_service


@pytest.fixture
def vpcd_insert(pcscd):
    """``vpcd_insert(card, slot=0, **bridge_options)``: the card in vpcd's reader (a
    :class:`simulators.card.vpcd.VpcdBridge`, inserted, with ``requested_at``); every card is
    removed at teardown. Insertion waits until pcscd can notice it
    (:func:`simulators.card.pcscd.insert_card`)."""
    from simulators.card.pcscd import insert_card, remove_card

    bridges = []

    def insert(card, slot: int = 0, **options):
        bridge = insert_card(pcscd, card, slot, **options)
        bridges.append(bridge)
        return bridge

    yield insert
    for bridge in bridges:
        remove_card(bridge)


@pytest.fixture(scope="session")
def issued_cards(tmp_path_factory) -> dict[str, Path]:
    """Two cards issued by the simulated NHS-style PKI (RSA 2048, PIN 1234), made once per
    session: ``alice`` (UUID 555123456789) and ``bob`` (555987654321). Tests work on copies."""
    from simulators.card.issuance import issue_card
    from simulators.card.pki import init_ca

    directory = tmp_path_factory.mktemp("issued")
    init_ca(directory / "ca")
    cards = {}
    for name, uuid in (("alice", "555123456789"), ("bob", "555987654321")):
        cards[name] = directory / f"{name}.card"
        issue_card(directory / "ca", name=f"Dr {name.title()} Smith", uuid=uuid, pin="1234",
                   out=cards[name])  # fmt: skip
    return cards


@pytest.fixture
def fresh_ca(tmp_path) -> Path:
    """A CA of one's own (EC keys: fast), for tests that revoke or break things."""
    from simulators.card import pki

    directory = tmp_path / "ca"
    pki.init_ca(directory, algorithm="ECCP256")
    return directory


# -- PostgreSQL: a throwaway cluster for the session (tests/pgserver.py) ------------------------


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL 15 cluster of this session's own (a :class:`pgserver.PgServer`), on a
    private socket. It fails, never skips, when PostgreSQL cannot be started."""
    import shutil
    import tempfile

    from pgserver import PgServer, PgServerError

    # not under pytest's 0700 tmp root: the postgres user (as root) must reach it
    base = Path(tempfile.mkdtemp(prefix="token-agent-pg-"))
    base.chmod(0o711)
    try:
        server = PgServer.start(base)
    except PgServerError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(str(e), pytrace=False)
    yield server
    server.remove()
    shutil.rmtree(base, ignore_errors=True)


_pg_databases = iter(range(1, 1 << 30))


def new_database_name() -> str:
    """A database name no other test of this session uses."""
    return f"t{os.getpid()}_{next(_pg_databases)}"


@pytest.fixture
def pg_url(pg_server):
    """A fresh empty database on the session's cluster (its ``postgresql://`` URL, as the
    superuser over the socket), dropped after the test. The server is started again first
    when a test left it stopped."""
    name = new_database_name()
    yield pg_server.create_database(name)
    if not pg_server.running():
        pg_server.restart()
    pg_server.drop_database(name)


# the pages' tests (tests/webtest.py): a server with the pages, a real browser or two
from webtest import browser, browser2, browser_home, web, web_server_dir  # noqa: E402,F401
