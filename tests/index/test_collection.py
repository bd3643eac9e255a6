"""The FAISS cache converges to SQLite: replay after a stale save, rebuilds, type switches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import index.collection as collection_module
from index.collection import CollectionPolicy, IndexedCollection
from index.filters import FilterError, compile_filter
from index.store import MetadataStore, NewItem, StoreVersionError
from tests.index.test_vectors import DIM, clustered


def _add(store: MetadataStore, vectors: np.ndarray, start: int = 0) -> list[int]:
    items = [
        NewItem(kind="image", sha256=f"sha{start + i}", embedding=v, metadata={"n": start + i})
        for i, v in enumerate(vectors)
    ]
    return [item.id for item, _ in store.add_items(items)]


def _collection(store: MetadataStore, path: Path, **policy: object) -> IndexedCollection:
    return IndexedCollection(
        store,
        "image",
        path,
        dim=DIM,
        fingerprint="fp",
        policy=CollectionPolicy(**policy),  # type: ignore[arg-type]
    )


def _saved_then_more(
    tmp_path: Path, x: np.ndarray, saved: int
) -> tuple[MetadataStore, list[int], list[int]]:
    """A store whose first `saved` rows of x are in a saved index file and whose other rows were
    acknowledged after the save (in SQLite only). Returns (store, saved ids, later ids)."""
    store = MetadataStore(tmp_path / "db.sqlite3")
    ids = _add(store, x[:saved])
    coll = _collection(store, tmp_path / "i.faiss")
    coll.open()
    coll.save()
    return store, ids, _add(store, x[saved:], start=saved)


def test_replay_after_stale_save(tmp_path: Path) -> None:
    x = clustered(60)
    store, ids, more = _saved_then_more(tmp_path, x, 30)
    store.delete("image", ids[0])
    reopened = _collection(store, tmp_path / "i.faiss")
    reopened.open()
    assert reopened.loaded_from == "file" and len(reopened) == 59
    hits = reopened.search(x[45:46], 1)[0]
    assert hits[0].id == more[15]
    assert all(h.id != ids[0] for h in reopened.search(x[:1], 59)[0])


def test_replay_goes_in_bounded_steps_with_deletes_across_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog is replayed a few changes at a time (a 10M backlog read at once took 20+ GB);
    an id added in one step and deleted in a later one, or within one, ends up absent."""
    monkeypatch.setattr(collection_module, "CATCH_UP_CHUNK", 7)
    x = clustered(60)
    store, ids, more = _saved_then_more(tmp_path, x, 20)
    gone = [ids[3], more[0], more[1], more[30], more[39]]  # old, new in an early step, the last
    for item_id in gone:
        store.delete("image", item_id)
    reopened = _collection(store, tmp_path / "i.faiss")
    reopened.open()
    assert reopened.loaded_from == "file" and len(reopened) == 55
    assert reopened._index.applied_seq == store.last_seq()
    found = {h.id for h in reopened.search(x[:1], 60)[0]}
    assert found == set(ids + more) - set(gone)


