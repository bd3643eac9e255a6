"""`xmodal serve | index | import | embed | search | train | eval | synth`.

Every option also reads from the environment (XMODAL_ prefix, __ for nesting) through the one
Settings class; a flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model (unset: the XMODAL_MODEL__* settings, else the model the data dir was embedded "
        "with, else ViT-B-32)"
    )
    group.add_argument("--model", help="open_clip architecture, or xmodal-tiny")
    group.add_argument("--pretrained", help="pretrained tag, local weights file, or none")
    group.add_argument("--checkpoint", type=Path, help="checkpoint written by `xmodal train`")
    group.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="auto: CUDA when there is one"
    )
    group.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "bf16-text", "fp16"],
        help="auto: fp16 on CUDA; on a CPU with bf16, the text tower in bf16",
    )
    group.add_argument("--cache-dir", type=Path, help="where downloaded weights are kept")


def _model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "name": args.model,
        "pretrained": args.pretrained,
        "checkpoint": args.checkpoint,
        "device": args.device,
        "precision": args.precision,
        "cache_dir": args.cache_dir,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def _settings(args: argparse.Namespace, **extra: Any) -> Any:
    from app.config import Settings

    overrides: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    model = _model_overrides(args)
    if model:
        overrides["model"] = model
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    return Settings(**overrides)


def _encoder_spec(args: argparse.Namespace) -> Any:
    from app.runtime import encoder_spec

    return encoder_spec(_settings(args))


# -- commands ------------------------------------------------------------------------------
def freeze_what_is_loaded() -> None:
    """The server's model, indexes and framework, loaded once, live as long as the process:
    take them out of the cyclic garbage collector's sight. With ViT-B-32 and 1M items a full
    collection walked ~450k objects in ~300 ms with the GIL held, a stall every request in
    flight felt (c16 p99 of 280-440 ms in runs whose p90 was under 100 ms); after the freeze
    it walks only what requests create. Not in `create_app`: a test process starts many apps,
    and frozen objects are never collected."""
    gc.collect()  # garbage made while loading, so that none is frozen
    gc.freeze()


def cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        from app.distributed.serve import run_serve

        return run_serve(
            args,
            _settings(
                args,
                host=args.host,
                port=args.port,
                api_key=args.api_key,
                reembed_on_model_change=True if args.reembed else None,
            ),
        )

    from app.saved_indexes import start_reading_index_files

    settings = _settings(
        args,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        reembed_on_model_change=True if args.reembed else None,
    )
    # Before the imports below (torch, open_clip: ~9 s on a 2-core AVX2 machine): at 1M vectors
    # reading the saved indexes takes seconds of mostly GIL-free work that can run meanwhile.
    index_files = start_reading_index_files(settings.data_dir)

    import uvicorn

    from app.main import create_app

    failed: list[str] = []
    server: uvicorn.Server | None = None

    def stop_on_failure(reason: str) -> None:
        # A server that can never become ready should exit, not idle behind a 503.
        failed.append(reason)
        print(f"xmodal: start-up failed: {reason}", file=sys.stderr)
        if server is not None:
            server.should_exit = True

    app = create_app(
        settings,
        on_startup_failure=stop_on_failure,
        on_loaded=freeze_what_is_loaded,
        index_files=index_files,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    server.run()
    return 2 if failed else 0


def cmd_index(args: argparse.Namespace) -> int:
    if args.url:
        from app.client import XmodalClient

        metadata = json.loads(args.metadata) if args.metadata else None
        count = 0
        with XmodalClient(args.url, api_key=args.api_key) as client:
            for item in client.upload(args.paths, metadata=metadata, batch=args.batch_size):
                count += 1
                if args.verbose:
                    print(
                        f"{item.id}\t{'duplicate' if item.duplicate else 'added'}\t{item.filename}"
                    )
        print(f"uploaded {count} files to {args.url}")
        return 0

    from app.library import Library, with_remembered_model
    from app.runtime import encoder_spec
    from app.services.bulk import index_paths
    from models.factory import load_encoder

    settings = with_remembered_model(_settings(args))
    encoder = load_encoder(encoder_spec(settings))
    library = Library.open(settings, encoder)
    stop = threading.Event()
    received: list[int] = []

    def stop_after_batch(signum: int, _frame: object) -> None:
        # First SIGTERM/SIGINT: commit the batch in hand and close cleanly; a second one kills.
        received.append(signum)
        stop.set()
        signal.signal(signum, signal.SIG_DFL)

    previous = {s: signal.signal(s, stop_after_batch) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        report = index_paths(
            library,
            [Path(p) for p in args.paths],
            batch_size=args.batch_size,
            workers=args.workers,
            metadata=json.loads(args.metadata) if args.metadata else None,
            progress=not args.quiet,
            stop=stop,
        )
    finally:
        library.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for path, reason in report.failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(
        f"{report.added} added, {report.skipped_known} already stored, {len(report.failed)} "
        f"failed, {report.texts_added} captions added, {report.images_per_s:.1f} images/s"
    )
    if report.interrupted:
        print(
            "interrupted: every batch before the signal is stored; run the same command again "
            "to finish (stored files are skipped)",
            file=sys.stderr,
        )
        return 128 + (received[0] if received else signal.SIGTERM)
    # Bad files are reported, not fatal; exit 1 only when nothing at all could be indexed.
    return 1 if report.failed and not (report.added or report.skipped_known) else 0


def cmd_embed(args: argparse.Namespace) -> int:
    from app.distributed.embed import run_embed

    return run_embed(args, _settings(args), _encoder_spec(args))


def cmd_import(args: argparse.Namespace) -> int:
    from app.library import Library
    from app.services.imports import import_paths
    from models.factory import load_encoder

    settings = _settings(args)
    encoder = load_encoder(_encoder_spec(args))
    library = Library.open(settings, encoder)
    try:
        report = import_paths(
            library,
            [Path(p) for p in args.paths],
            batch_rows=args.batch_rows,
            progress=not args.quiet,
        )
    finally:
        library.close()
    for path, reason in report.failed:
        print(f"{path}: {reason} (imported without its image file)", file=sys.stderr)
    print(
        f"{report.added} images and {report.texts_added} texts added, {report.skipped_known} "
        f"already stored, {report.without_file} without an image file; "
        f"{report.rows_per_s:,.0f} rows/s ({report.rows} rows in {report.import_s:.1f}s, "
        f"checked in {report.check_s:.1f}s, index {report.index_s:.1f}s)"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    results: list[dict[str, Any]]
    if args.url:
        from app.client import XmodalClient

        with XmodalClient(args.url, api_key=args.api_key) as client:
            hits = client.search_text(args.query, k=args.k, min_score=args.min_score)
        results = [{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits]
    else:
        from app.library import Library, with_remembered_model
        from app.runtime import encoder_spec
        from models.factory import load_encoder

        settings = with_remembered_model(_settings(args))
        encoder = load_encoder(encoder_spec(settings))
        library = Library.open(settings, encoder, lock=False)
        try:
            vector = encoder.encode_texts([args.query])
            found = library.images.search(vector, args.k)[0]
            items = library.store.get_many("image", [h.id for h in found])
            results = [
                {
                    "id": h.id,
                    "score": h.score,
                    "path": str(library.media.path_of(items[h.id].media_path or "")),
                    "metadata": items[h.id].metadata,
                }
                for h in found
                if h.id in items and (args.min_score is None or h.score >= args.min_score)
            ]
        finally:
            library.store.close()
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{r['score']:.4f}\t{r['id']}\t{r.get('path', '')}\t{json.dumps(r['metadata'])}")
    return 0


# TrainConfig fields that `xmodal train` exposes as options (flag -> field, help).
_TRAIN_OPTIONS: dict[str, str] = {
    "epochs": "passes over the CSV",
    "batch_size": "pairs per step",
    "lr": "peak learning rate (AdamW)",
    "seed": "same seed, same checkpoint",
    "caption_weight": "weight of the captioning loss",
    "grounding_weight": "weight of the phrase-grounding loss (CSV with boxes)",
    "workers": "image-loading threads",
    "max_minutes": "stop (and save) after this long; none: no limit",
}


def cmd_train(args: argparse.Namespace) -> int:
    from models.training.loop import TrainConfig, train

    given = {name: getattr(args, name) for name in _TRAIN_OPTIONS}
    config = TrainConfig(
        data=args.data,
        out=args.out,
        model=args.model or "xmodal-tiny",
        pretrained=args.pretrained or "none",
        checkpoint=args.checkpoint,
        freeze_towers=args.freeze_towers,
        device=args.device or "auto",
        **{k: v for k, v in given.items() if v is not None},
    )
    print(f"wrote {train(config)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from models.training.evaluation import eval_main, format_table

    if args.checkpoint is None and args.model is None:
        print("xmodal eval: give --checkpoint CKPT or --model M --pretrained P", file=sys.stderr)
        return 2
    result = eval_main(
        args.data,
        _encoder_spec(args),
        rerank_k=args.rerank_k,
        calibrate=args.calibrate,
        save=args.save,
    )
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from models.training.synthetic import synth_main

    print(synth_main(args.out, args.n, args.seed, args.hard))
    return 0


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per `_TRAIN_OPTIONS` entry, default None: a flag left out keeps TrainConfig's
    own default, which `_TrainHelp` shows (so the defaults live in one place)."""
    for name, text in _TRAIN_OPTIONS.items():
        kind = float if name in ("lr", "max_minutes") or name.endswith("_weight") else int
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=text)


