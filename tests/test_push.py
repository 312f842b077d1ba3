"""Push approval with number matching (token_agent/factors/push.py).

The login side (``start`` / ``wait``) and the companion side (``pending_for`` / ``answer`` /
``submit``) share one store file; the "phone" uses its own ``Store`` connection (and, in one
test, its own OS process).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from token_agent.factors import FactorContext, FactorError, lockout, push
from token_agent.outcome import Reason
from token_agent.secretbox import KEY_FILE_ENV, SecretKeys
from token_agent.store import InvalidValue, Store

REPO_ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclasses.dataclass
class Env:
    data: Path
    store_path: Path
    store: Store
    keys: SecretKeys
    clock: FakeClock
    ctx: FactorContext
    user_id: str
    tmp: Path
    _opened: list = dataclasses.field(default_factory=list)

    def phone_ctx(self) -> FactorContext:
        """Another connection to the same store file: what the companion app talks to."""
        store = Store.open(self.store_path)
        self._opened.append(store)
        return FactorContext(store, self.keys, clock=self.clock)

    def enrolled(self, user_id: str | None = None, name: str = "phone", path: Path | None = None):
        user_id = user_id or self.user_id
        path = path or self.tmp / f"companion-{user_id[:8]}-{name}.json"
        method = push.enrol(self.ctx, user_id, path, name=name)
        companion = push.load_companion(path)
        method = push.pair(self.ctx, user_id, method, companion)
        return method, companion, path


@pytest.fixture
def env(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    store_path = data / "token-agent.db"
    store = Store.open(store_path)
    keys = SecretKeys.load_or_create(data, environ={})
    clock = FakeClock()
    ctx = FactorContext(store, keys, clock=clock, issuer="Example NHS Trust")
    user = store.add_user("alice")
    e = Env(data, store_path, store, keys, clock, ctx, user.id, tmp_path)
    yield e
    for s in e._opened:
        s.close()
    store.close()


CONTEXT = {"workstation": "ward-7-pc3", "network": "10.1.2.0/24", "username": "alice"}


def state_of(env: Env, request_id: str) -> str:
    with env.store.connection("test") as conn:
        return conn.execute("SELECT state FROM push_requests WHERE id = ?",
                            (request_id,)).fetchone()["state"]


def wrong(number: int) -> int:
    return 10 if number != 10 else 11


def wait_in_thread(ctx, request_id, **kw):
    """Run ``push.wait`` on a thread; returns (thread, result holder)."""
    box: dict = {}

    def run():
        try:
            box["result"] = push.wait(ctx, request_id, **kw)
        except BaseException as exc:  # pragma: no cover - reported by the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def joined(t, box):
    t.join(10)
    assert not t.is_alive(), "wait() did not return"
    if "error" in box:
        raise box["error"]
    return box["result"]


# --------------------------------------------------------------------------- enrolment


class TestEnrol:
    def test_writes_a_0600_companion_file_and_an_unconfirmed_method(self, env):
        path = env.tmp / "companion.json"
        old = os.umask(0)
        try:
            method = push.enrol(env.ctx, env.user_id, path)
        finally:
            os.umask(old)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not list(env.tmp.glob(".companion.json.*")), "no temporary file left"
        data = json.loads(path.read_text())
        assert data["version"] == 1 and data["user"] == "alice"
        assert data["issuer"] == "Example NHS Trust"
        assert len(base64.b64decode(data["private_key"])) == 32
        assert method.kind == "push" and method.name == "companion app"
        assert not method.confirmed
        companion = push.load_companion(path)
        assert companion.device_id == data["device_id"] and companion.username == "alice"
        with env.store.connection("test") as conn:
            row = conn.execute("SELECT device_id, public_key FROM push_devices WHERE method_id = ?",
                               (method.id,)).fetchone()
        assert row["device_id"] == companion.device_id
        assert bytes(row["public_key"]) == companion.public_key_bytes()
        assert data["private_key"] not in repr(companion) and "hidden" in repr(companion)
        event = env.store.list_events(env.user_id, kind="enrol.push")[0]
        assert event.outcome == "pending" and data["private_key"] not in json.dumps(event.detail)
        assert push.list_(env.ctx, env.user_id) == [method]

    def test_not_usable_before_pairing(self, env):
        push.enrol(env.ctx, env.user_id, env.tmp / "c.json")
        with pytest.raises(FactorError) as e:
            push.start(env.ctx, env.user_id, context=CONTEXT)
        assert e.value.reason is Reason.NOT_CONFIRMED

    def test_pairing_confirms_and_makes_it_preferred(self, env):
        path = env.tmp / "c.json"
        method = push.enrol(env.ctx, env.user_id, path)
        companion = push.load_companion(path)
        challenge = push.pairing_challenge(env.ctx, method)
        signature = push.companion_sign_pairing(companion, challenge)
        confirmed = push.confirm_enrol(env.ctx, env.user_id, method.id, challenge, signature)
        assert confirmed.confirmed and confirmed.preferred
        assert env.store.preferred_method(env.user_id).id == method.id
        assert env.store.list_events(env.user_id, kind="enrol.push")[0].outcome == "success"
        # a second companion app does not take the preference away
        second, _, _ = env.enrolled(name="tablet")
        assert second.confirmed and not second.preferred

    def test_pairing_refuses_another_key_a_foreign_or_expired_challenge(self, env):
        path = env.tmp / "c.json"
        method = push.enrol(env.ctx, env.user_id, path)
        companion = push.load_companion(path)
        impostor = dataclasses.replace(companion, private_key=Ed25519PrivateKey.generate())
        challenge = push.pairing_challenge(env.ctx, method)
        cases = {
            "another key": (challenge, push.companion_sign_pairing(impostor, challenge)),
            "tampered challenge": (bytes([challenge[0] ^ 1]) + challenge[1:],
                                   push.companion_sign_pairing(companion, bytes([challenge[0] ^ 1])
                                                               + challenge[1:])),
        }
        for label, (ch, sig) in cases.items():
            with pytest.raises(FactorError) as e:
                push.confirm_enrol(env.ctx, env.user_id, method.id, ch, sig)
            assert e.value.reason is Reason.VERIFICATION_FAILED, label
        env.clock.advance(push.PAIRING_TTL + 1)
        with pytest.raises(FactorError, match="expired"):
            push.confirm_enrol(env.ctx, env.user_id, method.id, challenge,
                               push.companion_sign_pairing(companion, challenge))
        assert not env.store.get_method(method.id).confirmed
        assert env.store.list_events(env.user_id, kind="enrol.push")[0].outcome == "failure"

    def test_an_existing_file_is_never_overwritten(self, env):
        path = env.tmp / "c.json"
        path.write_text("keep me")
        with pytest.raises(push.CompanionFileError, match="exists"):
            push.enrol(env.ctx, env.user_id, path)
        assert path.read_text() == "keep me"
        assert push.list_(env.ctx, env.user_id) == []

    def test_a_failed_enrolment_leaves_no_file(self, env):
        env.enrolled(name="phone")
        path = env.tmp / "again.json"
        with pytest.raises(Exception, match="already has"):
            push.enrol(env.ctx, env.user_id, path, name="phone")
        assert not path.exists()

    def test_remove(self, env):
        method, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        assert push.remove(env.ctx, env.user_id).id == method.id
        assert push.list_(env.ctx, env.user_id) == []
        with env.store.connection("test") as conn:
            assert conn.execute("SELECT count(*) FROM push_requests").fetchone()[0] == 0
        with pytest.raises(FactorError) as e:
            push.pending_for(env.ctx, companion)
        assert e.value.reason is Reason.UNKNOWN_CREDENTIAL
        with pytest.raises(FactorError):
            push.submit(env.ctx, push.answer(companion, request.id, approve=True,
                                             number=request.number))
        with pytest.raises(FactorError) as e:
            push.remove(env.ctx, env.user_id)
        assert e.value.reason is Reason.NO_CREDENTIAL
        assert env.store.list_events(env.user_id, kind="remove.push")[0].outcome == "success"


class TestCompanionFile:
    def test_group_or_other_readable_is_refused(self, env):
        _, _, path = env.enrolled()
        os.chmod(path, 0o644)
        with pytest.raises(push.CompanionFileError, match="chmod 600"):
            push.load_companion(path)
        os.chmod(path, 0o600)
        push.load_companion(path)

    def test_missing_not_json_wrong_version_damaged(self, env):
        with pytest.raises(push.CompanionFileError, match="does not exist"):
            push.load_companion(env.tmp / "nope.json")
        bad = env.tmp / "bad.json"
        for text, match in (("{not json", "not JSON"),
                            (json.dumps({"version": 2}), "version 2"),
                            (json.dumps({"version": 1, "device_id": "x", "user": "a", "issuer": "i",
                                         "private_key": "AAAA"}), "damaged")):
            bad.write_text(text)
            os.chmod(bad, 0o600)
            with pytest.raises(push.CompanionFileError, match=match):
                push.load_companion(bad)


# --------------------------------------------------------------------------- requests and answers


class TestAnswers:
    def test_approve_with_the_right_number(self, env):
        method, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        assert 10 <= request.number <= 99 and request.expires_at == T0 + 60
        t, box = wait_in_thread(env.ctx, request.id, timeout=10, poll=0.02)
        phone = env.phone_ctx()
        pending = push.pending_for(phone, companion)
        assert [p.id for p in pending] == [request.id] and pending[0].context == CONTEXT
        assert push.submit(phone, push.answer(companion, request.id, approve=True,
                                              number=request.number)) == "approved"
        result = joined(t, box)
        assert result.ok and result.reason is None and result.method.id == method.id
        assert state_of(env, request.id) == "approved"
        kinds = [(e.kind, e.outcome) for e in env.store.list_events(env.user_id)]
        assert ("verify.push", "success") in kinds and ("push.sent", "success") in kinds
        assert push.pending_for(phone, companion) == []

    def test_wrong_number_fails_and_counts_on_the_lockout(self, env):
        method, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        t, box = wait_in_thread(env.ctx, request.id, timeout=10, poll=0.02)
        phone = env.phone_ctx()
        assert push.submit(phone, push.answer(companion, request.id, approve=True,
                                              number=wrong(request.number))) == "wrong-number"
        result = joined(t, box)
        assert not result.ok and result.reason is Reason.PUSH_WRONG_NUMBER
        assert result.tries_left == 9 and "9 tries left" in result.message
        assert lockout.state(env.store, lockout.method_scope(method.id)).failures == 1

    def test_ten_wrong_numbers_lock_the_method(self, env):
        method, companion, _ = env.enrolled()
        for i in range(10):
            request = push.start(env.ctx, env.user_id, context=CONTEXT)
            assert push.submit(env.ctx, push.answer(companion, request.id, approve=True,
                                                    number=wrong(request.number))) == "wrong-number"
        last = push.wait(env.ctx, request.id, timeout=1)
        assert last.reason is Reason.PUSH_WRONG_NUMBER and last.tries_left == 0
        assert last.locked_until == T0 + 60 and "locked" in last.message
        with pytest.raises(FactorError) as e:
            push.start(env.ctx, env.user_id, context=CONTEXT)
        assert e.value.reason is Reason.METHOD_LOCKED
        assert env.store.list_events(env.user_id, kind="lockout.push")[0].outcome == "locked"
        assert env.store.list_events(env.user_id, kind="push.sent")[0].outcome == "refused"
        env.clock.advance(61)  # the lock runs out
        push.start(env.ctx, env.user_id, context=CONTEXT)

    def test_a_right_number_clears_the_count(self, env):
        method, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        push.submit(env.ctx, push.answer(companion, request.id, approve=True,
                                         number=wrong(request.number)))
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        push.submit(env.ctx, push.answer(companion, request.id, approve=True, number=request.number))
        assert lockout.state(env.store, lockout.method_scope(method.id)).failures == 0

    def test_deny(self, env):
        method, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        t, box = wait_in_thread(env.ctx, request.id, timeout=10, poll=0.02)
        phone = env.phone_ctx()
        assert push.submit(phone, push.answer(companion, request.id, approve=False,
                                              number=None)) == "denied"
        result = joined(t, box)
        assert not result.ok and result.reason is Reason.PUSH_DENIED
        assert "denied" in result.message and "tell IT" in result.message
        event = env.store.list_events(env.user_id, kind="push.denied")[0]
        assert event.detail["request_id"] == request.id and event.detail["context"] == CONTEXT
        assert lockout.state(env.store, lockout.method_scope(method.id)).failures == 0

    def test_expiry_and_a_late_answer(self, env):
        _, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT, ttl=30)
        env.clock.advance(31)
        assert push.pending_for(env.ctx, companion) == []
        result = push.wait(env.ctx, request.id, timeout=5)
        assert result.reason is Reason.PUSH_EXPIRED
        assert result.message == "the request expired: no answer from your companion app"
        assert state_of(env, request.id) == "expired"
        with pytest.raises(FactorError) as e:
            push.submit(env.ctx, push.answer(companion, request.id, approve=True,
                                             number=request.number))
        assert e.value.reason is Reason.PUSH_EXPIRED
        assert state_of(env, request.id) == "expired"

    def test_a_late_answer_before_anyone_noticed_expires_it(self, env):
        _, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT, ttl=30)
        env.clock.advance(30)
        assert push.submit(env.ctx, push.answer(companion, request.id, approve=True,
                                                number=request.number)) == "expired"
        assert push.wait(env.ctx, request.id, timeout=1).reason is Reason.PUSH_EXPIRED

    def test_wait_timeout_expires_the_request(self, env):
        env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        began = time.monotonic()
        result = push.wait(env.ctx, request.id, timeout=0.3, poll=0.05)
        assert 0.25 <= time.monotonic() - began < 3
        assert result.reason is Reason.PUSH_EXPIRED and state_of(env, request.id) == "expired"

    def test_cancel(self, env):
        _, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        cancel = threading.Event()
        t, box = wait_in_thread(env.ctx, request.id, timeout=10, cancel=cancel, poll=5)
        time.sleep(0.05)
        cancel.set()
        result = joined(t, box)
        assert result.reason is Reason.CANCELLED and state_of(env, request.id) == "cancelled"
        with pytest.raises(FactorError) as e:
            push.submit(env.ctx, push.answer(companion, request.id, approve=True,
                                             number=request.number))
        assert e.value.reason is Reason.CANCELLED

    @pytest.mark.parametrize("tamper", ["another key", "number", "decision", "request id"])
    def test_a_forged_or_tampered_answer_is_refused(self, env, tamper):
        method, companion, _ = env.enrolled()
        old = push.start(env.ctx, env.user_id, context=CONTEXT)
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        good = push.answer(companion, request.id, approve=False, number=None)
        target = request.id
        if tamper == "another key":
            impostor = dataclasses.replace(companion, private_key=Ed25519PrivateKey.generate())
            forged = push.answer(impostor, request.id, approve=True, number=request.number)
        elif tamper == "number":
            signed = push.answer(companion, request.id, approve=True, number=wrong(request.number))
            forged = dataclasses.replace(signed, number=request.number)
        elif tamper == "decision":
            forged = dataclasses.replace(good, decision="approve", number=request.number)
        else:  # a signature for another request (cancelled) moved onto the live one
            signed = push.answer(companion, old.id, approve=True, number=request.number)
            forged = dataclasses.replace(signed, request_id=request.id)
        phone = env.phone_ctx()
        with pytest.raises(FactorError) as e:
            push.submit(phone, forged)
        assert e.value.reason is Reason.VERIFICATION_FAILED
        assert state_of(env, target) == "pending"
        event = env.store.list_events(env.user_id, kind="push.answer")[0]
        assert event.outcome == "refused" and event.detail["request_id"] == request.id
        assert lockout.state(env.store, lockout.method_scope(method.id)).failures == 0
        # the genuine answer still goes through
        assert push.submit(phone, push.answer(companion, request.id, approve=True,
                                              number=request.number)) == "approved"

    def test_another_users_or_devices_companion_cannot_answer(self, env):
        _, alice_phone, _ = env.enrolled(name="phone")
        _, alice_tablet, _ = env.enrolled(name="tablet")
        bob = env.store.add_user("bob")
        _, bob_phone, _ = env.enrolled(bob.id, name="phone")
        request = push.start(env.ctx, env.user_id, context=CONTEXT, method="phone")
        assert push.pending_for(env.ctx, bob_phone) == []
        assert push.pending_for(env.ctx, alice_tablet) == []
        for other in (bob_phone, alice_tablet):
            with pytest.raises(FactorError) as e:
                push.submit(env.ctx, push.answer(other, request.id, approve=True,
                                                 number=request.number))
            assert e.value.reason is Reason.WRONG_USER
            # nor by claiming to be alice's phone
            with pytest.raises(FactorError) as e:
                push.submit(env.ctx, dataclasses.replace(
                    push.answer(other, request.id, approve=True, number=request.number),
                    device_id=alice_phone.device_id))
            assert e.value.reason is Reason.VERIFICATION_FAILED
        assert state_of(env, request.id) == "pending"
        with pytest.raises(FactorError) as e:
            push.start(env.ctx, env.user_id, context=CONTEXT,
                       method=env.store.find_method(bob.id, "push"))
        assert e.value.reason is Reason.WRONG_USER

    def test_pending_for_does_not_reveal_the_number(self, env):
        _, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        (pending,) = push.pending_for(env.phone_ctx(), companion)
        assert {f.name for f in dataclasses.fields(pending)} == {"id", "created_at", "expires_at",
                                                                 "context"}
        assert set(pending.to_json()) == {"id", "created_at", "expires_at", "context"}
        assert pending.id == request.id and pending.context == CONTEXT
        assert pending.expires_at == request.expires_at

    def test_a_second_answer_after_a_decision_is_refused(self, env):
        _, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        assert push.submit(env.ctx, push.answer(companion, request.id, approve=False,
                                                number=None)) == "denied"
        for approve in (True, False):
            with pytest.raises(FactorError) as e:
                push.submit(env.phone_ctx(), push.answer(companion, request.id, approve=approve,
                                                         number=request.number))
            assert e.value.reason is Reason.VERIFICATION_FAILED
        assert state_of(env, request.id) == "denied"

    def test_only_one_of_racing_answers_wins(self, env):
        _, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        phones = [env.phone_ctx() for _ in range(4)]
        results: list = []
        barrier = threading.Barrier(len(phones))

        def go(ctx, approve):
            signed = push.answer(companion, request.id, approve=approve, number=request.number)
            barrier.wait()
            try:
                results.append(push.submit(ctx, signed))
            except FactorError as exc:
                results.append(exc.reason)

        threads = [threading.Thread(target=go, args=(c, i % 2 == 0)) for i, c in enumerate(phones)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        winners = [r for r in results if not isinstance(r, Reason)]
        assert len(results) == 4 and len(winners) == 1
        assert state_of(env, request.id) == winners[0] in ("approved", "denied")

    def test_a_new_request_cancels_the_old_one(self, env):
        _, companion, _ = env.enrolled()
        first = push.start(env.ctx, env.user_id, context=CONTEXT)
        second = push.start(env.ctx, env.user_id, context={**CONTEXT, "workstation": "ward-8"})
        assert state_of(env, first.id) == "cancelled"
        assert [p.id for p in push.pending_for(env.ctx, companion)] == [second.id]
        assert push.wait(env.ctx, first.id, timeout=1).reason is Reason.CANCELLED
        with pytest.raises(FactorError) as e:
            push.submit(env.ctx, push.answer(companion, first.id, approve=True, number=first.number))
        assert e.value.reason is Reason.CANCELLED
        assert env.store.list_events(env.user_id, kind="push.sent")[0].detail["cancelled"] == 1

    def test_context_must_pass_the_audit_rules(self, env):
        env.enrolled()
        with pytest.raises(InvalidValue):
            push.start(env.ctx, env.user_id, context={"session_token": "abc"})
        with pytest.raises(FactorError) as e:
            push.start(env.ctx, env.store.add_user("carol").id, context=CONTEXT)
        assert e.value.reason is Reason.NO_CREDENTIAL

    def test_signed_answer_round_trips_through_json(self, env):
        _, companion, _ = env.enrolled()
        request = push.start(env.ctx, env.user_id, context=CONTEXT)
        signed = push.answer(companion, request.id, approve=True, number=request.number)
        wire = json.loads(json.dumps(signed.to_json()))
        assert push.SignedAnswer.from_json(wire) == signed
        with pytest.raises(FactorError):
            push.SignedAnswer.from_json({**wire, "signature": "not base64!"})
        assert push.submit(env.ctx, push.SignedAnswer.from_json(wire)) == "approved"


# --------------------------------------------------------------------------- two processes


COMPANION_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from token_agent.factors import FactorContext, push
    from token_agent.secretbox import SecretKeys
    from token_agent.store import Store

    store_path, data_dir, companion_path, number = sys.argv[1:5]
    with Store.open(store_path) as store:
        ctx = FactorContext(store, SecretKeys.load_or_create(data_dir))
        companion = push.load_companion(companion_path)
        deadline = time.monotonic() + 10
        pending = push.pending_for(ctx, companion)
        while not pending and time.monotonic() < deadline:
            time.sleep(0.05)
            pending = push.pending_for(ctx, companion)
        request = pending[0]
        state = push.submit(ctx, push.answer(companion, request.id, approve=True,
                                             number=int(number)))
        print(json.dumps({"id": request.id, "context": request.context, "state": state}))
""")


def test_companion_in_another_process_approves(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    store_path = data / "token-agent.db"
    with Store.open(store_path) as store:
        ctx = FactorContext(store, SecretKeys.load_or_create(data, environ={}))  # real clock
        user = store.add_user("alice")
        companion_path = tmp_path / "companion.json"
        method = push.enrol(ctx, user.id, companion_path)
        push.pair(ctx, user.id, method, push.load_companion(companion_path))
        request = push.start(ctx, user.id, context=CONTEXT)
        env = {k: v for k, v in os.environ.items() if k != KEY_FILE_ENV}
        proc = subprocess.Popen(
            [sys.executable, "-c", COMPANION_SCRIPT, str(store.path or store.location),
             str(data), str(companion_path), str(request.number)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            result = push.wait(ctx, request.id, timeout=15, poll=0.05)
            out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        answered = json.loads(out)
        assert answered == {"id": request.id, "context": CONTEXT, "state": "approved"}
        assert result.ok and result.method.id == method.id
        assert store.verify_events() > 0
