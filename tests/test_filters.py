"""The safe filter language: MongoDB's semantics for its subset, and refusal of the rest.

Expected results come from MongoDB's documentation and its own tests, cited per table
("docs:" = mongodb.com/docs/manual page; "jstest:"/"src:" = github.com/mongodb/mongo);
never from running the code under test.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bson import (
    Binary,
    Code,
    Decimal128,
    Int64,
    MaxKey,
    MinKey,
    ObjectId,
    Regex,
    Timestamp,
    json_util,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mongomock.filtering import filter_applies

from changerelay.filters import (
    MAX_DEPTH,
    MAX_FILTER_BYTES,
    MAX_REGEX_LENGTH,
    FilterError,
    compile_filter,
    parse_filter,
)
from tests.support import examples

NAN = float("nan")
OID = ObjectId("5f43a1b2c3d4e5f607182930")
JAN_2020 = datetime.datetime(2020, 1, 1)


def doc(**fields):
    """A change event whose fullDocument is ``fields``."""
    return {"fullDocument": fields}


def matches(spec: dict, event: dict) -> bool:
    return compile_filter(spec)(event)


def run_table(table):
    failures = [
        (spec, event, expected)
        for spec, event, expected in table
        if matches(spec, event) is not expected
    ]
    assert not failures, failures


# ---------------------------------------------------------------------------------------
# One table per operator
# ---------------------------------------------------------------------------------------

F = "fullDocument."

# docs: reference/operator/query/eq, tutorial/query-arrays, reference/bson-type-comparison-order
EQ = [
    ({F + "qty": {"$eq": 20}}, doc(qty=20), True),
    ({F + "qty": {"$eq": 20}}, doc(qty=21), False),
    ({F + "qty": 20}, doc(qty=20), True),  # implicit $eq
    ({F + "item.name": {"$eq": "ab"}}, doc(item={"name": "ab", "code": "123"}), True),
    # An array matches if any element, or the whole array, equals the value.
    ({F + "tags": {"$eq": "B"}}, doc(tags=["A", "B"]), True),
    ({F + "tags": {"$eq": ["A", "B"]}}, doc(tags=["A", "B"]), True),
    ({F + "tags": {"$eq": ["A", "B"]}}, doc(tags=["B", "A"]), False),
    ({F + "tags": {"$eq": ["A", "B"]}}, doc(tags=[["A", "B"], "C"]), True),
    ({F + "tags": "A"}, doc(tags=[["A", "B"]]), False),  # nested arrays are not expanded
    # Embedded documents: exact match, field order included.
    ({F + "item": {"name": "ab", "code": "1"}}, doc(item={"name": "ab", "code": "1"}), True),
    ({F + "item": {"name": "ab", "code": "1"}}, doc(item={"code": "1", "name": "ab"}), False),
    ({F + "item": {"name": "ab"}}, doc(item={"name": "ab", "code": "1"}), False),
    ({F + "item": {}}, doc(), False),  # {} is the empty document, not "no condition"
    ({F + "item": {}}, doc(item={}), True),
    # Numbers compare by value across int, long, double and decimal.
    ({F + "n": 1}, doc(n=1.0), True),
    ({F + "n": 1}, doc(n=Int64(1)), True),
    ({F + "n": 1}, doc(n=Decimal128("1.00")), True),
    ({F + "n": {"$numberDecimal": "1.5"}}, doc(n=1.5), True),
    ({F + "n": {"$numberDecimal": "0.1"}}, doc(n=0.1), False),  # 0.1 is not exactly 1/10
    ({F + "n": -0.0}, doc(n=0), True),
    # Type brackets: booleans are not numbers, strings are not numbers.
    ({F + "n": 1}, doc(n=True), False),
    ({F + "n": True}, doc(n=1), False),
    ({F + "n": 5}, doc(n="5"), False),
    # NaN equals NaN (src: matcher_single_element_match.cpp compares NaN equal to NaN).
    ({F + "n": {"$numberDouble": "NaN"}}, doc(n=NAN), True),
    ({F + "n": {"$numberDouble": "NaN"}}, doc(n=Decimal128("NaN")), True),
    ({F + "n": {"$numberDouble": "NaN"}}, doc(n=1), False),
    # docs: tutorial/query-for-null-fields — null matches null and missing.
    ({F + "item": None}, doc(item=None), True),
    ({F + "item": None}, doc(), True),
    ({F + "item": None}, doc(item=0), False),
    ({F + "item": None}, doc(item=[1, None]), True),
    # Extended JSON values.
    ({"documentKey._id": {"$oid": str(OID)}}, {"documentKey": {"_id": OID}}, True),
    ({"documentKey._id": {"$oid": str(OID)}}, {"documentKey": {"_id": str(OID)}}, False),
    ({F + "at": {"$date": "2020-01-01T00:00:00Z"}}, doc(at=JAN_2020), True),
    (
        {F + "at": {"$date": {"$numberLong": "1577836800000"}}},
        doc(at=JAN_2020.replace(tzinfo=datetime.UTC)),
        True,
    ),
    ({F + "ts": {"$timestamp": {"t": 5, "i": 1}}}, doc(ts=Timestamp(5, 1)), True),
    ({F + "b": {"$binary": {"base64": "AQI=", "subType": "00"}}}, doc(b=b"\x01\x02"), True),
    ({F + "b": {"$binary": {"base64": "AQI=", "subType": "05"}}}, doc(b=b"\x01\x02"), False),
    ({F + "k": {"$minKey": 1}}, doc(k=MinKey()), True),
    ({F + "s": {"$symbol": "x"}}, doc(s="x"), True),
    ({F + "n": {"$numberLong": "9007199254740993"}}, doc(n=9007199254740993), True),
    ({F + "n": {"$numberLong": "9007199254740993"}}, doc(n=9007199254740992.0), False),
    # A stored regex is data: $eq compares it as a value (docs: $eq "Regex Match Behaviour").
    (
        {F + "r": {"$eq": {"$regularExpression": {"pattern": "a", "options": "i"}}}},
        doc(r=Regex("a", "i")),
        True,
    ),
    (
        {F + "r": {"$eq": {"$regularExpression": {"pattern": "a", "options": ""}}}},
        doc(r="a"),
        False,
    ),
]

# docs: reference/operator/query/ne
NE = [
    ({F + "qty": {"$ne": 20}}, doc(qty=21), True),
    ({F + "qty": {"$ne": 20}}, doc(qty=20), False),
    ({F + "qty": {"$ne": 20}}, doc(), True),  # includes documents without the field
    ({F + "qty": {"$ne": 20}}, doc(qty="20"), True),
    ({F + "tags": {"$ne": "B"}}, doc(tags=["A", "B"]), False),  # no element may equal
    ({F + "tags": {"$ne": "B"}}, doc(tags=["A", "C"]), True),
    ({F + "item": {"$ne": None}}, doc(item=None), False),
    ({F + "item": {"$ne": None}}, doc(), False),
    ({F + "item": {"$ne": None}}, doc(item=0), True),
    ({F + "item": {"$ne": None}}, doc(item=[1, None]), False),
    ({F + "n": {"$ne": 1}}, doc(n=Decimal128("1")), False),
]

# docs: reference/operator/query/gt (and gte, lt, lte); reference/bson-type-comparison-order
RANGE = [
    ({F + "qty": {"$gt": 20}}, doc(qty=25), True),
    ({F + "qty": {"$gt": 20}}, doc(qty=20), False),
    ({F + "qty": {"$gte": 20}}, doc(qty=20), True),
    ({F + "qty": {"$lt": 20}}, doc(qty=Int64(19)), True),
    ({F + "qty": {"$lte": 20}}, doc(qty=20.0), True),
    ({F + "qty": {"$gt": 20}}, doc(), False),
    # Only within a type bracket: $gt 5 never matches strings, dates, booleans.
    ({F + "qty": {"$gt": 5}}, doc(qty="10"), False),
    ({F + "qty": {"$lt": 5}}, doc(qty="1"), False),
    ({F + "qty": {"$gt": 0}}, doc(qty=True), False),
    ({F + "qty": {"$lt": 5}}, doc(qty=None), False),
    ({F + "qty": {"$gt": "a"}}, doc(qty=5), False),
    ({F + "name": {"$gt": "a"}}, doc(name="b"), True),
    ({F + "name": {"$gt": "a"}}, doc(name="B"), False),  # binary comparison
    ({F + "name": {"$gt": "ab"}}, doc(name="abc"), True),
    ({F + "name": {"$lt": "é"}}, doc(name="z"), True),
    ({F + "flag": {"$gt": False}}, doc(flag=True), True),
    ({F + "at": {"$gte": {"$date": "2020-01-01T00:00:00Z"}}}, doc(at=JAN_2020), True),
    ({F + "at": {"$gt": {"$date": "2020-01-01T00:00:00Z"}}}, doc(at=JAN_2020), False),
    (
        {F + "at": {"$gt": {"$date": "2020-01-01T00:00:00Z"}}},
        doc(at=JAN_2020.replace(microsecond=1000)),
        True,
    ),
    ({F + "at": {"$gt": {"$date": "2019-01-01T00:00:00Z"}}}, doc(at="2020-01-01"), False),
    ({F + "ts": {"$gt": {"$timestamp": {"t": 5, "i": 1}}}}, doc(ts=Timestamp(5, 2)), True),
    ({F + "ts": {"$gt": {"$timestamp": {"t": 5, "i": 1}}}}, doc(ts=Timestamp(4, 9)), False),
    (
        {"documentKey._id": {"$gt": {"$oid": str(OID)}}},
        {"documentKey": {"_id": ObjectId("ffffffffffffffffffffffff")}},
        True,
    ),
    # Exact numeric comparison across representations.
    ({F + "n": {"$gt": 9007199254740992}}, doc(n=9007199254740993), True),
    ({F + "n": {"$lt": {"$numberDecimal": "0.1"}}}, doc(n=0.1), False),
    ({F + "n": {"$gt": {"$numberDecimal": "0.1"}}}, doc(n=0.1), True),
    ({F + "n": {"$gt": 1}}, doc(n=Decimal128("1.0000000000000000000000000000001")), True),
    ({F + "n": {"$gt": 1e308}}, doc(n=Decimal128("Infinity")), True),
    # Arrays: each condition may be met by a different element (docs: tutorial/query-arrays,
    # "Query an Array with Compound Filter Conditions on the Array Elements").
    ({F + "dim": {"$gt": 15, "$lt": 20}}, doc(dim=[10, 25]), True),
    ({F + "dim": {"$gt": 15, "$lt": 20}}, doc(dim=[10, 12]), False),
    ({F + "dim": {"$gt": 25}}, doc(dim=[10, 26]), True),
    # Whole arrays and documents compare in BSON order too.
    ({F + "dim": {"$gt": [10]}}, doc(dim=[10, 1]), True),
    ({F + "dim": {"$gt": [11]}}, doc(dim=[10, 50]), False),
    ({F + "item": {"$gt": {"a": 1}}}, doc(item={"a": 2}), True),
    ({F + "item": {"$gt": {"a": 1}}}, doc(item={"b": 0}), True),  # field name decides
    ({F + "item": {"$lt": {"a": 1}}}, doc(item={"a": "x"}), False),  # string > number
    # null bounds match missing for $gte/$lte (src: matcher_single_element_match.cpp;
    # jstest: null_query_semantics.js testBasicNotEqualsGTENullQuery).
    ({F + "qty": {"$gte": None}}, doc(), True),
    ({F + "qty": {"$lte": None}}, doc(qty=None), True),
    ({F + "qty": {"$gt": None}}, doc(), False),
    ({F + "qty": {"$lt": None}}, doc(qty=None), False),
    # NaN is never greater or less; $gte/$lte match only NaN itself.
    ({F + "n": {"$lt": 0}}, doc(n=NAN), False),
    ({F + "n": {"$gt": 0}}, doc(n=NAN), False),
    ({F + "n": {"$gte": {"$numberDouble": "NaN"}}}, doc(n=NAN), True),
    ({F + "n": {"$gt": {"$numberDouble": "NaN"}}}, doc(n=NAN), False),
    ({F + "n": {"$lte": {"$numberDouble": "NaN"}}}, doc(n=5), False),
    ({F + "n": {"$gte": {"$numberDouble": "-Infinity"}}}, doc(n=-1e308), True),
    # MinKey and MaxKey bound everything, even a missing field (src: same file).
    ({F + "n": {"$gt": {"$minKey": 1}}}, doc(n="x"), True),
    ({F + "n": {"$gt": {"$minKey": 1}}}, doc(), True),
    ({F + "n": {"$lt": {"$maxKey": 1}}}, doc(n=[]), True),
    ({F + "n": {"$gt": {"$maxKey": 1}}}, doc(n=MaxKey()), False),
]

# docs: reference/operator/query/in
IN = [
    ({F + "qty": {"$in": [5, 15]}}, doc(qty=15), True),
    ({F + "qty": {"$in": [5, 15]}}, doc(qty=10), False),
    ({F + "qty": {"$in": [5, 15]}}, doc(qty=Decimal128("5")), True),
    ({F + "qty": {"$in": [5, 15]}}, doc(), False),
    ({F + "qty": {"$in": []}}, doc(qty=5), False),
    ({F + "tags": {"$in": ["home", "school"]}}, doc(tags=["school", "book"]), True),
    # Regular expressions in $in (docs example: {tags: {$in: [/^be/, /^st/]}}).
    ({F + "tags": {"$in": [{"$regex": "^be"}, {"$regex": "^st"}]}}, doc(tags=["stone"]), True),
    (
        {F + "tags": {"$in": [{"$regularExpression": {"pattern": "^BE", "options": "i"}}]}},
        doc(tags=["best"]),
        True,
    ),
    ({F + "tags": {"$in": [{"$regex": "^be"}]}}, doc(tags=["ab"]), False),
    # null in $in also matches missing (jstest: null_query_semantics.js testInNullQuery).
    ({F + "a": {"$in": [None, 4]}}, doc(), True),
    ({F + "a": {"$in": [None, 4]}}, doc(a=None), True),
    ({F + "a": {"$in": [None, 4]}}, doc(a={}), False),
    # An array member matches the whole array (jstest: ...testNotInNullAndEmptyArrayQuery).
    ({F + "a": {"$in": [[]]}}, doc(a=[]), True),
    ({F + "a": {"$in": [[1, 2]]}}, doc(a=[1, 2]), True),
    ({F + "a": {"$in": [[1, 2]]}}, doc(a=[[1, 2], 3]), True),
    ({F + "a": {"$in": [{"$numberDouble": "NaN"}]}}, doc(a=NAN), True),
]

# docs: reference/operator/query/nin
NIN = [
    ({F + "qty": {"$nin": [5, 15]}}, doc(qty=10), True),
    ({F + "qty": {"$nin": [5, 15]}}, doc(qty=5), False),
    ({F + "qty": {"$nin": [5, 15]}}, doc(), True),  # includes documents without the field
    ({F + "tags": {"$nin": ["school"]}}, doc(tags=["school", "book"]), False),
    ({F + "tags": {"$nin": ["school"]}}, doc(tags=["home", "book"]), True),
    ({F + "a": {"$nin": [None]}}, doc(), False),
    ({F + "a": {"$nin": [None, []]}}, doc(a=[]), False),
    ({F + "a": {"$nin": [None, []]}}, doc(a=[1, "string", None, 4]), False),
    ({F + "a": {"$nin": [None, []]}}, doc(a=[1, "string", 4]), True),
    ({F + "a": {"$nin": [None, {"$regex": "^str"}]}}, doc(a=[1, "string", 4]), False),
    ({F + "a": {"$nin": [None, {"$regex": "^str"}]}}, doc(a=4), True),
]

# docs: reference/operator/query/exists; jstest: null_query_semantics.js
EXISTS = [
    ({F + "qty": {"$exists": True}}, doc(qty=0), True),
    ({F + "qty": {"$exists": True}}, doc(qty=None), True),  # null is a value
    ({F + "qty": {"$exists": True}}, doc(), False),
    ({F + "qty": {"$exists": False}}, doc(), True),
    ({F + "qty": {"$exists": False}}, doc(qty=None), False),
    ({F + "qty": {"$exists": 0}}, doc(), True),
    ({F + "qty": {"$exists": 1}}, doc(qty=1), True),
    ({F + "a": {"$exists": True}}, doc(a=[]), True),
    ({F + "a.b": {"$exists": False}}, doc(a={}), True),
    ({F + "a.b": {"$exists": False}}, doc(a=None), True),
    ({F + "a.b": {"$exists": False}}, doc(a=4), True),
    ({F + "a.b": {"$exists": True}}, doc(a=[{"b": 1}, {}]), True),
    ({F + "a.b": {"$exists": True}}, doc(a=[{}, {"c": 1}]), False),
    # src: expression_parser.cpp parses {$exists: false} as $not of {$exists: true}.
    ({F + "a.b": {"$exists": False}}, doc(a=[{"b": 1}, {}]), False),
    ({F + "a.b": {"$exists": True}}, doc(a={"b": None}), True),
    # jstest: array_match2.js — a numeric segment is an index and a field name.
    ({F + "a.1": {"$exists": True}}, doc(a=[{"1": {"foo": 4}}, {}]), True),
    ({F + "a.1.foo": {"$exists": True}}, doc(a=[{"1": {"foo": 4}}, {}]), True),
]

# docs: reference/operator/query/not
NOT = [
    ({F + "price": {"$not": {"$gt": 1.99}}}, doc(price=1.99), True),
    ({F + "price": {"$not": {"$gt": 1.99}}}, doc(price=2.5), False),
    ({F + "price": {"$not": {"$gt": 1.99}}}, doc(), True),  # also missing
    ({F + "price": {"$not": {"$gt": 1.99}}}, doc(price="3"), True),  # also other types
    ({F + "price": {"$not": {"$gt": 5}}}, doc(price=[3, 7]), False),  # negates the whole path
    ({F + "price": {"$not": {"$gt": 1, "$lt": 5}}}, doc(price=3), False),
    ({F + "price": {"$not": {"$gt": 1, "$lt": 5}}}, doc(price=7), True),
    (
        {F + "item": {"$not": {"$regularExpression": {"pattern": "^p.*", "options": ""}}}},
        doc(item="pencil"),
        False,
    ),
    ({F + "item": {"$not": {"$regex": "^p.*"}}}, doc(item="eraser"), True),
    ({F + "item": {"$not": {"$regex": "^P", "$options": "i"}}}, doc(item="pen"), False),
    ({F + "item": {"$not": {"$regex": "^p.*"}}}, doc(), True),
    ({F + "a": {"$not": {"$gte": None}}}, doc(), False),  # jstest: null_query_semantics.js
    ({F + "a": {"$not": {"$gte": None}}}, doc(a=4), True),
    ({F + "a": {"$not": {"$in": [1, 2]}}}, doc(a=3), True),
    ({F + "a": {"$not": {"$not": {"$eq": 3}}}}, doc(a=3), True),
]

# docs: reference/operator/query/regex
REGEX = [
    ({F + "sku": {"$regex": "789$"}}, doc(sku="abc789"), True),
    ({F + "sku": {"$regex": "^ABC", "$options": "i"}}, doc(sku="abc123"), True),
    ({F + "sku": {"$regex": "^ABC"}}, doc(sku="abc123"), False),
    ({F + "sku": {"$regex": "^S"}}, doc(sku="First\nSecond"), False),
    ({F + "sku": {"$regex": "^S", "$options": "m"}}, doc(sku="First\nSecond"), True),
    ({F + "sku": {"$regex": "a.b"}}, doc(sku="a\nb"), False),
    ({F + "sku": {"$regex": "a.b", "$options": "s"}}, doc(sku="a\nb"), True),
    ({F + "sku": {"$regex": "a b # comment", "$options": "x"}}, doc(sku="ab"), True),
    ({F + "sku": {"$regex": "b$"}}, doc(sku="ab\n"), True),  # $ before a final newline
    ({F + "sku": {"$regex": "b"}}, doc(sku="abc"), True),  # unanchored
    ({F + "sku": {"$regularExpression": {"pattern": "^a", "options": "i"}}}, doc(sku="Ab"), True),
    ({F + "sku": {"$regex": "1"}}, doc(sku=1), False),  # only strings match
    ({F + "sku": {"$regex": "1"}}, doc(sku=Code("1")), False),  # not JavaScript code
    ({F + "sku": {"$regex": "^a"}}, doc(sku=["x", "ab"]), True),
    ({F + "sku": {"$regex": "^a"}}, doc(), False),
    ({F + "sku": {"$regex": "a", "$options": "i"}}, doc(sku=Regex("a", "i")), True),
    ({F + "sku": {"$regex": "a", "$options": "i"}}, doc(sku=Regex("a", "")), False),
    # Without i, \d \w \s \b are ASCII as in PCRE without UCP.
    ({F + "n": {"$regex": r"^\d+$"}}, doc(n="٣"), False),
    ({F + "n": {"$regex": r"^\w$"}}, doc(n="é"), False),
    ({F + "n": {"$regex": "^é$", "$options": "i"}}, doc(n="É"), True),
    # PCRE2 as MongoDB compiles it (UTF, no UCP): \s includes VT, i does not fold \w, u is
    # accepted and changes nothing, comments and \z are PCRE2 syntax.
    ({F + "s": {"$regex": "a\\sb"}}, doc(s="a\x0bb"), True),
    ({F + "s": {"$regex": "^\\w$", "$options": "i"}}, doc(s="\u212a"), False),
    ({F + "s": {"$regex": "^k$", "$options": "i"}}, doc(s="\u212a"), True),
    ({F + "s": {"$regex": "^é", "$options": "u"}}, doc(s="éa"), True),
    ({F + "s": {"$regex": "a(?#note)b\\z"}}, doc(s="ab"), True),
    ({F + "s": {"$regex": "b\\z"}}, doc(s="ab\n"), False),
    ({F + "s": {"$regex": "b\\Z"}}, doc(s="ab\n"), True),
    ({F + "s": {"$regex": "^[[:alpha:]]+$"}}, doc(s="abc"), True),
    ({F + "s": {"$regex": "\\p{Greek}"}}, doc(s="λ"), True),
    # $regex next to other operators: each applies (json_util would silently drop $ne).
    ({F + "s": {"$regex": "^a", "$ne": "ab"}}, doc(s="ab"), False),
    ({F + "s": {"$regex": "^a", "$ne": "ab"}}, doc(s="ac"), True),
]

# docs: reference/operator/query/and, or, nor
LOGICAL = [
    ({"$and": [{F + "a": 1}, {F + "b": 2}]}, doc(a=1, b=2), True),
    ({"$and": [{F + "a": 1}, {F + "b": 2}]}, doc(a=1, b=3), False),
    ({"$or": [{F + "a": 1}, {F + "b": 2}]}, doc(a=0, b=2), True),
    ({"$or": [{F + "a": 1}, {F + "b": 2}]}, doc(a=0, b=3), False),
    ({"$nor": [{F + "price": 1.99}, {F + "sale": True}]}, doc(), True),
    ({"$nor": [{F + "price": 1.99}, {F + "sale": True}]}, doc(price=1.99), False),
    ({"$nor": [{F + "price": 1.99}, {F + "sale": True}]}, doc(price=2, sale=False), True),
    ({"$or": [{"$and": [{F + "a": 1}]}, {"$nor": [{F + "b": 1}]}]}, doc(a=0, b=0), True),
    ({F + "a": 1, "$or": [{F + "b": 1}, {F + "c": 1}]}, doc(a=1, c=1), True),
    ({F + "a": 1, "$or": [{F + "b": 1}, {F + "c": 1}]}, doc(a=2, c=1), False),
    ({}, {}, True),
]

# docs: tutorial/query-array-of-documents; jstest: array_match2.js, null2.js,
# null_query_semantics.js (the classic semantics that MongoDB 8.0 and earlier use).
PATHS = [
    ({F + "instock.qty": 5}, doc(instock=[{"wh": "A", "qty": 5}, {"qty": 15}]), True),
    ({F + "instock.qty": {"$lte": 20}}, doc(instock=[{"qty": 25}, {"qty": 30}]), False),
    ({F + "instock.0.qty": {"$lte": 20}}, doc(instock=[{"qty": 5}, {"qty": 30}]), True),
    ({F + "instock.0.qty": {"$lte": 20}}, doc(instock=[{"qty": 25}, {"qty": 5}]), False),
    ({F + "instock": {"wh": "A", "qty": 5}}, doc(instock=[{"wh": "A", "qty": 5}]), True),
    ({F + "instock": {"qty": 5, "wh": "A"}}, doc(instock=[{"wh": "A", "qty": 5}]), False),
    ({F + "tags.1": "B"}, doc(tags=["A", "B"]), True),
    ({F + "tags.1": "A"}, doc(tags=["A", "B"]), False),
    ({F + "a.1": 4}, doc(a=[{"1": 4}, 5]), True),
    ({F + "a.1": 5}, doc(a=[{"1": 4}, 5]), True),
    ({F + "a.1.foo": 4}, doc(a=[{"1": {"foo": 4}}, {"foo": 5}]), True),
    ({F + "a.1.foo": 5}, doc(a=[{"1": {"foo": 4}}, {"foo": 5}]), True),
    ({F + "a.01": 5}, doc(a=[4, 5]), False),  # "01" is a field name, not an index
    ({F + "a.b": 1}, doc(a=[[{"b": 1}]]), False),  # nested arrays are not traversed
    ({F + "a.0.b": 1}, doc(a=[[{"b": 1}]]), True),
    ({F + "a.b.c": 1}, doc(a=[{"b": [{"c": 0}, {"c": 1}]}]), True),
    ({F + "a.b": [1, 2]}, doc(a=[{"b": [1, 2]}]), True),
    ({F + "a.b": 2}, doc(a=[{"b": [1, 2]}]), True),
    ({F + "a.b": 1}, doc(a=4), False),
    ({F + "a.b": None}, doc(a={}), True),
    ({F + "a.b": None}, doc(a=None), True),
    ({F + "a.b": None}, doc(a=4), True),
    ({F + "a.b": None}, doc(a=[{"b": 5}]), False),
    ({F + "a.b.c": None}, doc(a=[{"b": 4}]), True),
    ({F + "a.b.c": {"$exists": True}}, doc(a=[{"b": 4}, {"b": [{"c": 1}]}]), True),
    ({F + "a.b.c": {"$exists": True}}, doc(a=[{"b": 4}, {"b": [1]}]), False),
    ({F + "a.b": None}, doc(a=[{}]), True),
    ({F + "a.b": None}, doc(a=[{}, {"b": 5}]), True),
    ({F + "a.b": None}, doc(a=[{"b": None}, {"b": 3}]), True),
    ({F + "a.b": None}, doc(a=[{"b": 1}, {"b": 3}, {"b": "string"}]), False),
    ({F + "a.b": {"$ne": None}}, doc(a=[{"b": 1}, {"b": 3}]), True),
    ({F + "a.b": {"$ne": None}}, doc(a=[{"b": 3}, {}]), False),
    ({F + "a.b": {"$in": [None]}}, doc(a=[{}, {"b": 5}]), True),
    ({F + "a.0": None}, doc(a=[]), False),
    # Top-level change-event fields.
    ({"operationType": "insert"}, {"operationType": "insert"}, True),
    ({"operationType": {"$in": ["update", "replace"]}}, {"operationType": "insert"}, False),
    ({"ns.coll": "users"}, {"ns": {"db": "app", "coll": "users"}}, True),
    (
        {"updateDescription.updatedFields.status": "paid"},
        {"updateDescription": {"updatedFields": {"status": "paid"}}},
        True,
    ),
    (
        {"updateDescription.removedFields": "email"},
        {"updateDescription": {"removedFields": ["email", "phone"]}},
        True,
    ),
    ({"fullDocumentBeforeChange.status": "new"}, {"fullDocumentBeforeChange": None}, False),
    ({"fullDocument.status": None}, {"operationType": "delete"}, True),
    ({"to.coll": "archive"}, {"to": {"db": "app", "coll": "archive"}}, True),
]


@pytest.mark.parametrize(
    "table",
    [EQ, NE, RANGE, IN, NIN, EXISTS, NOT, REGEX, LOGICAL, PATHS],
    ids=["eq", "ne", "range", "in", "nin", "exists", "not", "regex", "logical", "paths"],
)
def test_operator_table(table):
    run_table(table)


def test_text_and_decoded_forms_agree():
    """The same filter as JSON text and as a decoded JWT claim means the same thing."""
    text = '{"fullDocument.at": {"$gte": {"$date": "2020-01-01T00:00:00Z"}}, "ns.coll": "c"}'
    claim = json.loads(text)
    assert parse_filter(text).key == compile_filter(claim).key
    assert parse_filter(text.encode()).key == compile_filter(claim).key
    event = {"ns": {"coll": "c"}, "fullDocument": {"at": JAN_2020}}
    assert parse_filter(text)(event) and compile_filter(claim)(event)


def test_relaxed_and_canonical_extended_json_agree():
    relaxed = parse_filter(
        '{"fullDocument.n": 5, "fullDocument.at": {"$date": "2020-01-01T00:00:00Z"}}'
    )
    canonical = parse_filter(
        '{"fullDocument.n": {"$numberInt": "5"},'
        ' "fullDocument.at": {"$date": {"$numberLong": "1577836800000"}}}'
    )
    assert relaxed.key == canonical.key


# ---------------------------------------------------------------------------------------
# Filter objects
# ---------------------------------------------------------------------------------------


def test_key_ignores_order_of_conditions_but_not_of_embedded_fields():
    a = parse_filter('{"fullDocument.x": {"$gt": 1, "$lt": 5}, "operationType": "insert"}')
    b = parse_filter('{"operationType": {"$eq": "insert"}, "fullDocument.x": {"$lt": 5, "$gt": 1}}')
    assert a.key == b.key and a == b and hash(a) == hash(b)
    c = parse_filter('{"fullDocument.x": {"a": 1, "b": 2}}')
    d = parse_filter('{"fullDocument.x": {"b": 2, "a": 1}}')
    assert c.key != d.key


def test_spec_is_normalised_and_compiles_to_the_same_key():
    f = parse_filter(
        '{"fullDocument.s": {"$regularExpression": {"pattern": "^a", "options": "i"}},'
        ' "fullDocument.n": 5, "$or": [{"fullDocument.t": {"$not": {"$regex": "b"}}}]}'
    )
    assert f.spec == {
        "$or": [{"fullDocument.t": {"$not": {"$options": "", "$regex": "b"}}}],
        "fullDocument.n": {"$eq": 5},
        "fullDocument.s": {"$options": "i", "$regex": "^a"},
    }
    assert compile_filter(f.spec).key == f.key


def test_compiled_filter_does_not_read_the_spec_again():
    spec = {F + "tags": {"$in": ["a"]}}
    f = compile_filter(spec)
    spec[F + "tags"]["$in"].append("b")
    spec["operationType"] = "never"
    assert f(doc(tags="a")) and not f(doc(tags="b"))


def test_ten_thousand_or_branches_from_a_trusted_claim():
    spec = {"$or": [{F + "n": i} for i in range(10_000)]}
    f = compile_filter(spec)
    assert f(doc(n=9_999)) and not f(doc(n=10_000))


# ---------------------------------------------------------------------------------------
# Refusals: every error code, with hostile input
# ---------------------------------------------------------------------------------------

DEEP = '{"fullDocument.a": ' * 9 + "1" + "}" * 9
ERRORS = [
    ("invalid_json", "{"),
    ("invalid_json", ""),
    ("invalid_json", b"\xff\xfe{}"),
    ("invalid_json", b'{"fullDocument.a": "\xc3("}'),
    ("invalid_json", '{"fullDocument.\ud800": 1}'),
    ("invalid_json", '{"fullDocument.a": NaN}'),
    ("invalid_json", '{"fullDocument.a": Infinity}'),
    ("invalid_json", "{'fullDocument.a': 1}"),
    ("invalid_filter", "[]"),
    ("invalid_filter", "null"),
    ("invalid_filter", '"fullDocument"'),
    ("invalid_filter", '{"fullDocument.a": 1, "fullDocument.a": 2}'),
    ("invalid_filter", '{"fullDocument.a": {"$in": 5}}'),
    ("invalid_filter", '{"fullDocument.a": {"$in": [{"$gt": 1}]}}'),
    ("invalid_filter", '{"$or": []}'),
    ("invalid_filter", '{"$and": {"fullDocument.a": 1}}'),
    ("invalid_filter", '{"$or": [5]}'),
    ("invalid_filter", '{"fullDocument.a": {"$options": "i"}}'),
    ("invalid_filter", '{"fullDocument.a": {"$gt": 1, "b": 2}}'),
    ("invalid_filter", '{"fullDocument.a": {"b": 2, "$gt": 1}}'),
    ("invalid_filter", '{"fullDocument.a": {"$exists": "yes"}}'),
    ("invalid_filter", '{"fullDocument.a": {"$not": 5}}'),
    ("invalid_filter", '{"fullDocument.a": {"$not": {}}}'),
    ("invalid_filter", '{"fullDocument.a": {"$regex": 5}}'),
    ("invalid_filter", '{"fullDocument.a": {"$ne": {"$regex": "a"}}}'),
    (
        "invalid_filter",
        '{"fullDocument.a": {"$gt": {"$regularExpression": {"pattern": "a", "options": ""}}}}',
    ),
    ("invalid_filter", '{"fullDocument.a": {"$eq": {"$regex": "a", "$ne": 1}}}'),
    ("invalid_filter", '{"fullDocument.a": {"$oid": "nope"}}'),
    ("invalid_filter", '{"fullDocument.a": {"$date": {"$numberLong": "x"}}}'),
    ("invalid_filter", '{"fullDocument..a": 1}'),
    ("invalid_filter", '{"fullDocument.$where": 1}'),
    ("invalid_filter", '{"fullDocument.a": 1' + "0" * 400 + "}"),
    ("invalid_filter", '{"fullDocument.a": 9223372036854775808}'),
    ("invalid_filter", '{"fullDocument.a": 1e999}'),
    ("invalid_filter", '{"fullDocument.a": {"$numberLong": "99999999999999999999"}}'),
    ("unknown_operator", '{"$where": "this.a == 1"}'),
    ("unknown_operator", '{"$expr": {"$eq": ["$a", 1]}}'),
    ("unknown_operator", '{"$jsonSchema": {}}'),
    ("unknown_operator", '{"$text": {"$search": "x"}}'),
    ("unknown_operator", '{"$lookup": {"from": "users"}}'),
    ("unknown_operator", '{"$comment": "x"}'),
    ("unknown_operator", '{"fullDocument.a": {"$function": {"body": "1", "args": []}}}'),
    ("unknown_operator", '{"fullDocument.a": {"$where": "1"}}'),
    ("unknown_operator", '{"fullDocument.a": {"$elemMatch": {"b": 1}}}'),
    ("unknown_operator", '{"fullDocument.a": {"$size": 1}}'),
    ("unknown_operator", '{"fullDocument.a": {"$type": "string"}}'),
    ("unknown_operator", '{"fullDocument.a": {"$not": {"$expr": 1}}}'),
    ("unknown_operator", '{"$or": [{"fullDocument.a": {"$all": [1]}}]}'),
    ("unknown_field", '{"password": "x"}'),
    ("unknown_field", '{"clusterTime": 1}'),
    ("unknown_field", '{"_id._data": "x"}'),
    ("unknown_field", '{"fullDocumentX.a": 1}'),
    ("unknown_field", '{"$or": [{"fullDocument.a": 1}, {"password": "x"}]}'),
    ("filter_too_large", "{" + " " * MAX_FILTER_BYTES + "}"),
    ("filter_too_large", '{"fullDocument.a": "' + "é" * 2100 + '"}'),
    ("filter_too_large", '{"$or": [' + ",".join(['{"fullDocument.a": 1}'] * 10_000) + "]}"),
    ("filter_too_large", b"[" * 100_000),
    ("filter_too_large", "[" * 10_000),  # depth 10,000 cannot fit in 4 KiB: size is checked first
    ("filter_too_deep", "[" * 4000),
    ("filter_too_deep", '{"a":' * 800),
    ("filter_too_deep", '{"fullDocument.a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}"),
    ("filter_too_deep", '{"$or": [' * 9 + "{}" + "]}" * 9),
    ("filter_too_deep", '"' + "[" * 10 + '"' + "[" * 3000),
    ("regex_too_long", json.dumps({"fullDocument.a": {"$regex": "a" * (MAX_REGEX_LENGTH + 1)}})),
    ("regex_too_long", json.dumps({"fullDocument.a": {"$in": [{"$regex": "a" * 300}]}})),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "("}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "[z-a]"}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "(a)\\\\1"}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "a{,3}"}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "(?u)a"}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "a\\u0000"}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "(?=a)b"}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "(?<!a)b"}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "(?>a+)b"}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "a++b"}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "a$b"}}'),
    ("invalid_regex", '{"fullDocument.a": {"$not": {"$regex": "(?=a)"}}}'),
    ("invalid_regex", '{"fullDocument.a": {"$in": [{"$regex": "(a)\\\\1"}]}}'),
    ("invalid_regex", '{"fullDocument.a": {"$regex": "a", "$options": "g"}}'),
]


@pytest.mark.parametrize(
    ("code", "text"), ERRORS, ids=[f"{code}-{i}" for i, (code, _) in enumerate(ERRORS)]
)
def test_refusals(code, text):
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    assert caught.value.code == code, caught.value.message
    assert caught.value.message and caught.value.code in str(caught.value)


def test_error_messages_say_how_to_fix():
    with pytest.raises(FilterError) as caught:
        parse_filter('{"fullDocument.a": {"$where": "1"}}')
    assert "'$where'" in caught.value.message
    assert all(op in caught.value.message for op in ("$eq", "$in", "$regex", "$not"))
    with pytest.raises(FilterError) as caught:
        parse_filter('{"password": 1}')
    assert "fullDocument" in caught.value.message and "operationType" in caught.value.message
    with pytest.raises(FilterError) as caught:
        parse_filter('{"fullDocument.a": {"$regex": "(?<=x)a"}}')
    assert "lookbehind" in caught.value.message and "(?<=x)a" in caught.value.message


def test_as_many_or_branches_as_fit_in_4_kib():
    text = '{"$or":[' + ",".join(['{"ns.coll":1}'] * 150 + ["{}"] * 600) + "]}"
    assert len(text) <= MAX_FILTER_BYTES
    started = time.monotonic()
    f = parse_filter(text)
    assert f({}) and f(doc())
    assert time.monotonic() - started < 1
    nor = parse_filter(text.replace("$or", "$nor"))
    assert not nor({})


def test_parse_filter_refuses_non_text():
    for value in (None, 5, {"fullDocument.a": 1}):
        with pytest.raises(FilterError) as caught:
            parse_filter(value)  # type: ignore[arg-type]
        assert caught.value.code == "invalid_json"
    assert issubclass(FilterError, ValueError)


def test_limits_are_inclusive():
    at_limit = '{"fullDocument.a": "' + "x" * (MAX_FILTER_BYTES - 22) + '"}'
    assert len(at_limit.encode()) == MAX_FILTER_BYTES
    parse_filter(at_limit)
    nested = '{"fullDocument.a": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    parse_filter(nested)
    parse_filter(json.dumps({"fullDocument.a": {"$regex": "a" * MAX_REGEX_LENGTH}}))


def test_compile_filter_refuses_deep_and_cyclic_objects():
    deep: dict = {}
    node = deep
    for _ in range(10_000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(FilterError) as caught:
        compile_filter({"fullDocument.a": deep})
    assert caught.value.code == "filter_too_deep"
    cyclic: dict = {}
    cyclic["x"] = cyclic
    with pytest.raises(FilterError) as caught:
        compile_filter({"fullDocument.a": cyclic})
    assert caught.value.code == "filter_too_deep"


def test_compile_filter_refuses_non_bson_values():
    for value in ({1, 2}, object(), 2**64, (1, 2)):
        with pytest.raises(FilterError) as caught:
            compile_filter({"fullDocument.a": value})
        assert caught.value.code == "invalid_filter"
    with pytest.raises(FilterError):
        compile_filter([])  # type: ignore[arg-type]


REDOS = [  # the patterns and the classics: exponential for a backtracking engine
    ("(a|a)+$", "a" * 29 + "!"),
    ("(.|..)*!", "john.smith.1984@mail.example.com"),
    ("(a+)+$", "a" * 40 + "!"),
    ("(x*y*)*z", "xy" * 30),
    ("^(\\w+\\s?)*$", "word " * 30 + "!"),
]
REDOS_SCRIPT = """
import json, sys, time
from changerelay.filters import parse_filter
worst = 0.0
for pattern, value in json.loads(sys.argv[1]):
    f = parse_filter(json.dumps({"fullDocument.s": {"$regex": pattern}}))
    started = time.perf_counter()
    f({"fullDocument": {"s": value}})
    worst = max(worst, time.perf_counter() - started)
