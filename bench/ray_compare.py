"""The single process vs. the Ray engine on this machine (issue 14).

1. Serving: text-to-image search at C concurrent clients for T seconds against
   `xmodal serve` and `xmodal serve --engine ray --replicas N` (N = 1, 2), each a fresh
   process on loopback with the same collection; QPS, p50, p99, errors.
2. Bulk embedding: images/s of `xmodal index` (one process, DataLoader workers) vs.
   `xmodal embed --engine ray` (Ray Data on a local cluster), on the same generated files,
   start-up included for both (each is one command a user runs).

With 2 CPU cores nothing scales out: this measures the Ray engine's overhead (process hops,
serialization, scheduling, one more copy of the model per replica), not its scale-out. Run:
    python bench/ray_compare.py --model xmodal-tiny --clients 16 --seconds 20 --images 400
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import ROOT, drive, free_port, queries, seed_collection, wait_ready


def _env(args: argparse.Namespace) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "XMODAL_BATCH__MAX_BATCH_SIZE": "32",
        "XMODAL_BATCH__MAX_WAIT_MS": str(args.max_wait_ms),
        "XMODAL_BATCH__MAX_QUEUE": "1024",
        "XMODAL_LOG_LEVEL": "warning",
    }


def _model_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--pretrained", "none", "--device", "cpu",
            "--precision", args.precision]  # fmt: skip


def start(
    args: argparse.Namespace, data_dir: Path, extra: list[str]
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port),
           "--data-dir", str(data_dir), *_model_flags(args), *extra]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=_env(args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
    except BaseException:  # Ctrl-C or a failed start: leave no server behind
        stop(proc)
        raise
    return url, proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # the Ray engine deletes its app and stops its cluster
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench_serving(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    ray_flags = ["--engine", "ray", "--replica-cpus", "0.5"]
    systems = {"single": []} | {
        f"ray x{n}": [*ray_flags, "--replicas", str(n)] for n in args.replicas
    }
    for mode in args.batching:  # other places to batch (docs/deployment.md)
        for n in args.replicas:
            systems[f"ray x{n} {mode}"] = [*ray_flags, "--replicas", str(n)]
            systems[f"ray x{n} {mode}"] += ["--replica-batching", mode]
    texts = queries(2000)
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    # Rounds alternate the systems, so a burst of load from elsewhere hits all of them alike.
    for round_ in range(args.rounds):
        for name, extra in systems.items():
            data_dir = tmp / f"{name.replace(' ', '-')}-{round_}"
            started = time.perf_counter()
            url, proc = start(args, data_dir, extra)
            ready_s = time.perf_counter() - started
            try:
                seed_collection(url, args.collection)
                asyncio.run(drive(url, args.clients, 3, texts))  # warm-up
                r = asyncio.run(drive(url, args.clients, args.seconds, texts))
                r["ready_s"] = ready_s
                runs[name].append(r)
                print(f"round {round_ + 1} {name}: {r}", flush=True)
            finally:
                stop(proc)
    for name, rs in runs.items():  # the median round (by QPS) of each system
        ranked = sorted(rs, key=lambda r: r["qps"])
        results[name] = {**ranked[len(ranked) // 2], "rounds_qps": [r["qps"] for r in rs]}
    return results


def bench_embedding(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    from PIL import Image

    folder = tmp / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.images):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC).save(
            folder / f"{i:05d}.jpg", quality=90
        )
    runs = {
        "single (xmodal index)": ["index", str(folder), "--data-dir", str(tmp / "idx"),
                                  "--quiet", "--workers", "1"],
        "ray data (xmodal embed)": ["embed", str(folder), "--out", str(tmp / "shards")],
    }  # fmt: skip
    out = {}
    for name, cmd in runs.items():
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "app.cli", *cmd, *_model_flags(args)],
            env=_env(args), cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        out[name] = args.images / seconds
        print(
            f"{name}: {args.images} images in {seconds:.1f}s, {out[name]:.1f} images/s", flush=True
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="xmodal-tiny")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--collection", type=int, default=500)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--batching",
        nargs="*",
        default=["ingress"],
        choices=["xmodal", "ingress"],
        help="also measure these --replica-batching modes (@serve.batch always runs)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternate the systems N times")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--skip-embedding", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xmodal-ray-bench-"))
    try:
        serving = {} if args.skip_serving else bench_serving(args, tmp)
        embedding = {} if args.skip_embedding else bench_embedding(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nmodel {args.model}, {os.cpu_count()} CPUs, {args.clients} clients, {args.seconds:.0f}s"
    )
    print(
        f"{'server':<14} {'QPS':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'ready s':>8}"
        "  QPS of each round"
    )
    for name, r in serving.items():
        print(
            f"{name:<14} {r['qps']:>8.1f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} "
            f"{r['errors']:>6.0f} {r['ready_s']:>8.1f}  "
            + " ".join(f"{q:.1f}" for q in r["rounds_qps"])
        )
    for name, rate in embedding.items():
        print(f"bulk embedding, {name:<24} {rate:>8.1f} images/s")


if __name__ == "__main__":
    main()
