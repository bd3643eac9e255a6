"""The query-vector cache: a repeated query skips the model, the answer is the model's own,
another model never gets a cached vector, cached vectors cannot be written, identical queries in
flight share one encode, and the counts reach /metrics."""

from __future__ import annotations

import asyncio
import threading
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.batching import DynamicBatcher
from app.main import create_app
from app.query_cache import QueryCache
from app.services import forward_passes
from app.services.query_vectors import QueryEncoder
from models.encoder import Encoder
from models.factory import EncoderSpec, load_encoder
from tests.conftest import image_bytes, make_settings, tiny_clip

pytestmark = pytest.mark.anyio


class Recorder:
    """Wraps a batcher's batch function: records every text the model was given, and can hold
    batches until released."""

    def __init__(self, batcher: Any) -> None:
        self.real = batcher._fn
        self.seen: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        batcher._fn = self

    def __call__(self, items: list[str]) -> Any:
        self.gate.wait(30)
        self.seen.extend(items)
        return self.real(items)


async def _client(app: Any) -> httpx.AsyncClient:
    await app.state.runtime.wait_ready()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


async def _upload(client: httpx.AsyncClient, n: int) -> None:
    for i in range(n):
        files = {"files": (f"{i}.png", image_bytes(i), "image/png")}
        assert (await client.post("/v1/images", files=files)).status_code == 201


async def test_a_repeated_query_skips_the_model(encoder: Encoder, tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "d"), encoder=encoder)
    async with app.router.lifespan_context(app):
        client = await _client(app)
        async with client:
            await _upload(client, 3)
            await app.state.runtime.wait_warmed_up()  # its batch would count as encodes
            seen = Recorder(app.state.runtime.backend.text_encoder).seen
            before = (await client.get("/metrics")).text
            body = {"query": "a red kite", "k": 3}
            first = await client.post("/v1/search/text", json=body)
            # stripped as the encoder gets it: the same entry
            again = await client.post("/v1/search/text", json={**body, "query": " a red kite\n"})
            embedded = await client.post("/v1/embed/text", json={"texts": ["a red kite"]})
            after = (await client.get("/metrics")).text
    assert first.status_code == again.status_code == embedded.status_code == 200
    assert seen == ["a red kite"]
    assert first.json()["results"] == again.json()["results"]
    direct = encoder.encode_texts(["a red kite"])[0]
    np.testing.assert_allclose(embedded.json()["embeddings"][0], direct, atol=1e-5)
    hits = "xmodal_query_cache_hits_total"
    misses = "xmodal_query_cache_misses_total"
    assert _metric(after, hits) - _metric(before, hits) == 2
    assert _metric(after, misses) - _metric(before, misses) == 1
    assert _metric(after, "xmodal_query_cache_entries") >= 1
    # The two searches read the same hits: SQLite for the first, memory for the second.
    assert _metric(after, "xmodal_row_cache_hits_total") - _metric(
        before, "xmodal_row_cache_hits_total"
    ) == len(first.json()["results"])
    assert _metric(after, "xmodal_row_cache_entries") >= len(first.json()["results"])


async def test_size_zero_disables_the_cache(encoder: Encoder, tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "d", cache={"query_vectors": 0}), encoder=encoder)
    async with app.router.lifespan_context(app):
        client = await _client(app)
        async with client:
            await app.state.runtime.wait_warmed_up()  # its batch would count as encodes
            seen = Recorder(app.state.runtime.backend.text_encoder).seen
            for _ in range(2):
                r = await client.post("/v1/embed/text", json={"texts": ["a red kite"]})
                assert r.status_code == 200
    assert seen == ["a red kite", "a red kite"]


async def test_the_least_recently_used_entry_goes_first(encoder: Encoder, tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "d", cache={"query_vectors": 2}), encoder=encoder)
    async with app.router.lifespan_context(app):
        client = await _client(app)
        async with client:
            await app.state.runtime.wait_warmed_up()  # its batch would count as encodes
            seen = Recorder(app.state.runtime.backend.text_encoder).seen
            for text in ["a", "b", "a", "c", "a", "b"]:  # "c" evicts "b", the older one
                r = await client.post("/v1/embed/text", json={"texts": [text]})
                assert r.status_code == 200
            size = len(app.state.runtime.backend.queries.cache)
    assert seen == ["a", "b", "c", "b"]
    assert size == 2


