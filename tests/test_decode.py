"""Decode-step attention over a KV cache (hf_sparse_attn/methods/decode.py, decode_index.py, kv_buffer.py).

Random tensors only; every reference is dense attention with the KV heads expanded (transformers' repeat_kv order).
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_sparse_attn.methods.common import expand_kv_heads
from hf_sparse_attn.methods.decode import (exact_decode, gather_rows, get_decode_method, get_decode_spec,
                                           list_decode_methods, local_decode, lsh_decode)
from hf_sparse_attn.methods.decode_index import DecodeIndex
from hf_sparse_attn.methods.kv_buffer import GrowingTensor, KVBuffer, kv_bytes
from hf_sparse_attn.methods.local import local_attention

B, HKV, G, D = 2, 3, 3, 64
SCALE = D ** -0.5


def reference(q, k, v, kv_len, mask=None, allowed_extra=None):
    """Dense attention, KV heads expanded: q [B, Hq, Nq, D], k/v [B, Hkv, >= kv_len, D]; row i at kv_len - Nq + i.
    allowed_extra [B or 1, 1, Nq, kv_len] restricts the keys further. Returns out float32, lse float32."""
    g = q.shape[1] // k.shape[1]
    nq = q.shape[2]
    ke = expand_kv_heads(k[:, :, :kv_len].float(), g)
    ve = expand_kv_heads(v[:, :, :kv_len].float(), g)
    s = q.float() @ ke.transpose(-1, -2) * SCALE
    pos = kv_len - nq + torch.arange(nq)
    allowed = (torch.arange(kv_len)[None, :] <= pos[:, None])[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if allowed_extra is not None:
        allowed = allowed & allowed_extra
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.nan_to_num(p) @ ve, lse


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def make(kv_len, nq=1, extra=0, seed=0, dtype=torch.float32, batch=B):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, HKV, kv_len + extra, D, generator=g).to(dtype)
    v = torch.randn(batch, HKV, kv_len + extra, D, generator=g).to(dtype)
    q = torch.randn(batch, HKV * G, nq, D, generator=g).to(dtype)
    return q, k, v


def left_pad_mask(kv_len, pads):
    mask = torch.ones(len(pads), kv_len, dtype=torch.bool)
    for b, p in enumerate(pads):
        mask[b, :p] = False
    return mask


# ---- exact ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nq", [1, 4])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("extra", [0, 77])  # a preallocated cache longer than kv_len
def test_exact_decode_equals_expanded_attention(nq, padded, extra):
    kv_len = 1000
    q, k, v = make(kv_len, nq, extra)
    mask = left_pad_mask(kv_len, [0, 123]) if padded else None
    out, lse = exact_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask)
    ref, ref_lse = reference(q, k, v, kv_len, mask)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


def test_exact_decode_bf16():
    q, k, v = make(700, 2, 30, dtype=torch.bfloat16)
    mask = left_pad_mask(700, [5, 0])
    out, lse = exact_decode(q, k, v, scale=SCALE, kv_len=700, key_padding_mask=mask)
    ref, ref_lse = reference(q, k, v, 700, mask)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel(out, ref) < 2e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("fn", [exact_decode, local_decode, lsh_decode])
def test_fully_masked_row_gives_zero_not_nan(fn):
    kv_len = 3000
    q, k, v = make(kv_len, 2)
    mask = left_pad_mask(kv_len, [0, kv_len])  # batch row 1: nothing to attend
    kwargs = {"window": 256, "block_size": 64, "sample_size": 64} if fn is lsh_decode else {}
    out, lse = fn(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask, **kwargs)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0]).all()


def test_gather_rows_any_layout():
    q, k, v = make(50, 1, 14)
    pos = torch.randint(0, 50, (B, HKV, 3, 7))
    direct = k[torch.arange(B).view(B, 1, 1, 1), torch.arange(HKV).view(1, HKV, 1, 1), pos]
    assert torch.equal(gather_rows(k[:, :, :50], pos), direct)  # a length slice of a preallocated buffer
    kt = k.transpose(0, 1).contiguous().transpose(0, 1)  # another layout
    assert torch.equal(gather_rows(kt, pos), direct)


# ---- local ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nq", [1, 3])
def test_local_decode_equals_exact_when_window_covers(nq):
    q, k, v = make(600, nq, 10)
    mask = left_pad_mask(600, [0, 40])
    out, lse = local_decode(q, k, v, scale=SCALE, kv_len=600, key_padding_mask=mask, window=600, num_sink_tokens=16)
    ref, ref_lse = exact_decode(q, k, v, scale=SCALE, kv_len=600, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("pads", [(0, 0), (0, 50), (7, 50)])
def test_local_decode_is_exact_on_sinks_and_window(nq, pads):
    kv_len, window, sinks = 900, 128, 16
    q, k, v = make(kv_len, nq, 5)
    mask = left_pad_mask(kv_len, pads)
    out, lse = local_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask, window=window,
                            num_sink_tokens=sinks)
    j = torch.arange(kv_len)
    pos = kv_len - nq + torch.arange(nq)
    pad = torch.tensor(pads)
    sink = (j[None, :] >= pad[:, None]) & (j[None, :] < pad[:, None] + sinks)  # [B, kv_len]
    win = j[None, :] > pos[:, None] - window  # [Nq, kv_len]
    allowed = (sink[:, None, None, :] | win[None, None]) & mask[:, None, None, :]
    ref, ref_lse = reference(q, k, v, kv_len, mask, allowed)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


def test_local_decode_rows_equal_local_prefill_rows():
    """The decode rows of `local` are the last rows of its causal prefill (KV heads expanded there)."""
    n, nq = 700, 4
    q, k, v = make(n, n, batch=1)  # q for every position
    full, _ = local_attention(q, expand_kv_heads(k, G), expand_kv_heads(v, G), causal=True, scale=SCALE,
                              window=100, num_sink_tokens=8)
    out, _ = local_decode(q[:, :, -nq:], k, v, scale=SCALE, kv_len=n, window=100, num_sink_tokens=8)
    torch.testing.assert_close(out, full[:, :, -nq:], atol=2e-5, rtol=1e-4)


# ---- lsh --------------------------------------------------------------------------------------------------------

def test_lsh_decode_exact_when_window_or_budget_covers():
    kv_len = 2000
    q, k, v = make(kv_len, 2, 40)
    mask = left_pad_mask(kv_len, [0, 33])
    ref, ref_lse = exact_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask)
    for params in ({"window": kv_len}, {"window": 256, "block_size": 1000, "sample_size": 800}):
        stats: dict = {}
        out, lse = lsh_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask, stats=stats, **params)
        assert stats["mode"] == "exact"
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


def planted(kv_len=6000, j=2500, seed=0):
    """Random cache, batch 1, with key j of KV head 0 aligned to query head 0 and large: the row's heavy key."""
    q, k, v = make(kv_len, 1, batch=1, seed=seed)
    u = q[0, 0, 0] / q[0, 0, 0].norm()
    k[0, 0, j] = u * math.sqrt(D) * 1.5
    return q, k, v


