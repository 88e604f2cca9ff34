"""Exact softmax attention with its log-sum-exp: the reference every approximate method is tested against.

softmax(scale * Q K^T + mask) V, computed in query chunks so that no [Nq, Nk] score matrix is held for the
whole batch at once; float32 accumulation whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import check_inputs
from .registry import Param, register_method

# Keep one chunk's float32 scores [B, H, chunk, Nk] under this many elements (64 M elements = 256 MB).
_MAX_SCORE_ELEMENTS = 1 << 26


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    query_chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention. q [B, H, Nq, D], k/v [B, H, Nk, D], key_padding_mask [B, Nk] (True = attend).

    Returns out [B, H, Nq, D] in q's dtype and lse [B, H, Nq] float32 (-inf and a zero row where no key is
    attended). ``query_chunk_size`` 0 picks a chunk from the memory budget.
    """
    check_inputs(q, k, v, causal, key_padding_mask)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    chunk = query_chunk_size or max(1, min(Nq, _MAX_SCORE_ELEMENTS // max(1, B * H * Nk)))
    kf = k.float()
    vf = v.float()
    out = torch.empty(B, H, Nq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    key_cols = torch.arange(Nk, device=q.device)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    for start in range(0, Nq, chunk):
        stop = min(Nq, start + chunk)
        scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale  # [B, H, c, Nk]
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        if causal:
            rows = torch.arange(start, stop, device=q.device)
            scores = scores.masked_fill(key_cols[None, :] > rows[:, None], float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)  # [B, H, c]
        finite = torch.isfinite(chunk_lse)
        shift = torch.where(finite, chunk_lse, torch.zeros_like(chunk_lse)).unsqueeze(-1)
        if needs_grad:
            probs = torch.exp(scores - shift)
        else:  # in place: no second [B, H, c, Nk] buffer
            probs = scores.sub_(shift).exp_()
        out[:, :, start:stop] = torch.matmul(probs, vf)
        lse[:, :, start:stop] = chunk_lse
    return out.to(q.dtype), lse


register_method(
    "exact",
    exact_attention,
    params={"query_chunk_size": Param(kind=int, low=0, help="queries per chunk; 0 = from a 256 MB score budget")},
    source="softmax attention (Vaswani et al. 2017)",
    summary="exact attention with lse; the reference and the fallback",
)
