"""Metadata filters: a small, validated query language compiled to SQLite over JSON metadata.

A filter is a JSON object of conditions that must all hold:
    {"album": "paris"}                     equality
    {"year": {"$gte": 2019, "$lt": 2024}}  ranges: $gt $gte $lt $lte
    {"tag": {"$in": ["cat", "dog"]}}       membership; $ne and $exists too
    {"gps.lat": {"$gte": 48.5}}            one level into an object field (the photo's `gps`)
Values are strings, numbers or booleans. Keys are plain names (letters, digits, _ and -), or two
of them joined by one dot to reach a field of an object; each part is quoted in the JSON path.
"""

from __future__ import annotations

import math
import re
from typing import Any

FilterValue = str | int | float | bool
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64})?$")
# How `item_meta` names a field one level down: parent, unit separator, child. No filter key
# can contain the separator, and top-level keys that do are not indexed, so names never clash.
NESTED_SEPARATOR = "\x1f"
_OPS = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
MAX_CONDITIONS = 32
MAX_IN_VALUES = 256


class FilterError(ValueError):
    """A filter that is not well formed; the message says which part."""


INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # SQLite's INTEGER


def _check_scalar(key: str, value: Any) -> FilterValue:
    # bool is an int in Python; accept it explicitly, reject containers and null.
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise FilterError(f"filter value for {key!r} is not valid Unicode") from None
        return value
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise FilterError(f"filter value for {key!r} must be a finite number")
        if not INT_MIN <= value <= INT_MAX:
            # an int would not bind (OverflowError); one rule for ints and floats alike
            raise FilterError(
                f"filter value for {key!r} is outside [-2^63, 2^63-1], SQLite's integer range"
            )
        return value
    raise FilterError(
        f"filter value for {key!r} must be a string, number or boolean, got {type(value).__name__}"
    )


def _sql_value(value: FilterValue) -> Any:
    # json_extract returns SQLite integers 1/0 for JSON true/false.
    if isinstance(value, bool):
        return int(value)
    return value


Condition = tuple[str, str, Any]  # (key, operator, checked argument)


def parse_filter(filter_: dict[str, Any] | None) -> list[Condition]:
    """Validate a filter into (key, operator, argument) conditions that must all hold.
    Operators: the comparison operators, $in/$nin (a list of SQL values) and $exists."""
    if not filter_:
        return []
    if not isinstance(filter_, dict):
        raise FilterError("filter must be a JSON object")
    if len(filter_) > MAX_CONDITIONS:
        raise FilterError(f"filter has more than {MAX_CONDITIONS} keys")
    conditions: list[Condition] = []
    for key, cond in filter_.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise FilterError(f"filter key {key!r} must match {_KEY.pattern}")
        if not isinstance(cond, dict):
            conditions.append((key, "$eq", _sql_value(_check_scalar(key, cond))))
            continue
        if not cond:
            raise FilterError(f"filter for {key!r} has no operator")
        for op, arg in cond.items():
            if op in _OPS:
                conditions.append((key, op, _sql_value(_check_scalar(key, arg))))
            elif op in ("$in", "$nin"):
                if not isinstance(arg, list) or not arg or len(arg) > MAX_IN_VALUES:
                    raise FilterError(f"{op} for {key!r} needs a list of 1..{MAX_IN_VALUES} values")
                conditions.append((key, op, [_sql_value(_check_scalar(key, v)) for v in arg]))
            elif op == "$exists":
                if not isinstance(arg, bool):
                    raise FilterError(f"$exists for {key!r} must be true or false")
                conditions.append((key, op, arg))
            else:
                raise FilterError(f"unknown filter operator {op!r} for {key!r}")
    return conditions


def _value_clause(column: str, op: str, arg: Any) -> tuple[str, list[Any]]:
    if op in _OPS:
        return f"{column} {_OPS[op]} ?", [arg]
    marks = ",".join("?" * len(arg))
    return f"{column} {'NOT ' if op == '$nin' else ''}IN ({marks})", list(arg)


