"""The ChatGLM2/3 adapter on the local remote-code checkpoint (tests/fixtures/chatglm, written from the published
interface; the hub code cannot be downloaded here), called through its own forward with padding and its KV cache."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures", "chatglm"))
from write_checkpoint import write_checkpoint  # noqa: E402

from hf_sparse_attn import capture_attention, generation_cache, patch_model, rank_layers, unpatch_model  # noqa: E402



@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm_adapter")
    return {layout: write_checkpoint(str(root / layout), "chatglm2", layout) for layout in ("seq_first", "batch_first")}


@pytest.fixture
def load(checkpoint_dirs):
    from transformers import AutoModelForCausalLM

    def _load(layout):
        return AutoModelForCausalLM.from_pretrained(checkpoint_dirs[layout], trust_remote_code=True).eval()

    return _load


@pytest.mark.parametrize("layout", ["seq_first", "batch_first"])
def test_exact_patch_matches_with_padding_and_decode(load, layout):
    model = load(layout)
    ids = torch.randint(3, 150, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)  # decode keeps the padding mask
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        ref_nomask = model(ids).logits
        step_ref = model(ids[:, :1], attention_mask=step_mask, kv_cache=ref.kv_cache).logits
        plan = patch_model(model, method="exact", layers="all")
        out = model(ids, attention_mask=mask)
        out_nomask = model(ids).logits
        step = model(ids[:, :1], attention_mask=step_mask, kv_cache=out.kv_cache).logits
    valid = mask.bool()
    assert (out.logits - ref.logits)[valid].abs().max() < 1e-5
    assert (out_nomask - ref_nomask).abs().max() < 1e-5
    assert torch.allclose(step, step_ref, atol=1e-5)
    assert all(layer.served == 2 for layer in plan.layers)
    assert all(layer.decode_served == 1 for layer in plan.layers)  # the padded decode step: patch_model's exact decode
    assert plan.fallback_counts() == {}
    assert generation_cache(model) is None  # the remote code keeps its own cache: no GrowingCache is handed to it
    unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref.logits)
    assert all("forward" not in layer.self_attention.core_attention.__dict__ for layer in model.transformer.encoder.layers)


def test_ranking_reads_fused_qkv_with_multi_query_groups(load):
    model = load("batch_first")
    ranking = rank_layers(model)
    block = model.transformer.encoder.layers[0]
    w = block.self_attention.query_key_value.weight.detach().double()
    gain = block.input_layernorm.weight.detach().double()
    w_q0 = w[:16] * gain  # head 0 rows
    w_k0 = w[64:80] * gain  # KV group 0 (heads 0 and 1 read it)
    brute = torch.linalg.matrix_norm(w_q0.T @ w_k0, ord=2).item()
    assert abs(ranking.head_weight_norms[0][0] - brute) < 1e-4 * brute
    assert ranking.norm_sources[0].endswith("input_layernorm")


def test_accelerate_hook_on_core_attention_is_kept(load):
    class Counter(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counter.calls += 1
            return args, kwargs

    model = load("batch_first")
    for layer in model.transformer.encoder.layers:
        add_hook_to_module(layer.self_attention.core_attention, Counter())
    ids = torch.randint(3, 150, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
        plan = patch_model(model, method="exact", layers="all")
        before = Counter.calls
        out = model(ids).logits
    assert Counter.calls - before == 3 and all(layer.served == 1 for layer in plan.layers)
    assert torch.allclose(out, ref, atol=1e-5)
    unpatch_model(model)


def test_ambiguous_layout_asks_for_the_option(load):
    model = load("seq_first")
    ids = torch.randint(3, 150, (4, 4))  # b == np == sq == 4: both layouts fit
    patch_model(model, method="exact", layers="all")
    with pytest.raises(ValueError, match="chatglm_layout"):
        with torch.no_grad():
            model(ids)
    patch_model(model, method="exact", layers="all", adapter_options={"chatglm_layout": "seq_first"})
    with torch.no_grad():
        out = model(ids).logits
    unpatch_model(model)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, out, atol=1e-5)


def test_capture_sees_rotated_queries(load):
    model = load("batch_first")
    ids = torch.randint(3, 150, (1, 7))
    with torch.no_grad(), capture_attention(model, layers=[1]) as captured:
        model(ids)
    (call,) = captured[1]
    assert call.query.shape == (1, 4, 7, 16) and call.causal and call.key_padding_mask is None


def test_compiled_decode_steps_serve_the_decode_method(load):
    """Decode steps of the remote code under torch.compile: the adapter hands each call against the model's own cache
    to the run-time operator (compiled_cache.py), so ``local`` decode serves them as in eager (the same logits and
    counts; before, they ran exact attention, counted as a compile fallback). ``local`` over a 40-token prompt with a
    window of 8 is not exact attention, so a quiet exact fallback would fail the last check."""
    import torch._dynamo as dynamo

    model = load("seq_first")
    ids = torch.randint(3, 150, (1, 40), generator=torch.Generator().manual_seed(2))

    def greedy(forward, steps=3):
        out = forward(ids)
        logits, cache = [out.logits[:, -1]], out.kv_cache
        for _ in range(steps):
            out = forward(logits[-1].argmax(-1, keepdim=True), kv_cache=cache)
            logits.append(out.logits[:, -1])
            cache = out.kv_cache
        return torch.stack(logits, dim=1)

    with torch.no_grad():
        unpatched = greedy(model)
        plan = patch_model(model, method="local", layers="all", window=8, num_sink_tokens=2, min_seq_len=16,
                           decode_method="local", decode_params={"window": 8, "num_sink_tokens": 2})
        eager = greedy(model)
        eager_counts = [(layer.served, layer.decode_served) for layer in plan.layers]
        assert eager_counts == [(1, 3)] * len(plan.layers), str(plan)
        plan.reset_counts()
        dynamo.reset()
        compiled = greedy(torch.compile(model, backend="eager"))
    dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert [(layer.served, layer.decode_served) for layer in plan.layers] == eager_counts, str(plan)
    assert not any(layer.fallbacks or layer.decode_fallbacks for layer in plan.layers), str(plan)
    assert (compiled[:, 1:] - unpatched[:, 1:]).abs().max() > 1e-3
