"""FIDO2 authenticators: USB HID through python-fido2, and simulator sockets."""
