"""`--json`: one JSON object on stdout per command, errors included (README "JSON output").

The rules every command's object follows, whatever the command:

- exactly one object on stdout (commands that stream, ``card watch --json`` and
  ``service events``, print one object per line instead, each with ``version``, and end a
  failed stream with one line holding ``ok`` and ``error``);
- ``"version"``: the output format's version (``FORMAT_VERSION``): it changes only when a
  key is removed or changes meaning, never when one is added;
- ``"ok"``: true exactly when the exit status is 0;
- on failure, ``"error": {"code": EXIT_STATUS, "reason": STABLE_CODE, "message": TEXT}``,
  next to whatever the command knows (a failed login's outcome, a policy file's errors);
  ``reason`` is the library's reason (``wrong-pin``) or, without one, the exit status's name
  (``not-found``, see ``exit_name``);
- times are ISO-8601 UTC strings to the second, ``"2026-12-06T16:20:00Z"``: under a key
  named ``at``, ending in ``_at`` or ``_until``, or in ``TIME_KEYS`` (``not_after``...);
- a list is never the whole output: it is wrapped (``{"users": [...]}``; by default
  ``{"items": [...]}``).

Commands only call ``emit`` and ``fail`` (``common.py``): this module collects what they give
and prints the object when the command ends (``json_command``), and turns click's own usage
errors into the same object when ``--json`` is on the command line (``JsonGroup``).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import re
import sys
from typing import Any

import click

from .. import exitcodes

#: the version of the JSON output's format (see the module docstring)
FORMAT_VERSION = 1
_META = "token_agent.json"  # click's ctx.meta: the JsonOutput of this invocation
_SHOWN = "_token_agent_json_shown"  # set on an exception already printed as JSON


def exit_name(code: int) -> str:
    """The name of an exit status (``exitcodes``): 8 -> ``not-found``."""
    for name, value in vars(exitcodes).items():
        if name.isupper() and isinstance(value, int) and not isinstance(value, bool) \
                and value == code:
            return name.lower().replace("_", "-")
    return "error"


def iso_time(ts: float) -> str:
    """Seconds since the epoch as ISO-8601 UTC to the second: ``2026-12-06T16:20:00Z``."""
    return _dt.datetime.fromtimestamp(int(ts), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: keys holding a time, besides ``at`` and those ending in ``_at`` or ``_until``
TIME_KEYS = frozenset({"not_before", "not_after", "this_update", "next_update"})
_ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)")


def _is_time_key(key: Any) -> bool:
    return isinstance(key, str) and (key == "at" or key.endswith(("_at", "_until"))
                                     or key in TIME_KEYS)


def json_ready(value: Any, key: Any = None) -> Any:
    """``value`` as JSON output shows it: times (a number, or an ISO-8601 UTC string, under
    a key of ``_is_time_key``) as ``2026-12-06T16:20:00Z``, bytes as hex, tuples and sets
    as lists, anything else unknown as its ``str``."""
    if isinstance(value, str) and _is_time_key(key) and _ISO_UTC.fullmatch(value):
        return value[:19] + "Z"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return iso_time(value) if _is_time_key(key) else value
    if isinstance(value, dict):
        return {str(k): json_ready(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [json_ready(v) for v in items]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return str(value)


def document(data: Any = None, *, code: int = exitcodes.OK, reason: str | None = None,
             message: str | None = None) -> dict:
    """The object printed for a command: its ``data`` (a list is wrapped as ``items``) with
    ``version``, ``ok`` and, when ``code`` is not 0, ``error``."""
    body = {} if data is None else dict(data) if isinstance(data, dict) else {"items": data}
    body = json_ready(body)
    body["ok"] = code == exitcodes.OK
    if code != exitcodes.OK:
        body["error"] = {"code": code, "reason": reason or exit_name(code),
                         "message": message or exit_name(code).replace("-", " ")}
    else:
        body.pop("error", None)
    body["version"] = FORMAT_VERSION
    return body


def render(obj: dict, *, line: bool = False) -> str:
    if line:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return json.dumps(obj, indent=2, sort_keys=True)


class JsonOutput:
    """What a command running with --json has given so far (``emit``, ``fail``)."""

    def __init__(self) -> None:
        self.data: dict | list | None = None
        self.error: tuple[int, str | None, str] | None = None
        self.streaming = False  # lines were printed: print only an error at the end

    def add(self, data: Any) -> None:
        if isinstance(self.data, dict) and isinstance(data, dict):
            self.data = {**self.data, **data}
        else:
            self.data = data

    def finish(self, code: int) -> None:
        """Print the command's object (exit status ``code``), once."""
        if code == exitcodes.OK and self.streaming:
            return
        _, reason, message = self.error or (code, None, None)
        click.echo(render(document(self.data, code=code, reason=reason, message=message),
                          line=self.streaming))
        sys.stdout.flush()


