"""drivers.pcsc.readers through the real pcscd and vpcd's readers, with the virtual card:
listing readers, insert/remove events with the ATR, two readers, stopping promptly, and
pcscd killed and restarted while watching."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import time

import pytest

from drivers.pcsc.errors import PcscUnavailable
from drivers.pcsc.readers import ReaderEvent, ReaderWatcher, list_readers
from pcsc_helpers import establish_context, find_pcscd, list_readers as helper_list_readers
from simulators.card.card import VirtualCard
from simulators.card.vpcd import READER_PREFIX, find_reader

#: an insertion or removal is seen by pcscd within its 400 ms poll; the event follows at once
EVENT_TIMEOUT = 2.0


@pytest.fixture
def empty_readers(pcscd):
    """Both vpcd readers empty as pcscd sees them: a card taken out at the end of the test
    before is only noticed at pcscd's next poll (up to 400 ms), and a card put in before
    that poll is never seen as a new card (vpcd answers "present" throughout)."""
    from pcsc_helpers import wait_for_card

    for slot in (0, 1):
        wait_for_card(pcscd.context, pcscd.reader(slot), present=False)


def card(issued_cards, tmp_path, name: str = "alice") -> VirtualCard:
    path = tmp_path / f"{name}.card"
    shutil.copyfile(issued_cards[name], path)
    os.chmod(path, 0o600)
    return VirtualCard.load(path)


class Events:
    """The watcher's callback: events in a queue, waited for by kind and reader."""

    def __init__(self) -> None:
        self.queue: queue.Queue[ReaderEvent] = queue.Queue()
        self.seen: list[ReaderEvent] = []
        self.taken: set[int] = set()

    def __call__(self, event: ReaderEvent) -> None:
        self.queue.put(event)

    def wait(self, kind: str, reader: str | None = None, timeout: float = EVENT_TIMEOUT
             ) -> ReaderEvent:  # fmt: skip
        """The first event of ``kind`` (for ``reader``) not waited for yet, in any order."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.seen):
                if i not in self.taken and event.kind == kind and \
                        (reader is None or event.reader == reader):
                    self.taken.add(i)
                    return event
            left = deadline - time.monotonic()
            try:
                self.seen.append(self.queue.get(timeout=max(0.0, left)))
            except queue.Empty:
                raise AssertionError(f"no {kind} event for {reader} within {timeout:g} s; "
                                     f"seen: {self.seen}") from None

    def drain(self) -> list[ReaderEvent]:
        while True:
            try:
                self.seen.append(self.queue.get_nowait())
            except queue.Empty:
                return self.seen


def test_list_readers(pcscd):
    readers = list_readers()
    assert find_reader(readers, 0) == pcscd.reader(0)
    assert find_reader(readers, 1) == pcscd.reader(1)
    assert readers == helper_list_readers(pcscd.context)


def test_watcher_sees_insert_and_remove(pcscd, empty_readers, vpcd_insert, issued_cards, tmp_path):
    reader = pcscd.reader(0)
    events = Events()
    with ReaderWatcher(events, readers_filter=[READER_PREFIX]) as watcher:
        snapshot = watcher.snapshot()
        assert reader in snapshot and not snapshot[reader].present
        assert all(name.startswith(READER_PREFIX) for name in snapshot)
        virtual = card(issued_cards, tmp_path)
        bridge = vpcd_insert(virtual)
        inserted_at = bridge.requested_at
        event = events.wait("card-inserted", reader)
        assert event.atr == virtual.atr
        assert 0 <= event.at - inserted_at < 0.5 + 0.1, event.at - inserted_at
        state = watcher.snapshot()[reader]
        assert state.present and state.atr == virtual.atr
        removed_at = time.monotonic()
        bridge.remove()
        event = events.wait("card-removed", reader)
        assert event.atr is None and 0 <= event.at - removed_at < 0.5 + 0.1
        assert not watcher.snapshot()[reader].present
    assert not watcher.running
    kinds = [e.kind for e in events.drain()]
    assert kinds == ["card-inserted", "card-removed"], kinds


def test_card_present_at_start_is_in_the_snapshot(pcscd, empty_readers, vpcd_insert, issued_cards,
                                                  tmp_path):
    from pcsc_helpers import wait_for_card

    reader = pcscd.reader(0)
    virtual = card(issued_cards, tmp_path)
    vpcd_insert(virtual)
    wait_for_card(pcscd.context, reader)
    events = Events()
    with ReaderWatcher(events) as watcher:
        state = watcher.snapshot()[reader]
        assert state.present and state.atr == virtual.atr
    assert events.drain() == []  # what is there at start is not an event


def test_two_readers_two_cards(pcscd, empty_readers, vpcd_insert, issued_cards, tmp_path):
    first, second = pcscd.reader(0), pcscd.reader(1)
    events = Events()
    with ReaderWatcher(events, readers_filter=lambda name: name in (first, second)) as watcher:
        alice, bob = card(issued_cards, tmp_path, "alice"), card(issued_cards, tmp_path, "bob")
        bridge_a = vpcd_insert(alice, slot=0)
        bridge_b = vpcd_insert(bob, slot=1)
        assert events.wait("card-inserted", first).atr == alice.atr
        assert events.wait("card-inserted", second).atr == bob.atr
        snapshot = watcher.snapshot()
        assert set(snapshot) == {first, second}
        assert snapshot[first].present and snapshot[second].present
        bridge_b.remove()
        events.wait("card-removed", second)
        assert watcher.snapshot()[first].present  # the other card stays
        bridge_a.remove()
        events.wait("card-removed", first)
    assert [e.kind for e in events.drain()].count("card-removed") == 2


def test_stop_is_prompt(pcscd):
    watcher = ReaderWatcher(lambda event: None).start()
    time.sleep(0.1)  # the thread is blocked in SCardGetStatusChange (INFINITE)
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 0.5
    assert not watcher.running


def test_callback_errors_do_not_stop_the_watcher(pcscd, empty_readers, vpcd_insert, issued_cards,
                                                  tmp_path):
    reader = pcscd.reader(0)
    events = Events()

    def callback(event):
        events(event)
        raise RuntimeError("a consumer's bug")

    with ReaderWatcher(callback, readers_filter=reader):
        bridge = vpcd_insert(card(issued_cards, tmp_path))
        events.wait("card-inserted", reader)
        bridge.remove()
        events.wait("card-removed", reader)


# -- pcscd killed and restarted while watching -------------------------------------------------


def restart_pcscd(service) -> None:
    """Kill the session's own pcscd and start it again the same way (pcsc_helpers), giving
    the session a fresh context."""
    proc = service.process
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    with open(service.log, "ab") as out:
        service.process = subprocess.Popen(
            [find_pcscd(), "--foreground", "--auto-exit"], stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 15
    context = None
    while context is None or find_reader(helper_list_readers(context), 0) is None:
        assert time.monotonic() < deadline, f"pcscd did not come back:\n{service.output()}"
        time.sleep(0.05)
        if context is None:
            context = establish_context()
    service.context = context  # the old one died with the old pcscd


def test_watcher_survives_pcscd_restart(pcscd, empty_readers, vpcd_insert, issued_cards, tmp_path):
    if not pcscd.started_here:
        pytest.skip("pcscd is the machine's own (not started by this test session): "
                    "the test does not kill it; found running: "
                    + ("; ".join(pcscd.found_running) or "none seen in /proc"))
    reader = pcscd.reader(0)
    at_loss: list = []  # the watcher's snapshot when it reports the loss (on its own thread)

    class LossEvents(Events):
        def __call__(self, event: ReaderEvent) -> None:
            if event.kind == "service-lost":
                at_loss.append(watcher.snapshot())
            super().__call__(event)

    events = LossEvents()
    with ReaderWatcher(events, readers_filter=[READER_PREFIX]) as watcher:
        alice = card(issued_cards, tmp_path)
        vpcd_insert(alice, reconnect=True)
        events.wait("card-inserted", reader)
        restart_pcscd(pcscd)
        events.wait("service-lost", timeout=5)
        # Read then, not now: by now the watcher may already be back (restart_pcscd waited
        # for pcscd to list its reader again).
        assert at_loss[0] == {}
        events.wait("service-back", timeout=10)
        events.wait("reader-added", reader, timeout=10)
        # the card stayed in (the bridge reconnects): reported as inserted after the restart
        assert events.wait("card-inserted", reader, timeout=10).atr == alice.atr
        # and the next insertion, in the other reader, is seen too
        second = pcscd.reader(1)
        bob = card(issued_cards, tmp_path, "bob")
        vpcd_insert(bob, slot=1)
        assert events.wait("card-inserted", second).atr == bob.atr
    assert list_readers()  # the service is usable again for the rest of the session


def test_list_readers_without_service(monkeypatch):
    from smartcard import scard

    monkeypatch.setattr(scard, "SCardEstablishContext",
                        lambda scope: (0x8010001D - 2**32, None))
    with pytest.raises(PcscUnavailable) as info:
        list_readers()
    assert info.value.message == "The smartcard service (pcscd) is not running."
