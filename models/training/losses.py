"""Training losses: contrastive (ITC) for the dual encoder, matching (ITM) for the fusion head.

`positives` masks ([B, B] bool, True where text j describes image i) let a batch hold
duplicate captions: a duplicate is a second right answer, never a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.decoder import vocab_labels


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


def caption_loss(
    logits: torch.Tensor, labels: torch.Tensor, pad_id: int = 0, vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """Teacher-forced captioning: cross-entropy of logits [B, L, V] (over `vocab`, sorted
    token ids, when given) against the next tokens labels [B, L] (ids), pads ignored (as
    open_clip's CoCaLoss). Every label must be in `vocab`."""
    target = vocab_labels(labels, vocab)
    target = torch.where(labels == pad_id, torch.full_like(target, -100), target)
    return F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100)


def patch_targets(box: list[float], grid: int) -> torch.Tensor:
    """[grid * grid] bool: the patches (row-major) a box [x0, y0, x1, y1] (fractions) covers by
    at least a quarter of the patch, and always the patch under the box's centre."""
    x0, y0, x1, y1 = (float(v) for v in box)
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    lo, hi = edges[:-1], edges[1:]
    over_x = (torch.minimum(hi, torch.tensor(x1)) - torch.maximum(lo, torch.tensor(x0))).clamp(0)
    over_y = (torch.minimum(hi, torch.tensor(y1)) - torch.maximum(lo, torch.tensor(y0))).clamp(0)
    cover = over_y[:, None] * over_x[None, :] * grid * grid  # [rows, cols] fraction of patch
    mask = cover >= 0.25
    cx = min(grid - 1, max(0, int((x0 + x1) / 2 * grid)))
    cy = min(grid - 1, max(0, int((y0 + y1) / 2 * grid)))
    mask[cy, cx] = True
    return mask.flatten()


def grounding_loss(maps: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Minus the log of the cross-attention mass inside the box, at each grounded position.

    maps: per decoder layer [B, heads, L, P] attention weights; targets [B, L, P] bool (the
    box's patches for each position; all False where the position is not grounded).
    Averaged over heads inside the log (the heads together must look at the box, any one
    may look elsewhere), then over grounded positions and layers."""
    grounded = targets.any(dim=-1)  # [B, L]
    if not bool(grounded.any()):
        return maps[0].sum() * 0.0
    weights = targets.to(maps[0].dtype)[:, None]  # [B, 1, L, P]
    losses = []
    for attn in maps:
        mass = (attn.float() * weights).sum(dim=-1).mean(dim=1)  # [B, L]
        losses.append(-torch.log(mass[grounded].clamp_min(1e-6)).mean())
    return torch.stack(losses).mean()
