"""CTAPHID framing of the virtual key (simulators.key.ctaphid, through simulators.key.device),
driven by raw reports and by python-fido2's own CtapHidDevice, in process."""

from __future__ import annotations

import os
import threading
import time

import pytest
from fido2.ctap import CtapError
from fido2.hid import CAPABILITY, CTAPHID

from simulators.key.base import KeepaliveStatus
from simulators.key.ctaphid import (
    BROADCAST_CID,
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    Cmd,
    HidError,
    corrupt_report,
    frame_message,
)
from simulators.key.transport import open_in_process_device
from sim_key_double import (
    ECHO,
    EXPLODE,
    KEEPALIVE_CANCEL,
    NEEDS_TOUCH,
    RawHost,
    double_key,
    wait_until_waiting,
)

MSG_TIMEOUT = 0.2  # a short CTAPHID message timeout keeps these tests fast


@pytest.fixture
def key_app():
    key, app = double_key("auto", msg_timeout=MSG_TIMEOUT)
    yield key, app
    key.close()


@pytest.fixture
def manual_key():
    key, app = double_key("manual", msg_timeout=MSG_TIMEOUT)
    yield key, app
    key.close()


@pytest.fixture
def host(key_app):
    key, _ = key_app
    return RawHost(key)


def error_of(host: RawHost, cid: int) -> int:
    cmd, data = host.receive(cid)
    assert cmd == Cmd.ERROR, f"expected CTAPHID_ERROR, got command 0x{cmd:02x} {data.hex()}"
    return data[0]




# -- INIT and channels ----------------------------------------------------------------------


def test_init_on_broadcast_echoes_nonce_and_allocates_a_channel(key_app, host):
    key, app = key_app
    nonce = os.urandom(8)
    host.send(BROADCAST_CID, Cmd.INIT, nonce)
    cmd, data = host.receive(BROADCAST_CID)
    assert cmd == Cmd.INIT and len(data) == 17
    assert data[:8] == nonce
    cid = int.from_bytes(data[8:12], "big")
    assert cid not in (0, BROADCAST_CID)
    assert data[12] == PROTOCOL_VERSION
    assert tuple(data[13:16]) == app.device_version
    assert data[16] == app.capabilities
    assert host.allocate() != cid  # every INIT on broadcast allocates a fresh channel


def test_init_on_an_allocated_channel_resynchronises_it(host):
    cid = host.allocate()
    nonce = os.urandom(8)
    host.send(cid, Cmd.INIT, nonce)
    cmd, data = host.receive(cid)
    assert cmd == Cmd.INIT and data[:8] == nonce
    assert int.from_bytes(data[8:12], "big") == cid


def test_init_aborts_the_pending_message_of_its_channel(host):
    cid = host.allocate()
    host.init_packet(cid, Cmd.PING, 100, b"a" * 57)  # a continuation should follow
    host.send(cid, Cmd.INIT, os.urandom(8))
    assert host.receive(cid)[0] == Cmd.INIT
    host.cont_packet(cid, 0, b"b" * 43)  # belongs to the aborted message: ignored
    host.send(cid, Cmd.PING, b"after")
    assert host.receive(cid) == (Cmd.PING, b"after")  # and no MSG_TIMEOUT either


def test_init_aborts_a_transaction_waiting_for_touch(manual_key):
    key, app = manual_key
    host = RawHost(key)
    cid = host.allocate()
    host.send(cid, Cmd.CBOR, bytes((NEEDS_TOUCH,)))
    wait_until_waiting(app)
    host.send(cid, Cmd.INIT, os.urandom(8))
    assert host.receive(cid)[0] == Cmd.INIT
    assert app.cancelled.wait(2)  # the app saw request.cancelled
    assert app.finished.wait(2)
    host.send(cid, Cmd.PING, b"x")  # the aborted request's answer is never sent
    assert host.receive(cid) == (Cmd.PING, b"x")


def test_init_with_wrong_length_is_invalid_len(host):
    host.init_packet(BROADCAST_CID, Cmd.INIT, 7, os.urandom(7))
    assert error_of(host, BROADCAST_CID) == HidError.INVALID_LEN


