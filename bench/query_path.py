"""What the query path's two caches buy a text search, through the real FastAPI stack.

The query-vector cache (XMODAL_CACHE__QUERY_VECTORS) skips the text tower and the batcher's
wait for a repeated query; the row cache (XMODAL_CACHE__RESULT_ROWS) skips SQLite when the
hits' rows are in memory. Each configuration serves the same data dir (random vectors with
metadata, xmodal-tiny) in process through httpx's ASGI transport (no sockets: the stack's own
cost shows, not loopback's), rounds alternate configurations, and a few distinct queries repeat
(the case both caches are for). Also times `get_many` against the cache's lookup alone. Run:
    python bench/query_path.py [--items 20000] [--seconds 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.config import Settings
from app.main import create_app
from index.store import MetadataStore, NewItem
from models.factory import EncoderSpec, load_encoder

TINY = {"name": "xmodal-tiny", "pretrained": "none", "device": "cpu", "precision": "fp32"}
QUERIES = [f"a photo of thing number {i}" for i in range(16)]


def seed(path: Path, n: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    store = MetadataStore(path)
    for start in range(0, n, 5000):
        vectors = rng.standard_normal((min(5000, n - start), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.add_items(
            [
                NewItem(
                    kind="image",
                    sha256=f"{start + i:064x}",
                    embedding=v,
                    metadata={"album": f"a{(start + i) % 50}", "n": start + i},
                    media_path=f"ab/{start + i:064x}.jpg",
                    mime="image/jpeg",
                    width=640,
                    height=480,
                    bytes=123_456,
                    filename=f"IMG_{start + i:05d}.jpg",
                )
                for i, v in enumerate(vectors)
            ]
        )
    store.close()


async def run_config(
    settings: Settings, encoder: Any, seconds: float, clients: int
) -> dict[str, float]:
    app = create_app(settings, encoder=encoder)
    async with app.router.lifespan_context(app):
        await app.state.runtime.wait_ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
            for q in QUERIES:  # warm: each query (and its hits' rows) once
                await client.post("/v1/search/text", json={"query": q, "k": 10})
            latencies: list[float] = []
            deadline = time.perf_counter() + seconds

            async def one_client(offset: int) -> None:
                i = offset
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    body = {"query": QUERIES[i % len(QUERIES)], "k": 10}
                    r = await client.post("/v1/search/text", json=body)
                    assert r.status_code == 200, r.text
                    latencies.append(time.perf_counter() - started)
                    i += 1

            started = time.perf_counter()
            await asyncio.gather(*(one_client(c) for c in range(clients)))
            elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "qps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def time_lookups(path: Path, n: int, k: int, repeats: int = 2000) -> dict[str, float]:
    """Hydrating k hits: SQLite on the thread's read connection vs the row cache alone."""
    rng = np.random.default_rng(1)
    rows = rng.integers(1, n + 1, size=(repeats, k)).tolist()
    plain = MetadataStore(path)
    cached = MetadataStore(path, row_cache_items=n)
    for row in rows:
        cached.get_many("image", row)  # fill
    out = {}
    for name, store in (("sqlite_us", plain), ("row_cache_us", cached)):
        started = time.perf_counter()
        for row in rows:
            store.get_many("image", row)
        out[name] = 1e6 * (time.perf_counter() - started) / repeats
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    encoder = load_encoder(EncoderSpec(**TINY))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        seed(data / "xmodal.sqlite3", args.items, encoder.dim)
        lookups = {k: time_lookups(data / "xmodal.sqlite3", args.items, k) for k in (10, 16)}
        configs = {
            f"vectors {qv}, rows {rows}": {"query_vectors": qv, "result_rows": rows}
            for qv in (0, 4096)
            for rows in (0, 20_000)
        }
        results: dict[str, dict[int, list[dict[str, float]]]] = {
            name: {c: [] for c in args.clients} for name in configs
        }
        for _ in range(args.rounds):
            for name, cache in configs.items():
                settings = Settings(data_dir=data, model=dict(TINY), cache=cache)
                for clients in args.clients:
                    measured = asyncio.run(run_config(settings, encoder, args.seconds, clients))
                    results[name][clients].append(measured)
    table = {
        name: {
            str(c): {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            for c, runs in per_clients.items()
        }
        for name, per_clients in results.items()
    }
    report = {"items": args.items, "loadavg": os.getloadavg(), "get_many": lookups, "http": table}
    print(json.dumps(report, indent=1))
    for k, times in lookups.items():
        print(
            f"get_many of {k} ids: SQLite {times['sqlite_us']:.0f} us, row cache "
            f"{times['row_cache_us']:.1f} us"
        )
    print(f"load average {os.getloadavg()}")
    for name, per_clients in table.items():
        cells = "  ".join(
            f"{c} client(s): p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms, {m['qps']:.0f} QPS"
            for c, m in per_clients.items()
        )
        print(f"{name:24s} {cells}")


if __name__ == "__main__":
    main()
