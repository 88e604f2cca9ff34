"""A prompt fed in chunks against a KV cache (``generate(prefill_chunk_size=...)``) is served by the layer's prefill
method where the method has a ``chunk_fn`` (``local``, ``block_select``): tensor-level equality with the rows of the
whole prefill, exactness where the window covers the cache, the retrieval property, and the routing inside a tiny
random Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from hf_sparse_attn import patch_model, unpatch_model
from hf_sparse_attn.methods.block_select import block_select_attention, block_select_chunk
from hf_sparse_attn.methods.decode import CHUNK_TILE_ROWS, exact_decode
from hf_sparse_attn.methods.local import local_attention, local_chunk
from hf_sparse_attn.methods.registry import get_spec, list_methods
from hf_sparse_attn.patches import reasons
from hf_sparse_attn.patches.base import SERVE_CHUNK, SERVE_DECODE, SERVE_EXACT, AttentionCall, Decision, LayerRuntime

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoint import tiny_llama  # noqa: E402

SCALE = 0.25
LOCAL = {"window": 64, "num_sink_tokens": 4}
VERTICAL = {"window": 64, "num_sink_tokens": 4, "num_selected": 40, "block_size": 4, "probe_queries": 16}
MOBA = {**VERTICAL, "selection": "moba", "block_size": 8, "query_block": 50}


def _qkv(batch=2, kv_heads=2, groups=3, n=700, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, n, d, generator=gen)
    k = torch.randn(batch, kv_heads, n, d, generator=gen)
    v = torch.randn(batch, kv_heads, n, d, generator=gen)
    return q, k, v


def _left_padded(batch: int, n: int, pad: int) -> torch.Tensor:
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[-1, :pad] = False
    return mask


def _whole_prefill_rows(full_fn, q, k, v, mask, params, c):
    groups = q.shape[1] // k.shape[1]
    out, lse = full_fn(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), causal=True, scale=SCALE,
                       key_padding_mask=mask, **params)
    return out[:, :, -c:], lse[:, :, -c:]


@pytest.mark.parametrize("chunk", [1, 100, 600])  # 600 > CHUNK_TILE_ROWS: several row tiles
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name,full_fn,chunk_fn,params", [
    ("local", local_attention, local_chunk, LOCAL),
    ("vertical", block_select_attention, block_select_chunk, VERTICAL),
    ("vertical columns", block_select_attention, block_select_chunk, {**VERTICAL, "block_size": 1}),
])
def test_the_last_chunk_equals_the_rows_of_the_whole_prefill(name, full_fn, chunk_fn, params, chunk, padded):
    """The last chunk's probe rows are the prompt's last rows, so its selection, and every row, is the whole
    prefill's (left padding included: sinks and blocks counted from each row's first real token)."""
    assert 600 > CHUNK_TILE_ROWS
    q, k, v = _qkv()
    n = k.shape[2]
    mask = _left_padded(2, n, 37) if padded else None
    ref_out, ref_lse = _whole_prefill_rows(full_fn, q, k, v, mask, params, chunk)
    out, lse = chunk_fn(q[:, :, n - chunk:], k, v, scale=SCALE, kv_len=n, key_padding_mask=mask, **params)
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("start", [0, 100, 350])
def test_a_moba_chunk_starting_on_a_query_block_equals_the_whole_prefill(start):
    """moba pools each query block over its rows: a chunk that starts on a block boundary pools the same rows. Rows
    of an earlier chunk are compared with a prefill of the prompt up to that chunk's end (what it can see)."""
    q, k, v = _qkv(batch=1)
    stop = start + 200
    ref_out, _ = _whole_prefill_rows(block_select_attention, q[:, :, :stop], k[:, :, :stop], v[:, :, :stop], None,
                                     {**MOBA, "probe_queries": 0}, 200)
    out, _ = block_select_chunk(q[:, :, start:stop], k, v, scale=SCALE, kv_len=stop, **{**MOBA, "probe_queries": 0})
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("chunk_fn,params", [(local_chunk, {"window": 700, "num_sink_tokens": 4}),
                                             (block_select_chunk, {**VERTICAL, "window": 700}),
                                             (block_select_chunk, {**VERTICAL, "num_selected": 700})])
