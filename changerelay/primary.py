"""A MongoDB replica-set primary for tests, speaking the real wire protocol.

No ``mongod`` can run where these tests run, so the end-to-end tests point the real PyMongo driver,
over TCP, at this: a `mockupdb`_ server whose every request is answered the way a MongoDB 7.0
replica-set primary documents it. Writes append change events to an oplog-like log; change streams
are cursors over that log; ``getMore`` blocks up to ``maxTimeMS`` like an ``awaitData`` cursor.

Faithful where the relay can observe it: event shapes, resume tokens whose string order is event
order, invalidate rules, ``resumeAfter``/``startAfter``/``startAtOperationTime``, the error codes
and messages MongoDB returns. Deliberately simple elsewhere: one node, no real indexes, a small
query language. Anything unimplemented answers with an error that says so rather than pretending.

mockupdb handles each connection on its own thread, but runs every handler under one global lock.
A ``getMore`` that blocked there would stall the very insert that should wake it, so each request
is handled with that lock released and :class:`TestPrimary` guards its own state instead.

Not implemented (each answers with an error saying so, never silently): transactions,
``showExpandedEvents``, pipeline-style updates, arrayFilters and positional updates, update
operators other than $set/$setOnInsert/$unset/$inc/$push ($each only), $project sub-objects,
stages other than $match/$project/$unset/$set/$addFields/$replaceRoot/$replaceWith in a change
stream, most query operators beyond equality/comparison/$in/$exists/$and/$or/$nor/$expr, and
expression operators other than the ones in ``_OPERATORS``.
Not modelled: secondaries and elections, the streaming (awaitable) hello — heartbeats poll, so a
runtime switch of ``replica_set`` reaches a ``replicaSet=`` client only at its next heartbeat —,
index enforcement beyond ``_id``, the drop of a ``dropTarget`` rename's target. Authentication
needs the user in ``users`` (SCRAM verifies the password both ways).

Use::

    with TestPrimary() as primary, MongoClient(primary.uri) as client:
        client.db.c.insert_one({"_id": 1})
        assert primary.events[-1]["operationType"] == "insert"

.. _mockupdb: https://mockupdb.readthedocs.io/
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import datetime
import functools
import hashlib
import hmac
import itertools
import os
import re
import socket
import threading
import time
import traceback
import uuid as uuidlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import ObjectId, Timestamp
from bson.binary import Binary
from bson.int64 import Int64
from mockupdb import MockupDB

__all__ = ["CommandError", "TestPrimary"]

MAX_WIRE_VERSION = 21  # MongoDB 7.0
SERVER_VERSION = "7.0.0"
DEFAULT_FIRST_BATCH = 101
MAX_BATCH_BYTES = 16 * 1024 * 1024  # mongod caps a batch near the 16 MiB document limit
DEFAULT_AWAIT_MS = 1000  # what mongod waits on an awaitData getMore that sends no maxTimeMS
INTERNAL_DBS = ("admin", "config", "local")
OP_MSG_MORE_TO_COME = 2

CODE_NAMES = {
    1: "InternalError", 2: "BadValue", 4: "NoSuchKey", 6: "HostUnreachable", 7: "HostNotFound",
    9: "FailedToParse", 11: "UserNotFound", 13: "Unauthorized", 14: "TypeMismatch",
    18: "AuthenticationFailed", 20: "IllegalOperation", 26: "NamespaceNotFound",
    40: "ConflictingUpdateOperators", 43: "CursorNotFound", 47: "NoMatchingDocument",
    48: "NamespaceExists", 50: "MaxTimeMSExpired", 59: "CommandNotFound", 66: "ImmutableField",
    72: "InvalidOptions", 73: "InvalidNamespace", 89: "NetworkTimeout", 91: "ShutdownInProgress",
    136: "CappedPositionLost", 189: "PrimarySteppedDown", 237: "CursorKilled",
    251: "NoSuchTransaction", 260: "InvalidResumeToken", 262: "ExceededTimeLimit",
    280: "ChangeStreamFatalError", 286: "ChangeStreamHistoryLost",
    352: "UnsupportedOpQueryCommand", 10107: "NotWritablePrimary", 11000: "DuplicateKey",
    11600: "InterruptedAtShutdown", 11601: "Interrupted", 11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk", 13436: "NotPrimaryOrSecondary",
}
NON_RESUMABLE = ("NonResumableChangeStreamError",)
HISTORY_LOST_MSG = ("Resume of change stream was not possible, as the resume point may no longer "
                    "be in the oplog.")

# Stages MongoDB allows after $changeStream ("Modify Change Stream Output" in the manual).
CHANGE_STREAM_STAGES = ("$addFields", "$match", "$project", "$replaceRoot", "$replaceWith",
                        "$redact", "$set", "$unset", "$changeStreamSplitLargeEvent")
KNOWN_STAGES = (
    *CHANGE_STREAM_STAGES, "$bucket", "$bucketAuto", "$collStats", "$count", "$densify",
    "$documents", "$facet", "$fill",
    "$geoNear", "$graphLookup", "$group", "$indexStats", "$limit", "$listSessions", "$lookup",
    "$merge", "$out", "$planCacheStats", "$sample", "$search", "$setWindowFields", "$skip",
    "$sort", "$sortByCount", "$unionWith", "$unwind", "$changeStream")


class CommandError(Exception):
    """A command failure, sent to the client as ``{ok: 0, code, codeName, errmsg}``."""

    def __init__(self, code: int, errmsg: str, labels: Iterable[str] = ()):
        super().__init__(f"{errmsg} (code {code})")
        self.code = code
        self.errmsg = errmsg
        self.labels = tuple(labels)

    def reply(self) -> dict:
        doc = {"ok": 0.0, "errmsg": self.errmsg, "code": self.code,
               "codeName": CODE_NAMES.get(self.code, f"Location{self.code}")}
        if self.labels:
            doc["errorLabels"] = list(self.labels)
        return doc


def _not_implemented(what: str) -> CommandError:
    return CommandError(2, f"TestPrimary does not implement {what}; extend changerelay/primary.py "
                           "or test this against a real replica set (MONGODB_TEST_URI)")


# --- resume tokens -------------------------------------------------------------------------------
# MongoDB resume tokens are KeyString V1 encodings of (clusterTime, version, tokenType, txnOpIndex,
# fromInvalidate, uuid, eventIdentifier), hex-encoded. Those parts are encoded the same way here,
# so tokens look like the real thing and sort the same way: by cluster time, then a high-water
# mark before any event at the same time, then an event before the invalidate it causes.

TOKEN_VERSION = 2
EVENT_TOKEN, HWM_TOKEN = 128, 0


def _ks_int(n: int) -> bytes:
    if n == 0:
        return b"\x29"
    magnitude = abs(n) << 1
    size = (magnitude.bit_length() + 7) // 8
    body = magnitude.to_bytes(size, "big")
    if n > 0:
        return bytes([0x2A + size]) + body
    return bytes([0x29 - size]) + bytes(b ^ 0xFF for b in body)


def _ks_cstring(s: str) -> bytes:
    return s.encode().replace(b"\x00", b"\x00\xff") + b"\x00"


def _ks_value(value: Any) -> bytes:
    if value is None:
        return b"\x14"
    if isinstance(value, bool):
        return b"\x6f" if value else b"\x6e"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return _ks_int(value)
    if isinstance(value, str):
        return b"\x3c" + _ks_cstring(value)
    if isinstance(value, ObjectId):
        return b"\x64" + value.binary
    if isinstance(value, Timestamp):
        return b"\x82" + value.time.to_bytes(4, "big") + value.inc.to_bytes(4, "big")
    if isinstance(value, Binary):
        return b"\x5a" + bytes([len(value), value.subtype]) + bytes(value)
    if isinstance(value, dict):
        out = b"\x46"
        for key, item in value.items():
            encoded = _ks_value(item)
            out += encoded[:1] + _ks_cstring(key) + encoded
        return out + b"\x00"
    # Types no test needs sorted (doubles, dates, arrays...): opaque but unique per value.
    return b"\x3c" + _ks_cstring(bson.encode({"": value}).hex())


def make_token(ts: Timestamp, *, coll_uuid: Binary | None = None, event_id: dict | None = None,
               from_invalidate: bool = False) -> str:
    """The ``_data`` of an event token, or of a high-water mark when ``event_id`` is None."""
    parts = [_ks_value(ts), _ks_int(TOKEN_VERSION)]
    if event_id is None:
        parts += [_ks_int(HWM_TOKEN), _ks_int(0), _ks_value(False), _ks_value(None)]
    else:
        parts += [_ks_int(EVENT_TOKEN), _ks_int(0), _ks_value(from_invalidate),
                  _ks_value(coll_uuid), _ks_value(event_id)]
    return (b"".join(parts) + b"\x04").hex().upper()


@dataclass(frozen=True)
class TokenData:
    data: str  # normalised (upper-case) hex
    cluster_time: Timestamp
    version: int
    token_type: int
    from_invalidate: bool


def parse_token(token: Any) -> TokenData:
    """Decode a resume token document, failing with the errors mongod gives for bad ones."""
    if not isinstance(token, dict):
        raise CommandError(14, "BSON field '$changeStream.resumeAfter' is the wrong type "
                               f"'{type(token).__name__}', expected type 'object'")
    data = token.get("_data")
    if not isinstance(data, str):
        raise CommandError(40647, "Bad resume token: _data of missing or of wrong type. "
                                  f"Expected string, got {token}")
    try:
        raw = bytes.fromhex(data)
    except ValueError:
        raise CommandError(9, "resume token string was not a valid hex string") from None
    if not raw:
        raise CommandError(40649, "invalid empty resume token")
    reader = _KeyStringReader(raw)
    if raw[0] != 0x82:
        raise CommandError(50811, f"KeyString format error: Unknown type: {raw[0]}")
    reader.pos = 1
    ts = Timestamp(reader.take_uint(4), reader.take_uint(4))
    version = reader.take_int("Resume Token does not contain version", 50796)
    if version not in (1, 2):
        raise CommandError(50795, "Invalid Resume Token: only supports version 0, 1 and 2")
    token_type = reader.take_int("Resume Token does not contain tokenType", 51055)
    if token_type not in (EVENT_TOKEN, HWM_TOKEN):
        raise CommandError(51057, f"Token type {token_type} not recognized")
    reader.take_int("Resume Token does not contain txnOpIndex", 50793)
    flag = reader.take_byte("Resume Token does not contain fromInvalidate", 50872)
    if flag not in (0x6E, 0x6F):
        raise CommandError(50870, "Resume Token fromInvalidate is not a boolean.")
    return TokenData(data.upper(), ts, version, token_type, flag == 0x6F)


class _KeyStringReader:
    def __init__(self, raw: bytes):
        self.raw = raw
        self.pos = 0

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.raw):
            raise CommandError(50811, "KeyString format error: unexpected end of buffer")

    def take_uint(self, n: int) -> int:
        self._need(n)
        value = int.from_bytes(self.raw[self.pos:self.pos + n], "big")
        self.pos += n
        return value

    def take_byte(self, missing: str, code: int) -> int:
        if self.pos >= len(self.raw) or self.raw[self.pos] == 0x04:
            raise CommandError(code, missing)
        self.pos += 1
        return self.raw[self.pos - 1]

    def take_int(self, missing: str, code: int) -> int:
        ctype = self.take_byte(missing, code)
        if ctype == 0x29:
            return 0
        if 0x2B <= ctype <= 0x32:
            return self.take_uint(ctype - 0x2A) >> 1
        raise CommandError(50811, f"KeyString format error: Unknown type: {ctype}")


# --- documents and queries -----------------------------------------------------------------------

_MISSING = object()


def _doc_key(value: Any) -> bytes:
    """A hashable identity for an ``_id`` value (BSON type-sensitive, like a unique index)."""
    return bson.encode({"": value})


def get_path(doc: Any, path: str) -> Any:
    """The value at a dotted path, or ``_MISSING``; no array traversal (see :func:`_candidates`)."""
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _MISSING
    return doc


def _candidates(doc: Any, parts: list[str]) -> list[Any]:
    """Values a query path can refer to, traversing arrays the way MongoDB queries do."""
    if not parts:
        return [doc]
    head, rest = parts[0], parts[1:]
    if isinstance(doc, dict):
        return _candidates(doc[head], rest) if head in doc else []
    if isinstance(doc, list):
        found = []
        if head.isdigit() and int(head) < len(doc):
            found += _candidates(doc[int(head)], rest)
        for item in doc:
            if isinstance(item, dict):
                found += _candidates(item, parts)
        return found
    return []


def _bson_rank(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, bool):
        return 8
    if isinstance(value, int | float | Int64):
        return 2
    if isinstance(value, str):
        return 3
    if isinstance(value, dict):
        return 4
    if isinstance(value, list):
        return 5
    if isinstance(value, Binary | bytes):
        return 6
    if isinstance(value, ObjectId):
        return 7
    if isinstance(value, datetime.datetime):
        return 9
    if isinstance(value, Timestamp):
        return 10
    return 11


def _compare(a: Any, b: Any) -> int | None:
    """-1/0/1 for values of one BSON type bracket, None across brackets (never matches)."""
    if _bson_rank(a) != _bson_rank(b):
        return None
    try:
        return (a > b) - (a < b)
    except TypeError:
        return None


def _sort_key(value: Any) -> tuple:
    if value is _MISSING:
        value = None
    rank = _bson_rank(value)
    if rank in (4, 5, 11):
        return (rank, repr(value))
    return (rank, value)


def _equal_or_contains(values: list[Any], target: Any) -> bool:
    for value in values:
        if value == target and _bson_rank(value) == _bson_rank(target):
            return True
        if isinstance(value, list) and any(item == target for item in value):
            return True
    return False


def _match_operator(values: list[Any], op: str, arg: Any) -> bool:
    flat = values + [item for value in values if isinstance(value, list) for item in value]
    if op == "$eq":
        return _equal_or_contains(values, arg) or (arg is None and not values)
    if op == "$ne":
        return not _match_operator(values, "$eq", arg)
    if op == "$in":
        if not isinstance(arg, list):
            raise CommandError(2, "$in needs an array")
        return any(_match_operator(values, "$eq", item) for item in arg)
    if op == "$nin":
        return not _match_operator(values, "$in", arg)
    if op == "$exists":
        return bool(values) == bool(arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        wanted = {"$gt": (1,), "$gte": (0, 1), "$lt": (-1,), "$lte": (-1, 0)}[op]
        return any(_compare(value, arg) in wanted for value in flat)
    if op == "$not":
        return not _match_value(values, arg)
    if op == "$size":
        return any(isinstance(value, list) and len(value) == arg for value in values)
    raise _not_implemented(f"the query operator {op}")


def _match_value(values: list[Any], condition: Any) -> bool:
    if isinstance(condition, dict) and condition and all(k.startswith("$") for k in condition):
        return all(_match_operator(values, op, arg) for op, arg in condition.items())
    return _match_operator(values, "$eq", condition)


def matches(doc: dict, query: dict) -> bool:
    """Whether ``doc`` satisfies a query filter: equality, comparisons, $in, $and/$or/$nor."""
    for key, condition in query.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(condition, list) or not condition:
                raise CommandError(2, f"{key} must be a nonempty array")
            results = [matches(doc, sub) for sub in condition]
            ok = {"$and": all, "$or": any}.get(key, lambda r: not any(r))(results)
            if not ok:
                return False
        elif key == "$comment":
            continue
        elif key == "$expr":
            if not _truthy(evaluate(condition, doc)):
                return False
        elif key.startswith("$"):
            raise _not_implemented(f"the top-level query operator {key}")
        elif not _match_value(_candidates(doc, key.split(".")), condition):
            return False
    return True


# --- updates -------------------------------------------------------------------------------------
# Modifier updates follow MongoDB's update subsystem (src/mongo/db/update): paths are walked as
# path_support.cpp's findLongestPrefix and createPathAt do, and every change is logged into a diff
# shaped like the $v:2 oplog entry that v2_log_builder.cpp writes. A change event's
# updateDescription is read from that diff as pipeline/change_stream_document_diff_parser.cpp
# reads it, so updatedFields holds exactly the keys MongoDB reports: a created sub-document under
# its first new component, array positions as numbers ("arr.4"), and, per level, the updated
# fields before the created ones.

MAX_ARRAY_PADDING = 1_500_000  # path_support.h kMaxPaddingAllowed


@dataclass
class UpdateResult:
    doc: dict
    is_replacement: bool
    diff: _Diff | None = None  # what a modifier update changed; None for a replacement

    @property
    def changed(self) -> bool:
        return self.is_replacement or bool(self.diff.children)

    def description(self) -> dict:
        """The update event's ``updateDescription``."""
        updated: dict = {}
        removed: list = []
        self.diff.read([], updated, removed)
        return {"updatedFields": updated, "removedFields": removed, "truncatedArrays": []}


