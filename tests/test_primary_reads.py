"""The test primary's reads, held to MongoDB's documented behaviour through the real PyMongo driver:
find and aggregate cursors with getMore batches, snapshot read concern at one point in time, and
SnapshotTooOld beyond the history kept. Expected values cite the manual or MongoDB's source."""

from __future__ import annotations

import asyncio

import pytest
from bson import Timestamp
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure

from changerelay.primary import TestPrimary

SNAPSHOT = {"level": "snapshot"}


@pytest.fixture
def server():
    with TestPrimary() as primary:
        yield primary


@pytest.fixture
def client(server):
    with MongoClient(server.uri, serverSelectionTimeoutMS=5000) as c:
        yield c


def ids(docs: list[dict]) -> list:
    return [doc["_id"] for doc in docs]


def last_time(server: TestPrimary) -> Timestamp:
    return server.events[-1]["clusterTime"]


# --- find: filter, sort, projection, limit, batches ----------------------------------------------

def test_find_filters_sorts_projects_and_limits(client):
    client.db.c.insert_many([{"_id": i, "n": i % 4, "s": f"v{i}"} for i in range(20)])
    found = list(client.db.c.find({"n": {"$in": [1, 3]}, "_id": {"$gte": 5}}, {"s": 1},
                                  sort=[("n", -1), ("_id", 1)], limit=4))
    assert found == [{"_id": 7, "s": "v7"}, {"_id": 11, "s": "v11"}, {"_id": 15, "s": "v15"},
                     {"_id": 19, "s": "v19"}]


def test_first_batch_is_101_documents_then_get_more_returns_the_rest(client):
    # https://www.mongodb.com/docs/manual/tutorial/iterate-a-cursor/#cursor-batches
    client.db.c.insert_many([{"_id": i} for i in range(250)])
    first = client.db.command("find", "c")["cursor"]
    assert len(first["firstBatch"]) == 101 and first["id"] != 0 and first["ns"] == "db.c"
    more = client.db.command("getMore", first["id"], collection="c", batchSize=100)["cursor"]
    assert ids(more["nextBatch"]) == list(range(101, 201)) and more["id"] == first["id"]
    rest = client.db.command("getMore", first["id"], collection="c")["cursor"]
    assert ids(rest["nextBatch"]) == list(range(201, 250))
    assert rest["id"] == 0  # exhausted: closed
    with pytest.raises(OperationFailure) as caught:
        client.db.command("getMore", first["id"], collection="c")
    assert caught.value.code == 43


def test_the_driver_iterates_a_cursor_across_batches(server, client):
    client.db.c.insert_many([{"_id": i} for i in range(30)])
    assert ids(client.db.c.find(batch_size=7)) == list(range(30))
    get_mores = [c for c in server.commands if "getMore" in c]
    assert len(get_mores) == 4  # 7 + 7*4 >= 30: the last batch closes the cursor


def test_a_limit_within_the_first_batch_closes_the_cursor(client):
    client.db.c.insert_many([{"_id": i} for i in range(10)])
    reply = client.db.command("find", "c", limit=3, batchSize=5)["cursor"]
    assert ids(reply["firstBatch"]) == [0, 1, 2] and reply["id"] == 0


def test_single_batch_closes_the_cursor(client):
    client.db.c.insert_many([{"_id": i} for i in range(10)])
    reply = client.db.command("find", "c", batchSize=4, singleBatch=True)["cursor"]
    assert ids(reply["firstBatch"]) == [0, 1, 2, 3] and reply["id"] == 0


def test_a_batch_stops_before_16_mib(client):
    big = "x" * (6 * 1024 * 1024)
    for i in range(3):
        client.db.c.insert_one({"_id": i, "big": big})
    first = client.db.command("find", "c")["cursor"]
    assert ids(first["firstBatch"]) == [0, 1]  # a third 6 MiB document would pass 16 MiB
    rest = client.db.command("getMore", first["id"], collection="c")["cursor"]
    assert ids(rest["nextBatch"]) == [2] and rest["id"] == 0


def test_killed_read_cursor_is_cursor_not_found(client):
    client.db.c.insert_many([{"_id": i} for i in range(5)])
    reply = client.db.command("find", "c", batchSize=2)["cursor"]
    killed = client.db.command("killCursors", "c", cursors=[reply["id"]])
    assert killed["cursorsKilled"] == [reply["id"]]
    with pytest.raises(OperationFailure) as caught:
        client.db.command("getMore", reply["id"], collection="c")
    assert caught.value.code == 43


def test_negative_batch_size_is_refused(client):
    with pytest.raises(OperationFailure) as caught:
        client.db.command("find", "c", batchSize=-1)
    assert caught.value.code == 51024


