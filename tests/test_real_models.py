"""Patching on the real offline weights: SmolLM2-135M (Llama) and all-MiniLM-L6-v2 (BERT)."""

from __future__ import annotations

import torch

from hf_sparse_attn import patch_model, rank_layers, unpatch_model


def test_smollm2_exact_half_layers_on_real_text(smollm2, wiki_article_text):
    model, tokenizer = smollm2
    ids = tokenizer(wiki_article_text, return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    with torch.no_grad():
        reference = model(ids).logits
        plan = patch_model(model, method="exact", layers=0.5, select="weight_norm")
        assert len(plan.patched_layers) == 15
        logits = model(ids).logits
        assert (logits - reference).abs().max().item() <= 1e-5 * max(1.0, reference.abs().max().item())
        assert all(plan.layer(i).served == 1 for i in plan.patched_layers)
        prompt = ids[:, :200]
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
        unpatch_model(model)
        assert torch.equal(model(ids).logits, reference)
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), generated)


def test_minilm_exact_padded_batch(minilm):
    model, tokenizer = minilm
    sentences = ["Anarchism is a political philosophy.",
                 "The Apollo program was the third United States human spaceflight program, run by NASA."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    assert not bool(batch.attention_mask.all())
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        plan = patch_model(model, method="exact", layers=0.5)
        out = model(**batch).last_hidden_state
        valid = batch.attention_mask.bool()
        assert (out - reference)[valid].abs().max().item() < 1e-5
        assert all(plan.layer(i).served == 1 for i in plan.patched_layers) and plan.fallback_counts() == {}
        unpatch_model(model)
        assert torch.equal(model(**batch).last_hidden_state, reference)


def test_rank_layers_on_real_models(smollm2, minilm):
    smol = rank_layers(smollm2[0])
    assert len(smol) == 30 and smol.weight_norms == rank_layers(smollm2[0]).weight_norms
    assert len(smol.head_weight_norms[0]) == 9
    mini = rank_layers(minilm[0])
    assert len(mini) == 6 and len(mini.head_weight_norms[0]) == 12
    # real weights give a spread of R (a ranking that means something), not ties
    assert max(smol.weight_norms) > 1.5 * min(smol.weight_norms)
    print(smol)
    print(mini)
