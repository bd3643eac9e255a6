"""Text tower speed per batch size: stock open_clip vs the project's forwards, against the peak.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/text_tower.py [--model ViT-B-32] [--seconds 1]
        [--batches 1,8,16,32] [--tokens 11 | --mixed 5,11] [--rounds 2] [--compile]
        [--json out.json]

Every text in a batch is a query of `--tokens` tokens (SOT and EOT included) padded to the
model's context, as the tokenizer gives it; with `--mixed LO,HI` each text's length is drawn
between LO and HI (bench/serve_load.py's queries are 5 to 11), and the FLOPs counted are those
of the real tokens (the useful work; padded variants run more). Variants (random weights: speed does not depend on
their values):

- `stock`: open_clip's `model.encode_text` (full context, nn.MultiheadAttention), fp32;
- `trimmed`: `text_forward(fast=False)`, run only up to the longest real token, stock blocks;
- `trimmed-bf16`: the same on a bfloat16 copy (what precision `bf16-text` ran before);
- `sdpa`: `text_forward`, trimmed, blocks through models/text_blocks.py (fused attention), fp32;
- `sdpa-bf16`: the same on a bfloat16 copy of the weights;
- `sdpa-bf16mm`: bfloat16 projections, float32 residual stream and LayerNorms
  (`bf16_matmuls`: what precision `bf16-text` runs);
- `sdpa-autocast`: fp32 weights under `torch.autocast("cpu", bfloat16)`;
- `packed-bf16mm`: `pooled_text`, what the server runs: as `sdpa-bf16mm`, with the rows of a
  batch laid end to end so that no projection or MLP works on padding;
- `compiled-bf16mm` (`--compile`): `sdpa-bf16mm` with the blocks under `torch.compile`; the
  compile time of each new shape is printed and kept out of the timing.

Rounds alternate the variants (A B C A B C ...) so that all see the same machine load; each
row gives the median and the fastest ms per batch over all its calls (on a loaded machine the
fastest call says more about the code, the median about what a request sees); GFLOP/s and the
fractions of the peak are for the median. FLOPs are counted analytically for the
tokens each variant runs (77 for stock, the query length otherwise): per token and layer
2 x (4 W^2 + 2 W x mlp width) for the projections and MLP, plus 4 x L x W for attention
(scores and weighted sum, counted in full, not halved for the causal mask), plus the final
projection per text. The peak is a 2048^3 (fp32) and 4096^3 (bf16) torch.matmul, timed here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from models.factory import register_builtin_configs
from models.text_blocks import CompiledBlocks, bf16_matmuls
from models.text_tower import pooled_text, text_forward, text_transformer


def matmul_peak(dtype: torch.dtype, n: int, seconds: float) -> float:
    """GFLOP/s of the best n^3 matmul among those run in `seconds` (after one warm-up)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def tower_flops(model: Any, batch: int, length: int) -> float:
    """Matmul FLOPs of the text tower on `batch` texts of `length` tokens."""
    tower = model.text if hasattr(model, "text") and model.text is not None else model
    transformer = tower.transformer
    width = int(transformer.width)
    mlp = int(transformer.resblocks[0].mlp.c_fc.out_features)
    per_token = 2 * (4 * width * width + 2 * width * mlp) + 4 * length * width
    projection = tower.text_projection
    embed = 0
    if projection is not None:
        embed = int(
            projection.out_features if hasattr(projection, "out_features") else projection.shape[1]
        )
    return batch * (length * per_token * int(transformer.layers) + 2 * width * embed)


def query_tokens(model: Any, batch: int, tokens: int | tuple[int, int]) -> torch.Tensor:
    """[batch, context] ids: SOT, tokens - 2 word ids, EOT (the highest id), then padding;
    `tokens` a (low, high) pair draws each row's length between the two."""
    context = int(model.context_length if hasattr(model, "context_length") else 77)
    vocab = int(model.vocab_size if hasattr(model, "vocab_size") else 49408)
    gen = torch.Generator().manual_seed(0)
    low, high = (tokens, tokens) if isinstance(tokens, int) else tokens
    lengths = torch.randint(low, high + 1, (batch,), generator=gen)
    ids = torch.zeros(batch, context, dtype=torch.long)
    ids[:, 0] = vocab - 2
    for row, length in enumerate(lengths.tolist()):
        ids[row, 1 : length - 1] = torch.randint(1, vocab - 2, (length - 2,), generator=gen)
        ids[row, length - 1] = vocab - 1
    return ids


