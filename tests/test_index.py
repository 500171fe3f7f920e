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
from changerelay.index import Index, covers
from changerelay.rows import AccessRule
from changerelay.subscription import Subscription
from tests.support import SUBSCRIPTIONS, batches, examples

JAN_2020 = datetime.datetime(2020, 1, 1)
OID = ObjectId(b"a" * 12)
NAN = float("nan")

PROPERTY = settings(max_examples=examples(300), deadline=None, database=None,
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


# -- the index --------------------------------------------------------------------------------


def subscribe(index, subscription):
    index.add(subscription, covers(subscription))
    return subscription


def owner(name: str, **extra) -> Subscription:
    return Subscription(filter=compile_filter({"fullDocument.owner": name, **extra}))


def routed(index, batch) -> dict:
    return index.route(batch)


def test_a_per_user_event_finds_only_its_owners_subscription():
    index = Index()
    users = [subscribe(index, owner(f"u{n}")) for n in range(1000)]
    event = change(1, fullDocument={"owner": "u7", "n": 1})
    assert routed(index, [event]) == {users[7]: [event]}
    assert routed(index, [change(2, fullDocument={"owner": "nobody"})]) == {}


def test_keys_taken_before_the_paths_changed_are_taken_again():
    index = Index()
    alice = subscribe(index, owner("alice"))
    event = change(1, fullDocument={"owner": "alice", "team": "red", "tags": ["a", "b"]})
    stale = index.keys(event)
    red = subscribe(index, Subscription(filter=compile_filter({"fullDocument.team": "red"})))
    assert index.route([event], [stale]) == {alice: [event], red: [event]}
    stale = index.keys(event)
    tagged = subscribe(index, Subscription(filter=compile_filter(
        {"fullDocument.tags": {"$in": [["a", "b"]]}})))  # keys the path's arrays from now on
    assert index.route([event], [stale]) == {alice: [event], red: [event], tagged: [event]}
    index.discard(red)
    assert index.route([event], [stale]) == {alice: [event], tagged: [event]}


def test_batches_are_split_per_member_in_order():
    index = Index()
    alice, bob = subscribe(index, owner("alice")), subscribe(index, owner("bob"))
    batch = [change(n, fullDocument={"owner": who}) for n, who in
             enumerate(["alice", "bob", "alice", "carol", "bob"])]
    assert routed(index, batch) == {alice: [batch[0], batch[2]], bob: [batch[1], batch[4]]}


@pytest.mark.parametrize("value, hits", [
    ("a", {"a"}), (["a", "b"], {"a", "b", "[a, b]"}), ([["a", "b"]], {"[a, b]"}),
    (None, {"null"}), (MISSING, {"null"}), ([None], {"null"}), ([], set()),
    (1, {"1"}), (1.0, {"1"}), (Int64(1), {"1"}), (Decimal128("1.0"), {"1"}), (True, {"true"}),
    ({"x": 1, "y": 2}, {"{x, y}"}), ({"y": 2, "x": 1}, set()), ([{"x": 1, "y": 2}], {"{x, y}"}),
])
def test_equality_as_mongodb_means_it(value, hits):
    index = Index()
    operands = {"a": "a", "b": "b", "[a, b]": ["a", "b"], "null": None, "1": 1, "true": True,
                "{x, y}": {"x": 1, "y": 2}}
    subscriptions = {name: subscribe(index, owner(operand)) for name, operand in operands.items()}
    document = {} if value is MISSING else {"owner": value}
    event = change(1, fullDocument=document)
    expected = {name for name, sub in subscriptions.items() if sub.select([event])}
    assert expected == hits  # the oracle, and the table, agree
    assert {name for name, sub in subscriptions.items() if sub in routed(index, [event])} == hits


def test_in_files_each_value_and_a_regex_in_it_is_residual():
    index = Index()
    either = subscribe(index, Subscription(filter=compile_filter(
        {"fullDocument.owner": {"$in": ["a", "b"]}})))
    pattern = subscribe(index, Subscription(filter=compile_filter(
        {"fullDocument.owner": {"$in": ["a", {"$regex": "^c"}]}})))
    assert index.residual == {pattern}
    assert set(routed(index, [change(1, fullDocument={"owner": "b"})])) == {either, pattern}


def test_conditions_that_are_not_equalities_stay_residual():
    index = Index()
    ranged = subscribe(index, Subscription(filter=compile_filter({"fullDocument.n": {"$gt": 1}})))
    negated = subscribe(index, Subscription(filter=compile_filter({"$nor": [
        {"fullDocument.owner": "a"}]})))
    everything = subscribe(index, Subscription())
    assert index.residual == {ranged, negated, everything}


def test_or_is_filed_when_every_branch_has_an_equality():
    index = Index()
    either = subscribe(index, Subscription(filter=compile_filter({"$or": [
        {"fullDocument.owner": "a"}, {"fullDocument.team": {"$in": ["x", "y"]}}]})))
    half = subscribe(index, Subscription(filter=compile_filter({"$or": [
        {"fullDocument.owner": "a"}, {"fullDocument.n": {"$gt": 1}}]})))
    assert index.residual == {half}
    assert either in routed(index, [change(1, fullDocument={"team": "y"})])
    assert either not in routed(index, [change(2, fullDocument={"team": "z"})])


def test_a_shared_condition_is_not_where_everyone_is_filed():
    index = Index()
    users = [subscribe(index, owner(f"u{n}", **{"fullDocument.status": "paid"}))
             for n in range(200)]
    found = routed(index, [change(1, fullDocument={"owner": "u5", "status": "paid"})])
    assert users[5] in found and len(found) <= 2  # the first may have taken "paid"


def test_namespaces_and_operation_types():
    index = Index()
    orders = subscribe(index, Subscription(namespaces=[("db", "orders")]))
    whole = subscribe(index, Subscription(namespaces=[("db", None)]))
    other = subscribe(index, Subscription(namespaces=[("other", "orders")]))
    deletes = subscribe(index, Subscription(ops=["delete"]))

    def hits(**fields):
        return set(routed(index, [ev.encode_change({"_id": {"_data": "8200"}, **fields})]))

    assert hits(operationType="insert", ns={"db": "db", "coll": "orders"}) == {orders, whole}
    assert hits(operationType="delete", ns={"db": "db", "coll": "x"}) == {whole, deletes}
    assert hits(operationType="dropDatabase", ns={"db": "db"}) == {orders, whole}
    assert hits(operationType="invalidate") == {orders, whole, other}


def test_a_row_rule_is_found_by_the_document_before_the_change_too():
    index = Index()
    rule = AccessRule({"fullDocument.owner": "alice"}, post_images=True)
    alice = subscribe(index, Subscription(access=rule))
    moved = ev.encode_change({
        "_id": {"_data": "8201"}, "operationType": "update", "ns": {"db": "db", "coll": "c"},
        "documentKey": {"_id": 1}, "fullDocument": {"_id": 1, "owner": "bob"},
        "fullDocumentBeforeChange": {"_id": 1, "owner": "alice"}})
    assert alice.select([moved]) == [moved.leave]
    assert routed(index, [moved]) == {alice: [moved]}


def test_a_row_rule_with_a_filter_is_filed_by_the_filter_and_the_rule_before():
    index = Index()
    rule = AccessRule({"fullDocument.team": "red"}, post_images=True)
    mine = [subscribe(index, Subscription(filter=compile_filter({"fullDocument.owner": f"u{n}"}),
                                          access=rule)) for n in range(50)]
    insert = change(1, fullDocument={"owner": "u3", "team": "red"})
    assert routed(index, [insert]) == {mine[3]: [insert]}


def test_discard_forgets_a_member():
    index = Index()
    alice = subscribe(index, owner("alice"))
    index.discard(alice)
    index.discard(alice)
    assert routed(index, [change(1, fullDocument={"owner": "alice"})]) == {}
    assert len(index) == 0


# -- property: routed delivery is the plain select over every subscription --------------------

@settings(max_examples=examples(400), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SUBSCRIPTIONS, min_size=1, max_size=8), batches())
def test_routed_delivery_is_select_over_every_subscription(subscriptions, batch):
    index = Index()
    for subscription in set(subscriptions):
        subscribe(index, subscription)
    found = routed(index, batch)
    for subscription in set(subscriptions):
        expected = subscription.select(batch)
        assert subscription.select(found.get(subscription, [])) == expected, subscription


