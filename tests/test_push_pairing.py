"""A phone's browser as the push companion (token_agent/factors/pushpairing.py): pairing
codes, enrolment of a key the server never sees the private half of, and signed requests.

The "phone" here is an Ed25519 key made in the test (the browser's WebCrypto key in
tests/test_web_companion.py); it signs exactly what companion.js signs.
"""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from token_agent.factors import FactorContext, FactorError, push, pushpairing
from token_agent.outcome import Reason
from token_agent.store import InvalidValue, KIND_PUSH
from test_push import CONTEXT, env  # noqa: F401 (the fixture)


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def events(env, kind: str) -> list:
    return list(reversed(env.store.list_events(kind=kind, limit=1000)))


def paired(env, name: str = "phone"):
    """A phone paired through a code: (key, device_id, method)."""
    pairing = pushpairing.start(env.ctx, env.user_id, name=name)
    key = Ed25519PrivateKey.generate()
    got = pushpairing.redeem(env.ctx, pairing.code, raw(key))
    signature = key.sign(push._pairing_bytes(got.device_id, got.challenge))
    method = pushpairing.confirm(env.ctx, got.device_id, got.challenge, signature)
    return key, got.device_id, method


def signed(key, device_id: str, *, ms: int, path: str = "/companion/events",
           method: str = "GET", nonce: str | None = None) -> dict:
    nonce = nonce or secrets.token_urlsafe(16)
    sig = key.sign(pushpairing.request_bytes(method, path, device_id, ms, nonce))
    return {"http_method": method, "path": path, "device_id": device_id,
            "timestamp": str(ms), "nonce": nonce, "signature": sig}


def now_ms(env) -> int:
    return int(env.clock() * 1000)


# --------------------------------------------------------------------------- codes


def test_a_code_pairs_a_phone_once_and_confirms_with_its_signature(env):
    pairing = pushpairing.start(env.ctx, env.user_id, name="Ward phone")
    assert len(pushpairing.normalise_code(pairing.code)) == 10 and "hidden" in repr(pairing)
    assert pairing.expires_at == env.clock() + pushpairing.CODE_TTL
    assert pushpairing.pending(env.ctx, env.user_id)["name"] == "Ward phone"
    with env.store.connection("test") as conn:  # stored as a keyed hash only
        rows = [dict(r) for r in conn.execute("SELECT * FROM push_pairings").fetchall()]
    assert len(rows) == 1 and pairing.code.replace("-", "").encode() not in bytes(rows[0]["code_hash"])
    key = Ed25519PrivateKey.generate()
    # typed on a phone: lower case, spaces, O for 0 all read the same
    typed = pairing.code.lower().replace("-", " ").replace("0", "o")
    got = pushpairing.redeem(env.ctx, typed, raw(key))
    assert not got.method.confirmed and got.method.name == "Ward phone"
    assert env.store.push_device(got.method.id)["public_key"] == raw(key)
    assert pushpairing.pending(env.ctx, env.user_id) is None
    # another key cannot finish this pairing
    other = Ed25519PrivateKey.generate()
    with pytest.raises(FactorError) as e:
        pushpairing.confirm(env.ctx, got.device_id, got.challenge,
                            other.sign(push._pairing_bytes(got.device_id, got.challenge)))
    assert e.value.reason is Reason.VERIFICATION_FAILED
    method = pushpairing.confirm(env.ctx, got.device_id, got.challenge,
                                 key.sign(push._pairing_bytes(got.device_id, got.challenge)))
    assert method.confirmed and method.preferred
    # the code is used: a second phone is refused, and nothing is enrolled for it
    with pytest.raises(FactorError) as e:
        pushpairing.redeem(env.ctx, pairing.code, raw(Ed25519PrivateKey.generate()))
    assert e.value.message == pushpairing.MSG_BAD_CODE
    assert len(env.store.list_methods(env.user_id, KIND_PUSH)) == 1
    assert [e.outcome for e in events(env, "push.pairing")] == ["issued", "refused"]
    assert events(env, "push.pairing")[-1].detail["why"] == "used"
    assert [e.outcome for e in events(env, "enrol.push")] == ["pending", "failure", "success"]
    assert events(env, "enrol.push")[0].detail["via"] == "pairing code"


