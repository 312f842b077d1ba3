"""A workstation login through the real PAM stack: pamtester -> pam_python.so ->
pam/pam_token_agent.py -> the service's socket -> a virtual key (automatic touch, PIN).

    sudo .venv/bin/python benchmarks/bench_pam.py [--runs 30]

Root: it writes a PAM service file into /etc/pam.d (removed at the end). Each run is one
``pamtester <service> alice authenticate`` process with the key's PIN on standard input;
its wall time is measured from start to exit. The service keeps running between runs, as on
a workstation. Target (issue 7): median 300 ms or less.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PIN = "246810"
MODULE = ROOT / "pam" / "pam_token_agent.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark writes a PAM service file to /etc/pam.d")
    for need in ("pamtester",):
        if shutil.which(need) is None:
            raise SystemExit(f"{need} is missing: apt-get install libpam-python pamtester")
    if not any(Path(d, "pam_python.so").exists() for d in ("/lib/security",
                                                             "/lib/x86_64-linux-gnu/security")):
        raise SystemExit("pam_python.so is missing: apt-get install libpam-python")

    from fido2.ctap2 import Ctap2
    from fido2.ctap2.pin import ClientPin
    from fido2.hid import CtapHidDevice

    from drivers.fido.discovery import SIM_KEYS_ENV
    from drivers.fido.keys import open_single_key
    from drivers.fido.sim import SocketHidConnection, sim_descriptor
    from simulators.key import KeyServer, create_virtual_key
    from token_agent.ceremonies.key import enrol_key
    from token_agent.paths import store_path
    from token_agent.service.client import ServiceUnavailable, wait_until_serving
    from token_agent.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-pam-"))
    os.chmod(tmp, 0o755)
    pam_name = f"token-agent-bench-{secrets.token_hex(4)}"
    pam_file = Path("/etc/pam.d") / pam_name
    service = None
    server = KeyServer(create_virtual_key(presence="auto"), port=0, control_port=None)
    server.__enter__()
    try:
        address = f"127.0.0.1:{server.port}"
        holder = CtapHidDevice(sim_descriptor("127.0.0.1", server.port),
                               SocketHidConnection("127.0.0.1", server.port))
        ClientPin(Ctap2(holder)).set_pin(PIN)
        holder.close()
        data = tmp / "data"
        data.mkdir(mode=0o700)
        with Store.open(store_path(data)) as store:
            store.add_user("alice")
            with open_single_key({SIM_KEYS_ENV: address}, on_touch=None) as key:
                enrol_key(store, key, "alice", name="key", pin_provider=lambda: PIN)

        socket_path = tmp / "agent.sock"
        config = tmp / "config.toml"
        config.write_text(f'[service]\nsocket = "{socket_path}"\n[store]\ndata_dir = "{data}"\n'
                          f'[keys]\nsimulators = ["{address}"]\n[logging]\nlevel = "warning"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_AGENT_")}
        log = open(tmp / "service.log", "wb")
        service = subprocess.Popen([sys.executable, "-m", "token_agent", "serve", "--config",
                                    str(config)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            wait_until_serving(socket_path, process=service)
        except ServiceUnavailable as e:
            raise SystemExit(f"the service did not start: {e}: {(tmp / 'service.log').read_text()[-2000:]}")

        pam_file.write_text(f"auth requisite pam_python.so {MODULE} socket={socket_path} "
                            "primary=key\naccount required pam_permit.so\n")
        walls = []
        for i in range(args.runs + 1):
            t = time.perf_counter()
            run = subprocess.run(["pamtester", pam_name, "alice", "authenticate"],
                                 input=PIN + "\n", capture_output=True, text=True, timeout=60)
            wall = time.perf_counter() - t
            if run.returncode != 0:
                raise SystemExit(f"run {i} failed ({run.returncode}): {run.stdout}{run.stderr}")
            if i:  # the first run warms the service's key pool and the page cache
                walls.append(wall)
        walls.sort()
        print(f"pamtester {pam_name} alice authenticate, {args.runs} runs (after one warm-up)")
        print(f"  median {statistics.median(walls) * 1000:.1f} ms, "
              f"p95 {walls[max(0, int(len(walls) * 0.95) - 1)] * 1000:.1f} ms, "
              f"min {walls[0] * 1000:.1f} ms, max {walls[-1] * 1000:.1f} ms")
        return 0
    finally:
        pam_file.unlink(missing_ok=True)
        if service is not None and service.poll() is None:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(15)
            except subprocess.TimeoutExpired:
                service.kill()
        server.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
