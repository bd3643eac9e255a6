"""Bulk indexing of folders and CSV files into a data dir (`xmodal index`).

Decoding and preprocessing run in worker processes (a torch DataLoader) and overlap the
model's forward passes; each batch of embeddings is committed in one SQLite transaction, on a
writer thread, so that its file copies and fsyncs overlap the next batch's forward pass (at most
one batch is in flight; a failed commit stops the run with its error).
A file that fails to decode is reported and skipped. Re-running skips content already stored
(by SHA-256), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from app.runtime import Library
from index.store import NewItem
from models.imaging import ImageError, decode_image, make_thumbnail

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class IndexReport:
    seen: int = 0
    added: int = 0
    skipped_known: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    texts_added: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0


def iter_inputs(paths: list[Path]) -> Iterator[tuple[Path, str | None]]:
    """(image path, caption or None) for every image under folders and in CSV files."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES:
                    yield child, None
        elif path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or "filepath" not in reader.fieldnames:
                    raise ValueError(f"{path}: a dataset CSV needs a 'filepath' column")
                for row in reader:
                    caption = (row.get("caption") or "").strip() or None
                    yield (path.parent / row["filepath"]).resolve(), caption
        elif path.is_file():
            yield path, None
        else:
            raise FileNotFoundError(f"{path} does not exist")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Decoded:
    position: int
    pixels: torch.Tensor | None
    thumbnail: bytes
    mime: str
    width: int
    height: int
    size: int
    error: str | None


class _ImageFiles(Dataset[_Decoded]):
    """Runs in the DataLoader's worker processes: decode, thumbnail, preprocess."""

    def __init__(
        self,
        files: list[Path],
        preprocess: Callable[[Image.Image], torch.Tensor],
        image_size: int,
        thumbnail_px: int,
        max_pixels: int,
        max_bytes: int,
    ) -> None:
        self.files = files
        self.preprocess = preprocess
        self.draft_px = max(image_size, thumbnail_px)
        self.thumbnail_px = thumbnail_px
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> _Decoded:
        path = self.files[position]
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                raise ImageError(f"{size} bytes is over the {self.max_bytes}-byte limit")
            decoded = decode_image(path, max_pixels=self.max_pixels, draft_px=self.draft_px)
            return _Decoded(
                position,
                self.preprocess(decoded.image),
                make_thumbnail(decoded.image, self.thumbnail_px),
                decoded.mime,
                decoded.width,
                decoded.height,
                size,
                None,
            )
        except (ImageError, OSError) as exc:
            return _Decoded(position, None, b"", "", 0, 0, 0, f"{type(exc).__name__}: {exc}")


def _collate(items: list[_Decoded]) -> list[_Decoded]:
    return items


def index_paths(
    library: Library,
    paths: list[Path],
    *,
    batch_size: int = 32,
    workers: int = 2,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> IndexReport:
    from tqdm import tqdm

    started = time.perf_counter()
    report = IndexReport()
    encoder = library.encoder
    settings = library.settings
    inputs = list(iter_inputs(paths))
    report.seen = len(inputs)
    known = library.store.all_shas("image")
    todo: list[tuple[Path, str, str | None]] = []
    captions: list[str] = []
    for path, caption in inputs:
        if caption:
            captions.append(caption)
        try:
            sha = sha256_of(path)
        except OSError as exc:
            report.failed.append((str(path), f"{type(exc).__name__}: {exc}"))
            continue
        if sha in known:
            report.skipped_known += 1
            continue
        known.add(sha)  # the same content twice in one run is stored once
        todo.append((path, sha, caption))
    dataset = _ImageFiles(
        [p for p, _, _ in todo],
        encoder.preprocess_image,
        encoder.image_size,
        settings.thumbnail_px,
        settings.limits.max_image_pixels,
        settings.limits.max_upload_bytes,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="indexing")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xmodal-commit") as writer:
        pending: Future[None] | None = None
        for batch in loader:
            good = [d for d in batch if d.pixels is not None]
            for bad in batch:
                if bad.error is not None:
                    path = todo[bad.position][0]
                    report.failed.append((str(path), bad.error))
                    log.warning("skipped %s: %s", path, bad.error)
            if good:
                vectors = encoder.encode_images([d.pixels for d in good if d.pixels is not None])
                if pending is not None:
                    pending.result()  # one batch in flight; re-raises a failed commit
                pending = writer.submit(_commit_batch, library, todo, good, vectors, metadata or {})
                report.added += len(good)
            bar.update(len(batch))
            bar.set_postfix(img_s=f"{report.added / max(time.perf_counter() - started, 1e-9):.1f}")
        if pending is not None:
            pending.result()
    bar.close()
    library.images.catch_up()
    if captions:
        report.texts_added = _index_captions(library, captions, batch_size)
    report.seconds = time.perf_counter() - started
    return report


def _commit_batch(
    library: Library,
    todo: list[tuple[Path, str, str | None]],
    decoded: list[_Decoded],
    vectors: np.ndarray,
    metadata: dict[str, Any],
) -> None:
    items = []
    with library.write_lock:
        for d, vector in zip(decoded, vectors, strict=True):
            path, sha, caption = todo[d.position]
            relative = library.media.relative_path(sha, d.mime)
            library.media.put_file(path, relative, move=False)
            library.media.put_thumbnail(sha, d.thumbnail)
            meta = {**metadata, "source": path.name}
            if caption:
                meta["caption"] = caption
            items.append(
                NewItem(
                    kind="image",
                    sha256=sha,
                    embedding=vector,
                    metadata=meta,
                    media_path=relative,
                    mime=d.mime,
                    width=d.width,
                    height=d.height,
                    bytes=d.size,
                    filename=path.name,
                )
            )
        library.store.add_items(items)
    library.images.catch_up()


def _index_captions(library: Library, captions: list[str], batch_size: int) -> int:
    known = library.store.all_shas("text")
    fresh: dict[str, str] = {}
    for text in captions:
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if sha not in known and sha not in fresh:
            fresh[sha] = text
    shas = list(fresh)
    for start in range(0, len(shas), batch_size):
        chunk = shas[start : start + batch_size]
        vectors = library.encoder.encode_texts([fresh[s] for s in chunk])
        with library.write_lock:
            library.store.add_items(
                [
                    NewItem(kind="text", sha256=s, embedding=v, text=fresh[s])
                    for s, v in zip(chunk, vectors, strict=True)
                ]
            )
    library.texts.catch_up()
    return len(shas)
