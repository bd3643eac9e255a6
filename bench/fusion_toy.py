"""Can a head learn *where* things are? A toy with perfect features, no towers involved.

    PYTHONPATH=. python bench/fusion_toy.py [--heads fusion,moments,film,flat,flat-slots,mlp] \
        [--tasks where,relation] [--steps 1500]

Each "image" is an 8x8 grid of patches. Two patches hold a colour (one-hot, 6 colours), every
patch carries a fixed 2-D sin/cos code of its position, and the rest is empty. Each "caption" is
5 tokens, `the A REL the B`, embedded by a learned table plus a learned position embedding (as a
text tower's output would carry word order). Labels are exact and balanced:

- `where`: is colour A in the half of the grid that REL names (left/right/top/bottom)?
  One object, one look-up: the easiest spatial question there is.
- `relation`: is colour A to the REL of colour B? The near-twin relation flip, stripped down.

Heads, all trained from scratch with AdamW (lr 1e-3, batch 256, fresh samples every step):

- `fusion`: the product's `FusionReranker` (2 self + cross-attention layers, width 64).
- `moments`: `fusion` plus a readout of spatial moments, mean over patches of
  (A x_p) * (B code_p), read by every text token: it differs between an image and its
  relation flip before any attention has been learned.
- `film`: the text's pooled state scales and shifts (FiLM) the channels of a 3-layer conv net
  over the patch grid, with coordinate channels, then a max-pool.
- `flat`: an MLP over the text's pooled state (one self-attention block) and the flattened
  grid of projected patches: position arrives by layout, so no attention has to settle.
- `flat-slots`: `flat` with the 5 embedded tokens side by side instead of pooled.
- `mlp`: the flattened one-hot grid and one-hot tokens into a 3-layer MLP: the baseline that
  needs no attention and no learned word or patch embedding.

It prints one JSON line per evaluation (accuracy on a fixed batch of 2,048 held-out samples)
and a table: the first step at which each head reached 0.9 accuracy, and its final accuracy.
Chance is 0.5. See docs/reranker.md for what it showed.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

# Run as a script, this file's folder is on sys.path, so the probe's code is importable.
from reranker_probe import sincos_2d
from torch import nn

from models.fusion import FusionConfig, FusionReranker

SIDE = 8
PATCHES = SIDE * SIDE
COLOURS = 6
WORDS = COLOURS + 4 + 1  # colours, left/right/top/bottom, "the"
THE = WORDS - 1
CODE = 16  # width of the fixed position code
WIDTH = 64


@dataclass
class Batch:
    words: torch.Tensor  # [B, 5] token ids
    grid: torch.Tensor  # [B, P, COLOURS] one-hot colour per patch (zero where empty)
    label: torch.Tensor  # [B] 1.0 = the caption is true


def sample(task: str, n: int, gen: torch.Generator) -> Batch:
    colour_a = torch.randint(0, COLOURS, (n,), generator=gen)
    colour_b = (colour_a + torch.randint(1, COLOURS, (n,), generator=gen)) % COLOURS
    relation = torch.randint(0, 4, (n,), generator=gen)
    # two different patches that differ in both x and y, so every relation is decided
    xa, ya = (
        torch.randint(0, SIDE, (n,), generator=gen),
        torch.randint(0, SIDE, (n,), generator=gen),
    )
    dx = torch.randint(1, SIDE, (n,), generator=gen)
    dy = torch.randint(1, SIDE, (n,), generator=gen)
    xb, yb = (xa + dx) % SIDE, (ya + dy) % SIDE
    if task == "where":
        half = SIDE // 2
        facts = torch.stack([xa < half, xa >= half, ya < half, ya >= half], dim=1)
    else:
        facts = torch.stack([xa < xb, xa > xb, ya < yb, ya > yb], dim=1)
    label = facts.gather(1, relation[:, None]).squeeze(1).float()
    grid = torch.zeros(n, PATCHES, COLOURS)
    rows = torch.arange(n)
    grid[rows, ya * SIDE + xa, colour_a] = 1.0
    grid[rows, yb * SIDE + xb, colour_b] = 1.0
    the = torch.full_like(colour_a, THE)
    words = torch.stack([the, colour_a, COLOURS + relation, the, colour_b], dim=1)
    return Batch(words, grid, label)


def position_code() -> torch.Tensor:
    """[P, CODE]: sin/cos of x and y at 4 frequencies each."""
    return sincos_2d(PATCHES, CODE, base=10.0)


class Captions(nn.Module):
    """Token table + learned position embedding: what a text tower's token output carries."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(WORDS, WIDTH)
        self.position = nn.Parameter(torch.randn(5, WIDTH) * 0.5)

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.table(words) + self.position
        return out


class FusionToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.captions = Captions()
        self.fusion = FusionReranker(
            FusionConfig(text_width=WIDTH, image_width=COLOURS + CODE, width=WIDTH)
        )
        self.register_buffer("code", position_code())

    def forward(self, words: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        patches = torch.cat([grid, self.code.expand(len(grid), -1, -1)], dim=-1)
        mask = torch.ones(words.shape, dtype=torch.bool)
        out: torch.Tensor = self.fusion(self.captions(words), mask, patches)
        return out


class MomentsToy(FusionToy):
    """The product's head plus a readout of spatial moments: S = mean over patches of
    (A x_p) * (B code_p), read by each text token through U. No attention has to be learned
    first: S already differs between an image and its relation flip."""

    def __init__(self) -> None:
        super().__init__()
        self.content = nn.Linear(COLOURS + CODE, WIDTH)
        self.where = nn.Linear(CODE, WIDTH)
        self.reader = nn.Linear(WIDTH, WIDTH)

    def forward(self, words: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        f = self.fusion
        patches = torch.cat([grid, self.code.expand(len(grid), -1, -1)], dim=-1)
        mask = torch.ones(words.shape, dtype=torch.bool)
        t = f.text_in(self.captions(words))
        v = f.image_in(patches)
        t = f.fuse(t, v, f.padding_mask(mask, t.dtype))
        logit = f.head(t.mean(dim=1)).squeeze(-1)
        moments = (self.content(patches) * self.where(self.code)).mean(dim=1)  # [B, W]
        extra = (self.reader(t) * moments[:, None, :]).sum(-1).mean(1) / WIDTH**0.5
        out: torch.Tensor = logit + extra
        return out


class FilmToy(nn.Module):
    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.captions = Captions()
        self.text_block = ResidualAttentionBlock(WIDTH, 4, 4.0, batch_first=True)
        self.image_in = nn.Linear(COLOURS + CODE, WIDTH)
        self.film = nn.ModuleList(nn.Linear(WIDTH, 2 * WIDTH) for _ in range(layers))
        self.convs = nn.ModuleList(nn.Conv2d(WIDTH + 2, WIDTH, 3, padding=1) for _ in range(layers))
        self.norms = nn.ModuleList(nn.GroupNorm(1, WIDTH) for _ in range(layers))
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, SIDE), torch.linspace(-1, 1, SIDE), indexing="ij"
        )
        self.register_buffer("coords", torch.stack([xs, ys])[None])
        self.register_buffer("code", position_code())
        self.out = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, 1))

    def forward(self, words: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        state = self.text_block(self.captions(words)).mean(dim=1)
        n = len(grid)
        patches = torch.cat([grid, self.code.expand(n, -1, -1)], dim=-1)
        h = self.image_in(patches).transpose(1, 2).reshape(n, WIDTH, SIDE, SIDE)
        for film, conv, norm in zip(self.film, self.convs, self.norms, strict=True):
            gamma, beta = film(state).chunk(2, dim=-1)
            x = norm(conv(torch.cat([h, self.coords.expand(n, -1, -1, -1)], dim=1)))
            h = h + F.relu(x * (1 + gamma[..., None, None]) + beta[..., None, None])
        out: torch.Tensor = self.out(h.amax(dim=(2, 3))).squeeze(-1)
        return out


class MlpToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(PATCHES * COLOURS + 5 * WORDS, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 1),
        )

    def forward(self, words: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        flat = torch.cat(
            [grid.flatten(1), F.one_hot(words, WORDS).float().flatten(1)], dim=1
        )  # fmt: skip
        out: torch.Tensor = self.net(flat).squeeze(-1)
        return out


class FlatToy(nn.Module):
    """The MLP baseline's grid input, but the caption arrives as one pooled vector from a
    self-attention block over its tokens (what a fusion head has), not as one-hot slots."""

    def __init__(self) -> None:
        super().__init__()
        self.captions = Captions()
        self.text_block = ResidualAttentionBlock(WIDTH, 4, 4.0, batch_first=True)
        self.register_buffer("code", position_code())
        self.image_in = nn.Linear(COLOURS + CODE, 16)
        self.net = nn.Sequential(
            nn.Linear(WIDTH + PATCHES * 16, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 1),
        )

    def forward(self, words: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        state = self.text_block(self.captions(words)).mean(dim=1)
        patches = torch.cat([grid, self.code.expand(len(grid), -1, -1)], dim=-1)
        flat = self.image_in(patches).flatten(1)
        out: torch.Tensor = self.net(torch.cat([state, flat], dim=1)).squeeze(-1)
        return out


class FlatSlotsToy(FlatToy):
    """FlatToy with the caption as its 5 token vectors side by side (which word is where is
    then kept by layout, as in the MLP baseline) instead of one pooled vector."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0] = nn.Linear(5 * WIDTH + PATCHES * 16, 256)

    def forward(self, words: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        state = self.captions(words).flatten(1)
        patches = torch.cat([grid, self.code.expand(len(grid), -1, -1)], dim=-1)
        flat = self.image_in(patches).flatten(1)
        out: torch.Tensor = self.net(torch.cat([state, flat], dim=1)).squeeze(-1)
        return out


HEADS: dict[str, type[nn.Module]] = {
    "fusion": FusionToy,
    "moments": MomentsToy,
    "flat": FlatToy,
    "flat-slots": FlatSlotsToy,
    "film": FilmToy,
    "mlp": MlpToy,
}


def run(head: str, task: str, steps: int, eval_every: int, seed: int) -> dict[str, object]:
    torch.manual_seed(seed)
    model = HEADS[head]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    train_gen = torch.Generator().manual_seed(seed + 1)
    held_out = sample(task, 2048, torch.Generator().manual_seed(seed + 2))
    reached: int | None = None
    accuracy = 0.5
    started = time.monotonic()
    for step in range(1, steps + 1):
        batch = sample(task, 256, train_gen)
        loss = F.binary_cross_entropy_with_logits(model(batch.words, batch.grid), batch.label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                logits = model(held_out.words, held_out.grid)
            accuracy = float(((logits > 0).float() == held_out.label).float().mean())
            if reached is None and accuracy >= 0.9:
                reached = step
            line = {
                "head": head,
                "task": task,
                "step": step,
                "loss": round(float(loss.detach()), 3),
            }
            print(json.dumps({**line, "held_out_accuracy": round(accuracy, 3)}), flush=True)
    return {
        "head": head,
        "task": task,
        "steps": steps,
        "first_step_at_0.9": reached,
        "final_accuracy": round(accuracy, 3),
        "seconds": round(time.monotonic() - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", default="fusion,film,mlp")
    parser.add_argument("--tasks", default="where,relation")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [
        run(head, task, args.steps, args.eval_every, args.seed)
        for task in args.tasks.split(",")
        for head in args.heads.split(",")
    ]
    print(json.dumps({"results": results}))
    print(f"{'head':8} {'task':9} {'steps':>6} {'first step at 0.9':>18} {'final acc':>10}")
    for r in results:
        print(
            f"{r['head']!s:8} {r['task']!s:9} {r['steps']!s:>6} "
            f"{r['first_step_at_0.9']!s:>18} {r['final_accuracy']!s:>10}"
        )


if __name__ == "__main__":
    main()