print(worst)
"""


def test_redos_patterns_are_evaluated_in_microseconds():
    """In a subprocess with a deadline: on a backtracking engine the first case alone takes
    about a minute, so a failure must not take the suite down with it."""
    try:
        done = subprocess.run([sys.executable, "-c", REDOS_SCRIPT, json.dumps(REDOS)],
                              capture_output=True, text=True, timeout=20,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        pytest.fail("a $regex filter ran for more than 20 s on a 30-character value")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 0.005  # each evaluation, value included


# ---------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------
#
# The oracle is mongomock.filtering.filter_applies.  Where mongomock departs from MongoDB
# the generator avoids the corner instead of copying the mistake; each is pinned above by
# a table row taken from MongoDB's docs or tests:
#
# 1. {field: {}} is "no condition" to mongomock, the empty document to MongoDB (EQ table):
#    generated embedded documents are never empty.
# 2. A dotted path that continues past a scalar or null ({"a.b": null} on {a: 4}) matches
#    nothing in mongomock, even under $ne/$not/$exists:false; MongoDB treats the field as
#    missing (jstest null_query_semantics.js, testDottedEqualsNull: a_number, a_null).
# 3. Paths continuing through empty arrays, arrays of scalars, or numeric segments into
#    arrays: mongomock's traversal differs from BSONElementIterator (path.cpp), and
#    MongoDB 9.0 changes the scalar-element case (SERVER-36681).  Skipped pairs; the
#    PATHS and EXISTS tables pin the classic behaviour.
# 4. $in/$nin members that are arrays never match the whole array in mongomock; they do
#    in MongoDB (jstest null_query_semantics.js, testNotInNullAndEmptyArrayQuery).  Nor
#    are array elements compared with an operand of $eq, $ne, $gt... that is an array
#    (mongomock's implicit equality does compare them); MongoDB does (EQ table).
# 5. $gte/$lte with a null bound match a missing field in MongoDB (RANGE table); mongomock
#    disagrees, so range operators get no null bound.
# 6. mongomock compares with Python ==, so False == 0 == -0.0; MongoDB keeps booleans and
#    numbers in different brackets (docs: BSON comparison order).  Numbers are never 0/1.
# 7. Decimal128 does not compare numerically in mongomock (EQ/RANGE tables cover it);
#    NaN != NaN in mongomock but $eq NaN matches NaN in MongoDB.  Neither is generated.
# 8. $exists: false through an array of documents matches in mongomock when any element
#    lacks the field; MongoDB negates $exists: true, so only when none has it (EXISTS
#    table).  Skipped pairs.

NAMES = st.sampled_from(["a", "b", "0", "1"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-3, -2, 2, 3, Int64(2), Int64(-3), 1.5, 2.0, -2.5]),
    st.sampled_from(["", "a", "ab", "B"]),
    st.sampled_from([JAN_2020, datetime.datetime(2021, 1, 1), OID, ObjectId(b"b" * 12)]),
)


def _values(min_doc_size):
    return st.recursive(
        SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(NAMES, inner, min_size=min_doc_size, max_size=3),
        ),
        max_leaves=6,
    )


OPERANDS = _values(min_doc_size=1)  # (1)
DOCUMENT_VALUES = _values(min_doc_size=0)
PATHS_ = st.lists(NAMES, min_size=1, max_size=3).map(lambda parts: F + ".".join(parts))
COMPARISON = st.builds(
    lambda op, value: {op: value},
    st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"]),
    OPERANDS.filter(lambda v: not isinstance(v, list)),  # (4)
).filter(lambda d: not ({"$gt", "$gte", "$lt", "$lte"} & set(d) and None in d.values()))  # (5)
MEMBERSHIP = st.builds(
    lambda op, values: {op: values},
    st.sampled_from(["$in", "$nin"]),
    st.lists(OPERANDS.filter(lambda v: not isinstance(v, list)), max_size=3),  # (4)
)
OPERATOR = st.one_of(
    COMPARISON,
    MEMBERSHIP,
    st.builds(lambda flag: {"$exists": flag}, st.booleans()),
    st.builds(
        lambda pattern, options: {"$regex": pattern, "$options": options},
        st.sampled_from(["a", "^a", "b$", "A", "^$"]),
        st.sampled_from(["", "i"]),
    ),
)
CONDITION = st.one_of(
    OPERANDS,
    st.lists(OPERATOR, min_size=1, max_size=2).map(
        lambda ds: {key: value for d in ds for key, value in d.items()}
    ),
    OPERATOR.map(lambda d: {"$not": d}),
)
FILTERS = st.recursive(
    st.dictionaries(PATHS_, CONDITION, min_size=1, max_size=2),
    lambda inner: st.builds(
        lambda op, branches: {op: branches},
        st.sampled_from(["$and", "$or", "$nor"]),
        st.lists(inner, min_size=1, max_size=3),
    ),
    max_leaves=4,
)
DOCUMENTS = st.dictionaries(NAMES, DOCUMENT_VALUES, max_size=3)


def _continues_past_a_non_document(value, parts) -> bool:  # (2) and (3)
    if not parts:
        return False
    if isinstance(value, dict):
        return parts[0] in value and _continues_past_a_non_document(value[parts[0]], parts[1:])
    if isinstance(value, list):
        if not value or parts[0].isdigit():
            return True
        return any(
            not isinstance(element, dict) or _continues_past_a_non_document(element, parts)
            for element in value
        )
    return True


def _crosses_an_array(value, parts) -> bool:  # (8)
    for part in parts[:-1]:
        if not isinstance(value, dict) or part not in value:
            break
        value = value[part]
    return isinstance(value, list)


def _exists_false(condition) -> bool:  # (8)
    return isinstance(condition, dict) and (
        condition.get("$exists") is False or _exists_false(condition.get("$not"))
    )


def _conditions(spec):
    """(path parts, condition) for every path condition in ``spec``, however nested."""
    for key, condition in spec.items():
        if key in ("$and", "$or", "$nor"):
            for branch in condition:
                yield from _conditions(branch)
        else:
            yield key.split("."), condition


def _mongomock_departs(event, spec) -> bool:
    return any(
        _continues_past_a_non_document(event, parts)
        or (_exists_false(condition) and _crosses_an_array(event, parts))
        for parts, condition in _conditions(spec)
    )


PROPERTY = settings(
    max_examples=examples(150),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@PROPERTY
@given(FILTERS, DOCUMENTS)
def test_agrees_with_mongomock(spec, fields):
    event = {"fullDocument": fields}
    assume(not _mongomock_departs(event, spec))
    assert compile_filter(spec)(event) is filter_applies(_for_mongomock(spec), event)


def _for_mongomock(spec):
    """mongomock knows $not with a compiled pattern, but not with $regex/$options."""
    if isinstance(spec, list):
        return [_for_mongomock(item) for item in spec]
    if not isinstance(spec, dict):
        return spec
    if "$regex" in spec and set(spec) <= {"$regex", "$options"}:
        flags = re.IGNORECASE if "i" in spec.get("$options", "") else 0
        return re.compile(spec["$regex"], flags)
    return {key: _for_mongomock(value) for key, value in spec.items()}


@PROPERTY
@given(FILTERS, DOCUMENTS)
def test_normalised_spec_means_the_same(spec, fields):
    f = compile_filter(spec)
    again = compile_filter(f.spec)
    assert again.key == f.key
    event = {"fullDocument": fields}
    assert again(event) is f(event)
    text = json_util.dumps(f.spec, json_options=json_util.CANONICAL_JSON_OPTIONS)
    if len(text.encode()) <= MAX_FILTER_BYTES:
        assert parse_filter(text).key == f.key


@PROPERTY
@given(PATHS_, OPERANDS, st.lists(OPERANDS, max_size=3), DOCUMENTS)
def test_documented_equivalences(path, value, values, fields):
    """docs: $ne is "not $eq", $nin is "not $in", $nor of one clause is its negation."""
    event = {"fullDocument": fields}
    eq = matches({path: {"$eq": value}}, event)
    assert matches({path: {"$ne": value}}, event) is not eq
    assert matches({path: {"$not": {"$eq": value}}}, event) is not eq
    assert matches({"$nor": [{path: {"$eq": value}}]}, event) is not eq
    member = matches({path: {"$in": values}}, event)
    assert member is any(matches({path: {"$eq": v}}, event) for v in values)
    assert matches({path: {"$nin": values}}, event) is not member


JSON_KEYS = st.one_of(
    st.sampled_from(["$and", "$or", "$nor", "$not", "$in", "$regex", "$options", "$eq", "$gt"]),
    st.sampled_from(["$oid", "$date", "$numberLong", "$where", "$expr", "$exists", "$elemMatch"]),
    PATHS_,
    st.text(max_size=5),
)
JSONISH = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=8),
        st.sampled_from(["(a+)+", "[", "\\Z", "^a", "5f43a1b2c3d4e5f607182930", "2020-01-01"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(JSON_KEYS, inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=examples(250), deadline=None, database=None)
@given(st.one_of(st.text(max_size=60), st.binary(max_size=60), JSONISH.map(json.dumps)), DOCUMENTS)
def test_parse_filter_raises_only_filter_error(text, fields):
    try:
        f = parse_filter(text)
    except FilterError as exc:
        assert exc.code in {
            "invalid_json",
            "invalid_filter",
            "unknown_operator",
            "unknown_field",
            "filter_too_large",
            "filter_too_deep",
            "regex_too_long",
            "regex_too_complex",
            "invalid_regex",
        }
        return
    assert f({"fullDocument": fields}) in (True, False)


@settings(max_examples=examples(120), deadline=None, database=None)
@given(JSONISH)
def test_compile_filter_raises_only_filter_error(spec):
    with contextlib.suppress(FilterError):
        compile_filter(spec)


def test_regex_flag_letters_follow_bson():
    f = parse_filter('{"fullDocument.s": {"$regex": "a", "$options": "xi"}}')
    assert f.spec["fullDocument.s"]["$options"] == "ix"
    assert f(doc(s=Regex("a", re.I | re.X)))


def test_binary_values_compare_by_length_then_subtype_then_bytes():
    """docs: BSON comparison order, BinData."""
    three = {"$binary": {"base64": "AAAA", "subType": "00"}}
    assert matches({F + "b": {"$gt": three}}, doc(b=b"\x00\x00\x01"))
    assert matches({F + "b": {"$lt": three}}, doc(b=b"\xff\xff"))
    assert matches({F + "b": {"$gt": three}}, doc(b=Binary(b"\x00\x00\x00", 5)))


EXOTIC = st.sampled_from(
    [
        None, True, False, 0, -0.0, 7, Int64(7), 7.0, 2.5, Decimal128("7"), Decimal128("-Infinity"),
        NAN, Decimal128("NaN"), "", "7", "é", {}, {"a": 1}, {"a": 1, "b": 2}, {"b": 2, "a": 1},
        b"", b"\x01", Binary(b"\x01", 5), OID, ObjectId(b"z" * 12), JAN_2020,
        JAN_2020.replace(tzinfo=datetime.UTC), Timestamp(1, 2), Timestamp(2, 1),
        Regex("a", "i"), MinKey(), MaxKey(), Code("x"),
    ]
)  # fmt: skip
BSON_VALUES = st.recursive(
    EXOTIC,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(NAMES, inner, max_size=3)),
    max_leaves=5,
)


@settings(max_examples=examples(80), deadline=None, database=None)
@given(FILTERS, st.dictionaries(NAMES, BSON_VALUES, max_size=3))
def test_any_decoded_event_evaluates_to_a_boolean(spec, fields):
    assert compile_filter(spec)({"fullDocument": fields}) in (True, False)


def _expected_bracket(value):
    """docs: BSON comparison order, written independently of the code under test."""
    order = [
        (bool, "bool"), (type(None), "null"), ((int, float, Decimal128), "number"),
        (Code, "code"), (str, "string"), (dict, "object"), ((bytes, Binary), "binary"),
        (ObjectId, "oid"), (datetime.datetime, "date"), (Timestamp, "timestamp"),
        (Regex, "regex"),
    ]  # fmt: skip
    return next(name for kind, name in order if isinstance(value, kind))


def _is_nan(value):
    return (
        value != value
        if isinstance(value, float)
        else (isinstance(value, Decimal128) and value.to_decimal().is_nan())
    )


SCALAR_EXOTIC = EXOTIC.filter(lambda v: not isinstance(v, MinKey | MaxKey | Code))


@settings(max_examples=examples(200), deadline=None, database=None)
@given(SCALAR_EXOTIC, SCALAR_EXOTIC.filter(lambda v: not isinstance(v, Regex)))
def test_comparison_is_a_total_order_inside_a_bracket_and_empty_across(value, operand):
    event = doc(v=value)
    hits = [op for op in ("$lt", "$eq", "$gt") if matches({F + "v": {op: operand}}, event)]
    if _expected_bracket(value) != _expected_bracket(operand):
        assert hits == []
    elif _is_nan(value) or _is_nan(operand):
        assert hits == (["$eq"] if _is_nan(value) and _is_nan(operand) else [])
    else:
        assert len(hits) == 1, hits
        assert matches({F + "v": {"$lte": operand}}, event) is (hits[0] != "$gt")
        assert matches({F + "v": {"$gte": operand}}, event) is (hits[0] != "$lt")
