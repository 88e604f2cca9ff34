"""kmv engine="reference" (Indyk et al.): the guarantees of Theorem 1.1 / Lemmas 3.2-3.5 and exactness where it must
be exact. The default engine="blocks" is tested in test_kmv_blocks.py."""

import math

import pytest
import torch

from hf_sparse_attn.methods import get_method
from hf_sparse_attn.methods.exact import exact_attention
from hf_sparse_attn.methods.gaussian_kernel import gaussian_kernel_matrix
from hf_sparse_attn.methods import kmv


pytestmark = pytest.mark.usefixtures("one_thread")


def clustered_points(n: int, seed: int, dim: int = 4, cluster_size: int = 8, spread: float = 6.0, noise: float = 0.5):
    """Queries and keys in n / cluster_size well separated clusters: each query has ~cluster_size keys with
    K = exp(-dist^2) around 0.1 (some heavy, some light) and every other key is negligible: Assumption A."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n // cluster_size, dim, generator=g) * spread
    labels_y = torch.arange(n) % centers.shape[0]
    labels_x = labels_y[torch.randperm(n, generator=g)]
    y = centers[labels_y] + torch.randn(n, dim, generator=g) * noise
    x = centers[labels_x] + torch.randn(n, dim, generator=g) * noise
    return x, y


def head_to_tail(K: torch.Tensor) -> float:
    n = K.shape[0]
    values = K.flatten().sort(descending=True).values
    return float(values[n:].sum() / values[:n].sum())


def test_assumption_a_guarantee_with_signed_vectors():
    """||Kx - y||_2 <= eps ||x||_2 in >= 90% of seeds, x with negative entries, K satisfying Assumption A."""
    n, eps = 1024, 0.2
    x, y = clustered_points(n, seed=0)
    K = gaussian_kernel_matrix(x, y)
    assert head_to_tail(K) < 10  # Assumption A holds with a small constant (BERT: <= 4.6)
    ok = 0
    for seed in range(10):
        vec = torch.randn(n, 1, generator=torch.Generator().manual_seed(100 + seed))
        assert (vec < 0).any()
        stats = {}
        est = kmv.approx_kmv(x, y, vec, eps=eps, seed=seed, stats=stats)
        err = float((K @ vec - est).norm() / vec.norm())
        ok += err <= eps
        assert stats["light_samples"] > 0 and stats["total"] < n * n  # it did sample, and it did not compute everything
    assert ok >= 9


def test_heavy_finder_returns_every_heavy_key():
    """FINDHEAVY (Algorithm 1) with the paper's T = 10 n^alpha log n repetitions finds all K_ij >= n^-alpha."""
    n, alpha = 512, 1 / 3
    x, y = clustered_points(n, seed=1)
    dist = torch.cdist(x, y).pow(2)
    threshold_sq = alpha * math.log(n)
    want = set(((dist <= threshold_sq).nonzero() * torch.tensor([n, 1])).sum(1).tolist())
    assert 0 < len(want) < n * n // 20
    r_near, width, projs, tables = kmv.lsh_parameters(n, alpha, 2.0, 0, 0, 10.0)
    assert abs(r_near ** 2 - threshold_sq) < 1e-9
    for seed in range(3):
        stats = {}
        rows, cols, d = kmv.find_heavy(x, y, torch.arange(n), threshold_sq, width, projs, tables,
                                       torch.Generator().manual_seed(seed), stats, dense_verify_fraction=0.0)
        assert set((rows * n + cols).tolist()) == want
        assert torch.allclose(d, (x[rows] - y[cols]).pow(2).sum(1), atol=1e-5)
        assert stats["lsh_candidates"] < n * n / 2, stats  # the hashes pruned (no dense fallback here)


def test_kernel_evaluations_subquadratic():
    """Kernel evaluations of APPROXKMV over n = 1k..16k grow like n^e with e < 2 (paper: 1.89 + o(1))."""
    sizes = [1024, 2048, 4096, 8192, 16384]
    counts = []
    for n in sizes:
        x, y = clustered_points(n, seed=2)
        vec = torch.randn(n, 1, generator=torch.Generator().manual_seed(3))
        stats = {}
        kmv.approx_kmv(x, y, vec, eps=0.5, seed=0, stats=stats)
        counts.append(stats["total"])
    logn = torch.tensor(sizes, dtype=torch.float64).log()
    logc = torch.tensor(counts, dtype=torch.float64).log()
    slope = float(((logn - logn.mean()) * (logc - logc.mean())).sum() / (logn - logn.mean()).pow(2).sum())
    assert slope < 1.9, (slope, counts)


