"""Recall against hand-built embeddings, duplicate captions, re-ranking and calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import RerankConfig
from models.encoder import ImageTokens
from models.text_tower import TextOutput
from models.training.evaluation import evaluate, format_table, rank, recall_at_k, rerank


class HandEncoder:
    """Duck-typed Encoder whose embeddings are written by hand: image i is a solid picture
    whose red value is i; its embedding and the captions' are looked up in tables."""

    def __init__(
        self,
        image_vecs: dict[int, list[float]],
        text_vecs: dict[str, list[float]],
        match: dict[tuple[str, int], float] | None = None,
    ) -> None:
        self.image_vecs = image_vecs
        self.text_vecs = text_vecs
        self.match = match
        self._texts: list[str] = []
        self.rerank_cfg = RerankConfig(cosine_weight=0.0, caption_weight=1.0)

    @property
    def has_reranker(self) -> bool:
        return self.match is not None

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor([float(image.getpixel((0, 0))[0])])

    def _img(self, images: list[torch.Tensor]) -> torch.Tensor:
        vecs = torch.tensor([self.image_vecs[int(p.item())] for p in images])
        return torch.nn.functional.normalize(vecs, dim=-1)

    def encode_images(self, images: list[torch.Tensor]) -> np.ndarray:
        return self._img(images).numpy()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        vecs = torch.tensor([self.text_vecs[t] for t in texts])
        return torch.nn.functional.normalize(vecs, dim=-1).numpy()

    def image_tokens(self, images: list[torch.Tensor]) -> ImageTokens:
        ids = torch.stack(images).reshape(-1, 1, 1)  # the "patch tokens" carry the image id
        return ImageTokens(self._img(images), ids)

    def text_tokens(self, texts: list[str]) -> TextOutput:
        start = len(self._texts)
        self._texts.extend(texts)
        ids = torch.arange(start, start + len(texts), dtype=torch.float32).reshape(-1, 1, 1)
        pooled = torch.tensor([self.text_vecs[t] for t in texts])
        return TextOutput(pooled, ids, torch.ones(len(texts), 1, dtype=torch.bool))

    def caption_logprobs(
        self, text: TextOutput, image_tokens: torch.Tensor, pairs: list[tuple[int, int]]
    ) -> np.ndarray:
        assert self.match is not None
        out = []
        for t, i in pairs:
            caption = self._texts[int(text.tokens[t, 0, 0].item())]
            out.append(np.log(self.match.get((caption, int(image_tokens[i, 0, 0].item())), 0.1)))
        return np.array(out, dtype=np.float32)

    def prior_logprobs(self, text: TextOutput, rows: list[int]) -> np.ndarray:
        return np.full(len(rows), np.log(0.5), dtype=np.float32)

    def pair_cosines(
        self, text: TextOutput, image: ImageTokens, pairs: list[tuple[int, int]]
    ) -> np.ndarray:
        t = torch.nn.functional.normalize(text.pooled, dim=-1)
        return np.array([float(t[a] @ image.pooled[b]) for a, b in pairs], dtype=np.float32)

    def rerank_scores(
        self, text: TextOutput, image: ImageTokens, pairs: list[tuple[int, int]], **_: Any
    ) -> np.ndarray:
        return self.caption_logprobs(text, image.tokens, pairs)


def _dataset(tmp_path: Path, rows: list[tuple[int, str]]) -> Path:
    lines = ["filepath,caption"]
    for image_id, caption in rows:
        name = f"{image_id}.png"
        if not (tmp_path / name).exists():
            Image.new("RGB", (4, 4), (image_id, 0, 0)).save(tmp_path / name)
        lines.append(f"{name},{caption}")
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_recall_hand_checked(tmp_path: Path) -> None:
    # Three pairs. Text "a" is nearest image 0 (right); "b" is nearest image 2, then 1 (right
    # at rank 2); "c" is nearest image 1, then 0, then 2 (right at rank 3).
    images = {0: [1.0, 0.0, 0.0], 1: [0.0, 1.0, 0.0], 2: [0.0, 0.0, 1.0]}
    texts = {"a": [1.0, 0.1, 0.0], "b": [0.0, 0.5, 1.0], "c": [0.6, 1.0, 0.0]}
    csv_path = _dataset(tmp_path, [(0, "a"), (1, "b"), (2, "c")])
    result = evaluate(csv_path, HandEncoder(images, texts), rerank_k=0)  # type: ignore[arg-type]
    assert result["n"] == 3
    # text->image: a@1, b@2, c@3
    assert result["text_to_image"] == {"R@1": pytest.approx(1 / 3), "R@5": 1.0, "R@10": 1.0}
    # image->text: image 0 -> a (0.995) before c (0.51): hit@1; image 1 -> c (0.857) before
    # b (0.447): rank 2; image 2 -> b (0.894), then a and c tie at 0 and the tie keeps
    # gallery order (a, b, c): its caption c is at rank 3.
    assert result["image_to_text"] == {"R@1": pytest.approx(1 / 3), "R@5": 1.0, "R@10": 1.0}
    assert "text_to_image_rerank" not in result
    assert "R@1" in format_table(result)


