"""Train xmodal-tiny on a synthetic twin set, evaluate on the held-out twin split, log JSON.

    python bench/reranker_experiment.py --name NAME --train CSV --test CSV [--set key=value ...]

Each --set is a TrainConfig field (value parsed as JSON when it parses, else a string).
Appends one JSON line (config, seconds, final losses, eval result) to --log.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from models.evaluation import evaluate, format_table
from models.factory import EncoderSpec, load_encoder
from models.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, default=Path("artifacts/reranker"))
    parser.add_argument("--log", type=Path, default=Path("artifacts/reranker/log.jsonl"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rerank-k", type=int, default=16)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    ckpt = args.out_dir / f"{args.name}.pt"
    cfg = TrainConfig(data=args.train, out=ckpt, threads=args.threads, **overrides)
    start = time.monotonic()
    train(cfg)
    train_s = time.monotonic() - start
    encoder = load_encoder(EncoderSpec(checkpoint=ckpt, device=cfg.device, precision="fp32"))
    result = evaluate(args.test, encoder, rerank_k=args.rerank_k)
    info = torch.load(ckpt, map_location="cpu", weights_only=True)["info"]
    record = {
        "name": args.name,
        "set": overrides,
        "train_s": round(train_s, 1),
        "steps": info["steps"],
        "final_losses": info["final_losses"],
        "result": result,
    }
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(args.name, f"train {train_s:.0f}s", json.dumps(overrides))
    print(format_table(result))


if __name__ == "__main__":
    main()
