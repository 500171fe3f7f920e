"""Aggregation stages, and the ones a change stream allows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bson
from bson.int64 import Int64

from changerelay.primary.errors import CommandError, not_implemented
from changerelay.primary.expressions import OPERATORS, agg_type, evaluate
from changerelay.primary.queries import matches
from changerelay.primary.updates import overlap
from changerelay.primary.values import MISSING, shown

# Stages MongoDB allows after $changeStream ("Modify Change Stream Output" in the manual).
CHANGE_STREAM_STAGES = ("$addFields", "$match", "$project", "$replaceRoot", "$replaceWith",
                        "$redact", "$set", "$unset", "$changeStreamSplitLargeEvent")
KNOWN_STAGES = (
    *CHANGE_STREAM_STAGES, "$bucket", "$bucketAuto", "$collStats", "$count", "$densify",
    "$documents", "$facet", "$fill",
    "$geoNear", "$graphLookup", "$group", "$indexStats", "$limit", "$listSessions", "$lookup",
    "$merge", "$out", "$planCacheStats", "$sample", "$search", "$setWindowFields", "$skip",
    "$sort", "$sortByCount", "$unionWith", "$unwind", "$changeStream")


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
            raise not_implemented("sub-object projections; write dotted paths instead")
        else:
            if kind == "exclusion" and isinstance(value, dict):
                raise CommandError(31252, "Cannot use expression other than $meta in exclusion "
                                          "projection")
            if kind == "exclusion":
                raise CommandError(31310, f"Cannot use an expression {path}: {shown(value)} in "
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
            elif isinstance(leaf, _Paths) and (kept := _include(item, leaf)) is not MISSING:
                out[name] = kept
        return out
    if isinstance(value, list):
        return [kept for item in value if (kept := _include(item, paths)) is not MISSING]
    return MISSING


def _compute(root: dict, out: dict, paths: _Paths) -> None:
    """ProjectionNode::applyExpressions: set ``out``'s computed fields, in the order named."""
    for name, leaf in paths.items():
        if isinstance(leaf, _Paths) and leaf.computed:
            value = _compute_into(root, out.get(name, MISSING), leaf)
        elif isinstance(leaf, _Computed):
            value = evaluate(leaf.expr, root)
        else:
            continue
        if value is MISSING:
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
        raise CommandError(40272, f"specification must be an object, got {agg_type(spec)}")
    paths, seen = _Paths(), []

    def add(path: str, value: Any) -> None:
        for other in seen:
            if overlap(path, other) is not None:
                raise CommandError(40176, "specification contains two conflicting paths. Cannot "
                                          f"specify both '{path}' and '{other}': {shown(spec)}")
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
                                          f"fields in {shown(value)}, while parsing object "
                                          f"{shown(spec)}")
            if "." in name:
                raise CommandError(40183, f"cannot use dotted field name '{name}' in a sub "
                                          f"object: {shown(spec)}")
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
            printed = "MISSING" if root is MISSING else shown(root)
            raise CommandError(40228, "'newRoot' expression must evaluate to an object, but "
                                      f"resulting value was: {printed}")
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
        raise not_implemented(f"the {name} stage")
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
            if operator not in OPERATORS:
                raise not_implemented(f"the expression operator {operator}")
            expr = {"": arg}
        for item in expr.values():
            _check_expression(item)


def check_stage(stage: Any) -> tuple[str, Any]:
    if not isinstance(stage, dict) or len(stage) != 1:
        raise CommandError(40323, "A pipeline stage specification object must contain exactly "
                                  "one field.")
    name, spec = next(iter(stage.items()))
    if name not in KNOWN_STAGES:
        raise CommandError(40324, f"Unrecognized pipeline stage name: '{name}'")
    return name, spec
