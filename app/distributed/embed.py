"""`xmodal embed --engine ray`: embed image files on a Ray cluster into Parquet shards.

The pipeline (Ray Data, streaming):

1. the driver lists the inputs with the rules of `xmodal index` (folders recursively, single
   files, dataset CSVs) and cuts the sorted list into shards of `shard_size` files; a shard
   whose Parquet file already exists in `--out` is skipped, so a re-run resumes;
2. CPU tasks read each file, hash it (SHA-256: the item's key), decode it safely and apply the
   model's preprocessing, exactly as `xmodal index` does (same `decode_image` limits and draft
   size, same transform, built from the model's configs without its weights);
3. an actor pool embeds the pixels: one GPU per actor where the cluster has GPUs, CPU actors
   otherwise, the pool sized from the cluster's resources;
4. the driver receives the rows in input order (2 KiB per image at 512 dimensions) and writes
   each shard when its last row arrives: to a hidden temporary file, then renamed, so a shard
   file is either complete or absent.

A shard's columns follow the contract of `xmodal import` (issue 13): `key` (the content
SHA-256; a key already stored is skipped on import), `image_path` (the absolute source file,
whose bytes the import stores), `embedding` (float32 list), `metadata` (a JSON object as text:
{"source": file name, "caption": ... from a CSV}), plus `sha256`, `path` and
`model_fingerprint`, which the import ignores. `_manifest.json` records the model; embedding
into a folder written by another model is refused (vectors of two models never mix).
The same content twice (two paths, one SHA-256) is written once, as `xmodal index` stores it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Settings
from app.services.bulk import iter_inputs
from models.factory import EncoderSpec

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
SHARD_COLUMNS = (
    "key",
    "image_path",
    "embedding",
    "metadata",
    "sha256",
    "path",
    "model_fingerprint",
)


class EmbedError(RuntimeError):
    """The out dir cannot take this run (another model's shards)."""


@dataclass
class Shard:
    index: int
    files: list[tuple[Path, str | None]]  # (absolute path, caption or None)

    @property
    def name(self) -> str:
        # The member list is part of the name: a different file list never reuses a shard.
        digest = hashlib.sha256("\n".join(str(p) for p, _ in self.files).encode()).hexdigest()
        return f"part-{self.index:05d}-{digest[:10]}.parquet"


@dataclass
class EmbedReport:
    files: int = 0
    shards: int = 0
    shards_skipped: int = 0
    embedded: int = 0
    duplicates: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    actors: int = 0
    gpus_per_actor: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


def plan_shards(paths: list[Path], shard_size: int) -> list[Shard]:
    inputs = sorted(
        {(p.resolve(), caption) for p, caption in iter_inputs(paths)}, key=lambda x: str(x[0])
    )
    return [
        Shard(i, inputs[start : start + shard_size])
        for i, start in enumerate(range(0, len(inputs), shard_size))
    ]


# -- the workers (Ray Data tasks and actors) ------------------------------------------------
def _decode_batch(
    batch: dict[str, np.ndarray],
    preprocess_cfg: dict[str, Any],
    model_cfg: dict[str, Any],
    limits: dict[str, int],
) -> dict[str, np.ndarray]:
    """CPU task: read, hash, decode, preprocess. Failures become rows with an `error`."""
    from index.media import file_sha256
    from models.factory import image_preprocess
    from models.inputs.decode import ImageError, decode_image

    transform = image_preprocess(preprocess_cfg, model_cfg)
    size = int(limits["image_size"])
    n = len(batch["path"])
    pixels = np.zeros((n, 3, size, size), dtype=np.float32)
    shas, errors = [""] * n, [""] * n
    for i, raw_path in enumerate(batch["path"]):
        path = Path(str(raw_path))
        try:
            nbytes = path.stat().st_size
            if nbytes > limits["max_bytes"]:
                raise ImageError(f"{nbytes} bytes is over the {limits['max_bytes']}-byte limit")
            shas[i], _ = file_sha256(path)
            # The arguments of `xmodal index` (bulk._ImageFiles): the same draft size, so JPEGs
            # are decoded at the same reduced scale and the vectors agree.
            decoded = decode_image(
                path, max_pixels=limits["max_pixels"], draft_px=limits["draft_px"]
            )
            pixels[i] = transform(decoded.image).numpy()
        except (ImageError, OSError) as exc:
            errors[i] = f"{type(exc).__name__}: {exc}"
    return {
        "shard": batch["shard"],
        "path": batch["path"],
        "caption": batch["caption"],
        "sha256": np.array(shas, dtype=object),
        "error": np.array(errors, dtype=object),
        "pixels": pixels,
    }


class _EmbedBatch:
    """Actor: holds the model; pixels in, unit vectors out (zeros for failed rows)."""

    def __init__(self, spec: dict[str, Any], threads: int):
        import torch

        from models.factory import load_encoder

        torch.set_num_threads(max(1, threads))
        self.encoder = load_encoder(EncoderSpec(**spec))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = batch.pop("pixels")
        good = np.array([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(good), self.encoder.dim), dtype=np.float32)
        if good.any():
            vectors[good] = self.encoder.encode_images(
                torch.from_numpy(np.ascontiguousarray(pixels[good]))
            )
        batch["embedding"] = vectors
        return batch


# -- the driver -----------------------------------------------------------------------------
def _check_manifest(out: Path, fingerprint: str, model: str, dim: int) -> None:
    path = out / MANIFEST
    if path.exists():
        found = json.loads(path.read_text())
        if found.get("model_fingerprint") != fingerprint:
            raise EmbedError(
                f"{out} holds shards of another model ({found.get('model')}, fingerprint "
                f"{found.get('model_fingerprint')}); embed into another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"model": model, "model_fingerprint": fingerprint, "dim": dim}))
    os.replace(tmp, path)


def existing_keys(out: Path) -> set[str]:
    import pyarrow.parquet as pq

    keys: set[str] = set()
    for shard in sorted(out.glob("part-*.parquet")):
        keys.update(pq.read_table(shard, columns=["key"]).column("key").to_pylist())
    return keys


def write_shard(out: Path, name: str, rows: list[dict[str, Any]], dim: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("key", pa.string()),
            ("image_path", pa.string()),
            ("embedding", pa.list_(pa.float32())),
            ("metadata", pa.string()),
            ("sha256", pa.string()),
            ("path", pa.string()),
            ("model_fingerprint", pa.string()),
        ]
    )
    columns: dict[str, Any] = {c: [r[c] for r in rows] for c in SHARD_COLUMNS if c != "embedding"}
    flat = np.concatenate([r["embedding"] for r in rows]) if rows else np.zeros(0, np.float32)
    offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32) * dim)
    columns["embedding"] = pa.ListArray.from_arrays(offsets, pa.array(flat, pa.float32()))
    table = pa.table({c: columns[c] for c in schema.names}, schema=schema)
    tmp = out / f".{name}.tmp"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out / name)


