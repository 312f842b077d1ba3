"""The main job's demonstration, on the simulators only: no hardware needed.

    python -m token_agent.demo        (what `scripts/demo.sh` runs)

It starts a virtual FIDO2 key on the loopback TCP transport, finds it the way the agent finds
any key (``drivers.fido.discovery`` with ``TOKEN_AGENT_SIM_KEYS``), and runs a WebAuthn
registration and two authentications against it with python-fido2's client and server,
printing what happens at each step and checking every result: the packed attestation chains
to the simulator root, the assertion signatures verify, the signature counter goes up, and a
wrong PIN is refused with the number of tries left.

Exit status 0 when every step behaved as it should, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.ctap import CtapError
from fido2.ctap2 import Ctap2
from fido2.ctap2.pin import ClientPin
from fido2.server import Fido2Server

from drivers.fido.discovery import SIM_KEYS_ENV, list_devices
from simulators.key.attestation import root_certificate
from simulators.key.control import KeyControl
from simulators.key.device import create_virtual_key
from simulators.key.transport import KeyServer

DEMO_PIN = "246810"
RP = {"id": "demo-trust.nhs.example", "name": "Demo NHS Trust"}
ORIGIN = f"https://{RP['id']}"
USER = {"id": b"user-0001-alice", "name": "alice.smith", "displayName": "Dr Alice Smith"}


class DemoUser(UserInteraction):
    """The clinician at the workstation: types the PIN and touches the key when asked.

    The touch is real as far as the key is concerned: the demo presses the virtual key's
    button through its control interface, only after the key has asked for it (keepalive
    UPNEEDED), as a person would.
    """

    def __init__(self, say: Callable[[str], None], control: KeyControl, pin: str) -> None:
        self.say, self.control, self.pin = say, control, pin

    def prompt_up(self) -> None:
        self.say("   key: Touch your security key  (the demo touches it in 0.3 s)")
        threading.Timer(0.3, self.control.touch).start()

    def request_pin(self, permissions, rp_id) -> str:
        self.say("   agent: PIN requested; the clinician types it (never shown, never logged)")
        return self.pin


def run(port: int, control_port: int, out=sys.stdout, *, serve_pages: bool = False) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    def check(ok: bool, what: str) -> None:
        if not ok:
            raise AssertionError(what)
        say(f"   ok: {what}")

    say("token-agent demonstration: a virtual FIDO2 key, register and authenticate")
    key = create_virtual_key(presence="manual")
    with KeyServer(key, port=port, control_port=control_port) as server:
        control = KeyControl(server.control_port)
        address = f"127.0.0.1:{server.port}"
        say(f"1. virtual key started: HID reports on {address}, control {control.url}/")

        devices = list_devices({**os.environ, SIM_KEYS_ENV: address})
        sims = [d for d in devices if str(d.descriptor.path).startswith("sim:")]
        check(len(sims) == 1, f"discovery with {SIM_KEYS_ENV}={address} finds the key")
        device = sims[0]
        say(f"2. found {device.descriptor.product_name!r} at {device.descriptor.path}")

        ctap = Ctap2(device)
        info = ctap.info
        say(f"3. getInfo: versions {info.versions}, AAGUID {info.aaguid}")
        say(f"   algorithms {[a['alg'] for a in info.algorithms]}, extensions {info.extensions}")

        ClientPin(ctap).set_pin(DEMO_PIN)
        check(ctap.get_info().options["clientPin"], "PIN set on the key (8 tries)")

        user = DemoUser(say, control, DEMO_PIN)
        client = Fido2Client(
            device, client_data_collector=DefaultClientDataCollector(ORIGIN), user_interaction=user
        )
        server_rp = Fido2Server(RP, attestation="direct")

        say(f"4. register: {USER['displayName']} at {RP['id']} (discoverable, PIN required)")
        options, state = server_rp.register_begin(
            USER, resident_key_requirement="required", user_verification="required"
        )
        result = client.make_credential(options.public_key)
        auth_data = server_rp.register_complete(state, result)
        cred = auth_data.credential_data
        att = result.response.attestation_object
        check(att.fmt == "packed", "packed attestation, signed by the key's attestation key")
        leaf = x509.load_der_x509_certificate(att.att_stmt["x5c"][0])
        # raises InvalidSignature unless the simulator root issued the attestation certificate
        root_certificate().public_key().verify(
            leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256())
        )
        say(f"   ok: attestation certificate '{leaf.subject.rfc4514_string()}' "
            "chains to the simulator root")
        check(cred.aaguid == info.aaguid, f"credential AAGUID {cred.aaguid} is the model's")
        say(f"   credential id {cred.credential_id.hex()[:24]}..., "
            f"public key alg {cred.public_key[3]}")

        counters = []
        for n in (1, 2):
            say(f"5.{n} authenticate (usernameless: the key says who it is)")
            options, state = server_rp.authenticate_begin(user_verification="required")
            response = client.get_assertion(options.public_key).get_response(0)
            server_rp.authenticate_complete(state, [cred], response)
            flags = response.response.authenticator_data.flags
            counters.append(response.response.authenticator_data.counter)
            check(response.response.user_handle == USER["id"],
                  f"signature verifies; user handle names {USER['name']}")
            check(flags & 0x05 == 0x05, "user present and verified (touch + PIN)")
            say(f"   signature counter {counters[-1]}")
        check(counters[1] > counters[0], "signature counter increased (no cloned key)")

        say("6. a wrong PIN")
        try:
            ClientPin(ctap).get_pin_token("000000")
        except CtapError as e:
            retries = ClientPin(ctap).get_pin_retries()[0]
            check(e.code == CtapError.ERR.PIN_INVALID,
                  f"refused: Wrong PIN - {retries} tries left")
        else:
            raise AssertionError("a wrong PIN was accepted")
        device.close()
    agent_demo(say, check)
    mfa_demo(say, check)
    from .demo_workstation import workstation_demo

    workstation_demo(say, check, step=9)
    from .demo_organisation import organisation_demo

    organisation_demo(say, check, step=10)
    from .demo_pages import pages_demo

    pages_demo(say, check, step=11, serve=serve_pages)
    say("demonstration complete: every step verified")
    return 0


def agent_demo(say, check) -> None:
    """Part two: the agent itself enrols a key for a user and logs her in, and notices a
    cloned key; its store lives in a temporary directory."""
    import shutil
    import tempfile
    from pathlib import Path

    from drivers.fido.keys import open_single_key
    from token_agent.ceremonies.key import enrol_key, login_with_key
    from token_agent.store import Store

    say("7. the agent: a user, her key, her logins (store in a temporary directory)")
    tmp = Path(tempfile.mkdtemp(prefix="token-agent-demo-"))
    try:
        key_file = tmp / "alice-key.json"
        key = create_virtual_key(state_file=key_file, presence="auto")
        with KeyServer(key, port=0, control_port=None) as server, \
                Store.open(tmp / "token-agent.db") as store:
            env = {SIM_KEYS_ENV: f"127.0.0.1:{server.port}"}
            store.set_setting("rp_id", RP["id"])
            store.add_user("alice", display_name=USER["displayName"], roles=["clinician"])
            with open_single_key(env, on_touch=None) as fido_key:
                ClientPin(Ctap2(fido_key.device)).set_pin(DEMO_PIN)
                enrolled = enrol_key(store, fido_key, "alice", name="blue key",
                                     pin_provider=lambda: DEMO_PIN)
                check(enrolled.discoverable and enrolled.user_verified,
                      f"enrolled {enrolled.name!r} for alice (discoverable, PIN verified, "
                      f"AAGUID {enrolled.aaguid})")
                for who in ("alice", None):
                    outcome = login_with_key(store, fido_key, username=who,
                                             pin_provider=lambda: DEMO_PIN)
                    check(outcome.ok and outcome.user == "alice" and outcome.multi_factor,
                          f"login {'as alice' if who else 'tap-and-go'}: "
                          f"{' + '.join(f.value for f in outcome.factors)} "
                          f"in {outcome.detail['ceremony_ms']} ms")
            shutil.copy(key_file, tmp / "clone.json")  # an attacker copies the key's secrets
            with open_single_key(env, on_touch=None) as fido_key:
                check(login_with_key(store, fido_key, username="alice",
                                     pin_provider=lambda: DEMO_PIN).ok,
                      "the genuine key logs in again (its counter moves on)")
        clone = create_virtual_key(state_file=tmp / "clone.json", presence="auto")
        with KeyServer(clone, port=0, control_port=None) as server, \
                Store.open(tmp / "token-agent.db") as store:
            env = {SIM_KEYS_ENV: f"127.0.0.1:{server.port}"}
            with open_single_key(env, on_touch=None) as fido_key:
                outcome = login_with_key(store, fido_key, username="alice",
                                         pin_provider=lambda: DEMO_PIN)
            check(not outcome.ok and outcome.reason.value == "counter-regression",
                  f"a clone of the key is refused: {outcome.message}")
            events = [f"{e.kind}:{e.outcome}" for e in reversed(store.list_events())]
            say(f"   audit log: {', '.join(events)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _ScriptedPerson:
    """The clinician at the login prompt, answering from a script (never printing secrets)."""

    def __init__(self, say, answers: list[str]) -> None:
        self.say, self.answers = say, list(answers)

    def info(self, message: str) -> None:
        self.say(f"   agent: {message}")

    def secret(self, prompt: str) -> str | None:
        self.say(f"   agent asks: {prompt} (typed, not shown)")
        return self.answers.pop(0) if self.answers else None

    text = secret

    def choose(self, prompt: str, options, default: str) -> str | None:
        self.say(f"   agent offers: {prompt}: {', '.join(k for k, _ in options)} -> {default}")
        return default

    def show_qr(self, uri: str) -> None:
        from token_agent.factors.totp import qr_terminal

        self.say(qr_terminal(uri))


def mfa_demo(say, check) -> None:
    """Part three: password + authenticator app under the MFA policy, with its decisions,
    a replayed code, backup codes and a lockout."""
    import datetime as dt
    import shutil
    import tempfile
    from pathlib import Path

    from token_agent.agent import Agent
    from token_agent.ceremonies.login import Device, explain_for, login
    from token_agent.factors import backup, password, totp
    from token_agent.policy import parse_policy

    say("8. MFA policy: password + authenticator app (store in a temporary directory)")
    tmp = Path(tempfile.mkdtemp(prefix="token-agent-demo-mfa-"))
    try:
        policy = parse_policy('[reverification]\ntrusted_networks = ["10.0.0.0/8"]\n'
                              '[methods]\nallowed = ["sms", "totp", "push", "key", "card"]\n')
        agent = Agent.open(tmp, policy=policy, environ={})
        try:
            store, ctx = agent.store, agent.factors()
            user = store.add_user("bob", display_name="Dr Bob Jones", user_class="internal")
            password.set_password(ctx, user.id, "correct horse battery")
            pending = totp.begin_enrol(ctx, user.id)
            check(pending.uri.startswith("otpauth://totp/"),
                  "provisioning URI made; the QR code an authenticator app scans:")
            say(totp.qr_terminal(pending.uri))
            now = agent.now()
            check(totp.confirm_enrol(ctx, user.id, totp.code_at(pending.secret, now - 30)).ok,
                  "enrolment confirmed by the app's first code")
            home = Device("unmanaged", "bobs-laptop", "192.0.2.7")
            code = totp.code_at(pending.secret, now)
            person = _ScriptedPerson(say, ["correct horse battery", code])
            outcome = login(agent, "bob", interaction=person, device=home)
            check(outcome.ok and outcome.method == "password+totp" and outcome.multi_factor,
                  f"login from an unmanaged device: {outcome.method} "
                  f"({' + '.join(f.value for f in outcome.factors)})")
            replay = totp.verify(ctx, user.id, code)
            check(not replay.ok and replay.reason.value == "code-replayed",
                  f"the same code again is refused: {replay.message}")
            ward = Device("managed", "ward-pc-3", "10.4.2.9")
            for device, what in ((home, "the same laptop an hour later"),
                                 (ward, "a ward workstation bob never used")):
                agent.clock = lambda: now + 3600
                decision = explain_for(agent, "bob", device=device, primary="password")
                say(f"   policy for {what}: second factor "
                    f"{'required' if decision.mfa_required else 'not required'}")
                for rule in decision.rules:
                    say(f"     - {rule}")
            agent.clock = lambda: now
            _, codes = backup.generate(ctx, user.id)
            check(backup.verify(ctx, user.id, codes[0]).ok and
                  not backup.verify(ctx, user.id, codes[0]).ok,
                  "ten backup codes shown once; one works once")
            first = totp.verify(ctx, user.id, "000000")
            say(f"   a wrong code: {first.message}")
            results = [first]
            while not results[-1].locked_until and len(results) < 20:
                results.append(totp.verify(ctx, user.id, "000000"))
            check(results[-1].locked_until is not None and len(results) <= 10,
                  f"{len(results)} more wrong codes (the replay counted as one) lock the app: "
                  f"{results[-1].message}")
            check(totp.verify(ctx, user.id, totp.code_at(pending.secret, now + 30)).reason.value
                  == "method-locked", "while locked even the right code is refused")
            verified = store.verify_events()
            check(verified > 10, f"audit log: {verified} hash-chained events verified, "
                                 "no secret in any of them")
            when = dt.datetime.now(dt.timezone.utc).strftime("%H:%M UTC")
            say(f"   (done at {when})")
        finally:
            agent.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="token-agent demonstration on the simulators")
    parser.add_argument("--port", type=int, default=0, help="HID TCP port (0: any free port)")
    parser.add_argument("--control-port", type=int, default=0, help="control port (0: any free)")
    parser.add_argument("--serve-pages", action="store_true",
                        help="at the end, keep the organisation's web pages served until Ctrl-C")
    args = parser.parse_args(argv)
    try:
        return run(args.port, args.control_port, serve_pages=args.serve_pages)
    except Exception as e:  # noqa: BLE001 (any failure fails the demonstration, with its name)
        print(f"demonstration FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