class _Diff:
    """One level of a $v:2 update diff: a document changed in place, a new one, or an array.

    Children are keyed by field name, or by position in an array; a leaf is ``("update", value)``,
    ``("insert", value)`` or ``("delete", None)``, as v2_log_builder.cpp's node types.
    """

    def __init__(self, kind: str):
        self.kind = kind  # "document", "new document" or "array"
        self.children: dict = {}

    def log(self, parts: list[str], in_array: list[bool], leaf: tuple,
            first_new: int | None = None) -> None:
        """Record a change at ``parts``; ``in_array[i]`` says part i is an array position."""
        node = self
        for i, part in enumerate(parts[:-1]):
            key = int(part) if in_array[i] else part
            if key not in node.children:
                if in_array[i + 1]:
                    kind = "array"
                elif first_new is not None and i >= first_new:
                    kind = "new document"
                else:
                    kind = "document"
                node.children[key] = _Diff(kind)
            node = node.children[key]
        node.children[int(parts[-1]) if in_array[-1] else parts[-1]] = leaf

    def value(self) -> dict:
        """A new document, as the inserted value it stands for."""
        return {name: child.value() if isinstance(child, _Diff) else child[1]
                for name, child in self.children.items()}

    def read(self, path: list[str], updated: dict, removed: list) -> None:
        """Add this level's changes to updatedFields/removedFields, the change stream's way."""
        def here(name):
            return ".".join([*path, str(name)])

        if self.kind == "array":
            for index in sorted(self.children):
                child = self.children[index]
                if isinstance(child, _Diff) and child.kind != "new document":
                    child.read([*path, str(index)], updated, removed)
                else:
                    updated[here(index)] = child.value() if isinstance(child, _Diff) else child[1]
            return
        items = self.children.items()
        updated.update((here(name), child[1]) for name, child in items
                       if isinstance(child, tuple) and child[0] == "update")
        for name, child in items:
            if isinstance(child, _Diff) and child.kind == "new document":
                updated[here(name)] = child.value()
            elif isinstance(child, tuple) and child[0] == "insert":
                updated[here(name)] = child[1]
        removed.extend(here(name) for name, child in items
                       if isinstance(child, tuple) and child[0] == "delete")
        for name, child in items:
            if isinstance(child, _Diff) and child.kind != "new document":
                child.read([*path, name], updated, removed)


def _is_position(part: str) -> bool:
    return part != "" and all("0" <= c <= "9" for c in part)


def _same(a: Any, b: Any) -> bool:
    """MongoDB's no-op test for an update: binary equality (1 and 1.0 differ, so does order)."""
    return bson.encode({"": a}) == bson.encode({"": b})


def _type_name(value: Any) -> str:
    return {1: "null", 2: "int" if isinstance(value, int) else "double", 3: "string",
            4: "object", 5: "array", 6: "binData", 7: "objectId", 8: "bool",
            9: "date"}.get(_bson_rank(value), type(value).__name__)


def _shown(value: Any) -> str:
    """A value the way MongoDB's error messages print it (BSONElement::toString)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    if isinstance(value, list):
        return "[ " + ", ".join(map(_shown, value)) + " ]" if value else "[]"
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, ObjectId):
        return f"ObjectId('{value}')"
    return str(value)


def _name_order(a: str, b: str) -> int:
    """The order update paths are applied in, per name: numbers numerically, else as strings
    (https://www.mongodb.com/docs/manual/reference/operator/update/#behavior; the comparator is
    update/path_support.h's cmpPathsAndArrayIndexes, zero-padded numbers compared as strings)."""
    def numeric(name: str) -> bool:
        return bool(name) and "0" <= name[0] <= "9" and not (name[0] == "0" and len(name) > 1)

    if numeric(a) and numeric(b) and len(a) != len(b):
        return len(a) - len(b)
    return (a > b) - (a < b)


def _path_order(a: str, b: str) -> int:
    for name_a, name_b in zip(a.split("."), b.split("."), strict=False):
        if order := _name_order(name_a, name_b):
            return order
    return 0  # overlapping paths are refused before anything is applied


def apply_update(old: dict, update: Any, *, inserting: bool = False) -> UpdateResult:
    """Apply an update document the way MongoDB does, recording the diff its event reports."""
    if isinstance(update, list):
        raise _not_implemented("pipeline-style updates")
    if not isinstance(update, dict):
        raise CommandError(14, "Update argument must be either an object or an array")
    operators = [k for k in update if k.startswith("$")]
    if not operators:
        if "_id" in update and update["_id"] != old.get("_id", update["_id"]):
            raise CommandError(66, "After applying the update, the (immutable) field '_id' was "
                                   f"found to have been altered to _id: {_shown(update['_id'])}")
        doc = {"_id": old["_id"]} if "_id" in old else {}
        doc.update({k: copy.deepcopy(v) for k, v in update.items() if k != "_id"})
        if "_id" not in doc and "_id" in update:
            doc = {"_id": update["_id"], **doc}
        return UpdateResult(doc, is_replacement=True)
    if len(operators) != len(update):
        bad = next(k for k in update if not k.startswith("$"))
        raise CommandError(9, f"Unknown modifier: {bad}. Expected a valid update modifier or "
                              "pipeline-style update specified as an array")
    changes = []
    for op, spec in update.items():
        if op not in _UPDATE_OPERATORS:
            raise _not_implemented(f"the update operator {op}")
        if not isinstance(spec, dict):
            raise CommandError(9, f"Modifiers operate on fields but we found type "
                                  f"{_type_name(spec)} instead.")
        for path, arg in spec.items():
            _check_update_path(path, [p for _, p, _ in changes])
            changes.append((op, path, arg))
    doc = copy.deepcopy(old)
    diff = _Diff("document")
    by_path = functools.cmp_to_key(lambda x, y: _path_order(x[1], y[1]))
    for op, path, arg in sorted(changes, key=by_path):
        if op == "$setOnInsert" and not inserting:
            continue
        touches_id = path == "_id" or path.startswith("_id.")
        if touches_id and "_id" in old and not (path == "_id" and _same(arg, old["_id"])):
            raise CommandError(66, "Performing an update on the path '_id' would modify the "
                                   "immutable field '_id'")
        _UPDATE_OPERATORS[op](doc, diff, path.split("."), arg)
    return UpdateResult(doc, is_replacement=False, diff=diff)


def _overlap(path: str, other: str) -> str | None:
    """The shorter of two dotted paths when one is the other or a prefix of it, else None."""
    shorter, longer = sorted((path, other), key=len)
    return shorter if shorter == longer or longer.startswith(shorter + ".") else None


def _check_update_path(path: str, earlier: list[str]) -> None:
    parts = path.split(".")
    if "" in parts:
        raise CommandError(56, f"An update path '{path}' contains an empty field name, which is "
                               "not allowed.")
    if any(part.startswith("$") for part in parts):
        raise _not_implemented("positional update operators ($, $[], $[<identifier>])")
    for other in earlier:
        if (conflict := _overlap(path, other)) is not None:
            raise CommandError(40, f"Updating the path '{path}' would create a conflict at "
                                   f"'{conflict}'")


def _walk(doc: dict, parts: list[str]) -> tuple[int, Any, list[bool]]:
    """How far ``parts`` exists in ``doc`` (findLongestPrefix): the number of parts found, the
    value the last of them names, and which of them are array positions."""
    node, in_array = doc, []
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
            in_array.append(False)
        elif isinstance(node, list) and _is_position(part) and int(part) < len(node):
            node = node[int(part)]
            in_array.append(True)
        else:
            return i, node, in_array
    return len(parts), node, in_array


def _parent(doc: dict, parts: list[str]) -> Any:
    return _walk(doc, parts[:-1])[1] if len(parts) > 1 else doc


def _key(container: Any, part: str) -> str | int:
    return int(part) if isinstance(container, list) else part


def _canonical(parts: list[str], in_array: list[bool]) -> list[str]:
    """Array positions as MongoDB logs them: the number, without leading zeros."""
    return [str(int(part)) if position else part for part, position in zip(parts, in_array,
                                                                             strict=True)]


def _create(doc: dict, diff: _Diff, parts: list[str], value: Any) -> None:
    """Create the missing end of ``parts`` holding ``value`` (createPathAt), padding an array
    with nulls up to a new position, and log it as created from the first new component."""
    found, node, in_array = _walk(doc, parts)
    part = parts[found]
    name = parts[found - 1] if found else ""
    if not isinstance(node, dict | list) or (isinstance(node, list) and not _is_position(part)):
        raise CommandError(28, f"Cannot create field '{part}' in element "
                               f"{{{name}: {_shown(node)}}}")
    new = copy.deepcopy(value)
    for inner in reversed(parts[found + 1:]):
        new = {inner: new}
    if isinstance(node, list):
        padding = int(part) - len(node)
        if padding > MAX_ARRAY_PADDING:
            raise CommandError(10, f"can't backfill more than {MAX_ARRAY_PADDING} elements")
        node.extend([None] * padding)
        node.append(new)
    else:
        node[part] = new
    in_array += [isinstance(node, list)] + [False] * (len(parts) - found - 1)
    diff.log(_canonical(parts, in_array), in_array, ("insert", copy.deepcopy(value)), found)


def _replace(doc: dict, diff: _Diff, parts: list[str], value: Any) -> None:
    _, current, in_array = _walk(doc, parts)
    if _same(current, value):
        return
    parent = _parent(doc, parts)
    parent[_key(parent, parts[-1])] = copy.deepcopy(value)
    diff.log(_canonical(parts, in_array), in_array, ("update", copy.deepcopy(value)))


def _set(doc: dict, diff: _Diff, parts: list[str], value: Any) -> None:
    found, _, _ = _walk(doc, parts)
    (_replace if found == len(parts) else _create)(doc, diff, parts, value)


def _unset(doc: dict, diff: _Diff, parts: list[str], _arg: Any) -> None:
    found, _, in_array = _walk(doc, parts)
    if found < len(parts):
        return  # nothing there, even through a scalar: $unset is a no-op (unset_node.cpp)
    parent = _parent(doc, parts)
    if isinstance(parent, list):  # an array element becomes null, the array keeps its length
        parent[int(parts[-1])] = None
        diff.log(_canonical(parts, in_array), in_array, ("update", None))
    else:
        del parent[parts[-1]]
        diff.log(_canonical(parts, in_array), in_array, ("delete", None))


def _number(value: Any) -> bool:
    return isinstance(value, int | float | Int64) and not isinstance(value, bool)


def _inc(doc: dict, diff: _Diff, parts: list[str], arg: Any) -> None:
    path = ".".join(parts)
    if not _number(arg):
        raise CommandError(14, f"Cannot increment with non-numeric argument: {{{path}: "
                               f"{_shown(arg)}}}")
    found, current, _ = _walk(doc, parts)
    if found < len(parts):
        _create(doc, diff, parts, arg)
    elif not _number(current):
        raise CommandError(14, f"Cannot apply $inc to a value of non-numeric type. "
                               f"{{_id: {_shown(doc.get('_id'))}}} has the field '{path}' of "
                               f"non-numeric type {_type_name(current)}")
    else:
        _replace(doc, diff, parts, current + arg)


def _push(doc: dict, diff: _Diff, parts: list[str], arg: Any) -> None:
    """$push: a document with $each holds modifiers, any other value is the element to push;
    an append logs each new element, a push onto an empty array the whole array (push_node.cpp)."""
    if isinstance(arg, dict) and "$each" in arg:
        if set(arg) != {"$each"}:
            raise _not_implemented("$push modifiers other than $each")
        if not isinstance(arg["$each"], list):
            raise CommandError(2, "The argument to $each in $push must be an array but it was of "
                                  f"type: {_type_name(arg['$each'])}")
        items = arg["$each"]
    else:
        items = [arg]
    found, current, in_array = _walk(doc, parts)
    if found < len(parts):
        _create(doc, diff, parts, items)
        return
    if not isinstance(current, list):
        raise CommandError(2, f"The field '{'.'.join(parts)}' must be an array but is of type "
                              f"{_type_name(current)} in document {{_id: "
                              f"{_shown(doc.get('_id'))}}}")
    if not items:
        return
    if not current:
        _replace(doc, diff, parts, items)
        return
    path = _canonical(parts, in_array)
    for item in items:
        current.append(copy.deepcopy(item))
        diff.log([*path, str(len(current) - 1)], [*in_array, True], ("insert", copy.deepcopy(item)),
                 len(parts))


_UPDATE_OPERATORS: dict[str, Callable[[dict, _Diff, list[str], Any], None]] = {
    "$set": _set, "$setOnInsert": _set, "$unset": _unset, "$inc": _inc, "$push": _push,
}


# --- aggregation expressions ---------------------------------------------------------------------

def evaluate(expr: Any, doc: dict, variables: dict | None = None) -> Any:
    """Aggregation expressions: field paths, variables, and the operators in ``_OPERATORS``.

    Returns ``_MISSING`` where MongoDB's result is "missing" (an absent field, ``$$REMOVE``).
    """
    variables = variables or {}
    if isinstance(expr, str) and expr.startswith("$$"):
        name, _, rest = expr[2:].partition(".")
        if name == "REMOVE":
            return _MISSING
        if name in ("ROOT", "CURRENT"):
            base = doc
        elif name in variables:
            base = variables[name]
        else:
            raise CommandError(17276, f"Use of undefined variable: {name}")
        return _agg_path(base, rest.split(".")) if rest else base
    if isinstance(expr, str) and expr.startswith("$"):
        return _agg_path(doc, expr[1:].split("."))
    if isinstance(expr, dict):
        keys = list(expr)
        if keys and keys[0].startswith("$"):
            if len(keys) != 1:
                raise CommandError(15983, "An object representing an expression must have "
                                          f"exactly one field: {expr}")
            operator = _OPERATORS.get(keys[0])
            if operator is None:
                raise _not_implemented(f"the expression operator {keys[0]}")
            return operator(expr[keys[0]], doc, variables)
        out = {}
        for key, sub in expr.items():
            value = evaluate(sub, doc, variables)
            if value is not _MISSING:
                out[key] = value
        return out
    if isinstance(expr, list):
        return [None if (v := evaluate(item, doc, variables)) is _MISSING else v for item in expr]
    return expr


def _agg_path(value: Any, parts: list[str]) -> Any:
    """A field path the aggregation way: through an array, it maps over the elements."""
    for i, part in enumerate(parts):
        if isinstance(value, dict):
            if part not in value:
                return _MISSING
            value = value[part]
        elif isinstance(value, list):
            found = [_agg_path(item, parts[i:]) for item in value if isinstance(item, dict | list)]
            return [item for item in found if item is not _MISSING]
        else:
            return _MISSING
    return value


def _truthy(value: Any) -> bool:
    if value is _MISSING or value is None or value is False:
        return False
    return not (isinstance(value, int | float) and value == 0)


def _agg_type(value: Any) -> str:
    if value is _MISSING:
        return "missing"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, Int64):
        return "long"
    if isinstance(value, int):
        return "int" if -(2 ** 31) <= value < 2 ** 31 else "long"
    names = [(type(None), "null"), (float, "double"), (str, "string"), (dict, "object"),
             (list, "array"), (ObjectId, "objectId"), (datetime.datetime, "date"),
             (Timestamp, "timestamp"), (bytes, "binData"), (bson.Decimal128, "decimal"),
             (bson.Regex, "regex")]
    return next((name for kind, name in names if isinstance(value, kind)), "unknown")


