"""The README's main-job command runs this demonstration; it must keep working end to end."""

import io
import subprocess
import sys

import pytest

from token_agent import demo


# the demo's service runs on the demo's own throwaway SQLite store (it drops TOKEN_AGENT_*, so
# it never writes to a real store): the test process's Store.open cannot be redirected with it
@pytest.mark.sqlite_only
def test_demo_runs_every_step(pcscd):  # the session's pcscd (and its lock on vpcd's slots)
    out = io.StringIO()
    assert demo.run(0, 0, out=out) == 0
    text = out.getvalue()
    assert "Touch your security key" in text  # prompted by the key's keepalive UPNEEDED
    assert "chains to the simulator root" in text
    assert "signature counter increased" in text
    assert "Wrong PIN - 7 tries left" in text
    assert "login tap-and-go: something-you-have + something-you-know" in text
    assert "a clone of the key is refused" in text
    assert demo.DEMO_PIN not in text  # the PIN is never printed
    assert "login from an unmanaged device: password+totp" in text
    assert "the same code again is refused" in text
    assert "policy for the same laptop an hour later: second factor not required" in text
    assert "policy for a ward workstation bob never used: second factor required" in text
    assert "while locked even the right code is refused" in text
    assert "correct horse battery" not in text  # nor the password
    # part 9: the workstation service
    assert "the service runs (pid" in text
    assert "enrolled alice's security key 'blue key' through the service" in text
    assert "login by inserting the card and typing its PIN: alice" in text
    assert "login from her own laptop: password, then the authenticator app" in text
    assert "event: session.locked" in text and "the card's session is now locked" in text
    assert "the service stopped cleanly" in text
    # part 10: the organisation, roaming and an outage
    assert "both ward PCs joined with one-time tokens: ['ward-a', 'ward-b']" in text
    assert "ward-b: her password alone on this ward PC: no authenticator code asked" in text
    assert "roaming is not unusual: no login.unusual alert at the new PC" in text
    assert "roaming, not unusual (no alert)" in text
    assert "ward-b, offline: alice logs in with her key" in text
    assert "ward-b, offline: a password is refused, saying to use a key or card" in text
    assert "ward-b's queued audit arrived" in text
    # part 11: the web pages
    assert "the pages are served over TLS at https://localhost:" in text
    assert "the policy asks for her authenticator app's code" in text
    assert "her methods on the page: Password; Authenticator app (preferred)" in text
    from token_agent.demo_workstation import CARD_PIN, KEY_PIN

    assert KEY_PIN not in text and CARD_PIN not in text
    assert text.rstrip().endswith("demonstration complete: every step verified")


def test_demo_module_exit_status(pcscd):
    proc = subprocess.run([sys.executable, "-m", "token_agent.demo"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
