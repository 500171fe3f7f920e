"""Required images end to end: a stream that cannot get one stops once and says why.

With FULL_DOCUMENT or FULL_DOCUMENT_BEFORE_CHANGE ``required``, MongoDB fails the stream with 47
(NoMatchingDocument) on an event that has no image — and that event never will have one — so
retrying is futile: the relay stops, /readyz says how to recover, and after a restart a client
resuming from before that event is told to resync.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support import WS

pytestmark = pytest.mark.e2e


@pytest.mark.fault
@pytest.mark.parametrize("setting, image, write", [
    ("FULL_DOCUMENT", "post-image",
     lambda coll: coll.update_one({"_id": 1}, {"$set": {"n": 2}})),
    ("FULL_DOCUMENT_BEFORE_CHANGE", "pre-image", lambda coll: coll.delete_one({"_id": 1})),
])
async def test_a_required_image_that_is_missing_stops_the_stream_once_and_says_why(
        mongo, relay_factory, setting, image, write):
    env = dict(MONGO_SRV=mongo.uri, WATCH_DB=mongo.db, WATCH_COLLECTION="plain",
               **{setting: "required"})
    relay = relay_factory(**env)
    relay.wait_ready()
    plain = mongo.client[mongo.db].plain  # images not enabled
    client = await WS.connect(relay.ws_url)
    plain.insert_one({"_id": 1, "n": 1})
    [inserted] = await client.changes(1)
    opened = mongo.primary.change_streams_opened
    write(plain)
    status = relay.wait_ready(source="images_missing")
    assert status["status"] == 503
    for words in (image, setting, "collMod", "changeStreamPreAndPostImages", "restart"):
        assert words in status["reason"], words
    deadline = time.monotonic() + 1.5  # long enough for several retries of the old backoff
    while time.monotonic() < deadline:
        assert relay.ready()["source"] == "images_missing"
        assert mongo.primary.change_streams_opened == opened
        await asyncio.sleep(0.1)
    assert len([line for line in relay.lines if "images_missing" in line]) == 1  # no retries

    # Restarted, the relay starts from now; a client resuming from before the event that has
    # no image is caught up to it, told to resync, and continues live.
    relay.kill()
    restarted = relay_factory(**env)
    restarted.wait_ready()
    back = await WS.connect(f"{restarted.ws_url}?resume_after={inserted['_id']['_data']}")
    resync = await back.until(lambda frame: frame.get("type") == "resync")
    assert resync["reason"] == "images_missing"
    plain.insert_one({"_id": 2, "n": 1})
    [after] = await back.changes(1)
    assert after["documentKey"] == {"_id": 2}
    assert restarted.ready()["source"] == "open"
