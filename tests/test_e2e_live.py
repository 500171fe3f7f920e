"""Live queries end to end (issue 15): ``snapshot=1`` sends the matching documents as of one
point in time, ``ready``, then every change after that point exactly once and in order, with a
``leave`` when a held document stops matching.

Writes keep arriving (~200/s on ~300 documents: inserts, ``$set``/``$unset`` updates, replaces,
deletes) while 50 clients subscribe at random moments over WebSocket and SSE. Each client rebuilds
the collection as the JS client's ``liveQuery()`` does — ``doc`` and insert/replace set, update
takes ``fullDocument`` or applies ``updatedFields``/``removedFields``, delete and ``leave``
remove, ``reset`` clears — and at the end it must equal the collection itself, full documents
compared, with no change applied twice (every change's id is past the snapshot's point and past
the one before it). Then the same with a filter that documents move in and out of, and with a
row rule under ``FULL_DOCUMENT=whenAvailable``, where alice must also never see the content of a
document that is not hers. Refusals, ``reset`` on a reconnect, and one ``ready`` per plain
connection.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from tornado import httpclient

from tests.support import SSE, WS, event_id

pytestmark = pytest.mark.e2e

SECRET = "live-secret-" + "x" * 32
IMAGES = {"FULL_DOCUMENT": "whenAvailable", "FULL_DOCUMENT_BEFORE_CHANGE": "whenAvailable"}
DOCS = 300            # documents the collection holds, about
RATE = 200            # writes a second, at most (a busy machine makes fewer)
WRITES = 300          # writes at least, while the live queries start and after
CLIENTS = 50          # live queries, subscribing at random moments
SSE_SHARE = 5         # one in this many clients reads Server-Sent Events
SPREAD = 3.0          # seconds over which they subscribe
END = 1_000_000       # the _id of the last write, which every live query below matches
OPEN = {"fullDocument.status": "open"}


def token(claims: dict, ttl: int = 300) -> str:
    return jwt.encode({"exp": int(time.time()) + ttl, **claims}, SECRET)


def key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def order(id_: str) -> str:
    return id_.partition(".")[0]  # ids order by their _data (tokens.order_key)


# --- the writer ----------------------------------------------------------------------------------

class Writer(threading.Thread):
    """Random writes at about ``RATE`` a second until stopped; the only writer, so it knows
    which ids exist. Pacing a load generator, not synchronising: nothing waits on it."""

    def __init__(self, coll, seed: int):
        super().__init__(daemon=True, name="live-writer")
        self.coll = coll
        self.random = random.Random(seed)
        self.present = {doc["_id"] for doc in coll.find({}, {"_id": 1})}
        self.stopping = threading.Event()
        self.enough = threading.Event()  # WRITES written
        self.writes = 0
        self.failure: BaseException | None = None

    def document(self, id_: int) -> dict:
        pick = self.random
        doc = {"_id": id_, "n": pick.randrange(1000), "status": pick.choice(["open", "closed"]),
               "owner": pick.choice(["alice", "bob"])}
        if pick.random() < 0.5:
            doc["note"] = {"text": f"note {pick.randrange(100)}",
                           "tags": ["a", "b"][:pick.randrange(3)]}
        return doc

    def write_once(self) -> None:
        pick, coll = self.random, self.coll
        id_ = pick.randrange(int(DOCS * 1.3))
        if id_ not in self.present:
            coll.insert_one(self.document(id_))
            self.present.add(id_)
            return
        roll = pick.random()
        if roll < 0.35:
            coll.update_one({"_id": id_}, {"$set": {"n": pick.randrange(1000),
                                                    "status": pick.choice(["open", "closed"])}})
        elif roll < 0.45:
            coll.update_one({"_id": id_}, {"$set": {"owner": pick.choice(["alice", "bob"])}})
        elif roll < 0.55:
            coll.update_one({"_id": id_}, {"$unset": {"note": ""}})
        elif roll < 0.65:
            coll.update_one({"_id": id_}, {"$set": {"note.text": f"edited {pick.randrange(100)}"}})
        elif roll < 0.82:
            replacement = self.document(id_)
            del replacement["_id"]
            coll.replace_one({"_id": id_}, replacement)
        else:
            coll.delete_one({"_id": id_})
            self.present.discard(id_)

    def run(self) -> None:
        try:
            while not self.stopping.wait(1 / RATE):
                self.write_once()
                self.writes += 1
                if self.writes >= WRITES:
                    self.enough.set()
        except BaseException as exc:  # surfaced by stop()
            self.failure = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        if self.failure is not None:
            raise self.failure


def fill(coll, seed: int) -> None:
    writer = Writer(coll, seed)
    coll.insert_many([writer.document(i) for i in range(DOCS)])


# --- a live query, rebuilt as the JS client does -------------------------------------------------

def set_path(doc: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        doc = doc.setdefault(part, {})
    doc[parts[-1]] = value


def unset_path(doc: dict, path: str) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        doc = doc.get(part)
        if not isinstance(doc, dict):
            return
    doc.pop(parts[-1], None)


@dataclass
class LiveQuery:
    """What one client holds: ``_id`` → document; every message it got, in order."""

    name: str
    docs: dict[str, dict] = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)
    ready: dict | None = None
    snapshot_docs: int = 0
    last_id: str | None = None  # the newest change id applied
    applied: list[str] = field(default_factory=list)

    def apply(self, message: dict, id_: str | None = None) -> None:
        self.messages.append(message)
        kind = message.get("type")
        if "operationType" in message:
            self._change(message, id_ or event_id(message["_id"]))
        elif kind == "doc":
            assert self.ready is None, f"{self.name}: a doc after ready: {message}"
            self.docs[key(message["doc"]["_id"])] = message["doc"]
            self.snapshot_docs += 1
        elif kind == "ready":
            assert self.ready is None, f"{self.name}: a second ready: {message}"
            self.ready = message
            assert message["snapshot"] == self.snapshot_docs, (self.name, message)
            self.last_id = message["resume_after"]
        elif kind == "leave":
            assert self.ready is not None, f"{self.name}: a leave before ready: {message}"
            self.docs.pop(key(message["documentKey"]["_id"]), None)
        elif kind == "reset":
            self.docs.clear()
            self.ready, self.snapshot_docs, self.last_id = None, 0, None
        elif kind in ("resync", "error"):
            raise AssertionError(f"{self.name} was told {message}")

    def _change(self, change: dict, id_: str) -> None:
        assert self.ready is not None, f"{self.name}: a change before ready: {change}"
        # Exactly once, in order: past the snapshot's point, and past the change before it.
        assert order(id_) > order(self.last_id), (self.name, id_, self.last_id)
        self.last_id = id_
        self.applied.append(id_)
        op, doc_key = change["operationType"], key(change["documentKey"]["_id"])
        if op in ("insert", "replace"):
            self.docs[doc_key] = change["fullDocument"]
        elif op == "update":
            if change.get("fullDocument") is not None:
                self.docs[doc_key] = change["fullDocument"]
            elif doc_key in self.docs:
                held = self.docs[doc_key]
                description = change["updateDescription"]
                for path, value in description.get("updatedFields", {}).items():
                    set_path(held, path, value)
                for path in description.get("removedFields", []):
                    unset_path(held, path)
        elif op == "delete":
            self.docs.pop(doc_key, None)
        else:
            raise AssertionError(f"{self.name}: unexpected {op}")

    def has_end(self) -> bool:
        return key(END) in self.docs and self.ready is not None


class Reader:
    """One connection's messages, WebSocket or SSE, as dicts (with the SSE id where given)."""

    def __init__(self, conn: WS | SSE):
        self.conn = conn

    async def next(self, timeout: float = 30) -> tuple[dict, str | None]:
        if isinstance(self.conn, WS):
            frame = await self.conn.recv(timeout)
            if frame is None:
                raise AssertionError(f"closed: {self.conn.close_code} {self.conn.close_reason}")
            return frame, None
        while True:
            record = await self.conn.record(timeout)
            if "data" in record:
                return json.loads(record["data"]), record.get("id")

    def close(self) -> None:
        self.conn.close()