def test_lsh_finds_planted_key_and_beats_local():
    kv_len, j = 6000, 2500
    q, k, v = planted(kv_len, j)
    ref, _ = exact_decode(q, k, v, scale=SCALE, kv_len=kv_len)
    index = DecodeIndex.build(k, lsh_num_projs=8)
    stats: dict = {}
    out, _ = lsh_decode(q, k, v, scale=SCALE, kv_len=kv_len, index=index, window=256, block_size=128,
                        sample_size=128, stats=stats)
    loc, _ = local_decode(q, k, v, scale=SCALE, kv_len=kv_len, window=256)
    assert stats["mode"] == "lsh"
    assert bool((stats["block_positions"][0, 0, 0] == j).any())  # found through the index (query head 0 = row 0)
    err_lsh, err_local = rel(out[0, :G], ref[0, :G]), rel(loc[0, :G], ref[0, :G])  # the query heads of KV head 0
    assert err_local > 0.8 and err_lsh < 0.3 * err_local


def test_lsh_estimator_is_unbiased():
    """Averaged over sample seeds, the softmax denominator and numerator approach the exact ones (an unbiased
    estimator: the error of the mean falls like 1 / sqrt(repeats))."""
    kv_len = 3000
    q, k, v = make(kv_len, 1, batch=1, seed=3)
    ref, ref_lse = exact_decode(q, k, v, scale=SCALE, kv_len=kv_len)
    index = DecodeIndex.build(k, lsh_num_projs=8)
    n = 100
    num = torch.zeros(ref.shape, dtype=torch.float64)
    z = torch.zeros(ref_lse.shape, dtype=torch.float64)
    single = None
    for s in range(n):
        out, lse = lsh_decode(q, k, v, scale=SCALE, kv_len=kv_len, index=index, window=128, block_size=64,
                              sample_size=64, seed=s)
        num += out.double() * lse.double().exp()[..., None]
        z += lse.double().exp()
        if single is None:
            single = rel(out.double() * lse.double().exp()[..., None], ref.double() * ref_lse.double().exp()[..., None])
    ref_num = ref.double() * ref_lse.double().exp()[..., None]
    assert float(((z / n) / ref_lse.double().exp() - 1).abs().max()) < 0.05
    assert rel(num / n, ref_num) < 3 * single / math.sqrt(n)