def _agg_compare(a: Any, b: Any) -> int:
    """BSON comparison order; missing sorts before null, as in aggregation."""
    rank_a = 0 if a is _MISSING else _bson_rank(a)
    rank_b = 0 if b is _MISSING else _bson_rank(b)
    if rank_a != rank_b:
        return (rank_a > rank_b) - (rank_a < rank_b)
    if a == b:
        return 0
    try:
        return (a > b) - (a < b)
    except TypeError:
        return (repr(a) > repr(b)) - (repr(a) < repr(b))


def _values(arg: Any, doc: dict, variables: dict) -> list:
    return [evaluate(item, doc, variables) for item in (arg if isinstance(arg, list) else [arg])]


def _comparison(test: Callable[[int], bool]) -> Callable:
    def operator(arg, doc, variables):
        a, b = _values(arg, doc, variables)
        return test(_agg_compare(a, b))
    return operator


def _cond(arg, doc, variables):
    if isinstance(arg, dict):
        arg = [arg.get("if"), arg.get("then"), arg.get("else")]
    condition, then, otherwise = arg
    chosen = then if _truthy(evaluate(condition, doc, variables)) else otherwise
    return evaluate(chosen, doc, variables)


def _if_null(arg, doc, variables):
    values = _values(arg, doc, variables)
    return next((v for v in values[:-1] if v is not _MISSING and v is not None), values[-1])


def _in(arg, doc, variables):
    value, array = _values(arg, doc, variables)
    if not isinstance(array, list):
        raise CommandError(40081, "$in requires an array as a second argument, found: "
                                  f"{_agg_type(array)}")
    return any(_agg_compare(value, item) == 0 for item in array)


def _object_to_array(arg, doc, variables):
    (value,) = _values(arg, doc, variables)
    if value is _MISSING or value is None:
        return None
    if not isinstance(value, dict):
        raise CommandError(40390, f"$objectToArray requires a document input, found: "
                                  f"{_agg_type(value)}")
    return [{"k": k, "v": v} for k, v in value.items()]


def _array_to_object(arg, doc, variables):
    """[k, v] pairs or {k, v} documents, in the format of the first element; a repeated name
    keeps its last value (expression.cpp ExpressionArrayToObject, and its manual page)."""
    (value,) = _values(arg, doc, variables)
    if _nullish(value):
        return None
    if not isinstance(value, list):
        raise CommandError(40386, f"$arrayToObject requires an array input, found: "
                                  f"{_agg_type(value)}")
    if value and not isinstance(value[0], list | dict):
        raise CommandError(40398, "Unrecognised input type format for $arrayToObject: "
                                  f"{_agg_type(value[0])}")
    out = {}
    for item in value:
        if isinstance(value[0], list):
            if not isinstance(item, list):
                raise CommandError(40396, "$arrayToObject requires a consistent input format. "
                                          "Elements mustall be arrays or all be objects. Array "
                                          f"was detected, now found: {_agg_type(item)}")
            if len(item) != 2:
                raise CommandError(40397, "$arrayToObject requires an array of size 2 arrays,"
                                          f"found array of size: {len(item)}")
            key, item_value = item
        else:
            if not isinstance(item, dict) or set(item) != {"k", "v"}:
                raise CommandError(40392, "$arrayToObject requires an object keys of 'k' and "
                                          f"'v'. Found: {_shown(item)}")
            key, item_value = item["k"], item["v"]
        if not isinstance(key, str):
            raise CommandError(40394, "$arrayToObject requires an object with keys 'k' and 'v', "
                                      "where the value of 'k' must be of type string. Found "
                                      f"type: {_agg_type(key)}")
        if "\x00" in key:
            raise CommandError(4940401, "Key field cannot contain an embedded null byte")
        out[key] = item_value
    return out


def _filter(arg, doc, variables):
    arg = _named_arguments("$filter", arg, ("input", "cond"), ("as", "limit"))
    if "limit" in arg:
        raise _not_implemented("$filter's limit")
    items = evaluate(arg["input"], doc, variables)
    if _nullish(items):
        return None
    if not isinstance(items, list):
        raise CommandError(28651, f"input to $filter must be an array not {_agg_type(items)}")
    name = arg.get("as", "this")
    return [item for item in items
            if _truthy(evaluate(arg["cond"], doc, {**variables, name: item}))]


def _map(arg, doc, variables):
    arg = _named_arguments("$map", arg, ("input", "in"), ("as",))
    items = evaluate(arg["input"], doc, variables)
    if _nullish(items):
        return None
    if not isinstance(items, list):
        raise CommandError(16883, f"input to $map must be an array not {_agg_type(items)}")
    name = arg.get("as", "this")
    mapped = [evaluate(arg["in"], doc, {**variables, name: item}) for item in items]
    return [None if item is _MISSING else item for item in mapped]


def _concat(arg, doc, variables):
    values = _values(arg, doc, variables)
    if any(v is _MISSING or v is None for v in values):
        return None
    return "".join(values)


def _size(arg, doc, variables):
    (value,) = _values(arg, doc, variables)
    if not isinstance(value, list):
        raise CommandError(17124, "The argument to $size must be an array. Type of argument is "
                                  f"{_agg_type(value)}")
    return len(value)


def _nullish(value: Any) -> bool:
    return value is _MISSING or value is None


def _arity(name: str, arg: Any, doc: dict, variables: dict, count: int) -> list:
    values = _values(arg, doc, variables)
    if len(values) != count:
        raise CommandError(16020, f"Expression {name} takes exactly {count} arguments. "
                                  f"{len(values)} were passed in.")
    return values


def _named_arguments(name: str, arg: Any, required: tuple[str, ...],
                     optional: tuple[str, ...] = ()) -> dict:
    """The object of named arguments an operator such as $filter takes, checked."""
    if not isinstance(arg, dict):
        raise CommandError(2, f"{name} expects an object of named arguments but found: "
                              f"{_agg_type(arg)}")
    for key in arg:
        if key not in required + optional:
            raise CommandError(2, f"{name} found an unknown argument: {key}")
    for key in required:
        if key not in arg:
            raise CommandError(2, f"{name} requires '{key}' parameter")
    return arg


def _switch(arg, doc, variables):
    # https://www.mongodb.com/docs/manual/reference/operator/aggregation/switch/
    arg = _named_arguments("$switch", arg, ("branches",), ("default",))
    if not isinstance(arg["branches"], list):
        raise CommandError(40061, "$switch expected an array for 'branches'")
    for branch in arg["branches"]:
        branch = _named_arguments("$switch branch", branch, ("case", "then"))
        if _truthy(evaluate(branch["case"], doc, variables)):
            return evaluate(branch["then"], doc, variables)
    if "default" not in arg:
        raise CommandError(40066, "$switch could not find a matching branch for an input, and no "
                                  "default was specified.")
    return evaluate(arg["default"], doc, variables)


_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


