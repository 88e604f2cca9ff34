"""torch.compile of a patched model: no graph break caused by this package, compiled outputs equal eager ones, and
the per-layer seeding stays deterministic (the same hashes on every call, as gradient checkpointing needs)."""

from __future__ import annotations

import pytest
import torch

from hf_sparse_attn import patch_model
from tiny_checkpoint import tiny_llama

HYPER_SMALL = dict(block_size=16, sample_size=16, min_seq_len=32, causal_min_seq_len=32, window=8, num_sink_tokens=4)


def _package_breaks(explanation) -> list[str]:
    reasons = []
    for brk in explanation.break_reasons:
        frames = [f.filename for f in (brk.user_stack or [])]
        if any("hf_sparse_attn" in f for f in frames):
            reasons.append(f"{str(brk.reason).splitlines()[0]} at {frames[-1]}")
    return reasons


@pytest.mark.parametrize("method,params", [("exact", {}), ("hyper", HYPER_SMALL)])
def test_patched_model_compiles_without_graph_breaks_and_matches_eager(method, params):
    import torch._dynamo as dynamo

    model = tiny_llama(101, num_layers=2)
    plan = patch_model(model, method=method, layers="all", **params)
    ids = torch.randint(4, 100, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
        assert all(layer.served == 1 for layer in plan.layers), str(plan)  # the method ran, not a fallback
        dynamo.reset()
        explanation = dynamo.explain(model)(ids)
        assert _package_breaks(explanation) == []
        assert explanation.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
        dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert all(layer.served >= 2 for layer in plan.layers), str(plan)  # the compiled run served too
    dynamo.reset()


def test_compiled_hyper_backward_matches_eager():
    import torch._dynamo as dynamo

    model = tiny_llama(101, num_layers=1)
    plan = patch_model(model, method="hyper", layers="all", **HYPER_SMALL)
    ids = torch.randint(4, 100, (1, 64), generator=torch.Generator().manual_seed(0))
    grads = []
    for run in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad()
        run(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    dynamo.reset()
    assert plan.layer(0).served == 2 and not plan.layer(0).fallbacks, str(plan)  # eager and compiled both ran hyper
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_padded_batch_compiles_without_graph_breaks_and_matches_eager():
    """A padded batch hands every layer its [B, N] key padding mask (the compact mask path), compiled as in eager."""
    import torch._dynamo as dynamo

    model = tiny_llama(101, num_layers=2)
    plan = patch_model(model, method="hyper", layers=[1], **HYPER_SMALL)
    ids = torch.randint(4, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        assert plan.layer(1).served == 1, str(plan)
        dynamo.reset()
        explanation = dynamo.explain(model)(ids, attention_mask=mask)
        assert _package_breaks(explanation) == [] and explanation.graph_break_count == 0
        dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(ids, attention_mask=mask).logits
    dynamo.reset()
    torch.testing.assert_close(compiled[mask.bool()], eager[mask.bool()], rtol=1e-5, atol=1e-5)
    assert plan.layer(1).served >= 2 and not plan.layer(1).fallbacks, str(plan)