def test_expired_unknown_malformed_and_replaced_codes_are_refused(env):
    old = pushpairing.start(env.ctx, env.user_id)
    new = pushpairing.start(env.ctx, env.user_id)  # ends the first
    key = raw(Ed25519PrivateKey.generate())
    for code in (old.code, "0000000000", "not a code", "", "A" * 50):
        with pytest.raises(FactorError) as e:
            pushpairing.redeem(env.ctx, code, key)
        assert e.value.message == pushpairing.MSG_BAD_CODE
    env.clock.advance(pushpairing.CODE_TTL)
    with pytest.raises(FactorError):
        pushpairing.redeem(env.ctx, new.code, key)
    assert events(env, "push.pairing")[-1].detail["why"] == "expired"
    assert [e.detail["why"] for e in events(env, "push.pairing") if e.outcome == "refused"] == \
        ["unknown", "unknown", "malformed", "malformed", "malformed", "expired"]
    assert env.store.list_methods(env.user_id, KIND_PUSH) == []


def test_a_bad_key_leaves_the_code_unused(env):
    pairing = pushpairing.start(env.ctx, env.user_id)
    for bad in (b"", b"\x00" * 31, b"x" * 33):
        with pytest.raises(FactorError):
            pushpairing.redeem(env.ctx, pairing.code, bad)
    assert pushpairing.pending(env.ctx, env.user_id) is not None
    pushpairing.redeem(env.ctx, pairing.code, raw(Ed25519PrivateKey.generate()))


def test_codes_are_per_user_and_names_do_not_collide(env):
    bob = env.store.add_user("bob")
    a = pushpairing.start(env.ctx, env.user_id)
    b = pushpairing.start(env.ctx, bob.id)  # does not end alice's
    assert pushpairing.pending(env.ctx, env.user_id) is not None
    got_b = pushpairing.redeem(env.ctx, b.code, raw(Ed25519PrivateKey.generate()))
    assert got_b.method.user_id == bob.id
    got = pushpairing.redeem(env.ctx, a.code, raw(Ed25519PrivateKey.generate()))
    assert got.method.user_id == env.user_id and got.method.name == "phone"
    assert paired(env)[2].name == "phone 2"
    assert paired(env)[2].name == "phone 3"
    with pytest.raises(InvalidValue):
        pushpairing.start(env.ctx, env.user_id, name="   ")


# --------------------------------------------------------------------------- signed requests


def test_a_signed_request_is_accepted_once(env):
    key, device_id, method = paired(env)
    req = signed(key, device_id, ms=now_ms(env))
    got = pushpairing.check_request(env.ctx, **req)
    assert got.method.id == method.id and got.user_id == env.user_id
    with pytest.raises(FactorError) as e:  # replayed
        pushpairing.check_request(env.ctx, **req)
    assert "replay" in e.value.message
    # a new nonce is fine; a nonce is forgotten only after its window closed
    pushpairing.check_request(env.ctx, **signed(key, device_id, ms=now_ms(env)))
    env.clock.advance(2 * pushpairing.REQUEST_WINDOW + 1)
    pushpairing.check_request(env.ctx, **signed(key, device_id, ms=now_ms(env)))
    with env.store.connection("test") as conn:
        assert conn.execute("SELECT count(*) FROM push_nonces").fetchone()[0] == 1


