"""Shared by the offline tests: a scripted Interaction, and TOTP codes computed by oathtool
(independently of the agent's own code)."""

from __future__ import annotations

import subprocess


class Interaction:
    """Answers the prompts in order; records them."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.prompts = []

    def info(self, message):
        self.prompts.append(("info", message))

    def secret(self, prompt):
        self.prompts.append(("secret", prompt))
        return self.answers.pop(0) if self.answers else None

    text = secret

    def choose(self, prompt, options, default):
        return default

    def show_qr(self, uri):
        pass


def oathtool(secret: str, at: float) -> str:
    return subprocess.run(["oathtool", "--totp", "-b", secret, "-N", f"@{int(at)}"],
                          check=True, capture_output=True, text=True).stdout.strip()
