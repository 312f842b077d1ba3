"""Part two of the demonstration: the workstation, from nothing, on the simulators.

A virtual FIDO2 key is started and a virtual NHS-style smartcard (issued by a simulated PKI)
is inserted into the real pcscd through vpcd; the agent's service (``token-agent serve``) is
started as its own process; a user is enrolled with a key, a card and an authenticator app
(the QR code shown) through the service's socket; she then logs in each way, the policy's
decision is shown, and the card is pulled out: the service reports the removal and locks the
card's session. Everything lives in a temporary directory and is stopped and removed at the
end, pcscd included when it was started here.

pcscd: the machine's, when it runs (or is socket-activated); else, as root, one started here
(``simulators.card.pcscd``). vpcd's first reader slot is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

KEY_PIN = "246810"
CARD_PIN = "314159"
PASSWORD = "correct horse battery"
ALICE_UUID = "555123456789"
SERVICE_START_TIMEOUT = 30.0


def _answering(say: Callable[[str], None], answers: dict[str, str]) -> Callable[[dict], str | None]:
    """Answer the service's prompts as the clinician would: by what the prompt asks for."""

    def answer(event: dict) -> str | None:
        message = event.get("message", "")
        for needle, value in answers.items():
            if needle.lower() in message.lower():
                say(f"   service asks: {message} -> typed (not shown)")
                return value
        if event.get("kind") == "choose":
            say(f"   service offers: {message} -> {event.get('default')}")
            return event.get("default")
        say(f"   service asks: {message} -> no answer")
        return None

    return answer


def _show(say: Callable[[str], None]) -> Callable[[dict], None]:
    def on_event(event: dict) -> None:
        if event["event"] == "info":
            say(f"   service says: {event['message']}")
        elif event["event"] == "qr":
            say(event.get("text", ""))
    return on_event