def test_index_append_equals_rebuild_and_decodes_alike():
    n0, n1 = 3000, 3400
    q, k, v = make(n1, 1, 100)
    index = DecodeIndex.build(k, kv_len=n0, lsh_num_projs=9, resort_every=150)
    for t in range(n0, n1, 1):  # one position per decode step
        index.append(k[:, :, t:t + 1])
    assert index.matches(n1) and not index.matches(n1 - 1)
    assert index.sorts >= 2 and index.length - index.indexed <= 150
    rebuilt = DecodeIndex.build(k, kv_len=n1, lsh_num_projs=9, center=index.center)
    assert torch.equal(index.codes, rebuilt.codes)
    params = dict(window=300, block_size=128, sample_size=128)
    a, la = lsh_decode(q, k, v, scale=SCALE, kv_len=n1, index=index, **params)
    index.refresh()
    assert torch.equal(index.sorted_codes, rebuilt.sorted_codes) and torch.equal(index.perm, rebuilt.perm)
    b, lb = lsh_decode(q, k, v, scale=SCALE, kv_len=n1, index=rebuilt, **params)
    a2, la2 = lsh_decode(q, k, v, scale=SCALE, kv_len=n1, index=index, **params)
    assert torch.equal(a2, b) and torch.equal(la2, lb)  # the grown index decodes as the rebuilt one
    assert torch.isfinite(a).all() and torch.isfinite(la).all()  # before the re-sort: the unsorted tail went exact
    assert index.reallocations <= math.ceil(math.log2(n1 / n0)) + 1


