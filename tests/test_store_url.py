"""Issue 14: the store's URL. A PostgreSQL store is named by ``--store-url``,
``TOKEN_AGENT_STORE_URL`` or ``[store] url``; the URL never carries the password (argv, the
environment and logs show it), so one that does is refused before anything is opened, with
exit 2, and the password is not repeated in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_cli_datadir import clean_env, files_under, run
from token_agent import exitcodes
from token_agent.config import ConfigError, load_config
from token_agent.datadir import StoreUrlError, locate
from token_agent.store.url import redact, url_problem

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("url", [
    f"postgresql://agent:{SECRET}@db.example/token_agent",
    f"postgresql:///token_agent?host=/run/postgresql&password={SECRET}",
])
def test_a_password_in_the_url_is_refused_everywhere(tmp_path: Path, url: str) -> None:
    assert "password" in url_problem(url)
    assert SECRET not in redact(url)
    env = clean_env(tmp_path, TOKEN_AGENT_DATA_DIR=str(tmp_path / "data"))
    proc = run(env, "--store-url", url, "users", "add", "alice", expect=exitcodes.USAGE)
    assert "--store-url" in proc.stderr and "password" in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout
    proc = run({**env, "TOKEN_AGENT_STORE_URL": url}, "users", "list", expect=exitcodes.USAGE)
    assert "TOKEN_AGENT_STORE_URL" in proc.stderr and SECRET not in proc.stderr
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\nurl = "{url}"\n')
    proc = run({**env, "TOKEN_AGENT_CONFIG": str(config)}, "users", "list",
               expect=exitcodes.USAGE)
    assert "store.url" in proc.stderr and SECRET not in proc.stderr
    assert files_under(tmp_path / "data") == []  # nothing was created


@pytest.mark.parametrize("url, problem", [
    ("mysql://db/x", "not a postgresql:// URL"),
    ("postgresql://db.example", "names no database"),
    ("postgresql://db.example:99999/x", "not a valid URL"),
])
def test_wrong_urls_say_what_is_wrong(url: str, problem: str) -> None:
    assert problem in url_problem(url)
    with pytest.raises(StoreUrlError, match="--store-url"):
        locate("/nonexistent", {}, config=load_config(None, {"HOME": "/nonexistent"}),
               store_url=url)


def test_which_url_wins(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[store]\nurl = "postgresql:///from_config?host=/tmp"\n'
                      'password_file = "pw"\n')
    cfg = load_config(str(config), {})
    assert cfg.store.password_file == str(tmp_path / "pw")  # relative to the file
    where = locate(tmp_path, {}, config=cfg)
    assert where.store_url.endswith("/from_config?host=/tmp")
    assert "[store] url" in where.store_url_source and where.password_file == str(tmp_path / "pw")
    env = {"TOKEN_AGENT_STORE_URL": "postgresql:///from_env"}
    assert locate(tmp_path, env, config=cfg).store_url == "postgresql:///from_env"
    assert locate(tmp_path, env, config=cfg, store_url="postgresql:///from_argv").store_url \
        == "postgresql:///from_argv"
    plain = locate(tmp_path, {}, config=load_config(None, {"HOME": str(tmp_path / "h")}))
    assert plain.store_url is None and plain.password_file is None


def test_config_check_refuses_a_bad_url(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[store]\nurl = "sqlite:///x"\n')
    with pytest.raises(ConfigError, match=r"store\.url.*postgresql://"):
        load_config(str(config), {})


def test_an_unreachable_server_is_said_once_with_the_url_as_written(tmp_path: Path) -> None:
    """No server behind the URL: one message naming the URL as it was given (not rewritten,
    not repeated by the connection pool's own warnings), exit 7."""
    url = f"postgresql:///token_agent?host={tmp_path / 'no-such-socket-dir'}"
    env = clean_env(tmp_path, TOKEN_AGENT_DATA_DIR=str(tmp_path / "data"))
    proc = run(env, "--store-url", url, "store", "check", expect=exitcodes.STORE)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len([line for line in lines if "cannot connect" in line]) == 1, proc.stderr
    assert "psycopg" not in proc.stderr and "Traceback" not in proc.stderr
    assert url in proc.stderr
