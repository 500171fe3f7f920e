"""Fragments of a split event put back together, as MongoDB's $changeStreamSplitLargeEvent
makes them (the test primary splits as change_stream_split_event_helpers.cpp does)."""

from __future__ import annotations

import pytest

from changerelay.fragments import Reassembly


def fragments(of: int) -> list[dict]:
    return [{"_id": {"_data": f"82AA{n:02X}"}, "splitEvent": {"fragment": n, "of": of},
             f"field{n}": n} for n in range(1, of + 1)]


def test_a_whole_event_passes_through():
    event = {"_id": {"_data": "82AA"}, "operationType": "insert"}
    assert Reassembly().add(event) is event


def test_fragments_make_one_event_with_every_field_and_the_last_fragments_id():
    reassembly = Reassembly()
    parts = fragments(3)
    assert reassembly.add(parts[0]) is None and reassembly.pending
    assert reassembly.add(parts[1]) is None
    whole = reassembly.add(parts[2])
    assert whole == {"_id": parts[2]["_id"], "field1": 1, "field2": 2, "field3": 3}
    assert not reassembly.pending
    event = {"_id": {"_data": "82AB"}, "operationType": "insert"}
    assert reassembly.add(event) is event  # and on to the next event


@pytest.mark.parametrize("sequence", [
    [2],            # a fragment without the ones before it
    [1, 3],         # one skipped
    [1, "whole"],   # an event in the middle of another
    [1, 1],         # the first again
])
def test_fragments_out_of_order_are_refused(sequence):
    reassembly = Reassembly()
    parts = fragments(3)
    *head, last = [{"_id": {"_data": "82AB"}} if n == "whole" else parts[n - 1]
                   for n in sequence]
    for part in head:
        reassembly.add(part)
    with pytest.raises(ValueError):
        reassembly.add(last)