# --- aggregate: $match and $count ----------------------------------------------------------------

def test_aggregate_matches_and_counts(client):
    client.db.c.insert_many([{"_id": i, "n": i % 3} for i in range(10)])
    assert list(client.db.c.aggregate([{"$match": {"n": 0}}, {"$count": "total"}])) == \
        [{"total": 4}]
    # $count is a $group: an empty input gives no document
    # (https://www.mongodb.com/docs/manual/reference/operator/aggregation/count/)
    assert list(client.db.c.aggregate([{"$match": {"n": 9}}, {"$count": "total"}])) == []
    found = list(client.db.c.aggregate([{"$match": {"n": 1}}, {"$sort": {"_id": -1}},
                                        {"$skip": 1}, {"$limit": 2}]))
    assert ids(found) == [4, 1]


@pytest.mark.parametrize(("spec", "code"), [(1, 40156), ("", 40157), ("$n", 40158),
                                            ("a.b", 40160)])
def test_count_field_errors_are_mongodbs(client, spec, code):
    with pytest.raises(OperationFailure) as caught:
        list(client.db.c.aggregate([{"$count": spec}]))
    assert caught.value.code == code


def test_aggregate_without_cursor_option_is_refused(client):
    with pytest.raises(OperationFailure) as caught:
        client.db.command("aggregate", "c", pipeline=[])
    assert caught.value.code == 9


# --- snapshot read concern -----------------------------------------------------------------------

def test_snapshot_find_reports_its_time_and_every_get_more_reads_it(server, client):
    client.db.c.insert_many([{"_id": i, "v": 0} for i in range(6)])
    reply = client.db.command("find", "c", batchSize=2, readConcern=SNAPSHOT)["cursor"]
    at = reply["atClusterTime"]
    assert at == last_time(server)  # the newest write: a single node's majority commit point
    assert ids(reply["firstBatch"]) == [0, 1]
    client.db.c.update_many({}, {"$set": {"v": 1}})
    client.db.c.delete_one({"_id": 3})
    client.db.c.insert_one({"_id": 6, "v": 1})
    more = client.db.command("getMore", reply["id"], collection="c")["cursor"]
    assert more["nextBatch"] == [{"_id": i, "v": 0} for i in (2, 3, 4, 5)]
    assert more["id"] == 0
    now = client.db.command("find", "c")["cursor"]["firstBatch"]
    assert now == [{"_id": i, "v": 1} for i in (0, 1, 2, 4, 5, 6)]


def test_snapshot_read_at_a_past_cluster_time(server, client):
    client.db.c.insert_one({"_id": 1, "v": "a"})
    at = last_time(server)
    client.db.c.replace_one({"_id": 1}, {"w": "b"})
    client.db.c.insert_one({"_id": 2})
    client.db.c.delete_one({"_id": 1})
    reply = client.db.command("find", "c", readConcern={**SNAPSHOT, "atClusterTime": at})
    assert reply["cursor"]["firstBatch"] == [{"_id": 1, "v": "a"}]
    assert reply["cursor"]["atClusterTime"] == at
    before = Timestamp(at.time, at.inc - 1)
    reply = client.db.command("aggregate", "c", pipeline=[], cursor={},
                              readConcern={**SNAPSHOT, "atClusterTime": before})
    assert reply["cursor"]["firstBatch"] == [] and reply["cursor"]["atClusterTime"] == before


def test_empty_snapshot_find_omits_at_cluster_time_but_aggregate_reports_it(server, client):
    # SERVER-83472: mongod's find leaves it out when nothing matched; aggregate never does
    client.db.c.insert_one({"_id": 1})
    found = client.db.command("find", "c", filter={"_id": 2}, readConcern=SNAPSHOT)["cursor"]
    assert "atClusterTime" not in found
    counted = client.db.command("aggregate", "c", cursor={}, readConcern=SNAPSHOT,
                                pipeline=[{"$match": {"_id": 2}}, {"$count": "n"}])["cursor"]
    assert counted["firstBatch"] == [] and counted["atClusterTime"] == last_time(server)


def test_snapshot_reads_do_not_see_an_uncommitted_transaction(client):
    client.db.c.insert_one({"_id": 1})
    with client.start_session() as session, session.start_transaction():
        client.db.c.insert_one({"_id": 2}, session=session)
        reply = client.db.command("find", "c", readConcern=SNAPSHOT)["cursor"]
        assert ids(reply["firstBatch"]) == [1]
    reply = client.db.command("find", "c", readConcern=SNAPSHOT)["cursor"]
    assert ids(reply["firstBatch"]) == [1, 2]


