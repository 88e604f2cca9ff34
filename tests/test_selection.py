"""Weight-norm ranking ("Attention is Naturally Sparse" §5.1) and layer selection presets."""

from __future__ import annotations

import pytest
import torch

from hf_sparse_attn import patch_model, rank_layers
from hf_sparse_attn.selection import head_weight_norms, resolve_layers, selection_order


def test_head_weight_norm_equals_brute_force_with_gqa_and_gain():
    g = torch.Generator().manual_seed(0)
    w_q, w_k, gain = torch.randn(4, 8, 32, generator=g), torch.randn(2, 8, 32, generator=g), torch.rand(32, generator=g) + 0.5
    for norm, ord_ in (("spectral", 2), ("frobenius", "fro")):
        fast = head_weight_norms(w_q, w_k, gain, norm)
        for h in range(4):
            a = w_q[h].double() * gain.double()
            b = w_k[h // 2].double() * gain.double()  # query heads 0,1 read KV head 0
            brute = torch.linalg.matrix_norm(a.T @ b, ord=ord_)
            assert abs(fast[h].item() - brute.item()) < 1e-4 * brute.item()


def test_norm_gain_is_folded():
    g = torch.Generator().manual_seed(1)
    w_q, w_k = torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    base = head_weight_norms(w_q, w_k, None)
    doubled = head_weight_norms(w_q, w_k, torch.full((16,), 2.0))
    assert torch.allclose(doubled, 4 * base, rtol=1e-5)  # the gain enters on both sides of the bilinear form


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "qwen2", "glm4"])
def test_rank_layers_deterministic_and_reflects_weights(tiny_model, family):
    model = tiny_model(family)
    first = rank_layers(model)
    assert first.weight_norms == rank_layers(model).weight_norms
    assert len(first) == 3 and all(r > 0 for r in first.weight_norms)
    assert "layer" in str(first)
    # scale one layer's query projection: it must move to the top of the ranking
    attn = [m for m in model.modules() if hasattr(m, "q_proj") or hasattr(m, "query") or hasattr(m, "c_attn")][1]
    with torch.no_grad():
        proj = getattr(attn, "q_proj", None) or getattr(attn, "query", None)
        if proj is not None:
            proj.weight.mul_(10)
        else:
            attn.c_attn.weight[:, :64].mul_(10)
    assert rank_layers(model).order[0] == 1


def test_gpt2_and_llama_fold_their_input_norms(tiny_model):
    assert all(src.endswith("ln_1") for src in rank_layers(tiny_model("gpt2")).norm_sources)
    assert all(src.endswith("input_layernorm") for src in rank_layers(tiny_model("llama")).norm_sources)
    bert = rank_layers(tiny_model("bert")).norm_sources
    assert bert[0].endswith("embeddings.LayerNorm") and bert[1].endswith("layer.0.output.LayerNorm")


def test_selection_presets(tiny_model):
    ranking = rank_layers(tiny_model("llama"))
    assert selection_order(ranking, "last")[:2] == [2, 1]
    assert selection_order(ranking, "first")[:2] == [0, 1]
    assert selection_order(ranking, "even") == [0, 2, 1]
    assert selection_order(ranking, "odd") == [1, 0, 2]
    assert selection_order(ranking, "weight_norm") == ranking.order
    assert selection_order(ranking, "random", seed=3) == selection_order(ranking, "random", seed=3)
    assert selection_order(ranking, lambda r: [2, 0, 1]) == [2, 0, 1]
    order = ranking.order
    assert resolve_layers(1, order, 3) == [order[0]]
    assert resolve_layers(0.67, order, 3) == sorted(order[:2])
    assert resolve_layers("all", order, 3) == [0, 1, 2]
    assert resolve_layers([2], order, 3) == [2]
    for bad in (5, 1.5, "half", [7]):
        with pytest.raises(ValueError):
            resolve_layers(bad, order, 3)
    with pytest.raises(ValueError, match="unknown select"):
        selection_order(ranking, "middle")


def test_plan_follows_weight_norm(tiny_model):
    model = tiny_model("llama")
    ranking = rank_layers(model)
    plan = patch_model(model, method="exact", layers=1, select="weight_norm")
    assert plan.patched_layers == [ranking.order[0]]
    assert plan.layer(ranking.order[0]).rank == 0


def test_select_measured_through_patch_model(tiny_model):
    from hf_sparse_attn.eval.sparsity import measured_sparsity_scores

    model = tiny_model("llama")
    calibration = torch.randint(3, 101, (1, 48), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="calibration"):
        patch_model(model, method="exact", layers=1, select="measured")
    scores = measured_sparsity_scores(model, calibration)
    plan = patch_model(model, method="exact", layers=1, select="measured", calibration=calibration)
    best = max(range(3), key=lambda i: (scores[i], -i))
    assert plan.patched_layers == [best] and plan.select == "measured"
