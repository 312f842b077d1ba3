"""An organisation's workstations and servers: what both sides share (no ASGI imports).

* ``pki.py``, ``client.py``: the workstation CA and certificates; ``OrgClient``;
* ``protocol.py``, ``remote.py``, ``relay.py``: the ceremony channel;
* ``cache.py``, ``totpcache.py``, ``offline.py``, ``outbox.py``, ``ingest.py``: offline
  logins (the workstation's encrypted cache, authenticator-app codes checked offline, the
  login itself, the outbox of offline audit events and the server's ingest of it).
"""
