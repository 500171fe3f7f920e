"""Nothing lost: every scenario pushes >= 1,000 events through MongoDB and compares the ids each
client processed with MongoDB's own log of the test's database: no loss, no duplicate, same
order."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
from bson import Int64
from pymongo import MongoClient

from tests.support import ROOT, SSE, WS, token_of

pytestmark = pytest.mark.e2e


class Writer(threading.Thread):
    """Inserts ``total`` documents in small batches on its own thread, so writes keep flowing
    while the test kills relays and reconnects clients."""

    def __init__(self, uri: str, db: str, total: int, start: int = 0, batch: int = 10):
        super().__init__(daemon=True)
        self.client = MongoClient(uri)
        self.db, self.total, self.start_at, self.batch = db, total, start, batch
        self.written = 0
        self.error = None

    def run(self):
        try:
            coll = self.client[self.db].c
            for first in range(self.start_at, self.start_at + self.total, self.batch):
                last = min(first + self.batch, self.start_at + self.total)
                coll.insert_many([{"_id": i, "i": i} for i in range(first, last)])
                self.written = last - self.start_at
                time.sleep(0.002)  # pacing a load generator, not synchronisation
        except Exception as exc:  # surfaced by finish()
            self.error = exc

    def finish(self, timeout=60):
        self.join(timeout)
        assert not self.is_alive() and self.error is None, self.error
        self.client.close()


def write(uri: str, db: str, count: int, start: int = 0, key=int):
    """``count`` inserts, ``_id`` ``key(start)`` on; ``key=Int64`` past 2**31 makes every id
    carry type bits."""
    with MongoClient(uri) as client:
        for first in range(start, start + count, 100):
            client[db].c.insert_many(
                [{"_id": key(i)} for i in range(first, min(first + 100, start + count))])


class ResumingClient:
    """What every well-behaved client does: remember the newest id, reconnect with it."""

    def __init__(self):
        self.tokens: list[str] = []
        self.controls: list[dict] = []
        self.readies: list[dict] = []  # one per connection: each is told when it is live
        self.last: str | None = None
        self.conn: WS | None = None

    async def connect(self, ws_url: str, **kwargs):
        url = ws_url + (f"?resume_after={self.last}" if self.last else "")
        self.conn = await WS.connect(url, **kwargs)
        return self

    async def read(self, count: int, timeout: float = 30):
        """Read until ``count`` change events in total have been processed."""
        conn = self.conn.conn
        async with asyncio.timeout(timeout):  # one deadline for the whole read, not per frame
            while len(self.tokens) < count:
                message = await conn.read_message()
                if message is None:
                    raise AssertionError(f"closed ({conn.close_code} {conn.close_reason}) "
                                         f"after {len(self.tokens)} of {count} events")
                self._take(json.loads(message))

    def _take(self, frame):
        if "operationType" in frame:
            self.tokens.append(token_of(frame))
            self.last = token_of(frame)
        elif frame.get("type") == "ready":
            self.readies.append(frame)
        else:
            self.controls.append(frame)
            if frame.get("type") == "position":
                self.last = frame["resume_after"]

    async def read_until_closed(self, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = await self.conn.recv(max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError("connection was not closed") from None
            if frame is None:
                return self.conn.close_code
            self._take(frame)

    def drop(self):
        self.conn.close()


async def left_by_a_killed_relay(relay_factory, uri: str, count: int) -> ResumingClient:
    """A client that read ``count`` events (written here to database ``db``) from a relay
    that was then killed (SIGKILL: no goodbye); it holds the newest id."""
    relay = relay_factory(MONGO_SRV=uri)
    relay.wait_ready()
    client = await ResumingClient().connect(relay.ws_url)
    write(uri, "db", count)
    await client.read(count)
    relay.proc.kill()
    await client.read_until_closed()
    return client


def assert_matches_log(tokens, mongo):
    """``mongo`` is the ``mongo`` fixture (the test's database) or a whole TestPrimary."""
    want = mongo.tokens()
    assert len(tokens) == len(set(tokens)), "duplicates delivered"
    assert tokens == want, f"got {len(tokens)} events, MongoDB logged {len(want)}"


@pytest.mark.parametrize("buffer", [10000, 100])
async def test_client_drops_mid_stream_and_resumes(mongo, relay_factory, buffer):
    """Inside the replay buffer (10000) and far beyond it (100: catch-up from MongoDB)."""
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, REPLAY_BUFFER=buffer)
    relay.wait_ready()

    client = await ResumingClient().connect(relay.ws_url)
    write(mongo.uri, mongo.db, 400)
    await client.read(300)
    client.drop()
    write(mongo.uri, mongo.db, 700, start=400)
    await client.connect(relay.ws_url)
    write(mongo.uri, mongo.db, 100, start=1100)
    await client.read(1200)
    assert_matches_log(client.tokens, mongo)


