"""Text-to-image search under load: xmodal with batching, xmodal without batching, and the plain
FastAPI + open_clip + FAISS baseline (bench/baseline_server.py), side by side in one run.

Each server runs in its own process on loopback; C concurrent clients send queries for T
seconds; we report QPS, p50, p99 and errors. Speed does not depend on weight values, so the
model has random weights. Run:
    python bench/serve_load.py --model ViT-B-32 --clients 16 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "a",
    "photo",
    "of",
    "dog",
    "cat",
    "red",
    "blue",
    "car",
    "beach",
    "city",
    "night",
    "tree",
    "mountain",
    "person",
    "bicycle",
    "small",
    "large",
    "old",
    "new",
    "green",
    "bright",
    "dark",
    "man",
    "woman",
    "child",
    "street",
    "river",
    "boat",
    "sky",
]


def queries(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready")


def start_xmodal(
    args: argparse.Namespace, batch: int, data_dir: Path
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "XMODAL_BATCH__MAX_BATCH_SIZE": str(batch),
        "XMODAL_BATCH__MAX_WAIT_MS": str(args.max_wait_ms),
        "XMODAL_BATCH__MAX_QUEUE": "1024",
        "XMODAL_LOG_LEVEL": "warning",
    }
    cmd = [
        sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
        "--model", args.model, "--pretrained", "none", "--device", args.device,
        "--precision", args.precision,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return url, proc


def start_baseline(args: argparse.Namespace) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "bench" / "baseline_server.py"), "--port", str(port),
           "--model", args.model, "--n", str(args.collection), "--device", args.device]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return url, proc


def seed_collection(url: str, n: int) -> None:
    """Index n small generated images so searches run against a real collection."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    with httpx.Client(base_url=url, timeout=600) as client:
        for start in range(0, n, 32):
            files = []
            for i in range(start, min(n, start + 32)):
                small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
                out = io.BytesIO()
                Image.fromarray(small).resize((64, 48)).save(out, "PNG")
                files.append(("files", (f"{i}.png", out.getvalue(), "image/png")))
            client.post("/v1/images", files=files).raise_for_status()


async def drive(url: str, clients: int, seconds: float, texts: list[str]) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one_client(worker: int) -> None:
            nonlocal errors
            i = worker
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/search/text", json={"query": texts[i % len(texts)], "k": 10}
                    )
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
                i += clients

        # warm the path (first requests pay one-off costs), then measure
        await asyncio.gather(
            *(client.post("/v1/search/text", json={"query": t, "k": 10}) for t in texts[:clients])
        )
        began = time.monotonic()
        await asyncio.gather(*(one_client(w) for w in range(clients)))
        elapsed = time.monotonic() - began
    return summarise(latencies, errors, elapsed)


def summarise(latencies: list[float], errors: int, elapsed: float) -> dict[str, float]:
    """QPS, p50/p99 in ms, ok and error counts of one measured round."""
    lat = np.array(latencies) * 1000
    return {
        "qps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "ok": len(latencies),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision", default="auto", help="xmodal's precision (auto|fp32|bf16|fp16)"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[16])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--collection", type=int, default=200, help="images indexed before the run")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--only", nargs="+", choices=["batched", "unbatched", "baseline"])
    args = parser.parse_args()
    texts = queries(2000)
    systems = args.only or ["batched", "unbatched", "baseline"]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for system in systems:
        tmp = Path(tempfile.mkdtemp(prefix="xmodal-load-"))
        if system == "baseline":
            url, proc = start_baseline(args)
        else:
            url, proc = start_xmodal(
                args, args.max_batch if system == "batched" else 1, tmp / "data"
            )
            seed_collection(url, args.collection)
        try:
            results[system] = {}
            for clients in args.clients:
                results[system][str(clients)] = asyncio.run(
                    drive(url, clients, args.seconds, texts)
                )
        finally:
            proc.terminate()
            proc.wait(60)
            shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "model": args.model, "device": args.device, "precision": args.precision,
        "seconds": args.seconds, "collection": args.collection, "results": results,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    print(
        f"\n{'system':<10} {'clients':>7} {'QPS':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'x baseline':>10}"
    )
    for system, by_clients in results.items():
        for clients, r in by_clients.items():
            base = results.get("baseline", {}).get(clients, {}).get("qps")
            ratio = f"{r['qps'] / base:.1f}" if base else "-"
            print(
                f"{system:<10} {clients:>7} {r['qps']:>8.1f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['errors']:>6} {ratio:>10}"
            )


if __name__ == "__main__":
    main()
