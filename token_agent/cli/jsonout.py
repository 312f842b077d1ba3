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
(``json_command``) and prints the object once, when the root group's run ends, with the exit
code it ends with (``JsonGroup.main``); click's own usage errors give the same object when
``--json`` is on the command line.
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
        self.error: tuple[int, str | None, str | None] | None = None
        self.streaming = False  # lines were printed: print only an error at the end
        self.printed = False

    def add(self, data: Any) -> None:
        if isinstance(self.data, dict) and isinstance(data, dict):
            self.data = {**self.data, **data}
        else:
            self.data = data

    def finish(self, code: int) -> None:
        """Print the command's object for exit status ``code``, once: ``error`` says the
        ``reason`` and ``message`` recorded for that code (else the code's name)."""
        if self.printed or (code == exitcodes.OK and self.streaming):
            return
        self.printed = True
        _, reason, message = self.error if self.error and self.error[0] == code else (
            code, None, None)
        click.echo(render(document(self.data, code=code, reason=reason, message=message),
                          line=self.streaming))
        sys.stdout.flush()


class _Run:
    """One run of the root group (``JsonGroup.main``): the JSON output it owes, if any."""

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted  # --json on the command line
        self.out: JsonOutput | None = None


_run: _Run | None = None  # the root group's run in progress


def current() -> JsonOutput | None:
    """The JSON output of the command running, when it runs with --json."""
    ctx = click.get_current_context(silent=True)
    out = None if ctx is None else ctx.meta.get(_META)
    return out if out is not None else (_run.out if _run is not None else None)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return exitcodes.OK
    return e.code if isinstance(e.code, int) else exitcodes.ERROR


def json_command(func=None, *, always: bool = False, stream: bool = False):
    """Wrap a command's callback: with --json (``as_json``; ``always`` for commands whose
    output is JSON anyway), collect its ``emit``/``fail`` for the one object printed when
    the root group's run ends (``JsonGroup.main``: whatever way it ends, with its exit code).
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
        if _run is not None:
            _run.out = out
        try:
            result = func(*args, **kwargs)
        except (SystemExit, click.exceptions.Exit):
            raise
        except click.ClickException as e:
            out.error = (e.exit_code, None, e.format_message())
            raise
        except (KeyboardInterrupt, click.Abort) as e:
            from .cancel import is_ctrl_c

            if is_ctrl_c(e):  # the root group: "Cancelled.", exit 5
                out.error = (exitcodes.TIMEOUT, "cancelled", "Cancelled.")
            else:  # click's own: an answer refused, or none (exit 1)
                out.error = (exitcodes.ERROR, "aborted", "Aborted!")
            raise
        except Exception as e:  # a bug: the traceback follows on stderr
            out.error = (exitcodes.ERROR, "internal-error", f"{type(e).__name__}: {e}")
            raise
        finally:
            if _run is None:  # not run by the root group (a command invoked alone)
                code = sys.exc_info()[1]
                out.finish(_exit_code(code) if isinstance(code, SystemExit) else
                           exitcodes.OK if code is None else
                           out.error[0] if out.error else exitcodes.ERROR)
        return result

    return wrapper


def _wants_json(args) -> bool:
    args = list(sys.argv[1:] if args is None else args)
    if "--" in args:
        args = args[:args.index("--")]
    return "--json" in args


class JsonGroup(click.Group):
    """The root group: with --json, the one object is printed here when the run ends, with
    its real exit code, whatever ended it (``fail``, ``sys.exit``, Ctrl-C, a bug); click's
    own errors (a bad option, a missing argument: exit 2) give it too when ``--json`` is on
    the command line."""

    def main(self, args=None, *rest, **kwargs):
        global _run
        outer, _run = _run, _Run(_wants_json(args))
        run = _run
        code = exitcodes.ERROR
        try:
            result = super().main(args, *rest, **kwargs)
            code = result if isinstance(result, int) and not isinstance(result, bool) else 0
            return result
        except SystemExit as e:
            code = _exit_code(e)
            raise
        finally:
            _run = outer
            if run.out is None and run.wanted and code != exitcodes.OK:
                run.out = JsonOutput()  # failed before any command ran: usage errors
            if run.out is not None:
                run.out.finish(code)

    def _usage_error(self, e: click.ClickException) -> None:
        if _run is not None and _run.wanted and _run.out is None:
            _run.out = JsonOutput()
            _run.out.error = (e.exit_code, None, e.format_message())

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as e:
            self._usage_error(e)
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            self._usage_error(e)
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
