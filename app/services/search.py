"""Search in every direction, with optional re-ranking by CoCa's decoder. Knows nothing of HTTP."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from anyio import to_thread

from app.errors import InvalidField, NotFound, RerankUnavailable
from app.runtime import Library, Runtime
from app.services.library import UploadSource, normalise_text, prepare_image
from app.services.model_calls import RerankJob
from index.filters import FilterError
from index.manager import IndexedCollection, SearchHit
from index.store import Kind, StoredItem
from models.inputs.decode import decode_image


@dataclass
class Hit:
    item: StoredItem
    score: float
    rerank_score: float | None = None


@dataclass
class SearchOutcome:
    hits: list[Hit]
    took_ms: float


def _check_k(library: Library, k: int, rerank: bool, rerank_k: int | None) -> int:
    limits = library.settings.limits
    if not 1 <= k <= limits.max_k:
        raise InvalidField(f"k must be between 1 and {limits.max_k}")
    if rerank and rerank_k is not None and not 1 <= rerank_k <= limits.max_rerank_k:
        raise InvalidField(f"rerank_k must be between 1 and {limits.max_rerank_k}")
    return k


def _search(
    library: Library, collection: IndexedCollection, vector: np.ndarray, k: int, filter_: Any
) -> list[tuple[StoredItem, float]]:
    try:
        hits: list[SearchHit] = collection.search(vector[None, :], k, filter_=filter_)[0]
    except FilterError as exc:
        raise InvalidField(f"filter: {exc}") from None
    kind: Kind = collection.item_kind
    items = library.store.get_many(kind, [h.id for h in hits])
    # An id deleted between the search and this read simply drops out.
    return [(items[h.id], h.score) for h in hits if h.id in items]


def _load_pixels(library: Library, items: list[StoredItem]) -> list[torch.Tensor]:
    encoder = library.encoder
    pixels = []
    for item in items:
        decoded = decode_image(
            library.media.path_of(item.media_path or ""),
            max_pixels=1 << 62,  # stored images passed the limit when they were uploaded
            draft_px=encoder.image_size,
        )
        pixels.append(encoder.preprocess_image(decoded.image))
    return pixels


def _rerank_budget(library: Library, k: int, rerank_k: int | None) -> int:
    limit = library.settings.limits.max_rerank_k
    return max(k, min(rerank_k or max(16, k), limit))


async def _query_image_vector(
    runtime: Runtime, library: Library, source: UploadSource | None, image_id: int | None
) -> tuple[np.ndarray, torch.Tensor | None, StoredItem | None]:
    """The query image's vector, plus its pixels (for re-ranking) when cheap to have."""
    if (source is None) == (image_id is None):
        raise InvalidField("send exactly one of: an image file, or image_id")
    if image_id is not None:
        item = await to_thread.run_sync(library.store.get, "image", image_id)
        vector = await to_thread.run_sync(library.store.embedding, "image", image_id)
        if item is None or vector is None:
            raise NotFound(f"no image with id {image_id}")
        return vector, None, item
    assert source is not None
    try:
        prepared = await to_thread.run_sync(prepare_image, library, source)
    finally:
        source.path.unlink(missing_ok=True)
    assert runtime.image_batcher is not None
    vector = await runtime.image_batcher.submit(prepared.pixels)
    return vector, prepared.pixels, None


def _require_reranker(runtime: Runtime) -> None:
    if runtime.rerank_batcher is None:
        raise RerankUnavailable(
            "the loaded model has no caption decoder to re-rank with (re-ranking needs a CoCa: "
            "--model coca_ViT-B-32 --pretrained laion2b_s13b_b90k, or a checkpoint from "
            "`xmodal train`); or search without rerank"
        )


async def _rerank(runtime: Runtime, hits: list[Hit], job: RerankJob) -> None:
    """Score each hit's pair with the decoder (through its batcher) and sort by it."""
    assert runtime.rerank_batcher is not None
    probs = await runtime.rerank_batcher.submit(job)
    for hit, prob in zip(hits, probs, strict=True):
        hit.rerank_score = float(prob)
    hits.sort(key=lambda h: -(h.rerank_score or 0.0))


