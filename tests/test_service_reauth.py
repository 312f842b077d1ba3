"""Issue 11, item 4: no factor is bound, replaced or removed over the service's socket
without a recent login on the same connection (NIST SP 800-63B §6.1.2.1).

The attack: a process running as the user (here ``nobody``, a real child process that
drops to uid 65534, so that ``SO_PEERCRED`` says so) minted backup codes and an
authenticator app for its own agent user, with no login, and could remove every method.
Now: refused with ``reauth-required`` and audited; allowed after a login on that
connection; a login on another connection does not count; a one-factor login is not enough
when MFA applies; a stale login is refused (``token_agent.reauth``, with its clock);
administrators and a user's very first method are the documented exceptions."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from test_service import (  # noqa: F401  (fixtures)
    NOBODY, NO_MFA_POLICY, PASSWORD, run_script, services, socket_dir, world,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")

#: what a process of the user tried, each on its own: none may pass without a login
BINDING_OPS = [("enrol.totp", {"user": "nobody"}),
               ("enrol.backup-codes", {"user": "nobody"}),
               ("enrol.totp.confirm", {"user": "nobody", "code": "123456"}),
               ("enrol.key", {"user": "nobody"}),
               ("methods.prefer", {"user": "nobody", "kind": "password"}),
               ("methods.remove", {"user": "nobody", "kind": "password"})]


def as_nobody(socket_path, steps: list) -> list[dict]:
    """Run ``steps`` as ``nobody`` on numbered connections: ``["req", CONN, OP, ARGS]`` or
    ``["login", CONN, USER, [ANSWERS], OPTIONS]`` (its outcome and the prompts' messages).
    One result per step: ``{"ok", "result" | "code", "message"}``."""
    script = textwrap.dedent(f"""
        import json, os, sys
        from token_agent.service.client import Client, ServiceError, answers
        if os.geteuid() == 0:
            os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        assert os.geteuid() == {NOBODY}
        conns, out = {{}}, []
        for step in json.loads(sys.argv[2]):
            what, n = step[0], step[1]
            if n not in conns:
                conns[n] = Client(sys.argv[1], timeout=15)
            c = conns[n]
            try:
                if what == "req":
                    out.append({{"ok": True, "result": c.request(step[2], **step[3])}})
                else:
                    prompts = []
                    outcome = c.login(step[2], answers(*step[3]), **step[4],
                                      on_event=lambda e: e["event"] == "prompt"
                                      and prompts.append(e["message"]))
                    out.append({{"ok": True, "result": outcome, "prompts": prompts}})
            except ServiceError as e:
                out.append({{"ok": False, "code": e.code, "message": e.message}})
        for c in conns.values():
            c.close()
        print(json.dumps(out))
    """)
    return run_script(script, str(socket_path), json.dumps(steps))


def kinds(world, user) -> list[str]:
    return sorted(m.kind for m in world.store.list_methods(user.id))


def test_a_user_process_binds_nothing_without_a_login_on_its_connection(services, world):
    services.policy.write_text(NO_MFA_POLICY)  # one factor is the level required here
    nobody = world.user("nobody", password=True, mfa=False)
    svc = services()

    # the attack: every binding op, no login: refused, audited, nothing changed
    results = as_nobody(svc.socket, [["req", 1, op, args] for op, args in BINDING_OPS])
    assert [r.get("code") for r in results] == ["reauth-required"] * len(BINDING_OPS), results
    assert "log in as nobody on this connection first" in results[0]["message"]
    assert kinds(world, nobody) == ["password"]
    refused = [e for e in world.events("service.refused", peer_uid=NOBODY)
               if "reauth" in e.detail]
    assert sorted(e.detail["op"] for e in refused) == sorted(op for op, _ in BINDING_OPS)
    assert {e.detail["reauth"] for e in refused} == {"no-login"}

    # a login on connection 1 allows it there, not on connection 2; a wrong password no
    results = as_nobody(svc.socket, [
        ["login", 1, "nobody", ["not the password"], {}],
        ["req", 1, "enrol.backup-codes", {"user": "nobody"}],
        ["login", 1, "nobody", [PASSWORD], {}],
        ["req", 2, "enrol.backup-codes", {"user": "nobody"}],
        ["req", 2, "methods.remove", {"user": "nobody", "kind": "password"}],
        ["req", 1, "enrol.backup-codes", {"user": "nobody"}],
        ["req", 1, "enrol.totp", {"user": "nobody"}],
        ["req", 1, "methods.prefer", {"user": "nobody", "kind": "backup"}],
    ])
    assert results[0]["result"]["ok"] is False
    assert results[1]["code"] == "reauth-required"
    assert results[2]["result"]["ok"] is True and results[2]["result"]["user"] == "nobody"
    assert [r.get("code") for r in results[3:5]] == ["reauth-required"] * 2
    assert len(results[5]["result"]["codes"]) == 10
    services.secrets.extend(results[5]["result"]["codes"])
    services.secrets.append(results[6]["result"]["secret"])
    assert results[7] == {"ok": True, "result": {}}
    assert kinds(world, nobody) == ["backup_codes", "password", "totp"]

    # root (an administrator) acts for any user without a login, recorded with its actor
    with svc.client() as c:
        assert c.request("methods.remove", user="nobody", kind="totp") == {}
    assert world.events("method.removed", actor="root")
    assert kinds(world, nobody) == ["backup_codes", "password"]


def test_one_factor_is_not_enough_when_mfa_applies(services, world):
    # MFA enforced (class internal); a managed workstation in a trusted network: the policy
    # lets a password alone in, which is not enough to change methods
    services.policy.write_text('[reverification]\ntrusted_networks = ["10.0.0.0/8"]\n'
                               '[unusual_login]\nenabled = false\n')
    nobody, codes = world.user("nobody", password=True, totp=True)
    svc = services('[workstation]\ndevice = "managed"\nnetwork = "10.1.2.3"\n')
    code = codes.next()
    services.secrets.append(code)
    results = as_nobody(svc.socket, [
        ["login", 1, "nobody", [PASSWORD], {}],
        ["req", 1, "enrol.backup-codes", {"user": "nobody"}],
        ["req", 1, "methods.remove", {"user": "nobody", "kind": "totp"}],
        ["login", 1, "nobody", [PASSWORD, code], {"step_up": True}],
        ["req", 1, "methods.remove", {"user": "nobody", "kind": "totp"}],
        ["req", 1, "enrol.backup-codes", {"user": "nobody"}],
        ["req", 1, "methods.remove", {"user": "nobody", "kind": "totp"}],
    ])
    first = results[0]["result"]
    assert first["ok"] and first["method"] == "password" and not first["multi_factor"]
    assert [r.get("code") for r in results[1:3]] == ["reauth-required"] * 2
    assert "multi-factor" in results[1]["message"] and "step_up" in results[1]["message"]
    stepped = results[3]
    assert stepped["result"]["ok"] and stepped["result"]["multi_factor"], stepped
    assert stepped["prompts"] == ["Password", "Code from your authenticator app"]
    # the last second factor under enforced MFA is never removed (admin_ops.removal_refused)
    assert results[4]["code"] == "conflict" and "last second factor" in results[4]["message"]
    services.secrets.extend(results[5]["result"]["codes"])
    assert results[6] == {"ok": True, "result": {}}
    assert kinds(world, nobody) == ["backup_codes", "password"]
    refused = world.events("service.refused", peer_uid=NOBODY)
    assert {e.detail.get("reauth") for e in refused} == {"single-factor"}


def test_the_first_method_needs_no_login(services, world):
    nobody = world.user("nobody")  # nothing to authenticate with
    svc = services()
    results = as_nobody(svc.socket, [["req", 1, "enrol.backup-codes", {"user": "nobody"}],
                                     ["req", 1, "enrol.backup-codes", {"user": "nobody"}]])
    services.secrets.extend(results[0]["result"]["codes"])
    assert kinds(world, nobody) == ["backup_codes"]
    assert results[1]["code"] == "reauth-required"  # from then on, a login


def test_stale_other_users_and_single_factor_logins_are_refused(world):
    """The rule itself (``token_agent.reauth``), with its clock: the service's connection
    keeps an ``Authenticated`` and checks it exactly so."""
    from token_agent import reauth
    from token_agent.outcome import Factor, LoginOutcome, Reason

    alice = world.user("alice", password=True, mfa=False)
    bob = world.user("bob", password=True, mfa=False)
    carol, _codes = world.user("carol", password=True, totp=True)
    nobody = world.user("nobody")

    def auth(user, factors, at):
        outcome = LoginOutcome(ok=True, method="password", user=user.username,
                               user_id=user.id, factors=factors)
        return reauth.Authenticated.of(outcome, clock=lambda: at)

    one = (Factor.KNOWLEDGE,)
    two = (Factor.KNOWLEDGE, Factor.POSSESSION)
    assert reauth.max_age(world.agent) == 300  # the default: 5 minutes
    assert reauth.check(world.agent, alice, auth(alice, one, 1000.0), now=1299.0) == "login"
    with pytest.raises(reauth.ReauthRequired) as info:
        reauth.check(world.agent, alice, auth(alice, one, 1000.0), now=1301.0)
    assert info.value.why == "stale"
    with pytest.raises(reauth.ReauthRequired) as info:
        reauth.check(world.agent, alice, auth(bob, one, 1000.0), now=1001.0)
    assert info.value.why == "other-user"
    with pytest.raises(reauth.ReauthRequired) as info:
        reauth.check(world.agent, alice, None)
    assert info.value.why == "no-login"
    assert reauth.required_level(world.agent, carol) == reauth.MULTI
    with pytest.raises(reauth.ReauthRequired) as info:
        reauth.check(world.agent, carol, auth(carol, one, 1000.0), now=1001.0)
    assert info.value.why == "single-factor"
    assert reauth.check(world.agent, carol, auth(carol, two, 1000.0), now=1001.0) == "login"
    assert reauth.check(world.agent, nobody, None) == "first-method"
    failed = LoginOutcome.failure("login", Reason.WRONG_PASSWORD, "wrong password")
    assert reauth.Authenticated.of(failed) is None
