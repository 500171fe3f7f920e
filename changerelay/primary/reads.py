"""Reads: what ``find`` and a plain ``aggregate`` return, and the cursor that hands it out in
batches through ``getMore``."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import Timestamp
from bson.int64 import Int64

from changerelay.primary.errors import CommandError, not_implemented
from changerelay.primary.queries import matches, sorted_by
from changerelay.primary.stages import compile_stage

# https://www.mongodb.com/docs/manual/tutorial/iterate-a-cursor/#cursor-batches: "find() and
# aggregate() operations have an initial batch size of 101 documents by default. Subsequent
# getMore operations issued against the resulting cursor have no default batch size, so they are
# limited only by the 16 mebibyte message size."
DEFAULT_FIRST_BATCH = 101
MAX_BATCH_BYTES = 16 * 1024 * 1024  # mongod caps a batch near the 16 MiB document limit
# Stages a plain aggregate may use here: the ones a document-by-document stage compiles, and the
# few the relay's reads need.
PER_DOCUMENT = ("$match", "$project", "$unset", "$set", "$addFields", "$replaceRoot",
                "$replaceWith")


@dataclass
class ReadCursor:
    """A find or aggregate cursor: the whole result, computed when the command ran (as of its
    snapshot's point in time, for a snapshot read), handed out batch by batch."""

    id: int
    ns: str
    pending: deque[dict] = field(default_factory=deque)
    at_cluster_time: Timestamp | None = None  # a snapshot read's point in time
    killed: bool = False


def take_batch(pending: deque[dict], limit: int) -> list[dict]:
    """Up to ``limit`` documents from the front, within the 16 MiB reply cap (one at least)."""
    batch: list[dict] = []
    size = 0
    while pending and len(batch) < limit:
        doc_size = len(bson.encode(pending[0]))
        if batch and size + doc_size > MAX_BATCH_BYTES:
            break
        batch.append(pending.popleft())
        size += doc_size
    return batch


def batch_size(cmd: dict, spec: Any) -> int:
    """A command's batch size (``spec`` is where the command holds it), checked as MongoDB does
    (query/find_command.idl, aggregate's cursor.batchSize: a non-negative integer)."""
    size = spec.get("batchSize", DEFAULT_FIRST_BATCH) if isinstance(spec, dict) else spec
    if not isinstance(size, int | Int64) or isinstance(size, bool) or size < 0:
        raise CommandError(51024, f"BSON field 'batchSize' value must be >= 0, actual value "
                                  f"'{size}'")
    return int(size)


def run_find(docs: list[dict], cmd: dict) -> list[dict]:
    """``find``'s result: filter, sort, skip, limit, then projection
    (https://www.mongodb.com/docs/manual/reference/command/find/)."""
    flt = cmd.get("filter") or {}
    found = [doc for doc in docs if matches(doc, flt)]
    if cmd.get("sort"):
        found = sorted_by(found, cmd["sort"])
    skip = cmd.get("skip", 0) or 0
    limit = cmd.get("limit", 0) or 0
    if skip < 0 or limit < 0:
        # query/find_command.idl: skip and limit are "safeInt64" validated non-negative
        name = "skip" if skip < 0 else "limit"
        raise CommandError(51024, f"BSON field '{name}' value must be >= 0, actual value "
                                  f"'{skip if skip < 0 else limit}'")
    found = found[skip:]
    if limit:
        found = found[:limit]
    if cmd.get("projection"):
        project = compile_stage("$project", cmd["projection"])
        found = [project(doc) for doc in found]
    return found


def run_pipeline(docs: list[dict], stages: list[tuple[str, Any]]) -> list[dict]:
    """A plain (not ``$changeStream``) aggregation over a collection's documents: per-document
    stages, ``$sort``, ``$skip``, ``$limit`` and ``$count``."""
    out = docs
    for name, spec in stages:
        if name in PER_DOCUMENT:
            stage = compile_stage(name, spec)
            out = [done for done in map(stage, out) if done is not None]
        elif name == "$sort":
            out = sorted_by(out, spec)
        elif name in ("$skip", "$limit"):
            if not isinstance(spec, int | Int64) or isinstance(spec, bool) or spec < 0 or \
                    (name == "$limit" and spec == 0):
                raise CommandError(15958 if name == "$limit" else 15956,
                                   f"invalid argument to {name} stage")
            out = out[spec:] if name == "$skip" else out[:spec]
        elif name == "$count":
            out = _count(out, spec)
        else:
            raise not_implemented(f"the {name} stage outside a change stream")
    return out


def _count(docs: list[dict], spec: Any) -> list[dict]:
    """$count (pipeline/document_source_count.cpp: a string, not empty, no '$' first, no '.');
    it is a $group, so an empty input counts to no document at all
    (https://www.mongodb.com/docs/manual/reference/operator/aggregation/count/)."""
    if not isinstance(spec, str):
        raise CommandError(40156, "the count field must be a non-empty string")
    if not spec:
        raise CommandError(40157, "the count field must be a non-empty string")
    if spec.startswith("$"):
        raise CommandError(40158, "the count field cannot be a $-prefixed path")
    if "." in spec:
        raise CommandError(40160, "the count field cannot contain '.'")
    return [{spec: len(docs)}] if docs else []
