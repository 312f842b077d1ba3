"""The organisation, as workstation and server share it (no ASGI here): certificates
(``pki.py``), the workstation's client of the server (``client.py``) and its errors
(``errors.py``); the ceremony channel and the offline cache live beside them."""
