"""Query filters: what a document matches."""

from __future__ import annotations

from typing import Any

from changerelay.primary.errors import CommandError, not_implemented
from changerelay.primary.expressions import evaluate, truthy
from changerelay.primary.values import MISSING, bson_rank


def get_path(doc: Any, path: str) -> Any:
    """The value at a dotted path, or ``MISSING``; no array traversal (see :func:`candidates`)."""
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return MISSING
    return doc


def candidates(doc: Any, parts: list[str]) -> list[Any]:
    """Values a query path can refer to, traversing arrays the way MongoDB queries do."""
    if not parts:
        return [doc]
    head, rest = parts[0], parts[1:]
    if isinstance(doc, dict):
        return candidates(doc[head], rest) if head in doc else []
    if isinstance(doc, list):
        found = []
        if head.isdigit() and int(head) < len(doc):
            found += candidates(doc[int(head)], rest)
        for item in doc:
            if isinstance(item, dict):
                found += candidates(item, parts)
        return found
    return []


def _compare(a: Any, b: Any) -> int | None:
    """-1/0/1 for values of one BSON type bracket, None across brackets (never matches)."""
    if bson_rank(a) != bson_rank(b):
        return None
    try:
        return (a > b) - (a < b)
    except TypeError:
        return None


def sort_key(value: Any) -> tuple:
    if value is MISSING:
        value = None
    rank = bson_rank(value)
    if rank in (4, 5, 11):
        return (rank, repr(value))
    return (rank, value)


def _equal_or_contains(values: list[Any], target: Any) -> bool:
    for value in values:
        if value == target and bson_rank(value) == bson_rank(target):
            return True
        if isinstance(value, list) and any(item == target for item in value):
            return True
    return False


def _match_operator(values: list[Any], op: str, arg: Any) -> bool:
    flat = values + [item for value in values if isinstance(value, list) for item in value]
    if op == "$eq":
        return _equal_or_contains(values, arg) or (arg is None and not values)
    if op == "$ne":
        return not _match_operator(values, "$eq", arg)
    if op == "$in":
        if not isinstance(arg, list):
            raise CommandError(2, "$in needs an array")
        return any(_match_operator(values, "$eq", item) for item in arg)
    if op == "$nin":
        return not _match_operator(values, "$in", arg)
    if op == "$exists":
        return bool(values) == bool(arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        wanted = {"$gt": (1,), "$gte": (0, 1), "$lt": (-1,), "$lte": (-1, 0)}[op]
        return any(_compare(value, arg) in wanted for value in flat)
    if op == "$not":
        return not _match_value(values, arg)
    if op == "$size":
        return any(isinstance(value, list) and len(value) == arg for value in values)
    raise not_implemented(f"the query operator {op}")


def _match_value(values: list[Any], condition: Any) -> bool:
    if isinstance(condition, dict) and condition and all(k.startswith("$") for k in condition):
        return all(_match_operator(values, op, arg) for op, arg in condition.items())
    return _match_operator(values, "$eq", condition)


def matches(doc: dict, query: dict) -> bool:
    """Whether ``doc`` satisfies a query filter: equality, comparisons, $in, $and/$or/$nor."""
    for key, condition in query.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(condition, list) or not condition:
                raise CommandError(2, f"{key} must be a nonempty array")
            results = [matches(doc, sub) for sub in condition]
            ok = {"$and": all, "$or": any}.get(key, lambda r: not any(r))(results)
            if not ok:
                return False
        elif key == "$comment":
            continue
        elif key == "$expr":
            if not truthy(evaluate(condition, doc)):
                return False
        elif key.startswith("$"):
            raise not_implemented(f"the top-level query operator {key}")
        elif not _match_value(candidates(doc, key.split(".")), condition):
            return False
    return True


def sorted_by(docs: list[dict], spec: dict) -> list[dict]:
    for path, direction in reversed(list(spec.items())):
        docs = sorted(docs, key=lambda d, p=path: sort_key(get_path(d, p)),
                      reverse=direction == -1)
    return docs
