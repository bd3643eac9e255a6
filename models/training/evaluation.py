"""Retrieval evaluation: Recall@1/5/10 both ways, with and without re-ranking by CoCa's decoder.

Re-ranking reorders each query's top `rerank_k` dual-encoder candidates by the fused score
(models/checkpoint.py `RerankConfig`): cosine_weight x cosine + caption_weight x the mean
log p(caption token | prefix, image); for image queries optionally minus the caption's prior
under an empty image (VisualGPTScore's debiasing). The result also reports each variant
(caption score alone, raw vs debiased for image-to-text), the pairwise win rate of the true
pair over each kind of near twin (when the CSV has a `twin` column, as `xmodal synth --hard`
writes) for the cosine and the fused score, and the re-ranking latency.

`calibrate` fits the fusion weights on a labelled CSV: a grid over cosine_weight with
caption_weight 1 (and caption_weight 0, which is the dual encoder's order), for text queries
and, with raw or debiased caption scores, separately for image queries, each by Recall@1.
Fit on a split other than the one you report.

Duplicates: the image gallery is the set of distinct image files and the text gallery the set
of distinct caption strings (a caption written twice is one gallery entry, as it would be in a
text index). A text and an image are a match when some CSV row pairs them. A text-to-image
query is each distinct caption; it hits if any matching image is in its top k (a caption used
for two images has two right answers). An image-to-text query is each distinct image; it hits
if its own row's caption (or any caption of a row with that image) is in its top k. Without
duplicates this is the usual one-right-answer recall.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.checkpoint import RerankConfig, load_checkpoint, save_checkpoint
from models.encoder import Encoder, ImageTokens
from models.factory import EncoderSpec, load_encoder
from models.text_tower import TextOutput
from models.training.loop import read_rows

log = logging.getLogger(__name__)

KS = (1, 5, 10)
DIRECTIONS = ("text_to_image", "image_to_text", "text_to_image_rerank", "image_to_text_rerank")


def recall_at_k(
    ranking: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, float]:
    """ranking [Q, C] candidate indices best first (C may be fewer than the gallery);
    relevant [Q, G] bool. Fraction of queries with a relevant candidate in the top k."""
    hits = np.take_along_axis(relevant, ranking, axis=1)  # [Q, C]
    out = {}
    for k in ks:
        out[f"R@{k}"] = float(hits[:, :k].any(axis=1).mean()) if len(hits) else 0.0
    return out


def rank(similarity: np.ndarray) -> np.ndarray:
    """[Q, G] scores -> [Q, G] gallery indices, best first; ties keep gallery order."""
    return np.argsort(-similarity, axis=1, kind="stable")


def rerank(ranking: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Reorder each row's first K candidates (ranking [Q, >=K]) by scores [Q, K] (higher first;
    ties keep the dual-encoder order); candidates after K keep their place."""
    k = scores.shape[1]
    order = np.argsort(-scores, axis=1, kind="stable")
    head = np.take_along_axis(ranking[:, :k], order, axis=1)
    return np.concatenate([head, ranking[:, k:]], axis=1)


def _encode_images(
    encoder: Encoder, paths: list[Path], batch: int
) -> tuple[np.ndarray, ImageTokens | None]:
    embs, tokens = [], []
    for start in range(0, len(paths), batch):
        pixels = []
        for p in paths[start : start + batch]:
            with Image.open(p) as img:
                pixels.append(encoder.preprocess_image(img.convert("RGB")))
        if encoder.has_reranker:
            out = encoder.image_tokens(pixels)
            embs.append(out.pooled.cpu().numpy())
            tokens.append(out.tokens)
        else:
            embs.append(encoder.encode_images(pixels))
    emb = np.concatenate(embs)
    return emb, ImageTokens(torch.from_numpy(emb), torch.cat(tokens)) if tokens else None


def _text_tokens(encoder: Encoder, texts: list[str], batch: int) -> TextOutput:
    """Token features and ids of all texts, padded to one length (chunks trim to their own
    longest)."""
    outs = [encoder.text_tokens(texts[s : s + batch]) for s in range(0, len(texts), batch)]
    length = max(o.tokens.shape[1] for o in outs)
    pad = torch.nn.functional.pad
    tokens = torch.cat([pad(o.tokens, (0, 0, 0, length - o.tokens.shape[1])) for o in outs])
    mask = torch.cat([pad(o.mask, (0, length - o.mask.shape[1])) for o in outs])
    ids = None
    if all(o.ids is not None for o in outs):
        ids = torch.cat(
            [pad(o.ids, (0, length - o.ids.shape[1])) for o in outs if o.ids is not None]
        )
    return TextOutput(torch.cat([o.pooled for o in outs]), tokens, mask, ids)


