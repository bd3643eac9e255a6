"""Training the tiny CoCa: the losses fall (grounding too, with boxes), runs are
deterministic, checkpoints round-trip bit-exactly, data without boxes still trains, and a
local weights file or a checkpoint can be the starting point."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import load_checkpoint, save_checkpoint
from models.encoder import Encoder
from models.factory import EncoderSpec, load_encoder
from models.training.loop import TrainConfig, batches, train
from models.training.synthetic import write_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synth"), 16, seed=1, twins=True)


def _cfg(data: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "epochs": 4, "batch_size": 8, "lr": 2e-3, "warmup_steps": 2, "device": "cpu",
        "workers": 1, "seed": 3,
    }  # fmt: skip
    base.update(kw)
    return TrainConfig(data=data, out=out, **base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(_cfg(data, tmp_path_factory.mktemp("ck") / "a.pt"))


def _tiny_spec(**kw: object) -> EncoderSpec:
    return EncoderSpec(device="cpu", precision="fp32", **kw)  # type: ignore[arg-type]


def test_training_lowers_the_loss(trained: Path) -> None:
    info = load_checkpoint(trained).info
    assert info["steps"] == 8 and not info["stopped_early"]
    first, final = info["first_losses"], info["final_losses"]
    assert set(final) == {"itc", "caption", "ground", "loss"}  # boxes: grounding loss too
    assert info["grounding"] is True
    for key in ("loss", "itc", "caption", "ground"):
        assert final[key] < first[key], key
    # From scratch, the decoder's softmax runs over the training captions' tokens only.
    vocab = load_checkpoint(trained).rerank_cfg["vocab"]  # type: ignore[index]
    assert 10 < len(vocab) < 60


def test_training_without_boxes(data: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(data.open()))
    plain = data.parent / "plain.csv"
    with plain.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filepath", "caption"])
        writer.writerows((r["filepath"], r["caption"]) for r in rows)
    info = load_checkpoint(train(_cfg(plain, tmp_path / "p.pt", epochs=1))).info
    assert set(info["final_losses"]) == {"itc", "caption", "loss"} and not info["grounding"]


def test_same_seed_same_weights(data: Path, tmp_path: Path) -> None:
    a = load_checkpoint(train(_cfg(data, tmp_path / "1.pt", epochs=1)))
    b = load_checkpoint(train(_cfg(data, tmp_path / "2.pt", epochs=1)))
    assert a.state_dict.keys() == b.state_dict.keys() and a.rerank_cfg == b.rerank_cfg
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def _outputs(encoder: Encoder, data: Path) -> list[np.ndarray]:
    paths = sorted(data.parent.glob("images/*.png"))[:6]
    pixels = [encoder.preprocess_image(Image.open(p).convert("RGB")) for p in paths]
    texts = ["a red circle above a blue square", "a green star to the left of a yellow cross"]
    tokens = encoder.image_tokens(pixels)
    text_out = encoder.text_tokens(texts)
    pairs = [(t, i) for t in range(2) for i in range(6)]
    return [
        encoder.encode_images(pixels),
        encoder.encode_texts(texts),
        tokens.tokens.numpy(),
        encoder.rerank_scores(text_out, tokens, pairs, text_query=True),
    ]


def test_checkpoint_round_trips_bit_exactly(trained: Path, data: Path, tmp_path: Path) -> None:
    original = load_checkpoint(trained)
    first = load_encoder(_tiny_spec(checkpoint=trained))
    assert first.has_reranker
    # Save what was loaded, load it again: every tensor and every output must be identical.
    copy = tmp_path / "copy.pt"
    save_checkpoint(first.to_checkpoint(info=original.info), copy)
    again = load_checkpoint(copy)
    x, y = original.state_dict, again.state_dict
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
    assert (again.model_cfg, again.preprocess_cfg, again.rerank_cfg) == (
        original.model_cfg, original.preprocess_cfg, original.rerank_cfg
    )  # fmt: skip
    second = load_encoder(_tiny_spec(checkpoint=copy))
    assert second.fingerprint == first.fingerprint
    for a, b in zip(_outputs(first, data), _outputs(second, data), strict=True):
        assert np.array_equal(a, b)


def test_fine_tune_from_a_local_weights_file(data: Path, tmp_path: Path) -> None:
    import open_clip

    from models.decoder import init_text_projection
    from models.factory import register_builtin_configs

    register_builtin_configs()
    torch.manual_seed(123)
    model = open_clip.create_model("xmodal-tiny", pretrained=None)
    init_text_projection(model)
    start = model.state_dict()
    weights = tmp_path / "start.pt"
    torch.save(start, weights)
    out = train(_cfg(data, tmp_path / "ft.pt", epochs=1, pretrained=str(weights)))
    ckpt = load_checkpoint(out)
    assert ckpt.info["base"]["pretrained"] == str(weights)
    # Started from those weights (the token embedding moves little in 2 steps) and trained.
    emb = "text.token_embedding.weight"
    assert torch.allclose(ckpt.state_dict[emb], start[emb], atol=0.05)
    assert not torch.equal(ckpt.state_dict["visual.conv1.weight"], start["visual.conv1.weight"])


def test_continue_with_frozen_towers_changes_only_the_decoder(
    trained: Path, data: Path, tmp_path: Path
) -> None:
    out = train(_cfg(data, tmp_path / "ft.pt", epochs=1, checkpoint=trained, freeze_towers=True))
    before, after = load_checkpoint(trained), load_checkpoint(out)
    changed = {k for k, v in after.state_dict.items() if not torch.equal(before.state_dict[k], v)}
    assert changed and all(k.startswith("text_decoder.") for k in changed)
    assert "itc" not in after.info["final_losses"]
    assert after.rerank_cfg == before.rerank_cfg  # the vocabulary carries over


def test_batches_hold_each_row_once() -> None:
    out = list(batches(70, 32, torch.Generator().manual_seed(0)))
    assert sorted(i for b in out for i in b) == list(range(70))
    assert [len(b) for b in out] == [32, 32, 6]
