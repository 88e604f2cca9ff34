"""Decode methods with an index (``quest``, ``lsh``) over transformers' ``StaticCache``, eager and compiled: the index
is kept by the layer's runtime (patches/static_index.py), continued step by step, and never read for other contents."""

from __future__ import annotations

import copy
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import StaticCache

from hf_sparse_attn import GrowingCache, patch_model, unpatch_model
from hf_sparse_attn.methods import decode as decode_module
from hf_sparse_attn.methods.decode_pages import build_page_index
from hf_sparse_attn.patches import reasons
from hf_sparse_attn.patches.static_index import StaticIndexes
from tiny_checkpoint import greedy_steps, tiny_llama

VOCAB = 64
QUEST = {"page_size": 4, "token_budget": 16, "window": 8, "num_sink_tokens": 2}
LSH = {"window": 16, "num_sink_tokens": 4, "block_size": 16, "sample_size": 16}
PARAMS = {"quest": QUEST, "lsh": LSH}
STEPS = 4  # greedy steps after a prefill (tiny_checkpoint.greedy_steps)


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(VOCAB, num_layers=3)
    m.set_attn_implementation("sdpa")
    return m


@pytest.fixture
def builds(monkeypatch):
    """Counts the decode indexes built (DecodeSpec.build_index calls)."""
    count = [0]
    build = decode_module.DecodeSpec.build_index

    def counted(self, *args, **kwargs):
        count[0] += 1
        return build(self, *args, **kwargs)

    monkeypatch.setattr(decode_module.DecodeSpec, "build_index", counted)
    return count


def _prompt(length=200, seed=0, batch=2):
    ids = torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :7], mask[1, :7] = 0, 0
    return ids, mask


