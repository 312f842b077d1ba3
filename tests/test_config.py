"""token_agent.config: the service's config.toml: defaults, every kind of error (with its key
path), where the file is looked for, and `token-agent config check`'s exit codes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from token_agent import exitcodes
from token_agent.config import (
    DEFAULT_CONFIG,
    ROOT_SOCKET,
    ConfigError,
    check_config_text,
    config_path,
    default_socket,
    load_config,
    parse_config,
)


def errors_of(text: str) -> list[str]:
    config, errors, _warnings = check_config_text(text, "cfg.toml")
    assert config is None and errors, "expected errors"
    return errors


def test_defaults():
    c = parse_config("")
    assert c == DEFAULT_CONFIG and c.source is None
    s = c.service
    assert (s.socket, s.socket_mode, s.login_service_users, s.admin_group, s.prompt_timeout,
            s.max_connections) == (None, 0o666, (), "token-agent-admin", 120.0, 256)
    assert c.store.data_dir is None and c.policy.file is None
    assert (c.workstation.device, c.workstation.device_id, c.workstation.network) == \
        ("managed", None, None)
    assert c.workstation.effective_device_id().startswith(("ws-", "unknown-device"))
    assert (c.keys.simulators, c.keys.timeout) == ((), 30.0)
    assert (c.cards.readers, c.cards.lock_command) == (None, None)
    assert (c.cards.driver, c.cards.pkcs11_module) == ("auto", "opensc-pkcs11.so")
    assert (c.logging.level, c.logging.format) == ("info", "text")
    # the socket: root's, else the runtime directory's; TOKEN_AGENT_SOCKET beats the file
    assert default_socket({}, uid=0) == ROOT_SOCKET
    assert default_socket({"XDG_RUNTIME_DIR": "/run/user/1000"}, uid=1000) == \
        "/run/user/1000/token-agent/agent.sock"
    assert default_socket({}, uid=1000) == "/run/user/1000/token-agent/agent.sock"
    # a systemd service with RuntimeDirectory=token-agent
    assert default_socket({"RUNTIME_DIRECTORY": "/run/token-agent",
                           "XDG_RUNTIME_DIR": "/run/user/1000"}, uid=998) == ROOT_SOCKET
    c = parse_config('[service]\nsocket = "/srv/a.sock"\n')
    assert str(c.service.socket_path({})) == "/srv/a.sock"
    assert str(c.service.socket_path({"TOKEN_AGENT_SOCKET": "/tmp/b.sock"})) == "/tmp/b.sock"
    assert str(c.service.socket_path({"TOKEN_AGENT_SOCKET": "/tmp/b.sock"}, "/x/c.sock")) == \
        "/x/c.sock"
    assert DEFAULT_CONFIG.keys.environ({}) == {}


def test_clients_find_the_system_service(tmp_path, monkeypatch):
    import token_agent.config as config_module

    system = tmp_path / "run" / "agent.sock"
    monkeypatch.setattr(config_module, "ROOT_SOCKET", str(system))
    mine = {"XDG_RUNTIME_DIR": str(tmp_path / "user")}
    service = DEFAULT_CONFIG.service
    monkeypatch.setattr(config_module.os, "geteuid", lambda: 1000)  # an ordinary user
    assert service.client_socket_path(mine) == tmp_path / "user" / "token-agent" / "agent.sock"
    system.parent.mkdir()
    system.touch()  # the system service's socket exists, the user's own does not
    assert service.client_socket_path(mine) == system
    assert service.client_socket_path(mine, "/x.sock") == Path("/x.sock")   # named: as named
    assert service.client_socket_path({**mine, "TOKEN_AGENT_SOCKET": "/y.sock"}) == \
        Path("/y.sock")


def test_a_full_file(tmp_path):
    path = tmp_path / "etc" / "config.toml"
    path.parent.mkdir()
    path.write_text("""
