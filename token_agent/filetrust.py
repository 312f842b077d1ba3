"""Which files the agent trusts, checked like sshd's ``StrictModes``.

The agent's own files: the data directory, the store (``token-agent.db`` and SQLite's
``-wal`` and ``-shm``) and the key file (``secrets.key`` or ``TOKEN_AGENT_KEY_FILE``) and the
key file's directory must be

* owned by the user running the agent, or by root;
* not writable by their group or by others;
* not symbolic links (files are opened with ``O_NOFOLLOW``): a link planted in a directory
  would make the agent (root, perhaps) create, chmod or read a file of the link's choosing.

Anything else is refused (``UntrustedPath``) with the path and the command that fixes it
(``chmod 700 DIR``, ``chown USER FILE``, ``rm LINK``): nothing is created, changed or read
first. The store turns it into a ``StoreFileError``, the key file into a ``SecretError``.
Root meeting another user's private directory (the service's ``/var/lib/token-agent``) is
told to run token-agent as that user (``sudo -u USER``), never to chown it to root: the
service would then be refused its own store.

Configuration and policy files (``config.toml``, ``policy.toml``) and their directory must
not be writable by others: not group- or world-writable (a directory with the sticky bit
aside) and owned by root or the running user. ``config_file_problems`` says what is wrong;
the service (``token-agent serve``, ``strict``) refuses such a file, every other command
warns about it on stderr (``check_config_file``). These may be symbolic links (a file put in
place by configuration management): the file and the directory they lead to are checked.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import shlex
import stat
from pathlib import Path

log = logging.getLogger("token_agent")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class UntrustedPath(Exception):
    """A file or directory the agent must not use; the message says why and how to fix it.
    ``run_as``: the user (for ``sudo -u``) to run token-agent as instead, when root meets a
    directory of another user (``_check_stat``)."""

    def __init__(self, message: str, *, path: Path, fix: str, run_as: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.fix = fix
        self.run_as = run_as


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _me() -> str:
    return _name(os.geteuid())


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _owners() -> str:
    return "root" if os.geteuid() == 0 else f"{_me()} or root"


def _check_stat(path: Path, st: os.stat_result, what: str, private_mode: str) -> None:
    """Owner and mode of an agent's own file or directory (not a link: checked before).

    Root meeting a private directory (not writable by group or others) of another user (the
    service's ``/var/lib/token-agent``) is told to run token-agent as that user, not to take
    the directory: a file root created there, or a directory chown-ed to root, would be
    refused to its user (the service)."""
    if os.geteuid() == 0 and st.st_uid != 0 and stat.S_ISDIR(st.st_mode) \
            and not stat.S_IMODE(st.st_mode) & 0o022:
        name = _name(st.st_uid)
        run_as = name if name != str(st.st_uid) else f"#{st.st_uid}"
        fix = f"sudo -u {shlex.quote(run_as)} token-agent ..."
        raise UntrustedPath(
            f"{what} {path} is {name}'s, not root's: files root made in it would be root's, "
            f"and {name} (the service, if it runs as {name}) would refuse them; run token-agent "
            f"as {name} ({fix}), and do not chown the directory to root",
            path=path, fix=fix, run_as=run_as)
    if not _trusted_owner(st.st_uid):
        fix = f"chown {_me()} {path}"
        raise UntrustedPath(
            f"{what} {path} is owned by {_name(st.st_uid)}, not by {_owners()}: whoever owns it "
            f"controls what the agent trusts; make it {_me()}'s ({fix}), or run token-agent as "
            f"its owner, or use another one", path=path, fix=fix)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX:
        fix = "use a directory of its own (mode 0700)"
        raise UntrustedPath(
            f"{what} {path} is a shared directory (mode {mode:04o}): anyone may create files "
            f"in it, the agent's before the agent does; {fix}", path=path, fix=fix)
    if mode & 0o022:
        fix = f"chmod {private_mode} {path}"
        raise UntrustedPath(
            f"{what} {path} can be written by its group or others (mode {mode:04o}): {fix}",
            path=path, fix=fix)


def _link_error(path: Path, what: str) -> UntrustedPath:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    fix = f"rm {path}" if what != "data directory" else f"use {os.path.realpath(path)} itself"
    return UntrustedPath(
        f"{what} {path} is a symbolic link (to {target}): the agent does not follow links to "
        f"its own files; replace the link by the real {'directory' if 'directory' in what else 'file'}"
        f" ({fix})", path=path, fix=fix)


def _check(path: Path, st: os.stat_result, what: str, *, directory: bool) -> None:
    """An agent's own file (``directory``: its directory) from its ``lstat`` or ``fstat``:
    not a link, of the right type, owner and mode."""
    if stat.S_ISLNK(st.st_mode):
        raise _link_error(path, what)
    if not (stat.S_ISDIR if directory else stat.S_ISREG)(st.st_mode):
        kind = "a directory" if directory else "a regular file"
        raise UntrustedPath(f"{what} {path} is not {kind}: move it aside",
                            path=path, fix=f"mv {path} {path}.old")
    _check_stat(path, st, what, "700" if directory else "600")


def check_private_dir(path: str | os.PathLike[str], what: str = "data directory") -> None:
    """``path`` is a real directory owned by the running user or root, not writable by its
    group or others. ``UntrustedPath`` otherwise; ``FileNotFoundError`` when missing."""
    path = Path(path)
    _check(path, os.lstat(path), what, directory=True)


def check_private_file(path: str | os.PathLike[str], what: str) -> os.stat_result | None:
    """``path``, when it exists, is a regular file (not a link) owned by the running user or
    root, not writable by its group or others; its ``lstat``, or None when it is missing."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    _check(path, st, what, directory=False)
    return st


def read_private_file(path: str | os.PathLike[str], what: str, limit: int = 1 << 20) -> bytes:
    """The bytes of an agent's own file, opened with ``O_NOFOLLOW`` and checked (owner,
    mode) on the open descriptor. ``UntrustedPath``; ``OSError`` when it cannot be read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a symbolic link
            raise _link_error(path, what) from None
        raise
    with os.fdopen(fd, "rb") as f:
        _check(path, os.fstat(f.fileno()), what, directory=False)
        return f.read(limit)


def config_file_problems(path: str | os.PathLike[str], what: str) -> list[str]:
    """What lets someone other than root or the running user change the configuration file
    ``path`` (followed if a link) or replace it in its directory; empty when nothing does."""
    real = Path(os.path.realpath(path))
    out = []
    for p, kind in ((real, what), (real.parent, f"the directory of the {what}")):
        try:
            st = os.stat(p)
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if not _trusted_owner(st.st_uid):
            out.append(f"{kind} {p} is owned by {_name(st.st_uid)}, who can change it: "
                       f"chown root {p}")
        elif mode & 0o022 and not (p is not real and mode & stat.S_ISVTX):
            out.append(f"{kind} {p} can be written by its group or others (mode {mode:04o}): "
                       f"chmod go-w {p}")
    return out


def check_config_file(path: str | os.PathLike[str], what: str, *, strict: bool) -> list[str]:
    """``config_file_problems``: returned when ``strict`` (the caller refuses the file), else
    each logged as a warning (on stderr for the CLI) and an empty list returned."""
    problems = config_file_problems(path, what)
    if strict:
        return problems
    for problem in problems:
        log.warning("token-agent: warning: %s", problem)
    return []
