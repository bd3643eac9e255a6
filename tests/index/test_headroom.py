"""Adds to a searched index: room made beside the live arrays, searches let through meanwhile."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from index import vectors as vectors_module
from index.headroom import MIN_ROOM
from index.vectors import IndexParams, VectorIndex
from tests.index.test_vectors import DIM, clustered


def _loaded(tmp_path: Path, kind: str, n: int = 300) -> tuple[VectorIndex, np.ndarray]:
    """An index as the server has it after a start: loaded from its file, arrays full."""
    x = clustered(n)
    built = VectorIndex(DIM, IndexParams(kind=kind))  # type: ignore[arg-type]
    built.add(np.arange(1, n + 1, dtype=np.int64), x, searched=False)
    built.save(tmp_path / "v.faiss", fingerprint="f")
    return VectorIndex.load(tmp_path / "v.faiss", fingerprint="f", dim=DIM), x


def _vectors_address(index: VectorIndex) -> int:
    inner: Any = faiss.downcast_index(index._index.index)
    flat = faiss.downcast_index(inner.storage) if hasattr(inner, "storage") else inner
    return int(flat.get_xb())


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_room_is_made_once_then_adds_leave_the_vectors_where_they_are(
    tmp_path: Path, kind: str
) -> None:
    index, x = _loaded(tmp_path, kind)
    before = _vectors_address(index)
    fresh = clustered(40, seed=7)
    index.add(np.array([1001], dtype=np.int64), fresh[:1])
    moved_once = _vectors_address(index)
    assert moved_once != before  # the first add needed room: a new array was swapped in
    for i in range(1, 40):
        index.add(np.array([1001 + i], dtype=np.int64), fresh[i : i + 1])
    assert _vectors_address(index) == moved_once  # the room made covered the 39 that followed
    assert index._headroom.prepare(index._index, 1) is None
    scores, ids = index.search(fresh, 1)
    assert ids[:, 0].tolist() == list(range(1001, 1041))
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    _, old = index.search(x[:20], 1)
    assert old[:, 0].tolist() == list(range(1, 21))


def test_an_add_larger_than_the_room_grows_to_fit_it(tmp_path: Path) -> None:
    index, _ = _loaded(tmp_path, "hnsw")
    many = clustered(MIN_ROOM + 50, seed=3)
    ids = np.arange(5000, 5000 + len(many), dtype=np.int64)
    index.add(ids, many)
    assert len(index) == 300 + len(many)
    _, got = index.search(many[::97], 1)
    assert got[:, 0].tolist() == ids[::97].tolist()


def test_searches_run_while_an_add_makes_room(tmp_path: Path) -> None:
    index, x = _loaded(tmp_path, "hnsw")
    answered: list[np.ndarray] = []
    prepare = index._headroom.prepare

    def prepare_with_a_search(faiss_index: Any, adding: int) -> Any:
        searcher = threading.Thread(target=lambda: answered.append(index.search(x[:3], 2)[1]))
        searcher.start()
        searcher.join(10)  # a search that waited for this add would never finish in here
        return prepare(faiss_index, adding)

    index._headroom.prepare = prepare_with_a_search  # type: ignore[method-assign]
    index.add(np.array([900], dtype=np.int64), clustered(1, seed=9))
    assert len(answered) == 1 and answered[0][:, 0].tolist() == [1, 2, 3]
    assert len(index) == 301


def test_a_large_add_lets_searches_through_between_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vectors_module, "ADD_SLICE", 16)
    index, _ = _loaded(tmp_path, "hnsw")
    seen: list[int] = []
    lookup_with = index._lookup_with

    def count_between_slices(added: np.ndarray) -> Any:
        seen.append(len(index))  # runs before each slice
        return lookup_with(added)

    index._lookup_with = count_between_slices  # type: ignore[method-assign]
    index.add(np.arange(2000, 2050, dtype=np.int64), clustered(50, seed=4))
    assert seen == [300, 316, 332, 348]
    assert len(index) == 350


def test_filtered_search_finds_added_ids_in_and_out_of_order(tmp_path: Path) -> None:
    index, x = _loaded(tmp_path, "hnsw")
    allowed = np.array([5, 400, 7], dtype=np.int64)
    index.search(x[:1], 3, allowed=allowed)  # builds the id lookup
    extra = clustered(2, seed=11)
    index.add(np.array([400], dtype=np.int64), extra[:1])  # after every id: extends the lookup
    assert index._id_lookup is not None
    _, got = index.search(extra[:1], 3, allowed=allowed)
    assert got[0, 0] == 400 and set(got[0].tolist()) == {5, 7, 400}
    index.remove(np.array([7], dtype=np.int64))
    index.add(np.array([350], dtype=np.int64), extra[1:])  # before the last: lookup rebuilt
    _, got = index.search(extra[1:], 3, allowed=np.array([350, 5, 7], dtype=np.int64))
    assert got[0].tolist() == [350, 5, -1]
