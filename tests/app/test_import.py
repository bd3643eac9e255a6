"""`xmodal import`: Parquet files and folders, clip-retrieval's layout, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from app.cli import main
from index.store import MetadataStore
from tests.conftest import AppFactory, image_bytes

TINY = ["--model", "xmodal-tiny", "--pretrained", "none", "--device", "cpu", "--quiet"]
DIM = 128  # xmodal-tiny


def _vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _write(path: Path, columns: dict[str, Any]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _import(data: Path, *paths: Path) -> int:
    return main(["import", *map(str, paths), "--data-dir", str(data), *TINY])


def _count(data: Path, kind: str = "image") -> int:
    store = MetadataStore(data / "xmodal.sqlite3")
    try:
        return store.count(kind)  # type: ignore[arg-type]
    finally:
        store.close()


def test_parquet_all_columns_then_search_and_404s(
    tmp_path: Path, make_client: AppFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    x = _vectors(6)
    photo = tmp_path / "p.png"
    photo.write_bytes(image_bytes(1))
    table = {
        "embedding": [list(map(float, v)) for v in x],
        "key": ["a", "b", "c", "d", "e", "f"],
        "metadata": [json.dumps({"url": f"https://x/{i}.jpg", "n": i}) for i in range(5)] + [None],
        "image_path": [str(photo), None, "/nonexistent/file.jpg", None, None, None],
        "text": [None, None, None, None, "a caption", None],
    }
    data = tmp_path / "data"
    assert _import(data, _write(tmp_path / "rows.parquet", table)) == 0
    out = capsys.readouterr().out
    assert "5 images and 1 texts added" in out
    assert _count(data) == 5 and _count(data, "text") == 1
    # a rerun skips every row: keys, content and text already stored
    assert _import(data, tmp_path / "rows.parquet") == 0
    assert "0 images and 0 texts added, 6 already stored" in capsys.readouterr().out

    client: TestClient = make_client(data)
    q = x[3] / np.linalg.norm(x[3])
    hits = client.post("/v1/search/vector", json={"vector": q.tolist(), "k": 1}).json()["results"]
    assert hits[0]["metadata"] == {"url": "https://x/3.jpg", "n": 3}
    assert abs(hits[0]["score"] - 1.0) < 1e-5
    missing = client.get(hits[0]["url"])
    assert missing.status_code == 404 and "without its image file" in missing.text
    assert client.get(hits[0]["thumbnail_url"]).status_code == 404
    with_file = client.post(
        "/v1/search/vector", json={"vector": x[0].tolist(), "k": 1, "filter": {"n": 0}}
    ).json()["results"][0]
    content = client.get(with_file["url"])
    assert content.status_code == 200 and content.content == photo.read_bytes()
    assert client.get(with_file["thumbnail_url"]).status_code == 200
    # filters see imported metadata
    found = client.post(
        "/v1/search/vector", json={"vector": q.tolist(), "k": 10, "filter": {"n": {"$gte": 2}}}
    ).json()["results"]
    assert sorted(h["metadata"]["n"] for h in found) == [2, 3]


def test_folder_of_parquet_struct_metadata_fixed_size_lists(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    for part in range(3):
        x = _vectors(4, seed=part)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)
        meta = pa.array([{"album": f"a{part}", "year": 2000 + i} for i in range(4)])
        _write(folder / f"part-{part}.parquet", {"embedding": vectors, "metadata": meta})
    data = tmp_path / "data"
    assert _import(data, folder) == 0
    assert _count(data) == 12
    store = MetadataStore(data / "xmodal.sqlite3")
    assert len(store.filter_ids("image", {"album": "a1", "year": {"$gte": 2002}})) == 2


def test_clip_retrieval_layout(tmp_path: Path) -> None:
    out = tmp_path / "embeddings"
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    for part in range(2):
        x = _vectors(5, seed=10 + part).astype(np.float16)  # clip-retrieval writes float16
        np.save(out / "img_emb" / f"img_emb_{part}.npy", x)
        _write(
            out / "metadata" / f"metadata_{part}.parquet",
            {
                "image_path": [f"/elsewhere/{part}_{i}.jpg" for i in range(5)],
                "caption": [f"caption {part} {i}" for i in range(5)],
                "url": [f"https://example.org/{part}/{i}.jpg" for i in range(5)],
            },
        )
    data = tmp_path / "data"
    assert _import(data, out) == 0
    assert _count(data) == 10
    assert _import(data, out) == 0  # resumed: keyed by image_path
    assert _count(data) == 10
    store = MetadataStore(data / "xmodal.sqlite3")
    item = store.list_items("image", limit=1)[0]
    assert item.metadata == {"caption": "caption 0 0", "url": "https://example.org/0/0.jpg"}
    assert item.media_path is None


def _bad(tmp_path: Path, capsys: pytest.CaptureFixture[str], *paths: Path) -> str:
    data = tmp_path / "data"
    assert _import(data, *paths) == 2
    assert _count(data) == 0  # nothing half-imported
    return capsys.readouterr().err


def test_bad_input_is_refused_before_anything_is_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write(
        tmp_path / "good.parquet", {"embedding": [list(map(float, v)) for v in _vectors(3)]}
    )

    wrong_dim = _write(tmp_path / "dim.parquet", {"embedding": _vectors(2, dim=64).tolist()})
    assert "64 dimensions; the model's is 128" in _bad(tmp_path, capsys, good, wrong_dim)

    x = _vectors(3)
    x[1, 5] = np.nan
    nan = _write(tmp_path / "nan.parquet", {"embedding": x.tolist()})
    assert "row 1: embedding has NaN" in _bad(tmp_path, capsys, good, nan)

    ragged = _write(tmp_path / "ragged.parquet", {"embedding": [[0.1] * DIM, [0.1] * 3]})
    assert "row 1 has an embedding of 3 values" in _bad(tmp_path, capsys, good, ragged)

    no_column = _write(tmp_path / "nocol.parquet", {"vector": x.tolist()})
    assert "no column 'embedding'" in _bad(tmp_path, capsys, good, no_column)

    bad_json = _write(
        tmp_path / "json.parquet",
        {"embedding": _vectors(2).tolist(), "metadata": ['{"a": 1}', "{not json"]},
    )
    assert "row 1: metadata is not valid JSON" in _bad(tmp_path, capsys, good, bad_json)

    not_object = _write(
        tmp_path / "obj.parquet", {"embedding": _vectors(1).tolist(), "metadata": ["[1, 2]"]}
    )
    assert "must be a JSON object" in _bad(tmp_path, capsys, good, not_object)

    big = _write(tmp_path / "big.parquet", {"embedding": _vectors(3000).tolist()})
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    assert "not a readable Parquet file" in _bad(tmp_path, capsys, good, truncated)

    assert "does not exist" in _bad(tmp_path, capsys, good, tmp_path / "nope.parquet")

    misaligned = tmp_path / "clip"
    (misaligned / "img_emb").mkdir(parents=True)
    (misaligned / "metadata").mkdir()
    np.save(misaligned / "img_emb" / "img_emb_0.npy", _vectors(4))
    _write(misaligned / "metadata" / "metadata_0.parquet", {"image_path": ["a", "b", "c"]})
    assert "not aligned" in _bad(tmp_path, capsys, good, misaligned)


def test_metadata_is_stored_compact_whatever_its_spacing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The commit pass stores compact text unparsed and encodes the rest again: both must give
    # the same stored form, and a NaN literal (which Python's json accepts) is refused.
    raw = ['{"a":1,"b":"é"}', '{ "a" : 2, "b": "\\u00e9" }', None]
    path = _write(tmp_path / "m.parquet", {"embedding": _vectors(3).tolist(), "metadata": raw})
    data = tmp_path / "data"
    assert _import(data, path) == 0
    store = MetadataStore(data / "xmodal.sqlite3")
    try:
        stored = [r[0] for r in store._db.execute("SELECT metadata FROM items ORDER BY id")]
        assert stored == ['{"a":1,"b":"é"}', '{"a":2,"b":"é"}', "{}"]
        assert len(store.filter_ids("image", {"b": "é"})) == 2
    finally:
        store.close()
    nan = _write(
        tmp_path / "nan.parquet", {"embedding": _vectors(1).tolist(), "metadata": ['{"x": NaN}']}
    )
    assert "row 0: metadata cannot be stored" in _bad(tmp_path / "other", capsys, nan)


def _meta_indexes(store: MetadataStore) -> set[str]:
    rows = store._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    return {str(r[0]) for r in rows if str(r[0]).startswith("item_meta")}


def test_a_large_import_rebuilds_the_metadata_indexes_and_a_crash_leaves_them_whole(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first = _write(
        tmp_path / "a.parquet",
        {
            "embedding": _vectors(30).tolist(),
            "metadata": [json.dumps({"n": i % 3}) for i in range(30)],
        },
    )
    assert _import(data, first) == 0  # 30 rows into an empty store: indexes dropped and rebuilt
    store = MetadataStore(data / "xmodal.sqlite3")
    try:
        assert _meta_indexes(store) == {"item_meta_lookup", "item_meta_item"}
        plan = store._db.execute(
            "EXPLAIN QUERY PLAN SELECT item_id FROM item_meta WHERE kind = 'image' AND key = 'n'"
            " AND value = 1"
        ).fetchall()
        assert "item_meta_lookup" in " ".join(str(r[3]) for r in plan)
        assert len(store.filter_ids("image", {"n": 1})) == 10
        # A process killed inside a bulk import leaves the indexes dropped...
        with pytest.raises(KeyboardInterrupt), store.bulk_writes(rows=10**6):
            assert _meta_indexes(store) == set()
            raise KeyboardInterrupt  # (the context manager rebuilds them on the way out)
        assert _meta_indexes(store) == {"item_meta_lookup", "item_meta_item"}
        for name in ("item_meta_lookup", "item_meta_item"):
            store._db.execute(f"DROP INDEX {name}")  # ...as kill -9 would
    finally:
        store.close()
    store = MetadataStore(data / "xmodal.sqlite3")  # ...and the next open builds them again
    try:
        assert _meta_indexes(store) == {"item_meta_lookup", "item_meta_item"}
        assert len(store.filter_ids("image", {"n": 2})) == 10
    finally:
        store.close()
    # A small import into a bigger store keeps its indexes (inserts beat a rebuild there).
    small = _write(tmp_path / "b.parquet", {"embedding": _vectors(3, seed=1).tolist()})
    store = MetadataStore(data / "xmodal.sqlite3")
    try:
        with store.bulk_writes(rows=3):
            assert _meta_indexes(store) == {"item_meta_lookup", "item_meta_item"}
    finally:
        store.close()
    assert _import(data, small) == 0 and _count(data) == 33


@pytest.mark.slow
def test_an_import_killed_midway_keeps_whole_chunks_and_a_rerun_completes_it(
    tmp_path: Path,
) -> None:
    """kill -9 while `xmodal import` commits (synchronous=NORMAL, metadata indexes dropped):
    the store holds whole chunks only, opens with its indexes back, and a rerun adds exactly
    the rows that were missing, each once."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    n, chunk = 20_000, 1_000
    keys = [f"k{i}" for i in range(n)]
    meta = [json.dumps({"n": i % 7}) for i in range(n)]
    path = _write(
        tmp_path / "rows.parquet",
        {"embedding": _vectors(n).tolist(), "key": keys, "metadata": meta},
    )
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "app.cli", "import", str(path), "--data-dir", str(data),
           "--batch-rows", str(chunk), *TINY]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = data / "xmodal.sqlite3"
    deadline = time.monotonic() + 240
    stored = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                        stored = conn.execute("SELECT count(*) FROM items").fetchone()[0]
                except sqlite3.Error:
                    stored = 0
                if stored >= 3 * chunk:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert stored >= 3 * chunk, "the import finished or never committed before the kill"
    kept = _count(data)
    assert 3 * chunk <= kept < n and kept % chunk == 0  # whole chunks, never part of one
    store = MetadataStore(data / "xmodal.sqlite3")
    try:
        assert _meta_indexes(store) == {"item_meta_lookup", "item_meta_item"}
        assert len(store.filter_ids("image", {"n": 3})) == sum(1 for i in range(kept) if i % 7 == 3)
    finally:
        store.close()
    assert _import(data, path) == 0  # the rerun skips what is stored, by key
    assert _count(data) == n
    store = MetadataStore(data / "xmodal.sqlite3")
    try:
        distinct = store._db.execute("SELECT count(DISTINCT sha256) FROM items").fetchone()[0]
        assert distinct == n
        assert len(store.filter_ids("image", {"n": 3})) == sum(1 for i in range(n) if i % 7 == 3)
    finally:
        store.close()
