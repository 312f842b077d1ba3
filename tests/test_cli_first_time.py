"""Issue 12, "First-time keys and first-time mistakes": a new key without a PIN, a wrong
first authenticator-app code, `--confirm` without `--name`, `keys pin set` on a key that has
a PIN, and a key this account may not open. Every test drives the real `token-agent` in a
subprocess (a pseudo-terminal where a terminal matters) against virtual keys served as
processes (`token-agent sim key serve`, which starts with no PIN)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import REPO_ROOT, environ_for_agent, token_agent_command
from pty_helpers import CTRL_C, PtySession
from test_service import KEY_PIN, services, socket_dir, world  # noqa: F401
from token_agent import exitcodes

PIN = "246810"


class Terminal(PtySession):
    """:class:`PtySession` as these tests read it: ``expect`` waits for text after what was
    expected before and returns the output in between; ``send`` types a line; after
    ``wait``, ``output`` holds all of it (the terminal, then stdout)."""

    def __init__(self, args, env: dict) -> None:
        super().__init__(list(args), env)
        self._seen = 0
        self.output = ""

    def expect(self, text: str, timeout: float = 30) -> str:
        self.wait_for(lambda: text in self.terminal[self._seen:], repr(text), timeout)
        shown, start = self.terminal, self._seen
        self._seen = shown.index(text, start) + len(text)
        return shown[start:self._seen]

    def send(self, line: str) -> None:
        self.type(line.encode() + b"\r")

    def wait(self, timeout: float = 60) -> int:
        try:
            code, stdout, terminal = self.finish(timeout)
        finally:
            self.close()
        self.output = terminal + stdout
        return code


@pytest.fixture
def env(tmp_path, sim_key_server) -> dict:
    """A developer's shell: the store in tmp_path, the virtual key (no PIN yet) named by
    TOKEN_AGENT_SIM_KEYS."""
    return {**environ_for_agent(),
            "TOKEN_AGENT_SIM_KEYS": sim_key_server.address,
            "TOKEN_AGENT_DATA_DIR": str(tmp_path / "data"), "TERM": "dumb"}


def run(env: dict, *args: str, stdin: str | None = None, expect: int | None = 0):
    proc = subprocess.run(token_agent_command() + list(args), input=stdin, env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          stdin=None if stdin is not None else subprocess.DEVNULL)
    if expect is not None:
        assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def key_info(env: dict) -> dict:
    return json.loads(run(env, "keys", "info", "--json").stdout)


# --------------------------------------------------------------------------- a key without a PIN


def _set_min_pin_length(server, length: int) -> None:
    """authenticatorConfig setMinPINLength on the virtual key (no PIN yet: no token needed)."""
    from fido2.ctap2 import Ctap2
    from fido2.ctap2.config import Config
    from fido2.hid import CtapHidDevice

    from drivers.fido.sim import SocketHidConnection, sim_descriptor

    device = CtapHidDevice(sim_descriptor(server.host, server.port),
                           SocketHidConnection(server.host, server.port))
    try:
        Config(Ctap2(device)).set_min_pin_length(length)
    finally:
        device.close()


def test_enrol_key_offers_a_pin_for_a_new_key(env, sim_key_server):
    """Under the default `preferred`, a key that has no PIN gets one at enrolment: asked
    twice, a PIN shorter than the key's minimum (its getInfo minPINLength, here raised to 6)
    refused before the second entry; then the enrolment goes on with it."""
    run(env, "users", "add", "alice")
    _set_min_pin_length(sim_key_server, 6)
    assert key_info(env)["pin_set"] is False and key_info(env)["min_pin_length"] == 6
    term = Terminal(["enrol", "key", "--user", "alice", "--name", "first key"], env)
    term.expect("This key has no PIN yet")
    term.expect("New PIN for your security key: ")
    term.send("12345")  # long enough for CTAP's default (4), not for this key
    between = term.expect("New PIN for your security key: ")
    assert "at least 6 characters" in between
    assert "Repeat for confirmation" not in between  # refused before the second entry
    term.send(PIN)
    term.expect("Repeat for confirmation: ")
    term.send("135799")  # typed differently: asked again from the start
    assert "The two entries differ" in term.expect("New PIN for your security key: ")
    term.send(PIN)
    term.expect("Repeat for confirmation: ")
    term.send(PIN)
    code = term.wait()
    assert code == 0, term.output
    assert "enrolled 'first key' for alice" in term.output
    assert PIN not in term.output  # never echoed
    assert term.output.count("PIN for your security key:") == 3  # not asked a third time
    info = key_info(env)
    assert info["pin_set"] and info["pin_retries"] == 8
    shown = json.loads(run(env, "users", "show", "alice", "--json").stdout)
    assert [k["name"] for k in shown["keys"]] == ["first key"]
    outcome = json.loads(run(env, "login", "--method", "key", "--user", "alice", "--pin-stdin",
                             "--json", stdin=PIN + "\n").stdout)
    assert outcome["ok"] and outcome["multi_factor"]  # the PIN set there is the key's PIN


def test_enrol_key_without_a_terminal_prints_the_command(env, sim_key_server):
    """With --pin-stdin, or without a terminal, nothing is set: the exact command that sets
    the PIN is printed, with the documented exit code (4); it works as printed."""
    run(env, "users", "add", "alice")
    command = f"token-agent keys pin set --key sim:{sim_key_server.address}"
    for args, stdin in (((), None), (("--pin-stdin",), PIN + "\n")):
        refused = run(env, "enrol", "key", "--user", "alice", *args, stdin=stdin,
                      expect=exitcodes.NO_DEVICE)
        assert command in refused.stderr, refused.stderr
        assert "New PIN" not in refused.stderr
        assert key_info(env)["pin_set"] is False
    printed = re.search(r"token-agent keys pin set --key \S+", refused.stderr).group(0)
    run(env, *shlex.split(printed)[1:], "--pin-stdin", stdin=PIN + "\n")
    enrolled = json.loads(run(env, "enrol", "key", "--user", "alice", "--pin-stdin", "--json",
                              stdin=PIN + "\n").stdout)
    assert enrolled["user_verified"]
    # an empty first entry on the terminal declines: the same command, nothing set
    run(env, "users", "add", "bob")
    run(env, "keys", "reset", "--yes")  # within 10 s of the key's power-up (a new connection)
    term = Terminal(["enrol", "key", "--user", "bob"], env)
    term.expect("New PIN for your security key: ")
    term.send("")
    assert term.wait() == exitcodes.NO_DEVICE
    assert command in term.output and key_info(env)["pin_set"] is False


def test_ctrl_c_at_the_new_pin_prompt(env):
    """Ctrl-C at the offered PIN: "Cancelled.", exit 5, echo back on, no PIN set."""
    run(env, "users", "add", "alice")
    term = Terminal(["enrol", "key", "--user", "alice"], env)
    term.wait_for_hidden_prompt("New PIN for your security key")
    term.type(CTRL_C)
    echo = None
    try:
        code, _, shown = term.finish()
        echo = term.echo_on()
    finally:
        term.close()
    assert code == exitcodes.TIMEOUT and "Cancelled." in shown, shown
    assert echo
    assert key_info(env)["pin_set"] is False


@pytest.mark.sim_key(presence="manual")
def test_service_enrolment_on_a_key_without_a_pin_names_the_command(services, world,
                                                                   sim_key_server):
    """The service asks for no new PIN over its socket: its enrolment says the same as the
    CLI, with the command."""
    world.user("alice")
    svc = services(f'[keys]\nsimulators = ["{sim_key_server.address}"]\ntimeout = 10\n')
    with svc.client() as c:
        login = c.request("enrol.key", user="alice")["login"]
        prompts = []
        outcome = c.run_ceremony(login, lambda event: prompts.append(event) or KEY_PIN)
    assert prompts == []  # no PIN asked for, new or old
    assert not outcome["ok"] and outcome["reason"] == "device-error"
    assert f"token-agent keys pin set --key sim:{sim_key_server.address}" in outcome["message"]
    assert "no PIN yet" in outcome["message"]


# --------------------------------------------------------------------------- keys pin set, twice


def test_pin_set_on_a_key_with_a_pin_is_exit_9(env, sim_key_server):
    """README "Exit codes": 9 is "it exists already"; the message points at `pin change`,
    and a terminal is not asked for a new PIN it could not use."""
    run(env, "keys", "pin", "set", "--pin-stdin", stdin=PIN + "\n")
    again = run(env, "keys", "pin", "set", "--pin-stdin", stdin="13572468\n",
                expect=exitcodes.CONFLICT)
    assert f"token-agent keys pin change --key sim:{sim_key_server.address}" in again.stderr
    term = Terminal(["keys", "pin", "set"], env)
    assert term.wait() == exitcodes.CONFLICT
    assert "keys pin change" in term.output and "New PIN" not in term.output
    # the PIN is still the first one
    run(env, "keys", "pin", "change", "--pin-stdin", stdin=f"{PIN}\n13572468\n")


# --------------------------------------------------------------------------- the first TOTP code


def _codes(secret: str) -> tuple[str, str]:
    """(a code the app shows now, a code that is wrong in every step the agent accepts)."""
    from token_agent.factors.totp import code_at

    now = time.time()
    if now % 30 > 26:  # too near the end of a step: the right code may expire while typed
        time.sleep(30 - now % 30 + 0.2)
        now = time.time()
    accepted = {code_at(secret, now + d) for d in (-30, 0, 30)}
    wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in accepted)
    return code_at(secret, now), wrong


PASSWORD = "correct horse battery"


def _password(env: dict, user: str) -> None:
    run(env, "enrol", "password", "--user", user, "--password-stdin", stdin=PASSWORD + "\n")


def _wrong_codes_then_the_right_one(term: Terminal, secret: str, prompt: str, *,
                                    wrong: int) -> None:
    """At ``prompt``: ``wrong`` wrong codes, each answered by the prompt again, then the
    right one; the command then ends with exit 0."""
    for _ in range(wrong):
        term.send(_codes(secret)[1])
        again = term.expect(prompt)
        assert "wrong code" in again and "type the code the app shows now" in again
    term.send(_codes(secret)[0])
    assert term.wait() == 0, term.output


def _methods(env: dict, user: str = "alice") -> list[dict]:
    return json.loads(run(env, "methods", "list", "--user", user, "--json").stdout)["methods"]


def _lockouts(env: dict, user: str) -> dict:
    return {s["scope"]: s["failures"]
            for s in json.loads(run(env, "admin", "lockouts", user, "--json").stdout)["lockouts"]}


def test_enrol_totp_asks_again_after_a_wrong_first_code(env):
    """A mistyped first code is asked for again (up to 3 codes); the wrong ones count against
    the pending app alone, and its count is cleared when it is confirmed."""
    run(env, "users", "add", "alice")
    _password(env, "alice")
    term = Terminal(["enrol", "totp", "--user", "alice"], env)
    secret = re.search(r"enter the key ([A-Z2-7]+)", term.expect("Code shown by the app"))[1]
    _wrong_codes_then_the_right_one(term, secret, "Code shown by the app", wrong=2)
    assert "authenticator app 'authenticator app' set up for alice" in term.output
    app, = [m for m in _methods(env) if m["kind"] == "totp"]
    assert app["confirmed"] and app["failures"] == 0
    assert all(failures == 0 for failures in _lockouts(env, "alice").values())


def test_enrol_totp_gives_up_after_three_wrong_codes(env):
    run(env, "users", "add", "alice")
    term = Terminal(["enrol", "totp", "--user", "alice", "--name", "work phone"], env)
    secret = re.search(r"enter the key ([A-Z2-7]+)", term.expect("Code shown by the app"))[1]
    _, wrong = _codes(secret)
    for _ in range(3):
        term.send(wrong)
        time.sleep(0.2)
    assert term.wait() == exitcodes.AUTH_FAILED, term.output
    assert term.output.count("Code shown by the app") == 3
    assert ("--confirm CODE" in term.output and "--name 'work phone'" in term.output)
    app, = _methods(env)
    assert not app["confirmed"] and app["failures"] == 3  # its own count, nobody else's
    assert set(_lockouts(env, "alice")) == {f"method:{app['id']}"}
    right, _ = _codes(secret)  # still waiting: confirmed later, the count cleared
    run(env, "enrol", "totp", "--user", "alice", "--name", "work phone", "--confirm", right)
    assert _methods(env)[0]["failures"] == 0


# --------------------------------------------------------------------------- --confirm, no --name


def _start_app(env: dict, name: str) -> str:
    return json.loads(run(env, "enrol", "totp", "--user", "alice", "--name", name,
                          "--json").stdout)["secret"]


def _apps(env: dict) -> dict:
    return {m["name"]: m for m in _methods(env)}


def test_confirm_without_name_takes_the_only_waiting_app(env):
    run(env, "users", "add", "alice")
    secret = _start_app(env, "work phone")
    right, _ = _codes(secret)
    run(env, "enrol", "totp", "--user", "alice", "--confirm", right)
    assert _apps(env)["work phone"]["confirmed"]


def test_confirm_without_name_with_several_waiting(env):
    """Several waiting: a script gets the names and exit 2, with no code checked; a person
    at a terminal picks one."""
    run(env, "users", "add", "alice")
    phone, tablet = _start_app(env, "work phone"), _start_app(env, "tablet")
    right, _ = _codes(phone)
    refused = run(env, "enrol", "totp", "--user", "alice", "--confirm", right,
                  expect=exitcodes.USAGE)
    assert "'work phone', 'tablet'" in refused.stderr and "--name" in refused.stderr
    assert all(m["failures"] == 0 and not m["confirmed"] for m in _apps(env).values())
    term = Terminal(["enrol", "totp", "--user", "alice", "--confirm", right], env)
    menu = term.expect("Which one")
    assert "1. work phone" in menu and "2. tablet" in menu
    term.send("1")
    assert term.wait() == 0, term.output
    assert "'work phone' confirmed" in term.output
    apps = _apps(env)
    assert apps["work phone"]["confirmed"] and not apps["tablet"]["confirmed"]
    assert apps["tablet"]["failures"] == 0
    right, _ = _codes(tablet)  # one left waiting: no question
    run(env, "enrol", "totp", "--user", "alice", "--confirm", right)
    assert _apps(env)["tablet"]["confirmed"]


# --------------------------------------------------------------------------- a key we may not open

#: HID report descriptors, as sysfs shows them: a FIDO key's (usage page 0xF1D0, 64-byte
#: reports) and a keyboard's
FIDO_DESCRIPTOR = bytes.fromhex("06d0f10901a1010920150026ff007508954081020921150026ff00750895409102c0")
KEYBOARD_DESCRIPTOR = bytes.fromhex("05010906a101050719e029e715002501750195088102c0")

#: In a mount namespace of its own (nothing outside sees it): a /dev holding what a process
#: needs plus hidraw character devices (major 245) that only root may open, as on a
#: workstation without the udev rule, and, over sysfs' empty /sys/class/hidraw (this
#: container has no USB and no uhid), each node's report descriptor; then the command runs
#: as nobody.
SANDBOX = r"""
set -e
work=$1; shift
mkdir -p "$work/dev"
mount --bind /dev "$work/dev"
mount -t tmpfs -o mode=755 tmpfs /dev
for n in null zero full random urandom tty; do touch /dev/$n; mount --bind "$work/dev/$n" /dev/$n; done
mkdir /dev/pts /dev/shm
mount --bind "$work/dev/pts" /dev/pts
ln -s pts/ptmx /dev/ptmx
ln -s /proc/self/fd /dev/fd
mount -t tmpfs tmpfs /sys/class/hidraw
minor=0
for descriptor in "$work"/descriptors/*; do
    node=hidraw$minor
    mknod -m 600 /dev/$node c 245 $minor
    mkdir -p /sys/class/hidraw/$node/device
    cp "$descriptor" /sys/class/hidraw/$node/device/report_descriptor
    minor=$((minor + 1))
done
exec setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"
"""


def as_nobody_with_hidraw(tmp_path, descriptors: list[bytes], *args: str, env: dict):
    """`token-agent ARGS` as nobody, with a hidraw node (root's alone) for each descriptor
    (/dev/hidraw0, 1, ...)."""
    work = tmp_path / "sandbox"
    (work / "descriptors").mkdir(parents=True)
    for i, data in enumerate(descriptors):
        (work / "descriptors" / f"{i:02d}").write_bytes(data)
    return subprocess.run(["unshare", "--mount", "sh", "-c", SANDBOX, "sh", str(work),
                           *token_agent_command(), *args],
                          env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, cwd="/",
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


UDEV = ("a security key is present but this account may not open it: install the udev rule "
        "(README §udev)")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a mount namespace and mknod")
def test_a_key_this_account_may_not_open(tmp_path):
    env = environ_for_agent()
    both = [FIDO_DESCRIPTOR, KEYBOARD_DESCRIPTOR]
    info = as_nobody_with_hidraw(tmp_path, both, "keys", "info", env=env)
    assert info.returncode == exitcodes.NO_DEVICE, info
    assert UDEV.lower() in info.stderr.lower() and "/dev/hidraw0" in info.stderr
    assert "hidraw1" not in info.stderr  # the keyboard is no key
    assert "account nobody" in info.stderr
    listed = as_nobody_with_hidraw(tmp_path / "2", both, "keys", "list", env=env)
    assert listed.returncode == 0 and UDEV.lower() in listed.stderr.lower()
    named = as_nobody_with_hidraw(tmp_path / "3", both, "keys", "info", "--key", "/dev/hidraw0",
                                  env=env)
    assert named.returncode == exitcodes.NO_DEVICE and UDEV.lower() in named.stderr.lower()
    other = as_nobody_with_hidraw(tmp_path / "5", both, "keys", "info", "--key", "/dev/hidraw5",
                                  env=env)
    assert other.returncode == exitcodes.NO_DEVICE
    assert ("No security key at /dev/hidraw5. The keys here: /dev/hidraw0 (this account may "
            "not open it)") in other.stderr
    # the policy login with a key as the primary factor (ceremonies/devices.py) says it too
    data = tempfile.mkdtemp(prefix="token-agent-nobody-")  # where nobody may write
    try:
        policy = os.path.join(data, "policy.toml")
        with open(policy, "w") as f:
            f.write("")
        store_env = {**env, "TOKEN_AGENT_DATA_DIR": data, "TOKEN_AGENT_POLICY": policy,
                     "HOME": data}
        run(store_env, "users", "add", "alice")
        for path in [data, *(os.path.join(data, f) for f in os.listdir(data))]:
            os.chown(path, 65534, 65534)
        login = as_nobody_with_hidraw(tmp_path / "6", both, "login", "--user", "alice",
                                      "--primary", "key", env=store_env)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    assert login.returncode == exitcodes.NO_DEVICE, login
    assert UDEV.lower() in login.stderr.lower()
    # only the keyboard there: no key, as before
    keyboard = as_nobody_with_hidraw(tmp_path / "4", [KEYBOARD_DESCRIPTOR], "keys", "info",
                                     env=env)
    assert keyboard.returncode == exitcodes.NO_DEVICE
    assert "No security key found" in keyboard.stderr and "udev" not in keyboard.stderr


def test_key_path_that_is_not_there(env, sim_key_server):
    """`--key PATH` naming no key: said so, with the keys that are there."""
    missing = run(env, "keys", "info", "--key", "/dev/hidraw7", expect=exitcodes.NO_DEVICE)
    assert (f"No security key at /dev/hidraw7. The keys here: sim:{sim_key_server.address}."
            in missing.stderr), missing.stderr
    alone = run({**env, "TOKEN_AGENT_SIM_KEYS": ""}, "keys", "info", "--key", "/dev/hidraw7",
                expect=exitcodes.NO_DEVICE)
    assert "No security key at /dev/hidraw7. No security key is plugged in." in alone.stderr


# --------------------------------------------------------------------------- a reader not there


def test_card_status_with_a_reader_that_is_not_there(pcscd, tmp_path):
    """`card status --reader X` naming no reader: said so, with the readers there are."""
    env = {**environ_for_agent(),
           "TOKEN_AGENT_DATA_DIR": str(tmp_path / "data")}
    run(env, "users", "add", "alice")  # a store: card status reads its trust settings
    missing = run(env, "card", "status", "--reader", "Reader That Is Not There 9",
                  expect=exitcodes.NO_DEVICE)
    assert "No smartcard reader named 'Reader That Is Not There 9'" in missing.stderr
    assert f"'{pcscd.reader(0)}'" in missing.stderr and f"'{pcscd.reader(1)}'" in missing.stderr


def test_first_login_enrolment_asks_again_after_a_wrong_code(env, tmp_path):
    """The authenticator app set up during a login (MFA enforced, none yet) asks again too."""
    policy = tmp_path / "policy.toml"
    policy.write_text("")  # the defaults: MFA enforced for internal users
    env = {**env, "TOKEN_AGENT_POLICY": str(policy)}
    run(env, "users", "add", "bob")
    _password(env, "bob")
    term = Terminal(["login", "--user", "bob", "--device", "unmanaged"], env)
    term.expect("Password")
    term.send(PASSWORD)
    term.expect("Second factor to set up")
    term.send("")  # the default: the authenticator app
    shown = term.expect("Code shown by your authenticator app")
    secret = re.search(r"type the key ([A-Z2-7]+)", shown)[1]
    _wrong_codes_then_the_right_one(term, secret, "Code shown by your authenticator app",
                                    wrong=1)
    assert "logged in: bob" in term.output