class _HelpWithDefaults(argparse.HelpFormatter):
    """Shows an option's default when it has a real one (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default is not None and action.default is not False
        if action.option_strings and shown and action.default != argparse.SUPPRESS:
            text += " (default: %(default)s)"
        return text


class _TrainHelp(_HelpWithDefaults):
    """Shows TrainConfig's defaults; imports the training package only when help is printed."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action) or ""
        if action.dest in _TRAIN_OPTIONS:
            import dataclasses

            from models.training.loop import TrainConfig

            default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}[action.dest]
            text += f" (default: {'none' if default is None else default})"
        return text


def _min_score(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between -1 and 1 (a cosine similarity)")
    return value


def build_parser() -> argparse.ArgumentParser:
    from app.distributed.options import add_embed_options, add_serve_options

    parser = argparse.ArgumentParser(prog="xmodal", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server", formatter_class=_HelpWithDefaults)
    serve.add_argument("--host", help="address to listen on (else XMODAL_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (else XMODAL_PORT)")
    serve.add_argument("--data-dir", type=Path, help="where SQLite, media and indexes live")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1")
    serve.add_argument("--reembed", action="store_true", help="re-embed on a model change")
    serve.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="ray: Ray Serve replicas"
    )
    serve.add_argument(
        "--replicas", type=int, help="--engine ray: replicas per model deployment (default 1)"
    )
    serve.add_argument("--address", help="--engine ray: cluster to join (else a local one)")
    add_serve_options(serve)
    _add_model_options(serve)
    serve.set_defaults(func=cmd_serve)

    index = sub.add_parser(
        "index", help="index folders of images or a dataset CSV", formatter_class=_HelpWithDefaults
    )
    index.add_argument("paths", nargs="+", help="image files, folders (recursive) or a CSV")
    index.add_argument("--data-dir", type=Path, help="data dir to write (else XMODAL_DATA_DIR)")
    index.add_argument("--url", help="upload to a running server instead of a data dir")
    index.add_argument("--api-key", help="the server's API key, with --url")
    index.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    index.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="decoding processes beside the model",
    )
    index.add_argument("--metadata", help="JSON object stored with every image")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_options(index)
    index.set_defaults(func=cmd_index)

    embed = sub.add_parser(
        "embed",
        help="embed image files on a Ray cluster into Parquet shards (for `xmodal import`)",
        formatter_class=_HelpWithDefaults,
    )
    embed.add_argument("paths", nargs="+", help="image files, folders (recursive) or a CSV")
    embed.add_argument("--out", type=Path, required=True, help="folder of Parquet shards to write")
    embed.add_argument("--engine", choices=["ray"], default="ray", help="the distributed engine")
    embed.add_argument("--address", help="Ray cluster to join (else a local one on this machine)")
    embed.add_argument("--metadata", help="JSON object stored with every image")
    add_embed_options(embed)
    _add_model_options(embed)
    embed.set_defaults(func=cmd_embed, data_dir=None)

    imp = sub.add_parser(
        "import",
        help="import precomputed embeddings (Parquet, or clip-retrieval's output folder)",
        formatter_class=_HelpWithDefaults,
    )
    imp.add_argument(
        "paths",
        nargs="+",
        help="Parquet files or folders of them (columns: embedding, key, metadata, image_path, "
        "text), or a clip-retrieval output folder (img_emb/*.npy + metadata/*.parquet)",
    )
    imp.add_argument("--data-dir", type=Path, help="data dir to write (else XMODAL_DATA_DIR)")
    imp.add_argument("--batch-rows", type=int, default=20_000, help="rows per SQLite transaction")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_options(imp)
    imp.set_defaults(func=cmd_import)

    search = sub.add_parser(
        "search", help="text-to-image search", formatter_class=_HelpWithDefaults
    )
    search.add_argument("query", help="the text to search images with")
    search.add_argument("--k", type=int, default=10, help="results to return")
    search.add_argument(
        "--min-score",
        type=_min_score,
        help="drop results whose cosine score is below this (-1..1)",
    )
    search.add_argument("--data-dir", type=Path, help="data dir to read (else XMODAL_DATA_DIR)")
    search.add_argument("--url", help="ask a running server instead of a data dir")
    search.add_argument("--api-key", help="the server's API key, with --url")
    search.add_argument("--json", action="store_true", help="print JSON instead of lines")
    _add_model_options(search)
    search.set_defaults(func=cmd_search)

    train = sub.add_parser(
        "train", help="train a CoCa: towers and caption decoder", formatter_class=_TrainHelp
    )
    train.add_argument("--data", type=Path, required=True, help="CSV with filepath,caption")
    train.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    train.add_argument(
        "--freeze-towers", action="store_true", help="train only the caption decoder"
    )
    _add_train_options(train)
    _add_model_options(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "eval", help="Recall@1/5/10, with and without re-ranking", formatter_class=_HelpWithDefaults
    )
    evaluate.add_argument("--data", type=Path, required=True, help="CSV with filepath,caption")
    evaluate.add_argument(
        "--rerank-k", type=int, default=16, help="candidates the caption decoder re-ranks"
    )
    evaluate.add_argument(
        "--calibrate",
        action="store_true",
        help="fit the fusion weights on this CSV and store them in the checkpoint",
    )
    evaluate.add_argument(
        "--save", type=Path, help="with --calibrate: checkpoint to write (default: --checkpoint)"
    )
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_model_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    synth = sub.add_parser(
        "synth",
        help="write a synthetic shapes dataset (CSV + PNGs)",
        formatter_class=_HelpWithDefaults,
    )
    synth.add_argument("--out", type=Path, required=True, help="folder to write")
    synth.add_argument("--n", type=int, default=1000, help="image-caption pairs")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same files")
    synth.add_argument(
        "--hard",
        "--twins",
        dest="hard",
        action="store_true",
        help="near-twin groups: colour swap, shape swap, relation flip (--twins: old name)",
    )
    synth.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except Exception as exc:
        # Imported here, not before the command: they import torch (seconds), and `serve` starts
        # reading its indexes before that.
        from app.errors import XmodalError
        from app.library import DataDirLocked
        from index.store import StoreVersionError
        from models.checkpoint import CheckpointError
        from models.factory import WeightsUnavailable

        known = (
            XmodalError | DataDirLocked | StoreVersionError | CheckpointError | WeightsUnavailable
        )
        if isinstance(exc, known):
            print(f"xmodal: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
