"""The fusion head's dual-encoder term and loading checkpoints saved before it existed."""

from __future__ import annotations

import pytest
import torch

from models.fusion import FusionConfig, FusionReranker


def _head(seed: int = 0) -> FusionReranker:
    torch.manual_seed(seed)
    return FusionReranker(FusionConfig(text_width=16, image_width=24, width=32, heads=4)).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = torch.randn(3, 5, 16, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])
    image = torch.randn(3, 9, 24, generator=g)
    cosine = torch.tensor([0.9, 0.1, -0.4])
    return text, mask, image, cosine


def test_cosine_enters_the_logit_with_the_learned_weight() -> None:
    head = _head()
    text, mask, image, cosine = _inputs()
    with torch.no_grad():
        head.dual_weight.fill_(12.5)
        alone = head(text, mask, image)
        combined = head(text, mask, image, cosine)
    torch.testing.assert_close(combined - alone, 12.5 * cosine)


def test_a_new_head_adds_nothing_until_trained() -> None:
    head = _head()
    text, mask, image, cosine = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(head(text, mask, image, cosine), head(text, mask, image))


def test_weights_saved_before_the_dual_term_load_as_head_only() -> None:
    saved = _head(seed=3)
    with torch.no_grad():
        saved.dual_weight.fill_(7.0)
    old_state = {k: v for k, v in saved.state_dict().items() if k != "dual_weight"}
    loaded = _head(seed=4)
    loaded.load_compatible(old_state)
    text, mask, image, cosine = _inputs()
    with torch.no_grad():
        assert float(loaded.dual_weight) == 0.0
        torch.testing.assert_close(loaded(text, mask, image, cosine), saved(text, mask, image))


def test_weights_of_another_shape_are_refused() -> None:
    state = _head().state_dict()
    del state["head.0.weight"]
    with pytest.raises(RuntimeError, match="do not fit"):
        _head().load_compatible(state)