@functools.lru_cache(maxsize=256)
def _compiled_regex(pattern: str, options: str) -> re.Pattern:
    flags = 0
    for option in options:
        if option not in _REGEX_FLAGS:
            raise CommandError(51108, f"$regexMatch invalid flag in regex options: {option}")
        flags |= _REGEX_FLAGS[option]
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise CommandError(51111, f"Invalid Regex in $regexMatch: {exc}") from None


def _regex_match(arg, doc, variables):
    """$regexMatch (https://www.mongodb.com/docs/manual/reference/operator/aggregation/regexMatch/):
    false when input or regex is null or missing. MongoDB uses PCRE; Python's re agrees with it on
    the anchors, groups, classes, quantifiers and backslash-escaped punctuation the relay writes."""
    arg = _named_arguments("$regexMatch", arg, ("input", "regex"), ("options",))
    text = evaluate(arg["input"], doc, variables)
    pattern = evaluate(arg["regex"], doc, variables)
    options = evaluate(arg.get("options", ""), doc, variables)
    if _nullish(text) or _nullish(pattern):
        return False
    if not isinstance(text, str):
        raise CommandError(51104, "$regexMatch needs 'input' to be of type string")
    if not isinstance(pattern, str):
        raise _not_implemented("$regexMatch with a regex that is not a string")
    if not isinstance(options, str):
        raise CommandError(51106, "$regexMatch needs 'options' to be of type string")
    return _compiled_regex(pattern, options).search(text) is not None


def _constant_field(name: str, arg: Any) -> str:
    """$setField/$unsetField's 'field': "a valid expression that resolves to a string constant"."""
    field = arg["$literal"] if isinstance(arg, dict) and list(arg) == ["$literal"] else arg
    if isinstance(field, dict | list) or (isinstance(field, str) and field.startswith("$")):
        raise CommandError(4161106, f"{name} requires 'field' to evaluate to a constant, but got a "
                                    "non-constant argument")
    if not isinstance(field, str):
        raise CommandError(4161107, f"{name} requires 'field' to evaluate to type String, but got "
                                    f"{_agg_type(field)}")
    return field


def _set_field(arg, doc, variables, name="$setField"):
    """$setField (https://www.mongodb.com/docs/manual/reference/operator/aggregation/setField/):
    null for a null or missing input, an error for any other non-object, and a value of $$REMOVE
    removes the field. The field keeps its place when it exists, else it is appended."""
    required = ("field", "input") if name == "$unsetField" else ("field", "input", "value")
    arg = _named_arguments(name, arg, required)
    field = _constant_field(name, arg["field"])
    target = evaluate(arg["input"], doc, variables)
    if _nullish(target):
        return None
    if not isinstance(target, dict):
        raise CommandError(4161105, f"{name} requires 'input' to evaluate to type Object")
    value = _MISSING if name == "$unsetField" else evaluate(arg["value"], doc, variables)
    out = dict(target)
    if value is _MISSING:
        out.pop(field, None)
    else:
        out[field] = value
    return out


def _get_field(arg, doc, variables):
    """$getField (https://www.mongodb.com/docs/manual/reference/operator/aggregation/getField/):
    missing when the field is absent, null for a null or missing input."""
    if not (isinstance(arg, dict) and "field" in arg):
        arg = {"field": arg}
    arg = _named_arguments("$getField", arg, ("field",), ("input",))
    field = evaluate(arg["field"], doc, variables)
    if not isinstance(field, str):
        raise CommandError(3041704, "$getField requires 'field' to evaluate to type String, but "
                                    f"got {_agg_type(field)}")
    target = evaluate(arg.get("input", "$$CURRENT"), doc, variables)
    if _nullish(target):
        return None
    if not isinstance(target, dict):
        raise CommandError(3041705, "$getField requires 'input' to evaluate to type Object, but "
                                    f"got {_agg_type(target)}")
    return target.get(field, _MISSING)


def _array_elem_at(arg, doc, variables):
    """$arrayElemAt: a negative index counts from the end; out of bounds is missing (docs)."""
    array, index = _arity("$arrayElemAt", arg, doc, variables, 2)
    if _nullish(array) or _nullish(index):
        return None
    if not isinstance(array, list):
        raise CommandError(28689, "$arrayElemAt's first argument must be an array, but is "
                                  f"{_agg_type(array)}")
    if not _number(index) or int(index) != index:
        raise CommandError(28690, "$arrayElemAt's second argument must be a numeric value, but "
                                  f"is {_agg_type(index)}")
    position = int(index) + (len(array) if index < 0 else 0)
    return array[position] if 0 <= position < len(array) else _MISSING


def _let(arg, doc, variables):
    arg = _named_arguments("$let", arg, ("vars", "in"))
    bound = {name: evaluate(value, doc, variables) for name, value in arg["vars"].items()}
    return evaluate(arg["in"], doc, {**variables, **bound})


_OPERATORS: dict[str, Callable[[Any, dict, dict], Any]] = {
    "$literal": lambda arg, doc, variables: arg,
    "$eq": _comparison(lambda c: c == 0), "$ne": _comparison(lambda c: c != 0),
    "$gt": _comparison(lambda c: c > 0), "$gte": _comparison(lambda c: c >= 0),
    "$lt": _comparison(lambda c: c < 0), "$lte": _comparison(lambda c: c <= 0),
    "$cmp": lambda arg, doc, variables: _agg_compare(*_values(arg, doc, variables)),
    "$and": lambda arg, doc, variables: all(_truthy(evaluate(a, doc, variables))
                                            for a in (arg if isinstance(arg, list) else [arg])),
    "$or": lambda arg, doc, variables: any(_truthy(evaluate(a, doc, variables))
                                           for a in (arg if isinstance(arg, list) else [arg])),
    "$not": lambda arg, doc, variables: not _truthy(_values(arg, doc, variables)[0]),
    "$cond": _cond, "$ifNull": _if_null, "$in": _in,
    "$type": lambda arg, doc, variables: _agg_type(_values(arg, doc, variables)[0]),
    "$objectToArray": _object_to_array, "$arrayToObject": _array_to_object,
    "$filter": _filter, "$map": _map,
    "$concat": _concat, "$size": _size,
    "$switch": _switch, "$regexMatch": _regex_match, "$let": _let,
    "$setField": _set_field,
    "$unsetField": lambda arg, doc, variables: _set_field(arg, doc, variables, "$unsetField"),
    "$getField": _get_field, "$arrayElemAt": _array_elem_at,
    "$isArray": lambda arg, doc, variables: isinstance(
        _arity("$isArray", arg, doc, variables, 1)[0], list),
}


# --- aggregation stages --------------------------------------------------------------------------
# $project, $unset and $set/$addFields are projections, parsed into a tree of paths and applied to
# each document the way MongoDB's projection executor does:
#   - parsing: query/projection_parser.cpp (addNodeAtPath: "Path collision at ..." 31249/31250)
#     for $project and $unset, which MongoDB builds as an exclusion projection
#     (pipeline/document_source_project.cpp); exec/add_fields_projection_executor.cpp for $set
#     ("specification contains two conflicting paths" 40176, dotted names in a sub-object 40183);
#     errors carry the stage as context: "Invalid $unset :: caused by :: ...";
#   - applying: exec/projection_node.cpp. Exclusion walks into documents and through arrays,
#     nested arrays included (aggregation's kRecurseNestedArrays, query/projection_policies.h),
#     and leaves scalars be; inclusion drops what it does not name, scalars in arrays too.
#     Computed fields are evaluated against the stage's input document; through an array they
#     are set in every element, and a scalar or missing parent is replaced by a new document of
#     the computed fields - so {$set: {"a.b": "$$REMOVE"}} still creates {a: {}}.

Stage = Callable[[dict], "dict | None"]


@dataclass(frozen=True)
class _Computed:
    expr: Any


class _Paths(dict):
    """One level of a parsed projection: name -> sub-level, or a leaf: True (include),
    False (exclude) or a :class:`_Computed` field."""

    computed = False  # whether a computed field lies below


def _field_path(path: str) -> list[str]:
    # pipeline/field_path.cpp
    if not path:
        raise CommandError(40352, "FieldPath cannot be constructed with empty string")
    parts = path.split(".")
    if "" in parts:
        raise CommandError(15998, "FieldPath field names may not be empty strings.")
    if any(part.startswith("$") for part in parts):
        raise CommandError(16410, "FieldPath field names may not start with '$'. Consider using "
                                  "$getField or $setField.")
    return parts


def _add_path(root: _Paths, path: str, leaf: Any) -> None:
    """projection_parser.cpp's addNodeAtPath, with its two path-collision errors."""
    parts = _field_path(path)
    node = root
    for i, part in enumerate(parts):
        if isinstance(leaf, _Computed):
            node.computed = True
        child = node.get(part)
        if i == len(parts) - 1:
            if child is not None:
                raise CommandError(31250, f"Path collision at {path}")
            node[part] = leaf
            return
        if child is None:
            child = node[part] = _Paths()
        elif not isinstance(child, _Paths):
            raise CommandError(31249, f"Path collision at {path} remaining portion "
                                      f"{'.'.join(parts[1:])}")
        node = child


def _is_flag(value: Any) -> bool:
    """A projection value meaning include/exclude: bool or number (isInclusionOrExclusionType)."""
    return isinstance(value, bool | int | float | Int64 | bson.Decimal128)


def _truthy_flag(value: Any) -> bool:
    return value.to_decimal() != 0 if isinstance(value, bson.Decimal128) else bool(value)


def _is_expression_object(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)).startswith("$")


def _parse_projection(items: list[tuple[str, Any]]) -> tuple[_Paths, bool]:
    """A $project/$unset specification as (paths, is an inclusion), by projection_parser.cpp."""
    if not items:
        raise CommandError(51272, "projection specification must have at least one field")
    root, kind = _Paths(), None
    id_included = id_excluded = id_named = False
    for path, value in items:
        top_id = path == "_id"
        id_named = id_named or top_id or path.startswith("_id.")
        if _is_flag(value):
            include = _truthy_flag(value)
            leaf: Any = include
            if top_id:
                id_included, id_excluded = include, not include
            elif include and kind == "exclusion":
                raise CommandError(31253, f"Cannot do inclusion on field {path} in exclusion "
                                          "projection")
            elif not include and kind == "inclusion":
                raise CommandError(31254, f"Cannot do exclusion on field {path} in inclusion "
                                          "projection")
            else:
                kind = "inclusion" if include else "exclusion"
        elif isinstance(value, dict) and not _is_expression_object(value):
            raise _not_implemented("sub-object projections; write dotted paths instead")
        else:
            if kind == "exclusion" and isinstance(value, dict):
                raise CommandError(31252, "Cannot use expression other than $meta in exclusion "
                                          "projection")
            if kind == "exclusion":
                raise CommandError(31310, f"Cannot use an expression {path}: {_shown(value)} in "
                                          "an exclusion projection")
            kind, leaf = "inclusion", _Computed(value)
            _check_expression(value)
        _add_path(root, path, leaf)
    inclusion = kind == "inclusion" or (kind is None and id_included and not id_excluded)
    if inclusion and not id_named:
        _add_path(root, "_id", True)
    if not inclusion and id_included:
        del root["_id"]
    return root, inclusion


def _exclude(value: Any, paths: _Paths) -> Any:
    """ProjectionNode::applyProjectionsToValue for an exclusion."""
    if isinstance(value, dict):
        out = {}
        for name, item in value.items():
            leaf = paths.get(name, True)
            if isinstance(leaf, _Paths):
                out[name] = _exclude(item, leaf)
            elif leaf is not False:
                out[name] = item
        return out
    if isinstance(value, list):
        return [_exclude(item, paths) for item in value]
    return value


def _include(value: Any, paths: _Paths) -> Any:
    """ProjectionNode::applyProjectionsToValue for an inclusion: a scalar is dropped."""
    if isinstance(value, dict):
        out = {}
        for name, item in value.items():
            leaf = paths.get(name)
            if leaf is True:
                out[name] = item
            elif isinstance(leaf, _Paths) and (kept := _include(item, leaf)) is not _MISSING:
                out[name] = kept
        return out
    if isinstance(value, list):
        return [kept for item in value if (kept := _include(item, paths)) is not _MISSING]
    return _MISSING


def _compute(root: dict, out: dict, paths: _Paths) -> None:
    """ProjectionNode::applyExpressions: set ``out``'s computed fields, in the order named."""
    for name, leaf in paths.items():
        if isinstance(leaf, _Paths) and leaf.computed:
            value = _compute_into(root, out.get(name, _MISSING), leaf)
        elif isinstance(leaf, _Computed):
            value = evaluate(leaf.expr, root)
        else:
            continue
        if value is _MISSING:
            out.pop(name, None)
        else:
            out[name] = value


def _compute_into(root: dict, value: Any, paths: _Paths) -> Any:
    """ProjectionNode::applyExpressionsToValue: into a document, through every element of an
    array, and in place of anything else - a scalar, or nothing - a new document."""
    if isinstance(value, list):
        return [_compute_into(root, item, paths) for item in value]
    out = dict(value) if isinstance(value, dict) else {}
    _compute(root, out, paths)
    return out


