"""Train (or fine-tune) a CoCa: its towers and its caption decoder; write one checkpoint.

Losses (docs/reranker.md has the ablation):
- contrastive (ITC) on the pooled embeddings (learned temperature): the dual encoder;
- captioning: cross-entropy of each caption token given the image and the caption's prefix,
  through the decoder, whose length-normalised log-likelihood re-ranks at search time;
- grounding, when the CSV has a `boxes` column (as `xmodal synth` writes): for every decoder
  position that reads or predicts a token of an object phrase ("red circle"), minus the log of
  its cross-attention mass (mean over heads, every layer) on the image patches inside that
  phrase's box. Without it, cross-attention does not learn within a CPU budget to single out
  an object, and spatial relations stay at chance.

Deterministic for a given seed, device and thread count: the base weights come from the
factory (seeded for `--pretrained none`), every sampling decision from `seed`. The
learning-rate schedule is by step; `max_minutes` only stops early (the checkpoint then
records how far it got).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from models.checkpoint import RerankConfig, save_checkpoint
from models.decoder import CocaDecoder
from models.encoder import Encoder
from models.factory import EncoderSpec, load_encoder
from models.text_tower import text_forward
from models.training.losses import (
    caption_loss,
    caption_positives,
    grounding_loss,
    itc_loss,
    patch_targets,
)

log = logging.getLogger(__name__)

_PRELOAD_MAX_BYTES = 2 * 1024**3  # decode every image once when the tensors fit in this


@dataclass
class TrainConfig:
    data: Path  # CSV: filepath,caption[,group,twin,boxes]; paths relative to the CSV's folder
    out: Path  # the checkpoint to write
    model: str = "xmodal-tiny"  # open_clip architecture name (a CoCa, for re-ranking)
    pretrained: str = "none"  # open_clip tag, local weights file, or none (random init)
    checkpoint: Path | None = None  # continue from an xmodal checkpoint
    epochs: int = 20
    batch_size: int = 128
    # peak, after linear warm-up; cosine decay to 0 by the last step. 1e-3 beat 5e-4 on held-out
    # near twins at the same 1,260 steps (re-ranked R@1 0.957 vs 0.872; docs/reranker.md).
    lr: float = 1e-3
    freeze_towers: bool = False  # train the decoder only
    seed: int = 0
    device: str = "auto"
    workers: int = 2  # threads decoding images
    max_minutes: float | None = 15.0  # stop early (and still save) after this much time
    # -- recipe ----------------------------------------------------------------------------
    weight_decay: float = 0.1  # on matrices only (not gains, biases, embeddings, temperature)
    warmup_steps: int = 50
    itc_weight: float = 1.0
    caption_weight: float = 2.0
    grounding_weight: float = 1.0  # used when the CSV has boxes
    # The decoder's softmax: "data" = over the training captions' token ids (stored in the
    # checkpoint; about 2x faster per CPU step), "full" = the tokenizer's 49,408 ids, "auto" =
    # data for a model trained from scratch, full when starting from pretrained weights.
    caption_vocab: str = "auto"
    # auto | bf16 | none: bf16 autocast. auto = CUDA only: on the 2-core CPU bf16 autocast made
    # a training step 1.5x slower than fp32 (small matrices, conversion overhead).
    amp: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    # torch's deterministic kernels: without them, 2-thread CPU backward passes differed run
    # to run by ~2e-5 after two steps.
    deterministic: bool = True

    def to_info(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class _Rows:
    paths: list[Path]
    captions: list[str]
    groups: list[str] | None
    boxes: list[list[dict[str, Any]]] | None = None  # per row: [{"phrase", "box"}]
    twins: list[str] | None = None  # per row: base | colour | shape | relation


def read_rows(csv_path: Path) -> _Rows:
    """A dataset CSV (`filepath,caption`, paths relative to the CSV's folder),
    with optional `group` (near-twin groups), `twin` (the kind of twin) and `boxes` (JSON
    phrase boxes) columns."""
    csv_path = Path(csv_path)
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or [])
        if not {"filepath", "caption"} <= fields:
            raise ValueError(f"{csv_path} needs a header with filepath and caption columns")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    base = csv_path.parent
    return _Rows(
        paths=[base / r["filepath"] for r in rows],
        captions=[r["caption"] for r in rows],
        groups=[r["group"] for r in rows] if "group" in fields else None,
        boxes=[json.loads(r["boxes"] or "[]") for r in rows] if "boxes" in fields else None,
        twins=[r["twin"] for r in rows] if "twin" in fields else None,
    )


class PixelSource:
    """Preprocessed pixels by row index: decoded once and kept when they fit in memory,
    else decoded per batch by `workers` threads."""

    def __init__(self, paths: list[Path], encoder: Encoder, workers: int) -> None:
        self.paths = paths
        self.encoder = encoder
        self.pool = ThreadPoolExecutor(max(1, workers))
        size = encoder.image_size
        self.cache: torch.Tensor | None = None
        if len(paths) * 3 * size * size * 4 <= _PRELOAD_MAX_BYTES:
            self.cache = self._load(range(len(paths)))

    def _one(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            return self.encoder.preprocess_image(img.convert("RGB"))

    def _load(self, indices: Any) -> torch.Tensor:
        return torch.stack(list(self.pool.map(self._one, indices)))

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[indices]
        return self._load(indices.tolist())

    def close(self) -> None:
        self.pool.shutdown()


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """One epoch of shuffled row-index batches; every row once."""
    perm = torch.randperm(n, generator=generator).tolist()
    for start in range(0, n, batch_size):
        chunk = perm[start : start + batch_size]
        if len(chunk) > 1:  # ITC needs at least one negative
            yield chunk


def _param_groups(
    modules: list[nn.Module], weight_decay: float, lr_mult: float
) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            # open_clip's recipe: no decay on gains, biases, embeddings (the decoder's patch
            # position table is `image_pos_embed`) and the temperature.
            if p.ndim < 2 or "embed" in name or "logit_scale" in name or "token" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_mult": lr_mult},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": lr_mult},
    ]


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _use_amp(amp: str, device: torch.device) -> bool:
    if amp == "none":
        return False
    if amp == "bf16":
        return True
    return device.type == "cuda"


def phrase_positions(
    encoder: Encoder, ids: torch.Tensor, boxes: list[list[dict[str, Any]]]
) -> list[list[tuple[int, list[float]]]]:
    """For each row: (token position, box) of every token of every boxed phrase found in the
    caption's token ids [N, context] (a phrase not found as a token run is skipped)."""
    phrase_ids: dict[str, list[int]] = {}
    out: list[list[tuple[int, list[float]]]] = []
    for row, row_boxes in zip(ids.tolist(), boxes, strict=True):
        found: list[tuple[int, list[float]]] = []
        for entry in row_boxes:
            phrase = str(entry["phrase"])
            if phrase not in phrase_ids:
                tokens = encoder.tokenize([phrase])[0].tolist()
                phrase_ids[phrase] = [t for t in tokens[1:] if t != 0][:-1]  # no SOT/EOT
            run = phrase_ids[phrase]
            for start in range(1, len(row) - len(run) + 1):
                if run and row[start : start + len(run)] == run:
                    found.extend((start + j, list(entry["box"])) for j in range(len(run)))
                    break
        out.append(found)
    return out


def grounding_targets(
    positions: list[list[tuple[int, list[float]]]], context: int, grid: int
) -> torch.Tensor:
    """[N, context - 1, grid * grid] bool: for decoder position q (which reads token q and
    predicts token q + 1), the patches of the box of the phrase that token q or q + 1 belongs
    to; all False where neither is in a phrase."""
    targets = torch.zeros(len(positions), context - 1, grid * grid, dtype=torch.bool)
    for row, found in enumerate(positions):
        for pos, box in found:
            mask = patch_targets(box, grid)
            for q in (pos - 1, pos):  # predicts the phrase token; reads it
                if 0 <= q < context - 1:
                    targets[row, q] |= mask
    return targets


def train(config: TrainConfig) -> Path:
    """Train per `config`; write one checkpoint at `config.out` and return its path."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: an op with no deterministic kernel (some CUDA ones) warns instead of failing.
    torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
    try:
        return _train(config)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _patch_grid(visual: Any, encoder: Encoder) -> int | None:
    """Side of the square patch grid the decoder reads, or None (e.g. attention-pooled)."""
    with torch.no_grad():
        size = encoder.image_size
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            _, tokens = visual(torch.zeros(1, 3, size, size, device=encoder.device))
        finally:
            visual.output_tokens = previous
    grid = getattr(visual, "grid_size", None)
    if grid is None or getattr(visual, "attn_pool", None) is not None:
        return None
    side = int(grid[0]) if isinstance(grid, tuple | list) else int(grid)
    return side if tokens.shape[1] == side * side else None


class _LossTracker:
    """Each loss term's first value and its running mean over the last `window` steps."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.first: dict[str, float] = {}
        self._recent: dict[str, list[float]] = {}

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            self.first.setdefault(key, float(value.detach()))
            recent = self._recent.setdefault(key, [])
            recent.append(float(value.detach()))
            del recent[: -self.window]

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self._recent.items()}


