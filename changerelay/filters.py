"""A safe subset of the MongoDB query language, evaluated by the relay itself.

Browsers subscribe with ``filter=<JSON>``; access rules from JWT claims use the same
language and are ANDed with the client's filter.  Nothing here is ever sent to MongoDB:
the relay evaluates filters against each decoded change event, so the semantics below
are re-implemented from MongoDB's classic matcher (``src/mongo/db/matcher/path.cpp``
and ``src/mongo/db/exec/matcher/matcher_single_element_match.cpp``) rather than
delegated.  Because a filter may be an access rule, a mismatch with MongoDB is a
security bug, not a cosmetic one.

Filters are compiled once into nested closures; :meth:`Filter.__call__` runs on the
per-event hot path and never re-reads the spec.

See ``docs/filters.md`` for the language reference.
"""

from __future__ import annotations

import collections
import json
import math
import operator as _operator
import re
import uuid
from collections.abc import Callable, Hashable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bson import json_util
from bson.binary import Binary
from bson.code import Code
from bson.codec_options import DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.dbref import DBRef
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.regex import Regex
from bson.timestamp import Timestamp

from .regex import MAX_LENGTH as MAX_REGEX_LENGTH
from .regex import Regex as RE2Pattern
from .regex import RegexError, compile_regex

__all__ = [
    "BUDGET_PASSES",
    "BUDGET_STEPS",
    "MAX_DEPTH",
    "MAX_FILTER_BYTES",
    "MAX_NODES",
    "MAX_REGEXES",
    "MAX_REGEX_LENGTH",
    "Filter",
    "FilterError",
    "all_of",
    "compile_filter",
    "composite",
    "equality_key",
    "parse_filter",
    "reached",
]

MAX_FILTER_BYTES = 4096
MAX_DEPTH = 16
#: Keys and values in a client's filter document (which bounds ``$in``/``$nin`` too): 4 KiB
#: could hold about 2,000; a filter that needs more belongs in a token's claim.
MAX_NODES = 1024
#: Regexes one filter may search with: each holds up to ``regex.MEMORY`` of RE2 state.
MAX_REGEXES = 8
#: Steps one evaluation may take: a step is at most about 0.25 µs here, so about a millisecond
#: (BENCHMARKS.md, *Filters*) ...
BUDGET_STEPS = 4_000
#: ... or this many times the event's own size if that is more (``_size``): a large event can
#: still be matched in full by a filter of a few conditions, and costs at most a few walks.
BUDGET_PASSES = 4
# A regex search reads 16 bytes per step for each of its positions (RE2's worst case, when its
# DFA gives up, is about 12 ns per position per byte); a string counts a step per 2 bytes of an
# event's size, so that one pass lets a 32-position regex read it.
_REGEX_BYTES_PER_STEP = 16
_SEQUENCE_STEPS = 20  # comparing with an array or a document operand, before its elements
_STRING_BYTES_PER_STEP = 2

#: First path segments a filter may look at: the parts of a change event that carry data.
TOP_LEVEL_FIELDS = frozenset(
    {
        "fullDocument",
        "fullDocumentBeforeChange",
        "documentKey",
        "updateDescription",
        "ns",
        "operationType",
        "to",
    }
)
LOGICAL_OPERATORS = ("$and", "$or", "$nor")
FIELD_OPERATORS = (
    "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$not", "$regex",
    "$options",
)  # fmt: skip

_JSON_OPTIONS = json_util.JSONOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)
_KEY_OPTIONS = json_util.JSONOptions(
    json_mode=json_util.JSONMode.CANONICAL,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
)
# Extended JSON wrappers handed to json_util.object_hook (the keys it dispatches on).  The
# regex spellings are missing on purpose: "$regex" is also a query operator, and json_util
# would turn {"$regex": "a", "$ne": "b"} into /a/, silently dropping the $ne; both regex
# forms are decoded here instead, which also lets us validate their flags.
_EJSON_KEYS = frozenset(
    {
        "$oid", "$ref", "$date", "$minKey", "$maxKey", "$binary", "$code", "$uuid",
        "$undefined", "$numberLong", "$timestamp", "$numberDecimal", "$dbPointer", "$symbol",
        "$numberInt", "$numberDouble",
    }
)  # fmt: skip
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class FilterError(ValueError):
    """A filter was refused; ``code`` is stable for clients, ``message`` says how to fix it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _OverBudget(Exception):
    """An evaluation ran out of steps: the filter does not match this event."""


class _Budget:
    """The work one evaluation of one filter may still do; a filter has one, reset per call.

    Steps are charged where work grows with the event rather than with the filter: each array
    element a path reaches (times what testing it costs), and each byte a regex reads (times its
    positions). Everything else a filter does per event is bounded by its own size. Past the
    budget the whole filter is False, never its negation: like MongoDB's own PCRE2 match limit,
    a filter that cannot finish does not match, and a token's row rule then withholds.

    One evaluation at a time per filter, as the relay's single event loop does them."""

    __slots__ = ("allowance", "event", "regexes", "spent")

    def __init__(self) -> None:
        self.spent = 0
        self.allowance = BUDGET_STEPS
        self.event: Any = None
        self.regexes = 0  # counted while compiling

    def charge(self, steps: int) -> None:
        self.spent += steps
        if self.spent > self.allowance:
            self._extend()

    def _extend(self) -> None:
        if self.allowance == BUDGET_STEPS:  # once per evaluation: a walk of the whole event
            self.allowance = max(BUDGET_STEPS, BUDGET_PASSES * _size(self.event))
            if self.spent <= self.allowance:
                return
        raise _OverBudget


