"""Search by vector (`POST /v1/search/vector`) under `wrk`, a native load generator, so the
client costs almost nothing of the cores the server runs on.

The query vectors and filters are bench/scale.py's (distinct vectors from the data's clusters,
one per request in turn; no filter and four filters from 10 items to 20% of them). Per filter
and connection count: QPS, p50/p90/p99 and every non-2xx status. Either on a running server
(`--url`) or on a data dir this starts a server on (`--data-dir`, e.g. one bench/scale.py built).
Searches only, unless `--writer RATE`: then each case runs twice, quiet and while bench/scale.py's
writer uploads one image and deletes an earlier one RATE times a second (what it uploads it
deletes again, but for the last five). Needs Debian's `wrk`.

    python bench/vector_wrk.py --data-dir scratch/scale/n1000000-ViT-B-32/data --model ViT-B-32
    python bench/vector_wrk.py --url http://127.0.0.1:8000 --model ViT-B-32 --connections 16
    python bench/vector_wrk.py --data-dir ... --connections 16 --writer 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from scale import FILTERS, Server, Writer, load_avg, queries
from wrk_load import run_wrk


def bodies(dim: int, count: int, seed: int, filter_: dict[str, Any] | None) -> list[str]:
    """Request bodies as bench/scale.py sends them (6 decimals a component)."""
    vectors = queries(count, dim, seed)
    return [
        json.dumps({"vector": [round(float(v), 6) for v in q], "k": 10, "filter": filter_})
        for q in vectors
    ]


def warm(url: str, texts: list[str]) -> None:
    """Every body once: first requests pay one-off costs (the row cache fills, pages fault in)."""
    with httpx.Client(base_url=url, timeout=120) as client:
        for text in texts:
            r = client.post(
                "/v1/search/vector", content=text, headers={"content-type": "application/json"}
            )
            r.raise_for_status()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--data-dir", type=Path, help="start a server on this data dir")
    ap.add_argument("--model", default="ViT-B-32", help="the data dir's model (sets the dim)")
    ap.add_argument("--index-kind", default="auto", choices=["auto", "exact", "hnsw", "ivfpq"])
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--queries", type=int, default=200, help="distinct query vectors")
    ap.add_argument("--seed", type=int, default=0, help="bench/scale.py's --seed")
    ap.add_argument("--filters", nargs="+", choices=list(FILTERS), default=list(FILTERS))
    ap.add_argument(
        "--env", nargs="*", default=[], metavar="KEY=VALUE", help="extra server settings"
    )
    ap.add_argument(
        "--writer",
        type=float,
        default=0,
        metavar="RATE",
        help="also measure each case while uploading+deleting RATE pairs a second",
    )
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt install wrk)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    from models.factory import register_builtin_configs

    register_builtin_configs()
    dim = int(open_clip.get_model_config(args.model)["embed_dim"])
    server: Server | None = None
    if args.data_dir is not None:
        env = {
            "HF_HUB_OFFLINE": "1",
            "XMODAL_INDEX__KIND": args.index_kind,
            "XMODAL_LOG_LEVEL": "warning",
            **dict(kv.split("=", 1) for kv in args.env),
        }
        model = ["--model", args.model, "--pretrained", "none", "--device", "cpu"]
        log = Path(tempfile.gettempdir()) / "vector_wrk-server.log"
        server = Server(args.data_dir, model, env, log)
        print(f"server ready in {server.start():.1f} s (log {log})", flush=True)
        url = server.url
    else:
        url = args.url.rstrip("/")
    tmp = Path(tempfile.mkdtemp(prefix="xmodal-vector-wrk-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in args.filters:
            texts = bodies(dim, args.queries, args.seed, FILTERS[name])
            warm(url, texts)
            for c in args.connections:
                for writing in (False, True) if args.writer else (False,):
                    writer = Writer(url, args.writer) if writing else None
                    if writer is not None:
                        writer.start()
                    result = run_wrk(
                        f"{url}/v1/search/vector", texts, "application/json", c, args.seconds, tmp
                    )
                    if writer is not None:
                        writer.stop_event.set()
                        writer.join()
                        result["writes"], result["write_errors"] = writer.done, writer.errors
                    result["load"] = load_avg()
                    key = f"{name} c{c}" + (" writing" if writing else "")
                    results[key] = result
                    print(f"{key}: {json.dumps(result)}", flush=True)
                    time.sleep(1)  # let queued work drain between rounds
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n| {'filter':<26} | conns | writer | {'QPS':>6} | {'p50':>6} | {'p90':>6} | {'p99':>6} "
          f"| non-2xx |")  # fmt: skip
    print(f"|{'-' * 28}|-------|--------|--------|--------|--------|--------|---------|")
    for key, r in results.items():
        name, c = key.removesuffix(" writing").rsplit(" c", 1)
        writes = f"{r['writes']:>6}" if "writes" in r else f"{'':>6}"
        print(f"| {name:<26} | {c:>5} | {writes} | {r['qps']:>6.0f} | {r['p50_ms']:>6.1f} | "
              f"{r['p90_ms']:>6.1f} | {r['p99_ms']:>6.1f} | {r['non_2xx']:>7} |")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps({"model": args.model, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