async def test_relay_killed_and_restarted_while_writes_continue(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db)
    relay.wait_ready()
    writer = Writer(mongo.uri, mongo.db, 1500)

    clients = [await ResumingClient().connect(relay.ws_url) for _ in range(3)]
    writer.start()
    for client in clients:
        await client.read(200)
    relay.proc.kill()  # SIGKILL: no goodbye, no flush
    for client in clients:
        await client.read_until_closed()
    replacement = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db)
    replacement.wait_ready()
    for client in clients:
        await client.connect(replacement.ws_url)
    writer.finish()
    for client in clients:
        await client.read(1500)
        assert_matches_log(client.tokens, mongo)


async def test_client_moves_from_relay_a_to_relay_b(mongo, relay_factory):
    a = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db)
    b = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, REPLAY_BUFFER=200)
    a.wait_ready()
    b.wait_ready()
    writer = Writer(mongo.uri, mongo.db, 1200)

    client = await ResumingClient().connect(a.ws_url)
    writer.start()
    await client.read(400)
    client.drop()
    await client.connect(b.ws_url)
    writer.finish()
    await client.read(1200)
    assert_matches_log(client.tokens, mongo)


@pytest.mark.load  # 500 clients: a load of its own, not a functional check
async def test_500_clients_reconnect_at_once_sharing_few_change_streams(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db,
                          REPLAY_BUFFER=50, CATCHUP_STREAMS=4)
    relay.wait_ready()

    write(mongo.uri, mongo.db, 1000)
    log = mongo.tokens()
    clients = []
    for index in range(500, 1000):
        client = ResumingClient()
        client.last = log[index]  # each one stopped at a different point, most of them
        client.tokens = log[: index + 1]  # before the relay's 50-event buffer
        clients.append(client)
    before = mongo.primary.change_streams_opened if mongo.fake else 0
    await asyncio.gather(*(c.connect(relay.ws_url) for c in clients))
    write(mongo.uri, mongo.db, 100, start=1000)
    await asyncio.gather(*(c.read(1100, timeout=90) for c in clients))
    if mongo.fake:  # only the test primary can count the change streams opened
        opened = mongo.primary.change_streams_opened - before
        assert opened <= 8, f"{opened} catch-up change streams for 500 clients"
    for client in clients:
        assert_matches_log(client.tokens, mongo)
    for client in clients:
        client.drop()


@pytest.mark.fault
async def test_resume_from_forgotten_history_gets_resync_then_live(primary, relay_factory):
    relay = relay_factory(MONGO_SRV=primary.uri, REPLAY_BUFFER=10)
    relay.wait_ready()

    client = await ResumingClient().connect(relay.ws_url)
    write(primary.uri, "db", 100)
    await client.read(100)
    old = client.tokens[5]
    write(primary.uri, "db", 900, start=100)
    await client.read(1000)  # the relay itself is caught up: only the old token is lost
    primary.forget_history(keep_last=50)
    late = await WS.connect(f"{relay.ws_url}?resume_after={old}")
    first = await late.recv()
    assert first == {"type": "resync", "reason": "history_lost"}
    write(primary.uri, "db", 5, start=1000)
    fresh = await late.changes(5)
    assert [f["documentKey"]["_id"] for f in fresh] == list(range(1000, 1005))


def test_malformed_resume_token_is_refused_at_handshake(relay):
    response = relay.get("/socket?resume_after=not-hex")
    assert response.code == 400
    assert response.json()["error"] == "invalid_resume_after"


async def test_sse_streams_the_same_events_and_resumes_with_last_event_id(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db,
                          REPLAY_BUFFER=300, SSE_HEARTBEAT=0.2)
    relay.wait_ready()

    ws = await WS.connect(relay.ws_url)
    sse = await SSE.open(relay.port)
    assert sse.status == 200
    write(mongo.uri, mongo.db, 400)
    first = await sse.changes(250)
    ws_frames = await ws.changes(400)
    for record, frame in zip(first, ws_frames, strict=False):
        assert json.loads(record["data"]) == frame  # same bytes' meaning on both transports
        assert record["id"] == token_of(frame)
    sse.close()
    write(mongo.uri, mongo.db, 700, start=400)  # the gap is beyond the 300-event buffer
    again = await SSE.open(relay.port, last_event_id=first[-1]["id"])
    rest = await again.changes(850)
    await again.comment(timeout=5)  # heartbeats keep flowing on a quiet stream
    tokens = [r["id"] for r in first] + [r["id"] for r in rest]
    assert_matches_log(tokens, mongo)


