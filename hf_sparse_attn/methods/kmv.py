"""Kernel matrix-vector products under sparsity assumptions (Indyk, Kapralov, Sheth & Wagner),
Algorithms 1-3 (APPROXKMV = pre-processing + FINDHEAVY + APPROXLIGHT) and the Lemma 4.1 reduction.

Two engines. ``engine="blocks"`` (default, :func:`kmv_blocks_attention`, docs/methods/kmv.md): the same three parts on
the sorted-LSH block machinery of ``hyper`` - heavy value rows H1 as exact extra columns, heavy keys = the query's
sorted LSH key block (found with the LSH's probability, not Lemma 3.4's 0.99), light keys from a shared sample pool
with per-row variance budgets - every (batch, head) batched, every tensor on the input's device. ``engine="reference"``
(below, down to :func:`kmv_attention`): the paper's algorithms as written, one (batch, head) at a time on CPU tensors
(each head is moved with ``.cpu()``, even from a GPU). The regime check :func:`kmv_check` (Assumption A measured on the
layer's input) serves both.

The reference engine:

Problem. Gaussian kernel K_ij = exp(-||x_i - y_j||^2) (unit bandwidth: the points already carry the 1/(2 sigma^2)),
a block of vectors X [n, c] (c = 1 is the paper's x). Output Y with ||K X - Y||_F <= eps ||X||_F (Theorem 1.1).
Assumption A: the sum of all but the n largest entries of K is at most a constant times the sum of the n largest,
so ||K||_1 = O(n). Everything below treats the rows X_j of the block as the paper treats the scalars x_j (x_j^2
becomes ||X_j||^2); for c = 1 it is the paper word for word, and every step's proof carries over row by row.

Algorithm 3, step by step, as implemented in :func:`approx_kmv`:

* Normalise ||X||_F^2 = n (the guarantee is scale free), n = number of keys.
* Definition 3.1 / Lemma 3.2: H1 = {j : ||X_j||^2 >= n^gamma} (at most n^(1-gamma) keys, Markov) are multiplied
  exactly, y_H = K[:, H1] X[H1] (n |H1| kernel evaluations); H2 = {j : ||X_j||^2 <= n^-4} are dropped (error
  <= n^-3 per row); T = the rest.
* Algorithm 1 FINDHEAVY / Lemma 3.4: S_i = {j in T : K_ij >= n^-alpha} = {j : ||x_i - y_j||^2 <= alpha ln n}.
  Lemma 2.1 asks for an LSH family with collision probability >= n^-alpha at r_near = sqrt(alpha ln n) and
  T_lsh = 10 n^alpha ln n repetitions. We use the p-stable Euclidean LSH of Datar et al. (E2LSH):
  h(p) = floor((a.p + b) / w), a ~ N(0, I), b ~ U[0, w), w = ``lsh_bucket_width`` * r_near, whose collision
  probability at distance c is  f(c) = 1 - 2 Phi(-w/c) - 2 c / (sqrt(2 pi) w) (1 - exp(-w^2 / 2c^2)).
  ``lsh_num_projs`` hashes are concatenated per table (0 = the smallest number with f(r_near)^k <= n^-alpha, as in
  Lemma 2.1), and ``lsh_num_tables`` tables are used (0 = ceil(lsh_table_factor * n^alpha * ln n); the paper's
  factor is 10). Every query scans the keys in its buckets, the candidate pairs are de-duplicated and verified
  with one exact kernel evaluation each; y_S = sum_{j in S_i} K_ij X_j exactly.
* Algorithm 2 APPROXLIGHT / Lemma 3.5: the light part z_i = sum_{j in T \\ S_i} K_ij X_j is estimated by uniform
  samples from T (with replacement; a sample that falls in S_i counts 0): z_i ~ |T| / m_i * sum_l K_{i j_l} X_{j_l}.
  This is the paper's "sub-sample every key with probability 1/n, scale by n" estimator with the number of
  repetitions made explicit. Its single-sample variance is at most |T| sum_{j in L_i} ||X_j||^2 K_ij^2 = |T| s_i,
  so m_i = budget_constant * Var_i / tol_i^2 samples give E||err_i||^2 <= tol_i^2 / budget_constant (Chebyshev;
  the paper's constant is 10, then a median over 10 log n groups, here ``median_groups``, default 1).
  The per-row budget m_i comes from one of three rules (``budget``):
    - "variance" (default; the practical variant of A.1.4): a pilot of ``num_samples`` samples per row gives the
      per-query empirical variance Var_i, and m_i = budget_constant * Var_i / tol_i^2: rows with high variance get
      more samples. Budgets are rounded up to num_samples * 2^L so that rows of one level share one sample pool
      (dense kernel blocks, at most 2x over-sampling); the pilot samples are the pool's first samples.
    - "two_level" (A.1.4 literally): num_samples for every row, 1.5x for rows whose empirical variance is above
      the mean.
    - "kde" (Algorithm 2 lines 3-7): round ||X_j||^2 to powers of (1 + eps) (buckets B_m), estimate
      t_i = sum_m (1+eps)^m sum_{j in B_m} K_ij^2 with a KDE of the kernel k^2 per bucket, and use
      s_i = t_i - sum_{j in S_i} ||X_j||^2 K_ij^2 + n^-beta t_i (beta = 0.218), Var_i = |T| s_i. The KDE here is the
      plain uniform-sampling estimator (``kde_samples`` keys per bucket), not the hashing-based KDE of Charikar et
      al. 2020 the paper cites, so this budget is a faithful structure with a simpler oracle.
  A row whose budget reaches |T| is computed exactly over T (no sampling can be cheaper).
  Tolerances: tol_i = eps ||X||_F / sqrt(n) (the paper's per-row additive eps after normalisation) unless the
  caller gives per-row tolerances (the attention method does, see below).
* y = y_H + y_S + z, rescaled back.

Kernel evaluations (the paper's cost measure, returned in ``stats``): n|H1| + #verified LSH candidates +
sum_i m_i (+ n|T| for rows done exactly). With gamma = 0.109, alpha = 1/3 the paper's bound is O~(d n^1.89 / eps^2).

Attention (:func:`kmv_attention`). Lemma 4.1 (``gaussian_kernel.softmax_to_gaussian_kernel``) writes
exp(scale q_i.k_j) = D_i K_ij, so softmax(scale Q K^T) V = (K V) / (K 1): one block X = [sigma_v 1, V]
(sigma_v = rms row norm of V, so that both parts weigh alike) goes through approx_kmv, and
out_i = Y_i[1:] / (Y_i[0] / sigma_v). Two practical changes, both per row and both cancelling in out:
  - numbers: values are computed as exp(-(||x_i - y_j||^2 - c_i)) with c_i = min_j-bound of the distance,
    c_i = scale (||q_i|| - max_j ||k_j||)^2 / 2 <= ||x_i - y_j||^2, so nothing underflows; lse adds c_i back;
  - tolerances are relative to the row (A.1.4 reports error / ||v||): tol_i = eps * mass_i * sigma_v with mass_i
    the pilot estimate of (K 1)_i, so out_i is within about eps * sigma_v of exact, whatever the row's scale.
The heavy threshold stays the paper's absolute K_ij >= n^-alpha. V may have negative entries: the estimators are
unbiased for signed vectors (Lemma 3.5 never uses the sign; the paper's point against Backurs et al. 2021).
``split_signs=True`` instead runs V+ = max(V, 0) and V- = max(-V, 0) as separate columns and subtracts
(each part has norm <= ||V||, so the error bound at most doubles); it is there for comparison.
Rows whose denominator estimate is not positive are recomputed exactly. Causal attention: HyperAttention's
recursion (split in half; the two diagonal halves recurse, the off-diagonal quadrant is a non-causal kmv
call, merged by lse) down to ``causal_block`` keys, then exact. Padding: masked keys are removed per batch row.

Deterministic given ``generator`` (else ``seed``): hashes, pools and KDE samples are drawn from it in a fixed order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .common import check_inputs
from .defaults import NUM_SINK_TOKENS
from .exact import exact_attention
from .gaussian_kernel import softmax_to_gaussian_kernel
from .lsh import make_generator
from ..kernels.sorted_blocks_torch import dense_attention_with_lse, masked_attention_with_lse
from .causal_recursion import causal_levels
from .merge import empty_rows_to_zero, merge_attention, merge_attention_into, needs_grad
from .padding import leading_padding, move_leading_padding_to_end, restore_leading_padding
from .sorted_blocks import grouped_sorted_attention
from .registry import MAX_TOKENS, Param, register_method, self_attention_only

_PAIR_CHUNK = 1 << 20  # candidate pairs verified per chunk
_BLOCK_ELEMS = 1 << 24  # dense kernel block elements per chunk (64 MB float32)


def e2lsh_collision_probability(distance: float, width: float) -> float:
    """P[h(p) = h(q)] for one p-stable hash floor((a.p + b) / w) at ||p - q|| = distance (Datar et al. 2004)."""
    if distance <= 0:
        return 1.0
    t = width / distance
    phi = 0.5 * (1 + math.erf(-t / math.sqrt(2)))
    return 1 - 2 * phi - 2 / (math.sqrt(2 * math.pi) * t) * (1 - math.exp(-t * t / 2))


def lsh_parameters(n: int, alpha: float, bucket_width: float, num_projs: int, num_tables: int,
                   table_factor: float) -> tuple[float, float, int, int]:
    """(r_near, w, projections per table, tables) for FINDHEAVY (Lemma 2.1 / Lemma 3.4, module docstring)."""
    r_near = math.sqrt(max(alpha * math.log(max(n, 2)), 1e-12))
    width = bucket_width * r_near
    if num_projs <= 0:
        p1 = e2lsh_collision_probability(r_near, width)
        num_projs = max(1, int(math.ceil(alpha * math.log(max(n, 2)) / -math.log(p1))))
    if num_tables <= 0:
        num_tables = max(1, int(math.ceil(table_factor * max(n, 2) ** alpha * math.log(max(n, 2)))))
    return r_near, width, num_projs, num_tables


def _sq_norms(p: torch.Tensor) -> torch.Tensor:
    return p.pow(2).sum(-1)


def kernel_block(xq: torch.Tensor, yk: torch.Tensor, xsq: torch.Tensor, ysq: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """exp(-||x_i - y_j||^2 + offset_i) for xq [a, p], yk [b, p] -> [a, b] (dense; float32).

    In place (no second block allocated) unless autograd needs the inputs' gradient: then out of place, because
    the block is saved for backward and callers change it (masks, squares) afterwards only on a fresh tensor."""
    dist = xsq[:, None] + ysq[None, :] - 2 * (xq @ yk.T)
    if needs_grad(xq, yk, xsq, ysq, offset):
        return torch.exp(offset[:, None] - dist.clamp_min(0))
    return dist.clamp_min_(0).sub_(offset[:, None]).neg_().exp_()


def find_heavy(x: torch.Tensor, y: torch.Tensor, keys: torch.Tensor, threshold_sq: float, width: float, num_projs: int,
               num_tables: int, generator: torch.Generator, stats: Optional[dict] = None,
               dense_verify_fraction: float = 8.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 1 FINDHEAVY with E2LSH: all pairs (i, j), j in ``keys``, with ||x_i - y_j||^2 <= threshold_sq.

    x [nq, p], y [nk, p], keys [t] int64 (the candidate key set T). Returns (rows [s], cols [s], dist_sq [s]) of the
    verified heavy pairs, sorted by pair id rows * nk + cols. Candidate pairs (a query and a key in one bucket of
    some table) are de-duplicated and each verified with one kernel evaluation (counted in stats["lsh_candidates"]).
    """
    nq, p = x.shape
    nk = y.shape[0]
    empty = torch.zeros(0, dtype=torch.int64)
    if keys.numel() == 0 or nq == 0:
        return empty, empty, torch.zeros(0)
    yk = y[keys]
    multipliers = torch.randint(1, 1 << 30, (num_projs,), generator=generator, dtype=torch.int64) * 2 + 1
    pair_ids = []
    raw_total = 0
    for _ in range(num_tables):
        a = torch.randn(p, num_projs, generator=generator)
        b = torch.rand(num_projs, generator=generator) * width
        code_q = (torch.floor((x @ a + b) / width).long() * multipliers).sum(1)  # [nq] (int64 wrap-around is fine)
        code_k = (torch.floor((yk @ a + b) / width).long() * multipliers).sum(1)  # [t]
        sorted_codes, order = torch.sort(code_k)
        lo = torch.searchsorted(sorted_codes, code_q, right=False)
        hi = torch.searchsorted(sorted_codes, code_q, right=True)
        counts = hi - lo
        total = int(counts.sum())
        if total == 0:
            continue
        rows = torch.repeat_interleave(torch.arange(nq), counts)
        starts = torch.repeat_interleave(lo - (torch.cumsum(counts, 0) - counts), counts)
        pos = torch.arange(total) + starts
        pair_ids.append(rows * nk + keys[order[pos]])
        raw_total += total
        if raw_total * dense_verify_fraction > 2 * nq * keys.numel():  # the hashes are not pruning: one dense pass
            if stats is not None:
                stats["lsh_candidates"] = stats.get("lsh_candidates", 0) + nq * int(keys.numel())
            return _dense_heavy(x, y, keys, threshold_sq)
    if not pair_ids:
        return empty, empty, torch.zeros(0)
    cand = torch.unique(torch.cat(pair_ids))  # sorted
    if stats is not None:
        stats["lsh_candidates"] = stats.get("lsh_candidates", 0) + int(cand.numel())
    if cand.numel() * dense_verify_fraction > nq * keys.numel():
        # The hashes did not prune (no gap between heavy and light distances, e.g. near-uniform attention):
        # verifying pair by pair would cost more than one dense pass over (queries x T), which finds every heavy pair.
        return _dense_heavy(x, y, keys, threshold_sq)
    keep_rows, keep_cols, keep_dist = [], [], []
    for start in range(0, cand.numel(), _PAIR_CHUNK):
        ids = cand[start:start + _PAIR_CHUNK]
        r, c = ids // nk, ids % nk
        dist = (x[r] - y[c]).pow(2).sum(1)
        ok = dist <= threshold_sq
        keep_rows.append(r[ok])
        keep_cols.append(c[ok])
        keep_dist.append(dist[ok])
    return torch.cat(keep_rows), torch.cat(keep_cols), torch.cat(keep_dist)


