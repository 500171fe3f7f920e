"""Aggregation expressions."""

from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Callable
from typing import Any

import bson
from bson import ObjectId, Timestamp
from bson.int64 import Int64

from changerelay.primary.errors import CommandError, not_implemented
from changerelay.primary.values import MISSING, bson_rank, is_number, shown


def evaluate(expr: Any, doc: dict, variables: dict | None = None) -> Any:
    """Aggregation expressions: field paths, variables, and the operators in ``OPERATORS``.

    Returns ``MISSING`` where MongoDB's result is "missing" (an absent field, ``$$REMOVE``).
    """
    variables = variables or {}
    if isinstance(expr, str) and expr.startswith("$$"):
        name, _, rest = expr[2:].partition(".")
        if name == "REMOVE":
            return MISSING
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
            operator = OPERATORS.get(keys[0])
            if operator is None:
                raise not_implemented(f"the expression operator {keys[0]}")
            return operator(expr[keys[0]], doc, variables)
        out = {}
        for key, sub in expr.items():
            value = evaluate(sub, doc, variables)
            if value is not MISSING:
                out[key] = value
        return out
    if isinstance(expr, list):
        return [None if (v := evaluate(item, doc, variables)) is MISSING else v for item in expr]
    return expr


def _agg_path(value: Any, parts: list[str]) -> Any:
    """A field path the aggregation way: through an array, it maps over the elements."""
    for i, part in enumerate(parts):
        if isinstance(value, dict):
            if part not in value:
                return MISSING
            value = value[part]
        elif isinstance(value, list):
            found = [_agg_path(item, parts[i:]) for item in value if isinstance(item, dict | list)]
            return [item for item in found if item is not MISSING]
        else:
            return MISSING
    return value


def truthy(value: Any) -> bool:
    if value is MISSING or value is None or value is False:
        return False
    return not (isinstance(value, int | float) and value == 0)


def agg_type(value: Any) -> str:
    if value is MISSING:
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


def agg_compare(a: Any, b: Any) -> int:
    """BSON comparison order; missing sorts before null, as in aggregation."""
    rank_a = 0 if a is MISSING else bson_rank(a)
    rank_b = 0 if b is MISSING else bson_rank(b)
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
        return test(agg_compare(a, b))
    return operator


def _cond(arg, doc, variables):
    if isinstance(arg, dict):
        arg = [arg.get("if"), arg.get("then"), arg.get("else")]
    condition, then, otherwise = arg
    chosen = then if truthy(evaluate(condition, doc, variables)) else otherwise
    return evaluate(chosen, doc, variables)


def _if_null(arg, doc, variables):
    values = _values(arg, doc, variables)
    return next((v for v in values[:-1] if v is not MISSING and v is not None), values[-1])


def _in(arg, doc, variables):
    value, array = _values(arg, doc, variables)
    if not isinstance(array, list):
        raise CommandError(40081, "$in requires an array as a second argument, found: "
                                  f"{agg_type(array)}")
    return any(agg_compare(value, item) == 0 for item in array)


def _object_to_array(arg, doc, variables):
    (value,) = _values(arg, doc, variables)
    if value is MISSING or value is None:
        return None
    if not isinstance(value, dict):
        raise CommandError(40390, f"$objectToArray requires a document input, found: "
                                  f"{agg_type(value)}")
    return [{"k": k, "v": v} for k, v in value.items()]


def _array_to_object(arg, doc, variables):
    """[k, v] pairs or {k, v} documents, in the format of the first element; a repeated name
    keeps its last value (expression.cpp ExpressionArrayToObject, and its manual page)."""
    (value,) = _values(arg, doc, variables)
    if _nullish(value):
        return None
    if not isinstance(value, list):
        raise CommandError(40386, f"$arrayToObject requires an array input, found: "
                                  f"{agg_type(value)}")
    if value and not isinstance(value[0], list | dict):
        raise CommandError(40398, "Unrecognised input type format for $arrayToObject: "
                                  f"{agg_type(value[0])}")
    out = {}
    for item in value:
        if isinstance(value[0], list):
            if not isinstance(item, list):
                raise CommandError(40396, "$arrayToObject requires a consistent input format. "
                                          "Elements mustall be arrays or all be objects. Array "
                                          f"was detected, now found: {agg_type(item)}")
            if len(item) != 2:
                raise CommandError(40397, "$arrayToObject requires an array of size 2 arrays,"
                                          f"found array of size: {len(item)}")
            key, item_value = item
        else:
            if not isinstance(item, dict) or set(item) != {"k", "v"}:
                raise CommandError(40392, "$arrayToObject requires an object keys of 'k' and "
                                          f"'v'. Found: {shown(item)}")
            key, item_value = item["k"], item["v"]
        if not isinstance(key, str):
            raise CommandError(40394, "$arrayToObject requires an object with keys 'k' and 'v', "
                                      "where the value of 'k' must be of type string. Found "
                                      f"type: {agg_type(key)}")
        if "\x00" in key:
            raise CommandError(4940401, "Key field cannot contain an embedded null byte")
        out[key] = item_value
    return out


