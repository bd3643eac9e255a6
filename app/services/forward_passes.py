"""The batch functions the batchers run: one forward pass for a whole batch of requests.

They run on the batcher's worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from models.encoder import Encoder, ImageTokens


@dataclass
class RerankJob:
    """Score every (text, image) pair of one request: one text against many images
    (text-to-image) or one image against many texts (image-to-text).

    `keys` (optional, one per image) name images for the encoder's token cache; `cached`
    holds the (pooled, tokens) the caller already took from it (None where it must be
    computed from `images`, preprocessed pixels [3, S, S] or None when cached)."""

    texts: list[str]
    images: list[torch.Tensor | None]
    keys: list[Hashable | None] | None = None
    cached: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)

    def pairs(self) -> list[tuple[int, int]]:
        if len(self.texts) == 1:
            return [(0, j) for j in range(len(self.images))]
        return [(i, 0) for i in range(len(self.texts))]


def encode_texts_batch(encoder: Encoder, texts: list[str]) -> list[np.ndarray]:
    return list(encoder.encode_texts(texts))


def encode_images_batch(encoder: Encoder, images: list[torch.Tensor]) -> list[np.ndarray]:
    return list(encoder.encode_images(images))


def rerank_batch(encoder: Encoder, jobs: list[RerankJob]) -> list[np.ndarray]:
    """All jobs' texts in one text-tower pass, all uncached images in one image-tower pass
    (their tokens then go into the cache), every pair of every job in one decoder pass;
    fused scores split back per job."""
    texts: list[str] = []
    entries: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    pixels: list[torch.Tensor] = []
    todo: list[tuple[int, Hashable | None]] = []  # (entry index, cache key) to compute
    pairs: list[tuple[int, int]] = []
    text_query: list[bool] = []
    bounds: list[tuple[int, int]] = []
    for job in jobs:
        t0, i0 = len(texts), len(entries)
        texts.extend(job.texts)
        for j, image in enumerate(job.images):
            entry = job.cached[j] if j < len(job.cached) else None
            entries.append(entry)
            if entry is None:
                assert image is not None, "an uncached image needs its pixels"
                pixels.append(image)
                todo.append((len(entries) - 1, job.keys[j] if job.keys else None))
        start = len(pairs)
        pairs.extend((t0 + t, i0 + i) for t, i in job.pairs())
        text_query.extend([len(job.texts) == 1] * (len(pairs) - start))
        bounds.append((start, len(pairs)))
    if pixels:
        fresh = encoder.image_tokens(pixels)
        for row, (index, key) in enumerate(todo):
            entries[index] = (fresh.pooled[row], fresh.tokens[row])
            if key is not None:
                encoder.token_cache.put(key, fresh.pooled[row], fresh.tokens[row])
    ready = [e for e in entries if e is not None]
    image_out = ImageTokens(torch.stack([e[0] for e in ready]), torch.stack([e[1] for e in ready]))
    text_out = encoder.text_tokens(texts)
    scores = encoder.rerank_scores(text_out, image_out, pairs, text_query=text_query)
    return [scores[a:b] for a, b in bounds]
