"""``source`` messages: clients hear when MongoDB goes away and comes back, on both transports,
in words for a browser — the operator's details stay in the log and /readyz."""

from __future__ import annotations

import datetime
import json

import pytest
from pymongo import MongoClient

from changerelay.primary import TestPrimary
from tests.support import SSE, WS, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.fault]


def for_browsers(message: dict, *secrets: str) -> None:
    """A source message: its state since a recent time, and a sentence with nothing of the
    deployment in it."""
    assert set(message) == {"type", "state", "message", "since"}, message
    since = datetime.datetime.fromisoformat(message["since"])
    now = datetime.datetime.now(datetime.UTC)
    assert since.utcoffset() == datetime.timedelta(0)
    assert now - datetime.timedelta(minutes=2) < since <= now, (since, now)
    text = message["message"]
    assert len(text) > 20 and text.endswith("."), text
    for secret in ("127.0.0.1", "localhost", "rs0", "mongodb://", "Timeout", "Error",
                   "topology", *secrets):
        assert secret not in text, (secret, text)


async def next_source_ws(client: WS, timeout: float = 30) -> dict:
    return await client.until(lambda f: f.get("type") == "source", timeout=timeout)


async def next_source_sse(stream: SSE, timeout: float = 30) -> dict:
    while True:
        record = await stream.record(timeout=timeout)
        if record.get("event") == "source":
            message = json.loads(record["data"])
            assert message["type"] == "source"
            return message


async def test_clients_hear_mongodb_go_away_and_come_back(relay_factory):
    port = free_port()
    primary = TestPrimary(port=port).start()
    try:
        relay = relay_factory(MONGO_SRV=primary.uri + "&serverSelectionTimeoutMS=500")
        relay.wait_ready()
        client = await WS.connect(relay.ws_url)
        stream = await SSE.open(relay.port)
        with MongoClient(primary.uri) as writer:
            writer.db.c.insert_one({"_id": "before"})
        await client.changes(1)
        await stream.changes(1)
        assert not [f for f in client.frames if f.get("type") == "source"]  # open: nothing said
    finally:
        primary.stop()
    down = await next_source_ws(client)
    assert down["state"] == "unreachable"
    for_browsers(down, str(port))
    assert await next_source_sse(stream) == down
    relay.wait_ready(source="unreachable")
    assert str(port) in relay.ready()["reason"]  # the operator is told where
    with TestPrimary(port=port) as reborn:
        up = await next_source_ws(client)
        assert up["state"] == "open"
        for_browsers(up)
        assert await next_source_sse(stream) == up
        relay.wait_ready()
        with MongoClient(reborn.uri) as writer:
            writer.db.c.insert_one({"_id": "after"})
        [frame] = await client.changes(1)
        assert frame["documentKey"] == {"_id": "after"}
    # Once per change of state, not once per retry.
    states = [f["state"] for f in client.frames if f.get("type") == "source"]
    assert states == ["unreachable", "open"], states


async def test_a_client_connecting_while_mongodb_is_away_is_told_at_once(relay_factory):
    port = free_port()
    uri = f"mongodb://127.0.0.1:{port}/?replicaSet=rs0&serverSelectionTimeoutMS=500"
    relay = relay_factory(MONGO_SRV=uri)
    relay.wait_ready(source="unreachable")
    client = await WS.connect(relay.ws_url)
    first = await client.recv()
    assert first["type"] == "source" and first["state"] == "unreachable"
    for_browsers(first, str(port))
    stream = await SSE.open(relay.port)
    assert await next_source_sse(stream) == first
    later = await WS.connect(relay.ws_url)
    assert await later.recv() == first  # since when: the same for every client
    with TestPrimary(port=port) as primary:
        assert (await next_source_ws(client))["state"] == "open"
        assert (await next_source_sse(stream))["state"] == "open"
        relay.wait_ready()
        late = await WS.connect(relay.ws_url)  # connected while open: nothing to tell it
        with MongoClient(primary.uri) as writer:
            writer.db.c.insert_one({"_id": "first"})
        assert (await late.recv())["type"] == "ready"  # but that it is live
        assert (await late.recv())["documentKey"] == {"_id": "first"}


async def test_a_standalone_server_is_named_without_its_details(relay_factory):
    with TestPrimary(replica_set=False) as standalone:
        relay = relay_factory(
            MONGO_SRV=f"mongodb://127.0.0.1:{standalone.port}/?directConnection=true")
        relay.wait_ready(source="not_replica_set")
        client = await WS.connect(relay.ws_url)
        message = await client.recv()
        assert message["state"] == "not_replica_set"
        for_browsers(message, "--replSet", "rs.initiate", str(standalone.port))
        stream = await SSE.open(relay.port)
        assert await next_source_sse(stream) == message


async def test_failed_authentication_is_named_without_the_user(relay_factory):
    with TestPrimary() as primary:
        primary.auth_fails = True
        uri = (f"mongodb://relay-user:hunter2@127.0.0.1:{primary.port}/"
               "?replicaSet=rs0&serverSelectionTimeoutMS=1000")
        relay = relay_factory(MONGO_SRV=uri)
        relay.wait_ready(source="auth_failed")
        client = await WS.connect(relay.ws_url)
        message = await client.recv()
        assert message["state"] == "auth_failed"
        for_browsers(message, "relay-user", "hunter2", "MONGO_SRV")
