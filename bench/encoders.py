"""``python -m bench.encoders``: encoding one change event, three ways, side by side.

changerelay encodes each event once with ``bson.json_util`` (relaxed Extended JSON). This
measures what a faster encoder would save per event: ``json.dumps`` with ``json_util.default``
for the BSON types, and ``orjson`` (only if installed: ``pip install orjson``; not a project
dependency, see BENCHMARKS.md for why). It also shows where their bytes differ from ours.
"""

from __future__ import annotations

import datetime
import json
import timeit

from bson import Int64, ObjectId, Timestamp, json_util

RELAXED = json_util.RELAXED_JSON_OPTIONS
CHANGE = {
    "_id": {"_data": "8263A1B2C3000000012B022C0100296E5A1004" + "A" * 40},
    "operationType": "insert", "clusterTime": Timestamp(1700000000, 1),
    "wallTime": datetime.datetime(2026, 11, 27, 12, 0, 0, 123000),
    "fullDocument": {"_id": ObjectId("6564a1b2c3d4e5f601234567"), "name": "Ada Lovelace",
                     "born": 1815, "tags": ["math", "poetry"], "score": 12.5, "n": Int64(7),
                     "address": {"city": "London", "zip": "W1"}, "text": "x" * 300},
    "ns": {"db": "bench", "coll": "c"},
    "documentKey": {"_id": ObjectId("6564a1b2c3d4e5f601234567")},
}
SPECIAL = {"nan": float("nan"), "inf": float("inf")}


def _default(value):
    return json_util.default(value, json_options=RELAXED)


def encoders() -> dict:
    found = {
        "json_util.dumps (changerelay)": lambda doc: json_util.dumps(
            doc, json_options=RELAXED, separators=(",", ":")).encode(),
        "json.dumps(default=json_util.default)": lambda doc: json.dumps(
            doc, default=_default, separators=(",", ":")).encode(),
    }
    try:
        import orjson
    except ImportError:
        print("orjson is not installed (pip install orjson): skipped")
    else:
        options = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS
        found["orjson.dumps(default=json_util.default)"] = lambda doc: orjson.dumps(
            doc, default=_default, option=options)
    return found


def main() -> None:
    runs = 20_000
    reference = None
    found = encoders()
    print(f"one insert event, {runs:,} encodings each\n")
    print("| encoder | µs per event | bytes | same bytes as changerelay | NaN, Infinity |")
    print("|---|---:|---:|---|---|")
    for name, encode in found.items():
        seconds = timeit.timeit(lambda encode=encode: encode(CHANGE), number=runs)
        data = encode(CHANGE)
        reference = reference or data
        print(f"| {name} | {seconds / runs * 1e6:.2f} | {len(data)} | "
              f"{'yes' if data == reference else 'no'} | {encode(SPECIAL).decode()} |")


if __name__ == "__main__":
    main()
