"""Probe what a fusion head can learn from frozen tower features, by kind of near-twin.

    python bench/reranker_probe.py --checkpoint CKPT --train CSV --test CSV \
        [--steps 500] [--image-features final|embed|N] [--position-code 1.0] [--readout gated|pairwise|flat]

Both CSVs need the `group` column that `xmodal synth --twins` writes (4 rows per group in the
order original, colour swap, relation flip, both). The checkpoint's towers are frozen and run
once over every image and caption; a new fusion head then trains on the cached token features
(much faster than a training step through the towers), with clean labels: every step takes
`--groups` whole twin groups and scores all 16 (caption, image) pairs inside each, plus one
negative per row from another group in the batch, sampled by dual-encoder similarity. Losses:
BCE on every pair plus a softmax over each group's 4 candidates, both directions.

Every `--eval-every` steps it prints, for the held-out split: the dual encoder's R@1, the
head's R@1 after re-ranking the dual top 16, the head's accuracy when choosing among a group's
4 images, and how often the right image beats each kind of twin (`win_colour`, `win_flip`,
`win_both`; 0.5 is chance). A head that ignores some property of the image wins exactly half
of those comparisons, because both captions then prefer the same image.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.encoder import Encoder
from models.factory import EncoderSpec, load_encoder
from models.fusion import FusionConfig, FusionReranker
from models.text_tower import text_forward
from models.training import read_rows

TWIN_KINDS = {1: "win_colour", 2: "win_flip", 3: "win_both"}  # row index XOR within a group


@dataclass
class Features:
    image_tokens: torch.Tensor  # [N, P, W]
    image_emb: torch.Tensor  # [N, D] normalised
    text_tokens: torch.Tensor  # [N, L, W]
    text_mask: torch.Tensor  # [N, L]
    text_emb: torch.Tensor  # [N, D] normalised
    groups: torch.Tensor  # [N] group ids; rows i of images and captions are pairs

    def head(self, n: int) -> Features:
        return Features(*(getattr(self, f)[:n] for f in self.__dataclass_fields__))


def extract(encoder: Encoder, csv_path: Path, image_features: str) -> Features:
    rows = read_rows(csv_path)
    if rows.groups is None:
        raise SystemExit(f"{csv_path} has no group column (write it with xmodal synth --twins)")
    pixels = []
    for path in rows.paths:
        with Image.open(path) as img:
            pixels.append(encoder.preprocess_image(img.convert("RGB")))
    visual: Any = encoder.model.visual
    blocks = visual.transformer.resblocks
    taken: dict[str, torch.Tensor] = {}
    if image_features == "embed":  # patch embeddings + position, before any attention
        hook = blocks[0].register_forward_pre_hook(lambda m, a: taken.update(x=a[0]))
    elif image_features != "final":  # the output of transformer block N
        hook = blocks[int(image_features)].register_forward_hook(
            lambda m, a, out: taken.update(x=out)
        )
    visual.output_tokens = True
    tokens, pooled = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(pixels), 256):
                emb, tok = visual(torch.stack(pixels[start : start + 256]))
                if image_features != "final":
                    tok = taken["x"][:, 1:]  # drop the class token
                tokens.append(tok)
                pooled.append(F.normalize(emb, dim=-1))
            text = text_forward(encoder.model, encoder.tokenize(rows.captions))
    finally:
        visual.output_tokens = False
        if image_features != "final":
            hook.remove()
    return Features(
        torch.cat(tokens),
        torch.cat(pooled),
        text.tokens,
        text.mask,
        F.normalize(text.pooled, dim=-1),
        torch.tensor([int(g) for g in rows.groups]),
    )


def sincos_2d(patches: int, width: int, base: float = 100.0) -> torch.Tensor:
    """[patches, width] fixed code of each patch's (x, y) on a square grid: sin and cos of
    each coordinate at width/4 frequencies, from 1 down towards 1/base."""
    side = round(patches**0.5)
    ys, xs = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    quarter = width // 4
    freq = 1.0 / (base ** (torch.arange(quarter).float() / quarter))

    def code(coord: torch.Tensor) -> torch.Tensor:
        angle = coord.reshape(-1, 1) * freq[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([code(xs), code(ys)], dim=1)


class Probe(nn.Module):
    """The product's FusionReranker, optionally with a fixed 2-D position code added to the
    projected patches and a gated (bilinear) term on each token before pooling."""

    def __init__(self, cfg: FusionConfig, patches: int, position: float, readout: str) -> None:
        super().__init__()
        self.fusion = FusionReranker(cfg)
        self.register_buffer("position", sincos_2d(patches, cfg.width) * position)
        self.gate = (
            nn.ModuleList([nn.Linear(cfg.width, cfg.width), nn.Linear(cfg.width, cfg.width)])
            if readout == "gated"
            else None
        )
        self.flat = _FlatLayout(cfg.width, patches) if readout == "flat" else None
        self.pairwise = (
            _PairwiseRelations(cfg.width, patches, compete=readout == "pairwise-compete")
            if readout.startswith("pairwise")
            else None
        )

    def inputs(
        self, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected text tokens, projected patches (+ position code), self-attention mask."""
        f = self.fusion
        t = f.text_in(text)
        return t, f.image_in(image) + self.position, f.padding_mask(mask, t.dtype)

    def forward(self, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        f = self.fusion
        t, v, pad = self.inputs(text, mask, image)
        t = f.fuse(t, v, pad)
        if self.gate is not None:
            t = t + self.gate[0](t) * self.gate[1](t)
        pooled = f.masked_mean(t, mask)
        if self.pairwise is not None:
            pooled = pooled + self.pairwise(t, mask, v)
        out: torch.Tensor = f.head(pooled).squeeze(-1)
        if self.flat is not None:
            out = out + self.flat(pooled, v)
        return out


class _FlatLayout(nn.Module):
    """An MLP over the pooled text state and the whole patch grid, flattened: position is
    which input a feature arrives on, so "blue at the top" is one first-layer weight and needs
    no attention to settle first (bench/fusion_toy.py: this learned relations in 300 steps
    where attention heads stayed at chance)."""

    def __init__(self, width: int, patches: int, per_patch: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.down = nn.Linear(width, per_patch)
        self.mlp = nn.Sequential(
            nn.Linear(width + patches * per_patch, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, pooled: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        grid = self.down(v).flatten(1)  # [B, P * per_patch]
        out: torch.Tensor = self.mlp(torch.cat([pooled, grid], dim=1)).squeeze(-1)
        return out


class _PairwiseRelations(nn.Module):
    """Each text token attends (one head) to the patches; the attention's centroid is where
    the token "looks". For every ordered token pair, a gate from the two tokens multiplies a
    code of the centroids' difference, so how a position difference changes the score depends
    on which tokens look there: a first-order path for "X is above Y"."""

    def __init__(self, width: int, patches: int, compete: bool = False) -> None:
        super().__init__()
        self.compete = compete
        side = round(patches**0.5)
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij"
        )
        self.register_buffer("xy", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1))
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width)
        self.offset = nn.Linear(2, width)
        self.out = nn.Linear(width, width)

    def forward(self, t: torch.Tensor, mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = self.query(t) @ self.key(v).transpose(1, 2) / t.shape[-1] ** 0.5  # [B, L, P]
        if self.compete:  # slot-attention style: each patch is shared out among the tokens
            scores = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(dim=1)
            weights = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-6)
        else:
            weights = scores.softmax(dim=-1)
        centroid = weights @ self.xy  # [B, L, 2]
        offset = self.offset(centroid[:, :, None, :] - centroid[:, None, :, :])  # [B, L, L, W]
        gate = self.first(t)[:, :, None, :] + self.second(t)[:, None, :, :]  # [B, L, L, W]
        pair_mask = (mask[:, :, None] & mask[:, None, :]).to(t.dtype)[..., None]
        pooled = (gate * offset * pair_mask).sum(dim=(1, 2)) / pair_mask.sum(dim=(1, 2))
        out: torch.Tensor = self.out(pooled)
        return out


def attention_entropy(probe: Probe, d: Features, n: int = 256) -> list[float]:
    """Mean entropy (nats) of the real text tokens' cross-attention over the patches, per
    cross block, for captions with their own image. Uniform over P patches is ln P; an
    attention that settles on one of two objects covering ~10 of 64 patches is near ln 10."""
    f = probe.fusion
    rows = torch.arange(min(n, len(d.groups)))
    text, mask, image = d.text_tokens[rows], d.text_mask[rows], d.image_tokens[rows]
    out = []
    with torch.inference_mode():
        t, v, pad = probe.inputs(text, mask, image)
        for self_block, cross_block in zip(f.self_blocks, f.cross_blocks, strict=True):
            t = self_block(t, attn_mask=pad)
            block: Any = cross_block  # open_clip's block; its parts are untyped modules
            kv = block.ln_1_kv(v)
            _, weights = block.attn(
                block.ln_1(t), kv, kv,
                need_weights=True, average_attn_weights=False,
            )  # fmt: skip
            entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean(1)  # [B, L]
            out.append(round(float(entropy[mask].mean()), 3))
            t = cross_block(t, k_x=v, v_x=v)
    return out


def evaluate(probe: Probe, d: Features, k: int = 16) -> dict[str, float]:
    probe.eval()
    n = len(d.groups)
    similarity = d.text_emb @ d.image_emb.t()  # [T, I]; row i's right image is image i
    top = similarity.topk(k, dim=1).indices
    right = torch.arange(n)
    with torch.inference_mode():
        t_idx = right[:, None].expand(n, k).reshape(-1)
        i_idx = top.reshape(-1)
        logits = torch.cat(
            [
                probe(d.text_tokens[t], d.text_mask[t], d.image_tokens[i])
                for t, i in zip(t_idx.split(2048), i_idx.split(2048), strict=True)
            ]
        ).reshape(n, k)
        reranked = torch.gather(top, 1, logits.argsort(dim=1, descending=True))
        wins: dict[str, list[float]] = {name: [] for name in TWIN_KINDS.values()}
        correct = 0
        for g in d.groups.unique():
            members = torch.where(d.groups == g)[0]
            if len(members) != 4:
                continue
            t = members[:, None].expand(4, 4).reshape(-1)
            i = members[None, :].expand(4, 4).reshape(-1)
            pair = probe(d.text_tokens[t], d.text_mask[t], d.image_tokens[i]).reshape(4, 4)
            correct += int((pair.argmax(1) == torch.arange(4)).sum())
            for r in range(4):
                for j in range(4):
                    if j != r:
                        wins[TWIN_KINDS[r ^ j]].append(float(pair[r, r] > pair[r, j]))
    probe.train()
    out = {
        "dual_r1": float((top[:, 0] == right).float().mean()),
        "rerank_r1": float((reranked[:, 0] == right).float().mean()),
        "group_acc": correct / n,
    }
    out.update({name: float(np.mean(v)) for name, v in wins.items()})
    return {key: round(value, 3) for key, value in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--groups", type=int, default=16, help="twin groups per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--image-features", default="final", help="final | embed | block N")
    parser.add_argument("--position-code", type=float, default=0.0, help="scale; 0 = off")
    parser.add_argument(
        "--readout",
        choices=["mean", "gated", "pairwise", "pairwise-compete", "flat"],
        default="mean",
    )
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    spec = EncoderSpec(checkpoint=args.checkpoint, device="cpu", precision="fp32")
    encoder = load_encoder(spec)
    started = time.monotonic()
    train, test = (extract(encoder, p, args.image_features) for p in (args.train, args.test))
    print(
        f"features in {time.monotonic() - started:.0f} s: images {tuple(train.image_tokens.shape)}"
    )
    cfg = FusionConfig(
        text_width=train.text_tokens.shape[-1],
        image_width=train.image_tokens.shape[-1],
        layers=args.layers,
    )
    probe = Probe(cfg, train.image_tokens.shape[1], args.position_code, args.readout)
    optimizer = torch.optim.AdamW(
        probe.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98)
    )
    by_group = {int(g): torch.where(train.groups == g)[0] for g in train.groups.unique()}
    group_ids = [g for g, m in by_group.items() if len(m) == 4]
    train_view = train.head(600)
    started = time.monotonic()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen = rng.choice(group_ids, args.groups, replace=False)
        rows = torch.stack([by_group[int(g)] for g in chosen])  # [G, 4]
        g = len(rows)
        t_idx = [rows[:, :, None].expand(g, 4, 4).reshape(-1)]
        i_idx = [rows[:, None, :].expand(g, 4, 4).reshape(-1)]
        flat = rows.reshape(-1)
        same = torch.arange(g).repeat_interleave(4)
        similarity = train.text_emb[flat] @ train.image_emb[flat].t()
        similarity[same[:, None] == same[None, :]] = float("-inf")
        other_image = torch.multinomial(torch.softmax(similarity * 20, 1), 1).squeeze(1)
        other_text = torch.multinomial(torch.softmax(similarity.t() * 20, 1), 1).squeeze(1)
        t_idx += [flat, flat[other_text]]
        i_idx += [flat[other_image], flat]
        t_all, i_all = torch.cat(t_idx), torch.cat(i_idx)
        logits = probe(train.text_tokens[t_all], train.text_mask[t_all], train.image_tokens[i_all])
        labels = (t_all == i_all).float()
        block = logits[: g * 16].reshape(g, 4, 4)
        target = torch.arange(4).repeat(g)
        listwise = F.cross_entropy(block.reshape(-1, 4), target) + F.cross_entropy(
            block.transpose(1, 2).reshape(-1, 4), target
        )
        loss = F.binary_cross_entropy_with_logits(logits, labels) + listwise / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            line = {
                "step": step + 1,
                "seconds": round(time.monotonic() - started),
                "loss": round(float(loss.detach()), 3),
                "train_first_600": evaluate(probe, train_view),
                "test": evaluate(probe, test),
            }
            print(json.dumps(line), flush=True)
    entropy = attention_entropy(probe, test)
    patches = test.image_tokens.shape[1]
    print(
        f"cross-attention entropy per block (held-out, nats): {entropy}; uniform {np.log(patches):.3f}"
    )


if __name__ == "__main__":
    main()