@pytest.mark.parametrize("cid", [0, 0x12345678])
def test_init_on_cid_zero_or_unallocated_is_invalid_channel(host, cid):
    host.send(cid, Cmd.INIT, os.urandom(8))
    assert error_of(host, cid) == HidError.INVALID_CHANNEL


@pytest.mark.parametrize("cid", [0, BROADCAST_CID, 0x12345678])
def test_commands_need_an_allocated_channel(host, cid):
    host.allocate()
    host.send(cid, Cmd.PING, b"hi")
    assert error_of(host, cid) == HidError.INVALID_CHANNEL


# -- commands -------------------------------------------------------------------------------


def test_python_fido2_device_in_process(key_app):
    key, app = key_app
    device = open_in_process_device(key)
    try:
        assert device.version == PROTOCOL_VERSION
        assert device.capabilities & CAPABILITY.CBOR
        assert device.ping(b"hello") == b"hello"
        assert device.ping(b"") == b""
        assert device.call(CTAPHID.CBOR, bytes((ECHO,)) + b"abc") == b"\x00abc"
        assert device.call(CTAPHID.MSG, b"\x00\x01\x00\x00") == b"\x00\x01\x00\x00\x90\x00"
        device.wink()
        assert app.winks == 1
    finally:
        device.close()


def test_ping_of_the_maximum_size_is_fragmented_and_reassembled(key_app):
    key, _ = key_app
    device = open_in_process_device(key)
    try:
        message = os.urandom(MAX_MESSAGE)
        assert MAX_MESSAGE == 7609
        assert device.ping(message) == message
    finally:
        device.close()


def test_maximum_message_uses_every_sequence_number(host):
    cid = host.allocate()
    message = os.urandom(MAX_MESSAGE)
    host.send(cid, Cmd.PING, message)
    first = host.report(cid)
    assert first[4] == 0x80 | Cmd.PING and int.from_bytes(first[5:7], "big") == MAX_MESSAGE
    seqs = [host.report(cid)[4] for _ in range(128)]
    assert seqs == list(range(128))


def test_one_byte_over_the_maximum_is_invalid_len(host):
    cid = host.allocate()
    host.init_packet(cid, Cmd.PING, MAX_MESSAGE + 1, b"a" * 57)
    assert error_of(host, cid) == HidError.INVALID_LEN
    with pytest.raises(ValueError):
        frame_message(cid, Cmd.PING, bytes(MAX_MESSAGE + 1))


def test_unknown_command_is_invalid_cmd(host):
    cid = host.allocate()
    host.send(cid, 0x40, b"vendor")
    assert error_of(host, cid) == HidError.INVALID_CMD
    host.send(cid, Cmd.KEEPALIVE, b"\x01")  # a device-to-host command
    assert error_of(host, cid) == HidError.INVALID_CMD


@pytest.mark.parametrize(
    "cmd, data", [(Cmd.CBOR, b""), (Cmd.MSG, b""), (Cmd.WINK, b"x"), (Cmd.LOCK, b"\x01\x01")]
)
def test_bad_lengths_are_invalid_len(host, cmd, data):
    cid = host.allocate()
    host.send(cid, cmd, data)
    assert error_of(host, cid) == HidError.INVALID_LEN


def test_lock_for_more_than_ten_seconds_is_invalid_par(host):
    cid = host.allocate()
    host.send(cid, Cmd.LOCK, b"\x0b")
    assert error_of(host, cid) == HidError.INVALID_PAR


def test_lock_keeps_other_channels_out_until_released(key_app):
    key, _ = key_app
    a, b = RawHost(key), RawHost(key)
    cid_a, cid_b = a.allocate(), b.allocate()
    a.send(cid_a, Cmd.LOCK, b"\x05")
    assert a.receive(cid_a) == (Cmd.LOCK, b"")
    b.send(cid_b, Cmd.PING, b"b")
    assert error_of(b, cid_b) == HidError.LOCK_REQUIRED
    assert b.allocate()  # INIT is still answered
    a.send(cid_a, Cmd.PING, b"a")
    assert a.receive(cid_a) == (Cmd.PING, b"a")
    a.send(cid_a, Cmd.LOCK, b"\x00")  # release
    assert a.receive(cid_a) == (Cmd.LOCK, b"")
    b.send(cid_b, Cmd.PING, b"b")
    assert b.receive(cid_b) == (Cmd.PING, b"b")


