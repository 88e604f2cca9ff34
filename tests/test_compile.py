"""torch.compile of a patched model: no graph break caused by this package, compiled outputs equal eager ones, and
the per-layer seeding stays deterministic (the same hashes on every call, as gradient checkpointing needs)."""

from __future__ import annotations

import pytest
import torch

from hf_sparse_attn import patch_model
from hf_sparse_attn.patches import reasons
from tiny_checkpoint import greedy_steps, tiny_llama

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


# ---- calls against a KV cache (decode steps, a prefill into a StaticCache): one operator decides at run time ----

DECODE_SMALL = dict(window=8, num_sink_tokens=2, min_seq_len=16)
DECODE_PARAMS = dict(window=8, num_sink_tokens=2)


def _greedy_steps(forward, model, ids, mask, steps: int = 3) -> torch.Tensor:
    """Logits [B, steps + 1, V]: a prefill of ids [B, n] into a fresh StaticCache, then ``steps`` greedy decode steps
    (``forward`` is the model or its compiled form)."""
    from transformers import StaticCache

    return greedy_steps(forward, ids, mask, StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 5),
                        steps)


def _counts(plan) -> list:
    return [(layer.served, layer.decode_served, dict(layer.fallbacks), dict(layer.decode_fallbacks)) for layer in plan.layers]


@pytest.mark.parametrize("decode_method,padded", [("local", False), ("local", True), ("exact", True)])
def test_compiled_decode_steps_serve_the_decode_method_without_graph_breaks(decode_method, padded):
    """Decode steps against a StaticCache under torch.compile run the layer's decode method (not exact attention, as
    before), with no graph break, the eager outputs and the eager counts; a left-padded batch too. ``exact`` (prefill
    and decode): what the unpatched model computes."""
    import torch._dynamo as dynamo

    model = tiny_llama(101, num_layers=2)
    ids = torch.randint(4, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    with torch.no_grad():
        unpatched = _greedy_steps(model, model, ids, mask)
        local = decode_method == "local"
        plan = patch_model(model, method=decode_method, layers="all", decode_method=decode_method,
                           decode_params=DECODE_PARAMS if local else None, **(DECODE_SMALL if local else {}))
        eager = _greedy_steps(model, model, ids, mask)
        eager_counts = _counts(plan)
        assert all((layer.served, layer.decode_served) == (1, 3) for layer in plan.layers), str(plan)  # prefill, 3 steps
        dynamo.reset()
        explanation = dynamo.explain(model)(ids[:, :1], attention_mask=mask, use_cache=True,
                                            past_key_values=_static_cache(model, ids.shape[1] + 1),
                                            cache_position=torch.tensor([ids.shape[1] - 1]))
        assert _package_breaks(explanation) == [], _package_breaks(explanation)
        dynamo.reset()
        plan.reset_counts()
        compiled = _greedy_steps(torch.compile(model, backend="aot_eager"), model, ids, mask)
    dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert _counts(plan) == eager_counts, str(plan)  # the operator decided and counted as the eager path
    assert not any(layer.fallbacks or layer.decode_fallbacks for layer in plan.layers), str(plan)
    if local:  # sinks + window 8 over a 40-token prompt: not what exact attention computes
        assert (compiled[:, 1:] - unpatched[:, 1:]).abs().max() > 1e-3
    else:
        torch.testing.assert_close(compiled, unpatched, rtol=1e-4, atol=1e-4)


def _static_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def test_compiled_decode_with_an_index_runs_exact_with_its_reason():
    """``lsh`` finds its index from the keys a GrowingCache layer hands over; a compiled graph hands them over without
    their layer, so the step runs exact attention (the unpatched model's logits), counted as a compile fallback, not
    as a missing GrowingCache."""
    import torch._dynamo as dynamo
    from transformers import DynamicCache

    from hf_sparse_attn import GrowingCache

    model = tiny_llama(101, num_layers=2)
    ids = torch.randint(4, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = DynamicCache()
        step = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        unpatched = model(step, past_key_values=cache, use_cache=True).logits
        plan = patch_model(model, method="exact", layers="all", decode_method="lsh", decode_params=DECODE_PARAMS)
        cache = GrowingCache(model.config)
        model(ids, past_key_values=cache, use_cache=True)
        dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(step, past_key_values=cache, use_cache=True).logits
    dynamo.reset()
    torch.testing.assert_close(compiled, unpatched, rtol=1e-5, atol=1e-5)
    for layer in plan.layers:
        assert layer.decode_fallbacks == {reasons.DECODE_COMPILE_REASON: 1}, str(plan)


def test_a_compiled_prompt_fed_in_chunks_runs_the_prefill_methods_chunks():
    """A prompt fed in two chunks against a StaticCache, compiled: the second chunk (q_len < kv_len) is served by the
    prefill method's chunk function at run time (before, exact attention with the compile reason), as in eager."""
    import torch._dynamo as dynamo

    model = tiny_llama(101, num_layers=2)
    ids = torch.randint(4, 100, (1, 48), generator=torch.Generator().manual_seed(0))
    plan = patch_model(model, method="local", layers="all", decode_method="local", decode_params=DECODE_PARAMS,
                       **DECODE_SMALL)
    outputs, counts = [], []
    for forward in (model, "compiled"):
        plan.reset_counts()
        dynamo.reset()
        cache = _static_cache(model, 64)
        run = torch.compile(model, backend="aot_eager") if forward == "compiled" else model
        with torch.no_grad():
            for start, stop in ((0, 24), (24, 48)):
                logits = run(ids[:, start:stop], attention_mask=torch.ones(1, stop, dtype=torch.long),
                             past_key_values=cache, use_cache=True, cache_position=torch.arange(start, stop)).logits
        outputs.append(logits)
        counts.append(_counts(plan))
    dynamo.reset()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert counts[1] == counts[0], counts
    assert all(layer.served == 2 and not layer.fallbacks for layer in plan.layers), str(plan)  # both chunks served


@pytest.mark.parametrize("decode_method,decode_params", [("exact", None),
                                                         ("quest", {"page_size": 4, "token_budget": 1024})])
def test_generate_with_a_static_cache_and_a_fullgraph_compiled_forward(decode_method, decode_params):
    """transformers' compiled generation path (``cache_implementation="static"``, the forward compiled with
    fullgraph=True, which fails on any graph break): a patched model generates the unpatched model's tokens for a
    left-padded batch, every decode step served by the decode method (``quest`` through its index of the StaticCache,
    with a budget that covers the cache; aot_eager hands the operator a copy of the cache each step, so the index is
    rebuilt each step and needs a free slot: the cache is given one more than generate's ``max_length``)."""
    import torch._dynamo as dynamo

    model = tiny_llama(101, num_layers=2)
    ids = torch.randint(4, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    reference = model.generate(input_ids=ids, **kwargs)
    if decode_method == "quest":
        from transformers import StaticCache

        del kwargs["cache_implementation"]
        kwargs["past_key_values"] = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 6)
    plan = patch_model(model, method="exact", layers="all", decode_method=decode_method, decode_params=decode_params)
    dynamo.reset()
    model.forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    try:
        generated = model.generate(input_ids=ids, **kwargs)
    finally:
        del model.forward
        dynamo.reset()
    assert torch.equal(generated, reference)
    assert all(layer.decode_served == 5 and not layer.decode_fallbacks for layer in plan.layers), str(plan)