@dataclass
class _PairScores:
    cosine: np.ndarray  # [Q, K]
    caption: np.ndarray  # [Q, K] mean log p(text | image)
    prior: np.ndarray | None = None  # [Q, K] mean log p(text | empty image), image queries


def _pair_scores(
    encoder: Encoder,
    texts: TextOutput,
    images: ImageTokens,
    pairs: list[tuple[int, int]],
    shape: tuple[int, int],
    *,
    with_prior: bool = False,
) -> _PairScores:
    cos = encoder.pair_cosines(texts, images, pairs).reshape(shape)
    gen = encoder.caption_logprobs(texts, images.tokens, pairs).reshape(shape)
    prior = None
    if with_prior:
        rows = sorted({t for t, _ in pairs})
        by_row = dict(zip(rows, encoder.prior_logprobs(texts, rows), strict=True))
        prior = np.array([by_row[t] for t, _ in pairs], dtype=np.float32).reshape(shape)
    return _PairScores(cos, gen, prior)


def fuse(scores: _PairScores, cfg: RerankConfig, *, text_query: bool) -> np.ndarray:
    gen = scores.caption
    if not text_query and cfg.debias_image_to_text and scores.prior is not None:
        gen = gen - scores.prior
    cosine_weight, caption_weight = cfg.weights(text_query=text_query)
    return cosine_weight * scores.cosine + caption_weight * gen


def _candidate_pairs(ranking: np.ndarray, *, text_queries: bool) -> list[tuple[int, int]]:
    q = ranking.shape[0]
    return [(qi, int(c)) if text_queries else (int(c), qi) for qi in range(q) for c in ranking[qi]]


def _twin_pairs(
    rows: Any, text_pos: dict[str, int], image_pos: dict[Path, int]
) -> dict[str, list[tuple[int, int, int]]]:
    """Per twin kind: (text, right image, twin image) triples, both ways round (the base
    row's caption against the twin's image, and the twin's caption against the base image)."""
    if rows.twins is None or rows.groups is None:
        return {}
    base: dict[str, tuple[int, int]] = {}
    for path, caption, group, kind in zip(
        rows.paths, rows.captions, rows.groups, rows.twins, strict=True
    ):
        if kind == "base":
            base[group] = (text_pos[caption], image_pos[path.resolve()])
    out: dict[str, list[tuple[int, int, int]]] = {}
    for path, caption, group, kind in zip(
        rows.paths, rows.captions, rows.groups, rows.twins, strict=True
    ):
        if kind == "base" or group not in base:
            continue
        bt, bi = base[group]
        tt, ti = text_pos[caption], image_pos[path.resolve()]
        out.setdefault(kind, []).extend([(bt, bi, ti), (tt, ti, bi)])
    return out


def _win_rates(
    encoder: Encoder,
    texts: TextOutput,
    images: ImageTokens,
    triples: dict[str, list[tuple[int, int, int]]],
    cfg: RerankConfig,
) -> dict[str, dict[str, float]]:
    """Share of (text, right image, twin image) triples where the right pair scores higher."""
    out: dict[str, dict[str, float]] = {"cosine": {}, "caption": {}, "fusion": {}}
    for kind, items in sorted(triples.items()):
        pairs = [(t, i) for t, right, twin in items for i in (right, twin)]
        scores = _pair_scores(encoder, texts, images, pairs, (len(items), 2))
        fused = fuse(scores, cfg, text_query=True)
        for name, value in (
            ("cosine", scores.cosine),
            ("caption", scores.caption),
            ("fusion", fused),
        ):
            out[name][kind] = float((value[:, 0] > value[:, 1]).mean())
    return out


def _latency(
    encoder: Encoder, texts: TextOutput, images: ImageTokens, ranking: np.ndarray, n: int = 20
) -> dict[str, float]:
    """Milliseconds to re-rank one text query's candidates (cached image tokens; the decoder
    pass for K pairs and the fusion), over the first `n` queries."""
    times = []
    for qi in range(min(n, len(ranking))):
        pairs = [(qi, int(c)) for c in ranking[qi]]
        started = time.perf_counter()
        encoder.rerank_scores(texts, images, pairs, text_query=True)
        times.append((time.perf_counter() - started) * 1000)
    arr = np.array(times) if times else np.zeros(1)
    return {
        "candidates": int(ranking.shape[1]),
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
    }