def test_sse_refuses_bad_input_with_json(relay):
    response = relay.get("/events?ops=bogus")
    assert response.code == 400 and response.json()["error"] == "unknown_operation_type"
    response = relay.get("/events", headers={"Last-Event-ID": "zz"})
    assert response.code == 400 and response.json()["error"] == "invalid_resume_after"


async def test_quiet_subscription_gets_positions_and_resumes_from_them(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db,
                          POSITION_INTERVAL=0.3, REPLAY_BUFFER=50)
    relay.wait_ready()

    quiet = await WS.connect(f"{relay.ws_url}?ops=delete")
    write(mongo.uri, mongo.db, 1000)
    newest = mongo.tokens()[-1]
    position = await quiet.until(
        lambda f: f.get("type") == "position" and f["resume_after"] >= newest)
    quiet.close()
    with MongoClient(mongo.uri) as client:
        client[mongo.db].c.delete_one({"_id": 3})
    resumed = await WS.connect(f"{relay.ws_url}?ops=delete&resume_after="
                               f"{position['resume_after']}")
    [delete] = await resumed.changes(1)
    assert delete["documentKey"] == {"_id": 3}
    assert token_of(delete) == mongo.tokens()[-1]


def test_tail_cli_survives_a_relay_restart(mongo, relay_factory, tmp_path):
    """Its last id before the restart carries type bits: keys past int32 are NumberLongs."""
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db)
    relay.wait_ready()
    port = relay.port
    out = tmp_path / "tail.jsonl"
    with open(out, "w") as sink:
        tail = subprocess.Popen(
            [sys.executable, "-m", "changerelay", "tail", relay.ws_url, "--max-events", "1000"],
            cwd=str(ROOT), stdout=sink, stderr=subprocess.PIPE, text=True)
        try:
            relay.wait_log("101 GET /socket")
            write(mongo.uri, mongo.db, 400, start=2 ** 40, key=Int64)
            mongo.wait_for(lambda: _lines(out) >= 400, timeout=30)
            relay.proc.kill()
            relay.proc.wait()
            write(mongo.uri, mongo.db, 600, start=400)
            relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, PORT=port).wait_ready()
            assert tail.wait(60) == 0, tail.stderr.read()
        finally:
            tail.kill()
    tokens = [token_of(json.loads(line)) for line in out.read_text().splitlines()
              if "operationType" in line]
    assert_matches_log(tokens, mongo)


def _lines(path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


async def test_catch_up_crosses_an_invalidate_like_the_live_stream(mongo, relay_factory):
    """A collection is dropped and recreated while a client is away, beyond the buffer: its
    catch-up must deliver drop + invalidate and carry on after them, exactly as live clients
    saw it."""
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, WATCH_COLLECTION="c",
                          REPLAY_BUFFER=20)
    relay.wait_ready()

    live = await WS.connect(relay.ws_url)
    away = await ResumingClient().connect(relay.ws_url)
    write(mongo.uri, mongo.db, 500)
    await away.read(500)
    away.drop()
    write(mongo.uri, mongo.db, 300, start=500)
    with MongoClient(mongo.uri) as client:
        client[mongo.db].c.drop()
        client[mongo.db].c.insert_one({"_id": "reborn"})
    write(mongo.uri, mongo.db, 250, start=1000)
    expected = [token_of(f) for f in await live.changes(500 + 300 + 2 + 1 + 250)]
    await away.connect(relay.ws_url)
    await away.read(len(expected))
    assert away.tokens == expected


@pytest.mark.fault
@pytest.mark.parametrize("token", [
    "82" + "7FFF0000" + "00000001" + "2B0229296E04",   # well formed, decades in the future
    "82" + "00000010" + "00000001" + "2B0229296E04",   # well formed, long before any history
    "8263A1B2C300000001FF",                            # a cluster time, then garbage
])
async def test_unusable_resume_point_gets_resync_then_live(primary, relay_factory, token):
    """Never a silent wait: a token MongoDB cannot resume from means resync, then live events."""
    relay = relay_factory(MONGO_SRV=primary.uri)
    relay.wait_ready()

    write(primary.uri, "db", 3)
    client = await WS.connect(f"{relay.ws_url}?resume_after={token}")
    first = await client.recv()
    assert first["type"] == "resync" and first["reason"] in ("history_lost", "invalid_token")
    write(primary.uri, "db", 2, start=3)
    assert [f["documentKey"]["_id"] for f in await client.changes(2)] == [3, 4]