def workstation_demo(say: Callable[[str], None], check: Callable[[bool, str], None],
                     step: int = 9) -> None:
    from fido2.ctap2 import Ctap2
    from fido2.ctap2.pin import ClientPin
    from fido2.hid import CtapHidDevice

    from drivers.fido.sim import SocketHidConnection, sim_descriptor
    from simulators.card.card import VirtualCard
    from simulators.card.issuance import issue_card
    from simulators.card.pcscd import Pcscd
    from simulators.card.pki import init_ca, issuing_cert_path, root_cert_path
    from simulators.card.vpcd import VpcdBridge
    from simulators.key import KeyServer, create_virtual_key

    from .ceremonies.card import set_card_setting
    from .factors import password, totp
    from .paths import store_path
    from .service.client import Client, ServiceUnavailable, wait_until_serving
    from .store import Store

    say(f"{step}. the workstation: virtual key and card, the agent's service, a user enrolled "
        "and logging in each way")
    tmp = Path(tempfile.mkdtemp(prefix="token-agent-demo-ws-"))
    os.chmod(tmp, 0o755)  # the socket's directory: reachable by every local user
    pcscd = bridge = service = None
    key = create_virtual_key(presence="auto")
    key_server = KeyServer(key, port=0, control_port=None)
    try:
        pcscd = Pcscd(log=tmp / "pcscd.log").start()
        reader = pcscd.reader(0)
        check(True, f"pcscd {'started here' if pcscd.started_here else 'already running'}; "
                    f"reader {reader!r}")

        ca_dir = tmp / "ca"
        init_ca(ca_dir)
        card_file = tmp / "alice.card"
        issue_card(ca_dir, name="Dr Alice Smith", uuid=ALICE_UUID, pin=CARD_PIN, out=card_file)
        bridge = VpcdBridge(VirtualCard.load(card_file), slot=0).insert()
        check(bridge.inserted, f"a card issued by the simulated NHS PKI to Dr Alice Smith "
                               f"(UUID {ALICE_UUID}) is in {reader!r}")

        key_server.__enter__()
        address = f"127.0.0.1:{key_server.port}"
        holder = CtapHidDevice(sim_descriptor("127.0.0.1", key_server.port),
                               SocketHidConnection("127.0.0.1", key_server.port))
        ClientPin(Ctap2(holder)).set_pin(KEY_PIN)
        holder.close()
        check(True, f"virtual FIDO2 key on {address}, its PIN set")

        data = tmp / "data"
        data.mkdir(mode=0o700)
        with Store.open(store_path(data)) as store:
            set_card_setting(store, "card_trust_anchors", [str(root_cert_path(ca_dir))])
            set_card_setting(store, "card_intermediates", [str(issuing_cert_path(ca_dir))])
            # what locks the screen on a workstation is `loginctl lock-session`; here a
            # command that does nothing stands in for it (there is no graphical session)
            set_card_setting(store, "card_lock_command", "true")
            alice = store.add_user("alice", display_name="Dr Alice Smith", roles=["clinician"])
            store.add_card_identity(alice.id, uuid=ALICE_UUID, holder_name="Dr Alice Smith")
        socket_path = tmp / "agent.sock"
        config = tmp / "config.toml"
        config.write_text(
            f'[service]\nsocket = "{socket_path}"\n'
            f'[store]\ndata_dir = "{data}"\n'
            f'[workstation]\ndevice = "managed"\ndevice_id = "ward-7-bay-3"\n'
            f'[keys]\nsimulators = ["{address}"]\n'
            f'[cards]\nlock_command = "true"\n')
        log = tmp / "service.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_AGENT_")}
        with open(log, "wb") as out:
            service = subprocess.Popen(
                [sys.executable, "-m", "token_agent", "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        try:
            wait_until_serving(socket_path, process=service, timeout=SERVICE_START_TIMEOUT)
        except ServiceUnavailable as e:
            raise RuntimeError(f"{e}: {log.read_text(errors='replace')[-2000:]}") from None
        check(True, f"the service runs (pid {service.pid}), API on {socket_path}")

        # The admin's part, done with the library on the service's store (the CLI does the
        # same): alice's password.
        from .agent import Agent

        agent = Agent.open(data, environ={})
        try:
            password.set_password(agent.factors(), alice.id, PASSWORD)
        finally:
            agent.close()

        with Client(socket_path, timeout=60) as client, \
                Client(socket_path, timeout=60) as watcher:
            hello = client.request("hello")
            say(f"   hello: agent {hello['agent']}, caller {hello['peer']['user']} "
                f"({', '.join(hello['peer']['roles'])})")
            watcher.request("events.subscribe")

            # -- enrolment: key, authenticator app (the card identity was enrolled above) ----
            login = client.request("enrol.key", user="alice", name="blue key")["login"]
            outcome = client.run_ceremony(login, _answering(say, {"PIN": KEY_PIN}), _show(say))
            check(outcome["ok"], f"enrolled alice's security key {outcome.get('credential') or 'blue key'!r} "
                                 "through the service")
            enrolment = client.request("enrol.totp", user="alice")
            say("   the QR code alice scans with her authenticator app:")
            say(enrolment.get("text", ""))
            confirmed = client.request("enrol.totp.confirm", user="alice",
                                       code=totp.code_at(enrolment["secret"], time.time() - 30))
            check(confirmed["ok"], "authenticator app confirmed by its first code")

            # -- logins ----------------------------------------------------------------------
            outcome = client.login("alice", _answering(say, {"PIN": KEY_PIN}),
                                   on_event=_show(say), primary="key")
            check(outcome["ok"] and outcome["detail"].get("second") is None,
                  "login with the key and its PIN: two factors, no second challenge")
            outcome = client.login(None, _answering(say, {"PIN": CARD_PIN}), on_event=_show(say),
                                   primary="card")
            check(outcome["ok"] and outcome["user"] == "alice",
                  f"login by inserting the card and typing its PIN: {outcome['user']}, "
                  f"session {outcome.get('session')}")
            card_session = outcome.get("session")
            code = totp.code_at(enrolment["secret"], time.time())
            outcome = client.login(
                "alice", _answering(say, {"password": PASSWORD, "authenticator": code}),
                on_event=_show(say), primary="password",
                device={"kind": "unmanaged", "device_id": "alice-laptop", "network": "192.0.2.7"})
            check(outcome["ok"] and outcome["method"] == "password+totp",
                  "login from her own laptop: password, then the authenticator app")

            # -- a policy decision -----------------------------------------------------------
            decision = client.request("policy.explain", user="alice",
                                      device={"kind": "unmanaged", "device_id": "internet-cafe",
                                              "network": "203.0.113.9"})
            say("   policy for alice on an unknown device on the internet:")
            for line in decision.get("text", "").splitlines():
                say(f"     {line}")
            check(decision["mfa_required"], "a second factor is required there")

            # -- the card leaves -------------------------------------------------------------
            pulled = time.monotonic()
            bridge.remove()
            seen: dict[str, dict] = {}
            deadline = time.monotonic() + 10
            while "session.locked" not in seen and time.monotonic() < deadline:
                try:
                    event = watcher.next_event(timeout=max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    break
                seen.setdefault(event["event"], event)
                if event["event"] in ("card.removed", "session.locked"):
                    say(f"   event: {event['event']} {event.get('reader', '')}"
                        + (f" (session {event.get('session')}, lock started after "
                           f"{event.get('latency_ms')} ms)" if event["event"] == "session.locked"
                           else ""))
            check("card.removed" in seen and "session.locked" in seen,
                  f"card pulled out: removal seen and the card's session locked "
                  f"{(time.monotonic() - pulled) * 1000:.0f} ms later")
            sessions = client.request("session.state", user="alice")["sessions"]
            state = {s["id"]: s["state"] for s in sessions}
            check(card_session in state and state[card_session] in ("locked", "ended"),
                  f"the card's session is now {state.get(card_session)}")

        service.terminate()
        check(service.wait(15) == 0, "the service stopped cleanly (SIGTERM)")
        service = None
        with Store.open(store_path(data)) as store:
            count = store.verify_events()
        check(count > 0, f"audit log intact: {count} hash-chained events")
    finally:
        if service is not None and service.poll() is None:
            service.kill()
            service.wait(5)
        if bridge is not None and bridge.inserted:
            try:
                bridge.remove()
            except Exception:  # noqa: BLE001 (cleaning up whatever state the demo is in)
                pass
        try:
            key_server.__exit__(None, None, None)
        except Exception:  # noqa: BLE001
            pass
        if pcscd is not None:
            pcscd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
