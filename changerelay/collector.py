"""The pace of CPython's cyclic garbage collector, set for a relay's heap.

A relay's long-lived objects are its replay buffer — each event's decoded change, about twenty
tracked containers and ObjectIds — and its clients. They die by reference counting: a change is
a tree, and an evicted event is freed at once. But every full collection walks all of them, and
CPython starts one whenever the objects that outlived two younger collections reach a quarter of
the old generation; a log that takes in an event and drops one does exactly that, every few
thousand events at 10,000 buffered. ``python -m bench.ingest`` found those collections were
about 40% of the relay's CPU per ingested event (57-67 µs against 35-44 µs with fewer of them),
and that they freed nothing (``gc.get_stats()``: 0 collected in the oldest generation).

So a full collection waits for ten times as many younger ones as CPython's default: cyclic
garbage that reaches the old generation (a client's cycles after it left) is still freed, a
little later. The younger generations keep their defaults.
"""

from __future__ import annotations

import gc

# Collections of the middle generation between two full ones (CPython's default: 10).
FULL_EVERY = 100


def pace() -> None:
    """Set the collector's thresholds for this process (forked workers inherit them)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_EVERY)
