"""The README's fenced blocks, as tests/test_readme_blocks.py reads and runs them.

* :func:`blocks` finds every fenced block of README.md with the marker just before it,
  ``<!-- readme-block: NAME [needs=a,b] [check=policy|config] -->``, and the ``## `` section
  it is in.
* :class:`Typist` runs a shell block as a person at a terminal would: ``bash -euo pipefail``
  on a pseudo-terminal (prompts with echo off really are), answering each prompt it knows
  when it appears, with what the person would have at hand (the key's PIN, the password they
  chose, the code their authenticator app shows, the code their phone received, which for
  the sandbox is the delivery outbox).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"

MARKER = re.compile(r"^<!-- readme-block: (?P<name>[a-z0-9][a-z0-9-]*)(?P<opts>(?: [a-z]+=[a-z0-9,]+)*) -->$")
FENCE = re.compile(r"^```(?P<lang>[a-z]*)\s*$")


@dataclass(frozen=True)
class Block:
    name: str | None  # None: no marker before the fence
    lang: str
    section: str  # the "## " heading it is under
    line: int  # of the opening fence, 1-based
    text: str
    needs: tuple[str, ...] = ()
    check: str | None = None


def blocks(path: Path = README) -> list[Block]:
    """Every fenced block of the file, in document order."""
    lines = path.read_text().splitlines()
    found, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = FENCE.match(line)
        if not fence:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before.strip())
        opts = dict(o.split("=", 1) for o in marker["opts"].split()) if marker else {}
        found.append(Block(
            name=marker["name"] if marker else None,
            lang=fence["lang"],
            section=section,
            line=i + 1,
            text="\n".join(lines[i + 1:end]) + "\n",
            needs=tuple(opts["needs"].split(",")) if "needs" in opts else (),
            check=opts.get("check"),
        ))
        i = end + 1
    return found


# --------------------------------------------------------------------------- the typist


class PromptNotAnswered(AssertionError):
    pass


def _kill(pid: int) -> None:
    """End the script's process group (bash and the command it runs) and reap bash."""
    try:
        os.killpg(pid, signal.SIGKILL)  # pty.fork made the child a session (and group) leader
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


