"""FAISS indexes against a NumPy reference; deletes, filters, saves and corrupt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.vectors import IndexFileError, IndexParams, VectorIndex

DIM = 32


def clustered(n: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    """Points around cluster centres on the sphere: what embeddings look like."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def reference(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(q @ x.T), axis=1)[:, :k]]


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want, strict=True)]))


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq"])
def test_search_matches_reference(kind: str) -> None:
    x = clustered(3000)
    ids = np.arange(10, 3010, dtype=np.int64)
    params = IndexParams(kind=kind, ivf_nlist=32, ivf_nprobe=16, pq_m=8)  # type: ignore[arg-type]
    lookup = dict(zip(ids.tolist(), x, strict=True))
    index = VectorIndex(DIM, params, lambda found: np.stack([lookup[int(i)] for i in found]))
    index.train(x)
    index.add(ids, x)
    q = clustered(50, seed=1)
    _, got = index.search(q, 10)
    want = reference(x, ids, q, 10)
    floor = {"exact": 1.0, "hnsw": 0.95, "ivfpq": 0.9}[kind]
    assert recall(got, want) >= floor


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_deletes_and_filters(kind: str) -> None:
    x = clustered(500)
    ids = np.arange(1, 501, dtype=np.int64)
    index = VectorIndex(DIM, IndexParams(kind=kind))  # type: ignore[arg-type]
    index.add(ids, x)
    index.remove(ids[:100])
    assert len(index) == 400
    _, got = index.search(x[:20], 5)
    assert not set(got.ravel()) & set(ids[:100].tolist())
    allowed = ids[::7]
    _, filtered = index.search(x[:5], 10, allowed=allowed)
    live_allowed = set(allowed.tolist()) - set(ids[:100].tolist())
    assert set(filtered.ravel()) - {-1} <= live_allowed
    # the query vector itself (id 301) is allowed and alive: it must come first
    _, own = index.search(x[300:301], 3, allowed=np.array([301, 5, 6], dtype=np.int64))
    assert own[0, 0] == 301


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_tombstones_added_after_a_search_are_excluded_from_the_next(kind: str) -> None:
    """Searches keep the tombstones' selector between them; a delete must still show at once,
    with a filter or without."""
    x = clustered(3000)
    ids = np.arange(1, 3001, dtype=np.int64)
    params = IndexParams(kind=kind, ivf_nlist=32, ivf_nprobe=32, pq_m=8)  # type: ignore[arg-type]
    lookup = dict(zip(ids.tolist(), x, strict=True))
    index = VectorIndex(DIM, params, lambda found: np.stack([lookup[int(i)] for i in found]))
    index.train(x)
    index.add(ids, x)
    index.remove(ids[:10])
    _, first = index.search(x[10:13], 1)
    assert first[:, 0].tolist() == [11, 12, 13]  # each query finds itself
    index.remove(ids[10:13])
    everyone = np.arange(1, 3001, dtype=np.int64)  # a filter too large to score exactly
    for allowed in (None, everyone):
        _, again = index.search(x[10:13], 5, allowed)
        assert not set(again.ravel().tolist()) & set(ids[:13].tolist())


def test_k_beyond_size_pads_with_minus_one() -> None:
    index = VectorIndex(DIM, IndexParams(kind="exact"))
    index.add(np.array([1, 2], dtype=np.int64), clustered(2))
    scores, got = index.search(clustered(1, seed=3), 5)
    assert list(got[0, 2:]) == [-1, -1, -1] and np.isinf(scores[0, 2:]).all()
    assert index.search(clustered(1), 3, allowed=np.array([], dtype=np.int64))[1].tolist() == [
        [-1] * 3
    ]


def test_save_load_and_corruption(tmp_path: Path) -> None:
    x = clustered(200)
    index = VectorIndex(DIM, IndexParams(kind="hnsw"))
    index.add(np.arange(200, dtype=np.int64), x)
    index.remove(np.array([3, 4], dtype=np.int64))
    index.applied_seq = 42
    path = tmp_path / "images.faiss"
    index.save(path, fingerprint="fp")
    loaded = VectorIndex.load(path, fingerprint="fp", dim=DIM)
    assert loaded.applied_seq == 42 and len(loaded) == 198 and loaded.tombstones == 2
    np.testing.assert_array_equal(loaded.search(x[:5], 4)[1], index.search(x[:5], 4)[1])

    with pytest.raises(IndexFileError, match="another model"):
        VectorIndex.load(path, fingerprint="other", dim=DIM)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFileError, match=r"corrupt|truncated"):
        VectorIndex.load(path, fingerprint="fp", dim=DIM)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError):
        VectorIndex.load(path, fingerprint="fp", dim=DIM)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the FAISS payload
    path.write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError):
        VectorIndex.load(path, fingerprint="fp", dim=DIM)
    path.write_bytes(b"garbage")
    with pytest.raises(IndexFileError):
        VectorIndex.load(path, fingerprint="fp", dim=DIM)