[service]
socket = "run/agent.sock"          # relative: to the file's directory
socket_mode = 0o660
login_service_users = ["gdm", "lightdm"]
admin_group = "wheel"
prompt_timeout = 45.5
max_connections = 10
[store]
data_dir = "~/data"
[policy]
file = "/etc/token-agent/policy.toml"
[workstation]
device = "unmanaged"
device_id = "ws-ward-7"
network = "10.1.2.3"
[keys]
simulators = ["127.0.0.1:35962", "[::1]:4000"]
timeout = 12
[cards]
readers = ["Virtual PCD"]
lock_command = "xdg-screensaver lock"
[logging]
level = "DEBUG"
format = "json"
""")
    c = load_config(path, {"HOME": "/home/alice"})
    assert c.source == str(path)
    assert c.service.socket == str(tmp_path / "etc" / "run" / "agent.sock")
    assert c.service.socket_mode == 0o660 and c.service.login_service_users == ("gdm", "lightdm")
    assert (c.service.admin_group, c.service.prompt_timeout, c.service.max_connections) == \
        ("wheel", 45.5, 10)
    assert c.store.data_dir == "/home/alice/data"
    assert c.workstation.effective_device_id() == "ws-ward-7"
    assert c.workstation.network == "10.1.2.3" and c.workstation.device == "unmanaged"
    assert c.keys.environ({})["TOKEN_AGENT_SIM_KEYS"] == "127.0.0.1:35962,[::1]:4000"
    assert c.cards.readers == ("Virtual PCD",) and c.logging.level == "debug"
    assert parse_config('[service]\nsocket_mode = "0640"\n').service.socket_mode == 0o640
    assert parse_config('[cards]\nlock_command = ""\n').cards.lock_command == ""


@pytest.mark.parametrize("text, expected", [
    # unknown tables and keys, with a suggestion for a misspelt one
    ("[servce]\n", "servce: unknown table (did you mean service?)"),
    ("socket = 1\n", "socket: unknown key"),
    ("[service]\nprompt_timout = 3\n", "service.prompt_timout: unknown key (did you mean prompt_timeout?)"),
    ("[logging]\nfromat = 'json'\n", "logging.fromat: unknown key (did you mean format?)"),
    ("[keys]\nwhatever = 1\n", "keys.whatever: unknown key (known: simulators, timeout)"),
    # types
    ("service = 3\n", "service: must be a table ([service]), not an integer"),
    ("[service]\nmax_connections = 'a'\n", "service.max_connections: \"a\" must be a whole number"),
    ("[service]\nmax_connections = 2.5\n", "service.max_connections: 2.5 must be a whole number"),
    ("[service]\nprompt_timeout = true\n", "service.prompt_timeout: true must be a number"),
    ("[service]\nlogin_service_users = 'gdm'\n", "service.login_service_users: \"gdm\" must be an array"),
    ("[service]\nlogin_service_users = ['gdm', 3]\n", "service.login_service_users: 3 is not a user name"),
    ("[service]\nlogin_service_users = ['gdm', 'gdm']\n", "\"gdm\" is listed twice"),
    ("[service]\nsocket = 5\n", "service.socket: 5 must be a string, not an integer"),
    ("[service]\nsocket_mode = 'rw-rw-rw-'\n", "service.socket_mode: \"rw-rw-rw-\" must be a file mode"),
    ("[store]\ndata_dir = ''\n", "store.data_dir: must not be empty"),
    ("[keys]\nsimulators = ['127.0.0.1']\n", "keys.simulators: \"127.0.0.1\" is not host:port"),
    ("[cards]\nreaders = []\n", "cards.readers: is empty"),
    ("[cards]\nlock_command = 'echo \"unclosed'\n", "cards.lock_command"),
    ("[cards]\ndriver = 'pkcs'\n", "cards.driver: \"pkcs\" is not one of piv, pkcs11, auto (did you mean pkcs11?)"),
    ("[cards]\ndriver = 11\n", "cards.driver: 11 must be one of piv, pkcs11, auto, not an integer"),
    ("[cards]\npkcs11_module = ''\n", "cards.pkcs11_module: must not be empty"),
    ("[cards]\npkcs11_module = ['a.so']\n", "cards.pkcs11_module: [\"a.so\"] must be a string"),
    ("[cards]\npkcs11_module = '..'\n", "cards.pkcs11_module: \"..\" is not a module"),
    ("[cards]\npkcs11_modul = 'a.so'\n", "cards.pkcs11_modul: unknown key (did you mean pkcs11_module?)"),
    # ranges and choices
    ("[service]\nsocket_mode = 0o1777\n", "service.socket_mode: 0o1777 is out of range"),
    ("[service]\nsocket_mode = 0o066\n", "does not let the service's own user read and write"),
    ("[service]\nprompt_timeout = 0\n", "service.prompt_timeout: 0 is out of range: allowed 1 to 3600 seconds"),
    ("[service]\nmax_connections = 100000\n", "service.max_connections: 100000 is out of range"),
    ("[keys]\ntimeout = 301\n", "keys.timeout: 301 is out of range: allowed 1 to 300 seconds"),
    ("[keys]\nsimulators = ['127.0.0.1:99999']\n", "the port must be a number from 1 to 65535"),
    ("[workstation]\ndevice = 'managd'\n", "workstation.device: \"managd\" is not one of managed, unmanaged (did you mean managed?)"),
    ("[workstation]\nnetwork = '10.0.0.0/8'\n", "workstation.network: \"10.0.0.0/8\" is not an IP address (a network?"),
    ("[logging]\nlevel = 'verbose'\n", "logging.level: \"verbose\" is not one of debug, info, warning, error"),
    ("[logging]\nformat = 'xml'\n", "logging.format: \"xml\" is not one of text, json"),
    # not TOML at all
    ("[service\n", "not valid TOML"),
])
def test_every_error_names_its_key(text, expected):
    errors = errors_of(text)
    assert any(expected in e for e in errors), errors
    assert all(e.startswith("cfg.toml: ") for e in errors)


def test_the_card_driver_and_the_pkcs11_module(tmp_path):
    """[cards] driver: piv | pkcs11 | auto (any case); pkcs11_module: a bare file name is
    left to the dynamic loader, a path is taken from the file's directory, ~ is home."""
    assert parse_config("[cards]\ndriver = 'PKCS11'\n").cards.driver == "pkcs11"
    assert parse_config("[cards]\ndriver = 'piv'\n").cards.driver == "piv"
    c = parse_config("[cards]\npkcs11_module = 'libvendor-p11.so'\n")
    assert c.cards.pkcs11_module == "libvendor-p11.so" and c.cards.driver == "auto"
    path = tmp_path / "etc" / "config.toml"
    path.parent.mkdir()
    path.write_text("[cards]\ndriver = 'pkcs11'\npkcs11_module = 'lib/vendor.so'\n")
    c = load_config(path, {"HOME": "/home/alice"})
    assert c.cards.pkcs11_module == str(tmp_path / "etc" / "lib" / "vendor.so")
    path.write_text("[cards]\npkcs11_module = '~/p11/vendor.so'\n")
    assert load_config(path, {"HOME": "/home/alice"}).cards.pkcs11_module == \
        "/home/alice/p11/vendor.so"
    # config check: a module path that is not there is a warning (the service still starts:
    # PIV cards log in; a card that needs the module gets the driver's message naming it)
    _c, errors, warnings = check_config_text(
        f"[cards]\npkcs11_module = '{tmp_path}/none.so'\n")
    assert not errors and any("cards.pkcs11_module" in w and "none.so" in w for w in warnings)
    assert check_config_text(
        f"[cards]\ndriver = 'piv'\npkcs11_module = '{tmp_path}/none.so'\n")[2] == []
    assert check_config_text("[cards]\ndriver = 'pkcs11'\n")[2] == []


