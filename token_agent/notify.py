"""Telling a user that something happened to their account, on the channels they verified:
"a new sign-in from somewhere unusual", "your password was reset", "a method was removed".

    told = tell_user(agent, user, "Your password was reset", "Your password was reset ...")

A notice goes to each confirmed, unsuspended email and text-message contact of the user
(once per destination; ``exclude_method_id``: leave one out, e.g. the contact just used),
through the policy's delivery gateways (``token_agent.delivery``: the same SMTP server and
SMS gateway that carry the codes). It carries no secret and no code. Delivery is best
effort: a failure is logged (the destination masked) and never raised, because the change
being told about has already happened. Returns the masked destinations that were told.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .delivery import DEFAULT_SENDER_NAME, DeliveryError, mask_destination

log = logging.getLogger("token_agent.notify")

#: the channels notices go to: text-message and email contacts (a voice call or a messaging
#: app for a notice would be an intrusion)
NOTICE_CHANNELS = ("email", "sms")
MAX_TEXT = 600


@dataclass(frozen=True)
class Notice:
    """A message without a code, shaped as ``delivery.Message`` for the gateways (``text``,
    ``subject``; ``code`` is empty and never shown)."""

    channel: str
    destination: str
    title: str
    body: str
    sender_name: str = DEFAULT_SENDER_NAME
    purpose: str = "notice"
    code: str = ""
    ttl_seconds: int = 600

    def subject(self) -> str | None:
        return f"{self.sender_name}: {self.title}" if self.channel == "email" else None

    def text(self) -> str:
        if self.channel == "email":
            return (f"{self.body}\n\nIf this was not you, contact your IT service desk "
                    f"straight away.\n\n{self.sender_name}\n")
        return f"{self.sender_name}: {self.body} Not you? Contact your IT service desk."[:MAX_TEXT]

    def spoken_code(self) -> str:  # the gateways' interface; a notice is never spoken
        return ""


def tell_user(agent: Any, user: Any, subject: str, text: str, *,
              exclude_method_id: int | None = None) -> list[str]:
    """Send the notice to the user's verified email and SMS contacts; the masked
    destinations told (see the module docstring)."""
    from .factors import codes

    delivery = agent.delivery
    if delivery is None:
        log.info("no delivery gateways: %s was not told %r", user.username, subject)
        return []
    told: list[str] = []
    seen: set[tuple[str, str]] = set()
    for contact in codes.list_contacts(agent.factors(), user.id):
        m = contact.method
        if (contact.channel not in NOTICE_CHANNELS or not m.confirmed or m.flagged
                or m.id == exclude_method_id or (contact.channel, contact.destination) in seen):
            continue
        seen.add((contact.channel, contact.destination))
        hint = mask_destination(contact.channel, contact.destination)
        notice = Notice(contact.channel, contact.destination, subject, text,
                        sender_name=delivery.config.sender_name)
        try:
            delivery.send(notice)
        except (DeliveryError, ValueError) as e:
            log.warning("could not tell %s (%s) %r: %s", user.username, hint, subject,
                        getattr(e, "reason", e))
            continue
        told.append(hint)
    return told
