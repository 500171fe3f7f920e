"""``python -m bench.filters``: what a filter costs per event, and what a budget step is worth.

Part one times common filters (one evaluation, best of several runs): the relay runs each
distinct subscription's filter once per event, so these are per event per distinct filter.
Part two evaluates filters built to do as much work as they can, with the budget lifted, and
divides the time by the steps charged: ``filters.BUDGET_STEPS`` times the worst of these is what
one evaluation may cost on this machine.
"""

from __future__ import annotations

import argparse
import json
import random
import timeit
from unittest import mock

from changerelay import filters

F = "fullDocument."

COMMON = {
    "eq (1 clause)": ({F + "status": "paid"},
                      {"operationType": "insert", "fullDocument": {"status": "paid"}}),
    "three clauses": ({"operationType": "insert", F + "total": {"$gte": 100}, F + "tags": "vip"},
                      {"operationType": "insert", "fullDocument": {"total": 150,
                                                                    "tags": ["x", "vip"]}}),
    "leaf array (20)": ({F + "tags": "t19"}, {"fullDocument": {"tags": [f"t{i}" for i in
                                                                        range(20)]}}),
    "array of docs (20)": ({F + "items.sku": "s19"},
                           {"fullDocument": {"items": [{"sku": f"s{i}"} for i in range(20)]}}),
    "regex suffix, i": ({F + "email": {"$regex": "@example\\.com$", "$options": "i"}},
                        {"fullDocument": {"email": "alice.smith@Example.com"}}),
    "regex prefix": ({F + "sku": {"$regex": "^AB"}}, {"fullDocument": {"sku": "AB-1234"}}),
    "regex miss, 200 chars": ({F + "text": {"$regex": "needle"}},
                              {"fullDocument": {"text": "hay " * 50}}),
    "regex on 4 tags": ({F + "tags": {"$regex": "^urg"}},
                        {"fullDocument": {"tags": ["a", "b", "c", "urgent"]}}),
}


def _nested_zeros(depth: int) -> dict | list:
    node: dict | list = {"0": 1}
    for level in range(depth):
        node = [node] if level % 2 else {"0": node}
    return node


def _heavy() -> tuple[dict, dict]:
    rng = random.Random(3)
    event = {"fullDocument": {
        "a": [{"b": i, "c": [i, i + 1]} for i in range(2000)],
        "z": _nested_zeros(30),
        "s": "".join(rng.choice("ab") for _ in range(20_000)),
    }}
    specs = {
        "paths through arrays": {"$nor": [{F + "a.b": {"$gt": 10**6 + i}} for i in range(20)]},
        "numeric segments": {F + "z." + ".".join(["0"] * 30): 1},
        "unhashable $in": {F + "a": {"$in": [{"x": i} for i in range(50)]}},
        "DFA-hostile regex": {F + "s": {"$regex": "(a|b)*a(a|b){20}x"}},
    }
    return specs, event


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.filters", description=__doc__)
    parser.add_argument("--number", type=int, default=20_000, help="evaluations per timing")
    args = parser.parse_args(argv)
    print("| filter | ns per evaluation |\n|---|---:|")
    for name, (spec, event) in COMMON.items():
        predicate = filters.compile_filter(spec).predicate
        seconds = min(timeit.repeat(lambda p=predicate, e=event: p(e), number=args.number,
                                    repeat=5)) / args.number
        print(f"| {name} | {seconds * 1e9:,.0f} |")
    specs, event = _heavy()
    print("\n| worst case, budget lifted | steps | ms | ns per step |\n|---|---:|---:|---:|")
    with mock.patch.object(filters, "BUDGET_PASSES", 10**9):
        for name, spec in specs.items():
            compiled = filters.compile_filter(json.loads(json.dumps(spec)))
            budget = next(cell.cell_contents for cell in compiled.predicate.__closure__ or ()
                          if isinstance(cell.cell_contents, filters._Budget))
            seconds = min(timeit.repeat(lambda c=compiled: c(event), number=1, repeat=3))
            print(f"| {name} | {budget.spent:,} | {seconds * 1e3:.1f} | "
                  f"{seconds / budget.spent * 1e9:.0f} |")
    print(f"\nBUDGET_STEPS = {filters.BUDGET_STEPS:,}, BUDGET_PASSES = {filters.BUDGET_PASSES}")


if __name__ == "__main__":
    main()