def _projection(items: list[tuple[str, Any]]) -> Stage:
    paths, inclusion = _parse_projection(items)
    if not inclusion:
        return lambda doc: _exclude(doc, paths)

    def project(doc: dict) -> dict:
        out = _include(doc, paths)
        if paths.computed:
            _compute(doc, out, paths)
        return out
    return project


def _project_stage(spec: Any) -> Stage:
    if not isinstance(spec, dict):
        raise CommandError(15969, "$project specification must be an object")
    return _projection(list(spec.items()))


def _unset_stage(spec: Any) -> Stage:
    # document_source_project.cpp: $unset is an exclusion projection of the named paths
    if not isinstance(spec, str | list):
        raise CommandError(31002, "$unset specification must be a string or an array")
    names = [spec] if isinstance(spec, str) else spec
    if not names:
        raise CommandError(31119, "$unset specification must be a string or an array with at "
                                  "least one field")
    if not all(isinstance(name, str) for name in names):
        raise CommandError(31120, "$unset specification must be a string or an array containing "
                                  "only string values")
    return _projection([(name, 0) for name in names])


def _add_fields_stage(spec: Any) -> Stage:
    """$set/$addFields: a nested object that is not an expression names sub-fields
    ({a: {b: 1}} sets a.b), an empty one is the value {}."""
    if not isinstance(spec, dict):
        raise CommandError(40272, f"specification must be an object, got {_agg_type(spec)}")
    paths, seen = _Paths(), []

    def add(path: str, value: Any) -> None:
        for other in seen:
            if _overlap(path, other) is not None:
                raise CommandError(40176, "specification contains two conflicting paths. Cannot "
                                          f"specify both '{path}' and '{other}': {_shown(spec)}")
        seen.append(path)
        _check_expression(value)
        _add_path(paths, path, _Computed(value))

    def parse(path: str, value: Any) -> None:
        if not isinstance(value, dict) or not value or _is_expression_object(value):
            add(path, value)
            return
        for name, item in value.items():
            if name.startswith("$"):
                raise CommandError(40181, "an expression specification must contain exactly one "
                                          f"field, the name of the expression. Found {len(value)} "
                                          f"fields in {_shown(value)}, while parsing object "
                                          f"{_shown(spec)}")
            if "." in name:
                raise CommandError(40183, f"cannot use dotted field name '{name}' in a sub "
                                          f"object: {_shown(spec)}")
            parse(f"{path}.{name}", item)

    for path, value in spec.items():
        parse(path, value)

    def add_fields(doc: dict) -> dict:
        out = dict(doc)
        _compute(doc, out, paths)
        return out
    return add_fields


def _replace_root_stage(name: str, spec: Any) -> Stage:
    expr = spec.get("newRoot") if name == "$replaceRoot" and isinstance(spec, dict) else spec
    _check_expression(expr)

    def replace_root(doc: dict) -> dict:
        root = evaluate(expr, doc)
        if not isinstance(root, dict):
            shown = "MISSING" if root is _MISSING else _shown(root)
            raise CommandError(40228, "'newRoot' expression must evaluate to an object, but "
                                      f"resulting value was: {shown}")
        return root
    return replace_root


def compile_stage(name: str, spec: Any) -> Stage:
    """One stage as a function of a document (None: filtered out). Its specification is checked
    here, when the pipeline is parsed, as MongoDB checks it when the aggregate command arrives."""
    if name == "$match":
        return lambda doc: doc if matches(doc, spec) else None
    if name in ("$replaceRoot", "$replaceWith"):
        return _replace_root_stage(name, spec)
    projection = {"$project": _project_stage, "$unset": _unset_stage,
                  "$set": _add_fields_stage, "$addFields": _add_fields_stage}.get(name)
    if projection is None:
        raise _not_implemented(f"the {name} stage")
    try:
        return projection(spec)
    except CommandError as exc:
        raise CommandError(exc.code, f"Invalid {name} :: caused by :: {exc.errmsg}") from None


def _check_expression(expr: Any) -> None:
    """Refuse, when the stage is parsed, an expression operator this primary cannot evaluate."""
    if isinstance(expr, list):
        for item in expr:
            _check_expression(item)
    elif isinstance(expr, dict):
        if _is_expression_object(expr):
            ((operator, arg),) = expr.items()
            if operator == "$literal":
                return
            if operator not in _OPERATORS:
                raise _not_implemented(f"the expression operator {operator}")
            expr = {"": arg}
        for item in expr.values():
            _check_expression(item)


def _check_stage(stage: Any) -> tuple[str, Any]:
    if not isinstance(stage, dict) or len(stage) != 1:
        raise CommandError(40323, "A pipeline stage specification object must contain exactly "
                                  "one field.")
    name, spec = next(iter(stage.items()))
    if name not in KNOWN_STAGES:
        raise CommandError(40324, f"Unrecognized pipeline stage name: '{name}'")
    return name, spec


def run_pipeline(docs: list[dict], stages: list[tuple[str, Any]]) -> list[dict]:
    """A plain (non-change-stream) aggregation over ``docs``."""
    for name, spec in stages:
        if name == "$limit":
            docs = docs[:spec]
        elif name == "$skip":
            docs = docs[spec:]
        elif name == "$sort":
            docs = _sorted(docs, spec)
        elif name == "$count":
            docs = [{spec: len(docs)}] if docs else []
        elif name == "$group":
            docs = _group(docs, spec)
        else:
            stage = compile_stage(name, spec)
            docs = [out for doc in docs if (out := stage(doc)) is not None]
    return docs


def _sorted(docs: list[dict], spec: dict) -> list[dict]:
    for path, direction in reversed(list(spec.items())):
        docs = sorted(docs, key=lambda d, p=path: _sort_key(get_path(d, p)),
                      reverse=direction == -1)
    return docs


def _group(docs: list[dict], spec: dict) -> list[dict]:
    key_expr = spec.get("_id")
    groups: dict[bytes, dict] = {}
    for doc in docs:
        key = evaluate(key_expr, doc)
        key = None if key is _MISSING else key
        group = groups.setdefault(_doc_key(key), {"_id": key})
        for name, acc in spec.items():
            if name == "_id":
                continue
            if not isinstance(acc, dict) or list(acc) != ["$sum"]:
                raise _not_implemented(f"the $group accumulator {acc}")
            value = evaluate(acc["$sum"], doc)
            number = value if isinstance(value, int | float) and not isinstance(value, bool) else 0
            group[name] = group.get(name, 0) + number
    return list(groups.values())


# --- state ---------------------------------------------------------------------------------------

# Stored documents and logged events are never changed in place: every write builds new dicts
# (apply_update works on a deep copy), so documents, events and images may share structure,
# and replies may include them without copying.

@dataclass
class Collection:
    uuid: Binary
    docs: dict[bytes, dict] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    indexes: list = field(default_factory=lambda: [{"v": 2, "key": {"_id": 1}, "name": "_id_"}])

    @property
    def images(self) -> bool:
        return bool(self.options.get("changeStreamPreAndPostImages", {}).get("enabled"))


@dataclass
class Entry:
    """One oplog-ish entry: a change event plus what the server knows beside it."""

    token: str
    event: dict
    db: str
    coll: str | None
    invalidates: tuple | None = None  # ("coll", db, coll) or ("db", db) for invalidate entries
    pre: dict | None = None
    post: dict | None = None


@dataclass
class ChangeStreamCursor:
    id: int
    ns: str  # what the reply's cursor.ns says, and what getMore must name
    db: str
    coll: str | None  # None for database- and cluster-wide streams
    cluster: bool
    stages: list[Stage]
    full_document: str
    before_change: str
    position: str  # resume-token order: entries strictly after this are still to come
    verify: str | None = None  # an event token the stream must find first (resumeAfter/startAfter)
    killed: bool = False

    def in_scope(self, entry: Entry) -> bool:
        if entry.invalidates is not None:
            kind = entry.invalidates
            if self.cluster:
                return False
            if self.coll is None:
                return kind == ("db", self.db)
            return kind in (("db", self.db), ("coll", self.db, self.coll))
        if self.cluster:
            return entry.db not in INTERNAL_DBS
        if entry.db != self.db:
            return False
        if self.coll is None or entry.coll is None:
            return True
        return entry.coll == self.coll


def _utcnow() -> datetime.datetime:
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


def _ts_max(a: Timestamp, b: Timestamp) -> Timestamp:
    return a if (a.time, a.inc) >= (b.time, b.inc) else b


def _ts_lt(a: Timestamp, b: Timestamp) -> bool:
    return (a.time, a.inc) < (b.time, b.inc)


