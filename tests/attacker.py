"""An ordinary local account attacking the service's socket, for the abuse tests and
``benchmarks/bench_service_abuse.py``. Standard library only: it drops to ``--uid`` first
(started as root), then does one bounded attack and prints a JSON summary on stdout.

    python tests/attacker.py --uid 65534 --socket S --seconds 3 flood --threads 2
    python tests/attacker.py --uid 65534 --socket S --seconds 3 hold --count 8
    python tests/attacker.py --uid 65534 --socket S pipeline --count 800
    python tests/attacker.py --uid 65534 --socket S --seconds 3 refused --name-size 7000

flood      connect and close in a loop (``--threads`` of them), as fast as it goes
hold       open ``--count`` connections, send nothing, keep them ``--seconds``; reports how
           many the service let in and how many it closed meanwhile
pipeline   ``--count`` ``login.start`` for oneself written at once on one connection, then
           the answers read (``--seconds`` at most), then the connection kept ``--linger``
           seconds; reports the answers by error code
refused    requests the caller may not make (``methods.list`` for another user named by
           ``--name-size`` characters) on one connection, as fast as it goes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time


def drop(uid: int) -> None:
    if os.geteuid() == 0 and uid != 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    assert os.geteuid() == uid, "could not become the attacking user"


def connect(path: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def flood(path: str, seconds: float, threads: int) -> dict:
    counts = {"connected": 0, "failed": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop() -> None:
        ok = bad = 0
        while time.monotonic() < deadline:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect(path)
                ok += 1
            except OSError:
                bad += 1
            finally:
                s.close()
        with lock:
            counts["connected"] += ok
            counts["failed"] += bad

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return counts


def _closed(s: socket.socket) -> bool:
    """Whether the service closed this connection (an error line and EOF, or EOF)."""
    s.setblocking(False)
    try:
        s.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def hold(path: str, seconds: float, count: int) -> dict:
    socks, failed = [], 0
    for _ in range(count):
        try:
            socks.append(connect(path))
        except OSError:
            failed += 1
    time.sleep(0.3)
    admitted = [s for s in socks if not _closed(s)]
    time.sleep(seconds)
    closed = sum(1 for s in admitted if _closed(s))
    for s in socks:
        s.close()
    return {"admitted": len(admitted), "refused": len(socks) - len(admitted) + failed,
            "closed_meanwhile": closed}


def pipeline(path: str, seconds: float, count: int, linger: float = 0.0) -> dict:
    try:
        s = connect(path)
        data = b"".join(json.dumps({"id": i, "op": "login.start"}).encode() + b"\n"
                        for i in range(1, count + 1))
        s.sendall(data)
    except OSError as e:  # turned away (too many connections, the service overloaded)
        return {"answered": 0, "codes": {}, "closed": str(e)}
    codes: dict[str, int] = {}
    answered = 0
    buffer = b""
    deadline = time.monotonic() + seconds
    s.settimeout(0.5)
    while answered < count and time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            message = json.loads(line)
            if message.get("id") is None:
                continue
            answered += 1
            code = "ok" if message.get("ok") else message["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
    time.sleep(linger)  # its logins stay running (at their first prompt) meanwhile
    s.close()
    return {"answered": answered, "codes": codes}


def refused(path: str, seconds: float, name_size: int) -> dict:
    name = "x" * name_size
    request = json.dumps({"id": 1, "op": "methods.list", "user": name}).encode() + b"\n"
    sent = 0
    codes: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    s = connect(path)
    buffer = b""
    while time.monotonic() < deadline:
        try:
            s.sendall(request)
            sent += 1
            while b"\n" not in buffer:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("closed")
                buffer += chunk
        except OSError:
            s.close()
            s = connect(path)
            buffer = b""
            continue
        line, buffer = buffer.split(b"\n", 1)
        message = json.loads(line)
        code = "ok" if message.get("ok") else message["error"]["code"]
        codes[code] = codes.get(code, 0) + 1
    s.close()
    return {"sent": sent, "codes": codes}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("action", choices=("flood", "hold", "pipeline", "refused"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--name-size", type=int, default=7000)
    p.add_argument("--linger", type=float, default=0.0,
                   help="pipeline: seconds to keep the connection open after the answers")
    a = p.parse_args()
    drop(a.uid)
    if a.action == "flood":
        out = flood(a.socket, a.seconds, a.threads)
    elif a.action == "hold":
        out = hold(a.socket, a.seconds, a.count)
    elif a.action == "pipeline":
        out = pipeline(a.socket, a.seconds, a.count, a.linger)
    else:
        out = refused(a.socket, a.seconds, a.name_size)
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
