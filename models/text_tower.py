"""Text tower forward that runs only up to the longest real token in the batch.

open_clip runs every text at the full context (77 tokens); a search query is usually ~11.
With a causal mask, a token never attends to later positions, so dropping the trailing pad
positions leaves every kept position's output unchanged: the pooled (EOT) feature is the same.
CoCa's text tower appends a CLS token after the whole context and pools it; its positional
embedding is the one of the full context's last slot, and a padding mask keeps it off the pad
tokens. Trimming then keeps that slot's embedding and the mask's columns for the kept
positions, which again changes nothing (tests/models/test_encoders.py). The token features
(before `ln_final`) are what CoCa's decoder reads. Models with no causal mask use the stock path.

The kept positions then run through models/text_blocks.py (the same blocks with one fused
attention call each) where every block is open_clip's plain one; otherwise through open_clip's.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.text_blocks import (
    CompiledBlocks,
    Packing,
    fast_blocks_supported,
    run_blocks,
    stream_dtype,
)


@dataclass
class TextOutput:
    pooled: torch.Tensor  # [B, embed_dim], projected, not normalised
    tokens: torch.Tensor  # [B, L, width] after the final LayerNorm
    mask: torch.Tensor  # [B, L] bool, True at real tokens (incl. SOT/EOT)
    ids: torch.Tensor | None = None  # [B, L] the token ids (trimmed like `tokens`)


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
            self.cls_emb = tower.cls_emb
            self.correct_cls_mask = bool(getattr(tower, "correct_cls_mask", False))
            self.heads = int(getattr(tower, "heads", 1))
            self.trimmable = tower.attn_mask is not None and not getattr(
                tower, "use_pad_mask", False
            )
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
            self.cls_emb = None
            self.correct_cls_mask = False
            self.heads = 1
            self.trimmable = m.attn_mask is not None
        if self.cls_emb is None:
            self.trimmable = self.trimmable and self.pool_type in ("argmax", "eos", "first")


def _pooled_positions(parts: _TextParts, text: torch.Tensor) -> torch.Tensor:
    """[B] the position each row's pooled feature is read from."""
    if parts.pool_type == "first":
        return torch.zeros(text.shape[0], dtype=torch.long, device=text.device)
    if parts.pool_type == "eos":
        is_eos = text == torch.tensor(parts.eos_id, device=text.device)
        return is_eos.int().argmax(dim=-1)
    return text.argmax(dim=-1)  # argmax: EOT has the highest id


def _pool(parts: _TextParts, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, _pooled_positions(parts, text)]


def _project(parts: _TextParts, pooled: torch.Tensor) -> torch.Tensor:
    if parts.text_projection is None:
        return pooled
    if isinstance(parts.text_projection, nn.Linear):
        return parts.text_projection(pooled)
    return pooled @ parts.text_projection  # [B, embed_dim]


def _cls_forward(
    parts: _TextParts,
    text: torch.Tensor,
    trim: bool,
    fast: bool,
    compiled: CompiledBlocks | None,
) -> TextOutput:
    """CoCa's text tower (CLS appended after the context), trimmed without changing a number.

    open_clip's key mask over the context plus CLS is `valid` (text != pad) with the CLS slot
    appended after it, or, in the legacy layout that pretrained CoCa weights use, prepended (so
    key j < context counts as valid when token j - 1 is real, and the CLS key when the last
    context token is). Keeping one position past the longest real token keeps every valid key.
    """
    batch, context = text.shape
    valid = text != parts.pad_id
    keys = _cls_keys(parts, valid)
    length = context
    if trim:
        length = min(context, int(valid.sum(dim=1).max().item()) + 1)
        if compiled is not None:
            length = compiled.length(length, context)
    kept = torch.cat([torch.arange(length), torch.tensor([context])]).to(text.device)
    fast = fast and _fast_blocks(parts)
    cast_dtype = _cast_dtype(parts, fast)
    cls_emb: Any = parts.cls_emb
    x = parts.token_embedding(text[:, :length]).to(cast_dtype)
    x = torch.cat([x, cls_emb.to(cast_dtype).expand(batch, 1, -1)], dim=1)
    x = x + parts.positional_embedding[kept].to(cast_dtype)
    mask = _cls_mask(parts, keys, kept, cast_dtype)  # [B, length + 1, length + 1]
    if compiled is not None:
        x = compiled(x, attn_mask=mask[:, None])
    elif fast:
        x = run_blocks(parts.transformer, x, attn_mask=mask[:, None])  # heads broadcast
    else:
        x = parts.transformer(x, attn_mask=mask.repeat_interleave(parts.heads, dim=0))
    pooled = _project(parts, parts.ln_final(x[:, -1]))
    ids = text[:, :length]
    return TextOutput(pooled, x[:, :-1], ids != parts.pad_id, ids)


