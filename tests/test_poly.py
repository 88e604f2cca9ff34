"""poly (Alman & Song): Lemma 3.6's bound, exactness at high degree, refusal, regime check, linear work and memory."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

from hf_sparse_attn.methods import get_method, get_spec
from hf_sparse_attn.methods.exact import exact_attention
from hf_sparse_attn.methods import poly


def bounded(B, H, N, D, seed, bound=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(B, H, N, D, generator=g) * 2 - 1) * bound for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("eps", [1e-2, 1e-4])
def test_lemma_3_6_bound(causal, eps):
    """||T - D^-1 A V||_inf <= (eps_A + eps_D) ||V||_inf with eps_D <= eps_A (Lemma 3.5) on bounded entries."""
    B, H, N, D = 1, 2, 512, 4
    q, k, v = bounded(B, H, N, D, seed=0, bound=1.5)
    scale = 1.0 / D  # the paper's normalisation QK^T / d: scores within B^2 = 2.25
    info = poly.poly_regime(q, k, scale, eps, 4096)
    assert info["in_regime"] and info["rel_error"] <= eps and info["score_bound"] <= 2.25 + 1e-6
    out, lse = get_method("poly", eps=eps, min_seq_len=0)(q, k, v, causal=causal, scale=scale)
    ref, ref_lse = exact_attention(q, k, v, causal=causal, scale=scale)
    eps_a = info["rel_error"]
    assert float((out - ref).abs().max()) <= 2 * eps_a * float(v.abs().max()) + 1e-5
    assert float((lse - ref_lse).abs().max()) <= 1.5 * eps_a + 1e-5  # |log(D~/D)| <= log(1/(1-eps_A))
    assert torch.isfinite(lse).all()


def test_high_degree_tiny_input_is_exact():
    q, k, v = bounded(2, 2, 64, 3, seed=1, bound=0.5)
    out, lse = get_method("poly", degree=12, min_seq_len=0)(q, k, v, causal=False, scale=1.0)
    ref, ref_lse = exact_attention(q, k, v, causal=False, scale=1.0)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_features_reproduce_the_polynomial():
    """<phi_q(u), phi_k(v)> = P(<u, v>) with r = C(D+g, g) features (symmetric tensors, Lemma 3.2)."""
    D, g = 5, 4
    coef, _ = poly.exp_polynomial(2.0, g)
    u, w = torch.randn(7, D) * 0.5, torch.randn(9, D) * 0.5
    fu = poly.polynomial_features(u.double(), g, poly.query_weights(D, coef))
    fw = poly.polynomial_features(w.double(), g)
    assert fu.shape == (7, math.comb(D + g, g))
    direct = sum(c * (u.double() @ w.double().T) ** t for t, c in enumerate(coef))
    assert torch.allclose(fu @ fw.T, direct, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_masks_and_fully_masked_rows(causal):
    q, k, v = bounded(2, 2, 96, 4, seed=2)
    mask = torch.ones(2, 96, dtype=torch.bool)
    mask[0, :30] = False
    mask[1] = False
    out, lse = get_method("poly", eps=1e-4, min_seq_len=0, chunk_size=32)(q, k, v, causal=causal, scale=0.25,
                                                                         key_padding_mask=mask)
    ref, ref_lse = exact_attention(q, k, v, causal=causal, scale=0.25, key_padding_mask=mask)
    assert not torch.isnan(out).any()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    assert torch.allclose(out, ref, atol=1e-3)
    if causal:
        assert (out[0, :, :30] == 0).all()


def test_causal_does_not_look_ahead():
    q, k, v = bounded(1, 1, 200, 4, seed=3)
    method = get_method("poly", eps=1e-3, min_seq_len=0, chunk_size=64)
    out, _ = method(q, k, v, causal=True, scale=0.5)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 100:] = -k2[:, :, 100:]
    v2[:, :, 100:] += 1
    out2, _ = method(q, k2, v2, causal=True, scale=0.5)
    assert torch.allclose(out[:, :, :100], out2[:, :, :100], atol=1e-6)


def test_refuses_a_degree_that_does_not_fit():
    q, k, v = bounded(1, 1, 64, 64, seed=4)
    with pytest.raises(ValueError, match="max_features=4096"):
        get_method("poly", degree=3, min_seq_len=0)(q, k, v, causal=False, scale=0.125)


def test_regime_check_and_out_of_regime():
    spec = get_spec("poly")
    params = spec.resolve_params({})
    small = bounded(1, 1, 4096, 4, seed=5, bound=1.0)
    assert spec.check(small[0], small[1], False, None, params) is None
    large = [t * 8 for t in bounded(1, 1, 4096, 16, seed=5)]  # scores up to ~64 x 16 / 4: far outside
    reason = spec.check(large[0], large[1], False, None, params)
    assert reason is not None and "regime" in reason
    with pytest.raises(ValueError, match="Theorem 3.7"):
        get_method("poly", min_seq_len=0)(*large, causal=False, scale=0.25)
    out, lse = get_method("poly", min_seq_len=0, allow_out_of_regime=True)(*large, causal=False, scale=0.25)
    assert torch.isfinite(lse).all() and not torch.isnan(out).any()  # bad rows recomputed exactly: still finite


def test_out_of_regime_with_a_huge_score_range_stays_finite():
    """allow_out_of_regime on scores far beyond e^88 (float32's limit): P approximates the shifted e^(x - R), so its
    coefficients stay representable and R goes back into lse; unshifted, this raised a float overflow error."""
    q, k, v = bounded(1, 2, 512, 8, seed=7, bound=6.0)
    info = poly.poly_regime(q, k, 1.0, 0.01, 4096)
    assert info["score_bound"] > 150 and not info["in_regime"]
    out, lse = get_method("poly", min_seq_len=0, allow_out_of_regime=True)(q, k, v, causal=True, scale=1.0)
    ref, ref_lse = exact_attention(q, k, v, causal=True, scale=1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert float(lse.max()) > 88  # lse holds the true scale of the scores, beyond what the coefficients could hold
    assert poly.poly_regime(q, k, 1e4, 0.01, 4096)["rel_error"] >= 0  # R ~ 1e6: no float64 overflow in the check
    # in regime the shift changes nothing but rounding
    small = bounded(1, 2, 512, 4, seed=8)
    out_s, lse_s = get_method("poly", eps=1e-4, min_seq_len=0)(*small, causal=False, scale=0.5)
    ref_s, ref_lse_s = exact_attention(*small, causal=False, scale=0.5)
    assert torch.allclose(out_s, ref_s, atol=1e-3) and torch.allclose(lse_s, ref_lse_s, atol=1e-3)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active (an N x N score matrix would show here)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True])
def test_work_and_memory_are_linear_in_n(causal):
    """Algorithm 1's O(N r D) time and O(N r) memory at a fixed degree: 4x the tokens cost 4x the multiply-adds
    and 4x the largest intermediate tensor (exact attention: 16x both).

    Counted, not timed: FLOPs of every matmul (torch's FlopCounterMode) and the largest tensor any op produces,
    so the check is the same on a loaded machine (a wall-clock version of this test failed CI at 5.3x)."""
    method = get_method("poly", degree=6, min_seq_len=0, chunk_size=256)  # fixed degree -> fixed r = C(10, 6)
    flops, largest = {}, {}
    for n in (2048, 8192):
        q, k, v = bounded(1, 2, n, 4, seed=6)
        with FlopCounterMode(display=False) as counter, _LargestTensor() as sizes:
            method(q, k, v, causal=causal, scale=0.5)
        flops[n], largest[n] = counter.get_total_flops(), sizes.largest
    assert flops[2048] > 0
    assert 3.5 <= flops[8192] / flops[2048] <= 4.5, flops
    assert largest[8192] <= 4.5 * largest[2048], largest
    with FlopCounterMode(display=False) as exact_counter:  # the counter sees quadratic work where it exists
        exact_attention(q, k, v, causal=causal, scale=0.5)
    assert exact_counter.get_total_flops() > 4 * flops[8192]
