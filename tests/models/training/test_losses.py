"""ITC and ITM building blocks."""

from __future__ import annotations

import math

import pytest
import torch

from models.training.losses import (
    caption_positives,
    group_listwise_loss,
    itc_loss,
    mine_hard_negatives,
)


def test_itc_prefers_aligned_pairs_and_counts_duplicates() -> None:
    raw = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.nn.functional.normalize(raw, dim=-1)
    scale = torch.tensor(math.log(10.0))
    aligned = itc_loss(emb, emb, scale)
    shuffled = itc_loss(emb, emb.roll(1, dims=0), scale)
    assert aligned < shuffled
    # Two rows with the same caption: the mask makes each image's target both texts. Identical
    # captions have identical embeddings, so the loss value is the same either way; the mask
    # matters for ITM mining (a duplicate must never be drawn as a negative).
    ids = torch.tensor([[1, 2], [1, 2], [3, 4]])
    pos = caption_positives(ids)
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    assert itc_loss(img, img, scale, pos) == pytest.approx(itc_loss(img, img, scale).item())


def test_mining_never_picks_a_positive_and_prefers_the_confusable() -> None:
    sim = torch.tensor(
        [[5.0, 4.9, 4.0, -5.0], [4.9, 5.0, -5.0, -5.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 5.0]]
    )
    pos = torch.eye(4, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True  # rows 0 and 1 share a caption
    gen = torch.Generator().manual_seed(0)
    picks = [mine_hard_negatives(sim * 3, pos, gen) for _ in range(100)]
    neg_text = torch.stack([p[0] for p in picks])  # [200, 4]
    neg_image = torch.stack([p[1] for p in picks])
    for row in range(4):
        assert not pos[row, neg_text[:, row]].any()
        assert not pos[neg_image[:, row], row].any()
    # Image 0's most similar non-positive text is text 2 (4.0 vs -5.0): nearly always chosen.
    assert (neg_text[:, 0] == 2).float().mean() > 0.95
    uniform = torch.stack(
        [mine_hard_negatives(sim * 3, pos, gen, hard=False)[0] for _ in range(200)]
    )
    assert 0.3 < (uniform[:, 0] == 3).float().mean() < 0.7


def test_mining_marks_rows_without_negatives() -> None:
    pos = torch.ones(3, 3, dtype=torch.bool)
    neg_text, neg_image = mine_hard_negatives(torch.zeros(3, 3), pos)
    assert neg_text.tolist() == [-1, -1, -1] and neg_image.tolist() == [-1, -1, -1]


def test_group_listwise_loss() -> None:
    pos = torch.eye(4, dtype=torch.bool)[None]
    assert group_listwise_loss(torch.zeros(1, 4, 4), pos).item() == pytest.approx(math.log(4))
    assert group_listwise_loss(torch.eye(4)[None] * 10, pos) < 0.01


def test_mining_hardness_mixes_in_uniform_negatives() -> None:
    # Row 0's confusable negative is text 1; text 2 and 3 are easy (far) negatives.
    sim = torch.tensor([[5.0, 4.9, -5.0, -5.0]] * 4) * 3
    pos = torch.eye(4, dtype=torch.bool)
    counts = {}
    for hardness in (1.0, 0.0):
        gen = torch.Generator().manual_seed(0)
        picks = torch.stack(
            [mine_hard_negatives(sim, pos, gen, hardness=hardness)[0] for _ in range(300)]
        )
        assert not (picks[:, 0] == 0).any()  # never the positive
        counts[hardness] = torch.bincount(picks[:, 0], minlength=4)
    assert counts[1.0][1] == 300  # fully mined: always the confusable one
    assert all(80 <= int(c) <= 120 for c in counts[0.0][1:])  # uniform over the three negatives
