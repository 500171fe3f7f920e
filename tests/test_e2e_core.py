"""End to end: ``python server.py`` as a process, a real driver writing, real WebSocket clients.

Tests without the ``fault`` marker also run against a real replica set when MONGODB_TEST_URI is
set (each in its own database).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import subprocess
import sys
import time
import uuid

import pytest
from bson import Binary, Decimal128, Int64, ObjectId
from pymongo import MongoClient

from changerelay.primary import TestPrimary
from tests.support import ROOT, SSE, WS, free_port, token_of

pytestmark = pytest.mark.e2e


def write_every_kind(db, coll="c"):
    """insert, update, replace, delete on ``db.coll``; returns the documents' ids."""
    c = db[coll]
    c.insert_one({"_id": 1, "name": "ada", "n": 1})
    c.update_one({"_id": 1}, {"$set": {"n": 2}, "$unset": {"name": ""}})
    c.replace_one({"_id": 1}, {"_id": 1, "name": "grace"})
    c.delete_one({"_id": 1})


CRUD = ["insert", "update", "replace", "delete"]


@pytest.mark.parametrize("scope", ["collection", "database", "deployment"])
async def test_every_operation_type_reaches_two_clients_identically(mongo, relay_factory, scope):
    env = {"MONGO_SRV": mongo.uri}
    if scope in ("collection", "database"):
        env["WATCH_DB"] = mongo.db
    if scope == "collection":
        env["WATCH_COLLECTION"] = "c"
    relay = relay_factory(env)
    relay.wait_ready()
    db = mongo.client[mongo.db]

    a = await WS.connect(relay.ws_url)
    b = await WS.connect(relay.ws_url)
    write_every_kind(db)
    if scope == "collection":
        db.c.drop()
        expected = [*CRUD, "drop", "invalidate"]
    else:
        db.c.insert_one({"_id": 2})
        db.c.rename("c2")
        db.c2.drop()
        mongo.client.drop_database(mongo.db)
        expected = [*CRUD, "insert", "rename", "drop", "dropDatabase"]
        if scope == "database":
            expected.append("invalidate")

    def mine(frame):  # on a shared real deployment, ignore other databases
        return frame.get("ns", {}).get("db", mongo.db) == mongo.db

    got_a = [f for f in await a.changes(len(expected)) if mine(f)]
    got_b = [f for f in await b.changes(len(expected)) if mine(f)]
    assert [f["operationType"] for f in got_a] == expected
    assert got_a == got_b
    insert, update, replace, delete = got_a[:4]
    assert insert["fullDocument"] == {"_id": 1, "name": "ada", "n": 1}
    assert insert["ns"] == {"db": mongo.db, "coll": "c"}
    assert insert["documentKey"] == {"_id": 1}
    assert update["updateDescription"]["updatedFields"] == {"n": 2}
    assert update["updateDescription"]["removedFields"] == ["name"]
    assert replace["fullDocument"] == {"_id": 1, "name": "grace"}
    assert "fullDocument" not in delete and delete["documentKey"] == {"_id": 1}
    assert {"$date"} <= set(insert["wallTime"]) and "$timestamp" in insert["clusterTime"]
    tokens = [token_of(f) for f in got_a]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    if scope == "collection":
        # After invalidate the relay carries on with startAfter: a recreated collection shows.
        db.c.insert_one({"_id": "again"})
        [again] = await a.changes(1)
        assert again["operationType"] == "insert" and again["documentKey"] == {"_id": "again"}
    if scope == "database":
        db.c.insert_one({"_id": "again"})
        [again] = [f for f in await a.changes(1) if mine(f)]
        assert again["documentKey"] == {"_id": "again"}


async def test_extended_json_types(mongo, relay):
    oid = ObjectId()
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.UTC)
    doc = {"_id": oid, "when": when, "price": Decimal128("19.99"), "big": Int64(2 ** 40),
           "blob": Binary(b"\x00\x01"), "ratio": 0.25, "tags": ["a", None, True]}

    client = await WS.connect(relay.ws_url)
    mongo.client[mongo.db].items.insert_one(doc)
    [frame] = await client.changes(1)
    full = frame["fullDocument"]
    assert full["_id"] == {"$oid": str(oid)}
    assert full["when"] == {"$date": "2026-01-02T03:04:05.678Z"}
    assert full["price"] == {"$numberDecimal": "19.99"}
    assert full["big"] == 2 ** 40
    assert full["blob"] == {"$binary": {"base64": "AAE=", "subType": "00"}}
    assert (full["ratio"], full["tags"]) == (0.25, ["a", None, True])
    assert frame["documentKey"] == {"_id": {"$oid": str(oid)}}
    assert set(frame["_id"]) == {"_data"}


def insert_many(client: MongoClient, db: str, count: int, start: int = 0, coll="c"):
    for i in range(start, start + count):
        client[db][coll].insert_one({"_id": i, "i": i})


def assert_exactly(frames, primary, db=None):
    """The client's change events are exactly the primary's, in order, no loss, no duplicate."""
    got = [token_of(f) for f in frames if "operationType" in f]
    want = [token_of(e) for e in primary.events
            if db is None or e.get("ns", {}).get("db") == db]
    assert got == want


