"""The filter's JSON Schema (published in the OpenAPI document) accepts exactly what
`compile_filter` accepts, and no value that SQLite cannot bind gets through."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from index.filters import FilterError, compile_filter, filter_json_schema

CASES: list[Any] = [
    {},
    {"album": "paris"},
    {"year": 2020, "ok": True, "score": 0.5},
    {"year": {"$gte": 2019, "$lt": 2024}},
    {"tag": {"$in": ["cat", "dog", 3]}},
    {"tag": {"$nin": [1.5]}, "x": {"$exists": False}},
    {"n": 2**63 - 1},
    {"n": -(2**63)},
    {"n": 2**63},
    {"n": -(2**63) - 1},
    {"n": 10**40},
    {"n": 1e300},
    {"n": {"$gt": 2**64}},
    {"n": {"$in": [1, 2**64]}},
    {"n": None},
    {"n": [1, 2]},
    {"n": {}},
    {"n": {"$regex": "a"}},
    {"n": {"$in": []}},
    {"n": {"$in": list(range(257))}},
    {"n": {"$exists": 1}},
    {"bad key": 1},
    {"a.b": 1},
    {"x" * 65: 1},
    {"abc\n": 1},
    {f"k{i}": i for i in range(33)},
]


@pytest.mark.parametrize("filter_", CASES, ids=[str(i) for i in range(len(CASES))])
def test_schema_and_compiler_agree(filter_: Any) -> None:
    try:
        compile_filter(filter_)
        accepted = True
    except FilterError:
        accepted = False
    valid = jsonschema.Draft202012Validator(filter_json_schema()).is_valid(filter_)
    assert accepted == valid, (filter_, accepted, valid)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "\ud800"])
def test_values_json_cannot_carry_are_refused_by_name(value: Any) -> None:
    with pytest.raises(FilterError, match="'year'"):
        compile_filter({"year": {"$lt": value}})