@pytest.mark.fault
async def test_client_back_before_the_new_relay_has_its_stream_still_catches_up(primary,
                                                                           relay_factory):
    """A relay restarts; the client is back before the new relay's change stream is open (here
    held shut by failing aggregates), so the hub cannot place it yet. Once the stream opens, the
    client's point is older than it: the catch-up must take it, not leave it waiting."""
    client = await left_by_a_killed_relay(relay_factory, primary.uri, 600)
    write(primary.uri, "db", 500, start=600)
    primary.fail_next("aggregate", code=2, errmsg="held shut by the test", count=3)
    successor = relay_factory(MONGO_SRV=primary.uri)
    assert successor.ready()["source"] != "open"
    await client.connect(successor.ws_url)
    successor.wait_ready(timeout=30)
    write(primary.uri, "db", 100, start=1100)
    await client.read(1200)
    assert_matches_log(client.tokens, primary)


# --- ids are whole resume tokens (issue 12 item 1) -----------------------------------------------

# Keys MongoDB writes type bits for: without them it reads the first as the int32 7 (the real event
# sorts after that: 280) and cannot read the second at all (50810).
TYPED_KEYS = [Int64(2 ** 40 + 7), 1.5]


@pytest.mark.parametrize("key", TYPED_KEYS, ids=["int64", "double"])
@pytest.mark.parametrize("buffer", [10000, 5], ids=["from-buffer", "from-mongodb"])
async def test_a_client_resumes_from_an_event_whose_token_has_type_bits(mongo, relay_factory,
                                                                       key, buffer):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, REPLAY_BUFFER=buffer)
    relay.wait_ready()

    client = await ResumingClient().connect(relay.ws_url)
    with MongoClient(mongo.uri) as writer:
        writer[mongo.db].c.insert_one({"_id": key})
        await client.read(1)
        assert "." in client.last  # the id carries the type bits
        client.drop()
        writer[mongo.db].c.insert_many([{"_id": i} for i in range(20)])
    await client.connect(relay.ws_url)
    await client.read(21)
    assert client.controls == []  # no resync: nothing was lost
    assert_matches_log(client.tokens, mongo)


async def test_sse_ids_and_positions_carry_the_type_bits(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, POSITION_INTERVAL=0.3,
                          REPLAY_BUFFER=5)
    relay.wait_ready()

    quiet = await WS.connect(f"{relay.ws_url}?ops=delete")
    sse = await SSE.open(relay.port)
    with MongoClient(mongo.uri) as writer:
        writer[mongo.db].c.insert_many([{"_id": 0}, {"_id": TYPED_KEYS[0]}])
        [_, typed] = await sse.changes(2)
        position = await quiet.until(lambda f: f.get("type") == "position")
        newest = mongo.tokens()[-1]  # (on a real deployment this writes: after the position)
        assert "." in newest and typed["id"] == newest
        assert position["resume_after"] == newest
        writer[mongo.db].c.insert_many([{"_id": i} for i in range(1, 20)])
        writer[mongo.db].c.delete_one({"_id": 3})
    sse.close()
    again = await SSE.open(relay.port, last_event_id=typed["id"])  # beyond the 5-event buffer
    rest = await again.changes(20)
    assert [r["id"] for r in rest] == mongo.tokens()[2:]
    resumed = await WS.connect(f"{relay.ws_url}?ops=delete&resume_after="
                               f"{position['resume_after']}")
    [delete] = await resumed.changes(1)
    assert delete["documentKey"] == {"_id": 3}


@pytest.mark.fault
async def test_a_resume_mongodb_refuses_with_a_code_the_relay_does_not_know_ends_in_resync(
        primary, relay_factory):
    """Never an endless retry: whatever MongoDB answers a catch-up with, unless the driver
    calls it resumable, the client is told to resync and continues live."""
    relay = relay_factory(MONGO_SRV=primary.uri, REPLAY_BUFFER=5)
    relay.wait_ready()

    observer = await WS.connect(relay.ws_url)
    write(primary.uri, "db", 20)
    await observer.changes(20)  # the relay has them all: the 3rd is out of its 5-event buffer
    old = primary.tokens()[2]
    primary.fail_next("aggregate", code=54321, errmsg="a refusal no relay knows", count=1000)
    client = await WS.connect(f"{relay.ws_url}?resume_after={old}")
    first = await client.recv(timeout=10)
    assert first["type"] == "resync"
    write(primary.uri, "db", 2, start=20)
    assert [f["documentKey"]["_id"] for f in await client.changes(2)] == [20, 21]


