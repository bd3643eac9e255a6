"""Searches racing deletes: once a delete has been answered, no search started afterwards
returns the deleted id, through the real HTTP stack with the row cache on.

Searches run continuously (text and vector, k covering the whole collection, so every live id
is in every answer) while another client deletes items one by one. Times are the event loop's
monotonic clock: a delete's is taken when its 204 has arrived, a search's before it is sent.
With `lagging_index` the FAISS index is kept from catching up with deletes, as a cache that has
not seen them yet: it goes on returning the deleted ids, and only the hydration of hits (the row
cache, then SQLite) keeps them out.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.main import create_app
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings

pytestmark = pytest.mark.anyio

N_IMAGES = 16
N_DELETES = 10


@pytest.mark.parametrize("lagging_index", [False, True])
async def test_no_search_after_a_delete_returns_the_deleted_id(
    encoder: Encoder, tmp_path: Path, lagging_index: bool
) -> None:
    app = create_app(make_settings(tmp_path / "d"), encoder=encoder)
    async with app.router.lifespan_context(app):
        await app.state.runtime.wait_ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            ids = []
            for i in range(N_IMAGES):
                files = {"files": (f"{i}.png", image_bytes(i), "image/png")}
                r = await client.post("/v1/images", files=files)
                assert r.status_code == 201, r.text
                ids.append(r.json()["items"][0]["id"])
            library = app.state.runtime.backend.library
            assert library.store.rows.enabled
            if lagging_index:
                library.images.catch_up = lambda: 0
            searches: list[tuple[float, set[int]]] = []  # (sent at, ids answered)
            deletes: list[tuple[int, float]] = []  # (id, answered at)
            done = asyncio.Event()
            vector = np.random.default_rng(0).standard_normal(encoder.dim).tolist()

            async def search(n: int) -> None:
                while not done.is_set():
                    if n % 2:
                        path, body = "/v1/search/text", {"query": "a photo", "k": N_IMAGES}
                    else:
                        path, body = "/v1/search/vector", {"vector": vector, "k": N_IMAGES}
                    sent = time.monotonic()
                    r = await client.post(path, json=body)
                    assert r.status_code == 200, r.text
                    searches.append((sent, {hit["id"] for hit in r.json()["results"]}))
                    n += 2

            async def delete() -> None:
                try:
                    await asyncio.sleep(0.2)
                    for item_id in ids[:N_DELETES]:
                        r = await client.delete(f"/v1/images/{item_id}")
                        assert r.status_code == 204, r.text
                        deletes.append((item_id, time.monotonic()))
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.2)
                finally:
                    done.set()

            await asyncio.gather(delete(), *(search(n) for n in range(4)))

    assert searches[0][1] == set(ids)  # every live id is in an answer: the check below bites
    late = [
        (item_id, found)
        for item_id, answered in deletes
        for sent, found in searches
        if sent > answered
    ]
    assert len(late) >= 4 * N_DELETES, len(late)  # searches did follow every delete
    leaked = [item_id for item_id, found in late if item_id in found]
    assert leaked == []
    assert searches[-1][1] == set(ids[N_DELETES:])