def _cls_keys(parts: _TextParts, valid: torch.Tensor) -> torch.Tensor:
    """open_clip's key mask [B, context + 1] over the context plus CLS, from `valid` [B,
    context] (text != pad), in the model's layout (see `_cls_forward`)."""
    ones = valid.new_ones(valid.shape[0], 1)
    return torch.cat([valid, ones] if parts.correct_cls_mask else [ones, valid], dim=1)


def _cls_mask(
    parts: _TextParts, keys: torch.Tensor, kept: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The additive attention mask [B, n, n] over the `kept` slots of the context plus CLS
    (n of them, increasing): the tower's causal mask there, with the invalid keys masked."""
    causal = parts.attn_mask[kept][:, kept].to(dtype)
    additive = torch.zeros(keys.shape[0], 1, len(kept), dtype=dtype, device=keys.device)
    additive = additive.masked_fill(~keys[:, kept][:, None, :], float("-inf"))
    return causal[None] + additive


def _cast_dtype(parts: _TextParts, fast: bool) -> torch.dtype:
    """The residual stream's dtype: float32 on the fast path after `bf16_matmuls`, else the
    weights' (what open_clip casts the embeddings to)."""
    return stream_dtype(parts.transformer) if fast else parts.transformer.get_cast_dtype()


def _is_causal(mask: torch.Tensor) -> bool:
    """Whether an additive mask [L, L] is exactly open_clip's causal one (-inf above the
    diagonal, 0 elsewhere), so that SDPA's `is_causal` may stand for it."""
    above = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isneginf(mask).eq(above).all()) and bool(mask[~above].eq(0).all())


# Both checks read only what a loaded model never changes (its block types, its causal mask)
# and ran on every forward: about 2% of the text tower's time per query in a profile. Keyed
# weakly by the transformer (its tower's mask goes with it), so an unloaded model takes its
# entries along; a tensor cannot be a weak key (`==` on tensors is elementwise).
_FAST_BLOCKS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
_CAUSAL_MASK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _fast_blocks(parts: _TextParts) -> bool:
    known = _FAST_BLOCKS.get(parts.transformer)
    if known is None:
        known = _FAST_BLOCKS[parts.transformer] = fast_blocks_supported(parts.transformer)
    return known


def _causal_prefix(parts: _TextParts, length: int) -> bool:
    """`_is_causal(attn_mask[:length, :length])`: every leading square of an exactly causal
    mask is exactly causal, so the full mask is checked once; only a mask that is not (no
    model here) is checked per length."""
    full = _CAUSAL_MASK.get(parts.transformer)
    if full is None:
        full = _CAUSAL_MASK[parts.transformer] = _is_causal(parts.attn_mask)
    return full or _is_causal(parts.attn_mask[:length, :length])


def text_forward(
    model: nn.Module,
    text: torch.Tensor,
    *,
    trim: bool = True,
    fast: bool = True,
    compiled: CompiledBlocks | None = None,
) -> TextOutput:
    """Run the text tower on token ids [B, context_length]. `fast`: blocks through
    models/text_blocks.py (fused attention) where the model allows; False keeps open_clip's.
    `compiled`: those blocks compiled for this model's text transformer (lengths bucketed)."""
    parts = _TextParts(model)
    if compiled is not None:
        usable = fast and trim and parts.trimmable and compiled.transformer is parts.transformer
        compiled = compiled if usable and _fast_blocks(parts) else None
    if parts.cls_emb is not None and parts.trimmable:
        return _cls_forward(parts, text, trim, fast, compiled)
    mask_full = text != parts.pad_id
    if trim and parts.trimmable:
        length = int(mask_full.sum(dim=1).max().item())
        length = max(1, min(length, text.shape[1]))
        if compiled is not None:
            length = compiled.length(length, text.shape[1])
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
    causal = parts.attn_mask[:seq_len, :seq_len]
    fast = fast and _fast_blocks(parts) and _causal_prefix(parts, seq_len)
    cast_dtype = _cast_dtype(parts, fast)
    x = parts.token_embedding(text).to(cast_dtype)  # [B, L, width]
    x = x + parts.positional_embedding[:seq_len].to(cast_dtype)
    if compiled is not None and fast:
        x = compiled(x, is_causal=True)
    elif fast:
        x = run_blocks(parts.transformer, x, is_causal=True)
    else:
        x = parts.transformer(x, attn_mask=causal)
    x = parts.ln_final(x)  # [B, L, width]
    pooled = _project(parts, _pool(parts, x, text))  # [B, embed_dim]
    return TextOutput(pooled, x, text != parts.pad_id, text)


