"""Bulk indexing (`xmodal index`) throughput vs the model's forward pass alone.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/index_build.py [--n 1000] [--json out.json]

Generates `--n` photo-like 1920x1080 JPEGs (smooth gradients + noise; cached under the temp dir),
then for each precision (fp32, bf16) and DataLoader worker count (1, 2) indexes them into a
fresh data dir with `app.services.bulk.index_paths` (through `app.runtime.Library.open`,
ViT-B-32 with random weights). Right before each pipeline run, the same encoder's
`encode_images` is timed on preprocessed tensors at the same batch size: efficiency =
pipeline images/s / model-only images/s (target >= 0.8).

The wall time is split into `encode_images` (main thread) and the rest (hashing the files,
waiting for the DataLoader or the writer); `commit s` is the time spent in `_commit_batch`
(media copies, fsyncs, SQLite) on bulk's writer thread, overlapped with the forward passes.
The decode + preprocess + thumbnail cost per image is measured alone in one process. Prints one JSON document and a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import app.services.bulk as bulk
from app.config import Settings
from app.runtime import Library, encoder_spec
from models.encoder import Encoder
from models.factory import load_encoder


def make_jpegs(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= n:
        return folder
    w, h = 1920, 1080
    yy, xx = np.mgrid[0:135, 0:240].astype(np.float32)
    yy /= 135
    xx /= 240
    t0 = time.perf_counter()
    for i in range(n):
        path = folder / f"photo_{i:05d}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng((seed, i))  # every picture distinct, cache or not
        channels = []
        for _c in range(3):
            a, b, c, f = rng.uniform(-1, 1, 4)
            channels.append(128 + 60 * (a * xx + b * yy) + 50 * np.sin(6 * f * xx + 3 * c * yy))
        small = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
        noise = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        pic = np.clip(smooth.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pic).save(path, quality=90)
    print(f"# wrote {n} JPEGs to {folder} in {time.perf_counter() - t0:.1f}s", flush=True)
    return folder


def model_only(encoder: Encoder, pixels: torch.Tensor, batches: int) -> float:
    """images/s of encode_images on preprocessed tensors (median batch time)."""
    encoder.encode_images(pixels)  # warm-up
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        encoder.encode_images(pixels)
        times.append(time.perf_counter() - t0)
    return len(pixels) / statistics.median(times)


def decode_cost(encoder: Encoder, files: list[Path], settings: Settings) -> dict[str, float]:
    """ms per image of what a DataLoader worker does (decode with draft, preprocess, thumbnail)."""
    ds = bulk._ImageFiles(
        files,
        encoder.preprocess_image,
        encoder.image_size,
        settings.thumbnail_px,
        settings.limits.max_image_pixels,
        settings.limits.max_upload_bytes,
    )
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        ds[0]
        t0 = time.perf_counter()
        for i in range(len(files)):
            ds[i]
        total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(2)
    return {"worker_ms_per_image": 1000 * total / len(files)}


class Timers:
    """Wraps encode_images and _commit_batch to split the main process's time."""

    def __init__(self, encoder: Encoder) -> None:
        self.encode_s = 0.0
        self.commit_s = 0.0
        self._encode = encoder.encode_images
        self._commit = bulk._commit_batch
        encoder.encode_images = self.encode  # type: ignore[method-assign]
        bulk._commit_batch = self.commit  # type: ignore[assignment]
        self.encoder = encoder

    def encode(self, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._encode(*a, **k)
        finally:
            self.encode_s += time.perf_counter() - t0

    def commit(self, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._commit(*a, **k)
        finally:
            self.commit_s += time.perf_counter() - t0

    def restore(self) -> None:
        del self.encoder.encode_images
        bulk._commit_batch = self._commit  # type: ignore[assignment]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--baseline-batches", type=int, default=6)
    p.add_argument("--images-dir", type=Path, default=Path(tempfile.gettempdir()) / "xmodal-bench")
    p.add_argument("--json", help="also write the document to this file")
    args = p.parse_args()
    folder = make_jpegs(args.images_dir / "jpeg-1920x1080-v2", args.n)
    files = sorted(folder.glob("*.jpg"))[: args.n]
    src = Path(tempfile.mkdtemp(prefix="xmodal-bench-src-"))
    for f in files:  # index exactly n files (the cache may hold more)
        (src / f.name).symlink_to(f)
    rows: list[dict[str, Any]] = []
    costs: dict[str, Any] = {}
    try:
        for prec in args.precisions.split(","):
            for workers in [int(w) for w in args.workers.split(",")]:
                data_dir = Path(tempfile.mkdtemp(prefix="xmodal-bench-data-"))
                settings = Settings(
                    data_dir=data_dir,
                    model={"name": "ViT-B-32", "pretrained": "none", "device": "cpu",
                           "precision": prec},
                )  # fmt: skip
                encoder = load_encoder(encoder_spec(settings))
                if prec not in costs:
                    costs[prec] = decode_cost(encoder, files[:40], settings)
                pix = torch.stack(
                    [encoder.preprocess_image(Image.open(f).convert("RGB")) for f in files[:4]]
                )
                pixels = pix.repeat((args.batch_size + 3) // 4, 1, 1, 1)[: args.batch_size]
                model_rate = model_only(encoder, pixels, args.baseline_batches)
                library = Library.open(settings, encoder)
                timers = Timers(encoder)
                try:
                    t0 = time.perf_counter()
                    report = bulk.index_paths(
                        library, [src], batch_size=args.batch_size, workers=workers,
                        progress=False,
                    )  # fmt: skip
                    wall = time.perf_counter() - t0
                finally:
                    timers.restore()
                    library.close()
                    shutil.rmtree(data_dir, ignore_errors=True)
                rate = report.added / wall
                row = {
                    "precision": prec,
                    "workers": workers,
                    "batch": args.batch_size,
                    "n": report.added,
                    "failed": len(report.failed),
                    "wall_s": round(wall, 2),
                    "pipeline_img_s": round(rate, 2),
                    "model_only_img_s": round(model_rate, 2),
                    "efficiency": round(rate / model_rate, 3),
                    "main_encode_s": round(timers.encode_s, 2),
                    "commit_s": round(timers.commit_s, 2),
                    "main_not_encoding_s": round(wall - timers.encode_s, 2),
                    "encode_img_s_in_pipeline": round(report.added / timers.encode_s, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                del library, encoder
    finally:
        shutil.rmtree(src, ignore_errors=True)
    doc = {"torch_threads": torch.get_num_threads(), "worker_cost": costs, "rows": rows}
    print(json.dumps(doc))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    head = (
        f"{'prec':<5} {'workers':>7} {'pipeline/s':>10} {'model/s':>8} {'eff':>6} "
        f"{'encode s':>9} {'commit s':>9} {'not enc s':>9} {'enc/s in pipe':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['precision']:<5} {r['workers']:>7} {r['pipeline_img_s']:>10.1f} "
            f"{r['model_only_img_s']:>8.1f} {r['efficiency']:>6.2f} {r['main_encode_s']:>9.1f} "
            f"{r['commit_s']:>9.1f} {r['main_not_encoding_s']:>9.1f} "
            f"{r['encode_img_s_in_pipeline']:>13.1f}"
        )
    print("worker cost (decode+preprocess+thumbnail, 1 thread):", json.dumps(costs))


if __name__ == "__main__":
    main()
