"""Software simulators of the devices token-agent talks to."""
