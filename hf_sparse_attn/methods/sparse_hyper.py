"""``sparse_hyper``: Sparse HyperAttention ("Attention is Naturally Sparse with Gaussian Distributed Input", Algorithm 1 and §5.1), written from the paper.

The algorithm keeps HyperAttention's sortLSH and its block diagonal (sorted_blocks.py) and drops the sampled
residual / sketch: the "Attention is Naturally Sparse" paper proves that attention rows are (eps, k)-sparse with high probability (Theorem 4.7
/ D.1), so the output of query i is taken from its sorted block alone,

    y~_i = sum_{j in S_i} e^{s_ij} v_j / D~_i,    D~_i = sum_{j in S_i} e^{s_ij},   s_ij = scale * q_i . k_j,

and multiplied by the scale coefficient of Definitions 5.2-5.3 (formulas lost in our copy of the paper's text;
reconstructed, full derivation in docs/methods/hyper.md):

  Definition 5.2 (error estimate). Under the paper's model (LayerNorm'd Gaussian inputs, Gaussian weights) the
  scores of row i are Gaussian, s_ij ~ N(mu_i, sigma_i^2), with sigma_i^2 = scale^2 q_i^T Sigma_K q_i (Sigma_K:
  covariance of the keys; sigma grows with the weight norm R of Definition 4.2). With n_i attendable keys and
  k_i of them kept, the expected softmax mass outside the top k_i entries is (Theorem 4.7's threshold
  argument with the exact Gaussian tail, tau = the (1 - k/n) quantile):

      eps_i = n E[e^s 1{s < tau}] / (n E[e^s]) = Phi(Phi^{-1}(1 - k_i / n_i) - sigma_i)   (0 when k_i >= n_i).

  Definition 5.3 (scale coefficient). The block keeps a mass fraction c_i = D~_i / D_i <= 1 - eps_i (it keeps
  at most the top-k mass). The exact output is y_i = c_i y~_i + (1 - c_i) y_rest with E[y_rest] = 0 under the
  model (zero-mean values independent of the scores), so the estimate alpha_i y~_i with

      alpha_i = 1 - eps_i,   i.e.  D^_i = D~_i / alpha_i  (a lower bound on D_i: "estimating a lower bound on D")

  has error (c - alpha)^2 |y~|^2 + (1 - c)^2 E|y_rest|^2 <= (1 - c)^2 (|y~|^2 + E|y_rest|^2), the unscaled error,
  because c <= alpha <= 1. The returned lse is log D^_i = log D~_i - log alpha_i, consistent with ``out``.

Causal: the HyperAttention recursion (diagonal halves causal, off-diagonal quadrant non-causal, exact leaves of
<= min_seq_len) with sample_size 0; k_i is the number of keys query i kept over its leaf and its quadrant
blocks, n_i the number of keys j <= i it may attend; the scale is applied once to the merged result.
The "Attention is Naturally Sparse" paper's Algorithm 1 is stated non-causal; this is our extension. For causal rows sigma_i comes from the
covariance of the keys in the 256-position chunks before query i's chunk (score_std_causal), so no future key
influences a past row.

Attention sinks (``num_sink_tokens`` = S, as in hyper.py): keys 0..S-1 (a left-padded row's first S real tokens)
are attended exactly by every query and removed from the sorted blocks. The theory scale is applied to the block part alone, before the lse merge with the
sinks: k_i, n_i count the non-sink keys and sigma_i comes from them. The Gaussian model describes the bulk of a row's
scores, not a sink; under it the unseen bulk mass is D~_b (1/alpha - 1) with zero-mean values, so
    y = (D_s y_s + D~_b y~_b) / (D_s + D~_b / alpha),
which is the lse merge of (y_s, log D_s) with (alpha y~_b, log D~_b - log alpha).

Tensors: q [B, H, Nq, D], k/v [B, H, Nk, D], key_padding_mask [B, Nk] bool (True = attend); out [B, H, Nq, D]
in q's dtype, lse [B, H, Nq] float32 (-inf and out 0 for a row with no key).
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import check_inputs
from .defaults import BLOCK_SIZE, CAUSAL_MIN_SEQ_LEN, CAUSAL_MODE, CAUSAL_MODES, MIN_SEQ_LEN, NUM_SINK_TOKENS
from .hyper import HYPER_PARAMS, WINDOW, check_sorted_lsh
from .lsh import make_generator
from .registry import Param, register_method
from ..kernels.workspace import workspace
from .causal_recursion import sorted_lsh_attention
from .padding import leading_padding, move_leading_padding_to_end
from .single_pass import single_pass_causal_attention
from .sinks import add_sinks_and_restore, split_sink_keys



def score_std(q: torch.Tensor, k: torch.Tensor, scale: float, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """sigma_i = std over keys j of scale * q_i . k_j, from the key covariance: [B, H, Nq] float32.

    q [B, H, Nq, D], k [B, H, Nk, D] float32; Sigma_K [B, H, D, D] over the valid keys (O(N D^2), no N x N).
    """
    if key_padding_mask is not None:
        w = key_padding_mask[:, None, :, None].to(k.dtype)  # [B, 1, Nk, 1]
        n = w.sum(2).clamp(min=1.0)  # [B, 1, 1]
        km = k * w
    else:
        n = torch.full((1, 1, 1), float(k.shape[2]), device=k.device)
        km = k
    mean = km.sum(2) / n  # [B, H, D]
    second = torch.matmul(km.transpose(-1, -2), km) / n[..., None]  # [B, H, D, D]
    cov = second - mean[..., :, None] * mean[..., None, :]
    return _quadratic_form_std(q, cov, scale)


def _quadratic_form_std(q: torch.Tensor, cov: torch.Tensor, scale: float) -> torch.Tensor:
    """|scale| sqrt(q_i^T cov q_i): q [..., M, D], cov [..., D, D] -> [..., M]; the [..., M, D] product goes to a
    reused buffer (no autograd needed: the scale coefficient is a statistic, computed without gradient)."""
    with torch.no_grad():
        qc = torch.matmul(q, cov, out=workspace("sigma_qc", tuple(q.shape[:-2]) + (q.shape[-2], cov.shape[-1]), q))
        var = qc.mul_(q).sum(-1).clamp_(min=0.0)
    return var.sqrt_().mul_(abs(scale))


def score_std_causal(q: torch.Tensor, k: torch.Tensor, scale: float, key_padding_mask: Optional[torch.Tensor],
                     chunk: int = 256) -> torch.Tensor:
    """Causal-safe sigma_i: the key covariance over the keys in the chunks (of ``chunk`` positions) strictly
    before query i's chunk, so no future key enters a past row. q, k [B, H, N, D] float32 -> [B, H, N].

    Rows of the first chunk get sigma 0; they keep every key they may attend (their leaf), so eps = 0 anyway.
    """
    B, H, N, D = q.shape
    nch = -(-N // chunk)
    pad = nch * chunk - N
    w = key_padding_mask.to(k.dtype) if key_padding_mask is not None else torch.ones(B, N, dtype=k.dtype, device=k.device)
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        w = torch.nn.functional.pad(w, (0, pad))
    kw = (k * w[:, None, :, None]).view(B, H, nch, chunk, D)
    s1 = kw.sum(3)  # [B, H, nch, D]
    s2 = torch.matmul(kw.transpose(-1, -2), kw)  # [B, H, nch, D, D] (w is 0/1, so kw^T kw = sum w k k^T)
    cnt = w.view(B, 1, nch, chunk).sum(-1)  # [B, 1, nch]
    # exclusive prefix sums over chunks: chunk c sees chunks 0..c-1
    s1 = s1.cumsum(2) - s1
    s2 = s2.cumsum(2) - s2
    cnt = (cnt.cumsum(2) - cnt).clamp(min=1.0)
    mean = s1 / cnt[..., None]
    cov = s2 / cnt[..., None, None] - mean[..., :, None] * mean[..., None, :]
    return _quadratic_form_std(q.reshape(B, H, nch, chunk, D), cov, scale).view(B, H, nch * chunk)[:, :, :N]


def theory_scale(kept: torch.Tensor, attendable: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """alpha = 1 - eps, eps = Phi(Phi^{-1}(1 - k/n) - sigma) (Definitions 5.2-5.3 reconstructed); all [B, H, Nq].

    kept = k_i keys retained, attendable = n_i keys the row may attend, sigma = score std of the row.
    """
    frac_out = (1.0 - kept / attendable.clamp(min=1.0)).clamp(0.0, 1.0)
    eps = torch.special.ndtr(torch.special.ndtri(frac_out) - sigma)  # ndtri(0) = -inf -> eps 0
    eps = torch.where(kept >= attendable, torch.zeros_like(eps), eps)
    return (1.0 - eps).clamp(min=torch.finfo(torch.float32).tiny)


def sparse_hyper_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    lsh_num_projs: int = 7,
    block_size: int = BLOCK_SIZE,
    min_seq_len: int = MIN_SEQ_LEN,
    seed: int = 0,
    scale_mode: str = "theory",
    causal_min_seq_len: int = CAUSAL_MIN_SEQ_LEN,
    num_sink_tokens: int = NUM_SINK_TOKENS,
    causal_mode: str = CAUSAL_MODE,
    window: int = WINDOW,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse HyperAttention. q [B, H, Nq, D], k/v [B, H, Nk, D] -> (out [B, H, Nq, D], lse [B, H, Nq] float32).

    ``scale_mode`` "theory" multiplies by alpha_i (module docstring), "none" returns the plain block softmax.
    ``causal_min_seq_len`` is read only by the adapter's check (see hyper.check_sorted_lsh).
    ``causal_mode`` "single_pass": sinks + exact window + causal LSH block in one pass, no samples (hyper.py,
    docs/methods/hyper.md "Single pass"); the theory scale then takes k_i = window + block keys of query i.
    """
    check_inputs(q, k, v, causal, key_padding_mask)
    if causal_mode not in CAUSAL_MODES:
        raise ValueError(f"sparse_hyper: causal_mode must be one of {list(CAUSAL_MODES)}, got {causal_mode!r}")
    if window < 0:
        raise ValueError(f"sparse_hyper: window must be >= 0, got {window}")
    if scale_mode not in ("theory", "none"):
        raise ValueError(f"sparse_hyper: scale_mode must be 'theory' or 'none', got {scale_mode!r}")
    if num_sink_tokens < 0:
        raise ValueError(f"sparse_hyper: num_sink_tokens must be >= 0, got {num_sink_tokens}")
    gen = make_generator(generator, seed)
    want = scale_mode == "theory"
    # sizes past the sequence length run as the length itself (same output; memory and time follow the input)
    block_size, window = min(block_size, max(1, q.shape[2], k.shape[2])), min(window, max(1, k.shape[2]))
    num_sinks = min(num_sink_tokens, k.shape[2])
    shift = leading_padding(key_padding_mask) if num_sinks > 0 else None
    if shift is not None:  # left padding: the sinks must be each row's first real tokens, not its padding
        q, k, v, key_padding_mask = move_leading_padding_to_end(q, k, v, key_padding_mask, shift)
    k_rest, v_rest, rest_mask = split_sink_keys(k, v, key_padding_mask, num_sinks, causal)
    if causal and causal_mode == "single_pass":
        out, lse, kept = single_pass_causal_attention(q, k, v, scale=scale, key_valid=key_padding_mask, generator=gen,
                                                      lsh_num_projs=lsh_num_projs, block_size=block_size, sample_size=0,
                                                      window=window, num_sink_tokens=num_sinks)
    else:
        out, lse, kept = sorted_lsh_attention(q, k_rest, v_rest, causal=causal, scale=scale, key_padding_mask=rest_mask,
                                              generator=gen, lsh_num_projs=lsh_num_projs, block_size=block_size,
                                              sample_size=0, min_seq_len=min_seq_len, want_counts=want)
    if want and k_rest.shape[2] > 0:  # the theory scale of the sorted-block part (over the non-sink keys)
        B, H, Nq, _ = q.shape
        Nr = k_rest.shape[2]
        if causal:
            valid = rest_mask.float() if rest_mask is not None else torch.ones(B, Nr, device=q.device)
            attendable = valid.cumsum(-1)[:, None, :].expand(B, H, Nq)
            sigma = score_std_causal(q.float(), k_rest.float(), scale, rest_mask)
        else:
            n = rest_mask.sum(-1).float() if rest_mask is not None else torch.full((B,), float(Nr), device=q.device)
            attendable = n[:, None, None].expand(B, H, Nq)
            sigma = score_std(q.float(), k_rest.float(), scale, rest_mask)
        alpha = theory_scale(kept, attendable, sigma)
        if out.requires_grad:
            out = out * alpha[..., None]
        else:
            out.mul_(alpha[..., None])  # out is this call's own fresh tensor
        lse = lse - torch.log(alpha)
    out, lse = add_sinks_and_restore(out, lse, q, k, v, num_sinks=num_sinks, causal=causal, scale=scale,
                                     key_padding_mask=key_padding_mask, shift=shift)
    return out.to(q.dtype), lse


_PARAMS = {name: p for name, p in HYPER_PARAMS.items() if name != "sample_size"}
_PARAMS["scale_mode"] = Param(kind=str, choices=("theory", "none"),
                              help="'theory': multiply by the Attention is Naturally Sparse paper's scale coefficient alpha = 1 - eps (Def. 5.2-5.3); 'none': plain block softmax")

register_method(
    "sparse_hyper",
    sparse_hyper_attention,
    params=_PARAMS,
    check=check_sorted_lsh,
    min_seq_len_param="min_seq_len",
    source="Attention is Naturally Sparse with Gaussian Distributed Input, Algorithm 1, Definitions 5.2-5.3",
    summary="sortLSH block diagonal only, scaled by the estimated k-sparsity error",
)
