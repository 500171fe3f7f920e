"""Live queries end to end (issue 15): ``snapshot=1`` sends a collection's matching documents as
of one point in time, ``ready``, then every change after that time, exactly once, in order.

A real relay process, real WebSocket and SSE clients, the test primary (snapshot reads, getMore,
startAtOperationTime as MongoDB documents them). The convergence test rebuilds each client's
collection from what it was sent and compares it with the primary's, full documents.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.parse

import pytest

from changerelay.tokens import order_key
from tests.support import SSE, WS, websocket_by_hand

pytestmark = pytest.mark.e2e


def query(ns: str, **more: str) -> str:
    return "?" + urllib.parse.urlencode({"snapshot": "1", "ns": ns, **more})


def key(doc_id) -> str:
    return json.dumps(doc_id, sort_keys=True)


class Reconstruction:
    """What a live query client holds: the JS client's rules (issue 15), in Python."""

    def __init__(self):
        self.docs: dict[str, dict] = {}
        self.ready: dict | None = None
        self.snapshot: list[dict] = []
        self.changes: list[dict] = []  # change events and leaves, after ready

    def apply(self, frame: dict) -> None:
        kind = frame.get("type")
        if kind == "doc":
            assert self.ready is None, "a doc after ready"
            self.snapshot.append(frame["doc"])
            self.docs[key(frame["doc"]["_id"])] = frame["doc"]
        elif kind == "ready":
            assert self.ready is None, "ready twice"
            self.ready = frame
        elif kind == "reset":
            self.docs, self.ready, self.snapshot = {}, None, []
        elif kind == "leave":
            self.changes.append(frame)
            self.docs.pop(key(frame["documentKey"]["_id"]), None)
        elif "operationType" in frame:
            assert self.ready is not None, "a change before ready"
            self.changes.append(frame)
            doc_key = key(frame["documentKey"]["_id"])
            op = frame["operationType"]
            if op in ("insert", "replace"):
                self.docs[doc_key] = frame["fullDocument"]
            elif op == "delete":
                self.docs.pop(doc_key, None)
            elif op == "update":
                if frame.get("fullDocument"):
                    self.docs[doc_key] = frame["fullDocument"]
                elif doc_key in self.docs:
                    update(self.docs[doc_key], frame["updateDescription"])

    def ids(self) -> list[str]:
        return [frame["_id"]["_data"] for frame in self.changes if "operationType" in frame]


def update(doc: dict, description: dict) -> None:
    for path, value in description.get("updatedFields", {}).items():
        *parents, last = path.split(".")
        target = doc
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    for path in description.get("removedFields", []):
        *parents, last = path.split(".")
        target = doc
        for part in parents:
            target = target.get(part, {})
        target.pop(last, None)


