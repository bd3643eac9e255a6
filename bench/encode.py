"""Encoder throughput: the project's `Encoder` vs stock open_clip, on the CPU or on CUDA.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/encode.py [--quick] [--json out.json]
    HF_HUB_OFFLINE=1 python bench/encode.py --device cuda [--precisions fp32,fp16] [--quick]

For each precision and batch size, the project's call and the stock call are timed alternately
(A B A B ...) so that both see the same machine load; each row reports medians over the calls
and their ratio. Precisions: on the CPU fp32 and bf16 (weights cast to bfloat16, the project's
precision='bf16'); on CUDA fp32 and fp16 (the project's precision='fp16': fp32 weights under
`torch.autocast('cuda', float16)`, and the stock side runs under the same autocast). On CUDA
every timed call ends with `torch.cuda.synchronize()`, the inputs of both sides are already on
the GPU (host-to-device copies are not timed), and fp32 matmuls run as PyTorch is configured
(TF32 off by default; the document records the setting).

- texts: `Encoder.encode_texts(strings)` (tokenises, runs the text tower only up to the
  longest real token in the batch) vs stock `model.encode_text(tokens)` on the full 77-token
  context (tokenisation done beforehand, so the stock side is not charged for it);
- images: `Encoder.encode_images(pixels)` vs stock `model.encode_image(pixels)` on
  preprocessed tensors (the project adds only normalisation and the copy to numpy).

FLOPs per item are counted with `torch.utils.flop_counter.FlopCounterMode`; the matmul peak is
measured here, on the same device, with a large matmul in each precision. Weights are random (`pretrained='none'`):
speed does not depend on their values. Prints one JSON document and tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.encoder import Encoder
from models.factory import EncoderSpec, load_encoder

_SUBJECTS = ["a dog", "two cats", "a red car", "an old man", "a little girl", "a wooden boat",
             "a bowl of soup", "a city street", "a mountain lake", "a black horse", "a bicycle",
             "a group of people", "a white bird", "a pizza"]  # fmt: skip
_TAILS = ["", "on a beach", "at night", "in the snow", "next to a window", "on a wooden table",
          "under a blue sky", "in a busy market", "running through a green field",
          "sitting on the grass near a river"]  # fmt: skip


def queries(n: int) -> list[str]:
    """Realistic short search queries, 2-9 words (most 3-9)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        text = f"{_SUBJECTS[rng.integers(len(_SUBJECTS))]} {_TAILS[rng.integers(len(_TAILS))]}"
        out.append(text.strip())
    return out


