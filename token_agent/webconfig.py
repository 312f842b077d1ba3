"""config.toml's ``[web]`` table: the organisation server's pages (``token_agent/web``).

```toml
[web]
public_url = "https://login.trust.nhs.uk:8443"  # the address people type: the WebAuthn
                                        # origin, and its host the RP ID
                                        # [https://localhost:<the listen port>]
idle_minutes = 15                       # a browser session ends after this long unused (1-240)
absolute_hours = 8                      # and this long after sign-in, whatever (1-24)
signin_minutes = 5                      # a sign-in in progress waits this long for the
                                        # person's next answer (1-30)
max_signins = 200                       # sign-ins in progress at once, per replica (1-10000)
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

WEB_KEYS = ("public_url", "idle_minutes", "absolute_hours", "signin_minutes", "max_signins")


@dataclass(frozen=True)
class WebConfig:
    public_url: str | None = None  # None: https://localhost:<listen port>
    idle_minutes: float = 15.0
    absolute_hours: float = 8.0
    signin_minutes: float = 5.0
    max_signins: int = 200

    def origin(self, listen_port: int) -> str:
        """The pages' origin: scheme://host[:port] of ``public_url``."""
        if not self.public_url:
            return f"https://localhost:{listen_port}"
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}"

    def rp_id(self, listen_port: int) -> str:
        """The WebAuthn relying party's id: the origin's host name."""
        return urlsplit(self.origin(listen_port)).hostname or "localhost"


def parse_web(p: Any, t: Mapping[str, Any]) -> WebConfig:
    """``[web]`` with ``config._Parser`` ``p`` (it collects the errors)."""
    url = p.string(t, "public_url", "web")
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.fragment or parts.username:
            p.error("web.public_url", f"{url!r} must be https://HOST[:PORT] (the address "
                                      "people open; browsers use WebAuthn on https only)")
            url = None
    return WebConfig(
        public_url=url.rstrip("/") if url else None,
        idle_minutes=p.number(t, "idle_minutes", "web", 15.0, 1, 240, " minutes"),
        absolute_hours=p.number(t, "absolute_hours", "web", 8.0, 1, 24, " hours"),
        signin_minutes=p.number(t, "signin_minutes", "web", 5.0, 1, 30, " minutes"),
        max_signins=p.number(t, "max_signins", "web", 200, 1, 10000, "", integer=True))


__all__ = ["WEB_KEYS", "WebConfig", "parse_web"]
