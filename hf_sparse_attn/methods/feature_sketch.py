"""Feature-dimension sparsification of attention (Deng, Mahadevan & Song, "Randomized and
Deterministic Attention Sparsification Algorithms for Over-parameterized Feature Dimension"; summary in 001).

Problem (Definition 1.2, symmetric case X = Q = K in R^{n x d}, d >> n, ||X X^T||_inf <= r < 0.1): find
Y = X S in R^{n x m}, S a weighted column selection (m << d), with

    || D(Y)^-1 exp(Y Y^T) - D(X)^-1 exp(X X^T) ||_inf <= O(r),     D(X) = diag(exp(X X^T) 1).

Both algorithms make Y Y^T a (1 +- eps) spectral approximation of X X^T. Write G = X X^T = sum_i x_i x_i^T over
the d feature columns x_i in R^n; a selection keeps few columns with weights w_i, Y Y^T = sum_i w_i x_i x_i^T.

Randomized (Theorem 3.5, Lemmas 4.1, 5.1-5.4, Algorithms 1-2). The paper's Algorithm 2 is written for a tall
matrix; here the tall matrix is A = X^T (d x n), whose rows are the feature columns. Its leverage scores
sigma_i = x_i^T G^+ x_i sum to rank(G) <= n. Algorithm 2 approximates them in O(nnz(X) + n^omega):
  S1 (s1 x d) sparse embedding (Definition 2.4: ``sparse_nnz`` entries +-1/sqrt(s) per column), M = S1 A,
  R from QR(M) (n x n), S2 (n x s2) Gaussian JL matrix (Definition 2.5) with s2 = O(log(n/delta)),
  N = R^-1 S2, sigma~_i = ||a_i^T N||^2. (A tiny ridge lambda*I is appended to M so that R is invertible when
  rank(G) < n: ridge leverage scores, which only over-estimate.)
Then Definition 5.3: T = ceil(oversample * eps^-2 * n * ln(n/delta)) draws with replacement, p_i = sigma~_i /
sum sigma~, and H~ = (1/T) sum_t x_{i_t} x_{i_t}^T / p_{i_t}, i.e. weight w_i = count_i / (T p_i) on each
distinct drawn column. Lemma 5.4 (matrix Chernoff): (1 - eps) G <= H~ <= (1 + eps) G with prob. 1 - delta.

Deterministic (Theorem 3.6 via Theorem 4.2, a BSS-type spectral sparsifier). Whiten: v_i = Lambda^-1/2 U^T x_i
with G = U Lambda U^T on its range (k = rank), so sum_i v_i v_i^T = I_k. Then the barrier method of Batson,
Spielman & Srivastava (twice-Ramanujan sparsifiers, Theorem 3.1) with oversampling kappa: kappa*k steps, each
adding t v_i v_i^T for the column i maximising L_A(v_i) - U_A(v_i) (upper/lower barrier potentials; a column
with L >= U always exists), 1/t = (L + U) / 2; the result has eigenvalues in [l, u] with
u / l <= ((sqrt kappa + 1) / (sqrt kappa - 1))^2. Taking kappa = ceil(((rho + 1) / (rho - 1))^2) with
rho = sqrt((1 + eps) / (1 - eps)) makes u / l <= (1 + eps) / (1 - eps) (kappa ~ 4 / eps^2), and rescaling by
2 / (u + l) puts every eigenvalue in [1 - eps, 1 + eps]: at most kappa*k = O(n / eps^2) weighted columns, (1 +- eps) spectral approximation, the same output on every run (ties go to
the lowest column index). Cost O(kappa k (k^3 + d k^2)): meant for the paper's regime (n small, d large).

Our constant for the symmetric guarantee (used by the tests). Let E = Y Y^T - G with -eps G <= E <= eps G.
For x = e_i / sqrt(G_ii) +- e_j / sqrt(G_jj), x^T E x <= eps x^T G x; subtracting the two signs gives
|E_ij| <= eps sqrt(G_ii G_jj) <= eps r (Lemma 3.1 of the paper states the looser (1 + eps) r bound on YY^T).
So every logit moves by at most delta = eps r, every exp entry by a factor within e^{+-delta}, and Lemma 3.3 /
Lemma 3.4 hold with c1 = c2 = (e^delta - 1) / r, giving

    || D(Y)^-1 exp(YY^T) - D(X)^-1 exp(XX^T) ||_inf <= 2 (e^{eps r} - 1) max_ij P_ij <= 2.3 eps r    (eps <= 1, r < 0.1)

with P = D(X)^-1 exp(XX^T) (max P_ij <= 1; in fact <= e^{2r} / n). The paper's constant is c1 + c2 = 12.

Asymmetric generalisation used for attention (Q != K). Sample the feature columns of Z = sqrt(scale) [Q; K]
(2n x d) jointly, Q' = sqrt(scale) Q S, K' = sqrt(scale) K S. Z S S^T Z^T is a (1 +- eps) spectral approximation
of Z Z^T, and the same 2x2 argument on the off-diagonal block gives, for every query i and key j,

    | scale <q'_i, k'_j> - scale <q_i, k_j> | <= eps * scale * ||q_i|| ||k_j||,

so with rho = scale max ||q_i|| max ||k_j|| every logit moves by at most eps rho and (Lemmas 3.3-3.4 and Alman & Song
Lemma 3.6) the attention output moves by at most 2 (e^{eps rho} - 1) ||V||_inf. m = O(eps^-2 2n log(2n/delta))
(randomized) or O(2n / eps^2) (deterministic) columns: this pays only when d >> n.

As an attention method: per head, when d >= ``min_dim_ratio`` * n and the selection is smaller than d,
attention runs exactly on the m-dimensional (Q', K') with the original V (causal, padding and lse as in exact
attention); otherwise the adapter runs exact attention, and the ``check`` hook reports why (the plan records it). Time per head:
O(nnz(Q, K) + n^omega + n^2 m) against O(n^2 d) for exact attention.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .common import check_inputs
from .exact import exact_attention
from .lsh import make_generator
from .registry import MAX_TOKENS, Param, register_method


def sample_size(n: int, eps: float, delta: float, oversample: float) -> int:
    """T = ceil(oversample * eps^-2 * n * ln(n / delta)) draws (Lemma 4.1 / Lemma 5.4)."""
    return int(math.ceil(oversample * n * math.log(max(n, 2) / delta) / eps ** 2))


def approx_leverage_scores(a: torch.Tensor, generator: torch.Generator, delta: float = 0.1, sketch_factor: float = 4.0,
                           sparse_nnz: int = 4, ridge: float = 1e-6) -> torch.Tensor:
    """Algorithm 2 (LEVERAGESCORE) for the rows of a tall matrix a [d, n] -> sigma~ [d] (O(1)-approximate).

    S1 [s1, d] sparse embedding with ``sparse_nnz`` nonzeros per column, s1 = ceil(sketch_factor * n);
    M = S1 a; R = QR(M).R (with a ridge ``ridge * ||M||_F / sqrt(n)`` * I appended); S2 [n, s2] Gaussian / sqrt(s2)
    with s2 = ceil(8 ln(n / delta)); sigma~_i = ||a_i R^-1 S2||^2.
    """
    d, n = a.shape
    a = a.float()
    s1 = max(n + 1, int(math.ceil(sketch_factor * n)))
    nnz = min(sparse_nnz, s1)
    rows = torch.rand(d, s1, generator=generator).topk(nnz, dim=1).indices  # nnz distinct rows per column
    signs = (torch.randint(0, 2, (d, nnz), generator=generator).float() * 2 - 1) / math.sqrt(nnz)
    m = torch.zeros(s1, n, dtype=torch.float32)
    for t in range(nnz):  # M = S1 a, one nonzero per column at a time
        m.index_add_(0, rows[:, t], a * signs[:, t:t + 1])
    lam = ridge * float(m.norm()) / math.sqrt(n) + 1e-30
    r = torch.linalg.qr(torch.cat([m, lam * torch.eye(n)]), mode="r")[1]
    s2 = max(1, int(math.ceil(8 * math.log(max(n, 2) / delta))))
    jl = torch.randn(n, s2, generator=generator) / math.sqrt(s2)
    nmat = torch.linalg.solve_triangular(r, jl, upper=True)  # R^-1 S2 [n, s2]
    return (a @ nmat).pow(2).sum(1)


def leverage_sample(x: torch.Tensor, eps: float, delta: float, oversample: float, generator: torch.Generator,
                    sketch_factor: float = 4.0, sparse_nnz: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized selection (Algorithm 1 + Definition 5.3) of the feature columns of x [n, d].

    Returns (idx [m] int64 distinct column indices, weights [m] float32) with
    sum_i weights_i x[:, idx_i] x[:, idx_i]^T ~ (1 +- eps) x x^T. If the draw count T >= d, every column with weight 1.
    """
    n, d = x.shape
    draws = sample_size(n, eps, delta, oversample)
    if draws >= d:
        return torch.arange(d), torch.ones(d)
    sigma = approx_leverage_scores(x.T, generator, delta, sketch_factor, sparse_nnz)
    if not bool(sigma.sum() > 0):
        return torch.arange(d), torch.ones(d)
    prob = (sigma / sigma.sum()).double()
    picks = torch.multinomial(prob.float(), draws, replacement=True, generator=generator)
    idx, counts = torch.unique(picks, return_counts=True)
    weights = counts.double() / (draws * prob[idx])
    return idx, weights.float()


