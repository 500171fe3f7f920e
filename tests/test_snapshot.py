"""A live query's read: the find the relay builds from a subscription, what it refuses, how every
document read is judged, and the id where the change stream after the read begins."""

from __future__ import annotations

import uuid

import pytest
from bson import Timestamp
from bson.binary import Binary

from changerelay import snapshot
from changerelay.admission import Refusal
from changerelay.primary.tokens import HWM_TOKEN, TokenData
from changerelay.rows import AccessRule
from changerelay.subscription import Subscription, parse
from changerelay.tokens import order_key

SCOPE = (None, None)


def subscription(**values: str) -> Subscription:
    return parse(values, SCOPE)[0]


def plan(**values: str) -> snapshot.Plan:
    return snapshot.plan(subscription(**values))


def test_no_condition_on_the_document_reads_the_whole_collection():
    read = plan(ns="shop.orders")
    assert (read.db, read.coll, read.query, read.projection) == ("shop", "orders", {}, None)
    assert read.ns == "shop.orders"


def test_indexable_conditions_become_the_find_filter_and_the_rest_is_left_out():
    read = plan(ns="shop.orders", filter='{"fullDocument.status": "open", '
                '"fullDocument.total": {"$gt": 10, "$ne": 15}, '
                '"fullDocument.name": {"$regex": "^a"}, '
                '"fullDocument.tags": {"$in": ["x", "y"]}, "fullDocument.gone": {"$exists": false},'
                '"$or": [{"fullDocument.a": 1}, {"fullDocument.b": 2}]}')
    assert read.query == {"$and": [{"gone": {"$exists": False}}, {"status": {"$eq": "open"}},
                                   {"tags": {"$in": ["x", "y"]}}, {"total": {"$gt": 10}}]}


def test_one_condition_is_the_filter_itself_and_and_branches_are_read_through():
    assert plan(ns="a.b", filter='{"documentKey._id": {"$gte": 5}}').query == {
        "_id": {"$gte": 5}}
    assert plan(ns="a.b", filter='{"$and": [{"fullDocument.x": 1}, {"fullDocument.y": {"$lt": '
                '2}}]}').query == {"$and": [{"x": {"$eq": 1}}, {"y": {"$lt": 2}}]}


def test_values_that_are_documents_or_arrays_never_reach_mongodb():
    """A client's value is data: a document value (say ``{"$where": …}``) or an array is not
    passed on, only matched by the relay."""
    read = plan(ns="a.b", filter='{"fullDocument.x": {"$eq": {"$where": "sleep(1000)"}}, '
                '"fullDocument.y": [1, 2], "fullDocument.z": {"$in": [{"k": 1}]}}')
    assert read.query == {}


@pytest.mark.parametrize(("values", "named"), [
    ({"ns": "a.b", "filter": '{"operationType": "insert"}'}, "'operationType'"),
    ({"ns": "a.b", "filter": '{"updateDescription.updatedFields.x": 1}'}, "updateDescription"),
    ({"ns": "a.b", "filter": '{"$or": [{"fullDocumentBeforeChange.x": 1}, {"fullDocument.x": 1}]}'},
     "fullDocumentBeforeChange.x"),
    ({"ns": "a.b", "filter": '{"to.coll": "c"}'}, "'to.coll'"),
    ({"ns": "a.b", "ops": "insert"}, "ops"),
    ({"ns": "a.b,a.c"}, "exactly one namespace"),
    ({}, "exactly one namespace"),
    ({"ns": "a"}, "whole database 'a'"),
])
def test_what_a_snapshot_cannot_answer_is_refused_by_name(values, named):
    with pytest.raises(Refusal) as caught:
        plan(**values)
    assert caught.value.code == "snapshot_unsupported" and caught.value.status == 400
    assert named in caught.value.message


def test_a_filter_on_the_document_needs_updates_to_carry_it():
    with pytest.raises(Refusal) as caught:
        snapshot.plan(subscription(ns="a.b", filter='{"fullDocument.x": 1}'),
                      full_document="default")
    assert "FULL_DOCUMENT=default" in caught.value.message
    assert snapshot.plan(subscription(ns="a.b", filter='{"documentKey._id": 1}'),
                         full_document="default").query == {"_id": {"$eq": 1}}
    assert snapshot.plan(subscription(ns="a.b", filter='{"fullDocument.x": 1}'),
                         full_document="whenAvailable").query == {"x": {"$eq": 1}}


def test_a_pipeline_is_refused():
    with pytest.raises(Refusal) as caught:
        snapshot.plan(subscription(ns="a.b"), pipeline=True)
    assert "PIPELINE" in caught.value.message


def test_every_document_read_is_judged_by_the_whole_filter_as_its_insert_would_be():
    read = plan(ns="a.b", filter='{"fullDocument.name": {"$regex": "^al"}, '
                '"fullDocument.n": {"$ne": 2}, "ns.coll": "b", "documentKey._id": {"$lt": 9}}')
    assert read.admits({"_id": 1, "name": "alice", "n": 1})
    assert not read.admits({"_id": 1, "name": "bob", "n": 1})
    assert not read.admits({"_id": 1, "name": "alice", "n": 2})
    assert not read.admits({"_id": 10, "name": "alice", "n": 1})
    assert read.as_insert({"_id": 3}) == {"operationType": "insert", "fullDocument": {"_id": 3},
                                          "ns": {"db": "a", "coll": "b"},
                                          "documentKey": {"_id": 3}}


