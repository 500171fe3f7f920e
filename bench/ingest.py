"""``python -m bench.ingest``: the relay's CPU per ingested event, in process, from raw BSON.

The test primary renders events in pure Python and bounds ``python -m bench --scenario ingest``
at a few thousand events/s, far below what one relay process can take. This measures the relay's
own part without it: a realistic ~700-byte update event (``scenarios.order`` as its looked-up
document) as raw BSON, decoded, encoded, published and flushed to one all-events client, for
the encoding before issue 14 and this checkout's, with CPython's collector pace and the
relay's (``changerelay/collector.py``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import time
from collections.abc import Callable

import bson
from bson import Int64, Timestamp

from changerelay import collector, relaxed
from changerelay import events as ev
from changerelay.hub import Hub
from changerelay.subscription import Subscription

from .hub import FakeClient
from .scenarios import order


def raw_changes(n: int) -> list[bytes]:
    now = datetime.datetime(2026, 11, 27, 12, 0, 1, 456000)
    out = []
    for i in range(n):
        document = order(i)
        out.append(bson.encode({
            "_id": {"_data": f"82{i + 1:016X}2B022C0100296E5A1004" + "A" * 40 + "0004"},
            "operationType": "update", "clusterTime": Timestamp(1700000000, i + 1),
            "wallTime": now, "ns": {"db": "bench", "coll": "orders"},
            "documentKey": {"_id": document["_id"]},
            "updateDescription": {"updatedFields": {"status": "shipped", "updated": now,
                                                    "version": Int64(2)},
                                  "removedFields": [], "truncatedArrays": []},
            "fullDocument": document}))
    return out


def json_util_way(raw: bytes) -> ev.Event:
    """Before issue 14: the driver decodes, ``json_util`` encodes the decoded document."""
    change = bson.decode(raw)
    return ev.Event(change, relaxed.dumps(change), ev.token_id(change["_id"]))


def relay_way(raw: bytes) -> ev.Event:
    """This checkout's: the driver decodes, ``events.encode_change`` encodes."""
    return ev.encode_change(bson.decode(raw))


# Each way with the collector paced as CPython's default or as the relay process sets it
# (``collector.pace``: full collections walk the whole replay buffer, and found nothing to free).
WAYS: dict[str, tuple[Callable[[bytes], ev.Event], bool]] = {
    "json_util (before), CPython's default collector": (json_util_way, False),
    "encode_change, CPython's default collector": (relay_way, False),
    "encode_change, the relay's collector pace (this checkout)": (relay_way, True)}


def measure(encode: Callable[[bytes], ev.Event], raws: list[bytes], batch: int) -> float:
    """CPU µs per event: encode, publish and flush to one all-events client."""
    hub: Hub[FakeClient] = Hub(lambda flush: None, lambda client, after: None, 10_000, 1 << 26)
    hub.start(f"82{0:016X}")
    client = FakeClient(Subscription())
    hub.subscribe(client)
    started = time.process_time()
    for start in range(0, len(raws), batch):
        for raw in raws[start:start + batch]:
            hub.publish(encode(raw))
        hub.flush()
    seconds = time.process_time() - started
    if client.received != len(raws):
        raise SystemExit(f"the client got {client.received} of {len(raws)} events")
    return seconds / len(raws) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100, help="events per flush (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per way; the best is shown")
    args = parser.parse_args(argv)
    raws = raw_changes(args.events)
    print(f"update event: {len(raws[0])} bytes of BSON, {args.events:,} events, "
          f"{args.batch} per flush\n")
    print("| encoding | CPU µs per event (best of runs) | events/s of one core |\n|---|---:|---:|")
    default = gc.get_threshold()
    for name, (way, paced) in WAYS.items():
        gc.set_threshold(*default)
        if paced:
            collector.pace()
        best = min(measure(way, raws, args.batch) for _ in range(args.repeat))
        print(f"| {name} | {best:.1f} | {1e6 / best:,.0f} |")


if __name__ == "__main__":
    main()