def test_every_problem_is_reported_at_once():
    errors = errors_of("[servce]\n[service]\nprompt_timeout = -1\n[logging]\nlevel = 3\n")
    assert len(errors) == 3, errors
    with pytest.raises(ConfigError) as info:
        parse_config("[servce]\n[service]\nprompt_timeout = -1\n[logging]\nlevel = 3\n")
    assert info.value.errors == errors or len(info.value.errors) == 3


def test_warnings():
    _c, errors, warnings = check_config_text(
        '[service]\nsocket_mode = 0o660\nlogin_service_users = ["gdm"]\n'
        '[keys]\nsimulators = ["127.0.0.1:35962"]\n[cards]\nlock_command = ""\n'
        '[logging]\nlevel = "debug"\n')
    assert not errors
    text = "\n".join(warnings)
    for fragment in ("keys.simulators", "cards.lock_command", "service.socket_mode",
                     "logging.level"):
        assert fragment in text, warnings
    assert check_config_text("")[2] == []


def test_where_the_file_is_looked_for(tmp_path, monkeypatch):
    system = tmp_path / "etc" / "config.toml"
    xdg = tmp_path / "xdg"
    home = tmp_path / "home"
    named = tmp_path / "named.toml"
    for p, body in ((system, "[keys]\ntimeout = 1\n"),
                    (xdg / "token-agent" / "config.toml", "[keys]\ntimeout = 2\n"),
                    (home / ".config" / "token-agent" / "config.toml", "[keys]\ntimeout = 3\n"),
                    (named, "[keys]\ntimeout = 4\n")):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(body)
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[keys]\ntimeout = 5\n")
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(xdg), "TOKEN_AGENT_CONFIG": str(named)}

    def timeout(environ, explicit_path=None, system_path=system):
        return load_config(explicit_path, environ, system_path=system_path).keys.timeout

    assert timeout(env, explicit) == 5                 # --config
    assert timeout(env) == 4                           # TOKEN_AGENT_CONFIG
    del env["TOKEN_AGENT_CONFIG"]
    assert timeout(env) == 1                           # /etc/token-agent/config.toml
    missing = tmp_path / "nope.toml"
    assert timeout(env, system_path=missing) == 2      # $XDG_CONFIG_HOME/token-agent/
    env["XDG_CONFIG_HOME"] = "relative/dir"            # not absolute: ignored
    assert timeout(env, system_path=missing) == 3      # ~/.config/token-agent/
    env["HOME"] = str(tmp_path / "empty-home")
    assert config_path(None, env, system_path=missing) is None
    assert load_config(None, env, system_path=missing) is DEFAULT_CONFIG  # built-in defaults
    # a file named explicitly, or by the variable, must exist
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(missing, env, system_path=missing)
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(None, {**env, "TOKEN_AGENT_CONFIG": str(missing)}, system_path=missing)
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bad.toml", env)


