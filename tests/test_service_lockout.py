"""Issue 11, item 9, through the service with a real (virtual) key: a locked password never
blocks the user's key. Ten wrong passwords lock the password; the right one is refused;
the key with its PIN still logs the user in, also when the login names no primary factor
(the service's flow passes the locked password over)."""

from __future__ import annotations

from drivers.fido.keys import open_single_key
from token_agent.ceremonies.key import enrol_key
from token_agent.service.client import answers

from test_service import (  # noqa: F401  (fixtures)
    KEY_PIN, PASSWORD, WRONG_PASSWORD, key_env, services, set_key_pin, socket_dir, world,
)


def test_a_locked_password_leaves_the_key(services, world, sim_key_server):
    set_key_pin(sim_key_server)
    world.user("alice", password=True)
    with open_single_key(key_env(sim_key_server), on_touch=None) as key:
        enrol_key(world.store, key, "alice", name="blue key", pin_provider=lambda: KEY_PIN)
    svc = services(f'[keys]\nsimulators = ["{sim_key_server.address}"]\ntimeout = 10\n')
    with svc.client() as c:
        for _ in range(10):
            wrong = c.login("alice", answers(WRONG_PASSWORD), primary="password")
            assert wrong["reason"] == "wrong-password", wrong
        locked = c.login("alice", answers(PASSWORD), primary="password")
        assert locked["reason"] == "method-locked", locked
        prompts = []
        chosen = c.login("alice", answers(KEY_PIN), on_event=prompts.append)
        assert chosen["ok"] and chosen["method"] == "key", chosen  # before: method-locked
        assert chosen["multi_factor"]
        assert [p["message"] for p in prompts if p["event"] == "prompt"] == \
            ["Enter the PIN for your security key"]
        by_key = c.login("alice", answers(KEY_PIN), primary="key")
        assert by_key["ok"] and by_key["multi_factor"], by_key