async def test_identical_queries_in_flight_share_one_encode(
    encoder: Encoder, tmp_path: Path
) -> None:
    app = create_app(make_settings(tmp_path / "d"), encoder=encoder)
    async with app.router.lifespan_context(app):
        client = await _client(app)
        async with client:
            await _upload(client, 2)
            await app.state.runtime.wait_warmed_up()
            recorder = Recorder(app.state.runtime.backend.text_encoder)
            recorder.gate.clear()  # every request arrives while the first encode is held
            body = {"query": "one popular query", "k": 2}
            pending = [asyncio.ensure_future(client.post("/v1/search/text", json=body))]
            pending += [
                asyncio.ensure_future(client.post("/v1/embed/text", json={"texts": [q, "x"]}))
                for q in ["one popular query"] * 3
            ]
            pending += [
                asyncio.ensure_future(client.post("/v1/search/text", json=body)) for _ in range(8)
            ]
            await asyncio.sleep(0.3)
            recorder.gate.set()
            responses = await asyncio.gather(*pending)
    assert all(r.status_code == 200 for r in responses)
    assert sorted(recorder.seen) == ["one popular query", "x"]
    searched = [r.json()["results"] for r in responses if "results" in r.json()]
    assert len(searched) == 9 and all(s == searched[0] for s in searched)


async def test_waiters_encode_again_when_the_first_client_goes(
    encoder: Encoder, tmp_path: Path
) -> None:
    app = create_app(make_settings(tmp_path / "d"), encoder=encoder)
    async with app.router.lifespan_context(app):
        await app.state.runtime.wait_warmed_up()
        queries: QueryEncoder = app.state.runtime.backend.queries
        recorder = Recorder(app.state.runtime.backend.text_encoder)
        recorder.gate.clear()
        blocker = asyncio.ensure_future(queries.encode("blocker"))  # holds the model
        await asyncio.sleep(0.1)
        gone = asyncio.ensure_future(queries.encode("shared"))
        await asyncio.sleep(0.05)
        waiter = asyncio.ensure_future(queries.encode("shared"))
        await asyncio.sleep(0.05)
        gone.cancel()  # its client disconnected: its queued item is skipped
        await asyncio.sleep(0.05)
        recorder.gate.set()
        vector = await asyncio.wait_for(waiter, 30)
        await blocker
    assert gone.cancelled()
    np.testing.assert_allclose(vector, encoder.encode_texts(["shared"])[0], atol=1e-5)
    assert recorder.seen.count("shared") == 1


async def test_cached_vectors_cannot_be_written(encoder: Encoder, tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "d"), encoder=encoder)
    async with app.router.lifespan_context(app):
        await app.state.runtime.wait_warmed_up()
        queries: QueryEncoder = app.state.runtime.backend.queries
        first = await queries.encode("a red kite")
        with pytest.raises(ValueError, match="read-only"):
            first[0] = 42.0
        again = await queries.encode("a red kite")
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(again, encoder.encode_texts(["a red kite"])[0], atol=1e-5)


async def test_another_model_never_gets_a_cached_vector(encoder: Encoder) -> None:
    """Two encoders of different weights behind one shared cache: each text's vector is the
    asking model's own, though the other model cached the same text first."""
    clip = load_encoder(EncoderSpec(name=tiny_clip(), pretrained="none", device="cpu"))
    assert clip.fingerprint != encoder.fingerprint
    cache = QueryCache(16)
    options: dict[str, Any] = {"max_batch_size": 4, "max_wait_ms": 1, "max_queue": 8}
    batchers = [
        DynamicBatcher("t", partial(forward_passes.encode_texts_batch, e), **options)
        for e in (encoder, clip)
    ]
    for batcher in batchers:
        batcher.start()
    try:
        mine = QueryEncoder(batchers[0], cache, encoder.fingerprint)
        theirs = QueryEncoder(batchers[1], cache, clip.fingerprint)
        a = await mine.encode("a red kite")
        b = await theirs.encode("a red kite")
        a_again, b_again = await mine.encode("a red kite"), await theirs.encode("a red kite")
    finally:
        for batcher in batchers:
            await batcher.stop()
    assert len(cache) == 2 and cache.hits == 2
    np.testing.assert_allclose(a, encoder.encode_texts(["a red kite"])[0], atol=1e-5)
    np.testing.assert_allclose(b, clip.encode_texts(["a red kite"])[0], atol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)
    np.testing.assert_array_equal(a_again, a)
    np.testing.assert_array_equal(b_again, b)


def test_the_cache_holds_under_threads() -> None:
    cache = QueryCache(64)
    vectors = {f"t{i}": np.full(8, i, np.float32) for i in range(200)}
    wrong: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(3000):
            text = f"t{int(rng.integers(200))}"
            found = cache.get("m", text)
            if found is None:
                cache.put("m", text, vectors[text])
            elif not np.array_equal(found, vectors[text]):
                wrong.append(text)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    assert len(cache) == 64
    assert cache.hits + cache.misses == 4 * 3000 and cache.hits > 0
