"""CoCa's multimodal decoder with explicit attention, so it can return cross-attention maps.

`CocaDecoder` is open_clip's `MultimodalTransformer` (same parameter names and shapes, so a
pretrained CoCa's state dict loads unchanged) whose forward computes every attention by hand:

- the cross-attention weights (text position over image tokens) come back when asked, which
  the grounding loss needs (open_clip's blocks call `nn.MultiheadAttention` with
  `need_weights=False`);
- the keys and values of the image tokens are projected once per image and shared by every
  text paired with it (`image_index`), which is what re-ranking one image against many texts
  costs.

`tests/models/test_decoder.py` checks that a random CoCa gives the same logits through this
forward and through open_clip's within 1e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerScale, MultimodalTransformer, ResidualAttentionBlock
from torch import nn

from models.text_blocks import bf16_block_matmuls, block_mlp


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [N, L, vocab]
    hidden: torch.Tensor  # [N, L, width] after ln_final (before the vocabulary projection)
    cross_attention: list[torch.Tensor]  # per layer [N, heads, L, P]; empty unless asked


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, L, W] -> [N, heads, L, W / heads]."""
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    n, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * dim)


class CocaDecoder(MultimodalTransformer):
    """Drop-in for `CoCa.text_decoder`; build with `from_open_clip`.

    With `image_positions` (a patch grid's token count), a learned position embedding is
    added to the image tokens before the cross-attention's keys and values, so what a text
    position reads from a patch says where the patch is (relations need it). It starts at zero:
    a pretrained decoder behaves exactly as before. It is a parameter open_clip's decoder does
    not have (`image_pos_embed`); pretrained CoCa (attention-pooled tokens) goes without."""

    image_pos_embed: nn.Parameter | None

    @classmethod
    def from_open_clip(
        cls, decoder: MultimodalTransformer, image_positions: int | None = None
    ) -> CocaDecoder:
        if isinstance(decoder, CocaDecoder):
            return decoder
        block: Any = decoder.resblocks[0]
        width = int(decoder.width)
        ls_init = (
            float(block.ls_1.gamma.flatten()[0]) if isinstance(block.ls_1, LayerScale) else None
        )
        projection: Any = decoder.text_projection
        new = cls(
            width=width,
            layers=int(decoder.layers),
            heads=int(block.attn.num_heads),
            context_length=int(decoder.context_length),
            mlp_ratio=block.mlp.c_fc.out_features / width,
            ls_init_value=ls_init,
            act_layer=type(block.mlp.gelu),
            norm_layer=type(block.ln_1),
            output_dim=int(projection.shape[1]),
            batch_first=bool(decoder.batch_first),
        )
        new.image_pos_embed = None
        if image_positions:
            new.image_pos_embed = nn.Parameter(torch.zeros(image_positions, width))
        missing, unexpected = new.load_state_dict(decoder.state_dict(), strict=False)
        if unexpected or set(missing) - {"image_pos_embed"}:
            raise RuntimeError(f"decoder weights do not fit: {missing}, {unexpected}")
        return new.to(device=projection.device, dtype=projection.dtype)

    def _attend(
        self,
        block: ResidualAttentionBlock,
        q_in: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        want_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = block.attn
        width = q_in.shape[-1]
        low = attn.in_proj_weight.dtype  # bfloat16 in a `bf16_matmul_copy`, else the stream's
        q = F.linear(q_in.to(low), attn.in_proj_weight[:width], attn.in_proj_bias[:width])
        q = _split(q, attn.num_heads)
        if mask is not None:
            mask = mask.to(q.dtype)
        if want_weights:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.out_proj(_merge(out)).to(q_in.dtype), weights

    def _kv(self, block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attn = block.attn
        width = x.shape[-1]
        w, b = attn.in_proj_weight, attn.in_proj_bias
        x = x.to(w.dtype)
        k = F.linear(x, w[width : 2 * width], b[width : 2 * width])
        v = F.linear(x, w[2 * width :], b[2 * width :])
        return _split(k, attn.num_heads), _split(v, attn.num_heads)

    def decode(
        self,
        image_embs: torch.Tensor,
        text_embs: torch.Tensor,
        image_index: torch.Tensor | None = None,
        *,
        return_attention: bool = False,
        vocab: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """image_embs [M, P, W] (the image tower's tokens), text_embs [N, L, W] (the text
        tower's token features, caption minus its last token), image_index [N] (the image
        row of each text; None: row i with row i, M == N) -> logits for the next tokens,
        over `vocab` (sorted token ids) only when given (else the whole vocabulary)."""
        if not self.batch_first:
            raise ValueError("CocaDecoder needs a batch-first MultimodalTransformer")
        seq_len = text_embs.shape[1]
        causal = self.attn_mask[:seq_len, :seq_len].to(text_embs.dtype)
        x = text_embs
        maps: list[torch.Tensor] = []
        for self_block, cross_block in zip(self.resblocks, self.cross_attn, strict=True):
            sb: Any = self_block
            cb: Any = cross_block
            # Self-attention over the caption prefix (causal).
            h = sb.ln_1(x)
            k, v = self._kv(sb, h)
            out, _ = self._attend(sb, h, k, v, causal, False)
            x = x + sb.ls_1(out)
            x = x + sb.ls_2(block_mlp(sb, sb.ln_2(x)))
            # Cross-attention to the image tokens: keys and values once per image.
            memory = image_embs.to(x.dtype)
            if self.image_pos_embed is not None:
                memory = memory + self.image_pos_embed.to(x.dtype)
            k, v = self._kv(cb, cb.ln_1_kv(memory))
            if image_index is not None:
                k, v = k[image_index], v[image_index]
            out, weights = self._attend(cb, cb.ln_1(x), k, v, None, return_attention)
            if weights is not None:
                maps.append(weights)
            x = x + cb.ls_1(out)
            x = x + cb.ls_2(block_mlp(cb, cb.ln_2(x)))
        hidden = self.ln_final(x)
        projection: Any = self.text_projection
        logits = hidden.to(projection.dtype) @ (
            projection if vocab is None else projection[:, vocab]
        )
        return DecoderOutput(logits, hidden, maps)

    def forward(self, image_embs: torch.Tensor, text_embs: torch.Tensor) -> torch.Tensor:
        """open_clip's signature (used by `CoCa.forward`): logits [N, L, vocab]."""
        return self.decode(image_embs, text_embs).logits


def bf16_matmul_copy(decoder: CocaDecoder) -> CocaDecoder:
    """A copy of `decoder` whose projections (attention in/out, MLPs, the vocabulary
    projection) are bfloat16 while LayerNorms, layer scales and the residual stream stay
    float32: the CPU's bf16 matmuls at 3-4x fp32 for re-ranking, the scores within
    tests/models/test_decoder.py's tolerance. A copy: the float32 decoder is what
    checkpoints and training keep."""
    import copy

    low = copy.deepcopy(decoder)
    for block in [*low.resblocks, *low.cross_attn]:
        bf16_block_matmuls(block)
    projection: Any = low.text_projection
    projection.data = projection.data.to(torch.bfloat16)
    return low


def _patch_positions(model: nn.Module) -> int | None:
    """The number of patch tokens the decoder reads, for a ViT without attentional pooling."""
    visual: Any = getattr(model, "visual", None)
    grid = getattr(visual, "grid_size", None)
    if grid is None or getattr(visual, "attn_pool", None) is not None:
        return None
    return int(grid[0]) * int(grid[1])


def adopt_decoder(model: nn.Module) -> nn.Module:
    """Swap a CoCa's open_clip decoder for `CocaDecoder` (same weights, plus a zero patch
    position embedding when it reads a patch grid); other models pass."""
    holder: Any = model
    decoder = getattr(holder, "text_decoder", None)
    if isinstance(decoder, MultimodalTransformer):
        holder.text_decoder = CocaDecoder.from_open_clip(decoder, _patch_positions(model))
    return model


def init_text_projection(model: nn.Module) -> None:
    """open_clip 3.3 leaves the decoder's `text_projection` as `torch.empty` (and its
    `init_parameters()` raises), so a CoCa built from scratch starts from garbage logits.
    Initialise it as open_clip means to: normal, std = width ** -0.5."""
    decoder: Any = getattr(model, "text_decoder", None)
    if decoder is not None and decoder.text_projection is not None:
        with torch.no_grad():
            nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)


# log p of a caption token outside a restricted decoder vocabulary (see `vocab_labels`).
UNKNOWN_TOKEN_LOGPROB = math.log(1e-6)


def vocab_labels(labels: torch.Tensor, vocab: torch.Tensor | None) -> torch.Tensor:
    """Token ids -> positions in `vocab` (sorted ids); -1 for an id not in it. vocab None:
    the ids themselves."""
    if vocab is None:
        return labels
    pos = torch.searchsorted(vocab, labels.contiguous()).clamp_max(len(vocab) - 1)
    return torch.where(vocab[pos] == labels, pos, torch.full_like(pos, -1))


def caption_logprob(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pad_id: int = 0,
    vocab: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum and count of log p(label token) over the non-pad labels.

    logits [N, L, V] (over `vocab` when given), labels [N, L] token ids -> (sum [N],
    count [N]), float32. A token outside `vocab` (a word a decoder trained on a closed
    vocabulary never saw) counts as UNKNOWN_TOKEN_LOGPROB."""
    logp = logits.float().log_softmax(dim=-1)
    index = vocab_labels(labels, vocab)
    picked = logp.gather(-1, index.clamp_min(0)[..., None]).squeeze(-1)  # [N, L]
    picked = torch.where(index >= 0, picked, torch.full_like(picked, UNKNOWN_TOKEN_LOGPROB))
    real = labels != pad_id
    return (picked * real).sum(dim=1), real.sum(dim=1)
