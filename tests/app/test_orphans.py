"""Media files that no row points at (left by a crash) are removed at the next start."""

from __future__ import annotations

from pathlib import Path

from app.library import CLEAN_SHUTDOWN, Library
from app.services.bulk import index_paths
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings


def _crash(library: Library) -> None:
    """What a SIGKILL leaves: no index save, no clean-shutdown mark, the flock gone."""
    library.store.close()
    library.lock.release()


def _plant_orphan(data_dir: Path, sha: str) -> list[Path]:
    original = data_dir / "media" / sha[:2] / f"{sha}.png"
    thumbnail = data_dir / "thumbs" / sha[:2] / f"{sha}.jpg"
    for path in (original, thumbnail):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(99))
    return [original, thumbnail]


def _media_files(data_dir: Path) -> set[Path]:
    return set((data_dir / "media").glob("*/*")) | set((data_dir / "thumbs").glob("*/*"))


def test_files_without_rows_are_swept_after_a_crash(encoder: Encoder, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in (1, 2):
        (photos / f"{seed}.png").write_bytes(image_bytes(seed))
    data = tmp_path / "data"
    library = Library.open(make_settings(data), encoder)
    index_paths(library, [photos], batch_size=2, progress=False)
    kept = _media_files(data)
    assert len(kept) == 4  # two originals, two thumbnails
    _crash(library)

    orphans = _plant_orphan(data, "ab" + "0" * 62)
    referenced_shard = next(iter(kept)).parent
    half_written = referenced_shard / "tmpx1y2.part"
    half_written.write_bytes(b"\x89PNG half")

    library = Library.open(make_settings(data), encoder)
    try:
        assert _media_files(data) == kept
        assert not half_written.exists() and not any(p.exists() for p in orphans)
        assert library.store.count("image") == 2
    finally:
        library.close()
    reopened = Library.open(make_settings(data), encoder)
    try:
        assert reopened.store.get_meta(CLEAN_SHUTDOWN) == "0"  # marked dirty while open
    finally:
        reopened.close()


def test_clean_shutdown_skips_the_sweep(encoder: Encoder, tmp_path: Path) -> None:
    """Walking every file of a large collection costs seconds, so it runs only after a
    crash; a clean close marks the data dir, and the next start trusts it."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "1.png").write_bytes(image_bytes(1))
    data = tmp_path / "data"
    library = Library.open(make_settings(data), encoder)
    index_paths(library, [photos], batch_size=2, progress=False)
    library.close()

    planted = _plant_orphan(data, "cd" + "1" * 62)
    library = Library.open(make_settings(data), encoder)
    try:
        assert all(p.exists() for p in planted)
        assert library.store.count("image") == 1
    finally:
        library.close()