@pytest.mark.fault
async def test_hang_up_mid_stream_loses_nothing(primary, writer, relay_factory):
    relay = relay_factory(MONGO_SRV=primary.uri)
    relay.wait_ready()

    client = await WS.connect(relay.ws_url)
    insert_many(writer, "db", 100)
    primary.hangup_next("getMore")
    insert_many(writer, "db", 100, start=100)
    primary.hangup_next("getMore", count=2)  # the driver's own resume fails too
    insert_many(writer, "db", 100, start=200)
    await client.changes(300)
    assert_exactly(client.frames, primary)


@pytest.mark.fault
async def test_non_resumable_error_reopens_from_the_last_token(primary, writer, relay_factory):
    relay = relay_factory(MONGO_SRV=primary.uri)
    relay.wait_ready()

    client = await WS.connect(relay.ws_url)
    insert_many(writer, "db", 50)
    await client.changes(50)
    opened = primary.change_streams_opened
    primary.fail_next("getMore", code=2, errmsg="BadValue injected")  # no resumable label
    insert_many(writer, "db", 50, start=50)
    await client.changes(50)
    assert_exactly(client.frames, primary)
    assert primary.change_streams_opened > opened
    relay.wait_log("retrying in")


@pytest.mark.fault
async def test_history_lost_tells_clients_to_resync_then_continues_live(relay_factory):
    """The relay's resume point is gone (here: MongoDB came back without its old oplog)."""
    port = free_port()
    primary = TestPrimary(port=port).start()
    relay = relay_factory(MONGO_SRV=primary.uri + "&serverSelectionTimeoutMS=500")
    relay.wait_ready()

    client = await WS.connect(relay.ws_url)
    with MongoClient(primary.uri) as writer:
        insert_many(writer, "db", 5)
    await client.changes(5)
    primary.stop()
    with TestPrimary(port=port) as reborn, MongoClient(reborn.uri) as writer:
        writer.db.c.insert_one({"_id": "before-resume"})
        resync = await client.until(lambda f: f.get("type") == "resync", timeout=30)
        assert resync == {"type": "resync", "reason": "history_lost"}
        relay.wait_log("286")
        relay.wait_ready()
        insert_many(writer, "db", 3, start=100)
        later = await client.changes(3)
        assert [f["documentKey"]["_id"] for f in later] == [100, 101, 102]


@pytest.mark.fault
async def test_unreachable_at_start_then_appearing(relay_factory):
    port = free_port()
    uri = f"mongodb://127.0.0.1:{port}/?replicaSet=rs0&serverSelectionTimeoutMS=500"
    relay = relay_factory(MONGO_SRV=uri)
    status = relay.wait_ready(source="unreachable")
    assert status["status"] == 503 and "cannot reach MongoDB" in status["reason"]
    assert relay.get("/healthz").code == 200
    assert relay.get("/").code == 200
    with TestPrimary(port=port) as primary:
        relay.wait_ready(timeout=30)
        client = await WS.connect(relay.ws_url)
        with MongoClient(primary.uri) as writer:
            writer.db.c.insert_one({"_id": "late"})
        [frame] = await client.changes(1)
        assert frame["documentKey"] == {"_id": "late"}


@pytest.mark.fault
def test_the_unreachable_line_says_what_to_check(relay_factory):
    port = free_port()
    relay = relay_factory(
        MONGO_SRV=f"mongodb://127.0.0.1:{port}/?replicaSet=rs0&serverSelectionTimeoutMS=500")
    line = relay.wait_log("change stream unreachable")
    assert f"127.0.0.1:{port}" in line  # what failed, as the driver says it...
    for advice in ("MONGO_SRV", "mongosh", "firewall", "Atlas"):  # ...and what to check next
        assert advice in line, (advice, line)
    assert "firewall" in relay.ready()["reason"]


@pytest.mark.fault
def test_standalone_server_gets_the_replica_set_advice(relay_factory):
    with TestPrimary(replica_set=False) as standalone:
        uri = f"mongodb://127.0.0.1:{standalone.port}/?directConnection=true"
        relay = relay_factory(MONGO_SRV=uri)
        status = relay.wait_ready(source="not_replica_set")
        assert status["status"] == 503
        assert "--replSet rs0" in status["reason"] and "rs.initiate()" in status["reason"]
        relay.wait_log("rs.initiate()")


@pytest.mark.fault
def test_readyz_follows_mongodb_going_away_and_back(relay_factory):
    port = free_port()
    primary = TestPrimary(port=port).start()
    relay = relay_factory(MONGO_SRV=primary.uri + "&serverSelectionTimeoutMS=500")
    assert relay.wait_ready()["status"] == 200
    primary.stop()
    assert relay.wait_ready(source="unreachable", timeout=30)["status"] == 503
    with TestPrimary(port=port):
        assert relay.wait_ready(timeout=30)["status"] == 200


