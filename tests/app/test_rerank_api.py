"""Re-ranked search through the HTTP API with a CoCa (its caption decoder re-ranks), a plain
CLIP refused with 409, and concurrent requests batched into one decoder pass."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.services.forward_passes import RerankJob, rerank_batch
from models.checkpoint import save_checkpoint
from models.encoder import Encoder
from models.factory import EncoderSpec, load_encoder
from tests.conftest import image_bytes, make_settings, tiny_clip, upload, wait_ready


@pytest.fixture(scope="module")
def reranking_encoder(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    """The tiny CoCa from a checkpoint (its decoder is the re-ranker)."""
    path = tmp_path_factory.mktemp("ckpt") / "coca.pt"
    save_checkpoint(encoder.to_checkpoint(), path)
    loaded = load_encoder(EncoderSpec(checkpoint=path, device="cpu", precision="fp32"))
    assert loaded.has_reranker and loaded.fingerprint == encoder.fingerprint
    return loaded


def test_rerank_orders_by_rerank_score(reranking_encoder: Encoder, tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "d"), encoder=reranking_encoder)
    with TestClient(app) as client:
        wait_ready(client)
        assert client.get("/v1/info").json()["model"]["has_reranker"] is True
        ids = [upload(client, image_bytes(i)).json()["items"][0]["id"] for i in range(12)]
        client.post("/v1/texts", json={"items": [{"text": f"a caption {i}"} for i in range(8)]})

        plain = client.post("/v1/search/text", json={"query": "a red circle", "k": 5}).json()
        assert all(r["rerank_score"] is None for r in plain["results"])
        body = {"query": "a red circle", "k": 5, "rerank": True, "rerank_k": 12}
        reranked = client.post("/v1/search/text", json=body).json()["results"]
        scores = [r["rerank_score"] for r in reranked]
        assert len(reranked) == 5 and all(isinstance(s, float) for s in scores)
        assert scores == sorted(scores, reverse=True)
        # The second search finds every candidate's image tokens in the cache: same scores.
        cache = reranking_encoder.token_cache
        hits_before = cache.hits
        again = client.post("/v1/search/text", json=body).json()["results"]
        assert [r["rerank_score"] for r in again] == pytest.approx(scores, abs=1e-5)
        assert cache.hits >= hits_before + 12
        assert {r["id"] for r in reranked} <= set(ids)

        r = client.post(
            "/v1/search/image-to-text",
            data={"image_id": str(ids[0]), "k": "4", "rerank": "true", "rerank_k": "8"},
        )
        texts = r.json()["results"]
        text_scores = [t["rerank_score"] for t in texts]
        assert len(texts) == 4 and text_scores == sorted(text_scores, reverse=True)

        # min_score cuts on the cosine `score`, after re-ranking, keeping the re-ranked order.
        every = client.post("/v1/search/text", json={**body, "k": 12}).json()["results"]
        floor = sorted(r["score"] for r in every)[6]
        cut = client.post("/v1/search/text", json={**body, "k": 12, "min_score": floor})
        kept = cut.json()["results"]
        assert [r["id"] for r in kept] == [r["id"] for r in every if r["score"] >= floor]
        assert len(kept) == 6

        too_deep = client.post("/v1/search/text", json={**body, "rerank_k": 5000})
        assert too_deep.status_code == 422


def test_rerank_batched_equals_single(reranking_encoder: Encoder) -> None:
    pixels = [
        reranking_encoder.preprocess_image(Image.open(io.BytesIO(image_bytes(i))).convert("RGB"))
        for i in range(5)
    ]
    jobs = [
        RerankJob(["a red circle left of a blue square"], pixels[:4]),
        RerankJob(["one", "two words", "three more words"], [pixels[4]]),
    ]
    together = rerank_batch(reranking_encoder, jobs)
    cached = [reranking_encoder.image_tokens([p]) for p in pixels[:2]]
    entries = [(c.pooled[0], c.tokens[0]) for c in cached]
    # Two of the four images from the cache, the others from pixels: the same scores.
    mixed = RerankJob(
        ["a red circle left of a blue square"], [None, None, *pixels[2:4]], cached=[*entries]
    )
    np.testing.assert_allclose(rerank_batch(reranking_encoder, [mixed])[0], together[0], atol=1e-5)
    alone = [rerank_batch(reranking_encoder, [job])[0] for job in jobs]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert together[0].shape == (4,) and together[1].shape == (3,)


def test_a_plain_clip_cannot_rerank(tmp_path: Path) -> None:
    clip = load_encoder(EncoderSpec(name=tiny_clip(), pretrained="none", device="cpu"))
    assert not clip.has_reranker
    app = create_app(make_settings(tmp_path / "d"), encoder=clip)
    with TestClient(app) as client:
        wait_ready(client)
        upload(client, image_bytes(0))
        r = client.post("/v1/search/text", json={"query": "a", "k": 1, "rerank": True})
        # well formed, but the loaded model cannot do it: a conflict, not a field error
        assert r.status_code == 409 and r.json()["error"]["code"] == "rerank_unavailable"
        assert "coca_ViT-B-32" in r.json()["error"]["message"]
        plain = client.post("/v1/search/text", json={"query": "a", "k": 1})
        assert plain.status_code == 200
