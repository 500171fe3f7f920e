"""The baseline: a change-stream WebSocket server written the way the tutorial writes it.

This is the pattern of MongoDB's "Subscribe to MongoDB Change Streams Via WebSockets" (Aaron
Bassett): a class-level set of ``WebSocketHandler`` objects, a ``watch()`` loop that calls
``ChangesHandler.on_change`` for every change, and ``send_updates`` calling ``write_message`` on
each client in turn. Two things differ, both so that the comparison is about the fan-out only:

* PyMongo's async API replaces Motor (deprecated), as in the relay;
* the message is the whole change as relaxed Extended JSON, byte for byte what changerelay sends,
  instead of the tutorial's ``"insert: <name>"`` string.

Nothing else is improved on purpose: no batching, no shared frames, no slow-consumer limit, no
resume. Settings come from the same environment variables as the relay (``MONGO_SRV``,
``WATCH_DB``, ``WATCH_COLLECTION``, ``HOST``, ``PORT``; ``PORT=0`` picks a free port).
"""

from __future__ import annotations

import asyncio
import os

import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket
from bson import json_util
from pymongo import AsyncMongoClient

RELAXED = json_util.RELAXED_JSON_OPTIONS


class ChangesHandler(tornado.websocket.WebSocketHandler):
    connected_clients: set[ChangesHandler] = set()

    def open(self):
        ChangesHandler.connected_clients.add(self)

    def on_close(self):
        ChangesHandler.connected_clients.remove(self)

    @classmethod
    def send_updates(cls, message):
        for connected_client in cls.connected_clients:
            connected_client.write_message(message)

    @classmethod
    def on_change(cls, change):
        message = json_util.dumps(change, json_options=RELAXED, separators=(",", ":"))
        ChangesHandler.send_updates(message)


async def watch(target):
    async with await target.watch(full_document="updateLookup") as change_stream:
        print("change stream open", flush=True)
        async for change in change_stream:
            ChangesHandler.on_change(change)


async def main():
    client = AsyncMongoClient(os.environ["MONGO_SRV"])
    target = client[os.environ["WATCH_DB"]]
    if os.environ.get("WATCH_COLLECTION"):
        target = target[os.environ["WATCH_COLLECTION"]]
    app = tornado.web.Application([(r"/socket", ChangesHandler)])
    host = os.environ.get("HOST", "127.0.0.1")
    # app.listen(PORT) in the tutorial; bound by hand here only to learn the port PORT=0 picked.
    sockets = tornado.netutil.bind_sockets(int(os.environ.get("PORT", "8000")), host)
    tornado.httpserver.HTTPServer(app).add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    print(f"tutorial server {os.getpid()} listening on http://{host}:{port}/", flush=True)
    await watch(target)


if __name__ == "__main__":
    asyncio.run(main())