def evaluate(
    csv_path: Path,
    encoder: Encoder,
    rerank_k: int = 16,
    batch_size: int = 256,
    *,
    calibrate: bool = False,
) -> dict[str, Any]:
    """The `xmodal eval --json` object: {"n", "text_to_image", "image_to_text"} and, when the encoder
    has a caption decoder and rerank_k > 0, the `_rerank` entries (each query's top rerank_k
    dual-encoder candidates re-ordered by the fused score), "rerank_variants", "win_rate"
    (with a `twin` column), "rerank_latency" and "rerank_config" (the weights used; with
    `calibrate`, the ones fitted here).

    With a decoder, every image's tokens are kept in memory (n x tokens x width floats:
    20 MB for 600 xmodal-tiny images, about 0.5 MB per coca_ViT-B-32 image)."""
    rows = read_rows(Path(csv_path))
    images = sorted({p.resolve() for p in rows.paths})
    texts = sorted(set(rows.captions))
    image_pos = {p: i for i, p in enumerate(images)}
    text_pos = {t: i for i, t in enumerate(texts)}
    relevant = np.zeros((len(texts), len(images)), dtype=bool)  # [T, I]
    for path, caption in zip(rows.paths, rows.captions, strict=True):
        relevant[text_pos[caption], image_pos[path.resolve()]] = True

    image_emb, image_tokens = _encode_images(encoder, images, batch_size)
    text_out = _text_tokens(encoder, texts, batch_size) if encoder.has_reranker else None
    if text_out is not None:
        text_emb = torch.nn.functional.normalize(text_out.pooled.float(), dim=-1).cpu().numpy()
    else:
        text_emb = np.concatenate(
            [
                encoder.encode_texts(texts[s : s + batch_size])
                for s in range(0, len(texts), batch_size)
            ]
        )
    similarity = text_emb @ image_emb.T  # [T, I]
    t2i, i2t = rank(similarity), rank(similarity.T)
    result: dict[str, Any] = {
        "n": len(rows.paths),
        "text_to_image": recall_at_k(t2i, relevant),
        "image_to_text": recall_at_k(i2t, relevant.T),
    }
    if text_out is None or image_tokens is None or rerank_k <= 0:
        return result
    cfg = encoder.rerank_cfg
    k = min(rerank_k, len(images))
    t_scores = _pair_scores(
        encoder, text_out, image_tokens, _candidate_pairs(t2i[:, :k], text_queries=True),
        (len(texts), k),
    )  # fmt: skip
    k = min(rerank_k, len(texts))
    i_scores = _pair_scores(
        encoder, text_out, image_tokens, _candidate_pairs(i2t[:, :k], text_queries=False),
        (len(images), k), with_prior=True,
    )  # fmt: skip

    def t2i_recall(c: RerankConfig) -> dict[str, float]:
        return recall_at_k(rerank(t2i, fuse(t_scores, c, text_query=True)), relevant)

    def i2t_recall(c: RerankConfig) -> dict[str, float]:
        return recall_at_k(rerank(i2t, fuse(i_scores, c, text_query=False)), relevant.T)

    if calibrate:
        cfg = _fit(cfg, t2i_recall, i2t_recall)
    result["text_to_image_rerank"] = t2i_recall(cfg)
    result["image_to_text_rerank"] = i2t_recall(cfg)
    caption_only = replace(
        cfg, cosine_weight=0.0, caption_weight=1.0,
        image_query_cosine_weight=None, image_query_caption_weight=None,
    )  # fmt: skip
    result["rerank_variants"] = {
        "text_to_image_caption_only": t2i_recall(caption_only),
        "image_to_text_raw": i2t_recall(replace(cfg, debias_image_to_text=False)),
        "image_to_text_debiased": i2t_recall(replace(cfg, debias_image_to_text=True)),
        "image_to_text_caption_only_raw": i2t_recall(
            replace(caption_only, debias_image_to_text=False)
        ),
    }
    triples = _twin_pairs(rows, text_pos, image_pos)
    if triples:
        result["win_rate"] = _win_rates(encoder, text_out, image_tokens, triples, cfg)
    result["rerank_latency"] = _latency(
        encoder, text_out, image_tokens, t2i[:, : min(rerank_k, len(images))]
    )
    result["rerank_config"] = {k: v for k, v in cfg.to_dict().items() if k != "vocab"}
    return result


