"""Bulk indexing of folders and CSV files into a data dir (`xmodal index`).

Decoding and preprocessing run in worker processes (a torch DataLoader) and overlap the
model's forward passes; each batch of embeddings is committed in one SQLite transaction, on a
writer thread, so that its file copies and fsyncs overlap the next batch's forward pass (at most
one batch is in flight; a failed commit stops the run with its error).
A file that fails to decode is reported and skipped. Re-running skips content already stored
(by SHA-256), so an interrupted run resumes where it stopped.

With a CUDA encoder, plain JPEGs are decoded on the GPU (nvJPEG, batched) instead: the workers
only check their headers and hand over the bytes, and the main process decodes, resizes and
thumbnails each batch on the device. JPEGs that need more than a plain decode (EXIF rotation,
CMYK, ...) and every other format still go through PIL in the workers, and a batch the device
cannot decode falls back to PIL in the main process.
"""

from __future__ import annotations

import csv
import logging
import threading
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

from app.library import Library
from app.paths import images_under
from app.services.items import (
    ImageToStore,
    commit_images,
    commit_texts,
    text_sha256,
    with_photo_fields,
)
from index.media import file_sha256
from index.store import NewItem
from models.encoder import Encoder
from models.inputs.decode import ImageError, decode_image, make_thumbnail, probe_image
from models.inputs.device_decode import (
    OPENAI_MEAN,
    OPENAI_STD,
    decode_jpegs,
    model_input,
    thumbnail_jpeg,
)

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    seen: int = 0
    added: int = 0
    skipped_known: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    texts_added: int = 0
    seconds: float = 0.0
    # The JPEG device path (gpu_decode): images decoded there, and batches that fell back to PIL.
    decoded_on_device: int = 0
    device_decode_fallbacks: int = 0
    # `stop` was set: the run ended after committing the batch in hand; a rerun finishes it.
    interrupted: bool = False

    @property
    def images_per_s(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0


def iter_inputs(paths: list[Path]) -> Iterator[tuple[Path, str | None]]:
    """(image path, caption or None) for every image under folders and in CSV files."""
    for path in paths:
        if path.is_dir():
            for child in images_under(path):
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
    photo: dict[str, Any] = field(default_factory=dict)  # read from the file's header
    # Set instead of pixels/thumbnail when the main process decodes this JPEG on the device.
    jpeg: bytes | None = None


# JPEGs whose plain decode to RGB is the whole job: no EXIF rotation to apply, and a colour
# mode that libjpeg/nvJPEG convert to RGB as PIL does (CMYK/YCCK are left to PIL).
_DEVICE_JPEG_FORMATS = ("JPEG", "MPO")
_DEVICE_JPEG_MODES = ("RGB", "L")


class _ImageFiles(Dataset[_Decoded]):
    """Runs in the DataLoader's worker processes: decode, thumbnail, preprocess; or, with
    `raw_jpegs`, only the header checks for plain JPEGs, whose bytes go to the main process."""

    def __init__(
        self,
        files: list[Path],
        preprocess: Callable[[Image.Image], torch.Tensor],
        image_size: int,
        thumbnail_px: int,
        max_pixels: int,
        max_bytes: int,
        raw_jpegs: bool = False,
    ) -> None:
        self.files = files
        self.raw_jpegs = raw_jpegs
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
            source: Path | bytes = path
            if self.raw_jpegs:
                data = path.read_bytes()
                header = probe_image(data, max_pixels=self.max_pixels)
                if (
                    header.format in _DEVICE_JPEG_FORMATS
                    and header.orientation == 1
                    and header.mode in _DEVICE_JPEG_MODES
                ):
                    return _Decoded(
                        position, None, b"", header.mime, header.width, header.height, size,
                        None, header.photo, jpeg=data,
                    )  # fmt: skip
                source = data  # read once: decode these bytes on the CPU below
            return _decode_on_cpu(
                position, source, size, self.preprocess, self.thumbnail_px, self.max_pixels,
                self.draft_px,
            )  # fmt: skip
        except (ImageError, OSError) as exc:
            return _failed(position, exc)


def _failed(position: int, exc: Exception) -> _Decoded:
    return _Decoded(position, None, b"", "", 0, 0, 0, f"{type(exc).__name__}: {exc}")


def _decode_on_cpu(
    position: int,
    source: Path | bytes,
    size: int,
    preprocess: Callable[[Image.Image], torch.Tensor],
    thumbnail_px: int,
    max_pixels: int,
    draft_px: int,
) -> _Decoded:
    """The PIL path: decode (drafted), preprocess, thumbnail. Raises ImageError / OSError."""
    decoded = decode_image(source, max_pixels=max_pixels, draft_px=draft_px)
    return _Decoded(
        position,
        preprocess(decoded.image),
        make_thumbnail(decoded.image, thumbnail_px),
        decoded.mime,
        decoded.width,
        decoded.height,
        size,
        None,
        decoded.photo,
    )


def _device_decode_supported(encoder: Encoder) -> str | None:
    """Why `models.inputs.device_decode` cannot reproduce this model's preprocessing, or None."""
    cfg = encoder.preprocess_cfg
    if cfg.get("resize_mode", "shortest") != "shortest":
        return f"resize_mode {cfg.get('resize_mode')!r}"
    if cfg.get("interpolation", "bicubic") != "bicubic":
        return f"interpolation {cfg.get('interpolation')!r}"
    size = cfg.get("size", encoder.image_size)
    if not isinstance(size, int) and len(set(size)) != 1:
        return f"non-square input size {size!r}"
    return None


def _decode_on_device(
    items: list[_Decoded],
    encoder: Encoder,
    device: torch.device,
    *,
    thumbnail_px: int,
    max_pixels: int,
    draft_px: int,
) -> bool:
    """Decode the raw JPEGs of one batch together on `device` (nvJPEG on CUDA), filling each
    item's pixels (on `device`) and thumbnail. If the device decode fails, every item is
    decoded with PIL here instead (an item PIL cannot decode gets its `error`); returns False
    in that case."""
    datas = [d.jpeg for d in items if d.jpeg is not None]
    assert len(datas) == len(items)
    cfg = encoder.preprocess_cfg
    try:
        images = decode_jpegs(datas, device)
        pixels = model_input(
            images, encoder.image_size, cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD)
        )
        thumbnails = [thumbnail_jpeg(image, thumbnail_px) for image in images]
    except RuntimeError as exc:  # torchvision/nvJPEG decode errors, CUDA out of memory
        # One bad file fails the whole batched decode: redo the batch one file at a time on
        # the CPU, where only the bad file fails.
        log.warning(
            "device JPEG decoding failed for a batch of %d (%s); decoding it with PIL",
            len(items), str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )  # fmt: skip
        for i, d in enumerate(items):
            try:
                cpu = _decode_on_cpu(
                    d.position, datas[i], d.size, encoder.preprocess_image, thumbnail_px,
                    max_pixels, draft_px,
                )  # fmt: skip
                d.pixels, d.thumbnail = cpu.pixels, cpu.thumbnail
            except (ImageError, OSError) as cpu_exc:
                d.error = _failed(d.position, cpu_exc).error
        return False
    for d, item_pixels, thumbnail in zip(items, pixels, thumbnails, strict=True):
        d.pixels, d.thumbnail = item_pixels, thumbnail
    return True


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
    gpu_decode: bool | None = None,
    stop: threading.Event | None = None,
) -> IndexReport:
    """Index image files and dataset CSVs.

    `gpu_decode`: decode plain JPEGs in the main process on the encoder's device with
    torchvision (nvJPEG on CUDA) instead of with PIL in the workers. None (auto) = on for a
    CUDA encoder; True also works on a CPU encoder (torchvision's CPU decoder: the same code
    path, which is how it is tested without a GPU).

    `stop` (set by a signal handler): finish and commit the batch in hand, then return with
    `interrupted`. Every committed batch is whole (one SQLite transaction), and a rerun skips
    the files already stored by their SHA-256, so each file is indexed exactly once.
    """
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
            sha, _ = file_sha256(path)
        except OSError as exc:
            report.failed.append((str(path), f"{type(exc).__name__}: {exc}"))
            continue
        if sha in known:
            report.skipped_known += 1
            continue
        known.add(sha)  # the same content twice in one run is stored once
        todo.append((path, sha, caption))
    decode_device = encoder.device
    device_decode = decode_device.type == "cuda" if gpu_decode is None else gpu_decode
    unsupported = _device_decode_supported(encoder) if device_decode else None
    if unsupported is not None:
        log.warning("JPEG decoding on %s is off for this model: %s", decode_device, unsupported)
        device_decode = False
    dataset = _ImageFiles(
        [p for p, _, _ in todo],
        encoder.preprocess_image,
        encoder.image_size,
        settings.thumbnail_px,
        settings.limits.max_image_pixels,
        settings.limits.max_upload_bytes,
        raw_jpegs=device_decode,
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
            raw = [d for d in batch if d.error is None and d.jpeg is not None]
            if raw:
                on_device = _decode_on_device(
                    raw, encoder, decode_device, thumbnail_px=settings.thumbnail_px,
                    max_pixels=settings.limits.max_image_pixels, draft_px=dataset.draft_px,
                )  # fmt: skip
                if on_device:
                    report.decoded_on_device += len(raw)
                else:
                    report.device_decode_fallbacks += 1
            good = [d for d in batch if d.pixels is not None]  # batch order, as committed
            for bad in batch:
                if bad.error is not None:
                    path = todo[bad.position][0]
                    report.failed.append((str(path), bad.error))
                    log.warning("skipped %s: %s", path, bad.error)
            if good:
                images = [d.pixels for d in good if d.pixels is not None]
                if raw:  # device-decoded rows live on decode_device, the workers' on the CPU
                    vectors = encoder.encode_images(
                        torch.stack([p.to(decode_device) for p in images])
                    )
                else:
                    vectors = encoder.encode_images(images)
                for d in good:  # the writer thread needs neither: free them before the commit
                    d.pixels = d.jpeg = None
                if pending is not None:
                    pending.result()  # one batch in flight; re-raises a failed commit
                pending = writer.submit(_commit_batch, library, todo, good, vectors, metadata or {})
                report.added += len(good)
            bar.update(len(batch))
            bar.set_postfix(img_s=f"{report.added / max(time.perf_counter() - started, 1e-9):.1f}")
            if stop is not None and stop.is_set():
                report.interrupted = True
                break
        if pending is not None:
            pending.result()
    bar.close()
    if captions and not report.interrupted:
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
    images = []
    for d, vector in zip(decoded, vectors, strict=True):
        path, sha, caption = todo[d.position]
        meta = {**metadata, "source": path.name}
        if caption:
            meta["caption"] = caption
        meta = with_photo_fields(d.photo, meta, store_gps=library.settings.store_gps)
        images.append(
            ImageToStore(
                source=path,
                sha256=sha,
                thumbnail=d.thumbnail,
                mime=d.mime,
                width=d.width,
                height=d.height,
                size=d.size,
                filename=path.name,
                metadata=meta,
                vector=vector,
            )
        )
    commit_images(library, images, move=False)


def _index_captions(library: Library, captions: list[str], batch_size: int) -> int:
    known = library.store.all_shas("text")
    fresh: dict[str, str] = {}
    for text in captions:
        sha = text_sha256(text)
        if sha not in known and sha not in fresh:
            fresh[sha] = text
    shas = list(fresh)
    for start in range(0, len(shas), batch_size):
        chunk = shas[start : start + batch_size]
        vectors = library.encoder.encode_texts([fresh[s] for s in chunk])
        commit_texts(
            library,
            [
                NewItem(kind="text", sha256=s, embedding=v, text=fresh[s])
                for s, v in zip(chunk, vectors, strict=True)
            ],
        )
    return len(shas)