def test_recall_at_k_and_rank() -> None:
    sim = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    ranking = rank(sim)
    assert ranking.tolist() == [[1, 2, 0], [0, 1, 2]]
    relevant = np.array([[True, False, False], [True, False, False]])
    assert recall_at_k(ranking, relevant, ks=(1, 2, 3)) == {"R@1": 0.5, "R@2": 0.5, "R@3": 1.0}


def test_duplicate_captions_are_one_query_with_two_answers(tmp_path: Path) -> None:
    images = {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [0.7, 0.7]}
    texts = {"same": [0.0, 1.0], "other": [1.0, 0.0]}
    # Rows 0 and 1 share the caption "same": both images 0 and 1 are right answers for it.
    csv_path = _dataset(tmp_path, [(0, "same"), (1, "same"), (2, "other")])
    result = evaluate(csv_path, HandEncoder(images, texts), rerank_k=0)  # type: ignore[arg-type]
    # "same" finds image 1 first (a right answer); "other" finds image 0, then 2 (rank 2).
    assert result["text_to_image"]["R@1"] == pytest.approx(1 / 2)
    # Image 0 -> "other" first (wrong: its caption is "same"), image 1 -> "same",
    # image 2 -> tie broken by gallery order ("other" < "same" sorted) -> right.
    assert result["image_to_text"]["R@1"] == pytest.approx(2 / 3)


def test_rerank_reorders_when_the_decoder_says_so(tmp_path: Path) -> None:
    # The dual encoder ranks the twin image 1 above the right image 0 for "x", and the
    # caption decoder knows better.
    images = {0: [1.0, 0.2], 1: [1.0, 0.0], 2: [0.0, 1.0]}
    texts = {"x": [1.0, 0.0], "y": [0.0, 1.0]}
    match: dict[tuple[str, int], float] = {("x", 0): 0.9, ("x", 1): 0.2, ("y", 2): 0.95}
    # Image 1 is in the gallery as a distractor, with a caption far from both queries.
    csv_path = _dataset(tmp_path, [(0, "x"), (2, "y"), (1, "z")])
    encoder = HandEncoder(images, {**texts, "z": [-1.0, 0.0]}, match)
    result: dict[str, Any] = evaluate(csv_path, encoder, rerank_k=2)  # type: ignore[arg-type]
    assert result["text_to_image"]["R@1"] == pytest.approx(1 / 3)  # only "y" right at 1
    assert result["text_to_image_rerank"]["R@1"] == pytest.approx(2 / 3)  # "x" fixed
    assert set(result) >= {
        "n", "text_to_image", "image_to_text", "text_to_image_rerank", "image_to_text_rerank",
        "rerank_variants", "rerank_latency", "rerank_config",
    }  # fmt: skip
    # Calibration picks weights under which re-ranking is at least as good as the dual order.
    fitted = evaluate(csv_path, encoder, rerank_k=2, calibrate=True)  # type: ignore[arg-type]
    assert fitted["text_to_image_rerank"]["R@1"] == pytest.approx(2 / 3)
    assert fitted["rerank_config"]["caption_weight"] == 1.0
    # Image queries get weights of their own, and never measure below the dual order here.
    assert fitted["rerank_config"]["image_query_caption_weight"] in (0.0, 1.0)
    assert fitted["image_to_text_rerank"]["R@1"] >= fitted["image_to_text"]["R@1"]


def test_rerank_keeps_tail_and_ties() -> None:
    ranking = np.array([[5, 3, 1, 0]])
    assert rerank(ranking, np.array([[0.1, 0.8]])).tolist() == [[3, 5, 1, 0]]
    assert rerank(ranking, np.array([[0.5, 0.5]])).tolist() == [[5, 3, 1, 0]]
