"""Metadata filters: a small, validated query language compiled to SQLite over JSON metadata.

A filter is a JSON object of conditions that must all hold:
    {"album": "paris"}                     equality
    {"year": {"$gte": 2019, "$lt": 2024}}  ranges: $gt $gte $lt $lte
    {"tag": {"$in": ["cat", "dog"]}}       membership; $ne and $exists too
Values are strings, numbers or booleans. Keys are plain names (letters, digits, _ and -; no dots, so a key never reaches into nested JSON).
"""

from __future__ import annotations

import math
import re
from typing import Any

FilterValue = str | int | float | bool
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
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


def compile_filter(filter_: dict[str, Any] | None) -> tuple[str, list[Any]]:
    """Return a SQL boolean expression over column `metadata` and its parameters."""
    if not filter_:
        return "1", []
    if not isinstance(filter_, dict):
        raise FilterError("filter must be a JSON object")
    if len(filter_) > MAX_CONDITIONS:
        raise FilterError(f"filter has more than {MAX_CONDITIONS} keys")
    clauses: list[str] = []
    params: list[Any] = []
    for key, cond in filter_.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise FilterError(f"filter key {key!r} must match {_KEY.pattern}")
        path = f'$."{key}"'
        field = "json_extract(metadata, ?)"
        if not isinstance(cond, dict):
            value = _check_scalar(key, cond)
            clauses.append(f"{field} = ?")
            params += [path, _sql_value(value)]
            continue
        if not cond:
            raise FilterError(f"filter for {key!r} has no operator")
        for op, arg in cond.items():
            if op in _OPS:
                value = _check_scalar(key, arg)
                clauses.append(f"{field} {_OPS[op]} ?")
                params += [path, _sql_value(value)]
            elif op in ("$in", "$nin"):
                if not isinstance(arg, list) or not arg or len(arg) > MAX_IN_VALUES:
                    raise FilterError(f"{op} for {key!r} needs a list of 1..{MAX_IN_VALUES} values")
                values = [_sql_value(_check_scalar(key, v)) for v in arg]
                marks = ",".join("?" * len(values))
                negate = "NOT " if op == "$nin" else ""
                clauses.append(f"{field} {negate}IN ({marks})")
                params += [path, *values]
            elif op == "$exists":
                if not isinstance(arg, bool):
                    raise FilterError(f"$exists for {key!r} must be true or false")
                clauses.append(f"json_type(metadata, ?) IS {'NOT ' if arg else ''}NULL")
                params.append(path)
            else:
                raise FilterError(f"unknown filter operator {op!r} for {key!r}")
    return " AND ".join(clauses), params


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
