"""The collector's pace (``collector.py``): a relay whose replay buffer churns does few full
collections."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from bson import ObjectId

from changerelay import collector
from changerelay import events as ev
from changerelay.hub import Hub

BUFFERED = 2_000
EVENTS = 20_000


@pytest.fixture
def thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def full_collections_taking(events: int) -> int:
    """Full collections while a hub with a full log takes ``events`` more."""
    hub: Hub = Hub(lambda flush: None, lambda client, after: None, BUFFERED, 1 << 30)
    hub.start(f"82{0:016X}")
    gc.collect()
    before = gc.get_stats()[2]["collections"]
    for n in range(1, events + 1):
        hub.publish(ev.encode_change({
            "_id": {"_data": f"82{n:016X}"}, "operationType": "insert",
            "ns": {"db": "db", "coll": "c"}, "documentKey": {"_id": ObjectId()},
            "fullDocument": {"_id": ObjectId(), "owner": {"id": ObjectId()},
                             "items": [{"sku": ObjectId()} for _ in range(8)]}}))
        hub.flush()
    return gc.get_stats()[2]["collections"] - before


def test_a_churning_replay_buffer_costs_few_full_collections(thresholds):
    gc.set_threshold(700, 10, 10)  # CPython's default
    default = full_collections_taking(EVENTS)
    collector.pace()
    paced = full_collections_taking(EVENTS)
    assert default >= 3
    assert paced * 3 <= default


def test_the_collector_stays_on_with_the_younger_generations_as_they_were(thresholds):
    gc.set_threshold(700, 10, 10)
    collector.pace()
    assert gc.isenabled()
    assert gc.get_threshold() == (700, 10, collector.FULL_EVERY)