def compile_filter(filter_: dict[str, Any] | None) -> tuple[str, list[Any]]:
    """Return a SQL boolean expression over column `metadata` and its parameters.

    This reads the JSON of every row it is asked about (a full scan when used as a WHERE
    clause); `compile_indexed_filter` answers the same question from the indexed side table.
    """
    conditions = parse_filter(filter_)
    if not conditions:
        return "1", []
    clauses: list[str] = []
    params: list[Any] = []
    for key, op, arg in conditions:
        path = "$." + ".".join(f'"{part}"' for part in key.split("."))
        if op == "$exists":
            clauses.append(f"json_type(metadata, ?) IS {'NOT ' if arg else ''}NULL")
            params.append(path)
            continue
        clause, values = _value_clause("json_extract(metadata, ?)", op, arg)
        clauses.append(clause)
        params += [path, *values]
    return " AND ".join(clauses), params


def compile_indexed_filter(
    filter_: dict[str, Any] | None, kind: str
) -> tuple[str, list[Any]] | None:
    """A SQL query of the ids of `kind` matching the filter, answered from `item_meta` (one row
    per item and top-level key; `value` is exactly what json_extract returns for that key, so
    comparisons, type ordering, lists and booleans behave as in `compile_filter`). Each key is
    one range of the (kind, key, value, item_id) index; keys are intersected. None: no filter.
    """
    conditions = parse_filter(filter_)
    if not conditions:
        return None
    by_key: dict[str, list[tuple[str, Any]]] = {}
    for key, op, arg in conditions:
        by_key.setdefault(key.replace(".", NESTED_SEPARATOR), []).append((op, arg))
    parts: list[str] = []
    params: list[Any] = []
    for key, ops in by_key.items():
        where = ["kind = ?", "key = ?"]
        values: list[Any] = [kind, key]
        absent = False
        for op, arg in ops:
            if op == "$exists":
                # a row exists for the key exactly when json_type() is not NULL
                absent = absent or not arg
                continue
            clause, args = _value_clause("value", op, arg)
            where.append(clause)
            values += args
        keyed = f"SELECT item_id AS id FROM item_meta WHERE {' AND '.join(where)}"
        if absent:
            # Absent, and (if any value condition) matching it: nothing, as json_extract of an
            # absent key is NULL; the EXCEPT of the key's rows from all ids says exactly that.
            if len(where) > 2:
                parts.append("SELECT item_id AS id FROM item_meta WHERE 0")
                continue
            parts.append(f"SELECT id FROM (SELECT id FROM items WHERE kind = ? EXCEPT {keyed})")
            params.append(kind)
        else:
            parts.append(keyed)
        params += values
    return " INTERSECT ".join(parts), params


def filter_json_schema() -> dict[str, Any]:
    """The JSON Schema of exactly what `compile_filter` accepts, for the OpenAPI document."""
    number = {"type": "number", "minimum": INT_MIN, "maximum": INT_MAX}
    scalar = {"anyOf": [{"type": "string"}, {"type": "boolean"}, number]}
    values = {"type": "array", "items": scalar, "minItems": 1, "maxItems": MAX_IN_VALUES}
    operators: dict[str, Any] = {
        "type": "object",
        "properties": {
            **{op: scalar for op in _OPS},
            "$in": values,
            "$nin": values,
            "$exists": {"type": "boolean"},
        },
        "additionalProperties": False,
        "minProperties": 1,
    }
    return {
        "type": "object",
        "description": 'metadata conditions that must all hold, e.g. {"album": "paris", '
        '"year": {"$gte": 2020}}; operators $eq $ne $gt $gte $lt $lte $in $nin $exists',
        "maxProperties": MAX_CONDITIONS,
        # `$(?!\n)`: Python's `$` also matches before a final newline, ECMA's does not; with
        # the lookahead both dialects mean what `_KEY.fullmatch` means
        "propertyNames": {"pattern": _KEY.pattern + r"(?!\n)"},
        "additionalProperties": {"anyOf": [scalar, operators]},
    }
