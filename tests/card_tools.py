"""Third-party smartcard tools (OpenSC, yubico-piv-tool) against an issued virtual card in
vpcd's reader, behind the real pcscd: what their test modules share.

* :func:`require_tools`: fail in CI, skip elsewhere, naming the Debian packages to install.
* :func:`tool_env`: an environment with its own HOME and XDG_CACHE_HOME, so OpenSC's file
  cache cannot carry one card's data into another test.
* :func:`insert_issued`: issue a card from a simulated CA and insert it into slot 0.
* :func:`run`: run a tool, failing the test with its output when it exits non-zero.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pcsc_helpers import CardConnection, in_ci, list_readers, wait_for_card
from simulators.card.card import VirtualCard
from simulators.card.cardfile import CardFile
from simulators.card.issuance import issue_card

PIN = "1234"
SELECT_PIV = bytes.fromhex("00A4040009A0000003080000100000")
VERIFY_STATUS = bytes.fromhex("0020008000")


def require_tools(tools: list[str], packages: str) -> None:
    """Fail (in CI) or skip (elsewhere) unless every one of ``tools`` is on PATH or, for a
    path, exists."""
    missing = [t for t in tools if (shutil.which(t) if "/" not in t else
                                    (t if os.path.exists(t) else None)) is None]
    if missing:
        message = (f"{', '.join(missing)} missing: sudo apt-get install -y {packages}")
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def tool_env(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    cache = tmp_path / "cache"
    home.mkdir(exist_ok=True)
    cache.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(cache))
    env.pop("OPENSC_DRIVER", None)
    return env


class InsertedCard:
    def __init__(self, path: Path, bridge, reader: str, index: int, pcscd) -> None:
        self.path = path
        self.bridge = bridge
        self.reader = reader
        self.index = index  # OpenSC's reader number (pcscd's order)
        self.pcscd = pcscd

    @property
    def file(self) -> CardFile:
        return CardFile.load(self.path)

    def verify_status(self) -> int:
        """The card's answer to VERIFY without data (63Cx: x tries left), through pcscd."""
        with CardConnection(self.pcscd.context, self.reader) as conn:
            assert conn.transmit(SELECT_PIV)[1] == 0x9000
            return conn.transmit(VERIFY_STATUS)[1]


def insert_issued(pcscd, vpcd_insert, ca_dir: Path, path: Path, **issue: object
                  ) -> InsertedCard:  # fmt: skip
    """Issue a card to Dr Alice Smith (PIN :data:`PIN`; ``issue``: more arguments of
    :func:`issue_card`) into ``path`` and insert it into slot 0."""
    issue_card(ca_dir, name="Dr Alice Smith", uuid="555123456789", pin=PIN, out=path,
               **issue)  # type: ignore[arg-type]
    bridge = vpcd_insert(VirtualCard.load(path))
    reader = pcscd.reader(0)
    wait_for_card(pcscd.context, reader)
    index = list_readers(pcscd.context).index(reader)
    return InsertedCard(path, bridge, reader, index, pcscd)


def run(env: dict, *args: str, check: bool = True, stdin: str | None = None
        ) -> subprocess.CompletedProcess:  # fmt: skip
    result = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=120,
                            input=stdin)  # fmt: skip
    if check and result.returncode != 0:
        pytest.fail(f"`{' '.join(args)}` exited with {result.returncode}:\n"
                    f"{result.stdout}\n{result.stderr}", pytrace=False)
    return result
