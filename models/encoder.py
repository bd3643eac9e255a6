"""The dual encoder: open_clip towers behind batched, normalised, float32 encode calls."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.checkpoint import Checkpoint, RerankConfig
from models.decoder import CocaDecoder, bf16_matmul_copy, caption_logprob
from models.text_blocks import CompiledBlocks
from models.text_tower import (
    TextOutput,
    pooled_text,
    runs_fast,
    text_forward,
    text_transformer,
)
from models.token_cache import TokenCache

# Image tokens kept for re-ranking (models/token_cache.py: about 0.52 MB per coca_ViT-B-32
# image, 33 KB per xmodal-tiny image).
TOKEN_CACHE_BYTES = 256 * 1024**2


@dataclass
class ImageTokens:
    pooled: torch.Tensor  # [B, embed_dim], L2-normalised, float32
    tokens: torch.Tensor  # [B, P, width] patch features


class Encoder:
    """Holds a loaded model; every call is `inference_mode` and returns float32 numpy."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        preprocess: Callable[[Image.Image], torch.Tensor],
        *,
        device: torch.device,
        precision: str,
        name: str,
        pretrained: str,
        fingerprint: str,
        model_cfg: dict[str, Any],
        preprocess_cfg: dict[str, Any],
        rerank_cfg: RerankConfig | None = None,
        text_model: nn.Module | None = None,
        text_compile: bool = False,
    ) -> None:
        self.model = model.eval()
        # A lower-precision copy of the text tower for queries (precision "bf16-text").
        self.text_model = text_model.eval() if text_model is not None else self.model
        self._text_blocks: CompiledBlocks | None = None
        if text_compile and runs_fast(self.text_model):
            self._text_blocks = CompiledBlocks(text_transformer(self.text_model))
        self.tokenizer = tokenizer
        self._preprocess = preprocess
        self.device = device
        # fp32 | bf16 (CPU, both towers) | bf16-text (CPU, text tower only) | fp16 (CUDA autocast)
        self.precision = precision
        self.name = name
        self.pretrained = pretrained
        self.fingerprint = fingerprint
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        decoder = getattr(model, "text_decoder", None)
        # Re-ranking needs a CoCa: its decoder scores log p(text | image).
        self.decoder: CocaDecoder | None = decoder if isinstance(decoder, CocaDecoder) else None
        # What scores pairs: under "bf16-text" a copy with bf16 matmuls (the decoder costs
        # most of a re-ranked search); the float32 decoder stays for training and checkpoints.
        self._scorer = self.decoder
        if self.decoder is not None and precision == "bf16-text":
            self._scorer = bf16_matmul_copy(self.decoder)
        self.rerank_cfg = rerank_cfg or RerankConfig()
        self.pad_id = int(getattr(model, "pad_id", 0))
        self._null: torch.Tensor | None = None
        self.token_cache = TokenCache(TOKEN_CACHE_BYTES if self.decoder is not None else 0)
        vocab = self.rerank_cfg.vocab
        self.vocab = torch.tensor(sorted(vocab), device=device) if vocab else None
        self.dim = int(model_cfg["embed_dim"])
        size = preprocess_cfg.get("size", model_cfg["vision_cfg"]["image_size"])
        self.image_size = int(size if isinstance(size, int) else max(size))
        self.context_length = int(model_cfg["text_cfg"].get("context_length", 77))
        self._input_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    @property
    def has_reranker(self) -> bool:
        return self.decoder is not None

    def to_checkpoint(
        self, rerank_cfg: RerankConfig | None = None, info: dict[str, Any] | None = None
    ) -> Checkpoint:
        """This encoder's weights (towers and, for a CoCa, the decoder), preprocessing and
        re-ranking weights (default: its own) as one checkpoint for `save_checkpoint`."""
        cfg = rerank_cfg or self.rerank_cfg
        return Checkpoint(
            model_name=self.name,
            model_cfg=self.model_cfg,
            state_dict=self.model.state_dict(),
            preprocess_cfg=self.preprocess_cfg,
            rerank_cfg=cfg.to_dict(),
            info=info or {},
        )

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        with torch.inference_mode():
            if self.device.type == "cuda" and self.precision == "fp16":
                with torch.autocast("cuda", dtype=torch.float16):
                    yield
            else:
                yield

    # -- inputs ----------------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """RGB picture -> [3, S, S] float32 tensor (CPU); safe to call from worker threads."""
        return self._preprocess(image)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def _pixels(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        batch = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        non_blocking = self.device.type == "cuda" and batch.is_pinned()
        return batch.to(self.device, dtype=self._input_dtype, non_blocking=non_blocking)

    # -- dual encoder ----------------------------------------------------------------------
    def encode_images(self, images: Sequence[torch.Tensor] | torch.Tensor) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._inference():
            features = self.model.encode_image(self._pixels(images))  # type: ignore[operator]
            features = F.normalize(features.float(), dim=-1)
        return features.cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenize(texts).to(self.device)
        with self._inference():
            pooled = pooled_text(self.text_model, tokens, compiled=self._text_blocks)
            features = F.normalize(pooled.float(), dim=-1)
        return features.cpu().numpy()

    def warm_up_texts(self, batch_size: int) -> None:
        """Run the text tower once at each shape a compiled tower specialises on (every length
        bucket, at batch 1 and `batch_size`), so that no request pays a compile."""
        if self._text_blocks is None:
            return
        for length in self._text_blocks.buckets:
            words = " ".join(["photo"] * max(0, min(length, self.context_length) - 2))
            for size in sorted({1, max(2, batch_size)}):
                self.encode_texts([words] * size)

    # -- re-ranking with CoCa's decoder ----------------------------------------------------
    def image_tokens(self, images: Sequence[torch.Tensor] | torch.Tensor) -> ImageTokens:
        """Pooled embeddings and the tokens the decoder reads (for a CoCa, the image tower's
        patch or attention-pooler tokens)."""
        visual: Any = self.model.visual
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            with self._inference():
                pooled, tokens = visual(self._pixels(images))
                pooled = F.normalize(pooled.float(), dim=-1)
        finally:
            visual.output_tokens = previous
        return ImageTokens(pooled, tokens)

    def text_tokens(self, texts: Sequence[str]) -> TextOutput:
        """Pooled embeddings and token features (full precision: twins differ by little)."""
        tokens = self.tokenize(texts).to(self.device)
        with self._inference():
            out = text_forward(self.model, tokens)
        return out

    def _null_tokens(self) -> torch.Tensor:
        """The decoder's input for an empty image (all pixels at the normalisation mean)."""
        if self._null is None:
            size = self.image_size
            self._null = self.image_tokens(torch.zeros(1, 3, size, size)).tokens
        return self._null

    def caption_logprobs(
        self,
        text: TextOutput,
        image_tokens: torch.Tensor,
        pairs: Sequence[tuple[int, int]],
        *,
        chunk: int = 64,
    ) -> np.ndarray:
        """Length-normalised log p(text | image) for each (text row, image row) pair: the mean
        over the caption's tokens after the first (EOT included) of the decoder's
        log-probability. All pairs in one decoder pass per `chunk` (the vocabulary logits of a
        chunk are the memory peak: chunk x tokens x vocab floats)."""
        decoder = self._scorer
        if decoder is None:
            raise RuntimeError("this model has no caption decoder (re-ranking needs a CoCa)")
        if not pairs:
            return np.zeros((0,), dtype=np.float32)
        assert text.ids is not None
        t_all = torch.tensor([p[0] for p in pairs], device=self.device)
        i_all = torch.tensor([p[1] for p in pairs], device=self.device)
        out = []
        with self._inference():
            for s in range(0, len(pairs), chunk):
                t_idx, i_idx = t_all[s : s + chunk], i_all[s : s + chunk]
                # Only the images this chunk uses go through the keys/values projections.
                used, local = torch.unique(i_idx, return_inverse=True)
                dec = decoder.decode(
                    image_tokens[used].float(),
                    text.tokens[t_idx, :-1].float(),
                    local.reshape(-1),
                    vocab=self.vocab,
                )
                labels = text.ids[t_idx, 1:]
                total, count = caption_logprob(dec.logits, labels, self.pad_id, self.vocab)
                out.append(total / count.clamp_min(1))
        return torch.cat(out).cpu().numpy()

    def prior_logprobs(self, text: TextOutput, rows: Sequence[int]) -> np.ndarray:
        """log p(text | empty image), length-normalised: the text-only prior that VisualGPTScore
        divides out."""
        return self.caption_logprobs(
            TextOutput(text.pooled, text.tokens, text.mask, text.ids),
            self._null_tokens(),
            [(r, 0) for r in rows],
        )

    def rerank_scores(
        self,
        text: TextOutput,
        image: ImageTokens,
        pairs: Sequence[tuple[int, int]],
        *,
        text_query: bool | Sequence[bool],
    ) -> np.ndarray:
        """Fused score for each (text row, image row) pair: cosine weight x cosine +
        caption weight x log p(text | image) (minus the text prior for image queries when
        the config says so; the weights per query kind, `RerankConfig.weights`).
        `text_query`: for all pairs, or per pair. Higher is better."""
        if not pairs:
            return np.zeros((0,), dtype=np.float32)
        cfg = self.rerank_cfg
        gen = self.caption_logprobs(text, image.tokens, pairs)
        flags = [text_query] * len(pairs) if isinstance(text_query, bool) else list(text_query)
        debias = [i for i, f in enumerate(flags) if not f] if cfg.debias_image_to_text else []
        if debias:
            rows = sorted({pairs[i][0] for i in debias})
            prior = dict(zip(rows, self.prior_logprobs(text, rows), strict=True))
            for i in debias:
                gen[i] -= prior[pairs[i][0]]
        cos = self.pair_cosines(text, image, pairs)
        weights = np.array([cfg.weights(text_query=f) for f in flags], dtype=np.float32)
        return (weights[:, 0] * cos + weights[:, 1] * gen).astype(np.float32)

    def pair_cosines(
        self, text: TextOutput, image: ImageTokens, pairs: Sequence[tuple[int, int]]
    ) -> np.ndarray:
        t_idx = torch.tensor([p[0] for p in pairs], device=self.device)
        i_idx = torch.tensor([p[1] for p in pairs], device=self.device)
        text_emb = F.normalize(text.pooled[t_idx].float(), dim=-1)
        cosine = (text_emb * image.pooled[i_idx].float()).sum(dim=-1)
        return cosine.detach().cpu().numpy()
