"""Contexts longer than a checkpoint was trained on, for the model benchmark: RoPE scaled to N
(:func:`hf_sparse_attn.eval.bench.measure.scale_rope`) and texts made of consecutive articles
(:func:`hf_sparse_attn.eval.bench.grid.article_token_sets` with ``concatenate=True``)."""

from __future__ import annotations

import pytest
import torch

from hf_sparse_attn.eval.bench.grid import article_token_sets
from hf_sparse_attn.eval.bench.measure import scale_rope


def test_scale_rope_yarn_beyond_trained_length_and_restore(tiny_model):
    model = tiny_model("llama")
    trained = model.config.max_position_embeddings
    rotary = model.model.rotary_emb
    original = rotary.inv_freq.clone()
    ids = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        before = model(ids).logits

    params = scale_rope(model, 4 * trained, "yarn")
    assert params["rope_type"] == "yarn" and params["factor"] == pytest.approx(4.0)
    assert model.config.max_position_embeddings == 4 * trained
    scaled = model.model.rotary_emb
    assert scaled is not rotary
    # YaRN keeps the highest frequencies and divides the lowest by the factor (Peng et al., eq. 23)
    assert scaled.inv_freq[0] == pytest.approx(original[0].item())
    assert scaled.inv_freq[-1] == pytest.approx(original[-1].item() / 4, rel=1e-4)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)

    restored = scale_rope(model, trained, "yarn")  # at or below the trained length: the checkpoint's own RoPE
    assert restored["rope_type"] == "default" and model.config.max_position_embeddings == trained
    assert torch.equal(model.model.rotary_emb.inv_freq, original)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before)


def test_scale_rope_refuses_unknown_type_and_models_without_rope(tiny_model):
    with pytest.raises(ValueError, match="yarn"):
        scale_rope(tiny_model("llama"), 1 << 16, "ntk-by-parts")
    with pytest.raises(TypeError, match="rope"):
        scale_rope(tiny_model("bert"), 1 << 16, "yarn")


class _WordTokenizer:
    """One token per whitespace-separated word (enough to count tokens)."""

    def __call__(self, text, return_tensors=None):
        class Out:
            input_ids = torch.arange(len(text.split())).unsqueeze(0)

        return Out()


def test_concatenated_texts_join_consecutive_articles_each_once():
    articles = [(f"a{i}", " ".join(["w"] * (3 + i))) for i in range(6)]  # 3, 4, 5, 6, 7, 8 words
    texts = article_token_sets(_WordTokenizer(), 8, 2, articles, skip_titles=["a1"], concatenate=True)
    assert [t for t, _ in texts] == ["a0 + a2", "a3 + a4"]  # 3 + 5 >= 8; 6 + 7 >= 8; a1 skipped
    assert all(ids.shape == (1, 8) for _, ids in texts)
    with pytest.raises(ValueError, match="consecutive articles"):
        article_token_sets(_WordTokenizer(), 8, 4, articles, concatenate=True)
    # without concatenation only whole articles of >= N tokens count
    assert [t for t, _ in article_token_sets(_WordTokenizer(), 7, 2, articles)] == ["a4", "a5"]
