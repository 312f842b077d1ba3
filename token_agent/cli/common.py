"""What every `token-agent` command shares: output (text or --json), prompts on stderr, PIN
entry that never echoes, the store, Ctrl-C as a clean cancel, and exit codes."""

from __future__ import annotations

import functools
import os
import sys
import threading
from typing import Any, Callable, NoReturn

import click

from .. import exitcodes
from . import jsonout
from .cancel import answer, ask, cancellable  # noqa: F401  (cancellable: for the commands)


class Context:
    """Per-invocation options (set on the root group)."""

    def __init__(self, data_dir: str | None, policy_path: str | None = None,
                 config_path: str | None = None, store_url: str | None = None) -> None:
        self.data_dir = data_dir  # --data-dir only; TOKEN_AGENT_DATA_DIR: token_agent.datadir
        self.store_url = store_url  # --store-url only; TOKEN_AGENT_STORE_URL: the same
        self._where = None  # the data directory and store, once located
        self.policy_path = policy_path
        self.config_path = config_path
        self._store = None
        self._agent = None
        self._config = None  # config.toml, once read (``config``)

    def agent(self, create: bool = False):
        """The store, key file and policy together (``token_agent.agent.Agent``): exit 7 when
        the store or key file cannot be used, exit 2 when the policy file is wrong.
        ``create``: as for ``store``."""
        if self._agent is None:
            from ..agent import Agent
            from ..secretbox import SecretError

            policy = self.policy()  # a wrong policy file is exit 2, store or none
            store = self.store(create)
            try:
                self._agent = Agent.open(where=self._where, store=store, policy=policy)
            except SecretError as e:
                fail(str(e), exitcodes.STORE)
        return self._agent

    def policy_file(self):
        """The policy file in force, found as the service finds it (``policy.py``: --policy,
        TOKEN_AGENT_POLICY, config.toml's [policy] file, /etc, ~/.config), or None for the
        built-in defaults. A wrong config.toml is exit 2."""
        from ..policy import POLICY_ENV, policy_path_in_force

        configured = None
        if not self.policy_path and not os.environ.get(POLICY_ENV):
            configured = self.config().policy.file
        return policy_path_in_force(self.policy_path, configured=configured)

    def config(self):
        """config.toml (``--config``, TOKEN_AGENT_CONFIG, /etc, ~/.config; the defaults when
        there is none): exit 2 when it is wrong."""
        from ..config import ConfigError, load_config

        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as e:
                fail("; ".join(e.errors), exitcodes.USAGE)
        return self._config

    def policy(self):
        """The policy in force (exit 2 when its file is wrong); needs no store."""
        from ..policy import DEFAULT_POLICY, PolicyError, load_policy

        path = self.policy_file()
        try:
            return DEFAULT_POLICY if path is None else load_policy(path)
        except PolicyError as e:
            fail(str(e), exitcodes.USAGE)

    def store(self, create: bool = False):
        """The credential store, opened on first use (``token_agent.datadir``). Only a
        command that writes passes ``create``: for the others a missing store is exit 8,
        saying where it was looked for, and nothing is created. StoreError -> exit 7, a
        wrong config.toml (read for its [store] data_dir) -> exit 2."""
        if self._store is None:
            from ..config import ConfigError
            from ..datadir import StoreUrlError, locate, open_store
            from ..store import StoreError, StoreMissing

            if self.config_path:  # a file named with --config is checked even when unused
                self.config()
            try:
                # config.toml read once: the policy's lookup may have read it already
                self._where = where = locate(self.data_dir, config_path=self.config_path,
                                             config=self._config, store_url=self.store_url)
                self._refuse_local_store(where)
                self._store = open_store(where, create=create)
            except ConfigError as e:
                fail("; ".join(e.errors), exitcodes.USAGE)
            except StoreUrlError as e:
                fail(str(e), exitcodes.USAGE)
            except StoreMissing as e:
                fail(str(e), exitcodes.NOT_FOUND, reason="no-store")
            except StoreError as e:
                fail(str(e) + _run_as_owner(e), exitcodes.STORE)
            except OSError as e:
                fail(f"cannot open the credential store: {e}", exitcodes.STORE)
        return self._store

    def _refuse_local_store(self, where) -> None:
        """On an organisation's workstation (config.toml's ``[organisation] servers``) users
        and methods live in the organisation's store: a command reaching for the local
        SQLite store is refused (exit 12) instead of changing a stray copy. A PostgreSQL
        store named by --store-url, TOKEN_AGENT_STORE_URL or [store] url (the server's
        host, the administrator's way) is allowed."""
        if where.store_url is not None:
            return
        org = self.config().organisation  # (locate has read it already: its [store] url)
        if org.enabled:
            fail(organisation_refusal(org.servers), exitcodes.ORGANISATION,
                 reason="organisation-workstation")

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


