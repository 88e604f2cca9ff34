"""Polynomial-method low-rank attention (Alman & Song, "Fast Attention Requires Bounded Entries").

Algorithm 1 (POLYATTENTION) with Lemmas 3.2-3.6 and Corollary 2.2, written for the method contract.

1. Bound the scores. Every score x_ij = scale * <q_i, k_j> lies in [-R, R] with

       R = min(scale * max_i ||q_i|| * max_j ||k_j||,  scale * D * max|Q| * max|K|)

   (Cauchy-Schwarz, and Lemma 3.3: |<q, k>| <= D ||Q||_inf ||K||_inf). In the paper's normalisation
   (scale = 1/D, entries of Q, K in [-B, B]) R = B^2, so we report B = sqrt(R).

2. Polynomial (Corollary 2.2). A degree-g polynomial P with |P(x) - e^(x-R)| <= eps * e^(x-R) on [-R, R]. The
   paper shifts by R and asks for additive error eps on [0, 2R] (Lemma 2.1), i.e. additive error eps * e^-R on
   [-R, R], which is what a relative bound needs at the left end. We take the Chebyshev interpolant of the
   shifted e^(x-R) on [-R, R] (near-minimax for analytic functions), convert it to monomial coefficients
   c_0..c_g in x, and pick the smallest g whose *measured* relative error on a 4001-point grid (float64) is
   <= eps. The measured value is eps_A of Lemma 3.6. Since eps < 1, P > 0 on [-R, R]: every denominator is
   positive. The shift keeps P in (0, 1 + eps] and its coefficients representable in float32 for any R (e^x
   itself would need coefficients near e^R, which overflow float32 from R ~ 88: real LLM scores reach that).

3. Feature maps (Lemma 3.2, with a smaller r). P(<u, v>) = sum_t c_t <u, v>^t and, by the multinomial
   theorem, <u, v>^t = sum_{|a| = t} (t! / prod_l a_l!) u^a v^a over multi-indices a in N^D. So

       phi_q(u) = [c_t * multinom(a) * u^a]_{t <= g, |a| = t},   phi_k(v) = [v^a]_{t <= g, |a| = t}

   give P(<u, v>) = <phi_q(u), phi_k(v)> with r = sum_t C(D+t-1, t) = C(D+g, g) features (the symmetric
   tensor power; the paper's r = C(2(g+D), 2g) counts monomials in u and v jointly and is never formed).
   We use u = sqrt(scale) q, v = sqrt(scale) k so that <u, v> = scale <q, k>.

4. Attention (Algorithm 1 lines 7-11): with U1 = phi_q(Q), U2 = phi_k(K) [N, r],

       w = U1 (U2^T 1)          (D~, Lemma 3.5: |D~_ii - D_ii| <= eps_A D_ii)
       T = diag(w)^-1 U1 (U2^T V)

   and Lemma 3.6 gives ||T - D^-1 A V||_inf <= (eps_A + eps_D) ||V||_inf <= 2 eps_A ||V||_inf.
   lse = log(w) + R because P approximates e^(x-R) (the shift cancels in T).

Causal attention is a chunked prefix sum: keys are taken in chunks of ``chunk_size``; a query in chunk c gets
U1_i S_{<c} from the running state S = sum_{j in earlier chunks} U2_j^T [v_j, 1] (r x (Dv+1)) plus the
in-chunk part, evaluated as P(scale q_i.k_j) on the chunk's own c x c score block under the causal mask (the
same numbers as the features give, with less rounding). Time O(N r Dv + N chunk D), memory O(chunk r + r Dv).

Complexity: O(N r (D + Dv)) time, O(N r) memory per (batch, head) with r = C(D+g, g). It is cheaper than exact
attention only when r << N: small head dims and scores of small range (Theorem 3.8: D = O(log n),
B = o(sqrt(log n))). For D = 64 only g <= 2 fits (r = 2145); for D = 8, g = 6 gives r = 3003.

Regime (Theorem 3.7): the ``check`` hook measures R, finds the degree eps needs, and returns a reason (the
adapter then runs exact attention and the plan records it) when r would exceed ``max_features`` or would not
be smaller than N. ``allow_out_of_regime=True`` runs anyway with the largest degree that fits, without the
guarantee. Rows whose approximate denominator is not positive (possible only out of regime or by rounding)
are recomputed exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import numpy as np
import torch

from .common import check_inputs
from .merge import needs_grad
from .registry import MAX_TOKENS, Param, register_method

MAX_DEGREE = 24
# Upper bound of max_features: r features hold a [r, Dv + 1] state per head (~270 MB at r = 2^20, Dv = 64). The
# features are the exact expansion of the polynomial, so r is not capped at the input size (an accuracy test may
# need r > N on a short input); through a model the adapter already runs exact attention whenever r >= N.
MAX_FEATURES = 2**20
_GRID_POINTS = 4001


def num_features(head_dim: int, degree: int) -> int:
    """r = C(D + g, g): the number of monomials of degree <= g in D variables (Lemma 3.2, symmetric form)."""
    return math.comb(head_dim + degree, degree)


def score_bound(q: torch.Tensor, k: torch.Tensor, scale: float, key_padding_mask: Optional[torch.Tensor] = None) -> float:
    """R with |scale * q_i.k_j| <= R for all pairs (step 1 of the module docstring). q [..., Nq, D], k [..., Nk, D]."""
    qf, kf = q.detach().float(), k.detach().float()
    if key_padding_mask is not None:  # masked keys never enter a score
        kf = kf * key_padding_mask[:, None, :, None].to(kf.dtype)
    if qf.numel() == 0 or kf.numel() == 0:
        return 0.0
    cauchy = scale * float(qf.norm(dim=-1).amax()) * float(kf.norm(dim=-1).amax())
    entrywise = scale * q.shape[-1] * float(qf.abs().amax()) * float(kf.abs().amax())  # Lemma 3.3
    return min(cauchy, entrywise)


@functools.lru_cache(maxsize=256)
def exp_polynomial(bound: float, degree: int) -> tuple[tuple[float, ...], float]:
    """Monomial coefficients (c_0..c_g) of the Chebyshev interpolant P of the shifted exponential e^(x - bound) on
    [-bound, bound] (the shift of Lemma 2.1) and its measured max relative error max |P(x) e^(bound - x) - 1| on a
    4001-point grid (float64). Shifted, P takes values in (0, 1] and its coefficients stay representable in float32
    for any score range (unshifted they grow like e^bound and overflow float32 from bound ~ 88); callers add
    ``bound`` back to lse."""
    bound = max(float(bound), 1e-6)
    cheb = np.polynomial.Chebyshev.interpolate(lambda x: np.exp(x - bound), degree, domain=[-bound, bound])
    poly = cheb.convert(kind=np.polynomial.Polynomial, domain=[-1, 1], window=[-1, 1])
    coef = np.zeros(degree + 1)
    coef[: len(poly.coef)] = poly.coef
    grid = np.linspace(-bound, bound, _GRID_POINTS)
    values = np.polynomial.polynomial.polyval(grid, coef)
    if np.any(values <= 0):  # P must stay positive to be a relative approximation (out of regime it need not)
        return tuple(float(c) for c in coef), float("inf")
    with np.errstate(over="ignore"):  # log space: e^(bound - x) alone overflows float64 from bound ~ 355
        rel_err = float(np.max(np.abs(np.expm1(np.log(values) - (grid - bound)))))
    return tuple(float(c) for c in coef), rel_err


def choose_degree(bound: float, eps: float, head_dim: int, max_features: int) -> tuple[int, float, bool]:
    """Smallest degree g whose polynomial has relative error <= eps on [-bound, bound].

    Returns (g, its measured relative error, in_regime). If no g with C(D+g, g) <= max_features reaches eps,
    returns the largest g that fits and in_regime=False.
    """
    best = 0
    for degree in range(1, MAX_DEGREE + 1):
        if num_features(head_dim, degree) > max_features:
            break
        best = degree
        _, err = exp_polynomial(bound, degree)
        if err <= eps:
            return degree, err, True
    if best == 0:
        return 0, float("inf"), False
    return best, exp_polynomial(bound, best)[1], False


def poly_regime(q: torch.Tensor, k: torch.Tensor, scale: float, eps: float, max_features: int,
                key_padding_mask: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """What Theorem 3.7 says about this input: R (score range), B = sqrt(R), the degree and r that eps needs,
    and whether that fits (``in_regime``). Also sqrt(log n), the B threshold of Theorems 1.3/1.4, for reference."""
    bound = score_bound(q, k, scale, key_padding_mask)
    degree, err, fits = choose_degree(bound, eps, q.shape[-1], max_features)
    n = k.shape[-2]
    return {
        "score_bound": bound, "B": math.sqrt(bound), "sqrt_log_n": math.sqrt(math.log(max(n, 2))),
        "degree": degree, "num_features": num_features(q.shape[-1], degree) if degree else 0,
        "rel_error": err, "in_regime": fits, "seq_len": n,
    }


@functools.lru_cache(maxsize=64)
def _monomial_tables(head_dim: int, degree: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per degree t = 1..g: (parent index into degree t-1 block, new variable index, multinomial coefficient).

    Monomials of degree t are non-decreasing index tuples (i_1 <= ... <= i_t); each is its degree t-1 prefix
    times x[i_t]. multinom = t! / prod_l a_l!, built as multinom(parent) * t / a_{i_t}.
    """
    tables = []
    prev_last = [0]  # degree 0: the empty monomial; "last index" 0 lets every variable follow it
    prev_mult = [0]  # multiplicity of the last index in the monomial
    prev_coef = [1.0]
    for t in range(1, degree + 1):
        parents, variables, coefs, lasts, mults = [], [], [], [], []
        for p, (last, mult, coef) in enumerate(zip(prev_last, prev_mult, prev_coef)):
            for var in range(last, head_dim):
                m = mult + 1 if (t > 1 and var == last) else 1
                parents.append(p)
                variables.append(var)
                coefs.append(coef * t / m)
                lasts.append(var)
                mults.append(m)
        tables.append((torch.tensor(parents), torch.tensor(variables), torch.tensor(coefs, dtype=torch.float64)))
        prev_last, prev_mult, prev_coef = lasts, mults, coefs
    return tables


