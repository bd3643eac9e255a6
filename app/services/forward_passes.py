"""The batch functions the batchers run: one forward pass for a whole batch of requests.

They run on the batcher's worker thread, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.encoder import Encoder


@dataclass
class RerankJob:
    """Score every (text, image) pair of one request: one text against many images
    (text-to-image) or one image against many texts (image-to-text)."""

    texts: list[str]
    images: list[torch.Tensor]  # preprocessed pixels [3, S, S]

    def pairs(self) -> list[tuple[int, int]]:
        if len(self.texts) == 1:
            return [(0, j) for j in range(len(self.images))]
        return [(i, 0) for i in range(len(self.texts))]


def encode_texts_batch(encoder: Encoder, texts: list[str]) -> list[np.ndarray]:
    return list(encoder.encode_texts(texts))


def encode_images_batch(encoder: Encoder, images: list[torch.Tensor]) -> list[np.ndarray]:
    return list(encoder.encode_images(images))


def rerank_batch(encoder: Encoder, jobs: list[RerankJob]) -> list[np.ndarray]:
    """All jobs' texts in one text-tower pass, all images in one image-tower pass, all pairs
    in one fusion pass; results split back per job."""
    texts: list[str] = []
    images: list[torch.Tensor] = []
    pairs: list[tuple[int, int]] = []
    bounds: list[tuple[int, int]] = []
    for job in jobs:
        t0, i0 = len(texts), len(images)
        texts.extend(job.texts)
        images.extend(job.images)
        start = len(pairs)
        pairs.extend((t0 + t, i0 + i) for t, i in job.pairs())
        bounds.append((start, len(pairs)))
    text_out = encoder.text_tokens(texts)
    image_out = encoder.image_tokens(images)
    probs = encoder.match_probabilities(text_out, image_out, pairs)
    return [probs[a:b] for a, b in bounds]
