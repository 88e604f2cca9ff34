"""The whole call of the sorted-LSH methods (``hyper``, ``sparse_hyper``): non-causal, one batched call of the
sorted blocks (sorted_blocks.py); causal, HyperAttention's recursion, flattened, with log-sum-exp values.

Causal attention (HyperAttention's recursion, flattened): pad N to N' = leaf * 2^m with leaf <= min_seq_len.
Query i attends
  * exactly (causal) the keys of its own leaf of ``leaf`` positions, and
  * for every level l = 0..m-1 with segment size S = N' / 2^l: if i lies in the second half of its segment,
    the first half of that segment, through the non-causal sorted-block attention (sorted_blocks.py).
These key sets are disjoint and cover [0, i] exactly, so merging them through their lse values is the
recursion "diagonal halves causal (recursively), off-diagonal quadrant non-causal, exact below min_seq_len",
with all quadrants of one level computed in a single batched call. Positions of the padding sit after every
real query, so causality keeps them out; they are also masked as invalid keys.

``sparse_hyper`` uses the same recursion with sample_size 0; its theory scale ("Attention is Naturally Sparse", Definition 5.3) is
applied once on the merged result, with k_i = number of keys query i retained over all parts and n_i = number
of keys it may attend (see sparse_hyper.py and docs/methods/hyper.md).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..kernels.sorted_blocks_torch import dense_attention_with_lse
from ..kernels.workspace import workspace
from .lsh import lsh_ranks, random_hyperplanes
from .merge import merge_attention, merge_attention_into
from .sorted_blocks import grouped_sorted_attention

NEG_INF = float("-inf")


def causal_levels(n: int, min_seq_len: int) -> tuple[int, int]:
    """(m, leaf): the causal recursion halves m times down to leaves of ``leaf`` <= max(min_seq_len, 1) positions."""
    if n <= min_seq_len:
        return 0, n
    m = math.ceil(math.log2(n / max(1, min_seq_len)))
    return m, -(-n // (1 << m))


def sorted_lsh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                         key_padding_mask: Optional[torch.Tensor], generator: torch.Generator,
                         lsh_num_projs: int, block_size: int, sample_size: int, min_seq_len: int,
                         want_counts: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """HyperAttention-style attention. q [B, H, Nq, D], k/v [B, H, Nk, D], key_padding_mask [B, Nk] bool.

    Returns out [B, H, Nq, Dv] float32, lse [B, H, Nq] float32 and, if ``want_counts``, counts [B, H, Nq]
    float32 = number of keys each query attended exactly (its blocks and leaf; sampled keys not counted).
    Non-causal calls accept Nk = 0 (every row empty: out 0, lse -inf), the case of a call whose keys are all sinks.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Dv = v.shape[3]
    device = q.device
    if Nk == 0 and not causal:
        empty_counts = torch.zeros(B, H, Nq, device=device) if want_counts else None
        return torch.zeros(B, H, Nq, Dv, device=device), torch.full((B, H, Nq), NEG_INF, device=device), empty_counts
    qf, kf, vf = q.float(), k.float(), v.float()
    key_valid = key_padding_mask  # [B, Nk] or None
    planes = random_hyperplanes(H, D, lsh_num_projs, generator, device)

    if not causal:
        q_ranks = lsh_ranks(qf, planes)  # [B, H, Nq]
        k_ranks = lsh_ranks(kf, planes, key_valid)
        q_order = torch.sort(q_ranks, dim=-1, stable=True).indices.view(B * H, Nq)
        k_order = torch.sort(k_ranks, dim=-1, stable=True).indices.view(B * H, Nk)
        k_valid_sorted = None
        if key_valid is not None:
            k_valid_sorted = torch.gather(key_valid[:, None, :].expand(B, H, Nk).reshape(B * H, Nk), 1, k_order)
        base_q = (torch.arange(B * H, device=device) * Nq)[:, None]
        base_k = (torch.arange(B * H, device=device) * Nk)[:, None]
        q_flat = qf.reshape(B * H * Nq, D)
        k_flat = kf.reshape(B * H * Nk, D)
        v_flat = vf.reshape(B * H * Nk, Dv)
        out_flat = torch.empty(B * H * Nq + 1, Dv, device=device)
        lse_flat = torch.empty(B * H * Nq + 1, device=device)
        count_flat = torch.empty(B * H * Nq + 1, device=device) if want_counts else None
        grouped_sorted_attention(q_flat, k_flat, v_flat, q_rows=q_order + base_q, k_rows=k_order + base_k,
                                 k_valid=k_valid_sorted, block_size=block_size, sample_size=sample_size,
                                 generator=generator, scale=scale, out_flat=out_flat, lse_flat=lse_flat,
                                 count_flat=count_flat)
        counts = count_flat[:-1].view(B, H, Nq) if want_counts else None
        return out_flat[:-1].view(B, H, Nq, Dv), lse_flat[:-1].view(B, H, Nq), counts

    # ---- causal: leaves exact, one batched non-causal call per level for the off-diagonal quadrants ----
    N = Nq
    m, leaf = causal_levels(N, min_seq_len)
    Np = leaf << m
    pad = Np - N
    if pad:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, pad))
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
        vf = torch.nn.functional.pad(vf, (0, 0, 0, pad))
        base_valid = key_valid if key_valid is not None else torch.ones(B, N, dtype=torch.bool, device=device)
        key_valid = torch.nn.functional.pad(base_valid, (0, pad), value=False)
    qf, kf, vf = qf.contiguous(), kf.contiguous(), vf.contiguous()

    # leaves: exact causal attention inside each block of `leaf` positions
    nleaf = 1 << m
    leaf_bias = None
    if key_valid is not None:
        leaf_bias = torch.zeros(B, 1, Np, device=device).masked_fill_(~key_valid[:, None, :], NEG_INF)
        leaf_bias = leaf_bias.expand(B, H, Np).reshape(B * H * nleaf, leaf)
    out, lse = dense_attention_with_lse(qf.view(B * H * nleaf, leaf, D), kf.view(B * H * nleaf, leaf, D),
                                        vf.view(B * H * nleaf, leaf, Dv), scale, leaf_bias, causal=True)
    out = out.reshape(B, H, Np, Dv)
    lse = lse.reshape(B, H, Np)
    counts = None
    if key_valid is not None or want_counts:
        valid_f = (key_valid if key_valid is not None else torch.ones(B, Np, dtype=torch.bool, device=device)).float()
        leaf_counts = valid_f.view(B, nleaf, leaf).cumsum(-1).view(B, 1, Np).expand(B, H, Np)  # keys <= i in own leaf
        if key_valid is not None:
            empty = leaf_counts == 0
            lse = lse.masked_fill(empty, NEG_INF)
            out = out.masked_fill(empty[..., None], 0.0)
        if want_counts:
            counts = leaf_counts.contiguous()

    if m > 0:
        ranks_q = lsh_ranks(qf, planes)  # [B, H, Np]
        ranks_k = lsh_ranks(kf, planes, key_valid)
        q_flat = qf.view(B * H * Np, D)
        k_flat = kf.view(B * H * Np, D)
        v_flat = vf.view(B * H * Np, Dv)
        no_grad = not (torch.is_grad_enabled() and (qf.requires_grad or kf.requires_grad or vf.requires_grad))
        if no_grad:  # intermediates of every level: reused buffers (fresh ones page-fault on every call)
            level_out = workspace("level_out", (B * H * Np + 1, Dv), vf)
            level_lse = workspace("level_lse", (B * H * Np + 1,), vf)
        else:
            level_out = torch.empty(B * H * Np + 1, Dv, device=device)
            level_lse = torch.empty(B * H * Np + 1, device=device)
        level_count = torch.empty(B * H * Np + 1, device=device) if want_counts else None
        valid_bh = None if key_valid is None else key_valid[:, None, :].expand(B, H, Np)
        for level in range(m):
            if not no_grad:  # autograd keeps each level's result: a fresh buffer per level
                level_out = torch.empty(B * H * Np + 1, Dv, device=device)
                level_lse = torch.empty(B * H * Np + 1, device=device)
            nseg = 1 << level
            half = Np // (2 * nseg)
            G = B * H * nseg
            # first position of each (b, h, segment) in the flattened rows
            seg_base = (torch.arange(B * H, device=device)[:, None] * Np + torch.arange(nseg, device=device)[None, :] * 2 * half).reshape(G, 1)
            rq = ranks_q.view(B, H, nseg, 2, half)[:, :, :, 1].reshape(G, half)
            rk = ranks_k.view(B, H, nseg, 2, half)[:, :, :, 0].reshape(G, half)
            rq_sorted, q_order = torch.sort(rq, dim=-1, stable=True)
            rk_sorted, k_order = torch.sort(rk, dim=-1, stable=True)
            k_valid_sorted = None
            if valid_bh is not None:
                k_valid_sorted = torch.gather(valid_bh.reshape(B, H, nseg, 2, half)[:, :, :, 0].reshape(G, half), 1, k_order)
            grouped_sorted_attention(q_flat, k_flat, v_flat, q_rows=q_order + seg_base + half, k_rows=k_order + seg_base,
                                     k_valid=k_valid_sorted, block_size=block_size, sample_size=sample_size,
                                     generator=generator, scale=scale, out_flat=level_out, lse_flat=level_lse,
                                     count_flat=level_count, q_ranks=rq_sorted, k_ranks_sorted=rk_sorted)
            # merge the second halves' results into the running (out, lse) through their lse values
            sel_out = out.view(B, H, nseg, 2, half, Dv)[:, :, :, 1]
            sel_lse = lse.view(B, H, nseg, 2, half)[:, :, :, 1]
            new_out = level_out[:-1].view(B, H, nseg, 2, half, Dv)[:, :, :, 1]
            new_lse = level_lse[:-1].view(B, H, nseg, 2, half)[:, :, :, 1]
            if no_grad:
                merge_attention_into(sel_out, sel_lse, new_out, new_lse)
            else:  # autograd: rebuild out / lse instead of writing into tensors saved for backward
                merged_out, merged_lse = merge_attention(sel_out, sel_lse, new_out, new_lse)
                out = torch.stack([out.view(B, H, nseg, 2, half, Dv)[:, :, :, 0], merged_out], dim=3).reshape(B, H, Np, Dv)
                lse = torch.stack([lse.view(B, H, nseg, 2, half)[:, :, :, 0], merged_lse], dim=3).reshape(B, H, Np)
            if want_counts:
                counts.view(B, H, nseg, 2, half)[:, :, :, 1].add_(level_count[:-1].view(B, H, nseg, 2, half)[:, :, :, 1])
    out = out[:, :, :N]
    lse = lse[:, :, :N]
    if counts is not None:
        counts = counts[:, :, :N]
    return out, lse, counts

