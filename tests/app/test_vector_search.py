"""POST /v1/search/vector: a caller's own embedding as the query."""

from __future__ import annotations

import json

import numpy as np
from fastapi.testclient import TestClient

from tests.conftest import image_bytes, upload


def _stored_vectors(client: TestClient, n: int) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for seed in range(n):
        body = upload(client, image_bytes(seed), f"{seed}.png", metadata=json.dumps({"n": seed}))
        item_id = body.json()["items"][0]["id"]
        vector = client.post(
            "/v1/embed/image", files={"files": ("q.png", image_bytes(seed), "image/png")}
        )
        out[item_id] = np.asarray(vector.json()["embeddings"][0], dtype=np.float32)
    return out


def test_vector_search_matches_numpy_and_text_search_shape(client: TestClient) -> None:
    stored = _stored_vectors(client, 6)
    dim = client.get("/v1/info").json()["model"]["dim"]
    query = np.random.default_rng(0).normal(size=dim)
    r = client.post("/v1/search/vector", json={"vector": query.tolist(), "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "took_ms"}
    q = query / np.linalg.norm(query)
    ids = list(stored)
    scores = np.stack([stored[i] for i in ids]) @ q
    expected = [ids[j] for j in np.argsort(-scores)[:4]]
    assert [h["id"] for h in body["results"]] == expected
    hit = body["results"][0]
    assert {"id", "score", "metadata", "url", "thumbnail_url"} <= set(hit)
    # Scaling the query changes nothing: it is normalised like any query.
    scaled = client.post("/v1/search/vector", json={"vector": (query * 37).tolist(), "k": 4})
    assert [h["id"] for h in scaled.json()["results"]] == expected
    # ... down to subnormal and up to near-overflow values, whose plain norm is 0 or inf.
    for factor in (1e-315, 1e300):
        extreme = client.post("/v1/search/vector", json={"vector": (q * factor).tolist(), "k": 4})
        assert extreme.status_code == 200, (factor, extreme.text)
        assert [h["id"] for h in extreme.json()["results"]] == expected


def test_vector_search_filter_and_min_score(client: TestClient) -> None:
    stored = _stored_vectors(client, 6)
    first = next(iter(stored))
    query = stored[first].tolist()
    r = client.post(
        "/v1/search/vector", json={"vector": query, "k": 10, "filter": {"n": {"$gte": 3}}}
    )
    assert r.status_code == 200
    assert all(h["metadata"]["n"] >= 3 for h in r.json()["results"])
    assert len(r.json()["results"]) == 3
    everything = client.post("/v1/search/vector", json={"vector": query, "k": 10}).json()
    cut = sorted(h["score"] for h in everything["results"])[3]
    some = client.post("/v1/search/vector", json={"vector": query, "k": 10, "min_score": cut})
    assert [h["score"] >= cut for h in some.json()["results"]] == [True] * 3
    top = client.post("/v1/search/vector", json={"vector": query, "k": 10, "min_score": 0.999})
    assert [h["id"] for h in top.json()["results"]] == [first]


def test_vector_search_bad_input(client: TestClient) -> None:
    dim = client.get("/v1/info").json()["model"]["dim"]
    good = [0.1] * dim

    def post(body: object) -> tuple[int, str]:
        r = client.post(
            "/v1/search/vector",
            content=json.dumps(body),
            headers={"content-type": "application/json"},
        )
        return r.status_code, r.text

    status, text = post({"vector": [0.1] * (dim + 1)})
    assert status == 422 and "dimensions" in text
    status, text = post({"vector": [float("nan"), *good[1:]]})
    assert status == 422 and "NaN" in text
    status, text = post({"vector": [float("inf"), *good[1:]]})
    assert status == 422
    status, text = post({"vector": [0.0] * dim})
    assert status == 422 and "zero" in text
    assert post({"vector": []})[0] == 422
    assert post({"vector": ["a"] * dim})[0] == 422
    assert post({"k": 3})[0] == 422
    assert post({"vector": good, "min_score": 1.5})[0] == 422
    assert post({"vector": good, "k": 0})[0] == 422
    assert post({"vector": good, "filter": {"a": {"$bogus": 1}}})[0] == 422
    assert post({"vector": good, "extra": 1})[0] == 422


def test_a_repeated_filter_comes_from_memory_and_follows_deletes_and_uploads(
    client: TestClient,
) -> None:
    from tests.app.test_query_cache import _metric

    stored = _stored_vectors(client, 6)
    query = stored[next(iter(stored))].tolist()
    body = {"vector": query, "k": 10, "filter": {"n": {"$gte": 3}}}

    def search() -> list[int]:
        r = client.post("/v1/search/vector", json=body)
        assert r.status_code == 200, r.text
        return sorted(h["id"] for h in r.json()["results"])

    def hits() -> float:
        return _metric(client.get("/metrics").text, "xmodal_filter_cache_hits_total")

    first = search()
    assert len(first) == 3
    before = hits()
    assert search() == first and hits() == before + 1
    assert client.delete(f"/v1/images/{first[0]}").status_code == 204
    assert search() == first[1:]
    added = upload(client, image_bytes(100), "new.png", metadata=json.dumps({"n": 9}))
    new_id = added.json()["items"][0]["id"]
    upload(client, image_bytes(101), "other.png", metadata=json.dumps({"n": 1}))
    assert search() == sorted([*first[1:], new_id])
    assert hits() == before + 3  # each answered from memory, brought up to date