def test_the_row_rule_narrows_the_read_and_judges_each_document():
    rule = AccessRule({"fullDocument.owner": "alice"}, post_images=True)
    client = subscription(ns="a.b", filter='{"fullDocument.n": {"$gte": 1}}')
    read = snapshot.plan(Subscription(client.namespaces, None, client.filter, rule))
    assert read.query == {"$and": [{"n": {"$gte": 1}}, {"owner": {"$eq": "alice"}}]}
    assert read.admits({"_id": 1, "owner": "alice", "n": 1})
    assert not read.admits({"_id": 2, "owner": "bob", "n": 1})
    assert not read.admits({"_id": 3, "owner": "alice", "n": 0})


def test_a_namespace_outside_the_token_grant_is_refused():
    client = subscription(ns="a.b")
    with pytest.raises(Refusal):
        snapshot.plan(Subscription(client.namespaces, grant=[("a", "c")]))
    assert snapshot.plan(Subscription(client.namespaces, grant=[("a", None)])).coll == "b"


def test_redacted_fields_are_left_out_of_the_read():
    read = snapshot.plan(subscription(ns="a.b"), redact=("fullDocument.ssn", "fullDocument.x.y"))
    assert read.projection == {"ssn": 0, "x.y": 0}


def _event(ts: Timestamp, doc_id: int = 1) -> str:
    coll = Binary.from_uuid(uuid.UUID(int=7))
    return TokenData(ts, uuid=coll, event_id={"operationType": "insert",
                                              "documentKey": {"_id": doc_id}}).encode()["_data"]


@pytest.mark.parametrize("at", [Timestamp(1_700_000_000, 5), Timestamp(1_700_000_000, 2**32 - 1)])
def test_the_seam_starts_after_every_write_at_the_read_s_time_and_before_any_later(at):
    mark = TokenData(Timestamp(1_600_000_000, 1), token_type=HWM_TOKEN).encode()["_data"]
    seam = snapshot.after(at, mark)
    following = Timestamp(at.time, at.inc + 1) if at.inc < 2**32 - 1 else Timestamp(at.time + 1, 0)
    assert seam == TokenData(following, token_type=HWM_TOKEN).encode()["_data"]
    assert order_key(_event(at, 1)) < seam and order_key(_event(at, 99)) < seam
    assert seam < order_key(_event(following))


def test_the_plan_says_whether_the_find_filter_is_the_whole_subscription():
    assert plan(ns="a.b").exact
    assert plan(ns="a.b", filter='{"fullDocument.x": {"$gte": 1, "$lt": 5}}').exact
    for partial in ('{"fullDocument.x": {"$ne": 1}}', '{"$or": [{"fullDocument.x": 1}]}',
                    '{"fullDocument.x": {"$regex": "a"}}', '{"ns.coll": "b"}',
                    '{"fullDocument.x": [1]}'):
        assert not plan(ns="a.b", filter=partial).exact, partial


# --- what a live query is sent after its snapshot ---------------------------------------------

def change(n: int, op: str, doc: dict | None = None, *, before: dict | None = None,
           ns: str = "c"):
    from changerelay.events import encode_change

    body = {"_id": {"_data": f"82{n:016X}"}, "operationType": op,
            "ns": {"db": "a", "coll": ns}, "documentKey": {"_id": n % 100}}
    if doc is not None:
        body["fullDocument"] = doc
    if op == "update":
        body["updateDescription"] = {"updatedFields": {}, "removedFields": []}
    if before is not None:
        body["fullDocumentBeforeChange"] = before
    return encode_change(body)




def test_a_live_query_is_sent_a_leave_when_a_change_leaves_its_filter():
    live = subscription(ns="a.c", filter='{"fullDocument.n": {"$gte": 5}}').as_live()
    assert live != subscription(ns="a.c", filter='{"fullDocument.n": {"$gte": 5}}')
    events = [change(1, "insert", {"_id": 1, "n": 9}), change(2, "update", {"_id": 2, "n": 1}),
              change(3, "replace", {"_id": 3, "n": 7}), change(4, "delete"),
              change(5, "update"),  # no document (a lookup after a delete): gone from the query
              change(6, "drop"), change(107, "insert", {"_id": 7, "n": 9}, ns="other")]
    kinds = [getattr(item, "op", "leave") for item in live.select(events)]
    assert kinds == ["insert", "leave", "replace", "leave", "leave", "drop"]
    plain = subscription(ns="a.c", filter='{"fullDocument.n": {"$gte": 5}}')
    assert [item.op for item in plain.select(events)] == ["insert", "replace"]


def test_a_live_query_without_a_filter_gets_every_change_and_no_leave():
    live = subscription(ns="a.c").as_live()
    events = [change(1, "insert", {"_id": 1}), change(2, "update"), change(3, "delete")]
    assert [item.op for item in live.select(events)] == ["insert", "update", "delete"]


def test_a_live_query_under_a_row_rule_leaves_by_the_rule_and_by_its_filter():
    rule = AccessRule({"fullDocument.owner": "alice"}, post_images=True)
    client = subscription(ns="a.c", filter='{"fullDocument.n": {"$gte": 5}}')
    live = Subscription(client.namespaces, None, client.filter, rule).as_live()
    events = [change(1, "update", {"_id": 1, "owner": "bob", "n": 9},
                     before={"_id": 1, "owner": "alice", "n": 9}),    # moved away: the rule's
              change(2, "update", {"_id": 2, "owner": "alice", "n": 1},
                     before={"_id": 2, "owner": "alice", "n": 9}),    # hers, out of the filter
              change(3, "update", {"_id": 3, "owner": "bob", "n": 9}),  # never hers: nothing
              change(4, "update", {"_id": 4, "owner": "alice", "n": 9},
                     before={"_id": 4, "owner": "bob", "n": 9})]      # arrives, no pre-image
    picked = live.select(events)
    assert [getattr(item, "op", "leave") for item in picked] == ["leave", "leave", "update"]
    assert b"bob" not in picked[0].data and b"fullDocumentBeforeChange" not in picked[2].data
