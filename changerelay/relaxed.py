"""Relaxed Extended JSON from an event's raw BSON, written in C.

``bson.json_util`` walks a decoded document in Python (about two thirds of the relay's CPU per
event when one client takes every event, BENCHMARKS.md *Ingest*); MongoDB's own libbson writes
the same relaxed Extended JSON from the BSON bytes (``python-bsonjs``, about three times faster
here). Its text differs in bytes, not in value: spaces after ``:`` and ``,``, characters outside
ASCII (U+2028 too) written as themselves rather than ``\\u`` escapes, doubles with 17 or more
significant digits (the same double), ``$date`` with its milliseconds always. NaN and the
infinities stay ``{"$numberDouble": ...}``, dates ``$date``, 64-bit integers plain numbers,
Decimal128 ``$numberDecimal``, binary ``$binary``: the Extended JSON 2.0 relaxed format
(https://www.mongodb.com/docs/manual/reference/mongodb-extended-json/).

The deprecated types are the exception: PyMongo decodes undefined to ``None``, a symbol to a
string and a DBPointer to a DBRef, so today's clients get ``null``, a string and ``{"$ref",
"$id"}`` where libbson writes ``$undefined``, ``$symbol`` and ``$dbPointer``. An event with one
of those is written by ``json_util`` as before, so that no client sees a value change type.
"""

from __future__ import annotations

from typing import Any

import bson
import bsonjs
from bson import json_util

_RELAXED = json_util.RELAXED_JSON_OPTIONS
# What libbson writes for the types PyMongo decodes into others (a key, never a string's
# content: inside a string the quotes are escaped).
_DEPRECATED = ('"$undefined"', '"$symbol"', '"$dbPointer"')


def relaxed_json(raw: bytes) -> bytes:
    """The relaxed Extended JSON of the BSON document ``raw``, as UTF-8."""
    text: str = bsonjs.dumps(raw)
    if any(marker in text for marker in _DEPRECATED):
        return dumps(bson.decode(raw))
    return text.encode()


def dumps(document: Any) -> bytes:
    """A decoded document in relaxed Extended JSON, as ``json_util`` writes it."""
    return json_util.dumps(document, json_options=_RELAXED, separators=(",", ":")).encode()