def _input_array(name: str, code: int, arg: dict, doc: dict, variables: dict) -> list | None:
    """The array $filter and $map iterate: null for null or missing, an error for a non-array."""
    items = evaluate(arg["input"], doc, variables)
    if _nullish(items):
        return None
    if not isinstance(items, list):
        raise CommandError(code, f"input to {name} must be an array not {agg_type(items)}")
    return items


def _filter(arg, doc, variables):
    arg = _named_arguments("$filter", arg, ("input", "cond"), ("as", "limit"))
    if "limit" in arg:
        raise not_implemented("$filter's limit")
    items = _input_array("$filter", 28651, arg, doc, variables)
    if items is None:
        return None
    name = arg.get("as", "this")
    return [item for item in items
            if truthy(evaluate(arg["cond"], doc, {**variables, name: item}))]


def _map(arg, doc, variables):
    arg = _named_arguments("$map", arg, ("input", "in"), ("as",))
    items = _input_array("$map", 16883, arg, doc, variables)
    if items is None:
        return None
    name = arg.get("as", "this")
    mapped = [evaluate(arg["in"], doc, {**variables, name: item}) for item in items]
    return [None if item is MISSING else item for item in mapped]


def _concat(arg, doc, variables):
    values = _values(arg, doc, variables)
    if any(v is MISSING or v is None for v in values):
        return None
    return "".join(values)


def _size(arg, doc, variables):
    (value,) = _values(arg, doc, variables)
    if not isinstance(value, list):
        raise CommandError(17124, "The argument to $size must be an array. Type of argument is "
                                  f"{agg_type(value)}")
    return len(value)


def _nullish(value: Any) -> bool:
    return value is MISSING or value is None


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
                              f"{agg_type(arg)}")
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
        if truthy(evaluate(branch["case"], doc, variables)):
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
        raise not_implemented("$regexMatch with a regex that is not a string")
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
                                    f"{agg_type(field)}")
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
    value = MISSING if name == "$unsetField" else evaluate(arg["value"], doc, variables)
    out = dict(target)
    if value is MISSING:
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
                                    f"got {agg_type(field)}")
    target = evaluate(arg.get("input", "$$CURRENT"), doc, variables)
    if _nullish(target):
        return None
    if not isinstance(target, dict):
        raise CommandError(3041705, "$getField requires 'input' to evaluate to type Object, but "
                                    f"got {agg_type(target)}")
    return target.get(field, MISSING)


def _array_elem_at(arg, doc, variables):
    """$arrayElemAt: a negative index counts from the end; out of bounds is missing (docs)."""
    array, index = _arity("$arrayElemAt", arg, doc, variables, 2)
    if _nullish(array) or _nullish(index):
        return None
    if not isinstance(array, list):
        raise CommandError(28689, "$arrayElemAt's first argument must be an array, but is "
                                  f"{agg_type(array)}")
    if not is_number(index) or int(index) != index:
        raise CommandError(28690, "$arrayElemAt's second argument must be a numeric value, but "
                                  f"is {agg_type(index)}")
    position = int(index) + (len(array) if index < 0 else 0)
    return array[position] if 0 <= position < len(array) else MISSING


def _let(arg, doc, variables):
    arg = _named_arguments("$let", arg, ("vars", "in"))
    bound = {name: evaluate(value, doc, variables) for name, value in arg["vars"].items()}
    return evaluate(arg["in"], doc, {**variables, **bound})


OPERATORS: dict[str, Callable[[Any, dict, dict], Any]] = {
    "$literal": lambda arg, doc, variables: arg,
    "$eq": _comparison(lambda c: c == 0), "$ne": _comparison(lambda c: c != 0),
    "$gt": _comparison(lambda c: c > 0), "$gte": _comparison(lambda c: c >= 0),
    "$lt": _comparison(lambda c: c < 0), "$lte": _comparison(lambda c: c <= 0),
    "$cmp": lambda arg, doc, variables: agg_compare(*_values(arg, doc, variables)),
    "$and": lambda arg, doc, variables: all(truthy(evaluate(a, doc, variables))
                                            for a in (arg if isinstance(arg, list) else [arg])),
    "$or": lambda arg, doc, variables: any(truthy(evaluate(a, doc, variables))
                                           for a in (arg if isinstance(arg, list) else [arg])),
    "$not": lambda arg, doc, variables: not truthy(_values(arg, doc, variables)[0]),
    "$cond": _cond, "$ifNull": _if_null, "$in": _in,
    "$type": lambda arg, doc, variables: agg_type(_values(arg, doc, variables)[0]),
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