def variants(model: Any, compile_blocks: bool) -> dict[str, Callable[[torch.Tensor], Any]]:
    low = copy.deepcopy(model).to(torch.bfloat16)
    mixed = copy.deepcopy(model)
    bf16_matmuls(text_transformer(mixed))
    out: dict[str, Callable[[torch.Tensor], Any]] = {
        "stock": lambda t: model.encode_text(t),
        "trimmed": lambda t: text_forward(model, t, fast=False),
        "trimmed-bf16": lambda t: text_forward(low, t, fast=False),
        "sdpa": lambda t: text_forward(model, t),
        "sdpa-bf16": lambda t: text_forward(low, t),
        "sdpa-bf16mm": lambda t: text_forward(mixed, t),
        "packed-bf16mm": lambda t: pooled_text(mixed, t),
    }

    def autocast(t: torch.Tensor) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return text_forward(model, t)

    out["sdpa-autocast"] = autocast
    if compile_blocks:
        blocks = CompiledBlocks(text_transformer(mixed))
        out["compiled-bf16mm"] = lambda t: text_forward(mixed, t, compiled=blocks)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip name or xmodal-tiny")
    p.add_argument("--batches", default="1,8,16,32")
    p.add_argument("--tokens", type=int, default=11, help="query length, SOT and EOT included")
    p.add_argument("--mixed", help="LO,HI: each text's length drawn between the two")
    p.add_argument("--seconds", type=float, default=1.0, help="timing per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    p.add_argument("--only", help="comma-separated variant names to run")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import open_clip

    register_builtin_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval().requires_grad_(False)
    peak = {
        "fp32": matmul_peak(torch.float32, 2048, 2.0),
        "bf16": matmul_peak(torch.bfloat16, 4096, 2.0),
    }
    print(f"# {args.model}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    print(f"# matmul peak GFLOP/s: fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f}")
    runs = variants(model, args.compile)
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    batches = [int(b) for b in args.batches.split(",")]
    lengths: int | tuple[int, int] = args.tokens
    if args.mixed:
        low, high = (int(x) for x in args.mixed.split(","))
        lengths = (low, high)
    texts = {batch: query_tokens(model, batch, lengths) for batch in batches}
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for batch in batches:
            text = texts[batch]
            for name, fn in runs.items():  # warm-up (and compile) once per shape
                start = time.perf_counter()
                fn(text)
                first = time.perf_counter() - start
                if name.startswith("compiled"):
                    print(f"# {name} batch {batch}: first call {first:.1f} s", flush=True)
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    calls = times.setdefault((name, batch), [])
                    end = time.perf_counter() + args.seconds
                    while True:  # at least one call, however long
                        start = time.perf_counter()
                        fn(text)
                        calls.append(time.perf_counter() - start)
                        if time.perf_counter() >= end:
                            break
    context = int(texts[batches[0]].shape[1])
    rows = []
    print(f"{'variant':>14} {'batch':>5} {'ms':>9} {'min ms':>9} {'GFLOP':>7} {'GFLOP/s':>8} "
          f"{'%fp32':>6} {'%bf16':>6}")  # fmt: skip
    for (name, batch), calls in times.items():
        ms = statistics.median(calls) * 1e3
        best = min(calls) * 1e3
        if args.mixed:  # the real tokens, whatever the variant runs
            real = (texts[batch] != 0).sum(dim=1).tolist()
            gflop = sum(tower_flops(model, 1, n) for n in real) / 1e9
        else:
            length = context if name == "stock" else args.tokens
            gflop = tower_flops(model, batch, length) / 1e9
        rate = gflop / ms * 1e3
        row = {"variant": name, "batch": batch, "ms": ms, "min_ms": best, "calls": len(calls), "gflop": gflop,
               "gflops": rate, "frac_fp32": rate / peak["fp32"], "frac_bf16": rate / peak["bf16"]}  # fmt: skip
        rows.append(row)
        print(f"{name:>14} {batch:>5} {ms:>9.2f} {best:>9.2f} {gflop:>7.2f} {rate:>8.1f} "
              f"{100 * row['frac_fp32']:>5.1f}% {100 * row['frac_bf16']:>5.1f}%")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "peak": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
