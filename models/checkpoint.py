"""The project's checkpoint: one file with the architecture, tower and fusion weights,
preprocessing settings and a format version. Loaded with `weights_only=True` (no pickled code)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "xmodal-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """The file is not an xmodal checkpoint, or one of an unknown version."""


@dataclass
class Checkpoint:
    model_name: str  # open_clip architecture name (or a config name registered from model_cfg)
    model_cfg: dict[str, Any]  # the full open_clip config, so the file stands alone
    state_dict: dict[str, torch.Tensor]  # towers
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    fusion_cfg: dict[str, Any] | None = None
    fusion_state_dict: dict[str, torch.Tensor] | None = None
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
        "fusion_cfg": ckpt.fusion_cfg,
        "fusion_state_dict": None
        if ckpt.fusion_state_dict is None
        else {k: v.detach().cpu() for k, v in ckpt.fusion_state_dict.items()},
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
        fusion_cfg=payload.get("fusion_cfg"),
        fusion_state_dict=payload.get("fusion_state_dict"),
        info=payload.get("info") or {},
    )
