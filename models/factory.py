"""The one place that touches weights and devices: build an `Encoder` from a spec.

Sources of weights, in order: an xmodal checkpoint (`checkpoint`), a local weights file
(`pretrained` is a path), an open_clip pretrained tag (from the local cache, or downloaded when
the network is reachable), or `none` (random init, seeded so restarts give the same weights).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.checkpoint import Checkpoint, CheckpointError, RerankConfig, load_checkpoint
from models.decoder import adopt_decoder, init_text_projection
from models.encoder import Encoder
from models.text_blocks import bf16_matmuls
from models.text_tower import runs_fast, text_transformer

log = logging.getLogger(__name__)

TINY_MODEL = "xmodal-tiny"
_CONFIG_DIR = Path(__file__).with_name("configs")
_RANDOM_INIT_SEED = 0
_registry_lock = threading.Lock()


class WeightsUnavailable(RuntimeError):
    """The requested weights cannot be had here; the message names the fixes."""


@dataclass
class EncoderSpec:
    name: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"  # tag, local file, or "none"
    checkpoint: Path | None = None
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | bf16-text (CPU) | fp16 (CUDA)
    cache_dir: Path | None = None
    text_compile: bool = False  # torch.compile the text blocks (app/config.py: text_compile)


def register_builtin_configs() -> None:
    import open_clip

    with _registry_lock:
        if TINY_MODEL not in open_clip.list_models():
            open_clip.add_model_config(_CONFIG_DIR)


def register_config(name: str, cfg: dict[str, Any]) -> None:
    """Make an architecture stored in a checkpoint known to open_clip by name."""
    import open_clip

    with _registry_lock:
        if name in open_clip.list_models() and open_clip.get_model_config(name) == cfg:
            return
        folder = Path(tempfile.mkdtemp(prefix="xmodal-cfg-"))
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise WeightsUnavailable("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        # Queries are short and latency-bound: run the text tower in bf16 where the CPU has
        # native bf16 (about 4x its fp32 matmul rate), and keep images in fp32 so an image
        # searched by itself scores exactly 1. README: Performance gives the tolerance.
        return "bf16-text" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise WeightsUnavailable("precision fp16 needs CUDA; use fp32 or bf16 on the CPU")
    if precision in ("bf16", "bf16-text") and device.type != "cpu":
        raise WeightsUnavailable("precision bf16 is the CPU path; CUDA uses fp16 autocast")
    return precision


def state_fingerprint(name: str, state: dict[str, torch.Tensor]) -> str:
    """A digest of the tower weights: vectors from different weights must never mix."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(name.encode())
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(key.encode())
        digest.update(np.asarray(tensor.shape, dtype=np.int64).tobytes())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _fixes(name: str, tag: str) -> str:
    return (
        f"Weights for {name} / {tag} are not available on this machine. Fixes: "
        f"(1) pass a local weights file: --pretrained /path/to/{name}.safetensors "
        f"(or XMODAL_MODEL__PRETRAINED); "
        f"(2) pass an xmodal checkpoint: --checkpoint /path/to/model.pt; "
        f"(3) download once where the internet is reachable and point --cache-dir "
        f"(XMODAL_MODEL__CACHE_DIR / HF_HOME) at that cache; "
        f"(4) for tests and benchmarks only: --pretrained none (random weights)."
    )


