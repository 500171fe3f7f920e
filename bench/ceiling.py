"""The source's ceiling: how fast events come out of a change stream with nobody to fan out to.

The test primary renders every event for every ``getMore`` in pure Python, so it bounds every
max-rate run. This process stands where a server would (same core, same driver, same options
as changerelay's stream) and only counts: the events/s it sees is the most any server could
relay, and clients x that is the ceiling on deliveries/s.

    python -m bench.ceiling URI DB EVENTS   prints "ready", then one JSON line when done
"""

from __future__ import annotations

import json
import sys
import time

from pymongo import MongoClient


def main() -> None:
    uri, db, events = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = MongoClient(uri, serverSelectionTimeoutMS=5000)
    with client[db].watch(full_document="updateLookup", max_await_time_ms=1000) as stream:
        print("ready", flush=True)
        seen, first, batches = 0, None, 0
        while seen < events:
            change = stream.try_next()
            if change is None:
                continue
            if first is None:
                first = time.monotonic()
            seen += 1
            if not getattr(stream._cursor, "_data", True):  # batch used up: next needs a getMore
                batches += 1
        print(json.dumps({"events": seen, "first": first, "last": time.monotonic(),
                          "batches": batches}), flush=True)
    client.close()


if __name__ == "__main__":
    main()
