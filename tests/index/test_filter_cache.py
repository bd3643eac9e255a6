"""Cached filter answers stay exact while items are added and deleted, by this store or by
another connection to the same file; the cache is bounded by the ids it holds."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from index.filter_cache import FilterAnswer, FilterCache
from index.store import MetadataStore, NewItem
from tests.index.test_meta_filters import _random_filter, _random_meta

_made = iter(range(1 << 30))


def _fill(store: MetadataStore, rng: random.Random, n: int, kind: str = "image") -> None:
    """`n` new items (never a duplicate of an earlier one) with random metadata."""
    store.add_items(
        [
            NewItem(kind, f"{kind}{next(_made)}", np.ones(4, np.float32), _random_meta(rng))  # type: ignore[arg-type]
            for _ in range(n)
        ]
    )


def _same(store: MetadataStore, kind: str, filter_: dict[str, object]) -> bool:
    got = np.sort(store.filter_ids(kind, filter_))  # type: ignore[arg-type]
    want = store.filter_ids_by_scan(kind, filter_)  # type: ignore[arg-type]
    return bool(got.tolist() == want.tolist())


def test_cached_answers_follow_adds_and_deletes(tmp_path: Path) -> None:
    rng = random.Random(11)
    store = MetadataStore(tmp_path / "db.sqlite3", filter_cache_ids=1_000_000)
    _fill(store, rng, 300)
    filters = [_random_filter(rng) for _ in range(40)]
    for filter_ in filters:
        assert _same(store, "image", filter_), filter_
    assert len(store.filters) > 0 and store.filters.misses
    # another connection writes too (the cache follows the change log, not this object)
    other = MetadataStore(tmp_path / "db.sqlite3")
    for round_ in range(4):
        _fill(other if round_ % 2 else store, rng, 25, kind="image")
        _fill(store, rng, 5, kind="text")
        live = store.filter_ids_by_scan("image", None).tolist()
        for item_id in rng.sample(live, 15):
            (store if round_ % 2 else other).delete("image", item_id)
        hits = store.filters.hits
        for filter_ in filters:
            assert _same(store, "image", filter_), (round_, filter_)
            assert _same(store, "text", filter_), (round_, filter_)
        assert store.filters.hits > hits  # they were answered from the cache, caught up


def test_equivalent_filters_share_an_answer_and_a_long_gap_recomputes(tmp_path: Path) -> None:
    rng = random.Random(5)
    store = MetadataStore(tmp_path / "db.sqlite3", filter_cache_ids=1_000_000)
    _fill(store, rng, 100)
    first = store.filter_ids("image", {"album": 1, "year": {"$gte": 0}})
    again = store.filter_ids("image", {"year": {"$gte": 0}, "album": 1})
    assert again is first and store.filters.hits == 1
    store._FILTER_CATCH_UP_MAX = 10  # type: ignore[misc]
    _fill(store, rng, 50)  # more changes than that: computed afresh
    assert _same(store, "image", {"album": 1, "year": {"$gte": 0}})


def test_the_cache_is_bounded_by_the_ids_it_holds() -> None:
    cache = FilterCache(max_ids=10)
    cache.put("a", FilterAnswer(np.arange(6), seq=1))
    cache.put("b", FilterAnswer(np.arange(3), seq=1))
    assert cache.get("a") is not None  # now the most recent
    cache.put("c", FilterAnswer(np.arange(4), seq=1))  # 13 ids: "b", the oldest, goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("d", FilterAnswer(np.arange(11), seq=1))  # larger than the budget: not kept
    assert cache.get("d") is None and len(cache) == 2
    cache.put("a", FilterAnswer(np.arange(2), seq=0))  # older than the one held: ignored
    held = cache.get("a")
    assert held is not None and held.seq == 1
