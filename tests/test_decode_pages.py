"""The ``quest`` decode method and its page index (hf_sparse_attn/methods/decode_pages.py).

Random tensors; references are dense softmax attention with the KV heads expanded (transformers' repeat_kv order),
masked to the keys the method must attend. The model-level tests run a tiny random Llama through patch_model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hf_sparse_attn import GrowingCache, generation_cache, patch_model, unpatch_model
from hf_sparse_attn.methods.decode import exact_decode, get_decode_method, get_decode_spec, local_decode
from hf_sparse_attn.methods.decode_pages import PageIndex, build_page_index, page_bounds, quest_decode
from hf_sparse_attn.methods.kv_buffer import kv_bytes

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoint import tiny_llama  # noqa: E402

B, HKV, G, D = 2, 3, 3, 32
SCALE = D ** -0.5
NEG_INF = float("-inf")


def make(kv_len, nq=1, extra=0, seed=0, dtype=torch.float32, batch=B):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, HKV, kv_len + extra, D, generator=g).to(dtype)
    v = torch.randn(batch, HKV, kv_len + extra, D, generator=g).to(dtype)
    q = torch.randn(batch, HKV * G, nq, D, generator=g).to(dtype)
    return q, k, v


def pad_mask(kv_len, pads):
    mask = torch.ones(len(pads), kv_len, dtype=torch.bool)
    for b, p in enumerate(pads):
        mask[b, :p] = False
    return mask


PADDINGS = {"none": None, "same": [40, 40], "different": [0, 123]}


def reference(q, k, v, kv_len, allowed):
    """Dense attention of q [B, Hq, Nq, D] over k/v [B, Hkv, >= kv_len, D] restricted to allowed [B, Hkv, Nq, kv_len]
    (per KV head; expanded to its query heads) -> out, lse float32 (out 0 and lse -inf for an empty row)."""
    ke = k[:, :, :kv_len].float().repeat_interleave(G, dim=1)
    ve = v[:, :, :kv_len].float().repeat_interleave(G, dim=1)
    s = (q.float() @ ke.transpose(-1, -2) * SCALE).masked_fill(~allowed.repeat_interleave(G, dim=1), NEG_INF)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.nan_to_num(p) @ ve, lse


def causal_allowed(kv_len, nq, mask, batch=B):
    pos = kv_len - nq + torch.arange(nq)
    allowed = (torch.arange(kv_len)[None, :] <= pos[:, None])[None, None].expand(batch, HKV, nq, kv_len)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    return allowed


def quest_allowed(kv_len, nq, mask, stats, page_size, sinks, batch=B):
    """The keys the method must attend: sinks [pad, pad + S), window [w0, kv_len), the selected pages without their
    sink positions; causal and padding on top."""
    pads = torch.zeros(batch, dtype=torch.long) if mask is None else mask.int().argmax(-1)
    j = torch.arange(kv_len)
    sel = torch.zeros(batch, HKV, kv_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(HKV):
            for p, ok in zip(stats["pages"][b, h].tolist(), stats["pages_ok"][b, h].tolist()):
                if ok:
                    sel[b, h, p * page_size:(p + 1) * page_size] = True
    sink = (j[None, :] >= pads[:, None]) & (j[None, :] < pads[:, None] + sinks)  # [B, L]
    sel &= j >= (pads + sinks)[:, None, None]
    keys = sink[:, None, :] | (j >= stats["window_start"])[None, None, :] | sel  # [B, Hkv, L]
    return causal_allowed(kv_len, nq, mask, batch) & keys[:, :, None, :]


# ---- exact when the budget covers the middle --------------------------------------------------------------------

@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("padding", list(PADDINGS))
def test_quest_is_exact_when_the_budget_covers_the_middle(nq, padding):
    kv_len = 700
    q, k, v = make(kv_len, nq, extra=20)
    mask = None if PADDINGS[padding] is None else pad_mask(kv_len, PADDINGS[padding])
    ref, ref_lse = exact_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask)
    for budget in (10_000, 700):  # 700 tokens: every candidate page (at most 39) fits
        stats = {}
        out, lse = quest_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask, page_size=16,
                                token_budget=budget, window=64, num_sink_tokens=8, stats=stats)
        assert stats["mode"] == "exact"
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    most = int(stats["candidates"].max())  # one page fewer than the candidates of the fullest row: sparse
    stats = {}
    quest_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask, page_size=16, token_budget=16 * most,
                 window=64, num_sink_tokens=8, stats=stats)
    assert stats["mode"] == "exact"
    quest_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask, page_size=16,
                 token_budget=16 * most - 1, window=64, num_sink_tokens=8, stats=stats)
    assert stats["mode"] == "quest"


# ---- sparse: exact attention over sinks + window + the chosen pages ---------------------------------------------

@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("sinks", [8, 20])  # 20: the sinks end inside a page, which stays a candidate without them
def test_quest_equals_attention_over_sinks_window_and_chosen_pages(nq, padding, sinks):
    kv_len, ps, budget, window = 1000, 16, 128, 70
    q, k, v = make(kv_len, nq, extra=13, seed=1)
    mask = None if PADDINGS[padding] is None else pad_mask(kv_len, PADDINGS[padding])
    stats = {}
    out, lse = quest_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask, page_size=ps,
                            token_budget=budget, window=window, num_sink_tokens=sinks, stats=stats)
    assert stats["mode"] == "quest" and stats["pages"].shape == (B, HKV, budget // ps)
    w0 = stats["window_start"]
    assert w0 % ps == 0 and w0 <= kv_len - nq + 1 - window < w0 + ps  # the window widened down to a page boundary
    assert int(stats["pages"].max()) < w0 // ps  # every selected page lies before the window
    ref, ref_lse = reference(q, k, v, kv_len, quest_allowed(kv_len, nq, mask, stats, ps, sinks))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)

    # the selection: per (batch, KV head) the pages of largest bound, computed here from the keys themselves
    pads = [0, 0] if mask is None else PADDINGS[padding]
    qg = q.float().reshape(B, HKV, G * nq, D)
    for b in range(B):
        first = (pads[b] + sinks) // ps
        keys = k[b, :, first * ps:w0].float().reshape(HKV, -1, ps, D)  # candidate pages [Hkv, P, ps, D]
        real = torch.arange(first * ps, w0) >= pads[b]
        lo = keys.masked_fill(~real.view(1, -1, ps, 1), float("inf")).amin(2)
        hi = keys.masked_fill(~real.view(1, -1, ps, 1), NEG_INF).amax(2)
        bound = torch.maximum(qg[b, :, :, None] * lo[:, None], qg[b, :, :, None] * hi[:, None]).sum(-1).amax(1)
        want = torch.topk(bound, budget // ps, dim=-1).indices.sort(-1).values + first
        assert torch.equal(stats["pages"][b], want)


def test_quest_is_deterministic_and_takes_a_built_index():
    q, k, v = make(2000, 2, seed=2)
    index = get_decode_spec("quest").build_index(k, 2000, page_size=16)
    assert isinstance(index, PageIndex) and index.num_pages == 125 and index.length == 2000
    fn = get_decode_method("quest", page_size=16, token_budget=256, window=64)
    a = fn(q, k, v, scale=SCALE, kv_len=2000, index=index)
    b = fn(q, k, v, scale=SCALE, kv_len=2000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="describes 2000 positions"):
        fn(q, k, v, scale=SCALE, kv_len=1990, index=index)
    with pytest.raises(ValueError, match="pages of 16"):
        quest_decode(q, k, v, scale=SCALE, kv_len=2000, index=index, page_size=32, token_budget=256)


def test_a_planted_key_is_found_and_its_page_selected():
    """One key in the middle has a large dot product with one query head of each KV head: Quest selects its page
    (the bound of a KV head's page is the max over its query heads) and its value dominates the output; local
    (sinks + window) cannot see it."""
    kv_len, ps, where = 4096, 32, 2001
    q, k, v = make(kv_len, batch=1, seed=3)
    for h in range(HKV):
        head = h * G + 1  # the middle query head of the group
        k[0, h, where] = q[0, head, 0] / q[0, head, 0].norm() * 40.0
        v[0, h, where] = 10.0
    stats = {}
    out, _ = quest_decode(q, k, v, scale=SCALE, kv_len=kv_len, page_size=ps, token_budget=256, window=256,
                          num_sink_tokens=64, stats=stats)
    assert stats["mode"] == "quest"
    assert all(where // ps in stats["pages"][0, h].tolist() for h in range(HKV))
    exact, _ = exact_decode(q, k, v, scale=SCALE, kv_len=kv_len)
    local, _ = local_decode(q, k, v, scale=SCALE, kv_len=kv_len, window=256, num_sink_tokens=64)
    heads = [h * G + 1 for h in range(HKV)]
    assert (exact[0, heads, 0] > 9.0).all() and (out[0, heads, 0] > 9.0).all()  # the planted value dominates
    assert (local[0, heads, 0].abs() < 2.0).all()
    torch.testing.assert_close(out[0, heads], exact[0, heads], atol=1e-3, rtol=1e-3)


# ---- the bound and the index ------------------------------------------------------------------------------------

def test_the_bound_is_an_upper_bound_of_every_score_in_the_page():
    ps = 8
    for seed in range(5):
        q, k, _ = make(300, nq=2, seed=seed)
        k = k * torch.rand(1, 1, 300, 1) * 3  # keys of varied norms
        mask = pad_mask(300, [0, 37])
        if seed == 0:
            mask[1] = False  # row 1 all padding: every page's bound is -inf
        index = PageIndex.build(k, key_padding_mask=mask, page_size=ps)
        qg = q.reshape(B, HKV, G * 2, D)
        bound = page_bounds(qg, index.page_min, index.page_max)  # [B, Hkv, M, P]
        scores = (qg @ k[:, :, :index.num_pages * ps].transpose(-1, -2)).view(B, HKV, G * 2, -1, ps)
        scores = scores.masked_fill(~mask[:, None, None, :index.num_pages * ps].view(B, 1, 1, -1, ps), NEG_INF)
        assert not torch.isnan(bound).any()
        assert (bound >= scores.amax(-1) - 1e-4).all()
        all_pad = ~mask[:, :index.num_pages * ps].view(B, -1, ps).any(-1)  # [B, P]
        assert torch.equal(torch.isneginf(bound), all_pad[:, None, None, :].expand_as(bound))


def _same_index(a: PageIndex, b: PageIndex):
    assert a.length == b.length and a.num_pages == b.num_pages
    assert torch.equal(a.page_min, b.page_min) and torch.equal(a.page_max, b.page_max)
    assert torch.equal(a.tail, b.tail)
    ta = torch.ones(a.tail.shape[0], a.tail.shape[2], dtype=torch.bool) if a.tail_real is None else a.tail_real
    tb = torch.ones(b.tail.shape[0], b.tail.shape[2], dtype=torch.bool) if b.tail_real is None else b.tail_real
    assert torch.equal(ta, tb)


def test_append_crop_and_reorder_equal_a_rebuilt_index():
    ps, n = 16, 300
    q, k, v = make(n, seed=4)
    mask = pad_mask(n, [0, 21])  # row 1: the first page is partly padding
    full = PageIndex.build(k, kv_len=n, key_padding_mask=mask, page_size=ps)
    grown = PageIndex.build(k, kv_len=10, key_padding_mask=mask[:, :10], page_size=ps)  # padding still in the tail
    at = 10
    for step in (1, 1, 5, 40, 3, 17, 100, 1, 122):
        grown.append(k[:, :, at:at + step], mask[:, at:at + step])
        at += step
        assert grown.matches(at, B)
    assert at == n
    _same_index(grown, full)
    fn = get_decode_method("quest", page_size=ps, token_budget=64, window=32, num_sink_tokens=4)
    a = fn(q, k, v, scale=SCALE, kv_len=n, key_padding_mask=mask, index=grown)
    b = fn(q, k, v, scale=SCALE, kv_len=n, key_padding_mask=mask, index=full)
    assert torch.equal(a[0], b[0])

    for length in (290, 288, 160, 0):  # inside the incomplete page, page boundaries
        index = PageIndex.build(k, kv_len=n, key_padding_mask=mask, page_size=ps)
        index.crop(length)
        _same_index(index, PageIndex.build(k, kv_len=length, key_padding_mask=mask, page_size=ps))
        assert index.matches(length, B)
        index.append(k[:, :, length:n], mask[:, length:n])
        _same_index(index, full)
    index = PageIndex.build(k, kv_len=n, key_padding_mask=mask, page_size=ps)
    index.crop(170)  # cuts a full page: its first keys are gone, the caller must rebuild
    assert index.num_pages == 10 and index.length == 170 and not index.matches(170, B)
    with pytest.raises(ValueError, match="rebuild"):
        index.append(k[:, :, 170:171])
    index.crop(165)
    assert index.length == 165 and not index.matches(165, B)
    index.crop(160)  # back to a page boundary: nothing is missing
    assert index.matches(160, B)
    _same_index(index, PageIndex.build(k, kv_len=160, key_padding_mask=mask, page_size=ps))

    idx = torch.tensor([1, 0, 1])
    index = PageIndex.build(k, kv_len=n, key_padding_mask=mask, page_size=ps)
    index.reorder(idx)
    _same_index(index, PageIndex.build(k[idx], kv_len=n, key_padding_mask=mask[idx], page_size=ps))
    assert index.matches(n, 3) and not index.matches(n, B)


def test_appends_do_not_copy_the_table():
    ps = 8
    _, k, _ = make(64 * ps, batch=1)
    index = PageIndex.build(k, kv_len=ps, page_size=ps)
    for t in range(ps, 64 * ps):
        index.append(k[:, :, t:t + 1])
    assert index.num_pages == 64 and index._min.reallocations <= 6  # capacity doubling: log2(64) reallocations
    _same_index(index, PageIndex.build(k, page_size=ps))


def test_padding_rows_never_nan():
    kv_len = 900
    q, k, v = make(kv_len, nq=2, seed=5)
    mask = pad_mask(kv_len, [kv_len, 300])  # row 0: no real key at all
    for budget in (64, 10_000):  # sparse and exact paths
        stats = {}
        out, lse = quest_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask, page_size=16,
                                token_budget=budget, window=32, num_sink_tokens=8, stats=stats)
        assert stats["mode"] == ("quest" if budget == 64 else "exact")
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
        assert torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_memory_at_most_five_percent_of_cache(dtype):
    _, k, v = make(8192 + 17, batch=1, dtype=dtype)
    k64, v64 = torch.randn(1, HKV, 8192 + 17, 64).to(dtype), torch.randn(1, HKV, 8192 + 17, 64).to(dtype)
    for kk, vv in ((k, v), (k64, v64)):
        index = build_page_index(kk, kk.shape[2])  # default page_size 32
        frac = index.nbytes() / kv_bytes(kk, vv)
        assert frac <= 0.05
        assert abs(frac - 1 / 32) < 0.002  # 2 D values per page of 32 keys and values


def test_bf16():
    kv_len, ps = 1500, 16
    q, k, v = make(kv_len, nq=2, dtype=torch.bfloat16, seed=6)
    mask = pad_mask(kv_len, [0, 50])
    stats = {}
    out, lse = quest_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask, page_size=ps,
                            token_budget=128, window=48, num_sink_tokens=8, stats=stats)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and stats["mode"] == "quest"
    index = PageIndex.build(k, key_padding_mask=mask, page_size=ps)
    assert index.page_min.dtype == torch.bfloat16
    ref, ref_lse = reference(q, k, v, kv_len, quest_allowed(kv_len, 2, mask, stats, ps, 8))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-2)


def test_parameters_are_validated():
    q, k, v = make(100)
    with pytest.raises(ValueError, match="below its minimum"):
        get_decode_method("quest", page_size=0)
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        quest_decode(q, k, v, scale=SCALE, kv_len=100, page_size=0)
    with pytest.raises(ValueError, match="has no parameter 'budget'"):
        get_decode_method("quest", budget=3)


def test_a_budget_below_one_page_is_sinks_and_window():
    kv_len, ps = 600, 16
    q, k, v = make(kv_len, seed=7)
    stats = {}
    out, lse = quest_decode(q, k, v, scale=SCALE, kv_len=kv_len, page_size=ps, token_budget=ps - 1, window=40,
                            num_sink_tokens=8, stats=stats)
    w0 = stats["window_start"]
    assert stats["pages"] is None and w0 == (kv_len - 40) // ps * ps
    ref, _ = local_decode(q, k, v, scale=SCALE, kv_len=kv_len, window=kv_len - w0, num_sink_tokens=8)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


# ---- in a patched model -----------------------------------------------------------------------------------------

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(VOCAB, num_layers=3)
    m.set_attn_implementation("sdpa")
    return m


def _prompt(batch=2, length=40, pad=7, seed=0):
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


def test_quest_in_a_patched_model_with_a_budget_covering_the_cache(model):
    ids, mask = _prompt(length=60)
    ref_seq, ref_scores = _generate(model, ids, mask)
    plan = patch_model(model, method="exact", layers="all", decode_method="quest",
                       decode_params={"page_size": 4, "token_budget": 1024, "window": 8, "num_sink_tokens": 2})
    try:
        cache = generation_cache(model)
        assert isinstance(cache, GrowingCache)  # the spec has an index builder
        seq, scores = _generate(model, ids, mask, cache)
    finally:
        unpatch_model(model)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert sum(layer.decode_served for layer in plan.layers) == 3 * 11 and plan.fallback_counts() == {}
    for layer in cache.layers:
        (index,) = layer.decode_indexes.values()
        assert isinstance(index, PageIndex) and index.length == layer.get_seq_length()


def test_quest_in_a_patched_model_serves_the_middle_through_pages(model):
    ids, mask = _prompt(length=200)
    _, ref_scores = _generate(model, ids, mask)
    plan = patch_model(model, method="exact", layers="all", decode_method="quest",
                       decode_params={"page_size": 4, "token_budget": 16, "window": 8, "num_sink_tokens": 2})
    cache = GrowingCache(model.config)
    try:
        _, scores = _generate(model, ids, mask, cache)
        assert all(layer.decode_served > 0 for layer in plan.layers) and plan.fallback_counts() == {}
        index = next(iter(cache.layers[0].decode_indexes.values()))
        assert index.matches(cache.get_seq_length(), 2) and index.num_pages == cache.get_seq_length() // 4
        diff = (scores.softmax(-1) - ref_scores.softmax(-1)).abs().max()
        assert 0 < diff < 0.5  # not exact attention, still the model's distribution roughly

        # a crop that cuts a page: the next step rebuilds the index from the cache and is served
        served = plan.layers[0].decode_served
        length = cache.get_seq_length()
        cut = length % 4 + 2  # into the last full page
        cache.crop(-cut)
        assert index.length == length - cut and not index.matches(length - cut, 2)
        step_mask = torch.cat([mask, torch.ones(2, length - cut + 1 - mask.shape[1], dtype=mask.dtype)], 1)
        with torch.no_grad():
            model(input_ids=torch.tensor([[5], [6]]), attention_mask=step_mask, past_key_values=cache)
        rebuilt = next(iter(cache.layers[0].decode_indexes.values()))
        assert rebuilt is not index and rebuilt.matches(length - cut + 1, 2)
        assert plan.layers[0].decode_served == served + 1
    finally:
        unpatch_model(model)


def test_quest_with_a_cache_that_keeps_no_index_runs_exact_counted(model):
    """A DynamicCache cannot hold the page index: every decode step runs exact attention, its reason counted, and the
    tokens are the unpatched model's."""
    from transformers import DynamicCache

    from hf_sparse_attn.patches import reasons

    ids, mask = _prompt(length=60)
    ref_seq, _ = _generate(model, ids, mask)
    plan = patch_model(model, method="exact", layers="all", decode_method="quest",
                       decode_params={"page_size": 4, "token_budget": 8, "window": 8, "num_sink_tokens": 2})
    try:
        seq, _ = _generate(model, ids, mask, DynamicCache())
    finally:
        unpatch_model(model)
    assert torch.equal(seq, ref_seq)
    assert sum(layer.decode_served for layer in plan.layers) == 0
    assert plan.fallback_counts() == {reasons.NO_INDEXED_CACHE_REASON: 3 * 11}