def polynomial_features(x: torch.Tensor, degree: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """phi(x) [N, r]: all monomials of degree <= g of the rows of x [N, D] (float32), r = C(D+g, g).

    ``weights`` [r] (float64) multiplies the columns (c_t * multinom(a) on the query side)."""
    blocks = [torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)]
    for parents, variables, _ in _monomial_tables(x.shape[1], degree):
        blocks.append(blocks[-1][:, parents.to(x.device)] * x[:, variables.to(x.device)])
    feats = torch.cat(blocks, dim=1)
    if weights is not None:
        feats.mul_(weights.to(device=x.device, dtype=x.dtype))
    return feats


def query_weights(head_dim: int, coef: tuple[float, ...]) -> torch.Tensor:
    """[r] float64: c_t * multinom(a) for every monomial a of degree t (the query-side feature weights)."""
    parts = [torch.tensor([coef[0]], dtype=torch.float64)]
    for t, (_, _, multinom) in enumerate(_monomial_tables(head_dim, len(coef) - 1), start=1):
        parts.append(multinom * coef[t])
    return torch.cat(parts)


def _horner(x: torch.Tensor, coef: tuple[float, ...]) -> torch.Tensor:
    """P(x) = sum_t coef[t] x^t elementwise (Horner; in place unless autograd needs the gradient of x)."""
    out = torch.full_like(x, coef[-1])
    grad = needs_grad(x)
    for c in reversed(coef[:-1]):
        out = out * x + c if grad else out.mul_(x).add_(c)
    return out


