"""Issue 11, item 8: the files the agent trusts (``token_agent/filetrust.py``, like sshd's
StrictModes). As root, each attack of the review is set up and must be refused with the
path and the fix, touching nothing:

* a data directory owned by ``nobody``, or mode 0777, with a planted ``secrets.key``;
* ``token-agent.db`` (or its ``-wal``, or ``secrets.key``) a symbolic link: the link's
  target is neither chmod-ed nor created;
* a store or key file owned by another user, or writable by others;
* config and policy files writable by others: refused by ``token-agent serve`` (and by
  ``config check`` / ``policy check``), warned about by the other commands.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from test_cli_mfa import cli  # noqa: F401  (fixture)

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files of another user)")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def planted_dir(tmp_path: Path, *, owner: int = 0, dir_mode: int = 0o700) -> Path:
    """A data directory with a store and a key file made by the rightful user, then handed
    to ``owner`` with ``dir_mode`` (the attacker's), and a key file planted by ``owner``."""
    from token_agent.agent import Agent

    data = tmp_path / "data"
    Agent.open(data, environ={}).close()
    (data / "secrets.key").unlink()
    planted = data / "secrets.key"
    planted.write_bytes(b"K" * 32)
    os.chmod(planted, 0o600)
    os.chown(planted, owner, owner)
    os.chown(data, owner, owner)
    os.chmod(data, dir_mode)
    return data


# --------------------------------------------------------------------------- the data directory


@pytest.mark.sqlite_only  # Store.open of a SQLite file in a planted directory
@pytest.mark.parametrize("owner, dir_mode, fix", [
    (0, 0o777, "chmod 700"),          # root's directory, but anyone may write in it
    (NOBODY, 0o700, "sudo -u nobody"),  # a user's directory: run as them, never take it
    (NOBODY, 0o777, "chown root"),    # the review's: a user-owned 0777 directory
])
def test_a_data_directory_others_control_is_refused(tmp_path, owner, dir_mode, fix):
    from token_agent.agent import Agent
    from token_agent.secretbox import SecretError, SecretKeys
    from token_agent.store import Store, StoreFileError

    data = planted_dir(tmp_path, owner=owner, dir_mode=dir_mode)
    with pytest.raises(SecretError) as info:
        SecretKeys.load_or_create(data, {})
    assert str(data) in str(info.value) and fix in str(info.value)
    with pytest.raises(StoreFileError) as info:
        Store.open(data / "token-agent.db")
    assert info.value.reason == "untrusted"
    assert str(data) in str(info.value) and fix in str(info.value)
    with pytest.raises((SecretError, StoreFileError)):
        Agent.open(data, environ={})


@pytest.mark.sqlite_only  # `users list` opens the SQLite file there (not the key file)
def test_the_cli_refuses_a_planted_data_directory(cli, tmp_path):  # noqa: F811
    cli("users", "add", "alice")
    os.chmod(cli.data, 0o777)
    proc = cli("users", "list", expect=7)
    assert f"{cli.data} can be written by its group or others (mode 0777): chmod 700 " \
           f"{cli.data}" in proc.stderr
    os.chmod(cli.data, 0o700)
    key = cli.data / "secrets.key"
    os.chown(key, NOBODY, NOBODY)   # a key file of someone else
    proc = cli("policy", "explain", "--user", "alice", expect=7)  # opens the key file
    assert f"key file {key} is owned by nobody" in proc.stderr and f"chown root {key}" in \
        proc.stderr
    os.chown(key, 0, 0)
    cli("policy", "explain", "--user", "alice")


# --------------------------------------------------------------------------- symbolic links


@pytest.mark.sqlite_only  # a symlinked SQLite file
def test_a_symlinked_store_is_refused_and_its_target_untouched(tmp_path):
    from token_agent.store import Store, StoreFileError

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "precious"
    target.write_text("someone's file\n")
    os.chmod(target, 0o644)
    db = data / "token-agent.db"
    db.symlink_to(target)
    with pytest.raises(StoreFileError) as info:
        Store.open(db)
    assert info.value.reason == "untrusted"
    assert f"{db} is a symbolic link (to {target})" in str(info.value)
    assert f"rm {db}" in str(info.value)
    assert mode(target) == 0o644 and target.read_text() == "someone's file\n"  # not chmod-ed

    # a dangling link: nothing is created at its target
    db.unlink()
    missing = elsewhere / "created-by-root.db"
    db.symlink_to(missing)
    with pytest.raises(StoreFileError, match="symbolic link"):
        Store.open(db)
    assert not missing.exists() and sorted(p.name for p in elsewhere.iterdir()) == ["precious"]

    # its write-ahead log too
    db.unlink()
    Store.open(db).close()
    wal = Path(f"{db}-wal")
    if wal.exists():
        wal.unlink()
    wal.symlink_to(target)
    with pytest.raises(StoreFileError, match="write-ahead log .* is a symbolic link"):
        Store.open(db)
    assert mode(target) == 0o644


@pytest.mark.sqlite_only  # Store.open of a SQLite file in a symlinked directory
def test_a_symlinked_data_directory_or_key_file_is_refused(tmp_path):
    from token_agent.secretbox import SecretError, SecretKeys
    from token_agent.store import Store, StoreFileError

    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(StoreFileError) as info:
        Store.open(link / "token-agent.db")
    assert f"data directory {link} is a symbolic link" in str(info.value)
    assert f"use {real} itself" in str(info.value)
    assert list(real.iterdir()) == []

    # secrets.key a link to a key of someone else's choosing
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    chosen = tmp_path / "chosen.key"
    chosen.write_bytes(b"C" * 32)
    os.chmod(chosen, 0o644)
    (data / "secrets.key").symlink_to(chosen)
    with pytest.raises(SecretError, match=r"secrets.key is a symbolic link"):
        SecretKeys.load_or_create(data, {})
    assert mode(chosen) == 0o644
    # TOKEN_AGENT_KEY_FILE naming a link: refused as well
    with pytest.raises(SecretError, match="symbolic link"):
        SecretKeys.load_or_create(tmp_path, {"TOKEN_AGENT_KEY_FILE": str(data / "secrets.key")})
    # or a file in a shared directory such as /tmp, where anyone can plant it first
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(SecretError, match="is a shared directory .mode 1777.*of its own"):
        SecretKeys.load_or_create(data, {"TOKEN_AGENT_KEY_FILE": str(shared / "k")})
    assert list(shared.iterdir()) == []


# --------------------------------------------------------------------------- owners and modes


@pytest.mark.sqlite_only  # the SQLite file's owner and mode
def test_a_store_of_another_user_or_writable_by_others_is_refused(tmp_path):
    from token_agent.store import Store, StoreFileError

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    db = data / "token-agent.db"
    Store.open(db).close()
    os.chown(db, NOBODY, NOBODY)
    with pytest.raises(StoreFileError) as info:
        Store.open(db)
    assert f"store {db} is owned by nobody" in str(info.value)
    assert f"chown root {db}" in str(info.value)
    os.chown(db, 0, 0)
    os.chmod(db, 0o666)
    with pytest.raises(StoreFileError, match=rf"mode 0666\): chmod 600 {db}"):
        Store.open(db)
    assert mode(db) == 0o666   # refused, not silently "fixed"
    os.chmod(db, 0o600)
    Store.open(db).close()


def test_the_rightful_files_still_work(tmp_path):
    """A fresh data directory, an existing 0755 one, and a key file readable by others
    (tightened, as before) are all accepted."""
    from token_agent.agent import Agent
    from token_agent.secretbox import SecretKeys

    fresh = tmp_path / "fresh" / "data"
    Agent.open(fresh, environ={}).close()
    assert mode(fresh) == 0o700 and mode(fresh / "secrets.key") == 0o600
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    Agent.open(shared, environ={}).close()
    os.chmod(shared / "secrets.key", 0o644)
    SecretKeys.load_or_create(shared, {})
    assert mode(shared / "secrets.key") == 0o600


# --------------------------------------------------------------------------- config and policy


def serve(config: Path, *, timeout: float = 30) -> subprocess.CompletedProcess:
    env = environ_for_agent()
    return subprocess.run(token_agent_command() + ["serve", "--config", str(config)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def service_files(tmp_path):
    data = tmp_path / "data"
    policy = tmp_path / "etc" / "policy.toml"
    policy.parent.mkdir(mode=0o755)
    os.chmod(policy.parent, 0o755)
    policy.write_text("")
    config = tmp_path / "etc" / "config.toml"
    config.write_text(f'[service]\nsocket = "{tmp_path / "agent.sock"}"\n'
                      f'[store]\ndata_dir = "{data}"\n[policy]\nfile = "{policy}"\n')
    for f in (config, policy):
        os.chmod(f, 0o644)
    return config, policy


@pytest.mark.parametrize("which", ["config", "policy"])
@pytest.mark.parametrize("how", ["world-writable", "group-writable", "owned by nobody",
                                 "directory writable"])
def test_the_service_refuses_config_and_policy_files_others_can_change(service_files, which,
                                                                       how):
    config, policy = service_files
    victim = config if which == "config" else policy
    if how == "world-writable":
        os.chmod(victim, 0o666)
        expected = f"{victim} can be written by its group or others (mode 0666): chmod go-w"
    elif how == "group-writable":
        os.chmod(victim, 0o664)
        expected = f"{victim} can be written by its group or others (mode 0664)"
    elif how == "owned by nobody":
        os.chown(victim, NOBODY, NOBODY)
        expected = f"{victim} is owned by nobody, who can change it: chown root {victim}"
    else:
        os.chmod(victim.parent, 0o777)
        expected = f"{victim.parent} can be written by its group or others (mode 0777)"
    proc = serve(config)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert expected in proc.stderr, proc.stderr
    assert not (config.parent.parent / "agent.sock").exists()
    assert not (config.parent.parent / "data" / "token-agent.db").exists()


def test_the_cli_warns_about_them_and_the_checks_refuse_them(cli, service_files):  # noqa: F811
    config, policy = service_files
    os.chmod(policy, 0o666)
    proc = cli("policy", "show", env={"TOKEN_AGENT_POLICY": str(policy)})
    assert f"token-agent: warning: policy file {policy} can be written by its group or " \
           f"others (mode 0666): chmod go-w {policy}" in proc.stderr, proc.stderr
    proc = cli("policy", "check", str(policy), expect=2)
    assert f"{policy} can be written by its group or others (mode 0666)" in proc.stderr
    os.chmod(config, 0o666)
    proc = cli("config", "check", str(config), expect=2)
    assert f"{config} can be written by its group or others (mode 0666)" in proc.stderr
    os.chmod(config, 0o644)
    os.chmod(policy, 0o644)
    cli("config", "check", str(config))
    assert "warning" not in cli("policy", "show", env={"TOKEN_AGENT_POLICY": str(policy)}).stderr