def test_a_filter_on_the_pre_image_does_not_file_a_row_rule_subscription():
    # An entered event goes without its pre-image, and the filter runs on that: a condition
    # on the pre-image sees it missing, so the event's own pre-image is no key for it.
    index = Index()
    rule = AccessRule({"fullDocument.owner": "bob"}, post_images=True)
    sub = subscribe(index, Subscription(
        filter=compile_filter({"fullDocumentBeforeChange.owner": None}), access=rule))
    entered = ev.encode_change({
        "_id": {"_data": "8201"}, "operationType": "update", "ns": {"db": "db", "coll": "c"},
        "documentKey": {"_id": 1}, "fullDocument": {"_id": 1, "owner": "bob"},
        "fullDocumentBeforeChange": {"_id": 1, "owner": "alice"}})
    assert sub.select([entered]) == [entered.entered]
    assert sub in routed(index, [entered])


def test_a_path_too_costly_to_walk_leaves_its_members_to_decide():
    index = Index()
    path = "fullDocument.z." + ".".join(["0"] * 30)
    deep = subscribe(index, Subscription(filter=compile_filter({path: 1})))
    node: object = {"0": 1}
    for level in range(30):
        node = [node] if level % 2 else {"0": node}
    assert deep in routed(index, [change(1, fullDocument={"z": node})])