class _Clock:
    """Cluster times for every primary in this process: wall-clock seconds, then a counter.

    Shared so that a primary started where another one stopped (MongoDB "coming back without its
    old oplog") begins after every time the old one handed out, and its oplog visibly no longer
    holds the old resume points.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._last = Timestamp(0, 0)

    def peek(self) -> Timestamp:
        with self._lock:
            return self._following()

    def tick(self, floor: Timestamp | None = None) -> Timestamp:
        """A new time, after every one handed out so far and not before ``floor``."""
        with self._lock:
            self._last = _ts_max(self._following(), floor or self._last)
            return self._last

    def _following(self) -> Timestamp:
        now = Timestamp(int(time.time()), 1)
        return _ts_max(now, Timestamp(self._last.time, self._last.inc + 1))


_CLOCK = _Clock()


# --- the server ----------------------------------------------------------------------------------

class TestPrimary:
    """A single-node replica-set primary (or standalone) on 127.0.0.1, for tests.

    Thread-safe: mockupdb serves each connection on its own thread, and tests call the fault
    injection methods from theirs. ``events`` is the ordered log of every change event, each as
    MongoDB would send it before any ``fullDocument`` lookup, invalidate events included.
    """

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, port: int | None = None, *, set_name: str = "rs0",
                 replica_set: bool = True, history_limit: int | None = None,
                 users: dict[str, str] | None = None):
        self.port = port or 0
        self.set_name = set_name
        self.replica_set = replica_set
        self.history_limit = history_limit
        self.users = dict(users or {})
        self.auth_fails = False
        self.change_streams_opened = 0
        self.getmores_waiting = 0  # getMore commands parked right now, awaiting events
        self.commands: deque[dict] = deque(maxlen=10_000)  # the latest commands, as sent
        self.events: list[dict] = []
        self.handler_errors: list[str] = []

        self._cond = threading.Condition(threading.RLock())
        self._server: MockupDB | None = None
        self._stopped = True
        self._entries: list[Entry] = []
        self._tokens: list[str] = []
        self._colls: dict[tuple[str, str], Collection] = {}
        self._dbs: set[str] = set()  # a database stays open, even emptied, until dropDatabase
        self._cursors: dict[int, ChangeStreamCursor] = {}
        self._cursor_ids = itertools.count(1_000_001)
        self._connections: dict[int, int] = {}
        self._connection_ids = itertools.count(1)
        self._faults: list[list] = []
        self._retry_replies: OrderedDict[tuple[bytes, int], dict] = OrderedDict()
        self._sasl: dict[int, dict] = {}
        start = _CLOCK.tick()
        self._last_ts = start  # the newest oplog entry (at first, the startup no-op)
        self._hwm_floor = start  # the newest time a high-water mark has promised nothing before
        self._oldest_ts = start  # the oldest time still in the oplog
        self._lost_upto = ""  # the newest forgotten entry's token

    # -- lifecycle --

    def start(self) -> TestPrimary:
        """Listen on 127.0.0.1 (a free port the first time if none was given); returns self.

        A stopped primary can be started again: it comes back on the same port with its data and
        history, but every cursor is gone, as after a real restart.
        """
        with self._cond:
            if not self._stopped:
                return self
            server = MockupDB(port=self.port, request_timeout=int(1e6))
            server._address = ("127.0.0.1", self.port)  # mockupdb binds "localhost" otherwise
            server.autoresponds(self._on_request)
            self.port = server.run()
            self._server = server
            self._stopped = False
        return self

    def stop(self) -> None:
        """Close the listener and every connection, as if mongod went away."""
        with self._cond:
            server, self._server = self._server, None
            self._stopped = True
            self._cursors.clear()
            self._cond.notify_all()
        if server is not None:
            # mockupdb's accept loop polls select() once a second; a connection wakes it now.
            server._stopped = True
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                pass
            server.stop()

    def __enter__(self) -> TestPrimary:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is None:
            self.check()

    def check(self) -> None:
        """Fail loudly if a request failed inside the stand-in itself.

        Such a request was answered with InternalError, which a driver or the relay may well
        retry past; a bug here must fail the test instead of being absorbed.
        """
        if self.handler_errors:
            raise AssertionError(f"the test primary failed {len(self.handler_errors)} request(s); "
                                 f"the first:\n{self.handler_errors[0]}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        """The connection string; names the replica set only while this is one."""
        if self.replica_set:
            return f"mongodb://{self.address}/?replicaSet={self.set_name}"
        return f"mongodb://{self.address}/"

    # -- what tests inspect --

    def tokens(self) -> list[str]:
        """The ``_data`` of every event in ``events``, in order."""
        with self._cond:
            return [event["_id"]["_data"] for event in self.events]

    def documents(self, db: str, coll: str) -> list[dict]:
        """A copy of a collection's documents, in insertion order."""
        with self._cond:
            found = self._colls.get((db, coll))
            return copy.deepcopy(list(found.docs.values())) if found else []

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10) -> None:
        """Wait until ``predicate()`` (called under the lock) is true, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{predicate!r} still false after {timeout}s")
                self._cond.wait(min(remaining, 0.05))

    # -- fault injection --

    def hangup_next(self, command: str, count: int = 1) -> None:
        """Close the connection instead of answering the next ``count`` such commands."""
        with self._cond:
            self._faults.append([_fault_key(command), count, None])

    def fail_next(self, command: str, code: int, errmsg: str = "", *,
                  labels: tuple[str, ...] = (), count: int = 1) -> None:
        """Answer the next ``count`` such commands with ``{ok: 0, code, errorLabels}``."""
        errmsg = errmsg or f"Failing command {command} via TestPrimary.fail_next"
        with self._cond:
            self._faults.append([_fault_key(command), count, CommandError(code, errmsg, labels)])

    def forget_history(self, keep_last: int = 0) -> None:
        """Drop all but the newest ``keep_last`` events, as a small oplog rolling over would.

        Resuming from a point before what is kept then fails with 286 ChangeStreamHistoryLost, and
        so does the next ``getMore`` of any open stream that had not read past the dropped part.
        """
        with self._cond:
            drop = max(0, len(self._entries) - keep_last)
            # An event and the invalidate it causes share one oplog entry: keep or drop both.
            while 0 < drop < len(self._entries) and self._entries[drop].invalidates is not None:
                drop += 1
            if not drop:
                return
            self._lost_upto = self._entries[drop - 1].token
            del self._entries[:drop], self._tokens[:drop], self.events[:drop]
            if self._entries:
                self._oldest_ts = self._entries[0].event["clusterTime"]
            else:
                self._oldest_ts = self._peek_ts()
            self._cond.notify_all()

    # -- request plumbing --

    def _on_request(self, request) -> bool:
        server = request.server
        with server._unlock():  # let other connections proceed while this one waits
            try:
                self._serve(request)
            except OSError:  # the client went away mid-reply
                with contextlib.suppress(OSError):
                    request._client.shutdown(socket.SHUT_RDWR)
            finally:
                with self._cond:
                    self._cond.notify_all()
        return True

    def _serve(self, request) -> None:
        doc = request.doc
        name = request.command_name or ""
        is_op_query = request.opcode != 2013
        with self._cond:
            self.commands.append(doc)
            fault = self._take_fault(name)
        if fault == "hangup":
            request.hangup()
            return
        try:
            if fault is not None:
                raise fault
            if is_op_query and name not in ("hello", "isMaster", "ismaster"):
                raise CommandError(352, f"Unsupported OP_QUERY command: {name}. The client driver "
                                        "may require an upgrade. For more details see "
                                        "https://dochub.mongodb.org/core/legacy-opcode-removal")
            reply = self._dispatch(name, doc, request)
        except CommandError as exc:
            reply = exc.reply()
        except Exception:
            self.handler_errors.append(traceback.format_exc())
            reply = CommandError(1, f"TestPrimary failed handling {name}: "
                                    f"{traceback.format_exc(limit=1)}").reply()
        if self.replica_set and name not in ("hello", "isMaster", "ismaster"):
            reply.update(self._cluster_time_fields())
        if request.flags and request.flags & OP_MSG_MORE_TO_COME and not is_op_query:
            return  # unacknowledged write: the client reads no reply
        request.replies(reply)

    def _take_fault(self, name: str):
        for fault in self._faults:
            if fault[0] == _fault_key(name) and fault[1] > 0:
                fault[1] -= 1
                if fault[1] == 0:
                    self._faults.remove(fault)
                return "hangup" if fault[2] is None else fault[2]
        return None

    def _cluster_time_fields(self) -> dict:
        with self._cond:
            last, cluster = self._last_ts, _ts_max(self._last_ts, self._hwm_floor)
        signature = {"hash": Binary(b"\x00" * 20, 0), "keyId": Int64(0)}
        return {"$clusterTime": {"clusterTime": cluster, "signature": signature},
                "operationTime": last}

    def _dispatch(self, name: str, cmd: dict, request) -> dict:
        db = cmd.get("$db") or request.namespace or "admin"
        if "startTransaction" in cmd or "autocommit" in cmd:
            raise _not_implemented("multi-document transactions")
        if name in ("hello", "isMaster", "ismaster"):
            return self._hello(cmd, request)
        handler = self._handlers.get(name)
        if handler is None:
            raise CommandError(59, f"no such command: '{name}'")
        if name == "getMore":
            return handler(db, cmd)  # takes the lock itself, to wait without holding it
        with self._cond:
            retry_key = self._retry_key(name, cmd)
            if retry_key in self._retry_replies:
                return copy.deepcopy(self._retry_replies[retry_key])
            reply = handler(db, cmd)
            if retry_key is not None:
                self._retry_replies[retry_key] = copy.deepcopy(reply)
                if len(self._retry_replies) > 10_000:
                    self._retry_replies.popitem(last=False)
            return reply

    def _retry_key(self, name: str, cmd: dict) -> tuple[bytes, int] | None:
        """Retryable writes: a retry of a (session, txnNumber) gets the first reply, not a redo."""
        if name not in ("insert", "update", "delete", "findAndModify") or "txnNumber" not in cmd:
            return None
        if not self.replica_set:
            raise CommandError(20, "Transaction numbers are only allowed on a replica set member "
                                   "or mongos")
        return (_doc_key(cmd.get("lsid")), int(cmd["txnNumber"]))

    @functools.cached_property
    def _handlers(self) -> dict[str, Callable]:
        return {
            "ping": lambda db, cmd: {"ok": 1.0},
            "buildInfo": self._build_info, "buildinfo": self._build_info,
            "endSessions": lambda db, cmd: {"ok": 1.0},
            "killSessions": lambda db, cmd: {"ok": 1.0},
            "abortTransaction": self._no_transaction,
            "commitTransaction": self._no_transaction,
            "saslStart": self._sasl_start, "saslContinue": self._sasl_continue,
            "authenticate": self._authenticate,
            "insert": self._insert, "update": self._update, "delete": self._delete,
            "find": self._find, "count": self._count, "aggregate": self._aggregate,
            "findAndModify": self._find_and_modify, "findandmodify": self._find_and_modify,
            "distinct": self._distinct,
            "getMore": self._get_more, "killCursors": self._kill_cursors,
            "create": self._create, "collMod": self._coll_mod, "drop": self._drop,
            "dropDatabase": self._drop_database, "renameCollection": self._rename,
            "listCollections": self._list_collections, "listDatabases": self._list_databases,
            "listIndexes": self._list_indexes, "createIndexes": self._create_indexes,
        }

    # -- handshake and housekeeping --

    def _hello(self, cmd: dict, request) -> dict:
        with self._cond:
            conn = self._connections.setdefault(id(request._client), next(self._connection_ids))
            last = self._last_ts
        legacy = "hello" not in cmd
        reply: dict[str, Any] = {}
        if legacy and cmd.get("helloOk"):
            reply["helloOk"] = True
        reply["ismaster" if legacy else "isWritablePrimary"] = True
        if self.replica_set:
            wall = _utcnow()
            optime = {"ts": last, "t": Int64(1)}
            reply.update({
                "hosts": [self.address], "setName": self.set_name, "setVersion": 1,
                "secondary": False, "primary": self.address, "me": self.address,
                "electionId": ObjectId("7fffffff0000000000000001"),
                "lastWrite": {"opTime": optime, "lastWriteDate": wall,
                              "majorityOpTime": optime, "majorityWriteDate": wall},
            })
        reply.update({
            "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000, "localTime": _utcnow(),
            "logicalSessionTimeoutMinutes": 30, "connectionId": conn,
            "minWireVersion": 0, "maxWireVersion": MAX_WIRE_VERSION, "readOnly": False,
        })
        user = cmd.get("saslSupportedMechs")
        if isinstance(user, str) and user.partition(".")[2] in self.users:
            reply["saslSupportedMechs"] = ["SCRAM-SHA-1", "SCRAM-SHA-256"]
        reply["ok"] = 1.0
        if self.replica_set:
            reply.update(self._cluster_time_fields())
        return reply

    def _build_info(self, db: str, cmd: dict) -> dict:
        return {"version": SERVER_VERSION, "gitVersion": "0" * 40,
                "versionArray": [int(p) for p in SERVER_VERSION.split(".")] + [0],
                "bits": 64, "maxBsonObjectSize": 16 * 1024 * 1024, "ok": 1.0}

    def _no_transaction(self, db: str, cmd: dict) -> dict:
        raise CommandError(251, f"Given transaction number {cmd.get('txnNumber')} does not match "
                                "any in-progress transactions.")

    # -- authentication (SCRAM-SHA-1 and SCRAM-SHA-256 against ``users``) --

    def _auth_failed(self) -> CommandError:
        return CommandError(18, "Authentication failed.")

    def _authenticate(self, db: str, cmd: dict) -> dict:
        raise self._auth_failed()

    def _sasl_start(self, db: str, cmd: dict) -> dict:
        mechanism = cmd.get("mechanism")
        if mechanism not in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
            raise CommandError(2, f"Received authentication for mechanism {mechanism} which is "
                                  "not enabled")
        first = bytes(cmd.get("payload", b"")).decode()
        bare = first.split(",", 2)[2] if first.count(",") >= 2 else ""
        attrs = dict(part.split("=", 1) for part in bare.split(",") if "=" in part)
        user = attrs.get("n", "").replace("=2C", ",").replace("=3D", "=")
        if self.auth_fails or user not in self.users or "r" not in attrs:
            raise self._auth_failed()
        salt = os.urandom(16)
        nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
        server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i=4096"
        conversation = len(self._sasl) + 1
        self._sasl[conversation] = {"mechanism": mechanism, "user": user, "salt": salt,
                                    "nonce": nonce, "auth": bare + "," + server_first}
        return {"conversationId": conversation, "done": False,
                "payload": Binary(server_first.encode()), "ok": 1.0}

    def _sasl_continue(self, db: str, cmd: dict) -> dict:
        state = self._sasl.pop(cmd.get("conversationId"), None)
        if state is None or self.auth_fails:
            raise self._auth_failed()
        final = bytes(cmd.get("payload", b"")).decode()
        without_proof, _, proof = final.rpartition(",p=")
        attrs = dict(part.split("=", 1) for part in without_proof.split(",") if "=" in part)
        if attrs.get("r") != state["nonce"]:
            raise self._auth_failed()
        sha1 = state["mechanism"] == "SCRAM-SHA-1"
        digest = "sha1" if sha1 else "sha256"
        password = self.users[state["user"]]
        if sha1:
            password = hashlib.md5(f"{state['user']}:mongo:{password}".encode()).hexdigest()
        salted = hashlib.pbkdf2_hmac(digest, password.encode(), state["salt"], 4096)
        client_key = hmac.digest(salted, b"Client Key", digest)
        auth_message = (state["auth"] + "," + without_proof).encode()
        signature = hmac.digest(hashlib.new(digest, client_key).digest(), auth_message, digest)
        expected = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        if not hmac.compare_digest(base64.b64encode(expected).decode(), proof):
            raise self._auth_failed()
        server_key = hmac.digest(salted, b"Server Key", digest)
        verifier = base64.b64encode(hmac.digest(server_key, auth_message, digest)).decode()
        return {"conversationId": cmd["conversationId"], "done": True,
                "payload": Binary(f"v={verifier}".encode()), "ok": 1.0}

    # -- the oplog --

    def _peek_ts(self) -> Timestamp:
        """The cluster time the next write would get."""
        return _ts_max(_CLOCK.peek(), self._hwm_floor)

    def _high_water_mark(self) -> str:
        """A token after every event so far and before every later one."""
        ts = self._peek_ts()
        self._hwm_floor = ts
        return make_token(ts)

    def _append(self, op: str, db: str, coll: str | None, *, extra: dict | None = None,
                coll_uuid: Binary | None = None, event_id: dict | None = None,
                invalidates: tuple | None = None, pre: dict | None = None,
                post: dict | None = None) -> Entry:
        ts = _CLOCK.tick(self._hwm_floor)
        self._last_ts = ts
        wall = _utcnow()
        event_id = event_id or {"operationType": op}
        token = make_token(ts, coll_uuid=coll_uuid, event_id=event_id)
        event: dict[str, Any] = {"_id": {"_data": token}, "operationType": op,
                                 "clusterTime": ts, "wallTime": wall}
        extra = extra or {}
        if "fullDocument" in extra:
            event["fullDocument"] = extra.pop("fullDocument")
        event["ns"] = {"db": db, "coll": coll} if coll is not None else {"db": db}
        event.update(extra)
        entry = Entry(token, event, db, coll, pre=pre, post=post)
        self._log(entry)
        if invalidates is not None:
            inv_token = make_token(ts, coll_uuid=coll_uuid, event_id=event_id,
                                   from_invalidate=True)
            inv = {"_id": {"_data": inv_token}, "operationType": "invalidate",
                   "clusterTime": ts, "wallTime": wall}
            self._log(Entry(inv_token, inv, db, coll, invalidates=invalidates))
        return entry

    def _log(self, entry: Entry) -> None:
        self._entries.append(entry)
        self._tokens.append(entry.token)
        self.events.append(entry.event)
        if self.history_limit is not None and len(self._entries) > self.history_limit:
            self.forget_history(self.history_limit)
        self._cond.notify_all()

    def _crud_event(self, op: str, db: str, name: str, coll: Collection, doc_id: Any,
                    extra: dict, pre: dict | None = None, post: dict | None = None) -> None:
        key = {"_id": doc_id}
        extra = {"documentKey": key, **extra}  # _append puts fullDocument first
        keep = coll.images
        self._append(op, db, name, extra=extra, coll_uuid=coll.uuid,
                     event_id={"operationType": op, "documentKey": key},
                     pre=pre if keep else None, post=post if keep else None)

    # -- collections --

    def _coll(self, db: str, name: str, create: bool = False) -> Collection | None:
        found = self._colls.get((db, name))
        if found is None and create:
            _check_ns(db, name)
            found = self._colls[(db, name)] = Collection(Binary.from_uuid(uuidlib.uuid4()))
            self._dbs.add(db)
        return found

    def _create(self, db: str, cmd: dict) -> dict:
        name = cmd["create"]
        options = {k: v for k, v in cmd.items()
                   if k in ("changeStreamPreAndPostImages", "capped", "size", "max")}
        existing = self._coll(db, name)
        if existing is not None:
            if existing.options != options:
                raise CommandError(48, f"Collection {db}.{name} already exists.")
            return {"ok": 1.0}
        self._coll(db, name, create=True).options = options
        return {"ok": 1.0}

    def _coll_mod(self, db: str, cmd: dict) -> dict:
        coll = self._coll(db, cmd["collMod"])
        if coll is None:
            raise CommandError(26, "ns does not exist")
        if "changeStreamPreAndPostImages" in cmd:
            coll.options["changeStreamPreAndPostImages"] = cmd["changeStreamPreAndPostImages"]
        return {"ok": 1.0}

    def _drop(self, db: str, cmd: dict) -> dict:
        name = cmd["drop"]
        coll = self._colls.pop((db, name), None)
        if coll is None:
            return {"ok": 1.0}  # MongoDB 7.0 no longer errors on a missing collection
        self._append("drop", db, name, coll_uuid=coll.uuid, invalidates=("coll", db, name))
        return {"ns": f"{db}.{name}", "nIndexesWas": len(coll.indexes), "ok": 1.0}

    def _drop_database(self, db: str, cmd: dict) -> dict:
        names = sorted(name for (d, name) in self._colls if d == db)
        for name in names:
            self._drop(db, {"drop": name})
        if db in self._dbs:
            self._dbs.discard(db)
            self._append("dropDatabase", db, None, invalidates=("db", db))
        return {"dropped": db, "ok": 1.0}

    def _rename(self, db: str, cmd: dict) -> dict:
        if db != "admin":
            raise CommandError(13, "renameCollection may only be run against the admin database.")
        source, target = cmd["renameCollection"], cmd.get("to")
        if not isinstance(target, str) or "." not in target or "." not in source:
            raise CommandError(73, f"Invalid target namespace: {target}")
        src_db, _, src = source.partition(".")
        dst_db, _, dst = target.partition(".")
        coll = self._coll(src_db, src)
        if coll is None:
            raise CommandError(26, f"Source collection {source} does not exist")
        if self._coll(dst_db, dst) is not None:
            if not cmd.get("dropTarget"):
                raise CommandError(48, "target namespace exists")
            del self._colls[(dst_db, dst)]
        _check_ns(dst_db, dst)
        del self._colls[(src_db, src)]
        self._colls[(dst_db, dst)] = coll
        self._dbs.add(dst_db)
        to = {"db": dst_db, "coll": dst}
        self._append("rename", src_db, src, extra={"to": to}, coll_uuid=coll.uuid,
                     event_id={"operationType": "rename", "operationDescription": {"to": to}},
                     invalidates=("coll", src_db, src))
        return {"ok": 1.0}

    def _list_collections(self, db: str, cmd: dict) -> dict:
        infos = []
        for (d, name), coll in sorted(self._colls.items()):
            if d != db:
                continue
            info = {"name": name, "type": "collection", "options": copy.deepcopy(coll.options),
                    "info": {"readOnly": False, "uuid": coll.uuid},
                    "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}}
            if matches(info, cmd.get("filter") or {}):
                infos.append({"name": name, "type": "collection"} if cmd.get("nameOnly")
                             else info)
        return _cursor_reply(f"{db}.$cmd.listCollections", infos)

    def _list_databases(self, db: str, cmd: dict) -> dict:
        names = sorted({d for (d, _) in self._colls})
        dbs = [{"name": n, "sizeOnDisk": 8192, "empty": False} for n in names]
        dbs = [d for d in dbs if matches(d, cmd.get("filter") or {})]
        if cmd.get("nameOnly"):
            dbs = [{"name": d["name"]} for d in dbs]
        return {"databases": dbs, "totalSize": 8192 * len(dbs), "totalSizeMb": 0, "ok": 1.0}

    def _list_indexes(self, db: str, cmd: dict) -> dict:
        coll = self._coll(db, cmd["listIndexes"])
        if coll is None:
            raise CommandError(26, f"ns does not exist: {db}.{cmd['listIndexes']}")
        return _cursor_reply(f"{db}.{cmd['listIndexes']}", copy.deepcopy(coll.indexes))

    def _create_indexes(self, db: str, cmd: dict) -> dict:
        """Recorded for listIndexes but not enforced: unique indexes other than _id don't bite."""
        created = self._coll(db, cmd["createIndexes"]) is None
        coll = self._coll(db, cmd["createIndexes"], create=True)
        before = len(coll.indexes)
        for index in cmd.get("indexes", []):
            if all(index.get("name") != have["name"] for have in coll.indexes):
                coll.indexes.append({"v": 2, **index})
        return {"numIndexesBefore": before, "numIndexesAfter": len(coll.indexes),
                "createdCollectionAutomatically": created, "ok": 1.0}

    # -- CRUD --

    def _insert(self, db: str, cmd: dict) -> dict:
        name = cmd["insert"]
        ordered = cmd.get("ordered", True)
        n, errors = 0, []
        for index, raw in enumerate(cmd.get("documents", [])):
            doc = {"_id": raw["_id"] if "_id" in raw else ObjectId(),
                   **{k: v for k, v in raw.items() if k != "_id"}}
            coll = self._coll(db, name, create=True)
            key = _doc_key(doc["_id"])
            if key in coll.docs:
                errors.append(_duplicate_key(index, db, name, doc["_id"]))
                if ordered:
                    break
                continue
            coll.docs[key] = doc
            self._crud_event("insert", db, name, coll, doc["_id"], {"fullDocument": doc}, post=doc)
            n += 1
        return _write_reply({"n": n}, errors)

    def _matching(self, coll: Collection | None, query: dict) -> list[dict]:
        if coll is None:
            return []
        return [doc for doc in coll.docs.values() if matches(doc, query)]

    def _update(self, db: str, cmd: dict) -> dict:
        name = cmd["update"]
        ordered = cmd.get("ordered", True)
        n = modified = 0
        upserted, errors = [], []
        for index, statement in enumerate(cmd.get("updates", [])):
            try:
                found, changed, new_id = self._update_one_statement(db, name, statement)
            except CommandError as exc:
                errors.append({"index": index, "code": exc.code, "errmsg": exc.errmsg})
                if ordered:
                    break
                continue
            n += found
            modified += changed
            if new_id is not _MISSING:
                n += 1
                upserted.append({"index": index, "_id": new_id})
        reply: dict[str, Any] = {"n": n, "nModified": modified}
        if upserted:
            reply["upserted"] = upserted
        return _write_reply(reply, errors)

    def _update_one_statement(self, db: str, name: str, statement: dict) -> tuple[int, int, Any]:
        query, update = statement.get("q", {}), statement.get("u", {})
        multi, upsert = statement.get("multi", False), statement.get("upsert", False)
        if statement.get("arrayFilters"):
            raise _not_implemented("arrayFilters")
        if multi and isinstance(update, dict) and update and \
                not any(k.startswith("$") for k in update):
            raise CommandError(9, "multi update is not supported for replacement-style update")
        coll = self._coll(db, name)
        targets = self._matching(coll, query)
        if not multi:
            targets = targets[:1]
        if not targets:
            if not upsert:
                return 0, 0, _MISSING
            return 0, 0, self._upsert(db, name, query, update)
        changed = sum(self._apply(db, name, coll, old, update).changed for old in targets)
        return len(targets), changed, _MISSING

    def _apply(self, db: str, name: str, coll: Collection, old: dict, update: Any) -> UpdateResult:
        """Update one stored document, logging a replace or update event if anything changed."""
        result = apply_update(old, update)
        if not result.changed:
            return result
        coll.docs[_doc_key(old["_id"])] = result.doc
        if result.is_replacement:
            self._crud_event("replace", db, name, coll, old["_id"], {"fullDocument": result.doc},
                             pre=old, post=result.doc)
        else:
            self._crud_event("update", db, name, coll, old["_id"],
                             {"updateDescription": result.description()}, pre=old,
                             post=result.doc)
        return result

    def _find_and_modify(self, db: str, cmd: dict) -> dict:
        name = cmd["findAndModify"]
        query, update = cmd.get("query") or {}, cmd.get("update")
        remove, upsert, new = cmd.get("remove", False), cmd.get("upsert", False), cmd.get("new")
        if remove == (update is not None):
            raise CommandError(9, "Either an update or remove=true must be specified")
        if remove and (upsert or new):
            raise CommandError(9, "Cannot specify both an update and remove=true" if upsert else
                                  "Cannot specify both new=true and remove=true; 'remove' always "
                                  "returns the deleted document")
        coll = self._coll(db, name)
        targets = _sorted(self._matching(coll, query), cmd["sort"]) if cmd.get("sort") else \
            self._matching(coll, query)
        old = targets[0] if targets else None
        if remove:
            if old is not None:
                del coll.docs[_doc_key(old["_id"])]
                self._crud_event("delete", db, name, coll, old["_id"], {}, pre=old)
            value, outcome = old, {"n": int(old is not None)}
        elif old is not None:
            result = self._apply(db, name, coll, old, update)
            value, outcome = (result.doc if new else old), {"n": 1, "updatedExisting": True}
        elif upsert:
            new_id = self._upsert(db, name, query, update)
            inserted = self._colls[(db, name)].docs[_doc_key(new_id)]
            value = inserted if new else None
            outcome = {"n": 1, "updatedExisting": False, "upserted": new_id}
        else:
            value, outcome = None, {"n": 0, "updatedExisting": False}
        if value is not None and cmd.get("fields"):
            value = compile_stage("$project", cmd["fields"])(value)
        return {"lastErrorObject": outcome, "value": value, "ok": 1.0}

    def _distinct(self, db: str, cmd: dict) -> dict:
        values: list = []
        for doc in self._matching(self._coll(db, cmd["distinct"]), cmd.get("query") or {}):
            for value in _candidates(doc, cmd["key"].split(".")):
                for item in value if isinstance(value, list) else [value]:
                    if not any(_agg_compare(item, seen) == 0 for seen in values):
                        values.append(item)
        return {"values": values, "ok": 1.0}

    def _upsert(self, db: str, name: str, query: dict, update: Any) -> Any:
        seed = {k: copy.deepcopy(v) for k, v in query.items()
                if not k.startswith("$") and not (isinstance(v, dict) and
                                                  any(op.startswith("$") for op in v))}
        base: dict = {}
        for path, value in seed.items():
            _set(base, _Diff("document"), path.split("."), value)
        result = apply_update(base, update, inserting=True)
        doc = result.doc
        if "_id" not in doc:
            doc["_id"] = ObjectId()
        doc = {"_id": doc.pop("_id"), **doc}
        coll = self._coll(db, name, create=True)
        if _doc_key(doc["_id"]) in coll.docs:
            raise _duplicate_key_error(db, name, doc["_id"])
        coll.docs[_doc_key(doc["_id"])] = doc
        self._crud_event("insert", db, name, coll, doc["_id"],
                         {"fullDocument": doc}, post=doc)
        return doc["_id"]

    def _delete(self, db: str, cmd: dict) -> dict:
        name = cmd["delete"]
        n = 0
        for statement in cmd.get("deletes", []):
            coll = self._coll(db, name)
            targets = self._matching(coll, statement.get("q", {}))
            if statement.get("limit", 0) == 1:
                targets = targets[:1]
            for doc in targets:
                del coll.docs[_doc_key(doc["_id"])]
                self._crud_event("delete", db, name, coll, doc["_id"], {}, pre=doc)
                n += 1
        return _write_reply({"n": n}, [])

    def _find(self, db: str, cmd: dict) -> dict:
        name = cmd["find"]
        docs = self._matching(self._coll(db, name), cmd.get("filter") or {})
        if cmd.get("sort"):
            docs = _sorted(docs, cmd["sort"])
        docs = docs[cmd.get("skip", 0):]
        limit = abs(cmd.get("limit", 0) or 0)
        if limit:
            docs = docs[:limit]
        if cmd.get("projection"):
            project = compile_stage("$project", cmd["projection"])
            docs = [project(doc) for doc in docs]
        return _cursor_reply(f"{db}.{name}", docs)

    def _count(self, db: str, cmd: dict) -> dict:
        return {"n": len(self._matching(self._coll(db, cmd["count"]), cmd.get("query") or {})),
                "ok": 1.0}

    # -- aggregate and change streams --

    def _aggregate(self, db: str, cmd: dict) -> dict:
        pipeline = cmd.get("pipeline")
        if not isinstance(pipeline, list):
            raise CommandError(14, "'pipeline' option must be specified as an array")
        stages = [_check_stage(stage) for stage in pipeline]
        names = [name for name, _ in stages]
        if "$changeStream" in names[1:]:
            raise CommandError(40602, "$changeStream is only valid as the first stage in a "
                                      "pipeline.")
        if names and names[0] == "$changeStream":
            return self._open_change_stream(db, cmd, stages)
        target = cmd.get("aggregate")
        if not isinstance(target, str):
            raise _not_implemented("collection-less aggregations other than $changeStream")
        docs = self._matching(self._coll(db, target), {})
        return _cursor_reply(f"{db}.{target}", run_pipeline(docs, stages))

    def _open_change_stream(self, db: str, cmd: dict, stages: list) -> dict:
        if not self.replica_set:
            raise CommandError(40573, "The $changeStream stage is only supported on replica sets")
        spec = stages[0][1]
        if not isinstance(spec, dict):
            raise CommandError(14, "BSON field '$changeStream' is the wrong type, expected type "
                                   "'object'")
        target = cmd.get("aggregate")
        cluster = bool(spec.get("allChangesForCluster"))
        if cluster and (db != "admin" or target != 1):
            ns = f"{db}.{target}" if isinstance(target, str) else f"{db}.$cmd.aggregate"
            raise CommandError(72, "A $changeStream with 'allChangesForCluster:true' may only be "
                                   "opened on the 'admin' database, and with no collection name; "
                                   f"found {ns}")
        if (db == "admin" and not cluster) or db in ("local", "config"):
            raise CommandError(73, f"$changeStream may not be opened on the internal {db} "
                                   "database")
        if isinstance(target, str) and target.startswith("system."):
            raise CommandError(73, f"$changeStream may not be opened on the internal "
                                   f"{db}.{target} collection")
        if not isinstance(target, str) and target != 1:
            raise CommandError(2, "Invalid aggregate namespace: 'aggregate' must be a collection "
                                  "name or 1")
        unknown = set(spec) - {"allChangesForCluster", "fullDocument", "fullDocumentBeforeChange",
                               "resumeAfter", "startAfter", "startAtOperationTime",
                               "showExpandedEvents"}
        if unknown:
            raise CommandError(40415, f"BSON field '$changeStream.{sorted(unknown)[0]}' is an "
                                      "unknown field.")
        if spec.get("showExpandedEvents"):
            raise _not_implemented("showExpandedEvents")
        full_document = _enum(spec, "fullDocument", "default",
                              ("default", "updateLookup", "whenAvailable", "required"))
        before_change = _enum(spec, "fullDocumentBeforeChange", "off",
                              ("off", "whenAvailable", "required"))
        for name, _ in stages[1:]:
            if name not in CHANGE_STREAM_STAGES:
                raise CommandError(20, f"{name} is not permitted in a $changeStream pipeline")
        compiled = [compile_stage(name, spec) for name, spec in stages[1:]]
        if "resumeAfter" in spec and "startAfter" in spec:
            raise CommandError(50865, "Do not specify both 'resumeAfter' and 'startAfter' in a "
                                      "$changeStream stage")
        token_doc = spec.get("resumeAfter", spec.get("startAfter"))
        token = parse_token(token_doc) if token_doc is not None else None
        start_at = spec.get("startAtOperationTime")
        if token is not None and start_at is not None:
            raise CommandError(40674, "Only one type of resume option is allowed, but multiple "
                                      "were found")
        if token is not None and "resumeAfter" in spec and token.from_invalidate:
            raise CommandError(260, "Attempting to resume a change stream using 'resumeAfter' is "
                                    "not allowed from an invalidate notification")
        if start_at is not None and not isinstance(start_at, Timestamp):
            raise CommandError(14, "BSON field '$changeStream.startAtOperationTime' is the wrong "
                                   "type, expected type 'timestamp'")
        batch_size = cmd.get("cursor", {}).get("batchSize", DEFAULT_FIRST_BATCH)
        with self._cond:
            if token is not None:
                start_ts, position = token.cluster_time, token.data
            elif start_at is not None:
                start_ts, position = start_at, make_token(start_at)
            else:
                position = self._high_water_mark()
                start_ts = self._hwm_floor
            if _ts_lt(start_ts, self._oldest_ts):
                raise CommandError(286, HISTORY_LOST_MSG, NON_RESUMABLE)
            cursor = ChangeStreamCursor(
                id=next(self._cursor_ids),
                ns=f"{db}.{target}" if isinstance(target, str) else f"{db}.$cmd.aggregate",
                db=db, coll=target if isinstance(target, str) else None, cluster=cluster,
                stages=compiled, full_document=full_document, before_change=before_change,
                position=position,
                verify=token.data if token and token.token_type == EVENT_TOKEN else None)
            docs, pbrt, alive = self._next_batch(cursor, batch_size)
            if alive:
                self._cursors[cursor.id] = cursor
            self.change_streams_opened += 1
        return {"cursor": {"firstBatch": docs, "postBatchResumeToken": {"_data": pbrt},
                           "id": Int64(cursor.id if alive else 0), "ns": cursor.ns},
                "ok": 1.0}

    def _next_batch(self, cursor: ChangeStreamCursor, limit: int) -> tuple[list, str, bool]:
        """Up to ``limit`` events after the cursor's position: (docs, pbrt, cursor still open).

        The postBatchResumeToken is the last event returned when the batch filled up, and once
        the scan reached the end of the oplog a high-water mark after everything so far, so it
        advances even when every new entry belongs to some other stream.
        """
        if cursor.position < self._lost_upto:
            raise CommandError(286, HISTORY_LOST_MSG, NON_RESUMABLE)
        docs: list[dict] = []
        if limit <= 0:
            return docs, cursor.position, True
        batch_bytes = 0
        find = bisect.bisect_left if cursor.verify else bisect.bisect_right
        for entry in self._entries[find(self._tokens, cursor.position):]:
            if not cursor.in_scope(entry):
                continue
            if cursor.verify is not None:  # the resume point itself must come first
                if entry.token != cursor.verify:
                    raise CommandError(280, "cannot resume stream; the resume token was not "
                                            f"found. {{_data: \"{cursor.verify}\"}}",
                                       NON_RESUMABLE)
                cursor.verify = None
                cursor.position = entry.token
                continue
            out = self._render(cursor, entry)
            if out is not None:
                size = len(bson.encode(out))
                if docs and batch_bytes + size > MAX_BATCH_BYTES:
                    return docs, cursor.position, True  # this one starts the next batch
                batch_bytes += size
                docs.append(out)
            cursor.position = entry.token
            if entry.invalidates is not None:
                return docs, entry.token, False
            if len(docs) >= limit:
                return docs, entry.token, True
        at_last_entry = bool(self._entries) and cursor.position == self._entries[-1].token
        if cursor.verify is None and not at_last_entry:
            cursor.position = max(cursor.position, self._high_water_mark())
        return docs, cursor.position, True

    def _render(self, cursor: ChangeStreamCursor, entry: Entry) -> dict | None:
        doc = dict(entry.event)  # logged events are never mutated; stages copy what they change
        op = doc["operationType"]
        if op == "update" and cursor.full_document != "default":
            if cursor.full_document == "updateLookup":
                coll = self._coll(entry.db, entry.coll)
                found = coll.docs.get(_doc_key(doc["documentKey"]["_id"])) if coll else None
                image = found
            else:
                image = entry.post
                if image is None and cursor.full_document == "required":
                    raise CommandError(47, "Change stream was configured to require a post-image "
                                           "for all update events, but the post-image was not "
                                           f"found for event: {_event_summary(doc)}")
            doc = _with_field_after(doc, "fullDocument", image, "wallTime")
        if op in ("update", "replace", "delete") and cursor.before_change != "off":
            image = entry.pre
            if image is None and cursor.before_change == "required":
                raise CommandError(47, "Change stream was configured to require a pre-image for "
                                       "all update, delete and replace events, but the pre-image "
                                       f"was not found for event: {_event_summary(doc)}")
            doc["fullDocumentBeforeChange"] = image
        original_id = doc["_id"]
        for stage in cursor.stages:
            doc = stage(doc)
            if doc is None:
                return None
        if doc.get("_id") != original_id:
            raise CommandError(280, "Encountered an event whose _id field, which contains the "
                                    "resume token, was modified by the pipeline. Modifying the "
                                    "_id field of an event makes it impossible to resume the "
                                    "stream from that point. Only transformations that retain "
                                    "the unmodified _id field are allowed.", NON_RESUMABLE)
        return doc

    def _get_more(self, db: str, cmd: dict) -> dict:
        cursor_id = int(cmd["getMore"])
        coll = cmd.get("collection")
        batch_size = cmd.get("batchSize") or 1 << 31
        wait = cmd.get("maxTimeMS", DEFAULT_AWAIT_MS) / 1000
        deadline = time.monotonic() + wait
        with self._cond:
            cursor = self._cursors.get(cursor_id)
            if cursor is None:
                raise CommandError(43, f"cursor id {cursor_id} not found")
            if cursor.ns != f"{db}.{coll}":
                raise CommandError(13, f"Requested getMore on namespace '{db}.{coll}', but cursor "
                                       f"belongs to a different namespace {cursor.ns}")
            while True:
                try:
                    docs, pbrt, alive = self._next_batch(cursor, batch_size)
                except CommandError:
                    self._cursors.pop(cursor_id, None)
                    raise
                remaining = deadline - time.monotonic()
                if docs or not alive or remaining <= 0 or self._stopped or cursor.killed:
                    break
                self.getmores_waiting += 1
                self._cond.notify_all()
                try:
                    self._cond.wait(remaining)
                finally:
                    self.getmores_waiting -= 1
            if cursor.killed:
                raise CommandError(237, f"cursor id {cursor_id} was killed")
            if not alive:
                self._cursors.pop(cursor_id, None)
        return {"cursor": {"nextBatch": docs, "postBatchResumeToken": {"_data": pbrt},
                           "id": Int64(cursor_id if alive else 0), "ns": cursor.ns},
                "ok": 1.0}

    def _kill_cursors(self, db: str, cmd: dict) -> dict:
        killed, missing = [], []
        for cursor_id in cmd.get("cursors", []):
            cursor = self._cursors.pop(int(cursor_id), None)
            if cursor is None:
                missing.append(cursor_id)
            else:
                cursor.killed = True
                killed.append(cursor_id)
        return {"cursorsKilled": killed, "cursorsNotFound": missing, "cursorsAlive": [],
                "cursorsUnknown": [], "ok": 1.0}


