"""What the relay asks MongoDB to run after ``$changeStream``: the operator's PIPELINE and REDACT.

Both are read once at start-up (``config.py`` calls the parsers here) and refused there, with the
fix, when MongoDB would refuse them or could not honour them: a stage a change stream does not
allow or one that changes the resume token, a path that cannot be redacted safely. Refusing then
beats a stream that fails on every reopen while every client waits.
:func:`redaction_stages` builds the stages that remove REDACT's fields inside MongoDB, so a secret
never reaches the relay, its memory, its logs or a client.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bson import json_util

DOCUMENTS = ("fullDocument", "fullDocumentBeforeChange")  # the images; REDACT names the first
MAX_REDACT_PATHS = 100  # the stages grow with the paths, and MongoDB runs them on every event

# Stages MongoDB accepts after $changeStream; anything else fails there with an obscure error, so we
# refuse it up front. https://www.mongodb.com/docs/manual/changeStreams/#modify-change-stream-output
PIPELINE_STAGES = frozenset(
    {"$addFields", "$match", "$project", "$replaceRoot", "$replaceWith", "$redact", "$set",
     "$unset"}
)
# MongoDB 7.0 (and 6.0.9) sends an event over 16 MB in fragments with this stage, which must be the
# last and is written {} (pipeline/document_source_change_stream_split_large_event.cpp, 7182800
# and 7182802); the relay puts the fragments back together (fragments.py). It runs after REDACT's
# stages, so that a fragment never holds a redacted field.
# https://www.mongodb.com/docs/manual/reference/operator/aggregation/changeStreamSplitLargeEvent/
SPLIT_STAGE = "$changeStreamSplitLargeEvent"


Stage = dict[str, Any]  # one aggregation stage, {"$name": spec}


class PipelineError(ValueError):
    """A PIPELINE or REDACT value the relay refuses; the message says how to fix it."""


def parse_pipeline(raw: str) -> tuple[Stage, ...]:
    """PIPELINE: a JSON array of stages a change stream allows, none of them touching ``_id``."""
    try:
        stages = json_util.loads(raw)
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"is not valid JSON ({exc}); give a JSON array of stages, "
                            'e.g. [{"$match": {"operationType": "insert"}}]') from None
    if not isinstance(stages, list):
        raise PipelineError('must be a JSON array of stages, e.g. [{"$match": {...}}]')
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict) or len(stage) != 1:
            raise PipelineError(f"stage {index} must be an object with exactly one key")
        (name,) = stage
        if name == SPLIT_STAGE:
            if index != len(stages) - 1:
                raise PipelineError(f"stage {index}: {SPLIT_STAGE} must be the last stage")
            if stage[name] != {}:
                raise PipelineError(f"stage {index}: {SPLIT_STAGE} takes no options; write "
                                    f'{{"{SPLIT_STAGE}": {{}}}}')
            continue
        if name not in PIPELINE_STAGES:
            raise PipelineError(
                f"stage {index} is {name}, which change streams do not allow; use one of "
                + ", ".join(sorted(PIPELINE_STAGES | {SPLIT_STAGE})))
        if _touches_id(name, stage[name]):
            raise PipelineError(
                f"stage {index} ({name}) changes _id, the resume token: MongoDB then ends the "
                "change stream (error 280); leave _id as it is")
    return tuple(stages)


def _touches_id(name: str, spec: Any) -> bool:
    if name in ("$replaceRoot", "$replaceWith", "$redact"):
        return False  # can't tell statically; MongoDB checks at run time
    if name == "$unset":
        fields = [spec] if isinstance(spec, str) else spec
        return any(isinstance(f, str) and (f == "_id" or f.startswith("_id.")) for f in fields)
    if isinstance(spec, dict):
        keys = [k for k in spec if k == "_id" or k.startswith("_id.")]
        if name == "$project":
            inclusive = any(v not in (0, False) for k, v in spec.items() if k != "_id")
            return any(spec[k] in (0, False) for k in keys) or (
                inclusive and any(not isinstance(spec[k], int | bool) for k in keys))
        return bool(keys)
    return False


def change_stream_stages(pipeline: Iterable[Stage], redact: Iterable[str]) -> list[Stage]:
    """What follows ``$changeStream``: PIPELINE, then REDACT's stages, and PIPELINE's split
    stage, if any, last of all, where MongoDB requires it."""
    stages = list(pipeline)
    split = [stages.pop()] if stages and SPLIT_STAGE in stages[-1] else []
    return [*stages, *redaction_stages(redact), *split]


def parse_redact(paths: Iterable[str]) -> tuple[str, ...]:
    """REDACT's paths, normalised: ``fullDocument.<field path>``, each once, and none inside
    another (the shorter path wins: MongoDB refuses a $unset of both, error 31249/31250)."""
    fields = {_document_field(path) for path in paths}
    if len(fields) > MAX_REDACT_PATHS:
        raise PipelineError(f"names {len(fields)} fields; redact at most {MAX_REDACT_PATHS} "
                            "(each one is evaluated inside MongoDB for every event)")
    return tuple(f"{DOCUMENTS[0]}.{'.'.join(field)}" for field in _outermost(fields))


def redacted_field(path: str, redact: Iterable[str]) -> str | None:
    """The REDACT path that an event field ``path`` (a filter's) reads some of, or None.

    REDACT removes a field from both images and from updatedFields, wherever array positions
    put it: a path there that names the field, something inside it or something holding it
    reads what the relay never gets to see.
    """
    head, _, rest = path.partition(".")
    if head == "updateDescription" and rest.startswith("updatedFields."):
        rest = rest.removeprefix("updatedFields.")
    elif head not in DOCUMENTS:
        return None
    field = [part for part in rest.split(".") if not (part.isascii() and part.isdigit())]
    for redacted in redact:
        named = redacted.split(".")[1:]
        shorter = min(len(field), len(named))
        if field[:shorter] == named[:shorter]:
            return redacted
    return None


def _document_field(path: str) -> tuple[str, ...]:
    """A REDACT path as the field of the changed document it names, or a refusal saying why."""
    head, _, rest = path.partition(".")
    parts = tuple(rest.split("."))
    if head == "_id" or (head in DOCUMENTS and parts[0] == "_id"):
        raise PipelineError(f"{path!r} cannot be redacted: the event's _id is the resume token, "
                            "and the document's _id is in documentKey and every resume token")
    if head not in DOCUMENTS:
        raise PipelineError(
            f"{path!r} is not a field of the changed document: start it with fullDocument. (e.g. "
            "fullDocument.password), which removes the field from fullDocument, "
            "fullDocumentBeforeChange and updateDescription alike; remove other event fields "
            "with a PIPELINE $unset")
    if not rest:
        raise PipelineError(f"{path!r} names the whole document: name a field in it, e.g. "
                            f"{head}.password")
    for part in parts:
        if not part or "\x00" in part:
            raise PipelineError(f"{path!r} has an empty field name (or a NUL byte)")
        if part.startswith("$"):
            raise PipelineError(f"{path!r}: a field name starting with $ cannot be named in a "
                                "MongoDB field path; redact its parent")
        if part.isascii() and part.isdigit():
            named = ".".join(p for p in path.split(".") if not (p.isascii() and p.isdigit()))
            raise PipelineError(f"{path!r} names an array position ({part}); a position cannot "
                                f"be redacted on its own: {named} removes the field from every "
                                "element")
    return parts


def _outermost(fields: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The fields not inside another one, sorted."""
    fields = set(fields)
    return sorted(f for f in fields if not any(f[:i] in fields for i in range(1, len(f))))


# --- the redaction stages ------------------------------------------------------------------------
# A document field reaches a change event in three places: the post-image (fullDocument), the
# pre-image (fullDocumentBeforeChange) and, for an update, updateDescription.updatedFields. The
# images are documents, so a $unset of the field path removes it there, through arrays and nested
# arrays as MongoDB's exclusion projection walks them. updatedFields is flat: its keys are dotted
# paths MongoDB writes with array positions anywhere ("cards.1.cvv", "a.0.b.1.c"), so a key is
# matched against each field with its positions skipped, and
#   - a key at or below a redacted field ("cards.1.cvv", "profile.password.hash.v2") is dropped;
#   - a key above one ("cards.1", "profile.password") keeps its value, minus the field: the value
#     is moved under a slot named for that prefix, the same $unset removes the rest of the path
#     from it (arrays included), and the last stage moves it back under its key;
#   - any other key is left as it is.
# The events otherwise keep exactly MongoDB's shape: updateDescription is set as a whole, and only
# where it is an update's; a dotted $set would create it on every other event, even set to
# $$REMOVE (exec/projection_node.cpp). removedFields, truncatedArrays and disambiguatedPaths name
# paths, never values, and are kept. Operators: $objectToArray, $map, $switch, $regexMatch, $filter,
# $setField (MongoDB 5.0+), $getField (5.0+), $arrayElemAt, $arrayToObject, $isArray, $type.

UPDATED_FIELDS = "updateDescription.updatedFields"
_POSITIONS = r"(?:\.[0-9]+)*"  # the array positions MongoDB may write after a field name


def redaction_stages(paths: Iterable[str]) -> list[Stage]:
    """The stages that remove REDACT's fields from every event inside MongoDB; [] for none.

    Three stages, whatever the paths: the $unset lists each field twice (both images) plus the
    rest of it below each of its prefixes; the patterns grow with the number of prefixes.
    """
    fields = _outermost(_document_field(path) for path in paths)
    if not fields:
        return []
    prefixes = sorted({field[:i] for field in fields for i in range(1, len(field))})
    slots = {prefix: f"n{i}" for i, prefix in enumerate(prefixes)}
    unset = [f"{image}.{'.'.join(field)}" for image in DOCUMENTS for field in fields]
    unset += [f"{UPDATED_FIELDS}.{slots[field[:i]]}.{'.'.join(field[i:])}"
              for field in fields for i in range(1, len(field))]
    return [_split_updated_fields(fields, slots), {"$unset": unset}, _join_updated_fields()]


def _split_updated_fields(fields: list[tuple[str, ...]],
                          slots: dict[tuple[str, ...], str]) -> Stage:
    """updatedFields as [{k: key, <slot>: value}], without the keys at or below a field."""
    tops = "|".join(sorted({_literal(field[0]) for field in fields}))
    within = "|".join(_key_pattern(field) for field in fields)

    def entry(slot: str) -> dict[str, str]:
        return {"k": "$$field.k", slot: "$$field.v"}

    def matches(pattern: str) -> dict[str, Any]:
        return {"$regexMatch": {"input": "$$field.k", "regex": pattern}}

    branches = [
        {"case": {"$not": [matches(rf"^(?:{tops})(?:\.|$)")]}, "then": entry("v")},
        {"case": matches(rf"^(?:{within})(?:\.|$)"), "then": None},
        *({"case": matches(rf"^{_key_pattern(prefix)}{_POSITIONS}$"), "then": entry(slot)}
          for prefix, slot in slots.items()),
    ]
    entries = {"$map": {"input": {"$objectToArray": f"${UPDATED_FIELDS}"}, "as": "field",
                        "in": {"$switch": {"branches": branches, "default": entry("v")}}}}
    return _set_updated_fields({"$eq": [{"$type": f"${UPDATED_FIELDS}"}, "object"]},
                               {"$filter": {"input": entries, "cond": {"$ne": ["$$this", None]}}})


def _join_updated_fields() -> Stage:
    """The entries back into updatedFields, each value from its slot (an entry's second field)."""
    value = {"$getField": {"field": "v",
                           "input": {"$arrayElemAt": [{"$objectToArray": "$$entry"}, 1]}}}
    pairs = {"$map": {"input": f"${UPDATED_FIELDS}", "as": "entry", "in": ["$$entry.k", value]}}
    return _set_updated_fields({"$isArray": [f"${UPDATED_FIELDS}"]}, {"$arrayToObject": [pairs]})


def _set_updated_fields(when: dict[str, Any], value: dict[str, Any]) -> Stage:
    """Set updatedFields to ``value`` where ``when`` holds; elsewhere updateDescription is set to
    itself, which leaves it as it was - absent where it was absent."""
    return {"$set": {"updateDescription": {"$cond": {
        "if": when,
        "then": {"$setField": {"field": "updatedFields", "input": "$updateDescription",
                               "value": value}},
        "else": "$updateDescription"}}}}


def _key_pattern(field: tuple[str, ...]) -> str:
    """A regex for an updatedFields key naming ``field``, array positions between its names."""
    return rf"{_POSITIONS}\.".join(map(_literal, field))


def _literal(name: str) -> str:
    """``name`` as a regex matching itself: each ASCII character but letters, digits and _ is
    escaped, which PCRE (MongoDB) and Python's re (the test primary) both read as that
    character."""
    return "".join(f"\\{c}" if c.isascii() and not (c.isalnum() or c == "_") else c
                   for c in name)
