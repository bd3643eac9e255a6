"""The store's row cache answers as SQLite does: the same rows, never a deleted one (not even
when the delete lands between a reader's SQLite read and its fill), never the other kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index.store import MetadataStore, NewItem


def _store(path: Path, rows: int = 100) -> tuple[MetadataStore, list[int]]:
    store = MetadataStore(path / "db.sqlite3", row_cache_items=rows)
    rng = np.random.default_rng(0)
    items = [
        NewItem(
            kind="image" if i % 3 else "text",
            sha256=f"sha{i}",
            embedding=rng.standard_normal(8).astype(np.float32),
            metadata={"n": i, "tags": ["a", str(i)]},
            text=None if i % 3 else f"text {i}",
            filename=f"f{i}.png",
        )
        for i in range(30)
    ]
    return store, [item.id for item, _ in store.add_items(items)]


def test_cached_rows_equal_sqlite_rows(tmp_path: Path) -> None:
    store, ids = _store(tmp_path)
    plain = MetadataStore(tmp_path / "db.sqlite3")
    images = [i for i in ids if i % 3 != 1]  # ids start at 1: i % 3 == 1 are texts
    first = store.get_many("image", images)
    again = store.get_many("image", images)
    assert store.rows.hits == len(first) and len(store.rows) == len(first)
    assert again == first == plain.get_many("image", images)
    # an id of the other kind is not an image, cached or not
    texts = [i for i in ids if i % 3 == 1]
    assert store.get_many("image", texts) == {}
    assert store.get_many("text", images) == {}
    assert store.get_many("text", texts) == plain.get_many("text", texts)


def test_a_delete_drops_the_cached_row_before_it_returns(tmp_path: Path) -> None:
    store, ids = _store(tmp_path)
    images = [i for i in ids if i % 3 != 1]
    assert set(store.get_many("image", images)) == set(images)
    assert store.delete("image", images[0]) is not None
    assert images[0] not in store.get_many("image", images)
    assert images[0] not in store.rows.lookup([images[0]])[0]


def test_a_fill_read_before_a_delete_is_dropped(tmp_path: Path) -> None:
    """A search read the row from SQLite, then the delete committed, then the search fills the
    cache: the fill must not bring the deleted row back."""
    store, ids = _store(tmp_path)
    victim = next(i for i in ids if i % 3 != 1)
    _, missing, generation = store.rows.lookup([victim])
    read = store._read_many("image", missing)  # the reader's SQLite read, before the delete
    assert victim in read
    store.delete("image", victim)
    store.rows.fill(read, generation)
    assert store.get_many("image", [victim]) == {}


def test_the_cache_is_bounded_and_zero_disables_it(tmp_path: Path) -> None:
    store, ids = _store(tmp_path, rows=4)
    images = [i for i in ids if i % 3 != 1]
    store.get_many("image", images)
    assert len(store.rows) == 4
    # the most recently read stay
    assert set(store.rows.lookup(images[-4:])[0]) == set(images[-4:])
    off = MetadataStore(tmp_path / "db.sqlite3")
    assert set(off.get_many("image", images)) == set(images) and len(off.rows) == 0