def test_app_failure_is_err_other(host):
    cid = host.allocate()
    host.send(cid, Cmd.CBOR, bytes((EXPLODE,)))
    assert error_of(host, cid) == HidError.OTHER
    host.send(cid, Cmd.PING, b"still here")
    assert host.receive(cid) == (Cmd.PING, b"still here")


# -- sequencing and timeouts ----------------------------------------------------------------


def test_continuation_out_of_sequence_is_invalid_seq(host):
    cid = host.allocate()
    host.init_packet(cid, Cmd.PING, 100, b"a" * 57)
    host.cont_packet(cid, 1, b"b" * 43)
    assert error_of(host, cid) == HidError.INVALID_SEQ
    host.send(cid, Cmd.PING, b"again")
    assert host.receive(cid) == (Cmd.PING, b"again")


def test_new_init_packet_mid_message_on_same_channel_is_invalid_seq(host):
    cid = host.allocate()
    host.init_packet(cid, Cmd.PING, 100, b"a" * 57)
    host.init_packet(cid, Cmd.PING, 3, b"xyz")
    assert error_of(host, cid) == HidError.INVALID_SEQ


def test_continuation_without_pending_message_is_ignored(host):
    cid = host.allocate()
    host.cont_packet(cid, 0, b"stray")
    host.send(cid, Cmd.PING, b"next")
    assert host.receive(cid) == (Cmd.PING, b"next")  # nothing came before the answer


def test_missing_continuation_is_msg_timeout(host):
    cid = host.allocate()
    started = time.monotonic()
    host.init_packet(cid, Cmd.PING, 100, b"a" * 57)
    assert error_of(host, cid) == HidError.MSG_TIMEOUT
    elapsed = time.monotonic() - started
    assert MSG_TIMEOUT * 0.9 <= elapsed < MSG_TIMEOUT + 0.5
    host.send(cid, Cmd.PING, b"free again")
    assert host.receive(cid) == (Cmd.PING, b"free again")


# -- one transaction at a time, cancel, keepalive -------------------------------------------


def test_other_channel_is_busy_while_a_request_waits_for_touch(manual_key):
    key, app = manual_key
    a, b = RawHost(key), RawHost(key)
    cid_a, cid_b = a.allocate(), b.allocate()
    a.send(cid_a, Cmd.CBOR, bytes((NEEDS_TOUCH,)))
    wait_until_waiting(app)
    b.send(cid_b, Cmd.PING, b"b")
    assert error_of(b, cid_b) == HidError.CHANNEL_BUSY
    a.send(cid_a, Cmd.PING, b"again")  # one transaction at a time on its own channel too
    assert error_of(a, cid_a) == HidError.CHANNEL_BUSY
    assert b.allocate()  # INIT is answered while busy
    app.presence.touch()
    assert a.receive(cid_a) == (Cmd.CBOR, b"\x00")
    b.send(cid_b, Cmd.PING, b"b")
    assert b.receive(cid_b) == (Cmd.PING, b"b")


def test_other_channel_is_busy_while_a_message_is_being_received(key_app):
    key, _ = key_app
    a, b = RawHost(key), RawHost(key)
    cid_a, cid_b = a.allocate(), b.allocate()
    a.init_packet(cid_a, Cmd.PING, 100, b"a" * 57)
    b.send(cid_b, Cmd.PING, b"b")
    assert error_of(b, cid_b) == HidError.CHANNEL_BUSY
    b.cont_packet(cid_b, 0, b"x")  # another channel's continuation does not disturb a
    a.cont_packet(cid_a, 0, b"a" * 43)
    assert a.receive(cid_a) == (Cmd.PING, b"a" * 100)


