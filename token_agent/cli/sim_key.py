"""`token-agent sim key ...`: run the virtual FIDO2 key, and drive a running one through its
control interface. The logic lives in :mod:`simulators.key`; this module only parses
arguments and prints."""

from __future__ import annotations

import errno
import logging
import signal
import sys
import threading
from collections.abc import Callable

import click

from simulators.key.control import DEFAULT_CONTROL_PORT, DEFAULT_HID_PORT

from .. import exitcodes
from . import sim
from .common import emit, fail, json_option

PRESENCE_MODES = ("auto", "manual", "deny", "never")

control_port_option = click.option(
    "--control-port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_CONTROL_PORT,
    show_default=True,
    help="The simulator's HTTP control port.",
)


@sim.group()
def key() -> None:
    """The virtual FIDO2 key (CTAPHID over TCP on 127.0.0.1)."""


@key.command()
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_HID_PORT,
              show_default=True, help="TCP port for HID reports (0: any free port).")
@click.option("--control-port", type=click.IntRange(0, 65535), default=DEFAULT_CONTROL_PORT,
              show_default=True, help="HTTP control port (0: any free port).")
@click.option("--state", "state_file", type=click.Path(dir_okay=False),
              help="File keeping the key's credentials and PIN (default: in memory only).")
@click.option("--presence", type=click.Choice(PRESENCE_MODES), default="auto",
              show_default=True, help="How the simulated user answers touch requests.")
@click.option("--msg-timeout", type=click.FloatRange(0.01, 60), default=0.5,
              show_default=True, help="CTAPHID message timeout, seconds.")
@click.option("--single-host", is_flag=True,
              help="A new connection closes the earlier ones and powers the key up (for test "
                   "suites written for emulated keys); default: several at once, as hidraw.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (default: the key's events).")
def serve(port: int, control_port: int, state_file: str | None, presence: str,
          msg_timeout: float, single_host: bool, verbose: bool) -> None:  # fmt: skip
    """Run a virtual key in the foreground until SIGINT or SIGTERM.

    Both ports are bound to 127.0.0.1 only: the simulator has no authentication, and belongs
    on development and test machines, never on a production workstation.
    """
    from simulators.key.device import create_virtual_key
    from simulators.key.state import StateFileError
    from simulators.key.transport import KeyServer, ListenError

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("simulators.key").setLevel(logging.INFO)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    try:
        virtual_key = create_virtual_key(state_file=state_file, presence=presence,
                                         msg_timeout=msg_timeout,
                                         single_host=single_host)  # fmt: skip
    except (OSError, StateFileError) as e:
        raise click.ClickException(f"cannot create the virtual key: {e}") from None
    server = KeyServer(virtual_key, port=port, control_port=control_port)
    try:
        server.start()
    except ListenError as e:
        virtual_key.close()
        _listen_failed(e)
    except OSError as e:
        virtual_key.close()
        raise click.ClickException(str(e)) from None
    click.echo(
        f"virtual FIDO2 key: HID reports on 127.0.0.1:{server.port}, "
        f"control http://127.0.0.1:{server.control_port}/ "
        f"(presence {presence}, state {state_file or 'in memory'}"
        f"{', single host' if single_host else ''})"
    )
    click.echo(f"  use it with: TOKEN_AGENT_SIM_KEYS=127.0.0.1:{server.port}")
    sys.stdout.flush()
    try:
        stop.wait()
    finally:
        server.stop()
        virtual_key.close()
    click.echo("virtual FIDO2 key: stopped")


def _listen_failed(e) -> None:
    """A port is taken (exit 9) or cannot be bound (exit 1): name it and its option."""
    from drivers.fido.sim import format_address

    where = f"{format_address(e.host, e.port)} (the {e.role} port)"
    option = "--port" if e.role == "HID" else "--control-port"
    if e.errno == errno.EADDRINUSE:
        fail(f"{where} is already in use, perhaps by another `token-agent sim key serve`: "
             f"choose another with {option} PORT ({option} 0: any free port)",
             exitcodes.CONFLICT)
    fail(f"cannot listen on {where}: {e.strerror}; choose another with {option} PORT",
         exitcodes.ERROR)


def _run(action: Callable[[], dict], message: str | None = None) -> dict:
    from simulators.key.control import ControlError, SimulatorNotRunning

    try:
        result = action()
    except SimulatorNotRunning as e:
        fail(str(e), 2, reason="simulator-not-running")
    except ControlError as e:
        fail(str(e), 1, reason="control-error")
    if message:
        click.echo(message)
    return result


def _control(control_port: int):
    from simulators.key.control import KeyControl

    return KeyControl(port=control_port)


@key.command()
@control_port_option
def touch(control_port: int) -> None:
    """Tap the key's button once."""
    _run(_control(control_port).touch, "touched")


@key.command()
@control_port_option
def press(control_port: int) -> None:
    """Hold the button down (every touch request is approved until `release`)."""
    _run(_control(control_port).press, "button held")


