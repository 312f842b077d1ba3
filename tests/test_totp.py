"""The authenticator app (token_agent/factors/totp.py): RFC 6238 vectors, oathtool interop,
the window, replays (one thread and two), enrolment, secrets at rest, lockout, QR codes and
logs without secrets."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import shutil
import stat
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from conftest import store_contents
from token_agent.factors import FactorContext, FactorError, lockout, totp
from token_agent.outcome import Reason
from token_agent.secretbox import SecretError, SecretKeys
from token_agent.store import CredentialExists, Store

T0 = 1_700_000_000.0  # a fixed time: 2023-11-14 22:13:20 UTC (step 56666666, 20 s into it)


class Clock:
    """A clock the test moves."""

    def __init__(self, t: float = T0) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys(tmp_path) -> SecretKeys:
    return SecretKeys.load_or_create(tmp_path)


@pytest.fixture
def store(tmp_path, clock):
    s = Store.open(tmp_path / "s.db", clock=clock)
    yield s
    s.close()


@pytest.fixture
def ctx(store, keys, clock) -> FactorContext:
    return FactorContext(store, keys, issuer="Example Trust", clock=clock)


@pytest.fixture
def user(store):
    return store.add_user("alice")


def enrolled(ctx, user, **kw) -> totp.TotpEnrolment:
    """An enrolled and confirmed app (confirmed at the clock's time)."""
    e = totp.begin_enrol(ctx, user.id, **kw)
    r = totp.confirm_enrol(ctx, user.id, totp.code_at(e.secret, ctx.now(), e.digits, e.period,
                                                      e.algorithm), name=e.method.name)
    assert r.ok, r
    return e


def wrong_code(secret: str, now: float, digits: int = 6) -> str:
    """A well-formed code valid at no step near ``now``."""
    valid = {totp.code_at(secret, now + d * 30, digits) for d in range(-3, 4)}
    return next(c for c in (f"{i:0{digits}d}" for i in range(100)) if c not in valid)


# --------------------------------------------------------------------------- RFC 6238

RFC_SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
RFC_VECTORS = [  # RFC 6238 appendix B: time, SHA1, SHA256, SHA512 (8 digits, 30 s)
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]
RFC_CASES = [(t, alg, codes[i]) for t, *codes in RFC_VECTORS
             for i, alg in enumerate(("SHA1", "SHA256", "SHA512"))]


def b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("for_time, algorithm, expected", RFC_CASES,
                         ids=[f"{a}-{t}" for t, a, _ in RFC_CASES])
def test_rfc6238_vectors(for_time, algorithm, expected):
    secret = b32(RFC_SEEDS[algorithm])
    assert totp.code_at(secret, for_time, 8, 30, algorithm) == expected
    result = totp.match_step(secret, expected, now=for_time, last_step=-1, digits=8,
                             algorithm=algorithm)
    assert result == ("ok", for_time // 30)
    # the same code is a replay once its step was accepted
    assert totp.match_step(secret, expected, now=for_time, last_step=for_time // 30, digits=8,
                           algorithm=algorithm) == ("replayed", for_time // 30)


def test_match_step_malformed_and_normalised():
    secret = b32(RFC_SEEDS["SHA1"])
    code = totp.code_at(secret, 59, 8)
    assert totp.match_step(secret, code[:4] + " " + code[4:], now=59, last_step=-1,
                           digits=8) == ("ok", 1)
    for bad in ("", "1234567", "123456789", "9428708x", "٩٤٢٨٧٠٨٢", None, 94287082):
        assert totp.match_step(secret, bad, now=59, last_step=-1, digits=8) == ("malformed", None)
    assert totp.match_step(secret, "00000000", now=59, last_step=-1, digits=8) == ("wrong", None)


def test_match_step_compares_every_candidate(monkeypatch):
    secret = totp.new_secret()
    calls = []
    real = totp.equal

    def spy(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(totp, "equal", spy)
    now_code = totp.code_at(secret, T0)
    assert totp.match_step(secret, now_code, now=T0, last_step=-1)[0] == "ok"
    assert len(calls) == 3  # no early return on the match
    calls.clear()
    totp.match_step(secret, now_code, now=T0, last_step=-1, window=2)
    assert len(calls) == 5


def test_new_secret_is_160_bits():
    s = totp.new_secret()
    assert len(s) == 32 and len(base64.b32decode(s)) == 20
    assert s != totp.new_secret()


def test_bad_parameters():
    s = totp.new_secret()
    for kw in ({"digits": 5}, {"digits": 9}, {"period": 10}, {"period": 121},
               {"algorithm": "MD5"}):
        with pytest.raises(ValueError):
            totp.code_at(s, T0, **{"digits": 6, "period": 30, "algorithm": "SHA1", **kw})
    with pytest.raises(ValueError):
        totp.match_step(s, "123456", now=T0, last_step=-1, window=-1)


# --------------------------------------------------------------------------- oathtool


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def oathtool() -> str:
    """oathtool's path; fail in CI, skip elsewhere when missing."""
    path = shutil.which("oathtool")
    if path is None:
        message = "oathtool is not installed: sudo apt-get install -y oathtool"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def oath(tool: str, secret: str, at: float | None = None, digits: int = 6,
         algorithm: str = "SHA1", period: int = 30) -> str:
    args = [tool, f"--totp={algorithm.lower()}", "-b", "-d", str(digits), "-s", f"{period}s"]
    if at is not None:
        when = dt.datetime.fromtimestamp(int(at), dt.timezone.utc)
        args += ["--now", when.strftime("%Y-%m-%d %H:%M:%S UTC")]
    out = subprocess.run(args + [secret], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("algorithm", ["SHA1", "SHA256", "SHA512"])
def test_code_at_equals_oathtool(oathtool, algorithm):
    secret = b32(RFC_SEEDS[algorithm])
    for t in (59, 1111111109, 1234567890, 2000000000):
        assert totp.code_at(secret, t, 8, 30, algorithm) == oath(oathtool, secret, t, 8, algorithm)
    fresh = totp.new_secret()
    for t in (T0, T0 + 30, T0 + 12345):
        for digits in (6, 8):
            assert totp.code_at(fresh, t, digits, 30, algorithm) == \
                oath(oathtool, fresh, t, digits, algorithm)
    assert totp.code_at(fresh, T0, 6, 60, algorithm) == oath(oathtool, fresh, T0, 6, algorithm, 60)


@pytest.mark.parametrize("digits, algorithm", [(6, "SHA1"), (8, "SHA256"), (8, "SHA512")])
def test_oathtool_codes_verify(oathtool, ctx, user, clock, digits, algorithm):
    e = totp.begin_enrol(ctx, user.id, digits=digits, algorithm=algorithm)
    assert totp.confirm_enrol(ctx, user.id, oath(oathtool, e.secret, clock.t, digits, algorithm)).ok
    for later in (30, 95, 3600):
        clock.t = T0 + later
        r = totp.verify(ctx, user.id, oath(oathtool, e.secret, clock.t, digits, algorithm))
        assert r.ok and r.detail == {"time_step_offset": 0}, r


def test_oathtool_now_verifies_with_the_real_clock(oathtool, store, keys, user):
    import time

    ctx = FactorContext(store, keys, clock=time.time)
    e = totp.begin_enrol(ctx, user.id)
    assert totp.confirm_enrol(ctx, user.id, oath(oathtool, e.secret)).ok
    # a later step (the confirmed one is now a replay): oathtool's code one step ahead
    r = totp.verify(ctx, user.id, oath(oathtool, e.secret, time.time() + 30))
    assert r.ok and r.detail["time_step_offset"] in (0, 1), r


# --------------------------------------------------------------------------- window and replay


def test_window_plus_minus_one(ctx, user, clock):
    e = enrolled(ctx, user)
    clock.advance(300)
    s = e.secret
    for far in (-2, 2):
        r = totp.verify(ctx, user.id, totp.code_at(s, clock.t + far * 30))
        assert not r.ok and r.reason is Reason.WRONG_CODE and r.message.startswith("wrong code")
    r = totp.verify(ctx, user.id, totp.code_at(s, clock.t - 30))
    assert r.ok and r.detail == {"time_step_offset": -1}
    r = totp.verify(ctx, user.id, totp.code_at(s, clock.t + 30))
    assert r.ok and r.detail == {"time_step_offset": 1}
    # the step before, after a later one: a replay
    r = totp.verify(ctx, user.id, totp.code_at(s, clock.t))
    assert not r.ok and r.reason is Reason.CODE_REPLAYED


def test_replay_refused(ctx, user, clock):
    e = enrolled(ctx, user)
    clock.advance(30)
    code = totp.code_at(e.secret, clock.t)
    assert totp.verify(ctx, user.id, code).ok
    clock.advance(5)
    r = totp.verify(ctx, user.id, code)
    assert not r.ok and r.reason is Reason.CODE_REPLAYED
    assert r.message.startswith("this code was already used: wait for the next one")
    # the confirmation code itself was the first use
    e2 = totp.begin_enrol(ctx, user.id, name="phone 2")
    first = totp.code_at(e2.secret, clock.t)
    assert totp.confirm_enrol(ctx, user.id, first).ok
    r = totp.verify(ctx, user.id, first, name="phone 2")
    assert r.reason is Reason.CODE_REPLAYED
    clock.advance(30)
    assert totp.verify(ctx, user.id, totp.code_at(e2.secret, clock.t), name="phone 2").ok


def test_concurrent_verification_of_one_code(tmp_path, ctx, user, keys, clock):
    e = enrolled(ctx, user)
    stores = [Store.open(tmp_path / "s.db", clock=clock) for _ in range(2)]
    try:
        ctxs = [FactorContext(s, keys, clock=clock) for s in stores]
        for round_ in range(5):
            clock.advance(30)
            code = totp.code_at(e.secret, clock.t)
            barrier = threading.Barrier(2)
            results = [None, None]

            def run(i):
                barrier.wait()
                results[i] = totp.verify(ctxs[i], user.id, code)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert sum(r.ok for r in results) == 1, (round_, results)
            assert [r.reason for r in results if not r.ok] == [Reason.CODE_REPLAYED]
    finally:
        for s in stores:
            s.close()


def test_conditional_update_refuses_a_stale_step(ctx, user, clock, store, monkeypatch):
    """Even if last_step were read before another process advanced it, the UPDATE's
    condition refuses the second success."""
    e = enrolled(ctx, user)
    clock.advance(30)
    code = totp.code_at(e.secret, clock.t)
    real = totp.match_step

    def stale_read(secret, code, *, now, last_step, **kw):
        return real(secret, code, now=now, last_step=-1, **kw)  # as if read earlier

    assert totp.verify(ctx, user.id, code).ok
    monkeypatch.setattr(totp, "match_step", stale_read)
    r = totp.verify(ctx, user.id, code)
    assert not r.ok and r.reason is Reason.CODE_REPLAYED


# --------------------------------------------------------------------------- enrolment


def test_enrolment_uri(ctx, user):
    e = totp.begin_enrol(ctx, user.id, digits=8, period=60, algorithm="SHA256")
    u = urlsplit(e.uri)
    assert (u.scheme, u.netloc) == ("otpauth", "totp")
    assert unquote(u.path) == "/Example Trust:alice"
    q = {k: v[0] for k, v in parse_qs(u.query).items()}
    assert q == {"secret": e.secret, "issuer": "Example Trust", "digits": "8", "period": "60",
                 "algorithm": "SHA256"}
    default = urlsplit(totp.begin_enrol(ctx, user.id, name="other").uri)
    q = {k: v[0] for k, v in parse_qs(default.query).items()}
    assert (q["digits"], q["period"], q["algorithm"]) == ("6", "30", "SHA1")
    assert e.method.confirmed is False and e.method.kind == "totp"
    assert e.secret not in repr(e) and "secret" not in e.to_json(include_secret=False)
    assert "uri" not in e.to_json(include_secret=False)
    assert e.to_json()["secret"] == e.secret
    ev = [x for x in ctx.store.list_events(user.id, kind="enrol.totp")]
    assert ev and ev[0].outcome == "started"


def test_not_usable_before_confirmation(ctx, user, clock):
    e = totp.begin_enrol(ctx, user.id)
    r = totp.verify(ctx, user.id, totp.code_at(e.secret, clock.t))
    assert not r.ok and r.reason is Reason.NO_CREDENTIAL
    assert "no authenticator app is set up" in r.message
    assert ctx.store.preferred_method(user.id) is None


def test_no_app_at_all(ctx, user):
    r = totp.verify(ctx, user.id, "123456")
    assert not r.ok and r.reason is Reason.NO_CREDENTIAL and r.method is None
    with pytest.raises(FactorError) as exc:
        totp.confirm_enrol(ctx, user.id, "123456")
    assert exc.value.reason is Reason.NO_CREDENTIAL
    assert "token-agent enrol totp" in exc.value.message


def test_wrong_confirmation_then_right(ctx, user, clock):
    e = totp.begin_enrol(ctx, user.id)
    r = totp.confirm_enrol(ctx, user.id, wrong_code(e.secret, clock.t))
    assert not r.ok and r.reason is Reason.WRONG_CODE and r.tries_left == 9
    assert not ctx.store.get_method(e.method.id).confirmed
    r = totp.confirm_enrol(ctx, user.id, totp.code_at(e.secret, clock.t))
    assert r.ok and r.method.confirmed and r.method.preferred
    assert [x.outcome for x in ctx.store.list_events(user.id, kind="enrol.totp")
            if x.outcome == "success"] == ["success"]
    assert ctx.store.preferred_method(user.id).id == e.method.id
    clock.advance(30)
    assert totp.verify(ctx, user.id, totp.code_at(e.secret, clock.t)).ok
    # nothing left to confirm
    with pytest.raises(FactorError):
        totp.confirm_enrol(ctx, user.id, totp.code_at(e.secret, clock.t))


def test_second_app_does_not_take_the_preference(ctx, user, clock):
    first = enrolled(ctx, user)
    second = enrolled(ctx, user, name="tablet")
    assert ctx.store.preferred_method(user.id).id == first.method.id
    assert [m.name for m in totp.list_(ctx, user.id)] == ["authenticator app", "tablet"]
    assert second.method.id != first.method.id


def test_reenrolment_replaces_a_pending_one(ctx, user, clock):
    old = totp.begin_enrol(ctx, user.id)
    new = totp.begin_enrol(ctx, user.id)
    assert new.secret != old.secret
    assert len(totp.list_(ctx, user.id)) == 1
    r = totp.confirm_enrol(ctx, user.id, totp.code_at(old.secret, clock.t))
    assert not r.ok
    assert totp.confirm_enrol(ctx, user.id, totp.code_at(new.secret, clock.t)).ok
    with pytest.raises(CredentialExists):
        totp.begin_enrol(ctx, user.id)
    with pytest.raises(CredentialExists):
        totp.begin_enrol(ctx, user.id, name="AUTHENTICATOR APP")


def test_remove(ctx, user, clock):
    enrolled(ctx, user)
    enrolled(ctx, user, name="tablet")
    with pytest.raises(FactorError) as exc:
        totp.remove(ctx, user.id)
    assert exc.value.reason is Reason.AMBIGUOUS
    assert totp.remove(ctx, user.id, "tablet").name == "tablet"
    assert totp.remove(ctx, user.id).name == "authenticator app"
    assert totp.list_(ctx, user.id) == []
    with pytest.raises(FactorError) as exc:
        totp.remove(ctx, user.id)
    assert exc.value.reason is Reason.NO_CREDENTIAL
    assert totp.verify(ctx, user.id, "123456").reason is Reason.NO_CREDENTIAL


def test_several_apps(ctx, user, clock):
    a = enrolled(ctx, user)
    b = enrolled(ctx, user, name="tablet")
    clock.advance(30)
    r = totp.verify(ctx, user.id, totp.code_at(b.secret, clock.t))
    assert r.ok and r.method.name == "tablet"
    # no failure was counted against the other app
    assert lockout.state(ctx.store, lockout.method_scope(a.method.id)).failures == 0
    # a wrong code counts one failure against each
    r = totp.verify(ctx, user.id, wrong_code(a.secret, clock.t))
    assert not r.ok and r.reason is Reason.WRONG_CODE and r.tries_left == 9
    for m in (a, b):
        assert lockout.state(ctx.store, lockout.method_scope(m.method.id)).failures == 1
    # a replayed code of one app counts against that app only
    r = totp.verify(ctx, user.id, totp.code_at(b.secret, clock.t))
    assert r.reason is Reason.CODE_REPLAYED and r.method.name == "tablet"
    assert lockout.state(ctx.store, lockout.method_scope(a.method.id)).failures == 1
    # by name: the other app's code does not count
    r = totp.verify(ctx, user.id, totp.code_at(a.secret, clock.t), name="tablet")
    assert not r.ok and r.reason is Reason.WRONG_CODE
    assert totp.verify(ctx, user.id, totp.code_at(a.secret, clock.t), name="Authenticator App").ok
    r = totp.verify(ctx, user.id, "123456", name="nope")
    assert r.reason is Reason.NO_CREDENTIAL and "'nope'" in r.message


def test_a_locked_app_is_not_matched_through_another(ctx, user, clock):
    a = enrolled(ctx, user)
    b = enrolled(ctx, user, name="tablet")
    for _ in range(10):
        totp.verify(ctx, user.id, wrong_code(a.secret, clock.t), name=a.method.name)
    clock.advance(30)
    # a's right code, without a name: a is locked, so only b is tried (and fails)
    r = totp.verify(ctx, user.id, totp.code_at(a.secret, clock.t))
    assert not r.ok and r.method.name == "tablet" and r.reason is Reason.WRONG_CODE
    assert totp.verify(ctx, user.id, totp.code_at(b.secret, clock.t)).ok


# --------------------------------------------------------------------------- secrets at rest


def test_secret_not_in_the_database_file(tmp_path, ctx, user, clock, store):
    e = enrolled(ctx, user)
    clock.advance(30)
    assert totp.verify(ctx, user.id, totp.code_at(e.secret, clock.t)).ok
    raw = base64.b32decode(e.secret)
    blobs = store_contents(store)  # the file and its -wal, or every row on PostgreSQL
    assert blobs
    for needle in (e.secret.encode(), e.secret.lower().encode(), raw,
                   e.secret.encode("utf-16-le")):
        assert needle not in blobs
    with store.connection("read the secret as stored") as conn:
        enc = bytes(conn.execute("SELECT secret_enc FROM totp_credentials").fetchone()[0])
    assert raw not in enc and e.secret.encode() not in enc


def test_ciphertext_moved_to_another_row_does_not_decrypt(ctx, user, keys, clock, store):
    a = enrolled(ctx, user)
    b = enrolled(ctx, user, name="tablet")
    with store.transaction(), store.connection("move a ciphertext") as conn:
        enc = bytes(conn.execute("SELECT secret_enc FROM totp_credentials WHERE method_id = ?",
                                 (a.method.id,)).fetchone()[0])
        with pytest.raises(SecretError):
            keys.decrypt(enc, aad=f"totp:{b.method.id}".encode())
        assert keys.decrypt(enc, aad=f"totp:{a.method.id}".encode()) == a.secret.encode()
        conn.execute("UPDATE totp_credentials SET secret_enc = ? WHERE method_id = ?",
                     (enc, b.method.id))
    clock.advance(30)
    r = totp.verify(ctx, user.id, totp.code_at(a.secret, clock.t), name="tablet")
    assert not r.ok and r.reason is Reason.VERIFICATION_FAILED
    assert "cannot be read" in r.message and a.secret not in r.message


# --------------------------------------------------------------------------- lockout


def test_lockout(ctx, user, clock):
    e = enrolled(ctx, user)
    clock.advance(30)
    bad = wrong_code(e.secret, clock.t)
    r = totp.verify(ctx, user.id, bad)
    assert r.tries_left == 9 and r.message.endswith("9 tries left")
    for i in range(8):
        r = totp.verify(ctx, user.id, bad)
    assert r.tries_left == 1 and r.message.endswith("1 try left")
    r = totp.verify(ctx, user.id, bad)  # the 10th
    assert not r.ok and r.tries_left == 0 and r.locked_until == clock.t + 60
    assert "locked" in r.message
    r = totp.verify(ctx, user.id, totp.code_at(e.secret, clock.t))  # the 11th, right code
    assert not r.ok and r.reason is Reason.METHOD_LOCKED
    # the lock runs out; the next lockout lasts twice as long
    clock.advance(61)
    bad = wrong_code(e.secret, clock.t)
    for _ in range(10):
        r = totp.verify(ctx, user.id, bad)
    assert r.locked_until == clock.t + 120
    assert totp.verify(ctx, user.id, totp.code_at(e.secret, clock.t)).reason is Reason.METHOD_LOCKED
    # a success resets the count and the level
    clock.advance(121)
    assert totp.verify(ctx, user.id, totp.code_at(e.secret, clock.t)).ok
    bad = wrong_code(e.secret, clock.t)
    assert totp.verify(ctx, user.id, bad).tries_left == 9
    for _ in range(9):
        r = totp.verify(ctx, user.id, bad)
    assert r.locked_until == clock.t + 60
    kinds = [(x.kind, x.outcome) for x in ctx.store.list_events(user.id, limit=1000)]
    assert ("lockout.totp", "locked") in kinds and ("verify.totp", "refused") in kinds


# --------------------------------------------------------------------------- QR codes


def test_qr_files(tmp_path):
    uri = totp.provisioning_uri(totp.new_secret(), "alice", "Example Trust")
    png = totp.write_qr(uri, tmp_path / "qr.png")
    svg = totp.write_qr(uri, tmp_path / "qr.svg")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    root = ET.fromstring(svg.read_bytes())
    assert root.tag.endswith("svg")
    for p in (png, svg):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert sorted(x.name for x in tmp_path.iterdir()) == ["qr.png", "qr.svg"]  # no tmp left
    # an existing file is replaced, and tightened
    (tmp_path / "old.png").write_bytes(b"x")
    os.chmod(tmp_path / "old.png", 0o644)
    assert stat.S_IMODE(totp.write_qr(uri, tmp_path / "old.png").stat().st_mode) == 0o600
    with pytest.raises(ValueError):
        totp.write_qr(uri, tmp_path / "qr.jpg")
    if shutil.which("zbarimg"):
        out = subprocess.run(["zbarimg", "--quiet", "--raw", str(png)], capture_output=True,
                             text=True, timeout=20)
        assert out.stdout.strip() == uri
    # else: no decoder here, the encoding itself is segno's


def test_qr_terminal():
    uri = totp.provisioning_uri(totp.new_secret(), "alice", "Example Trust")
    text = totp.qr_terminal(uri)
    lines = text.strip("\n").splitlines()
    assert len(lines) > 10 and len({len(line) for line in lines}) == 1


# --------------------------------------------------------------------------- logs


def test_no_secret_in_logs_or_audit(ctx, user, clock, caplog):
    with caplog.at_level(logging.DEBUG):
        e = totp.begin_enrol(ctx, user.id)
        first = totp.code_at(e.secret, clock.t)
        totp.confirm_enrol(ctx, user.id, wrong_code(e.secret, clock.t))
        assert totp.confirm_enrol(ctx, user.id, first).ok
        clock.advance(30)
        second = totp.code_at(e.secret, clock.t)
        assert totp.verify(ctx, user.id, second).ok
        totp.verify(ctx, user.id, second)
    assert caplog.records  # the factor does log what happened
    needles = [e.secret, e.secret.lower(), first, second]
    for rec in caplog.records:
        text = rec.getMessage() + repr(rec.args)
        for n in needles:
            assert n not in text, rec
    for ev in ctx.store.list_events(user.id, limit=1000):
        text = repr((ev.kind, ev.outcome, ev.detail))
        for n in needles:
            assert n not in text, ev
