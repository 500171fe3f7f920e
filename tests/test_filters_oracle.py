"""The filter language against a real mongod's own ``find``, the oracle mongomock approximates.

``test_filters.py`` checks the relay's matcher against MongoDB's documented tables and, for random
filters, against mongomock, steering clear of the places where mongomock departs from MongoDB.
Here nothing is steered clear of: each generated document is stored in a real ``mongod`` and
the generated filter is run there with ``find``; the relay must agree on every example. It runs
only where a real server exists (``MONGODB_ORACLE_URI``, set by the GitHub Actions workflow in
``.github/workflows/real-mongodb.yml``); the test primary would be no oracle, since its query
language is the relay's own simplification.
"""

from __future__ import annotations

import datetime
import itertools
import os
import uuid

import pytest
from bson import Decimal128, Int64, ObjectId
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient

from changerelay.filters import compile_filter

ORACLE_URI = os.environ.get("MONGODB_ORACLE_URI")
pytestmark = [
    pytest.mark.oracle,
    pytest.mark.skipif(not ORACLE_URI, reason="needs a real mongod: set MONGODB_ORACLE_URI"),
]

F = "fullDocument."
NAMES = st.sampled_from(["a", "b", "0", "1"])
# Everything mongomock gets wrong is in here on purpose: 0/1/False/-0.0, NaN, Decimal128, null
# bounds, arrays as operands, numeric path components.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, -0.0, -3, 2, Int64(2), Int64(-3), 1.5, 2.0, float("nan"),
                     float("inf"), Decimal128("2"), Decimal128("NaN"), Decimal128("-0")]),
    st.sampled_from(["", "a", "ab", "B"]),
    st.sampled_from([datetime.datetime(2020, 1, 1), ObjectId("5f43a1b2c3d4e5f607182930")]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(NAMES, inner, max_size=3)),
    max_leaves=6,
)
PATHS = st.lists(NAMES, min_size=1, max_size=3).map(lambda parts: F + ".".join(parts))
OPERATOR = st.one_of(
    st.builds(lambda op, value: {op: value},
              st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"]), VALUES),
    st.builds(lambda op, values: {op: values}, st.sampled_from(["$in", "$nin"]),
              st.lists(VALUES, max_size=3)),
    st.builds(lambda flag: {"$exists": flag}, st.booleans()),
    st.builds(lambda pattern, options: {"$regex": pattern, "$options": options},
              st.sampled_from(["a", "^a", "b$", "A", "^$"]), st.sampled_from(["", "i"])),
)
CONDITION = st.one_of(
    VALUES,
    st.lists(OPERATOR, min_size=1, max_size=2).map(
        lambda ds: {key: value for d in ds for key, value in d.items()}),
    OPERATOR.map(lambda d: {"$not": d}),
)
FILTERS = st.recursive(
    st.dictionaries(PATHS, CONDITION, min_size=1, max_size=2),
    lambda inner: st.builds(lambda op, branches: {op: branches},
                            st.sampled_from(["$and", "$or", "$nor"]),
                            st.lists(inner, min_size=1, max_size=3)),
    max_leaves=4,
)
DOCUMENTS = st.dictionaries(NAMES, VALUES, max_size=3)


@pytest.fixture(scope="module")
def collection():
    client = MongoClient(ORACLE_URI, serverSelectionTimeoutMS=5000)
    name = "oracle_" + uuid.uuid4().hex[:8]
    yield client[name].events
    client.drop_database(name)
    client.close()


def test_agrees_with_mongodb_find(collection):
    ids = itertools.count()

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(FILTERS, DOCUMENTS)
    def agrees(spec, fields):
        key = next(ids)
        event = {"_id": key, "fullDocument": fields}
        collection.insert_one(event)
        found = collection.find_one({"$and": [{"_id": key}, spec]}) is not None
        assert compile_filter(spec)(event) is found, (spec, fields)

    agrees()
