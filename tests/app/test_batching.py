"""Dynamic batching: fewer forward passes than requests, same results as one at a time,
failures reach every request of a batch, a full queue answers 503 at once."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.batching import DynamicBatcher
from app.errors import Overloaded
from app.main import create_app
from app.metrics import SHED
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings

pytestmark = pytest.mark.anyio

QUERIES = [f"query {i} " + "word " * (i % 7) for i in range(24)]


async def _ready_client(app) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    await app.state.runtime.wait_ready()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_concurrent_text_searches_share_forward_passes(
    encoder: Encoder, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "d", batch={"max_batch_size": 16, "max_wait_ms": 50})
    app = create_app(settings, encoder=encoder)
    async with app.router.lifespan_context(app):
        client = await _ready_client(app)
        async with client:
            embed = [
                (await client.post("/v1/embed/text", json={"texts": [q]})).json()["embeddings"][0]
                for q in QUERIES[:4]
            ]
            batcher = app.state.runtime.backend.text_encoder
            before = batcher.batches_run
            responses = await asyncio.gather(
                *(client.post("/v1/embed/text", json={"texts": [q]}) for q in QUERIES)
            )
            passes = batcher.batches_run - before
    assert all(r.status_code == 200 for r in responses)
    assert passes < len(QUERIES), passes
    batched = [r.json()["embeddings"][0] for r in responses[:4]]
    np.testing.assert_allclose(np.array(batched), np.array(embed), atol=1e-5)


async def test_concurrent_image_uploads_share_forward_passes(
    encoder: Encoder, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "d", batch={"max_batch_size": 8, "max_wait_ms": 50})
    app = create_app(settings, encoder=encoder)
    async with app.router.lifespan_context(app):
        client = await _ready_client(app)
        async with client:
            single = (
                await client.post(
                    "/v1/embed/image", files={"files": ("a.png", image_bytes(0), "image/png")}
                )
            ).json()["embeddings"][0]
            batcher = app.state.runtime.backend.image_encoder
            before = batcher.batches_run
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/v1/embed/image", files={"files": ("a.png", image_bytes(i), "image/png")}
                    )
                    for i in range(12)
                )
            )
            passes = batcher.batches_run - before
    assert all(r.status_code == 200 for r in responses)
    assert passes < 12
    np.testing.assert_allclose(responses[0].json()["embeddings"][0], single, atol=1e-5)


async def test_batched_equals_single_for_the_encoder(encoder: Encoder) -> None:
    texts = ["a", "a red circle left of a blue square", "two dogs", "x " * 20]
    together = encoder.encode_texts(texts)
    alone = np.stack([encoder.encode_texts([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


async def test_failed_batch_fails_every_request() -> None:
    calls = 0

    def explode(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        raise ValueError("boom")

    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        "t", explode, max_batch_size=8, max_wait_ms=30, max_queue=16
    )
    batcher.start()
    try:
        results = await asyncio.gather(
            *(batcher.submit(i) for i in range(5)), return_exceptions=True
        )
    finally:
        await batcher.stop()
    assert all(isinstance(r, ValueError) for r in results)
    assert calls == 1


async def test_full_queue_answers_at_once() -> None:
    gate = threading.Event()

    def slow(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        "t", slow, max_batch_size=1, max_wait_ms=0, max_queue=2
    )
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit(0))  # taken by the worker, blocks
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]  # fill the queue
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(3)
        assert time.monotonic() - started < 0.1
        assert refused.value.retry_after_s
        gate.set()
        assert await first == 0 and [await w for w in waiting] == [1, 2]
    finally:
        gate.set()
        await batcher.stop()


async def test_a_query_that_would_miss_its_deadline_is_refused_not_computed() -> None:
    gate = threading.Event()
    seen: list[int] = []

    def slow(items: list[int]) -> list[int]:
        gate.wait(5)
        time.sleep(0.05)  # the batch duration the batcher learns
        seen.extend(items)
        return items

    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        "t", slow, max_batch_size=1, max_wait_ms=0, max_queue=64
    )
    batcher.start()
    try:
        gate.set()
        assert await batcher.submit(0, deadline_s=0.1) == 0  # in time; teaches the duration
        gate.clear()
        held = asyncio.ensure_future(batcher.submit(1))  # the worker takes it and waits
        while batcher.depth:
            await asyncio.sleep(0.01)
        late = asyncio.ensure_future(batcher.submit(2, deadline_s=0.1))
        patient = asyncio.ensure_future(batcher.submit(3))  # no deadline: waits its turn
        roomy = asyncio.ensure_future(batcher.submit(4, deadline_s=10))
        shed_before = SHED.labels("t")._value.get()
        await asyncio.sleep(0.2)  # item 2 has now waited past its deadline
        gate.set()
        assert await held == 1
        with pytest.raises(Overloaded) as refused:
            await late
        assert refused.value.retry_after_s and "in time" in str(refused.value)
        assert await patient == 3 and await roomy == 4
    finally:
        gate.set()
        await batcher.stop()
    assert 2 not in seen and seen[-2:] == [3, 4]  # refused items cost no forward pass
    assert SHED.labels("t")._value.get() == shed_before + 1


async def test_a_model_slower_than_the_deadline_still_answers_an_idle_queue() -> None:
    gate = threading.Event()
    gate.set()

    def very_slow(items: list[int]) -> list[int]:
        gate.wait(5)
        time.sleep(0.15)
        return items

    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        "t", very_slow, max_batch_size=1, max_wait_ms=0, max_queue=64
    )
    batcher.start()
    try:
        # Each waits less than a batch before its own runs: the deadline is missed by the
        # model, not by queueing, and refusing would only turn every query away.
        for i in range(3):
            assert await batcher.submit(i, deadline_s=0.01) == i
        # One that queues behind a batch held for longer than a batch takes is refused.
        gate.clear()
        held = asyncio.ensure_future(batcher.submit(3))
        while batcher.depth:
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(batcher.submit(4, deadline_s=0.01))
        await asyncio.sleep(0.4)
        gate.set()
        assert await held == 3
        with pytest.raises(Overloaded):
            await queued
    finally:
        gate.set()
        await batcher.stop()


async def test_http_text_search_past_its_deadline_is_503(encoder: Encoder, tmp_path: Path) -> None:
    batch = {"max_batch_size": 1, "max_wait_ms": 0, "query_deadline_ms": 100}
    settings = make_settings(tmp_path / "d", batch=batch, cache={"query_vectors": 0})
    app = create_app(settings, encoder=encoder)
    async with app.router.lifespan_context(app):
        client = await _ready_client(app)
        await app.state.runtime.wait_warmed_up()  # the full-size warm-up batches are done
        gate = threading.Event()
        batcher = app.state.runtime.backend.text_encoder
        real = batcher._fn
        batcher._fn = lambda items: (gate.wait(5), real(items))[1]

        async def timed(i: int) -> tuple[httpx.Response, float]:
            response = await client.post("/v1/search/text", json={"query": f"q{i}", "k": 1})
            return response, time.monotonic() - started

        async with client:
            started = time.monotonic()
            pending = [asyncio.ensure_future(timed(i)) for i in range(4)]
            await asyncio.sleep(0.5)  # the first holds the worker; the rest pass 100 ms
            gate.set()
            answered = await asyncio.gather(*pending)
            after = await client.post("/v1/search/text", json={"query": "later", "k": 1})
            embed = await client.post("/v1/embed/text", json={"texts": ["no deadline"]})
    codes = sorted(r.status_code for r, _ in answered)
    assert codes == [200, 503, 503, 503]  # the one running is answered
    for response, seconds in answered:
        if response.status_code == 503:  # at their deadline, not when the worker got free
            assert seconds < 0.5
            assert response.headers["retry-after"]
            assert response.json()["error"]["code"] == "overloaded"
    assert after.status_code == 200 and embed.status_code == 200


async def test_cancelled_requests_are_skipped() -> None:
    seen: list[list[int]] = []
    gate = threading.Event()

    def record(items: list[int]) -> list[int]:
        gate.wait(5)
        seen.append(list(items))
        return items

    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        "t", record, max_batch_size=1, max_wait_ms=0, max_queue=8
    )
    batcher.start()
    try:
        blocker = asyncio.ensure_future(batcher.submit(0))
        while batcher.depth:  # until the worker holds the blocker
            await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        while batcher.depth < 2:
            await asyncio.sleep(0.01)
        gone.cancel()  # the client went away while queued
        with pytest.raises(asyncio.CancelledError):
            await gone
        gate.set()
        assert await blocker == 0 and await kept == 2
    finally:
        await batcher.stop()
    assert [1] not in seen


async def test_http_overload_is_503_with_retry_after(encoder: Encoder, tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path / "d", batch={"max_batch_size": 1, "max_wait_ms": 0, "max_queue": 1}
    )
    app = create_app(settings, encoder=encoder)
    async with app.router.lifespan_context(app):
        client = await _ready_client(app)
        gate = threading.Event()
        batcher = app.state.runtime.backend.text_encoder
        real = batcher._fn
        batcher._fn = lambda items: (gate.wait(5), real(items))[1]
        async with client:
            pending = [
                asyncio.ensure_future(client.post("/v1/embed/text", json={"texts": [f"q{i}"]}))
                for i in range(6)
            ]
            await asyncio.sleep(0.3)
            gate.set()
            responses = await asyncio.gather(*pending)
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "overloaded"
