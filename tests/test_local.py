"""``local`` (attention sinks + exact local window): exactness, a dense masked reference, padding, causality."""

import pytest
import torch

from hf_sparse_attn.methods import get_method, get_spec

from conftest import random_qkv as _qkv

SCALE = 0.25


def local_reference(q, k, v, *, causal, window, num_sinks, mask=None):
    """Dense brute force: the sinks are each row's first ``num_sinks`` valid keys; the window is, by position,
    i - window < j <= i (causal) or |i - j| <= window (bidirectional), over the other valid keys."""
    B, H, N, D = q.shape
    valid = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    sink = valid & (valid.long().cumsum(1) <= num_sinks)  # [B, N]
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    near = ((j > i - window) & (j <= i)) if causal else ((j - i).abs() <= window)
    allowed = (sink[:, None, :] | (near[None] & ~sink[:, None, :])) & valid[:, None, :]
    if causal:
        allowed &= (j <= i)[None]
    scores = (q @ k.transpose(-1, -2)) * SCALE
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, -1)) @ v, torch.logsumexp(scores, -1)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_when_window_covers(causal):
    q, k, v = _qkv(N=300)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[0, 250:] = False
    mask[1, :40] = False
    for m in (None, mask):
        ref, ref_lse = get_method("exact")(q, k, v, causal=causal, scale=SCALE, key_padding_mask=m)
        out, lse = get_method("local", window=300, num_sink_tokens=16)(q, k, v, causal=causal, scale=SCALE, key_padding_mask=m)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(lse))
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-6, rtol=1e-5)
    if causal:  # left-padded rows before the first real token: no key, 0 and -inf, never NaN
        assert torch.all(out[1, :, :40] == 0) and torch.all(lse[1, :, :40] == float("-inf"))
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window,num_sinks", [(0, 0), (1, 4), (50, 16), (100, 0), (64, 64)])
def test_equals_dense_masked_reference(causal, window, num_sinks):
    """Window smaller than the sequence: dense attention over exactly the sinks + window key set (a sink inside the
    window counted twice would break it), with a padding hole in the middle and right padding."""
    q, k, v = _qkv(N=400)
    mask = torch.ones(2, 400, dtype=torch.bool)
    mask[0, 120:150] = False
    mask[1, 330:] = False
    ref, ref_lse = local_reference(q, k, v, causal=causal, window=window, num_sinks=num_sinks, mask=mask)
    out, lse = get_method("local", window=window, num_sink_tokens=num_sinks)(
        q, k, v, causal=causal, scale=SCALE, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_sinks_are_the_first_real_tokens(causal):
    """A left-padded row's sinks are its first real tokens (not padding); poisoned padding is never attended."""
    q, k, v = _qkv(N=400)
    mask = torch.ones(2, 400, dtype=torch.bool)
    mask[1, :70] = False
    k[1, :, :70] = q[1, :, 100:170] * 10
    v[1, :, :70] = 1e6
    ref, ref_lse = local_reference(q, k, v, causal=causal, window=32, num_sinks=8, mask=mask)
    out, lse = get_method("local", window=32, num_sink_tokens=8)(q, k, v, causal=causal, scale=SCALE, key_padding_mask=mask)
    real = slice(70, None)  # the padding queries of a bidirectional row attend a window of the rolled order
    torch.testing.assert_close(out[1, :, real], ref[1, :, real], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out[0], ref[0], atol=2e-6, rtol=1e-5)
    assert out.abs().max() < 100 and not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_causality_future_tokens_do_not_change_past_outputs():
    q, k, v = _qkv(B=1, N=700, seed=1)
    f = get_method("local", window=64, num_sink_tokens=16)
    out, lse = f(q, k, v, causal=True, scale=SCALE)
    for t in (10, 500):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t:] = torch.randn_like(q2[:, :, t:])
        k2[:, :, t:] += 1.0
        v2[:, :, t:] -= 3.0
        out2, lse2 = f(q2, k2, v2, causal=True, scale=SCALE)
        assert torch.equal(out[:, :, :t], out2[:, :, :t]) and torch.equal(lse[:, :, :t], lse2[:, :, :t])
        assert not torch.equal(out[:, :, t:], out2[:, :, t:])


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_exact_when_window_covers(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 2, 200, 16, generator=g, requires_grad=True) for _ in range(3)]
    mask = torch.ones(1, 200, dtype=torch.bool)
    mask[0, 190:] = False
    ref, _ = get_method("exact")(q, k, v, causal=causal, scale=SCALE, key_padding_mask=mask)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    out, _ = get_method("local", window=200, num_sink_tokens=8)(q, k, v, causal=causal, scale=SCALE, key_padding_mask=mask)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_params_check_and_low_precision():
    spec = get_spec("local")
    assert set(spec.params) == {"window", "num_sink_tokens", "min_seq_len"}
    for bad in ({"window": -1}, {"num_sink_tokens": -2}, {"window": 1.5}, {"min_seq_len": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            get_method("local", **bad)
    q, k, v = _qkv(N=64)
    params = spec.resolve_params({})
    assert spec.check(q[:, :, :1], k, True, None, params) is not None  # decode step -> exact in the adapter
    assert spec.check(q, k, True, None, params) is None
    with pytest.raises(ValueError, match="self-attention"):
        get_method("local")(q[:, :, :10], k, v, causal=False, scale=SCALE)
    out, lse = get_method("local", window=8, num_sink_tokens=4)(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, scale=SCALE)
    ref, _ = local_reference(q, k, v, causal=True, window=8, num_sinks=4)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_through_a_gqa_model(tiny_model):
    """patch_model on a GQA Llama (4 query heads, 2 KV heads): a covering window gives the unpatched logits with every
    layer served; a small window approximates."""
    from hf_sparse_attn import patch_model, unpatch_model

    model = tiny_model("llama")
    ids = torch.randint(0, 100, (2, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        for window, close in ((160, True), (8, False)):
            plan = patch_model(model, method="local", layers="all", min_seq_len=64, window=window, num_sink_tokens=4)
            out = model(ids).logits
            assert sum(layer.served for layer in plan.layers) == 3 and plan.fallback_counts() == {}
            assert torch.allclose(out, ref, atol=1e-4) == close
            unpatch_model(model)
