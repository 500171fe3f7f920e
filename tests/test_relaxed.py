"""Relaxed Extended JSON written by orjson: the same values as ``json_util``'s text, for every
BSON type a change event can carry, as the driver decodes it."""

from __future__ import annotations

import datetime
import json
import math
import uuid

import bson
import pytest
from bson import (
    Binary,
    Code,
    DBRef,
    Decimal128,
    Int64,
    MaxKey,
    MinKey,
    ObjectId,
    Regex,
    Timestamp,
    json_util,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from changerelay import events as ev
from changerelay.relaxed import relaxed_json
from tests.support import examples

RELAXED = json_util.RELAXED_JSON_OPTIONS


def value_of(text: bytes):
    """What a client holds after parsing the text as Extended JSON, as BSON bytes: equal bytes
    are the same types and values (a NaN too, which == would not find equal)."""
    return bson.encode({"v": json_util.loads(text, json_options=RELAXED)})


def json_util_text(change: dict) -> bytes:
    """The oracle: what the relay sent before, ``json_util`` walking the decoded change."""
    return json_util.dumps(change, json_options=RELAXED, separators=(",", ":")).encode()


def decoded(change: dict) -> dict:
    """The change as the driver hands it over: through BSON and back (bytes for binary subtype
    0, Int64 for 64-bit integers, DBRef, Regex...)."""
    return bson.decode(bson.encode(change))


DATES = st.one_of(
    st.datetimes(min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 12, 31))
    .map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)),
    st.sampled_from([datetime.datetime(1970, 1, 1), datetime.datetime(1969, 12, 31, 23, 59, 59),
                     datetime.datetime(2026, 11, 27, 12, 0, 0)]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**31), 2**31 - 1), st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.1, -0.0, 1e300, 5e-324, 2.0**53 + 2, 1e16, 123456789.125]),
    st.builds(lambda coefficient, exponent: Decimal128(f"{coefficient}E{exponent}"),
              st.integers(-(10**34) + 1, 10**34 - 1), st.integers(-6176, 6111 - 33)),
    st.sampled_from([Decimal128("NaN"), Decimal128("-Infinity"), Decimal128("1.0E+3"),
                     Decimal128("-0"), Decimal128("0E-6176")]),
    st.text(), st.sampled_from(["\u2028\u2029", "é\"\\/\b\f\n\r\t\x00\x1f\x7f", "😀"]),
    DATES,
    st.builds(ObjectId, st.binary(min_size=12, max_size=12)),
    st.builds(Binary, st.binary(max_size=20), st.sampled_from([0, 1, 2, 5, 128])),
    st.builds(lambda u: Binary.from_uuid(u), st.uuids()),
    st.builds(Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(Regex, st.text(max_size=5).filter(lambda s: "\x00" not in s),
              st.sampled_from(["", "i", "imsx"])),
    st.builds(Code, st.text(max_size=5)),
    st.builds(Code, st.text(max_size=5), st.just({"a": 1})),
    st.sampled_from([MinKey(), MaxKey(), DBRef("c", 1), DBRef("c", ObjectId(b"b" * 12), "db")]),
)
KEYS = st.text(max_size=6).filter(lambda k: "\x00" not in k and not k.startswith("$"))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner,
                                                                         max_size=4)),
    max_leaves=12,
)


@st.composite
def changes(draw):
    n = draw(st.integers(0, 2**40))
    change = {"_id": {"_data": f"82{n:016X}"}, "operationType": "update",
              "clusterTime": Timestamp(1700000000, 1), "wallTime": draw(DATES),
              "ns": {"db": "db", "coll": "c"}, "documentKey": {"_id": draw(VALUES)},
              "updateDescription": {"updatedFields": draw(st.dictionaries(KEYS, VALUES,
                                                                          max_size=3)),
                                    "removedFields": [], "truncatedArrays": []},
              "fullDocument": draw(st.dictionaries(KEYS, VALUES, max_size=5))}
    return change


