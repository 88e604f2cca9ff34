"""Single-pass causal attention of the sorted-LSH methods: sinks + exact local window + causal sorted-LSH block
(+ sampled residual), one pass over the sequence instead of the recursion. Derivation and guarantees:
docs/methods/hyper.md "Single pass".
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..kernels.sorted_blocks_torch import masked_attention_with_lse
from ..kernels.workspace import workspace
from .lsh import lsh_ranks, random_hyperplanes
from .merge import empty_rows_to_zero, merge_attention_into, needs_grad
from .registry import MAX_SAMPLES_PER_KEY  # sample sizes capped per key of the call
from .window import MASK_BUDGET_ELEMENTS, WINDOW_CHUNK, window_attention

NEG_INF = float("-inf")

# The causal LSH block's tiles advance by block_size / BLOCK_TILE_DIVISOR sorted keys and hold that many queries
# per chunk (each chunk computes block_size + block_size / BLOCK_TILE_DIVISOR key slots per query). Timed at 8k,
# block 256, one thread (a kernel-tuning constant): divisor 1 / 2 / 4 took 200 / 181 / 172 ms.
BLOCK_TILE_DIVISOR = 4
# The single pass picks its number of LSH buckets so that a bucket holds BUCKET_FILL x block_size keys on average
# (single_pass_bucket_bits): a query's past then holds ~block_size keys of its bucket half-way through the sequence.
BUCKET_FILL = 2


def band_mask_rows(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows band masks are gathered from: from_rows [length + 1, length] (row a: 0 at slots >= a, -inf before)
    and below_rows [length + 1, length] (row b: 0 at slots < b, -inf from b on). The additive mask of the slots
    [a, b) is from_rows[a] + below_rows[b]: two row gathers and an add instead of comparisons per element."""
    t = torch.arange(length, device=device)[None, :]
    a = torch.arange(length + 1, device=device)[:, None]
    zeros = torch.zeros(length + 1, length, device=device)
    return zeros.masked_fill(t < a, NEG_INF), zeros.masked_fill(t >= a, NEG_INF)


