"""REDACT's paths and the stages that remove them inside MongoDB.

The stages run here twice over: directly through the test primary's stage evaluator (fast, and
for every shape hypothesis can think of), and through a real driver round trip to the test
primary, which parses them as MongoDB parses an aggregate command (path collisions included).
What the result must be is stated independently below, in :func:`scrub` and
:func:`expected_updated_fields`: the secret goes, its siblings stay where the shape allows.
"""

from __future__ import annotations

import bson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongo.errors import OperationFailure

from changerelay import config as cfg
from changerelay.pipeline import PipelineError, parse_redact, redaction_stages
from changerelay.primary import compile_stage
from tests.support import drain, examples

AWAIT_MS = 200


def redact(event: dict, paths) -> dict:
    """``event`` through the redaction stages, evaluated by the test primary."""
    for stage in redaction_stages(paths):
        ((name, spec),) = stage.items()
        event = compile_stage(name, spec)(event)
    return event


def scrub(value, fields: set[tuple]):
    """``value`` without ``fields``, through documents and arrays at any depth."""
    if isinstance(value, list):
        return [scrub(item, fields) for item in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for name, item in value.items():
        if (name,) in fields:
            continue
        below = {field[1:] for field in fields if field[0] == name and len(field) > 1}
        out[name] = scrub(item, below) if below else item
    return out


def expected_updated_fields(updated: dict, fields: set[tuple]) -> dict:
    """updatedFields without ``fields``: a key names a path once its array positions are dropped;
    a key at or below a redacted field goes, a key above one keeps its value, scrubbed."""
    out = {}
    for key, value in updated.items():
        named = tuple(part for part in key.split(".") if not part.isdigit())
        if any(named[:len(field)] == field for field in fields):
            continue
        below = {field[len(named):] for field in fields if field[:len(named)] == named}
        out[key] = scrub(value, below) if below else value
    return out


def event(op: str = "update", **fields) -> dict:
    """A change event with MongoDB's field order."""
    out = {"_id": {"_data": "8200000001"}, "operationType": op, "clusterTime": 1,
           "wallTime": 2}
    if "fullDocument" in fields:
        out["fullDocument"] = fields.pop("fullDocument")
    out.update({"ns": {"db": "db", "coll": "c"}, "documentKey": {"_id": 1}, **fields})
    return out


def update(updated: dict, **fields) -> dict:
    return event("update", updateDescription={"updatedFields": updated, "removedFields": ["r"],
                                               "truncatedArrays": []}, **fields)


# --- the shapes -------------------------------------------------------------------------

HASH = "fullDocument.profile.password.hash"
CVV = "fullDocument.cards.cvv"


@pytest.mark.parametrize(("paths", "updated", "kept"), [
    ([HASH], {"profile.password": {"hash": "S", "algo": "x"}}, {"profile.password": {"algo": "x"}}),
    ([HASH], {"profile": {"password": {"hash": "S"}, "name": "n"}},
     {"profile": {"password": {}, "name": "n"}}),
    ([HASH], {"profile.password.hash": "S", "n": 1}, {"n": 1}),
    ([HASH], {"profile.password.hash.v2": "S"}, {}),
    ([HASH], {"profile.password": "plain"}, {"profile.password": "plain"}),  # not the field
    ([CVV], {"cards.1": {"cvv": "S", "n": 4}}, {"cards.1": {"n": 4}}),
    ([CVV], {"cards.1.cvv": "S"}, {}),
    ([CVV], {"cards": [{"cvv": "S", "n": 1}, [{"cvv": "S"}], 7]}, {"cards": [{"n": 1}, [{}], 7]}),
    (["fullDocument.a.b.c"], {"a.0.b.1.c": "S", "a.0.b.1.d": 1}, {"a.0.b.1.d": 1}),
    (["fullDocument.a.b.c"], {"a.0": {"b": [[{"c": "S", "d": 1}]]}}, {"a.0": {"b": [[{"d": 1}]]}}),
    (["fullDocument.a.b.c"], {"a.0.b": [{"c": "S"}, {"e": 2}]}, {"a.0.b": [{}, {"e": 2}]}),
    (["fullDocument.a.b.c"], {"ab": "x", "a.bc": 1}, {"ab": "x", "a.bc": 1}),
    (["fullDocument.c+", "fullDocument.(d)"], {"c+": "S", "cc": 1, "(d).e": "S", "d": 2},
     {"cc": 1, "d": 2}),
])
def test_every_key_shape_of_updated_fields(paths, updated, kept):
    out = redact(update(updated), parse_redact(paths))
    assert out["updateDescription"]["updatedFields"] == kept
    assert out["updateDescription"]["removedFields"] == ["r"]


def test_arrays_of_documents_in_both_images():
    document = {"_id": 1, "cards": [{"cvv": "S", "n": 1}, [{"cvv": "S", "n": 2}], "x"]}
    out = redact(update({}, fullDocument=document, fullDocumentBeforeChange=document),
                 parse_redact([CVV]))
    expected = {"_id": 1, "cards": [{"n": 1}, [{"n": 2}], "x"]}
    assert out["fullDocument"] == out["fullDocumentBeforeChange"] == expected


# --- REDACT as configured ------------------------------------------------------------------------

@pytest.mark.parametrize(("paths", "normalised"), [
    (["fullDocument.a", "fullDocument.a.b"], ("fullDocument.a",)),
    (["fullDocument.a.b", "fullDocument.a"], ("fullDocument.a",)),
    (["fullDocumentBeforeChange.x", "fullDocument.x", "fullDocument.x"], ("fullDocument.x",)),
    (["fullDocument.b", "fullDocument.ab", "fullDocument.a"],
     ("fullDocument.a", "fullDocument.ab", "fullDocument.b")),
])
def test_paths_are_normalised_the_shorter_path_wins(paths, normalised):
    assert parse_redact(paths) == normalised


@pytest.mark.parametrize(("path", "words"), [
    ("password", "start it with fullDocument."),
    ("updateDescription.updatedFields.x", "PIPELINE"),
    ("_id", "resume token"),
    ("fullDocument._id", "resume token"),
    ("fullDocument", "name a field in it"),
    ("fullDocument.cards.0.cvv", "fullDocument.cards.cvv"),
    ("fullDocument.a..b", "empty"),
    ("fullDocument.a.", "empty"),
    ("fullDocument.$secret", "$"),
])
def test_paths_that_cannot_be_redacted_safely_are_refused(path, words):
    with pytest.raises(PipelineError) as caught:
        parse_redact([path])
    assert words in str(caught.value)
    with pytest.raises(cfg.ConfigError) as named:
        cfg.load([], environ={"REDACT": f"fullDocument.ok,{path}"}, dotenv_path=None)
    assert named.value.setting == "REDACT"


def test_redact_is_bounded():
    paths = [f"fullDocument.f{n}" for n in range(101)]
    with pytest.raises(PipelineError, match="at most 100"):
        parse_redact(paths)
    assert len(parse_redact(paths[:100])) == 100


# --- every shape, by hypothesis ------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c+", "(d)", "v", "k"])  # regex specials and the slot names
VALUES = st.recursive(st.integers(0, 9) | st.none() | st.just("S"),
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(NAMES, inner, max_size=3), max_leaves=10)
DOCUMENTS = st.dictionaries(NAMES, VALUES, max_size=4)
FIELDS = st.lists(st.lists(NAMES, min_size=1, max_size=3).map(tuple), min_size=1, max_size=3)
KEYS = st.tuples(NAMES, st.lists(NAMES | st.integers(0, 3).map(str), max_size=4)).map(
    lambda parts: ".".join([parts[0], *parts[1]]))


@settings(max_examples=examples(300), deadline=None)
@given(fields=FIELDS, document=DOCUMENTS, before=DOCUMENTS,
       updated=st.dictionaries(KEYS, VALUES, max_size=4))
def test_redaction_removes_exactly_the_named_fields(fields, document, before, updated):
    paths = parse_redact(["fullDocument." + ".".join(field) for field in fields])
    named = {tuple(path.split(".")[1:]) for path in paths}
    original = update(updated, fullDocument=document, fullDocumentBeforeChange=before)
    out = redact(original, paths)
    assert list(out) == list(original)
    assert out["fullDocument"] == scrub(document, named)
    assert out["fullDocumentBeforeChange"] == scrub(before, named)
    kept = expected_updated_fields(updated, named)
    assert out["updateDescription"] == {**original["updateDescription"], "updatedFields": kept}
    assert list(out["updateDescription"]["updatedFields"]) == list(kept)


@settings(max_examples=examples(50), deadline=None)
@given(fields=FIELDS, document=DOCUMENTS)
def test_events_without_an_update_description_gain_none(fields, document):
    paths = parse_redact(["fullDocument." + ".".join(field) for field in fields])
    for original in (event("insert", fullDocument=document), event("delete"),
                     event("drop"), {"_id": {"_data": "82"}, "operationType": "invalidate"}):
        out = redact(original, paths)
        assert "updateDescription" not in out
        assert list(out) == list(original)


def test_the_generated_pipeline_grows_linearly():
    """5 paths of depth 3: the pipeline MongoDB parses once and evaluates per event stays small."""
    paths = parse_redact([f"fullDocument.s{n}.m{n}.t{n}" for n in range(5)])
    stages = redaction_stages(paths)
    assert len(stages) == 3
    assert len(stages[1]["$unset"]) == 5 * 2 + 5 * 2  # both images, then each prefix's rest
    assert len(bson.encode({"pipeline": stages})) < 8 * 1024


# --- through a real driver, against the test primary (or MONGODB_TEST_URI's deployment) ---------

def secrets(value) -> list[str]:
    """The secret values (strings starting with S) anywhere in ``value``."""
    if isinstance(value, dict):
        return [s for item in value.values() for s in secrets(item)]
    if isinstance(value, list):
        return [s for item in value for s in secrets(item)]
    return [value] if isinstance(value, str) and value.startswith("S") else []


def test_stages_open_on_a_server_for_overlapping_paths(mongo):
    coll = mongo.client[mongo.db].c
    for paths in (["fullDocument.a", "fullDocument.a.b"], ["fullDocument.a.b", "fullDocument.a"]):
        coll.watch(redaction_stages(paths)).close()
    with pytest.raises(OperationFailure) as caught:  # what the old stages met
        coll.watch([{"$unset": ["fullDocument.a", "fullDocument.a.b"]}])
    assert caught.value.code == 31249


def test_round_trip_adds_no_update_description_to_other_events(mongo):
    stages = redaction_stages(parse_redact(["fullDocument.a.b"]))
    coll = mongo.client[mongo.db].c
    with coll.watch(stages, max_await_time_ms=AWAIT_MS) as stream:
        coll.insert_one({"_id": 1, "a": [{"b": "S", "c": 1}]})
        coll.replace_one({"_id": 1}, {"a": {"b": "S2"}})
        coll.delete_one({"_id": 1})
        coll.drop()
        got = drain(stream, 5)
    assert [e["operationType"] for e in got] == [
        "insert", "replace", "delete", "drop", "invalidate"]
    assert not any("updateDescription" in e for e in got)
    assert got[0]["fullDocument"] == {"_id": 1, "a": [{"c": 1}]}
    assert got[1]["fullDocument"] == {"_id": 1, "a": {}}
    assert list(got[4]) == ["_id", "operationType", "clusterTime", "wallTime"]


def test_round_trip_keeps_mongodbs_shape_apart_from_the_secret(mongo):
    paths = parse_redact([HASH, CVV])
    db = mongo.client[mongo.db]
    db.command("create", "c", changeStreamPreAndPostImages={"enabled": True})
    options = {"full_document": "whenAvailable", "full_document_before_change": "whenAvailable",
               "max_await_time_ms": AWAIT_MS}
    with db.watch(**options) as plain, db.watch(redaction_stages(paths), **options) as redacted:
        coll = db.c
        coll.insert_one({"_id": 1, "profile": {"password": {"hash": "S", "algo": "x"}},
                         "cards": [{"cvv": "S", "n": 1}]})
        coll.update_one({"_id": 1}, {"$set": {"profile.password": {"hash": "S2", "algo": "y"}}})
        coll.update_one({"_id": 1}, {"$set": {"cards.1": {"cvv": "S3", "n": 2}}})
        coll.update_one({"_id": 1}, {"$set": {"cards.1.cvv": "S4", "cards.0.n": 5}})
        coll.update_one({"_id": 1}, {"$push": {"cards": {"cvv": "S5", "n": 3}}})
        coll.replace_one({"_id": 1}, {"cards": [[{"cvv": "S6"}]]})
        coll.delete_one({"_id": 1})
        db.other.insert_one({"_id": 2})
        coll.drop()
        seen, got = drain(plain, 9), drain(redacted, 9)
    named = {("profile", "password", "hash"), ("cards", "cvv")}
    for original, out in zip(seen, got, strict=True):
        assert list(out) == list(original)
        expected = dict(original)
        for image in ("fullDocument", "fullDocumentBeforeChange"):
            if image in original:
                expected[image] = scrub(original[image], named)
        if "updateDescription" in original:
            description = original["updateDescription"]
            expected["updateDescription"] = {**description, "updatedFields": (
                expected_updated_fields(description["updatedFields"], named))}
        assert out == expected
        assert not secrets(out), out
    assert [e["operationType"] for e in got] == [
        "insert", "update", "update", "update", "update", "replace", "delete", "insert", "drop"]
    assert got[2]["updateDescription"]["updatedFields"] == {"cards.1": {"n": 2}}
    assert got[3]["updateDescription"]["updatedFields"] == {"cards.0.n": 5}
    assert [e for e in got if "updateDescription" in e] == got[1:5]
