"""CoCa's decoder: the project's forward equals open_clip's, scores batch exactly, old
checkpoints are refused, and the open_clip 3.3 `text_projection` trap is handled."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import MultimodalTransformer

from models.checkpoint import CheckpointError, RerankConfig, load_checkpoint
from models.decoder import CocaDecoder, caption_logprob, init_text_projection
from models.encoder import Encoder
from models.factory import register_builtin_configs
from models.text_tower import text_forward
from models.token_cache import TokenCache

CAPTIONS = ["a red circle to the left of a blue square", "a", "a green star above a cross"]


@pytest.fixture(scope="module")
def coca() -> torch.nn.Module:
    register_builtin_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("xmodal-tiny", pretrained=None)
    init_text_projection(model)
    return model.eval()


def test_open_clip_leaves_coca_text_projection_uninitialised() -> None:
    """The trap this project works around: open_clip 3.3 creates the decoder's projection
    with torch.empty and its init_parameters() raises, so a CoCa from scratch needs ours."""
    decoder = MultimodalTransformer(width=32, layers=1, heads=2, output_dim=50)
    with pytest.raises(AttributeError):
        decoder.init_parameters()
    holder = torch.nn.Module()
    holder.text_decoder = decoder  # type: ignore[assignment]
    torch.manual_seed(0)
    init_text_projection(holder)
    std = float(decoder.text_projection.detach().std())
    assert torch.isfinite(decoder.text_projection).all() and 0.1 < std < 0.25  # 32 ** -0.5


def test_decoder_equals_open_clip(coca: torch.nn.Module) -> None:
    tokenizer = open_clip.get_tokenizer("xmodal-tiny")
    ids = tokenizer(CAPTIONS)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours = CocaDecoder.from_open_clip(coca.text_decoder)  # type: ignore[arg-type]
    assert ours.state_dict().keys() == coca.text_decoder.state_dict().keys()
    with torch.no_grad():
        stock = coca(pixels, ids)["logits"]  # open_clip's forward: [B, context - 1, vocab]
        _, image_embs = coca._encode_image(pixels)  # type: ignore[operator]
        _, token_embs = coca._encode_text(ids)  # type: ignore[operator]
        out = ours.decode(image_embs, token_embs[:, :-1], return_attention=True)
        # Shared keys/values: image 0 for every text gives the same as repeating it.
        shared = ours.decode(image_embs[:1], token_embs[:, :-1], torch.zeros(3, dtype=torch.long))
        repeated = ours.decode(image_embs[[0, 0, 0]], token_embs[:, :-1])
    torch.testing.assert_close(out.logits, stock, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.logits, repeated.logits, atol=1e-5, rtol=0)
    assert len(out.cross_attention) == 2  # one map per layer: [B, heads, L, patches]
    assert out.cross_attention[0].shape == (3, 4, ids.shape[1] - 1, 64)
    torch.testing.assert_close(
        out.cross_attention[1].sum(-1), torch.ones(3, 4, ids.shape[1] - 1), atol=1e-5, rtol=0
    )


def test_trimmed_coca_text_features_equal_stock(coca: torch.nn.Module) -> None:
    ids = open_clip.get_tokenizer("xmodal-tiny")(CAPTIONS)
    text: object = coca.text
    for correct in (False, True):  # pretrained CoCa weights use the legacy CLS mask
        text.correct_cls_mask = correct  # type: ignore[attr-defined]
        with torch.no_grad():
            pooled, tokens = coca.text(ids)  # type: ignore[operator]
            out = text_forward(coca, ids)
        assert out.tokens.shape[1] < ids.shape[1]  # really trimmed
        torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=0)
        real = out.mask[..., None]
        torch.testing.assert_close(
            out.tokens * real, tokens[:, : out.tokens.shape[1]] * real, atol=1e-5, rtol=0
        )
    text.correct_cls_mask = False  # type: ignore[attr-defined]


def test_caption_logprob_with_a_restricted_vocabulary() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    vocab = torch.tensor([7, 11, 40])
    labels = torch.tensor([[11, 0]])  # second position is padding
    total, count = caption_logprob(logits, labels, 0, vocab)
    assert count.tolist() == [1] and total.item() == pytest.approx(np.log(0.25))
    unknown = torch.tensor([[99, 40]])  # 99 is outside the decoder's vocabulary
    total, count = caption_logprob(logits, unknown, 0, vocab)
    assert count.tolist() == [2] and total.item() == pytest.approx(np.log(1e-6) + np.log(0.1))


def test_scores_batch_exactly_and_prefer_the_decoders_own_caption(encoder: Encoder) -> None:
    pixels = torch.rand(4, 3, encoder.image_size, encoder.image_size)
    images = encoder.image_tokens(pixels)
    texts = encoder.text_tokens(CAPTIONS)
    pairs = [(t, i) for t in range(3) for i in range(4)]
    together = encoder.caption_logprobs(texts, images.tokens, pairs)
    alone = np.array([encoder.caption_logprobs(texts, images.tokens, [p])[0] for p in pairs])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.all(together < 0)
    fused = encoder.rerank_scores(texts, images, pairs, text_query=True)
    cfg = encoder.rerank_cfg
    cos = encoder.pair_cosines(texts, images, pairs)
    np.testing.assert_allclose(
        fused, cfg.cosine_weight * cos + cfg.caption_weight * together, atol=1e-5
    )


def test_image_queries_use_their_own_fusion_weights(encoder: Encoder) -> None:
    images = encoder.image_tokens(torch.rand(2, 3, encoder.image_size, encoder.image_size))
    texts = encoder.text_tokens(CAPTIONS)
    pairs = [(t, i) for t in range(3) for i in range(2)]
    flags = [t == 0 for t, _ in pairs]  # text 0's pairs are a text query, the rest image queries
    gen = encoder.caption_logprobs(texts, images.tokens, pairs)
    cos = encoder.pair_cosines(texts, images, pairs)
    saved = encoder.rerank_cfg
    encoder.rerank_cfg = replace(
        saved, image_query_cosine_weight=3.0, image_query_caption_weight=0.5
    )
    try:
        fused = encoder.rerank_scores(texts, images, pairs, text_query=flags)
    finally:
        encoder.rerank_cfg = saved
    weights = np.array(
        [(saved.cosine_weight, saved.caption_weight) if f else (3.0, 0.5) for f in flags]
    )
    np.testing.assert_allclose(fused, weights[:, 0] * cos + weights[:, 1] * gen, atol=1e-5)
    # A checkpoint written before these fields existed reads as "same weights both ways".
    old = RerankConfig.from_dict({"cosine_weight": 2.0, "caption_weight": 1.0})
    assert old.weights(text_query=False) == old.weights(text_query=True) == (2.0, 1.0)


def test_version_1_checkpoint_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"format": "xmodal-checkpoint", "version": 1, "model_name": "x"}, path)
    with pytest.raises(CheckpointError, match="xmodal train"):
        load_checkpoint(path)


def test_token_cache_evicts_least_recently_used() -> None:
    entry = (torch.zeros(4), torch.zeros(2, 4))  # 48 bytes
    cache = TokenCache(max_bytes=100)
    cache.put("a", *entry)
    cache.put("b", *entry)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", *entry)
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    assert cache.nbytes == 96


@pytest.mark.slow
def test_coca_vit_b_32_with_random_weights_reranks() -> None:
    """The pretrained architecture (attention-pooled image tokens, legacy CLS mask) through
    the factory: the decoder matches open_clip's and re-ranking works with no training."""
    from models.factory import EncoderSpec, load_encoder

    coca = load_encoder(
        EncoderSpec(name="coca_ViT-B-32", pretrained="none", device="cpu", precision="fp32")
    )
    assert coca.has_reranker and coca.rerank_cfg.vocab is None
    pixels = torch.rand(2, 3, coca.image_size, coca.image_size)
    ids = coca.tokenize(CAPTIONS[:2])
    model: torch.nn.Module = coca.model
    with torch.no_grad():
        stock = MultimodalTransformer.forward(
            model.text_decoder,  # type: ignore[arg-type]
            model._encode_image(pixels)[1],  # type: ignore[operator]
            model._encode_text(ids)[1][:, :-1],  # type: ignore[operator]
        )
        ours = model(pixels, ids)["logits"]  # CoCa.forward through CocaDecoder
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)
    images = coca.image_tokens(pixels)
    assert images.tokens.shape == (2, 255, 512)  # attention-pooler tokens, 0.52 MB each
    texts = coca.text_tokens(CAPTIONS[:2])
    scores = coca.rerank_scores(texts, images, [(0, 0), (0, 1), (1, 0)], text_query=True)
    assert scores.shape == (3,) and np.isfinite(scores).all()