def test_keepalive_upneeded_arrives_promptly_and_repeats(manual_key):
    key, app = manual_key
    host = RawHost(key)
    cid = host.allocate()
    host.send(cid, Cmd.CBOR, bytes((NEEDS_TOUCH,)))
    started = time.monotonic()
    statuses = []
    while KeepaliveStatus.UPNEEDED not in statuses:
        report = host.report(cid, timeout=1)
        assert report[4] == 0x80 | Cmd.KEEPALIVE
        statuses.append(report[7])
    assert time.monotonic() - started < 0.15
    # ... then about every 100 ms while the wait goes on
    first = time.monotonic()
    for _ in range(3):
        report = host.report(cid, timeout=1)
        assert report[4] == 0x80 | Cmd.KEEPALIVE and report[7] == KeepaliveStatus.UPNEEDED
    assert 0.2 <= time.monotonic() - first < 0.5
    app.presence.touch()
    keepalives: list[int] = []
    assert host.receive(cid, keepalives=keepalives) == (Cmd.CBOR, b"\x00")


def test_cancel_during_touch_wait_with_python_fido2(manual_key):
    key, app = manual_key
    device = open_in_process_device(key)
    event = threading.Event()
    statuses = []

    def on_keepalive(status):
        statuses.append(status)
        if status == KeepaliveStatus.UPNEEDED:
            event.set()  # python-fido2 sends CTAPHID_CANCEL on its next read

    try:
        answer = device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,)), event, on_keepalive)
        assert answer == bytes((KEEPALIVE_CANCEL,))  # Ctap2 turns it into CtapError(0x2D)
        assert app.cancelled.is_set()
        assert KeepaliveStatus.UPNEEDED in statuses
        assert device.ping(b"ok") == b"ok"
    finally:
        device.close()


def test_cancel_is_never_answered_and_other_channels_cannot_cancel(manual_key):
    key, app = manual_key
    a, b = RawHost(key), RawHost(key)
    cid_a, cid_b = a.allocate(), b.allocate()
    b.send(cid_b, Cmd.CANCEL)  # nothing to cancel: ignored, no answer
    a.send(cid_a, Cmd.CBOR, bytes((NEEDS_TOUCH,)))
    wait_until_waiting(app)
    b.send(cid_b, Cmd.CANCEL)  # not b's transaction: ignored
    b.send(cid_b, Cmd.PING, b"b")
    assert error_of(b, cid_b) == HidError.CHANNEL_BUSY  # the first answer b gets
    assert not app.cancelled.is_set()
    a.send(cid_a, Cmd.CANCEL)
    assert a.receive(cid_a) == (Cmd.CBOR, bytes((KEEPALIVE_CANCEL,)))
    assert app.cancelled.is_set()


# -- faults ---------------------------------------------------------------------------------


def test_fault_fail_next_answers_without_calling_the_app(key_app):
    key, app = key_app
    device = open_in_process_device(key)
    try:
        key.set_faults(fail_next=2, fail_status=0x31)
        assert device.call(CTAPHID.CBOR, bytes((ECHO,)) + b"a") == b"\x31"
        assert device.call(CTAPHID.CBOR, bytes((ECHO,)) + b"b") == b"\x31"
        assert device.call(CTAPHID.CBOR, bytes((ECHO,)) + b"c") == b"\x00c"
        assert app.cbor_calls == [bytes((ECHO,)) + b"c"]
        assert key.faults.fail_next == 0
    finally:
        device.close()


def test_fault_delay_keeps_sending_keepalives(host, key_app):
    key, _ = key_app
    cid = host.allocate()
    key.set_faults(delay=0.35)
    started = time.monotonic()
    host.send(cid, Cmd.PING, b"slow")
    keepalives: list[int] = []
    assert host.receive(cid, keepalives=keepalives) == (Cmd.PING, b"slow")
    assert time.monotonic() - started >= 0.35
    assert len(keepalives) >= 2 and set(keepalives) == {KeepaliveStatus.PROCESSING}


