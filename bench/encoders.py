"""``python -m bench.encoders``: encoding one change event, three ways, side by side.

changerelay encodes each event once in relaxed Extended JSON: ``bson.json_util`` until issue 14,
``changerelay.relaxed`` (orjson, BSON types by ``json_util.default``) since. This measures each
beside ``json.dumps`` with ``json_util.default``, and shows where their bytes differ and what
each writes for NaN and Infinity.
"""

from __future__ import annotations

import datetime
import json
import timeit

from bson import Int64, ObjectId, Timestamp, json_util

from changerelay import relaxed

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
    return {
        "json_util.dumps (before issue 14)": relaxed.dumps,
        "json.dumps(default=json_util.default)": lambda doc: json.dumps(
            doc, default=_default, separators=(",", ":")).encode(),
        "relaxed.relaxed_json (changerelay)": relaxed.relaxed_json,
    }


def main() -> None:
    runs = 20_000
    reference = None
    found = encoders()
    print(f"one insert event, {runs:,} encodings each\n")
    print("| encoder | µs per event | bytes | same bytes as json_util | NaN, Infinity |")
    print("|---|---:|---:|---|---|")
    for name, encode in found.items():
        seconds = timeit.timeit(lambda encode=encode: encode(CHANGE), number=runs)
        data = encode(CHANGE)
        reference = reference or data
        print(f"| {name} | {seconds / runs * 1e6:.2f} | {len(data)} | "
              f"{'yes' if data == reference else 'no'} | {encode(SPECIAL).decode()} |")


if __name__ == "__main__":
    main()