def _exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, scale: float, causal: bool,
                key_valid: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention for the query rows ``rows`` of one head. q [N, D], k/v [Nk, D] float32 -> ([m, Dv], [m])."""
    scores = (q[rows] @ k.T) * scale
    if key_valid is not None:
        scores.masked_fill_(~key_valid[None, :], float("-inf"))
    if causal:
        scores.masked_fill_(torch.arange(k.shape[0], device=q.device)[None, :] > rows[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(scores - safe[:, None]) @ v, lse


def poly_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    eps: float = 0.01,
    degree: int = 0,
    max_features: int = 4096,
    chunk_size: int = 256,
    allow_out_of_regime: bool = False,
    min_seq_len: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alman & Song Algorithm 1. q [B, H, Nq, D], k/v [B, H, Nk, D(v)], key_padding_mask [B, Nk] -> (out, lse).

    eps: target relative error of P on the measured score range (degree 0 = smallest degree reaching it).
    degree: a fixed degree instead (refused with ValueError if C(D+degree, degree) > max_features).
    Deterministic: ``generator`` is unused (no randomness). ``min_seq_len`` is read by the adapter's decision only
    (exact attention for calls with fewer keys); a direct call always runs the method.
    """
    check_inputs(q, k, v, causal, key_padding_mask)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    chunk_size = max(1, min(int(chunk_size), Nk))  # one chunk of N or more keys is the whole prefix: as chunk N
    if degree:
        r = num_features(D, degree)
        if r > max_features:
            raise ValueError(f"poly: degree {degree} needs r = C({D}+{degree}, {degree}) = {r} features per token, above "
                             f"max_features={max_features} (memory N*r floats per head); lower the degree or raise "
                             f"max_features")
        bound = score_bound(q, k, scale, key_padding_mask)
        coef, _ = exp_polynomial(bound, degree)
    else:
        bound = score_bound(q, k, scale, key_padding_mask)
        degree, err, fits = choose_degree(bound, eps, D, max_features)
        if degree == 0:
            raise ValueError(f"poly: even degree 1 needs r = {D + 1} features > max_features={max_features}")
        if not fits and not allow_out_of_regime:
            raise ValueError(
                f"poly: scores span [-{bound:.3g}, {bound:.3g}] (B = {math.sqrt(bound):.3g}); relative error eps={eps} needs "
                f"a degree whose r = C({D}+g, g) exceeds max_features={max_features} (best degree {degree} reaches "
                f"{err:.3g}). This input is outside Theorem 3.7's bounded-entry regime: use exact attention, a larger "
                f"eps, or allow_out_of_regime=True")
        coef, _ = exp_polynomial(bound, degree)

    qw = query_weights(D, coef)
    root = math.sqrt(scale)
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    r = qw.numel()
    rows_per_chunk = max(1, min(Nq, (1 << 18) // max(r, 1)))  # <= 1 MB of features at a time: stays in cache, so time is linear in N
    for b in range(B):
        key_valid = key_padding_mask[b] if key_padding_mask is not None else None
        for h in range(H):
            qh, kh, vh = q[b, h].float(), k[b, h].float(), v[b, h].float()
            v1 = torch.cat([vh, torch.ones_like(vh[:, :1])], dim=1)  # [Nk, Dv+1]: A V and A 1 together
            if key_valid is not None:
                v1 = v1 * key_valid[:, None].to(v1.dtype)
            if causal:
                num = _causal_numerator(qh * root, kh * root, v1, coef, qw, chunk_size, key_valid)
            else:
                state = torch.zeros(r, v1.shape[1], dtype=torch.float32, device=q.device)
                for start in range(0, Nk, rows_per_chunk):
                    stop = min(Nk, start + rows_per_chunk)
                    state += polynomial_features(kh[start:stop] * root, degree).T @ v1[start:stop]
                num = torch.cat([polynomial_features(qh[s:s + rows_per_chunk] * root, degree, qw) @ state
                                 for s in range(0, Nq, rows_per_chunk)])
            den = num[:, -1]
            has_key = _rows_with_keys(Nq, causal, key_valid, q.device)
            good = has_key & (den > 0)
            out[b, h] = torch.where(good[:, None], num[:, :-1] / den.clamp_min(1e-30)[:, None], torch.zeros_like(num[:, :-1]))
            lse[b, h] = torch.where(good, den.clamp_min(1e-30).log() + bound, lse[b, h])
            bad = (has_key & ~good).nonzero().flatten()
            if bad.numel():  # out of regime or rounding: exact for these rows only
                out[b, h, bad], lse[b, h, bad] = _exact_rows(qh, kh, vh, bad, scale, causal, key_valid)
    return out.to(q.dtype), lse


def _rows_with_keys(n: int, causal: bool, key_valid: Optional[torch.Tensor], device) -> torch.Tensor:
    """[n] bool: query rows that attend at least one key."""
    if key_valid is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if causal:
        return torch.cumsum(key_valid.long(), 0)[:n] > 0
    return torch.full((n,), bool(key_valid.any()), dtype=torch.bool, device=device)


def _causal_numerator(u: torch.Tensor, w: torch.Tensor, v1: torch.Tensor, coef: tuple[float, ...], qw: torch.Tensor,
                      chunk_size: int, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Chunked prefix sums. u [N, D] = sqrt(s) q, w [N, D] = sqrt(s) k, v1 [N, Dv+1] (masked keys zeroed) -> [N, Dv+1]."""
    n = u.shape[0]
    degree = len(coef) - 1
    state = torch.zeros(qw.numel(), v1.shape[1], dtype=torch.float32, device=u.device)
    num = torch.empty(n, v1.shape[1], dtype=torch.float32, device=u.device)
    tri = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=u.device).tril()
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        c = stop - start
        inner = _horner(u[start:stop] @ w[start:stop].T, coef).masked_fill(~tri[:c, :c], 0.0)  # P(s q.k), j <= i
        num[start:stop] = polynomial_features(u[start:stop], degree, qw) @ state + inner @ v1[start:stop]
        # out of place: the matmul above saved this chunk's state for backward
        state = state + polynomial_features(w[start:stop], degree).T @ v1[start:stop]
    return num


def poly_check(q: torch.Tensor, k: torch.Tensor, causal: bool, key_padding_mask: Optional[torch.Tensor],
               params: dict[str, Any], scale: Optional[float] = None) -> Optional[str]:
    """Why ``poly`` should not serve this call (outside Theorem 3.7's regime, or no speed-up), else None.
    ``scale``: the call's softmax scale (1/sqrt(D) when not given)."""
    D, n = q.shape[-1], k.shape[-2]
    max_features = int(params.get("max_features", 4096))
    if params.get("degree"):
        r = num_features(D, int(params["degree"]))
        if r > max_features:
            return f"poly: degree {params['degree']} needs r={r} > max_features={max_features}"
    else:
        scale = D ** -0.5 if scale is None else scale
        info = poly_regime(q, k, scale, float(params.get("eps", 0.01)), max_features, key_padding_mask)
        if not info["in_regime"] and not params.get("allow_out_of_regime", False):
            return (f"poly: out of Theorem 3.7 regime (scores within +-{info['score_bound']:.3g}, B={info['B']:.3g}; "
                    f"eps={params.get('eps', 0.01)} needs r > max_features={max_features})")
        r = info["num_features"]
    if r >= n:
        return f"poly: r={r} features >= seq_len={n}: no speed-up over exact"
    return None


register_method(
    "poly",
    poly_attention,
    params={
        "eps": Param(kind=float, low=1e-8, high=0.5, help="relative error of the exp polynomial on the measured score range"),
        "degree": Param(kind=int, low=0, high=MAX_DEGREE, help="fixed polynomial degree; 0 = smallest reaching eps"),
        "max_features": Param(kind=int, low=1, high=MAX_FEATURES,
                              help="largest r = C(D+g, g) allowed (memory ~ r (Dv + 1) floats per head)"),
        "chunk_size": Param(kind=int, low=1, high=MAX_TOKENS, help="causal: keys per prefix-sum chunk"),
        "allow_out_of_regime": Param(kind=bool, help="run with the largest degree that fits even when eps cannot be met"),
        "min_seq_len": Param(kind=int, low=0, high=MAX_TOKENS, help="below this many keys: exact attention"),
    },
    check=poly_check,
    min_seq_len_param="min_seq_len",
    source="Alman & Song, Algorithm 1, Lemmas 3.2-3.6, Corollary 2.2",
    summary="low-rank attention from a degree-g polynomial of exp with explicit symmetric-tensor features",
)
