"""A small relying party: it registers security keys and logs users in with them (WebAuthn,
with python-fido2's Fido2Server), as a web application's login code would. It knows nothing
of token-agent: its tests (tests/) run it against token-agent's virtual FIDO2 key.

The browser's JSON goes in and out as dicts (``dict(options)`` is what a page hands to
``navigator.credentials``; ``dict(response)`` is what it posts back). The server keeps, per
user, the registered credentials and their signature counters, and refuses an assertion whose
counter does not move on: a cloned key (Fido2Server leaves that check to its caller).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fido2.server import Fido2Server
from fido2.webauthn import AttestedCredentialData, AuthenticationResponse


class LoginError(Exception):
    """The login is refused."""


class ClonedKey(LoginError):
    """The key's signature counter went backwards or stood still: another copy of it is in use."""


@dataclass
class Account:
    name: str
    display_name: str
    user_id: bytes
    credentials: list[AttestedCredentialData] = field(default_factory=list)
    sign_counts: dict[bytes, int] = field(default_factory=dict)  # by credential id


class LoginServer:
    """Register keys, log in with them. One pending ceremony per user at a time."""

    def __init__(self, rp_id: str = "example.com", rp_name: str = "Example clinic") -> None:
        self.origin = f"https://{rp_id}"
        self.server = Fido2Server({"id": rp_id, "name": rp_name})
        self.accounts: dict[str, Account] = {}
        self._pending: dict[str, Any] = {}

    def begin_registration(self, name: str, display_name: str) -> dict:
        account = self.accounts.setdefault(
            name, Account(name, display_name, user_id=f"user:{name}".encode()))
        options, state = self.server.register_begin(
            {"id": account.user_id, "name": name, "displayName": display_name},
            credentials=account.credentials,
            user_verification="discouraged",
        )
        self._pending[name] = state
        return dict(options)

    def finish_registration(self, name: str, response: dict) -> AttestedCredentialData:
        state = self._pop_state(name)
        try:
            auth_data = self.server.register_complete(state, response)
        except Exception as e:
            raise LoginError(f"registration refused: {e}") from e
        credential = auth_data.credential_data
        account = self.accounts[name]
        account.credentials.append(credential)
        account.sign_counts[credential.credential_id] = auth_data.counter
        return credential

    def begin_login(self, name: str) -> dict:
        account = self.accounts.get(name)
        if account is None or not account.credentials:
            raise LoginError(f"{name} has no registered key")
        options, state = self.server.authenticate_begin(
            account.credentials, user_verification="discouraged")
        self._pending[name] = state
        return dict(options)

    def finish_login(self, name: str, response: dict) -> str:
        """The user's name once the assertion verifies; LoginError (ClonedKey) otherwise."""
        state = self._pop_state(name)
        account = self.accounts[name]
        try:
            credential = self.server.authenticate_complete(state, account.credentials, response)
        except Exception as e:  # a bad signature, client data for another challenge or origin
            raise LoginError(f"login refused: {type(e).__name__}: {e}") from e
        counter = AuthenticationResponse.from_dict(response).response.authenticator_data.counter
        last = account.sign_counts.get(credential.credential_id, 0)
        if (counter or last) and counter <= last:
            raise ClonedKey(f"signature counter {counter} after {last}: a cloned key")
        account.sign_counts[credential.credential_id] = counter
        return account.name

    def _pop_state(self, name: str) -> Any:
        try:
            return self._pending.pop(name)
        except KeyError:
            raise LoginError(f"no ceremony in progress for {name}") from None
