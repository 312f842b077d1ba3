"""The organisation, as workstation and server share it (no ASGI here): certificates
(``pki.py``), the workstation's client of the server (``client.py``) and its errors
(``errors.py``); the ceremony channel (``protocol.py``, ``remote.py``, ``relay.py``); offline
logins: the workstation's encrypted cache (``cache.py``), authenticator-app codes checked
offline (``totpcache.py``), the login itself and what the server hands out for it
(``offline.py``), the outbox of offline audit events (``outbox.py``) and the server's ingest
of it (``ingest.py``)."""
