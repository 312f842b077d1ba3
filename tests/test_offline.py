"""Offline logins at an organisation's workstation (token_agent/organisation/: cache.py,
totpcache.py, offline.py; store/wscache.py; the policy's [offline] max_hours): the bundle the
server hands out, the encrypted cache, key logins with the virtual key through python-fido2's
HID framing, authenticator-app codes checked offline (computed independently by oathtool),
card logins with an in-process virtual card, and every refusal."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from token_agent.agent import Agent
from token_agent.ceremonies.key import enrol_key
from token_agent.factors import totp
from token_agent.organisation import offline, totpcache
from token_agent.organisation.cache import CacheError, OfflineCache
from token_agent.outcome import Factor, Reason
from token_agent.policy import DEFAULT_POLICY, PolicyError, parse_policy
from token_agent.store import Store
from token_agent.store.wscache import FILENAME, WorkstationCache

from key_helpers import PIN, Keyring
from offline_helpers import Interaction, oathtool

T0 = 1_765_000_000.0  # a fixed "now" for the server's bundle
HOUR = 3600.0


@pytest.fixture
def server(tmp_path):
    """The organisation's side: a store with alice (internal: MFA enforced) and bob."""
    data = tmp_path / "server"
    data.mkdir(mode=0o700)
    store = Store.open(data / "store.db")
    agent = Agent.open(data_dir=data, store=store, policy=DEFAULT_POLICY, clock=lambda: T0)
    store.add_user("alice", display_name="Dr Alice Smith")
    store.add_user("bob", display_name="Bob Jones")
    yield agent
    agent.close()


@pytest.fixture
def keys(tmp_path):
    return Keyring(tmp_path)


@pytest.fixture
def cache(tmp_path):
    with OfflineCache.open(tmp_path / "ws" / "organisation") as c:
        yield c


def enrolled(server, keys, user="alice"):
    _, key, path = keys.new()
    result = enrol_key(server.store, key, user, pin_provider=lambda: PIN)
    return key, result, path


def key_login(cache, key, user="alice", now=T0 + HOUR, pin=PIN, **kw):
    answers = kw.pop("answers", ())
    return offline.login(cache, user, primary="key", interaction=Interaction(*answers),
                         key=key, key_pin=lambda: pin, now=now, **kw)


def outbox(cache):
    return [(e["kind"], e["outcome"]) for e in cache.pending(1000)]


# --------------------------------------------------------------------------- policy


def test_offline_max_hours_is_parsed_validated_and_shown():
    assert DEFAULT_POLICY.offline.max_hours == 12
    assert DEFAULT_POLICY.to_json()["offline"] == {"max_hours": 12}
    assert parse_policy("[offline]\nmax_hours = 0\n").offline.max_hours == 0
    assert parse_policy("[offline]\nmax_hours = 168\n").offline.max_hours == 168
    for bad, words in (("169", "out of range: allowed 0 to 168 hours"),
                       ("-1", "out of range"), ('"12"', "must be a whole number"),
                       ("1.5", "must be a whole number"), ("true", "must be a whole number")):
        with pytest.raises(PolicyError) as e:
            parse_policy(f"[offline]\nmax_hours = {bad}\n")
        assert "offline.max_hours" in str(e.value) and words in str(e.value)
    with pytest.raises(PolicyError) as e:
        parse_policy("[offline]\nmax_hour = 3\n")
    assert "max_hours" in str(e.value)  # the misspelling's suggestion


