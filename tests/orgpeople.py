"""Helpers of tests/test_organisation_cluster.py: the people of the organisation (set up
as its administrator would), answering a login's prompts, reading the organisation's audit,
waiting, fresh authenticator codes, and the certificate test's extra workstations."""

from __future__ import annotations

import json
import time

import pytest

from orgcluster import KEY_PIN, OrgCluster
from test_service import TotpCodes

PASSWORD = "correct horse battery"
PIN_PROMPT = "PIN"
TOTP_PROMPT = "authenticator app"
#: how many logins the SIGTERM test has in flight (one person each: a person's parallel
#: password attempts are counted as failures until they succeed, and would lock)
SHIFT = 12


def people(c: OrgCluster) -> None:
    """The people above, set up as the organisation's administrator would, in the library
    on the organisation's store (alice's key is enrolled over ws1's socket by the roaming
    test itself)."""
    from drivers.fido.keys import open_single_key
    from token_agent.ceremonies.key import enrol_key
    from token_agent.factors import password as password_factor
    from token_agent.factors import totp

    c.codes = {}
    with c.agent() as agent:
        store = agent.store
        for name, cls in (("alice", "internal"), ("bob", "internal"), ("carol", "internal"),
                          ("dave", "external"), ("gus", "external"),
                          ("hana", "internal"), ("ian", "internal")):
            user = store.add_user(name, user_class=cls, mfa_enabled=cls == "internal")
            if name in ("alice", "bob", "dave", "gus", "ian"):
                password_factor.set_password(agent.factors(), user.id, PASSWORD)
            if name in ("alice", "hana", "ian"):
                pending = totp.begin_enrol(agent.factors(), user.id)
                codes = TotpCodes(pending.secret)
                assert totp.confirm_enrol(agent.factors(), user.id, codes.now()).ok
                c.codes[name] = codes
        for i in range(SHIFT):  # the SIGTERM test's people, one login each at once
            user = store.add_user(f"shift{i:02d}", user_class="external", mfa_enabled=False)
            password_factor.set_password(agent.factors(), user.id, PASSWORD)
        for name in ("bob", "carol", "hana"):
            with open_single_key({"TOKEN_AGENT_SIM_KEYS": c.keys[name].address},
                                 on_touch=None) as key:
                enrol_key(store, key, name, name=f"{name}'s key", pin_provider=lambda: KEY_PIN)


def answering(*, password: str | None = None, pin: str | None = KEY_PIN,
              code=None, seen: list | None = None):
    """An ``answer`` for ``Client.login``: the PIN, the password, the authenticator code
    (a string, or a callable giving a fresh one), by what the prompt asks; every prompt's
    message goes to ``seen``."""
    def answer(event: dict) -> str | None:
        message = event["message"]
        if seen is not None:
            seen.append(message)
        if PIN_PROMPT in message:
            return pin
        if TOTP_PROMPT in message:
            return code() if callable(code) else code
        if "assword" in message:
            return password
        return None
    return answer


def org_events(c: OrgCluster, kind: str, user: str | None = None, **detail) -> list:
    with c.agent() as agent:
        store = agent.store
        uid = store.get_user(user).id if user else None
        return [e for e in store.list_events(kind=kind, limit=5000)
                if (uid is None or e.user_id == uid)
                and all(e.detail.get(k) == v for k, v in detail.items())]


def audit_intact(c: OrgCluster) -> dict:
    out = c.admin("audit", "verify", "--json", check=False)
    assert out.returncode == 0, f"audit verify failed:\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:g} s")


def fresh_code(codes: TotpCodes) -> str:
    """A code of a step not used yet (waiting for the next 30-s step when needed)."""
    while True:
        try:
            return codes.next()
        except AssertionError:
            time.sleep(30 - time.time() % 30 + 0.5)


def wait_for_offline_codes(ws, username: str) -> None:
    """Until the workstation's offline cache holds the user's code hashes (fetched after the
    online login, off its path)."""
    from token_agent.organisation.cache import OfflineCache

    cache = OfflineCache.open(ws.data / "organisation")
    try:
        try:
            wait_for(lambda: cache.totp(username), timeout=30,
                     what=f"{username}'s code hashes in {ws.name}'s offline cache")
        except AssertionError:
            bundle = cache.bundle(username) or {}
            print(f"{username}'s cached decisions at {ws.name}: "
                  f"{json.dumps(bundle.get('decisions'), indent=1)[:3000]}")
            raise
    finally:
        cache.close()


def alice_has_her_key(c: OrgCluster) -> None:
    """alice's key, enrolled by the roaming test; enrolled here (the library, as the admin)
    when this test runs on its own."""
    from drivers.fido.keys import open_single_key
    from token_agent.ceremonies.key import enrol_key

    with c.agent() as agent:
        if agent.store.list_fido_credentials(agent.store.get_user("alice").id):
            return
        with open_single_key({"TOKEN_AGENT_SIM_KEYS": c.keys["alice"].address},
                             on_touch=None) as key:
            enrol_key(agent.store, key, "alice", name="alice's key", pin_provider=lambda: KEY_PIN)


def extra_workstation(c: OrgCluster, name: str):
    """A workstation's config and data directory, not started (for the join and
    certificate tests)."""
    import textwrap

    from orgcluster import Workstation

    data = c.base / name
    data.mkdir(exist_ok=True)
    config = c.base / f"{name}.toml"
    config.write_text(textwrap.dedent(f"""\
        [store]
        data_dir = "{data}"
        [policy]
        file = "{c.policy}"
        [organisation]
        servers = {json.dumps(c.servers)}
        timeout = 3
    """))
    return Workstation(name, data, config, c.base / "sockets" / f"{name}.sock",
                       c.base / f"{name}.log", c.env)


def client_of(ws):
    from token_agent.config import load_config
    from token_agent.organisation.client import OrgClient

    return OrgClient.from_config(load_config(ws.config), ws.data)


def forged_certificate_is_refused(c: OrgCluster, ws) -> None:
    import datetime as dt
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from token_agent.organisation.client import (OrgClient, ServerRefused, ServerUnavailable,
                                                 client_ssl_context)

    org = ws.data / "organisation"
    ws1_org = c.workstations["ws1"].data / "organisation"
    # ws1's certificate with ws6's key: TLS cannot even be set up
    with pytest.raises(ssl.SSLError):
        client_ssl_context(org / "ca.pem", ws1_org / "workstation.pem",
                           org / "workstation.key")
    # a certificate of the same name from a CA of one's own
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ws1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    forged = c.base / "forged"
    forged.mkdir()
    (forged / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (forged / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    client = OrgClient(c.servers, ssl_context=client_ssl_context(
        org / "ca.pem", forged / "cert.pem", forged / "key.pem"), timeout=3)
    with pytest.raises((ServerRefused, ServerUnavailable)) as info:
        client.request("GET", "/v1/whoami")
    if isinstance(info.value, ServerRefused):
        assert info.value.status == 403




def outbox_empty(ws) -> bool:
    """The workstation's queue of offline audit events is empty (all delivered)."""
    from token_agent.organisation.cache import OfflineCache

    cache = OfflineCache.open(ws.data / "organisation")
    try:
        return cache.pending_count() == 0
    finally:
        cache.close()