async def search_by_text(
    runtime: Runtime,
    query: str,
    *,
    k: int,
    filter_: dict[str, Any] | None = None,
    rerank: bool = False,
    rerank_k: int | None = None,
) -> SearchOutcome:
    started = time.perf_counter()
    library = runtime.require()
    query = normalise_text(query, library.settings.limits.max_query_chars, "query")
    _check_k(library, k, rerank, rerank_k)
    if rerank:
        _require_reranker(runtime)
    assert runtime.text_batcher is not None
    vector = await runtime.text_batcher.submit(query)
    depth = _rerank_budget(library, k, rerank_k) if rerank else k
    found = await to_thread.run_sync(_search, library, library.images, vector, depth, filter_)
    hits = [Hit(item, score) for item, score in found]
    if rerank and hits:
        cache = library.encoder.token_cache
        keys: list[Any] = [("image", library.encoder.fingerprint, h.item.id) for h in hits]
        cached = [cache.get(key) for key in keys]
        missing = [h.item for h, c in zip(hits, cached, strict=True) if c is None]
        loaded = iter(await to_thread.run_sync(_load_pixels, library, missing))
        pixels = [next(loaded) if c is None else None for c in cached]
        await _rerank(runtime, hits, RerankJob([query], pixels, keys, cached))
    return SearchOutcome(hits[:k], (time.perf_counter() - started) * 1000)


async def search_by_image(
    runtime: Runtime,
    *,
    source: UploadSource | None,
    image_id: int | None,
    k: int,
    filter_: dict[str, Any] | None = None,
) -> SearchOutcome:
    started = time.perf_counter()
    library = runtime.require()
    _check_k(library, k, False, None)
    vector, _, _ = await _query_image_vector(runtime, library, source, image_id)
    found = await to_thread.run_sync(_search, library, library.images, vector, k, filter_)
    hits = [Hit(item, score) for item, score in found]
    return SearchOutcome(hits, (time.perf_counter() - started) * 1000)


async def search_texts_by_image(
    runtime: Runtime,
    *,
    source: UploadSource | None,
    image_id: int | None,
    k: int,
    filter_: dict[str, Any] | None = None,
    rerank: bool = False,
    rerank_k: int | None = None,
) -> SearchOutcome:
    started = time.perf_counter()
    library = runtime.require()
    _check_k(library, k, rerank, rerank_k)
    if rerank:
        _require_reranker(runtime)
    vector, pixels, item = await _query_image_vector(runtime, library, source, image_id)
    depth = _rerank_budget(library, k, rerank_k) if rerank else k
    found = await to_thread.run_sync(_search, library, library.texts, vector, depth, filter_)
    hits = [Hit(text_item, score) for text_item, score in found]
    if rerank and hits:
        if pixels is None:
            assert item is not None
            pixels = (await to_thread.run_sync(_load_pixels, library, [item]))[0]
        job = RerankJob([h.item.text or "" for h in hits], [pixels])
        await _rerank(runtime, hits, job)
    return SearchOutcome(hits[:k], (time.perf_counter() - started) * 1000)


async def embed_texts(runtime: Runtime, texts: list[str]) -> list[np.ndarray]:
    library = runtime.require()
    limits = library.settings.limits
    cleaned = [
        normalise_text(t, limits.max_query_chars, f"texts[{i}]") for i, t in enumerate(texts)
    ]
    assert runtime.text_batcher is not None
    return await runtime.text_batcher.submit_many(cleaned)


async def embed_images(runtime: Runtime, sources: list[UploadSource]) -> list[np.ndarray]:
    library = runtime.require()
    try:
        prepared = [await to_thread.run_sync(prepare_image, library, s) for s in sources]
    finally:
        for source in sources:
            source.path.unlink(missing_ok=True)
    assert runtime.image_batcher is not None
    return await runtime.image_batcher.submit_many([p.pixels for p in prepared])


async def classify(
    runtime: Runtime, source: UploadSource, labels: list[str], template: str
) -> list[tuple[str, float]]:
    """Zero-shot: softmax over the label prompts' similarities, at the model's temperature."""
    library = runtime.require()
    limits = library.settings.limits
    labels = [normalise_text(label, limits.max_query_chars, "label") for label in labels]
    if not 2 <= len(labels) <= 256:
        raise InvalidField("give between 2 and 256 labels")
    if "{}" not in template:
        raise InvalidField("template must contain {} where the label goes")
    vectors = await embed_images(runtime, [source])
    assert runtime.text_batcher is not None
    label_vectors = await runtime.text_batcher.submit_many([template.format(x) for x in labels])
    logits = np.stack(label_vectors) @ vectors[0]
    model: Any = library.encoder.model
    scale = float(model.logit_scale.exp().item())
    probs = np.exp((logits - logits.max()) * scale)
    probs /= probs.sum()
    order = np.argsort(-probs)
    return [(labels[i], float(probs[i])) for i in order]
