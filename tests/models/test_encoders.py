"""Encoders: trimmed text tower equals open_clip, weights from files and checkpoints, offline."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint, save_checkpoint
from models.encoder import Encoder
from models.factory import (
    EncoderSpec,
    WeightsUnavailable,
    load_encoder,
    register_builtin_configs,
)
from models.text_tower import encode_text_trimmed
from tests.conftest import tiny_clip

MIXED = [
    "a",
    "a red circle left of a blue square",
    "photo",
    "a longer caption about a dog, a cat and a tree in a park",
    "",
]


@pytest.mark.parametrize(
    ("name", "custom_text"), [("clip", False), ("clip", True), ("xmodal-tiny", True)]
)
def test_trimmed_text_matches_open_clip(name: str, custom_text: bool) -> None:
    register_builtin_configs()
    name = tiny_clip() if name == "clip" else name
    torch.manual_seed(1)
    model = open_clip.create_model(name, force_custom_text=custom_text).eval()
    tokenizer = open_clip.get_tokenizer(name)
    tokens = tokenizer(MIXED)
    with torch.no_grad():
        stock = F.normalize(model.encode_text(tokens), dim=-1)
        trimmed = encode_text_trimmed(model, tokens)
    # The batch really is trimmed (its longest text is shorter than the context)...
    assert 10 < int((tokens != 0).sum(1).max()) < tokens.shape[1]
    torch.testing.assert_close(trimmed, stock, atol=1e-4, rtol=0)


def test_encode_outputs_are_normalised_float32(encoder: Encoder) -> None:
    texts = encoder.encode_texts(["one", "two words"])
    pixels = torch.rand(3, 3, encoder.image_size, encoder.image_size)
    images = encoder.encode_images(pixels)
    for out in (texts, images):
        assert out.dtype == np.float32 and out.shape[1] == encoder.dim
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert encoder.encode_texts([]).shape == (0, encoder.dim)


def test_random_init_is_reproducible(encoder: Encoder) -> None:
    again = load_encoder(EncoderSpec(name="xmodal-tiny", pretrained="none", device="cpu"))
    assert again.fingerprint == encoder.fingerprint


def test_local_weights_file(encoder: Encoder, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    state = {k: v + 0.01 for k, v in encoder.model.state_dict().items()}
    torch.save(state, path)
    loaded = load_encoder(EncoderSpec(name="xmodal-tiny", pretrained=str(path), device="cpu"))
    assert loaded.fingerprint != encoder.fingerprint
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        load_encoder(EncoderSpec(name="xmodal-tiny", pretrained=str(tmp_path / "nope.pt")))


def test_checkpoint_round_trip(encoder: Encoder, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    assert encoder.name == "xmodal-tiny" and encoder.has_reranker  # a tiny CoCa
    save_checkpoint(encoder.to_checkpoint(), path)
    ckpt = load_checkpoint(path)
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value), key
    loaded = load_encoder(EncoderSpec(checkpoint=path, device="cpu", precision="fp32"))
    assert loaded.fingerprint == encoder.fingerprint and loaded.has_reranker
    assert loaded.rerank_cfg == encoder.rerank_cfg
    np.testing.assert_array_equal(
        loaded.encode_texts(["same result"]), encoder.encode_texts(["same result"])
    )


def test_offline_pretrained_tag_fails_fast_with_fixes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as failure:
        load_encoder(
            EncoderSpec(name="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=tmp_path)
        )
    assert time.monotonic() - started < 10
    message = str(failure.value)
    assert "--pretrained /path" in message and "--checkpoint" in message and "cache" in message


def test_unknown_model_and_tag() -> None:
    with pytest.raises(WeightsUnavailable, match="unknown model"):
        load_encoder(EncoderSpec(name="no-such-model", pretrained="none"))
    with pytest.raises(WeightsUnavailable, match="no pretrained tag"):
        load_encoder(EncoderSpec(name="ViT-B-32", pretrained="not-a-tag"))


@pytest.mark.parametrize("precision", ["bf16-text", "bf16"])
def test_bf16_stays_close_to_fp32(encoder: Encoder, precision: str) -> None:
    low = load_encoder(
        EncoderSpec(name="xmodal-tiny", pretrained="none", device="cpu", precision=precision)
    )
    assert low.fingerprint == encoder.fingerprint  # same weights: the same collection
    texts = ["a red circle left of a blue square", "dog", "a city street at night with cars"]
    cosine = np.sum(low.encode_texts(texts) * encoder.encode_texts(texts), axis=1)
    assert cosine.min() > 0.99
    pixels = torch.rand(2, 3, encoder.image_size, encoder.image_size)
    image_cos = np.sum(low.encode_images(pixels) * encoder.encode_images(pixels), axis=1)
    if precision == "bf16-text":
        np.testing.assert_array_equal(image_cos, np.sum(encoder.encode_images(pixels) ** 2, axis=1))
    assert image_cos.min() > 0.99
