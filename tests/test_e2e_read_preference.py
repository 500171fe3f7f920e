"""``readPreference`` in MONGO_SRV reaches MongoDB with every change stream the relay opens
(docs/deploy.md, "Change streams from secondaries").

What a driver must send is the server selection specification's rule
(mongodb/specifications source/server-selection/server-selection.md, replica set topologies):
"For all read preferences modes except 'primary', clients MUST set ... `$readPreference` global
command argument (OP_MSG)", and for 'primary' MUST NOT. A getMore goes to the server holding the
cursor and carries none (PyMongo's pymongo/message.py: "getMore commands do not send
$readPreference"). The test primary is the only member, so secondaryPreferred selects it — what
matters here is what it is asked, since a secondary is chosen by the driver, not the relay.
"""

from __future__ import annotations

import pytest
from pymongo import MongoClient

from tests.support import WS

pytestmark = [pytest.mark.e2e, pytest.mark.fault]


def change_stream_commands(primary) -> tuple[list[dict], list[dict]]:
    """The aggregates that opened change streams, and the getMores on their cursors."""
    commands = list(primary.commands)
    opens = [c for c in commands if "aggregate" in c
             and any("$changeStream" in stage for stage in c.get("pipeline", []))]
    more = [c for c in commands if "getMore" in c]
    return opens, more


@pytest.mark.parametrize("mode", ["secondaryPreferred", "secondary", "nearest"])
async def test_the_connection_strings_read_preference_reaches_every_change_stream(
        primary, relay_factory, mode):
    relay = relay_factory(MONGO_SRV=f"{primary.uri}&readPreference={mode}",
                          WATCH_DB="shop", REPLAY_BUFFER=2)
    relay.wait_ready(source="open" if mode != "secondary" else "unreachable")
    if mode == "secondary":  # no secondary to select: the relay says so, and retries
        assert "cannot reach MongoDB" in relay.ready()["reason"]
        return
    client = await WS.connect(relay.ws_url)
    with MongoClient(primary.uri) as writer:
        writer.shop.orders.insert_many([{"_id": n} for n in range(5)])
    frames = await client.changes(5)
    # From before the replay buffer (2 events): a catch-up stream from MongoDB's history.
    behind = await WS.connect(f"{relay.ws_url}?resume_after={frames[0]['_id']['_data']}")
    assert [f["documentKey"]["_id"] for f in await behind.changes(4)] == [1, 2, 3, 4]

    opens, more = change_stream_commands(primary)
    assert len(opens) >= 2  # the live stream and the catch-up
    assert any("resumeAfter" in c["pipeline"][0]["$changeStream"] for c in opens)
    for command in opens:
        assert command.get("$readPreference") == {"mode": mode}, command
    assert more and not [c for c in more if "$readPreference" in c]


async def test_without_one_the_primary_is_asked_plainly(primary, relay_factory):
    relay = relay_factory(MONGO_SRV=primary.uri, WATCH_DB="shop")
    relay.wait_ready()
    client = await WS.connect(relay.ws_url)
    with MongoClient(primary.uri) as writer:
        writer.shop.orders.insert_one({"_id": 1})
    await client.changes(1)
    opens, _ = change_stream_commands(primary)
    assert opens and not [c for c in opens if "$readPreference" in c]