def test_index_crop_reorder_and_mismatch():
    n = 2000
    q, k, v = make(n, 1)
    index = DecodeIndex.build(k, lsh_num_projs=8)
    index.crop(1500)
    fresh = DecodeIndex.build(k, kv_len=1500, lsh_num_projs=8, center=index.center)
    assert torch.equal(index.sorted_codes, fresh.sorted_codes) and torch.equal(index.perm, fresh.perm)
    beam = torch.tensor([1, 1])
    index.reorder(beam)
    assert torch.equal(index.codes[0], fresh.codes[1]) and torch.equal(index.perm[0], fresh.perm[1])
    with pytest.raises(ValueError, match="index describes 1500 positions"):
        lsh_decode(q, k, v, scale=SCALE, kv_len=n, index=index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_memory_at_most_five_percent_of_cache(dtype):
    n = 8192
    k = torch.randn(1, HKV, n, D).to(dtype)
    index = DecodeIndex.build(k, lsh_num_projs=10, lsh_num_tables=1)
    for t in range(40):
        index.append(k[:, :, t:t + 1])
    assert index.nbytes() <= 0.05 * kv_bytes(k, k, index.length)


def test_lsh_with_padding_and_several_tables():
    kv_len = 5000
    q, k, v = make(kv_len, 2, 8)
    mask = left_pad_mask(kv_len, [300, 0])
    index = DecodeIndex.build(k, kv_len=kv_len, key_padding_mask=mask, lsh_num_projs=8, lsh_num_tables=3)
    stats: dict = {}
    out, lse = lsh_decode(q, k, v, scale=SCALE, kv_len=kv_len, key_padding_mask=mask, index=index, window=256,
                          block_size=64, sample_size=0, num_sink_tokens=16, stats=stats)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    pos, ok = stats["block_positions"], stats["block_allowed"]
    assert not bool(((pos[0] < 300 + 16) & ok[0]).any())  # padding and sinks never come from the blocks
    for b in range(B):  # no key counted twice across the tables
        for h in range(HKV):
            for r in range(pos.shape[2]):
                chosen = pos[b, h, r][ok[b, h, r]]
                assert chosen.numel() == chosen.unique().numel()


# ---- registry ---------------------------------------------------------------------------------------------------

def test_decode_registry():
    assert {"exact", "local", "lsh"} <= set(list_decode_methods())
    with pytest.raises(ValueError, match="decode-capable methods: .*exact.*local.*lsh"):
        get_decode_spec("sparse_hyper_nope")
    with pytest.raises(ValueError, match="has no parameter 'windw'"):
        get_decode_method("local", windw=3)
    with pytest.raises(ValueError, match="above its maximum"):
        get_decode_method("lsh", lsh_num_projs=16)
    spec = get_decode_spec("lsh")
    q, k, v = make(3000, 1)
    index = spec.build_index(k, 2990, lsh_num_projs=7)
    assert isinstance(index, DecodeIndex) and index.length == 2990 and index.num_projs == 7
    assert get_decode_spec("exact").build_index(k) is None
    out, _ = get_decode_method("lsh", window=128)(q, k, v, scale=SCALE, kv_len=2990, index=index)
    assert out.shape == q.shape and torch.isfinite(out).all()


# ---- growing buffers --------------------------------------------------------------------------------------------

def test_kv_buffer_appends_like_cat_with_log_reallocations():
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(2, 3, 100, 8, generator=g), torch.randn(2, 3, 100, 8, generator=g)
    buf = KVBuffer(k0, v0)
    steps = 1500
    new_k, new_v = torch.randn(2, 3, steps, 8, generator=g), torch.randn(2, 3, steps, 8, generator=g)
    for t in range(steps):
        keys, values = buf.append(new_k[:, :, t:t + 1], new_v[:, :, t:t + 1])
    k_ref, v_ref = torch.cat([k0, new_k], 2), torch.cat([v0, new_v], 2)  # what step-by-step torch.cat builds
    assert torch.equal(keys, k_ref) and torch.equal(values, v_ref)
    assert buf.length == 1600 and buf.capacity >= 1600
    assert buf.reallocations <= math.ceil(math.log2(1600 / 100))
    q = torch.randn(2, 9, 1, 8, generator=g)  # the preallocated storage serves decode with kv_len = length
    out, _ = exact_decode(q, buf.key_storage, buf.value_storage, scale=0.3, kv_len=buf.length)
    ref, _ = exact_decode(q, k_ref, v_ref, scale=0.3, kv_len=1600)
    torch.testing.assert_close(out, ref)
    buf.reorder(torch.tensor([1, 0]))
    assert torch.equal(buf.keys[0], k_ref[1])
    buf.crop(50)
    assert torch.equal(buf.values, v_ref[[1, 0], :, :50])
    t = GrowingTensor(torch.zeros(1, 0), dim=1)
    for i in range(1000):
        t.append(torch.full((1, 1), float(i)))
    assert torch.equal(t.view()[0], torch.arange(1000.0)) and t.reallocations <= 10
