"""The shapes of `--json` output as README.md documents them ("JSON output"), and a check of
real output against them: the tests that run commands with --json call ``check_output``, so
the README cannot drift from what the commands print.

The notation (README): ``name = SHAPE`` defines a shape, ``cmd words[, more words] -> SHAPE``
gives a command's. SHAPE: ``str int number bool null time any``, a defined name, ``[SHAPE]``,
``{key: SHAPE, key?: SHAPE, ...name, ...}`` (``...name`` copies a defined object's keys; a
bare ``...`` allows more keys), alternatives with ``|``."""

from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- json-shapes"
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
PRIMITIVES = {"str", "int", "number", "bool", "null", "time", "any"}
TOKEN = re.compile(r"\s*(\.\.\.|[{}\[\]|,:?]|[A-Za-z_][A-Za-z0-9_\-]*)")
#: root options that take a value (skipped to find the command's words)
ROOT_VALUE_OPTIONS = {"--data-dir", "--policy", "--config", "--store-url"}


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"bad shape at {text[pos:pos + 20]!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"expected {expected or 'more'}, got {tok!r} in {self.toks}")
        self.i += 1
        return tok

    def shape(self):
        alts = [self.alt()]
        while self.peek() == "|":
            self.take("|")
            alts.append(self.alt())
        return alts[0] if len(alts) == 1 else ("union", alts)

    def alt(self):
        tok = self.take()
        if tok == "[":
            inner = self.shape()
            self.take("]")
            return ("list", inner)
        if tok == "{":
            fields, spreads, open_ = {}, [], False
            while self.peek() != "}":
                if self.peek() == "...":
                    self.take("...")
                    if self.peek() not in (",", "}"):
                        spreads.append(self.take())
                    else:
                        open_ = True
                else:
                    name = self.take()
                    optional = self.peek() == "?"
                    if optional:
                        self.take("?")
                    self.take(":")
                    fields[name] = (self.shape(), optional)
                if self.peek() == ",":
                    self.take(",")
            self.take("}")
            return ("object", fields, spreads, open_)
        return ("name", tok)


def parse_readme(text: str | None = None) -> tuple[dict, dict]:
    """(named shapes, command -> shape) from README's block after the json-shapes marker."""
    text = README.read_text() if text is None else text
    start = text.index(MARKER)
    block = text[text.index("```text\n", start) + 8:]
    block = block[:block.index("```")]
    entries: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        if line[0].isspace() and entries:
            entries[-1] += " " + line.strip()
        else:
            entries.append(line.strip())
    names, commands = {}, {}
    for entry in entries:
        if "->" in entry:
            left, right = entry.split("->", 1)
            shape = _Parser(right).shape()
            for command in left.split(","):
                commands[" ".join(command.split())] = shape
        else:
            left, right = entry.split("=", 1)
            names[left.strip()] = _Parser(right).shape()
    return names, commands


def validate(value, shape, names: dict, where: str = "$", *, lenient: bool = False) -> list[str]:
    """What is wrong with ``value`` against ``shape`` (``lenient``: keys may be missing)."""
    kind = shape[0]
    if kind == "union":
        problems = []
        for alt in shape[1]:
            found = validate(value, alt, names, where, lenient=lenient)
            if not found:
                return []
            problems.append(found)
        return [f"{where}: matches no alternative: " + " / ".join("; ".join(p) for p in problems)]
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: not a list: {value!r}"]
        return [p for i, v in enumerate(value) for p in validate(v, shape[1], names, f"{where}[{i}]")]
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{where}: not an object: {value!r}"]
        fields, open_ = dict(shape[1]), shape[3]
        for spread in shape[2]:
            base = names[spread]
            fields = {**base[1], **fields}
            open_ = open_ or base[3]
        problems = []
        for key, (sub, optional) in fields.items():
            if key in value:
                problems += validate(value[key], sub, names, f"{where}.{key}")
            elif not (optional or lenient):
                problems.append(f"{where}: no key {key!r}")
        if not open_:
            problems += [f"{where}: undocumented key {k!r}" for k in value if k not in fields]
        return problems
    name = shape[1]
    if name in names:
        return validate(value, names[name], names, where, lenient=lenient)
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "null": value is None,
        "time": isinstance(value, str) and ISO_TIME.fullmatch(value) is not None,
        "any": True,
    }.get(name)
    if ok is None:
        return [f"{where}: unknown shape {name!r}"]
    return [] if ok else [f"{where}: {value!r} is not {name}"]


def command_of(argv: list[str], commands: dict) -> str:
    """The documented command that ``argv`` (the arguments after `token-agent`) runs."""
    words, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ROOT_VALUE_OPTIONS and not words:
            skip = True
        elif not arg.startswith("-"):
            words.append(arg)
    for n in range(len(words), 0, -1):
        if " ".join(words[:n]) in commands:
            return " ".join(words[:n])
    raise AssertionError(f"no documented JSON shape for {argv}")


def check_object(obj, command: str, returncode: int, names: dict, commands: dict, *,
                 event: bool = False) -> None:
    """One object of ``command``'s output against the rules and its documented shape
    (``event``: a line of a stream, whose ``ok``, if any, is the event's own)."""
    problems = []
    if obj.get("version") != 1:
        problems.append(f"version is {obj.get('version')!r}")
    if event:
        body = {k: v for k, v in obj.items() if k != "version"}
        problems += validate(body, commands[command], names)
        assert not problems, f"{command}: {obj}\n" + "\n".join(problems)
        return
    if obj.get("ok") is not (returncode == 0):
        problems.append(f"ok is {obj.get('ok')!r} with exit code {returncode}")
    body = {k: v for k, v in obj.items() if k not in ("ok", "version", "error")}
    if returncode != 0:
        error = obj.get("error")
        problems += validate(error, names["error"], names, "$.error")
        if isinstance(error, dict) and error.get("code") != returncode:
            problems.append(f"error.code {error.get('code')} is not the exit code {returncode}")
    elif "error" in obj:
        problems.append("an error on success")
    problems += validate(body, commands[command], names, lenient=returncode != 0)
    assert not problems, f"{command}: {obj}\n" + "\n".join(problems)


def check_output(argv, stdout: str, returncode: int, *, lines: bool = False) -> list[dict]:
    """Check what `token-agent ARGV` printed (one object; ``lines``: JSON lines) against
    README; returns the object(s)."""
    names, commands = parse_readme()
    argv = [str(a) for a in argv]
    command = command_of(argv, commands)
    if lines:
        objects = [json.loads(line) for line in stdout.splitlines() if line.strip()]
        for i, obj in enumerate(objects):
            if "error" in obj:  # the line that ends a failed stream: the last one
                assert i == len(objects) - 1, objects
                check_object(obj, command, returncode, names, commands)
            else:
                check_object(obj, command, 0, names, commands, event=True)
        return objects
    obj = json.loads(stdout)  # exactly one object: nothing before or after it
    assert isinstance(obj, dict), stdout
    check_object(obj, command, returncode, names, commands)
    return [obj]