def current() -> JsonOutput | None:
    """The JSON output of the command running, when it runs with --json."""
    ctx = click.get_current_context(silent=True)
    return None if ctx is None else ctx.meta.get(_META)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return exitcodes.OK
    return e.code if isinstance(e.code, int) else exitcodes.ERROR


def json_command(func=None, *, always: bool = False, stream: bool = False):
    """Wrap a command's callback: with --json (``as_json``; ``always`` for commands whose
    output is JSON anyway), collect its ``emit``/``fail`` and print one object at its end,
    whatever way it ends (an exception too: then the traceback follows on stderr).
    ``stream``: the command prints JSON lines (``emit_line``); at its end only an error
    gets a line."""
    if func is None:
        return functools.partial(json_command, always=always, stream=stream)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if not (always or kwargs.get("as_json")):
            return func(*args, **kwargs)
        ctx = click.get_current_context()
        out = ctx.meta[_META] = JsonOutput()
        out.streaming = stream
        try:
            result = func(*args, **kwargs)
        except SystemExit as e:
            out.finish(_exit_code(e))
            raise
        except click.exceptions.Exit as e:
            out.finish(e.exit_code)
            raise
        except click.ClickException as e:
            out.error = (e.exit_code, None, e.format_message())
            out.finish(e.exit_code)
            setattr(e, _SHOWN, True)
            raise
        except KeyboardInterrupt:  # Ctrl-C: cancelled, exit 5 (README "Exit codes")
            out.error = (exitcodes.TIMEOUT, "cancelled", "cancelled")
            out.finish(exitcodes.TIMEOUT)
            raise SystemExit(exitcodes.TIMEOUT) from None
        except click.Abort:  # click's own: an answer refused, or none (exit 1)
            out.error = (exitcodes.ERROR, "aborted", "aborted")
            out.finish(exitcodes.ERROR)
            raise
        except Exception as e:
            out.error = (exitcodes.ERROR, "internal-error", f"{type(e).__name__}: {e}")
            out.finish(exitcodes.ERROR)
            raise
        out.finish(exitcodes.OK)
        return result

    return wrapper


def _wants_json(args) -> bool:
    args = list(args or ())
    if "--" in args:
        args = args[:args.index("--")]
    return "--json" in args


def _usage_error(e: click.ClickException, wanted: bool) -> None:
    if wanted and not getattr(e, _SHOWN, False):
        click.echo(render(document(code=e.exit_code, reason=exit_name(e.exit_code),
                                   message=e.format_message())))
        setattr(e, _SHOWN, True)


class JsonGroup(click.Group):
    """The root group: click's own errors (a bad option, a missing argument: exit 2) also
    print the JSON error object when ``--json`` is on the command line."""

    def make_context(self, info_name, args, parent=None, **extra):
        wanted = _wants_json(args)
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as e:
            _usage_error(e, wanted)
            raise
        ctx.meta["token_agent.json_wanted"] = wanted
        return ctx

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            _usage_error(e, ctx.meta.get("token_agent.json_wanted", False))
            raise


def start_stream() -> None:
    """The command running prints JSON lines from now on (``emit_line``): at its end, only
    an error gets one more line."""
    out = current()
    if out is not None:
        out.streaming = True


def emit_line(data: dict) -> None:
    """One object of a stream (JSON lines: ``card watch --json``, ``service events``): the
    event as it is (its own ``ok``, a login's, included) with ``version``; no ``ok`` of the
    command's (only the line with ``error`` that ends a failed stream has one)."""
    start_stream()
    click.echo(render({**json_ready(data), "version": FORMAT_VERSION}, line=True))
    sys.stdout.flush()