def pooled_text(
    model: nn.Module, text: torch.Tensor, *, compiled: CompiledBlocks | None = None
) -> torch.Tensor:
    """`text_forward(...).pooled` (projected, not normalised): what a search query needs.

    Where the blocks are plain, rows of different lengths run packed: each row only up to the
    last position its pooled feature depends on, laid end to end, so that no projection or
    MLP works on padding (a batch of search queries is about a quarter padding when padded to
    its longest). The attention sees the same keys as the padded batch, so the numbers are
    the same."""
    parts = _TextParts(model)
    packable = compiled is None and text.shape[0] > 1 and parts.trimmable and _fast_blocks(parts)
    if packable and parts.cls_emb is not None:
        return _packed_cls_pooled(parts, text)
    if not packable or not _causal_prefix(parts, text.shape[1]):
        return text_forward(model, text, compiled=compiled).pooled
    ends = _pooled_positions(parts, text)  # causal: nothing after these matters
    packing = Packing.of_lengths(ends + 1)
    ids = text[:, : packing.length].reshape(-1).index_select(0, packing.index)  # [T]
    positions = packing.index % packing.length
    cast_dtype = _cast_dtype(parts, fast=True)
    x = parts.token_embedding(ids).to(cast_dtype)  # [T, width]
    x = x + parts.positional_embedding[positions].to(cast_dtype)
    x = run_blocks(parts.transformer, x, is_causal=True, packing=packing)
    last = torch.cumsum(ends + 1, dim=0) - 1  # each row's pooled token in the packed order
    return _project(parts, parts.ln_final(x.index_select(0, last)))


def _packed_cls_pooled(parts: _TextParts, text: torch.Tensor) -> torch.Tensor:
    """`pooled_text` for CoCa's tower: row i keeps the context positions up to its last valid
    key (see `_cls_forward` for both mask layouts), then its CLS token, which sits in the
    grid's last column as in the padded batch; positions dropped were masked keys there."""
    batch, context = text.shape
    keys = _cls_keys(parts, text != parts.pad_id)
    slots = torch.arange(1, context + 1, device=text.device)
    needed = (keys[:, :context] * slots).amax(dim=1)  # one past each row's last valid key
    length = int(needed.max())
    kept = torch.ones(batch, length + 1, dtype=torch.bool, device=text.device)
    kept[:, :length] = slots[None, :length] <= needed[:, None]
    packing = Packing.of_grid(kept)
    rows, columns = packing.index // (length + 1), packing.index % (length + 1)
    is_cls = columns == length
    slot = torch.cat([torch.arange(length, device=text.device), slots.new_tensor([context])])
    cast_dtype = _cast_dtype(parts, fast=True)
    cls_emb: Any = parts.cls_emb
    x = parts.token_embedding(text[rows, columns.clamp(max=max(length - 1, 0))]).to(cast_dtype)
    x[is_cls] = cls_emb.to(cast_dtype).reshape(1, -1)
    x = x + parts.positional_embedding[slot[columns]].to(cast_dtype)
    mask = _cls_mask(parts, keys, slot, cast_dtype)
    x = run_blocks(parts.transformer, x, attn_mask=mask[:, None], packing=packing)
    return _project(parts, parts.ln_final(x[is_cls]))


def text_transformer(model: nn.Module) -> nn.Module:
    """The text tower's transformer (open_clip's `Transformer`), for CLIP and CustomTextCLIP."""
    return _TextParts(model).transformer


def runs_fast(model: nn.Module) -> bool:
    """Whether `text_forward` runs every block of this model through models/text_blocks.py
    (only such a model may have its matmuls in bfloat16 alone: `bf16_matmuls`)."""
    parts = _TextParts(model)
    if not parts.trimmable or not fast_blocks_supported(parts.transformer):
        return False
    return parts.cls_emb is not None or _is_causal(parts.attn_mask)


def encode_text_trimmed(
    model: nn.Module, text: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    pooled = text_forward(model, text).pooled
    return F.normalize(pooled, dim=-1) if normalize else pooled
