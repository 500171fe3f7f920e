"""``changerelay --demo``: events within seconds, with no MongoDB anywhere."""

from __future__ import annotations

import collections
import random

import pytest
from pymongo import MongoClient

from changerelay.demo import KEEP, Shop
from changerelay.primary import TestPrimary
from tests.support import WS


def test_the_shop_writes_every_operation_type_and_stays_small():
    with TestPrimary() as primary, MongoClient(primary.uri) as client:
        shop = Shop(client.shop, random.Random(7))
        for _ in range(400):
            shop.step()
        ops = collections.Counter(event["operationType"] for event in primary.events)
        assert {"insert", "update", "replace", "delete"} <= set(ops)
        assert len(primary.documents("shop", "orders")) <= KEEP
        assert len(primary.documents("shop", "customers")) <= KEEP
        kinds = {type(value).__name__ for doc in primary.documents("shop", "orders")
                 for value in doc.values()}
        assert {"ObjectId", "datetime", "list", "float"} <= kinds


@pytest.mark.e2e
async def test_demo_mode_delivers_events_and_says_it_is_a_demo(relay_factory):
    relay = relay_factory(args=["--demo"], MONGO_SRV="mongodb://127.0.0.1:9/")  # ignored
    relay.wait_ready()
    page = relay.get("/")
    assert b"Demo data, not your MongoDB." in page.body
    client = await WS.connect(relay.ws_url)
    first = await client.until(lambda frame: "operationType" in frame, timeout=10)
    # Orders go on to be updated, replaced, deleted: any of those within seconds.
    other = await client.until(lambda frame: frame.get("operationType") not in (None, "insert"),
                               timeout=20)
    assert first["ns"]["db"] == other["ns"]["db"] == "shop"
    assert not any("127.0.0.1:9" in line for line in relay.lines if "listening" in line)
