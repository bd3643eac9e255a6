"""`index_paths` with JPEGs decoded in the main process by torchvision (the nvJPEG path).

No GPU here: `gpu_decode=True` on the CPU encoder runs the same code with torchvision's CPU
JPEG decoder, and the result is checked against the PIL path (`gpu_decode=False`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from app.library import Library
from app.services.bulk import IndexReport, index_paths
from index.media import file_sha256
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings


def _rotated_jpeg(seed: int, orientation: int, size: tuple[int, int]) -> bytes:
    picture = Image.open(io.BytesIO(image_bytes(seed, "PNG", size))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=92, exif=exif.tobytes())
    return out.getvalue()


def _grey_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    picture = Image.open(io.BytesIO(image_bytes(seed, "PNG", size))).convert("L")
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=92)
    return out.getvalue()


def _index(encoder: Encoder, data: Path, folder: Path, **kwargs: object) -> tuple[
    IndexReport, dict[str, tuple[int, int, np.ndarray, bool]]
]:  # fmt: skip
    """Index `folder`; returns the report and, per source file name, (width, height,
    embedding, thumbnail exists)."""
    library = Library.open(make_settings(data), encoder)
    try:
        report = index_paths(library, [folder], batch_size=4, progress=False, **kwargs)  # type: ignore[arg-type]
        stored: dict[str, tuple[int, int, np.ndarray, bool]] = {}
        by_sha = {i.sha256: i for i in library.store.list_items("image", limit=10_000)}
        for path in sorted(folder.iterdir()):
            item = by_sha.get(file_sha256(path)[0])
            if item is None:
                continue
            embedding = library.store.embedding("image", item.id)
            assert embedding is not None and item.width and item.height
            thumb = library.media.thumbnail_path(item.sha256).is_file()
            stored[path.name] = (item.width, item.height, embedding, thumb)
    finally:
        library.close()
    return report, stored


def test_device_jpeg_path_matches_pil_path(encoder: Encoder, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    # Sorted names make the batches of 4: a* all go to the device decoder; b* mix a truncated
    # JPEG (good header: the device batch fails and falls back to PIL), a plain JPEG and two
    # EXIF-rotated ones (PIL in the workers); c* a PNG and a JPEG whose header is garbage.
    files = {
        "a0.jpg": image_bytes(1, "JPEG", (1280, 720)),  # drafted to 1/2 on the PIL path
        "a1.jpg": image_bytes(2, "JPEG", (640, 360)),
        "a2.jpg": image_bytes(3, "JPEG", (300, 500)),
        "a3_grey.jpg": _grey_jpeg(4, (320, 240)),
        "b0_truncated.jpg": image_bytes(5, "JPEG", (640, 360))[:3000],
        "b1.jpg": image_bytes(6, "JPEG", (640, 480)),
        "b2_rot6.jpg": _rotated_jpeg(7, 6, (640, 360)),
        "b3_rot3.jpg": _rotated_jpeg(8, 3, (400, 300)),
        "c0.png": image_bytes(9, "PNG", (200, 100)),
        "c1_garbage.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    upright = {
        "a0.jpg": (1280, 720), "a1.jpg": (640, 360), "a2.jpg": (300, 500),
        "a3_grey.jpg": (320, 240), "b1.jpg": (640, 480), "b2_rot6.jpg": (360, 640),
        "b3_rot3.jpg": (400, 300), "c0.png": (200, 100),
    }  # fmt: skip

    # One worker process: the raw bytes cross the DataLoader's process boundary.
    report, stored = _index(encoder, tmp_path / "dev", folder, workers=1, gpu_decode=True)
    assert report.added == len(upright)
    assert sorted(Path(p).name for p, _ in report.failed) == ["b0_truncated.jpg", "c1_garbage.jpg"]
    assert report.decoded_on_device == 4  # the a* batch
    assert report.device_decode_fallbacks == 1  # the b* batch
    assert {name: (w, h) for name, (w, h, _, _) in stored.items()} == upright
    assert all(thumb for _, _, _, thumb in stored.values())

    reference_report, reference = _index(
        encoder, tmp_path / "pil", folder, workers=0, gpu_decode=False
    )
    assert reference_report.decoded_on_device == 0 and reference_report.added == len(upright)
    assert {name: (w, h) for name, (w, h, _, _) in reference.items()} == upright
    # The tiny random model maps *different* pictures to cosine 0.985-0.993 (and a wrong
    # mean/std to ~0.990, a horizontal flip to ~0.998), so 0.99 would prove nothing: require
    # 0.9999 (measured: >= 0.9999996) and that each file is nearest to its own PIL embedding.
    names = list(upright)
    device_rows = np.stack([stored[name][2] for name in names])
    reference_rows = np.stack([reference[name][2] for name in names])
    cosines = device_rows @ reference_rows.T
    assert np.diag(cosines).min() > 0.9999, dict(zip(names, np.diag(cosines), strict=True))
    assert (cosines.argmax(axis=1) == np.arange(len(names))).all()


def test_device_jpeg_thumbnail_matches_pil_size(encoder: Encoder, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "wide.jpg").write_bytes(image_bytes(11, "JPEG", (1000, 400)))
    library = Library.open(make_settings(tmp_path / "d"), encoder)
    try:
        report = index_paths(library, [folder], workers=0, progress=False, gpu_decode=True)
        assert report.decoded_on_device == 1
        sha = file_sha256(folder / "wide.jpg")[0]
        thumb = Image.open(library.media.thumbnail_path(sha))
        px = library.settings.thumbnail_px
        assert thumb.format == "JPEG" and thumb.size == (px, round(400 * px / 1000))
    finally:
        library.close()
