"""The organisation's server (issue 15, part A): `server init`, join tokens, mutual TLS,
revocation, two replicas, failover and SIGTERM, with real TLS, a real PostgreSQL store and the
server as a separate process (`token-agent server run`)."""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from orgtest import (  # noqa: F401  (org_server: a fixture)
    clean_env, init_server_dir, join_workstation, org_server, run_cli, start_org_server,
)
from token_agent import exitcodes
from token_agent.organisation import pki
from token_agent.organisation.client import OrgClient, client_ssl_context
from token_agent.organisation.errors import ChannelClosed, ServerRefused, ServerUnavailable


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _https(server, method: str, path: str, body: dict | None = None, *,
           ctx: ssl.SSLContext | None = None) -> tuple[int, dict]:
    """One request with ``ctx`` (default: the organisation's CA, no client certificate)."""
    ctx = ctx or ssl.create_default_context(cafile=str(server.ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=20)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _events(server, kind: str) -> list[dict]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(server.store_url, row_factory=dict_row) as conn:
        rows = [dict(r) for r in conn.execute(
            "SELECT kind, outcome, detail FROM audit_events WHERE kind = %s ORDER BY id",
            (kind,))]
    for r in rows:
        if isinstance(r["detail"], str):
            r["detail"] = json.loads(r["detail"])
    return rows


# ------------------------------------------------------------------ server init


def test_server_init_makes_private_keys_and_never_overwrites(tmp_path):
    d = init_server_dir(tmp_path / "srv", "org.example.nhs.uk", "10.0.0.5")
    assert _mode(d / "ca.key") == _mode(d / "server.key") == 0o600
    assert _mode(d) == 0o700
    ca, tls = pki.read_cert(d / "ca.pem"), pki.read_cert(d / "server.pem")
    pki.check_ca(ca, pki.read_key(d / "ca.key"))
    assert pki.issued_by(tls, ca)
    from cryptography import x509

    san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in san] == ["org.example.nhs.uk", "10.0.0.5"]
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    again = run_cli(clean_env(), "--data-dir", str(tmp_path / "x"), "server", "init",
                    "--dir", str(d), "--json", expect=exitcodes.CONFLICT)
    assert "exist already" in json.loads(again.stdout)["error"]["message"]
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_server_init_takes_the_organisations_own_ca_and_refuses_a_foreign_cert(tmp_path):
    ca_key, ca = pki.make_ca("NHS Trust workstation CA")
    other_key, other = pki.make_ca("someone else")
    tls_key, tls = pki.issue_server_cert(ca_key, ca, ["org.trust.nhs.uk"])
    bad_key, bad = pki.issue_server_cert(other_key, other, ["org.trust.nhs.uk"])
    files = {}
    for name, obj in {"ca.pem": ca, "tls.pem": tls, "bad.pem": bad}.items():
        files[name] = pki.write_cert(tmp_path / name, obj)
    for name, key in {"ca.key": ca_key, "tls.key": tls_key, "bad.key": bad_key}.items():
        files[name] = pki.write_key(tmp_path / name, key)
    base = ["--data-dir", str(tmp_path / "x"), "server", "init", "--ca-cert", str(files["ca.pem"]),
            "--ca-key", str(files["ca.key"])]
    refused = run_cli(clean_env(), *base, "--dir", str(tmp_path / "s1"), "--cert",
                      str(files["bad.pem"]), "--key", str(files["bad.key"]),
                      expect=exitcodes.USAGE)
    assert "not issued by the CA" in refused.stderr
    assert not (tmp_path / "s1").exists() or not any((tmp_path / "s1").iterdir())
    run_cli(clean_env(), *base, "--dir", str(tmp_path / "s2"), "--cert", str(files["tls.pem"]),
            "--key", str(files["tls.key"]))
    assert pki.fingerprint(pki.read_cert(tmp_path / "s2" / "ca.pem")) == pki.fingerprint(ca)
    assert _mode(tmp_path / "s2" / "ca.key") == 0o600
    mismatched = run_cli(clean_env(), *base[:-1], str(files["bad.key"]), "--dir",
                         str(tmp_path / "s3"), expect=exitcodes.USAGE)
    assert "does not belong" in mismatched.stderr


