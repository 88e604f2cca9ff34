"""GrowingCache (hf_sparse_attn/patches/decode_cache.py) against transformers' DynamicCache on tiny random Llama models:
identical generate() outputs (greedy with left padding, beam search), crop, batch selection, mask sizes, and appends
that do not copy the stored tokens."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import transformers as T
from transformers import DynamicCache

from hf_sparse_attn.patches.decode_cache import GrowingCache, GrowingLayer

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(seed: int = 0, layers: int = 3) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return T.LlamaForCausalLM(config).eval()


def _left_padded(batch: int = 3, length: int = 14, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask [batch, length]: row b has b * 3 pad tokens on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        ids[b, : 3 * b] = 0
        mask[b, : 3 * b] = 0
    return ids, mask


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's name for the cache: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (5.0)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _generate(model, cache, **kwargs):
    ids, mask = kwargs.pop("inputs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # past_key_values is deprecated in favour of cache in later 5.x releases
        return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, pad_token_id=0,
                              return_dict_in_generate=True, output_scores=True, **kwargs)


def test_greedy_generate_with_left_padding_equals_dynamic_cache():
    model = _llama()
    inputs = _left_padded()
    ref_cache, cache = DynamicCache(config=model.config), GrowingCache(model.config)
    ref = _generate(model, ref_cache, inputs=inputs, max_new_tokens=24, do_sample=False)
    out = _generate(model, cache, inputs=inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == 24 and all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers) and len(cache.layers) == 3
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 14 + 24 - 1
    for mine, theirs in zip(cache.layers, ref_cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        assert mine.capacity >= mine.get_seq_length()


def test_cache_without_config_makes_growing_layers_on_first_update():
    model = _llama(seed=2)
    inputs = _left_padded(batch=2, seed=3)
    ref = _generate(model, DynamicCache(), inputs=inputs, max_new_tokens=10, do_sample=False)
    cache = GrowingCache()
    out = _generate(model, cache, inputs=inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(out.sequences, ref.sequences)
    assert [type(layer) for layer in cache.layers] == [GrowingLayer] * 3


def test_beam_search_equals_dynamic_cache():
    model = _llama(seed=4)
    inputs = _left_padded(batch=2, seed=5)
    kwargs = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False)
    ref = _generate(model, DynamicCache(config=model.config), inputs=inputs, **kwargs)
    calls = []
    original = GrowingLayer.reorder_cache

    def counting(self, beam_idx):
        calls.append(beam_idx.clone())
        original(self, beam_idx)

    GrowingLayer.reorder_cache = counting
    try:
        out = _generate(model, GrowingCache(model.config), inputs=inputs, **kwargs)
    finally:
        GrowingLayer.reorder_cache = original
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.sequences_scores, ref.sequences_scores)
    assert calls and any(not torch.equal(c, torch.arange(c.numel())) for c in calls)  # a real reordering happened


def _prefill(model, cache, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache}).logits


def test_crop_then_continue_equals_dynamic_cache():
    model = _llama(seed=6)
    ids = torch.randint(3, 101, (2, 20), generator=torch.Generator().manual_seed(7))
    logits = {}
    caches = {"dynamic": DynamicCache(config=model.config), "growing": GrowingCache(model.config)}
    for name, cache in caches.items():
        _prefill(model, cache, ids[:, :16])
        cache.crop(-5)  # remove 5 tokens: the same call in transformers 5.0 and later releases
        assert cache.get_seq_length() == 11
        logits[name] = _prefill(model, cache, ids[:, 11:20])
        assert cache.get_seq_length() == 20
    assert torch.equal(logits["growing"], logits["dynamic"])
    full = _prefill(model, DynamicCache(config=model.config), ids)
    torch.testing.assert_close(logits["growing"], full[:, 11:], rtol=1e-4, atol=1e-5)
    storage = caches["growing"].layers[0].buffer.key_storage
    assert storage.shape[2] >= 20


def test_batch_select_and_repeat_interleave_equal_dynamic_cache():
    model = _llama(seed=8)
    ids = torch.randint(3, 101, (3, 9), generator=torch.Generator().manual_seed(9))
    ref, cache = DynamicCache(config=model.config), GrowingCache(model.config)
    for c in (ref, cache):
        _prefill(model, c, ids)
        c.batch_repeat_interleave(2)
        c.batch_select_indices(torch.tensor([5, 0, 2]))
    for mine, theirs in zip(cache.layers, ref.layers):
        assert mine.keys.shape == theirs.keys.shape == (3, 2, 9, 16)
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    cache.batch_select_indices(torch.tensor([True, False, True]))
    assert torch.equal(cache.layers[1].values, ref.layers[1].values[[0, 2]])


def test_seq_length_and_mask_sizes_equal_dynamic_cache():
    model = _llama(seed=10)
    ids = torch.randint(3, 101, (1, 7))
    ref, cache = DynamicCache(config=model.config), GrowingCache(model.config)
    # transformers 5.0 passes the cache positions, later releases the query length
    by_length = "query_length" in inspect.signature(T.cache_utils.DynamicLayer.get_mask_sizes).parameters
    query = 3 if by_length else torch.arange(7, 10)
    assert cache.get_seq_length() == ref.get_seq_length() == 0
    for c in (ref, cache):
        _prefill(model, c, ids)
    assert cache.get_seq_length() == ref.get_seq_length() == 7
    for layer_idx in range(3):
        assert cache.get_mask_sizes(query, layer_idx) == ref.get_mask_sizes(query, layer_idx) == (10, 0)
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.layers[0].is_initialized


def test_append_within_capacity_does_not_copy_the_stored_tokens():
    layer = GrowingLayer()
    k0, v0 = torch.randn(2, 3, 100, 8), torch.randn(2, 3, 100, 8)
    keys, _ = layer.update(k0, v0)
    assert layer.capacity == 100
    keys, _ = layer.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))  # the first step doubles: 200
    assert layer.capacity == 200
    storage_ptr, keys_ptr = layer.buffer.key_storage.data_ptr(), keys.data_ptr()
    steps = [(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)) for _ in range(99)]
    for k, v in steps:
        keys, values = layer.update(k, v)
        assert keys.data_ptr() == keys_ptr and layer.buffer.key_storage.data_ptr() == storage_ptr
    assert keys.shape == (2, 3, 200, 8) and torch.equal(keys[:, :, :100], k0)
    assert torch.equal(values[:, :, 101:], torch.cat([v for _, v in steps], dim=2))
    layer.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))  # full: grows once more
    assert layer.capacity == 400 and layer.buffer.key_storage.data_ptr() != storage_ptr


def test_generate_reallocates_logarithmically_and_once_with_max_cache_len():
    model = _llama(seed=11, layers=1)
    inputs = _left_padded(batch=1, length=8, seed=12)
    cache = GrowingCache(model.config)
    _generate(model, cache, inputs=inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    buffer = cache.layers[0].buffer
    assert buffer.length == 47 and buffer.reallocations == math.ceil(math.log2(47 / 8))  # 8 -> 16 -> 32 -> 64: 3 copies
    reserved = GrowingCache(model.config, max_cache_len=48)
    _generate(model, reserved, inputs=inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert reserved.layers[0].buffer.reallocations == 0 and reserved.layers[0].capacity == 48
    with pytest.raises(ValueError, match="growth"):
        GrowingCache(model.config, growth=1.0)
