"""The virtual NHS-style smartcard: a PIV card (NIST SP 800-73-4) issued by a simulated
NHS-style PKI, reachable in-process and through the real pcscd (vsmartcard's vpcd)."""