@dataclass
class Answers:
    """What the person at the keyboard knows or has in hand, for one sandbox."""

    pin: str
    password: str
    outbox: Path  # the phone and mailbox: codes sent land here as JSON files
    last_totp_step: int = 0
    secret: str | None = None  # the authenticator app's key, as shown by `enrol totp`
    backup_codes: tuple[str, ...] = ()

    def totp(self) -> str:
        """The code the app shows: for a time step after the last one used (the agent
        refuses a step again), within the agent's window of one step either side."""
        import pyotp

        assert self.secret, "a TOTP code was asked before `enrol totp` showed its key"
        while True:
            now = int(time.time()) // 30
            step = max(self.last_totp_step + 1, now - 1)
            if step <= now + 1:
                break
            time.sleep(1)
        self.last_totp_step = step
        return pyotp.TOTP(self.secret).at(step * 30)

    def sent_code(self) -> str:
        """The newest code in the outbox (what the phone just received)."""
        for _ in range(50):
            files = sorted(self.outbox.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
            if files:
                text = json.loads(files[-1].read_text()).get("text", "")
                match = re.search(r"\b(\d{6})\b", text)
                if match:
                    return match.group(1)
            time.sleep(0.05)
        raise PromptNotAnswered(f"no code in the outbox {self.outbox}")

    def backup_code(self) -> str:
        assert self.backup_codes, "a backup code was asked before `enrol backup-codes` showed them"
        code, *rest = self.backup_codes
        self.backup_codes = tuple(rest)
        return code


class Typist:
    """Runs a script on a pseudo-terminal (``bash -x``: each command is shown before it runs)
    and answers its prompts as the person at the keyboard would."""

    MAX_ANSWERS = 60

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.transcript = ""

    def answer(self, prompt: str, pending: str, command: str) -> tuple[str, bool] | None:
        """What to type at ``prompt`` (the last line of the output, ending ": "), given the
        output since the last answer and the command running; and whether the prompt hides
        what is typed. None: a prompt nobody told us about."""
        a = self.answers
        if re.search(r"\[y/N\]: $", prompt):
            return "y", False
        if re.search(r"\[\d+\]: $", prompt):  # a choice: the default
            return "", False
        if re.search(r"PIN", prompt):
            return a.pin, True
        if re.search(r"^(New password|Password|App password)", prompt):
            return a.password, True
        if prompt.startswith("Repeat for confirmation"):
            return self._last, True
        if prompt.startswith("Backup code") or (prompt.startswith("Code")
                                                and " backup" in command):
            return a.backup_code(), True
        if re.search(r"authenticator app|Code shown by the app", prompt) or (
                prompt.startswith("Code") and " totp" in command):
            return a.totp(), not prompt.startswith("Code shown")
        if re.search(r"sent to|emailed|Answer the call", prompt + pending) or (
                prompt.startswith("Code") and re.search(r" (sms|email|voice|messaging)\b", command)):
            return a.sent_code(), True
        return None

    @staticmethod
    def _wait_for_echo_off(fd: int, wait: float = 2.0) -> None:
        """A hidden prompt (click, then getpass) prints its text, then turns echo off,
        discarding what was typed before (TCSAFLUSH): type only once echo is off, as a
        person would once the prompt is there."""
        import termios

        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not termios.tcgetattr(fd)[3] & termios.ECHO:
                return
            time.sleep(0.01)

    def _learn(self, text: str) -> None:
        key = re.search(r"enter the key ([A-Z2-7]{16,})", text)
        if key:
            self.answers.secret = key.group(1)
        codes = re.findall(r"^\s*((?:[a-z0-9]{4,5}-){1,3}[a-z0-9]{4,5})\s*$", text, re.M)
        if codes:
            self.answers.backup_codes = tuple(codes)

    def run(self, script: str, env: dict[str, str], cwd: Path, timeout: float = 60.0) -> int:
        """Run ``bash -x -euo pipefail -c SCRIPT``; return its exit code (the transcript, with
        the commands and what was typed where echo was on, is in :attr:`transcript`)."""
        pid, fd = pty.fork()
        if pid == 0:  # the child: bash on the terminal
            try:
                os.chdir(cwd)
                os.execve("/bin/bash", ["bash", "-x", "-euo", "pipefail", "-c", script], env)
            finally:
                os._exit(127)
        out = b""
        answered = 0  # the output up to here has been answered
        self._last, count, last_output = "", 0, time.monotonic()
        deadline = time.monotonic() + timeout
        try:
            while True:
                if time.monotonic() > deadline:
                    _kill(pid)
                    raise PromptNotAnswered(f"still running after {timeout:.0f} s:\n"
                                            f"{out.decode(errors='replace')[-3000:]}")
                ready, _, _ = select.select([fd], [], [], 0.05)
                if ready:
                    try:
                        chunk = os.read(fd, 65536)
                    except OSError:  # EIO: the child has gone
                        chunk = b""
                    if not chunk:
                        break
                    out += chunk
                    last_output = time.monotonic()
                    continue
                # quiet for 50 ms: is it waiting at a prompt?
                text = out.decode(errors="replace").replace("\r\n", "\n")
                pending = text[answered:]
                if not pending.endswith(": "):
                    continue
                self._learn(pending)
                prompt = pending.rsplit("\n", 1)[-1]
                commands = re.findall(r"^\++ (.*)$", text, re.M)
                reply = self.answer(prompt, pending, commands[-1] if commands else "")
                if reply is None:
                    if time.monotonic() - last_output < 2:  # a line written in two parts?
                        continue
                    _kill(pid)
                    raise PromptNotAnswered(f"a prompt this test cannot answer: {prompt!r}\n"
                                            f"{text[-3000:]}")
                typed, hidden = reply
                if hidden:
                    self._wait_for_echo_off(fd)
                os.write(fd, (typed + "\r").encode())
                self._last, answered = typed, len(text)
                count += 1
                if count > self.MAX_ANSWERS:
                    _kill(pid)
                    raise PromptNotAnswered(f"more than {self.MAX_ANSWERS} prompts answered: a "
                                            f"loop?\n{text[-3000:]}")
        finally:
            self.transcript = out.decode(errors="replace").replace("\r\n", "\n")
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