def _check(*args, env=None):
    environ = environ_for_agent()
    environ.update(env or {})
    return subprocess.run(token_agent_command() + ["config", "check", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=environ,
                          timeout=60)


def test_check_command_exit_codes(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[keys]\nsimulators = ["127.0.0.1:35962"]\n')
    proc = _check(good)
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert f"{good}: ok" in proc.stdout and "warning:" in proc.stderr and "keys.simulators" in proc.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text("[servce]\n[service]\nprompt_timeout = 0\n")
    proc = _check(bad)
    assert proc.returncode == exitcodes.USAGE
    assert "servce: unknown table (did you mean service?)" in proc.stderr
    assert "service.prompt_timeout: 0 is out of range" in proc.stderr

    proc = _check(bad, "--json")
    data = json.loads(proc.stdout)
    assert proc.returncode == exitcodes.USAGE and not data["ok"] and len(data["errors"]) == 2

    proc = _check(tmp_path / "missing.toml")
    assert proc.returncode == exitcodes.USAGE and "not found" in proc.stderr

    # no argument: the file in force (TOKEN_AGENT_CONFIG here)
    proc = _check("--json", env={"TOKEN_AGENT_CONFIG": str(good)})
    data = json.loads(proc.stdout)
    assert proc.returncode == 0 and data["file"] == str(good) and data["ok"]
    assert data["config"]["keys"]["simulators"] == ["127.0.0.1:35962"]
