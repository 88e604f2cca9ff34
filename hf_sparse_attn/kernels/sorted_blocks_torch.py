"""Exact attention with its log-sum-exp in torch: the one home of the helpers every method builds on
(``dense_attention_with_lse`` for [G, M, D] groups with a key bias, ``masked_attention_with_lse`` for 4-D groups with
an additive mask, ``softmax_attention_autograd`` for the autograd path) and the sorted-block kernel's torch path
(exact attention of index-gathered blocks with a per-block key bias). That kernel is the CPU path and the reference
of the Triton kernel (triton_sorted_blocks.py); the methods reach it through
:func:`hf_sparse_attn.kernels.sorted_block_attention`, which dispatches between the two.
"""

from __future__ import annotations

from typing import Optional

import torch

from .grad import needs_grad
from .workspace import workspace

NEG_INF = float("-inf")


def flash_cpu_op():
    """torch's fused CPU attention that also returns the log-sum-exp (a private aten op; None if absent)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def softmax_attention_autograd(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out = softmax(scores) v and lse = logsumexp(scores) with no in-place step, for autograd: scores [..., M, L]
    (masked entries -inf), v [..., L, Dv] -> out [..., M, Dv], lse [..., M].

    lse = log sum_j e^{s_j - m} + m for any constant m (the row max, detached); a row with no key gets out 0, lse
    -inf and a zero (never NaN) gradient.
    """
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1)
    nonempty = denom > 0
    denom_safe = torch.where(nonempty, denom, torch.ones_like(denom))
    lse = torch.where(nonempty, torch.log(denom_safe) + row_max.squeeze(-1), torch.full_like(denom, NEG_INF))
    return torch.matmul(weights, v) / denom_safe.unsqueeze(-1), lse


def dense_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             bias: Optional[torch.Tensor] = None, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of small dense groups: q [G, M, D], k/v [G, L, D] float32, bias [G, L] (shared by the
    group's queries) or None; causal aligns query m with key m (M == L).

    Returns out [G, M, D] and lse [G, M]. Rows with no attendable key are *not* fixed here (callers know them).
    Uses torch's fused flash kernel on CPU (no [M, L] matrix), batched matmuls with an in-place softmax otherwise.
    When autograd needs the inputs: batched matmuls without in-place steps (the fused op gives no gradient through
    its lse, which the lse merges of the causal recursion and of the sinks need).
    """
    op = flash_cpu_op()
    if needs_grad(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [G, M, L]
        if bias is not None:
            scores = scores + bias[:, None, :]
        if causal:
            M, L = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(M, L, dtype=torch.bool, device=q.device).triu_(1), NEG_INF)
        return softmax_attention_autograd(scores, v)
    if op is not None and q.device.type == "cpu" and q.dtype == torch.float32:
        mask = None if bias is None else bias[:, None, None, :]
        out, lse = op(q[:, None], k[:, None], v[:, None], 0.0, causal, attn_mask=mask, scale=scale)
        return out[:, 0], lse[:, 0]
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [G, M, L]
    if bias is not None:
        scores.add_(bias[:, None, :])
    if causal:
        M, L = scores.shape[-2:]
        scores.masked_fill_(torch.ones(M, L, dtype=torch.bool, device=q.device).triu_(1), NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    scores.sub_(safe.unsqueeze(-1)).exp_()
    return torch.matmul(scores, v), lse


def masked_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                              mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of 4-D groups with an additive mask: q [G, P, M, D], k/v [G, P, L, D] (any strides),
    mask float32 broadcastable to [G, P, M, L] (0 = attend, -inf = not) or None. Returns out [G, P, M, Dv] and
    lse [G, P, M] float32. Rows with no attendable key are *not* fixed here: callers know them from their counts.

    No gradient needed: torch's fused CPU flash op (no [M, L] matrix kept). With autograd: matmuls and a softmax
    with a detached row max (the fused op gives no gradient through its lse, which the lse merges need).
    """
    if needs_grad(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + mask
        return softmax_attention_autograd(scores, v)
    op = flash_cpu_op()
    if op is not None and q.device.type == "cpu" and q.dtype == torch.float32:
        return op(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores.add_(mask)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    scores.sub_(safe.unsqueeze(-1)).exp_()
    return torch.matmul(scores, v), lse



def sorted_block_attention_torch(q_flat: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                                 q_index: torch.Tensor, k_index: torch.Tensor, bias: Optional[torch.Tensor],
                                 scale: float, out_flat: torch.Tensor, lse_flat: torch.Tensor,
                                 may_have_empty_blocks: bool = True) -> None:
    """Attention of each block of gathered queries over its gathered keys, scattered back in place.

    q_flat [Rq, D], k_flat/v_flat [Rk, D] float32; q_index [nblk, bq] int64 rows of q_flat (Rq = a padding
    query whose result is dropped); k_index [nblk, L] int64 rows of k_flat (any valid row for padding, masked by
    bias); bias [nblk, L] float32 or None. Writes out_flat [Rq + 1, D] and lse_flat [Rq + 1] at q_index rows
    (row Rq is the dump of padded queries). A block whose bias is -inf everywhere gives 0 and lse -inf
    (checked only when ``may_have_empty_blocks``; callers that know no block is empty skip the check).

    The gathered blocks go to reused workspace buffers (see :func:`workspace`) when no gradient is needed:
    a fresh allocation of that size costs more than the gather itself on the 2-core VMs (page faults).
    """
    nblk, bq = q_index.shape
    L = k_index.shape[1]
    D = q_flat.shape[1]
    Dv = v_flat.shape[1]
    Rq = q_flat.shape[0]
    reuse = not (torch.is_grad_enabled() and (q_flat.requires_grad or k_flat.requires_grad or v_flat.requires_grad))
    q_rows = q_index.reshape(-1)
    if bool((q_rows >= Rq).any()):
        q_rows = q_rows.clamp(max=Rq - 1)
    k_rows = k_index.reshape(-1)
    if reuse:
        qs = torch.index_select(q_flat, 0, q_rows, out=workspace("block_q", (nblk * bq, D), q_flat))
        ks = torch.index_select(k_flat, 0, k_rows, out=workspace("block_k", (nblk * L, D), k_flat))
        vs = torch.index_select(v_flat, 0, k_rows, out=workspace("block_v", (nblk * L, Dv), v_flat))
    else:
        qs, ks, vs = q_flat.index_select(0, q_rows), k_flat.index_select(0, k_rows), v_flat.index_select(0, k_rows)
    out, lse = dense_attention_with_lse(qs.view(nblk, bq, D), ks.view(nblk, L, D), vs.view(nblk, L, Dv), scale, bias)
    if bias is not None and may_have_empty_blocks:
        empty = bias.amax(dim=1) == NEG_INF  # [nblk]
        if bool(empty.any()):
            if reuse:
                out[empty] = 0.0
                lse[empty] = NEG_INF
            else:  # autograd: no in-place write into tensors saved for backward
                out = out.masked_fill(empty[:, None, None], 0.0)
                lse = lse.masked_fill(empty[:, None], NEG_INF)
    flat_index = q_index.reshape(-1)
    out_flat.index_copy_(0, flat_index, out.reshape(nblk * bq, -1))
    lse_flat.index_copy_(0, flat_index, lse.reshape(-1))
