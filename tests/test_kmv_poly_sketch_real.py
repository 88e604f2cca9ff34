"""kmv, poly and feature_sketch through patch_model on the real models: each layer either runs the method (with a
bounded error against exact) or falls back to exact attention with the plan saying why — never silently wrong."""

from __future__ import annotations

import pytest
import torch

from hf_sparse_attn import patch_model, unpatch_model

METHODS = ["kmv", "poly", "feature_sketch"]


@pytest.mark.parametrize("method", METHODS)
def test_method_on_minilm_padded_batch(minilm, method):
    model, tokenizer = minilm
    sentences = ["Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions.",
                 "Autism is a neurodevelopmental condition."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    valid = batch.attention_mask.bool()
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        plan = patch_model(model, method=method, layers="all", min_seq_len=0)
        out = model(**batch).last_hidden_state
        unpatch_model(model)
    assert torch.isfinite(out).all()
    for layer in plan.layers:
        assert layer.served + sum(layer.fallbacks.values()) == 1, layer
        assert all(isinstance(reason, str) and reason for reason in layer.fallbacks)
    if not any(layer.served for layer in plan.layers):
        assert (out - reference)[valid].abs().max() < 1e-5  # every layer fell back: exactly the model
    else:
        cos = torch.nn.functional.cosine_similarity(out[valid], reference[valid], dim=-1)
        assert cos.min() > 0.9, (plan, cos.min())


@pytest.mark.parametrize("method", METHODS)
def test_method_on_smollm2(smollm2, wiki_article_text, method):
    model, tokenizer = smollm2
    ids = tokenizer(wiki_article_text, return_tensors="pt").input_ids[:, :384]
    with torch.no_grad():
        reference = model(ids, labels=ids).loss
        plan = patch_model(model, method=method, layers=[3, 17], min_seq_len=0)
        loss = model(ids, labels=ids).loss
        unpatch_model(model)
    assert torch.isfinite(loss)
    for i in plan.patched_layers:
        layer = plan.layer(i)
        assert layer.served + sum(layer.fallbacks.values()) == 1, layer
    # two approximated layers of thirty: the language model still models the text
    assert abs(loss.item() - reference.item()) < 0.5, (plan, loss.item(), reference.item())