# ------------------------------------------------------------------ joining


def test_a_workstation_joins_and_is_known(org_server, tmp_path):
    ws = join_workstation(tmp_path / "ws1", org_server, "ws1")
    assert _mode(ws.org_dir / "workstation.key") == 0o600
    assert _mode(ws.org_dir) == 0o700
    cert = pki.read_cert(ws.org_dir / "workstation.pem")
    assert pki.common_name(cert) == "ws1"
    assert ws.client().request("GET", "/v1/whoami")["workstation"] == "ws1"
    listed = json.loads(org_server.cli("server", "workstations", "--json").stdout)
    [row] = listed["workstations"]
    assert (row["name"], row["state"], row["cert_fingerprint"]) == ("ws1", "joined",
                                                                   pki.fingerprint(cert))
    assert row["last_seen_at"] and row["last_address"] == "127.0.0.1"
    status = json.loads(ws.cli("workstation", "status", "--json").stdout)["workstation"]
    assert status["name"] == "ws1" and status["checks"] == [
        {"server": org_server.url, "state": "ok", "workstation": "ws1"}]
    [event] = _events(org_server, "workstation.join")
    assert event["outcome"] == "success" and event["detail"]["workstation"] == "ws1"


def test_join_tokens_are_single_use_expiring_and_pinned_to_the_ca(org_server, tmp_path):
    def join(token: str, where: str, expect: int) -> dict:
        config = tmp_path / f"{where}.toml"
        config.write_text(f'[store]\ndata_dir = "{tmp_path / where}"\n')
        out = run_cli(clean_env(config), "workstation", "join", "--server", org_server.url,
                      "--token-stdin", "--json", input=token + "\n", expect=expect)
        return json.loads(out.stdout)

    token = org_server.token("ws1")
    secret, ca_hash = token.split(".")
    assert join(token, "a", 0)["joined"]["name"] == "ws1"
    files = {p.name: p.read_bytes() for p in (tmp_path / "a" / "organisation").iterdir()}
    assert join(token, "a", exitcodes.AUTH_FAILED)["error"]["reason"] == "join-token-used"
    assert {p.name: p.read_bytes() for p in (tmp_path / "a" / "organisation").iterdir()} == files
    assert join(token, "b", exitcodes.AUTH_FAILED)["error"]["reason"] == "join-token-used"
    assert not (tmp_path / "b" / "organisation" / "workstation.pem").exists()
    unknown = f"{secrets.token_urlsafe(32)}.{ca_hash}"
    assert join(unknown, "c", exitcodes.AUTH_FAILED)["error"]["reason"] == "join-token-unknown"
    short = org_server.token("ws2", hours=0.0005)  # 1.8 s
    time.sleep(2.2)
    assert join(short, "d", exitcodes.AUTH_FAILED)["error"]["reason"] == "join-token-expired"
    # a token naming another CA: the workstation stops before sending anything ...
    other_key, other_ca = pki.make_ca("another organisation")
    fresh = org_server.token("ws3")
    fresh_secret = fresh.split(".")[0]
    foreign = join(f"{fresh_secret}.{pki.ca_hash(other_ca)}", "e", exitcodes.AUTH_FAILED)
    assert "not the one this join token names" in foreign["error"]["message"]
    # ... and the server refuses it too, without using the token
    csr = pki.csr_pem(pki.make_csr(pki.make_key(), "ws3"))
    status, body = _https(org_server, "POST", "/v1/join",
                          {"token": f"{fresh_secret}.{pki.ca_hash(other_ca)}", "csr": csr})
    assert (status, body["error"]) == (403, "join-token-wrong-ca")
    assert join(fresh, "f", 0)["joined"]["name"] == "ws3"
    assert join("not-a-token", "g", exitcodes.USAGE)["error"]["message"].startswith(
        "this is not a join token")
    refused = [e["detail"]["reason"] for e in _events(org_server, "workstation.join")
               if e["outcome"] == "refused"]
    assert refused == ["token used", "token used", "token unknown", "token expired"]
    # the secrets are nowhere: not in the audit, not in the server's log
    everything = json.dumps(_events(org_server, "workstation.join")
                            + _events(org_server, "workstation.token")) + org_server.output()
    for t in (token, short, fresh):
        assert t.split(".")[0] not in everything