def test_every_key_heavy_is_exact():
    """With a heavy threshold below every kernel value all keys are found and multiplied exactly."""
    n = 256
    x, y = clustered_points(n, seed=3, spread=1.0)
    vec = torch.randn(n, 3)
    est = kmv.approx_kmv(x, y, vec, alpha=20.0, gamma=1.0, lsh_num_tables=1, lsh_num_projs=1, lsh_bucket_width=1e4)
    assert torch.allclose(est, gaussian_kernel_matrix(x, y) @ vec, atol=1e-5, rtol=1e-4)


EXACT_PARAMS = dict(engine="reference", min_seq_len=0, alpha=50.0, gamma=1.0, lsh_num_tables=1, lsh_num_projs=1, lsh_bucket_width=1e4,
                    causal_block=64)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_exact_when_all_heavy_with_masks(causal):
    B, H, N, D = 2, 2, 256, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :40] = False
    mask[1, 100:] = False
    out, lse = get_method("kmv", **EXACT_PARAMS)(q, k, v, causal=causal, scale=D ** -0.5, key_padding_mask=mask)
    ref, ref_lse = exact_attention(q, k, v, causal=causal, scale=D ** -0.5, key_padding_mask=mask)
    assert not torch.isnan(out).any()
    assert torch.allclose(out, ref, atol=2e-4)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.allclose(lse[finite], ref_lse[finite], atol=2e-4)
    if causal:  # rows 0..39 of batch 0 see no key: zero output, -inf lse
        assert (out[0, :, :40] == 0).all() and torch.isinf(lse[0, :, :40]).all()


def test_fully_masked_batch_row_gives_zero():
    q, k, v = (torch.randn(2, 1, 64, 8) for _ in range(3))
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1] = False
    out, lse = get_method("kmv", engine="reference", min_seq_len=0)(q, k, v, causal=False, scale=8 ** -0.5, key_padding_mask=mask)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all() and not torch.isnan(out).any()


def test_sampled_attention_is_close_and_deterministic():
    """Default parameters on random inputs: error within a few eps of rms(v) (A.1.4's error / ||v||), same
    output for the same generator, different output for another seed; causal never looks ahead."""
    B, H, N, D = 1, 1, 2048, 32
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    method = get_method("kmv", engine="reference", min_seq_len=0, eps=0.1, causal_block=256)
    out1, _ = method(q, k, v, causal=False, scale=D ** -0.5, generator=torch.Generator().manual_seed(5))
    out2, _ = method(q, k, v, causal=False, scale=D ** -0.5, generator=torch.Generator().manual_seed(5))
    out3, _ = method(q, k, v, causal=False, scale=D ** -0.5, generator=torch.Generator().manual_seed(6))
    ref, _ = exact_attention(q, k, v, causal=False, scale=D ** -0.5)
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    assert float((out1 - ref).pow(2).mean().sqrt() / v.pow(2).mean().sqrt()) < 0.2
    # causal: changing the future keys/values leaves the first half untouched
    outc, _ = method(q, k, v, causal=True, scale=D ** -0.5, generator=torch.Generator().manual_seed(5))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, N // 2:] += 3.0
    v2[:, :, N // 2:] -= 3.0
    outc2, _ = method(q, k2, v2, causal=True, scale=D ** -0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(outc[:, :, : N // 2], outc2[:, :, : N // 2])


def test_split_signs_option_agrees():
    n = 1024
    x, y = clustered_points(n, seed=4)
    B, H, D = 1, 1, 8
    q = torch.randn(B, H, n, D)
    k = torch.randn(B, H, n, D)
    v = torch.randn(B, H, n, D)
    ref, _ = exact_attention(q, k, v, causal=False, scale=D ** -0.5)
    out, _ = get_method("kmv", engine="reference", min_seq_len=0, split_signs=True)(q, k, v, causal=False, scale=D ** -0.5)
    assert float((out - ref).pow(2).mean().sqrt() / v.pow(2).mean().sqrt()) < 0.2


def test_bad_input_errors():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="budget"):
        kmv.approx_kmv(q[0, 0], q[0, 0], torch.randn(8, 1), budget="nope")
    with pytest.raises(ValueError, match="positive scale"):
        get_method("kmv", engine="reference", min_seq_len=0)(q, q, q, causal=False, scale=-1.0)


@pytest.mark.parametrize("budget", ["two_level", "kde"])
def test_other_budgets_meet_the_guarantee(budget):
    n, eps = 1024, 0.2
    x, y = clustered_points(n, seed=5)
    K = gaussian_kernel_matrix(x, y)
    vec = torch.randn(n, 1, generator=torch.Generator().manual_seed(7))
    ok = sum(float((K @ vec - kmv.approx_kmv(x, y, vec, eps=eps, budget=budget, seed=s)).norm() / vec.norm()) <= eps
             for s in range(5))
    assert ok >= 4
