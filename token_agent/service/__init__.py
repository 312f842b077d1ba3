"""The token-agent service (issue 7): one long-running process that owns the devices and the
store, watches the smartcard readers and serves a local API on a Unix socket.

* ``protocol``: the contract (framing, requests, events, who may ask what);
* ``server``: :class:`~token_agent.service.server.Service` (``token-agent serve``);
* ``handlers``: the requests' handlers, by area; ``connections``: the sockets;
  ``cards``: the readers and card-bound sessions;
* ``client``: a small blocking client, standard library only;
* ``authz``: the caller from ``SO_PEERCRED`` and its roles; ``ceremony``: a login or an
  enrolment in progress and its prompts; ``logs``: structured logs on stderr.

Importing this package imports nothing else: the client stays light.
"""
