"""`token-agent sim card insert|remove`: the virtual card in vsmartcard's vpcd reader, behind
the real pcscd. The logic lives in :mod:`simulators.card.vpcd` (``VpcdBridge``, and
``CardHolder`` with its per-slot control socket); this module parses arguments and prints.

Exit codes: 0 done; 1 failure (unreadable card file, state not saved); 2 bad arguments;
4 no virtual reader (pcscd with vsmartcard-vpcd not running), or vpcd dropped the card;
8 `remove`: no card in that slot; 9 `insert`: the slot already holds a card.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import click

from .. import exitcodes
from .common import fail
from .sim_card import card

BASE_PORT = 35963  # simulators.card.vpcd.BASE_PORT (imported lazily)


def _address(slot: int, host: str, port: int | None) -> tuple[str, int]:
    if port is None:
        port = BASE_PORT + slot
    return host, port


def _where(host: str, port: int) -> str:
    slot = port - BASE_PORT
    if host in ("127.0.0.1", "localhost") and 0 <= slot < 256:
        return f"slot {slot} (Virtual PCD 00 {slot:02X}, vpcd {host}:{port})"
    return f"vpcd {host}:{port}"


slot_options = [
    click.option("--slot", type=click.IntRange(0, 255), default=0, show_default=True,
                 help="vpcd reader slot: 0 is \"Virtual PCD 00 00\" (port 35963), 1 is "
                      "\"Virtual PCD 00 01\" (35964)."),  # fmt: skip
    click.option("--host", default="127.0.0.1", show_default=True,
                 help="Where vpcd (inside pcscd) listens."),
    click.option("--port", type=click.IntRange(1, 65535),
                 help="vpcd's TCP port (default: 35963 + slot)."),
]


def _slot_options(func):
    for option in reversed(slot_options):
        func = option(func)
    return func


class _PcscKeeper:
    """A PC/SC context held while the card is in: Debian's pcscd is socket-activated and
    started with --auto-exit, so it starts when a client connects and exits a minute after
    the last one leaves, taking vpcd's listening ports with it. Holding a context starts it
    (pcscd has loaded its readers, vpcd listening, before it answers a client) and keeps it
    up. Best effort: without pcscd's socket it does nothing."""

    def __init__(self) -> None:
        self.context = None
        try:
            from smartcard import scard

            self._scard = scard
        except Exception:  # pragma: no cover - pyscard is a dependency
            self._scard = None

    def ensure(self) -> bool:
        scard = self._scard
        if scard is None:
            return False
        if self.context is not None:
            if scard.SCardIsValidContext(self.context) == scard.SCARD_S_SUCCESS:
                return True
            self.release()
        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult == scard.SCARD_S_SUCCESS:
            self.context = context
            return True
        return False

    def readers(self) -> list[str]:
        if self.context is None:
            return []
        hresult, readers = self._scard.SCardListReaders(self.context, [])
        return list(readers) if hresult == self._scard.SCARD_S_SUCCESS else []

    def release(self) -> None:
        if self.context is not None and self._scard is not None:
            try:
                self._scard.SCardReleaseContext(self.context)
            except Exception:
                pass
        self.context = None


@card.command()
@click.argument("card_file", type=click.Path(dir_okay=False))
@_slot_options
@click.option("--reconnect/--no-reconnect", default=True, show_default=True,
              help="When vpcd closes the connection (pcscd stopped or restarted), keep the "
                   "card in and connect again when vpcd is back; without it that is a "
                   "removal and the command ends (exit code 4).")  # fmt: skip
