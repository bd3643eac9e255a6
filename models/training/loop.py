"""Train (or fine-tune) the towers and the fusion re-ranker; write one checkpoint.

Losses: ITC on the pooled embeddings (learned temperature), ITM (BCE on the fusion logit) on
negatives mined from the in-batch similarities in both directions, and, when the data names
near-twin groups (a `group` column, as `models.training.synthetic` writes), batches built from whole
groups so the in-batch negatives *are* the twins, with every within-group pair scored by the
fusion head and a softmax over each group's candidates (see docs/reranker.md for why).

Deterministic for a given seed, device and thread count: the base weights come from the
factory (seeded for `--pretrained none`), the fusion head and every sampling decision from
`seed`. The learning-rate schedule is by step; `max_minutes` only stops early (the checkpoint
then records how far it got).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from models.checkpoint import save_checkpoint
from models.encoder import Encoder
from models.factory import EncoderSpec, load_encoder
from models.fusion import FusionConfig, FusionReranker
from models.text_tower import text_forward
from models.training.losses import (
    caption_positives,
    group_listwise_loss,
    itc_loss,
    itm_loss,
    mine_hard_negatives,
)

log = logging.getLogger(__name__)

_PRELOAD_MAX_BYTES = 2 * 1024**3  # decode every image once when the tensors fit in this


@dataclass
class TrainConfig:
    data: Path  # CSV: filepath,caption[,group]; paths relative to the CSV's folder
    out: Path  # the checkpoint to write
    model: str = "xmodal-tiny"  # open_clip architecture name
    pretrained: str = "none"  # open_clip tag, local weights file, or none (random init)
    checkpoint: Path | None = None  # continue from an xmodal checkpoint (towers + fusion)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3  # peak, after linear warm-up; cosine decay to 0 by the last step
    freeze_towers: bool = False  # train the fusion head only
    seed: int = 0
    fusion_layers: int = 2  # (self, cross) attention pairs in a new fusion head
    fusion_lr_mult: float = 1.0  # the fusion head's learning rate relative to `lr`
    device: str = "auto"
    workers: int = 2  # threads decoding images
    max_minutes: float | None = None  # stop early (and still save) after this much time
    # -- recipe ----------------------------------------------------------------------------
    weight_decay: float = 0.1  # on matrices only (not gains, biases, embeddings, temperature)
    warmup_steps: int = 50
    # Batches of whole twin groups when the CSV has `group`. Off by default: at the step counts
    # a 15-minute CPU budget allows, random batches trained the dual encoder faster and no
    # setting made re-ranking pay off (docs/reranker.md).
    group_batches: bool = False
    hard_negatives: bool = True  # ITM negatives by in-batch similarity (False: uniform)
    # Curriculum: the share of mined (vs uniform) ITM negatives rises linearly from 0 to 1 over
    # this fraction of the steps (0: mined from the first step).
    hard_negative_ramp: float = 0.0
    # With group_batches: the share of each batch filled with whole twin groups; the rest are
    # random rows (1.0: whole groups only). Twins teach the head; random rows keep ITC easy.
    twin_share: float = 1.0
    group_itm: bool = True  # with group_batches: score every within-group pair, group softmax
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    listwise_weight: float = 1.0
    itm_into_towers: bool = True  # let ITM gradients reach the towers (joint training)
    itm_start: float = 0.0  # fraction of steps before the ITM losses switch on
    freeze_towers_from: float = 1.0  # fraction of steps after which only the fusion trains
    # auto | bf16 | none: bf16 autocast. auto = CUDA only: on the 2-core CPU bf16 autocast made
    # a training step 1.5x slower than fp32 (small matrices, conversion overhead).
    amp: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    # torch's deterministic kernels: without them, 2-thread CPU backward passes (scatter-adds
    # of the pair gathers) differed run to run by ~2e-5 after two steps.
    deterministic: bool = True

    def to_info(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class _Rows:
    paths: list[Path]
    captions: list[str]
    groups: list[str] | None


def read_rows(csv_path: Path) -> _Rows:
    """A dataset CSV (`filepath,caption`, paths relative to the CSV's folder),
    with an optional `group` column naming near-twin groups."""
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


def _group_ids(groups: list[str] | None, n: int) -> list[list[int]]:
    if groups is None:
        return [[i] for i in range(n)]
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    return list(by_group.values())


def batches(
    groups: list[list[int]],
    batch_size: int,
    generator: torch.Generator,
    *,
    whole_groups: bool,
    twin_share: float = 1.0,
) -> Iterator[list[int]]:
    """One epoch of row-index batches; every row once.

    whole_groups: shuffle the groups; a `twin_share` of them go into batches whole (so
    near-twins meet as in-batch negatives), filling about that share of each batch, and the
    rows of the others are shuffled and fill the rest. twin_share=1: whole groups only.
    Else: shuffle the rows."""
    if not whole_groups:
        rows = [i for g in groups for i in g]
        perm = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(rows), batch_size):
            chunk = [rows[p] for p in perm[start : start + batch_size]]
            if len(chunk) > 1:  # ITC needs at least one negative
                yield chunk
        return
    share = min(max(twin_share, 0.0), 1.0)
    order = torch.randperm(len(groups), generator=generator).tolist()
    n_whole = round(share * len(order))
    whole = [groups[g] for g in order[:n_whole]]
    loose = [i for g in order[n_whole:] for i in groups[g]]
    loose = [loose[p] for p in torch.randperm(len(loose), generator=generator).tolist()]
    w = r = 0
    while w < len(whole) or r < len(loose):
        batch: list[int] = []
        # Whole groups up to the twin share (the whole batch once loose rows run out).
        limit = max(1, round(share * batch_size)) if r < len(loose) else batch_size
        while w < len(whole) and (not batch or len(batch) + len(whole[w]) <= limit):
            batch.extend(whole[w])
            w += 1
        take = batch_size - len(batch)
        batch.extend(loose[r : r + take])
        r = min(r + take, len(loose))
        if len(batch) > 1:
            yield batch


def _group_blocks(batch: list[int], row_group: list[int], size: int) -> torch.Tensor:
    """[G, size] batch positions of the groups in this batch that have exactly `size` rows."""
    members: dict[int, list[int]] = {}
    for pos, row in enumerate(batch):
        members.setdefault(row_group[row], []).append(pos)
    blocks = [m for m in members.values() if len(m) == size]
    return torch.tensor(blocks, dtype=torch.long).reshape(len(blocks), size)


def _param_groups(
    modules: list[nn.Module], weight_decay: float, lr_mult: float
) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            # open_clip's recipe: no decay on gains, biases, embeddings and the temperature.
            if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "token" in name:
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


def _token_widths(model: nn.Module, encoder: Encoder) -> tuple[int, int]:
    """Widths of the text token and image patch features, measured with a dry run so any
    open_clip architecture (CLIP, CustomTextCLIP) gets a fusion head that fits."""
    visual: Any = getattr(model, "visual")  # noqa: B009 - nn.Module attribute, typed Any
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        with torch.no_grad():
            size = encoder.image_size
            _, img_tokens = visual(torch.zeros(1, 3, size, size, device=encoder.device))
            txt = text_forward(model, encoder.tokenize(["a"]).to(encoder.device))
    finally:
        visual.output_tokens = previous
    return int(txt.tokens.shape[-1]), int(img_tokens.shape[-1])


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
    text_width, image_width = _token_widths(model, encoder)
    fusion = encoder.fusion
    if fusion is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            fusion = FusionReranker(
                FusionConfig(
                    text_width=text_width, image_width=image_width, layers=cfg.fusion_layers
                )
            ).to(device)
        with torch.no_grad():  # start the dual-encoder term at the towers' contrastive scale
            fusion.dual_weight.fill_(float(model.logit_scale.exp()))  # type: ignore[operator]
    elif fusion.cfg.layers != cfg.fusion_layers:
        log.warning("continuing the checkpoint's %d-layer fusion head", fusion.cfg.layers)
    visual: Any = getattr(model, "visual")  # noqa: B009

    rows = read_rows(cfg.data)
    n = len(rows.paths)
    groups = _group_ids(rows.groups, n)
    row_group = [0] * n
    for g, members in enumerate(groups):
        for i in members:
            row_group[i] = g
    sizes = [len(g) for g in groups]
    twin_size = max(set(sizes), key=sizes.count) if rows.groups is not None else 1
    whole_groups = cfg.group_batches and rows.groups is not None
    log.info("reading %d images from %s", n, cfg.data)
    pixels = PixelSource(rows.paths, encoder, cfg.workers)
    text_ids = encoder.tokenize(rows.captions)  # [N, context]

    params = _param_groups([fusion], cfg.weight_decay, cfg.fusion_lr_mult)
    if not cfg.freeze_towers:
        params += _param_groups([model], cfg.weight_decay, 1.0)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    # Count one epoch with a throwaway generator: the count does not depend on the shuffle
    # (with twin groups of unequal sizes it can differ by a batch; the schedule just clips).
    counter = torch.Generator().manual_seed(0)
    steps_per_epoch = sum(
        1
        for _ in batches(
            groups, cfg.batch_size, counter, whole_groups=whole_groups, twin_share=cfg.twin_share
        )
    )
    total = steps_per_epoch * cfg.epochs
    amp = _use_amp(cfg.amp, device)
    itm_from = int(cfg.itm_start * total)
    frozen_from = 0 if cfg.freeze_towers else int(cfg.freeze_towers_from * total)
    log.info(
        "training %s: %d rows, %d steps (%d/epoch), batches of %s, bf16 autocast %s",
        encoder.name, n, total, steps_per_epoch,
        f"whole twin groups of {twin_size}" if whole_groups else "random rows", amp,
    )  # fmt: skip

    start = time.monotonic()
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    step, stopped_early = 0, False
    recent: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    progress = tqdm(total=total, desc="train", unit="step")
    for epoch in range(cfg.epochs):
        for batch in batches(
            groups, cfg.batch_size, generator, whole_groups=whole_groups, twin_share=cfg.twin_share
        ):
            if time.monotonic() > deadline:
                stopped_early = True
                break
            towers_train = step < frozen_from
            model.train(towers_train)
            fusion.train()
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, cfg.warmup_steps, cfg.lr) * group["lr_mult"]
            idx = torch.tensor(batch)
            ids = text_ids[idx].to(device)
            blocks = None
            if whole_groups and cfg.group_itm and twin_size > 1:
                blocks = _group_blocks(batch, row_group, twin_size).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                losses = _step_losses(
                    cfg, model, visual, fusion, pixels[idx].to(device), ids, blocks,
                    generator, towers_train=towers_train, with_itm=step >= itm_from,
                    hardness=min(1.0, step / max(1.0, cfg.hard_negative_ramp * total))
                    if cfg.hard_negative_ramp > 0 else 1.0,
                )  # fmt: skip
            loss = losses["loss"]
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # False only with frozen towers before ITM switches on
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                # open_clip clamps the learned temperature to at most 100 (log 100 ~ 4.6052).
                model.logit_scale.clamp_(0, math.log(100))  # type: ignore[operator]
            for key, value in losses.items():
                first.setdefault(key, float(value.detach()))
                recent.setdefault(key, []).append(float(value.detach()))
                recent[key] = recent[key][-steps_per_epoch:]
            progress.set_postfix(
                epoch=epoch, **{k: f"{sum(v) / len(v):.3f}" for k, v in recent.items()}
            )
            progress.update()
            step += 1
        if stopped_early:
            log.warning("max_minutes reached: stopping at step %d of %d", step, total)
            break
    progress.close()
    pixels.close()
    seconds = time.monotonic() - start

    model.eval()
    fusion.eval()
    final = {k: sum(v) / len(v) for k, v in recent.items()}  # mean over the last epoch's steps
    ckpt = encoder.to_checkpoint(
        fusion,
        info={
            "base": {"model": cfg.model, "pretrained": encoder.pretrained},
            "config": cfg.to_info(),
            "steps": step,
            "total_steps": total,
            "stopped_early": stopped_early,
            "seconds": round(seconds, 1),
            "first_losses": first,
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
    fusion: FusionReranker,
    pixels: torch.Tensor,
    ids: torch.Tensor,
    blocks: torch.Tensor | None,
    generator: torch.Generator,
    *,
    towers_train: bool,
    with_itm: bool,
    hardness: float = 1.0,
) -> dict[str, torch.Tensor]:
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        with torch.set_grad_enabled(towers_train):
            img_pooled, img_tokens = visual(pixels)  # [B, D], [B, P, Wv]
            txt = text_forward(model, ids)  # pooled [B, D], tokens [B, L, Wt], mask [B, L]
    finally:
        visual.output_tokens = previous
    img_emb = F.normalize(img_pooled.float(), dim=-1)
    txt_emb = F.normalize(txt.pooled.float(), dim=-1)
    positives = caption_positives(ids)
    logit_scale: torch.Tensor = model.logit_scale  # type: ignore[assignment]
    out: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=pixels.device)
    if towers_train:
        out["itc"] = itc_loss(img_emb, txt_emb, logit_scale, positives)
        total = total + cfg.itc_weight * out["itc"]
    if with_itm:
        similarity = (logit_scale.exp() * img_emb @ txt_emb.t()).detach()
        neg_text, neg_image = mine_hard_negatives(
            similarity, positives, generator, hard=cfg.hard_negatives, hardness=hardness
        )
        b = torch.arange(len(ids), device=ids.device)
        has_t, has_i = neg_text >= 0, neg_image >= 0
        # (text row, image row): positives, a negative text per image, a negative image per text
        t_idx = [b, neg_text[has_t], b[has_i]]
        i_idx = [b, b[has_t], neg_image[has_i]]
        n_mined = sum(len(t) for t in t_idx)
        if blocks is not None and len(blocks):
            g, k = blocks.shape
            t_idx.append(blocks[:, :, None].expand(g, k, k).reshape(-1))  # text of row a ...
            i_idx.append(blocks[:, None, :].expand(g, k, k).reshape(-1))  # ... vs image b
        t_all, i_all = torch.cat(t_idx), torch.cat(i_idx)
        t_tok, t_mask, v_tok = txt.tokens, txt.mask, img_tokens
        if not cfg.itm_into_towers:
            t_tok, v_tok = t_tok.detach(), v_tok.detach()
        # The pair's cosine enters the logit as a fixed input: ITC alone trains the towers'
        # pooled embeddings; the head learns a correction on top of them.
        cosine = (txt_emb[t_all] * img_emb[i_all]).sum(dim=-1).detach()
        logits = fusion(t_tok[t_all], t_mask[t_all], v_tok[i_all], cosine)
        labels = positives[t_all, i_all]
        out["itm"] = itm_loss(logits, labels)
        total = total + cfg.itm_weight * out["itm"]
        if blocks is not None and len(blocks) and cfg.listwise_weight > 0:
            g, k = blocks.shape
            out["list"] = group_listwise_loss(
                logits[n_mined:].reshape(g, k, k), labels[n_mined:].reshape(g, k, k)
            )
            total = total + cfg.listwise_weight * out["list"]
    out["loss"] = total
    return out