def test_keepalives_start_promptly_after_a_multi_packet_request():
    key, _ = double_key("auto")  # default message timeout, 0.5 s
    try:
        host = RawHost(key)
        cid = host.allocate()
        key.set_faults(delay=0.3)
        host.init_packet(cid, Cmd.PING, 100, bytes(57))
        time.sleep(0.05)  # a slow host: the key is waiting for the continuation meanwhile
        host.cont_packet(cid, 0, bytes(43))
        sent = time.monotonic()
        first = host.report(cid, timeout=1)
        assert first[4] == 0x80 | Cmd.KEEPALIVE
        assert time.monotonic() - sent < 0.2
    finally:
        key.close()


def test_fault_drop_reports(host, key_app):
    key, _ = key_app
    cid = host.allocate()
    key.set_faults(drop_reports=1)
    host.send(cid, Cmd.PING, b"lost")
    with pytest.raises(TimeoutError):  # its only report was dropped: nothing comes
        host.report(cid, timeout=0.2)
    host.send(cid, Cmd.PING, b"kept")
    assert host.receive(cid) == (Cmd.PING, b"kept")
    assert key.faults.drop_reports == 0


def test_fault_corrupt_reports(host, key_app):
    key, _ = key_app
    cid = host.allocate()
    key.set_faults(corrupt_reports=1)
    host.send(cid, Cmd.PING, b"garbled")
    expected = frame_message(cid, Cmd.PING, b"garbled")[0]
    assert host.report(cid) == corrupt_report(expected) != expected
    host.send(cid, Cmd.PING, b"clean")
    assert host.receive(cid) == (Cmd.PING, b"clean")


def test_fault_corrupt_report_reaches_python_fido2_as_an_error(key_app):
    key, _ = key_app
    device = open_in_process_device(key)
    try:
        key.set_faults(corrupt_reports=1)
        with pytest.raises(CtapError):  # the command byte arrives inverted
            device.ping(b"x")
    finally:
        device.close()


def test_fault_unplug_after_reports_mid_transaction(key_app):
    key, _ = key_app
    device = open_in_process_device(key)
    key.set_faults(unplug_after_reports=2)
    with pytest.raises(OSError):  # 3 packets: the key is gone after the 2nd
        device.ping(os.urandom(150))
    assert not key.powered
    with pytest.raises(OSError):
        open_in_process_device(key)
    key.plug()
    assert open_in_process_device(key).ping(b"back") == b"back"


def test_invalid_faults_are_rejected(key_app):
    key, _ = key_app
    for bad in ({"fail_next": -1}, {"fail_status": 256}, {"delay": "slow"},
                {"unplug_after_reports": 0}, {"drop_reports": True}, {"typo": 1}):  # fmt: skip
        with pytest.raises(ValueError):
            key.set_faults(**bad)
    assert key.faults.as_dict()["fail_next"] == 0


# -- handles and power ----------------------------------------------------------------------


def test_every_handle_gets_every_report_and_first_open_powers_up(key_app):
    key, app = key_app
    assert app.power_ups == 0
    a = RawHost(key)
    assert app.power_ups == 1
    b = RawHost(key)
    assert app.power_ups == 1  # not a plug-in: a handle was already open
    cid = a.allocate()
    a.send(cid, Cmd.PING, b"both")
    assert a.receive(cid) == b.receive(cid) == (Cmd.PING, b"both")
    a.close()
    b.close()
    RawHost(key)
    assert app.power_ups == 2  # first handle again: plugged in again


def test_power_cycle_forgets_channels_and_powers_up(key_app):
    key, app = key_app
    host = RawHost(key)
    cid = host.allocate()
    key.power_cycle()
    assert app.power_ups == 2
    host.send(cid, Cmd.PING, b"old channel")
    assert error_of(host, cid) == HidError.INVALID_CHANNEL
    assert host.allocate()


def test_unplug_mid_transaction_fails_the_host_cleanly(manual_key):
    key, app = manual_key
    device = open_in_process_device(key)
    failure: list[BaseException] = []

    def call():
        try:
            device.call(CTAPHID.CBOR, bytes((NEEDS_TOUCH,)))
        except BaseException as e:  # noqa: BLE001 (recorded for the assertion)
            failure.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    wait_until_waiting(app)
    key.unplug()
    thread.join(2)
    assert not thread.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], OSError)
    assert app.cancelled.wait(2)  # the app's wait ended too
    assert key.status()["powered"] is False
