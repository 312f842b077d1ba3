"""Ctrl-C in the `token-agent` CLI: a clean cancel, wherever it is typed.

A ceremony (a login, an enrolment, choosing among keys) runs on a worker thread while the
main thread, where Python delivers SIGINT, waits on an Event the worker sets when it ends.
Prompts always run on the main thread, also when the worker asks: the worker hands them over
(:func:`on_main_thread`), so that Ctrl-C at a prompt interrupts the prompt itself, which
puts the terminal's echo back, instead of leaving a reader behind with echo off.

On Ctrl-C the main thread sets the ceremony's ``cancel`` event (the device layer then sends
CTAPHID_CANCEL and the key stops waiting for its touch), answers the worker's prompt, if it
is at one, with no answer (:func:`answer`: the ceremony ends as cancelled), and waits for
the worker to end. The root group
(:class:`CancellingGroup`) turns the KeyboardInterrupt (or click's Abort raised from one)
into "Cancelled." on stderr and exit 5 (``exitcodes.TIMEOUT``), and restores the terminal's
attributes saved at start on the way out, whatever else happened."""

from __future__ import annotations

import os
import queue
import sys
import termios
import threading
import time
from typing import Any, Callable, TypeVar

import click

from .. import exitcodes

T = TypeVar("T")

#: seconds after a Ctrl-C before "Cancelling..." tells the person the key has not let go yet
_SLOW_CANCEL = 1.0


class _Call:
    """A function a worker asks the main thread to run (a prompt), and its answer."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except KeyboardInterrupt:
            self.refuse()
            raise  # the main thread cancels the ceremony
        except BaseException as e:  # noqa: BLE001  (Ctrl-D, a fail(): the worker's to raise)
            self.error = e
        self.done.set()

    def refuse(self) -> None:
        """Answer with KeyboardInterrupt: the ceremony is being cancelled."""
        if not self.done.is_set():
            self.error = KeyboardInterrupt()
            self.done.set()


class _Ceremony:
    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.finished = threading.Event()  # set by the worker when it ends
        self.calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()


_current: _Ceremony | None = None
_line_ended = False  # Ctrl-C at a hidden prompt: click has ended the line already


def on_main_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on the main thread: run here when called there (or outside a ceremony),
    else handed to the main thread of the running :func:`cancellable`, which runs it and
    hands back its result or exception (KeyboardInterrupt when Ctrl-C cancels it)."""
    ceremony = _current
    if ceremony is None or threading.current_thread() is threading.main_thread():
        return fn()
    call = _Call(fn)
    ceremony.calls.put(call)
    call.done.wait()
    if call.error is not None:
        raise call.error
    return call.result


def ask(text: str, **options: Any) -> Any:
    """``click.prompt`` on stderr, on the main thread. Ctrl-C raises KeyboardInterrupt (the
    cancel); end of input (Ctrl-D) raises ``click.Abort`` as click does."""

    def prompt_here() -> Any:
        global _line_ended
        try:
            return click.prompt(text, err=True, **options)
        except click.Abort as e:
            if is_ctrl_c(e):
                _line_ended = bool(options.get("hide_input"))  # click ended the line
                raise KeyboardInterrupt() from None
            raise

    return on_main_thread(prompt_here)


def answer(text: str, **options: Any) -> Any:
    """:func:`ask`, for a ceremony's questions (PIN, password, code, choice): in its worker,
    Ctrl-C answers None, "no answer", with which the ceremony ends as cancelled, recorded so
    in the audit log, before :func:`cancellable` raises the KeyboardInterrupt. On the main
    thread, Ctrl-C raises KeyboardInterrupt as in :func:`ask`."""
    try:
        return ask(text, **options)
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():
            raise
        return None


def is_ctrl_c(error: BaseException) -> bool:
    """A KeyboardInterrupt, or click's Abort raised from one (at a click prompt)."""
    return isinstance(error, KeyboardInterrupt) or (
        isinstance(error, click.Abort) and isinstance(error.__context__, KeyboardInterrupt))


