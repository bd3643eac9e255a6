"""The store's reads of one kind in id order are index ranges, never a sort of the whole kind.

A page of the photo listing and the stream an index build reads were sorted in full by SQLite
(6.4 s for the first page at 1M items; 20 GB of temporary sort at 10M, which filled the disk).
Checked on the statements the store really runs, caught with SQLite's trace callback.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from index.store import MetadataStore, NewItem


def _plans(db: sqlite3.Connection, statements: list[str]) -> list[str]:
    """EXPLAIN QUERY PLAN of each traced SELECT on items, one line per plan step."""
    steps = []
    for sql in statements:
        if sql.lstrip().upper().startswith("SELECT") and " items " in f"{sql} ":
            rows = db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
            steps.extend(f"{sql.split(' FROM ')[0][:30]}... -> {row[-1]}" for row in rows)
    return steps


def test_pages_and_index_builds_read_a_kind_in_id_order_without_sorting(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "x.sqlite3")
    rng = np.random.default_rng(0)
    store.add_items(
        [
            NewItem(
                "text" if i % 3 == 0 else "image",
                sha256=f"{i:064x}",
                embedding=rng.standard_normal(8).astype(np.float32),
                metadata={"n": i},
                text=f"t{i}" if i % 3 == 0 else None,
            )
            for i in range(30)
        ]
    )
    traced: list[str] = []
    store._db.set_trace_callback(traced.append)
    newest = store.list_items("image", limit=5, newest_first=True)
    older = store.list_items("image", after_id=newest[-1].id, limit=5, newest_first=True)
    texts = store.list_items("text", after_id=3, limit=4)
    store._db.set_trace_callback(None)
    assert [r.id for r in newest + older] == sorted(
        (i + 1 for i in range(30) if i % 3), reverse=True
    )[:10]
    assert [r.id for r in texts] == [4, 7, 10, 13]

    with store.read_snapshot() as snap:
        snap_db = snap._db
        snap_db.set_trace_callback(traced.append)
        ids = [chunk_ids for chunk_ids, _ in snap.chunks("image", rows=4)]
        sample = [chunk_ids for chunk_ids, _ in snap.chunks("image", every=4)]
        snap_db.set_trace_callback(None)
        steps = _plans(snap_db, traced)
    assert np.concatenate(ids).tolist() == [i + 1 for i in range(30) if i % 3]
    assert np.concatenate(sample).tolist() == [
        i + 1 for i in range(30) if i % 3 and (i + 1) % 4 == 0
    ]

    assert len(steps) >= 5, steps
    assert not [s for s in steps if "TEMP B-TREE" in s], steps
    assert all("items_kind" in s for s in steps), steps
    store.close()
