"""The Ray options of `xmodal embed` and `xmodal serve --engine ray` (kept apart from
app/cli.py, and free of Ray imports: `xmodal --help` works without Ray)."""

from __future__ import annotations

import argparse


def add_embed_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray Data")
    group.add_argument("--shard-size", type=int, default=10_000, help="files per Parquet shard")
    group.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    group.add_argument(
        "--actors", type=int, help="embedding actors (default: one per GPU, else CPUs/2)"
    )
    group.add_argument(
        "--actor-cpus", type=float, default=1.0, help="CPUs per embedding actor without GPUs"
    )


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--engine ray")
    group.add_argument(
        "--min-replicas", type=int, help="autoscaling lower bound (instead of --replicas)"
    )
    group.add_argument(
        "--max-replicas", type=int, help="autoscaling upper bound (instead of --replicas)"
    )
    group.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs per model replica without GPUs"
    )
    group.add_argument(
        "--replica-gpus",
        type=float,
        help="GPUs per model replica (default: 1 if the cluster has GPUs)",
    )
    group.add_argument(
        "--replica-batching",
        choices=["serve", "xmodal", "ingress"],
        default="serve",
        help="serve: @serve.batch in each replica; xmodal: xmodal's DynamicBatcher in each "
        "replica; ingress: batches cut in the ingress, one remote call per batch",
    )
