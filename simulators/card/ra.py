"""The simulated PKI's registration authority as an RA credentials source of the agent
(``token_agent.rasource``): registered in pyproject.toml as the entry point ``simulated`` of
``token_agent.ra_sources``, so the agent reaches it as ``--ra simulated:CA_DIR`` without
importing the simulators.

The credentials are the ones ``sim card issue`` recorded in the CA directory's state
(``pki.admin_credentials``)."""

from __future__ import annotations

import os

from token_agent.rasource import RaCredentials, RaError, UnknownCard

from . import pki


class SimulatedRaSource:
    name = "simulated"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = str(directory)

    def __repr__(self) -> str:
        return f"SimulatedRaSource({self.directory!r})"

    def credentials(self, *, uuid: str, serial: str | None = None) -> RaCredentials:
        last: Exception | None = None
        for ident in (serial, uuid):
            if not ident:
                continue
            try:
                puk, algorithm, key = pki.admin_credentials(self.directory, ident)
            except pki.UnknownCard as e:
                last = UnknownCard(str(e))
                continue
            except pki.PkiError as e:
                raise RaError(str(e)) from None
            return RaCredentials(puk, algorithm, key)
        raise last or UnknownCard(f"no card named for the simulated RA in {self.directory}")


def source(argument: str) -> SimulatedRaSource:
    """The entry point: ``simulated:CA_DIR``."""
    return SimulatedRaSource(argument)