@click.option("-v", "--verbose", is_flag=True, help="Log the bridge's events.")
def insert(card_file: str, slot: int, host: str, port: int | None, reconnect: bool,
           verbose: bool) -> None:  # fmt: skip
    """Put the card in CARD_FILE into vpcd's reader and hold it there, in the foreground,
    until `token-agent sim card remove`, Ctrl-C or SIGTERM. The card's state (PIN retries,
    keys, objects) is saved back to CARD_FILE.

    Needs pcscd running with vsmartcard-vpcd (Debian: `apt-get install pcscd
    vsmartcard-vpcd`). vpcd accepts cards from anyone who reaches its port: development and
    test machines only.
    """
    from simulators.card.card import VirtualCard
    from simulators.card.cardfile import CardFile, CardFileError
    from simulators.card.vpcd import CardHolder, SlotBusy, VpcdBridge, VpcdError, VpcdNotListening

    logging.getLogger("simulators.card").setLevel(logging.INFO if verbose else logging.WARNING)
    host, port = _address(slot, host, port)
    where = _where(host, port)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())

    try:
        card_data = CardFile.load(card_file)
        virtual_card = VirtualCard(card_data)
    except (CardFileError, OSError, ValueError) as e:
        fail(f"cannot load the card: {e}", exitcodes.ERROR)

    keeper = _PcscKeeper()
    local = host in ("127.0.0.1", "localhost", "::1")
    if local:
        keeper.ensure()  # starts a socket-activated pcscd, and keeps it running
    bridge = VpcdBridge(virtual_card, host, port, reconnect=reconnect)
    holder = CardHolder(bridge, info={
        "card": str(card_file), "serial": card_data.serial, "holder": card_data.holder_name})
    try:
        holder.start()
    except VpcdNotListening as e:
        message = str(e)
        if keeper.context is not None:  # pcscd answers: is vpcd among its readers?
            readers = keeper.readers()
            message += (f"\n  pcscd is running; its readers: {', '.join(readers) or 'none'}"
                        + ("" if any(r.startswith("Virtual PCD") for r in readers) else
                           "\n  (no Virtual PCD: install vsmartcard-vpcd, restart pcscd)"))
        keeper.release()
        fail(message, exitcodes.NO_DEVICE)
    except SlotBusy as e:
        keeper.release()
        fail(f"{e}\n  remove it first: token-agent sim card remove "
             + (f"--slot {slot}" if port == BASE_PORT + slot else f"--host {host} --port {port}"),
             exitcodes.CONFLICT)
    except VpcdError as e:
        keeper.release()
        fail(str(e), exitcodes.ERROR)

    remove_hint = f"--slot {slot}" if port == BASE_PORT + slot else f"--host {host} --port {port}"
    click.echo(f"card {card_data.serial} ({card_data.holder_name}) inserted in {where}")
    click.echo(f"  remove it with: token-agent sim card remove {remove_hint}   (or Ctrl-C)")
    sys.stdout.flush()

    last_check = time.monotonic()
    try:
        while not stop.wait(0.2):
            if holder.wait(0):
                break
            if local and time.monotonic() - last_check > 5:
                keeper.ensure()  # pcscd restarted: a new context keeps the new one up
                last_check = time.monotonic()
    finally:
        error = None
        try:
            holder.remove(by="signal")
        except Exception as e:  # the card is out; its file may be stale
            error = e
        keeper.release()
    if error is not None:
        fail(f"the card is out, but its state could not be saved to {card_file}: {error}",
             exitcodes.ERROR)
    if bridge.end_reason == "vpcd closed the connection":
        fail(f"vpcd closed the connection: the card is out of {where} (pcscd stopped?); its "
             f"state is saved to {card_file}", exitcodes.NO_DEVICE)
    by = holder.removed_by or "signal"
    click.echo(f"card {card_data.serial} removed from {where}"
               f"{' by `token-agent sim card remove`' if by.startswith('token-agent') else ''}; "
               f"state saved to {card_file}")


@card.command()
@_slot_options
def remove(slot: int, host: str, port: int | None) -> None:
    """Take the card out of vpcd's reader: the `token-agent sim card insert` holding that
    slot removes it, saves its state and ends. Exit code 8 when no card is in that slot."""
    from simulators.card.vpcd import NoHolder, VpcdError, ask_holder

    host, port = _address(slot, host, port)
    where = _where(host, port)
    try:
        answer = ask_holder(host, port, "remove")
    except NoHolder:
        fail(f"no card is inserted in {where}: nothing to remove (no `token-agent sim card "
             f"insert` of this user holds that slot)", exitcodes.NOT_FOUND)
    except VpcdError as e:
        fail(str(e), exitcodes.ERROR)
    if answer.get("error"):
        fail(f"the card {answer.get('card', '')} is out of {where}, but its state could not be "
             f"saved: {answer['error']}", exitcodes.ERROR)
    click.echo(f"card {answer.get('serial', '?')} ({answer.get('card', '?')}) removed from {where} "
        f"(pid {answer.get('pid', '?')}); its state is saved")
