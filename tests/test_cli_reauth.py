"""Issue 11, item 4, on the command line: a caller who is not an administrator changes a
user's methods (``enrol ...``, ``methods prefer|remove``) only after logging in as that
user with the policy login flow (its second factor too when MFA applies), unless it is the
user's first method.

The caller is a real ``token-agent`` process running as ``nobody`` (it imports as root,
since the interpreter lives where nobody cannot read, then drops to uid 65534 before the
command runs), on a store ``nobody`` owns. Root and members of the admin group go ahead
as before (every other CLI test runs as root)."""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_cli_mfa import PASSWORD, Cli, Codes
from token_agent import exitcodes

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")


def as_user(uid: int) -> str:
    """A ``python -c`` script: the CLI (``sys.argv[1:]``) run as ``uid``, its modules imported
    while root (the interpreter lives where others cannot read)."""
    return textwrap.dedent(f"""
    import importlib, os, pkgutil, sys
    import drivers, token_agent
    for pkg in (token_agent, drivers):  # everything the command may import, while root
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not m.name.endswith("__main__"):
                try:
                    importlib.import_module(m.name)
                except Exception:
                    pass
    import encodings.idna, getpass, secrets, sqlite3, uuid, xml.sax.saxutils  # noqa: F401
    from token_agent.cli import main
    os.setgroups([]); os.setgid({uid}); os.setuid({uid})
    assert os.geteuid() == {uid}
    main(sys.argv[1:], prog_name="token-agent")
""")


AS_NOBODY = as_user(NOBODY)


class NobodyCli(Cli):
    """``Cli`` on a store in a directory ``nobody`` can reach; ``.nobody(...)`` runs a
    command as nobody (the store is handed to nobody first), ``(...)`` as root (and the
    store back to root)."""

    def __init__(self, tmp_path: Path, top: Path) -> None:
        super().__init__(tmp_path)
        self.data = top / "data"
        self.policy = top / "policy.toml"
        self.policy.write_text("")
        self.env.update(TOKEN_AGENT_DATA_DIR=str(self.data), TOKEN_AGENT_POLICY=str(self.policy),
                        TOKEN_AGENT_CONFIG=str(top / "config.toml"), HOME=str(top))
        (top / "config.toml").write_text("")

    def _own(self, uid: int) -> None:
        """The store to ``uid`` (the agent refuses a store another user owns)."""
        for root, dirs, files in os.walk(self.data):
            for name in [root, *(os.path.join(root, f) for f in files)]:
                os.chown(name, uid, uid)

    def __call__(self, *args, **kw):
        self._own(0)
        return super().__call__(*args, **kw)

    def nobody(self, *args, input: str = "", expect: int | None = 0):
        self._own(NOBODY)
        argv = [str(a) for a in args]
        proc = subprocess.run([sys.executable, "-c", AS_NOBODY, *argv], input=input,
                              capture_output=True, text=True, cwd="/", timeout=60,
                              env=self.env | {"PYTHONPATH": str(REPO_ROOT),
                                              "PYTHONDONTWRITEBYTECODE": "1"})
        if expect is not None:
            assert proc.returncode == expect, (argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def kinds(self) -> list[str]:
        return sorted(m["kind"] for m in self.json("methods", "list", "--user", "nobody")["methods"])


@pytest.fixture
def cli(tmp_path):
    top = Path(tempfile.mkdtemp(prefix="token-agent-reauth-"))
    top.chmod(0o755)
    yield NobodyCli(tmp_path, top)
    shutil.rmtree(top, ignore_errors=True)


def test_no_method_is_changed_without_a_login(cli):
    cli.policy.write_text("[classes.internal]\nenforce = false\n")
    cli("users", "add", "nobody")
    cli("users", "set", "nobody", "--mfa", "off")
    # the first method needs no login (there is nothing to log in with)
    cli.nobody("enrol", "password", "--user", "nobody", "--password-stdin",
               input=PASSWORD + "\n")
    assert cli.kinds() == ["password"]

    # the attack: a process of the user, no login: nothing minted, nothing removed
    for args in (["enrol", "backup-codes", "--user", "nobody"],
                 ["enrol", "totp", "--user", "nobody", "--json"],
                 ["enrol", "app-password", "--user", "nobody", "--name", "x"],
                 ["methods", "remove", "--user", "nobody", "password"],
                 ["methods", "prefer", "--user", "nobody", "password"],
                 ["enrol", "password", "--user", "nobody", "--password-stdin"]):
        refused = cli.nobody(*args, input="", expect=None)
        assert refused.returncode not in (0, exitcodes.USAGE), (args, refused.stderr)
        assert "needs a login as nobody first" in refused.stderr
        assert "nothing changed: the login failed" in refused.stderr
    wrong = cli.nobody("enrol", "backup-codes", "--user", "nobody",
                       input="not the password\n", expect=exitcodes.AUTH_FAILED)
    assert "backup codes" not in wrong.stdout
    assert cli.kinds() == ["password"]

    # with the password first: allowed
    made = cli.nobody("enrol", "backup-codes", "--user", "nobody", "--json",
                      input=PASSWORD + "\n")
    assert len(json.loads(made.stdout)["backup_codes"]) == 10
    assert cli.kinds() == ["backup", "password"]
    cli.nobody("methods", "remove", "--user", "nobody", "backup", input=PASSWORD + "\n")
    assert cli.kinds() == ["password"]


def test_mfa_users_log_in_with_their_second_factor_first(cli):
    cli("users", "add", "nobody")  # class internal: MFA enforced
    cli("enrol", "password", "--user", "nobody", "--password-stdin", input=PASSWORD + "\n")
    enrolled = cli.json("enrol", "totp", "--user", "nobody")
    codes = Codes(enrolled["secret"])
    cli("enrol", "totp", "--user", "nobody", "--confirm", codes.next())
    # the password alone is not enough: the second factor is asked, even on a device where
    # the policy would not ask it at login
    alone = cli.nobody("enrol", "backup-codes", "--user", "nobody", input=PASSWORD + "\n",
                       expect=None)
    assert alone.returncode != 0 and "with a second factor" in alone.stderr
    assert "Code from your authenticator app" in alone.stderr
    assert cli.kinds() == ["password", "totp"]
    # the last second factor under enforced MFA is never removed (admin_ops.removal_refused)
    last = cli.nobody("methods", "remove", "--user", "nobody", "totp",
                      input=f"{PASSWORD}\n{codes.next()}\n", expect=exitcodes.CONFLICT)
    assert "your last second factor" in last.stderr
    assert cli.kinds() == ["password", "totp"]
    cli.nobody("enrol", "backup-codes", "--user", "nobody",
               input=f"{PASSWORD}\n{codes.next()}\n")
    cli.nobody("methods", "remove", "--user", "nobody", "totp",
               input=f"{PASSWORD}\n{codes.next()}\n")
    assert cli.kinds() == ["backup", "password"]


def test_administrators_are_not_asked(cli):
    cli("users", "add", "nobody")
    cli("enrol", "password", "--user", "nobody", "--password-stdin", input=PASSWORD + "\n")
    group = grp.getgrgid(NOBODY).gr_name
    Path(cli.env["TOKEN_AGENT_CONFIG"]).write_text(f'[service]\nadmin_group = "{group}"\n')
    cli.nobody("enrol", "backup-codes", "--user", "nobody", input="")
    assert cli.kinds() == ["backup", "password"]
