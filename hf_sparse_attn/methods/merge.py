"""The numeric helpers of log-sum-exp attention every method shares: merging partial results, the empty-row rule,
and whether autograd needs a differentiable path.

If out_a = softmax(s_a) V_a over a key set A with lse_a = log sum_A exp(s), and likewise for a disjoint set B,
then attention over A ∪ B is

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

(HyperAttention's merge of the block part and the sampled part). A row empty on both sides keeps lse = -inf
and out = 0, never NaN.

Exact attention with its lse (the fused CPU op, the autograd path) lives with the kernels:
``hf_sparse_attn.kernels.sorted_blocks_torch`` (``dense_attention_with_lse``, ``masked_attention_with_lse``).
"""

from __future__ import annotations

import torch

from ..kernels import needs_grad

__all__ = ["empty_rows_to_zero", "merge_attention", "merge_attention_into", "merge_many", "needs_grad"]

NEG_INF = float("-inf")


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out_* [B, H, N, D] (float32), lse_* [B, H, N] (float32) -> merged (out [B, H, N, D], lse [B, H, N])."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse))
    out = out_a * w_a.unsqueeze(-1) + out_b * w_b.unsqueeze(-1)
    return out, lse


def merge_attention_into(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                         lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_attention` written into ``out`` / ``lse`` (and ``out_b`` scaled in place) when no gradient is
    needed: out* [..., N, Dv] float32, lse* [..., N]; ``out`` and ``lse`` may be views of a caller's buffer, and all
    of them must be the caller's own tensors (fresh [B, H, N, Dv] temporaries page-fault on these VMs and cost more
    than the arithmetic). With autograd: :func:`merge_attention`, nothing written. Same values either way."""
    if needs_grad(out, lse, out_b, lse_b):
        return merge_attention(out, lse, out_b, lse_b)
    merged = torch.logaddexp(lse, lse_b)
    finite = torch.isfinite(merged)
    safe = torch.where(finite, merged, torch.zeros_like(merged))
    w_a = torch.where(finite, torch.exp(lse - safe), torch.zeros_like(safe))
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(safe))
    out.mul_(w_a[..., None]).add_(out_b.mul_(w_b[..., None]))
    lse.copy_(merged)
    return out, lse


def merge_many(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge rule for several disjoint key sets at once: parts of (out [..., M, Dv] float32, lse [..., M])
    -> (out, lse); a row empty in every part keeps lse -inf and out 0."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([p[1] for p in parts])  # [P, ..., M]
    lse = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.exp(lses - safe)  # 0 for an empty part (exp(-inf)); 0 everywhere for an empty row
    out = parts[0][0] * w[0][..., None]
    for i in range(1, len(parts)):
        out = out.add_(parts[i][0] * w[i][..., None])
    return out, lse


def empty_rows_to_zero(out: torch.Tensor, lse: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fully-masked-row rule: out [..., N, Dv], lse [..., N]; rows where ``empty`` (broadcastable to lse) get
    out 0 and lse -inf (never NaN). Returns the inputs themselves when no row is empty."""
    if not bool(empty.any()):
        return out, lse
    return out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, NEG_INF)
