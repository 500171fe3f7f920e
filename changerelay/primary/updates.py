"""Update documents, applied as MongoDB's update subsystem applies them."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bson

from changerelay.primary.errors import CommandError, not_implemented
from changerelay.primary.values import shown, type_name

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
    diff: Diff | None = None  # what a modifier update changed; None for a replacement

    @property
    def changed(self) -> bool:
        return self.is_replacement or bool(self.diff.children)

    def description(self) -> dict:
        """The update event's ``updateDescription``."""
        updated: dict = {}
        removed: list = []
        self.diff.read([], updated, removed)
        return {"updatedFields": updated, "removedFields": removed, "truncatedArrays": []}


class Diff:
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
                node.children[key] = Diff(kind)
            node = node.children[key]
        node.children[int(parts[-1]) if in_array[-1] else parts[-1]] = leaf

    def value(self) -> dict:
        """A new document, as the inserted value it stands for."""
        return {name: child.value() if isinstance(child, Diff) else child[1]
                for name, child in self.children.items()}

    def read(self, path: list[str], updated: dict, removed: list) -> None:
        """Add this level's changes to updatedFields/removedFields, the change stream's way."""
        def here(name):
            return ".".join([*path, str(name)])

        if self.kind == "array":
            for index in sorted(self.children):
                child = self.children[index]
                if isinstance(child, Diff) and child.kind != "new document":
                    child.read([*path, str(index)], updated, removed)
                else:
                    updated[here(index)] = child.value() if isinstance(child, Diff) else child[1]
            return
        items = self.children.items()
        updated.update((here(name), child[1]) for name, child in items
                       if isinstance(child, tuple) and child[0] == "update")
        for name, child in items:
            if isinstance(child, Diff) and child.kind == "new document":
                updated[here(name)] = child.value()
            elif isinstance(child, tuple) and child[0] == "insert":
                updated[here(name)] = child[1]
        removed.extend(here(name) for name, child in items
                       if isinstance(child, tuple) and child[0] == "delete")
        for name, child in items:
            if isinstance(child, Diff) and child.kind != "new document":
                child.read([*path, name], updated, removed)


def _is_position(part: str) -> bool:
    return part != "" and all("0" <= c <= "9" for c in part)


def _same(a: Any, b: Any) -> bool:
    """MongoDB's no-op test for an update: binary equality (1 and 1.0 differ, so does order)."""
    return bson.encode({"": a}) == bson.encode({"": b})


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
        raise not_implemented("pipeline-style updates")
    if not isinstance(update, dict):
        raise CommandError(14, "Update argument must be either an object or an array")
    operators = [k for k in update if k.startswith("$")]
    if not operators:
        if "_id" in update and update["_id"] != old.get("_id", update["_id"]):
            raise CommandError(66, "After applying the update, the (immutable) field '_id' was "
                                   f"found to have been altered to _id: {shown(update['_id'])}")
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
            raise not_implemented(f"the update operator {op}")
        if not isinstance(spec, dict):
            raise CommandError(9, f"Modifiers operate on fields but we found type "
                                  f"{type_name(spec)} instead.")
        for path, arg in spec.items():
            _check_update_path(path, [p for _, p, _ in changes])
            changes.append((op, path, arg))
    doc = copy.deepcopy(old)
    diff = Diff("document")
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


def overlap(path: str, other: str) -> str | None:
    """The shorter of two dotted paths when one is the other or a prefix of it, else None."""
    shorter, longer = sorted((path, other), key=len)
    return shorter if shorter == longer or longer.startswith(shorter + ".") else None


def _check_update_path(path: str, earlier: list[str]) -> None:
    parts = path.split(".")
    if "" in parts:
        raise CommandError(56, f"An update path '{path}' contains an empty field name, which is "
                               "not allowed.")
    if any(part.startswith("$") for part in parts):
        raise not_implemented("positional update operators ($, $[], $[<identifier>])")
    for other in earlier:
        if (conflict := overlap(path, other)) is not None:
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


def _create(doc: dict, diff: Diff, parts: list[str], value: Any) -> None:
    """Create the missing end of ``parts`` holding ``value`` (createPathAt), padding an array
    with nulls up to a new position, and log it as created from the first new component."""
    found, node, in_array = _walk(doc, parts)
    part = parts[found]
    name = parts[found - 1] if found else ""
    if not isinstance(node, dict | list) or (isinstance(node, list) and not _is_position(part)):
        raise CommandError(28, f"Cannot create field '{part}' in element "
                               f"{{{name}: {shown(node)}}}")
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


def _replace(doc: dict, diff: Diff, parts: list[str], value: Any) -> None:
    _, current, in_array = _walk(doc, parts)
    if _same(current, value):
        return
    parent = _parent(doc, parts)
    parent[_key(parent, parts[-1])] = copy.deepcopy(value)
    diff.log(_canonical(parts, in_array), in_array, ("update", copy.deepcopy(value)))


def set_value(doc: dict, diff: Diff, parts: list[str], value: Any) -> None:
    found, _, _ = _walk(doc, parts)
    (_replace if found == len(parts) else _create)(doc, diff, parts, value)


def _unset(doc: dict, diff: Diff, parts: list[str], _arg: Any) -> None:
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


def _push(doc: dict, diff: Diff, parts: list[str], arg: Any) -> None:
    """$push: a document with $each holds modifiers, any other value is the element to push;
    an append logs each new element, a push onto an empty array the whole array (push_node.cpp)."""
    if isinstance(arg, dict) and "$each" in arg:
        if set(arg) != {"$each"}:
            raise not_implemented("$push modifiers other than $each")
        if not isinstance(arg["$each"], list):
            raise CommandError(2, "The argument to $each in $push must be an array but it was of "
                                  f"type: {type_name(arg['$each'])}")
        items = arg["$each"]
    else:
        items = [arg]
    found, current, in_array = _walk(doc, parts)
    if found < len(parts):
        _create(doc, diff, parts, items)
        return
    if not isinstance(current, list):
        raise CommandError(2, f"The field '{'.'.join(parts)}' must be an array but is of type "
                              f"{type_name(current)} in document {{_id: "
                              f"{shown(doc.get('_id'))}}}")
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


_UPDATE_OPERATORS: dict[str, Callable[[dict, Diff, list[str], Any], None]] = {
    "$set": set_value, "$setOnInsert": set_value, "$unset": _unset, "$push": _push,
}