@pytest.mark.fault
def test_auth_failure_is_named_and_password_never_shown(relay_factory):
    with TestPrimary() as primary:
        primary.auth_fails = True
        secret = "hunter2-" + uuid.uuid4().hex[:6]
        uri = (f"mongodb://relay:{secret}@127.0.0.1:{primary.port}/"
               "?replicaSet=rs0&serverSelectionTimeoutMS=1000")
        relay = relay_factory(MONGO_SRV=uri)
        status = relay.wait_ready(source="auth_failed")
        assert status["status"] == 503 and "password" in status["reason"]
        relay.wait_log("authentication failed")
        assert secret not in json.dumps(status) and secret not in relay.log()


async def test_sigterm_closes_clients_with_1001_and_exits_0(mongo, relay):
    client = await WS.connect(relay.ws_url)
    stream = await SSE.open(relay.port)
    mongo.client[mongo.db].c.insert_one({"_id": 1})
    await client.changes(1)
    await stream.changes(1)
    started = time.monotonic()
    relay.proc.send_signal(15)
    code, reason = await client.closed(timeout=5)
    assert (code, reason) == (1001, "server shutting down")
    await asyncio.wait_for(stream.reader.read(), 5)  # returns only at EOF: SSE ends too
    assert stream.reader.at_eof()
    assert relay.proc.wait(5) == 0
    assert time.monotonic() - started < 5


def test_health_page_and_static(relay):
    assert relay.get("/healthz").code == 200
    page = relay.get("/")
    assert page.code == 200 and b"/static/app.js" in page.body
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and f"ws://127.0.0.1:{relay.port}" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert relay.get("/static/changerelay.js").code == 200
    ready = relay.ready()
    assert ready["status"] == 200 and ready["source"] == "open"


async def test_reuse_port_workers_share_the_port_and_all_deliver(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, REUSE_PORT=2)
    relay.wait_log("listening on", timeout=15)
    deadline = time.monotonic() + 15
    while sum("listening on" in line for line in relay.lines) < 2:
        assert time.monotonic() < deadline, relay.log()
        time.sleep(0.05)
    pids = {line.split("changerelay ")[1].split()[0] for line in relay.lines
            if "listening on" in line}
    assert len(pids) == 2
    ready = set()
    while len(ready) < 2:  # each worker has its own change stream; wait until both report open
        status = relay.ready()
        if status["source"] == "open":
            ready.add(status["pid"])
        assert time.monotonic() < deadline + 15

    clients = [await WS.connect(relay.ws_url) for _ in range(8)]
    mongo.client[mongo.db].c.insert_many([{"_id": i} for i in range(50)])
    for client in clients:
        assert [f["documentKey"]["_id"] for f in await client.changes(50)] == list(range(50))
    relay.proc.send_signal(15)
    for client in clients:
        assert (await client.closed())[0] == 1001
    assert relay.proc.wait(10) == 0


async def test_permessage_deflate_when_enabled(mongo, relay_factory):
    """WS_COMPRESSION=true: a client that negotiates deflate gets every event, live and replayed,
    as the compressed frames built once per event (control messages go uncompressed)."""
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, WS_COMPRESSION="true")
    relay.wait_ready()

    from tornado import websocket

    plain = await WS.connect(relay.ws_url)
    deflate = WS(await websocket.websocket_connect(relay.ws_url, compression_options={}))
    assert "permessage-deflate" in deflate.conn.headers.get("Sec-WebSocket-Extensions", "")
    coll = mongo.client[mongo.db].c
    coll.insert_many([{"_id": i, "text": "x" * 2000} for i in range(20)])
    live = await deflate.changes(20)
    assert live == await plain.changes(20)
    resumed = WS(await websocket.websocket_connect(
        f"{relay.ws_url}?resume_after={token_of(live[4])}", compression_options={}))
    assert [f["documentKey"]["_id"] for f in await resumed.changes(15)] == list(range(5, 20))


def test_json_logs_are_one_object_per_line_and_mask_the_password(relay_factory):
    uri = "mongodb://relay:s3cret-pw@127.0.0.1:9/?serverSelectionTimeoutMS=200"
    relay = relay_factory(MONGO_SRV=uri, LOG_FORMAT="json")
    relay.wait_ready(source="unreachable")
    assert relay.get("/healthz").code == 200
    relay.wait_log("GET /healthz")
    with socket.create_connection(("127.0.0.1", relay.port)) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # the gate's own line, not Tornado's any more
        raw.recv(100)
    relay.wait_log("malformed_request")
    records = [json.loads(line) for line in relay.lines if line.strip()]
    assert {"message", "levelname", "name"} <= set(records[0])
    names = {r["name"] for r in records}
    assert {"asyncio", "tornado.access"} <= names  # not only our own lines
    assert not any("s3cret-pw" in line for line in relay.lines)
    assert any("relay:***@" in r["message"] for r in records)


def test_a_bad_setting_is_one_json_line_when_json_logs_are_asked_for(relay_factory, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--port", "http"], cwd=tmp_path,
        capture_output=True, text=True, timeout=30, env={"LOG_FORMAT": "json", "PATH": "/usr/bin"})
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "--port" in json.loads(line)["message"]