def test_the_certificate_names_the_token_s_workstation_and_weak_csrs_are_refused(
        org_server, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    token = org_server.token("ward7-bay3")
    for key, why in ((rsa.generate_private_key(65537, 1024), "RSA key of 1024 bits"),
                     (ec.generate_private_key(ec.SECP384R1()), "only P-256")):
        csr = pki.csr_pem(pki.make_csr(key, "ward7-bay3"))
        status, body = _https(org_server, "POST", "/v1/join", {"token": token, "csr": csr})
        assert (status, body["error"]) == (400, "bad-csr") and why in body["message"]
    # a CSR whose signature is not its key's (no proof of possession)
    good = pki.make_csr(pki.make_key(), "x").public_bytes(pki.serialization.Encoding.DER)
    broken = bytearray(good)
    broken[-5] ^= 0xFF
    import base64

    pem = ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(broken)).decode()
           + "-----END CERTIFICATE REQUEST-----\n")
    status, body = _https(org_server, "POST", "/v1/join", {"token": token, "csr": pem})
    assert (status, body["error"]) == (400, "bad-csr")
    status, body = _https(org_server, "POST", "/v1/join", {"token": token, "csr": "x" * 20000})
    assert (status, body["error"]) == (413, "too-large")
    # the token was not used by those; the CSR asks for another name: the token's name wins
    key = pki.make_key()
    status, body = _https(org_server, "POST", "/v1/join",
                          {"token": token, "csr": pki.csr_pem(pki.make_csr(key, "admin"))})
    assert status == 200
    cert = pki.load_cert(body["certificate"])
    assert pki.common_name(cert) == "ward7-bay3" and body["name"] == "ward7-bay3"
    from cryptography.x509.oid import ExtendedKeyUsageOID

    eku = cert.extensions.get_extension_for_class(pki.x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


# ------------------------------------------------------------------ mutual TLS


def test_without_a_client_certificate_only_join_ca_and_health_answer(org_server):
    assert _https(org_server, "GET", "/v1/health")[0] == 200
    assert _https(org_server, "GET", "/v1/ca")[1]["ca_hash"] == pki.ca_hash(
        pki.read_cert(org_server.ca_file))
    for path in ("/v1/whoami", "/v1/anything"):
        status, body = _https(org_server, "GET", path)
        assert (status, body["error"]) == (403, "client-certificate-required")
        assert "join" in body["message"]
    ctx = ssl.create_default_context(cafile=str(org_server.ca_file))
    with ws_connect(f"wss://127.0.0.1:{org_server.port}/v1/ping", ssl=ctx, proxy=None) as ws:
        with pytest.raises(Exception) as closed:
            ws.recv(timeout=10)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403,
                                                                 "client-certificate-required")


