"""Search in every direction, with optional re-ranking by CoCa's decoder. Knows nothing of HTTP."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from anyio import to_thread

from app.batching import Batcher
from app.errors import InvalidField, NotFound, RerankUnavailable
from app.library import Library
from app.runtime import Backend
from app.services.forward_passes import RerankJob
from app.services.items import NO_FILE, UploadSource, checked_text, prepare_image
from index.collection import IndexedCollection, SearchHit
from index.filters import FilterError, compile_filter
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


def _check_k(library: Library, k: int, rerank: bool, rerank_k: int | None) -> None:
    limits = library.settings.limits
    if not 1 <= k <= limits.max_k:
        raise InvalidField(f"k must be between 1 and {limits.max_k}")
    # checked with or without `rerank`, as the schema states it
    if rerank_k is not None and not 1 <= rerank_k <= limits.max_rerank_k:
        raise InvalidField(f"rerank_k must be between 1 and {limits.max_rerank_k}")


def _check_filter(filter_: dict[str, Any] | None) -> None:
    """Refuse a malformed filter before any work is spent on the query (message names the key)."""
    try:
        compile_filter(filter_)
    except FilterError as exc:
        raise InvalidField(f"filter: {exc}") from None


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
        if item.media_path is None:
            raise InvalidField(f"cannot re-rank: {NO_FILE.format(id=item.id)}")
        decoded = decode_image(
            library.media.path_of(item.media_path or ""),
            max_pixels=1 << 62,  # stored images passed the limit when they were uploaded
            draft_px=encoder.image_size,
        )
        pixels.append(encoder.preprocess_image(decoded.image))
    return pixels


def _cut(hits: list[Hit], k: int, min_score: float | None) -> list[Hit]:
    """The first k hits (in their final order, re-ranked or not) whose cosine `score` reaches
    `min_score`. Re-ranking reorders; the cut-off stays on `score`, which is comparable across
    queries, while `rerank_score` is a probability of another scale."""
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    return hits[:k]


def _rerank_budget(library: Library, k: int, rerank_k: int | None) -> int:
    limit = library.settings.limits.max_rerank_k
    return max(k, min(rerank_k or max(16, k), limit))


async def _query_image_vector(
    backend: Backend, source: UploadSource | None, image_id: int | None
) -> tuple[np.ndarray, torch.Tensor | None, StoredItem | None]:
    """The query image's vector, plus its pixels (for re-ranking) when cheap to have."""
    if (source is None) == (image_id is None):
        raise InvalidField("send exactly one of: an image file, or image_id")
    library = backend.library
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
    vector = await backend.image_encoder.submit(prepared.pixels)
    return vector, prepared.pixels, None


def _reranker(backend: Backend) -> Batcher[RerankJob, np.ndarray]:
    if backend.reranker is None:
        raise RerankUnavailable(
            "the loaded model has no caption decoder to re-rank with (re-ranking needs a CoCa: "
            "--model coca_ViT-B-32 --pretrained laion2b_s13b_b90k, or a checkpoint from "
            "`xmodal train`); or search without rerank"
        )
    return backend.reranker


async def _rerank(
    reranker: Batcher[RerankJob, np.ndarray], hits: list[Hit], job: RerankJob
) -> None:
    """Score each hit's pair with the decoder (through its batcher) and sort by it."""
    probs = await reranker.submit(job)
    for hit, prob in zip(hits, probs, strict=True):
        hit.rerank_score = float(prob)
    hits.sort(key=lambda h: -(h.rerank_score or 0.0))


async def search_by_text(
    backend: Backend,
    query: str,
    *,
    k: int,
    filter_: dict[str, Any] | None = None,
    rerank: bool = False,
    rerank_k: int | None = None,
    min_score: float | None = None,
) -> SearchOutcome:
    started = time.perf_counter()
    library = backend.library
    query = checked_text(query, library.settings.limits.max_query_chars, "query")
    _check_k(library, k, rerank, rerank_k)
    _check_filter(filter_)
    reranker = _reranker(backend) if rerank else None
    deadline_ms = library.settings.batch.query_deadline_ms
    vector = await backend.queries.encode(query, deadline_s=deadline_ms / 1000 or None)
    depth = _rerank_budget(library, k, rerank_k) if rerank else k
    found = await to_thread.run_sync(_search, library, library.images, vector, depth, filter_)
    hits = [Hit(item, score) for item, score in found]
    if reranker is not None and hits:
        cache = library.encoder.token_cache
        keys: list[Any] = [("image", library.encoder.fingerprint, h.item.id) for h in hits]
        cached = [cache.get(key) for key in keys]
        missing = [h.item for h, c in zip(hits, cached, strict=True) if c is None]
        loaded = iter(await to_thread.run_sync(_load_pixels, library, missing))
        pixels = [next(loaded) if c is None else None for c in cached]
        await _rerank(reranker, hits, RerankJob([query], pixels, keys, cached))
    return SearchOutcome(_cut(hits, k, min_score), (time.perf_counter() - started) * 1000)


