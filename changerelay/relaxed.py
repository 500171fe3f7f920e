"""Relaxed Extended JSON for a change event, written by orjson.

``bson.json_util`` walks a decoded document in Python and was most of the relay's CPU per event
when one client takes every event (BENCHMARKS.md *Ingest*). orjson writes the JSON in native
code and hands each BSON type it does not know (ObjectId, datetime, Int64, Timestamp,
Decimal128, binary, Code, DBRef, Regex, MinKey/MaxKey) back to Python, where every BSON type is
written by ``json_util``'s rule: the Extended JSON 2.0 relaxed format
(https://www.mongodb.com/docs/manual/reference/mongodb-extended-json/) — the four that every
change event carries by writers of our own that give the same text, the others by
``json_util.default``. The text differs in
bytes, not in value: characters outside ASCII (U+2028 too) are written as themselves rather
than ``\\u`` escapes, and a double may be spelled differently (``1e16`` for ``1e+16``).

orjson writes a non-finite double (NaN, ±Infinity) as ``null`` and never asks ``default``. So
text with ``null`` in it is checked: if the change holds a non-finite double, ``json_util``
writes it (``{"$numberDouble": "NaN"}``), as it writes what orjson refuses (nesting deeper than
its 254 levels). Most events have no ``null`` and pay nothing for the check.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import orjson
from bson import Int64, ObjectId, Timestamp, json_util

_RELAXED = json_util.RELAXED_JSON_OPTIONS
# Datetimes and subclasses of str and int go to ``default`` too: a datetime is {"$date": ...},
# Code (a str) is {"$code": ...}, and Int64 (an int) is json_util's to write.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS
_EPOCH_YEAR = 1970  # before it, relaxed Extended JSON writes {"$date": {"$numberLong": ...}}


def relaxed_json(document: Any) -> bytes:
    """A decoded document (a change event, a control message) in relaxed Extended JSON."""
    try:
        text = orjson.dumps(document, default=_bson_type, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return dumps(document)
    if b"null" in text and _holds_non_finite(document):
        return dumps(document)
    return text


def dumps(document: Any) -> bytes:
    """A decoded document in relaxed Extended JSON, as ``json_util`` writes it."""
    return json_util.dumps(document, json_options=_RELAXED, separators=(",", ":")).encode()


def _bson_type(value: Any) -> Any:
    # One dict look-up by exact type for the types every change event carries (its ids, times,
    # clusterTime, 64-bit integers), json_util for the rest: a subclass, or a type it alone knows.
    write = _WRITERS.get(type(value))
    if write is not None:
        return write(value)
    return json_util.default(value, json_options=_RELAXED)


def _date(value: datetime.datetime) -> Any:
    if value.tzinfo is None and value.year >= _EPOCH_YEAR:
        # json_util's rule for the datetimes the driver decodes (naive UTC, after 1970): ISO-8601
        # to the second, then milliseconds (cut, not rounded) when there are some, then "Z".
        # orjson spells the date (``"...T12:00:01Z"`` or ``"...T12:00:01.456000Z"``) in a
        # tenth of ``isoformat``'s time, which was the most of writing an update event.
        text = _dumps(value, option=_UTC_Z)
        return _Fragment(b'{"$date":' + (text[:24] if value.microsecond >= 1000 else text[:20])
                         + b'Z"}')
    return json_util.default(value, json_options=_RELAXED)


def _timestamp(value: Timestamp) -> dict[str, Any]:
    return {"$timestamp": {"t": value.time, "i": value.inc}}


def _object_id(value: ObjectId) -> dict[str, str]:
    return {"$oid": str(value)}


_dumps = orjson.dumps
_Fragment = orjson.Fragment  # JSON text orjson writes as it is
_UTC_Z = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z
# json_util's own rules for these types, relaxed mode: {"$oid": hex}, {"$timestamp": {t, i}},
# an Int64 as a plain number (bson/json_util.py _encode_objectid, _encode_timestamp,
# _encode_int64 without strict_number_long).
_WRITERS: dict[type, Callable[[Any], Any]] = {
    datetime.datetime: _date, ObjectId: _object_id, Timestamp: _timestamp, Int64: int}


def _holds_non_finite(value: Any) -> bool:
    """A NaN or an infinity among the values orjson writes itself (json_util.default writes
    those inside the BSON types it is handed: a DBRef's fields, a Code's scope)."""
    if type(value) is float:
        return value - value != 0  # NaN and ±Infinity only
    if type(value) is dict:
        return any(_holds_non_finite(item) for item in value.values())
    if type(value) is list:
        return any(_holds_non_finite(item) for item in value)
    return False