def test_a_revoked_workstation_is_refused_at_its_next_request(org_server, tmp_path):
    ws = join_workstation(tmp_path / "ws1", org_server, "ws1")
    other = join_workstation(tmp_path / "ws2", org_server, "ws2")
    client = ws.client()
    with client.connect("/v1/ping") as channel:
        channel.send({"ping": 1})
        pong = channel.recv(timeout=10)
        assert (pong["pong"], pong["workstation"]) == (1, "ws1")
    org_server.revoke("ws1")
    with pytest.raises(ServerRefused) as refused:
        client.request("GET", "/v1/whoami")
    assert (refused.value.status, refused.value.error) == (403, "workstation-revoked")
    channel = client.connect("/v1/ping")
    with pytest.raises(ChannelClosed) as closed:
        channel.recv(timeout=10)
    assert (closed.value.code, closed.value.reason) == (4403, "workstation-revoked")
    assert other.client().request("GET", "/v1/whoami")["workstation"] == "ws2"
    status = ws.cli("workstation", "status", "--json", expect=exitcodes.AUTH_FAILED)
    assert json.loads(status.stdout)["error"]["reason"] == "workstation-revoked"
    # joining again takes a new token; the old certificate stays refused
    old_cert = (ws.org_dir / "workstation.pem").read_bytes()
    rejoined = join_workstation(tmp_path / "ws1b", org_server, "ws1")
    assert rejoined.client().request("GET", "/v1/whoami")["workstation"] == "ws1"
    assert (ws.org_dir / "workstation.pem").read_bytes() == old_cert
    with pytest.raises(ServerRefused) as unknown:
        client.request("GET", "/v1/whoami")
    assert unknown.value.error == "workstation-unknown"


def test_a_joined_workstation_cannot_get_a_second_token_until_revoked(org_server, tmp_path):
    join_workstation(tmp_path / "ws1", org_server, "ws1")
    again = org_server.cli("server", "workstation-token", "--name", "WS1", "--json",
                           expect=exitcodes.CONFLICT)
    assert "revoke it first" in json.loads(again.stdout)["error"]["message"]
    gone = org_server.cli("server", "workstation-revoke", "nope", expect=exitcodes.NOT_FOUND)
    assert "no workstation named" in gone.stderr
    bad = org_server.cli("server", "workstation-token", "--name", "a b", expect=exitcodes.USAGE)
    assert "invalid workstation name" in bad.stderr


def test_a_certificate_from_another_ca_is_refused_in_the_handshake(org_server, tmp_path):
    other_key, other_ca = pki.make_ca("token-agent workstation CA")  # same name, other key
    key = pki.make_key()
    cert = pki.issue_workstation_cert(other_key, other_ca, pki.make_csr(key, "ws1"), "ws1")
    pki.write_cert(tmp_path / "c.pem", cert)
    pki.write_key(tmp_path / "c.key", key)
    ctx = client_ssl_context(org_server.ca_file, tmp_path / "c.pem", tmp_path / "c.key")
    # TLS 1.3: the client's handshake ends before the server has checked its certificate;
    # the server then drops the connection without an HTTP answer
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _https(org_server, "GET", "/v1/whoami", ctx=ctx)
    # TLS 1.2: the handshake itself fails
    ctx12 = client_ssl_context(org_server.ca_file, tmp_path / "c.pem", tmp_path / "c.key")
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", org_server.port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx12.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                tls.recv(100)
    # the same handshake with ws1's real certificate gets an answer (the check is right)
    ws = join_workstation(tmp_path / "ws1", org_server, "ws1")
    good = client_ssl_context(org_server.ca_file, ws.org_dir / "workstation.pem",
                              ws.org_dir / "workstation.key")
    good.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _https(org_server, "GET", "/v1/whoami", ctx=good)[1]["workstation"] == "ws1"
    client = OrgClient([org_server.url], ssl_context=ctx, timeout=5)
    with pytest.raises(ServerUnavailable) as none:
        client.request("GET", "/v1/whoami")
    assert "TLS failed" in str(none.value) or "connection reset" in str(none.value)


# A TLS 1.2 client written out by hand, far enough to send a CertificateVerify: OpenSSL (and
# so Python's ssl) refuses to pair a certificate with a key that is not its own, which is
# exactly the attacker's position here (they hold ws1's certificate, not its key).

def _record(ctype: int, payload: bytes) -> bytes:
    return bytes([ctype, 3, 3]) + len(payload).to_bytes(2, "big") + payload


def _handshake(htype: int, body: bytes) -> bytes:
    return bytes([htype]) + len(body).to_bytes(3, "big") + body


