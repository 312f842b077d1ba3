"""The one rule for user names, wherever a name comes in (the store, the CLI, the service's
requests, so the PAM module's too).

A user name is 1 to ``MAX_USERNAME_LEN`` (64) characters, each a letter or digit of ASCII
or one of ``.`` ``_`` ``-`` ``@``: POSIX's portable user names (letters, digits, ``.``
``_`` ``-``; 32 characters for ``useradd``, too few for some directory names) and ``@`` for
directory names such as ``alice@example.nhs.uk``. No spaces, no control characters, nothing
outside ASCII. Names are compared case-insensitively by the store.

``username_problem(name)`` says what is wrong with a name (or None); ``check_username``
raises ``ValueError`` with it. The message never repeats a long name in full: a refused
name is shown cut to its first characters, escaped (so it is safe in logs and terminals).
``is_username(name)`` only says whether it is acceptable; ``RULE`` states the rule without
the name (for the service's answers: a password typed at a user name prompt must not come
back in an error message or a log).
"""

from __future__ import annotations

import re

#: the longest user name accepted
MAX_USERNAME_LEN = 64
#: a whole user name
USERNAME_RE = re.compile(rf"[A-Za-z0-9._@-]{{1,{MAX_USERNAME_LEN}}}")
#: the rule, for messages that must not repeat the name (a password typed as a name...)
RULE = f"1 to {MAX_USERNAME_LEN} characters: ASCII letters, digits and . _ - @"
#: what a message quotes of a refused name
_SHOWN = 32


def username_problem(name: object) -> str | None:
    """Why ``name`` is not an acceptable user name (a sentence), or None when it is."""
    if not isinstance(name, str):
        return f"a user name is a string, not {type(name).__name__}"
    if not name:
        return "a user name cannot be empty"
    if len(name) > MAX_USERNAME_LEN:
        return (f"a user name is at most {MAX_USERNAME_LEN} characters (this one has "
                f"{len(name)}: {_show(name)})")
    if not USERNAME_RE.fullmatch(name):
        return f"{_show(name)} has characters other than ASCII letters, digits and . _ - @"
    return None


def is_username(name: object) -> bool:
    """Whether ``name`` is an acceptable user name."""
    return isinstance(name, str) and USERNAME_RE.fullmatch(name) is not None


def check_username(name: object) -> str:
    """``name`` when it is an acceptable user name; ``ValueError`` saying why otherwise."""
    problem = username_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name  # type: ignore[return-value]


def _show(name: str) -> str:
    """``name`` quoted and escaped, its first characters only when it is long."""
    head = name[:_SHOWN]
    return ascii(head) + ("..." if len(name) > _SHOWN else "")
