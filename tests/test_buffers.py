"""The cap on every connection's unsent bytes together (``changerelay/buffers.py``)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct

from changerelay import frames
from changerelay.buffers import ENTRY_COST, MARK_STEP, PAYLOAD_COST, SLOT_COST, Buffers
from changerelay.clients import WebSocketClient
from changerelay.connection import WebSocketConnection
from changerelay.events import encode_change
from changerelay.hub import Hub
from changerelay.protocol import WebSocketProtocol
from changerelay.subscription import parse
from tests.support import read_frames, token


class Holder:
    """A connection as the cap sees it: a queue of payloads, and being shed."""

    def __init__(self, buffers: Buffers, name: str, shed: list[str]):
        self.buffers, self.name, self._shed = buffers, name, shed
        self.queue: list[bytes] = []
        self.held = 0
        self.asked = 0  # how often the cap asked what it holds

    def buffered(self) -> int:
        self.asked += 1
        return self.held

    def shed(self) -> None:
        self._shed.append(self.name)
        self.send(len(self.queue))

    def queue_(self, payload: bytes) -> None:
        self.queue.append(payload)
        self.held += len(payload) + ENTRY_COST
        self.buffers.queued(self, payload, self.held)

    def send(self, count: int) -> None:
        for payload in self.queue[:count]:
            self.held -= len(payload) + ENTRY_COST
            self.buffers.dequeued(self, payload, self.held)
        del self.queue[:count]

    def change(self, delta: int) -> None:
        """Grow by about ``delta`` (a payload of its own), or shrink by at least -``delta``."""
        if delta > 0:
            self.queue_(bytes(max(1024, delta - ENTRY_COST)))  # a new object: its own
            return
        count = 0
        freed = 0
        while freed < -delta and count < len(self.queue):
            freed += len(self.queue[count]) + ENTRY_COST
            count += 1
        self.send(count)


def cap(limit: int):
    scheduled: list = []
    return Buffers(limit, scheduled.append), scheduled


def run(scheduled: list) -> None:
    while scheduled:
        scheduled.pop(0)()


def test_past_the_cap_the_largest_holders_are_shed_first_until_it_is_met():
    buffers, scheduled = cap(10 * MARK_STEP)
    shed: list[str] = []
    holders = {name: Holder(buffers, name, shed) for name in "abcd"}
    for name, steps in zip("abcd", (3, 5, 1, 2), strict=True):
        holders[name].change(steps * MARK_STEP)
    assert buffers.total == 11 * MARK_STEP and scheduled  # over: a shed is due, not done yet
    assert shed == []
    run(scheduled)
    assert shed == ["b"] and buffers.total == 6 * MARK_STEP
    holders["c"].change(6 * MARK_STEP)  # c now holds the most
    run(scheduled)
    assert shed == ["b", "c"]


def test_a_holder_that_drained_since_it_was_marked_is_not_taken_for_the_largest():
    buffers, scheduled = cap(20 * MARK_STEP)
    shed: list[str] = []
    a, b, c = (Holder(buffers, name, shed) for name in "abc")
    for _ in range(15):
        a.change(MARK_STEP)  # marked at 15 steps
    a.change(-14 * MARK_STEP)  # and drained since: it holds one
    for _ in range(14):
        b.change(MARK_STEP)
    for _ in range(6):
        c.change(MARK_STEP)
    run(scheduled)
    assert shed == ["b"] and buffers.total == 7 * MARK_STEP


def test_the_total_is_every_holders_sum_whatever_the_order_of_changes():
    buffers, scheduled = cap(1 << 62)
    shed: list[str] = []
    holders = [Holder(buffers, str(i), shed) for i in range(50)]
    rng = random.Random(11)
    for _ in range(5000):
        holder = rng.choice(holders)
        holder.change(rng.randint(-holder.held, 3 * MARK_STEP))
        assert buffers.total == sum(h.held for h in holders)
    for holder in holders:
        holder.change(-holder.held)
    assert buffers.total == 0 and not scheduled and not shed


def test_a_shed_decision_does_not_visit_every_holder():
    """10,000 holders over the cap: each shed looks at a few of them, not all."""
    buffers, scheduled = cap(20_000 * MARK_STEP)
    shed: list[str] = []
    holders = [Holder(buffers, str(i), shed) for i in range(10_000)]
    for holder in holders:
        holder.change(MARK_STEP + random.randrange(MARK_STEP))
    run(scheduled)
    assert shed == []
    for round_ in range(100):
        holders[round_].change(6_000 * MARK_STEP)  # over the cap, and the largest
        run(scheduled)
    assert shed == [str(i) for i in range(100)]
    assert sum(h.asked for h in holders) < 100 * 5


def test_a_payload_many_queues_hold_counts_once_and_until_the_last_lets_it_go():
    """The hub packs one payload per group and flush: ten thousand clients holding it for a
    moment hold it once, not ten thousand times (which would shed them all)."""
    buffers, scheduled = cap(20 * MARK_STEP)
    shed: list[str] = []
    holders = [Holder(buffers, str(i), shed) for i in range(10_000)]
    payload = bytes(10 * MARK_STEP)
    for holder in holders:
        holder.queue_(payload)
    assert buffers.total == len(payload) + PAYLOAD_COST + 10_000 * SLOT_COST
    run(scheduled)
    assert shed == []
    for holder in holders[:-1]:
        holder.send(1)
    assert buffers.total == len(payload) + ENTRY_COST  # the last still holds all of it
    holders[-1].send(1)
    assert buffers.total == 0


def test_a_cap_of_zero_is_off():
    buffers, scheduled = cap(0)
    shed: list[str] = []
    holder = Holder(buffers, "a", shed)
    for _ in range(100):
        holder.queue_(bytes(1 << 20))
    run(scheduled)
    assert shed == [] and not scheduled and buffers.total == 100 * ((1 << 20) + ENTRY_COST)


# -- with the relay's own parts: hub, clients, connections on real sockets ---------------------


async def test_clients_holding_the_most_are_cut_off_first_and_every_byte_is_accounted_for():
    """Three clients that never read, whose filters let through all events, half and a quarter,
    and one that reads everything. Past MAX_BUFFERED_BYTES the one holding the most is cut off
    (1013, after its error frame), then the next; the reader gets every event; the sum is
    every connection's queue, and nothing once they are gone."""
    loop = asyncio.get_running_loop()
    cap_bytes = 2 << 20
    buffers = Buffers(cap_bytes, loop.call_soon)
    hub: Hub[WebSocketClient] = Hub(loop.call_soon, lambda client, after: None, 100_000, 1 << 30)
    hub.start(token(0))
    ended: list[str] = []
    clients, peers = {}, {}
    filters = {"all": None, "half": {"fullDocument.k": {"$in": [0, 1]}},
               "quarter": {"fullDocument.k": 0}, "reader": None}
    for name, rule in filters.items():
        ours, theirs = tcp_pair(stalled=name != "reader")
        connection = WebSocketConnection(ours, buffers, WebSocketProtocol(4096))
        subscription, _ = parse({"filter": json.dumps(rule)} if rule else {}, (None, None))
        client = WebSocketClient(connection, subscription, 8 << 20, name, claims=None,
                                 on_end=lambda c: (ended.append(c.peer), hub.unsubscribe(c)))
        connection.start()
        # Queues of events alone: a ready frame ahead of them would sit in the stalled peers'
        # small kernel buffers and move where the cap is crossed, which this test counts to.
        client.announced = True
        hub.subscribe(client)
        clients[name], peers[name] = client, theirs
    reading = asyncio.create_task(read_frames(peers["reader"]))

    pad = "p" * 10_000
    async with asyncio.timeout(30):
        for n in range(1, 401):  # 4 MB to every reader of all events
            hub.publish(encode_change({"_id": {"_data": token(n)}, "operationType": "insert",
                                       "fullDocument": {"k": n % 4, "pad": pad}}))
            for _ in range(2):  # the loop runs the flush, then a shed if one came due
                await asyncio.sleep(0)
            while clients["reader"].writer.buffered():  # the reader keeps up, as readers do
                await asyncio.sleep(0.001)
            assert buffers.total <= cap_bytes + 4 * 11_000  # over by at most one flush
            assert buffers.total == what_the_queues_hold(c.writer for c in clients.values())
    assert ended == ["all", "half"]
    assert not clients["quarter"].closed and not clients["reader"].closed
    for name in ("all", "half"):  # what they get, reading now: whole frames, then why
        frames_read = await read_frames(peers[name], until_close=True)
        assert frames_read[-2][1].startswith(b'{"type":"error","code":"slow_consumer"')
        assert frames_read[-1] == (frames.CLOSE, struct.pack("!H", 1013) + b"slow consumer")
    for client in clients.values():
        client.writer.abort()
    received = await reading
    assert [json.loads(payload)["_id"]["_data"] for _, payload in received] == [
        token(n) for n in range(1, 401)]
    assert buffers.total == 0


def what_the_queues_hold(connections) -> int:
    """Every payload in the connections' queues once, whole (a partly sent one is kept whole),
    with PAYLOAD_COST, and SLOT_COST per entry."""
    payloads, entries = {}, 0
    for connection in connections:
        for entry in connection._out or ():
            payload = entry.obj if isinstance(entry, memoryview) else entry
            payloads[id(payload)] = len(payload)
            entries += 1
    return sum(payloads.values()) + len(payloads) * PAYLOAD_COST + entries * SLOT_COST


def tcp_pair(stalled: bool) -> tuple[socket.socket, socket.socket]:
    """Loopback TCP, ours and the peer's (non-blocking) ends; for a peer that will not read, with
    kernel buffers that hold little, so that what it is sent queues with us."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.socket()
        if stalled:
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        theirs.connect(server.getsockname())
        ours, _ = server.accept()
    if stalled:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setblocking(False)
    return ours, theirs
