"""How the agent opens a card: THE ONE PLACE that turns ``[cards] driver`` and
``[cards] pkcs11_module`` (config.py) into an opener. Every front end and ceremony that opens a
card (the CLI's ``card`` commands and ``auth``, the socket service's card login, the login
through the organisation's server, the session's card re-check) takes its opener from here.

    open_card = card_opener(config.cards)   # CardsConfig, or None for the defaults (auto)
    with open_card("Virtual PCD 00 00") as session:   # or open_card(None): the first card
        session.driver                       # "piv" | "pkcs11": the path "auto" took

The session is the card-session interface of ``drivers.cardaccess`` (``PivSession`` or
``Pkcs11CardSession``); its errors are ``drivers.pcsc.errors.PcscError``\\ s (a PKCS#11 module
that is missing or sees no token: ``Pkcs11ModuleError`` / ``NoToken``, naming the module).
"""

from __future__ import annotations

from typing import Any, Callable

CardOpener = Callable[[str | None], Any]


def card_opener(cards=None) -> CardOpener:
    """``reader -> card session`` as ``cards`` (a ``config.CardsConfig``; None: the built-in
    defaults) says: its driver (piv | pkcs11 | auto) and PKCS#11 module."""
    from .config import CardsConfig

    cards = cards if cards is not None else CardsConfig()
    driver, module = cards.driver, cards.pkcs11_module

    def open_card(reader: str | None = None):
        from drivers.cardaccess import open_card as open_with

        return open_with(reader, driver=driver, pkcs11_module=module)

    return open_card


def session_driver(session) -> str:
    """The path a card session took ("piv" | "pkcs11"), for the outcome's ``card_driver``."""
    return str(getattr(session, "driver", None) or "piv")