def bss_kappa(eps: float) -> int:
    """Oversampling kappa of the BSS sparsifier that gives a (1 +- eps) approximation (module docstring)."""
    rho = math.sqrt((1 + eps) / (1 - eps))
    return max(2, int(math.ceil(((rho + 1) / (rho - 1)) ** 2)))


def bss_sparsify(x: torch.Tensor, eps: float, rank_tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic spectral sparsification (Theorem 4.2; Batson-Spielman-Srivastava barrier method).

    x [n, d] -> (idx [m] int64, weights [m] float32) with (1 - eps) x x^T <= sum_i w_i x_i x_i^T <= (1 + eps) x x^T
    m <= kappa * rank, kappa = bss_kappa(eps) ~ 4 / eps^2.
    Computed in float64; deterministic.
    """
    n, d = x.shape
    xd = x.double()
    evals, evecs = torch.linalg.eigh(xd @ xd.T)
    keep = evals > rank_tol * float(evals.max().clamp_min(1e-300))
    k = int(keep.sum())
    if k == 0:
        return torch.arange(0), torch.zeros(0)
    vecs = (evecs[:, keep] / evals[keep].sqrt()).T @ xd  # [k, d]: whitened columns, sum v v^T = I_k
    kappa = bss_kappa(eps)
    steps = kappa * k
    if steps >= d:
        return torch.arange(d), torch.ones(d)
    sk = math.sqrt(kappa)
    delta_l, eps_l = 1.0, 1.0 / sk
    delta_u, eps_u = (sk + 1) / (sk - 1), (sk - 1) / (kappa + sk)
    lower, upper = -k / eps_l, k / eps_u
    a_mat = torch.zeros(k, k, dtype=torch.float64)
    weights = torch.zeros(d, dtype=torch.float64)
    for _ in range(steps):
        w, basis = torch.linalg.eigh(a_mat)
        proj = (basis.T @ vecs).pow(2)  # [k, d]: squared coordinates of every column in A's eigenbasis
        u_new, l_new = upper + delta_u, lower + delta_l
        phi_u = (1 / (upper - w)).sum() - (1 / (u_new - w)).sum()
        phi_l = (1 / (w - l_new)).sum() - (1 / (w - lower)).sum()
        inv_u = 1 / (u_new - w)
        inv_l = 1 / (w - l_new)
        upper_score = (inv_u.pow(2) @ proj) / phi_u + inv_u @ proj  # U_A(v_i)
        lower_score = (inv_l.pow(2) @ proj) / phi_l - inv_l @ proj  # L_A(v_i)
        gap = lower_score - upper_score
        i = int(torch.argmax(gap))  # first maximum: deterministic
        t = 2.0 / float(lower_score[i] + upper_score[i])
        a_mat += t * torch.outer(vecs[:, i], vecs[:, i])
        weights[i] += t
        upper, lower = u_new, l_new
    weights *= 2.0 / (upper + lower)
    idx = weights.nonzero().flatten()
    return idx, weights[idx].float()


def sparsify_features(x: torch.Tensor, *, eps: float = 0.5, mode: str = "leverage", delta: float = 0.1,
                      oversample: float = 2.0, generator: Optional[torch.Generator] = None,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric problem of the paper: x [n, d] -> Y = x[:, idx] * sqrt(weights) [n, m] with
    Y Y^T ~ (1 +- eps) x x^T. mode "leverage" (randomized, Theorem 3.5) or "deterministic" (Theorem 3.6)."""
    if mode == "leverage":
        idx, w = leverage_sample(x, eps, delta, oversample, make_generator(generator, seed))
    elif mode == "deterministic":
        idx, w = bss_sparsify(x, eps)
    else:
        raise ValueError(f"feature_sketch mode must be 'leverage' or 'deterministic', got {mode!r}")
    return x[:, idx].float() * w.sqrt().to(x.device), idx


def _selection_size_bound(n_rows: int, d: int, params: dict[str, Any]) -> int:
    eps = float(params.get("eps", 0.5))
    if params.get("mode", "leverage") == "deterministic":
        return bss_kappa(eps) * n_rows
    return sample_size(n_rows, eps, float(params.get("delta", 0.1)), float(params.get("oversample", 2.0)))


def feature_sketch_check(q: torch.Tensor, k: torch.Tensor, causal: bool, key_padding_mask: Optional[torch.Tensor],
                         params: dict[str, Any]) -> Optional[str]:
    """Why ``feature_sketch`` should not serve this call: d < c n, or the selection would not be smaller than d."""
    d, n = q.shape[-1], max(q.shape[-2], k.shape[-2])
    ratio = float(params.get("min_dim_ratio", 2.0))
    if d < ratio * n:
        return f"feature_sketch: head dim d={d} < min_dim_ratio*n = {ratio:g}*{n}: feature sparsification needs d >> n"
    bound = _selection_size_bound(q.shape[-2] + k.shape[-2], d, params)
    if bound >= d:
        return f"feature_sketch: selection of up to {bound} columns is not smaller than d={d} at eps={params.get('eps', 0.5)}"
    return None


def feature_sketch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    mode: str = "leverage",
    eps: float = 0.5,
    delta: float = 0.1,
    oversample: float = 2.0,
    min_dim_ratio: float = 2.0,
    seed: int = 0,
    min_seq_len: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention on jointly sparsified feature columns of [Q; K] (module docstring). Shapes as the contract.

    Per head: Q', K' = sqrt(scale) [Q; K] restricted to the m selected, re-weighted columns and exact attention with
    scale 1 on them (exact attention itself where the selection keeps all d columns with weight 1).
    ``min_seq_len`` and ``min_dim_ratio`` are read by the adapter's decision only (exact attention for calls with
    fewer keys, or with d < min_dim_ratio * n: :func:`feature_sketch_check`); a direct call always runs the method.
    """
    check_inputs(q, k, v, causal, key_padding_mask)
    B, H, Nq, D = q.shape
    if scale <= 0:
        raise ValueError(f"feature_sketch needs a positive scale, got {scale}")
    gen = make_generator(generator, seed)
    out = torch.empty(B, H, Nq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    root = math.sqrt(scale)
    for b in range(B):
        valid = key_padding_mask[b] if key_padding_mask is not None else None
        for h in range(H):
            kh = k[b, h].float()
            z = torch.cat([q[b, h].float(), kh if valid is None else kh[valid]]) * root  # [Nq + n_valid, D]
            if z.shape[0] == Nq:  # no valid key: exact gives the zero rows and -inf
                idx = torch.arange(D)
                w = torch.ones(D)
            elif mode == "leverage":
                idx, w = leverage_sample(z.cpu(), eps, delta, oversample, gen)
            elif mode == "deterministic":
                idx, w = bss_sparsify(z.cpu(), eps)
            else:
                raise ValueError(f"feature_sketch mode must be 'leverage' or 'deterministic', got {mode!r}")
            idx, w = idx.to(q.device), w.sqrt().to(q.device)
            qs = (q[b, h].float()[:, idx] * (w * root))[None, None]
            ks = (kh[:, idx] * (w * root))[None, None]
            o, l = exact_attention(qs, ks, v[b:b + 1, h:h + 1].float(), causal=causal, scale=1.0,
                                   key_padding_mask=None if valid is None else valid[None])
            out[b, h], lse[b, h] = o[0, 0], l[0, 0]
    return out.to(q.dtype), lse


register_method(
    "feature_sketch",
    feature_sketch_attention,
    params={
        "mode": Param(kind=str, choices=("leverage", "deterministic"),
                      help="leverage: randomized leverage-score sampling (Thm 3.5); deterministic: BSS sparsifier (Thm 3.6)"),
        "eps": Param(kind=float, low=1e-3, high=0.99, help="spectral approximation (1 +- eps) of [Q;K][Q;K]^T"),
        "delta": Param(kind=float, low=1e-9, high=0.5, help="failure probability of the randomized sampler"),
        "oversample": Param(kind=float, low=1e-3, high=1e6, help="constant in T = c eps^-2 n ln(n/delta) draws"),
        "min_dim_ratio": Param(kind=float, low=0.0, help="apply only when head dim d >= ratio * seq_len"),
        "seed": Param(kind=int, low=0, help="seed of the sampler when no generator is given"),
        "min_seq_len": Param(kind=int, low=0, high=MAX_TOKENS, help="below this many keys: exact attention"),
    },
    check=feature_sketch_check,
    min_seq_len_param="min_seq_len",
    source="Deng, Mahadevan & Song, Theorems 3.5/3.6, Algorithms 1-2, Lemma 5.2, Definition 5.3, Theorem 4.2",
    summary="sparsify the feature columns of [Q; K] (d >> n) by leverage scores or a deterministic spectral sparsifier",
)
