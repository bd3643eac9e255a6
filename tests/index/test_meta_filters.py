"""Filters answered from the indexed item_meta table give exactly the ids of the json_extract
scan (storage format 1's way), on random data across every operator; format 1 is upgraded."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index.store import FORMAT_VERSION, MetadataStore, NewItem

VALUES: list[Any] = [0, 1, 2, 2.0, 2.5, -3, "a", "b", "B", "", "2", True, False, None]


def _random_meta(rng: random.Random) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key in ("album", "year", "tags", "flag", "odd-key_1"):
        roll = rng.random()
        if roll < 0.2:
            continue  # absent
        if roll < 0.3:
            meta[key] = [rng.choice(VALUES[:10]) for _ in range(rng.randint(0, 3))]
        elif roll < 0.35:
            meta[key] = {"nested": rng.choice(VALUES)}
        else:
            meta[key] = rng.choice(VALUES)
    if rng.random() < 0.1:
        meta["url"] = f"https://example.org/{rng.randint(0, 9)}.jpg"
    if rng.random() < 0.2:
        # A top-level key spelled like a nested path, and one with the side table's separator:
        # neither may answer a filter on album.nested.
        meta["album.nested"] = rng.choice(VALUES)
        meta["album\x1fnested"] = rng.choice(VALUES)
    return meta


def _random_filter(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    scalars = [v for v in VALUES if v is not None] + ['["a"]', "[]"]
    keys = ["album", "year", "tags", "flag", "odd-key_1", "missing", "album.nested", "flag.nested"]
    for key in rng.sample(keys, 2):
        op = rng.choice(
            ["eq", "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "range"]
        )
        if op == "eq":
            out[key] = rng.choice(scalars)
        elif op in ("$in", "$nin"):
            out[key] = {op: rng.sample(scalars, rng.randint(1, 4))}
        elif op == "$exists":
            out[key] = {op: rng.random() < 0.5}
        elif op == "range":
            out[key] = {"$gte": rng.choice(scalars), "$lt": rng.choice(scalars)}
        else:
            out[key] = {op: rng.choice(scalars)}
        if rng.random() < 0.1:
            out[key] = {"$exists": rng.random() < 0.5, "$ne": rng.choice(scalars)}
    return dict(list(out.items())[: rng.randint(1, 2)])


def _fill(store: MetadataStore, rng: random.Random, n: int, kind: str = "image") -> None:
    items = [
        NewItem(
            kind=kind,  # type: ignore[arg-type]
            sha256=f"{kind}{i}",
            embedding=np.ones(4, np.float32),
            metadata=_random_meta(rng),
        )
        for i in range(n)
    ]
    store.add_items(items)


def test_indexed_filters_equal_the_json_scan(tmp_path: Path) -> None:
    rng = random.Random(7)
    store = MetadataStore(tmp_path / "db.sqlite3")
    _fill(store, rng, 400)
    _fill(store, rng, 50, kind="text")
    for i in range(1, 60, 3):
        store.delete("image", i)
    nonempty = 0
    for _ in range(400):
        filter_ = _random_filter(rng)
        for kind in ("image", "text"):
            new = np.sort(store.filter_ids(kind, filter_))  # type: ignore[arg-type]
            old = store.filter_ids_by_scan(kind, filter_)  # type: ignore[arg-type]
            assert new.tolist() == old.tolist(), filter_
            nonempty += bool(len(old))
    assert nonempty > 200  # the random filters do match things


def test_list_values_compare_as_their_json_text(tmp_path: Path) -> None:
    """As with json_extract: a list is one value (its JSON text), not a set of members."""
    store = MetadataStore(tmp_path / "db.sqlite3")
    store.add_items(
        [NewItem("image", "x", np.ones(4, np.float32), metadata={"tags": ["cat", "dog"]})]
    )
    assert store.filter_ids("image", {"tags": "cat"}).tolist() == []
    assert store.filter_ids("image", {"tags": '["cat","dog"]'}).tolist() == [1]
    assert store.filter_ids("image", {"tags": {"$exists": True}}).tolist() == [1]


def test_format_1_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    rng = random.Random(3)
    store = MetadataStore(path)
    _fill(store, rng, 100)
    store.close()
    # Make it what format 1 wrote: no item_meta, version 1.
    db = sqlite3.connect(path)
    db.execute("DROP TABLE item_meta")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
    db.commit()
    db.close()
    upgraded = MetadataStore(path)
    assert upgraded.get_meta("format_version") == str(FORMAT_VERSION)
    for filter_ in ({"album": "a"}, {"year": {"$gte": 1}}, {"tags": {"$exists": False}}):
        new = np.sort(upgraded.filter_ids("image", filter_))
        assert new.tolist() == upgraded.filter_ids_by_scan("image", filter_).tolist()
    assert len(upgraded.filter_ids("image", {"album": {"$exists": True}})) > 50
    upgraded.close()
    assert MetadataStore(path).get_meta("format_version") == str(FORMAT_VERSION)


def test_deleted_items_leave_the_side_table(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "db.sqlite3")
    stored = store.add_items(
        [NewItem("image", f"s{i}", np.ones(4, np.float32), {"a": i % 2}) for i in range(6)]
    )
    store.delete("image", stored[0][0].id)
    assert sorted(store.filter_ids("image", {"a": 0}).tolist()) == [3, 5]
    db = sqlite3.connect(tmp_path / "db.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM item_meta WHERE item_id = 1").fetchone()[0] == 0


def test_duplicates_in_one_batch_are_stored_once(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "db.sqlite3")
    results = store.add_items(
        [NewItem("image", "same", np.ones(4, np.float32), {"k": "v"}) for _ in range(3)]
    )
    assert [created for _, created in results] == [True, False, False]
    assert {item.id for item, _ in results} == {1}
    assert store.filter_ids("image", {"k": "v"}).tolist() == [1]
    more = store.add_items([NewItem("image", "other", np.ones(4, np.float32), {"k": "v"})])
    assert more[0][0].id == 2  # ids keep increasing after explicit ids


@pytest.mark.parametrize("bad", [{"a": None}, {"a": {"$in": []}}, {"a b": 1}])
def test_bad_filters_are_refused_by_both_paths(tmp_path: Path, bad: dict[str, Any]) -> None:
    from index.filters import FilterError

    store = MetadataStore(tmp_path / "db.sqlite3")
    with pytest.raises(FilterError):
        store.filter_ids("image", bad)
    with pytest.raises(FilterError):
        store.filter_ids_by_scan("image", bad)
    assert json.dumps(bad)


def test_lookups_by_id_use_the_primary_key(tmp_path: Path) -> None:
    """get_many and embeddings_for must not walk the (kind, sha256) index: at 1M items that
    made every search read the whole index (180 ms)."""
    store = MetadataStore(tmp_path / "db.sqlite3")
    _fill(store, random.Random(1), 20)
    db = store._reader()
    for sql in (
        "SELECT id FROM items WHERE +kind = ? AND id IN (?, ?)",
        "SELECT id, embedding FROM items WHERE +kind = ? AND id IN (?, ?)",
    ):
        plan = " ".join(str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + sql, ["image", 1, 2]))
        assert "PRIMARY KEY" in plan, plan
    import inspect

    source = inspect.getsource(MetadataStore._read_many) + inspect.getsource(
        MetadataStore.embeddings_for
    )
    assert source.count("+kind = ? AND id IN") == 2
