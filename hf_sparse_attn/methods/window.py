"""Exact attention over a local window of keys through overlapping strided views of k/v (no gather for the chunks
that need none): the window of ``local``, ``block_select`` and of the sorted-LSH methods' single pass.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels.sorted_blocks_torch import masked_attention_with_lse
from ..kernels.workspace import workspace
from .merge import empty_rows_to_zero, needs_grad

NEG_INF = float("-inf")

# Queries per chunk of the local window: each chunk reads one overlapping strided view of window + WINDOW_CHUNK keys,
# so a query computes window + WINDOW_CHUNK key slots for window + its offset in the chunk + 1 attended keys.
# Timed at 8k, window 256, one thread (no result file: a kernel-tuning constant): chunks of 32 / 64 / 128
# took 81 / 85 / 101 ms; 64 keeps the window's alignment slack (at most 63 extra keys) and the count of chunks small.
WINDOW_CHUNK = 64
# Mask buffers are built for groups of chunks of at most this many float32 elements (16 MB), into reused buffers.
MASK_BUDGET_ELEMENTS = 1 << 22


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float,
                     key_valid: Optional[torch.Tensor], aligned: bool, causal: bool = True,
                     chunk: int = WINDOW_CHUNK, first_key: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact attention of every query over a local window of keys, through overlapping strided views of k/v.

    q, k, v [B, H, N, D] float32 (self-attention, Nq = Nk = N); key_valid [B, N] bool (True = may be attended) or
    None; keys at positions < ``first_key`` are never attended (the sinks, attended apart). Query i of chunk
    c = i // chunk (c0 = c * chunk) attends the valid keys j >= first_key with
      * causal, ``aligned``:     c0 - window <= j <= i   (the previous ``window`` positions and more: its whole chunk
                                                       prefix, between window + 1 and window + chunk keys);
      * causal, not aligned:     i - window < j <= i     (exactly the previous ``window`` positions, itself included);
      * not causal:              |i - j| <= window       (a symmetric window).
    Returns out [B, H, N, Dv], lse [B, H, N] (0 and -inf for a row with no key) and counts [B, N] float32 = keys
    attended per query (the same for every head).

    Chunk c reads the key slots t = 0 .. L-1 at positions c0 - window + t (L = window + chunk, + window when not
    causal). The chunks whose slots all lie inside [first_key, N) and hold no padded key ("clean") read them as one
    overlapping strided view of k/v (no copy, no gather) and share one [chunk, L] mask: one fused call for all of
    them. The few others (the first chunks, which see the sinks or positions < 0, the last, and chunks with padding)
    gather their slots and get a mask of their own, built in groups into reused buffers. With autograd every chunk
    takes the gather path (differentiable index_select, no reused buffers).
    """
    B, H, N, D = q.shape
    Dv = v.shape[3]
    device = q.device
    W = min(int(window), N)  # a window of N or more holds every key: the same as window N (memory follows N)
    C = max(1, min(int(chunk), N))
    nch = -(-N // C)
    ahead = 0 if causal else W  # keys after the chunk end a query may see
    L = W + C + ahead
    G = B * H
    qc = q.reshape(G, N, D).contiguous()
    kc = k.reshape(G, N, D).contiguous()
    vc = v.reshape(G, N, Dv).contiguous()

    # the mask every chunk shares: slot t of chunk c holds position c0 - W + t; row r is query c0 + r
    r = torch.arange(C, device=device)[:, None]
    t = torch.arange(L, device=device)[None, :]
    if not causal:
        allowed = (t >= r) & (t <= r + 2 * W)
    elif aligned:
        allowed = t <= r + W
    else:
        allowed = (t > r) & (t <= r + W)
    base_mask = torch.zeros(C, L, device=device).masked_fill_(~allowed, NEG_INF)

    # keys per query from prefix sums of the attendable positions
    attendable = torch.arange(N, device=device)[None, :] >= first_key
    attendable = attendable.expand(B, N) if key_valid is None else (key_valid & attendable)
    prefix = torch.nn.functional.pad(attendable.long().cumsum(1), (1, 0))  # [B, N + 1]
    i = torch.arange(N, device=device)
    if not causal:
        lo, hi = (i - W).clamp(min=0), (i + W).clamp(max=N - 1)
    elif aligned:
        lo, hi = ((i // C) * C - W).clamp(min=0), i
    else:
        lo, hi = (i - W + 1).clamp(min=0), i
    counts = (prefix[:, hi + 1] - prefix[:, lo]).float()  # [B, N]

    chunk_start = torch.arange(nch, device=device) * C - W  # position of slot 0
    first_clean = -(-(max(0, first_key) + W) // C)  # first chunk with slot 0 at a position >= first_key
    last_clean = (N - C - ahead) // C if N >= C + ahead else -1  # last chunk whose slots (and rows) lie inside [0, N)
    n_clean = max(0, last_clean - first_clean + 1)
    is_dirty = torch.ones(nch, dtype=torch.bool, device=device)
    if n_clean:
        is_dirty[first_clean:first_clean + n_clean] = False
    slot_pos = chunk_start[:, None] + t  # [nch, L]
    slot_ok = (slot_pos >= max(0, first_key)) & (slot_pos < N)
    ok = slot_ok[None].expand(B, nch, L)
    if key_valid is not None:
        ok = ok & key_valid[:, slot_pos.clamp(0, N - 1)]
        is_dirty |= ~ok.all(dim=2).all(dim=0)

    grad = needs_grad(q, k, v)
    if grad:
        n_clean = 0
        is_dirty[:] = True
    out = torch.empty(G, nch * C, Dv, device=device)
    lse = torch.empty(G, nch * C, device=device)
    if n_clean:
        offset = (first_clean * C - W)
        k_view = kc.as_strided((G, n_clean, L, D), (N * D, C * D, D, 1), kc.storage_offset() + offset * D)
        v_view = vc.as_strided((G, n_clean, L, Dv), (N * Dv, C * Dv, Dv, 1), vc.storage_offset() + offset * Dv)
        q_view = qc[:, first_clean * C:(first_clean + n_clean) * C].view(G, n_clean, C, D)
        o, s = masked_attention_with_lse(q_view, k_view, v_view, scale, base_mask[None, None])
        out[:, first_clean * C:(first_clean + n_clean) * C] = o.reshape(G, n_clean * C, Dv)
        lse[:, first_clean * C:(first_clean + n_clean) * C] = s.reshape(G, n_clean * C)

    dirty_chunks = is_dirty.nonzero().flatten()
    if dirty_chunks.numel():
        k_flat, v_flat, q_flat = kc.view(G * N, D), vc.view(G * N, Dv), qc.view(G * N, D)
        group_base = (torch.arange(G, device=device) * N)[:, None, None]  # [G, 1, 1]
        rows_in_chunk = torch.arange(C, device=device)
        group = dirty_chunks.numel() if grad else max(1, MASK_BUDGET_ELEMENTS // (G * C * L))
        for start in range(0, dirty_chunks.numel(), group):
            idx = dirty_chunks[start:start + group]
            nd = idx.numel()
            key_rows = (group_base + slot_pos[idx].clamp(0, N - 1)[None]).reshape(-1)  # [G * nd * L]
            q_pos = (idx[:, None] * C + rows_in_chunk[None, :]).clamp(max=N - 1)  # [nd, C]
            q_rows = (group_base + q_pos[None]).reshape(-1)
            key_bias = torch.zeros(B, nd, 1, L, device=device).masked_fill_(~ok[:, idx, None, :], NEG_INF)
            if grad:
                qs, ks, vs = q_flat.index_select(0, q_rows), k_flat.index_select(0, key_rows), v_flat.index_select(0, key_rows)
                mask = (base_mask[None, None] + key_bias)[:, None]  # [B, 1, nd, C, L]
            else:
                qs = torch.index_select(q_flat, 0, q_rows, out=workspace("window_q", (G * nd * C, D), q_flat))
                ks = torch.index_select(k_flat, 0, key_rows, out=workspace("window_k", (G * nd * L, D), k_flat))
                vs = torch.index_select(v_flat, 0, key_rows, out=workspace("window_v", (G * nd * L, Dv), v_flat))
                mask = torch.add(base_mask[None, None], key_bias, out=workspace("window_mask", (B, nd, C, L), q_flat))[:, None]
            if grad:
                o, s = masked_attention_with_lse(qs.view(B, H, nd, C, D), ks.view(B, H, nd, L, D),
                                                 vs.view(B, H, nd, L, Dv), scale, mask)
            else:  # the fused op takes 4-D inputs: one call per batch row, its mask broadcast over the heads
                q5, k5, v5 = qs.view(B, H, nd, C, D), ks.view(B, H, nd, L, D), vs.view(B, H, nd, L, Dv)
                parts = [masked_attention_with_lse(q5[b], k5[b], v5[b], scale, mask[b]) for b in range(B)]
                o = parts[0][0] if B == 1 else torch.stack([p_[0] for p_ in parts])
                s = parts[0][1] if B == 1 else torch.stack([p_[1] for p_ in parts])
            cols = (idx[:, None] * C + rows_in_chunk[None, :]).reshape(-1)  # [nd * C] rows of out
            if grad:
                out = out.index_copy(1, cols, o.reshape(G, nd * C, Dv))
                lse = lse.index_copy(1, cols, s.reshape(G, nd * C))
            else:
                out.index_copy_(1, cols, o.reshape(G, nd * C, Dv))
                lse.index_copy_(1, cols, s.reshape(G, nd * C))
    out = out.view(B, H, nch * C, Dv)[:, :, :N]
    lse = lse.view(B, H, nch * C)[:, :, :N]
    out, lse = empty_rows_to_zero(out, lse, (counts == 0)[:, None, :])
    return out, lse, counts