def cancellable(work: Callable[[threading.Event], T]) -> T:
    """Run ``work(cancel)`` on a worker thread, its prompts on this one (see the module's
    docstring). Ctrl-C sets ``cancel`` (the device layer sends CTAPHID_CANCEL), waits for the
    work to end, and raises KeyboardInterrupt, unless the work's result says it succeeded all
    the same (``result.ok``: a login the key had already signed for).
    Called from within a ceremony's worker, ``work`` runs there, under that ceremony's
    cancel."""
    global _current
    outer = _current
    if threading.current_thread() is not threading.main_thread():
        return work(outer.cancel if outer is not None else threading.Event())
    ceremony = _Ceremony()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work(ceremony.cancel)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            box["error"] = e
        finally:
            ceremony.finished.set()
            ceremony.calls.put(None)  # wakes the main thread at once

    thread = threading.Thread(target=run, name="token-agent-ceremony", daemon=True)
    _current = ceremony
    try:
        thread.start()
        try:
            _serve(ceremony)
        except KeyboardInterrupt:
            ceremony.cancel.set()
            _wind_down(ceremony)  # a second Ctrl-C stops waiting (the cancel is sent)
            if "error" in box or getattr(box["result"], "ok", None) is not True:
                raise KeyboardInterrupt() from None  # unless a login succeeded all the same
    finally:
        _current = outer
    if "error" in box:
        raise box["error"]
    return box["result"]


def _serve(ceremony: _Ceremony) -> None:
    """Run the worker's prompts until it ends (Ctrl-C: KeyboardInterrupt, the prompt that
    was running answered with it)."""
    call = None
    try:
        while not ceremony.finished.is_set():
            call = None
            try:
                call = ceremony.calls.get(timeout=0.2)
            except queue.Empty:
                continue
            if call is not None:
                call.run()
    except KeyboardInterrupt:
        if call is not None:
            call.refuse()
        raise


def _wind_down(ceremony: _Ceremony) -> None:
    """Wait for the cancelled worker to end, refusing any prompt it still asks."""
    told = time.monotonic() + _SLOW_CANCEL
    while not ceremony.finished.is_set():
        try:
            call = ceremony.calls.get(timeout=0.1)
        except queue.Empty:
            if told is not None and time.monotonic() > told:
                click.echo("Cancelling... (Ctrl-C again to stop waiting for the key)", err=True)
                told = None
            continue
        if call is not None:
            call.refuse()


class _Terminal:
    """The controlling terminal's attributes at start, put back on the way out if a prompt
    (or anything else) left them changed, e.g. echo off."""

    def __init__(self) -> None:
        self.saved = None
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        except OSError:
            return  # no terminal: nothing to restore
        try:
            self.saved = termios.tcgetattr(fd)
        except termios.error:
            pass
        finally:
            os.close(fd)

    def restore(self) -> None:
        if self.saved is None:
            return
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        except OSError:
            return
        try:
            # only in the foreground: from the background, tcsetattr stops the process
            if os.tcgetpgrp(fd) == os.getpgrp() and termios.tcgetattr(fd) != self.saved:
                termios.tcsetattr(fd, termios.TCSANOW, self.saved)
        except (OSError, termios.error):
            pass
        finally:
            os.close(fd)


class CancellingGroup(click.Group):
    """The root group: Ctrl-C anywhere in a command is "Cancelled." and exit 5, never a
    traceback or click's "Aborted!", and the terminal is as it was at start."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        terminal = _Terminal()
        try:
            return super().main(*args, **kwargs)
        finally:
            terminal.restore()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, click.Abort) as e:
            if not is_ctrl_c(e):
                raise
        # the "^C" the terminal echoed ends the line it was typed on
        newline = sys.stderr.isatty() and not _line_ended
        click.echo(("\n" if newline else "") + "Cancelled.", err=True)
        sys.exit(exitcodes.TIMEOUT)