def test_files_with_an_exact_length_header_still_load(tmp_path: Path) -> None:
    """Files saved before the header got reserved space: header exactly as long as its JSON,
    the body built in memory."""
    import hashlib
    import json
    import struct

    import faiss

    from index.vectors import _FILE_VERSION, _MAGIC

    x = clustered(50)
    index = VectorIndex(DIM, IndexParams(kind="hnsw"))
    index.add(np.arange(50, dtype=np.int64), x)
    index.remove(np.array([7], dtype=np.int64))
    payload = faiss.serialize_index(index._index).tobytes()
    body = payload + np.array([7], dtype=np.int64).tobytes()
    header = {
        "version": _FILE_VERSION, "seq": 9, "dim": DIM, "kind": "hnsw",
        "params": index.params.__dict__, "fingerprint": "fp", "payload_bytes": len(payload),
        "tombstones": 1, "sha256": hashlib.sha256(body).hexdigest(),
    }  # fmt: skip
    head = json.dumps(header).encode()
    path = tmp_path / "old.faiss"
    path.write_bytes(_MAGIC + struct.pack("<I", len(head)) + head + body)
    loaded = VectorIndex.load(path, fingerprint="fp", dim=DIM)
    assert loaded.applied_seq == 9 and len(loaded) == 49 and loaded.tombstones == 1
    np.testing.assert_array_equal(loaded.search(x[:5], 4)[1], index.search(x[:5], 4)[1])


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
@pytest.mark.parametrize("shuffled", [False, True])
def test_filtered_search_small_exact_and_large_bitmap(kind: str, shuffled: bool) -> None:
    """A small filter is scored exactly from FAISS's own vectors (ids added in any order,
    deleted ids excluded); a large one goes through the bitmap selector. Both only return
    allowed, live ids, and the small one equals NumPy over the allowed set."""
    x = clustered(3000, seed=3)
    ids = np.arange(5, 3005, dtype=np.int64)
    order = np.random.default_rng(1).permutation(3000) if shuffled else np.arange(3000)
    index = VectorIndex(DIM, IndexParams(kind=kind))  # type: ignore[arg-type]
    index.add(ids[order[:2000]], x[order[:2000]])
    index.add(ids[order[2000:]], x[order[2000:]])
    dead = ids[::7]
    index.remove(dead)
    q = clustered(5, seed=9)
    small = ids[1::13][:150]
    live = np.setdiff1d(small, dead)
    _, got = index.search(q, 10, small)
    want = reference(x[live - 5], live, q, 10)
    assert got.tolist() == want.tolist()
    large = ids[ids % 3 == 0]  # 1000 ids: the selector path, once SMALL_FILTER is lowered
    import index.vectors as vectors_module

    old = vectors_module.SMALL_FILTER
    vectors_module.SMALL_FILTER = 10
    try:
        _, got_large = index.search(q, 10, large)
    finally:
        vectors_module.SMALL_FILTER = old
    allowed = set(np.setdiff1d(large, dead).tolist())
    assert all(i in allowed for i in got_large.ravel().tolist() if i >= 0)
    truth = reference(x[np.array(sorted(allowed)) - 5], np.array(sorted(allowed)), q, 10)
    assert recall(got_large, truth) >= 0.9


def test_a_small_filter_scores_an_item_as_the_unfiltered_hnsw_search_does() -> None:
    """Scored in place by FAISS's own inner-product code: an item's score is the same whether a
    filter is given or not, and so is the order. Bit for bit where FAISS picks the same SIMD
    kernel for both (AVX-512 builds); on AVX2 they differ by a few units in the last place (2 measured)."""
    x = clustered(2000, seed=5)
    ids = np.arange(1, 2001, dtype=np.int64)
    index = VectorIndex(DIM, IndexParams(kind="hnsw"))
    index.add(ids, x)
    for query in clustered(20, seed=6):
        scores, got = index.search(query[None], 10)  # one query a search, as the service does
        filtered_scores, filtered = index.search(query[None], 10, np.sort(got[0]))
        assert filtered.tolist() == got.tolist()
        np.testing.assert_array_max_ulp(filtered_scores, scores, maxulp=4)