def _cached_weights(name: str, tag: str, cache_dir: Path | None) -> str | None:
    """The local path of a pretrained tag's weights if they are already cached."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise WeightsUnavailable(f"{name} has no pretrained tag {tag!r} (known tags: {known})")
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub.rstrip("/"))
        for candidate in (filename or "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(
                repo_id, candidate, cache_dir=str(cache_dir) if cache_dir else None
            )
            if isinstance(found, str):
                return found
    url = cfg.get("url", "")
    if url:
        folder = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "clip"
        target = folder / os.path.basename(url)
        if target.is_file():
            return str(target)
    return None


def _network_reachable(timeout_s: float = 4.0) -> bool:
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return True


def _seeded_random_model(name: str, device: torch.device) -> nn.Module:
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_INIT_SEED)
        model = open_clip.create_model(name, pretrained=None, device="cpu")
        init_text_projection(model)  # a CoCa's is left uninitialised by open_clip 3.3
    return model.to(device)


def _build_tower_model(spec: EncoderSpec, device: torch.device) -> tuple[nn.Module, str, str]:
    """Returns (model on device, architecture name, weights description)."""
    import open_clip

    register_builtin_configs()
    name = spec.name
    if name not in open_clip.list_models():
        raise WeightsUnavailable(
            f"unknown model {name!r}; known: {TINY_MODEL} and open_clip's "
            f"{len(open_clip.list_models())} architectures (open_clip.list_models())"
        )
    source = spec.pretrained.strip()
    if source.lower() in ("", "none", "random"):
        log.warning(
            "MODEL %s HAS RANDOM WEIGHTS (--pretrained none): search results are meaningless "
            "except for exact duplicates. Use this for tests and benchmarks only.",
            name,
        )
        return _seeded_random_model(name, device), name, "none"
    path = Path(source).expanduser()
    if path.is_file():
        model = adopt_decoder(open_clip.create_model(name, pretrained=None, device="cpu"))
        # strict=False only for the decoder's patch position embedding, which open_clip's
        # CoCa weights do not have (it stays zero: the pretrained behaviour).
        result = open_clip.load_checkpoint(model, str(path), strict=False)
        missing = set(getattr(result, "missing_keys", []))
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected or missing - {"text_decoder.image_pos_embed"}:
            raise WeightsUnavailable(
                f"{path} does not fit {name}: missing {sorted(missing)}, extra {unexpected}"
            )
        return model.to(device), name, str(path)
    if os.sep in source or source.endswith((".pt", ".bin", ".safetensors", ".pth")):
        raise WeightsUnavailable(f"weights file {source} does not exist")
    cached = _cached_weights(name, source, spec.cache_dir)
    if cached is not None:
        model = open_clip.create_model(name, pretrained=cached, device=device)
        return model, name, source
    if _offline() or not _network_reachable():
        raise WeightsUnavailable(_fixes(name, source))
    model = open_clip.create_model(
        name,
        pretrained=source,
        device=device,
        cache_dir=str(spec.cache_dir) if spec.cache_dir else None,
    )
    return model, name, source


def _model_cfg(name: str) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise WeightsUnavailable(f"no config for model {name!r}")
    return copy.deepcopy(cfg)


def has_caption_decoder(spec: EncoderSpec) -> bool:
    """Whether the model `spec` loads can re-rank (a CoCa: its config has a multimodal
    decoder), read from the config or the checkpoint without building the model."""
    if spec.checkpoint is not None:
        return "multimodal_cfg" in load_checkpoint(spec.checkpoint).model_cfg
    register_builtin_configs()
    return "multimodal_cfg" in _model_cfg(spec.name)


def build_model_from_checkpoint(ckpt: Checkpoint, device: torch.device) -> nn.Module:
    import open_clip

    register_builtin_configs()
    register_config(ckpt.model_name, ckpt.model_cfg)
    model = adopt_decoder(open_clip.create_model(ckpt.model_name, pretrained=None, device="cpu"))
    # A checkpoint from before the decoder's patch position embedding keeps it at zero.
    missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    if unexpected or set(missing) - {"text_decoder.image_pos_embed"}:
        raise CheckpointError(f"weights do not fit {ckpt.model_name}: {missing}, {unexpected}")
    if ckpt.preprocess_cfg:
        from open_clip.model import set_model_preprocess_cfg

        set_model_preprocess_cfg(model, ckpt.preprocess_cfg)
    return model.to(device)


def _text_tower_copy(model: nn.Module) -> nn.Module:
    """A copy of the model without its image tower (whose weights are not needed for text)."""
    holder: Any = model
    visual = holder.visual
    holder.visual = None
    try:
        return copy.deepcopy(model)
    finally:
        holder.visual = visual


def image_preprocess(
    preprocess_cfg: dict[str, Any], model_cfg: dict[str, Any]
) -> Callable[[Image.Image], torch.Tensor]:
    """The model's inference transform (PIL picture -> [3, S, S] tensor), built from its
    configs alone, so that processes without the weights (decoding workers) apply the same one."""
    import open_clip

    size = preprocess_cfg.get("size", model_cfg["vision_cfg"]["image_size"])
    transform: Callable[[Image.Image], torch.Tensor] = open_clip.image_transform(
        size,
        is_train=False,
        mean=preprocess_cfg.get("mean"),
        std=preprocess_cfg.get("std"),
        resize_mode=preprocess_cfg.get("resize_mode"),
        interpolation=preprocess_cfg.get("interpolation"),
    )
    return transform


def load_encoder(spec: EncoderSpec) -> Encoder:
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    rerank_cfg = RerankConfig()
    if spec.checkpoint is not None:
        ckpt = load_checkpoint(Path(spec.checkpoint))
        model = build_model_from_checkpoint(ckpt, device)
        name, weights, model_cfg = ckpt.model_name, str(spec.checkpoint), ckpt.model_cfg
        rerank_cfg = RerankConfig.from_dict(ckpt.rerank_cfg)
    else:
        model, name, weights = _build_tower_model(spec, device)
        model_cfg = _model_cfg(name)
    # A CoCa's decoder runs through the project's CocaDecoder (same weights, attention maps).
    model = adopt_decoder(model)
    fingerprint = state_fingerprint(name, model.state_dict())
    preprocess_cfg = dict(get_model_preprocess_cfg(model))
    preprocess = image_preprocess(preprocess_cfg, model_cfg)
    text_model: nn.Module | None = None
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    elif precision == "bf16-text":
        text_model = _text_tower_copy(model)
        if runs_fast(text_model):  # bf16 matmuls, float32 residual stream (text_blocks.py)
            bf16_matmuls(text_transformer(text_model))
        else:
            text_model = text_model.to(torch.bfloat16)
    tokenizer = open_clip.get_tokenizer(name)
    log.info(
        "loaded %s (weights: %s) on %s, precision %s, fingerprint %s, re-ranker: %s",
        name, weights, device, precision, fingerprint, "yes" if hasattr(model, "text_decoder") else "no",
    )  # fmt: skip
    return Encoder(
        model,
        tokenizer,
        preprocess,
        device=device,
        precision=precision,
        name=name,
        pretrained=weights,
        fingerprint=fingerprint,
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_cfg,
        rerank_cfg=rerank_cfg,
        text_model=text_model,
        text_compile=spec.text_compile,
    )
