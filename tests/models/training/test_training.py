"""Training on the tiny model: the loss falls, runs are deterministic, checkpoints round-trip
bit-exactly, and a local weights file or a checkpoint can be the starting point."""

from __future__ import annotations

from collections import Counter
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
        "workers": 1, "seed": 3, "fusion_layers": 1,
    }  # fmt: skip
    base.update(kw)
    return TrainConfig(data=data, out=out, **base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(_cfg(data, tmp_path_factory.mktemp("ck") / "a.pt", group_batches=True))


def _tiny_spec(**kw: object) -> EncoderSpec:
    return EncoderSpec(device="cpu", precision="fp32", **kw)  # type: ignore[arg-type]


def test_training_lowers_the_loss(trained: Path) -> None:
    info = load_checkpoint(trained).info
    assert info["steps"] == 8 and not info["stopped_early"]
    first, final = info["first_losses"], info["final_losses"]
    assert set(final) >= {"itc", "itm", "list", "loss"}  # twin batches: group loss too
    assert final["loss"] < first["loss"]
    assert final["itc"] < first["itc"]


def test_same_seed_same_weights(data: Path, tmp_path: Path) -> None:
    a = load_checkpoint(train(_cfg(data, tmp_path / "1.pt", epochs=1)))
    b = load_checkpoint(train(_cfg(data, tmp_path / "2.pt", epochs=1)))
    assert a.fusion_state_dict is not None and b.fusion_state_dict is not None
    for x, y in ((a.state_dict, b.state_dict), (a.fusion_state_dict, b.fusion_state_dict)):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)


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
        encoder.match_probabilities(text_out, tokens, pairs),
    ]


def test_checkpoint_round_trips_bit_exactly(trained: Path, data: Path, tmp_path: Path) -> None:
    original = load_checkpoint(trained)
    first = load_encoder(_tiny_spec(checkpoint=trained))
    assert first.fusion is not None
    # Save what was loaded, load it again: every tensor and every output must be identical.
    copy = tmp_path / "copy.pt"
    save_checkpoint(first.to_checkpoint(info=original.info), copy)
    again = load_checkpoint(copy)
    assert original.fusion_state_dict is not None and again.fusion_state_dict is not None
    for x, y in (
        (original.state_dict, again.state_dict),
        (original.fusion_state_dict, again.fusion_state_dict),
    ):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
    assert (again.model_cfg, again.preprocess_cfg, again.fusion_cfg) == (
        original.model_cfg, original.preprocess_cfg, original.fusion_cfg
    )  # fmt: skip
    second = load_encoder(_tiny_spec(checkpoint=copy))
    assert second.fingerprint == first.fingerprint
    for a, b in zip(_outputs(first, data), _outputs(second, data), strict=True):
        assert np.array_equal(a, b)


def test_fine_tune_from_a_local_weights_file(data: Path, tmp_path: Path) -> None:
    import open_clip

    from models.factory import register_builtin_configs

    register_builtin_configs()
    torch.manual_seed(123)
    start = open_clip.create_model("xmodal-tiny", pretrained=None).state_dict()
    weights = tmp_path / "start.pt"
    torch.save(start, weights)
    out = train(_cfg(data, tmp_path / "ft.pt", epochs=1, pretrained=str(weights)))
    ckpt = load_checkpoint(out)
    assert ckpt.info["base"]["pretrained"] == str(weights)
    # Started from those weights (the token embedding moves little in 2 steps) and trained.
    emb = "token_embedding.weight"
    assert torch.allclose(ckpt.state_dict[emb], start[emb], atol=0.05)
    assert not torch.equal(ckpt.state_dict["visual.conv1.weight"], start["visual.conv1.weight"])


def test_continue_with_frozen_towers_changes_only_the_fusion(
    trained: Path, data: Path, tmp_path: Path
) -> None:
    out = train(_cfg(data, tmp_path / "ft.pt", epochs=1, checkpoint=trained, freeze_towers=True))
    before, after = load_checkpoint(trained), load_checkpoint(out)
    assert all(torch.equal(before.state_dict[k], v) for k, v in after.state_dict.items())
    assert before.fusion_state_dict is not None and after.fusion_state_dict is not None
    assert any(
        not torch.equal(before.fusion_state_dict[k], v) for k, v in after.fusion_state_dict.items()
    )
    assert "itc" not in after.info["final_losses"]


@pytest.mark.parametrize("share", [1.0, 0.5, 0.0])
def test_mixed_batches_hold_each_row_once_and_the_asked_share_of_whole_groups(
    share: float,
) -> None:
    groups = [[4 * g + i for i in range(4)] for g in range(64)]
    out = list(
        batches(groups, 32, torch.Generator().manual_seed(0), whole_groups=True, twin_share=share)
    )
    assert sorted(i for b in out for i in b) == list(range(256))
    assert all(len(b) == 32 for b in out)
    whole = [sum(n for n in Counter(i // 4 for i in b).values() if n == 4) for b in out]
    # Loose rows of different groups can complete a group by chance: at least the share.
    assert all(w >= share * 32 for w in whole)
    if share == 0.5:
        assert sum(whole) < 256
