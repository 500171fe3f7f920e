"""What the relay asks MongoDB to run after ``$changeStream``: the operator's PIPELINE and REDACT.

Both are read once at start-up (``config.py`` calls the parsers here) and refused there, with the
fix, when MongoDB would refuse them or they would break the stream. :func:`redaction_stages`
builds the stages that remove REDACT's fields inside MongoDB.
"""

from __future__ import annotations

from collections.abc import Iterable

from bson import json_util

# Stages MongoDB accepts after $changeStream; anything else fails there with an obscure error, so we
# refuse it up front. https://www.mongodb.com/docs/manual/changeStreams/#modify-change-stream-output
PIPELINE_STAGES = frozenset(
    {"$addFields", "$match", "$project", "$replaceRoot", "$replaceWith", "$redact", "$set",
     "$unset"}
)


class PipelineError(ValueError):
    """A PIPELINE or REDACT value the relay refuses; the message says how to fix it."""


def parse_pipeline(raw: str) -> tuple[dict, ...]:
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
        if name not in PIPELINE_STAGES:
            raise PipelineError(
                f"stage {index} is {name}, which change streams do not allow; use one of "
                + ", ".join(sorted(PIPELINE_STAGES)))
        if _touches_id(name, stage[name]):
            raise PipelineError(
                f"stage {index} ({name}) changes _id, the resume token: MongoDB then ends the "
                "change stream (error 280); leave _id as it is")
    return tuple(stages)


def _touches_id(name: str, spec) -> bool:
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


def parse_redact(paths: Iterable[str]) -> tuple[str, ...]:
    """REDACT: dotted paths removed from every event."""
    paths = tuple(paths)
    for path in paths:
        if path.startswith(("_id", "$")) or ".." in path or path.endswith("."):
            raise PipelineError(
                f"{path!r} cannot be redacted; give dotted paths such as "
                "fullDocument.password (the _id resume token must stay)")
    return paths


def redaction_stages(paths) -> list[dict]:
    """Stages that drop redacted fields inside MongoDB, before they ever reach the relay.

    A document field appears in three places of a change event: the post-image
    (``fullDocument``), the pre-image (``fullDocumentBeforeChange``) and, for updates, as a key
    of ``updateDescription.updatedFields`` — so ``fullDocument.password`` is removed from all
    three. An update that sets a sub-field (``{"password.hash": ...}``) has a dotted key there,
    which no field path can address; the ``$set`` stage filters those keys by prefix.
    """
    if not paths:
        return []
    unset, prefixes = [], []
    for path in paths:
        head, _, rest = path.partition(".")
        if head in ("fullDocument", "fullDocumentBeforeChange") and rest:
            unset += [f"fullDocument.{rest}", f"fullDocumentBeforeChange.{rest}",
                      f"updateDescription.updatedFields.{rest}"]
            prefixes.append(rest)
        else:
            unset.append(path)
    stages = [{"$unset": sorted(set(unset))}]
    if prefixes:
        keep = {"$and": [
            cond for rest in prefixes for cond in (
                {"$ne": ["$$this.k", rest]},
                {"$ne": [{"$indexOfBytes": ["$$this.k", rest + "."]}, 0]},
            )
        ]}
        stages.append({"$set": {"updateDescription.updatedFields": {"$cond": [
            {"$eq": [{"$type": "$updateDescription.updatedFields"}, "object"]},
            {"$arrayToObject": {"$filter": {
                "input": {"$objectToArray": "$updateDescription.updatedFields"},
                "cond": keep}}},
            "$$REMOVE",
        ]}}})
    return stages