def _grounding(
    cfg: TrainConfig, encoder: Encoder, visual: Any, rows: _Rows, text_ids: torch.Tensor
) -> torch.Tensor | None:
    """Per-caption attention targets from the CSV's phrase boxes, or None (no boxes, weight 0,
    or a decoder that does not read a patch grid)."""
    if rows.boxes is None or cfg.grounding_weight <= 0:
        return None
    grid = _patch_grid(visual, encoder)
    if grid is None:
        log.warning("%s's decoder does not read a patch grid: no grounding loss", cfg.model)
        return None
    positions = phrase_positions(encoder, text_ids, rows.boxes)
    covered = sum(1 for p in positions if p)
    log.info("grounding: %d of %d captions have boxed phrases", covered, len(positions))
    return grounding_targets(positions, text_ids.shape[1], grid)


def _caption_vocab(cfg: TrainConfig, encoder: Encoder, text_ids: torch.Tensor) -> RerankConfig:
    """The re-ranking config to train and save: from scratch (or when asked) the decoder's
    softmax runs over the training captions' token ids only, which halves a CPU step."""
    rerank_cfg = encoder.rerank_cfg
    scratch = cfg.pretrained.lower() in ("none", "random", "") and cfg.checkpoint is None
    if cfg.caption_vocab == "data" or (cfg.caption_vocab == "auto" and scratch):
        known = set(rerank_cfg.vocab or []) | set(torch.unique(text_ids).tolist())
        return replace(rerank_cfg, vocab=sorted(known - {encoder.pad_id}))
    if cfg.caption_vocab == "full":
        return replace(rerank_cfg, vocab=None)
    return rerank_cfg


