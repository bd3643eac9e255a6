"""Bulk indexing (`xmodal index`) throughput vs the model's forward pass alone.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/index_build.py [--n 1000] [--json out.json]
    HF_HUB_OFFLINE=1 python bench/index_build.py --device cuda [--precisions fp32,fp16] \
        [--gpu-decode on,off] [--workers 4]

Generates `--n` photo-like 1920x1080 JPEGs (smooth gradients + noise; cached under the temp dir),
then for each precision (CPU: fp32, bf16; CUDA: fp32, fp16 autocast), DataLoader worker count
(1, 2) and `--gpu-decode` setting indexes them into a fresh data dir with
`app.services.bulk.index_paths` (through `app.library.Library.open`, ViT-B-32 with random
weights). Right before each pipeline run, the same encoder's `encode_images` is timed on
preprocessed tensors at the same batch size, already on the device: efficiency = pipeline
images/s / model-only images/s (target >= 0.8).

`--gpu-decode` (comma-separated, each auto|on|off; default auto = on with a CUDA encoder) is
`index_paths(gpu_decode=...)`: plain JPEGs are decoded in the main process on the encoder's
device (nvJPEG on CUDA; `on` with `--device cpu` runs the same path with torchvision's CPU
decoder) instead of with PIL in the workers.

The wall time is split into `encode_images` (main thread), the device JPEG decoding (main
thread) and the rest (hashing the files, waiting for the DataLoader or the writer); `commit s`
is the time spent in `_commit_batch` (media copies, fsyncs, SQLite) on bulk's writer thread,
overlapped with the forward passes. The worker's cost per image (PIL: decode + preprocess +
thumbnail; with device decoding: the header check and file read) is measured alone in one
process, and the device decode cost per image in batches. Prints one JSON document and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import app.services.bulk as bulk
from app.config import Settings
from app.library import Library
from app.runtime import encoder_spec
from models.encoder import Encoder
from models.factory import load_encoder
from models.inputs.device_decode import decode_jpegs, model_input, thumbnail_jpeg

DEFAULT_PRECISIONS = {"cpu": "fp32,bf16", "cuda": "fp32,fp16"}
GPU_DECODE = {"auto": None, "on": True, "off": False}


def _make_jpeg(path: Path, seed: int, i: int) -> None:
    w, h = 1920, 1080
    yy, xx = np.mgrid[0:135, 0:240].astype(np.float32)
    yy /= 135
    xx /= 240
    rng = np.random.default_rng((seed, i))  # every picture distinct, cache or not
    channels = []
    for _c in range(3):
        a, b, c, f = rng.uniform(-1, 1, 4)
        channels.append(128 + 60 * (a * xx + b * yy) + 50 * np.sin(6 * f * xx + 3 * c * yy))
    small = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
    noise = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    pic = np.clip(smooth.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    # Write under a temporary name: an interrupted run must not leave a truncated cached file.
    tmp = path.with_suffix(".tmp")
    Image.fromarray(pic).save(tmp, format="JPEG", quality=90)
    tmp.replace(path)


def make_jpegs(folder: Path, n: int, seed: int = 0, processes: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= n:
        return folder
    t0 = time.perf_counter()
    missing = [i for i in range(n) if not (folder / f"photo_{i:05d}.jpg").exists()]
    # In parallel on a many-core (GPU) machine: ~1 min in one process, each file is seeded.
    with ProcessPoolExecutor(max_workers=max(1, processes)) as pool:
        list(
            pool.map(
                _make_jpeg,
                [folder / f"photo_{i:05d}.jpg" for i in missing],
                [seed] * len(missing),
                missing,
                chunksize=16,
            )
        )
    print(
        f"# wrote {len(missing)} JPEGs to {folder} in {time.perf_counter() - t0:.1f}s", flush=True
    )
    return folder


def model_only(encoder: Encoder, pixels: torch.Tensor, batches: int) -> float:
    """images/s of encode_images on preprocessed tensors (median batch time; the numpy copy at
    the end of encode_images waits for the device)."""
    encoder.encode_images(pixels)  # warm-up
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        encoder.encode_images(pixels)
        times.append(time.perf_counter() - t0)
    return len(pixels) / statistics.median(times)


def decode_cost(
    encoder: Encoder, files: list[Path], settings: Settings, raw_jpegs: bool = False
) -> dict[str, float]:
    """ms per image of what a DataLoader worker does (decode with draft, preprocess, thumbnail;
    with `raw_jpegs`, only the header check and the file read for plain JPEGs)."""
    ds = bulk._ImageFiles(
        files,
        encoder.preprocess_image,
        encoder.image_size,
        settings.thumbnail_px,
        settings.limits.max_image_pixels,
        settings.limits.max_upload_bytes,
        raw_jpegs=raw_jpegs,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        ds[0]
        t0 = time.perf_counter()
        for i in range(len(files)):
            ds[i]
        total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"worker_ms_per_image": 1000 * total / len(files)}


def device_decode_cost(encoder: Encoder, files: list[Path], thumbnail_px: int) -> float:
    """ms per image of the main process's device path on one batch of `files`: decode_jpegs,
    model_input and the thumbnails (median of 3 batches after a warm-up)."""
    datas = [f.read_bytes() for f in files]
    cfg = encoder.preprocess_cfg
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)

    def run() -> None:
        images = decode_jpegs(datas, encoder.device)
        model_input(images, encoder.image_size, cfg["mean"], cfg["std"])
        for image in images:
            thumbnail_jpeg(image, thumbnail_px)
        sync()

    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / len(files)


class Timers:
    """Wraps encode_images, _decode_on_device and _commit_batch to split the wall time.

    device_decode is asynchronous on CUDA: its time is queueing the work plus the thumbnails'
    copies back to the host (which wait for the decode); the rest lands in encode."""

    def __init__(self, encoder: Encoder) -> None:
        self.seconds = {"encode": 0.0, "device_decode": 0.0, "commit": 0.0}
        self._encode = encoder.encode_images
        self._commit = bulk._commit_batch
        self._device_decode = bulk._decode_on_device
        encoder.encode_images = self._timed("encode", self._encode)  # type: ignore[method-assign]
        bulk._commit_batch = self._timed("commit", self._commit)  # type: ignore[assignment]
        bulk._decode_on_device = self._timed("device_decode", self._device_decode)  # type: ignore[assignment]
        self.encoder = encoder

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed

    def restore(self) -> None:
        del self.encoder.encode_images
        bulk._commit_batch = self._commit  # type: ignore[assignment]
        bulk._decode_on_device = self._device_decode  # type: ignore[assignment]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precisions", help="default fp32,bf16 on cpu, fp32,fp16 on cuda")
    p.add_argument("--workers", default="1,2")
    p.add_argument(
        "--gpu-decode",
        default="auto",
        help="comma-separated auto|on|off: JPEG decoding on the encoder's device (auto: on CUDA)",
    )
    p.add_argument("--baseline-batches", type=int, default=6)
    p.add_argument("--images-dir", type=Path, default=Path(tempfile.gettempdir()) / "xmodal-bench")
    p.add_argument("--json", help="also write the document to this file")
    args = p.parse_args()
    precisions = (args.precisions or DEFAULT_PRECISIONS[args.device]).split(",")
    allowed = {"cpu": {"fp32", "bf16", "bf16-text"}, "cuda": {"fp32", "fp16"}}[args.device]
    if not set(precisions) <= allowed:
        p.error(f"--precisions on {args.device}: any of {', '.join(sorted(allowed))}")
    gpu_decodes = args.gpu_decode.split(",")
    if not set(gpu_decodes) <= set(GPU_DECODE):
        p.error("--gpu-decode: comma-separated auto|on|off")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    folder = make_jpegs(
        args.images_dir / "jpeg-1920x1080-v2", args.n, processes=min(8, os.cpu_count() or 1)
    )
    files = sorted(folder.glob("*.jpg"))[: args.n]
    src = Path(tempfile.mkdtemp(prefix="xmodal-bench-src-"))
    for f in files:  # index exactly n files (the cache may hold more)
        (src / f.name).symlink_to(f)
    rows: list[dict[str, Any]] = []
    costs: dict[str, Any] = {}
    try:
        configs = [
            (prec, int(workers), gpu_decode)
            for prec in precisions
            for workers in args.workers.split(",")
            for gpu_decode in gpu_decodes
        ]
        for prec, workers, gpu_decode_arg in configs:
            gpu_decode = GPU_DECODE[gpu_decode_arg]
            device_decode = args.device == "cuda" if gpu_decode is None else gpu_decode
            data_dir = Path(tempfile.mkdtemp(prefix="xmodal-bench-data-"))
            settings = Settings(
                data_dir=data_dir,
                model={"name": "ViT-B-32", "pretrained": "none", "device": args.device,
                       "precision": prec},
            )  # fmt: skip
            encoder = load_encoder(encoder_spec(settings))
            cost_key = f"{prec}, device decode" if device_decode else prec
            if cost_key not in costs:
                costs[cost_key] = decode_cost(encoder, files[:40], settings, device_decode)
                if device_decode:
                    costs[cost_key]["device_decode_ms_per_image"] = device_decode_cost(
                        encoder, files[: args.batch_size], settings.thumbnail_px
                    )
            pix = torch.stack(
                [encoder.preprocess_image(Image.open(f).convert("RGB")) for f in files[:4]]
            )
            pixels = pix.repeat((args.batch_size + 3) // 4, 1, 1, 1)[: args.batch_size]
            pixels = pixels.to(encoder.device)  # the model alone: no host-to-device copy
            model_rate = model_only(encoder, pixels, args.baseline_batches)
            library = Library.open(settings, encoder)
            timers = Timers(encoder)
            try:
                t0 = time.perf_counter()
                report = bulk.index_paths(
                    library, [src], batch_size=args.batch_size, workers=workers,
                    progress=False, gpu_decode=gpu_decode,
                )  # fmt: skip
                wall = time.perf_counter() - t0
            finally:
                timers.restore()
                library.close()
                shutil.rmtree(data_dir, ignore_errors=True)
            rate = report.added / wall
            row = {
                "device": args.device,
                "precision": prec,
                "workers": workers,
                "gpu_decode": gpu_decode_arg,
                "decoded_on_device": report.decoded_on_device,
                "device_decode_fallbacks": report.device_decode_fallbacks,
                "batch": args.batch_size,
                "n": report.added,
                "failed": len(report.failed),
                "wall_s": round(wall, 2),
                "pipeline_img_s": round(rate, 2),
                "model_only_img_s": round(model_rate, 2),
                "efficiency": round(rate / model_rate, 3),
                "main_encode_s": round(timers.seconds["encode"], 2),
                "main_device_decode_s": round(timers.seconds["device_decode"], 2),
                "commit_s": round(timers.seconds["commit"], 2),
                "main_not_encoding_s": round(wall - timers.seconds["encode"], 2),
                "encode_img_s_in_pipeline": round(report.added / timers.seconds["encode"], 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del library, encoder
    finally:
        shutil.rmtree(src, ignore_errors=True)
    doc = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "worker_cost": costs,
        "rows": rows,
    }
    print(json.dumps(doc))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    head = (
        f"{'prec':<5} {'workers':>7} {'gpu dec':>7} {'on dev':>6} {'pipeline/s':>10} "
        f"{'model/s':>8} {'eff':>6} {'encode s':>9} {'dev dec s':>9} {'commit s':>9} "
        f"{'not enc s':>9} {'enc/s in pipe':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['precision']:<5} {r['workers']:>7} {r['gpu_decode']:>7} "
            f"{r['decoded_on_device']:>6} {r['pipeline_img_s']:>10.1f} "
            f"{r['model_only_img_s']:>8.1f} {r['efficiency']:>6.2f} {r['main_encode_s']:>9.1f} "
            f"{r['main_device_decode_s']:>9.1f} {r['commit_s']:>9.1f} "
            f"{r['main_not_encoding_s']:>9.1f} {r['encode_img_s_in_pipeline']:>13.1f}"
        )
    print("worker cost (1 thread) and device decode cost:", json.dumps(costs))


if __name__ == "__main__":
    main()