# --- where the relay's stream starts (issue 12 item 2) ------------------------------------------

@pytest.mark.fault
async def test_writes_racing_the_open_do_not_hide_where_the_stream_starts(primary, relay_factory):
    """MongoDB picks a fresh stream's start time, then scans: writes committed in between come
    back in its first batch, and PyMongo has no resume token until they are read. A client
    resuming from before the relay started must still be caught up and handed over."""
    client = await left_by_a_killed_relay(relay_factory, primary.uri, 100)
    write(primary.uri, "db", 50, start=100)  # while no relay runs

    gate = primary.hold_next_open()
    successor = relay_factory(MONGO_SRV=primary.uri)
    await asyncio.to_thread(gate.wait_reached)
    write(primary.uri, "db", 20, start=150)  # committed while the successor's stream opens
    gate.release()
    successor.wait_ready()
    await client.connect(successor.ws_url)
    write(primary.uri, "db", 10, start=170)
    await client.read(180)
    assert client.controls == []
    assert_matches_log(client.tokens, primary)


# --- idle deployments (issue 12 item 3) ----------------------------------------------------------

@pytest.mark.fault
async def test_on_an_idle_deployment_a_client_back_at_a_new_relay_is_live_at_once(primary,
                                                                                   relay_factory):
    """A fresh stream starts one tick past the newest oplog entry, and on an idle primary its
    high-water mark moves only with the periodic no-op (10 s here). A client back from a
    restarted relay with the newest event's id is caught up to that point at once: nothing can
    lie between an event and the next tick once a stream has read past it."""
    client = await left_by_a_killed_relay(relay_factory, primary.uri, 3)
    successor = relay_factory(MONGO_SRV=primary.uri, POSITION_INTERVAL=0.3)
    successor.wait_ready()
    back = time.monotonic()
    await client.connect(successor.ws_url)
    position = await client.conn.until(lambda f: f.get("type") == "position", timeout=8)
    assert time.monotonic() - back < 3, "live only after the oplog moved"
    assert successor.ready()["catching_up"] == 0
    client.drop()

    again = await WS.connect(f"{successor.ws_url}?resume_after={position['resume_after']}")
    write(primary.uri, "db", 1, start=3)
    [change] = await again.changes(1)
    assert token_of(change) == primary.tokens()[-1]


# --- several events in one oplog entry (issue 12 item 4) ----------------------------------------

def write_group(uri: str, db: str, group: str, keys: range) -> None:
    """Events that share one cluster time and differ by txnOpIndex: a transaction's inserts, or
    a multi-delete (MongoDB 6.1+ batches it into one applyOps) of documents already there."""
    with MongoClient(uri) as client:
        coll = client[db].c
        if group == "transaction":
            with client.start_session() as session, session.start_transaction():
                for key in keys:
                    coll.insert_one({"_id": key}, session=session)
        else:
            coll.delete_many({"_id": {"$gte": keys.start, "$lt": keys.stop}})


@pytest.mark.parametrize("group", ["transaction", "delete_many"])
@pytest.mark.parametrize("buffer", [10000, 3], ids=["from-buffer", "from-mongodb"])
async def test_resuming_inside_a_transaction_or_batched_delete_loses_and_repeats_nothing(
        mongo, relay_factory, group, buffer):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, REPLAY_BUFFER=buffer,
                          POSITION_INTERVAL=0.2)
    relay.wait_ready()
    observer = await WS.connect(relay.ws_url)
    write(mongo.uri, mongo.db, 10)
    await observer.changes(10)  # the relay has read them: the client joins after the 10th
    client = await ResumingClient().connect(relay.ws_url)
    write_group(mongo.uri, mongo.db, group, range(20, 30) if group == "transaction" else range(10))
    for middle in (3, 6, 9):  # stop inside the group, with the rest of it unread
        await client.read(middle)
        client.drop()
        await client.connect(relay.ws_url)
    write(mongo.uri, mongo.db, 5, start=100)
    await client.read(15)
    assert all(c["type"] == "position" for c in client.controls)
    assert client.tokens == mongo.tokens()[10:]  # the group and the 5 after it, each once