async def open_reader(relay, query: str, sse: bool, bearer: str | None = None) -> Reader:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    if sse:
        stream = await SSE.open(relay.port, query, extra=headers)
        assert stream.status == 200, stream.head
        return Reader(stream)
    return Reader(await WS.connect(relay.ws_url + query, headers=headers))


async def follow(relay, live: LiveQuery, query: str, sse: bool, delay: float,
                 bearer: str | None) -> LiveQuery:
    """Subscribe after ``delay`` and apply every message until the last write is held."""
    await asyncio.sleep(delay)  # a random moment among the writes, not a synchronisation
    reader = await open_reader(relay, query, sse, bearer)
    try:
        while not live.has_end():
            message, id_ = await reader.next()
            if message.get("type") == "position":
                continue
            live.apply(message, id_)
    finally:
        reader.close()
    return live


def live_query(ns: str, filter_: dict | None = None) -> str:
    query = {"snapshot": "1", "ns": ns}
    if filter_ is not None:
        query["filter"] = json.dumps(filter_)
    return "?" + urllib.parse.urlencode(query)


def expected(coll, condition: dict) -> dict[str, dict]:
    return {key(doc["_id"]): doc for doc in coll.find(condition)}


async def converge(relay, coll, ns: str, filter_: dict | None, seed: int,
                   bearer: str | None = None) -> list[LiveQuery]:
    """The issue's scenario: writes while ``CLIENTS`` live queries start at random moments;
    then one last write that every query matches, and each query holds what the collection
    does."""
    pick = random.Random(seed)
    writer = Writer(coll, seed)
    writer.start()
    lives = [LiveQuery(f"client {i}") for i in range(CLIENTS)]
    query = live_query(ns, filter_)
    tasks = [asyncio.ensure_future(follow(relay, live, query, i % SSE_SHARE == 0,
                                          pick.uniform(0, SPREAD), bearer))
             for i, live in enumerate(lives)]
    try:
        # Writes go on until every query has its snapshot and WRITES were written, so that
        # snapshots are taken amid writes and changes follow every one of them.
        async with asyncio.timeout(120):
            while not (all(live.ready is not None for live in lives) and writer.enough.is_set()):
                await asyncio.sleep(0.05)
                for task in tasks:
                    if task.done():
                        task.result()  # a client that failed fails the test now
    finally:
        writer.stop()
    coll.insert_one({"_id": END, "n": 0, "status": "open", "owner": "alice"})
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        for task in tasks:
            task.cancel()
    return lives


