"""With several keys plugged in, a login for a known user uses the key holding that user's
credential, found silently (getAssertion up=false: no touch), and the
ceremony helpers of the login flow (token_agent.ceremonies.devices) do so."""

from __future__ import annotations

import pytest

from drivers.fido.discovery import SIM_KEYS_ENV
from drivers.fido.errors import NoCredentials, NoKeyFound
from drivers.fido.keys import open_key_for, open_single_key
from simulators.key.device import create_virtual_key
from simulators.key.transport import KeyServer
from token_agent.ceremonies.devices import make_key_login
from token_agent.ceremonies.key import enrol_key
from token_agent.store import Store

RP = "token-agent.local"


@pytest.fixture
def two_keys(tmp_path):
    a, b = create_virtual_key(presence="manual"), create_virtual_key(presence="manual")
    with KeyServer(a, port=0, control_port=None) as sa, \
            KeyServer(b, port=0, control_port=None) as sb, \
            Store.open(tmp_path / "s.db") as store:
        store.set_setting("user_verification", "discouraged")
        env = {SIM_KEYS_ENV: f"127.0.0.1:{sa.port},127.0.0.1:{sb.port}"}
        yield store, env, (a, sa), (b, sb)


def _enrol(store, key_dev, server, username):
    store.add_user(username)
    key_dev.presence.set_mode("auto")
    try:
        with open_single_key({SIM_KEYS_ENV: f"127.0.0.1:{server.port}"}, on_touch=None) as k:
            enrol_key(store, k, username, pin_provider=lambda: None)
    finally:
        key_dev.presence.set_mode("manual")


def test_the_key_holding_the_credential_is_chosen_without_a_touch(two_keys):
    store, env, (a, sa), (b, sb) = two_keys
    _enrol(store, b, sb, "alice")
    ids = [c.credential_id for c in store.list_fido_credentials()]
    # presence is "manual" on both: a touch request would time out, so none was needed
    with open_key_for(RP, ids, env, on_touch=None, timeout=2) as key:
        assert key.path.endswith(f":{sb.port}")
    with pytest.raises(NoCredentials, match="None of the security keys"):
        open_key_for(RP, [b"\x01" * 32], env, on_touch=None, timeout=2)
    with pytest.raises(NoKeyFound):
        open_key_for(RP, ids, {SIM_KEYS_ENV: ""}, on_touch=None, timeout=2)


def test_login_flow_key_helper_uses_the_users_key(two_keys):
    store, env, (a, sa), (b, sb) = two_keys
    _enrol(store, a, sa, "alice")
    _enrol(store, b, sb, "bob")
    a.presence.set_mode("auto")
    b.presence.set_mode("auto")
    touches = []
    login = make_key_login(store, pin_provider=lambda: None, on_touch=lambda: touches.append(1),
                           timeout=5, environ=env)
    for user in ("alice", "bob", "alice"):
        outcome = login(user)
        assert outcome.ok and outcome.user == user, outcome
    assert touches == []  # no "touch your key" prompt: each key answered by itself
    # a pre-flight is a (silent) assertion: the counter may move on, never back, so clone
    # detection is unaffected and the next login still passes
    assert login("bob").ok
