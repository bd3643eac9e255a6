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

from models.checkpoint import Checkpoint
from models.fusion import FusionReranker
from models.text_tower import TextOutput, text_forward


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
        fusion: FusionReranker | None = None,
        text_model: nn.Module | None = None,
    ) -> None:
        self.model = model.eval()
        # A lower-precision copy of the text tower for queries (precision "bf16-text").
        self.text_model = text_model.eval() if text_model is not None else self.model
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
        self.fusion = fusion.eval() if fusion is not None else None
        self.dim = int(model_cfg["embed_dim"])
        size = preprocess_cfg.get("size", model_cfg["vision_cfg"]["image_size"])
        self.image_size = int(size if isinstance(size, int) else max(size))
        self.context_length = int(model_cfg["text_cfg"].get("context_length", 77))
        self._input_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    @property
    def has_reranker(self) -> bool:
        return self.fusion is not None

    def to_checkpoint(
        self, fusion: FusionReranker | None = None, info: dict[str, Any] | None = None
    ) -> Checkpoint:
        """This encoder's towers and preprocessing, with `fusion` (default: its own head, if
        any), as one checkpoint for `save_checkpoint`."""
        fusion = fusion if fusion is not None else self.fusion
        return Checkpoint(
            model_name=self.name,
            model_cfg=self.model_cfg,
            state_dict=self.model.state_dict(),
            preprocess_cfg=self.preprocess_cfg,
            fusion_cfg=fusion.cfg.to_dict() if fusion is not None else None,
            fusion_state_dict=fusion.state_dict() if fusion is not None else None,
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
            pooled = text_forward(self.text_model, tokens).pooled
            features = F.normalize(pooled.float(), dim=-1)
        return features.cpu().numpy()

    # -- token features for the re-ranker --------------------------------------------------
    def image_tokens(self, images: Sequence[torch.Tensor] | torch.Tensor) -> ImageTokens:
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
        tokens = self.tokenize(texts).to(self.device)
        with self._inference():
            out = text_forward(self.text_model, tokens)
        return out

    def match_probabilities(
        self, text: TextOutput, image: ImageTokens, pairs: Sequence[tuple[int, int]]
    ) -> np.ndarray:
        """ITM probability for each (text row, image row) pair, in one forward pass (the
        fusion logit includes the pair's dual-encoder cosine, see models/fusion.py)."""
        if self.fusion is None:
            raise RuntimeError("this model has no fusion re-ranker")
        if not pairs:
            return np.zeros((0,), dtype=np.float32)
        t_idx = torch.tensor([p[0] for p in pairs], device=self.device)
        i_idx = torch.tensor([p[1] for p in pairs], device=self.device)
        with self._inference():
            text_emb = F.normalize(text.pooled[t_idx].float(), dim=-1)
            cosine = (text_emb * image.pooled[i_idx].float()).sum(dim=-1)
            logits = self.fusion(text.tokens[t_idx], text.mask[t_idx], image.tokens[i_idx], cosine)
            probs = torch.sigmoid(logits.float())
        return probs.cpu().numpy()