def test_a_chunk_is_exact_where_window_or_selection_covers_the_cache(chunk_fn, params):
    q, k, v = _qkv()
    mask = _left_padded(2, k.shape[2], 37)
    for chunk in (1, 300):
        ref, ref_lse = exact_decode(q[:, :, -chunk:], k, v, scale=SCALE, kv_len=k.shape[2], key_padding_mask=mask)
        out, lse = chunk_fn(q[:, :, -chunk:], k, v, scale=SCALE, kv_len=k.shape[2], key_padding_mask=mask, **params)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=2e-6)


def test_a_chunk_finds_a_needle_far_behind_its_window():
    """MInference's premise: the last queries' mass finds the keys every row needs. A key planted 572-699 positions
    behind the chunk, aligned with every query, carries most of each row's softmax mass: block_select's chunk attends
    it (near-exact output), local's window does not."""
    q, k, v = _qkv(batch=1, n=800)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(1)), dim=0)
    q = q * 0.1 + 4.0 * direction
    k[:, :, 100] = 12.0 * direction
    v[:, :, 100] = 10.0
    chunk = 128
    ref, _ = exact_decode(q[:, :, -chunk:], k, v, scale=SCALE, kv_len=800)
    local, _ = local_chunk(q[:, :, -chunk:], k, v, scale=SCALE, kv_len=800, **LOCAL)
    selected, _ = block_select_chunk(q[:, :, -chunk:], k, v, scale=SCALE, kv_len=800, **VERTICAL)
    error = lambda out: ((out - ref).norm() / ref.norm()).item()  # noqa: E731
    assert error(selected) < 0.02 < 0.5 < error(local)


def test_low_precision_chunks_are_finite_and_computed_in_float():
    """bf16 / fp16 inputs: the chunk is computed in float32 from the rounded inputs (same selection) and cast back."""
    q, k, v = _qkv()
    mask = _left_padded(2, k.shape[2], 650)  # the padding reaches into the chunk: those rows attend nothing
    for dtype in (torch.bfloat16, torch.float16):
        q_, k_, v_ = q[:, :, -100:].to(dtype), k.to(dtype), v.to(dtype)
        ref, _ = block_select_chunk(q_.float(), k_.float(), v_.float(), scale=SCALE, kv_len=700,
                                    key_padding_mask=mask, **VERTICAL)
        out, lse = block_select_chunk(q_, k_, v_, scale=SCALE, kv_len=700, key_padding_mask=mask, **VERTICAL)
        assert out.dtype == dtype and torch.isfinite(out).all() and not torch.isnan(lse).any()
        torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
        assert torch.equal(out[1, :, :50].float(), torch.zeros_like(ref[1, :, :50]))  # padding rows: output 0


def test_which_methods_serve_chunks_is_declared_on_the_spec():
    serving = sorted(name for name in list_methods() if get_spec(name).chunk_fn is not None)
    assert serving == ["block_select", "local"]


def _call(**fields):
    base = dict(batch=1, num_heads=4, num_kv_heads=2, q_len=40, kv_len=100, head_dim=8, scale=0.35, causal=True)
    return AttentionCall(**{**base, **fields})


def test_the_decision_gives_a_chunk_to_the_prefill_method_when_it_can_serve_it():
    runtime = LayerRuntime(0, "local", {"window": 16, "min_seq_len": 64}, 0, decode_method="exact")
    assert runtime.decide(_call()).path == SERVE_CHUNK
    assert runtime.decide(_call(q_len=1)).path == SERVE_DECODE  # a decode step: the decode method's
    # below min_seq_len the whole prefill would run exact: so does the chunk (not the decode method)
    assert runtime.decide(_call(kv_len=60, q_len=40)) == Decision(SERVE_EXACT, reasons.min_seq_len_reason(64))
    assert runtime.decide(_call(needs_grad=True)) == Decision(SERVE_EXACT, reasons.NO_GRADIENT_REASON)
    assert runtime.decide(_call(mask_recognized=False)) == Decision(SERVE_EXACT, reasons.FULL_MASK_REASON)
    no_chunks = LayerRuntime(0, "sparse_hyper", {}, 0, decode_method="local")
    assert no_chunks.decide(_call()).path == SERVE_DECODE
    without_decode = LayerRuntime(0, "local", {"window": 16, "min_seq_len": 64}, 0, decode_method=None)
    assert without_decode.decide(_call()).path == SERVE_CHUNK
    assert without_decode.decide(_call(q_len=1)).path == SERVE_EXACT


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(64, num_layers=3)
    m.set_attn_implementation("sdpa")
    return m


