"""changerelay: MongoDB change streams to browsers, live, over WebSockets and SSE.

The package reads as the data flows: ``config`` → ``source`` (the change stream) → ``events``
(encode once) → ``hub`` (fan-out, replay) with ``subscription``/``filters``/``auth`` deciding who
sees what and ``catchup`` serving history → ``clients``/``wire`` (bytes to sockets) →
``handlers`` (WebSocket, SSE, page, health) — wired together in ``app``.
"""

__version__ = "0.1.0"
