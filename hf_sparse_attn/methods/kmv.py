"""Kernel matrix-vector products under sparsity assumptions (Indyk, Kapralov, Sheth & Wagner),
Algorithms 1-3 (APPROXKMV = pre-processing + FINDHEAVY + APPROXLIGHT) and the Lemma 4.1 reduction.

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
from .exact import exact_attention
from .gaussian_kernel import softmax_to_gaussian_kernel
from .lsh import make_generator
from .merge import merge_attention
from .registry import Param, needs_grad, register_method

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
    causal_block: int = 1024,
    seed: int = 0,
    min_seq_len: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as (K V) / (K 1) through APPROXKMV (module docstring). Shapes as the method contract.

    Below ``min_seq_len`` keys: exact attention. Deterministic given ``generator`` (else ``seed``).
    """
    check_inputs(q, k, v, causal, key_padding_mask)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if Nk < min_seq_len:
        return exact_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    if scale <= 0:
        raise ValueError(f"kmv needs a positive scale (Lemma 4.1), got {scale}")
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
        "eps": Param(0.1, float, low=1e-4, high=1.0, help="per-row error target relative to the row (A.1.4: error/||v||)"),
        "alpha": Param(1.0 / 3.0, float, low=0.0, high=100.0, help="heavy threshold K_ij >= n^-alpha (paper 1/3)"),
        "gamma": Param(0.109, float, low=0.0, high=1.0, help="value rows with ||x_j||^2 >= n^gamma computed exactly (paper 0.109)"),
        "lsh_bucket_width": Param(2.0, float, low=0.1, help="E2LSH bucket width in units of r_near = sqrt(alpha ln n)"),
        "lsh_num_projs": Param(0, int, low=0, high=64, help="hashes per table; 0 = collision prob ~ n^-alpha at r_near (Lemma 2.1)"),
        "lsh_num_tables": Param(0, int, low=0, help="LSH repetitions; 0 = ceil(lsh_table_factor * n^alpha * ln n)"),
        "lsh_table_factor": Param(1.0, float, low=0.0, help="paper: 10 (T = 10 n^alpha log n)"),
        "budget": Param("variance", str, choices=("variance", "two_level", "kde"), help="per-row sample budget rule"),
        "num_samples": Param(32, int, low=2, help="pilot samples per row (the base budget)"),
        "budget_constant": Param(2.0, float, low=0.01, help="m_i = constant * variance_i / tol_i^2 (paper: 10)"),
        "median_groups": Param(1, int, low=1, high=64, help="median of this many independent estimates (paper: 10 log n)"),
        "split_signs": Param(False, bool, help="run V+ and V- separately instead of the signed estimator"),
        "causal_block": Param(1024, int, low=16, help="causal recursion: exact attention at or below this many keys"),
        "seed": Param(0, int, low=0, help="seed when no generator is given"),
        "min_seq_len": Param(4096, int, low=0, help="below this many keys: exact attention"),
    },
    source="Indyk, Kapralov, Sheth, Wagner, Algorithms 1-3, Definition 3.1, Lemmas 3.2-3.5, 4.1, A.1.4",
    summary="attention as Gaussian-kernel matrix-vector products: exact heavy values, LSH heavy keys, sampled light keys",
)
