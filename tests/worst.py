"""The costliest filters that fit in a client's 4 KiB, and the event that makes them work hardest.

Shared by tests/test_filter_cost.py (what one evaluation costs) and tests/test_load_filters.py
(what a client holding one costs a bystander).
"""

from __future__ import annotations

import json
import random

from changerelay.filters import MAX_FILTER_BYTES, MAX_NODES, MAX_REGEXES, FilterError, parse_filter

F = "fullDocument."


def as_many_as_fit(make, head="", tail=""):
    """``head`` + as many ``make(i)`` as fit in 4 KiB and the node limit, + ``tail``."""
    parts: list[str] = []
    while True:
        candidate = head + ",".join([*parts, make(len(parts))]) + tail
        if len(candidate.encode()) > MAX_FILTER_BYTES or len(parts) >= MAX_NODES:
            break
        parts.append(make(len(parts)))
    while True:
        text = head + ",".join(parts) + tail
        try:
            parse_filter(text)
            return text
        except FilterError as refused:
            assert refused.code == "filter_too_complex"
            parts.pop()


def nested_zeros(depth):
    """{"0": [{"0": [...]}]}: every level both a field "0" and an element 0."""
    node: dict | list = {"0": 1}
    for level in range(depth):
        node = [node] if level % 2 else {"0": node}
    return node


rng = random.Random(11)
# As large as an event gets before the budget grows with it: arrays, depth and strings that make
# every kind of condition below do as much work as it can.
WORST_EVENT = {
    "operationType": "insert",
    "fullDocument": {
        "a": [{"b": i, "c": [i, i + 1], "d": {"e": str(i)}} for i in range(60)],
        "tags": [f"tag{i}" for i in range(50)],
        "z": nested_zeros(40),
        "s": "".join(rng.choice("ab") for _ in range(400)),
        "words": ["".join(rng.choice("ab") for _ in range(40)) for _ in range(5)],
    },
}

WORST_FILTERS = {
    # 4 KiB of conditions that each walk every element of an array of documents.
    "array fan-out": as_many_as_fit(lambda i: f'{{"{F}a.b":{{"$gt":{10**6 + i}}}}}',
                                    '{"$nor":[', "]}"),
    # A path of numeric segments into a document that is "0" fields and arrays all the way down:
    # each level can be read both as a field and as an index.
    "numeric segments": json.dumps({F + "z." + ".".join(["0"] * 40): 1}),
    # $in members that cannot be hashed: each value is compared with every one.
    "unhashable $in": as_many_as_fit(lambda i: f'{{"x":{i}}}', f'{{"{F}a":{{"$in":[', "]}}"),
    # Regexes whose DFA blows up, on long strings of a and b.
    "regexes": json.dumps({"$or": [{F + ("s" if i % 2 else "words"): {
        "$regex": f"(a|b)*a(a|b){{{20 + i}}}x"}} for i in range(MAX_REGEXES)]}),
    # Deep equality against a large array operand, on every element and array of the event.
    "array operand": as_many_as_fit(lambda i: str(i), f'{{"{F}a.c":{{"$nin":[[', "]]}}"),
    # Everything at once, negated.
    "mixed": json.dumps({"$nor": [
        {F + "tags": {"$in": [f"x{i}" for i in range(40)] + [{"$regex": "(a|b)*a(a|b){30}x"}]}},
        {F + "a.d.e": {"$regex": "(1|2)*1(1|2){25}9"}},
        {F + "z." + ".".join(["0"] * 30): {"$exists": True}},
        {"$or": [{F + f"a.c.{i}": {"$gte": i}} for i in range(40)]},
    ]}),
}
