"""Row rules decided on the document as it was at the event: deliver, leave, or withhold."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from changerelay import events as ev
from changerelay.filters import compile_filter
from changerelay.rows import DELIVER, ENTERED, LEAVE, WITHHOLD, AccessRule
from changerelay.subscription import Subscription
from tests.support import examples

ABSENT = object()


def change(op, post=ABSENT, pre=ABSENT, key=1, coll="notes", **extra):
    """A change event as MongoDB shapes it: fullDocument and fullDocumentBeforeChange only
    where the stream's options put them (ABSENT), ``None`` where MongoDB writes null."""
    doc = {"_id": {"_data": "82AA"}, "operationType": op, "ns": {"db": "shop", "coll": coll}}
    if key is not None:
        doc["documentKey"] = {"_id": key}
    if post is not ABSENT:
        doc["fullDocument"] = post
    if pre is not ABSENT:
        doc["fullDocumentBeforeChange"] = pre
    doc.update(extra)
    return doc


ALICE, BOB = {"_id": 1, "owner": "alice"}, {"_id": 1, "owner": "bob"}
OWNED_BY_ALICE = {"fullDocument.owner": "alice"}


@pytest.mark.parametrize("what, event, verdict", [
    ("insert of hers", change("insert", ALICE), DELIVER),
    ("insert of his", change("insert", BOB), WITHHOLD),
    ("update, hers after, no pre-images", change("update", ALICE), DELIVER),
    ("update, hers before and after", change("update", ALICE, ALICE), DELIVER),
    ("update that brings his document to her", change("update", ALICE, BOB), ENTERED),
    ("update that takes her document away", change("update", BOB, ALICE), LEAVE),
    ("update of his, before and after", change("update", BOB, BOB), WITHHOLD),
    ("update without its post-image (null)", change("update", None, ALICE), WITHHOLD),
    ("update without a document (FULL_DOCUMENT=default)", change("update"), WITHHOLD),
    ("update, pre-image unavailable (null)", change("update", ALICE, None), DELIVER),
    ("replace that takes hers away", change("replace", BOB, ALICE), LEAVE),
    ("replace that brings one to her", change("replace", ALICE, BOB), ENTERED),
    ("delete of hers", change("delete", pre=ALICE), DELIVER),
    ("delete of his", change("delete", pre=BOB), WITHHOLD),
    ("delete without pre-images", change("delete"), WITHHOLD),
    ("delete, pre-image unavailable (null)", change("delete", pre=None), WITHHOLD),
    ("drop: no document to decide on", change("drop", key=None), WITHHOLD),
    ("dropDatabase", change("dropDatabase", key=None, coll=None), WITHHOLD),
    ("invalidate", {"_id": {"_data": "82AA"}, "operationType": "invalidate"}, WITHHOLD),
])
def test_a_rule_on_the_document(what, event, verdict):
    assert AccessRule(OWNED_BY_ALICE, post_images=True).decide(event) == verdict, what


def test_an_update_document_that_is_not_a_post_image_is_never_decided_on():
    """updateLookup's document is the document when the event was read, not at the event."""
    rule = AccessRule(OWNED_BY_ALICE, post_images=False)
    assert rule.decide(change("update", ALICE)) == WITHHOLD
    assert rule.decide(change("update", ALICE, ALICE)) == WITHHOLD
    assert rule.decide(change("update", BOB, ALICE)) == WITHHOLD  # not even a leave: it may be hers
    assert rule.decide(change("insert", ALICE)) == DELIVER  # an insert's document is as of it
    assert rule.decide(change("replace", ALICE)) == DELIVER
    assert rule.decide(change("delete", pre=ALICE)) == DELIVER  # pre-images are as of the event


def test_a_negative_rule_never_passes_for_want_of_a_document():
    rule = AccessRule({"fullDocument.owner": {"$ne": "bob"}}, post_images=True)
    assert rule.decide(change("delete")) == WITHHOLD
    assert rule.decide(change("update", None)) == WITHHOLD
    assert rule.decide(change("drop", key=None)) == WITHHOLD
    assert rule.decide(change("delete", pre=ALICE)) == DELIVER
    assert rule.decide(change("update", BOB, ALICE)) == LEAVE