@key.command()
@control_port_option
def release(control_port: int) -> None:
    """Release a held button."""
    _run(_control(control_port).release, "button released")


@key.command()
@click.argument("mode", type=click.Choice(PRESENCE_MODES))
@control_port_option
def presence(mode: str, control_port: int) -> None:
    """Set how the simulated user answers touch requests."""
    _run(lambda: _control(control_port).set_presence(mode), f"presence {mode}")


@key.command("power-cycle")
@control_port_option
def power_cycle(control_port: int) -> None:
    """Reboot the key (channels forgotten, volatile state cleared, reset window opens)."""
    _run(_control(control_port).power_cycle, "power-cycled")


@key.command()
@control_port_option
def unplug(control_port: int) -> None:
    """Pull the key out: connections drop and new ones are refused until `plug`."""
    _run(_control(control_port).unplug, "unplugged")


@key.command()
@control_port_option
def plug(control_port: int) -> None:
    """Plug the key back in."""
    _run(_control(control_port).plug, "plugged in")


@key.command()
@control_port_option
@json_option
def status(control_port: int, as_json: bool) -> None:
    """Show the running key's state."""
    state = _run(_control(control_port).status)
    if as_json:
        emit(True, state, "")
        return
    faults = {k: v for k, v in state.get("faults", {}).items() if v not in (0, 0.0, None)}
    if faults.get("fail_status") == 0x7F and "fail_next" not in faults:
        faults.pop("fail_status")
    hid = state.get("hid", {})
    click.echo(f"powered:           {'yes' if state.get('powered') else 'no (unplugged)'}")
    click.echo(f"HID port:          {hid.get('host')}:{hid.get('port')}"
               f"{'' if hid.get('listening') else ' (not listening)'}")  # fmt: skip
    click.echo(f"connections:       {state.get('connections')} ({state.get('handles')} open)"
               f"{'; single host' if state.get('single_host') else ''}")  # fmt: skip
    click.echo(f"presence:          {state.get('presence')}")
    click.echo(f"waiting for touch: {'yes' if state.get('waiting_for_touch') else 'no'}")
    click.echo(f"busy:              {'yes' if state.get('busy') else 'no'}")
    click.echo("faults:            "
               + (", ".join(f"{k}={v}" for k, v in faults.items()) or "none"))  # fmt: skip


def _byte(value: str) -> int:
    try:
        number = int(value, 0)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number (e.g. 0x31 or 49)") from None
    if not 0 <= number <= 0xFF:
        raise click.BadParameter(f"{value} is not a byte (0..0xFF)")
    return number


@key.command()
@click.option("--fail-next", type=click.IntRange(0), help="Fail the next N CTAP2 commands...")
@click.option("--status", "fail_status", metavar="0xNN", help="...with this CTAP status "
              "(default 0x7F, CTAP1_ERR_OTHER).")  # fmt: skip
@click.option("--delay", type=click.FloatRange(0, 3600), help="Seconds added before every answer.")
@click.option("--drop", type=click.IntRange(0), help="Drop the next N reports the key sends.")
@click.option("--corrupt", type=click.IntRange(0), help="Corrupt the next N reports the key sends.")
@click.option("--unplug-after", type=click.IntRange(1),
              help="Unplug after the key has received N more reports.")
@click.option("--clear", is_flag=True, help="Clear every fault first.")
@control_port_option
def fault(fail_next: int | None, fail_status: str | None, delay: float | None,
          drop: int | None, corrupt: int | None, unplug_after: int | None, clear: bool,
          control_port: int) -> None:  # fmt: skip
    """Inject faults into the running key (options combine)."""
    fields = {
        name: value
        for name, value in {
            "fail_next": fail_next,
            "fail_status": None if fail_status is None else _byte(fail_status),
            "delay": delay,
            "drop_reports": drop,
            "corrupt_reports": corrupt,
            "unplug_after_reports": unplug_after,
        }.items()
        if value is not None
    }
    if not fields and not clear:
        raise click.UsageError("give at least one fault option, or --clear")
    control = _control(control_port)
    if clear:
        _run(control.clear_faults)
    if fields:
        state = _run(lambda: control.set_faults(**fields))
    else:
        state = _run(control.faults)
    plan = dict(state.get("faults", state))
    plan.pop("ok", None)
    plan["fail_status"] = f"0x{plan['fail_status']:02x}"
    click.echo("faults: " + ", ".join(f"{k}={plan[k]}" for k in sorted(plan)))


@key.command("attestation-root")
def attestation_root() -> None:
    """Print the simulator attestation root (PEM), e.g. for `token-agent trust add-root -`.

    Trust it only on test deployments: the simulator's attestation key ships with the code.
    """
    from simulators.key.attestation import ROOT_CERT

    click.echo(ROOT_CERT.read_text(), nl=False)