def photo_like(n: int, size: int = 224, seed: int = 0) -> list[np.ndarray]:
    """HxWx3 uint8 pictures: smooth colour gradients plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pics = []
    for _ in range(n):
        channels = []
        for _c in range(3):
            a, b, c, f = rng.uniform(-1, 1, 4)
            channels.append(128 + 60 * (a * xx + b * yy) + 50 * np.sin(6 * f * xx + 3 * c * yy))
        pic = np.stack(channels, axis=-1) + rng.normal(0, 12, (size, size, 3))
        pics.append(np.clip(pic, 0, 255).astype(np.uint8))
    return pics


# Matmul size per (device, precision) for the peak: large enough to saturate the device,
# small enough to take milliseconds (CPU fp32 2048^3 ~ 0.1 s here; an H100/H200 needs 8192^3).
_PEAK_SHAPES = {
    ("cpu", "fp32"): (torch.float32, 2048),
    ("cpu", "bf16"): (torch.bfloat16, 4096),
    ("cuda", "fp32"): (torch.float32, 8192),
    ("cuda", "fp16"): (torch.float16, 8192),
}
DEFAULT_PRECISIONS = {"cpu": "fp32,bf16", "cuda": "fp32,fp16"}


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What ends a timed call: CUDA kernels are asynchronous, so wait for them there."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def matmul_peak(
    dtype: torch.dtype, n: int, seconds: float, device: torch.device = torch.device("cpu")
) -> float:
    """GFLOP/s of an n x n x n matmul on `device` (median over calls)."""
    sync = synchronizer(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def count_flops(fn: Callable[[], Any]) -> int:
    # Under no_grad / inference_mode, nn.MultiheadAttention takes its fused "fast path"
    # (the vision tower), which FlopCounterMode does not see: count with autograd on instead.
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def paired(
    a: Callable[[], Any],
    b: Callable[[], Any],
    *,
    min_s: float,
    min_calls: int = 3,
    sync: Callable[[], None] = lambda: None,
) -> tuple[float, float]:
    """Median seconds per call of a and b, timed alternately after one warm-up call each;
    `sync` runs inside each timed call (torch.cuda.synchronize on CUDA)."""
    a()
    b()
    sync()
    ta: list[float] = []
    tb: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_s or len(ta) < min_calls:
        t0 = time.perf_counter()
        a()
        sync()
        t1 = time.perf_counter()
        b()
        sync()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


def stock_context(enc: Encoder) -> contextlib.AbstractContextManager[Any]:
    """The stock side's precision: the project's fp16 is CUDA autocast over fp32 weights, so
    stock open_clip gets the same autocast; bf16 (CPU) is in the weights and needs nothing."""
    if enc.precision == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def stock_text(enc: Encoder, tokens: torch.Tensor) -> Callable[[], Any]:
    tokens = tokens.to(enc.device)

    def run() -> Any:
        with torch.inference_mode(), stock_context(enc):
            return enc.model.encode_text(tokens)  # type: ignore[operator]

    return run


def stock_image(enc: Encoder, pixels: torch.Tensor) -> Callable[[], Any]:
    pixels = pixels.to(enc.device, torch.bfloat16 if enc.precision == "bf16" else torch.float32)

    def run() -> Any:
        with torch.inference_mode(), stock_context(enc):
            return enc.model.encode_image(pixels)  # type: ignore[operator]

    return run


def tolerance(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cos.min())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip name or xmodal-tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--precisions",
        help="comma-separated; default fp32,bf16 on cpu, fp32,fp16 on cuda",
    )
    p.add_argument("--batches", help="default 1,4,16,64 (--quick: 1,16)")
    p.add_argument("--quick", action="store_true", help="batches 1,16; shorter timing")
    p.add_argument("--min-s", type=float, default=2.0, help="timing per (row, side)")
    p.add_argument("--json", help="also write the document to this file")
    args = p.parse_args()
    default_batches = "1,16" if args.quick else "1,4,16,64"
    batches = [int(x) for x in (args.batches or default_batches).split(",")]
    min_s = 0.5 if args.quick else args.min_s
    precisions = (args.precisions or DEFAULT_PRECISIONS[args.device]).split(",")
    for prec in precisions:
        if (args.device, prec) not in _PEAK_SHAPES:
            ok = DEFAULT_PRECISIONS[args.device]
            p.error(f"precision {prec!r} is not benchmarked on {args.device} (use {ok})")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    sync = synchronizer(device)

    peak = {}
    for prec in dict.fromkeys(["fp32", *precisions]):  # fp32 always: FLOPs and tolerance
        dtype, n = _PEAK_SHAPES[(args.device, prec)]
        peak[prec] = matmul_peak(dtype, n, 1.0 if args.quick else 3.0, device)
    print(f"# matmul peak GFLOP/s ({args.device}, {threads} threads): {peak}", flush=True)

    texts = queries(256)
    encoders = {
        prec: load_encoder(
            EncoderSpec(name=args.model, pretrained="none", device=args.device, precision=prec)
        )
        for prec in dict.fromkeys(["fp32", *precisions])
    }
    fp32 = encoders["fp32"]
    # On the device for both sides: the comparison is of the models, not of a host copy.
    pixels_all = torch.randn(max(batches), 3, fp32.image_size, fp32.image_size).to(device)
    ctx = fp32.context_length

    # FLOPs per item (precision does not change the count)
    one_pixel = pixels_all[:1]
    flops_image = count_flops(lambda: fp32.model.encode_image(one_pixel))  # type: ignore[operator]
    flops_text_full = count_flops(stock_text(fp32, fp32.tokenize(texts[:1])))
    token_counts = (fp32.tokenize(texts) != 0).sum(dim=1)
    flops: dict[str, Any] = {
        "image": flops_image,
        "text_full_context": flops_text_full,
        "context_length": ctx,
        "query_tokens_mean": float(token_counts.float().mean()),
        "query_tokens_max": int(token_counts.max()),
        "text_trimmed_by_batch": {},
    }
    for bs in batches:
        batch = texts[:bs]
        total = count_flops(lambda batch=batch: fp32.encode_texts(batch))
        flops["text_trimmed_by_batch"][bs] = total / bs
    print(f"# FLOPs per item: {json.dumps(flops)}", flush=True)

    rows: list[dict[str, Any]] = []
    for prec in precisions:
        enc = encoders[prec]
        for bs in batches:
            batch = texts[:bs]
            tokens = enc.tokenize(batch)
            t_proj, t_stock = paired(
                lambda enc=enc, batch=batch: enc.encode_texts(batch),
                stock_text(enc, tokens),
                min_s=min_s,
                sync=sync,
            )
            f_trim = flops["text_trimmed_by_batch"][bs]
            rows.append(row("text", prec, bs, t_proj, t_stock, f_trim, flops_text_full, peak[prec]))
            print(json.dumps(rows[-1]), flush=True)
        for bs in batches:
            pix = pixels_all[:bs]
            t_proj, t_stock = paired(
                lambda enc=enc, pix=pix: enc.encode_images(pix),
                stock_image(enc, pix),
                min_s=min_s,
                sync=sync,
            )
            rows.append(
                row("image", prec, bs, t_proj, t_stock, flops_image, flops_image, peak[prec])
            )
            print(json.dumps(rows[-1]), flush=True)

    # Lower precisions vs fp32 (same seeded random weights), and trimmed vs stock text (fp32)
    from PIL import Image

    pics = torch.stack([fp32.preprocess_image(Image.fromarray(a)) for a in photo_like(32)])
    with torch.inference_mode():
        stock32 = torch.nn.functional.normalize(
            fp32.model.encode_text(fp32.tokenize(texts).to(device)),  # type: ignore[operator]
            dim=-1,
        )
    texts32, images32 = fp32.encode_texts(texts), fp32.encode_images(pics)
    tol: dict[str, Any] = {}
    for prec in precisions:
        if prec != "fp32":
            low = encoders[prec]
            tol[f"texts_{prec}_vs_fp32"] = tolerance(low.encode_texts(texts), texts32)
            tol[f"images_{prec}_vs_fp32"] = tolerance(low.encode_images(pics), images32)
    tol["texts_trimmed_vs_stock_fp32"] = tolerance(texts32, stock32.cpu().numpy())
    tol["n_texts"] = len(texts)
    tol["n_images"] = len(pics)
    doc = {
        "model": args.model,
        "torch": torch.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "threads": threads,
        "peak_gflops": peak,
        "flops_per_item": flops,
        "rows": rows,
        "tolerance": tol,
    }
    print(json.dumps(doc))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    print_tables(doc)


def row(
    what: str,
    prec: str,
    bs: int,
    t_proj: float,
    t_stock: float,
    flops_proj: float,
    flops_stock: float,
    peak: float,
) -> dict[str, Any]:
    proj_rate = bs / t_proj
    stock_rate = bs / t_stock
    return {
        "what": what,
        "precision": prec,
        "batch": bs,
        "project_per_s": round(proj_rate, 2),
        "stock_per_s": round(stock_rate, 2),
        "speedup": round(proj_rate / stock_rate, 3),
        "project_gflop_per_item": round(flops_proj / 1e9, 3),
        "stock_gflop_per_item": round(flops_stock / 1e9, 3),
        "project_peak_fraction": round(proj_rate * flops_proj / 1e9 / peak, 3),
        "stock_peak_fraction": round(stock_rate * flops_stock / 1e9 / peak, 3),
    }


def print_tables(doc: dict[str, Any]) -> None:
    peak = doc["peak_gflops"]
    where = doc["gpu"] or f"{doc['threads']} threads"
    rates = ", ".join(f"{prec} {rate:.0f} GFLOP/s" for prec, rate in peak.items())
    print(f"\nmatmul peak ({where}): {rates}")
    head = (
        f"{'what':<6} {'prec':<5} {'batch':>5} {'project/s':>10} {'stock/s':>9} {'ratio':>6} "
        f"{'GFLOP p':>8} {'GFLOP s':>8} {'%peak p':>8} {'%peak s':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in doc["rows"]:
        print(
            f"{r['what']:<6} {r['precision']:<5} {r['batch']:>5} {r['project_per_s']:>10.1f} "
            f"{r['stock_per_s']:>9.1f} {r['speedup']:>6.2f} {r['project_gflop_per_item']:>8.2f} "
            f"{r['stock_gflop_per_item']:>8.2f} {100 * r['project_peak_fraction']:>7.0f}% "
            f"{100 * r['stock_peak_fraction']:>7.0f}%"
        )
    print("p = project Encoder, s = stock open_clip; %peak against the same-precision matmul peak")
    print("tolerance:", json.dumps(doc["tolerance"]))


if __name__ == "__main__":
    main()