async def read_until(client: WS, held: Reconstruction, predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(held):
        frame = await client.recv(max(0.01, deadline - time.monotonic()))
        assert frame is not None, f"closed: {client.close_code} {client.close_reason}"
        held.apply(frame)


def relaxed(docs: list[dict]) -> dict[str, dict]:
    """The primary's documents as the relay's relaxed Extended JSON renders them here."""
    return {key(doc["_id"]): json.loads(json.dumps(doc)) for doc in docs}


async def test_snapshot_then_ready_then_the_changes_after_it(mongo, relay):
    coll = mongo.client[mongo.db].c
    coll.insert_many([{"_id": i, "n": i} for i in range(5)])
    client = await WS.connect(relay.ws_url + query(f"{mongo.db}.c"))
    held = Reconstruction()
    await read_until(client, held, lambda h: h.ready is not None)
    assert sorted(doc["_id"] for doc in held.snapshot) == [0, 1, 2, 3, 4]
    assert held.ready["snapshot"] == 5
    assert order_key(held.ready["resume_after"]) > order_key(mongo.tokens()[-1])
    coll.update_one({"_id": 1}, {"$set": {"n": 10}})
    coll.delete_one({"_id": 2})
    coll.insert_one({"_id": 9})
    await read_until(client, held, lambda h: len(h.changes) == 3)
    assert [c["operationType"] for c in held.changes] == ["update", "delete", "insert"]
    assert held.docs == relaxed(list(coll.find()))
    client.close()


def refusal(relay, path: str) -> tuple[int, dict]:
    response = relay.get(path)
    return response.code, response.json() if response.body else {}


async def test_what_a_snapshot_cannot_answer_and_too_many_documents_are_400(mongo, relay_factory):
    coll = mongo.client[mongo.db].c
    coll.insert_many([{"_id": i, "n": i} for i in range(5)])
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, SNAPSHOT_LIMIT=3)
    relay.wait_ready()
    ns = f"{mongo.db}.c"
    status, body = refusal(relay, "/socket" + query(ns, filter='{"operationType": "insert"}'))
    assert (status, body["error"]) == (400, "snapshot_unsupported")
    assert "'operationType'" in body["message"]
    status, body = refusal(relay, "/events" + query(ns))
    assert (status, body["error"]) == (400, "snapshot_too_large")
    assert "SNAPSHOT_LIMIT (3)" in body["message"]
    # The find reads all 5 ($ne is not sent to MongoDB), but only 3 match: admitted.
    narrow = query(ns, filter='{"fullDocument.n": {"$nin": [0, 1]}}')
    assert relay.get("/socket" + narrow).code == 204  # the probe runs the same admission
    client = await WS.connect(relay.ws_url + narrow)
    held = Reconstruction()
    await read_until(client, held, lambda h: h.ready is not None)
    assert sorted(doc["_id"] for doc in held.snapshot) == [2, 3, 4]
    client.close()
    status, body = refusal(relay, "/socket" + query(ns, filter='{"fullDocument.n": {"$gte": 1}}'))
    assert (status, body["error"]) == (400, "snapshot_too_large")


async def read(stream: SSE, count: int) -> list[dict]:
    """The next ``count`` records but the ``retry:`` one that opens a stream."""
    got = []
    while len(got) < count:
        record = await stream.record()
        if set(record) != {"retry"}:
            got.append(record)
    return got


async def test_over_sse_and_a_reconnect_resets_and_snapshots_afresh(mongo, relay):
    coll = mongo.client[mongo.db].c
    coll.insert_many([{"_id": i} for i in range(3)])
    stream = await SSE.open(relay.port, query(f"{mongo.db}.c"))
    records = await read(stream, 4)
    assert [r.get("event") for r in records] == ["doc"] * 3 + ["ready"]
    assert all("id" not in r for r in records[:3])  # a snapshot is no place to resume from
    ready = json.loads(records[-1]["data"])
    assert records[-1]["id"] == ready["resume_after"]  # a reconnect from here is reset
    coll.insert_one({"_id": 3})
    change = (await stream.changes(1))[0]
    stream.close()
    again = await SSE.open(relay.port, query(f"{mongo.db}.c"), last_event_id=change["id"])
    records = await read(again, 6)
    assert [r.get("event") for r in records] == ["reset"] + ["doc"] * 4 + ["ready"]
    assert json.loads(records[-1]["data"])["snapshot"] == 4
    assert order_key(json.loads(records[-1]["data"])["resume_after"]) > order_key(
        ready["resume_after"])
    again.close()


async def test_documents_move_in_and_out_of_a_filtered_live_query(mongo, relay):
    coll = mongo.client[mongo.db].c
    coll.insert_many([{"_id": i, "n": i} for i in range(10)])
    client = await WS.connect(relay.ws_url + query(f"{mongo.db}.c",
                                                   filter='{"fullDocument.n": {"$gte": 5}}'))
    held = Reconstruction()
    await read_until(client, held, lambda h: h.ready is not None)
    assert sorted(doc["_id"] for doc in held.snapshot) == [5, 6, 7, 8, 9]
    coll.update_one({"_id": 7}, {"$set": {"n": 1}})   # leaves
    coll.update_one({"_id": 2}, {"$set": {"n": 8}})   # enters, with its looked-up document
    coll.delete_one({"_id": 0})                       # never held: a leave it ignores
    coll.replace_one({"_id": 9}, {"n": 3})            # leaves
    coll.insert_one({"_id": 10, "n": 10})             # enters
    await read_until(client, held, lambda h: len(h.changes) == 5)
    assert [c.get("type") or c["operationType"] for c in held.changes] == [
        "leave", "update", "leave", "leave", "insert"]
    assert all(set(c) == {"type", "ns", "documentKey"} for c in held.changes
               if c.get("type") == "leave")
    matching = [doc for doc in coll.find() if doc["n"] >= 5]
    assert held.docs == relaxed(matching)
    client.close()


