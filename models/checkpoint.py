"""The project's checkpoint: one file with the architecture, the model's weights (for a CoCa:
towers and caption decoder), preprocessing settings, the re-ranking fusion weights and a format
version. Loaded with `weights_only=True` (no pickled code).

Version 2 (CoCa): the re-ranker is CoCa's decoder inside `state_dict`. Version 1 files carried
a separate cross-attention fusion head on a plain CLIP; they are refused with the fix."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "xmodal-checkpoint"
CHECKPOINT_VERSION = 2


@dataclass
class RerankConfig:
    """How a CoCa re-ranker scores a (text, image) pair:
    cosine_weight x cosine + caption_weight x mean log p(text token | prefix, image), where for
    image queries (candidates are different texts) the caption term is, when
    `debias_image_to_text`, minus the text's own prior log p(text | empty image)
    (VisualGPTScore). Image queries have weights of their own when set: their candidates are
    different texts, whose caption scores spread differently from one text's scores over
    different images. `xmodal eval --calibrate` fits all of these on a labelled CSV."""

    cosine_weight: float = 10.0
    caption_weight: float = 1.0
    debias_image_to_text: bool = False
    # None: image queries use cosine_weight / caption_weight.
    image_query_cosine_weight: float | None = None
    image_query_caption_weight: float | None = None
    # Token ids the decoder's softmax runs over; None: the tokenizer's whole vocabulary.
    # `xmodal train` from scratch restricts it to the training captions' tokens (a 49,408-way
    # softmax made a CPU training step about 2x slower, for words the data never uses).
    vocab: list[int] | None = None

    def weights(self, *, text_query: bool) -> tuple[float, float]:
        """(cosine weight, caption weight) for a query of that kind."""
        if text_query:
            return self.cosine_weight, self.caption_weight
        cosine = self.image_query_cosine_weight
        caption = self.image_query_caption_weight
        return (
            self.cosine_weight if cosine is None else cosine,
            self.caption_weight if caption is None else caption,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RerankConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


class CheckpointError(ValueError):
    """The file is not an xmodal checkpoint, or one of an unknown version."""


@dataclass
class Checkpoint:
    model_name: str  # open_clip architecture name (or a config name registered from model_cfg)
    model_cfg: dict[str, Any]  # the full open_clip config, so the file stands alone
    state_dict: dict[str, torch.Tensor]  # the whole model (a CoCa's decoder included)
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    rerank_cfg: dict[str, Any] | None = None  # RerankConfig.to_dict()
    info: dict[str, Any] = field(default_factory=dict)  # training provenance, free-form


def save_checkpoint(ckpt: Checkpoint, path: Path) -> None:
    """Write atomically: a crash mid-save leaves the previous file, never half a file."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_name": ckpt.model_name,
        "model_cfg": ckpt.model_cfg,
        "preprocess_cfg": ckpt.preprocess_cfg,
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "rerank_cfg": ckpt.rerank_cfg,
        "info": ckpt.info,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read as a checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an xmodal checkpoint")
    if payload.get("version") == 1:
        raise CheckpointError(
            f"{path} is a version-1 checkpoint (a CLIP with a separate fusion head), which "
            f"this xmodal no longer reads: re-ranking is now CoCa's caption decoder. Retrain "
            f"with `xmodal train --data CSV --out CKPT` (default model xmodal-tiny, a CoCa), or "
            f"serve a pretrained CoCa with --model coca_ViT-B-32 --pretrained laion2b_s13b_b90k"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')}; "
            f"this xmodal reads version {CHECKPOINT_VERSION}"
        )
    return Checkpoint(
        model_name=payload["model_name"],
        model_cfg=payload["model_cfg"],
        state_dict=payload["state_dict"],
        preprocess_cfg=payload.get("preprocess_cfg") or {},
        rerank_cfg=payload.get("rerank_cfg"),
        info=payload.get("info") or {},
    )
