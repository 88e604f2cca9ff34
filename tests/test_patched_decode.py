"""Decode methods inside a patched model: ``patch_model(..., decode_method=...)`` serves the calls against a KV cache
(decode steps, chunked prefills, a prefill into a StaticCache) through ``LayerRuntime.decide``; tiny random Llama
models, transformers' own attention as the reference."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import hf_sparse_attn
from hf_sparse_attn import GrowingCache, PatchPlan, patch_model, unpatch_model
from hf_sparse_attn.patches import reasons

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoint import tiny_llama  # noqa: E402

VOCAB = 64


def _prompt(batch: int = 2, length: int = 40, pad: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [batch, length], row 1 left-padded by ``pad`` tokens (id 0), and its attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1 and pad:
        ids[1, :pad] = 0
        mask[1, :pad] = 0
    return ids, mask


def _generate(model, ids, mask, cache=None, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         past_key_values=cache, output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


def _decode_served(plan: PatchPlan) -> int:
    return sum(layer.decode_served for layer in plan.layers)


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(VOCAB, num_layers=3)
    m.set_attn_implementation("sdpa")
    return m


@pytest.mark.parametrize("cache_kind", ["dynamic", "growing"])
def test_exact_decode_is_the_default_and_generates_what_the_model_does(model, cache_kind):
    ids, mask = _prompt()
    make = (lambda: DynamicCache()) if cache_kind == "dynamic" else (lambda: GrowingCache(model.config))
    ref_seq, ref_scores = _generate(model, ids, mask, make())
    plan = patch_model(model, method="exact", layers="all")
    try:
        assert all(layer.decode_method == "exact" for layer in plan.layers)
        seq, scores = _generate(model, ids, mask, make())
    finally:
        unpatch_model(model)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert _decode_served(plan) == 3 * 11  # 11 decode steps in each of 3 layers
    assert reasons.DECODE_REASON not in plan.fallback_counts()


def test_decode_method_none_runs_the_models_attention_and_counts_it(model):
    ids, mask = _prompt()
    ref_seq, _ = _generate(model, ids, mask)
    plan = patch_model(model, method="exact", layers="all", decode_method=None)
    try:
        seq, _ = _generate(model, ids, mask)
    finally:
        unpatch_model(model)
    assert torch.equal(seq, ref_seq)
    assert _decode_served(plan) == 0
    assert plan.fallback_counts() == {reasons.DECODE_REASON: 3 * 11}


def test_local_decode_with_a_window_covering_the_cache_is_exact(model):
    ids, mask = _prompt()
    ref_seq, ref_scores = _generate(model, ids, mask)
    plan = patch_model(model, method="exact", layers="all", decode_method="local",
                       decode_params={"window": 256, "num_sink_tokens": 4})
    try:
        seq, scores = _generate(model, ids, mask)
    finally:
        unpatch_model(model)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert _decode_served(plan) == 33


def test_local_decode_with_a_small_window_sees_only_sinks_and_window(model):
    """A decode step's output depends on the keys in the sinks and the window only: changing a token in the middle
    of the prompt changes the exact model's next-token logits but not the local decode's first decode step... except
    through the prefill, so the prefill here is exact and the comparison is of one decode step over caches that
    differ only in the middle positions."""
    ids, _ = _prompt(batch=1, length=48)
    patch_model(model, method="exact", layers="all", decode_method="local",
                decode_params={"window": 8, "num_sink_tokens": 2})
    try:
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
            step = torch.tensor([[5]])
            a = model(input_ids=step, past_key_values=cache).logits
            # the same cache with its middle keys / values replaced: the local decode step cannot tell
            for layer in cache.layers:
                layer.keys[:, :, 4:30] = torch.randn_like(layer.keys[:, :, 4:30])
                layer.values[:, :, 4:30] = torch.randn_like(layer.values[:, :, 4:30])
                layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]  # drop the step's entry
            b = model(input_ids=step, past_key_values=cache).logits
    finally:
        unpatch_model(model)
    torch.testing.assert_close(a, b)
    with torch.no_grad():  # the exact model does tell
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache)
        for layer in cache.layers:
            layer.keys[:, :, 4:30] = torch.randn_like(layer.keys[:, :, 4:30])
        c = model(input_ids=step, past_key_values=cache).logits
    assert not torch.allclose(a, c, atol=1e-3)


def test_lsh_decode_needs_a_growing_cache_and_says_so(model):
    ids, mask = _prompt()
    ref_seq, _ = _generate(model, ids, mask)
    plan = patch_model(model, method="exact", layers="all", decode_method="lsh")
    try:
        seq, _ = _generate(model, ids, mask, DynamicCache())
    finally:
        unpatch_model(model)
    assert torch.equal(seq, ref_seq)  # served exact, counted
    assert plan.fallback_counts() == {reasons.NO_INDEXED_CACHE_REASON: 33}
    assert _decode_served(plan) == 0


def test_lsh_decode_keeps_its_index_on_the_growing_cache(model):
    ids, mask = _prompt(length=60)
    ref_seq, ref_scores = _generate(model, ids, mask)
    # a window that covers the cache: the lsh method must equal exact attention, while the index is still kept
    plan = patch_model(model, method="exact", layers="all", decode_method="lsh",
                       decode_params={"window": 256, "block_size": 8, "sample_size": 8})
    cache = GrowingCache(model.config)
    try:
        seq, scores = _generate(model, ids, mask, cache)
    finally:
        unpatch_model(model)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert _decode_served(plan) == 33 and plan.fallback_counts() == {}
    for layer in cache.layers:
        (index,) = layer.decode_indexes.values()
        assert index.length == layer.get_seq_length()  # every cached position, the last step's key included
    length = cache.get_seq_length()
    cache.crop(-5)  # remove 5 tokens: the same call in transformers 5.0 and later releases
    assert all(next(iter(layer.decode_indexes.values())).length == length - 5 for layer in cache.layers)
    cache.reset()
    assert all(not layer.decode_indexes for layer in cache.layers)


def test_lsh_decode_serves_the_middle_through_the_index(model):
    """With a small window the middle of the cache goes through the index: served, not exact, and close to it."""
    ids, mask = _prompt(batch=1, length=200, pad=0)
    _, ref_scores = _generate(model, ids, mask)
    plan = patch_model(model, method="exact", layers="all", decode_method="lsh",
                       decode_params={"window": 16, "num_sink_tokens": 4, "block_size": 32, "sample_size": 32,
                                      "resort_every": 8})
    cache = GrowingCache(model.config)
    try:
        _, scores = _generate(model, ids, mask, cache)
    finally:
        unpatch_model(model)
    assert _decode_served(plan) == 33
    index = next(iter(cache.layers[0].decode_indexes.values()))
    assert index.sorts >= 2  # re-sorted as appended positions accumulated
    diff = (scores.softmax(-1) - ref_scores.softmax(-1)).abs().max()
    assert 0 < diff < 0.2


def test_beam_search_reorders_the_index_with_the_cache(model):
    ids, mask = _prompt(length=50)
    kwargs = dict(num_beams=3, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    plan = patch_model(model, method="exact", layers="all", decode_method="lsh",
                       decode_params={"window": 256, "block_size": 8, "sample_size": 8})
    cache = GrowingCache(model.config)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kwargs)
    finally:
        unpatch_model(model)
    assert torch.equal(out, ref)
    assert _decode_served(plan) > 0 and plan.fallback_counts() == {}
    index = next(iter(cache.layers[0].decode_indexes.values()))
    assert index.codes.shape[0] == 2 * 3  # batch x beams rows, as the cache


def test_static_cache_prefill_and_decode_are_served(model):
    ids, mask = _prompt()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    ref = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    plan = patch_model(model, method="exact", layers="all")
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    finally:
        unpatch_model(model)
    assert torch.equal(out, ref)
    assert sum(layer.served for layer in plan.layers) == 3  # the prefill into the preallocated cache
    assert _decode_served(plan) == 3 * 5
    assert plan.fallback_counts() == {}


def test_a_prompt_fed_in_chunks_is_served_by_the_decode_method(model):
    ids, _ = _prompt(batch=1, length=64, pad=0)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    plan = patch_model(model, method="exact", layers="all")
    try:
        cache = DynamicCache()
        with torch.no_grad():
            first = model(input_ids=ids[:, :40], past_key_values=cache).logits
            second = model(input_ids=ids[:, 40:], past_key_values=cache).logits
    finally:
        unpatch_model(model)
    torch.testing.assert_close(torch.cat([first, second], dim=1), ref, atol=1e-4, rtol=1e-4)
    assert sum(layer.served for layer in plan.layers) == 3 and _decode_served(plan) == 3


def test_decode_steps_under_autograd_run_exact_counted(model):
    ids, _ = _prompt(batch=1, length=20, pad=0)
    plan = patch_model(model, method="exact", layers="all")
    try:
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
        model.model.embed_tokens.weight.requires_grad_(True)
        out = model(input_ids=torch.tensor([[5]]), past_key_values=cache).logits
        out.sum().backward()
    finally:
        unpatch_model(model)
    assert plan.fallback_counts() == {reasons.NO_GRADIENT_REASON: 3}
    assert model.model.embed_tokens.weight.grad is not None
    model.model.embed_tokens.weight.grad = None


def test_concurrent_generation_with_lsh_gives_the_sequential_results(model):
    prompts = [_prompt(batch=1, length=120, pad=0, seed=s) for s in range(3)]
    params = {"window": 16, "num_sink_tokens": 4, "block_size": 16, "sample_size": 16}
    patch_model(model, method="exact", layers="all", decode_method="lsh", decode_params=params)
    try:
        sequential = [_generate(model, ids, mask, GrowingCache(model.config))[1] for ids, mask in prompts]
        results = [None] * len(prompts)

        def run(i):
            ids, mask = prompts[i]
            results[i] = _generate(model, ids, mask, GrowingCache(model.config))[1]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        unpatch_model(model)
    for a, b in zip(sequential, results):
        torch.testing.assert_close(a, b)


def test_the_decode_choice_travels_with_the_plan_and_the_checkpoint(model, tmp_path):
    plan = patch_model(model, method="exact", layers=2, decode_method="local", decode_params={"window": 32})
    try:
        plan.save(tmp_path / "plan.json")
        model.save_pretrained(tmp_path / "ckpt")
    finally:
        unpatch_model(model)
    loaded = PatchPlan.load(tmp_path / "plan.json")
    chosen = [layer for layer in loaded.layers if layer.method is not None]
    assert len(chosen) == 2
    assert all(l.decode_method == "local" and l.decode_params["window"] == 32 for l in chosen)
    assert all(l.decode_method is None for l in loaded.layers if l.method is None)
    reloaded = hf_sparse_attn.from_pretrained(tmp_path / "ckpt")
    plan2 = hf_sparse_attn.current_plan(reloaded)
    assert [l.decode_method for l in plan2.layers] == [l.decode_method for l in loaded.layers]
    assert "decode" in str(plan2)


def test_bad_decode_arguments_are_refused_with_the_valid_ones(model):
    with pytest.raises(ValueError, match="decode-capable methods: exact, local, lsh, quest"):
        patch_model(model, method="exact", decode_method="nope")
    with pytest.raises(ValueError, match="window"):
        patch_model(model, method="exact", decode_method="local", decode_params={"widow": 3})
    with pytest.raises(ValueError, match="without a decode_method"):
        patch_model(model, method="exact", decode_method=None, decode_params={"window": 3})
    assert hf_sparse_attn.current_plan(model) is None  # nothing half-applied


def test_generation_cache_is_a_growing_cache_where_a_layer_has_a_decode_method(model):
    assert hf_sparse_attn.generation_cache(model) is None  # not patched
    patch_model(model, method="exact", layers="all", decode_method=None)
    try:
        assert hf_sparse_attn.generation_cache(model) is None  # decode runs the model's own attention
        for name in ("exact", "local", "lsh", "quest"):
            patch_model(model, method="exact", layers="all", decode_method=name)
            assert isinstance(hf_sparse_attn.generation_cache(model), GrowingCache), name
    finally:
        unpatch_model(model)


def test_the_decision_for_calls_against_a_cache_applies_the_shared_rules_first():
    from hf_sparse_attn.patches.base import SERVE_DECODE, SERVE_EXACT, AttentionCall, Decision, LayerRuntime

    def call(**kw):
        base = dict(batch=1, num_heads=4, num_kv_heads=2, q_len=1, kv_len=100, head_dim=8, scale=0.35, causal=False)
        return AttentionCall(**{**base, **kw})

    runtime = LayerRuntime(0, "exact", {}, 0, decode_method="local")
    assert runtime.decide(call()).path == SERVE_DECODE
    assert runtime.decide(call(q_len=40)).path == SERVE_DECODE  # a chunk of a prompt against the cache
    assert runtime.decide(call(q_len=100)).path != SERVE_DECODE  # a prefill: the prefill method's
    expected = [({"output_attentions": True}, reasons.OUTPUT_ATTENTIONS_REASON),
                ({"dropout_in_training": True}, reasons.DROPOUT_REASON),
                ({"cross_attention": True}, reasons.DECODE_REASON),
                ({"mask_recognized": False}, reasons.FULL_MASK_REASON),
                ({"unsupported_inputs": ("softcap",)}, reasons.UNSUPPORTED_INPUT_REASON),
                ({"needs_grad": True}, reasons.NO_GRADIENT_REASON)]
    for fields, reason in expected:
        assert runtime.decide(call(**fields)) == Decision(SERVE_EXACT, reason), fields
    # the first rule wins
    assert runtime.decide(call(output_attentions=True, mask_recognized=False)).reason == reasons.OUTPUT_ATTENTIONS_REASON
    without = LayerRuntime(0, "exact", {}, 0, decode_method=None)
    assert without.decide(call()) == Decision(SERVE_EXACT, reasons.DECODE_REASON)
    decode_only = LayerRuntime(0, None, {}, 0, decode_method="exact")  # a plan may give a layer a decode method only
    assert decode_only.decide(call()).path == SERVE_DECODE and decode_only.decide(call(q_len=100)) == Decision(SERVE_EXACT)


def test_run_settings_record_the_resolved_decode_parameters():
    """A ruler / longbench run records the decode parameters it ran with, defaults filled in: a run made before a
    default changed then differs from a rerun under the new default (refused, not resumed with other settings); the
    default exact decode records nothing (runs made before decode methods existed keep resuming)."""
    import argparse

    from hf_sparse_attn.commands.arguments import decode_settings
    from hf_sparse_attn.eval.run_dir import settings_diff
    from hf_sparse_attn.methods import defaults

    quest = decode_settings(argparse.Namespace(decode_method="quest", decode_param=[]))
    assert quest["decode_method"] == "quest"
    assert quest["decode_params"]["token_budget"] == defaults.QUEST_TOKEN_BUDGET
    assert quest["decode_params"]["page_size"] == defaults.QUEST_PAGE_SIZE
    older = {"decode_method": "quest", "decode_params": {**quest["decode_params"], "token_budget": 1024}}
    diff = settings_diff(older, quest)
    assert diff == [f"decode_params.token_budget (1024 -> {defaults.QUEST_TOKEN_BUDGET})"]
    assert decode_settings(argparse.Namespace(decode_method="exact", decode_param=[])) == {}
    asked = decode_settings(argparse.Namespace(decode_method="quest", decode_param=["token_budget=1024"]))
    assert asked == older