def query_vector(values: list[float], dim: int) -> np.ndarray:
    """A caller's embedding as a query: the model's dimension, finite, not all zero; normalised
    (scaled by its largest component first, so neither tiny nor huge values lose the direction)."""
    if len(values) != dim:
        raise InvalidField(f"vector has {len(values)} dimensions; the model's is {dim}")
    vector = np.asarray(values, dtype=np.float64)
    if not np.isfinite(vector).all():
        raise InvalidField("vector contains NaN or infinite values")
    largest = float(np.abs(vector).max())
    if largest == 0.0:
        raise InvalidField("vector is all zeros; it has no direction to search in")
    vector /= largest
    return (vector / np.linalg.norm(vector)).astype(np.float32)


async def search_by_vector(
    backend: Backend,
    values: list[float],
    *,
    k: int,
    filter_: dict[str, Any] | None = None,
    min_score: float | None = None,
) -> SearchOutcome:
    """Images nearest to a caller's own embedding: no forward pass."""
    started = time.perf_counter()
    library = backend.library
    _check_k(library, k, False, None)
    vector = query_vector(values, library.encoder.dim)
    found = await to_thread.run_sync(_search, library, library.images, vector, k, filter_)
    hits = [Hit(item, score) for item, score in found if min_score is None or score >= min_score]
    return SearchOutcome(hits, (time.perf_counter() - started) * 1000)


async def search_by_image(
    backend: Backend,
    *,
    source: UploadSource | None,
    image_id: int | None,
    k: int,
    filter_: dict[str, Any] | None = None,
    min_score: float | None = None,
) -> SearchOutcome:
    started = time.perf_counter()
    library = backend.library
    _check_k(library, k, False, None)
    _check_filter(filter_)
    vector, _, _ = await _query_image_vector(backend, source, image_id)
    found = await to_thread.run_sync(_search, library, library.images, vector, k, filter_)
    hits = [Hit(item, score) for item, score in found]
    return SearchOutcome(_cut(hits, k, min_score), (time.perf_counter() - started) * 1000)


async def search_texts_by_image(
    backend: Backend,
    *,
    source: UploadSource | None,
    image_id: int | None,
    k: int,
    filter_: dict[str, Any] | None = None,
    rerank: bool = False,
    rerank_k: int | None = None,
    min_score: float | None = None,
) -> SearchOutcome:
    started = time.perf_counter()
    library = backend.library
    _check_k(library, k, rerank, rerank_k)
    _check_filter(filter_)
    reranker = _reranker(backend) if rerank else None
    vector, pixels, item = await _query_image_vector(backend, source, image_id)
    depth = _rerank_budget(library, k, rerank_k) if rerank else k
    found = await to_thread.run_sync(_search, library, library.texts, vector, depth, filter_)
    hits = [Hit(text_item, score) for text_item, score in found]
    if reranker is not None and hits:
        if pixels is None:
            assert item is not None
            pixels = (await to_thread.run_sync(_load_pixels, library, [item]))[0]
        await _rerank(reranker, hits, RerankJob([h.item.text or "" for h in hits], [pixels]))
    return SearchOutcome(_cut(hits, k, min_score), (time.perf_counter() - started) * 1000)


async def embed_texts(backend: Backend, texts: list[str]) -> list[np.ndarray]:
    limits = backend.settings.limits
    if len(texts) > limits.max_texts_per_request:
        raise InvalidField(f"texts: at most {limits.max_texts_per_request} texts per request")
    cleaned = [checked_text(t, limits.max_query_chars, f"texts[{i}]") for i, t in enumerate(texts)]
    return await backend.queries.encode_many(cleaned)


async def embed_images(backend: Backend, sources: list[UploadSource]) -> list[np.ndarray]:
    try:
        prepared = [await to_thread.run_sync(prepare_image, backend.library, s) for s in sources]
    finally:
        for source in sources:
            source.path.unlink(missing_ok=True)
    return await backend.image_encoder.submit_many([p.pixels for p in prepared])


async def classify(
    backend: Backend, source: UploadSource, labels: list[str], template: str
) -> list[tuple[str, float]]:
    """Zero-shot: softmax over the label prompts' similarities, at the model's temperature."""
    limits = backend.settings.limits
    labels = [checked_text(label, limits.max_query_chars, "label") for label in labels]
    if not 2 <= len(labels) <= 256:
        raise InvalidField("give between 2 and 256 labels")
    if "{}" not in template:
        raise InvalidField("template must contain {} where the label goes")
    vectors = await embed_images(backend, [source])
    # replace, not str.format: any other braces in the template are text, not a format error
    prompts = [template.replace("{}", label) for label in labels]
    # the same labels come back request after request: their prompts are queries too
    label_vectors = await backend.queries.encode_many(prompts)
    logits = np.stack(label_vectors) @ vectors[0]
    model: Any = backend.encoder.model
    scale = float(model.logit_scale.exp().item())
    probs = np.exp((logits - logits.max()) * scale)
    probs /= probs.sum()
    order = np.argsort(-probs)
    return [(labels[i], float(probs[i])) for i in order]
