"""What ``livequery.py`` relies on in PyMongo: a snapshot session keeps the cluster time its first
read was answered at in the private ``_snapshot_time`` (the snapshot reads spec: "the driver MUST
save the atClusterTime ... and use it for subsequent reads"), and sends it on every later read."""

from __future__ import annotations

from bson import Timestamp
from pymongo import AsyncMongoClient

from changerelay.primary import TestPrimary


async def test_a_snapshot_session_keeps_its_read_time_where_livequery_reads_it():
    with TestPrimary() as primary:
        async with AsyncMongoClient(primary.uri, serverSelectionTimeoutMS=5000) as client:
            coll = client.db.c
            await coll.insert_many([{"_id": i} for i in range(3)])
            session = client.start_session(snapshot=True)
            assert session._snapshot_time is None
            rows = await (await coll.aggregate([{"$count": "n"}], session=session)).to_list()
            at = session._snapshot_time
            assert rows == [{"n": 3}] and isinstance(at, Timestamp)
            await coll.insert_one({"_id": 3})
            assert len(await coll.find(session=session).to_list()) == 3
            await session.end_session()
    finds = [c for c in primary.commands if c.get("find") == "c"]
    assert finds[-1]["readConcern"] == {"level": "snapshot", "atClusterTime": at}