def test_signed_requests_that_are_refused(env):
    key, device_id, method = paired(env)
    ms = now_ms(env)
    other = Ed25519PrivateKey.generate()
    cases = {
        "another key": signed(other, device_id, ms=ms),
        "too old": signed(key, device_id, ms=ms - 61_000),
        "from the future": signed(key, device_id, ms=ms + 61_000),
        "another path": {**signed(key, device_id, ms=ms), "path": "/companion/answer"},
        "another method": {**signed(key, device_id, ms=ms), "http_method": "POST"},
        "short nonce": signed(key, device_id, ms=ms, nonce="abc"),
        "bad time": {**signed(key, device_id, ms=ms), "timestamp": "-5"},
        "unknown device": signed(key, "5b0e3f8e-2a4c-4b4e-9a51-0c1c9b6c1d11", ms=ms),
        "not a device": signed(key, "../x", ms=ms),
    }
    for why, req in cases.items():
        with pytest.raises(FactorError, match=".") as e:
            pushpairing.check_request(env.ctx, **req)
        assert e.value.reason in (Reason.VERIFICATION_FAILED, Reason.UNKNOWN_CREDENTIAL), why
    with env.store.connection("test") as conn:  # nothing unsigned was written
        assert conn.execute("SELECT count(*) FROM push_nonces").fetchone()[0] == 0
    with env.store.connection("test") as conn:
        conn.execute("UPDATE methods SET flagged = 1, flag_reason = 'lost' WHERE id = ?",
                      (method.id,))
    with pytest.raises(FactorError) as e:
        pushpairing.check_request(env.ctx, **signed(key, device_id, ms=ms))
    assert e.value.reason is Reason.CREDENTIAL_FLAGGED


def test_an_unconfirmed_phone_cannot_poll(env):
    pairing = pushpairing.start(env.ctx, env.user_id)
    key = Ed25519PrivateKey.generate()
    got = pushpairing.redeem(env.ctx, pairing.code, raw(key))
    with pytest.raises(FactorError) as e:
        pushpairing.check_request(env.ctx, **signed(key, got.device_id, ms=now_ms(env)))
    assert e.value.reason is Reason.NOT_CONFIRMED


# --------------------------------------------------------------------------- approving


def test_the_paired_phone_approves_with_the_number_and_other_devices_cannot(env):
    key, device_id, method = paired(env)
    request = push.start(env.ctx, env.user_id, context=CONTEXT)
    pending = push.pending_for_device(env.ctx, device_id)
    assert [p.id for p in pending] == [request.id]
    assert "number" not in pending[0].to_json() and str(request.number) not in str(pending[0].to_json())

    def answer(k, dev, number, decision="approve"):
        sig = k.sign(push.answer_bytes(request.id, decision, number))
        return push.SignedAnswer(dev, request.id, decision, number, sig)

    # a companion file of another user's, and another key claiming this device
    bob = env.store.add_user("bob")
    _, bobs, _ = env.enrolled(bob.id)
    with pytest.raises(FactorError) as e:
        push.submit(env.ctx, push.answer(bobs, request.id, approve=True, number=request.number))
    assert e.value.reason is Reason.WRONG_USER
    with pytest.raises(FactorError) as e:
        push.submit(env.ctx, answer(Ed25519PrivateKey.generate(), device_id, request.number))
    assert e.value.reason is Reason.VERIFICATION_FAILED
    good = answer(key, device_id, request.number)
    assert push.submit(env.ctx, good) == push.APPROVED
    with pytest.raises(FactorError):  # replayed
        push.submit(env.ctx, good)
    assert push.wait(env.ctx, request.id, timeout=1).ok
    second = push.start(env.ctx, env.user_id, context=CONTEXT)
    wrong = 10 if second.number != 10 else 11
    sig = key.sign(push.answer_bytes(second.id, "approve", wrong))
    assert push.submit(env.ctx, push.SignedAnswer(device_id, second.id, "approve", wrong, sig)) \
        == push.WRONG_NUMBER
    assert push.wait(env.ctx, second.id, timeout=1).reason is Reason.PUSH_WRONG_NUMBER


def test_add_device_refuses_a_key_that_is_not_ed25519(env):
    with pytest.raises(FactorError):
        push.add_device(env.ctx, env.user_id, push.new_device_id(), b"\x01" * 31, name="x")
    assert env.store.list_methods(env.user_id, KIND_PUSH) == []