def test_rules_on_other_parts_need_those_parts():
    by_key = AccessRule({"documentKey._id": {"$in": [1, 2]}}, post_images=True)
    assert by_key.decide(change("delete")) == DELIVER
    assert by_key.decide(change("update", BOB)) == DELIVER
    assert by_key.decide(change("delete", key=3)) == WITHHOLD
    assert by_key.decide(change("drop", key=None)) == WITHHOLD
    by_collection = AccessRule({"ns.coll": {"$ne": "secrets"}}, post_images=True)
    assert by_collection.decide(change("drop", key=None)) == DELIVER
    assert by_collection.decide(change("drop", key=None, coll="secrets")) == WITHHOLD
    invalidate = {"_id": {"_data": "82AA"}, "operationType": "invalidate"}
    assert by_collection.decide(invalidate) == WITHHOLD
    by_update = AccessRule({"updateDescription.updatedFields.salary": {"$exists": False}},
                           post_images=True)
    assert by_update.decide(change("insert", ALICE)) == WITHHOLD  # an insert has no description
    both = AccessRule({"fullDocument.owner": "alice", "documentKey._id": 1}, post_images=True)
    assert both.decide(change("update", BOB, ALICE)) == LEAVE
    assert both.decide(change("update", ALICE, key=2)) == WITHHOLD


def encoded(doc):
    return ev.encode_change(doc)


def test_the_subscription_sends_what_the_verdict_says():
    rule = AccessRule(OWNED_BY_ALICE, post_images=True)
    entering = encoded(change("update", ALICE, {**BOB, "note": "bob's"},
                              updateDescription={"updatedFields": {"owner": "alice"}}))
    leaving = encoded(change("update", {**BOB, "note": "new"}, ALICE))
    staying = encoded(change("update", ALICE, ALICE))
    withheld = encoded(change("update", BOB, BOB))
    picked = Subscription(access=rule).select([entering, leaving, staying, withheld])
    assert picked == [entering.entered, leaving.leave, staying]
    assert "fullDocumentBeforeChange" not in json.loads(entering.entered.data)
    assert json.loads(leaving.leave.data) == {"type": "leave", "ns": "shop.notes",
                                              "documentKey": {"_id": 1}}


def test_the_clients_own_filter_sees_only_what_the_client_would():
    """A filter on the pre-image must not learn, one bit per event, what the rule withheld."""
    rule = AccessRule(OWNED_BY_ALICE, post_images=True)
    probe = compile_filter({"fullDocumentBeforeChange.note": "bob's secret"})
    entering = encoded(change("update", ALICE, {**BOB, "note": "bob's secret"}))
    assert Subscription(filter=probe, access=rule).select([entering]) == []
    leaving = encoded(change("update", {**BOB, "note": "new"}, ALICE))
    own = compile_filter({"fullDocument.note": "new"})  # leaves do not depend on the filter
    assert Subscription(filter=own, access=rule).select([leaving]) == [leaving.leave]
    assert Subscription(filter=compile_filter({"fullDocument.note": "x"}),
                        access=rule).select([leaving]) == [leaving.leave]


owners = st.sampled_from(["alice", "bob", None])
documents = st.one_of(st.just(ABSENT), st.none(), st.builds(
    lambda owner, secret: {"_id": 1, "owner": owner, "secret": secret},
    owners, st.integers(0, 9)))


@settings(max_examples=examples(500), deadline=None)
@given(st.sampled_from(["insert", "update", "replace", "delete", "drop"]), documents, documents,
       st.booleans(), st.sampled_from([OWNED_BY_ALICE, {"fullDocument.owner": {"$ne": "bob"}}]))
def test_nothing_a_rule_rejects_ever_reaches_the_reader(op, post, pre, post_images, spec):
    # MongoDB's shapes: a delete has no fullDocument, an insert no pre-image, a drop neither
    # (and no documentKey); either image may be absent or null where the options allow it.
    if op in ("delete", "drop"):
        post = ABSENT
    if op in ("insert", "drop"):
        pre = ABSENT
    rule = AccessRule(spec, post_images=post_images)
    check = compile_filter(spec).predicate
    event = encoded(change(op, post, pre, key=None if op == "drop" else 1))
    for item in Subscription(access=rule).select([event]):
        sent = json.loads(item.data)
        if sent.get("type") == "leave":
            assert set(sent) == {"type", "ns", "documentKey"}
            assert pre not in (ABSENT, None) and check({"fullDocument": pre})
            continue
        for field in ("fullDocument", "fullDocumentBeforeChange"):
            document = sent.get(field)
            if document is not None:
                assert check({"fullDocument": document}), (field, sent)
        if op == "update" and not post_images:
            raise AssertionError("an update decided on a document that is not a post-image")
