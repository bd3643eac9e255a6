"""Search and upload under load measured with `wrk`, a native load generator, so the client costs
almost nothing: the plain FastAPI + open_clip + FAISS server (bench/baseline_server.py), xmodal
as checked out here and, with `--before DIR`, an older xmodal checkout, side by side in one run.

Per server and connection count: text search over distinct queries (one per request, in turn),
QPS, p50/p90/p99, and every non-2xx status counted; for xmodal also image search by stored id
and by uploaded file, and upload throughput (distinct images, from Python, `--upload-clients`
at a time). Random weights: speed does not depend on weight values. Needs Debian's `wrk`.
    python bench/wrk_load.py --model ViT-B-32 --connections 16 64 --seconds 20
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from serve_load import free_port, queries, seed_collection, wait_ready

ROOT = Path(__file__).resolve().parent.parent

# Each wrk thread walks its own slice of the bodies file (one hex-encoded body per line) and
# counts statuses; `done` sums the threads' counts and prints one JSON line.
LUA = r"""
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function init(args)
  path, content_type, nthreads = args[1], args[2], tonumber(args[3])
  bodies = {}
  for line in io.lines(path) do
    bodies[#bodies + 1] = (line:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end))
  end
  i = id
  statuses = {}
  headers = {["Content-Type"] = content_type}
end
function request()
  i = i + nthreads
  return wrk.format("POST", nil, headers, bodies[(i % #bodies) + 1])
end
function response(status, hdrs, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do
      counts[tostring(status)] = (counts[tostring(status)] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do parts[#parts + 1] = string.format('"%s": %d', status, n) end
  io.write(string.format(
    'WRK_JSON {"requests": %d, "seconds": %.3f, "p50_ms": %.2f, "p90_ms": %.2f, ' ..
    '"p99_ms": %.2f, "socket_errors": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    table.concat(parts, ", ")))
end
"""

BOUNDARY = "xmodalbenchboundary"


def run_wrk(
    url: str, bodies: list[str], content_type: str, connections: int, seconds: float, tmp: Path
) -> dict[str, object]:
    """One wrk run; returns its JSON summary plus QPS."""
    script, data = tmp / "load.lua", tmp / "bodies.txt"
    script.write_text(LUA)
    data.write_text("\n".join(b.encode("latin-1").hex() for b in bodies) + "\n")
    threads = min(2, connections)
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
        "-s", str(script), url, "--", str(data), content_type, str(threads),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"wrk failed ({run.returncode}): {run.stderr.strip()}")
    out = run.stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    result: dict[str, object] = json.loads(line.removeprefix("WRK_JSON "))
    result["qps"] = int(result["requests"]) / float(result["seconds"])  # type: ignore[call-overload]
    ok = sum(n for s, n in result["statuses"].items() if s.startswith("2"))  # type: ignore[attr-defined]
    result["non_2xx"] = int(result["requests"]) - ok  # type: ignore[call-overload]
    return result


def png_bytes(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((size, size * 3 // 4)).save(out, "PNG")
    return out.getvalue()


def multipart(fields: dict[str, str], file: bytes | None) -> str:
    """A multipart/form-data body as text (latin-1 keeps the PNG bytes one char per byte)."""
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        )
    if file is not None:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head + file.decode("latin-1") + "\r\n")
    return "".join(parts) + f"--{BOUNDARY}--\r\n"


def upload_rate(url: str, count: int, clients: int, first_seed: int) -> dict[str, float]:
    """Upload `count` distinct images one per request, `clients` at a time: items/s."""

    def one(i: int) -> bool:
        files = {"files": (f"u{i}.png", png_bytes(first_seed + i), "image/png")}
        return client.post("/v1/images", files=files).status_code in (200, 201)

    with httpx.Client(base_url=url, timeout=120) as client:
        began = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            ok = sum(pool.map(one, range(count)))
        elapsed = time.monotonic() - began
    return {"items_per_s": ok / elapsed, "ok": ok, "errors": count - ok}


def start_server(
    kind: str, root: Path, args: argparse.Namespace, data_dir: Path
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    if kind == "baseline":
        cmd = [sys.executable, str(root / "bench" / "baseline_server.py"), "--port", str(port),
               "--model", args.model, "--n", str(args.collection), "--device", "cpu"]  # fmt: skip
    else:
        env |= {"XMODAL_LOG_LEVEL": "warning", "XMODAL_BATCH__MAX_QUEUE": "1024"}
        cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
               str(data_dir), "--model", args.model, "--pretrained", "none"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return url, proc


def measure(kind: str, root: Path, args: argparse.Namespace) -> dict[str, dict[str, object]]:
    tmp = Path(tempfile.mkdtemp(prefix="xmodal-wrk-"))
    url, proc = start_server(kind, root, args, tmp / "data")
    text_bodies = [json.dumps({"query": q, "k": 10}) for q in queries(args.queries, seed=7)]
    out: dict[str, dict[str, object]] = {}
    try:
        if kind != "baseline":
            seed_collection(url, args.collection)
        # Warm every path once (first requests pay one-off costs).
        httpx.post(f"{url}/v1/search/text", json={"query": "warm up", "k": 10}, timeout=120)
        for c in args.connections:
            out[f"text c{c}"] = run_wrk(
                f"{url}/v1/search/text", text_bodies, "application/json", c, args.seconds, tmp
            )
        if kind == "baseline":
            return out
        ids = [
            item["id"]
            for item in httpx.get(f"{url}/v1/images", params={"limit": 200}).json()["items"]
        ]
        by_id = [urllib.parse.urlencode({"image_id": i, "k": 10}) for i in ids]
        by_file = [multipart({"k": "10"}, png_bytes(10_000 + i)) for i in range(50)]
        c = args.connections[0]
        out[f"image by id c{c}"] = run_wrk(
            f"{url}/v1/search/image", by_id, "application/x-www-form-urlencoded", c,
            args.seconds, tmp,
        )  # fmt: skip
        out[f"image by file c{c}"] = run_wrk(
            f"{url}/v1/search/image", by_file, f"multipart/form-data; boundary={BOUNDARY}", c,
            args.seconds, tmp,
        )  # fmt: skip
        out[f"upload c{args.upload_clients}"] = dict(
            upload_rate(url, args.uploads, args.upload_clients, first_seed=100_000)
        )
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--queries", type=int, default=3000, help="distinct text queries")
    parser.add_argument("--collection", type=int, default=200, help="images indexed first")
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--upload-clients", type=int, default=8)
    parser.add_argument("--before", type=Path, help="an older xmodal checkout to run too")
    parser.add_argument("--only", nargs="+", choices=["baseline", "xmodal", "before"])
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt install wrk)")
    systems = {"baseline": ROOT, "xmodal": ROOT}
    if args.before:
        systems["before"] = args.before.resolve()
    results = {
        name: measure("baseline" if name == "baseline" else "xmodal", root, args)
        for name, root in systems.items()
        if not args.only or name in args.only
    }
    print(json.dumps({"model": args.model, "results": results}, indent=2))
    base = {k: r["qps"] for k, r in results.get("baseline", {}).items()}
    print(f"\n{'system':<9} {'workload':<18} {'QPS':>8} {'p50':>7} {'p90':>7} {'p99':>7} "
          f"{'non-2xx':>8} {'x plain':>7}")  # fmt: skip
    for name, rows in results.items():
        for workload, r in rows.items():
            if "qps" not in r:
                print(f"{name:<9} {workload:<18} {r['items_per_s']:>8.1f} items/s, "
                      f"{r['errors']} errors")  # fmt: skip
                continue
            ratio = f"{r['qps'] / base[workload]:.1f}" if workload in base else "-"  # type: ignore[operator]
            print(f"{name:<9} {workload:<18} {r['qps']:>8.1f} {r['p50_ms']:>7.1f} "
                  f"{r['p90_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['non_2xx']:>8} {ratio:>7}")  # fmt: skip
            if r["non_2xx"]:
                print(f"{'':<28} statuses {r['statuses']}")


if __name__ == "__main__":
    main()
