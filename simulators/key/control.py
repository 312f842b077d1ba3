"""Client of a running virtual key's HTTP control interface (``token-agent sim key ...``).

    control = KeyControl(port=35961)
    control.set_presence("manual")
    control.touch()
    control.set_faults(fail_next=1, fail_status=0x31)
    control.status()["waiting_for_touch"]
"""

from __future__ import annotations

import json
from typing import Any

LOOPBACK = "127.0.0.1"
#: default TCP port of the virtual key's HID reports
DEFAULT_HID_PORT = 35962
#: default TCP port of its HTTP control interface
DEFAULT_CONTROL_PORT = 35961
#: header every state-changing control request must carry (with the value "1"): a web page
#: cannot add a custom header to a cross-site request without a CORS preflight, which the
#: control interface never grants
CONTROL_HEADER = "X-Token-Agent-Sim"


class ControlError(Exception):
    """The simulator answered with an error (``status`` is the HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SimulatorNotRunning(ControlError):
    """Nothing answers on the control port."""

    def __init__(self, url: str, reason: object) -> None:
        super().__init__(
            0,
            f"no virtual key control interface at {url} ({reason}); "
            "start one with `token-agent sim key serve`",
        )


class KeyControl:
    """Talks to ``KeyServer``'s control interface at http://host:port/."""

    def __init__(
        self, port: int = DEFAULT_CONTROL_PORT, host: str = LOOPBACK, timeout: float = 5.0
    ) -> None:
        host_part = f"[{host}]" if ":" in host else host
        self.url = f"http://{host_part}:{port}"
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> dict:
        """One request; returns the JSON answer. Raises SimulatorNotRunning or ControlError."""
        import urllib.error  # here, not at the top: the CLI imports this module's constants
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header(CONTROL_HEADER, "1")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error") or e.reason
            except (ValueError, AttributeError):
                message = e.reason
            raise ControlError(e.code, f"{method} {path}: {message}") from None
        except urllib.error.URLError as e:
            raise SimulatorNotRunning(self.url, e.reason) from None
        except (ConnectionError, TimeoutError) as e:
            raise SimulatorNotRunning(self.url, e) from None

    def status(self) -> dict:
        return self.request("GET", "/")

    def touch(self) -> dict:
        """A tap on the button."""
        return self.request("POST", "/touch")

    def press(self) -> dict:
        """Hold the button down (every touch request is approved until :meth:`release`)."""
        return self.request("POST", "/press")

    def release(self) -> dict:
        return self.request("POST", "/release")

    def set_presence(self, mode: str) -> dict:
        return self.request("POST", f"/presence/{mode}")

    def power_cycle(self) -> dict:
        return self.request("POST", "/power-cycle")

    def unplug(self) -> dict:
        return self.request("POST", "/unplug")

    def plug(self) -> dict:
        return self.request("POST", "/plug")

    def faults(self) -> dict:
        return self.request("GET", "/faults")

    def set_faults(self, **fields: Any) -> dict:
        """Set FaultPlan fields (fail_next, fail_status, delay, drop_reports,
        corrupt_reports, unplug_after_reports)."""
        return self.request("POST", "/faults", fields)

    def clear_faults(self) -> dict:
        return self.request("POST", "/faults/clear")
