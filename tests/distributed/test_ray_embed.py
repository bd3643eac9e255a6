"""`xmodal embed --engine ray`: Ray Data shards hold the vectors `xmodal index` stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.cli import main
from app.library import Library
from app.runtime import encoder_spec
from app.services.bulk import index_paths
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings

pytestmark = pytest.mark.ray

TINY_FLAGS = ["--model", "xmodal-tiny", "--pretrained", "none", "--device", "cpu"]
TINY_FLAGS += ["--precision", "fp32"]


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        fmt = "JPEG" if i % 2 else "PNG"  # JPEGs go through the draft decode
        path = folder / f"img{i:02d}.{fmt.lower()}"
        path.write_bytes(image_bytes(i, fmt, size=(320 + 8 * i, 240)))
        paths.append(path)
    return paths


def test_embed_shards_equal_local_index_and_resume(
    ray_cluster: Any, encoder: Encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.distributed.embed import MANIFEST, embed_paths, read_shards

    folder = tmp_path / "images"
    paths = _images(folder, 12)
    (folder / "copy.png").write_bytes(paths[0].read_bytes())  # same content, second path
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    settings = make_settings(tmp_path / "data")
    out = tmp_path / "shards"

    report = embed_paths(
        [folder], out, settings, encoder_spec(settings), shard_size=5, batch_size=4
    )
    assert (report.files, report.embedded, report.duplicates, len(report.failed)) == (14, 12, 1, 1)
    assert report.shards == 3 and report.shards_skipped == 0
    table = read_shards(out)
    rows = table.to_pylist()
    assert len(rows) == 12
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model_fingerprint"] == encoder.fingerprint
    for row in rows:  # the import contract (issue 13) and our own columns
        assert row["key"] == row["sha256"] and len(row["key"]) == 64
        assert row["image_path"] == row["path"] and Path(row["path"]).is_absolute()
        assert json.loads(row["metadata"]) == {"source": Path(row["path"]).name}
        assert row["model_fingerprint"] == encoder.fingerprint

    # The single-process `xmodal index` on the same files: the same vectors.
    library = Library.open(settings, encoder)
    try:
        index_paths(library, [folder], batch_size=8, workers=0, progress=False)
        shas = {row["sha256"] for row in rows}
        assert library.store.all_shas("image") == shas
        stored = {}
        for item in library.store.list_items("image", limit=100):
            vector = library.store.embedding("image", item.id)
            assert vector is not None
            stored[item.sha256] = vector
    finally:
        library.close()
    for row in rows:
        np.testing.assert_allclose(np.asarray(row["embedding"]), stored[row["key"]], atol=1e-5)

    # Re-running writes nothing; a new file lands in a new shard, old shards stay.
    again = embed_paths([folder], out, settings, encoder_spec(settings), shard_size=5)
    assert (again.shards_skipped, again.embedded) == (3, 0)
    (folder / "zz-new.png").write_bytes(image_bytes(99, "PNG"))
    more = embed_paths([folder], out, settings, encoder_spec(settings), shard_size=5)
    assert (more.shards_skipped, more.embedded) == (2, 1)  # the last shard's members changed


def test_embed_cli_refuses_another_models_out_dir(
    ray_cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    _images(folder, 3)
    out = tmp_path / "shards"
    assert main(["embed", str(folder), "--out", str(out), *TINY_FLAGS]) == 0
    assert "3 embedded into 1 new shards" in capsys.readouterr().out
    (out / "_manifest.json").write_text(json.dumps({"model": "other", "model_fingerprint": "x"}))
    assert main(["embed", str(folder), "--out", str(out), *TINY_FLAGS]) == 2
    assert "another model" in capsys.readouterr().err


def test_embed_then_import_answers_the_same_searches(
    ray_cluster: Any, encoder: Encoder, tmp_path: Path
) -> None:
    """embed --engine ray -> xmodal import -> search equals xmodal index -> search."""
    from app.distributed.embed import embed_paths
    from app.services.imports import import_paths

    folder = tmp_path / "images"
    _images(folder, 10)
    shards = tmp_path / "shards"
    imported_settings = make_settings(tmp_path / "imported")
    embed_paths([folder], shards, imported_settings, encoder_spec(imported_settings), shard_size=4)
    queries = encoder.encode_texts(["a red square", "blue", "a photo of a dog", "noise"])

    def answers(library: Library) -> list[list[tuple[str, float]]]:
        items = {i.id: i.sha256 for i in library.store.list_items("image", limit=100)}
        return [
            [(items[hit.id], hit.score) for hit in hits]
            for hits in library.images.search(queries, 5)
        ]

    imported = Library.open(imported_settings, encoder)
    try:
        report = import_paths(imported, [shards], progress=False)
        assert report.added == 10 and report.without_file == 0
        from_shards = answers(imported)
        # the image bytes came along: content is stored, not only the vector
        item = imported.store.list_items("image", limit=1)[0]
        assert imported.media.path_of(item.media_path or "").is_file()
    finally:
        imported.close()
    indexed = Library.open(make_settings(tmp_path / "indexed"), encoder)
    try:
        index_paths(indexed, [folder], batch_size=8, workers=0, progress=False)
        from_index = answers(indexed)
    finally:
        indexed.close()
    for got, want in zip(from_shards, from_index, strict=True):
        assert [sha for sha, _ in got] == [sha for sha, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