def causal_bucket_block_attention(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, *, ranks_q: torch.Tensor,
                                  ranks_k: torch.Tensor, last_key: torch.Tensor, block_size: int, scale: float,
                                  stats: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The causal sorted-LSH block: query i attends exactly the (at most ``block_size``) most recent keys of its own
    LSH bucket at positions <= last_key[i].

    qf, kf, vf [B, H, N, D] float32; ranks_q, ranks_k [B, H, N] int64 Gray bucket ranks (lsh.lsh_ranks; keys that
    may not be attended have rank 2^P, above every query's); last_key [N] int64 (may be negative: no block key).
    Returns out [B, H, N, Dv], lse [B, H, N] (0 / -inf for a query with no block key), counts [B, H, N] float32
    (keys attended), and for the sampled residual: lo, hi [B*H, N] int64 (query i's block is the sorted key
    positions [lo_i, hi_i)) and key_sorted_pos [B*H, N] int64 (sorted position of each key).

    Causality: the block of query i depends only on q_i's bucket and on keys at positions <= last_key[i] (their
    buckets and positions), never on another query or a later key - unlike equal-size blocks of the whole sorted
    order, whose boundaries move with the hash of every future token.

    Batching: keys sorted by (bucket, position) and queries likewise; hi_i (the end of the block in sorted key order)
    is nondecreasing along the sorted queries. Query i goes to tile hi_i // T (T = block_size / BLOCK_TILE_DIVISOR),
    whose key slots are the sorted key positions [tile * T - block_size, tile * T + T), which hold [lo_i, hi_i); a
    tile's queries are cut into chunks of T. One fused call per group of chunks, its band masks gathered from
    band_mask_rows into reused buffers.
    """
    B, H, N, D = qf.shape
    Dv = vf.shape[3]
    G = B * H
    device = qf.device
    bk = max(1, min(int(block_size), N))  # a block of N or more keys holds every key: the same as N
    T = max(1, bk // BLOCK_TILE_DIVISOR)
    L = T + bk
    pos = torch.arange(N, device=device)
    k_comp, k_order = torch.sort((ranks_k * N + pos).view(G, N), dim=1)
    q_comp, q_order = torch.sort((ranks_q * N + pos).view(G, N), dim=1)
    q_bucket_start = q_comp - q_comp % N  # rank * N
    q_pos = q_order
    threshold = q_bucket_start + last_key[q_pos].clamp(min=-1)
    hi = torch.searchsorted(k_comp, threshold, right=True)  # [G, N] in sorted query order
    start = torch.searchsorted(k_comp, q_bucket_start, right=False)
    hi = torch.maximum(hi, start)
    lo = torch.maximum(start, hi - bk)
    count_sorted = hi - lo

    # original-order copies for the caller
    lo_orig = torch.empty_like(lo).scatter_(1, q_order, lo)
    hi_orig = torch.empty_like(hi).scatter_(1, q_order, hi)
    counts = torch.empty(G, N, device=device).scatter_(1, q_order, count_sorted.float()).view(B, H, N)
    key_sorted_pos = torch.empty_like(k_order).scatter_(1, k_order, pos[None, :].expand(G, N))

    grad = needs_grad(qf, kf, vf)
    Rq = G * N
    out_flat = torch.zeros(Rq + 1, Dv, device=device)
    lse_flat = torch.full((Rq + 1,), NEG_INF, device=device)
    active = count_sorted > 0  # [G, N]
    num_active = int(active.sum())
    if stats is not None:
        stats["block_chunks"] = 0
        stats["block_pairs"] = 0
    if num_active == 0:
        return out_flat[:-1].view(B, H, N, Dv), lse_flat[:-1].view(B, H, N), counts, lo_orig, hi_orig, key_sorted_pos
    ntiles = N // T + 1
    group_id = torch.arange(G, device=device)[:, None].expand(G, N)
    tile_key = (group_id * ntiles + hi // T)[active]  # [A] nondecreasing
    q_row = (group_id * N + q_pos)[active]
    q_lo = lo[active]
    q_hi = hi[active]
    per_tile = torch.bincount(tile_key, minlength=G * ntiles)
    chunks_per_tile = -(-per_tile // T)
    chunk_start = chunks_per_tile.cumsum(0) - chunks_per_tile
    first_of_tile = per_tile.cumsum(0) - per_tile
    within = torch.arange(num_active, device=device) - first_of_tile[tile_key]
    chunk_id = chunk_start[tile_key] + within // T
    num_chunks = int(chunks_per_tile.sum())
    slot = chunk_id * T + within % T
    q_index = torch.full((num_chunks * T,), Rq, dtype=torch.int64, device=device).scatter_(0, slot, q_row).view(num_chunks, T)
    slot_lo = torch.zeros(num_chunks * T, dtype=torch.int64, device=device).scatter_(0, slot, q_lo).view(num_chunks, T)
    slot_hi = torch.zeros(num_chunks * T, dtype=torch.int64, device=device).scatter_(0, slot, q_hi).view(num_chunks, T)
    chunk_tile = torch.zeros(num_chunks, dtype=torch.int64, device=device).scatter_(0, chunk_id, tile_key)
    if stats is not None:
        stats["block_chunks"] = num_chunks
        stats["block_pairs"] = num_chunks * T * L

    q_flat = qf.reshape(Rq, D)
    k_flat = kf.reshape(Rq, D)
    v_flat = vf.reshape(Rq, Dv)
    k_order_flat = (k_order + (torch.arange(G, device=device) * N)[:, None]).view(-1)
    slots = torch.arange(L, device=device)
    from_rows, below_rows = band_mask_rows(L, device)
    group = max(1, MASK_BUDGET_ELEMENTS // (T * L))
    for c0 in range(0, num_chunks, group):
        c1 = min(num_chunks, c0 + group)
        n = c1 - c0
        tiles = chunk_tile[c0:c1]
        g = tiles // ntiles
        sorted_slot = (tiles % ntiles)[:, None] * T - bk + slots[None, :]  # [n, L] sorted key positions
        key_rows = k_order_flat[(g * N)[:, None] + sorted_slot.clamp(0, N - 1)].view(-1)
        qi = q_index[c0:c1]
        q_rows = qi.clamp(max=Rq - 1).view(-1)
        base = (tiles % ntiles) * T - bk  # [n] sorted position of slot 0
        first = (slot_lo[c0:c1] - base[:, None]).clamp_(0, L).view(-1)  # [n * T] the band [first, last) of each row
        last = (slot_hi[c0:c1] - base[:, None]).clamp_(0, L).view(-1)
        if grad:
            qs, ks, vs = q_flat.index_select(0, q_rows), k_flat.index_select(0, key_rows), v_flat.index_select(0, key_rows)
            mask = (from_rows.index_select(0, first) + below_rows.index_select(0, last)).view(n, T, L)
        else:
            qs = torch.index_select(q_flat, 0, q_rows, out=workspace("sp_block_q", (n * T, D), q_flat))
            ks = torch.index_select(k_flat, 0, key_rows, out=workspace("sp_block_k", (n * L, D), k_flat))
            vs = torch.index_select(v_flat, 0, key_rows, out=workspace("sp_block_v", (n * L, Dv), v_flat))
            mask = torch.index_select(from_rows, 0, first, out=workspace("sp_block_mask", (n * T, L), q_flat))
            mask.add_(torch.index_select(below_rows, 0, last, out=workspace("sp_block_mask2", (n * T, L), q_flat)))
            mask = mask.view(n, T, L)
        o, s = masked_attention_with_lse(qs.view(n, 1, T, D), ks.view(n, 1, L, D), vs.view(n, 1, L, Dv), scale, mask[:, None])
        if grad:
            out_flat = out_flat.index_copy(0, qi.view(-1), o.reshape(n * T, Dv))
            lse_flat = lse_flat.index_copy(0, qi.view(-1), s.reshape(n * T))
        else:
            out_flat.index_copy_(0, qi.view(-1), o.reshape(n * T, Dv))
            lse_flat.index_copy_(0, qi.view(-1), s.reshape(n * T))
    return out_flat[:-1].view(B, H, N, Dv), lse_flat[:-1].view(B, H, N), counts, lo_orig, hi_orig, key_sorted_pos


def sampled_residual_attention(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, *, key_valid: torch.Tensor,
                               window: int, sample_size: int, generator: torch.Generator, scale: float,
                               lo: torch.Tensor, hi: torch.Tensor, key_sorted_pos: torch.Tensor,
                               chunk: int = WINDOW_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled estimate of the keys a single-pass query attends in no exact part (HyperAttention's residual).

    qf, kf, vf [B, H, N, D] float32; key_valid [B, N] bool: keys that may be attended outside the sinks. For the
    queries of window chunk c (c0 = c * chunk) the keys outside their exact window (``window_attention``, aligned)
    are O_c = {valid j < c0 - window}, n_c = |O_c|. ``sample_size`` = s keys are drawn uniformly with replacement
    from O_c per (batch, head, chunk), each with weight n_c / s (score + log(n_c / s)); a sample inside query i's
    block (sorted key position in [lo_i, hi_i), see causal_bucket_block_attention) is masked out for that query,
    since the block counts it exactly. Then for every query, with R_i = O_c minus its block,
        E[(n_c / s) sum_t e^{s_i j_t} 1[j_t not in block_i]] = sum_{j in R_i} e^{s_ij}:
    the estimate of the residual mass is unbiased. Returns out [B, H, N, Dv], lse [B, H, N] (0 / -inf where no
    sample is left).
    """
    B, H, N, D = qf.shape
    Dv = vf.shape[3]
    G = B * H
    device = qf.device
    s = min(int(sample_size), MAX_SAMPLES_PER_KEY * N)  # memory follows the input (registry.MAX_SAMPLES_PER_KEY)
    C = max(1, min(int(chunk), N))
    nch = -(-N // C)
    Np = nch * C
    # valid positions of each batch row in order (first n_b entries), and n_c per chunk
    valid_positions = torch.sort((~key_valid).to(torch.int8), dim=1, stable=True).indices  # [B, N]
    prefix = torch.nn.functional.pad(key_valid.long().cumsum(1), (1, 0))  # [B, N + 1]: valid keys before x
    population_end = (torch.arange(nch, device=device) * C - int(window)).clamp(0, N)
    n_c = prefix[:, population_end]  # [B, nch]
    u = torch.rand(B, H, nch, s, generator=generator, device=generator.device).to(device)
    pick = (u * n_c[:, None, :, None]).long().clamp_(max=N - 1)
    sample_pos = torch.gather(valid_positions[:, None, :].expand(B, H, N), 2, pick.view(B, H, nch * s)).view(G, nch, s)
    sample_sorted = torch.gather(key_sorted_pos, 1, sample_pos.view(G, nch * s)).view(G, nch, s)
    log_weight = torch.log(n_c.float() / s)  # [B, nch]; -inf where the population is empty
    log_weight = log_weight[:, None, :].expand(B, H, nch).reshape(G, nch)
    rows = (sample_pos + (torch.arange(G, device=device) * N)[:, None, None]).view(-1)
    k_flat, v_flat = kf.reshape(G * N, D), vf.reshape(G * N, Dv)
    grad = needs_grad(qf, kf, vf)
    ks = k_flat.index_select(0, rows).view(G, nch, s, D)
    vs = v_flat.index_select(0, rows).view(G, nch, s, Dv)
    qp = torch.nn.functional.pad(qf, (0, 0, 0, Np - N)).reshape(G, nch, C, D)
    lo_p = torch.nn.functional.pad(lo, (0, Np - N)).view(G, nch, C)
    hi_p = torch.nn.functional.pad(hi, (0, Np - N)).view(G, nch, C)
    outs, lses, nonempty_parts = [], [], []
    group = max(1, MASK_BUDGET_ELEMENTS // (G * C * s))
    for c0 in range(0, nch, group):
        c1 = min(nch, c0 + group)
        ss = sample_sorted[:, c0:c1, None, :]  # [G, n, 1, s]
        in_block = (ss >= lo_p[:, c0:c1, :, None]) & (ss < hi_p[:, c0:c1, :, None])  # [G, n, C, s]
        weight = log_weight[:, c0:c1, None, None]
        if grad:
            mask = weight.expand(G, c1 - c0, C, s).masked_fill(in_block, NEG_INF)
        else:
            mask = workspace("sp_sample_mask", (G, c1 - c0, C, s), qf)
            mask.copy_(weight.expand(G, c1 - c0, C, s)).masked_fill_(in_block, NEG_INF)
        o, l = masked_attention_with_lse(qp[:, c0:c1], ks[:, c0:c1], vs[:, c0:c1], scale, mask)
        nonempty_parts.append(((~in_block).any(-1)) & torch.isfinite(weight[..., 0]))
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs, dim=1).reshape(B, H, Np, Dv)[:, :, :N]
    lse = torch.cat(lses, dim=1).reshape(B, H, Np)[:, :, :N]
    nonempty = torch.cat(nonempty_parts, dim=1).reshape(B, H, Np)[:, :, :N]
    return empty_rows_to_zero(out, lse, ~nonempty)


def single_pass_bucket_bits(n: int, block_size: int, lsh_num_projs: int) -> int:
    """Hash bits the single pass buckets by: the largest P' <= lsh_num_projs with n / 2^P' >= BUCKET_FILL *
    block_size keys per bucket (0 bits: one bucket, the block is the most recent keys). Query i's block is drawn from the past keys of its bucket; with
    2^7 buckets at 8k tokens a bucket holds ~64 keys, half of them in a query's future, and the blocks stayed
    ~13% full. The top P' bits of the Gray rank are the bucket of the first P' hyperplanes (coarser buckets of
    adjacent Gray codes)."""
    bits = int(math.floor(math.log2(max(1.0, n / (BUCKET_FILL * max(1, block_size))))))
    return max(0, min(int(lsh_num_projs), bits))


def single_pass_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                                 key_valid: Optional[torch.Tensor], generator: torch.Generator, lsh_num_projs: int,
                                 block_size: int, sample_size: int, window: int, num_sink_tokens: int,
                                 stats: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention in one pass over the keys outside the sinks (the sinks are attended apart, sink_attention).

    q, k, v [B, H, N, D] (self-attention); key_valid [B, N] bool or None (True = may be attended; the sinks, keys
    0 .. num_sink_tokens - 1, are excluded here whatever it says). Query i of window chunk c0 = (i // WINDOW_CHUNK)
    * WINDOW_CHUNK attends three disjoint key sets, merged through their lse values (merge.py):
      1. window: every valid key in [max(S, c0 - window), i] exactly (window_attention, aligned);
      2. block: the <= ``block_size`` most recent valid keys of its LSH bucket before c0 - window, exactly
         (causal_bucket_block_attention);
      3. residual (``sample_size`` > 0, hyper): the other valid keys before c0 - window, estimated without bias from
         uniform samples (sampled_residual_attention).
    Returns out [B, H, N, Dv] float32, lse [B, H, N] and counts [B, H, N] float32 = keys attended exactly (1 + 2).
    ``stats`` (a dict of the caller's, or None) receives the key slots each part computed.
    """
    B, H, N, D = q.shape
    device = q.device
    # sizes past the sequence length run as the length itself (same output; memory and time follow N)
    window, block_size = min(int(window), N), min(int(block_size), N)
    sample_size = min(int(sample_size), MAX_SAMPLES_PER_KEY * N)
    qf, kf, vf = q.float(), k.float(), v.float()
    S = int(num_sink_tokens)
    not_sink = torch.arange(N, device=device) >= S
    valid = not_sink[None, :].expand(B, N) if key_valid is None else (key_valid & not_sink[None, :])
    C = min(WINDOW_CHUNK, N)
    out, lse, window_counts = window_attention(qf, kf, vf, window=window, scale=scale,
                                               key_valid=None if key_valid is None else key_valid,
                                               aligned=True, chunk=C, first_key=S)
    last_key = (torch.arange(N, device=device) // C) * C - int(window) - 1
    planes = random_hyperplanes(H, D, lsh_num_projs, generator, device)
    shift = lsh_num_projs - single_pass_bucket_bits(N, block_size, lsh_num_projs)
    ranks_q = lsh_ranks(qf, planes) >> shift
    ranks_k = lsh_ranks(kf, planes, valid) >> shift  # invalid keys: 2^P >> shift, above every query's bucket
    block_out, block_lse, block_counts, lo, hi, key_sorted_pos = causal_bucket_block_attention(
        qf, kf, vf, ranks_q=ranks_q, ranks_k=ranks_k, last_key=last_key, block_size=block_size, scale=scale, stats=stats)
    out, lse = merge_attention_into(out, lse, block_out, block_lse)
    if sample_size > 0:
        sample_out, sample_lse = sampled_residual_attention(qf, kf, vf, key_valid=valid.contiguous(), window=window,
                                                            sample_size=sample_size, generator=generator, scale=scale,
                                                            lo=lo, hi=hi, key_sorted_pos=key_sorted_pos, chunk=C)
        out, lse = merge_attention_into(out, lse, sample_out, sample_lse)
    if stats is not None:
        nch = -(-N // C)
        stats["window_pairs"] = nch * C * (int(window) + C)
        stats["sample_pairs"] = nch * C * int(sample_size)
    counts = window_counts[:, None, :] + block_counts
    return out, lse, counts