def test_policy_show_prints_offline_and_its_output_parses_back(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[offline]\nmax_hours = 24\n")
    policy.chmod(0o600)
    env = {**os.environ, "TOKEN_AGENT_POLICY": str(policy),
           "TOKEN_AGENT_DATA_DIR": str(tmp_path / "data")}
    env.pop("TOKEN_AGENT_STORE_URL", None)
    run = [sys.executable, "-m", "token_agent"]
    shown = subprocess.run(run + ["policy", "show"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "[offline]\nmax_hours = 24" in shown.stdout
    assert parse_policy(shown.stdout).offline.max_hours == 24
    policy.write_text("[offline]\nmax_hours = 500\n")
    checked = subprocess.run(run + ["policy", "check", str(policy)], env=env,
                             capture_output=True, text=True)
    assert checked.returncode == 2 and "offline.max_hours" in checked.stdout + checked.stderr


# --------------------------------------------------------------------------- the bundle


def test_the_bundle_holds_what_an_offline_login_needs_and_no_secret(server, keys):
    _, result, _ = enrolled(server, keys)
    alice = server.store.get_user("alice")
    bundle = offline.bundle_for(server, "alice", "ws-1")
    assert bundle["version"] == offline.BUNDLE_VERSION and bundle["workstation"] == "ws-1"
    assert bundle["issued_at"] == T0 and bundle["expires_at"] == T0 + 12 * HOUR
    assert bundle["user"]["id"] == alice.id and bundle["user"]["username"] == "alice"
    assert bundle["user"]["user_class"] == "internal" and bundle["user"]["disabled"] is False
    assert base64.b64decode(bundle["user"]["user_handle"]) == alice.user_handle
    [cred] = bundle["credentials"]
    stored = server.store.get_fido_credential(result.credential_id)
    assert cred["credential_id"] == stored.credential_id.hex()
    assert base64.b64decode(cred["public_key"]) == stored.public_key
    assert cred["sign_count"] == stored.sign_count and cred["rp_id"] == stored.rp_id
    assert cred["flagged"] is False and bundle["cards"] == []
    decisions = bundle["decisions"]
    # the policy's own answers: a key with its PIN satisfies MFA, a key without it does not
    assert decisions["key_uv"]["mfa_required"] is False and decisions["key_uv"]["enforced"]
    assert decisions["key"]["mfa_required"] is True
    assert bundle["settings"] == {"rp_id": stored.rp_id, "user_verification": "preferred"}
    assert "secret" not in repr(bundle).lower() and "hash" not in repr(bundle).lower()


def test_max_hours_zero_makes_every_bundle_unusable(server, keys, cache):
    key, _, _ = enrolled(server, keys)
    server.policy = parse_policy("[offline]\nmax_hours = 0\n")
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    out = key_login(cache, key, now=T0 + 1)
    assert not out.ok and out.reason is Reason.SERVER_UNAVAILABLE
    assert out.message == offline.OFFLINE_REFUSAL


# --------------------------------------------------------------------------- the cache


def test_the_cache_is_encrypted_at_rest_and_private(server, keys, cache, tmp_path):
    _, result, _ = enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    assert cache.bundle("ALICE")["user"]["username"] == "alice"  # names are case-insensitive
    org = tmp_path / "ws" / "organisation"
    files = sorted(p.name for p in org.iterdir())
    assert FILENAME in files and "secrets.key" in files
    for p in org.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(org.stat().st_mode) == 0o700
    raw = b"".join(p.read_bytes() for p in org.iterdir() if p.name != "secrets.key")
    alice = server.store.get_user("alice")
    for clear in (b"alice", b"Alice Smith", result.credential_id,
                  result.credential_id.hex().encode(),
                  alice.id.encode(), alice.user_handle):
        assert clear not in raw, clear


def test_a_bundle_moved_to_another_users_row_does_not_decrypt(server, keys, cache):
    enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    cache.store_bundle(offline.bundle_for(server, "bob", "ws-1"), now=T0)
    a, b = cache.user_key("alice"), cache.user_key("bob")
    blob, _ = cache.db.get_bundle(a)
    cache.db.replace_bundle_blob(b, blob)  # someone with write access swaps the rows
    with pytest.raises(CacheError):
        cache.bundle("bob")


def test_another_workstations_key_file_cannot_read_the_cache(server, keys, cache, tmp_path):
    enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{cache.db.path}{suffix}").exists():
            shutil.copy(f"{cache.db.path}{suffix}", other / f"{FILENAME}{suffix}")
    with OfflineCache.open(other) as stolen:  # a new key file: the copy is unreadable
        assert stolen.db.get_bundle(stolen.user_key("alice")) is None
        with pytest.raises(CacheError):
            stolen._open("bundle", cache.user_key("alice"),
                          stolen.db.get_bundle(cache.user_key("alice"))[0])


def test_a_transaction_that_fails_leaves_nothing(cache):
    with pytest.raises(RuntimeError):
        with cache.transaction():
            cache.queue({"kind": "login"}, now=T0)
            cache.db.put_meta("x", b"1")
            raise RuntimeError("crash")
    assert cache.pending_count() == 0 and cache.db.get_meta("x") is None


def test_a_process_killed_mid_transaction_leaves_the_file_as_before(cache, tmp_path):
    cache.queue({"kind": "login", "n": 1}, now=T0)
    script = (
        "import os, sys\n"
        "from token_agent.store.wscache import WorkstationCache\n"
        "db = WorkstationCache.open(sys.argv[1])\n"
        "with db.transaction():\n"
        "    db.outbox_add(b'x' * 100000, now=1.0)\n"
        "    db.put_meta('half', b'written')\n"
        "    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(cache.db.path)])
    assert proc.returncode == -9
    with WorkstationCache.open(cache.db.path) as again:
        assert again.outbox_count() == 1 and again.get_meta("half") is None
    assert [e["n"] for e in cache.pending()] == [1]


def test_a_file_that_is_not_a_cache_is_refused_untouched(tmp_path):
    from token_agent.store import StoreFileError

    other = tmp_path / FILENAME
    import sqlite3
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE patients (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreFileError) as e:
        WorkstationCache.open(other)
    assert "not token-agent's offline cache" in str(e.value)


# --------------------------------------------------------------------------- key logins


def test_offline_key_login_within_the_window(server, keys, cache):
    key, result, _ = enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    before = cache.bundle("alice")["credentials"][0]["sign_count"]
    out = key_login(cache, key, now=T0 + 11 * HOUR)
    assert out.ok and out.user == "alice" and out.method == "key", out
    assert out.factors == (Factor.POSSESSION, Factor.KNOWLEDGE) and out.detail["offline"] is True
    after = cache.bundle("alice")["credentials"][0]["sign_count"]
    assert after == out.detail["sign_count"] > before
    events = cache.pending()
    assert [(e["kind"], e["outcome"]) for e in events] == [("login.key", "success"),
                                                          ("login", "success")]
    assert events[0]["detail"]["sign_count"] == after  # for the server's reconciliation
    assert set(events[0]["detail"]["assertion"]) == {"authenticator_data", "client_data",
                                                     "signature"}  # its proof
    assert events[0]["credential_id"] == result.credential_id.hex()
    assert events[0]["at"] == T0 + 11 * HOUR and events[0]["seq"] < events[1]["seq"]
    # the server's store was not touched: the workstation has no access to it
    assert server.store.get_fido_credential(result.credential_id).sign_count == before


def test_offline_key_login_is_refused_after_the_window(server, keys, cache):
    key, _, _ = enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    out = key_login(cache, key, now=T0 + 12 * HOUR + 1)
    assert not out.ok and out.reason is Reason.SERVER_UNAVAILABLE
    assert out.message == "The organisation's server cannot be reached; use your key or card."
    assert outbox(cache) == [("login", "failure")]
    assert cache.pending()[0]["detail"]["why"] == "offline-window-ended"


def test_a_clock_turned_back_before_the_online_login_is_refused(server, keys, cache):
    key, _, _ = enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    out = key_login(cache, key, now=T0 - HOUR)
    assert not out.ok and out.detail["why"] == "clock-before-online-login"


def test_a_user_not_logged_in_here_online_is_refused(server, keys, cache):
    key, _, _ = enrolled(server, keys)
    enrol_key(server.store, key, "bob", pin_provider=lambda: PIN)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    out = key_login(cache, key, user="bob")  # bob holds a key, but never logged in here
    assert not out.ok and out.message == offline.OFFLINE_REFUSAL
    out = key_login(cache, key, user="mallory")
    assert not out.ok and out.message == offline.OFFLINE_REFUSAL
    assert [e["detail"]["why"] for e in cache.pending()] == ["not-cached", "not-cached"]


@pytest.mark.parametrize("primary", ["password", "totp", "push", None])
def test_a_password_or_any_other_method_is_refused(server, keys, cache, primary):
    enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    asked = Interaction("correct horse")
    out = offline.login(cache, "alice", primary=primary, interaction=asked, now=T0 + 60)
    assert not out.ok and out.message == offline.OFFLINE_REFUSAL
    assert asked.prompts == []  # nothing was asked: there is nothing to check it against


def test_another_users_key_is_refused(server, keys, cache):
    enrolled(server, keys)
    bobs_key, _, _ = enrolled(server, keys, user="bob")
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    out = key_login(cache, bobs_key)
    assert not out.ok and out.reason is Reason.UNKNOWN_CREDENTIAL


def test_a_wrong_pin_fails_and_a_suspended_key_is_refused(server, keys, cache):
    key, result, _ = enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    out = key_login(cache, key, pin="000000")
    assert not out.ok and out.reason is Reason.WRONG_PIN
    server.store.flag_fido_credential(result.credential_id, "lost")
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    out = key_login(cache, key)
    assert not out.ok and out.reason is Reason.CREDENTIAL_FLAGGED
    assert out.message == "Authentication failed."  # as online, before a first factor


def test_a_cloned_key_offline_is_caught_by_the_cached_counter(server, keys, cache, tmp_path):
    key, result, path = enrolled(server, keys)
    clone_state = tmp_path / "clone.json"
    shutil.copy(path, clone_state)
    _, clone, _ = keys.new(state=clone_state, pin=None)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    assert key_login(cache, key).ok
    out = key_login(cache, clone, now=T0 + 2 * HOUR)  # same counter as the original's last
    assert not out.ok and out.reason is Reason.CLONE_SUSPECTED
    assert cache.bundle("alice")["credentials"][0]["flagged"] is True
    assert ("key.clone-suspected", "refused") in outbox(cache)
    assert not key_login(cache, key, now=T0 + 3 * HOUR).ok  # suspended here until online


def test_a_newer_bundle_keeps_the_counter_used_offline(server, keys, cache):
    key, _, _ = enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    used = key_login(cache, key).detail["sign_count"]
    # the server has not heard of it yet (the outbox was not delivered): its bundle is older
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0 + 2 * HOUR)
    assert cache.bundle("alice")["credentials"][0]["sign_count"] == used


# --------------------------------------------------------------------------- TOTP


@pytest.fixture
def alice_totp(server):
    """alice with a confirmed authenticator app (the secret as the person's app has it)."""
    ctx = server.factors()
    alice = server.store.get_user("alice")
    enrolment = totp.begin_enrol(ctx, alice.id)
    assert totp.confirm_enrol(ctx, alice.id, oathtool(enrolment.secret, T0)).ok
    return enrolment.secret


def test_totp_hashes_cover_the_window_and_hide_the_secret(server, alice_totp):
    alice = server.store.get_user("alice")
    data = totpcache.hashes_for(server, alice, now=T0 + 30)
    [app] = data["apps"]
    steps = len(base64.b64decode(app["hashes"])) // totpcache.HASH_LEN
    # from the step after the one used at enrolment to 12 hours ahead (and one step of slack)
    assert app["first_step"] == int(T0 // 30) + 1
    assert steps == int((T0 + 30 + 12 * HOUR) // 30) + 1 - app["first_step"] + 1
    assert alice_totp not in repr(data)
    assert app["iterations"] == totpcache.ITERATIONS and len(base64.b64decode(app["salt"])) == 16
    ms = totpcache.measure(20)
    assert 0.2 < ms < 20, ms  # slow on purpose (ITERATIONS), not unusably so


def test_totp_matching_single_use_and_earlier_steps_consumed(server, alice_totp, cache):
    alice = server.store.get_user("alice")
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    cache.store_totp("alice", totpcache.hashes_for(server, alice, now=T0), now=T0)
    [app] = cache.totp("alice")["apps"]
    now = T0 + HOUR
    code = oathtool(alice_totp, now)
    assert totpcache.match(app, code, now=now, last_step=-1) == (totpcache.OK, int(now // 30))
    assert totpcache.match(app, "000000" if code != "000000" else "111111", now=now,
                           last_step=-1)[0] == totpcache.WRONG
    assert totpcache.match(app, "12345", now=now, last_step=-1)[0] == totpcache.MALFORMED
    assert cache.consume_totp_step("alice", app["method"], int(now // 30))
    assert not cache.consume_totp_step("alice", app["method"], int(now // 30))  # single use
    earlier = now - 60  # an older code, never used, is consumed too
    assert not cache.consume_totp_step("alice", app["method"], int(earlier // 30))
    assert totpcache.match(app, oathtool(alice_totp, now), now=now,
                           last_step=cache.totp_last_step("alice", app["method"]))[0] \
        == totpcache.REPLAYED
    # a code of a step outside the cached window is wrong, whatever the app says
    later = T0 + 13 * HOUR
    assert totpcache.match(app, oathtool(alice_totp, later), now=later, last_step=-1)[0] \
        == totpcache.WRONG


TOTP_ONLY = '[methods]\nallowed = ["totp"]\n'  # a key, even with its PIN, is not enough


def test_offline_login_with_a_key_and_a_totp_code(server, keys, alice_totp, cache):
    server.policy = parse_policy(TOTP_ONLY)
    key, _, _ = enrolled(server, keys)
    alice = server.store.get_user("alice")
    bundle = offline.bundle_for(server, "alice", "ws-1")
    assert bundle["decisions"]["key_uv"]["mfa_required"] and "totp" in \
        bundle["decisions"]["key_uv"]["usable_methods"]
    cache.store_bundle(bundle, now=T0)
    # without the TOTP hashes: refused, the second factor cannot be checked
    out = key_login(cache, key, answers=["000000"])
    assert not out.ok and out.reason is Reason.SERVER_UNAVAILABLE
    assert "authenticator-app code" in out.message
    cache.store_totp("alice", totpcache.hashes_for(server, alice, now=T0), now=T0)
    now = T0 + 2 * HOUR
    code = oathtool(alice_totp, now)
    out = key_login(cache, key, now=now, answers=[code])
    assert out.ok and out.detail["second"] == "totp" and out.method == "key+totp", out
    assert set(out.factors) == {Factor.POSSESSION, Factor.KNOWLEDGE}
    # the same code again (and an earlier one): refused
    assert key_login(cache, key, now=now + 5, answers=[code]).reason is Reason.CODE_REPLAYED
    earlier = oathtool(alice_totp, now - 30)
    assert key_login(cache, key, now=now + 5, answers=[earlier]).reason is Reason.CODE_REPLAYED
    wrong = "000000" if code != "000000" else "999999"
    assert key_login(cache, key, now=now + 40, answers=[wrong]).reason is Reason.WRONG_CODE
    ok = [e for e in cache.pending(1000)
          if e["kind"] == "verify.totp" and e["outcome"] == "success"]
    assert [e["detail"]["step"] for e in ok] == [int(now // 30)]
    assert code not in repr(cache.pending(1000))  # codes never reach the audit trail


# --------------------------------------------------------------------------- cards


PIN_CARD = "1234"
ALICE_UUID = "555123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from simulators.card.issuance import issue_card
    from simulators.card.pki import init_ca

    directory = tmp_path_factory.mktemp("pki")
    ca = directory / "ca"
    init_ca(ca)
    cards = {}
    for key, name, uuid, kw in (("alice", "Dr Alice Smith", ALICE_UUID, {}),
                                ("revoked", "Dr Lost Card", "555000000002",
                                 {"variant": "revoked"}),
                                ("untrusted", "Dr Fake Card", ALICE_UUID,
                                 {"variant": "untrusted"})):
        cards[key] = directory / f"{key}.card"
        issue_card(ca, name=name, uuid=uuid, pin=PIN_CARD, out=cards[key], **kw)
    return {"ca": ca, "cards": cards}


def card_session(pki, tmp_path, which):
    from drivers.pcsc.piv import PivSession
    from simulators.card.card import InProcessCardConnection, VirtualCard

    target = tmp_path / f"{which}.card"
    shutil.copyfile(pki["cards"][which], target)
    os.chmod(target, 0o600)
    connection = InProcessCardConnection(VirtualCard.load(target))
    connection.connect()
    return PivSession(connection)


@pytest.fixture
def card_server(server, pki):
    from simulators.card.pki import issuing_cert_path, root_cert_path
    from token_agent.ceremonies.card import set_card_setting

    set_card_setting(server.store, "card_trust_anchors", [str(root_cert_path(pki["ca"]))])
    set_card_setting(server.store, "card_intermediates", [str(issuing_cert_path(pki["ca"]))])
    alice = server.store.get_user("alice")
    server.store.add_card_identity(alice.id, uuid=ALICE_UUID, holder_name="Dr Alice Smith")
    server.store.add_user("lost", display_name="Dr Lost Card")
    server.store.add_card_identity(server.store.get_user("lost").id, uuid="555000000002",
                                   holder_name="Dr Lost Card")
    return server


def card_login(cache, session, user="alice", now=None, pin=PIN_CARD):
    return offline.login(cache, user, primary="card", interaction=Interaction(),
                         card_session=session, card_pin=lambda: pin,
                         now=time.time() if now is None else now)


def test_offline_card_login_with_the_cached_trust(card_server, pki, cache, tmp_path):
    now = time.time()  # the card's certificate dates are real ones
    bundle = offline.bundle_for(card_server, "alice", "ws-1", now=now)
    assert bundle["cards"] == [{"uuid": ALICE_UUID, "name": bundle["cards"][0]["name"],
                                "holder_name": "Dr Alice Smith", "flagged": False,
                                "flag_reason": None}]
    assert bundle["decisions"]["card"]["mfa_required"] is False
    cache.store_bundle(bundle, now=now)
    # no trust cached yet: refused before the PIN is asked
    out = card_login(cache, card_session(pki, tmp_path, "alice"), now=now + 60,
                     pin=None)
    assert not out.ok and out.reason is Reason.CERT_UNTRUSTED and "use your key" in out.message
    trust = offline.trust_for(card_server)
    assert all("-----BEGIN CERTIFICATE" in p for p in trust["settings"]["card_trust_anchors"])
    cache.store_trust(trust)
    out = card_login(cache, card_session(pki, tmp_path, "alice"), now=now + 60)
    assert out.ok and out.user == "alice" and out.method == "card", out
    assert out.factors == (Factor.POSSESSION, Factor.KNOWLEDGE)
    assert [k for k, o in outbox(cache)][-2:] == ["login.card", "login"]
    # a wrong PIN, a card from another CA with alice's UUID: refused
    out = card_login(cache, card_session(pki, tmp_path, "alice"), now=now + 90, pin="9999")
    assert not out.ok and out.reason is Reason.WRONG_PIN
    out = card_login(cache, card_session(pki, tmp_path, "untrusted"), now=now + 90)
    assert not out.ok and out.reason is Reason.CERT_UNTRUSTED


def test_offline_revoked_card_is_refused(card_server, pki, cache, tmp_path):
    now = time.time()
    cache.store_bundle(offline.bundle_for(card_server, "lost", "ws-1", now=now), now=now)
    cache.store_trust(offline.trust_for(card_server))
    out = card_login(cache, card_session(pki, tmp_path, "revoked"), user="lost", now=now + 60)
    assert not out.ok and out.reason is Reason.CERT_REVOKED, out


def test_store_login_result_keeps_the_bundle(server, keys, cache):
    key, _, _ = enrolled(server, keys)
    assert offline.store_login_result(cache, None) == []
    assert offline.store_login_result(cache, offline.bundle_for(server, "alice", "ws-1"),
                                      now=T0) == []
    assert key_login(cache, key).ok


def test_an_altered_cache_entry_refuses_the_login_cleanly(server, keys, cache):
    key, _, _ = enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    k = cache.user_key("alice")
    blob, _ = cache.db.get_bundle(k)
    altered = bytearray(blob)
    altered[40] ^= 1  # e.g. someone trying to move expires_at
    cache.db.replace_bundle_blob(k, bytes(altered))
    out = key_login(cache, key)
    assert not out.ok and out.message == offline.OFFLINE_REFUSAL
    assert out.detail["why"] == "cache-unreadable"


def test_a_code_used_online_is_not_accepted_offline(server, keys, alice_totp, cache):
    server.store.set_setting("user_verification", "discouraged")
    key, _, _ = enrolled(server, keys)
    alice = server.store.get_user("alice")
    now = T0 + 600
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    cache.store_totp("alice", totpcache.hashes_for(server, alice, now=T0), now=T0)
    code = oathtool(alice_totp, now)
    server.clock = lambda: now
    server._factors = None
    assert totp.verify(server.factors(), alice.id, code).ok  # used online, here or elsewhere
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1", now=now), now=now)
    out = key_login(cache, key, now=now + 5, answers=[code])
    assert not out.ok and out.reason is Reason.CODE_REPLAYED


def test_a_key_suspended_here_stays_so_until_the_server_has_heard(server, keys, cache, tmp_path):
    key, _, path = enrolled(server, keys)
    clone_state = tmp_path / "clone2.json"
    shutil.copy(path, clone_state)
    _, clone, _ = keys.new(state=clone_state, pin=None)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    assert key_login(cache, key).ok
    assert key_login(cache, clone).reason is Reason.CLONE_SUSPECTED
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0 + 60)
    assert cache.bundle("alice")["credentials"][0]["flagged"] is True  # events still queued
    cache.acknowledged(10 ** 9)  # delivered: the server decides from now on
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0 + 120)
    assert cache.bundle("alice")["credentials"][0]["flagged"] is False


def test_a_reopened_cache_keeps_its_files_private(tmp_path):
    org = tmp_path / "org"
    with OfflineCache.open(org) as c:
        c.queue({"kind": "login"}, now=T0)
    old = os.umask(0o022)
    try:
        with OfflineCache.open(org) as c:
            c.queue({"kind": "login"}, now=T0)
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in org.iterdir()}
    finally:
        os.umask(old)
    assert modes and set(modes.values()) == {0o600}, modes


def test_ingest_on_a_sqlite_store_records_once(server, keys, cache):
    from token_agent.organisation.ingest import ingest

    key, _, _ = enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    assert key_login(cache, key).ok
    batch = cache.pending()
    assert ingest(server, "ws-1", batch) == ingest(server, "ws-1", batch) == batch[-1]["seq"]
    recorded = [e for e in server.store.list_events(limit=100) if e.detail.get("offline")]
    assert len(recorded) == len(batch) and server.store.verify_events() > 0


def test_users_gone_longer_than_any_window_are_forgotten(server, keys, cache):
    enrolled(server, keys)
    cache.store_bundle(offline.bundle_for(server, "bob", "ws-1"), now=T0)
    cache.store_totp("bob", {"apps": []}, now=T0)
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0 + 168 * HOUR - 1)
    assert cache.bundle("bob") is not None
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0 + 168 * HOUR + 1)
    assert cache.bundle("bob") is None and cache.totp("bob") is None
    assert cache.bundle("alice") is not None and cache.db.user_count() == 1


def test_a_key_without_pin_and_a_totp_code_are_one_kind_of_factor(server, keys, alice_totp,
                                                                   cache):
    server.store.set_setting("user_verification", "discouraged")  # no PIN: possession only
    key, _, _ = enrolled(server, keys)
    alice = server.store.get_user("alice")
    bundle = offline.bundle_for(server, "alice", "ws-1")
    assert bundle["decisions"]["key"]["mfa_required"]
    cache.store_bundle(bundle, now=T0)
    cache.store_totp("alice", totpcache.hashes_for(server, alice, now=T0), now=T0)
    now = T0 + HOUR
    out = key_login(cache, key, now=now, answers=[oathtool(alice_totp, now)])
    assert not out.ok and out.reason is Reason.VERIFICATION_FAILED  # as online
    assert "same kind of factor" in out.message


def test_the_service_asks_its_key_pool_for_the_users_cached_credentials(server, keys, cache):
    """Offline, the service picks the key holding one of the user's cached credentials
    (several people's keys may be plugged in), a suspended one left out; no readable bundle
    names none (the offline login then refuses with its own reason)."""
    from token_agent.ceremonies.key import KeySettings
    from token_agent.service.org import _cached_credentials

    _, first, _ = enrolled(server, keys)
    _, second, _ = enrolled(server, keys)
    server.store.flag_fido_credential(second.credential_id, "lost")
    cache.store_bundle(offline.bundle_for(server, "alice", "ws-1"), now=T0)
    rp_id, ids = _cached_credentials(cache, "alice")
    assert rp_id == KeySettings.from_store(server.store).rp_id
    assert ids == [first.credential_id]
    assert _cached_credentials(cache, "bob") == (None, [])  # never seen here
    cache.store_bundle(offline.bundle_for(server, "bob", "ws-1"), now=T0)
    blob, _ = cache.db.get_bundle(cache.user_key("alice"))
    cache.db.replace_bundle_blob(cache.user_key("bob"), blob)  # altered: unreadable
    assert _cached_credentials(cache, "bob") == (None, [])