def _dense_heavy(x, y, keys, threshold_sq):
    """Every pair (i, j in keys) with ||x_i - y_j||^2 <= threshold_sq, by dense blocks, sorted by pair id."""
    nk = y.shape[0]
    yk = y[keys]
    ysq = _sq_norms(yk)
    rows_out, cols_out, dist_out = [], [], []
    per = max(1, _BLOCK_ELEMS // max(1, keys.numel()))
    for s in range(0, x.shape[0], per):
        xs = x[s:s + per]
        dist = (_sq_norms(xs)[:, None] + ysq[None, :] - 2 * (xs @ yk.T)).clamp_min_(0)
        r, c = (dist <= threshold_sq).nonzero(as_tuple=True)
        rows_out.append(r + s)
        cols_out.append(keys[c])
        dist_out.append(dist[r, c])
    rows, cols, dist = torch.cat(rows_out), torch.cat(cols_out), torch.cat(dist_out)
    order = torch.argsort(rows * nk + cols)
    return rows[order], cols[order], dist[order]


def approx_kmv(
    x: torch.Tensor,
    y: torch.Tensor,
    vec: torch.Tensor,
    *,
    eps: float = 0.5,
    alpha: float = 1.0 / 3.0,
    gamma: float = 0.109,
    lsh_bucket_width: float = 2.0,
    lsh_num_projs: int = 0,
    lsh_num_tables: int = 0,
    lsh_table_factor: float = 1.0,
    budget: str = "variance",
    num_samples: int = 32,
    budget_constant: float = 2.0,
    median_groups: int = 1,
    kde_samples: int = 16,
    row_offset: Optional[torch.Tensor] = None,
    row_tolerance: Optional[torch.Tensor] = None,
    relative_tolerance: bool = False,
    generator: Optional[torch.Generator] = None,
    seed: int = 0,
    stats: Optional[dict] = None,
) -> torch.Tensor:
    """Algorithm 3 APPROXKMV: Y ~ K vec with K_ij = exp(-||x_i - y_j||^2 + row_offset_i).

    x [nq, p] queries, y [nk, p] keys (float32), vec [nk, c] (c = 1: the paper's x; signed entries allowed).
    Guarantee (Theorem 1.1, row offsets 0, default tolerances): ||K vec - Y||_F <= eps ||vec||_F with constant
    probability under Assumption A. ``row_tolerance`` [nq] overrides the per-row tolerance (same units as K vec);
    ``relative_tolerance=True`` sets tol_i = eps * |pilot estimate of (K vec)_i[0]| (the attention method's rule).
    ``row_offset`` [nq] multiplies row i of K by exp(row_offset_i) (numerics; the heavy threshold is unaffected).
    ``stats`` (a dict) receives kernel-evaluation counts: h1_exact, lsh_candidates, light_samples, exact_rows, total.
    Returns Y [nq, c] float32.
    """
    gen = make_generator(generator, seed)
    x, y, vec = x.float(), y.float(), vec.float()
    nq, nk = x.shape[0], y.shape[0]
    stats = stats if stats is not None else {}
    for key in ("h1_exact", "lsh_candidates", "light_samples", "exact_rows"):
        stats.setdefault(key, 0)
    offset = torch.zeros(nq) if row_offset is None else row_offset.float()
    if nk == 0 or nq == 0:
        return torch.zeros(nq, vec.shape[1])
    xsq, ysq = _sq_norms(x), _sq_norms(y)
    fro = float(vec.detach().norm())
    if fro == 0:
        return torch.zeros(nq, vec.shape[1])
    unit = math.sqrt(nk) / fro
    xn = vec * unit  # ||xn||_F^2 = nk
    row_sq = _sq_norms(xn)

    # Definition 3.1 / Lemma 3.2: H1 exactly, H2 dropped.
    h1 = (row_sq >= nk ** gamma).nonzero().flatten()
    keys_t = ((row_sq < nk ** gamma) & (row_sq > nk ** -4.0)).nonzero().flatten()
    out = torch.zeros(nq, vec.shape[1])
    if h1.numel():
        rows_per = max(1, _BLOCK_ELEMS // max(1, h1.numel()))
        for s in range(0, nq, rows_per):
            out[s:s + rows_per] += kernel_block(x[s:s + rows_per], y[h1], xsq[s:s + rows_per], ysq[h1], offset[s:s + rows_per]) @ xn[h1]
        stats["h1_exact"] += nq * int(h1.numel())
    t_size = int(keys_t.numel())
    if t_size == 0:
        stats["total"] = stats["h1_exact"]
        return out / unit

    # Algorithm 1 FINDHEAVY on T.
    r_near, width, projs, tables = lsh_parameters(nk, alpha, lsh_bucket_width, lsh_num_projs, lsh_num_tables, lsh_table_factor)
    h_rows, h_cols, h_dist = find_heavy(x, y, keys_t, r_near ** 2, width, projs, tables, gen, stats)
    heavy_ids = h_rows * nk + h_cols  # sorted
    heavy_vals = torch.exp(-(h_dist - offset[h_rows]))
    heavy_part = torch.zeros(nq, vec.shape[1]).index_add_(0, h_rows, heavy_vals[:, None] * xn[h_cols])
    heavy_sq = torch.zeros(nq).index_add_(0, h_rows, heavy_vals.pow(2) * row_sq[h_cols])

    # Algorithm 2 APPROXLIGHT.
    estimates = []
    exact_rows_mask = torch.zeros(nq, dtype=torch.bool)
    for _ in range(max(1, median_groups)):
        z, exact_rows_mask = _approx_light(x, y, xsq, ysq, xn, row_sq, offset, keys_t, heavy_ids, heavy_part, heavy_sq,
                                           eps, unit, budget, num_samples, budget_constant, kde_samples, row_tolerance,
                                           relative_tolerance, gen, stats)
        estimates.append(z)
    light = estimates[0] if len(estimates) == 1 else torch.stack(estimates).median(dim=0).values
    out += heavy_part + light
    if bool(exact_rows_mask.any()):  # rows done exactly over T: replace heavy + light by the exact T-sum
        rows = exact_rows_mask.nonzero().flatten()
        out[rows] -= heavy_part[rows] + light[rows]
        out[rows] += _exact_rows_over(x, y, xsq, ysq, xn, offset, rows, keys_t)
    stats["total"] = stats["h1_exact"] + stats["lsh_candidates"] + stats["light_samples"] + stats["exact_rows"]
    return out / unit


def _exact_rows_over(x, y, xsq, ysq, xn, offset, rows, keys):
    res = []
    per = max(1, _BLOCK_ELEMS // max(1, keys.numel()))
    for s in range(0, rows.numel(), per):
        r = rows[s:s + per]
        res.append(kernel_block(x[r], y[keys], xsq[r], ysq[keys], offset[r]) @ xn[keys])
    return torch.cat(res)


def _pool_block(x, y, xsq, ysq, xn, offset, rows, pool_keys, heavy_ids, nk):
    """Sample terms for rows x pool: K_ij X_j with heavy pairs zeroed. Returns (terms [r, m, c], kernel [r, m])."""
    kb = kernel_block(x[rows], y[pool_keys], xsq[rows], ysq[pool_keys], offset[rows])  # [r, m]
    if heavy_ids.numel():
        ids = rows[:, None] * nk + pool_keys[None, :]
        heavy = torch.isin(ids, heavy_ids)
        kb = kb.masked_fill(heavy, 0.0) if kb.requires_grad else kb.masked_fill_(heavy, 0.0)
    return kb


def _approx_light(x, y, xsq, ysq, xn, row_sq, offset, keys_t, heavy_ids, heavy_part, heavy_sq, eps, unit, budget,
                  num_samples, budget_constant, kde_samples, row_tolerance, relative_tolerance, gen, stats):
    nq, nk = x.shape[0], y.shape[0]
    t_size = keys_t.numel()
    c = xn.shape[1]
    m0 = max(2, min(num_samples, t_size))
    max_levels = max(0, int(math.ceil(math.log2(max(1, t_size / m0)))))
    pool_size = m0 * (1 << max_levels)
    pool = keys_t[torch.randint(0, t_size, (pool_size,), generator=gen)]

    # Pilot: every row, the first m0 samples.
    all_rows = torch.arange(nq)
    kb = _pool_block(x, y, xsq, ysq, xn, offset, all_rows, pool[:m0], heavy_ids, nk)  # [nq, m0]
    stats["light_samples"] += nq * m0
    pilot = (kb @ xn[pool[:m0]]) * (t_size / m0)  # [nq, c]
    # empirical single-sample variance summed over columns: E||t K X||^2 - ||mean||^2
    second = (kb.pow(2) @ row_sq[pool[:m0]]) * (t_size ** 2 / m0)
    var = (second - pilot.pow(2).sum(1)).clamp_min(0) * m0 / max(1, m0 - 1)

    if row_tolerance is not None:
        tol = row_tolerance.float() * unit
    elif relative_tolerance:
        tol = eps * (pilot[:, 0] + heavy_part[:, 0]).abs()
    else:
        tol = torch.full((nq,), eps)  # ||xn||_F^2 = nk: the paper's per-row additive eps
    tol = tol.clamp_min(1e-30)

    if budget == "variance":
        need = budget_constant * var / tol.pow(2)
    elif budget == "two_level":
        need = torch.where(var > var.mean(), torch.full_like(var, 1.5 * m0), torch.full_like(var, float(m0)))
    elif budget == "kde":
        need = budget_constant * t_size * _kde_light_second_moment(x, y, xsq, ysq, row_sq, offset, keys_t, heavy_sq,
                                                                 eps, kde_samples, gen, stats) / tol.pow(2)
    else:
        raise ValueError(f"kmv budget must be 'variance', 'two_level' or 'kde', got {budget!r}")

    # sampling that many costs as much as the exact row; and when the pilot alone is as large as T (m0 = |T|),
    # no sampling is cheaper than the exact sum (a pilot that drew one key twice would report variance 0)
    exact_rows = (need >= t_size / 2) | (m0 >= t_size)
    stats["exact_rows"] += int(exact_rows.sum()) * t_size
    level = torch.zeros(nq, dtype=torch.long)
    sampled = ~exact_rows & (need > m0)
    if bool(sampled.any()):
        level[sampled] = torch.ceil(torch.log2(need[sampled] / m0)).long().clamp(0, max_levels)
    z = pilot.clone()
    for lv in range(1, max_levels + 1):
        rows = (sampled & (level == lv)).nonzero().flatten()
        if rows.numel() == 0:
            continue
        m = m0 << lv
        extra = pool[m0:m]
        acc = torch.zeros(rows.numel(), c)
        per = max(1, _BLOCK_ELEMS // max(1, extra.numel()))
        for s in range(0, rows.numel(), per):
            r = rows[s:s + per]
            acc[s:s + per] = _pool_block(x, y, xsq, ysq, xn, offset, r, extra, heavy_ids, nk) @ xn[extra]
        stats["light_samples"] += rows.numel() * extra.numel()
        z[rows] = (pilot[rows] * m0 / t_size + acc) * (t_size / m)
    return z, exact_rows


def _kde_light_second_moment(x, y, xsq, ysq, row_sq, offset, keys_t, heavy_sq, eps, kde_samples, gen, stats):
    """Algorithm 2 lines 3-7: s_i ~ sum_{j in T \\ S_i} ||X_j||^2 K_ij^2 from per-bucket KDEs of k^2 (uniform-sampling
    KDE, ``kde_samples`` keys per bucket), plus the n^-beta over-estimate, beta = 0.218."""
    nq, nk = x.shape[0], y.shape[0]
    beta = 0.218
    rounded_exp = torch.ceil(torch.log(row_sq[keys_t]) / math.log1p(eps)).long()  # x_j^2 in ((1+eps)^(m-1), (1+eps)^m]
    t_est = torch.zeros(nq)
    for m in torch.unique(rounded_exp).tolist():
        members = keys_t[rounded_exp == m]
        take = members if members.numel() <= kde_samples else \
            members[torch.randint(0, members.numel(), (kde_samples,), generator=gen)]
        kb = kernel_block(x, y[take], xsq, ysq[take], offset)
        kb = kb.pow(2) if kb.requires_grad else kb.pow_(2)  # k^2
        stats["light_samples"] += nq * int(take.numel())
        t_est += (1 + eps) ** m * kb.mean(1) * members.numel()
    return (t_est - heavy_sq).clamp_min(0) + nk ** -beta * t_est


# ----------------------------------------------------------------------------------------------------------------
# Attention through the kernel.


def _kmv_attention_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, params: dict,
                        gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal kmv attention for one head: q [nq, D], k/v [nk, D] float32 (valid keys only) -> ([nq, Dv], [nq])."""
    nq, nk = q.shape[0], k.shape[0]
    dv = v.shape[1]
    if nk == 0:
        return torch.zeros(nq, dv), torch.full((nq,), float("-inf"))
    xq, yk, log_row_factor = softmax_to_gaussian_kernel(q, k, scale)
    max_k = float(k.detach().norm(dim=1).max())
    offset = scale * (q.norm(dim=1) - max_k).pow(2) / 2  # <= ||x_i - y_j||^2 for every j: values <= 1
    if params["split_signs"]:
        v_cols = torch.cat([v.clamp_min(0), (-v).clamp_min(0)], dim=1)
    else:
        v_cols = v
    sigma_v = float(v_cols.detach().pow(2).sum(1).mean().sqrt()) or 1.0
    block = torch.cat([torch.full((nk, 1), sigma_v), v_cols], dim=1)
    res = approx_kmv(xq, yk, block, eps=params["eps"], alpha=params["alpha"], gamma=params["gamma"],
                     lsh_bucket_width=params["lsh_bucket_width"], lsh_num_projs=params["lsh_num_projs"],
                     lsh_num_tables=params["lsh_num_tables"], lsh_table_factor=params["lsh_table_factor"],
                     budget=params["budget"], num_samples=params["num_samples"],
                     budget_constant=params["budget_constant"], median_groups=params["median_groups"],
                     row_offset=offset, relative_tolerance=True, generator=gen)
    den = res[:, 0] / sigma_v
    num = res[:, 1:]
    if params["split_signs"]:
        num = num[:, :dv] - num[:, dv:]
    out = num / den.clamp_min(1e-30)[:, None]
    lse = log_row_factor - offset + den.clamp_min(1e-30).log()
    bad = (den <= 0).nonzero().flatten()
    if bad.numel():
        scores = (q[bad] @ k.T) * scale
        lse[bad] = torch.logsumexp(scores, dim=1)
        out[bad] = torch.softmax(scores, dim=1) @ v
    return out, lse


def _kmv_causal_head(q, k, v, valid, scale, params, gen, block):
    """Causal recursion (HyperAttention): q/k/v [n, D] float32, valid [n] bool -> ([n, Dv], [n])."""
    n = q.shape[0]
    if n <= block:
        o, l = exact_attention(q[None, None], k[None, None], v[None, None], causal=True, scale=scale,
                               key_padding_mask=valid[None])
        return o[0, 0], l[0, 0]
    half = n // 2
    o_top, l_top = _kmv_causal_head(q[:half], k[:half], v[:half], valid[:half], scale, params, gen, block)
    o_diag, l_diag = _kmv_causal_head(q[half:], k[half:], v[half:], valid[half:], scale, params, gen, block)
    keys = valid[:half]
    o_off, l_off = _kmv_attention_head(q[half:], k[:half][keys], v[:half][keys], scale, params, gen)
    o_bot, l_bot = merge_attention(o_diag[None], l_diag[None], o_off[None], l_off[None])
    return torch.cat([o_top, o_bot[0]]), torch.cat([l_top, l_bot[0]])


# ----------------------------------------------------------------------------------------------------------------
# engine="blocks": the same three parts on the sorted-LSH block machinery, every head batched, on q's device.
#
#   H1  heavy value rows (Definition 3.1 / Lemma 3.2)  -> exact extra columns, merged by log-sum-exp (like sinks)
#   S_i heavy keys (Definition 3.3 / Lemma 3.4)         -> the key block of query i in the sorted LSH order, exact,
#                                                          through the block kernel of ``hyper`` (sorted_blocks)
#   z_i light keys (Lemma 3.5, A.1.4)                   -> a shared pool of uniform samples per group, with the
#                                                          per-row variance budget; samples in i's block count 0
# Docs: docs/methods/kmv.md.

NEG_INF = float("-inf")
ENGINES = ("blocks", "reference")
# Regime check default: Indyk et al. measured the accumulated max ratio <= 4.6 on BERT; on SmolLM2 at 8k tokens the
# per-layer max (over heads and prefixes) is <= 10 on 26 of 30 layers (eval/results/head_tail_smollm2/results.md).
MAX_HEAD_TAIL = 10.0
# Rows summed exactly are computed in chunks whose [G, rows, keys] mask has at most this many elements (64 MB).
EXACT_ROW_MASK_ELEMENTS = 1 << 24
# The variance budget doubles a row's samples up to this many times (pool = num_samples * 2^SAMPLE_LEVELS).
SAMPLE_LEVELS = 3


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with an additive mask: q [G, M, D], k/v [G, L, D], mask [G, M, L] (0 or -inf; a weight
    log(w) adds log w). Returns out [G, M, Dv], lse [G, M]; a row whose mask is -inf everywhere gets 0 / -inf."""
    out, lse = masked_attention_with_lse(q[:, None], k[:, None], v[:, None], scale, mask[:, None])
    return empty_rows_to_zero(out[:, 0], lse[:, 0], mask.amax(-1) == NEG_INF)


def heavy_value_columns(v: torch.Tensor, key_valid: torch.Tensor, *, gamma: float, max_heavy_values: int,
                        causal: bool, num_sink_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """H1 of Definition 3.1 for the block X = [sigma 1, V] of every (batch, head): the keys whose value row is large.

    v [B, H, N, Dv] float32, key_valid [B, H, N] bool. With r_j = ||v_j||^2 and sigma^2 the mean of r over the valid
    keys, X normalised to ||X||_F^2 = n has ||X_j||^2 = (sigma^2 + r_j) / (2 sigma^2), so j is in H1 iff
    (sigma^2 + r_j) / (2 sigma^2) >= n^gamma. Markov bounds |H1| by n^(1 - gamma) (Lemma 3.2); we keep at most
    ``max_heavy_values`` per head (non-causal: the largest r_j; causal: the first ones by position).
    Causal: sigma^2 is the mean over the valid keys at or before j and n = N (the call's length), so whether key j
    is in H1 depends on keys <= j only. The first ``num_sink_tokens`` positions (if valid) are always included
    (attention sinks: the same exact-column mechanism).
    Returns idx [B, H, C] int64 positions and sel [B, H, C] bool (False = an unused slot), C = the cap.
    """
    B, H, N, _ = v.shape
    device = v.device
    S = min(int(num_sink_tokens), N)
    C = min(N, int(max_heavy_values) + S)
    if C == 0:
        return torch.zeros(B, H, 0, dtype=torch.int64, device=device), torch.zeros(B, H, 0, dtype=torch.bool, device=device)
    r = v.detach().pow(2).sum(-1).masked_fill(~key_valid, 0.0)  # [B, H, N]
    validf = key_valid.float()
    if causal:
        sigma2 = r.cumsum(-1) / validf.cumsum(-1).clamp_min(1.0)
        n = float(N)
    else:
        sigma2 = (r.sum(-1, keepdim=True) / validf.sum(-1, keepdim=True).clamp_min(1.0)).expand(B, H, N)
        n = validf.sum(-1, keepdim=True).clamp_min(1.0)
    heavy = (sigma2 + r >= 2.0 * sigma2 * n ** gamma) & (sigma2 > 0) & key_valid
    pos = torch.arange(N, device=device)
    heavy = heavy | ((pos < S)[None, None, :] & key_valid)
    if causal:  # the first C heavy keys by position: a later key never displaces an earlier one
        score = torch.where(heavy, (N - pos).float()[None, None, :].expand(B, H, N), torch.full_like(r, -1.0))
    else:  # the C largest value rows (sinks first)
        score = torch.where(heavy, r + torch.where(pos < S, float("inf"), 0.0)[None, None, :], torch.full_like(r, -1.0))
    top, idx = torch.topk(score, C, dim=-1)
    return idx, top >= 0


def heavy_value_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, sel: torch.Tensor, *,
                          scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """y_H of Lemma 3.2: every query attends the H1 columns exactly. q [B, H, Nq, D], k/v [B, H, Nk, D] float32,
    idx/sel [B, H, C] from :func:`heavy_value_columns`. Returns out [B, H, Nq, Dv], lse [B, H, Nq] (0 / -inf where
    a row has no H1 column). Causal: query i attends column j only if j <= i."""
    B, H, Nq, D = q.shape
    G, C = B * H, idx.shape[-1]
    Dv = v.shape[-1]
    kh = torch.gather(k, 2, idx[..., None].expand(B, H, C, D)).view(G, C, D)
    vh = torch.gather(v, 2, idx[..., None].expand(B, H, C, Dv)).view(G, C, Dv)
    allowed = sel.view(G, 1, C).expand(G, Nq, C)
    if causal:
        allowed = allowed & (idx.view(G, 1, C) <= torch.arange(Nq, device=q.device)[None, :, None])
    mask = torch.zeros(G, Nq, C, device=q.device).masked_fill(~allowed, NEG_INF)
    out, lse = _attend(q.reshape(G, Nq, D), kh, vh, scale, mask)
    return out.view(B, H, Nq, Dv), lse.view(B, H, Nq)


def query_key_blocks(q_rows: torch.Tensor, k_rows: torch.Tensor, block_size: int,
                     q_ranks: Optional[torch.Tensor] = None, k_ranks_sorted: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, int]:
    """The key block each query of :func:`sorted_blocks.grouped_sorted_attention` attends (the same rule, for masking
    the light samples that fall in it). q_rows [G, Mq], k_rows [G, Mk] (sorted order); q_ranks / k_ranks_sorted as
    there. Returns (q_block [G, Mq] int64, bk): query m attends the sorted keys [q_block * bk, (q_block + 1) * bk)."""
    G, Mq = q_rows.shape
    Mk = k_rows.shape[1]
    bq = min(block_size, Mq)
    nb = -(-Mq // bq)
    bk = -(-Mk // nb)
    if q_ranks is None:
        return (torch.arange(Mq, device=q_rows.device) // bq)[None, :].expand(G, Mq), bk
    M = max(Mq, Mk)
    k_comp = k_ranks_sorted * M + (k_rows - k_rows.min(dim=1, keepdim=True).values)
    boundaries = k_comp[:, ::bk][:, :nb].contiguous()
    q_comp = q_ranks * M + (q_rows - q_rows.min(dim=1, keepdim=True).values)
    return (torch.searchsorted(boundaries, q_comp.contiguous(), right=True) - 1).clamp_(min=0), bk


def _merge_rows(out: torch.Tensor, lse: torch.Tensor, order: torch.Tensor, out_b: torch.Tensor,
                lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge out_b [G, R, Dv] / lse_b [G, R] into the rows ``order`` [G, R] (distinct per group) of out [G, M, Dv] /
    lse [G, M]; only those rows are read and written (in place without autograd)."""
    Dv = out.shape[-1]
    index = order[..., None].expand(*order.shape, Dv)
    o, l_ = merge_attention_into(torch.gather(out, 1, index), torch.gather(lse, 1, order), out_b, lse_b)
    if needs_grad(out, lse, o, l_):
        return out.scatter(1, index, o), lse.scatter(1, order, l_)
    return out.scatter_(1, index, o), lse.scatter_(1, order, l_)


def _selected_rows(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows where sel [G, M] is True, padded per group: (order [G, R] selected rows first, row_ok [G, R], R)."""
    count = sel.sum(1)
    R = int(count.max()) if sel.numel() else 0
    order = torch.sort((~sel).to(torch.int8), dim=1, stable=True).indices[:, :R]
    return order, torch.arange(R, device=sel.device)[None, :] < count[:, None], R


def light_key_attention(qg: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, k_rows: torch.Tensor,
                        n_valid: torch.Tensor, q_block: torch.Tensor, bk: int, out: torch.Tensor, lse: torch.Tensor, *,
                        scale: float, eps: float, num_samples: int, budget_constant: float,
                        generator: torch.Generator, stats: Optional[dict] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 2 APPROXLIGHT with the variance budget (A.1.4's practical variant), for G groups at once, merged into
    the heavy-key result (out [G, Mq, Dv], lse [G, Mq]: the block S_i of every query, exact).

    qg [G, Mq, D] the groups' queries (any order; q_block [G, Mq] = the key block of each, bk from
    :func:`query_key_blocks`: query m's block is the sorted keys [q_block * bk, (q_block + 1) * bk)); k_rows [G, Mk]
    rows of k_flat / v_flat in sorted order, the n_valid [G] valid keys first (the population T, H1 removed).

    Samples: m0 = num_samples pilot keys and a pool of m0 * 2^SAMPLE_LEVELS keys per group, uniform with replacement
    over T, shared by the group's queries. A sample inside query i's block counts 0 for i, so that
    E[(|T| / m) sum_t K_{i j_t} 1[j_t not in S_i]] = sum_{j in T \\\\ S_i} K_ij (Lemma 3.5).
    Budget: the pilot's empirical single-sample variance Var_i of |T| K_ij X_j, X_j = [sigma, v_j] (sigma^2 = mean
    ||v||^2 over the pool), gives m_i = budget_constant * Var_i / tol_i^2 with tol_i = eps * sigma * (mass of the
    row's block + pilot estimate of its light mass), rounded up to m0 * 2^L, L <= SAMPLE_LEVELS. Row i then uses the
    first m_i keys of the pool; the pilot only sets m_i, so given m_i the estimate is unbiased. One call per level
    L, for the rows at that level only (rows padded per group; all rows, the others masked, when they are most).
    A row whose budget reaches |T| / 2 is flagged
    ``exact_rows`` (Algorithm 2: no sampling is cheaper; the caller sums it exactly).
    Returns (out, lse, exact_rows [G, Mq] bool); out / lse are the inputs, updated in place without autograd.
    """
    G, Mq, D = qg.shape
    Mk = k_rows.shape[1]
    Dv = v_flat.shape[1]
    device = qg.device
    m0 = int(num_samples)
    total = m0 + (m0 << SAMPLE_LEVELS)  # pilot, then the pool
    u = torch.rand(G, total, generator=generator, device=generator.device).to(device)
    pos = (u * n_valid[:, None].float()).long().clamp_(max=Mk - 1)  # [G, total] sorted positions in T
    sample_rows = torch.gather(k_rows, 1, pos)
    sample_block = pos // bk
    ks = k_flat.index_select(0, sample_rows.view(-1)).view(G, total, D)
    vs = v_flat.index_select(0, sample_rows.view(-1)).view(G, total, Dv)
    has_pool = n_valid > 0  # [G]

    def segment_mask(blocks: torch.Tensor, rows_block: torch.Tensor, row_ok: torch.Tensor) -> torch.Tensor:
        """[G, R, s] additive mask: -inf for a sample in the row's own block, a row not taken, an empty population."""
        drop = (blocks[:, None, :] == rows_block[:, :, None]).logical_or_(~(row_ok & has_pool[:, None])[:, :, None])
        return torch.where(drop, NEG_INF, 0.0)

    all_rows = torch.ones(G, Mq, dtype=torch.bool, device=device)
    with torch.no_grad():  # the budget from the pilot: a discrete choice, no gradient
        s = torch.matmul(qg.detach(), ks[:, :m0].detach().transpose(1, 2)).mul_(scale)
        s.add_(segment_mask(sample_block[:, :m0], q_block, all_rows))  # [G, Mq, m0]
        ref = torch.maximum(s.amax(-1), lse.detach())
        ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))
        w = s.sub_(ref[..., None]).exp_()  # K_ij up to the row factor e^ref
        n_t = n_valid.float()[:, None]  # [G, 1]
        v0 = vs[:, :m0].detach()
        sigma2 = vs[:, m0:].detach().pow(2).sum(-1).mean(-1).clamp_min(1e-30)[:, None]  # [G, 1]
        mean_one = n_t / m0 * w.sum(-1)  # pilot estimate of sum_{T \\ S_i} K_ij (up to e^ref)
        # ||mean of K_ij v_j||^2 through the pilot's Gram matrix: no [G, Mq, Dv] temporary
        mean_v_sq = (n_t / m0).pow(2) * (torch.matmul(w, torch.matmul(v0, v0.transpose(1, 2))) * w).sum(-1)
        w_sq = w.pow_(2)
        second = n_t.pow(2) / m0 * (torch.matmul(w_sq, v0.pow(2).sum(-1)[..., None])[..., 0] + sigma2 * w_sq.sum(-1))
        var = (second - sigma2 * mean_one.pow(2) - mean_v_sq).clamp_min(0) * (m0 / max(1, m0 - 1))
        mass = torch.exp(lse.detach() - ref) + mean_one
        need = budget_constant * var / ((eps * mass).pow(2) * sigma2).clamp_min(1e-30)
        exact_rows = (need >= n_t / 2) & has_pool[:, None]
        level = torch.ceil(torch.log2((need / m0).clamp_min(1.0))).clamp_(0, SAMPLE_LEVELS).long()
        level = level.masked_fill(exact_rows, -1)  # -1: summed exactly by the caller, no samples
        log_weight = torch.log(n_t / (m0 * torch.pow(2.0, level.clamp(min=0).float())))  # log(|T| / m_i) [G, Mq]
    ks, vs, sample_block = ks[:, m0:], vs[:, m0:], sample_block[:, m0:]
    if stats is not None:
        stats["light_pairs"] = stats.get("light_pairs", 0) + G * Mq * m0
    # one call per level: the rows at level L attend the first m0 * 2^L pool samples. When most rows of the groups
    # are at that level, all rows are computed (the others masked out) instead of gathering the selected ones.
    for lv in range(SAMPLE_LEVELS + 1):
        sel = level == lv
        order, row_ok, R = _selected_rows(sel)
        if R == 0:
            continue
        m = m0 << lv
        if 4 * R >= 3 * Mq:
            o, l_ = _attend(qg, ks[:, :m], vs[:, :m], scale, segment_mask(sample_block[:, :m], q_block, sel))
            out, lse = merge_attention_into(out, lse, o, l_ + log_weight)
        else:
            q_sel = torch.gather(qg, 1, order[..., None].expand(G, R, D))
            o, l_ = _attend(q_sel, ks[:, :m], vs[:, :m], scale,
                            segment_mask(sample_block[:, :m], torch.gather(q_block, 1, order), row_ok))
            out, lse = _merge_rows(out, lse, order, o, l_ + torch.gather(log_weight, 1, order))
        if stats is not None:
            stats["light_pairs"] += G * (Mq if 4 * R >= 3 * Mq else R) * m
    return out, lse, exact_rows


def _exact_rows_of_groups(qg: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, k_rows: torch.Tensor,
                          k_valid: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The flagged rows [G, Mq] of qg [G, Mq, D] attend exactly over their group's valid keys (k_rows / k_valid
    [G, Mk]), padded per group; their out / lse [G, Mq(, Dv)] are replaced (in place without autograd)."""
    G, Mq, D = qg.shape
    Mk = k_rows.shape[1]
    Dv = v_flat.shape[1]
    order, row_ok, R = _selected_rows(rows)
    kk = k_flat.index_select(0, k_rows.reshape(-1)).view(G, Mk, D)
    vv = v_flat.index_select(0, k_rows.reshape(-1)).view(G, Mk, Dv)
    key_bias = torch.zeros(G, 1, Mk, device=qg.device).masked_fill_(~k_valid[:, None, :], NEG_INF)
    per = max(1, EXACT_ROW_MASK_ELEMENTS // max(1, G * Mk))  # rows per chunk: the [G, rows, Mk] mask stays bounded
    parts = []
    for r0 in range(0, R, per):
        q_sel = torch.gather(qg, 1, order[:, r0:r0 + per, None].expand(G, min(per, R - r0), D))
        parts.append(_attend(q_sel, kk, vv, scale, key_bias.expand(G, q_sel.shape[1], Mk)))
    e_out = torch.cat([p_[0] for p_ in parts], 1)
    e_lse = torch.cat([p_[1] for p_ in parts], 1)
    index = order[..., None].expand(G, R, Dv)
    e_out = torch.where(row_ok[..., None], e_out, torch.gather(out, 1, index))  # padded slots keep their row
    e_lse = torch.where(row_ok, e_lse, torch.gather(lse, 1, order))
    if needs_grad(out, lse, e_out, e_lse):
        return out.scatter(1, index, e_out), lse.scatter(1, order, e_lse)
    return out.scatter_(1, index, e_out), lse.scatter_(1, order, e_lse)


def kmv_group_attention(q_flat: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, *, q_rows: torch.Tensor,
                        q_order: torch.Tensor, k_rows: torch.Tensor, k_valid: torch.Tensor, natural,
                        block_size: int, scale: float, eps: float, num_samples: int, budget_constant: float,
                        generator: torch.Generator, q_ranks: Optional[torch.Tensor] = None,
                        k_ranks_sorted: Optional[torch.Tensor] = None,
                        stats: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-heavy-value part of kmv for G groups: heavy keys S_i (the query's sorted LSH key block, exact, through
    ``hyper``'s block kernel; Lemma 3.4 with the LSH's probability) plus the light keys (light_key_attention),
    merged by lse; rows whose variance budget reaches |T| / 2 are summed exactly over T.

    q_flat [Rq, D], k_flat/v_flat [Rk, D] float32; q_rows [G, Mq] rows of q_flat in sorted order, q_order [G, Mq]
    the natural index of each (q_rows = natural rows gathered by q_order); k_rows [G, Mk] (sorted, valid first),
    k_valid [G, Mk] bool; q_ranks / k_ranks_sorted as in sorted_blocks.grouped_sorted_attention (the causal block
    rule). ``natural(t)`` maps a [Rq + 1, ...] tensor indexed by q_flat rows to the view [G, Mq, ...] of the groups'
    queries in natural order (no copy). Returns out [G, Mq, Dv], lse [G, Mq] in natural order: views of fresh buffers.
    """
    G, Mq = q_rows.shape
    Dv = v_flat.shape[1]
    device = q_flat.device
    Rq = q_flat.shape[0]
    out_flat = torch.empty(Rq + 1, Dv, device=device)
    lse_flat = torch.empty(Rq + 1, device=device)
    grouped_sorted_attention(q_flat, k_flat, v_flat, q_rows=q_rows, k_rows=k_rows, k_valid=k_valid,
                             block_size=block_size, sample_size=0, generator=generator, scale=scale,
                             out_flat=out_flat, lse_flat=lse_flat, q_ranks=q_ranks, k_ranks_sorted=k_ranks_sorted)
    out, lse = natural(out_flat), natural(lse_flat)
    q_block, bk = query_key_blocks(q_rows, k_rows, block_size, q_ranks, k_ranks_sorted)
    if stats is not None:  # key slots of the blocks: bk keys per query
        stats["block_pairs"] = stats.get("block_pairs", 0) + G * Mq * bk
    if num_samples <= 0:
        return out, lse
    qg = natural(q_flat)  # [G, Mq, D] view
    q_block = torch.empty_like(q_block).scatter_(1, q_order, q_block)  # natural order
    n_valid = k_valid.sum(1)
    out, lse, exact_rows = light_key_attention(qg, k_flat, v_flat, k_rows, n_valid, q_block, bk, out, lse,
                                               scale=scale, eps=eps, num_samples=num_samples,
                                               budget_constant=budget_constant, generator=generator, stats=stats)
    if bool(exact_rows.any()):
        out, lse = _exact_rows_of_groups(qg, k_flat, v_flat, k_rows, k_valid, exact_rows, out, lse, scale)
        if stats is not None:
            stats["exact_row_pairs"] = stats.get("exact_row_pairs", 0) + int(exact_rows.sum()) * k_rows.shape[1]
    return out, lse


def _masked_ranks(x: torch.Tensor, planes: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """lsh_ranks with a per-head mask: x [B, H, N, D], valid [B, H, N] bool or None -> [B, H, N] (invalid: 2^P)."""
    from .lsh import lsh_ranks

    ranks = lsh_ranks(x, planes)
    return ranks if valid is None else ranks.masked_fill(~valid, 1 << planes.shape[-1])


def kmv_blocks_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                         key_padding_mask: Optional[torch.Tensor], generator: torch.Generator, eps: float,
                         gamma: float, lsh_num_projs: int, block_size: int, num_samples: int, budget_constant: float,
                         max_heavy_values: int, num_sink_tokens: int, causal_block: int,
                         stats: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kmv on the sorted blocks: q [B, H, Nq, D], k/v [B, H, Nk, D] (GQA expanded), key_padding_mask [B, Nk] bool.
    Returns out [B, H, Nq, Dv] float32 and lse [B, H, Nq]. Every tensor stays on q's device (random draws come from
    ``generator`` on its device and are moved there), every (batch, head) in the same calls.

    Non-causal: one group per (batch, head). Causal: HyperAttention's recursion as in sorted_blocks (exact causal
    leaves of ``causal_block`` positions; at every level the off-diagonal quadrants are non-causal kmv groups, with
    the causal block rule), merged by lse. The H1 columns are attended apart (causally) and removed from the rest.
    """
    from .lsh import random_hyperplanes


    shift = leading_padding(key_padding_mask) if num_sink_tokens > 0 else None
    if shift is not None:  # left padding: the sinks must be each row's first real tokens (as in hyper)
        q, k, v, key_padding_mask = move_leading_padding_to_end(q, k, v, key_padding_mask, shift)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Dv = v.shape[3]
    device = q.device
    qf, kf, vf = q.float().contiguous(), k.float().contiguous(), v.float().contiguous()
    valid = torch.ones(B, H, Nk, dtype=torch.bool, device=device) if key_padding_mask is None else \
        key_padding_mask[:, None, :].expand(B, H, Nk)
    idx, sel = heavy_value_columns(vf, valid, gamma=gamma, max_heavy_values=max_heavy_values, causal=causal,
                                   num_sink_tokens=num_sink_tokens)
    h_out = h_lse = None
    if idx.shape[-1] > 0:
        h_out, h_lse = heavy_value_attention(qf, kf, vf, idx, sel, scale=scale, causal=causal)
        removed = torch.zeros(B, H, Nk, dtype=torch.bool, device=device).scatter(2, idx, sel)
        valid = valid & ~removed
    planes = random_hyperplanes(H, D, lsh_num_projs, generator, device)
    params = dict(block_size=block_size, scale=scale, eps=eps, num_samples=num_samples,
                  budget_constant=budget_constant, generator=generator, stats=stats)

    if not causal:
        G = B * H
        q_order = torch.sort(_masked_ranks(qf, planes, None), dim=-1, stable=True).indices.view(G, Nq)
        k_order = torch.sort(_masked_ranks(kf, planes, valid), dim=-1, stable=True).indices.view(G, Nk)
        k_valid_sorted = torch.gather(valid.reshape(G, Nk), 1, k_order)
        base_q = (torch.arange(G, device=device) * Nq)[:, None]
        base_k = (torch.arange(G, device=device) * Nk)[:, None]

        def natural(t: torch.Tensor) -> torch.Tensor:
            return t[:G * Nq].view(G, Nq, *t.shape[1:])

        out, lse = kmv_group_attention(qf.view(G * Nq, D), kf.view(G * Nk, D), vf.view(G * Nk, Dv),
                                       q_rows=q_order + base_q, q_order=q_order, k_rows=k_order + base_k,
                                       k_valid=k_valid_sorted, natural=natural, **params)
        out, lse = out.view(B, H, Nq, Dv), lse.view(B, H, Nq)
    else:
        N = Nq
        m, leaf = causal_levels(N, causal_block)
        Np = leaf << m
        pad = Np - N
        if pad:
            qf, kf, vf = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (qf, kf, vf))
            valid = torch.nn.functional.pad(valid, (0, pad), value=False)
        valid = valid.contiguous()
        nleaf = 1 << m
        leaf_bias = torch.zeros(B, H, Np, device=device).masked_fill_(~valid, NEG_INF).view(B * H * nleaf, leaf)
        out, lse = dense_attention_with_lse(qf.view(B * H * nleaf, leaf, D), kf.view(B * H * nleaf, leaf, D),
                                            vf.view(B * H * nleaf, leaf, Dv), scale, leaf_bias, causal=True)
        empty = valid.view(B * H * nleaf, leaf).cumsum(-1) == 0  # no valid key at or before the query in its leaf
        out, lse = empty_rows_to_zero(out, lse, empty)
        out, lse = out.reshape(B, H, Np, Dv), lse.reshape(B, H, Np)
        ranks_q = _masked_ranks(qf, planes, None)
        ranks_k = _masked_ranks(kf, planes, valid)
        q_flat, k_flat, v_flat = qf.view(-1, D), kf.view(-1, D), vf.view(-1, Dv)
        for level in range(m):
            nseg = 1 << level
            half = Np // (2 * nseg)
            G = B * H * nseg
            seg_base = (torch.arange(B * H, device=device)[:, None] * Np
                        + torch.arange(nseg, device=device)[None, :] * 2 * half).reshape(G, 1)
            rq = ranks_q.view(B, H, nseg, 2, half)[:, :, :, 1].reshape(G, half)
            rk = ranks_k.view(B, H, nseg, 2, half)[:, :, :, 0].reshape(G, half)
            rq_sorted, q_order = torch.sort(rq, dim=-1, stable=True)
            rk_sorted, k_order = torch.sort(rk, dim=-1, stable=True)
            k_valid_sorted = torch.gather(valid.view(B, H, nseg, 2, half)[:, :, :, 0].reshape(G, half), 1, k_order)

            def natural(t: torch.Tensor, nseg=nseg, half=half, G=G) -> torch.Tensor:  # the second half of every segment
                return t[:B * H * Np].view(B, H, nseg, 2, half, *t.shape[1:])[:, :, :, 1].view(G, half, *t.shape[1:])

            o, l_ = kmv_group_attention(q_flat, k_flat, v_flat, q_rows=q_order + seg_base + half, q_order=q_order,
                                        k_rows=k_order + seg_base, k_valid=k_valid_sorted, q_ranks=rq_sorted,
                                        k_ranks_sorted=rk_sorted, natural=natural, **params)
            o, l_ = o.view(B, H, nseg, half, Dv), l_.view(B, H, nseg, half)
            out6, lse5 = out.view(B, H, nseg, 2, half, Dv), lse.view(B, H, nseg, 2, half)
            if needs_grad(out, o):  # rebuild instead of writing into tensors saved for backward
                merged_out, merged_lse = merge_attention(out6[:, :, :, 1], lse5[:, :, :, 1], o, l_)
                out = torch.stack([out6[:, :, :, 0], merged_out], dim=3).reshape(B, H, Np, Dv)
                lse = torch.stack([lse5[:, :, :, 0], merged_lse], dim=3).reshape(B, H, Np)
            else:
                merge_attention_into(out6[:, :, :, 1], lse5[:, :, :, 1], o, l_)
        out, lse = out[:, :, :N], lse[:, :, :N]
    if h_out is not None:
        out, lse = merge_attention_into(out, lse, h_out, h_lse)
    if shift is not None:
        out, lse = restore_leading_padding(out, lse, shift, Nk, causal)
    return out, lse


# ----------------------------------------------------------------------------------------------------------------
# The regime check: Assumption A measured on the layer's input.


def head_tail_estimate(q: torch.Tensor, k: torch.Tensor, scale: float, key_padding_mask: Optional[torch.Tensor],
                       causal: bool, rows: int = 64) -> torch.Tensor:
    """Row-sampled estimate of Assumption A's tail/head ratio of K for every (batch, head) -> [B, H] float64.

    q [B, H, Nq, D], k [B, H, Nk, D]. K_ij = exp(-||x_i - y_j||^2) of Lemma 4.1 (hf_sparse_attn/eval/head_tail.py
    computes the same ratio exactly, on every prefix). Here: ``rows`` query rows evenly spaced, all their
    attendable keys (causal: j <= i, valid keys only); head = the sum of the ``rows`` largest entries of that
    [rows, Nk] block (the n largest of an n-row matrix, scaled to the rows taken), tail = the rest;
    ratio = tail / head. Computed in the log domain, shifted by the block's max (the ratio is scale free)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    r = max(1, min(int(rows), Nq))
    pick = torch.linspace(0, Nq - 1, r, device=q.device).round().long()
    qs = q.detach().float()[:, :, pick]
    kf = k.detach().float()
    if key_padding_mask is not None:  # masked keys must not set the max key norm of the reduction
        kf = kf * key_padding_mask[:, None, :, None].to(kf.dtype)
    x, y, _ = softmax_to_gaussian_kernel(qs, kf, scale)
    dist = (x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1)[..., None, :] - 2 * x @ y.transpose(-1, -2)).clamp_min(0)
    logk = -dist.double()  # [B, H, r, Nk]
    allowed = torch.ones(r, Nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.arange(Nk, device=q.device)[None, :] <= pick[:, None]
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    logk = logk.masked_fill(~allowed, NEG_INF).flatten(2)
    top = logk.amax(-1, keepdim=True)
    vals = torch.exp(logk - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    head = torch.topk(vals, min(r, vals.shape[-1]), dim=-1).values.sum(-1)
    return (vals.sum(-1) - head) / head.clamp_min(1e-300)


def kmv_check(q: torch.Tensor, k: torch.Tensor, causal: bool, key_padding_mask: Optional[torch.Tensor],
              params: dict, scale: Optional[float] = None) -> Optional[str]:
    """Why kmv should not serve this call (None when it can): a call that is not self-attention (q_len != kv_len: the
    adapter's decision sends those to exact attention before it asks this check; a direct call gets the same words),
    or Assumption A violated on this input: the estimated tail/head ratio (head_tail_estimate) of some head above
    ``max_head_tail`` (0 = no check). ``scale``: the call's softmax scale (1/sqrt(D) when not given)."""
    reason = self_attention_only(q, k)
    if reason:
        return reason
    bound = float(params.get("max_head_tail", MAX_HEAD_TAIL))
    if bound <= 0:
        return None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ratio = float(head_tail_estimate(q, k, scale, key_padding_mask, causal, int(params.get("check_rows", 64))).max())
    if not ratio <= bound:
        return (f"kmv: out of Assumption A's regime (tail/head ratio of K ~ {ratio:.3g} > max_head_tail={bound:g} "
                f"on this input)")
    return None


def kmv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    eps: float = 0.1,
    alpha: float = 1.0 / 3.0,
    gamma: float = 0.109,
    lsh_bucket_width: float = 2.0,
    lsh_num_projs: int = 0,
    lsh_num_tables: int = 0,
    lsh_table_factor: float = 1.0,
    budget: str = "variance",
    num_samples: int = 32,
    budget_constant: float = 2.0,
    median_groups: int = 1,
    split_signs: bool = False,
    causal_block: int = 2048,
    seed: int = 0,
    min_seq_len: int = 4096,
    engine: str = "blocks",
    block_size: int = 256,
    max_heavy_values: int = 64,
    num_sink_tokens: int = NUM_SINK_TOKENS,
    max_head_tail: float = MAX_HEAD_TAIL,
    check_rows: int = 64,
    stats: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as (K V) / (K 1) through APPROXKMV (module docstring). Shapes as the method contract.

    ``engine="blocks"`` (default): :func:`kmv_blocks_attention`, every head batched on q's device (docs/methods/kmv.md);
    it reads eps, gamma, lsh_num_projs (0 = 7 hyperplanes), block_size, num_samples, budget_constant,
    max_heavy_values, num_sink_tokens and causal_block (the exact causal leaf). ``engine="reference"``: the faithful
    Algorithms 1-3 per (batch, head) on CPU tensors (the rest of the parameters). ``max_head_tail`` / ``check_rows``
    are read by the adapter's check only (:func:`kmv_check`). ``stats`` (blocks): key slots each part computed.
    ``min_seq_len`` is read by the adapter's decision only (exact attention for calls with fewer keys); a direct call
    always runs the method. Deterministic given ``generator`` (else ``seed``).
    """
    check_inputs(q, k, v, causal, key_padding_mask)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if engine not in ENGINES:
        raise ValueError(f"kmv: engine must be one of {list(ENGINES)}, got {engine!r}")
    if scale <= 0:
        raise ValueError(f"kmv needs a positive scale (Lemma 4.1), got {scale}")
    if engine == "blocks":
        if block_size < 1 or num_samples < 0 or max_heavy_values < 0 or num_sink_tokens < 0:
            raise ValueError(f"kmv blocks: block_size must be >= 1, num_samples, max_heavy_values and num_sink_tokens "
                             f">= 0; got {block_size}, {num_samples}, {max_heavy_values}, {num_sink_tokens}")
        # sizes past the number of keys run as that number (same output; memory and time follow the input)
        block_size, num_samples = min(block_size, max(Nq, Nk)), min(num_samples, Nk)
        max_heavy_values, num_sink_tokens = min(max_heavy_values, Nk), min(num_sink_tokens, Nk)
        out, lse = kmv_blocks_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                        generator=make_generator(generator, seed), eps=eps, gamma=gamma,
                                        lsh_num_projs=lsh_num_projs or 7, block_size=block_size,
                                        num_samples=num_samples, budget_constant=budget_constant,
                                        max_heavy_values=max_heavy_values, num_sink_tokens=num_sink_tokens,
                                        causal_block=causal_block, stats=stats)
        return out.to(q.dtype), lse
    params = dict(eps=eps, alpha=alpha, gamma=gamma, lsh_bucket_width=lsh_bucket_width, lsh_num_projs=lsh_num_projs,
                  lsh_num_tables=lsh_num_tables, lsh_table_factor=lsh_table_factor, budget=budget,
                  num_samples=num_samples, budget_constant=budget_constant, median_groups=median_groups,
                  split_signs=split_signs)
    gen = make_generator(generator, seed)
    if gen.device.type != "cpu":  # sampling runs on CPU tensors
        gen = make_generator(None, int(torch.randint(0, 1 << 30, (1,), generator=gen, device=gen.device)))
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float32)
    lse = torch.full((B, H, Nq), float("-inf"), dtype=torch.float32)
    for b in range(B):
        valid = key_padding_mask[b].cpu() if key_padding_mask is not None else torch.ones(Nk, dtype=torch.bool)
        for h in range(H):
            qh, kh, vh = q[b, h].float().cpu(), k[b, h].float().cpu(), v[b, h].float().cpu()
            if causal:
                out[b, h], lse[b, h] = _kmv_causal_head(qh, kh, vh, valid, scale, params, gen, causal_block)
            else:
                out[b, h], lse[b, h] = _kmv_attention_head(qh, kh[valid], vh[valid], scale, params, gen)
    return out.to(device=q.device, dtype=q.dtype), lse.to(q.device)


register_method(
    "kmv",
    kmv_attention,
    params={
        "eps": Param(kind=float, low=1e-4, high=1.0, help="per-row error target relative to the row (A.1.4: error/||v||)"),
        "alpha": Param(kind=float, low=0.0, high=100.0, help="heavy threshold K_ij >= n^-alpha (paper 1/3)"),
        "gamma": Param(kind=float, low=0.0, high=1.0, help="value rows with ||x_j||^2 >= n^gamma computed exactly (paper 0.109)"),
        "lsh_bucket_width": Param(kind=float, low=0.1, help="E2LSH bucket width in units of r_near = sqrt(alpha ln n)"),
        "lsh_num_projs": Param(kind=int, low=0, high=64, help="hashes per table; 0 = collision prob ~ n^-alpha at r_near (Lemma 2.1)"),
        "lsh_num_tables": Param(kind=int, low=0, high=2**16, help="LSH repetitions; 0 = ceil(lsh_table_factor * n^alpha * ln n)"),
        "lsh_table_factor": Param(kind=float, low=0.0, high=1000.0, help="paper: 10 (T = 10 n^alpha log n)"),
        "budget": Param(kind=str, choices=("variance", "two_level", "kde"), help="per-row sample budget rule"),
        "num_samples": Param(kind=int, low=0, high=MAX_TOKENS, help="pilot samples per row (the base budget); blocks: 0 = no light-key samples"),
        "budget_constant": Param(kind=float, low=0.01, help="m_i = constant * variance_i / tol_i^2 (paper: 10)"),
        "median_groups": Param(kind=int, low=1, high=64, help="median of this many independent estimates (paper: 10 log n)"),
        "split_signs": Param(kind=bool, help="run V+ and V- separately instead of the signed estimator"),
        "causal_block": Param(kind=int, low=16, high=MAX_TOKENS, help="causal recursion: exact attention at or below this many keys (the leaf size)"),
        "seed": Param(kind=int, low=0, help="seed when no generator is given"),
        "min_seq_len": Param(kind=int, low=0, high=MAX_TOKENS, help="below this many keys: exact attention"),
        "engine": Param(kind=str, choices=ENGINES,
                        help="'blocks': sorted-LSH blocks + exact heavy value columns + variance-budgeted samples, all heads "
                             "batched on the input's device; 'reference': the faithful Algorithms 1-3, per head on CPU"),
        "block_size": Param(kind=int, low=1, high=MAX_TOKENS, help="blocks: queries per sorted LSH block (its key block = the heavy-key candidates)"),
        "max_heavy_values": Param(kind=int, low=0, high=MAX_TOKENS, help="blocks: at most this many heavy value rows (H1) per head, exact columns"),
        "num_sink_tokens": Param(kind=int, low=0, high=MAX_TOKENS,
                                 help="blocks: the first real keys also attended as exact columns, like H1 (attention sinks; "
                                      "left padding skipped)"),
        "max_head_tail": Param(kind=float, low=0.0,
                               help="regime check: exact attention when the estimated tail/head ratio of K (Assumption A) "
                                    "exceeds this on some head; 0 = no check"),
        "check_rows": Param(kind=int, low=1, high=MAX_TOKENS, help="regime check: query rows sampled to estimate the tail/head ratio"),
    },
    check=kmv_check,
    min_seq_len_param="min_seq_len",
    source="Indyk, Kapralov, Sheth, Wagner, Algorithms 1-3, Definition 3.1, Lemmas 3.2-3.5, 4.1, A.1.4",
    summary="attention as Gaussian-kernel matrix-vector products: exact heavy values, LSH heavy keys, sampled light keys",
)


def heavy_key_found(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, *,
                    lsh_num_projs: int = 7, block_size: int = 256, key_padding_mask: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None, seed: int = 0) -> torch.Tensor:
    """Whether the non-causal blocks engine attends the pair (query_index[p], key_index[p]) exactly, in its key block:
    Lemma 3.4's "every heavy key is found" becomes "found with the LSH's probability", measured with this.

    q [B, H, Nq, D], k [B, H, Nk, D]; query_index, key_index [B, H, P] int64. Returns found [B, H, P] bool. The
    hashes are drawn as ``kmv_blocks_attention`` draws them from the same generator (H1 removal not applied: pass
    keys that are not heavy value rows, or read found as "before the H1 split")."""
    from .lsh import random_hyperplanes

    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    gen = make_generator(generator, seed)
    planes = random_hyperplanes(H, D, lsh_num_projs, gen, q.device)
    valid = None if key_padding_mask is None else key_padding_mask[:, None, :].expand(B, H, Nk)
    q_order = torch.sort(_masked_ranks(q.float(), planes, None), dim=-1, stable=True).indices
    k_order = torch.sort(_masked_ranks(k.float(), planes, valid), dim=-1, stable=True).indices
    q_pos = torch.empty_like(q_order).scatter_(-1, q_order, torch.arange(Nq, device=q.device).expand_as(q_order))
    k_pos = torch.empty_like(k_order).scatter_(-1, k_order, torch.arange(Nk, device=q.device).expand_as(k_order))
    bq = min(block_size, Nq)
    bk = -(-Nk // -(-Nq // bq))
    return torch.gather(q_pos, -1, query_index) // bq == torch.gather(k_pos, -1, key_index) // bk
