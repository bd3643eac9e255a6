"""Training losses: contrastive (ITC) for the dual encoder, matching (ITM) for the fusion head.

`positives` masks ([B, B] bool, True where text j describes image i) let a batch hold
duplicate captions: a duplicate is a second right answer, never a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_positives(text_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] token ids -> [B, B] bool: row i's caption is identical to row j's."""
    return (text_ids[:, None, :] == text_ids[None, :, :]).all(dim=-1)


def itc_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor | None = None,
    max_scale: float = 100.0,
) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised [B, D] embeddings, temperature learned through
    `logit_scale` (log of the inverse temperature, as open_clip stores it). With several
    positives per row the target spreads evenly over them."""
    scale = logit_scale.exp().clamp(max=max_scale)
    logits = scale * image_emb @ text_emb.t()  # [B images, B texts]
    if positives is None:
        positives = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    target = positives.to(logits.dtype)
    i2t = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(target.t() / target.t().sum(1, keepdim=True) * F.log_softmax(logits.t(), dim=1))
    return (i2t + t2i.sum(1).mean()) / 2


def mine_hard_negatives(
    similarity: torch.Tensor,
    positives: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    hard: bool = True,
    temperature: float = 1.0,
    hardness: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one negative text per image and one negative image per text from a batch.

    similarity [B images, B texts] (scaled logits; detached), positives [B, B] bool.
    hard=True samples in proportion to softmax(similarity / temperature) over the negatives
    (ALBEF/BLIP: the pairs the dual encoder confuses are the ones worth teaching the fusion
    head); hard=False samples negatives uniformly. Returns (text index per image, image index
    per text), -1 where a row has no negative (every caption in the batch is the same).
    `hardness` in [0, 1] mixes the two: weights = hardness * mined + (1 - hardness) * uniform
    (a curriculum: a head trained from scratch gets no usable gradient from near-twins alone).
    """
    with torch.no_grad():
        sim = similarity.detach().float()
        scores = sim / temperature if hard else torch.zeros_like(sim)
        scores = scores.masked_fill(positives, float("-inf"))
        negs = []
        for s, pos in ((scores, positives), (scores.t(), positives.t())):
            has_negative = (~pos).any(dim=1)
            # A row with no negative would softmax to NaN: give it uniform weights, mark -1.
            weights = torch.softmax(s.masked_fill(~has_negative[:, None], 0.0), dim=1)
            if hard and hardness < 1.0:
                uniform = (~pos).float()
                uniform = uniform / uniform.sum(dim=1, keepdim=True).clamp_min(1.0)
                uniform = torch.where(has_negative[:, None], uniform, weights)
                weights = hardness * weights + (1.0 - hardness) * uniform
            # Sample on the CPU with the caller's CPU generator: the same draws on any device.
            picked = torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1)
            picked = picked.to(weights.device)
            negs.append(torch.where(has_negative, picked, torch.full_like(picked, -1)))
    return negs[0], negs[1]


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary matching loss on fusion logits [N] with 0/1 labels [N]."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def group_listwise_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Softmax over a twin group's candidates, both directions.

    logits [G, K, K] fusion logits for every (text k, image k') pair inside each of G groups
    of K near-twins; positives [G, K, K] bool. Re-ranking is a choice among a few look-alikes;
    this trains exactly that choice, with gradient from all K-1 twins at once, where BCE
    scores each pair on its own scale.
    """
    target = positives.to(logits.dtype)
    logits = logits.float()
    t2i = -(target / target.sum(2, keepdim=True).clamp_min(1) * F.log_softmax(logits, dim=2))
    i2t = -(target / target.sum(1, keepdim=True).clamp_min(1) * F.log_softmax(logits, dim=1))
    return (t2i.sum(2).mean() + i2t.sum(1).mean()) / 2
