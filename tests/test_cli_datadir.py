"""Issue 12, "The data directory", through the real ``token-agent`` command:

1. a command that only reads creates no store and no directory: it says there is none, where
   it looked and why (exit 8); a command that writes still creates it;
2. one lookup for the command line and the service: ``--data-dir``, ``TOKEN_AGENT_DATA_DIR``,
   config.toml's ``[store] data_dir`` (``--config``, ``TOKEN_AGENT_CONFIG``, ...), then the
   XDG and home defaults;
3. root never takes the service's store: against a data directory of another user it
   refuses, says how to run as that user, and creates nothing; the store stays that user's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from test_cli_reauth import as_user
from test_service import services, socket_dir  # noqa: F401  (fixtures)
from token_agent import exitcodes
from token_agent.service.client import ServiceError

SERVICE_UID = 61010  # the service's user: no passwd entry (sudo -u '#61010')


def clean_env(tmp_path: Path, **extra: str) -> dict:
    """No TOKEN_AGENT_* (but the test's store URL) or XDG_* of the caller's; HOME in the
    test's directory; an empty config.toml and policy unless the test names others."""
    env = {k: v for k, v in environ_for_agent("XDG_").items() if k != "STATE_DIRECTORY"}
    (tmp_path / "empty.toml").write_text("")
    env.update(HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1",
               TOKEN_AGENT_CONFIG=str(tmp_path / "empty.toml"),
               TOKEN_AGENT_POLICY=str(tmp_path / "empty.toml"))
    env.update(extra)
    return env


def run(env: dict, *args, expect: int | None = 0, input: str = "") -> subprocess.CompletedProcess:
    argv = [str(a) for a in args]
    proc = subprocess.run(token_agent_command() + argv, input=input, capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=60)
    if expect is not None:
        assert proc.returncode == expect, (argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --------------------------------------------------------------------------- 1. read-only


READ_ONLY = [
    ("users", "list"),
    ("users", "show", "alice"),
    ("audit", "verify"),
    ("audit", "tail"),
    ("settings", "show"),
    ("trust", "list"),
    ("card", "settings", "show"),
    ("methods", "list", "--user", "alice"),
    ("policy", "explain", "--user", "alice"),
    ("admin", "lockouts", "alice"),
    ("login", "--user", "alice"),
]


@pytest.mark.sqlite_only  # the data directory's SQLite file (not created; its path said)
def test_a_command_that_only_reads_creates_no_store(tmp_path):
    env = clean_env(tmp_path)
    missing = tmp_path / "mistyped" / "dir"
    existing = tmp_path / "etc"  # like `--data-dir /etc`: a directory with other things in it
    existing.mkdir()
    (existing / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    for data in (missing, existing):
        before = files_under(tmp_path)
        for command in READ_ONLY:
            proc = run(env, "--data-dir", data, *command, expect=exitcodes.NOT_FOUND)
            assert f"no token-agent store at {data / 'token-agent.db'}" in proc.stderr, command
            assert "because of --data-dir" in proc.stderr and "users add" in proc.stderr
            assert proc.stdout == "", command
        assert files_under(tmp_path) == before, "a read-only command created something"
    assert not missing.parent.exists()

    # the policy needs no store
    assert "enforcement" in run(env, "--data-dir", missing, "policy", "show").stdout
    assert not missing.parent.exists()

    # commands that write create it (the directory 0700)
    run(env, "--data-dir", missing, "users", "add", "alice")
    assert (missing / "token-agent.db").is_file() and oct(missing.stat().st_mode & 0o777) == "0o700"
    assert [u["username"] for u in json.loads(run(env, "--data-dir", missing, "users", "list",
                                                  "--json").stdout)["users"]] == ["alice"]
    run(env, "--data-dir", existing, "settings", "set", "rp_id", "trust.example")
    assert (existing / "token-agent.db").is_file()


@pytest.mark.sqlite_only  # the path of the SQLite file it looked for
def test_the_message_says_why_it_looked_there(tmp_path):
    env = clean_env(tmp_path, TOKEN_AGENT_DATA_DIR=str(tmp_path / "from-env"))
    proc = run(env, "users", "list", expect=exitcodes.NOT_FOUND)
    assert f"no token-agent store at {tmp_path / 'from-env' / 'token-agent.db'} (looked there " \
           "because of TOKEN_AGENT_DATA_DIR)" in proc.stderr

    default = tmp_path / "home" / ".local" / "share" / "token-agent"
    proc = run(clean_env(tmp_path), "users", "list", expect=exitcodes.NOT_FOUND)
    assert f"no token-agent store at {default / 'token-agent.db'} (looked there by default" \
        in proc.stderr
    assert not (tmp_path / "home").exists()


# --------------------------------------------------------------------------- 2. one lookup


@pytest.mark.sqlite_only  # each data directory is a SQLite file of its own
def test_the_cli_uses_config_toml_store_data_dir(tmp_path):
    configured = tmp_path / "from-config"
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndata_dir = "{configured}"\n')
    env = clean_env(tmp_path, TOKEN_AGENT_CONFIG=str(config))
    run(env, "users", "add", "alice")
    assert (configured / "token-agent.db").is_file()
    assert not (tmp_path / "home").exists(), "the store went to ~/.local/share"
    proc = run(env, "users", "show", "bob", expect=exitcodes.NOT_FOUND)
    assert "bob" in proc.stderr  # the store was found: the user is not

    # --config, as `serve --config` takes it
    env = clean_env(tmp_path)
    assert "alice" in run(env, "--config", config, "users", "list").stdout
    proc = run(env, "--config", tmp_path / "other.toml", "users", "list", expect=exitcodes.USAGE)
    assert "other.toml: configuration file not found" in proc.stderr

    # TOKEN_AGENT_DATA_DIR beats the file, --data-dir beats both
    env = clean_env(tmp_path, TOKEN_AGENT_CONFIG=str(config),
                    TOKEN_AGENT_DATA_DIR=str(tmp_path / "from-env"))
    proc = run(env, "users", "list", expect=exitcodes.NOT_FOUND)
    assert "because of TOKEN_AGENT_DATA_DIR" in proc.stderr
    assert "alice" in run(env, "--data-dir", configured, "users", "list").stdout

    # a store the file names but that is not there yet: said so, with the file
    config.write_text(f'[store]\ndata_dir = "{tmp_path / "not-yet"}"\n')
    proc = run(clean_env(tmp_path, TOKEN_AGENT_CONFIG=str(config)), "users", "list",
               expect=exitcodes.NOT_FOUND)
    assert f"because of [store] data_dir in {config}" in proc.stderr
    assert not (tmp_path / "not-yet").exists()


@pytest.mark.sqlite_only  # two data directories are two SQLite files
def test_the_service_and_the_cli_find_the_same_store(services, tmp_path):  # noqa: F811
    services.policy.write_text("[classes.internal]\nenforce = false\n")
    svc = services()
    # the service's own config.toml names its data directory; the CLI reads it too
    env = clean_env(tmp_path, TOKEN_AGENT_POLICY=str(services.policy))
    run(env, "--config", svc.config, "users", "add", "alice")
    assert (services.data / "token-agent.db").is_file()
    with svc.client() as c:
        assert c.request("methods.list", user="alice")["methods"] == []
    svc.stop()

    # TOKEN_AGENT_DATA_DIR beats config.toml for both
    other = tmp_path / "other"
    svc = services(start=False, name="svc2")
    svc.env["TOKEN_AGENT_DATA_DIR"] = str(other)
    svc.start()
    run(env | {"TOKEN_AGENT_DATA_DIR": str(other)}, "--config", svc.config, "users", "add", "bob")
    with svc.client() as c:
        assert c.request("methods.list", user="bob")["methods"] == []
        with pytest.raises(ServiceError, match="no user 'alice'"):
            c.request("methods.list", user="alice")


def test_the_cli_and_the_service_agree_on_the_policy_of_config_toml(services, tmp_path):  # noqa: F811
    """config.toml's [policy] file is the policy in force for the service and for the CLI
    given the same config.toml; TOKEN_AGENT_POLICY and --policy still come first."""
    services.policy.write_text("[classes.internal]\nenforce = false\n")
    svc = services()
    env = clean_env(tmp_path)
    del env["TOKEN_AGENT_POLICY"]  # the file comes from config.toml
    run(env, "--config", svc.config, "users", "add", "alice")
    shown = json.loads(run(env, "--config", svc.config, "policy", "show", "--json").stdout)
    assert shown["source"] == str(services.policy)
    assert shown["classes"]["internal"]["enforce"] is False
    explained = json.loads(run(env, "--config", svc.config, "policy", "explain", "--user", "alice",
                               "--json").stdout)
    with svc.client() as c:
        remote = c.request("policy.explain", user="alice")
    assert explained["mfa_required"] is remote["mfa_required"] is False
    checked = json.loads(run(env, "--config", svc.config, "policy", "check", "--json").stdout)
    assert checked["path"] == str(services.policy)

    # the environment's file comes before config.toml's, for both
    other = tmp_path / "other-policy.toml"
    other.write_text("")
    named = json.loads(run(env | {"TOKEN_AGENT_POLICY": str(other)}, "--config", svc.config,
                           "policy", "show", "--json").stdout)
    assert named["source"] == str(other) and named["classes"]["internal"]["enforce"] is True
    # a config.toml naming a policy file that is not there is an error, not the defaults
    broken = tmp_path / "broken.toml"
    broken.write_text(f'[policy]\nfile = "{tmp_path / "missing.toml"}"\n')
    proc = run(env, "--config", broken, "policy", "show", expect=exitcodes.USAGE)
    assert "missing.toml" in proc.stderr


def test_a_config_file_named_on_the_command_line_must_be_there_and_valid(tmp_path):
    """--config names a file: missing or not TOML is exit 2 even when TOKEN_AGENT_DATA_DIR
    decides the data directory (the file is not silently passed over)."""
    env = clean_env(tmp_path, TOKEN_AGENT_DATA_DIR=str(tmp_path / "data"))
    run(env, "users", "add", "alice")
    proc = run(env, "--config", tmp_path / "missing.toml", "users", "list",
               expect=exitcodes.USAGE)
    assert "missing.toml" in proc.stderr
    junk = tmp_path / "junk.toml"
    junk.write_text("this is = = not toml\n")
    proc = run(env, "--config", junk, "users", "list", expect=exitcodes.USAGE)
    assert "junk.toml" in proc.stderr
    run(env, "--config", tmp_path / "empty.toml", "users", "list")


# --------------------------------------------------------------------------- 3. root


@pytest.fixture
def service_dir():
    """A data directory of the service's user (uid 61010, mode 0700), in a directory that
    user can reach."""
    if os.geteuid() != 0:
        pytest.fail("this test must run as root (it is root's mistake it checks)")
    top = Path(tempfile.mkdtemp(prefix="token-agent-datadir-"))
    top.chmod(0o755)
    data = top / "token-agent"
    data.mkdir(mode=0o700)
    os.chown(data, SERVICE_UID, SERVICE_UID)
    yield data
    shutil.rmtree(top, ignore_errors=True)


def as_service_user(env: dict, *args, expect: int | None = 0) -> subprocess.CompletedProcess:
    argv = [str(a) for a in args]
    proc = subprocess.run([sys.executable, "-c", as_user(SERVICE_UID), *argv],
                          capture_output=True, text=True, cwd="/", timeout=60,
                          env=env | {"PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"})
    if expect is not None:
        assert proc.returncode == expect, (argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def owners(path: Path) -> set[int]:
    return {p.lstat().st_uid for p in [path, *path.iterdir()]}


@pytest.mark.sqlite_only  # the owner of the data directory's SQLite file
@pytest.mark.parametrize("first", ["root", "service"])
def test_root_does_not_take_the_service_store(service_dir, first):
    top = service_dir.parent
    (top / "empty.toml").write_text("")
    env = clean_env(top, HOME=str(top))
    if first == "service":  # the service's store exists already
        as_service_user(env, "--data-dir", service_dir, "users", "add", "alice")
    before = {p.name: p.stat().st_mtime_ns for p in service_dir.iterdir()}
    for command in (("users", "add", "bob"), ("users", "list"), ("settings", "set", "rp_id", "x")):
        proc = run(env, "--data-dir", service_dir, *command,
                   expect=exitcodes.NOT_FOUND if command == ("users", "list") and first == "root"
                   else exitcodes.STORE)
        if proc.returncode == exitcodes.STORE:
            assert f"data directory {service_dir} is {SERVICE_UID}'s, not root's" in proc.stderr
            assert "do not chown the directory to root" in proc.stderr
            # the exact command to run instead
            assert f"here: sudo -u '#{SERVICE_UID}' " in proc.stderr
            assert f"--data-dir {service_dir} {' '.join(command)}" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in service_dir.iterdir()} == before
    assert owners(service_dir) == {SERVICE_UID}

    # run as its user, as said: the store is that user's, and it accepts it
    as_service_user(env, "--data-dir", service_dir, "users", "add", "bob")
    listed = json.loads(as_service_user(env, "--data-dir", service_dir, "users", "list",
                                        "--json").stdout)["users"]
    assert sorted(u["username"] for u in listed) == (["alice", "bob"] if first == "service"
                                                     else ["bob"])
    assert owners(service_dir) == {SERVICE_UID}