pass_ctx = click.make_pass_decorator(Context)


def organisation_refusal(servers) -> str:
    """The one message of a command refused on an organisation's workstation (exit 12)."""
    return (f"this workstation belongs to an organisation (servers: {', '.join(servers)}): "
            "users and methods are managed through the organisation's server, not this "
            "workstation's store. Ask the organisation's administrator, who runs the command "
            "on the server's host (or with --store-url naming the organisation's store); "
            "logins and key enrolment go through `token-agent serve`.")


def _run_as_owner(e) -> str:
    """Root refused another user's data directory (``filetrust.py``): this very command as
    that user, to copy (the command line holds no secret: they are never taken there)."""
    if not getattr(e, "run_as", None):
        return ""
    import shlex

    prog = [sys.executable, "-m", "token_agent"] if sys.argv[0].endswith("__main__.py") \
        else sys.argv[:1]
    return f"; here: sudo -u {shlex.quote(e.run_as)} {shlex.join(prog + sys.argv[1:])}"


def say(message: str) -> None:
    """A prompt or progress line for the person: always stderr, so stdout stays data."""
    click.echo(message, err=True)


def fail(message: str, code: int = exitcodes.ERROR, *, reason: str | None = None,
         data: dict | None = None) -> NoReturn:
    """Say what went wrong on stderr and exit with ``code``. With --json, stdout gets the
    error object too (``jsonout``): ``reason`` (a stable code such as ``wrong-pin``; default:
    the exit status's name) and ``data`` (what the command knows, e.g. a login's outcome)."""
    click.echo(f"token-agent: {message}", err=True)
    out = jsonout.current()
    if out is not None:
        if data is not None:
            out.add(data)
        out.error = (code, reason, message)
    sys.exit(code)


def emit(as_json: bool, data: Any, text: str | Callable[[], str]) -> None:
    """Print the result: the JSON object on stdout for scripts (``jsonout``: printed when
    the command ends, with ``version`` and ``ok``; give a dict), or the text for people."""
    if not as_json:
        click.echo(text() if callable(text) else text)
        return
    out = jsonout.current()
    if out is not None:
        out.add(data)
    else:  # not inside a json_option command: print at once
        click.echo(jsonout.render(jsonout.document(data)))


def escape_controls(text: str) -> str:
    """``text`` safe to print on one line: every character that is not printable (newline,
    CR, tab, ESC and the other controls, Unicode format characters such as a right-to-left
    override) written as its Python escape (``\\n``, ``\\x1b``, ``\\u202e``), so that
    recorded text can neither start a forged line nor drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def json_option(func):
    """--json: one JSON object on stdout, errors included (``jsonout``, README "JSON output")."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Machine-readable output: one JSON object on stdout, errors "
                             "included (README \"JSON output\").")(jsonout.json_command(func))


def pin_options(func):
    """--pin-stdin: read the PIN from standard input (scripts), never from the command line."""
    return click.option(
        "--pin-stdin", is_flag=True,
        help="Read the PIN from the first line of standard input instead of prompting.",
    )(func)


class PinSource:
    """Asks for a PIN only when the device needs one: hidden prompt on the terminal, or the
    first line of stdin with --pin-stdin. The PIN is never echoed, printed or logged."""

    def __init__(self, from_stdin: bool, prompt: str = "PIN for your security key") -> None:
        self.from_stdin = from_stdin
        self.prompt = prompt
        self._stdin_pin: str | None = None

    def __call__(self) -> str | None:
        if self.from_stdin:
            if self._stdin_pin is None:
                line = sys.stdin.readline()
                self._stdin_pin = line.rstrip("\r\n")
            return self._stdin_pin or None
        if not sys.stdin.isatty():
            return answer(self.prompt, hide_input=True, default="", show_default=False) or None
        return answer(self.prompt, hide_input=True) or None


def read_line(prompt: str, *, hidden: bool) -> str | None:
    """One answer: a prompt on the terminal (hidden for secrets), or, when standard input is
    not a terminal, its next line (None at its end). Never echoed, never logged."""
    if sys.stdin is None:
        return None
    if sys.stdin.isatty():
        try:
            return answer(prompt, hide_input=hidden, default="", show_default=False)
        except click.Abort:  # end of input (Ctrl-D); Ctrl-C cancels (KeyboardInterrupt)
            return None
    line = sys.stdin.readline()
    if not line:
        return None
    return line.rstrip("\r\n")


