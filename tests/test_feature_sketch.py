"""feature_sketch (Deng, Mahadevan & Song): spectral approximation, the O(r) bound with our constant, determinism, exactness."""

import math

import pytest
import torch

from hf_sparse_attn.methods import get_method, get_spec
from hf_sparse_attn.methods.exact import exact_attention
from hf_sparse_attn.methods import feature_sketch as fs


pytestmark = pytest.mark.usefixtures("one_thread")


def small_gram(n: int, d: int, r: float, seed: int) -> torch.Tensor:
    """X [n, d] with ||X X^T||_inf = r (rows of squared norm r; d >> n)."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True) * math.sqrt(r)


def spectral_eps(y: torch.Tensor, x: torch.Tensor) -> float:
    """Smallest eps with (1 - eps) XX^T <= YY^T <= (1 + eps) XX^T."""
    g = x.double() @ x.double().T
    inv = torch.linalg.inv(torch.linalg.cholesky(g))
    ev = torch.linalg.eigvalsh(inv @ (y.double() @ y.double().T) @ inv.T)
    return float(torch.maximum(1 - ev.min(), ev.max() - 1))


def normalized(z: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z.double() @ z.double().T, dim=-1)  # D(Z)^-1 exp(Z Z^T)


@pytest.mark.parametrize("mode,seeds", [("leverage", range(4)), ("deterministic", [0])])
def test_symmetric_guarantee(mode, seeds):
    n, d, r, eps = 10, 1200, 0.08, 0.5
    x = small_gram(n, d, r, seed=1)
    assert float((x @ x.T).abs().max()) <= r + 1e-6
    for seed in seeds:
        y, idx = fs.sparsify_features(x, eps=eps, mode=mode, seed=seed)
        assert y.shape[1] < d  # it did reduce the feature dimension
        eps_measured = spectral_eps(y, x)
        assert eps_measured <= eps  # Lemma 4.1 / Theorem 4.2
        err = float((normalized(y) - normalized(x)).abs().max())
        max_p = float(normalized(x).max())
        # our constant (module docstring): 2 (e^{eps r} - 1) max P  <= 2.3 eps r; the paper's is 12 r
        assert err <= 2 * math.expm1(eps_measured * r) * max_p * (1 + 1e-6)
        assert err <= 2.3 * eps * r


def test_deterministic_is_deterministic():
    x = small_gram(10, 800, 0.05, seed=2)
    a = fs.bss_sparsify(x, 0.5)
    b = fs.bss_sparsify(x.clone(), 0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].numel() <= fs.bss_kappa(0.5) * 10  # O(n / eps^2) columns


def test_leverage_scores_are_close():
    """Algorithm 2 gives O(1)-approximate leverage scores of the rows of a tall matrix."""
    a = torch.randn(600, 10, generator=torch.Generator().manual_seed(9)) * torch.linspace(0.1, 3, 600)[:, None]
    exact = (a @ torch.linalg.pinv(a)).diagonal()  # sigma_i = a_i (A^T A)^-1 a_i^T
    approx = fs.approx_leverage_scores(a, torch.Generator().manual_seed(0))
    ratio = approx / exact
    assert float(ratio.min()) > 0.25 and float(ratio.max()) < 4.0
    assert abs(float(approx.sum()) - 10) < 5


@pytest.mark.parametrize("mode", ["leverage", "deterministic"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_bound_masks_causal(mode, causal):
    """Asymmetric case: |out' - out|_inf <= 2 (e^{eps rho} - 1) ||V||_inf, rho = scale max|q| max|k|."""
    B, H, N, D, eps = 2, 1, 8, 1024, 0.5
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, H, N, D, generator=g) * 0.02 for _ in range(2))
    v = torch.randn(B, H, N, 8, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :5] = False
    mask[1] = False
    scale = D ** -0.5
    out, lse = get_method("feature_sketch", mode=mode, eps=eps)(q, k, v, causal=causal, scale=scale, key_padding_mask=mask)
    ref, ref_lse = exact_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=mask)
    rho = scale * float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max())
    assert not torch.isnan(out).any()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert float((out - ref).abs().max()) <= 2 * math.expm1(eps * rho) * float(v.abs().max())
    assert not torch.equal(out, ref)  # it did approximate
    if causal:
        assert (out[0, :, :5] == 0).all()


def test_keeping_all_columns_is_exact():
    q, k, v = (torch.randn(1, 2, 16, 256) * 0.1 for _ in range(3))
    # T = oversample * eps^-2 * n ln(n / delta) draws >= d: every column with weight 1
    out, lse = get_method("feature_sketch", eps=0.9, oversample=50.0)(q, k, v, causal=True, scale=1 / 16)
    ref, ref_lse = exact_attention(q, k, v, causal=True, scale=1 / 16)
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-6)


def test_check_records_why():
    spec = get_spec("feature_sketch")
    params = spec.resolve_params({})
    q = torch.randn(1, 1, 512, 64)
    assert "d >> n" in spec.check(q, q, True, None, params)
    wide = torch.randn(1, 1, 16, 8192)
    assert spec.check(wide, wide, True, None, params) is None


def test_same_generator_same_output():
    q, k, v = (torch.randn(1, 1, 16, 2048) * 0.05 for _ in range(3))
    m = get_method("feature_sketch")
    a, _ = m(q, k, v, causal=False, scale=0.05, generator=torch.Generator().manual_seed(4))
    b, _ = m(q, k, v, causal=False, scale=0.05, generator=torch.Generator().manual_seed(4))
    c, _ = m(q, k, v, causal=False, scale=0.05, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