def _chunked_logits(model, ids, mask, chunk):
    cache = DynamicCache()
    logits = []
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            stop = start + chunk
            logits.append(model(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop],
                                past_key_values=cache, position_ids=positions[:, start:stop]).logits)
    return torch.cat(logits, dim=1)


def _padded_prompt(length: int = 60):
    ids = torch.randint(4, 64, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids, mask


def test_a_local_model_fed_in_chunks_computes_its_whole_prefill(model):
    """local's rows do not depend on other queries, so every chunk's logits equal the whole patched prefill's (left
    padding included); the chunks of more than DECODE_MAX_QUERIES rows are served by local, none by decode."""
    ids, mask = _padded_prompt()
    plan = patch_model(model, method="local", layers="all", window=8, num_sink_tokens=2, min_seq_len=1)
    try:
        with torch.no_grad():
            whole = model(input_ids=ids, attention_mask=mask).logits
        chunked = _chunked_logits(model, ids, mask, 20)
    finally:
        unpatch_model(model)
    with torch.no_grad():
        unpatched = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(chunked[real], whole[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole[real], unpatched[real], atol=1e-3)  # the window of 8 matters
    assert sum(layer.served for layer in plan.layers) == 3 + 3 * 3  # the whole prefill; 20 rows, then 2 chunks
    assert sum(layer.decode_served for layer in plan.layers) == 0 and plan.fallback_counts() == {}


def test_block_select_chunks_inside_a_model_are_exact_where_the_window_covers_them(model):
    ids, mask = _padded_prompt()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    plan = patch_model(model, method="block_select", layers="all", window=64, num_selected=6, probe_queries=16,
                       min_seq_len=1)
    try:
        chunked = _chunked_logits(model, ids, mask, 20)
    finally:
        unpatch_model(model)
    real = mask.bool()
    torch.testing.assert_close(chunked[real], ref[real], atol=1e-5, rtol=1e-5)
    assert sum(layer.served for layer in plan.layers) == 3 * 3
    assert sum(layer.decode_served for layer in plan.layers) == 0


def test_generate_with_prefill_chunks_uses_the_prefill_method(model):
    """transformers' own chunked prefill (generate(prefill_chunk_size=...), into a cache it is given, as transformers
    5.0 requires): with a window that covers the prompt the tokens are the unpatched model's, and the chunks were
    served by ``local``."""
    ids = torch.randint(4, 64, (1, 60), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, prefill_chunk_size=20)
    ref = model.generate(input_ids=ids, past_key_values=DynamicCache(), **kwargs)
    plan = patch_model(model, method="local", layers="all", window=64, min_seq_len=1)
    try:
        out = model.generate(input_ids=ids, past_key_values=DynamicCache(), **kwargs)
    finally:
        unpatch_model(model)
    assert torch.equal(out, ref)
    assert sum(layer.served for layer in plan.layers) == 3 * 3  # 3 chunks of the 60-token prompt, 3 layers
    steps = out.shape[1] - ids.shape[1] - 1  # the first new token comes from the last chunk
    assert steps > 0 and sum(layer.decode_served for layer in plan.layers) == 3 * steps


def test_chunks_computed_in_threads_at_once_equal_the_sequential_ones(model):
    """No state shared between calls: three prompts fed in chunks from three threads at once give each prompt's
    sequential logits (block_select serving the chunks)."""
    import threading

    prompts = [torch.randint(4, 64, (1, 60), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    patch_model(model, method="block_select", layers="all", window=8, num_selected=6, probe_queries=8, min_seq_len=1)
    try:
        sequential = [_chunked_logits(model, ids, torch.ones_like(ids), 20) for ids in prompts]
        results = [None] * 3

        def run(i):
            results[i] = _chunked_logits(model, prompts[i], torch.ones_like(prompts[i]), 20)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        unpatch_model(model)
    for got, want in zip(results, sequential):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
