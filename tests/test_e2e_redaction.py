"""REDACT: the named fields never leave MongoDB, whatever shape the change event carries them in.

Each test runs the relay against a MongoDB (the test primary, or MONGODB_TEST_URI) and reads what
real WebSocket and SSE clients receive, plus the relay's own log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse

import pytest

from tests.support import ROOT, SSE, WS

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


async def test_every_update_shape_keeps_the_secret_inside_mongodb(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db,
                          REDACT="fullDocument.profile.password.hash,fullDocument.cards.cvv")
    relay.wait_ready()
    client = await WS.connect(relay.ws_url)
    stream = await SSE.open(relay.port)
    users = mongo.client[mongo.db].users
    users.insert_one({"_id": 1, "profile": {"password": {"hash": "SECRET-0", "algo": "a"}},
                      "cards": [{"cvv": "SECRET-1", "n": 1}]})
    users.update_one({"_id": 1}, {"$set": {"profile.password": {"hash": "SECRET-2",
                                                                "algo": "b"}}})
    users.update_one({"_id": 1}, {"$set": {"cards.1": {"cvv": "SECRET-3", "n": 2}}})
    users.update_one({"_id": 1}, {"$set": {"cards.1.cvv": "SECRET-4"}})
    users.update_one({"_id": 1}, {"$set": {"cards": [[{"cvv": "SECRET-5", "n": 3}]]}})
    users.update_one({"_id": 1}, {"$push": {"cards": {"cvv": "SECRET-6", "n": 4}}})
    users.replace_one({"_id": 1}, {"cards": [{"cvv": "SECRET-7", "n": 5}]})
    frames = await client.changes(7)
    records = await stream.changes(7)
    for text in (json.dumps(frames), json.dumps(records), relay.log()):
        assert "SECRET" not in text
    updated = [frame["updateDescription"]["updatedFields"] for frame in frames[1:6]]
    assert updated == [{"profile.password": {"algo": "b"}}, {"cards.1": {"n": 2}}, {},
                       {"cards": [[{"n": 3}]]}, {"cards.1": {"n": 4}}]
    assert frames[0]["fullDocument"]["cards"] == [{"n": 1}]
    assert frames[6]["fullDocument"] == {"_id": 1, "cards": [{"n": 5}]}


async def test_overlapping_paths_are_normalised_and_events_keep_their_shape(mongo, relay_factory):
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db,
                          REDACT="fullDocument.a,fullDocument.a.b")
    relay.wait_ready()
    updates_only = '{"updateDescription": {"$exists": true}}'
    filtered = await WS.connect(relay.ws_url + "?filter=" + urllib.parse.quote(updates_only))
    bystander = await WS.connect(relay.ws_url)
    coll = mongo.client[mongo.db].c
    coll.insert_one({"_id": 1, "a": {"b": "SECRET"}, "x": 1})
    coll.insert_one({"_id": 2})
    coll.delete_one({"_id": 2})
    coll.update_one({"_id": 1}, {"$set": {"x": 2, "a.b": "SECRET-2"}})
    coll.drop()
    everything = await bystander.changes(5)
    assert [f["operationType"] for f in everything] == [
        "insert", "insert", "delete", "update", "drop"]
    assert ["updateDescription" in f for f in everything] == [False, False, False, True, False]
    assert everything[0]["fullDocument"] == {"_id": 1, "x": 1}
    assert everything[3]["updateDescription"]["updatedFields"] == {"x": 2}
    [only] = await filtered.changes(1)
    assert only["operationType"] == "update" and only["_id"] == everything[3]["_id"]
    assert "SECRET" not in json.dumps(everything)


@pytest.mark.parametrize("redact", ["fullDocument.cards.0.cvv", "password", "fullDocument._id"])
def test_redact_that_cannot_be_honoured_stops_the_relay_at_start(redact):
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py")], cwd=ROOT, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PORT": "0", "REDACT": redact}, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("changerelay: configuration error: REDACT:")
    assert len(result.stderr.strip().splitlines()) == 1


async def test_a_token_whose_rule_reads_a_redacted_field_is_refused(mongo, relay_factory):
    """The field is gone from every event before the relay sees it: a rule on it (here one that
    would let everything but bob's through) decides nothing, so such a token is refused."""
    import time

    import jwt

    secret = "redaction-test-" + "k" * 32
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, AUTH_JWT_SECRET=secret,
                          FULL_DOCUMENT="whenAvailable", REDACT="fullDocument.owner")

    def token(rule):
        return jwt.encode({"exp": int(time.time()) + 300, "filter": rule}, secret)

    relay.wait_ready()
    bystander = await WS.connect(relay.ws_url + "?access_token=" + token(
        {"documentKey._id": {"$ne": "hidden"}}))
    refused = relay.get("/socket?access_token=" + token({"fullDocument.owner": {"$ne": "bob"}}))
    assert refused.code == 403
    assert refused.json()["error"] == "row_rule_reads_redacted_field"
    mongo.client[mongo.db].docs.insert_one({"_id": "seen", "owner": "alice"})
    [change] = await bystander.changes(1)
    assert change["documentKey"] == {"_id": "seen"} and "owner" not in change["fullDocument"]
