"""The test primary, held to MongoDB's documented behaviour through the real PyMongo driver.

Everything here goes over TCP through ``MongoClient``/``AsyncMongoClient``, so a pass means the
driver accepted the primary's replies as a replica set's, not just that the primary agrees with
itself. Expected values come from the MongoDB manual (change events, resume, error codes).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from bson import Timestamp
from bson.int64 import Int64
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from changerelay.primary import TestPrimary
from changerelay.primary.tokens import HWM_TOKEN, TokenData, parse_token
from tests.support import drain

AWAIT_MS = 200  # short awaitData waits keep idle try_next() calls fast


@pytest.fixture
def server():
    with TestPrimary() as primary:  # fails the test if the primary logged a handler error
        yield primary


def connect(primary: TestPrimary, **kwargs) -> MongoClient:
    kwargs.setdefault("serverSelectionTimeoutMS", 5000)
    return MongoClient(primary.uri, **kwargs)


@pytest.fixture
def client(server):
    with connect(server) as c:
        yield c


@pytest.fixture
def writer(server):
    """A second client, so writes never share a connection with the stream under test."""
    with connect(server) as c:
        yield c


def assert_quiet(stream) -> None:
    """No event is pending: one full awaitData wait comes back empty."""
    assert stream.try_next() is None


def without_times(event: dict) -> dict:
    return {k: v for k, v in event.items() if k not in ("_id", "clusterTime", "wallTime")}


# --- handshake -----------------------------------------------------------------------------------

def test_hello_describes_a_replica_set_primary(server, client):
    hello = client.admin.command("hello")
    assert hello["isWritablePrimary"] is True
    assert hello["setName"] == "rs0"
    assert hello["hosts"] == [f"127.0.0.1:{server.port}"]
    assert hello["primary"] == hello["me"] == f"127.0.0.1:{server.port}"
    assert hello["minWireVersion"] == 0 and hello["maxWireVersion"] >= 17
    assert hello["logicalSessionTimeoutMinutes"] > 0
    assert isinstance(hello["$clusterTime"]["clusterTime"], Timestamp)
    assert isinstance(hello["operationTime"], Timestamp)
    legacy = client.admin.command("isMaster")
    assert legacy["ismaster"] is True and "isWritablePrimary" not in legacy
    assert client.topology_description.topology_type_name == "ReplicaSetWithPrimary"
    assert client.primary == ("127.0.0.1", server.port)


def test_unknown_command_is_command_not_found(client):
    with pytest.raises(OperationFailure) as caught:
        client.admin.command("noSuchThing")
    assert caught.value.code == 59
    assert caught.value.details["codeName"] == "CommandNotFound"


def test_replies_carry_advancing_cluster_time(client):
    first = client.db.c.database.command("ping")["operationTime"]
    client.db.c.insert_one({"x": 1})
    later = client.db.command("ping")
    assert later["operationTime"] > first
    assert later["$clusterTime"]["clusterTime"] >= later["operationTime"]


# --- data ----------------------------------------------------------------------------------------

def test_crud_round_trip(client):
    coll = client.db.people
    coll.insert_many([{"_id": 1, "name": "ada", "n": 1}, {"_id": 2, "name": "bob", "n": 1}])
    assert coll.find_one({"name": "bob"}) == {"_id": 2, "name": "bob", "n": 1}
    assert coll.update_many({"n": 1}, {"$set": {"n": 2}}).modified_count == 2
    result = coll.update_one({"name": "cy"}, {"$set": {"n": 7}}, upsert=True)
    assert result.upserted_id is not None
    assert coll.find_one({"name": "cy"})["n"] == 7
    assert coll.delete_many({"n": 2}).deleted_count == 2
    assert [d["name"] for d in coll.find()] == ["cy"]
    with pytest.raises(OperationFailure) as caught:
        coll.insert_one({"_id": result.upserted_id})
    assert caught.value.code == 11000


@pytest.mark.parametrize("command", [
    {"findAndModify": "c", "query": {}, "remove": True}, {"distinct": "c", "key": "k"},
    {"count": "c"}, {"aggregate": "c", "pipeline": [{"$group": {"_id": None}}], "cursor": {}},
])
def test_commands_no_relay_test_needs_are_refused_loudly(client, command):
    with pytest.raises(OperationFailure) as caught:
        client.db.command(command)
    assert caught.value.code in (2, 59)  # not_implemented, or "no such command"


# --- updates: MongoDB's semantics and the updateDescription its $v:2 oplog entry yields ----------
# Paths are applied as update/path_support.cpp (findLongestPrefix, createPathAt) does; what an
# update logs follows update/v2_log_builder.cpp and how a change stream reads that diff,
# pipeline/change_stream_document_diff_parser.cpp: updated fields, then created ones, per level.

def described(server, coll, before: dict, update: dict) -> tuple[dict, dict]:
    """The stored document after ``update`` and the updateDescription of its change event."""
    coll.insert_one(before)
    coll.update_one({"_id": before["_id"]}, update)
    event = server.events[-1]
    assert event["operationType"] == "update", event
    return coll.find_one({"_id": before["_id"]}), event["updateDescription"]


@pytest.mark.parametrize(("before", "update", "after", "updated", "removed"), [
    ({"a": {"x": 1}}, {"$set": {"a.b": 2}}, {"a": {"x": 1, "b": 2}}, {"a.b": 2}, []),
    ({}, {"$set": {"a.b.c": 1}}, {"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 1}}}, []),
    ({"a": {}}, {"$set": {"a.b.c": 1}}, {"a": {"b": {"c": 1}}}, {"a.b": {"c": 1}}, []),
    ({"arr": [{"x": 1}, {"x": 2}]}, {"$set": {"arr.1.x": 3}},
     {"arr": [{"x": 1}, {"x": 3}]}, {"arr.1.x": 3}, []),
    ({"arr": [{"x": 1}]}, {"$set": {"arr.0.y": 2}}, {"arr": [{"x": 1, "y": 2}]},
     {"arr.0.y": 2}, []),
    # "{$set: {'a.0.c': 1}} when the input document is {a: []}" (v2_log_builder.cpp)
    ({"arr": []}, {"$set": {"arr.0.c": 1}}, {"arr": [{"c": 1}]}, {"arr.0": {"c": 1}}, []),
    # padding: the nulls are written, only the new element is logged
    ({"arr": [1, 2]}, {"$set": {"arr.4": 5}}, {"arr": [1, 2, None, None, 5]}, {"arr.4": 5}, []),
    ({"arr": [1, 2]}, {"$set": {"arr.1": {"cvv": "x"}}}, {"arr": [1, {"cvv": "x"}]},
     {"arr.1": {"cvv": "x"}}, []),
    ({"m": [[1, 2]]}, {"$set": {"m.0.1": 3}}, {"m": [[1, 3]]}, {"m.0.1": 3}, []),
    # $push: a document without $each is the value pushed (push_node.cpp); appends log each
    # new element, a push onto an empty array logs the whole array
    ({"arr": [1]}, {"$push": {"arr": {"a": 1}}}, {"arr": [1, {"a": 1}]}, {"arr.1": {"a": 1}}, []),
    ({"arr": [1]}, {"$push": {"arr": {"$each": [2, 3]}}}, {"arr": [1, 2, 3]},
     {"arr.1": 2, "arr.2": 3}, []),
    ({"arr": []}, {"$push": {"arr": {"a": 1}}}, {"arr": [{"a": 1}]}, {"arr": [{"a": 1}]}, []),
    ({}, {"$push": {"arr": 1}}, {"arr": [1]}, {"arr": [1]}, []),
    # $unset of an array element sets it to null (unset_node.cpp), a field is removed
    ({"arr": [1, 2]}, {"$unset": {"arr.0": ""}}, {"arr": [None, 2]}, {"arr.0": None}, []),
    ({"a": {"b": 1, "c": 2}}, {"$unset": {"a.b": ""}}, {"a": {"c": 2}}, {}, ["a.b"]),
])
def test_update_paths_and_their_description(server, client, before, update, after, updated,
                                            removed):
    doc, description = described(server, client.db.u, {"_id": 1, **before}, update)
    assert doc == {"_id": 1, **after}
    assert description == {"updatedFields": updated, "removedFields": removed,
                           "truncatedArrays": []}


def test_updated_fields_list_updates_before_creations(server, client):
    doc, description = described(server, client.db.u, {"_id": 1, "old": 1},
                                 {"$set": {"new": 2, "old": 3}})
    assert list(doc) == ["_id", "old", "new"]
    assert list(description["updatedFields"]) == ["old", "new"]


def test_fields_are_created_in_lexicographic_then_numeric_order(server, client):
    # "update operators process document fields with string-based names in lexicographic order.
    # Fields with numeric names are processed in numeric order."
    # https://www.mongodb.com/docs/manual/reference/operator/update/#behavior
    # (update/path_support.h cmpPathsAndArrayIndexes: a number and a string compare as strings)
    doc, _ = described(server, client.db.u, {"_id": 1, "m": {}},
                       {"$set": {"m.10": 1, "m.b": 1, "m.9": 2, "m.A": 1, "z": 1, "b": 1}})
    assert list(doc) == ["_id", "m", "b", "z"] and list(doc["m"]) == ["9", "10", "A", "b"]


@pytest.mark.parametrize(("before", "update", "code", "message"), [
    ({"password": "x"}, {"$set": {"password.hash": "y"}}, 28,
     "Cannot create field 'hash' in element {password: \"x\"}"),
    ({"arr": [1, 2]}, {"$set": {"arr.x": 1}}, 28,
     "Cannot create field 'x' in element {arr: [ 1, 2 ]}"),
    ({"arr": [1]}, {"$set": {"arr.0.x": 1}}, 28, "Cannot create field 'x' in element {0: 1}"),
    ({"a": {"b": 5}}, {"$set": {"a.b.c": 1}}, 28, "Cannot create field 'c' in element {b: 5}"),
    ({}, {"$set": {"a": 1, "a.b": 2}}, 40,
     "Updating the path 'a.b' would create a conflict at 'a'"),
    ({"n": 1}, {"$push": {"n": 2}}, 2,
     "The field 'n' must be an array but is of type int in document {_id: 1}"),
    ({"arr": []}, {"$set": {"arr.1500001": 1}}, 10, "can't backfill more than 1500000 elements"),
])
def test_update_errors_are_mongodbs(server, client, before, update, code, message):
    coll = client.db.u
    coll.insert_one({"_id": 1, **before})
    with pytest.raises(OperationFailure) as caught:
        coll.update_one({"_id": 1}, update)
    assert caught.value.code == code and message in str(caught.value)
    assert coll.find_one({"_id": 1}) == {"_id": 1, **before}  # nothing was applied
    assert [e["operationType"] for e in server.events] == ["insert"]


# --- change events -------------------------------------------------------------------------------

def test_collection_stream_delivers_every_crud_event_exactly(server, client, writer):
    coll = writer.db.things
    with client.db.things.watch(max_await_time_ms=AWAIT_MS) as stream:
        coll.insert_one({"_id": 1, "a": 1, "tags": ["x"], "gone": True})
        coll.update_one({"_id": 1}, {"$set": {"a": 2, "sub.b": 3}, "$unset": {"gone": ""},
                                     "$push": {"tags": "y"}})
        coll.update_one({"_id": 1}, {"$set": {"a": 7}})
        coll.replace_one({"_id": 1}, {"z": 1})
        coll.delete_one({"_id": 1})
        events = drain(stream, 5)
    ns = {"db": "db", "coll": "things"}
    assert [without_times(e) for e in events] == [
        {"operationType": "insert", "fullDocument": {"_id": 1, "a": 1, "tags": ["x"], "gone": True},
         "ns": ns, "documentKey": {"_id": 1}},
        {"operationType": "update", "ns": ns, "documentKey": {"_id": 1},
         "updateDescription": {"updatedFields": {"a": 2, "sub": {"b": 3}, "tags.1": "y"},
                               "removedFields": ["gone"], "truncatedArrays": []}},
        {"operationType": "update", "ns": ns, "documentKey": {"_id": 1},
         "updateDescription": {"updatedFields": {"a": 7}, "removedFields": [],
                               "truncatedArrays": []}},
        {"operationType": "replace", "fullDocument": {"_id": 1, "z": 1}, "ns": ns,
         "documentKey": {"_id": 1}},
        {"operationType": "delete", "ns": ns, "documentKey": {"_id": 1}},
    ]
    assert events == server.events  # what the client got is the log, field for field
    assert list(events[0]) == ["_id", "operationType", "clusterTime", "wallTime", "fullDocument",
                               "ns", "documentKey"]


def test_tokens_are_unique_and_sort_in_event_order(server, writer):
    coll = writer.db.c
    coll.insert_one({"_id": 1})
    coll.update_one({"_id": 1}, {"$set": {"a": 1}})
    coll.drop()
    writer.db.d.insert_one({"_id": 1})
    writer.drop_database("db")
    tokens = server.tokens()
    # insert, update, drop + invalidate, insert, drop + invalidate, dropDatabase + invalidate
    assert len(tokens) == len(set(tokens)) == 9
    assert tokens == sorted(tokens)
    assert all(t.startswith("82") and t == t.upper() for t in tokens)
    times = [e["clusterTime"] for e in server.events]
    assert times == sorted(times)


def test_update_that_changes_nothing_emits_no_event(client, writer):
    coll = writer.db.c
    coll.insert_one({"_id": 1, "a": 1})
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        assert coll.update_one({"_id": 1}, {"$set": {"a": 1}}).modified_count == 0
        coll.insert_one({"_id": 2})
        assert drain(stream, 1)[0]["documentKey"] == {"_id": 2}


def test_update_lookup_returns_the_current_document(client, writer):
    coll = writer.db.c
    coll.insert_one({"_id": 1, "v": 0})
    with client.db.c.watch(full_document="updateLookup", max_await_time_ms=AWAIT_MS) as stream:
        coll.update_one({"_id": 1}, {"$set": {"v": 1}})
        coll.update_one({"_id": 1}, {"$set": {"v": 2}})
        coll.delete_one({"_id": 1})
        first, second, _ = drain(stream, 3)
    # The lookup happens when the event is returned, by which time the document is gone.
    assert first["fullDocument"] is None and second["fullDocument"] is None
    with client.db.c.watch(full_document="updateLookup", max_await_time_ms=AWAIT_MS) as stream:
        coll.insert_one({"_id": 2, "v": 0})
        coll.update_one({"_id": 2}, {"$set": {"v": 1}})
        assert drain(stream, 2)[1]["fullDocument"] == {"_id": 2, "v": 1}


def test_post_and_pre_images_need_the_collection_option(client, writer):
    coll = writer.db.c
    coll.insert_one({"_id": 1, "v": 0})
    watch = client.db.c.watch
    with watch(full_document="whenAvailable", max_await_time_ms=AWAIT_MS) as stream:
        coll.update_one({"_id": 1}, {"$set": {"v": 1}})
        assert drain(stream, 1)[0]["fullDocument"] is None
    with watch(full_document="required", max_await_time_ms=AWAIT_MS) as stream:
        coll.update_one({"_id": 1}, {"$set": {"v": 2}})
        with pytest.raises(OperationFailure) as caught:
            drain(stream, 1)
    assert caught.value.code == 47 and "post-image was not found" in str(caught.value)

    writer.db.command("collMod", "c", changeStreamPreAndPostImages={"enabled": True})
    with watch(full_document="required", full_document_before_change="required",
               max_await_time_ms=AWAIT_MS) as stream:
        coll.update_one({"_id": 1}, {"$set": {"v": 3}})
        coll.update_one({"_id": 1}, {"$set": {"v": 4}})
        first, second = drain(stream, 2)
    assert first["fullDocument"] == {"_id": 1, "v": 3}  # the image at the time, not a lookup
    assert first["fullDocumentBeforeChange"] == {"_id": 1, "v": 2}
    assert second["fullDocumentBeforeChange"] == {"_id": 1, "v": 3}


def test_pipeline_stages_filter_and_reshape(client, writer):
    pipeline = [{"$match": {"$or": [{"operationType": "delete"},
                                    {"fullDocument.kind": {"$in": ["a", "b"]}}]}},
                {"$project": {"operationType": 1, "documentKey": 1}}]
    with client.db.c.watch(pipeline, max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_many([{"_id": 1, "kind": "a"}, {"_id": 2, "kind": "z"}])
        writer.db.c.delete_one({"_id": 2})
        events = drain(stream, 2)
    assert [(list(e), e["documentKey"]["_id"]) for e in events] == [
        (["_id", "operationType", "documentKey"], 1), (["_id", "operationType", "documentKey"], 2)]


# --- change stream pipelines: stages and expressions as MongoDB evaluates them ------------------
# Stages: exec/projection_node.cpp, exec/add_fields_projection_executor.cpp and
# query/projection_parser.cpp (cited in changerelay/primary.py); operators: their manual pages.

def piped(client, writer, pipeline: list, document: dict, update: dict | None = None) -> list:
    """The events of an insert of ``document`` (and an ``update`` of it) through ``pipeline``."""
    with client.db.c.watch(pipeline, max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_one(document)
        if update is not None:
            writer.db.c.update_one({"_id": document["_id"]}, update)
        return drain(stream, 1 if update is None else 2)


def test_a_dotted_set_creates_its_missing_parent_even_for_remove(client, writer):
    insert, update = piped(client, writer, [{"$set": {"updateDescription.updatedFields": {
        "$cond": [{"$eq": [{"$type": "$updateDescription.updatedFields"}, "object"]},
                  {"$literal": {"redacted": True}}, "$$REMOVE"]}}}],
        {"_id": 1, "a": 1}, {"$set": {"a": 2}})
    assert insert["updateDescription"] == {}  # the parent is created, the field is not
    assert update["updateDescription"] == {"updatedFields": {"redacted": True},
                                           "removedFields": [], "truncatedArrays": []}


def test_a_top_level_set_to_missing_adds_nothing(client, writer):
    [insert] = piped(client, writer, [{"$set": {"updateDescription": "$updateDescription",
                                                "gone": "$$REMOVE"}}], {"_id": 1})
    assert "updateDescription" not in insert and "gone" not in insert


def test_a_computed_field_goes_into_every_element_and_replaces_scalars(client, writer):
    [insert] = piped(client, writer, [{"$set": {"fullDocument.a.b": 1, "fullDocument.arr.c": 1}}],
                     {"_id": 1, "a": 5, "arr": [1, {"b": 2}, [3, {"d": 4}]]})
    assert insert["fullDocument"] == {
        "_id": 1, "a": {"b": 1}, "arr": [{"c": 1}, {"b": 2, "c": 1}, [{"c": 1}, {"d": 4, "c": 1}]]}


def test_set_with_a_nested_object_names_sub_fields(client, writer):
    [insert] = piped(client, writer, [{"$set": {"fullDocument": {"b": {"$literal": 2}, "e": {}}}}],
                     {"_id": 1, "a": 1})
    assert insert["fullDocument"] == {"_id": 1, "a": 1, "b": 2, "e": {}}


def test_unset_walks_arrays_and_nested_arrays(client, writer):
    [insert] = piped(client, writer, [{"$unset": "fullDocument.cards.cvv"}],
                     {"_id": 1, "cards": [{"cvv": 1, "n": 1}, [{"cvv": 2, "n": 2}], 7, None]})
    assert insert["fullDocument"] == {"_id": 1, "cards": [{"n": 1}, [{"n": 2}], 7, None]}


def test_project_inclusion_keeps_named_paths_through_arrays(client, writer):
    [insert] = piped(client, writer, [{"$project": {
        "fullDocument.cards.n": 1, "operationType": 1, "kind": {"$literal": "x"}}}],
        {"_id": 1, "x": 1, "cards": [{"cvv": 1, "n": 1}, [{"cvv": 2, "n": 2}], 7]})
    assert list(insert) == ["_id", "operationType", "fullDocument", "kind"]
    assert insert["fullDocument"] == {"cards": [{"n": 1}, [{"n": 2}]]}  # the scalar is dropped


@pytest.mark.parametrize(("stage", "code", "message"), [
    ({"$unset": ["fullDocument.a", "fullDocument.a.b"]}, 31249,
     "Invalid $unset :: caused by :: Path collision at fullDocument.a.b remaining portion a.b"),
    ({"$unset": ["fullDocument.a.b", "fullDocument.a"]}, 31250,
     "Invalid $unset :: caused by :: Path collision at fullDocument.a"),
    ({"$unset": ["x", "x"]}, 31250, "Invalid $unset :: caused by :: Path collision at x"),
    ({"$project": {"a": 0, "a.b": 0}}, 31249, "Path collision at a.b remaining portion b"),
    ({"$project": {"a": 1, "b": 0}}, 31254, "Cannot do exclusion on field b in inclusion"),
    ({"$set": {"a": 1, "a.b": 2}}, 40176, "Invalid $set :: caused by :: specification contains "
                                          "two conflicting paths. Cannot specify both 'a.b' and "
                                          "'a'"),
    ({"$unset": []}, 31119, "$unset specification must be a string or an array with at least"),
    ({"$set": {"x": {"$function": {}}}}, 2, "does not implement the expression operator $function"),
])
def test_stages_a_server_refuses_fail_when_the_stream_opens(client, stage, code, message):
    with pytest.raises(OperationFailure) as caught:
        client.db.c.watch([stage])
    assert caught.value.code == code and message in str(caught.value)


@pytest.mark.parametrize(("expr", "expected"), [
    ({"$switch": {"branches": [{"case": False, "then": 1}, {"case": "$fullDocument.a", "then": 2}],
                  "default": 3}}, 2),
    ({"$switch": {"branches": [{"case": "$none", "then": 1}], "default": 3}}, 3),
    ({"$regexMatch": {"input": "cards.1.cvv", "regex": r"^cards(\.[0-9]+)*\.cvv(\.|$)"}}, True),
    ({"$regexMatch": {"input": "cardsx", "regex": r"^cards(\.|$)"}}, False),
    ({"$regexMatch": {"input": "$none", "regex": "x"}}, False),
    ({"$setField": {"field": "b", "input": {"a": 1, "b": 1}, "value": 2}}, {"a": 1, "b": 2}),
    ({"$setField": {"field": "a", "input": {"a": 1, "b": 1}, "value": "$$REMOVE"}}, {"b": 1}),
    ({"$setField": {"field": "a.b", "input": {}, "value": 1}}, {"a.b": 1}),
    ({"$setField": {"field": "a", "input": "$none", "value": 1}}, None),
    ({"$unsetField": {"field": "a", "input": {"$literal": {"a": 1, "b": 2}}}}, {"b": 2}),
    ({"$getField": {"field": "v", "input": {"k": 1, "v": 2}}}, 2),
    ({"$getField": "operationType"}, "insert"),
    ({"$getField": {"field": "a", "input": None}}, None),
    ({"$isArray": ["$fullDocument.arr"]}, True),
    ({"$isArray": "$fullDocument.a"}, False),
    ({"$arrayElemAt": ["$fullDocument.arr", -1]}, 3),
    ({"$arrayElemAt": [{"$objectToArray": {"k": 1, "n": 2}}, 1]}, {"k": "n", "v": 2}),
    ({"$let": {"vars": {"x": "$fullDocument.a"}, "in": {"$eq": ["$$x", 1]}}}, True),
    ({"$arrayToObject": [[["a.b", 1], ["c", 2]]]}, {"a.b": 1, "c": 2}),
    ({"$map": {"input": "$fullDocument.arr", "as": "n",
               "in": {"$cond": [{"$eq": ["$$n", 2]}, "$$REMOVE", "$$n"]}}}, [1, None, 3]),
    ({"$filter": {"input": "$fullDocument.arr", "cond": {"$ne": ["$$this", 2]}}}, [1, 3]),
])
def test_expression_operators(client, writer, expr, expected):
    [insert] = piped(client, writer, [{"$replaceWith": {"_id": "$_id", "out": expr}}],
                     {"_id": 1, "a": 1, "arr": [1, 2, 3]})
    assert insert["out"] == expected


@pytest.mark.parametrize("expr", [
    {"$getField": {"field": "a", "input": {"b": 1}}},
    {"$arrayElemAt": ["$fullDocument.arr", 3]},
])
def test_expressions_that_evaluate_to_missing(client, writer, expr):
    [insert] = piped(client, writer, [{"$replaceWith": {"_id": "$_id", "out": expr}}],
                     {"_id": 1, "arr": [1, 2, 3]})
    assert "out" not in insert


@pytest.mark.parametrize(("expr", "code"), [
    ({"$switch": {"branches": [{"case": False, "then": 1}]}}, 40066),
    ({"$setField": {"field": "a", "input": 5, "value": 1}}, 4161105),
    ({"$regexMatch": {"input": 5, "regex": "x"}}, 51104),
])
def test_expression_errors_fail_the_stream(client, writer, expr, code):
    with client.db.c.watch([{"$set": {"out": expr}}], max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_one({"_id": 1})
        with pytest.raises(OperationFailure) as caught:
            drain(stream, 1)
    assert caught.value.code == code


def test_pipeline_that_drops_the_resume_token_fails_the_stream(client, writer):
    with client.db.c.watch([{"$project": {"_id": 0}}], max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_one({"_id": 1})
        with pytest.raises(OperationFailure) as caught:
            drain(stream, 1)
    assert caught.value.code == 280
    assert caught.value.has_error_label("NonResumableChangeStreamError")


def test_stages_change_streams_forbid(client):
    with pytest.raises(OperationFailure) as caught:
        client.db.c.watch([{"$group": {"_id": None}}])
    assert caught.value.code == 20
    assert str(caught.value).startswith("$group is not permitted in a $changeStream pipeline")


# --- invalidation --------------------------------------------------------------------------------

def test_drop_invalidates_only_the_collection_stream(client, writer):
    writer.db.c.insert_one({"_id": 0})
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as coll_stream, \
            client.db.watch(max_await_time_ms=AWAIT_MS) as db_stream, \
            client.watch(max_await_time_ms=AWAIT_MS) as all_stream:
        writer.db.c.insert_one({"_id": 1})
        writer.db.c.drop()
        writer.db.other.insert_one({"_id": 2})
        assert [e["operationType"] for e in drain(coll_stream, 3)] == [
            "insert", "drop", "invalidate"]
        assert not coll_stream.alive
        for stream in (db_stream, all_stream):
            assert [e["operationType"] for e in drain(stream, 3)] == ["insert", "drop", "insert"]
            assert_quiet(stream)
            assert stream.alive


def test_invalidate_event_shape_and_token(server, client, writer):
    writer.db.c.insert_one({"_id": 0})
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.drop()
        drop, invalidate = drain(stream, 2)
    assert list(invalidate) == ["_id", "operationType", "clusterTime", "wallTime"]
    assert invalidate["clusterTime"] == drop["clusterTime"]
    assert invalidate["_id"]["_data"] > drop["_id"]["_data"]
    assert server.events[-1] == invalidate


def test_rename_event_then_invalidate(client, writer):
    writer.db.src.insert_one({"_id": 1})
    with client.db.src.watch(max_await_time_ms=AWAIT_MS) as stream:
        writer.admin.command("renameCollection", "db.src", to="db.dst")
        rename, invalidate = drain(stream, 2)
    assert without_times(rename) == {"operationType": "rename",
                                     "ns": {"db": "db", "coll": "src"},
                                     "to": {"db": "db", "coll": "dst"}}
    assert invalidate["operationType"] == "invalidate"
    assert writer.db.dst.find_one() == {"_id": 1}


def test_drop_database_at_every_scope(client, writer):
    writer.db.a.insert_one({"_id": 1})
    writer.db.b.insert_one({"_id": 1})
    with client.db.a.watch(max_await_time_ms=AWAIT_MS) as coll_stream, \
            client.db.watch(max_await_time_ms=AWAIT_MS) as db_stream, \
            client.watch(max_await_time_ms=AWAIT_MS) as all_stream:
        writer.drop_database("db")
        writer.elsewhere.c.insert_one({"_id": 1})
        assert [(e["operationType"], e["ns"]) for e in drain(coll_stream, 1)] == [
            ("drop", {"db": "db", "coll": "a"})]
        assert drain(coll_stream, 1)[0]["operationType"] == "invalidate"
        assert [(e["operationType"], e.get("ns")) for e in drain(db_stream, 4)] == [
            ("drop", {"db": "db", "coll": "a"}), ("drop", {"db": "db", "coll": "b"}),
            ("dropDatabase", {"db": "db"}), ("invalidate", None)]
        assert [(e["operationType"], e["ns"]) for e in drain(all_stream, 4)] == [
            ("drop", {"db": "db", "coll": "a"}), ("drop", {"db": "db", "coll": "b"}),
            ("dropDatabase", {"db": "db"}), ("insert", {"db": "elsewhere", "coll": "c"})]


def test_start_after_an_invalidate_but_not_resume_after(client, writer):
    writer.db.c.insert_one({"_id": 0})
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.drop()
        invalidate = drain(stream, 2)[1]
    with pytest.raises(OperationFailure) as caught:
        client.db.c.watch(resume_after=invalidate["_id"])
    assert caught.value.code == 260
    assert "not allowed from an invalidate notification" in str(caught.value)
    with client.db.c.watch(start_after=invalidate["_id"], max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_one({"_id": "again"})
        assert drain(stream, 1)[0]["documentKey"] == {"_id": "again"}


# --- resuming ------------------------------------------------------------------------------------

def test_resume_after_replays_what_followed(client, writer):
    writer.db.c.insert_many([{"_id": i} for i in range(5)])
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_many([{"_id": i} for i in range(5, 10)])
        seen = drain(stream, 5)
    with client.db.c.watch(resume_after=seen[1]["_id"], max_await_time_ms=AWAIT_MS) as stream:
        assert [e["documentKey"]["_id"] for e in drain(stream, 3)] == [7, 8, 9]
        assert_quiet(stream)


def test_start_at_operation_time_includes_that_time(server, client, writer):
    writer.db.c.insert_many([{"_id": i} for i in range(3)])
    at = server.events[1]["clusterTime"]
    with client.db.c.watch(start_at_operation_time=at, max_await_time_ms=AWAIT_MS) as stream:
        assert [e["documentKey"]["_id"] for e in drain(stream, 2)] == [1, 2]


def test_forgotten_history_is_change_stream_history_lost(server, client, writer):
    writer.db.c.insert_many([{"_id": i} for i in range(4)])
    first, *_, last = [{"_data": t} for t in server.tokens()]
    server.forget_history(keep_last=1)
    with pytest.raises(OperationFailure) as caught:
        client.db.c.watch(resume_after=first)
    assert caught.value.code == 286
    assert caught.value.details["codeName"] == "ChangeStreamHistoryLost"
    assert str(caught.value).startswith(
        "Resume of change stream was not possible, as the resume point may no longer be in the "
        "oplog.")
    with client.db.c.watch(resume_after=last, max_await_time_ms=AWAIT_MS) as stream:
        assert_quiet(stream)  # resuming from what is kept works


def test_a_new_primary_has_none_of_the_old_ones_history():
    with TestPrimary() as old, connect(old) as c:
        c.db.c.insert_one({"_id": 1})
        token = {"_data": old.tokens()[-1]}
    with TestPrimary(port=old.port) as new, connect(new) as c:
        with pytest.raises(OperationFailure) as caught:
            c.db.c.watch(resume_after=token)
        assert caught.value.code == 286


def test_open_stream_that_fell_behind_loses_history(server, client, writer):
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_many([{"_id": i} for i in range(3)])
        server.forget_history()
        with pytest.raises(OperationFailure) as caught:
            drain(stream, 1)
    assert caught.value.code == 286
    assert server.change_streams_opened == 1  # not resumable: the driver did not retry


def test_history_limit_rolls_the_oplog():
    with TestPrimary(history_limit=3) as small, connect(small) as c:
        c.db.c.insert_many([{"_id": i} for i in range(5)])
        assert [e["documentKey"]["_id"] for e in small.events] == [2, 3, 4]


@pytest.mark.parametrize(("data", "code"), [
    ("not hex", 9), (7, 40647), ("", 40649), ("FF00", 50811), ("8200", 50811)])
def test_malformed_resume_tokens(client, data, code):
    with pytest.raises(OperationFailure) as caught:
        client.db.c.watch(resume_after={"_data": data})
    assert caught.value.code == code


def test_token_from_another_stream_is_not_found(server, client, writer):
    writer.db.other.insert_one({"_id": 1})
    at = server.events[0]["clusterTime"]
    with client.db.other.watch(start_at_operation_time=at) as stream:
        foreign = stream.try_next()["_id"]
    writer.db.c.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as caught:
        client.db.c.watch(resume_after=foreign)
    assert caught.value.code == 280


@pytest.mark.parametrize(("key", "code"), [
    (Int64(2 ** 40 + 7), 280),  # decodes as the int32 7: the real event sorts after it
    (1.5, 50810),  # a fraction read as an int32: "KeyString format error: Expected type Decimal."
    (Int64(5), None),  # decodes as the int32 5, which compares equal to NumberLong(5)
])
def test_resuming_needs_the_type_bits_mongodb_wrote(client, writer, key, code):
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_many([{"_id": key}, {"_id": "next"}])
        token = drain(stream, 2)[0]["_id"]
    assert set(token) == {"_data", "_typeBits"}
    with client.db.c.watch(resume_after=token, max_await_time_ms=AWAIT_MS) as whole:
        assert drain(whole, 1)[0]["documentKey"] == {"_id": "next"}
    alone = {"_data": token["_data"]}
    if code is None:
        with client.db.c.watch(resume_after=alone, max_await_time_ms=AWAIT_MS) as stream:
            assert drain(stream, 1)[0]["documentKey"] == {"_id": "next"}
        return
    with pytest.raises(OperationFailure) as caught:
        client.db.c.watch(resume_after=alone)
    assert caught.value.code == code


def test_writes_committed_while_a_stream_opens_come_in_its_first_batch(server, client, writer):
    gate = server.hold_next_open()
    opened: list = []
    opening = threading.Thread(
        target=lambda: opened.append(client.db.c.watch(max_await_time_ms=AWAIT_MS)))
    opening.start()
    gate.wait_reached()  # the start time is picked; the scan waits
    writer.db.c.insert_many([{"_id": 1}, {"_id": 2}])
    gate.release()
    opening.join(timeout=10)
    with opened[0] as stream:
        assert stream.resume_token is None  # PyMongo: none until the first batch is iterated
        assert [e["documentKey"]["_id"] for e in drain(stream, 2)] == [1, 2]
        assert stream.resume_token == server.events[-1]["_id"]


# --- transactions and batched deletes: several events, one oplog entry ---------------------------

def test_a_transaction_commits_as_one_entry_with_its_session(server, client, writer):
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        with writer.start_session() as session:
            lsid = session.session_id
            with session.start_transaction():
                writer.db.c.insert_one({"_id": 1}, session=session)
                writer.db.c.update_one({"_id": 1}, {"$set": {"a": 1}}, session=session)
                writer.db.other.insert_one({"_id": 9}, session=session)
                writer.db.c.delete_one({"_id": 1}, session=session)
                assert server.events == []  # nothing is logged before the commit
        events = drain(stream, 3)
    assert [e["operationType"] for e in events] == ["insert", "update", "delete"]
    assert len({e["clusterTime"] for e in events}) == 1
    assert [parse_token(e["_id"]).txn_op_index for e in events] == [0, 1, 3]  # 2: other coll
    assert all(list(e)[:3] == ["txnNumber", "lsid", "_id"] for e in events)
    assert all(e["lsid"] == lsid and isinstance(e["txnNumber"], int) for e in events)


def test_an_aborted_transaction_leaves_no_trace(server, writer):
    writer.db.c.insert_one({"_id": 0})
    with writer.start_session() as session:
        session.start_transaction()
        writer.db.c.insert_one({"_id": 1}, session=session)
        writer.db.c.delete_one({"_id": 0}, session=session)
        session.abort_transaction()
    assert [d["_id"] for d in writer.db.c.find()] == [0]
    assert [e["operationType"] for e in server.events] == ["insert"]


def test_a_multi_delete_is_logged_in_batches_without_a_session(client, writer):
    writer.db.c.insert_many([{"_id": i} for i in range(150)])
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.delete_many({})
        events = drain(stream, 150)
    times = [e["clusterTime"] for e in events]
    assert len(set(times[:100])) == 1 and len(set(times[100:])) == 1 and times[0] < times[100]
    assert [parse_token(e["_id"]).txn_op_index for e in events] == [*range(100), *range(50)]
    assert all("lsid" not in e and "txnNumber" not in e for e in events)


def test_insert_many_gives_each_document_its_own_time(server, writer):
    writer.db.c.insert_many([{"_id": i} for i in range(3)])
    assert len({e["clusterTime"] for e in server.events}) == 3


@pytest.mark.parametrize("group", ["transaction", "delete_many"])
def test_resuming_inside_a_group_loses_and_repeats_nothing(client, writer, group):
    if group == "delete_many":
        writer.db.c.insert_many([{"_id": i} for i in range(5)])
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        if group == "delete_many":
            writer.db.c.delete_many({})
        else:
            with writer.start_session() as session, session.start_transaction():
                for i in range(5):
                    writer.db.c.insert_one({"_id": i}, session=session)
        events = drain(stream, 5)
    for middle in range(5):
        with client.db.c.watch(resume_after=events[middle]["_id"],
                               max_await_time_ms=AWAIT_MS) as again:
            assert drain(again, 4 - middle) == events[middle + 1:]
            assert again.try_next() is None


# --- events over 16 MB ---------------------------------------------------------------------------

BIG = "x" * (9 * 1024 * 1024)  # a pre- and a post-image of this size make a 18 MB event


@pytest.fixture
def big_replace(writer):
    """A replace whose event, with its pre-image, is over 16 MB; an insert after it."""
    writer.db.create_collection("c", changeStreamPreAndPostImages={"enabled": True})
    writer.db.c.insert_one({"_id": 1, "s": BIG})

    def write():
        writer.db.c.replace_one({"_id": 1}, {"s": BIG + "y"})
        writer.db.c.insert_one({"_id": 2})
    return write


def test_an_event_over_16mb_fails_the_stream_at_every_reopen(client, big_replace):
    options = {"full_document_before_change": "required", "max_await_time_ms": AWAIT_MS}
    with client.db.c.watch(**options) as stream:
        big_replace()
        with pytest.raises(OperationFailure) as caught:
            drain(stream, 1)
        token = stream.resume_token
    assert caught.value.code == 10334 and "BSONObj size: " in str(caught.value)
    for _ in range(2):
        with pytest.raises(OperationFailure) as again:
            client.db.c.watch(resume_after=token, **options)
        assert again.value.code == 10334


def test_split_large_event_returns_fragments_and_resumes_between_them(server, client,
                                                                      big_replace):
    options = {"full_document_before_change": "required", "max_await_time_ms": AWAIT_MS}
    split = [{"$changeStreamSplitLargeEvent": {}}]
    with client.db.c.watch(split, **options) as stream:
        big_replace()
        fragments = drain(stream, 2, timeout=20)
        after = drain(stream, 1)[0]
    assert [f["splitEvent"] for f in fragments] == [{"fragment": 1, "of": 2},
                                                    {"fragment": 2, "of": 2}]
    assert [parse_token(f["_id"]).fragment for f in fragments] == [0, 1]
    # fields go by (size, name): the small ones and fullDocument (its name is 12 bytes shorter,
    # its value one longer) fill the first fragment, fullDocumentBeforeChange the second
    assert "fullDocument" in fragments[0] and "fullDocumentBeforeChange" in fragments[1]
    whole = {k: v for f in fragments for k, v in f.items() if k not in ("_id", "splitEvent")}
    replace = server.events[-2]
    assert whole == {**{k: v for k, v in replace.items() if k != "_id"},
                     "fullDocumentBeforeChange": {"_id": 1, "s": BIG}}
    assert after["documentKey"] == {"_id": 2}
    with client.db.c.watch(split, resume_after=fragments[0]["_id"], **options) as again:
        assert drain(again, 2, timeout=20) == [fragments[1], after]


def test_split_large_event_must_be_the_last_stage(client):
    with pytest.raises(OperationFailure) as caught:
        client.db.c.watch([{"$changeStreamSplitLargeEvent": {}}, {"$match": {}}])
    assert caught.value.code == 7182802


# --- getMore: awaitData, postBatchResumeToken, cursors -------------------------------------------

def test_blocked_get_more_wakes_on_insert_from_another_client(server, client, writer):
    received: list[tuple[float, dict]] = []
    with client.db.c.watch(max_await_time_ms=10_000) as stream:
        def read():
            event = stream.next()
            received.append((time.monotonic(), event))

        reader = threading.Thread(target=read)
        reader.start()
        server.wait_for(lambda: server.getmores_waiting == 1)
        inserting = time.monotonic()
        writer.db.c.insert_one({"_id": 1})
        reader.join(timeout=5)
    assert received, "the blocked getMore never returned"
    woke_at, event = received[0]
    assert event["documentKey"] == {"_id": 1}
    latency = woke_at - inserting
    assert latency < 0.5, f"woke {latency:.3f} s after the insert began"  # not the 10 s maxTimeMS


def test_get_more_waits_max_time_ms_when_idle(client):
    with client.db.c.watch(max_await_time_ms=300) as stream:
        began = time.monotonic()
        assert stream.try_next() is None
        assert 0.25 <= time.monotonic() - began < 2


def test_post_batch_resume_token_advances_only_when_the_oplog_moves(server, client, writer):
    """plan_executor_pipeline.cpp: the postBatchResumeToken becomes a high-water mark at the
    newest oplog time when that is past the last event returned - and not otherwise."""
    writer.db.c.insert_one({"_id": 0})
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        first = stream.resume_token
        start = server.events[-1]["clusterTime"]
        assert parse_token(first) == TokenData(Timestamp(start.time, start.inc + 1),
                                               token_type=HWM_TOKEN)  # one tick past the oplog
        assert stream.try_next() is None
        assert stream.resume_token == first  # idle: the oplog did not move
        writer.db.elsewhere.insert_many([{"_id": 1}, {"_id": 2}])  # another collection's events
        assert stream.try_next() is None
        after = stream.resume_token
    assert parse_token(after) == TokenData(server.events[-1]["clusterTime"], token_type=HWM_TOKEN)
    assert after["_data"] > first["_data"]
    with client.db.c.watch(resume_after=after, max_await_time_ms=AWAIT_MS) as again:
        writer.db.c.insert_one({"_id": 3})
        assert drain(again, 1)[0]["documentKey"] == {"_id": 3}


@pytest.mark.parametrize("interval", [0.3, None])
def test_an_idle_primary_writes_a_noop_every_interval(interval):
    """repl/noop_writer.cpp and periodicNoopIntervalSecs: an idle stream's high-water mark moves
    only with the oplog, which on an idle primary moves by its periodic no-op."""
    with TestPrimary(noop_interval=interval) as primary, connect(primary) as c:
        with c.db.c.watch(max_await_time_ms=1000) as stream:
            first = stream.resume_token
            assert stream.try_next() is None  # one full 1 s wait: 3 intervals of 0.3 s
            later = stream.resume_token
        assert primary.events == []
    if interval is None:
        assert later == first
    else:
        assert later["_data"] > first["_data"]
        assert parse_token(later).token_type == HWM_TOKEN


def test_batches_respect_batch_size_and_report_their_last_token(server, client, writer):
    writer.db.c.insert_many([{"_id": i} for i in range(5)])
    start = {"startAtOperationTime": server.events[0]["clusterTime"]}
    reply = client.db.command("aggregate", "c", pipeline=[{"$changeStream": start}],
                              cursor={"batchSize": 2})["cursor"]
    tokens = server.tokens()
    assert [e["_id"]["_data"] for e in reply["firstBatch"]] == tokens[:2]
    assert reply["postBatchResumeToken"]["_data"] == tokens[1]
    more = client.db.command("getMore", reply["id"], collection="c", batchSize=2)["cursor"]
    assert [e["_id"]["_data"] for e in more["nextBatch"]] == tokens[2:4]
    assert more["postBatchResumeToken"]["_data"] == tokens[3]
    last = client.db.command("getMore", reply["id"], collection="c", maxTimeMS=50)["cursor"]
    assert [e["_id"]["_data"] for e in last["nextBatch"]] == tokens[4:]
    assert last["postBatchResumeToken"]["_data"] >= tokens[4]


def test_killed_cursor_is_cursor_not_found(client):
    reply = client.db.command("aggregate", "c", pipeline=[{"$changeStream": {}}], cursor={})
    cursor_id = reply["cursor"]["id"]
    assert reply["cursor"]["ns"] == "db.c" and "postBatchResumeToken" in reply["cursor"]
    killed = client.db.command("killCursors", "c", cursors=[cursor_id])
    assert killed["cursorsKilled"] == [cursor_id]
    with pytest.raises(OperationFailure) as caught:
        client.db.command("getMore", cursor_id, collection="c")
    assert caught.value.code == 43


def test_thousand_inserts_stream_through_in_order(server, client, writer):
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_many([{"_id": i, "pad": "x" * 100} for i in range(1000)])
        events = drain(stream, 1000, timeout=20)
    assert [e["documentKey"]["_id"] for e in events] == list(range(1000))
    assert [e["_id"]["_data"] for e in events] == server.tokens()


# --- faults --------------------------------------------------------------------------------------

def test_stream_survives_a_hangup_without_loss_or_duplicates(server, client, writer):
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_many([{"_id": i} for i in range(3)])
        first = drain(stream, 3)
        server.hangup_next("getMore")
        writer.db.c.insert_many([{"_id": i} for i in range(3, 6)])
        rest = drain(stream, 3)
    assert [e["documentKey"]["_id"] for e in first + rest] == list(range(6))
    assert server.change_streams_opened == 2
    resume = [c for c in server.commands if c.get("aggregate") == "c"][-1]
    assert resume["pipeline"][0]["$changeStream"]["resumeAfter"] == first[-1]["_id"]


def test_labelled_error_is_resumed_and_unlabelled_one_is_raised(server, client, writer):
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        server.fail_next("getMore", 189, labels=("ResumableChangeStreamError",))
        writer.db.c.insert_one({"_id": 1})
        assert drain(stream, 1)[0]["documentKey"] == {"_id": 1}
        assert server.change_streams_opened == 2
        server.fail_next("getMore", 2, "bad value")
        with pytest.raises(OperationFailure) as caught:
            stream.try_next()
    assert caught.value.code == 2 and caught.value.details["codeName"] == "BadValue"


def test_retryable_write_survives_a_hangup_exactly_once(server, client):
    server.hangup_next("insert")
    client.db.c.insert_one({"_id": 1})
    assert server.documents("db", "c") == [{"_id": 1}]
    assert [e["operationType"] for e in server.events] == ["insert"]
    inserts = [c for c in server.commands if "insert" in c]
    assert len(inserts) == 2 and inserts[0]["txnNumber"] == inserts[1]["txnNumber"]


def test_fail_next_counts_down(server, client):
    server.fail_next("ping", 2, "bad", count=2)
    for _ in range(2):
        with pytest.raises(OperationFailure) as caught:
            client.db.command("ping")
        assert caught.value.code == 2
    assert client.db.command("ping")["ok"] == 1


def test_stream_survives_a_primary_restart(server, client, writer):
    with client.db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        writer.db.c.insert_one({"_id": 1})
        assert drain(stream, 1)[0]["documentKey"] == {"_id": 1}
        server.stop()
        server.start()
        writer.db.c.insert_one({"_id": 2})
        assert drain(stream, 1, timeout=10)[0]["documentKey"] == {"_id": 2}
        assert_quiet(stream)


def test_switching_to_standalone_at_runtime(server):
    with MongoClient(f"mongodb://{server.address}/?directConnection=true",
                     serverSelectionTimeoutMS=5000) as direct:
        with direct.db.c.watch():
            pass
        server.replica_set = False
        assert "setName" not in direct.admin.command("hello")
        with pytest.raises(OperationFailure) as caught:
            direct.db.c.watch()
        assert caught.value.code == 40573
    assert server.uri == f"mongodb://{server.address}/"


def test_a_request_that_fails_inside_the_primary_fails_the_test():
    with pytest.raises(AssertionError, match="ZeroDivisionError"), TestPrimary() as broken:
        broken._handlers["ping"] = lambda db, cmd: 1 / 0
        with connect(broken) as c, pytest.raises(OperationFailure) as caught:
            c.admin.command("ping")
        assert caught.value.code == 1  # the driver saw an InternalError, easy to retry past


def test_wait_for_gives_up_at_its_deadline(server):
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        server.wait_for(lambda: server.change_streams_opened > 0, timeout=0.2)
    assert 0.2 <= time.monotonic() - began < 1


def test_standalone_has_no_change_streams():
    with TestPrimary(replica_set=False) as standalone, connect(standalone) as c:
        hello = c.admin.command("hello")
        assert "setName" not in hello and "$clusterTime" not in hello
        assert c.topology_description.topology_type_name == "Single"
        with pytest.raises(OperationFailure) as caught:
            c.db.c.watch()
    assert caught.value.code == 40573
    assert str(caught.value).startswith("The $changeStream stage is only supported on replica sets")


def test_stop_then_start_again_keeps_data_and_history(server, writer):
    writer.db.c.insert_one({"_id": 1})
    token = {"_data": server.tokens()[-1]}
    server.stop()
    with pytest.raises(ServerSelectionTimeoutError), \
            connect(server, serverSelectionTimeoutMS=300) as c:
        c.db.command("ping")
    server.start()
    with connect(server) as c:
        assert c.db.c.find_one() == {"_id": 1}
        with c.db.c.watch(resume_after=token, max_await_time_ms=AWAIT_MS) as stream:
            c.db.c.insert_one({"_id": 2})
            assert drain(stream, 1)[0]["documentKey"] == {"_id": 2}


def test_authentication_against_configured_users():
    with TestPrimary(users={"relay": "s3cret"}) as secured:
        good = f"mongodb://relay:s3cret@127.0.0.1:{secured.port}/?replicaSet=rs0"
        with MongoClient(good, serverSelectionTimeoutMS=3000) as c:
            assert c.admin.command("ping")["ok"] == 1
        for uri in (good.replace("s3cret", "wrong"), good.replace("relay:", "nobody:")):
            with MongoClient(uri, serverSelectionTimeoutMS=3000) as c:
                with pytest.raises(OperationFailure) as caught:
                    c.admin.command("ping")
                assert caught.value.code == 18
        secured.auth_fails = True
        with MongoClient(good, serverSelectionTimeoutMS=3000) as c:
            with pytest.raises(OperationFailure) as caught:
                c.admin.command("ping")
            assert caught.value.code == 18


# --- scopes and the async driver -----------------------------------------------------------------

def test_stream_scope_errors(client):
    with pytest.raises(OperationFailure) as caught:
        client.db.command("aggregate", 1, pipeline=[{"$changeStream": {
            "allChangesForCluster": True}}], cursor={})
    assert caught.value.code == 72
    with pytest.raises(OperationFailure) as caught:
        client.admin.command("aggregate", 1, pipeline=[{"$changeStream": {}}], cursor={})
    assert caught.value.code == 73


async def test_async_client_watches_collection_database_and_cluster(server, writer):
    async with AsyncMongoClient(server.uri, serverSelectionTimeoutMS=5000) as client:
        streams = [await client.db.c.watch(max_await_time_ms=AWAIT_MS),
                   await client.db.watch(max_await_time_ms=AWAIT_MS),
                   await client.watch(max_await_time_ms=AWAIT_MS)]
        await asyncio.to_thread(writer.db.c.insert_one, {"_id": 1})
        events = [await asyncio.wait_for(s.next(), 5) for s in streams]
        for s in streams:
            await s.close()
    assert [e["documentKey"] for e in events] == [{"_id": 1}] * 3
    assert all(e == server.events[0] for e in events)
