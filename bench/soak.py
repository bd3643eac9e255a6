"""Soak: mixed traffic at a steady rate for a long time; does anything grow or start failing?

Starts `xmodal serve` with the tiny model (random weights) on a fresh data dir, then sends
uploads, deletes, text adds, every search direction, listings and ~5% deliberately bad requests
at `--rate` requests per second for `--minutes`. Uploads and deletes balance around
`--collection` items, so a growing server is a leak, not a growing collection. Every minute it
records the server's RSS, open file descriptors and threads (from /proc) and p99 latency per
endpoint, and prints one table row (also written to `--out` as JSON lines). A request fails when
a good request is not 2xx, a bad one is not 4xx, or anything is 5xx or a transport error.
    python bench/soak.py --minutes 30 --rate 10 --out soak.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import ROOT, WORDS, free_port


def image_png(rng: random.Random) -> bytes:
    small = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((64, 48)).save(out, "PNG")
    return out.getvalue()


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


class Soak:
    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url = url
        self.args = args
        self.rng = random.Random(args.seed)
        self.images: list[int] = []
        self.texts: list[int] = []
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.failures: dict[str, int] = defaultdict(int)
        self.requests = 0
        self.bad_requests = 0

    def query(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(2, 7)))

    async def timed(
        self,
        name: str,
        call: Callable[[], Awaitable[httpx.Response]],
        expect: Callable[[int], bool],
    ) -> httpx.Response | None:
        started = time.perf_counter()
        self.requests += 1
        try:
            response = await call()
        except httpx.HTTPError as exc:
            self.failures[name] += 1
            print(f"  transport error on {name}: {exc!r}", file=sys.stderr)
            return None
        self.latencies[name].append(time.perf_counter() - started)
        if not expect(response.status_code):
            self.failures[name] += 1
            print(
                f"  {name}: unexpected {response.status_code} {response.text[:200]}",
                file=sys.stderr,
            )
        return response

    async def one(self, client: httpx.AsyncClient) -> None:
        ok = lambda s: 200 <= s < 300  # noqa: E731
        bad = lambda s: 400 <= s < 500  # noqa: E731
        if self.rng.random() < self.args.bad_fraction:
            self.bad_requests += 1
            await self.bad(client, bad)
            return
        roll = self.rng.random()
        target = self.args.collection
        if roll < 0.15:
            if len(self.images) >= target and self.images:
                victim = self.images.pop(self.rng.randrange(len(self.images)))
                await self.timed(
                    "DELETE /images/{id}", lambda: client.delete(f"/v1/images/{victim}"), ok
                )
            else:
                files = {"files": ("soak.png", image_png(self.rng), "image/png")}
                meta = json.dumps({"year": self.rng.randint(2000, 2025), "soak": True})
                r = await self.timed(
                    "POST /images",
                    lambda: client.post("/v1/images", files=files, data={"metadata": meta}),
                    ok,
                )
                if r is not None and r.status_code == 201:
                    self.images += [item["id"] for item in r.json()["items"]]
        elif roll < 0.25:
            if len(self.texts) >= target and self.texts:
                victim = self.texts.pop(self.rng.randrange(len(self.texts)))
                await self.timed(
                    "DELETE /texts/{id}", lambda: client.delete(f"/v1/texts/{victim}"), ok
                )
            else:
                body = {"items": [{"text": self.query() + f" {self.rng.random()}"}]}
                r = await self.timed("POST /texts", lambda: client.post("/v1/texts", json=body), ok)
                if r is not None and r.status_code == 201:
                    self.texts += [item["id"] for item in r.json()["items"]]
        elif roll < 0.60:
            body = {"query": self.query(), "k": 10}
            if self.rng.random() < 0.3:
                body["filter"] = {"year": {"$gte": 2010}}
            await self.timed(
                "POST /search/text", lambda: client.post("/v1/search/text", json=body), ok
            )
        elif roll < 0.75:
            if self.images and self.rng.random() < 0.5:
                data = {"image_id": str(self.rng.choice(self.images)), "k": "10"}
                # a concurrent delete may remove it first: 404 is then the right answer
                await self.timed(
                    "POST /search/image",
                    lambda: client.post("/v1/search/image", data=data),
                    lambda s: ok(s) or s == 404,
                )
            else:
                files = {"file": ("q.png", image_png(self.rng), "image/png")}
                await self.timed(
                    "POST /search/image", lambda: client.post("/v1/search/image", files=files), ok
                )
        elif roll < 0.90:
            files = {"file": ("q.png", image_png(self.rng), "image/png")}
            await self.timed(
                "POST /search/image-to-text",
                lambda: client.post("/v1/search/image-to-text", files=files, data={"k": "5"}),
                ok,
            )
        else:
            kind = self.rng.choice(["images", "texts"])
            await self.timed(
                f"GET /{kind}", lambda: client.get(f"/v1/{kind}", params={"limit": 20}), ok
            )

    async def bad(self, client: httpx.AsyncClient, bad: Callable[[int], bool]) -> None:
        choice = self.rng.randrange(7)
        if choice == 0:
            call = lambda: client.post("/v1/search/text", json={"query": ""})  # noqa: E731
        elif choice == 1:
            files = {"files": ("x.png", b"not an image at all", "image/png")}
            call = lambda: client.post("/v1/images", files=files)  # noqa: E731
        elif choice == 2:
            call = lambda: client.get(f"/v1/images/{2**64}")  # noqa: E731
        elif choice == 3:
            body = {"query": "x", "filter": {"year": {"$gt": 10**40}}}
            call = lambda: client.post("/v1/search/text", json=body)  # noqa: E731
        elif choice == 4:
            call = lambda: client.delete("/v1/texts/999999999")  # noqa: E731
        elif choice == 5:
            call = lambda: client.post("/v1/search/image", data={"k": "0"})  # noqa: E731
        else:
            call = lambda: client.put("/v1/images")  # noqa: E731
        await self.timed("bad input", call, bad)

    async def run(self) -> list[dict[str, Any]]:
        args = self.args
        rows: list[dict[str, Any]] = []
        interval = 1.0 / args.rate
        limits = httpx.Limits(max_connections=args.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as client:
            inflight: set[asyncio.Task[None]] = set()
            began = time.monotonic()
            next_send = began
            next_report = began + 60
            minute = 0
            end = began + args.minutes * 60
            while time.monotonic() < end:
                now = time.monotonic()
                if now >= next_report:
                    minute += 1
                    rows.append(self.report(minute))
                    next_report += 60
                if now < next_send:
                    await asyncio.sleep(min(next_send - now, 0.05))
                    continue
                next_send += interval
                if len(inflight) >= args.concurrency:
                    # the server is behind: do not pile up (open loop up to `concurrency`)
                    await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.create_task(self.one(client))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            if inflight:
                await asyncio.wait(inflight)
            rows.append(self.report(minute + 1))
        return rows

    def report(self, minute: int) -> dict[str, Any]:
        row: dict[str, Any] = {"minute": minute, **proc_stats(self.args.server_pid)}
        row["p99_ms"] = {
            name: round(float(np.percentile(np.array(v) * 1000, 99)), 1)
            for name, v in sorted(self.latencies.items())
            if v
        }
        row["requests"] = self.requests
        row["bad_sent"] = self.bad_requests
        row["failures"] = sum(self.failures.values())
        row["images"] = len(self.images)
        row["texts"] = len(self.texts)
        self.latencies.clear()
        self.requests = 0
        self.bad_requests = 0
        self.failures.clear()
        if self.args.out:
            with open(self.args.out, "a") as out:
                out.write(json.dumps(row) + "\n")
        p99 = " ".join(f"{k.replace(' ', '')}={v:.0f}" for k, v in row["p99_ms"].items())
        print(
            f"min {minute:>3} rss {row['rss_mib']:7.1f} MiB fds {row['fds']:>4} "
            f"threads {row['threads']:>3} req {row['requests']:>5} fail {row['failures']:>3} "
            f"p99 ms: {p99}",
            flush=True,
        )
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=10, help="requests per second")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    parser.add_argument("--collection", type=int, default=200, help="items of each kind kept")
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append one JSON line per minute here")
    parser.add_argument("--data-dir", type=Path, help="default: a fresh temporary folder")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="xmodal-soak-")) / "data"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XMODAL_LOG_LEVEL": "warning"}
    cmd = [
        sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data_dir), "--model", "xmodal-tiny", "--pretrained", "none",
        "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start (exit {proc.returncode})")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        args.server_pid = proc.pid
        rows = asyncio.run(Soak(url, args).run())
        total = sum(r["failures"] for r in rows)
        print(f"done: {len(rows)} rows, {total} failures, data dir {data_dir}")
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
