"""What re-ranking costs a text search: p50/p99 with and without `rerank: true`, side by side.

Starts one xmodal server (a CoCa, random weights: speed does not depend on weight values),
indexes a small collection, then for each client count C runs C concurrent clients sending
text searches for T seconds, alternating plain and re-ranked rounds so both see the same
machine load. Re-ranked searches re-rank the top `--rerank-k` (default 16) candidates with
the caption decoder; every (query, candidate) pair of concurrent requests shares one decoder
pass, and candidates' image tokens come from the encoder's token cache after the warm-up
(the collection fits in it), so the figures are the steady state. Run:
    python bench/rerank_load.py --model coca_ViT-B-32 --clients 1 16 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import queries, seed_collection, start_xmodal, summarise


async def drive(
    url: str, clients: int, seconds: float, texts: list[str], body: dict[str, object]
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one_client(worker: int) -> None:
            nonlocal errors
            i = worker
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/search/text", json={"query": texts[i % len(texts)], **body}
                    )
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
                i += clients

        began = time.monotonic()
        await asyncio.gather(*(one_client(w) for w in range(clients)))
        elapsed = time.monotonic() - began
    return summarise(latencies, errors, elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coca_ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", help="xmodal's precision")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="plain/re-ranked alternations")
    parser.add_argument("--collection", type=int, default=200, help="images indexed first")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--rerank-k", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    args = parser.parse_args()
    texts = queries(2000)
    tmp = Path(tempfile.mkdtemp(prefix="xmodal-rerank-"))
    url, proc = start_xmodal(args, args.max_batch, tmp / "data")
    modes: dict[str, dict[str, object]] = {
        "plain": {"k": args.k},
        "rerank": {"k": args.k, "rerank": True, "rerank_k": args.rerank_k},
    }
    results: dict[str, dict[str, dict[str, float]]] = {m: {} for m in modes}
    try:
        seed_collection(url, args.collection)
        with httpx.Client(base_url=url, timeout=600) as client:
            # Warm-up: one-off costs, and every image's tokens into the cache.
            for i in range(max(4, args.collection // args.rerank_k * 2)):
                client.post("/v1/search/text", json={"query": texts[i], **modes["rerank"]})
        for clients in args.clients:
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
            for _ in range(args.rounds):
                for mode, body in modes.items():
                    seconds = args.seconds / args.rounds
                    runs[mode].append(asyncio.run(drive(url, clients, seconds, texts, body)))
            for mode, parts in runs.items():
                results[mode][str(clients)] = {
                    key: float(np.median([p[key] for p in parts]))
                    for key in ("qps", "p50_ms", "p99_ms")
                } | {"errors": float(sum(p["errors"] for p in parts))}
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "model": args.model, "device": args.device, "precision": args.precision,
        "k": args.k, "rerank_k": args.rerank_k, "collection": args.collection,
        "seconds": args.seconds, "results": results,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    print(f"\n{'mode':<8} {'clients':>7} {'QPS':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for mode, by_clients in results.items():
        for clients, r in by_clients.items():
            print(
                f"{mode:<8} {clients:>7} {r['qps']:>8.1f} {r['p50_ms']:>8.0f} "
                f"{r['p99_ms']:>8.0f} {r['errors']:>6.0f}"
            )


if __name__ == "__main__":
    main()
