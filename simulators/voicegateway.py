"""A local voice gateway for phone call approval: it "calls", "hears" a key and reports it.

    python -m simulators.voicegateway --port P --webhook URL --secret-file F --answer '#'|'1'|none

It serves HTTP on 127.0.0.1:P:

* ``POST /v1/calls`` (any path but ``/control/...``): a call request as
  ``token_agent.delivery.HttpGateway.start_call`` sends it (``{"to", "say", "gather",
  "call_id"}``). It answers ``{"id": "gw-..."}`` at once and, after ``--delay`` seconds,
  POSTs the result to ``--webhook``, signed like a real gateway
  (``X-Token-Agent-Signature: t=<unix>,v1=<HMAC-SHA256 hex>``, the secret from
  ``--secret-file``): ``--answer '#'`` or any other key gives ``{"result": "pressed",
  "digits": KEY}``, ``none`` gives ``{"result": "no-answer"}``, ``busy`` ``{"result":
  "busy"}``.
* ``POST /control/answer`` with ``{"answer": "#"}`` (and optionally ``"delay": seconds``):
  change the answer for the next calls.
* ``GET /calls``: the calls received and the webhook's answers (status and body), as JSON.

The webhook's TLS certificate is checked against ``--ca-file`` (the tests' CA) or the
system's roots. A test peer: never used by production code.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class Gateway:
    def __init__(self, webhook: str, secret: bytes, answer: str, delay: float,
                 ca_file: str | None):
        self.webhook = webhook
        self.secret = secret
        self.answer = answer
        self.delay = delay
        self.context = ssl.create_default_context(cafile=ca_file)
        self.calls: list[dict] = []
        self.lock = threading.Lock()

    def result_for(self, call_id: str) -> dict:
        if self.answer == "none":
            return {"call_id": call_id, "result": "no-answer", "digits": None}
        if self.answer == "busy":
            return {"call_id": call_id, "result": "busy", "digits": None}
        return {"call_id": call_id, "result": "pressed", "digits": self.answer}

    def report(self, record: dict, result: dict) -> None:
        time.sleep(self.delay)
        body = json.dumps(result).encode()
        request = urllib.request.Request(
            self.webhook, data=body, method="POST",
            headers={"Content-Type": "application/json",
                     "X-Token-Agent-Signature": signature(self.secret, body, int(time.time()))})
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as response:
                status, answer = response.status, response.read(4096).decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            status, answer = e.code, e.read(4096).decode("utf-8", "replace")
        except OSError as e:
            status, answer = 0, f"{type(e).__name__}: {e}"
        with self.lock:
            record["webhook"] = {"status": status, "body": answer}


def make_handler(gateway: Gateway):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # noqa: ANN001
            sys.stderr.write("voicegateway: " + (fmt % args) + "\n")

        def _json(self, status: int, data) -> None:  # noqa: ANN001
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                return json.loads(self.rfile.read(min(length, 65536)) or b"{}")
            except ValueError:
                return None

        def do_GET(self):  # noqa: N802
            if self.path == "/calls":
                with gateway.lock:
                    self._json(200, list(gateway.calls))
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            data = self._body()
            if not isinstance(data, dict):
                self._json(400, {"error": "not JSON"})
                return
            if self.path == "/control/answer":
                gateway.answer = str(data.get("answer", "#"))
                if isinstance(data.get("delay"), (int, float)):
                    gateway.delay = min(60.0, max(0.0, float(data["delay"])))
                self._json(200, {"answer": gateway.answer, "delay": gateway.delay})
                return
            call_id = data.get("call_id")
            if not isinstance(call_id, str) or not data.get("to"):
                self._json(400, {"error": "a call needs call_id and to"})
                return
            record = {"to": data["to"], "say": data.get("say"), "call_id": call_id,
                      "answer": gateway.answer, "authorization":
                      bool(self.headers.get("Authorization"))}
            with gateway.lock:
                gateway.calls.append(record)
            result = gateway.result_for(call_id)
            threading.Thread(target=gateway.report, args=(record, result), daemon=True).start()
            self._json(200, {"id": f"gw-{uuid.uuid4().hex[:12]}"})

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.voicegateway",
                                     description="A local voice gateway that posts a DTMF result")
    parser.add_argument("--port", type=int, required=True, help="0: any free port (printed)")
    parser.add_argument("--webhook", required=True, help="the server's /hooks/voice URL")
    parser.add_argument("--secret-file", required=True, type=Path)
    parser.add_argument("--answer", default="#", help="'#', another key, 'none' or 'busy'")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds before the result")
    parser.add_argument("--ca-file", default=None, help="CA certificates for the webhook's TLS")
    args = parser.parse_args(argv)
    secret = args.secret_file.read_text(encoding="utf-8").strip().encode()
    gateway = Gateway(args.webhook, secret, args.answer, args.delay, args.ca_file)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(gateway))
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