# Cosine weights tried with caption weight 1: steps of about sqrt(2), from the caption score
# alone to the cosine dominating.
_COSINE_GRID = (
    0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0,
    64.0, 96.0, 128.0,
)  # fmt: skip


def _fit(cfg: RerankConfig, t2i_recall: Any, i2t_recall: Any) -> RerankConfig:
    """Best Recall@1 (then R@5) over the grid, for each query kind on its own (image queries
    also choose raw or debiased); ties go to the smaller cosine weight. The dual encoder's own
    order (caption weight 0) is a candidate, so a fitted re-ranker never measures below it on
    the calibration data."""

    def key(r: dict[str, float]) -> tuple[float, float]:
        return (r["R@1"], r["R@5"])

    weights = [(w, 1.0) for w in _COSINE_GRID] + [(1.0, 0.0)]
    cosine, caption = max(  # max keeps the first best
        weights,
        key=lambda w: key(t2i_recall(replace(cfg, cosine_weight=w[0], caption_weight=w[1]))),
    )
    fitted = replace(cfg, cosine_weight=cosine, caption_weight=caption)
    image_query = [
        replace(fitted, image_query_cosine_weight=w, image_query_caption_weight=c,
                debias_image_to_text=d)
        for d in (False, True) for w, c in weights
    ]  # fmt: skip
    return max(image_query, key=lambda c: key(i2t_recall(c)))


def format_table(result: dict[str, Any]) -> str:
    """The eval object as a small text table (the non-JSON output of `xmodal eval`)."""
    keys = [f"R@{k}" for k in KS]
    lines = [f"n = {result['n']}", f"{'direction':<22}" + "".join(f"{k:>8}" for k in keys)]
    for name in DIRECTIONS:
        if name in result:
            lines.append(f"{name:<22}" + "".join(f"{result[name][k]:>8.3f}" for k in keys))
    for name, scores in result.get("win_rate", {}).items():
        wins = ", ".join(f"{kind} {value:.3f}" for kind, value in scores.items())
        lines.append(f"win rate vs twins ({name}): {wins}")
    if "rerank_latency" in result:
        lat = result["rerank_latency"]
        lines.append(
            f"re-ranking {lat['candidates']} candidates: p50 {lat['p50_ms']:.1f} ms, "
            f"p90 {lat['p90_ms']:.1f} ms"
        )
    return "\n".join(lines)


def eval_main(
    data: Path,
    spec: EncoderSpec,
    rerank_k: int = 16,
    *,
    calibrate: bool = False,
    save: Path | None = None,
) -> dict[str, Any]:
    """`xmodal eval --data CSV (--checkpoint CKPT | --model M --pretrained P) [--rerank-k K]
    [--calibrate [--save CKPT]]`: load the encoder, evaluate, return the result object (the
    CLI prints JSON or the table). With `calibrate`, the fitted fusion weights are written into
    `save` (default: the --checkpoint file; a pretrained model needs `save`)."""
    target = save or spec.checkpoint
    if calibrate and target is None:
        raise ValueError("--calibrate without --checkpoint needs --save PATH to write to")
    encoder = load_encoder(spec)
    if rerank_k > 0 and not encoder.has_reranker:
        log.info("model has no caption decoder (not a CoCa): reporting dual-encoder recall only")
    result = evaluate(Path(data), encoder, rerank_k=rerank_k, calibrate=calibrate)
    if calibrate and target is not None and encoder.has_reranker:
        fitted = RerankConfig.from_dict({**encoder.rerank_cfg.to_dict(), **result["rerank_config"]})
        if spec.checkpoint is not None and Path(spec.checkpoint).exists():
            ckpt = load_checkpoint(Path(spec.checkpoint))
            ckpt.rerank_cfg = fitted.to_dict()
            ckpt.info = {**ckpt.info, "calibrated_on": str(data)}
        else:
            ckpt = encoder.to_checkpoint(fitted, info={"calibrated_on": str(data)})
        save_checkpoint(ckpt, Path(target))
        log.info("wrote the fitted fusion weights %s into %s", result["rerank_config"], target)
    return result
