"""Text tower forward that runs only up to the longest real token in the batch.

open_clip runs every text at the full context (77 tokens); a search query is usually ~11.
With a causal mask, a token never attends to later positions, so dropping the trailing pad
positions leaves every kept position's output unchanged: the pooled (EOT) feature is the same.
Models where that does not hold (no causal mask, an appended CLS token) use the stock path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TextOutput:
    pooled: torch.Tensor  # [B, embed_dim], projected, not normalised
    tokens: torch.Tensor  # [B, L, width] after the final LayerNorm
    mask: torch.Tensor  # [B, L] bool, True at real tokens (incl. SOT/EOT)


class _TextParts:
    """The text tower's pieces, for both CLIP (inline text tower) and CustomTextCLIP."""

    def __init__(self, model: nn.Module) -> None:
        tower: Any = getattr(model, "text", None)
        if tower is not None and hasattr(tower, "token_embedding"):
            self.token_embedding = tower.token_embedding
            self.positional_embedding = tower.positional_embedding
            self.transformer = tower.transformer
            self.attn_mask = tower.attn_mask
            self.ln_final = tower.ln_final
            self.pool_type = tower.pool_type
            self.text_projection = tower.text_projection
            self.eos_id = getattr(tower, "eos_id", None)
            self.pad_id = int(getattr(tower, "pad_id", 0))
            self.trimmable = tower.cls_emb is None and tower.attn_mask is not None
        else:
            m: Any = model
            self.token_embedding = m.token_embedding
            self.positional_embedding = m.positional_embedding
            self.transformer = m.transformer
            self.attn_mask = m.attn_mask
            self.ln_final = m.ln_final
            self.pool_type = m.text_pool_type
            self.text_projection = m.text_projection
            self.eos_id = getattr(m, "text_eos_id", None)
            self.pad_id = 0
            self.trimmable = m.attn_mask is not None
        self.trimmable = self.trimmable and self.pool_type in ("argmax", "eos", "first")


def _pool(parts: _TextParts, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device)
    if parts.pool_type == "first":
        return x[:, 0]
    if parts.pool_type == "eos":
        is_eos = text == torch.tensor(parts.eos_id, device=text.device)
        return x[rows, is_eos.int().argmax(dim=-1)]
    return x[rows, text.argmax(dim=-1)]  # argmax: EOT has the highest id


def text_forward(model: nn.Module, text: torch.Tensor, *, trim: bool = True) -> TextOutput:
    """Run the text tower on token ids [B, context_length]."""
    parts = _TextParts(model)
    mask_full = text != parts.pad_id
    if trim and parts.trimmable:
        length = int(mask_full.sum(dim=1).max().item())
        length = max(1, min(length, text.shape[1]))
        text = text[:, :length]
    if not parts.trimmable:
        # Stock path, untrimmed; token features come from open_clip's own output_tokens.
        tower: Any = getattr(model, "text", None)
        if tower is not None and hasattr(tower, "output_tokens"):
            previous = tower.output_tokens
            tower.output_tokens = True
            try:
                pooled, tokens = tower(text)
            finally:
                tower.output_tokens = previous
            return TextOutput(pooled, tokens, mask_full[:, : tokens.shape[1]])
        pooled = model.encode_text(text)  # type: ignore[operator]
        return TextOutput(pooled, pooled[:, None, :], mask_full[:, :1])
    seq_len = text.shape[1]
    cast_dtype = parts.transformer.get_cast_dtype()
    x = parts.token_embedding(text).to(cast_dtype)  # [B, L, width]
    x = x + parts.positional_embedding[:seq_len].to(cast_dtype)
    x = parts.transformer(x, attn_mask=parts.attn_mask[:seq_len, :seq_len])
    x = parts.ln_final(x)  # [B, L, width]
    pooled = _pool(parts, x, text)  # [B, width]
    if parts.text_projection is not None:
        if isinstance(parts.text_projection, nn.Linear):
            pooled = parts.text_projection(pooled)
        else:
            pooled = pooled @ parts.text_projection  # [B, embed_dim]
    return TextOutput(pooled, x, text != parts.pad_id)


def encode_text_trimmed(
    model: nn.Module, text: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    pooled = text_forward(model, text).pooled
    return F.normalize(pooled, dim=-1) if normalize else pooled
