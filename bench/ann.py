"""ANN benchmark of `index.vectors.VectorIndex`: exact vs HNSW vs IVF-PQ (+ exact re-scoring).

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/ann.py --sizes 100000
    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/ann.py --sizes 1000000 --json out.json

Vectors are CLUSTERED (uniform noise has no real neighbours, so every ANN index looks broken
on it): a mixture of anisotropic Gaussians on the unit sphere. Each of `--clusters` clusters
(Zipf-like sizes) has a centre (tilted towards one common direction, like CLIP's "cone", so
random pairs have cosine ~0.3) and a random rank-`--rank` subspace of variation, plus isotropic
noise. Queries are fresh draws from the same mixture. Ground truth: exact inner product.

For IVF-PQ the `exact_vectors` callback is an in-memory numpy lookup; the service reads those
vectors from SQLite instead (slower, and not counted in the index memory here).
Prints one JSON document (all rows) and a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from dataclasses import asdict, replace
from typing import Any

import faiss
import numpy as np

from index.vectors import IndexParams, VectorIndex


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def clustered(
    n: int, dim: int, *, clusters: int, rank: int, seed: int, n_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """(database [n, dim], queries [n_queries, dim]), L2-normalised float32."""
    rng = np.random.default_rng(seed)
    cone = rng.standard_normal(dim).astype(np.float32)
    cone /= np.linalg.norm(cone)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    centres += cone
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = (rng.standard_normal((clusters, dim, rank)) / np.sqrt(dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
    weights /= weights.sum()
    total = n + n_queries
    labels = rng.choice(clusters, total, p=weights)
    out = np.empty((total, dim), dtype=np.float32)
    chunk = 50_000
    for start in range(0, total, chunk):
        lab = labels[start : start + chunk]
        m = len(lab)
        z = rng.standard_normal((m, rank)).astype(np.float32)
        x = centres[lab] + 0.8 * np.einsum("ndr,nr->nd", bases[lab], z) / np.sqrt(rank)
        x += 0.3 * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out[:n], out[n:]


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = sum(
        len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True)
    )
    return hits / (k * len(truth))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure_search(
    index: VectorIndex,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int,
    n_single: int,
    max_s: float,
) -> dict[str, Any]:
    # batch 64: every query (also gives the recall), unless that takes over max_s (exact at 1M)
    batch_ms: list[float] = []
    found = []
    started = time.perf_counter()
    for start in range(0, len(queries), 64):
        if len(found) >= 2 and time.perf_counter() - started > max_s:
            break
        chunk = queries[start : start + 64]
        t0 = time.perf_counter()
        _, ids = index.search(chunk, k)
        batch_ms.append((time.perf_counter() - t0) * 1000 / len(chunk))
        found.append(ids)
    searched = np.concatenate(found)
    recall = recall_at(searched, truth[: len(searched)], k)
    # batch 1: the first n_single queries, one at a time (also at most ~max_s)
    single_ms: list[float] = []
    started = time.perf_counter()
    for row in queries[:n_single]:
        if len(single_ms) >= 20 and time.perf_counter() - started > max_s:
            break
        t0 = time.perf_counter()
        index.search(row[None, :], k)
        single_ms.append((time.perf_counter() - t0) * 1000)
    return {
        "recall_at_k": round(recall, 4),
        "recall_queries": len(searched),
        "b1_queries": len(single_ms),
        "b1_median_ms": round(statistics.median(single_ms), 3),
        "b1_p99_ms": round(pct(single_ms, 99), 3),
        "b64_median_ms_per_query": round(statistics.median(batch_ms), 3),
        "b64_p99_ms_per_query": round(pct(batch_ms, 99), 3),
    }


def bench_kind(
    params: IndexParams,
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    *,
    k: int,
    n_single: int,
    max_s: float,
    sweep: list[dict[str, int]],
) -> list[dict[str, Any]]:
    ids = np.arange(len(vectors), dtype=np.int64)
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = VectorIndex(vectors.shape[1], params, exact_vectors=lambda want: vectors[want])
    train_s = 0.0
    if not index.is_trained:
        index.train(vectors)  # what the service does (faiss subsamples 256 points per list)
        train_s = time.perf_counter() - t0
    index.add(ids, vectors, searched=False)
    build_s = time.perf_counter() - t0
    rss_delta = rss_bytes() - rss0
    serialized = int(faiss.serialize_index(index._index).nbytes)
    rows = []
    for setting in sweep:
        index.params = replace(params, **setting)
        result = measure_search(index, queries, truth, k, n_single, max_s)
        row = {
            "n": len(vectors),
            "kind": params.kind,
            "setting": setting,
            "build_s": round(build_s, 2),
            "train_s": round(train_s, 2),
            "index_bytes": serialized,
            "rss_delta_bytes": rss_delta,
            **result,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    del index
    gc.collect()
    return rows


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=ints, default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=1024, help="for recall and batch-64 latency")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--max-s", type=float, default=30.0, help="time cap per setting and batch size")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="exact,hnsw,ivfpq")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef", type=ints, default=[32, 64, 128, 256])
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--pq-m", type=int, default=64)
    p.add_argument("--nprobe", type=ints, default=[8, 16, 32, 64])
    p.add_argument("--refine", type=ints, default=[4, 8, 16])
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    kinds = args.kinds.split(",")
    all_rows: list[dict[str, Any]] = []
    for n in args.sizes:
        t0 = time.perf_counter()
        vectors, queries = clustered(
            n, args.dim, clusters=args.clusters, rank=args.rank, seed=args.seed,
            n_queries=args.queries,
        )  # fmt: skip
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(vectors)
        _, truth = flat.search(queries, args.k)
        del flat
        print(f"# n={n}: data + ground truth in {time.perf_counter() - t0:.1f}s", flush=True)
        base = IndexParams(
            hnsw_m=args.hnsw_m,
            hnsw_ef_construction=args.ef_construction,
            ivf_nlist=args.nlist,
            pq_m=args.pq_m,
        )
        plans: dict[str, list[dict[str, int]]] = {
            "exact": [{}],
            "hnsw": [{"hnsw_ef_search": ef} for ef in args.ef],
            "ivfpq": [
                {"ivf_nprobe": npr, "refine_factor": rf}
                for npr in args.nprobe
                for rf in args.refine
            ],
        }
        for kind in kinds:
            all_rows += bench_kind(
                replace(base, kind=kind),  # type: ignore[arg-type]
                vectors, queries, truth, k=args.k, n_single=args.single, max_s=args.max_s,
                sweep=plans[kind],
            )  # fmt: skip
        del vectors, queries
        gc.collect()
    doc = {
        "machine": {"cpus": faiss.omp_get_max_threads(), "python": platform.python_version()},
        "faiss": faiss.__version__,
        "args": vars(args),
        "base_params": asdict(IndexParams()),
        "rows": all_rows,
    }
    print(json.dumps(doc))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    print_table(all_rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'n':>8} {'kind':<6} {'setting':<22} {'build s':>8} {'MiB idx':>8} {'MiB rss':>8} "
        f"{'R@10':>6} {'b1 med':>7} {'b1 p99':>7} {'b64 med':>8} {'b64 p99':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        setting = ",".join(f"{k.split('_')[-1]}={v}" for k, v in r["setting"].items()) or "-"
        print(
            f"{r['n']:>8} {r['kind']:<6} {setting:<22} {r['build_s']:>8.1f} "
            f"{r['index_bytes'] / 2**20:>8.1f} {r['rss_delta_bytes'] / 2**20:>8.1f} "
            f"{r['recall_at_k']:>6.3f} {r['b1_median_ms']:>7.2f} {r['b1_p99_ms']:>7.2f} "
            f"{r['b64_median_ms_per_query']:>8.3f} {r['b64_p99_ms_per_query']:>8.3f}"
        )
    print("latencies in ms per query; b64 = batch of 64 queries, time / 64")


if __name__ == "__main__":
    main()