async def test_an_equality_filter_sees_what_leaves_it(mongo, relay):
    """The subscription index files subscriptions by their equality conditions; a live query's
    must reach it for changes that leave them too."""
    coll = mongo.client[mongo.db].c
    coll.insert_many([{"_id": i, "status": "open"} for i in range(3)])
    client = await WS.connect(relay.ws_url + query(f"{mongo.db}.c",
                                                   filter='{"fullDocument.status": "open"}'))
    held = Reconstruction()
    await read_until(client, held, lambda h: h.ready is not None)
    coll.update_one({"_id": 1}, {"$set": {"status": "closed"}})
    coll.insert_one({"_id": 3, "status": "open"})
    await read_until(client, held, lambda h: len(h.changes) == 2)
    assert [c.get("type") or c["operationType"] for c in held.changes] == ["leave", "insert"]
    assert sorted(held.docs) == ["0", "2", "3"]
    client.close()


async def test_a_client_gone_mid_snapshot_frees_its_read_for_the_next(mongo, relay_factory):
    """SNAPSHOT_READS=1: a client that stops reading mid-snapshot holds the one read while it is
    connected, and gives it back the moment it goes."""
    coll = mongo.client[mongo.db].c
    big = "x" * 20_000
    coll.insert_many([{"_id": i, "big": big} for i in range(1500)])  # 30 MB: past the socket
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, SNAPSHOT_READS=1,
                          CLIENT_BUFFER_BYTES=1024 * 1024)
    relay.wait_ready()
    path = "/socket" + query(f"{mongo.db}.c")
    stuck = websocket_by_hand(relay.port, path)  # reads nothing
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert stuck.recv(1024)  # its snapshot has begun: it holds the read
    stuck.close()
    client = await WS.connect(relay.ws_url + query(f"{mongo.db}.c",
                                                   filter='{"documentKey._id": {"$lt": 3}}'),
                              max_message_size=64 * 1024 * 1024)
    held = Reconstruction()
    await read_until(client, held, lambda h: h.ready is not None, timeout=20)
    assert held.ready["snapshot"] == 3
    client.close()


async def test_a_storm_of_live_queries_on_one_read_is_served_in_turn(mongo, relay_factory):
    """SNAPSHOT_READS=1: twelve live queries at once wait for the one read in turn, none is
    refused, and each gets exactly the changes after its own read."""
    coll = mongo.client[mongo.db].c
    coll.insert_many([{"_id": i} for i in range(50)])
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, SNAPSHOT_READS=1,
                          SNAPSHOT_READS_PER_PEER=1)
    relay.wait_ready()
    url = relay.ws_url + query(f"{mongo.db}.c")

    async def one(n: int) -> Reconstruction:
        client = await WS.connect(url)
        held = Reconstruction()
        await read_until(client, held, lambda h: h.ready is not None)
        coll.insert_one({"_id": 100 + n})
        await read_until(client, held, lambda h: key(100 + n) in h.docs)
        client.close()
        return held

    results = await asyncio.gather(*(one(n) for n in range(12)))
    for held in results:
        ids = held.ids()
        assert len(ids) == len(set(ids))  # nothing twice
        assert all(order_key(i) > order_key(held.ready["resume_after"]) for i in ids)
        assert len(held.snapshot) == held.ready["snapshot"] >= 50
    assert relay.ready()["snapshot_reads"] == 12