def _pool(resources: dict[str, float], actors: int | None, actor_cpus: float) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU; without GPUs, half the CPUs for the model
    (the other half decodes), `actor_cpus` each."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return (actors or gpus), 1.0
    cpus = resources.get("CPU", 1.0)
    return (actors or max(1, math.floor(cpus / 2 / actor_cpus))), 0.0


def _rows(ds: Any) -> Iterator[dict[str, Any]]:
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["path"])):
            yield {name: batch[name][i] for name in batch}


def embed_paths(
    paths: list[Path],
    out: Path,
    settings: Settings,
    spec: EncoderSpec,
    *,
    shard_size: int = 10_000,
    batch_size: int = 32,
    actors: int | None = None,
    actor_cpus: float = 1.0,
    metadata: dict[str, Any] | None = None,
) -> EmbedReport:
    """Embed every image under `paths` into Parquet shards in `out` on the connected Ray
    cluster (the caller runs `ray.init`)."""
    import ray

    from models.factory import load_encoder

    started = time.perf_counter()
    report = EmbedReport()
    # Loaded once here for what the workers must agree on: fingerprint, configs, size.
    encoder = load_encoder(EncoderSpec(**{**spec.__dict__, "device": "cpu"}))
    fingerprint = encoder.fingerprint
    _check_manifest(out, fingerprint, encoder.name, encoder.dim)
    shards = plan_shards(paths, shard_size)
    report.files = sum(len(s.files) for s in shards)
    report.shards = len(shards)
    todo = [s for s in shards if not (out / s.name).exists()]
    report.shards_skipped = len(shards) - len(todo)
    if not todo:
        report.seconds = time.perf_counter() - started
        return report
    seen = existing_keys(out)
    limits = {
        "image_size": encoder.image_size,
        "max_bytes": settings.limits.max_upload_bytes,
        "max_pixels": settings.limits.max_image_pixels,
        "draft_px": max(encoder.image_size, settings.thumbnail_px),
    }
    pool, gpus = _pool(ray.cluster_resources(), actors, actor_cpus)
    report.actors, report.gpus_per_actor = pool, gpus
    log.info("embedding %d shards with %d actors (%s GPU each)", len(todo), pool, gpus)

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back shard by shard
    ctx.enable_progress_bars = False
    items = [
        {"shard": s.index, "path": str(p), "caption": caption or ""}
        for s in todo
        for p, caption in s.files
    ]
    ds: Any = ray.data.from_items(
        items, override_num_blocks=max(1, math.ceil(len(items) / batch_size))
    )
    ds = ds.map_batches(  # stateless CPU tasks
        _decode_batch,
        fn_kwargs={
            "preprocess_cfg": encoder.preprocess_cfg,
            "model_cfg": encoder.model_cfg,
            "limits": limits,
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
    )
    ds = ds.map_batches(
        _EmbedBatch,
        fn_constructor_args=({**spec.__dict__}, max(1, int(actor_cpus))),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=0 if gpus else actor_cpus,
        num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=pool),
    )
    del encoder
    by_index = {s.index: s for s in todo}
    pending: dict[int, list[dict[str, Any]]] = {}
    received: dict[int, int] = {}
    extra = metadata or {}
    for row in _rows(ds):
        index = int(row["shard"])
        received[index] = received.get(index, 0) + 1
        path = str(row["path"])
        if row["error"]:
            report.failed.append((path, str(row["error"])))
            log.warning("skipped %s: %s", path, row["error"])
        elif row["sha256"] in seen:
            report.duplicates += 1
        else:
            seen.add(str(row["sha256"]))
            meta = {**extra, "source": Path(path).name}
            if row["caption"]:
                meta["caption"] = str(row["caption"])
            pending.setdefault(index, []).append(
                {
                    "key": str(row["sha256"]),
                    "image_path": path,
                    "embedding": np.asarray(row["embedding"], dtype=np.float32),
                    "metadata": json.dumps(meta),
                    "sha256": str(row["sha256"]),
                    "path": path,
                    "model_fingerprint": fingerprint,
                }
            )
        shard = by_index[index]
        if received[index] == len(shard.files):
            rows = pending.pop(index, [])
            write_shard(out, shard.name, rows, len(row["embedding"]))
            report.embedded += len(rows)
    report.seconds = time.perf_counter() - started
    return report


def read_shards(out: Path) -> Any:
    """All shards of `out` as one pyarrow Table (tests, checks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]
    return pa.concat_tables(tables) if tables else None


def connect(address: str | None) -> bool:
    """Join the cluster at `address`, or start a small local one (this machine's CPUs).
    True when this call started Ray here (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    return True


def run_embed(args: Any, settings: Settings, spec: EncoderSpec) -> int:
    """`xmodal embed --engine ray`."""
    import sys

    import ray

    started = connect(args.address)
    try:
        report = embed_paths(
            [Path(p) for p in args.paths],
            args.out,
            settings,
            spec,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            actors=args.actors,
            actor_cpus=args.actor_cpus,
            metadata=json.loads(args.metadata) if args.metadata else None,
        )
    except EmbedError as exc:
        print(f"xmodal: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            ray.shutdown()
    for path, reason in report.failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(
        f"{report.embedded} embedded into {report.shards - report.shards_skipped} new shards "
        f"({report.shards_skipped} already written), {report.duplicates} duplicates, "
        f"{len(report.failed)} failed, {report.actors} actors, {report.images_per_s:.1f} images/s"
    )
    return 1 if report.failed and not report.embedded and not report.shards_skipped else 0
