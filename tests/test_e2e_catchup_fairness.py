"""One peer cannot take every catch-up stream (issue 11 item 10).

A hostile peer (its own address through ``TRUSTED_PROXIES`` and ``X-Forwarded-For``) opens
connections that each resume from an old id and then never read, so that their catch-ups stall
on them. An honest peer that resumes from before the replay buffer is still caught up within a
few seconds, while the hostile's connections are still waiting.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time

import pytest
from pymongo import MongoClient

from tests.support import WS, token_of

pytestmark = pytest.mark.e2e

EVENTS = 3000
# Bytes per document: past the ~4 MiB the kernel buffers for a socket, more than the 1,000 events
# a catch-up queues for a client before it waits for it.
PAD = 4000


class Stalled:
    """A WebSocket that resumes from ``after`` as ``peer`` and never reads a byte after the
    handshake (a small receive buffer, so that the relay's queue for it grows at once)."""

    def __init__(self, port: int, after: str, peer: str):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /socket?resume_after={after} HTTP/1.1\r\n"
                           f"Host: 127.0.0.1:{port}\r\nX-Forwarded-For: {peer}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def close(self):
        self.sock.close()


async def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_an_honest_resume_is_served_while_a_hostile_peer_holds_stalled_catch_ups(
        mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, REPLAY_BUFFER=50,
                          CATCHUP_STREAMS=2, CATCHUP_STREAMS_PER_PEER=1,
                          CLIENT_BUFFER_BYTES=65536, TRUSTED_PROXIES="127.0.0.1")
    relay.wait_ready()
    with MongoClient(mongo.uri) as client:
        for first in range(0, EVENTS, 100):
            client[mongo.db].c.insert_many(
                [{"_id": i, "pad": "x" * PAD} for i in range(first, first + 100)])
    log = mongo.tokens()
    assert len(log) == EVENTS

    # Newest first, so that none can ride another's stream; two connections per id.
    hostile = [Stalled(relay.port, log[n], "198.51.100.66")
               for n in range(70, -1, -10) for _ in range(2)]
    await wait_until(lambda: relay.ready()["catching_up"] == len(hostile), 10,
                     "the hostile resumes did not all reach the catch-up")

    started = time.monotonic()
    honest = await WS.connect(f"{relay.ws_url}?resume_after={log[EVENTS - 100]}",
                              headers={"X-Forwarded-For": "203.0.113.7"})
    frames = await honest.changes(99, timeout=8)
    served = time.monotonic() - started
    assert [token_of(frame) for frame in frames] == log[EVENTS - 99:]
    assert relay.ready()["catching_up"] > 0, "the hostile peer was served first"
    assert served < 8
    honest.close()
    for stalled in hostile:
        stalled.close()