# --- small helpers -------------------------------------------------------------------------------

def _fault_key(command: str) -> str:
    """Faults match command names case-insensitively, and hello matches legacy isMaster too."""
    key = command.lower()
    return "hello" if key == "ismaster" else key


def _check_ns(db: str, name: str) -> None:
    if not name or "$" in name or not db or any(c in db for c in "/\\. \"$"):
        raise CommandError(73, f"Invalid namespace specified '{db}.{name}'")


def _enum(spec: dict, name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = spec.get(name, default)
    if value not in allowed:
        raise CommandError(2, f"Enumeration value '{value}' for field '$changeStream.{name}' is "
                              "not a valid value.")
    return value


def _with_field_after(doc: dict, name: str, value: Any, after: str) -> dict:
    out = {}
    for key, item in doc.items():
        out[key] = item
        if key == after:
            out[name] = value
    return out


def _event_summary(doc: dict) -> str:
    return repr({k: doc[k] for k in ("_id", "operationType", "ns", "documentKey") if k in doc})


def _cursor_reply(ns: str, docs: list[dict]) -> dict:
    return {"cursor": {"firstBatch": docs, "id": Int64(0), "ns": ns}, "ok": 1.0}


def _duplicate_key(index: int, db: str, name: str, doc_id: Any) -> dict:
    exc = _duplicate_key_error(db, name, doc_id)
    return {"index": index, "code": exc.code, "keyPattern": {"_id": 1},
            "keyValue": {"_id": doc_id}, "errmsg": exc.errmsg}


def _duplicate_key_error(db: str, name: str, doc_id: Any) -> CommandError:
    return CommandError(11000, f"E11000 duplicate key error collection: {db}.{name} index: _id_ "
                               f"dup key: {{ _id: {doc_id!r} }}")


def _write_reply(reply: dict, errors: list[dict]) -> dict:
    if errors:
        reply["writeErrors"] = errors
    reply["ok"] = 1.0
    return reply
