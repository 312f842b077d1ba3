"""The key and card ceremonies as the policy login flow calls them (``KeyLogin`` /
``CardLogin`` of ``token_agent.ceremonies.login``): open the device through ``drivers/``, run
the ceremony, close the device, and turn a device error into a failed outcome. The CLI and
the service build them with their own ways of asking for a PIN and saying "touch your key".
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Callable

from ..outcome import LoginOutcome, Reason
from ..store import Store


def make_key_login(store: Store, *, pin_provider: Callable[[], str | None],
                   on_touch: Callable[[], None] | None, timeout: float = 30.0,
                   cancel: threading.Event | None = None,
                   open_key: Callable[[], object] | None = None,
                   environ: Mapping[str, str] | None = None,
                   presence=None) -> Callable[[str | None], LoginOutcome]:
    """``username -> outcome`` of a key login. ``open_key`` opens the key to use; by
    default, with several keys plugged in, the one holding the user's credential (asked
    silently), else the one the user touches; ``environ`` names simulators too.
    ``presence``: the ceremony's ``keypresence.PinGuard`` (default: not the login service)."""
    from drivers.fido import errors as key_errors
    from drivers.fido.keys import open_key_for, open_single_key

    from .key import KeySettings, device_failure, login_with_key
    from .keyfinding import explain

    def touched() -> None:
        if on_touch is not None:
            on_touch()

    def opener(username: str | None, settings: KeySettings):
        if open_key is not None:
            return open_key()
        if username is not None:
            try:
                user = store.get_user(username)
            except LookupError:
                user = None
            if user is not None:
                rp_id = settings.rp_id
                ids = [c.credential_id for c in store.list_fido_credentials(user.id)
                       if c.rp_id == rp_id]
                if ids:
                    return open_key_for(rp_id, ids, environ, on_touch=touched, timeout=timeout,
                                        cancel=cancel)
        return open_single_key(environ, on_touch=touched, timeout=timeout, cancel=cancel)

    def run(username: str | None) -> LoginOutcome:
        settings = KeySettings.from_store(store)  # read once for the whole ceremony
        try:
            with opener(username, settings) as key:
                return login_with_key(store, key, username=username, pin_provider=pin_provider,
                                      on_touch=on_touch, timeout=timeout, cancel=cancel,
                                      settings=settings, presence=presence)
        except key_errors.FidoKeyError as e:
            e = explain(e)
            return LoginOutcome.failure("key", device_failure(e), e.message)

    return run


def make_card_login(store: Store, *, pin_provider: Callable[[], str | None],
                    reader: str | None = None,
                    open_session: Callable[[], object] | None = None,
                    open_card: Callable[[str | None], object] | None = None
                    ) -> Callable[[str | None], LoginOutcome]:
    """``username -> outcome`` of a card login (the card identifies its holder; with a
    username, a card of anyone else is refused). ``open_card``: ``reader -> card session``,
    ``token_agent.cardopen.card_opener(config.cards)`` (default: the built-in defaults,
    driver "auto"); ``open_session``: how the card's session is opened instead (the
    organisation's server opens the workstation's card through the ceremony channel)."""
    from drivers.pcsc import errors as card_errors

    from ..cardopen import card_opener

    if open_card is None:
        open_card = card_opener()

    from .card import CardSettings, device_failure, login_with_card

    def run(username: str | None) -> LoginOutcome:
        try:
            settings = CardSettings.from_store(store)
            session = open_session() if open_session is not None else open_card(reader)
        except card_errors.PcscError as e:
            return LoginOutcome.failure("card", device_failure(e), e.message)
        except ValueError as e:
            return LoginOutcome.failure("card", Reason.CERT_UNTRUSTED, str(e))
        try:
            outcome = login_with_card(store, session, settings=settings, pin_provider=pin_provider)
        finally:
            session.close()
        if (outcome.ok and username is not None and outcome.user is not None
                and outcome.user.casefold() != username.casefold()):
            return LoginOutcome.failure("card", Reason.WRONG_USER,
                                        f"this card belongs to {outcome.user}, not {username}")
        return outcome

    return run
