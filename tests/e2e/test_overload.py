"""Overload on a real uvicorn server: a full queue answers 503 at once, a burst keeps memory
bounded, and requests whose client disconnected never reach the model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from models.encoder import Encoder
from tests.conftest import make_settings
from tests.e2e.server import InProcessServer


class GatedModel:
    """Wraps a batcher's batch function: holds batches until released, records what ran."""

    def __init__(self, batcher: Any) -> None:
        self.batcher = batcher
        self.real = batcher._fn
        self.gate = threading.Event()
        self.seen: list[str] = []
        batcher._fn = self

    def __call__(self, items: list[str]) -> Any:
        self.gate.wait(30)
        self.seen.extend(items)
        return self.real(items)


@pytest.fixture
def served(encoder: Encoder, tmp_path: Path) -> Iterator[InProcessServer]:
    settings = make_settings(
        tmp_path / "d",
        batch={"max_batch_size": 4, "max_wait_ms": 1, "max_queue": 16, "request_timeout_s": 20},
    )
    with InProcessServer(create_app(settings, encoder=encoder)) as server:
        # The warm-up batches that follow readiness go through the batchers: a test that holds
        # the model must not catch one of them (its requests would then all wait, and miss
        # their deadline, behind a batch that is not theirs).
        runtime = server.app.state.runtime
        deadline = time.monotonic() + 60
        while not runtime.warmed_up and time.monotonic() < deadline:
            time.sleep(0.02)
        yield server


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_disconnected_clients_are_skipped(served: InProcessServer) -> None:
    runtime = served.app.state.runtime
    gated = GatedModel(runtime.backend.text_encoder)
    batches = 'xmodal_batch_size_count{batcher="text_encode"}'
    batches_before = _metric(served.url, batches)  # the registry is shared by the process
    blocker = threading.Thread(
        target=lambda: httpx.post(
            f"{served.url}/v1/embed/text", json={"texts": ["blocker"]}, timeout=30
        )
    )
    blocker.start()
    deadline = time.monotonic() + 10
    # wait until the blocker's request has reached the server and been taken by the worker
    while time.monotonic() < deadline:
        if _metric(served.url, batches) > batches_before:
            break
        time.sleep(0.05)
    for i in range(5):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{served.url}/v1/embed/text", json={"texts": [f"gone {i}"]}, timeout=0.3)
    time.sleep(0.5)  # let the server notice the disconnects
    gated.gate.set()
    blocker.join(30)
    r = httpx.post(f"{served.url}/v1/embed/text", json={"texts": ["after"]}, timeout=30)
    assert r.status_code == 200
    assert "blocker" in gated.seen and "after" in gated.seen
    assert not [t for t in gated.seen if t.startswith("gone")], gated.seen


@pytest.mark.slow
def test_burst_of_500_is_answered_and_memory_stays_bounded(served: InProcessServer) -> None:
    runtime = served.app.state.runtime
    gated = GatedModel(runtime.backend.text_encoder)
    before = _rss_bytes()

    async def burst() -> list[tuple[int, float, str | None]]:
        limits = httpx.Limits(max_connections=600, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=60) as client:

            async def one(i: int) -> tuple[int, float, str | None]:
                started = time.monotonic()
                r = await client.post("/v1/search/text", json={"query": f"burst {i}", "k": 3})
                return r.status_code, time.monotonic() - started, r.headers.get("retry-after")

            tasks = [asyncio.ensure_future(one(i)) for i in range(500)]
            # The model is held: beyond the queue (16) and one batch (4), every request must be
            # refused without waiting for the model.
            deadline = time.monotonic() + 60
            while sum(t.done() for t in tasks) < 500 - 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            answered_while_held = sum(t.done() for t in tasks)
            gated.gate.set()
            results = await asyncio.gather(*tasks)
            assert answered_while_held >= 480, answered_while_held
            return results

    results = asyncio.run(burst())
    grown = _rss_bytes() - before
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 503}, set(codes)
    assert codes.count(503) >= 400 and codes.count(200) >= 1
    assert all(retry for code, _, retry in results if code == 503)
    assert grown < 300 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert len(gated.seen) <= 16 + 4  # only what fitted in the queue (plus one batch) ran


@pytest.mark.slow
def test_client_retries_503_honouring_retry_after(encoder: Encoder, tmp_path: Path) -> None:
    from app.client import XmodalClient

    settings = make_settings(
        tmp_path / "d", batch={"max_batch_size": 1, "max_wait_ms": 0, "max_queue": 1}
    )
    with InProcessServer(create_app(settings, encoder=encoder)) as server:
        gated = GatedModel(server.app.state.runtime.backend.text_encoder)
        holders = [
            threading.Thread(
                target=lambda i=i: httpx.post(
                    f"{server.url}/v1/embed/text", json={"texts": [f"hold {i}"]}, timeout=30
                )
            )
            for i in range(2)
        ]
        for thread in holders:  # one in the model, one filling the queue
            thread.start()
            time.sleep(0.3)
        threading.Timer(1.5, gated.gate.set).start()
        refused = httpx.post(f"{server.url}/v1/search/text", json={"query": "now"}, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        started = time.monotonic()
        with XmodalClient(server.url, retries=5) as client:
            hits = client.search_text("a query that waits its turn", k=3)
        assert hits == [] and time.monotonic() - started >= 0.9  # it waited, then succeeded
        for thread in holders:
            thread.join(30)
