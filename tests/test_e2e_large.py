"""Change events over 16 MB (issue 12 item 5).

A big document with its pre- and post-image makes a change event larger than a BSON document may
be: MongoDB fails the stream on it with BSONObjectTooLarge (10334), at that same event on every
reopen. With ``$changeStreamSplitLargeEvent`` (MongoDB 7.0, 6.0.9) as the last PIPELINE stage it
sends the event in fragments instead, which the relay puts back together; without it the relay
stops its change stream and says why, as for a missing required image.
"""

from __future__ import annotations

import pytest

from changerelay.tokens import order_key
from tests.support import WS, token_of

pytestmark = pytest.mark.e2e

BIG = "x" * (9 * 1024 * 1024)  # a pre- and a post-image of this size make an 18 MB event
IMAGES = {"FULL_DOCUMENT": "whenAvailable", "FULL_DOCUMENT_BEFORE_CHANGE": "whenAvailable"}
SPLIT = '[{"$changeStreamSplitLargeEvent": {}}]'
LARGE_FRAMES = 64 * 1024 * 1024


def with_images(mongo):
    mongo.client[mongo.db].create_collection("c", changeStreamPreAndPostImages={"enabled": True})
    return mongo.client[mongo.db].c


def replace_big(coll) -> None:
    """The big replace (its event is over 16 MB), then a small insert after it."""
    coll.replace_one({"_id": 1}, {"s": BIG + "y", "secret": "hidden"})
    coll.insert_one({"_id": 2})


async def changes(client: WS, count: int) -> list[dict]:
    return await client.changes(count, timeout=60)


async def test_split_events_reach_clients_whole_live_and_from_history(mongo, relay_factory):
    coll = with_images(mongo)
    coll.insert_one({"_id": 1, "s": BIG, "secret": "hidden"})
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, PIPELINE=SPLIT,
                          REDACT="fullDocument.secret", REPLAY_BUFFER=1,
                          CLIENT_BUFFER_BYTES=LARGE_FRAMES, **IMAGES)
    relay.wait_ready()
    live = await WS.connect(relay.ws_url, max_message_size=LARGE_FRAMES)
    coll.insert_one({"_id": 0})
    [marker] = await changes(live, 1)

    replace_big(coll)
    whole, after = await changes(live, 2)
    assert whole["operationType"] == "replace" and "splitEvent" not in whole
    assert whole["fullDocument"] == {"_id": 1, "s": BIG + "y"}  # redacted before the split
    assert whole["fullDocumentBeforeChange"] == {"_id": 1, "s": BIG}
    assert after["documentKey"] == {"_id": 2}
    # its id is its last fragment's: after the event's own token, before the next event's
    replace, insert = mongo.tokens()[-2:]
    assert order_key(replace) < order_key(token_of(whole)) < order_key(insert)

    # the buffer holds one event: resuming from the marker catches up from MongoDB
    again = await WS.connect(f"{relay.ws_url}?resume_after={token_of(marker)}",
                             max_message_size=LARGE_FRAMES)
    assert await changes(again, 2) == [whole, after]
    assert relay.ready()["catchup_streams_opened"] >= 1


async def test_without_split_the_stream_stops_on_an_event_over_16mb_and_says_why(
        mongo, relay_factory):
    coll = with_images(mongo)
    coll.insert_one({"_id": 1, "s": BIG, "secret": "hidden"})
    relay = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, **IMAGES)
    relay.wait_ready()
    client = await WS.connect(relay.ws_url)
    coll.insert_one({"_id": 0})
    [marker] = await client.changes(1)

    replace_big(coll)
    told = await client.until(lambda f: f.get("type") == "error", timeout=30)
    assert told["code"] == "event_too_large"
    status = relay.wait_ready(source="event_too_large", timeout=30)
    assert status["status"] == 503
    for words in ("16 MB", "$changeStreamSplitLargeEvent", "PIPELINE", "7.0", "restart"):
        assert words in status["reason"]
    stopped = [line for line in relay.lines if "change stream stopped" in line]
    assert len(stopped) == 1 and "event_too_large" in stopped[0]
    attempts = status["attempts"]
    relay.wait_log("change stream stopped")
    assert relay.ready()["attempts"] == attempts  # no retries: each would fail the same way

    # A relay started now begins past the event; a client from before it is caught up to it and
    # told to resync, then continues live.
    successor = relay_factory(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, **IMAGES)
    successor.wait_ready()
    back = await WS.connect(f"{successor.ws_url}?resume_after={token_of(marker)}")
    assert await back.until(lambda f: "type" in f, timeout=30) == {
        "type": "resync", "reason": "event_too_large"}
    coll.insert_one({"_id": 3})
    [fresh] = await back.changes(1)
    assert fresh["documentKey"] == {"_id": 3}
