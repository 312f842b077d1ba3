"""Access to real devices (and to the simulators through the same interfaces). No policy here."""
