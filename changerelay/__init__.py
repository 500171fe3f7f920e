"""changerelay: MongoDB change streams to browsers, live, over WebSockets and SSE.

The package reads as the data flows: ``config`` (settings) → ``source`` (the change stream, with
``backoff``) → ``events`` (encode once) → ``hub`` (fan-out, replay), with ``subscription``,
``filters``, ``namespaces``, ``auth`` and ``rows`` deciding who sees what and ``catchup`` serving
history → ``clients`` (packing, backlogs, slow consumers) → ``connection``/``protocol``/``frames``
(WebSockets) and ``tornado_internals`` (SSE writes, the socket after a handshake). ``listener``
accepts connections and ``gate`` reads each request head within its limits before Tornado serves
it; ``handlers`` admit each request (``admission``, with the refusals and closes of
``disconnect``) and hand its client to the ``Relay``, which ``app`` wires together.
"""

__version__ = "0.1.0"