@settings(max_examples=examples(200), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(changes())
def test_same_values_as_json_util(change):
    change = decoded(change)
    assert value_of(relaxed_json(change)) == value_of(json_util_text(change))


@settings(max_examples=examples(100), deadline=None, database=None)
@given(changes())
def test_plain_json_parsers_read_the_same_structure(change):
    """A browser's JSON.parse, not an Extended JSON reader: the same keys in the same order,
    the same numbers, the same wrappers (their strings may be spelled differently)."""
    change = decoded(change)
    ours = json.loads(relaxed_json(change), object_pairs_hook=list)
    theirs = json.loads(json_util_text(change), object_pairs_hook=list)
    assert shape(ours) == shape(theirs)


def shape(value):
    """Numbers as themselves (NaN cannot appear: it is a $numberDouble string), wrappers'
    strings as a marker."""
    if isinstance(value, list) and value and all(isinstance(p, tuple) for p in value):
        keys = [key for key, _ in value]
        if keys and keys[0] in ("$date", "$numberDecimal"):
            return (keys[0],)
        return [(key, shape(item)) for key, item in value]
    if isinstance(value, list):
        return [shape(item) for item in value]
    if isinstance(value, float):
        assert math.isfinite(value)
    return value


def test_special_values_are_exact():
    change = {"_id": {"_data": "8201"}, "a": float("nan"), "b": float("inf"),
              "c": float("-inf"), "d": Int64(2**62 + 1), "e": Decimal128("0.1"),
              "f": datetime.datetime(2026, 11, 27, 12, 0, 0, 123000),
              "g": Binary(b"\x00\x01", 5), "h": Binary.from_uuid(uuid.UUID(int=1))}
    document = json.loads(relaxed_json(decoded(change)))
    assert document["a"] == {"$numberDouble": "NaN"}
    assert document["b"] == {"$numberDouble": "Infinity"}
    assert document["c"] == {"$numberDouble": "-Infinity"}
    assert document["d"] == 2**62 + 1
    assert document["e"] == {"$numberDecimal": "0.1"}
    assert document["f"] == {"$date": "2026-11-27T12:00:00.123Z"}
    assert document["g"] == {"$binary": {"base64": "AAE=", "subType": "05"}}
    assert document["h"]["$binary"]["subType"] == "04"


def test_deprecated_types_keep_the_values_clients_get_today():
    # undefined (0x06), symbol (0x0E): PyMongo decodes them to None and str.
    raw = (b"\x1d\x00\x00\x00" + b"\x06u\x00" + b"\x0es\x00\x04\x00\x00\x00abc\x00"
           + b"\x02t\x00\x02\x00\x00\x00x\x00" + b"\x00")
    raw = len(raw).to_bytes(4, "little") + raw[4:]
    assert json.loads(relaxed_json(bson.decode(raw))) == {"u": None, "s": "abc", "t": "x"}


def test_websocket_and_sse_carry_the_same_bytes():
    change = {"_id": {"_data": "8201"}, "operationType": "insert", "s": "é\u2028"}
    data = relaxed_json(change)
    event = ev.Event(change, data, "8201")
    assert event.data == data and event.frame.endswith(data)
    assert event.sse == b"id: 8201\ndata: " + data + b"\n\n"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["beside a null", "in an array", "deep inside"])
def test_non_finite_doubles_are_never_null(value, where):
    """orjson writes them as null and never asks: wherever one hides, and whatever nulls and
    "null" strings lie around it, it stays a $numberDouble."""
    holder = {"beside a null": {"a": None, "b": value, "c": "null"},
              "in an array": {"a": [1, None, [value]]},
              "deep inside": {"a": {"b": {"c": [{"d": value}]}}}}[where]
    change = decoded({"_id": {"_data": "8201"}, "fullDocument": holder})
    assert value_of(relaxed_json(change)) == value_of(json_util_text(change))
    assert b"$numberDouble" in relaxed_json(change)


def test_nulls_and_null_strings_alone_stay_null():
    change = decoded({"_id": {"_data": "8201"}, "a": None, "b": "null", "c": [None, 1.5]})
    assert json.loads(relaxed_json(change)) == {"_id": {"_data": "8201"}, "a": None, "b": "null",
                                                "c": [None, 1.5]}


def test_nesting_deeper_than_orjson_takes_is_written_as_before():
    """orjson refuses more than 254 levels; BSON allows more (MongoDB stores up to 100, and a
    change event wraps its documents in one or two more; a PIPELINE stage can build deeper)."""
    deep: dict = {"leaf": float("nan")}
    for _ in range(300):
        deep = {"d": deep}
    change = decoded({"_id": {"_data": "8201"}, "fullDocument": deep})
    assert relaxed_json(change) == json_util_text(change)


def test_str_and_int_subclasses_keep_their_wrappers():
    """Code is a str and Int64 an int to orjson; json_util writes {"$code"} and a plain number."""
    change = decoded({"_id": {"_data": "8201"}, "c": Code("f()"), "n": Int64(2**40), "t": True})
    assert json.loads(relaxed_json(change))["c"] == {"$code": "f()"}
    assert json.loads(relaxed_json(change))["n"] == 2**40
    assert json.loads(relaxed_json(change))["t"] is True


@pytest.mark.parametrize("when", [
    datetime.datetime(1970, 1, 1), datetime.datetime(1969, 12, 31, 23, 59, 59, 999000),
    datetime.datetime(2026, 11, 27, 12, 0, 1, 456000), datetime.datetime(2026, 1, 2, 3, 4, 5),
    datetime.datetime(2026, 1, 2, 3, 4, 5, 999), datetime.datetime(2026, 1, 2, 3, 4, 5, 1000),
    datetime.datetime(9999, 12, 31, 23, 59, 59, 999999),
    datetime.datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=datetime.UTC),
])
def test_dates_are_spelled_as_json_util_spells_them(when):
    """The relay writes the common dates itself (naive, after 1970): the very same text."""
    assert relaxed_json({"d": when}) == json_util_text({"d": when})


@pytest.mark.parametrize("value", [
    ObjectId(b"\x00" * 12), ObjectId(b"\xff" * 12), Timestamp(0, 0),
    Timestamp(2**32 - 1, 2**32 - 1), Int64(-(2**63)), Int64(2**63 - 1), Int64(0),
])
def test_ids_times_and_64_bit_integers_are_spelled_as_json_util_spells_them(value):
    """The relay writes these itself too (``relaxed._WRITERS``): the very same text."""
    assert relaxed_json({"v": value, "in": [value]}) == json_util_text({"v": value, "in": [value]})