class TerminalInteraction:
    """The login flow's ``Interaction`` on a terminal: messages and prompts on stderr,
    answers from the terminal or, in scripts, one line of standard input each (in the
    order the prompts come). A choice takes the default unless standard input is a
    terminal."""

    def __init__(self, quiet_qr: bool = False) -> None:
        self.quiet_qr = quiet_qr

    def info(self, message: str) -> None:
        say(message)

    def secret(self, prompt: str) -> str | None:
        if not sys.stdin.isatty():
            say(prompt + ":")
        return read_line(prompt, hidden=True)

    def text(self, prompt: str) -> str | None:
        if not sys.stdin.isatty():
            say(prompt + ":")
        return read_line(prompt, hidden=False)

    def choose(self, prompt: str, options: list[tuple[str, str]], default: str) -> str | None:
        if not sys.stdin.isatty():
            say(f"{prompt}: {default}" + (f" (others: {', '.join(k for k, _ in options if k != default)}; "
                                           "--second METHOD)" if len(options) > 1 else ""))
            return default
        for i, (key, label) in enumerate(options, 1):
            say(f"  {i}. {label}{'  (preferred)' if key == default else ''}")
        keys = [k for k, _ in options]
        chosen = answer(prompt, default=str(keys.index(default) + 1))
        if chosen is None:  # Ctrl-C
            return None
        chosen = chosen.strip()
        if chosen.isdigit() and 1 <= int(chosen) <= len(keys):
            return keys[int(chosen) - 1]
        return chosen if chosen in keys else None

    def show_qr(self, uri: str) -> None:
        if self.quiet_qr:
            return
        from ..factors.totp import qr_terminal

        click.echo(qr_terminal(uri), err=True)


def new_pin(from_stdin: bool, label: str = "New PIN", *, min_length: int | None = None,
            optional: bool = False) -> str | None:
    """A new PIN: one line of stdin, or typed twice (three attempts). With ``min_length``
    (a security key's minimum, from its getInfo) the first entry is checked against the
    key's rules before the second is asked for. ``optional``: an empty first entry gives
    None (the person declined) instead of failing."""
    if from_stdin:
        pin = sys.stdin.readline().rstrip("\r\n")
        if not pin:
            fail("no PIN on standard input", exitcodes.USAGE)
        return pin
    for _ in range(3):
        first = answer(label, hide_input=True, default="", show_default=False)
        if not first:  # declined, or Ctrl-C in a ceremony (it ends as cancelled)
            if optional or first is None:
                return None
            fail("no PIN given", exitcodes.USAGE)
        if min_length is not None:
            from drivers.fido.errors import PinPolicyViolation
            from drivers.fido.keys import check_new_pin

            try:
                check_new_pin(first, min_length)
            except PinPolicyViolation as e:
                say(e.message)
                continue
        again = answer("Repeat for confirmation", hide_input=True, default="",
                       show_default=False)
        if again is None:  # Ctrl-C in a ceremony
            return None
        if again == first:
            return first
        say("The two entries differ.")
    fail("no PIN set: three attempts", exitcodes.USAGE)


def touch_prompt() -> None:
    say("Touch your security key")


def pin_guard(timeout: float = 30.0, cancel: threading.Event | None = None):
    """Who must touch the key before its PIN is tried, for one CLI ceremony
    (``token_agent.ceremonies.keypresence``): a background process running as the user can run
    the CLI too, so only root is trusted to have a person at the key."""
    import os

    from ..ceremonies.keypresence import PinGuard

    return PinGuard(trusted=os.geteuid() == 0, on_touch=touch_prompt, timeout=timeout,
                    cancel=cancel)


def device_errors(func):
    """Turn the device layer's errors into a message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from drivers.fido import errors as key_errors

        from ..ceremonies.keyfinding import explain

        try:
            return func(*args, **kwargs)
        except key_errors.FidoKeyError as e:
            e = explain(e)
            fail(e.message, device_exit_code(e))

    return wrapper


def device_exit_code(e) -> int:
    """The exit code for an error of the key: what a login failing with it would give, but
    for those only management commands meet (a bad new PIN, a key already enrolled or
    with a PIN already, a credential to delete that is not there)."""
    from drivers.fido import errors as key_errors

    from ..ceremonies.key import device_failure

    if isinstance(e, key_errors.PinPolicyViolation):
        return exitcodes.USAGE
    if isinstance(e, key_errors.PinAlreadySet):
        return exitcodes.CONFLICT
    if isinstance(e, key_errors.CredentialExcluded):
        return exitcodes.CONFLICT
    if isinstance(e, key_errors.NoCredentials):
        return exitcodes.NOT_FOUND
    return exitcodes.REASON_CODES.get(device_failure(e), exitcodes.NO_DEVICE)