def _vec(data: bytes, size: int) -> bytes:
    return len(data).to_bytes(size, "big") + data


def _read_handshakes(sock: socket.socket, until: int) -> tuple[list[tuple[int, bytes]], bytes]:
    buf, raw, messages = b"", b"", []
    while True:
        header = _recv_exact(sock, 5)
        body = _recv_exact(sock, int.from_bytes(header[3:5], "big"))
        if header[0] == 21:
            raise AssertionError(f"alert {body.hex()} before the server finished its hello")
        assert header[0] == 22, header
        buf += body
        while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[1:4], "big"):
            n = 4 + int.from_bytes(buf[1:4], "big")
            messages.append((buf[0], buf[4:n]))
            raw += buf[:n]
            buf = buf[n:]
            if messages[-1][0] == until:
                return messages, raw


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("closed")
        data += chunk
    return data


def _present_certificate(port: int, cert_der: bytes, signing_key) -> bytes | None:
    """Handshake up to the client's CertificateVerify (signed by ``signing_key``); the
    server's alert (its 2 bytes), or None when it waits for our Finished (it accepted)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    exts = (b"\x00\x0a" + _vec(_vec(b"\x00\x17", 2), 2)          # supported_groups: P-256
            + b"\x00\x0b" + _vec(_vec(b"\x00", 1), 2)            # ec_point_formats
            + b"\x00\x0d" + _vec(_vec(b"\x04\x03", 2), 2)        # ecdsa_secp256r1_sha256
            + b"\xff\x01" + _vec(b"\x00", 2))                    # renegotiation_info
    hello = (b"\x03\x03" + secrets.token_bytes(32) + b"\x00" + _vec(b"\xc0\x2b", 2)
             + b"\x01\x00" + _vec(exts, 2))
    client_hello = _handshake(1, hello)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_record(22, client_hello))
        messages, raw = _read_handshakes(sock, until=14)  # ServerHelloDone
        types = [t for t, _ in messages]
        assert 13 in types, f"the server asked for no client certificate: {types}"
        ske = dict(messages)[12]
        assert ske[0] == 3 and ske[1:3] == b"\x00\x17"
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        point = ephemeral.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
        certificate = _handshake(11, _vec(_vec(cert_der, 3), 3))
        key_exchange = _handshake(16, _vec(point, 1))
        transcript = client_hello + raw + certificate + key_exchange
        signature = signing_key.sign(transcript, ec.ECDSA(hashes.SHA256()))
        verify = _handshake(15, b"\x04\x03" + _vec(signature, 2))
        sock.sendall(_record(22, certificate + key_exchange + verify))
        sock.settimeout(3)
        try:
            header = _recv_exact(sock, 5)
        except (TimeoutError, socket.timeout):
            return None  # waiting for our ChangeCipherSpec and Finished: the proof was accepted
        except ConnectionResetError:
            return b"reset"
        assert header[0] == 21, header
        return _recv_exact(sock, int.from_bytes(header[3:5], "big"))


def test_ws1_s_certificate_with_another_key_fails_the_handshake(org_server, tmp_path):
    ws = join_workstation(tmp_path / "ws1", org_server, "ws1")
    from cryptography.hazmat.primitives import serialization

    cert_der = pki.read_cert(ws.org_dir / "workstation.pem").public_bytes(
        serialization.Encoding.DER)
    # the real key gets past CertificateVerify (the test's own handshake is right) ...
    assert _present_certificate(org_server.port, cert_der,
                                pki.read_key(ws.org_dir / "workstation.key")) is None
    # ... another key does not: the server ends the handshake at once (a fatal alert,
    # decrypt_error, or the connection closed: asyncio drops it without flushing the alert)
    alert = _present_certificate(org_server.port, cert_der, pki.make_key())
    assert alert in (bytes([2, 51]), b"reset"), alert
    assert ws.client().request("GET", "/v1/whoami")["workstation"] == "ws1"


# ------------------------------------------------------------------ replicas, failover


def test_two_replicas_on_one_store_accept_the_same_workstation_and_fail_over(pg_url, tmp_path):
    first = start_org_server(tmp_path / "s1", pg_url)
    second = start_org_server(tmp_path / "s2", pg_url, server_dir=first.server_dir)
    try:
        ws = join_workstation(tmp_path / "ws1", first, "ws1", servers=[first.url, second.url])
        ctx = ws.client().ssl_context
        seen = {OrgClient([s.url], ssl_context=ctx).request("GET", "/v1/whoami")["server"]
                for s in (first, second)}
        assert len(seen) == 2  # two processes, one answer each
        # a token made through one replica's store is used through the other
        token = second.token("ws2")
        ws2 = join_workstation(tmp_path / "ws2", first, "ws2")
        assert ws2.name == "ws2" and token  # (a second token for ws2 replaced the first)
        second.revoke("ws1")
        with pytest.raises(ServerRefused):
            OrgClient([first.url], ssl_context=ctx).request("GET", "/v1/whoami")
        assert ws2.client().request("GET", "/v1/whoami")["workstation"] == "ws2"
        # failover: the first replica dies; requests and channels go to the second
        client = OrgClient([first.url, second.url], ssl_context=ws2.client().ssl_context)
        first.kill()
        assert client.request("GET", "/v1/whoami")["workstation"] == "ws2"
        assert client.order() == [second.url, first.url]  # the failed one is tried last
        with client.connect("/v1/ping") as channel:
            assert channel.server == second.url
            channel.send({"ping": "x"})
            assert channel.recv(timeout=10)["pong"] == "x"
        assert second.stop() == 0
        with pytest.raises(ServerUnavailable) as none:
            client.request("GET", "/v1/whoami")
        assert [s for s, _ in none.value.attempts] == [second.url, first.url]
        assert "connection refused" in str(none.value)
        with pytest.raises(ServerUnavailable):
            client.connect("/v1/ping")
        status = ws2.cli("workstation", "status", "--json", expect=exitcodes.SERVER_UNAVAILABLE)
        assert json.loads(status.stdout)["error"]["code"] == exitcodes.SERVER_UNAVAILABLE
    finally:
        first.kill()
        second.kill()


def test_a_replica_whose_store_is_down_answers_503_and_the_client_moves_on(
        pg_server, pg_url, tmp_path):
    server = start_org_server(tmp_path / "s1", pg_url)
    try:
        ws = join_workstation(tmp_path / "ws1", server, "ws1")
        pg_server.stop()
        status, body = _https(server, "GET", "/v1/health")
        assert (status, body["error"]) == (503, "store-unavailable")
        with pytest.raises(ServerUnavailable) as none:
            ws.client().request("GET", "/v1/whoami")
        assert "HTTP 503" in str(none.value)
        with pytest.raises(ServerUnavailable) as no_channel:
            ws.client().connect("/v1/ping")
        assert "HTTP 503" in str(no_channel.value)
    finally:
        if not pg_server.running():
            pg_server.restart()
        server.stop()


# ------------------------------------------------------------------ SIGTERM


def test_sigterm_lets_a_join_in_flight_finish_and_exits_0(org_server, tmp_path):
    import psycopg

    token = org_server.token("ws1")
    key = pki.make_key()
    answer: dict = {}
    locker = psycopg.connect(org_server.store_url)
    try:
        locker.execute("LOCK TABLE workstations IN ACCESS EXCLUSIVE MODE")  # the store is slow

        def join() -> None:
            answer["reply"] = _https(org_server, "POST", "/v1/join",
                                     {"token": token, "csr": pki.csr_pem(pki.make_csr(key, "w"))})

        thread = threading.Thread(target=join)
        thread.start()
        time.sleep(1.0)  # the join is waiting for the lock
        assert thread.is_alive()
        org_server.process.send_signal(15)
        time.sleep(1.0)
        assert org_server.process.poll() is None  # still finishing the request
        with pytest.raises(OSError):  # but no longer accepting new ones
            _https(org_server, "GET", "/v1/health")
    finally:
        locker.rollback()
        locker.close()
    thread.join(30)
    status, body = answer["reply"]
    assert status == 200 and pki.common_name(pki.load_cert(body["certificate"])) == "ws1"
    assert org_server.process.wait(30) == 0
    # the join is whole in the store: token used, certificate recorded, audit event
    import psycopg as pg

    with pg.connect(org_server.store_url) as conn:
        row = conn.execute("SELECT token_used_at, cert_fingerprint, joined_at FROM workstations "
                           "WHERE name = 'ws1'").fetchone()
    assert row[0] and row[2] and row[1] == pki.fingerprint(pki.load_cert(body["certificate"]))
    assert [e["outcome"] for e in _events(org_server, "workstation.join")] == ["success"]
    assert "stopped (SIGTERM)" in org_server.output()


# ------------------------------------------------------------------ the workstation's CLI


def test_store_commands_refuse_on_an_organisation_workstation(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndata_dir = "{tmp_path / "data"}"\n'
                      '[organisation]\nservers = ["https://org1.example:8443"]\n')
    env = clean_env(config)
    for args in (["users", "list"], ["users", "add", "alice"],
                 ["admin", "reset-methods", "alice"], ["methods", "list", "--user", "alice"],
                 ["audit", "tail"]):
        out = run_cli(env, *args, "--json", expect=exitcodes.ORGANISATION)
        error = json.loads(out.stdout)["error"]
        assert error["reason"] == "organisation-workstation"
        assert error["message"].startswith("this workstation belongs to an organisation "
                                           "(servers: https://org1.example:8443)")
    assert not (tmp_path / "data" / "token-agent.db").exists()  # no stray local store made
    status = run_cli(env, "workstation", "status", "--json", expect=exitcodes.ORGANISATION)
    assert json.loads(status.stdout)["error"]["reason"] == "not-joined"
    help_ = run_cli(env, "users", "--help")  # what does not touch the store still works
    assert "Manage users" in help_.stdout


def test_the_administrator_reaches_the_organisation_s_store_with_store_url(
        tmp_path, pg_url):
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndata_dir = "{tmp_path / "data"}"\n'
                      '[organisation]\nservers = ["https://org1.example:8443"]\n')
    run_cli(clean_env(config), "--store-url", pg_url, "users", "add", "alice")
    listed = run_cli(clean_env(config), "--store-url", pg_url, "users", "list", "--json")
    assert "alice" in listed.stdout


# ------------------------------------------------------------------ config and parts


def test_server_and_organisation_tables_are_checked():
    from token_agent.config import ConfigError, parse_config

    c = parse_config('[server]\nlisten = "[::1]:9443"\nworkers = 4\n'
                     '[organisation]\nservers = ["https://a.example:8443/", "https://b"]\n'
                     'timeout = 2\n')
    assert c.server.host_port() == ("::1", 9443) and c.server.workers == 4
    assert c.organisation.servers == ("https://a.example:8443", "https://b")
    assert c.organisation.enabled and c.organisation.timeout == 2
    for text, problem in (
            ('[server]\nlisten = "8443"\n', "is not host:port"),
            ('[server]\nworkerz = 3\n', "did you mean workers"),
            ('[server]\nworkers = 0\n', "out of range"),
            ('[organisation]\nservers = ["http://a:1"]\n', "must start with https://"),
            ('[organisation]\nservers = ["https://a/x"]\n', "no path"),
            ('[organisation]\nservers = []\n', "is empty"),
            ('[organisation]\ntimeout = 3\n', "servers: is missing")):
        with pytest.raises(ConfigError) as e:
            parse_config(text)
        assert problem in str(e.value), (text, str(e.value))


def test_the_tls_extension_carries_the_peer_certificate():
    import asyncio

    from token_agent.orgserver.tlsext import with_tls

    class SSLObject:
        def getpeercert(self, binary_form=False):
            return b"\x30\x03\x02\x01\x01"

        def version(self):
            return "TLSv1.3"

        def cipher(self):
            return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)

    class Transport:
        def __init__(self, sslobj):
            self.sslobj = sslobj

        def get_extra_info(self, name):
            return self.sslobj if name == "ssl_object" else None

    seen = []

    async def app(scope, receive, send):
        seen.append(scope)

    wrapped = with_tls(app, Transport(SSLObject()))
    asyncio.run(wrapped({"type": "http", "extensions": {"x": {}}}, None, None))
    tls = seen[0]["extensions"]["tls"]
    assert tls["client_cert_chain"] == [ssl.DER_cert_to_PEM_cert(b"\x30\x03\x02\x01\x01")]
    assert tls["tls_version"] == 0x0304 and seen[0]["extensions"]["x"] == {}
    assert with_tls(app, Transport(None)) is app  # plain TCP: nothing added


def test_sigterm_closes_open_channels_so_workstations_move_on(org_server, tmp_path):
    ws = join_workstation(tmp_path / "ws1", org_server, "ws1")
    channel = ws.client().connect("/v1/ping")
    channel.send({"ping": 1})
    assert channel.recv(timeout=10)["pong"] == 1
    started = time.monotonic()
    org_server.process.send_signal(15)
    with pytest.raises(ChannelClosed) as closed:
        channel.recv(timeout=15)
    assert closed.value.code == 1012  # "service restart": try another replica
    assert org_server.process.wait(15) == 0
    assert time.monotonic() - started < 10  # not the 20 s shutdown timeout


def test_server_run_without_its_files_says_what_to_do(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[server]\nlisten = "127.0.0.1:1"\ndir = "{tmp_path / "nothing"}"\n')
    out = run_cli(clean_env(config), "server", "run", expect=exitcodes.USAGE)
    assert "run `token-agent server init --dir DIR` first" in out.stderr
    bad = run_cli(clean_env(config), "server", "run", "--listen", "nowhere",
                  expect=exitcodes.USAGE)
    assert "is not host:port" in bad.stderr
    init_server_dir(tmp_path / "nothing")
    (tmp_path / "nothing" / "ca.key").chmod(0o640)
    lax = run_cli(clean_env(config), "server", "run", expect=exitcodes.USAGE)
    assert "can be read by others (mode 0o640)" in lax.stderr


def test_a_second_server_on_a_taken_port_exits_1_and_says_so(org_server, tmp_path):
    config = tmp_path / "second.toml"
    config.write_text(org_server.config.read_text())
    out = run_cli(clean_env(config), "server", "run", expect=exitcodes.ERROR)
    assert f"could not start on {org_server.url}" in out.stderr
    assert "address already in use" in out.stderr
    assert org_server.health()["ok"] is True


def test_the_refusal_holds_when_the_data_directory_is_named_on_the_command_line(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[organisation]\nservers = ["https://org1.example:8443"]\n')
    out = run_cli(clean_env(config, TOKEN_AGENT_DATA_DIR=str(tmp_path / "d")), "users", "list",
                  expect=exitcodes.ORGANISATION)
    assert "belongs to an organisation" in out.stderr
    run_cli(clean_env(config), "--data-dir", str(tmp_path / "d"), "users", "add", "bob",
            expect=exitcodes.ORGANISATION)


def test_the_server_sends_no_tls_session_tickets(org_server):
    """TLS 1.3 session tickets arrive after the handshake, while a workstation's
    websockets.sync client writes its upgrade from one thread and reads from another on the
    same TLS connection (not safe in OpenSSL: the shift-change benchmark lost upgrades to
    "SSL internal error" / "bad record mac"). The workstations never resume a session, so the
    server sends none."""
    ctx = ssl.create_default_context(cafile=str(org_server.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    raw = socket.create_connection(("127.0.0.1", org_server.port), timeout=20)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):  # the tickets, if any, come before the answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        assert tls.version() == "TLSv1.3"
        assert tls.session is not None and not tls.session.has_ticket