def test_ivfpq_deletes_are_tombstones_saved_and_excluded(tmp_path: Path) -> None:
    x = clustered(3000)
    ids = np.arange(1, 3001, dtype=np.int64)
    lookup = dict(zip(ids.tolist(), x, strict=True))
    params = IndexParams(kind="ivfpq", ivf_nlist=32, ivf_nprobe=16, pq_m=8)
    index = VectorIndex(DIM, params, lambda found: np.stack([lookup[int(i)] for i in found]))
    index.train(x)
    index.add(ids, x)
    index.remove(np.concatenate([ids[:100], [99_999]]))  # an unknown id is ignored
    assert len(index) == 2900 and index.tombstones == 100
    _, got = index.search(x[:50], 10)
    assert not set(got.ravel().tolist()) & set(ids[:100].tolist())
    index.save(tmp_path / "i.faiss", fingerprint="f")
    loaded = VectorIndex.load(tmp_path / "i.faiss", fingerprint="f", dim=DIM)
    assert loaded.tombstones == 100 and len(loaded) == 2900


def test_a_save_does_not_hold_the_search_lock_but_changes_wait_for_it(tmp_path: Path) -> None:
    """At 1M vectors a save streams 2.2 GB: searches (which take only the search lock) must
    go on meanwhile, and changes to the index must not interleave with it."""
    import threading

    index = VectorIndex(DIM, IndexParams(kind="hnsw"))
    index.add(np.arange(100, dtype=np.int64), clustered(100))
    saved = threading.Event()
    with index._lock.shared():  # a search in progress, as seen by the saver
        saver = threading.Thread(
            target=lambda: (index.save(tmp_path / "i.faiss", fingerprint="fp"), saved.set())
        )
        saver.start()
        assert saved.wait(30), "the save waited for the search lock"
    saver.join()
    with index._writes:  # a save in progress, as seen by a writer
        added = threading.Event()
        writer = threading.Thread(
            target=lambda: (index.add(np.array([500]), clustered(1, seed=9)), added.set())
        )
        writer.start()
        assert not added.wait(0.5), "a change went ahead during a save"
    writer.join(30)
    assert added.is_set() and len(index) == 101


def test_a_loaded_index_searches_with_the_current_search_settings(tmp_path: Path) -> None:
    index = VectorIndex(DIM, IndexParams(kind="hnsw", hnsw_ef_search=64, ivf_nprobe=4))
    index.add(np.arange(50, dtype=np.int64), clustered(50))
    index.save(tmp_path / "i.faiss", fingerprint="fp")
    loaded = VectorIndex.load(tmp_path / "i.faiss", fingerprint="fp", dim=DIM)
    assert loaded.params.hnsw_ef_search == 64  # as saved
    now = IndexParams(kind="exact", hnsw_m=8, hnsw_ef_search=300, ivf_nprobe=40, refine_factor=2)
    mixed = loaded.params.searching_like(now)
    assert (mixed.kind, mixed.hnsw_m) == ("hnsw", 32)  # build parameters stay the file's
    assert (mixed.hnsw_ef_search, mixed.ivf_nprobe, mixed.refine_factor) == (300, 40, 2)


@pytest.mark.parametrize(
    "change",
    [
        {"payload_bytes": -5},
        {"payload_bytes": "many"},
        {"seq": "ten"},
        {"params": {"kind": "hnsw", "no_such_field": 1}},
        {"params": {"kind": "lsh"}},
        {"params": None},
    ],
)
def test_a_damaged_header_is_refused_not_raised_through(
    tmp_path: Path, change: dict[str, object]
) -> None:
    """The checksum covers the body only: a header field of the wrong type, sign or name must
    make the file untrusted (the collection then rebuilds from SQLite), not crash the load."""
    import json
    import struct

    from index.vectors import _MAGIC

    index = VectorIndex(DIM, IndexParams(kind="hnsw"))
    index.add(np.arange(20, dtype=np.int64), clustered(20))
    path = tmp_path / "i.faiss"
    index.save(path, fingerprint="fp")
    data = bytearray(path.read_bytes())
    start = len(_MAGIC) + 4
    (space,) = struct.unpack_from("<I", data, len(_MAGIC))
    header = json.loads(data[start : start + space])
    header.update(change)
    head = json.dumps(header).encode()
    data[start : start + space] = head + b" " * (space - len(head))
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="unreadable header"):
        VectorIndex.load(path, fingerprint="fp", dim=DIM)
