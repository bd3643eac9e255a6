"""open_clip's text transformer blocks, run with one fused attention call per layer.

`nn.MultiheadAttention` with a float mask never takes torch's fused path: every layer goes
through `multi_head_attention_forward` in Python (input projection split three ways, reshapes,
a bmm softmax bmm). This runs the same block with the same weights (`ln_1`, the packed
`in_proj_weight`/`in_proj_bias`, `out_proj`, `ls_1`, `ln_2`, `mlp`, `ls_2`) as one projection
matmul and `F.scaled_dot_product_attention`, which is the same arithmetic (scale 1/sqrt(head
width), softmax over keys) in a fused kernel. Only the plain `ResidualAttentionBlock` qualifies;
any other block (custom attention, cross-attention, biased keys) keeps the stock forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _plain_block(block: nn.Module) -> bool:
    from open_clip.transformer import ResidualAttentionBlock

    # type() rather than isinstance: a subclass may change the forward we reproduce.
    if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
        return False
    attn: Any = block.attn
    mlp: Any = block.mlp
    return (
        list(dict(mlp.named_children())) == ["c_fc", "gelu", "c_proj"]
        and type(mlp.c_fc) is nn.Linear
        and type(mlp.c_proj) is nn.Linear
        and type(attn) is nn.MultiheadAttention
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
    )


def fast_blocks_supported(transformer: nn.Module) -> bool:
    """Whether every block of `transformer` (open_clip's `Transformer`) can run here."""
    blocks: Any = getattr(transformer, "resblocks", None)
    if blocks is None or not getattr(transformer, "batch_first", False):
        return False
    if getattr(transformer, "grad_checkpointing", False):
        return False
    return len(blocks) > 0 and all(_plain_block(b) for b in blocks)


def bf16_matmuls(transformer: nn.Module) -> None:
    """Cast, in place, the projection weights of a `fast_blocks_supported` transformer to
    bfloat16 (LayerNorms and layer scales stay float32). Like CPU autocast, which keeps the
    residual stream in float32 (cosine to fp32 >= 0.9999 where bf16 weights throughout gave
    0.99989, tests/models/test_text_tower.py), but the weights are cast once, not per call."""
    blocks: Any = transformer.resblocks
    for block in blocks:
        bf16_block_matmuls(block)


def bf16_block_matmuls(block: nn.Module) -> None:
    """One `ResidualAttentionBlock`'s projections (attention in/out, MLP) to bfloat16, in
    place; its LayerNorms and layer scales stay as they are."""
    b: Any = block
    for layer in (b.attn.out_proj, b.mlp.c_fc, b.mlp.c_proj):
        layer.to(torch.bfloat16)
    attn = b.attn
    attn.in_proj_weight.data = attn.in_proj_weight.data.to(torch.bfloat16)
    attn.in_proj_bias.data = attn.in_proj_bias.data.to(torch.bfloat16)


def block_mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP on x in its weights' dtype, back in x's dtype."""
    mlp: Any = block.mlp
    return mlp(x.to(mlp.c_fc.weight.dtype)).to(x.dtype)


def stream_dtype(transformer: nn.Module) -> torch.dtype:
    """The residual stream's dtype on the fast path: the first LayerNorm's."""
    blocks: Any = transformer.resblocks
    return blocks[0].ln_1.weight.dtype


@dataclass(frozen=True)
class Packing:
    """Rows of different lengths laid end to end, without padding: packed token t sits at
    `index[t]` of the padded grid [batch, length] flattened. Everything in a block but the
    attention works token by token, so only the attention needs the grid back."""

    index: torch.Tensor  # [T] int64, increasing
    batch: int
    length: int

    @classmethod
    def of_grid(cls, kept: torch.Tensor) -> Packing:
        """`kept` [batch, length] bool: the grid positions that hold a token."""
        batch, length = kept.shape
        return cls(kept.reshape(-1).nonzero().squeeze(1), int(batch), int(length))

    @classmethod
    def of_lengths(cls, lengths: torch.Tensor) -> Packing:
        """Row i keeps its first `lengths[i]` positions."""
        length = int(lengths.max())
        return cls.of_grid(torch.arange(length, device=lengths.device)[None, :] < lengths[:, None])

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """[T, C] -> [batch, length, C], zeros where a row has no token."""
        grid = packed.new_zeros(self.batch * self.length, packed.shape[-1])
        grid.index_copy_(0, self.index, packed)
        return grid.view(self.batch, self.length, -1)

    def unpad(self, grid: torch.Tensor) -> torch.Tensor:
        """[batch, length, C] -> [T, C]."""
        return grid.reshape(self.batch * self.length, -1).index_select(0, self.index)


def block_forward(
    block: nn.Module,
    x: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    packing: Packing | None = None,
) -> torch.Tensor:
    """One `ResidualAttentionBlock` on x [B, L, W], or on packed rows x [T, W] (`packing`).
    `attn_mask` broadcasts to [B, H, L, L] (additive float, or bool True = attend);
    `is_causal` stands for open_clip's causal mask.

    The matmuls run in their weights' dtype: after `bf16_matmuls`, x (the residual stream),
    the LayerNorms and the layer scales stay float32 and only the projections are bfloat16.
    Packed, the projections and the MLP skip the padding; the attention runs on the padded
    grid, where a causal row never reaches the zeros past its own end."""
    b: Any = block
    attn: Any = b.attn
    width = x.shape[-1]
    heads = int(attn.num_heads)
    low = attn.in_proj_weight.dtype
    h = b.ln_1(x).to(low)
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3W] or [T, 3W]
    if packing is not None:
        qkv = packing.pad(qkv)
    batch, length = qkv.shape[:2]
    qkv = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B, H, L, W / H]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)  # as the stock block does
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    o = o.transpose(1, 2).reshape(batch, length, width)  # [B, L, W]
    if packing is not None:
        o = packing.unpad(o)
    x = x + b.ls_1(attn.out_proj(o).to(x.dtype))
    return x + b.ls_2(block_mlp(b, b.ln_2(x)))


def run_blocks(
    transformer: nn.Module,
    x: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    packing: Packing | None = None,
) -> torch.Tensor:
    """All blocks of a `fast_blocks_supported` transformer on x [B, L, W] (or packed)."""
    blocks: Any = transformer.resblocks
    for block in blocks:
        x = block_forward(block, x, attn_mask=attn_mask, is_causal=is_causal, packing=packing)
    return x


class CompiledBlocks:
    """`run_blocks` for one transformer under `torch.compile` (CPU inductor), opt-in through
    the setting `model.text_compile`: compiling took 30-55 s per graph here (2 loaded cores),
    and the warm-up compiles two (batch 1, and any other batch size).

    Shapes are symbolic (`dynamic=True`) so that batch sizes share a graph; lengths are padded
    up to `buckets` (exact: under the causal mask a position never sees later ones, and pads
    are masked keys for CoCa's CLS), which bounds the shapes the warm-up has to visit.
    """

    def __init__(self, transformer: nn.Module, buckets: tuple[int, ...] = (8, 16, 32, 77)):
        self.transformer = transformer
        self.buckets = tuple(sorted(buckets))

        def blocks(
            x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
        ) -> torch.Tensor:
            return run_blocks(transformer, x, attn_mask=attn_mask, is_causal=is_causal)

        self._compiled = torch.compile(blocks, dynamic=True)

    def length(self, needed: int, context: int) -> int:
        """The bucket that holds `needed` positions, at most `context`."""
        for bucket in self.buckets:
            if bucket >= needed:
                return min(bucket, context)
        return context

    def __call__(
        self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        out: torch.Tensor = self._compiled(x, attn_mask, is_causal)
        return out
