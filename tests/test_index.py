"""The subscription index: it finds every subscription an event may concern, by MongoDB's own
equality, and the hub's delivery through it is the plain ``select`` over every subscription.

The oracle is the filter language itself (``filters.compile_filter``), which is checked against
MongoDB's semantics in test_filters.py: an equality key must agree with ``$eq`` on every pair of
values, and the index's candidates must never leave out a subscription that ``select`` would
send something to.
"""

from __future__ import annotations

import datetime

import pytest
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from changerelay import events as ev
from changerelay.filters import MISSING, compile_filter, equality_key, reached

JAN_2020 = datetime.datetime(2020, 1, 1)
OID = ObjectId(b"a" * 12)
NAN = float("nan")

PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def equal_by_filter(value, operand) -> bool:
    """``$eq`` on a whole value: inside a one-field document, so that a leaf array is compared
    as an array rather than element by element."""
    spec = {"fullDocument.w": {"$eq": {"x": operand}}}
    return compile_filter(spec)({"fullDocument": {"w": {"x": value}}})


# -- equality keys ----------------------------------------------------------------------------

SAME = [
    (1, 1.0), (1, Int64(1)), (1, Decimal128("1")), (1.0, Decimal128("1.000")),
    (0, -0.0), (0, Decimal128("-0")), (-0.0, Decimal128("0E+3")),
    (NAN, Decimal128("NaN")), (NAN, float("-nan")), (float("inf"), Decimal128("Infinity")),
    (2**53, Decimal128(str(2**53))), (Int64(2**62), 2**62),
    ("a", "a"), (OID, ObjectId(b"a" * 12)),
    (JAN_2020, JAN_2020.replace(tzinfo=datetime.UTC)),
    (b"x", Binary(b"x", 0)), (Binary(b"x", 5), Binary(b"x", 5)),
    ({"a": 1, "b": [1, 2.0]}, {"a": 1.0, "b": [Int64(1), 2]}),
    ([None, {"c": "d"}], [None, {"c": "d"}]),
    (Timestamp(1, 2), Timestamp(1, 2)), (Regex("a", "i"), Regex("a", "i")),
    (MinKey(), MinKey()), (MaxKey(), MaxKey()), (None, None), (True, True),
]
DIFFERENT = [
    (True, 1), (False, 0), (False, None), (0, None), ("1", 1), (Decimal128("0.1"), 0.1),
    (2**53 + 1, float(2**53)), ({"a": 1, "b": 2}, {"b": 2, "a": 1}), ([1, 2], [2, 1]),
    ([1], 1), ({"a": 1}, {"a": 1, "b": None}), ({"a": None}, {}), (OID, str(OID)),
    (JAN_2020, JAN_2020 + datetime.timedelta(milliseconds=1)), (b"x", Binary(b"x", 5)),
    (Timestamp(1, 2), Timestamp(2, 1)), (Regex("a", "i"), Regex("a", "")), ("a", "A"),
    (MinKey(), MaxKey()), (NAN, 0), (Code("x"), "x"), ("é", "e\u0301"),
]


@pytest.mark.parametrize("a, b", SAME)
def test_equal_values_share_a_key(a, b):
    assert equal_by_filter(a, b) and equal_by_filter(b, a)  # the oracle agrees with the table
    assert equality_key(a) == equality_key(b)
    assert hash(equality_key(a)) == hash(equality_key(b))


@pytest.mark.parametrize("a, b", DIFFERENT)
def test_unequal_values_have_different_keys(a, b):
    assert not equal_by_filter(a, b)
    assert equality_key(a) != equality_key(b)


def test_missing_has_the_key_of_null_as_eq_null_matches_it():
    # docs: "The { item : null } query matches documents that either contain the item field
    # whose value is null or that do not contain the item field."
    # https://www.mongodb.com/docs/manual/tutorial/query-for-null-fields/
    assert compile_filter({"fullDocument.v": None})({"fullDocument": {}})
    assert reached({"fullDocument": {}}, ("fullDocument", "v")) == [MISSING]
    assert equality_key(MISSING) == equality_key(None)


EXOTIC = st.sampled_from([
    None, True, False, 0, 1, -0.0, 7, Int64(7), 7.0, 2.5, Decimal128("7"), Decimal128("7.0"),
    Decimal128("-Infinity"), float("-inf"), NAN, Decimal128("NaN"), 2**63 - 1, float(2**63),
    "", "7", "é", b"", b"\x01", Binary(b"\x01", 5), Binary(b"\x01", 0), OID,
    ObjectId(b"z" * 12), JAN_2020, JAN_2020.replace(tzinfo=datetime.UTC), Timestamp(1, 2),
    Timestamp(2, 1), Regex("a", "i"), MinKey(), MaxKey(),
])
NAMES = st.sampled_from(["a", "b", "0", "1"])
VALUES = st.recursive(
    EXOTIC,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(NAMES, inner, max_size=3)),
    max_leaves=6,
)
EVENT_VALUES = st.one_of(VALUES, st.sampled_from([Code("x"), Code("x", {"a": 1})]))


@PROPERTY
@given(EVENT_VALUES, VALUES)
def test_keys_are_equal_exactly_when_eq_says_so(value, operand):
    assert (equality_key(value) == equality_key(operand)) is equal_by_filter(value, operand)


# -- the values a path reaches ----------------------------------------------------------------

PATH_PARTS = st.lists(NAMES, min_size=1, max_size=3).map(lambda parts: ("fullDocument", *parts))
DOCUMENTS = st.dictionaries(NAMES, VALUES, max_size=3)


@PROPERTY
@given(DOCUMENTS, PATH_PARTS, VALUES)
def test_eq_matches_exactly_when_a_reached_value_has_the_operands_key(document, parts, operand):
    event = {"fullDocument": document}
    matches = compile_filter({".".join(parts): {"$eq": operand}})(event)
    found = reached(event, parts)
    assert found is not None
    assert matches is (equality_key(operand) in {equality_key(value) for value in found})


def test_reached_gives_up_where_a_filter_would_run_out_of_budget():
    # Numeric segments read each element both as a field and by position: nested arrays
    # multiply the walk, so past an evaluation's budget the caller must not rely on it.
    node: object = {"0": 1}
    for level in range(30):
        node = [node] if level % 2 else {"0": node}
    event = {"fullDocument": {"z": node}}
    assert reached(event, ("fullDocument", "z", *["0"] * 30)) is None
    assert reached(event, ("fullDocument", "z")) == [*node, node]  # a leaf array: both


def change(n: int, **fields) -> ev.Event:
    return ev.encode_change({"_id": {"_data": f"82{n:016X}"}, "operationType": "insert",
                             "ns": {"db": "db", "coll": "c"}, **fields})