def check_converged(lives: list[LiveQuery], want: dict[str, dict]) -> None:
    for live in lives:
        assert live.ready is not None
        missing = sorted(set(want) - set(live.docs))
        extra = sorted(set(live.docs) - set(want))
        wrong = [k for k in want if k in live.docs and live.docs[k] != want[k]]
        assert not (missing or extra or wrong), (
            f"{live.name}: missing {missing[:5]}, extra {extra[:5]}, differing "
            f"{[(live.docs[k], want[k]) for k in wrong[:3]]}")
        assert len(live.applied) == len(set(live.applied))  # nothing applied twice
    # Not all at one moment: the snapshots were taken while the writes went on.
    assert len({live.ready["resume_after"] for live in lives}) > CLIENTS // 5


# --- the tests -----------------------------------------------------------------------------------

async def test_fifty_live_queries_converge_on_the_collection(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db)
    relay.wait_ready()
    coll = mongo.client[mongo.db].c
    fill(coll, seed=1)
    lives = await converge(relay, coll, f"{mongo.db}.c", None, seed=1)
    check_converged(lives, expected(coll, {}))
    assert all(live.snapshot_docs >= DOCS // 2 for live in lives)


async def test_live_queries_with_a_filter_converge_as_documents_move_in_and_out(
        mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db)
    relay.wait_ready()
    coll = mongo.client[mongo.db].c
    fill(coll, seed=2)
    lives = await converge(relay, coll, f"{mongo.db}.c", OPEN, seed=2)
    check_converged(lives, expected(coll, {"status": "open"}))
    for live in lives:
        assert any(m.get("type") == "leave" for m in live.messages), live.name
        for message in live.messages:  # nothing closed is ever held or sent whole
            doc = message.get("doc") or message.get("fullDocument")
            if doc is not None and message.get("operationType") != "update":
                assert doc["status"] == "open", (live.name, message)


async def test_alices_live_query_is_her_documents_and_nothing_after_they_left(
        mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, AUTH_JWT_SECRET=SECRET,
                          **IMAGES)
    relay.wait_ready()
    mongo.client[mongo.db].create_collection("c", changeStreamPreAndPostImages={"enabled": True})
    coll = mongo.client[mongo.db].c
    fill(coll, seed=3)
    alice = token({"ns": [mongo.db], "filter": {"fullDocument.owner": "alice"}})
    lives = await converge(relay, coll, f"{mongo.db}.c", None, seed=3, bearer=alice)
    check_converged(lives, expected(coll, {"owner": "alice"}))
    for live in lives:
        for message in live.messages:
            for doc in (message.get("doc"), message.get("fullDocument"),
                        message.get("fullDocumentBeforeChange")):
                assert doc is None or doc["owner"] == "alice", (live.name, message)


@pytest.mark.parametrize(("query", "names"), [
    ({"ops": "insert"}, "ops"),
    ({"filter": json.dumps({"operationType": "insert"})}, "operationType"),
    ({"filter": json.dumps({"updateDescription.updatedFields.n": 1})}, "updateDescription"),
])
async def test_a_live_query_that_is_not_about_documents_is_refused(mongo, relay, query, names):
    url = relay.ws_url + "?" + urllib.parse.urlencode(
        {"snapshot": "1", "ns": f"{mongo.db}.c", **query})
    with pytest.raises(httpclient.HTTPClientError) as refused:
        await WS.connect(url)
    assert refused.value.code == 400
    body = json.loads(refused.value.response.body)
    assert body["error"] == "snapshot_unsupported" and names in body["message"], body


@pytest.mark.parametrize("ns", ["{db}", "{db}.c,{db}.d"])
async def test_a_live_query_reads_exactly_one_collection(mongo, relay, ns):
    url = relay.ws_url + "?" + urllib.parse.urlencode(
        {"snapshot": "1", "ns": ns.format(db=mongo.db)})
    with pytest.raises(httpclient.HTTPClientError) as refused:
        await WS.connect(url)
    assert refused.value.code == 400
    assert json.loads(refused.value.response.body)["error"] == "snapshot_unsupported"


async def test_more_matching_documents_than_the_limit_is_refused(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, SNAPSHOT_LIMIT=5)
    relay.wait_ready()
    coll = mongo.client[mongo.db].c
    coll.insert_many([{"_id": i, "status": "open" if i < 3 else "closed"} for i in range(10)])
    with pytest.raises(httpclient.HTTPClientError) as refused:
        await WS.connect(relay.ws_url + live_query(f"{mongo.db}.c"))
    assert refused.value.code == 400
    body = json.loads(refused.value.response.body)
    assert body["error"] == "snapshot_too_large" and "filter" in body["message"]
    narrower = Reader(await WS.connect(relay.ws_url + live_query(f"{mongo.db}.c", OPEN)))
    live = LiveQuery("narrower")
    while live.ready is None:
        live.apply((await narrower.next())[0])
    assert sorted(live.docs) == [key(0), key(1), key(2)]
    narrower.close()


async def test_a_reconnect_with_resume_after_resets_and_snapshots_afresh(mongo, relay):
    coll = mongo.client[mongo.db].c
    coll.insert_many([{"_id": i, "status": "open"} for i in range(3)])
    for sse in (False, True):
        first = await open_reader(relay, live_query(f"{mongo.db}.c"), sse)
        live = LiveQuery(f"first sse={sse}")
        while live.ready is None:
            message, id_ = await first.next()
            live.apply(message, id_)
        first.close()
        coll.delete_one({"_id": 0})
        coll.insert_one({"_id": 10 + sse, "status": "open"})
        position = live.ready["resume_after"]
        if sse:
            again = Reader(await SSE.open(relay.port, live_query(f"{mongo.db}.c"),
                                          last_event_id=position))
        else:
            again = await open_reader(relay, live_query(f"{mongo.db}.c") + "&resume_after="
                                      + urllib.parse.quote(position), sse)
        message, _ = await again.next()
        assert message == {"type": "reset"}
        live.apply(message)
        while live.ready is None:
            message, id_ = await again.next()
            live.apply(message, id_)
        again.close()
        assert live.docs == expected(coll, {})


async def test_every_plain_connection_gets_one_ready_once_live(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, REPLAY_BUFFER=5)
    relay.wait_ready()
    coll = mongo.client[mongo.db].c
    watcher = Reader(await WS.connect(relay.ws_url))
    coll.insert_one({"_id": "first"})
    seen: dict[str, list[dict]] = {"watcher": []}
    first = None
    while first is None:
        message, _ = await watcher.next()
        seen["watcher"].append(message)
        if "operationType" in message:
            first = event_id(message["_id"])
    coll.insert_many([{"_id": i} for i in range(20)])  # past REPLAY_BUFFER: a catch-up
    readers = {
        "plain": await open_reader(relay, "", sse=False),
        "plain sse": await open_reader(relay, "", sse=True),
        "from history": await open_reader(relay, f"?resume_after={first}", sse=False),
        "from history sse": Reader(await SSE.open(relay.port, last_event_id=first)),
    }
    coll.insert_one({"_id": "end"})
    for name, reader in {**readers, "watcher": watcher}.items():
        messages = seen.get(name, [])
        # Until the last write and a ready: a client that caught up is told once it is live,
        # which may be after the replay that brought it the last write.
        while not ({"_id": "end"} in [m.get("documentKey") for m in messages]
                   and any(m.get("type") == "ready" for m in messages)):
            message, _ = await reader.next()
            if message.get("type") != "position":
                messages.append(message)
        readies = [m for m in messages if m.get("type") == "ready"]
        assert len(readies) == 1, (name, messages)
        assert isinstance(readies[0]["resume_after"], str) and "snapshot" not in readies[0]
        if name.startswith("from history"):
            # Once live: after the 20 writes it caught up on from MongoDB.
            assert messages.index(readies[0]) >= 20, (name, messages)
        reader.close()