def _train(config: TrainConfig) -> Path:
    cfg = config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    encoder = load_encoder(
        EncoderSpec(
            name=cfg.model,
            pretrained=cfg.pretrained,
            checkpoint=cfg.checkpoint,
            device=cfg.device,
            precision="fp32",  # master weights stay fp32; autocast handles bf16 compute
        )
    )
    device = encoder.device
    model = encoder.model
    decoder = encoder.decoder
    if decoder is None:
        raise ValueError(
            f"{encoder.name} is not a CoCa: training needs a caption decoder "
            "(use xmodal-tiny or a coca_* model)"
        )
    visual: Any = getattr(model, "visual")  # noqa: B009

    rows = read_rows(cfg.data)
    n = len(rows.paths)
    log.info("reading %d images from %s", n, cfg.data)
    pixels = PixelSource(rows.paths, encoder, cfg.workers)
    text_ids = encoder.tokenize(rows.captions)  # [N, context]
    targets = _grounding(cfg, encoder, visual, rows, text_ids)
    rerank_cfg = _caption_vocab(cfg, encoder, text_ids)
    vocab = torch.tensor(rerank_cfg.vocab, device=device) if rerank_cfg.vocab else None

    modules: list[nn.Module] = [decoder] if cfg.freeze_towers else [model]
    optimizer = torch.optim.AdamW(
        _param_groups(modules, cfg.weight_decay, 1.0), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    steps_per_epoch = sum(1 for _ in batches(n, cfg.batch_size, torch.Generator()))
    total = steps_per_epoch * cfg.epochs
    amp = _use_amp(cfg.amp, device)
    log.info(
        "training %s: %d rows, %d steps (%d/epoch), grounding %s, caption vocabulary %s, "
        "bf16 autocast %s",
        encoder.name, n, total, steps_per_epoch, targets is not None,
        "full" if vocab is None else len(vocab), amp,
    )  # fmt: skip

    start = time.monotonic()
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    step, stopped_early = 0, False
    tracked = _LossTracker(window=steps_per_epoch)
    progress = tqdm(total=total, desc="train", unit="step")
    for epoch in range(cfg.epochs):
        for batch in batches(n, cfg.batch_size, generator):
            if time.monotonic() > deadline:
                stopped_early = True
                break
            model.train(not cfg.freeze_towers)
            decoder.train()
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, cfg.warmup_steps, cfg.lr) * group["lr_mult"]
            idx = torch.tensor(batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                losses = _step_losses(
                    cfg, model, visual, decoder, pixels[idx].to(device),
                    text_ids[idx].to(device),
                    targets[idx].to(device) if targets is not None else None,
                    pad_id=encoder.pad_id, vocab=vocab,
                )  # fmt: skip
            loss = losses["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                # open_clip clamps the learned temperature to at most 100 (log 100 ~ 4.6052).
                model.logit_scale.clamp_(0, math.log(100))  # type: ignore[operator]
            tracked.add(losses)
            progress.set_postfix(epoch=epoch, **{k: f"{v:.3f}" for k, v in tracked.means().items()})
            progress.update()
            step += 1
        if stopped_early:
            log.warning("max_minutes reached: stopping at step %d of %d", step, total)
            break
    progress.close()
    pixels.close()
    seconds = time.monotonic() - start

    model.eval()
    final = tracked.means()
    ckpt = encoder.to_checkpoint(
        rerank_cfg,
        info={
            "base": {"model": cfg.model, "pretrained": encoder.pretrained},
            "config": cfg.to_info(),
            "steps": step,
            "total_steps": total,
            "stopped_early": stopped_early,
            "seconds": round(seconds, 1),
            "grounding": targets is not None,
            "first_losses": tracked.first,
            "final_losses": final,
            "rows": n,
            "torch": str(torch.__version__),
        },
    )
    save_checkpoint(ckpt, cfg.out)
    log.info("wrote %s after %d steps in %.0f s; losses %s", cfg.out, step, seconds, final)
    return Path(cfg.out)


def _step_losses(
    cfg: TrainConfig,
    model: nn.Module,
    visual: Any,
    decoder: CocaDecoder,
    pixels: torch.Tensor,
    ids: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    pad_id: int,
    vocab: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        with torch.set_grad_enabled(not cfg.freeze_towers):
            img_pooled, img_tokens = visual(pixels)  # [B, D], [B, P, W]
            txt = text_forward(model, ids)  # trimmed: pooled [B, D], tokens [B, L, W], ids
    finally:
        visual.output_tokens = previous
    assert txt.ids is not None
    out: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=pixels.device)
    if not cfg.freeze_towers and cfg.itc_weight > 0:
        img_emb = F.normalize(img_pooled.float(), dim=-1)
        txt_emb = F.normalize(txt.pooled.float(), dim=-1)
        logit_scale: torch.Tensor = model.logit_scale  # type: ignore[assignment]
        out["itc"] = itc_loss(img_emb, txt_emb, logit_scale, caption_positives(ids))
        total = total + cfg.itc_weight * out["itc"]
    want_maps = targets is not None and cfg.grounding_weight > 0
    dec = decoder.decode(img_tokens, txt.tokens[:, :-1], return_attention=want_maps, vocab=vocab)
    out["caption"] = caption_loss(dec.logits, txt.ids[:, 1:], pad_id, vocab)
    total = total + cfg.caption_weight * out["caption"]
    if want_maps and targets is not None:
        length = dec.logits.shape[1]
        out["ground"] = grounding_loss(dec.cross_attention, targets[:, :length])
        total = total + cfg.grounding_weight * out["ground"]
    out["loss"] = total
    return out