def _generate(model, ids, mask, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("decode_method", ["quest", "lsh"])
def test_a_static_cache_serves_the_decode_method_as_a_growing_cache_does(model, builds, decode_method):
    """generate(cache_implementation="static"), left-padded batch: every step served by the decode method (before:
    exact attention, counted), the tokens and scores of the same plan over a GrowingCache, one index built per layer
    and continued over the 11 steps."""
    ids, mask = _prompt()
    _, exact_scores = _generate(model, ids, mask)
    plan = patch_model(model, method="exact", layers="all", decode_method=decode_method,
                       decode_params=PARAMS[decode_method])
    try:
        growing = _generate(model, ids, mask, past_key_values=GrowingCache(model.config))
        plan.reset_counts()
        builds[0] = 0
        static = _generate(model, ids, mask, cache_implementation="static")
    finally:
        unpatch_model(model)
    assert torch.equal(static[0], growing[0])
    torch.testing.assert_close(static[1], growing[1], rtol=1e-5, atol=1e-5)
    assert [layer.decode_served for layer in plan.layers] == [11] * 3 and plan.fallback_counts() == {}, str(plan)
    assert builds[0] == 3
    assert (static[1] - exact_scores).abs().max() > 1e-4  # the method's selection, not exact attention


def test_a_static_cache_filled_again_is_not_read_through_the_old_index(model, builds):
    """The same StaticCache reset (as generate() does) and filled with a second prompt as long as the positions the
    old index describes (116 + 4 steps): its steps equal those over a fresh cache; the index is rebuilt, not
    continued."""
    first, first_mask = _prompt(length=116, seed=1)
    second, mask = _prompt(length=120, seed=2)
    plan = patch_model(model, method="exact", layers="all", decode_method="quest", decode_params=QUEST)
    try:
        with torch.no_grad():
            fresh = greedy_steps(model, second, mask, StaticCache(config=model.config, max_cache_len=130), STEPS)
            cache = StaticCache(config=model.config, max_cache_len=130)
            greedy_steps(model, first, first_mask, cache, STEPS)
            builds[0] = 0
            cache.reset()
            again = greedy_steps(model, second, mask, cache, STEPS)
    finally:
        unpatch_model(model)
    torch.testing.assert_close(again, fresh, rtol=1e-5, atol=1e-5)
    assert builds[0] == 3 and plan.fallback_counts() == {}, str(plan)


def test_the_index_continues_only_over_the_contents_it_saw():
    """StaticIndexes: a call that follows the indexed positions of the same contents continues the index; keys changed
    at the indexed edges, another view of the buffer, a non-consecutive call or a buffer that is not preallocated do
    not; an index is released with its buffer."""
    built = []

    def build(key, n, mask):
        built.append(n)
        return build_page_index(key, n, mask, page_size=4)

    buffer = torch.randn(2, 3, 64, 8)
    indexes = StaticIndexes()
    assert indexes.index(buffer, 40, 1, None, build).length == 40 and built == [39]
    assert indexes.index(buffer, 41, 1, None, build).length == 41 and built == [39]  # continued
    buffer[:, :, 40] += 1.0  # the last indexed key changed: the buffer holds other contents
    assert indexes.index(buffer, 42, 1, None, build).length == 42 and built == [39, 41]
    assert indexes.index(buffer, 44, 1, None, build).length == 44 and built == [39, 41, 43]  # a position skipped
    indexes.forget(buffer)  # a call wrote the buffer without the decode method
    assert indexes.index(buffer, 45, 1, None, build).length == 45 and built == [39, 41, 43, 44]
    assert indexes.index(buffer[:1], 46, 1, None, build).length == 46 and built[-1] == 45  # another batch
    assert indexes.index(torch.randn(2, 3, 50, 8), 50, 1, None, build) is None  # a DynamicCache's keys
    other = torch.randn(2, 3, 64, 8)
    indexes.index(other, 10, 1, None, build)
    assert len(indexes) == 2
    assert len(copy.deepcopy(indexes)) == 0 and len(pickle.loads(pickle.dumps(indexes))) == 0  # a copied model's
    del buffer, other  # the caches are gone: so are their indexes
    assert len(indexes) == 0


def test_compiled_steps_over_a_static_cache_serve_the_index_methods(model):
    """quest under torch.compile with a StaticCache: served at run time by the operator of compiled_cache.py (before:
    exact attention, the compile reason counted), with the eager outputs and counts. A GrowingCache under compile
    still runs exact, counted: tests/test_compile.py."""
    import torch._dynamo as dynamo

    ids, mask = _prompt(length=60)
    plan = patch_model(model, method="exact", layers="all", decode_method="quest", decode_params=QUEST)
    try:
        with torch.no_grad():
            eager = greedy_steps(model, ids, mask, StaticCache(config=model.config, max_cache_len=70), STEPS)
            counts = [layer.decode_served for layer in plan.layers]
            plan.reset_counts()
            dynamo.reset()
            compiled = greedy_steps(torch.compile(model, backend="aot_eager"), ids, mask,
                                    StaticCache(config=model.config, max_cache_len=70), STEPS)
    finally:
        dynamo.reset()
        unpatch_model(model)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert counts == [STEPS] * 3 and [layer.decode_served for layer in plan.layers] == counts, str(plan)
    assert plan.fallback_counts() == {}, str(plan)


def test_concurrent_static_caches_give_the_sequential_results(model):
    prompts = [_prompt(length=100, seed=s, batch=1) for s in range(3)]

    def run(prompt):
        with torch.no_grad():
            return greedy_steps(model, *prompt, StaticCache(config=model.config, max_cache_len=110), STEPS)

    patch_model(model, method="exact", layers="all", decode_method="quest", decode_params=QUEST)
    try:
        sequential = [run(prompt) for prompt in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            concurrent = list(pool.map(run, prompts))
    finally:
        unpatch_model(model)
    for a, b in zip(sequential, concurrent):
        torch.testing.assert_close(a, b)


def test_a_dynamic_cache_still_says_how_to_keep_the_index(model):
    ids, mask = _prompt(length=60)
    plan = patch_model(model, method="exact", layers="all", decode_method="quest", decode_params=QUEST)
    try:
        _generate(model, ids, mask)
    finally:
        unpatch_model(model)
    assert plan.fallback_counts() == {reasons.NO_INDEXED_CACHE_REASON: 3 * 11}
    assert "StaticCache" in reasons.NO_INDEXED_CACHE_REASON and "GrowingCache" in reasons.NO_INDEXED_CACHE_REASON
