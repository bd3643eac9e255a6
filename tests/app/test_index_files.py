"""Saved indexes read ahead of the model at start-up: adopted only when they fit the model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from app.library import Library
from app.main import create_app
from app.saved_indexes import read_index_files, start_reading_index_files
from app.services.bulk import index_paths
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings, wait_ready


def _data_dir(encoder: Encoder, tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in (1, 2, 3):
        (photos / f"{seed}.png").write_bytes(image_bytes(seed))
    data = tmp_path / "data"
    library = Library.open(make_settings(data), encoder)
    index_paths(library, [photos], batch_size=3, progress=False)
    library.close()  # saves the indexes
    return data


def test_index_files_read_ahead_are_adopted_for_their_model_only(
    encoder: Encoder, tmp_path: Path
) -> None:
    data = _data_dir(encoder, tmp_path)
    files = read_index_files(data)
    assert files is not None and files.fits(encoder)
    assert files.images is not None and len(files.images) == 3
    library = Library.open(make_settings(data), encoder, index_files=files)
    try:
        assert library.images._index is files.images
        assert library.images.loaded_from == "file"
        stored = library.store.embeddings_for("image", [1])[1]
        hits = library.images.search(np.asarray(stored)[None], 1)
        assert hits[0][0].id == 1
    finally:
        library.close()

    other = replace(files, fingerprint="another model's")
    assert not other.fits(encoder)
    library = Library.open(make_settings(data), encoder, index_files=other)
    try:
        assert library.images._index is not other.images  # read again, for this model
        assert library.images.loaded_from == "file" and len(library.images) == 3
    finally:
        library.close()


def test_reading_ahead_never_fails_a_start(encoder: Encoder, tmp_path: Path) -> None:
    assert read_index_files(tmp_path / "no such dir") is None
    data = _data_dir(encoder, tmp_path)
    index_file = data / "indexes" / "images.faiss"
    index_file.write_bytes(index_file.read_bytes()[:-40])  # truncated
    files = read_index_files(data)
    assert files is not None and files.images is None and files.texts is not None
    library = Library.open(make_settings(data), encoder, index_files=files)
    try:
        assert library.images.loaded_from == "rebuilt" and len(library.images) == 3
    finally:
        library.close()


def test_a_server_adopts_the_indexes_read_before_its_model_loaded(
    encoder: Encoder, tmp_path: Path
) -> None:
    """`xmodal serve` starts the read before importing torch and hands it to the app, which
    loads the model itself (as the CLI does) and keeps the index objects read ahead."""
    data = _data_dir(encoder, tmp_path)
    reading = start_reading_index_files(data)
    files = reading.result(timeout=60)
    assert files is not None and files.images is not None
    with TestClient(create_app(make_settings(data), index_files=reading)) as client:
        wait_ready(client)
        library = client.app.state.runtime.backend.library  # type: ignore[attr-defined]
        assert library.encoder is not encoder  # loaded by the app, not shared
        assert library.images._index is files.images
        assert library.texts._index is files.texts
        stored = library.store.embeddings_for("image", [2])[2]
        answer = client.post("/v1/search/vector", json={"vector": stored.tolist(), "k": 1})
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["id"] == 2
