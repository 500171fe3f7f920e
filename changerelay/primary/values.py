"""BSON values as MongoDB orders, compares and prints them."""

from __future__ import annotations

import datetime
from typing import Any

import bson
from bson import ObjectId, Timestamp
from bson.binary import Binary
from bson.int64 import Int64

MISSING = object()


def doc_key(value: Any) -> bytes:
    """A hashable identity for an ``_id`` value (BSON type-sensitive, like a unique index)."""
    return bson.encode({"": value})


def bson_rank(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, bool):
        return 8
    if isinstance(value, int | float | Int64):
        return 2
    if isinstance(value, str):
        return 3
    if isinstance(value, dict):
        return 4
    if isinstance(value, list):
        return 5
    if isinstance(value, Binary | bytes):
        return 6
    if isinstance(value, ObjectId):
        return 7
    if isinstance(value, datetime.datetime):
        return 9
    if isinstance(value, Timestamp):
        return 10
    return 11


def type_name(value: Any) -> str:
    return {1: "null", 2: "int" if isinstance(value, int) else "double", 3: "string",
            4: "object", 5: "array", 6: "binData", 7: "objectId", 8: "bool",
            9: "date"}.get(bson_rank(value), type(value).__name__)


def shown(value: Any) -> str:
    """A value the way MongoDB's error messages print it (BSONElement::toString)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    if isinstance(value, list):
        return "[ " + ", ".join(map(shown, value)) + " ]" if value else "[]"
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, ObjectId):
        return f"ObjectId('{value}')"
    return str(value)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float | Int64) and not isinstance(value, bool)
