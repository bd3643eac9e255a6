"""Attention-fusion re-ranker: text tokens attend to image patches, an ITM head scores the pair.

Each layer is open_clip's `ResidualAttentionBlock`: a self-attention block over the text tokens
(padding masked) followed by a cross-attention block (`is_cross_attention=True`) whose keys and
values are the image patch tokens. The head reads the pooled text tokens and returns one logit:
sigmoid(logit) is the probability that the caption matches the image.

The logit is a correction on top of the dual encoder: head(text, image) + w * cosine, where the
cosine of the two pooled embeddings comes from the caller and w is learned (initialised by
training to the towers' contrastive scale). A head trained on near-twins knows nothing about
the other look-alikes among the top candidates; on its own its scores re-ranked them worse
than the dual encoder (docs/reranker.md). With the cosine inside the logit the head only has to
learn what the dual encoder gets wrong. Checkpoints from before this term load with w = 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from open_clip.transformer import LayerNorm, ResidualAttentionBlock
from torch import nn


@dataclass
class FusionConfig:
    text_width: int  # width of the text tower's token features
    image_width: int  # width of the image tower's patch features
    width: int = 128  # width inside the fusion blocks
    layers: int = 2  # (self-attention, cross-attention) pairs
    heads: int = 4
    mlp_ratio: float = 4.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionConfig:
        return cls(**data)


class FusionReranker(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_in = nn.Linear(cfg.text_width, cfg.width)
        self.image_in = nn.Linear(cfg.image_width, cfg.width)
        self.self_blocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio, batch_first=True)
            for _ in range(cfg.layers)
        )
        self.cross_blocks = nn.ModuleList(
            ResidualAttentionBlock(
                cfg.width, cfg.heads, cfg.mlp_ratio, is_cross_attention=True, batch_first=True
            )
            for _ in range(cfg.layers)
        )
        self.ln_final = LayerNorm(cfg.width)
        self.head = nn.Sequential(
            nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, 1)
        )
        self.dual_weight = nn.Parameter(torch.zeros(()))

    def padding_mask(self, text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """text_mask [B, L] (True = real) -> the additive key-padding mask the self-attention
        blocks take: [B * heads, L, L], -inf where the key is padding."""
        batch, length = text_mask.shape
        pad = torch.zeros(batch, 1, length, dtype=dtype, device=text_mask.device)
        pad = pad.masked_fill(~text_mask[:, None, :], float("-inf"))
        return pad.expand(batch, length, length).repeat_interleave(self.cfg.heads, dim=0)

    def fuse(self, t: torch.Tensor, v: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Projected text tokens t [B, L, W] read the projected patches v [B, P, W] through the
        (self-attention, cross-attention) layers; pad from `padding_mask`. -> [B, L, W], normed."""
        for self_block, cross_block in zip(self.self_blocks, self.cross_blocks, strict=True):
            t = self_block(t, attn_mask=pad)
            t = cross_block(t, k_x=v, v_x=v)
        out: torch.Tensor = self.ln_final(t)
        return out

    @staticmethod
    def masked_mean(t: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the real tokens: [B, L, W], [B, L] -> [B, W]."""
        weights = text_mask.to(t.dtype)[..., None]
        return (t * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def forward(
        self,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        similarity: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """text_tokens [B, L, Wt], text_mask [B, L] (True = real), image_tokens [B, P, Wv],
        similarity [B] (cosine of each pair's pooled embeddings; None: head only)
        -> match logits [B]."""
        dtype = self.text_in.weight.dtype
        t = self.text_in(text_tokens.to(dtype))  # [B, L, W]
        v = self.image_in(image_tokens.to(dtype))  # [B, P, W]
        t = self.fuse(t, v, self.padding_mask(text_mask, t.dtype))
        logits: torch.Tensor = self.head(self.masked_mean(t, text_mask)).squeeze(-1)  # [B]
        if similarity is not None:
            # In float32 even for a bf16 head: twins' cosines differ in the third decimal.
            logits = logits.float() + self.dual_weight.float() * similarity.float()
        return logits

    def load_compatible(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict; one saved before the dual-encoder term keeps w = 0 (head only)."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"dual_weight"}:
            raise RuntimeError(f"fusion weights do not fit: missing {missing}, extra {unexpected}")
