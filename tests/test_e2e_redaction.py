"""REDACT: the named fields never leave MongoDB, whatever shape the change event carries them in.

Each test runs the relay against a MongoDB (the test primary, or MONGODB_TEST_URI) and reads what
real WebSocket and SSE clients receive, plus the relay's own log.
"""

from __future__ import annotations

import json

import pytest

from tests.support import SSE, WS

pytestmark = pytest.mark.e2e


async def test_redacted_paths_never_leave_mongodb(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db,
                          REDACT="fullDocument.password,fullDocument.card.number")
    relay.wait_ready()
    secret = "s3cr3t-VALUE"

    client = await WS.connect(relay.ws_url)
    stream = await SSE.open(relay.port)
    users = mongo.client[mongo.db].users
    users.insert_one({"_id": 1, "name": "ada", "password": secret,
                      "card": {"number": secret, "brand": "visa"}})
    users.update_one({"_id": 1}, {"$set": {"password": {"hash": secret + "2"}}})
    users.update_one({"_id": 1}, {"$set": {"password.hash": secret + "3",
                                           "card.number": secret + "4", "name": "ada2"}})
    users.replace_one({"_id": 1}, {"name": "ada3", "password": secret + "5"})
    frames = await client.changes(4)
    assert frames[0]["fullDocument"] == {"_id": 1, "name": "ada", "card": {"brand": "visa"}}
    assert frames[2]["updateDescription"]["updatedFields"] == {"name": "ada2"}
    records = await stream.changes(4)
    for text in (json.dumps(frames), json.dumps(records), relay.log()):
        assert secret not in text and "password" not in text
