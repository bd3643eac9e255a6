"""Contrastive, captioning and grounding losses."""

from __future__ import annotations

import math

import pytest
import torch

from models.training.losses import (
    caption_loss,
    caption_positives,
    grounding_loss,
    itc_loss,
    patch_targets,
)


def test_itc_prefers_aligned_pairs_and_counts_duplicates() -> None:
    raw = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.nn.functional.normalize(raw, dim=-1)
    scale = torch.tensor(math.log(10.0))
    aligned = itc_loss(emb, emb, scale)
    shuffled = itc_loss(emb, emb.roll(1, dims=0), scale)
    assert aligned < shuffled
    # Two rows with the same caption: the mask makes each image's target both texts (identical
    # captions have identical embeddings, so the loss value is the same either way).
    ids = torch.tensor([[1, 2], [1, 2], [3, 4]])
    pos = caption_positives(ids)
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    assert itc_loss(img, img, scale, pos) == pytest.approx(itc_loss(img, img, scale).item())


def test_caption_loss_ignores_padding_and_uses_the_vocabulary() -> None:
    vocab = torch.tensor([3, 8, 9])
    logits = torch.zeros(1, 3, 3)
    logits[0, 0, 1] = 5.0  # position 0 predicts token 8 confidently
    labels = torch.tensor([[8, 9, 0]])  # last position is padding
    loss = caption_loss(logits, labels, 0, vocab)
    expected = (-torch.log_softmax(logits[0, 0], 0)[1] + math.log(3)) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_patch_targets_cover_the_box() -> None:
    mask = patch_targets([0.0, 0.0, 0.25, 0.25], grid=8).reshape(8, 8)
    assert mask[:2, :2].all() and mask.sum() == 4
    tiny = patch_targets([0.51, 0.51, 0.52, 0.52], grid=8)
    assert tiny.sum() == 1 and tiny.reshape(8, 8)[4, 4]  # the centre's patch at least


def test_grounding_loss_rewards_attention_inside_the_box() -> None:
    targets = torch.zeros(1, 2, 4, dtype=torch.bool)
    targets[0, 0, :2] = True  # position 0 is grounded on patches 0-1; position 1 is not
    inside = torch.tensor([0.5, 0.5, 0.0, 0.0])
    outside = torch.tensor([0.0, 0.0, 0.5, 0.5])
    good = torch.stack([inside, outside])[None, None]  # [1, 1 head, 2, 4]
    bad = torch.stack([outside, inside])[None, None]
    assert grounding_loss([good], targets).item() == pytest.approx(0.0, abs=1e-6)
    assert grounding_loss([bad], targets).item() > 10
    # Averaged over heads inside the log: two heads with half the mass each -> log 2.
    split = torch.stack([torch.stack([inside, inside]), torch.stack([outside, outside])])[None]
    assert grounding_loss([split], targets).item() == pytest.approx(math.log(2), abs=1e-5)