def test_snapshot_read_in_the_future_is_invalid_options(server, client):
    client.db.c.insert_one({"_id": 1})
    later = Timestamp(last_time(server).time + 100, 1)
    with pytest.raises(OperationFailure) as caught:
        client.db.command("find", "c", readConcern={**SNAPSHOT, "atClusterTime": later})
    assert caught.value.code == 72
    assert "must not be greater than the current clusterTime" in str(caught.value)


@pytest.mark.parametrize("concern", [
    {"level": "majority", "atClusterTime": Timestamp(1, 1)},
    {**SNAPSHOT, "atClusterTime": Timestamp(1, 1), "afterClusterTime": Timestamp(1, 1)}])
def test_at_cluster_time_needs_snapshot_and_excludes_after_cluster_time(client, concern):
    with pytest.raises(OperationFailure) as caught:
        client.db.command("find", "c", readConcern=concern)
    assert caught.value.code == 72


def test_forgotten_history_is_snapshot_too_old(server, client):
    client.db.c.insert_many([{"_id": i} for i in range(4)])
    old = server.events[0]["clusterTime"]
    kept = server.events[-1]["clusterTime"]
    server.forget_history(keep_last=1)
    with pytest.raises(OperationFailure) as caught:
        client.db.command("find", "c", readConcern={**SNAPSHOT, "atClusterTime": old})
    assert caught.value.code == 239
    assert caught.value.details["codeName"] == "SnapshotTooOld"
    assert str(caught.value).startswith(
        f"Read timestamp Timestamp({old.time}, {old.inc}) is older than the oldest available "
        "timestamp.")
    reply = client.db.command("find", "c", readConcern={**SNAPSHOT, "atClusterTime": kept})
    assert ids(reply["cursor"]["firstBatch"]) == [0, 1, 2, 3]  # still within the history


def test_a_snapshot_cursor_outliving_the_history_fails_its_get_more(server, client):
    client.db.c.insert_many([{"_id": i} for i in range(4)])
    reply = client.db.command("find", "c", batchSize=1, readConcern=SNAPSHOT)["cursor"]
    client.db.c.insert_many([{"_id": i} for i in range(4, 8)])
    server.forget_history(keep_last=1)
    with pytest.raises(OperationFailure) as caught:
        client.db.command("getMore", reply["id"], collection="c")
    assert caught.value.code == 239
    with pytest.raises(OperationFailure) as caught:
        client.db.command("getMore", reply["id"], collection="c")
    assert caught.value.code == 43  # the failure closed it


def test_snapshot_window_bounds_how_far_back_a_read_reaches():
    with TestPrimary(snapshot_window=1) as server, MongoClient(server.uri) as client:
        client.db.c.insert_one({"_id": 1})
        now = last_time(server)
        with pytest.raises(OperationFailure) as caught:
            client.db.command("find", "c", readConcern={**SNAPSHOT, "atClusterTime": Timestamp(
                now.time - 5, 1)})
        assert caught.value.code == 239


# --- PyMongo snapshot sessions and the seam with a change stream ---------------------------------

async def test_async_snapshot_session_reads_one_point_in_time(server, client):
    client.db.c.insert_many([{"_id": i, "k": i % 2} for i in range(5)])
    at = last_time(server)
    async with AsyncMongoClient(server.uri, serverSelectionTimeoutMS=5000) as aclient:
        coll = aclient.db.c
        async with aclient.start_session(snapshot=True) as session:
            counted = await (await coll.aggregate(
                [{"$match": {"k": 0}}, {"$count": "n"}], session=session)).to_list()
            # PyMongo keeps the time in a private attribute (client_session_shared.py
            # _process_response); the relay relies on it, so it is pinned here
            assert session._snapshot_time == at
            await asyncio.to_thread(client.db.c.delete_many, {})
            found = await coll.find({"k": 0}, session=session, batch_size=1).to_list()
    sent = [c for c in server.commands if "find" in c and "readConcern" in c]
    assert counted == [{"n": 3}]
    assert ids(found) == [0, 2, 4]
    assert sent[-1]["readConcern"] == {"level": "snapshot", "atClusterTime": at}


def test_a_stream_started_at_the_snapshot_time_includes_that_time(server, client):
    # startAtOperationTime is inclusive: the snapshot already holds the write at its own time,
    # which the stream repeats; the writes after it are exactly the rest
    client.db.c.insert_many([{"_id": i} for i in range(3)])
    at = client.db.command("aggregate", "c", pipeline=[], cursor={},
                           readConcern=SNAPSHOT)["cursor"]["atClusterTime"]
    client.db.c.insert_one({"_id": 3})
    with client.db.c.watch(start_at_operation_time=at, max_await_time_ms=200) as stream:
        first, second = stream.next(), stream.next()
    assert first["clusterTime"] == at and first["documentKey"] == {"_id": 2}
    assert second["documentKey"] == {"_id": 3}