def test_patch_position_embedding_starts_at_zero(encoder: Encoder) -> None:
    decoder = encoder.decoder
    assert decoder is not None and decoder.image_pos_embed is not None
    assert decoder.image_pos_embed.shape == (64, 128) and not decoder.image_pos_embed.any()
    images = torch.randn(1, 64, 128, generator=torch.Generator().manual_seed(2))
    text = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = decoder.decode(images, text).logits
        decoder.image_pos_embed.add_(0.5)
        after = decoder.decode(images, text).logits
        decoder.image_pos_embed.zero_()
    assert not torch.allclose(before, after)  # it reaches the keys and values


def test_bf16_text_precision_scores_with_a_bf16_copy_of_the_decoder(encoder: Encoder) -> None:
    """Under "bf16-text" the pairs are scored by a copy whose projections are bfloat16; the
    float32 decoder (training, checkpoints) is untouched and the scores stay close."""
    from models.factory import EncoderSpec, load_encoder

    low = load_encoder(
        EncoderSpec(name="xmodal-tiny", pretrained="none", device="cpu", precision="bf16-text")
    )
    assert low.decoder is not None and low.decoder.text_projection.dtype == torch.float32
    assert all(
        p.dtype == torch.float32 for p in low.model.state_dict().values() if p.is_floating_point()
    )
    scorer = low._scorer
    assert scorer is not None and scorer is not low.decoder
    assert scorer.text_projection.dtype == torch.bfloat16
    assert scorer.resblocks[0].ln_1.weight.dtype == torch.float32  # LayerNorms stay float32
    # Same weights (seeded random init) as the shared fp32 `encoder` fixture.
    assert low.fingerprint == encoder.fingerprint
    pixels = torch.rand(
        4, 3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(5)
    )
    pairs = [(t, i) for t in range(3) for i in range(4)]
    exact = encoder.caption_logprobs(
        encoder.text_tokens(CAPTIONS), encoder.image_tokens(pixels).tokens, pairs
    )
    fast = low.caption_logprobs(low.text_tokens(CAPTIONS), low.image_tokens(pixels).tokens, pairs)
    assert fast.dtype == np.float32 and np.isfinite(fast).all()
    np.testing.assert_allclose(fast, exact, atol=0.05, rtol=0.01)
    assert not np.array_equal(fast, exact)  # it did run in bf16