def _size(event: Any) -> int:
    """An event's size in steps: one per value, and one per ``_STRING_BYTES_PER_STEP`` bytes of
    its strings (characters, which are bytes for ASCII)."""
    size, stack = 0, [event]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            size += len(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            size += len(node)
            stack.extend(node)
        elif isinstance(node, str):
            size += len(node) // _STRING_BYTES_PER_STEP
    return size


# ---------------------------------------------------------------------------------------
# BSON comparison order
#
# MongoDB compares values only within a "canonical type" bracket (bsontypes.h,
# canonicalizeBSONType); numbers of every width share one bracket.  Missing compares as
# EOO (0), which is why ``{$eq: null}`` can match it: matcher_single_element_match.cpp
# special-cases null (5) against EOO/undefined (0).
# ---------------------------------------------------------------------------------------


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

_MINKEY, _EOO, _NULL, _NUMBER, _STRING, _OBJECT, _ARRAY = -1, 0, 5, 10, 15, 20, 25
_BINARY, _OID, _BOOL, _DATE, _TIMESTAMP, _REGEX, _CODE, _CODE_W_SCOPE = (
    30, 35, 40, 45, 47, 50, 60, 65,
)  # fmt: skip
_MAXKEY, _UNSUPPORTED = 127, 1000

_BRACKETS: dict[type, int] = {
    type(None): _NULL,
    bool: _BOOL,
    int: _NUMBER,
    Int64: _NUMBER,
    float: _NUMBER,
    Decimal128: _NUMBER,
    str: _STRING,
    dict: _OBJECT,
    DBRef: _OBJECT,
    list: _ARRAY,
    bytes: _BINARY,
    Binary: _BINARY,
    uuid.UUID: _BINARY,
    ObjectId: _OID,
    datetime: _DATE,
    DatetimeMS: _DATE,
    Timestamp: _TIMESTAMP,
    Regex: _REGEX,
    re.Pattern: _REGEX,
    MinKey: _MINKEY,
    MaxKey: _MAXKEY,
    _Missing: _EOO,
}


def _bracket(value: Any) -> int:
    bracket = _BRACKETS.get(type(value))
    if bracket is not None:
        return bracket
    if isinstance(value, Code):  # a str subclass: must be tested before str
        return _CODE if value.scope is None else _CODE_W_SCOPE
    for kind, bracket in _BRACKETS.items():
        if isinstance(value, kind) and kind is not bool:
            return bracket
    return _UNSUPPORTED


_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def _sign(a: Any, b: Any) -> int:
    return int(a > b) - int(a < b)


def _number(value: Any) -> int | float | Decimal:
    return value.to_decimal() if type(value) is Decimal128 else value


def _is_nan(value: int | float | Decimal) -> bool:
    return value != value if type(value) is float else type(value) is Decimal and value.is_nan()


def _compare_numbers(a: Any, b: Any) -> int:
    # BSON order puts NaN below every number and equal to itself; Python would refuse
    # (Decimal) or answer False to everything (float).  int/float/Decimal comparisons
    # are exact in Python, as they are in MongoDB.
    a, b = _number(a), _number(b)
    a_nan, b_nan = _is_nan(a), _is_nan(b)
    if a_nan or b_nan:
        return b_nan - a_nan
    return _sign(a, b)


def _millis(value: datetime | DatetimeMS) -> int:
    if isinstance(value, DatetimeMS):
        return int(value)
    # PyMongo decodes naive UTC datetimes by default; timedelta arithmetic cannot overflow.
    epoch = _EPOCH if value.tzinfo is None else _EPOCH_UTC
    return (value - epoch) // _MILLISECOND


def _binary_key(value: Any) -> tuple[int, int, bytes]:
    # BSON sorts BinData by length, then subtype, then bytes ("Comparison/Sort Order").
    if isinstance(value, uuid.UUID):
        return (16, 4, value.bytes)
    subtype = value.subtype if isinstance(value, Binary) else 0
    return (len(value), subtype, bytes(value))


def _regex_parts(value: Regex[Any] | re.Pattern[str]) -> tuple[str, str]:
    pattern = value.pattern
    if isinstance(pattern, bytes):
        pattern = pattern.decode("utf-8", "replace")
    return pattern, _flags_to_str(value.flags)


def _flags_to_str(flags: int | str) -> str:
    if isinstance(flags, str):
        return "".join(sorted(flags))
    out = ""
    for letter, bit in (("i", re.I), ("l", re.L), ("m", re.M), ("s", re.S), ("x", re.X)):
        if flags & bit:
            out += letter
    return out


def _items(value: Any) -> list[tuple[str, Any]]:
    return list((value.as_doc() if isinstance(value, DBRef) else value).items())


def _compare(a: Any, b: Any) -> int:
    """Total BSON order; ``b`` is a filter operand, ``a`` a value from an event."""
    bracket_a, bracket_b = _bracket(a), _bracket(b)
    if bracket_a != bracket_b:
        return _sign(bracket_a, bracket_b)
    if bracket_a == _NUMBER:
        return _compare_numbers(a, b)
    if bracket_a in (_STRING, _BOOL, _CODE):
        return _sign(str(a) if bracket_a == _CODE else a, str(b) if bracket_a == _CODE else b)
    if bracket_a == _OBJECT:
        return _compare_sequences(_items(a), _items(b), named=True)
    if bracket_a == _ARRAY:
        return _compare_sequences(a, b, named=False)
    if bracket_a == _BINARY:
        return _sign(_binary_key(a), _binary_key(b))
    if bracket_a == _OID:
        return _sign(a.binary, b.binary)
    if bracket_a == _DATE:
        return _sign(_millis(a), _millis(b))
    if bracket_a == _TIMESTAMP:
        return _sign((a.time, a.inc), (b.time, b.inc))
    if bracket_a == _REGEX:
        return _sign(_regex_parts(a), _regex_parts(b))
    if bracket_a == _CODE_W_SCOPE:
        return _sign(str(a), str(b)) or _compare(a.scope, b.scope)
    if bracket_a == _UNSUPPORTED:  # never produced by a filter operand; be unequal
        return -1
    return 0  # MinKey, MaxKey, null, missing: one value each


def _compare_sequences(a: Iterable[Any], b: Iterable[Any], *, named: bool) -> int:
    # BSONObj::woCompare: element by element, canonical type first, then field name,
    # then value; a prefix sorts first.  Field order therefore matters for documents.
    a, b = list(a), list(b)
    for left, right in zip(a, b, strict=False):
        if named:
            (left_name, left), (right_name, right) = left, right
            by_type = _sign(_bracket(left), _bracket(right))
            if by_type:
                return by_type
            by_name = _sign(left_name, right_name)
            if by_name:
                return by_name
        by_value = _compare(left, right)
        if by_value:
            return by_value
    return _sign(len(a), len(b))


_NAN_KEY = "NaN"  # every NaN, float or Decimal128, equals every other (_compare_numbers)


def equality_key(value: Any) -> Hashable:
    """A hashable stand-in for ``value`` under ``$eq``: two values have equal keys exactly when
    ``_compare`` finds them equal within one bracket, and missing has null's key, as
    ``{$eq: null}`` matches it. The subscription index looks values up by it (``index.py``).

    Numbers keep Python's own equality and hashing, which are exact across int, float and
    Decimal (1 == 1.0 == Decimal("1"), 0.1 != Decimal("0.1")) as BSON's are; the bracket in
    front keeps true apart from 1. A value no operand can equal (an unsupported type) gets a
    key of its own."""
    bracket = _bracket(value)
    if bracket == _NUMBER:
        number = _number(value)
        return (_NUMBER, _NAN_KEY if _is_nan(number) else number)
    if bracket in (_STRING, _BOOL, _CODE):
        return (bracket, str(value) if bracket == _CODE else value)
    if bracket == _OBJECT:
        return (_OBJECT, tuple((name, equality_key(item)) for name, item in _items(value)))
    if bracket == _ARRAY:
        return (_ARRAY, tuple(equality_key(item) for item in value))
    if bracket == _BINARY:
        return (_BINARY, _binary_key(value))
    if bracket == _OID:
        return (_OID, value.binary)
    if bracket == _DATE:
        return (_DATE, _millis(value))
    if bracket == _TIMESTAMP:
        return (_TIMESTAMP, value.time, value.inc)
    if bracket == _REGEX:
        return (_REGEX, _regex_parts(value))
    if bracket == _CODE_W_SCOPE:
        return (_CODE_W_SCOPE, str(value), equality_key(value.scope))
    if bracket == _UNSUPPORTED:
        return (_UNSUPPORTED, object())  # equal to nothing, as _compare makes it
    return (_NULL if bracket == _EOO else bracket,)  # MinKey, MaxKey, null, missing


def composite(value: Any) -> bool:
    """Whether ``value`` is a document or an array to BSON (a DBRef is a document): only such a
    value can equal one, and keying one costs a walk of it."""
    return _bracket(value) in (_OBJECT, _ARRAY)


# ---------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------


def _collect(
    document: dict[str, Any], parts: tuple[str, ...], start: int, out: list[Any], budget: _Budget
) -> None:
    """Append the values ``parts[start:]`` reaches in ``document``, as MongoDB would.

    A transcription of BSONElementIterator (path.cpp), classic/legacy semantics:

    * walk through embedded documents; a scalar before the end of the path is missing;
    * a leaf array yields each element, then the array itself;
    * a non-leaf array recurses into its document elements, and a numeric segment also
      indexes the array; scalar elements contribute nothing.
    """
    last = len(parts) - 1
    index = start
    while True:
        value = document.get(parts[index], MISSING)
        if isinstance(value, dict):
            if index == last:
                out.append(value)
                return
            document = value
            index += 1
            continue
        if isinstance(value, list):
            break
        out.append(value if index == last else MISSING)
        return
    if index == last:
        out.extend(value)
        out.append(value)
        return
    _collect_array(value, parts, index + 1, out, budget)


def _collect_array(
    array: list[Any], parts: tuple[str, ...], start: int, out: list[Any], budget: _Budget
) -> None:
    # Every element is a step, and a document element (which _collect walks into) three more;
    # a numeric segment reads one element twice (as a field and by position), so nested ones
    # would otherwise multiply.
    budget.charge(4 * len(array) + 4)
    segment = parts[start]
    numeric = segment.isascii() and segment.isdigit()
    ends_here = start == len(parts) - 1
    for position, element in enumerate(array):
        offset_match = numeric and str(position) == segment
        if isinstance(element, dict):
            _collect(element, parts, start, out, budget)
            if offset_match:
                if ends_here:
                    out.append(element)
                else:
                    _collect(element, parts, start + 1, out, budget)
        elif offset_match:
            if ends_here:
                out.append(element)  # an offset names the element: no implicit expansion
            elif isinstance(element, list):
                _collect_array(element, parts, start + 1, out, budget)


def reached(document: dict[str, Any], parts: tuple[str, ...]) -> list[Any] | None:
    """The values the path ``parts`` reaches in ``document``, as a filter's conditions see them
    (each element of a leaf array and the array itself, ``MISSING`` where the path ends early);
    None when walking it takes more than one evaluation's budget, which only paths with
    numeric segments through nested arrays can."""
    budget = _Budget()
    budget.event = document
    out: list[Any] = []
    try:
        _collect(document, parts, 0, out, budget)
    except _OverBudget:
        return None
    return out


def _check_path(path: str) -> str:
    parts = path.split(".")
    if parts[0] not in TOP_LEVEL_FIELDS:
        allowed = ", ".join(sorted(TOP_LEVEL_FIELDS))
        raise FilterError(
            "unknown_field",
            f"field {path!r} is not filterable: a path must start with one of {allowed} "
            f"(e.g. 'fullDocument.{path}')",
        )
    for part in parts:
        if not part or part.startswith("$") or "\0" in part:
            raise FilterError(
                "invalid_filter",
                f"field path {path!r} is malformed: segments must be non-empty, must not "
                "start with '$' and must not contain NUL",
            )
    return path


# ---------------------------------------------------------------------------------------
# Regular expressions: MongoDB's PCRE2 dialect, run by RE2 in linear time (regex.py)
# ---------------------------------------------------------------------------------------


def _compile_regex(pattern: Any, options: Any) -> RE2Pattern:
    if not isinstance(pattern, str):
        raise FilterError("invalid_filter", "$regex needs a string pattern")
    if not isinstance(options, str):
        raise FilterError("invalid_filter", '$options needs a string of flags, e.g. "i"')
    try:
        return compile_regex(pattern, options)
    except RegexError as exc:
        raise FilterError(exc.code, f"regex {pattern[:300]!r} refused: {exc}") from None


# ---------------------------------------------------------------------------------------
# Values (Extended JSON)
# ---------------------------------------------------------------------------------------


def _value(value: Any) -> Any:
    """Decode Extended JSON wrappers in an operand and check every type is comparable."""
    kind = type(value)
    if value is None or kind in (bool, str, float):
        return value
    if kind is int or kind is Int64:
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise FilterError(
                "invalid_filter",
                f"integer {value} does not fit in 64 bits; use a float or $numberDecimal",
            )
        return value
    if isinstance(value, list):
        return [_value(item) for item in value]
    if isinstance(value, dict):
        keys = set(value)
        if keys & {"$regex", "$options", "$regularExpression"}:
            return _regex_literal(value)
        decoded = {key: _value(item) for key, item in value.items()}
        if keys & _EJSON_KEYS:
            try:
                converted = json_util.object_hook(decoded, _JSON_OPTIONS)
            except Exception as exc:  # json_util raises a zoo of types for bad wrappers
                raise FilterError(
                    "invalid_filter", f"invalid Extended JSON value {value!r}: {exc}"
                ) from None
            return _value(converted) if converted is not decoded else decoded
        for key in decoded:
            if not isinstance(key, str):
                raise FilterError("invalid_filter", f"document keys must be strings: {key!r}")
        return decoded
    if isinstance(value, Regex | re.Pattern):
        pattern, flags = _regex_parts(value)
        _compile_regex(pattern, flags)
        return Regex(pattern, flags)
    if isinstance(value, uuid.UUID):
        return Binary.from_uuid(value)
    if isinstance(value, Code) or _bracket(value) == _UNSUPPORTED:
        raise FilterError(
            "invalid_filter", f"values of type {kind.__name__} cannot be used in a filter"
        )
    return value


def _regex_literal(value: dict[str, Any]) -> Regex[Any]:
    """Legacy ``{"$regex", "$options"}`` or canonical ``$regularExpression`` as a value."""
    if "$regularExpression" in value:
        inner = value["$regularExpression"]
        if len(value) != 1 or not isinstance(inner, dict) or set(inner) != {"pattern", "options"}:
            raise FilterError(
                "invalid_filter",
                '$regularExpression must be {"pattern": <string>, "options": <string>}',
            )
        pattern, options = inner["pattern"], inner["options"]
    else:
        if set(value) - {"$regex", "$options"} or "$regex" not in value:
            raise FilterError(
                "invalid_filter",
                "a {$regex, $options} value cannot have other keys; write the other "
                "operators next to $regex in the field's operator document",
            )
        pattern, options = value["$regex"], value.get("$options", "")
        if isinstance(pattern, Regex):
            if options:
                raise FilterError("invalid_filter", "give regex flags once, not in both places")
            pattern, options = _regex_parts(pattern)
    _compile_regex(pattern, options)
    return Regex(pattern, _flags_to_str(options))


# ---------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------

Predicate = Callable[[dict[str, Any]], bool]
Test = Callable[[Any], bool]


def _any(parts: tuple[str, ...], test: Test, weight: int, budget: _Budget) -> Predicate:
    """True when ``test`` holds for any value the path reaches.

    The common shapes (documents all the way down, maybe a leaf array) are walked inline;
    anything with an array before the last segment goes through :func:`_collect`. Testing
    the elements of an array costs ``weight`` steps each.
    """
    *head, last = parts
    charge = budget.charge

    def read(event: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        _collect(event, parts, 0, out, budget)  # the arrays on the way charge for themselves
        charge(len(out) * weight)
        return out

    def predicate(event: dict[str, Any]) -> bool:
        document = event
        for part in head:
            value = document.get(part, MISSING)
            if isinstance(value, dict):
                document = value
            elif isinstance(value, list):
                return any(map(test, read(event)))
            else:
                return test(MISSING)
        value = document.get(last, MISSING)
        if isinstance(value, list):
            charge(len(value) * weight)
            return test(value) or any(map(test, value))
        return test(value)

    return predicate


_ORDER = {"$eq": _operator.eq, "$gt": _operator.gt, "$gte": _operator.ge,
          "$lt": _operator.lt, "$lte": _operator.le}  # fmt: skip
# Python's own comparison is MongoDB's for these pairs (NaN operands excluded: a NaN
# *value* already compares False to every non-NaN number in both).
_FAST_COMPARE = {
    (kind, name): (types, function)
    for kinds, types in (((str,), {str}), ((int, float), {int, float}))
    for kind in kinds
    for name, function in _ORDER.items()
}


def _comparison(operator: str, operand: Any) -> Test:
    """One element against one operand (evaluateComparisonExpressionSingleElement)."""
    bracket = _bracket(operand)
    operand_is_nan = bracket == _NUMBER and _is_nan(_number(operand))
    want = {
        "$eq": (0,), "$lt": (-1,), "$lte": (-1, 0), "$gt": (1,), "$gte": (0, 1),
    }[operator]  # fmt: skip
    missing_matches = bracket == _NULL and 0 in want  # null == missing, for eq/lte/gte

    def test(value: Any) -> bool:
        value_bracket = _bracket(value)
        if value_bracket != bracket:
            if bracket == _MINKEY:
                return operator in ("$gt", "$gte")
            if bracket == _MAXKEY:
                return operator in ("$lt", "$lte")
            return missing_matches and value_bracket == _EOO
        if operator != "$eq" and bracket == _NUMBER:
            value_is_nan = _is_nan(_number(value))
            if value_is_nan or operand_is_nan:
                return value_is_nan and operand_is_nan and 0 in want
        return _compare(value, operand) in want

    fast = _FAST_COMPARE.get((type(operand), operator))
    if fast is None or operand_is_nan:
        return test
    compare = fast[1]
    fast_types = fast[0]

    def fast_test(value: Any) -> bool:
        # Exact str/int/float only: bool, Int64, Code and friends take the general path.
        if type(value) in fast_types:
            return bool(compare(value, operand))
        return test(value)

    return fast_test


def _regex_test(literal: Regex[Any], budget: _Budget) -> Test:
    parts = _regex_parts(literal)
    budget.regexes += 1
    if budget.regexes > MAX_REGEXES:
        raise FilterError(
            "filter_too_complex",
            f"a filter may search with at most {MAX_REGEXES} regexes; combine them with |",
        )
    compiled = _compile_regex(*parts)
    search, positions, charge = compiled.search, compiled.positions, budget.charge

    def test(value: Any) -> bool:
        if type(value) is str or (isinstance(value, str) and not isinstance(value, Code)):
            # Decoded BSON is valid UTF-8; anything else still reaches RE2 as bytes it can read.
            data = value.encode("utf-8", "surrogatepass")
            charge(positions * (1 + len(data) // _REGEX_BYTES_PER_STEP))
            return search(data)
        if isinstance(value, Regex | re.Pattern):  # a stored regex matches only itself
            return _regex_parts(value) == parts
        return False

    return test


def _plain_scalar(item: Any) -> bool:
    return type(item) in (str, int, float) and item == item


def _in_test(operands: list[Any], budget: _Budget) -> tuple[Test, int]:
    """The test, and its weight: one step, and the operands a value may be compared with."""
    # Exact str/int/float operands go in a set: hashing agrees with BSON equality there
    # (1 == 1.0), and bool values never reach it.  NaN would not find itself, so it
    # stays with the general tests, as does everything else.
    hashable = {item for item in operands if _plain_scalar(item)}
    every = [
        _regex_test(item, budget) if isinstance(item, Regex) else _comparison("$eq", item)
        for item in operands
    ]
    weight = 1 + sum(_weight(item) for item in operands if not _plain_scalar(item))
    rest = [check for item, check in zip(operands, every, strict=True) if not _plain_scalar(item)]

    def test(value: Any) -> bool:
        # A null operand also matches missing, through _comparison, as $eq: null does.
        if type(value) in (str, int, float):
            if value in hashable:
                return True
            return bool(rest) and any(check(value) for check in rest)  # usually none left
        return any(check(value) for check in every)

    return test, weight


def _weight(operand: Any) -> int:
    """What comparing a value with ``operand`` may cost, in steps: for an array or a document,
    a few microseconds and its size (a comparison stops at the shorter of the two)."""
    return _SEQUENCE_STEPS + _size(operand) if isinstance(operand, dict | list) else 1


def _not(predicate: Predicate) -> Predicate:
    return lambda event: not predicate(event)


def all_of(predicates: list[Predicate]) -> Predicate:
    """One predicate that holds when every one of ``predicates`` does, in order."""
    if not predicates:
        return lambda event: True
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:
        first, second = predicates
        return lambda event: first(event) and second(event)
    return lambda event: all(predicate(event) for predicate in predicates)


def _operator_document(
    path: str, parts: tuple[str, ...], spec: dict[str, Any], budget: _Budget
) -> tuple[Predicate, dict[str, Any]]:
    """Compile ``{"$gt": 1, "$lt": 5}`` for one path; each operator traverses on its own."""
    predicates: list[Predicate] = []
    normal: dict[str, Any] = {}
    if "$options" in spec and "$regex" not in spec:
        raise FilterError("invalid_filter", f"$options on {path!r} needs a $regex next to it")
    for operator, operand in spec.items():
        if operator == "$options":
            continue
        if not isinstance(operator, str) or not operator.startswith("$"):
            raise FilterError(
                "invalid_filter",
                f"{path!r} mixes operators with the plain field {operator!r}; to match an "
                'embedded document use {"$eq": {...}}',
            )
        if operator not in FIELD_OPERATORS:
            raise _unknown(operator, FIELD_OPERATORS)
        if operator in ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte"):
            value = _value(operand)
            if isinstance(value, Regex) and operator != "$eq":
                # MongoDB refuses these too (SERVER-1705): $ne/$gt of a regex is ambiguous.
                raise FilterError(
                    "invalid_filter",
                    f'{operator} on {path!r} cannot take a regex; use {{"$not": <regex>}} '
                    "to exclude matches",
                )
            test = _comparison("$eq" if operator == "$ne" else operator, value)
            predicate = _any(parts, test, _weight(value), budget)
            predicates.append(_not(predicate) if operator == "$ne" else predicate)
            normal[operator] = value
        elif operator in ("$in", "$nin"):
            if not isinstance(operand, list):
                raise FilterError("invalid_filter", f"{operator} on {path!r} needs an array")
            values = [_value(item) for item in operand]
            for item in values:
                if isinstance(item, dict) and any(str(key).startswith("$") for key in item):
                    raise FilterError(
                        "invalid_filter", f"{operator} on {path!r} cannot contain operators"
                    )
            predicate = _any(parts, *_in_test(values, budget), budget)
            predicates.append(_not(predicate) if operator == "$nin" else predicate)
            normal[operator] = values
        elif operator == "$exists":
            if not isinstance(operand, bool | int | float):
                raise FilterError("invalid_filter", f"$exists on {path!r} takes true or false")
            exists = _any(parts, lambda value: value is not MISSING, 1, budget)
            predicates.append(exists if operand else _not(exists))
            normal[operator] = bool(operand)
        elif operator == "$regex":
            literal = _regex_literal({"$regex": operand, "$options": spec.get("$options", "")})
            predicates.append(_any(parts, _regex_test(literal, budget), 1, budget))
            normal["$regex"], normal["$options"] = _regex_parts(literal)
        else:  # $not
            if isinstance(operand, Regex | re.Pattern) or (
                isinstance(operand, dict) and "$regularExpression" in operand
            ):
                literal = _value(operand)
                operand = {"$regex": literal.pattern, "$options": _flags_to_str(literal.flags)}
            if not isinstance(operand, dict) or not operand:
                raise FilterError(
                    "invalid_filter",
                    f"$not on {path!r} takes a non-empty operator document or a regex",
                )
            if not all(isinstance(key, str) and key.startswith("$") for key in operand):
                raise FilterError(
                    "invalid_filter", f'$not on {path!r} takes operators, e.g. {{"$gt": 5}}'
                )
            inner, inner_normal = _operator_document(path, parts, operand, budget)
            predicates.append(_not(inner))
            normal[operator] = inner_normal
    return all_of(predicates), dict(sorted(normal.items()))


def _unknown(operator: str, allowed: Iterable[str], where: str = "on a field") -> FilterError:
    hint = (
        f"; field operators ({', '.join(FIELD_OPERATORS)}) go inside a field's condition"
        if where == "at the top level"
        else ""
    )
    return FilterError(
        "unknown_operator",
        f"operator {operator!r} is not supported {where}; allowed: {', '.join(allowed)}{hint}",
    )


def _field(path: str, condition: Any, budget: _Budget) -> tuple[Predicate, dict[str, Any]]:
    parts = tuple(_check_path(path).split("."))
    if isinstance(condition, dict) and condition:
        keys = list(condition)
        if keys[0].startswith("$") if isinstance(keys[0], str) else False:
            if set(keys) & _EJSON_KEYS or "$regularExpression" in keys:
                condition = _value(condition)  # {"$oid": ...}: an Extended JSON value
            else:
                return _operator_document(path, parts, condition, budget)
        elif any(isinstance(key, str) and key.startswith("$") for key in keys):
            raise FilterError(
                "invalid_filter",
                f"{path!r} mixes plain fields with operators; put operators first or use $eq",
            )
    value = _value(condition)
    if isinstance(value, Regex):  # {field: /re/} means "matches", not "equals"
        return _operator_document(path, parts, {"$regex": value}, budget)
    return _any(parts, _comparison("$eq", value), _weight(value), budget), {"$eq": value}


def _filter(spec: Any, budget: _Budget) -> tuple[Predicate, dict[str, Any]]:
    if not isinstance(spec, dict):
        raise FilterError(
            "invalid_filter", f"a filter must be a JSON object, not {type(spec).__name__}"
        )
    predicates: list[Predicate] = []
    normal: dict[str, Any] = {}
    for key, condition in spec.items():
        if not isinstance(key, str):
            raise FilterError("invalid_filter", f"filter keys must be strings, not {key!r}")
        if key in LOGICAL_OPERATORS:
            if not isinstance(condition, list) or not condition:
                raise FilterError("invalid_filter", f"{key} needs a non-empty array of filters")
            compiled = [_filter(branch, budget) for branch in condition]
            branches = [predicate for predicate, _ in compiled]
            normal[key] = [branch_normal for _, branch_normal in compiled]
            if key == "$and":
                predicates.append(all_of(branches))
            else:
                either = _either(branches)
                predicates.append(either if key == "$or" else _not(either))
        elif key.startswith("$"):
            raise _unknown(key, LOGICAL_OPERATORS, where="at the top level")
        else:
            predicate, normal[key] = _field(key, condition, budget)
            predicates.append(predicate)
    return all_of(predicates), dict(sorted(normal.items()))


def _either(predicates: list[Predicate]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]
    return lambda event: any(predicate(event) for predicate in predicates)


def _check_shape(spec: Any, max_nodes: int | None) -> None:
    """Depth, and for a client's filter the number of keys and values.

    Iterative, so a hostile or cyclic object cannot exhaust the stack before we refuse."""
    stack, nodes = [(spec, 1)], 0
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        if not isinstance(node, dict | list):
            continue
        children = node.values() if isinstance(node, dict) else node
        nodes += len(children)
        if max_nodes is not None and nodes > max_nodes:
            raise FilterError(
                "filter_too_complex",
                f"filter has more than {max_nodes} keys and values; narrow it, or put long "
                "lists in the token's filter claim",
            )
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


class Filter:
    """A compiled filter: call it with a change event to learn whether it matches.

    Hot loops take ``predicate`` itself, the same test without the call through ``Filter``.
    """

    __slots__ = ("key", "predicate", "spec")

    def __init__(self, predicate: Predicate, spec: dict[str, Any]) -> None:
        self.predicate = predicate
        self.spec = spec
        self.key = json_util.dumps(
            spec, json_options=_KEY_OPTIONS, separators=(",", ":"), ensure_ascii=False
        )

    def __call__(self, event: dict[str, Any]) -> bool:
        return self.predicate(event)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Filter) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Filter({self.key})"


def compile_filter(spec: dict[str, Any]) -> Filter:
    """Compile an already-decoded filter document, such as a JWT claim.

    Extended JSON wrappers (``{"$oid": ...}``) are decoded here too, so a rule written as
    JSON in a token means the same as the same text given to :func:`parse_filter`.
    """
    _check_shape(spec, max_nodes=None)
    return _compile(spec)


def _compile(spec: Any) -> Filter:
    budget = _Budget()
    try:
        predicate, normal = _filter(spec, budget)
    except RecursionError:  # pragma: no cover - depth is capped above
        raise FilterError("filter_too_deep", "filter nests too deeply") from None
    return Filter(_within(budget, predicate) if normal else predicate, normal)


def _within(budget: _Budget, predicate: Predicate) -> Predicate:
    """``predicate`` with its budget renewed for each event, and False once that runs out."""

    def evaluate(event: dict[str, Any]) -> bool:
        budget.spent = 0
        budget.allowance = BUDGET_STEPS
        budget.event = event
        try:
            return predicate(event)
        except _OverBudget:
            return False

    return evaluate


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _refuse_constant(name: str) -> Any:
    raise FilterError("invalid_json", f'{name} is not JSON; use {{"$numberDouble": "{name}"}}')


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 19 or not _INT64_MIN <= int(text) <= _INT64_MAX:
        raise FilterError(
            "invalid_filter",
            f"integer {text[:30]} does not fit in 64 bits; use a float or $numberDecimal",
        )
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise FilterError(
            "invalid_filter",
            f"number {text[:30]} is out of range for a double; use $numberDecimal",
        )
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        counts = collections.Counter(key for key, _ in pairs)
        duplicate = next(key for key, _ in pairs if counts[key] > 1)
        raise FilterError(
            "invalid_filter", f"key {duplicate!r} appears twice; combine the conditions"
        )
    return document


def parse_filter(text: str | bytes) -> Filter:
    """Parse the JSON text of a ``filter`` query parameter (untrusted) and compile it."""
    if isinstance(text, str):
        if len(text) > MAX_FILTER_BYTES:
            raise _too_large(len(text))
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:
            raise FilterError("invalid_json", "filter text is not valid Unicode") from None
    elif isinstance(text, bytes | bytearray | memoryview):
        raw = bytes(text)
    else:
        raise FilterError("invalid_json", "filter must be JSON text")
    if len(raw) > MAX_FILTER_BYTES:
        raise _too_large(len(raw))
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FilterError("invalid_json", "filter is not valid UTF-8") from None
    # Measure nesting before json does: its C scanner recurses once per level.
    depth = deepest = 0
    for char in _JSON_STRING.sub("", source):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise _too_deep()
    try:
        spec = json.loads(
            source,
            object_pairs_hook=_unique_keys,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except FilterError:
        raise
    except (ValueError, RecursionError) as exc:
        raise FilterError("invalid_json", f"filter is not valid JSON: {exc}") from None
    _check_shape(spec, MAX_NODES)
    return _compile(spec)


def _too_deep() -> FilterError:
    return FilterError(
        "filter_too_deep", f"documents and arrays nest deeper than {MAX_DEPTH} levels"
    )


def _too_large(size: int) -> FilterError:
    return FilterError(
        "filter_too_large", f"filter is {size} bytes; the limit is {MAX_FILTER_BYTES}"
    )