def test_an_index_far_behind_the_store_is_rebuilt_not_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty index saved before a bulk import: rebuilt from the store at the size's kind
    (replaying it would have held every vector of a 10M import in an exact index)."""
    monkeypatch.setattr(collection_module, "REPLAY_MAX", 50)
    store = MetadataStore(tmp_path / "db.sqlite3")
    path = tmp_path / "i.faiss"
    coll = _collection(store, path, exact_max=100)
    coll.open()
    coll.save()  # exact, 0 vectors
    x = clustered(300)
    ids = _add(store, x)
    again = _collection(store, path, exact_max=100)
    again.open()
    assert again.loaded_from == "rebuilt" and again.index_kind == "hnsw" and len(again) == 300
    assert again.search(x[7:8], 1)[0][0].id == ids[7]

    again.save()
    _add(store, clustered(40, seed=5), start=300)  # 40 behind a file of 300: replayed
    caught = _collection(store, path, exact_max=100)
    caught.open()
    assert caught.loaded_from == "file" and len(caught) == 340


def test_corrupt_index_file_is_rebuilt(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "db.sqlite3")
    _add(store, clustered(20))
    path = tmp_path / "i.faiss"
    coll = _collection(store, path)
    coll.open()
    coll.save()
    path.write_bytes(path.read_bytes()[:100])
    again = _collection(store, path)
    again.open()
    assert again.loaded_from == "rebuilt" and len(again) == 20


def test_growth_switches_to_hnsw_in_background(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "db.sqlite3")
    coll = _collection(store, tmp_path / "i.faiss", exact_max=100)
    coll.open()
    x = clustered(300)
    _add(store, x[:90])
    coll.catch_up()
    assert coll.index_kind == "exact"
    _add(store, x[90:200], start=90)
    coll.catch_up()  # crosses the threshold: a rebuild starts in the background
    _add(store, x[200:], start=200)  # writes continue meanwhile
    coll.catch_up()
    coll.wait_for_rebuild(60)
    coll.catch_up()
    assert coll.index_kind == "hnsw" and len(coll) == 300
    assert coll.search(x[250:251], 1)[0][0].id == 251


def test_hnsw_tombstones_trigger_rebuild(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "db.sqlite3")
    coll = _collection(store, tmp_path / "i.faiss", kind="hnsw")
    ids = _add(store, clustered(100))
    coll.open()
    for item_id in ids[:30]:
        store.delete("image", item_id)
    coll.catch_up()
    coll.wait_for_rebuild(60)
    assert coll.info()["tombstones"] == 0 and len(coll) == 70


def test_filters_small_and_large(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "db.sqlite3")
    coll = _collection(store, tmp_path / "i.faiss", kind="hnsw")
    x = clustered(200)
    ids = _add(store, x)
    coll.open()
    hits = coll.search(x[10:11], 5, filter_={"n": {"$lt": 20}})[0]
    assert hits[0].id == ids[10] and all(h.id <= ids[19] for h in hits)
    assert coll.search(x[:1], 5, filter_={"n": -1})[0] == []


def test_filter_language() -> None:
    assert compile_filter(None) == ("1", [])
    sql, params = compile_filter({"a": 1, "b": {"$in": ["x", "y"]}, "c": {"$exists": True}})
    assert sql.count("?") == len(params)
    for bad in ({"a": None}, {"a": [1]}, {"a": {"$regex": "x"}}, {"a b": 1}, {"a": {"$in": []}}):
        with pytest.raises(FilterError):
            compile_filter(bad)


def test_store_refuses_other_format(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "db.sqlite3")
    store.set_meta("format_version", "999")
    store.close()
    with pytest.raises(StoreVersionError, match="format 999"):
        MetadataStore(tmp_path / "db.sqlite3")


def test_ivfpq_built_from_a_streamed_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IVF-PQ trains on an even sample and adds chunk by chunk (no full copy in memory)."""
    import index.collection as collection_module
    from index.vectors import IndexParams

    monkeypatch.setattr(collection_module, "TRAIN_SAMPLE", 1000)
    store = MetadataStore(tmp_path / "db.sqlite3")
    x = clustered(3000)
    ids = _add(store, x)
    coll = _collection(
        store, tmp_path / "i.faiss", kind="ivfpq", params=IndexParams(ivf_nlist=16, pq_m=8)
    )
    coll.open()
    assert coll.index_kind == "ivfpq" and len(coll) == 3000
    hits = coll.search(x[:20], 1)
    assert sum(h[0].id == ids[i] for i, h in enumerate(hits)) >= 19
    seq, all_ids, vectors = store.snapshot("image")
    assert seq == 3000 and all_ids.tolist() == ids and np.allclose(vectors, x)


def test_save_policy_scales_with_the_index_and_is_paced_by_the_last_save() -> None:
    from index.collection import save_due

    policy = CollectionPolicy(save_every_changes=1000, save_share=0.01, save_pace=10)

    def due(size: int, changes: int, since: float, took: float = 0.0) -> bool:
        return save_due(
            policy, size=size, changes=changes, since_save_s=since, last_save_s=took, max_age_s=60
        )

    # small: 1,000 changes are enough; large: 1% of the index
    assert due(10_000, 1000, since=1) and not due(10_000, 999, since=1)
    assert not due(1_000_000, 9_999, since=1) and due(1_000_000, 10_000, since=1)
    # a few changes wait for the age limit, none never save
    assert not due(1_000, 5, since=59) and due(1_000, 5, since=60)
    assert not due(1_000_000, 0, since=10**6)
    # at the age limit a large index saves only for a tenth of its share (replaying fewer
    # costs less than a second; writing the whole index, half a minute at 1M)
    assert not due(1_000_000, 999, since=10**6) and due(1_000_000, 1000, since=60)
    # a save that took 20 s: nothing saves again within 200 s of it, however due
    assert not due(1_000_000, 50_000, since=199, took=20)
    assert due(1_000_000, 1000, since=200, took=20)


def test_a_collection_saves_by_the_policy(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "db.sqlite3")
    x = clustered(300)
    _add(store, x[:100])
    path = tmp_path / "i.faiss"
    coll = _collection(store, path, save_every_changes=10, save_share=0.5, save_pace=0.0)
    coll.open()
    assert coll.save_if_due(3600)  # built from the store: worth a file
    saved = path.stat().st_mtime_ns
    _add(store, x[100:140], start=100)
    coll.catch_up()
    assert not coll.save_if_due(3600)  # 40 changes: under half of 140 vectors
    _add(store, x[140:200], start=140)
    coll.catch_up()
    assert coll.save_if_due(3600) and path.stat().st_mtime_ns != saved
    coll.policy.save_pace = 1e9  # a save just ended: the next one waits for its pace
    _add(store, x[200:300], start=200)
    coll.catch_up()
    assert not coll.save_if_due(0) and coll.needs_save
    coll.policy.save_pace = 0.0
    assert coll.save_if_due(0) and not coll.needs_save
