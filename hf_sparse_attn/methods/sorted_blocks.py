"""Sorted-block attention shared by ``hyper`` and ``sparse_hyper``: the LSH-sorted block diagonal, the sampled
residual, the causal recursion, all with log-sum-exp values.

Notation (tensors float32 unless said otherwise):

    q [B, H, N, D], k/v [B, H, N, D]            the method's inputs, GQA already expanded
    q_order, k_order [G, M] int64               positions of one group's queries / keys in Gray-sorted LSH order
                                                (a group is one (batch, head) or one (batch, head, segment) pair)
    block_size = bq                             queries per block; a group of M_q queries has nb = ceil(M_q / bq)
                                                blocks; its M_k keys are cut into nb blocks of bk = ceil(M_k / nb)
    q_index [G*nb, bq], k_index [G*nb, L] int64 rows of the flattened q [B*H*N, D] / k [B*H*N, D] a block reads
                                                (L = bk, plus sample_size sampled keys for ``hyper``)
    bias [G*nb, L]                              additive score bias shared by the block's queries:
                                                0 = key attended, -inf = padded/masked key,
                                                log(n / s) = sampled key (HyperAttention's weight n/s)

Non-causal attention of a group (HyperAttention Algorithm 3 without the causal part; "Attention is Naturally Sparse", Algorithm 1):
query block b of the sorted order attends key block b exactly; with ``sample_size`` = s > 0 it also attends
s keys drawn uniformly (with replacement) from the group's n valid keys, each with weight n/s, except the
samples that fall inside key block b (they are already counted exactly: masking them out makes the estimate
of the off-block mass unbiased, E[(n/s) sum_t e^{s_{i j_t}} 1[j_t not in block]] = sum_{j not in block} e^{s_ij}).
Block keys and sampled keys are concatenated into one key set per block, so one softmax with the additive
bias gives both parts and their log-sum-exp merged exactly (merge.py's rule, done inside the kernel).

Causal attention (HyperAttention's recursion, flattened): pad N to N' = leaf * 2^m with leaf <= min_seq_len.
Query i attends
  * exactly (causal) the keys of its own leaf of ``leaf`` positions, and
  * for every level l = 0..m-1 with segment size S = N' / 2^l: if i lies in the second half of its segment,
    the first half of that segment, through the non-causal sorted-block attention above.
These key sets are disjoint and cover [0, i] exactly, so merging them through their lse values is the
recursion "diagonal halves causal (recursively), off-diagonal quadrant non-causal, exact below min_seq_len",
with all quadrants of one level computed in a single batched call. Positions of the padding sit after every
real query, so causality keeps them out; they are also masked as invalid keys.

``sparse_hyper`` uses the same recursion with sample_size 0; its theory scale ("Attention is Naturally Sparse", Definition 5.3) is
applied once on the merged result, with k_i = number of keys query i retained over all parts and n_i = number
of keys it may attend (see sparse_hyper.py and docs/methods/hyper.md).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

from .lsh import lsh_ranks, random_hyperplanes
from .merge import merge_attention

NEG_INF = float("-inf")
from .defaults import CAUSAL_QUERY_CHUNK_DIVISOR  # noqa: E402  (causal quadrants: chunks of block_size / 2)
from .registry import MAX_SAMPLES_PER_KEY  # noqa: E402  (sample sizes capped per key of the call)


@contextlib.contextmanager
def causal_query_chunk_divisor(divisor: int) -> Iterator[None]:
    """Process-local override of the query chunks of the causal quadrants, for measurements and tests
    (scripts/defaults_query_chunk.py): inside the ``with`` block, :func:`grouped_sorted_attention` cuts each key
    block's queries into chunks of max(1, block_size // ``divisor``); the previous value comes back on exit.

    It rebinds this module's global ``CAUSAL_QUERY_CHUNK_DIVISOR`` (read at every call; rebinding
    ``defaults.CAUSAL_QUERY_CHUNK_DIVISOR`` would not reach it), so it holds for every thread of the process
    while the block runs. The output does not depend on it: each query attends the same keys in any chunk.
    """
    global CAUSAL_QUERY_CHUNK_DIVISOR
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"causal_query_chunk_divisor: the divisor must be an int >= 1, got {divisor!r}")
    before = CAUSAL_QUERY_CHUNK_DIVISOR
    CAUSAL_QUERY_CHUNK_DIVISOR = divisor
    try:
        yield
    finally:
        CAUSAL_QUERY_CHUNK_DIVISOR = before


# --------------------------------------------------------------------------------------------------------------
# Reused buffers
# --------------------------------------------------------------------------------------------------------------

# Per-thread buffers, bounded and released on unpatch: see hf_sparse_attn/kernels/workspace.py. The block kernel's
# torch path (the reference of the Triton kernel) lives in hf_sparse_attn/kernels/sorted_blocks_torch.py.
from ..kernels.sorted_blocks_torch import (dense_attention_with_lse, flash_cpu_op,  # noqa: E402,F401
                                           softmax_attention_autograd, sorted_block_attention_torch)
from ..kernels.workspace import clear_workspace, workspace, workspace_bytes  # noqa: E402,F401


# --------------------------------------------------------------------------------------------------------------
# Building the blocks of one batched group call.
# --------------------------------------------------------------------------------------------------------------

def grouped_sorted_attention(q_flat: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, *,
                             q_rows: torch.Tensor, k_rows: torch.Tensor, k_valid: Optional[torch.Tensor],
                             block_size: int, sample_size: int, generator: torch.Generator, scale: float,
                             out_flat: torch.Tensor, lse_flat: torch.Tensor,
                             count_flat: Optional[torch.Tensor] = None,
                             q_ranks: Optional[torch.Tensor] = None, k_ranks_sorted: Optional[torch.Tensor] = None) -> None:
    """Non-causal sorted-block attention (+ sampled residual) of G groups in one call.

    q_rows [G, Mq] int64: rows of q_flat of each group's queries, in Gray-sorted LSH order.
    k_rows [G, Mk] int64: rows of k_flat of each group's keys in sorted order, invalid keys last.
    k_valid [G, Mk] bool (in the same sorted order) or None = all valid.
    Writes out_flat [Rq + 1, D], lse_flat [Rq + 1] (and count_flat [Rq + 1]: keys retained exactly) at q_rows.

    Query blocks. By default (``q_ranks`` None) query block b is the b-th run of ``block_size`` sorted queries
    (HyperAttention). That makes a query's block depend on the other queries' hashes, which is harmless without
    a causal mask but leaks the future in the causal recursion (a later query's hash could move an earlier one
    to another key block). With ``q_ranks`` [G, Mq] (the bucket rank of each query, in q_rows order, q_rows
    sorted by rank) and ``k_ranks_sorted`` [G, Mk], each query instead goes to the key block whose range of
    (rank, offset) it falls in: key block b starts at sorted key b*bk with composite c = rank * M + offset, and
    query i (composite rank_i * M + offset_i) goes to the last block starting at or before it. That depends only
    on q_i and the keys; the queries of one key block are then cut into chunks of ``block_size`` /
    CAUSAL_QUERY_CHUNK_DIVISOR (:func:`causal_query_chunk_divisor` overrides it).
    """
    G, Mq = q_rows.shape
    Mk = k_rows.shape[1]
    device = q_flat.device
    Rq = q_flat.shape[0]
    bq = min(block_size, Mq)
    nb = -(-Mq // bq)
    bk = -(-Mk // nb)

    chunk_block = None  # [G, nc] key block of each query chunk; None = chunk b reads key block b
    if q_ranks is None:
        q_index = q_rows
        if nb * bq != Mq:  # padded query slots write to the dump row Rq
            q_index = torch.cat([q_rows, q_rows.new_full((G, nb * bq - Mq), Rq)], dim=1)
        q_index = q_index.view(G, nb, bq)
        nc = nb
    else:
        bq = max(1, bq // CAUSAL_QUERY_CHUNK_DIVISOR)  # smaller chunks: less padding when blocks get uneven query counts
        M = max(Mq, Mk)
        k_offsets = (k_rows - k_rows.min(dim=1, keepdim=True).values)  # offsets of the keys inside the group
        k_comp = k_ranks_sorted * M + k_offsets
        boundaries = k_comp[:, ::bk][:, :nb].contiguous()  # [G, nb] composite of each block's first key
        q_offsets = q_rows - q_rows.min(dim=1, keepdim=True).values
        q_comp = q_ranks * M + q_offsets
        q_block = (torch.searchsorted(boundaries, q_comp.contiguous(), right=True) - 1).clamp_(min=0)  # [G, Mq] nondecreasing
        per_block = torch.zeros(G, nb, dtype=torch.int64, device=device).scatter_add_(1, q_block, torch.ones_like(q_block))
        chunks_per_block = -(-per_block // bq)
        chunk_start = chunks_per_block.cumsum(1) - chunks_per_block  # [G, nb]
        query_start = per_block.cumsum(1) - per_block
        within = torch.arange(Mq, device=device)[None, :] - torch.gather(query_start, 1, q_block)
        chunk = torch.gather(chunk_start, 1, q_block) + within // bq  # [G, Mq]
        nc = int(chunks_per_block.sum(1).max())
        q_index = q_rows.new_full((G, nc * bq), Rq)
        q_index.scatter_(1, chunk * bq + within % bq, q_rows)
        q_index = q_index.view(G, nc, bq)
        chunk_block = torch.zeros(G, nc, dtype=torch.int64, device=device).scatter_(1, chunk, q_block)

    k_index = k_rows
    valid = k_valid
    if nb * bk != Mk:
        k_index = torch.cat([k_rows, k_rows[:, :1].expand(G, nb * bk - Mk)], dim=1)
        pad_valid = torch.zeros(G, nb * bk - Mk, dtype=torch.bool, device=device)
        valid = torch.cat([k_valid if k_valid is not None else torch.ones(G, Mk, dtype=torch.bool, device=device), pad_valid], dim=1)
    k_index = k_index.view(G, nb, bk)
    valid = None if valid is None else valid.view(G, nb, bk)
    if chunk_block is not None:
        k_index = torch.gather(k_index, 1, chunk_block[:, :, None].expand(G, nc, bk))
        if valid is not None:
            valid = torch.gather(valid, 1, chunk_block[:, :, None].expand(G, nc, bk))
    bias = None
    if valid is not None:
        bias = torch.zeros(G, nc, bk, device=device).masked_fill_(~valid, NEG_INF)

    if count_flat is not None:
        per_chunk = valid.sum(-1).float() if valid is not None else torch.full((G, nc), float(bk), device=device)
        count_flat.index_copy_(0, q_index.reshape(-1), per_chunk[:, :, None].expand(G, nc, bq).reshape(-1))

    if sample_size > 0:
        n_valid = (k_valid.sum(1) if k_valid is not None else torch.full((G,), Mk, device=device)).to(torch.float32)  # [G]
        u = torch.rand(G, sample_size, generator=generator, device=generator.device).to(device)
        sorted_pos = (u * n_valid[:, None]).long().clamp_(max=Mk - 1)  # uniform over the n valid keys (sorted first)
        sample_rows = torch.gather(k_rows, 1, sorted_pos)  # [G, s]
        sample_block = sorted_pos // bk  # key block each sample falls in
        log_weight = torch.log(n_valid / sample_size)  # [G]; -inf where a group has no valid key
        own = chunk_block if chunk_block is not None else torch.arange(nb, device=device)[None, :].expand(G, nb)
        in_own_block = sample_block[:, None, :] == own[:, :, None]  # [G, nc, s]
        sample_bias = log_weight[:, None, None].expand(G, nc, sample_size).masked_fill(in_own_block, NEG_INF)
        k_index = torch.cat([k_index, sample_rows[:, None, :].expand(G, nc, sample_size)], dim=2)
        if bias is None:
            bias = torch.zeros(G, nc, bk, device=device)
        bias = torch.cat([bias, sample_bias], dim=2)

    L = k_index.shape[2]
    from ..kernels import sorted_block_attention  # lazy: Triton only on CUDA tensors

    sorted_block_attention(q_flat, k_flat, v_flat, q_index.reshape(G * nc, bq), k_index.reshape(G * nc, L),
                           None if bias is None else bias.reshape(G * nc, L), scale, out_flat, lse_flat,
                           may_have_empty_blocks=valid is not None)


# --------------------------------------------------------------------------------------------------------------
# The whole method: non-causal or causal, with masks, returning per-query retained-key counts when asked.
# --------------------------------------------------------------------------------------------------------------

def causal_levels(n: int, min_seq_len: int) -> tuple[int, int]:
    """(m, leaf): the causal recursion halves m times down to leaves of ``leaf`` <= max(min_seq_len, 1) positions."""
    if n <= min_seq_len:
        return 0, n
    m = math.ceil(math.log2(n / max(1, min_seq_len)))
    return m, -(-n // (1 << m))


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_sink_tokens: int, causal: bool,
                   scale: float, key_padding_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact attention of every query over the first ``num_sink_tokens`` = S keys (the "attention sinks").

    q [B, H, Nq, D], k/v [B, H, Nk, Dv] (any float dtype) with S <= Nk, key_padding_mask [B, Nk] bool or None.
    Returns out [B, H, Nq, Dv] float32, lse [B, H, Nq] (-inf and out 0 for a row with no attendable sink) and
    counts [B, H, Nq] float32 = number of sinks each query attended.

    One call of torch's fused attention with lse over the S sinks for all queries (O(Nq * S * D), no [Nq, S]
    score matrix kept); causal: the first min(S, Nq) rows, the only ones that may not see every sink, are then
    recomputed with the causal mask among the sinks (query i attends sink j only if j <= i). Padded sinks get
    bias -inf.
    """
    B, H, Nq, D = q.shape
    S = int(num_sink_tokens)
    Dv = v.shape[3]
    device = q.device
    qf = q.float().reshape(B * H, Nq, D)
    ks = k[:, :, :S].float().reshape(B * H, S, D)
    vs = v[:, :, :S].float().reshape(B * H, S, Dv)
    bias = None
    sink_valid = torch.ones(B, S, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        sink_valid = key_padding_mask[:, :S]
        if not bool(sink_valid.all()):
            bias = torch.zeros(B, 1, S, device=device).masked_fill_(~sink_valid[:, None, :], NEG_INF).expand(B, H, S).reshape(B * H, S)
    out, lse = dense_attention_with_lse(qf, ks, vs, scale, bias)  # [B*H, Nq, Dv], [B*H, Nq]: every sink
    counts = sink_valid.float().sum(-1)[:, None].expand(B, Nq)  # [B, Nq]
    if causal:
        head = min(S, Nq)
        out_head, lse_head = dense_attention_with_lse(qf[:, :head], ks[:, :head], vs[:, :head], scale,
                                                      None if bias is None else bias[:, :head], causal=True)
        if torch.is_grad_enabled() and out.requires_grad:  # the fused op keeps its output for backward
            out = torch.cat([out_head, out[:, head:]], dim=1)
            lse = torch.cat([lse_head, lse[:, head:]], dim=1)
        else:
            out[:, :head] = out_head
            lse[:, :head] = lse_head
        counts = torch.cat([sink_valid.float().cumsum(-1)[:, :head], counts[:, head:]], dim=1)
    out = out.view(B, H, Nq, Dv)
    lse = lse.view(B, H, Nq)
    counts = counts[:, None, :].expand(B, H, Nq)
    empty = counts == 0  # no attendable sink: 0 and -inf (the fused kernel may leave NaN there)
    if bool(empty.any()):
        out = out.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, NEG_INF)
    return out, lse, counts


def merge_sink_attention(out: torch.Tensor, lse: torch.Tensor, sink_out: torch.Tensor,
                         sink_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """merge.py's lse rule for the sorted-block part (out [B, H, N, Dv], lse [B, H, N]) and the sink part, written
    into ``out`` / ``lse`` (the caller's own fresh tensors) when no gradient is needed: fresh [B, H, N, Dv]
    temporaries page-fault on these VMs and cost more than the arithmetic. With autograd: merge_attention."""
    if torch.is_grad_enabled() and (out.requires_grad or sink_out.requires_grad):
        return merge_attention(out, lse, sink_out, sink_lse)
    merged = torch.logaddexp(lse, sink_lse)
    finite = torch.isfinite(merged)
    safe = torch.where(finite, merged, torch.zeros_like(merged))
    w_blocks = torch.where(finite, torch.exp(lse - safe), torch.zeros_like(safe))
    w_sinks = torch.where(finite, torch.exp(sink_lse - safe), torch.zeros_like(safe))
    out.mul_(w_blocks[..., None]).add_(sink_out.mul_(w_sinks[..., None]))
    lse.copy_(merged)
    return out, lse


def add_sinks_and_restore(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                          num_sinks: int, causal: bool, scale: float, key_padding_mask: Optional[torch.Tensor],
                          shift: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The common tail of the sink-aware methods: the sink part (keys 0..num_sinks-1, :func:`sink_attention`) merged
    into the rest's out [B, H, Nq, Dv] / lse [B, H, Nq] through their lse values, then left padding moved back
    (:func:`restore_leading_padding`; ``shift`` from :func:`leading_padding`, None when nothing was moved).
    q, k, v and key_padding_mask are the (rolled) inputs the rest was computed on."""
    if num_sinks > 0:
        sink_out, sink_lse, _ = sink_attention(q, k, v, num_sink_tokens=num_sinks, causal=causal, scale=scale,
                                               key_padding_mask=key_padding_mask)
        out, lse = merge_sink_attention(out, lse, sink_out, sink_lse)
    if shift is not None:
        out, lse = restore_leading_padding(out, lse, shift, k.shape[2], causal)
    return out, lse


def leading_padding(key_padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """shift [B] int64: the position of each row's first attendable key (0 for a row with none), or None when no
    row starts with padding. key_padding_mask [B, Nk] bool (True = attend) or None."""
    if key_padding_mask is None or bool(key_padding_mask[:, 0].all()):
        return None
    return key_padding_mask.int().argmax(dim=-1)  # argmax returns the first maximal position


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x [B, N] or [B, H, N] or [B, H, N, D], shift [B] int64 -> x rolled left by shift[b] along N in row b
    (element i of row b = element (i + shift[b]) mod N); a negative shift rolls right (the inverse)."""
    N = x.shape[1 if x.dim() == 2 else 2]
    index = (torch.arange(N, device=x.device)[None, :] + shift[:, None]) % N  # [B, N]
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    index = index[:, None, :] if x.dim() == 3 else index[:, None, :, None]
    return torch.gather(x, 2, index.expand(*x.shape))


def move_leading_padding_to_end(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor,
                                shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left padding moved behind each row's last key, so that the first positions (the attention sinks) are real
    tokens. q [B, H, Nq, D], k/v [B, H, Nk, D], key_padding_mask [B, Nk] bool, shift [B] from :func:`leading_padding`.

    Every key before position shift[b] is padding, so rolling row b left by shift[b] keeps the order of its real
    keys and the set each query may attend. Self-attention (Nq = Nk): the queries move with the keys, so a causal
    query still sees exactly the real keys at or before it, and a left-padded row is computed as its right-padded
    copy (same hashing order, same blocks). Returns (q, k, v, mask) in the rolled order; :func:`restore_leading_padding`
    puts the output back."""
    if q.shape[2] == k.shape[2]:
        q = _roll_rows(q, shift)
    return q, _roll_rows(k, shift), _roll_rows(v, shift), _roll_rows(key_padding_mask, shift)


def restore_leading_padding(out: torch.Tensor, lse: torch.Tensor, shift: torch.Tensor, num_keys: int,
                            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo :func:`move_leading_padding_to_end` on out [B, H, Nq, Dv] and lse [B, H, Nq] (nothing to undo when the
    queries did not move: Nq != num_keys). Causal: the padding queries before a row's first real token attend no
    key in place, so they get out 0 and lse -inf, as they would without the move."""
    if out.shape[2] != num_keys:
        return out, lse
    out, lse = _roll_rows(out, -shift), _roll_rows(lse, -shift)
    if causal:
        before_first = torch.arange(out.shape[2], device=out.device)[None, :] < shift[:, None]  # [B, Nq]
        out = out.masked_fill(before_first[:, None, :, None], 0.0)
        lse = lse.masked_fill(before_first[:, None, :], NEG_INF)
    return out, lse


def split_sink_keys(k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], num_sink_tokens: int,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The keys left for the sorted blocks once the first ``num_sink_tokens`` = S keys are attended as sinks.

    k/v [B, H, Nk, D], key_padding_mask [B, Nk] bool or None, 0 <= S <= Nk. Returns (k_rest, v_rest, rest_mask):
      * non-causal: k[:, :, S:], v[:, :, S:] and mask[:, S:] (or None): the sinks are hashed, blocked and sampled
        nowhere and the key blocks are cut from the Nk - S other keys;
      * causal: k, v unchanged and rest_mask [B, Nk] = mask with positions < S set False: the recursion needs the
        keys aligned with the queries, so the sinks become invalid keys (sorted last, masked in their block, never
        sampled; the n of the n/s sample weight counts only the other keys).
    With S = 0 the inputs come back unchanged. Together with :func:`sink_attention` this splits every row's key set
    into two disjoint parts, sinks {j < S} and rest {j >= S}, merged through their lse values (merge.py).
    """
    S = int(num_sink_tokens)
    if S == 0:
        return k, v, key_padding_mask
    if causal:
        not_sink = torch.arange(k.shape[2], device=k.device) >= S
        rest_mask = not_sink[None, :] if key_padding_mask is None else key_padding_mask & not_sink[None, :]
        return k, v, rest_mask.expand(k.shape[0], -1).contiguous()
    return k[:, :, S:], v[:, :, S:], None if key_padding_mask is None else key_padding_mask[:, S:]


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
            merged_lse = torch.logaddexp(sel_lse, new_lse)
            finite = torch.isfinite(merged_lse)
            safe = torch.where(finite, merged_lse, torch.zeros_like(merged_lse))
            w_old = torch.where(finite, torch.exp(sel_lse - safe), torch.zeros_like(safe))
            w_new = torch.where(finite, torch.exp(new_lse - safe), torch.zeros_like(safe))
            if no_grad:
                sel_out.mul_(w_old[..., None]).add_(new_out.mul_(w_new[..., None]))
                sel_lse.copy_(merged_lse)
            else:  # autograd: rebuild out / lse instead of writing into tensors saved for backward
                out6 = out.view(B, H, nseg, 2, half, Dv)
                merged_out = sel_out * w_old[..., None] + new_out * w_new[..., None]
                out = torch.stack([out6[:, :, :, 0], merged_out], dim=3).reshape(B, H, Np, Dv)
                lse = torch.stack([lse.view(B, H, nseg, 2, half)[:, :, :, 0], merged_lse], dim=3).reshape(B, H, Np)
            if want_counts:
                counts.view(B, H, nseg, 2, half)[:, :, :, 1].add_(level_count[:-1].view(B, H, nseg, 2, half)[:, :, :, 1])
    out = out[:, :, :N]
    lse = lse[:, :, :N]
    if counts is not None:
        counts = counts[:, :, :N]
    return out, lse, counts


# --------------------------------------------------------------------------------------------------------------
# Single-pass causal attention: sinks + exact local window + causal sorted-LSH block (+ sampled residual), one
# pass over the sequence instead of the recursion. Derivation and guarantees: docs/methods/hyper.md "Single pass".
# --------------------------------------------------------------------------------------------------------------

# Queries per chunk of the local window: each chunk reads one overlapping strided view of window + WINDOW_CHUNK keys,
# so a query computes window + WINDOW_CHUNK key slots for window + its offset in the chunk + 1 attended keys.
# Timed at 8k, window 256, one thread (no result file: a kernel-tuning constant): chunks of 32 / 64 / 128
# took 81 / 85 / 101 ms; 64 keeps the window's alignment slack (at most 63 extra keys) and the count of chunks small.
WINDOW_CHUNK = 64
# The causal LSH block's tiles advance by block_size / BLOCK_TILE_DIVISOR sorted keys and hold that many queries
# per chunk (each chunk computes block_size + block_size / BLOCK_TILE_DIVISOR key slots per query). Timed at 8k,
# block 256, one thread (a kernel-tuning constant): divisor 1 / 2 / 4 took 200 / 181 / 172 ms.
BLOCK_TILE_DIVISOR = 4
# The single pass picks its number of LSH buckets so that a bucket holds BUCKET_FILL x block_size keys on average
# (single_pass_bucket_bits): a query's past then holds ~block_size keys of its bucket half-way through the sequence.
BUCKET_FILL = 2
# Mask buffers are built for groups of chunks of at most this many float32 elements (16 MB), into reused buffers.
MASK_BUDGET_ELEMENTS = 1 << 22


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def masked_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                              mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of 4-D groups with an additive mask: q [G, P, M, D], k/v [G, P, L, D] (any strides),
    mask float32 broadcastable to [G, P, M, L] (0 = attend, -inf = not) or None. Returns out [G, P, M, Dv] and
    lse [G, P, M] float32. Rows with no attendable key are *not* fixed here: callers know them from their counts.

    No gradient needed: torch's fused CPU flash op (no [M, L] matrix kept). With autograd: matmuls and a softmax
    with a detached row max (the fused op gives no gradient through its lse, which the lse merges need).
    """
    if _needs_grad(q, k, v):
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


def _empty_rows_to_zero(out: torch.Tensor, lse: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out [..., N, Dv], lse [..., N]; rows where ``empty`` (broadcastable to lse) get 0 and -inf."""
    if not bool(empty.any()):
        return out, lse
    return out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, NEG_INF)


def merge_parts(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """merge.py's lse rule for two disjoint key sets; in place into ``out`` / ``lse`` when no gradient is needed
    (both are the caller's own fresh tensors). out* [B, H, N, Dv], lse* [B, H, N]."""
    return merge_sink_attention(out, lse, out_b, lse_b)


def band_mask_rows(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows band masks are gathered from: from_rows [length + 1, length] (row a: 0 at slots >= a, -inf before)
    and below_rows [length + 1, length] (row b: 0 at slots < b, -inf from b on). The additive mask of the slots
    [a, b) is from_rows[a] + below_rows[b]: two row gathers and an add instead of comparisons per element."""
    t = torch.arange(length, device=device)[None, :]
    a = torch.arange(length + 1, device=device)[:, None]
    zeros = torch.zeros(length + 1, length, device=device)
    return zeros.masked_fill(t < a, NEG_INF), zeros.masked_fill(t >= a, NEG_INF)


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

    needs_grad = _needs_grad(q, k, v)
    if needs_grad:
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
        group = dirty_chunks.numel() if needs_grad else max(1, MASK_BUDGET_ELEMENTS // (G * C * L))
        for start in range(0, dirty_chunks.numel(), group):
            idx = dirty_chunks[start:start + group]
            nd = idx.numel()
            key_rows = (group_base + slot_pos[idx].clamp(0, N - 1)[None]).reshape(-1)  # [G * nd * L]
            q_pos = (idx[:, None] * C + rows_in_chunk[None, :]).clamp(max=N - 1)  # [nd, C]
            q_rows = (group_base + q_pos[None]).reshape(-1)
            key_bias = torch.zeros(B, nd, 1, L, device=device).masked_fill_(~ok[:, idx, None, :], NEG_INF)
            if needs_grad:
                qs, ks, vs = q_flat.index_select(0, q_rows), k_flat.index_select(0, key_rows), v_flat.index_select(0, key_rows)
                mask = (base_mask[None, None] + key_bias)[:, None]  # [B, 1, nd, C, L]
            else:
                qs = torch.index_select(q_flat, 0, q_rows, out=workspace("window_q", (G * nd * C, D), q_flat))
                ks = torch.index_select(k_flat, 0, key_rows, out=workspace("window_k", (G * nd * L, D), k_flat))
                vs = torch.index_select(v_flat, 0, key_rows, out=workspace("window_v", (G * nd * L, Dv), v_flat))
                mask = torch.add(base_mask[None, None], key_bias, out=workspace("window_mask", (B, nd, C, L), q_flat))[:, None]
            if needs_grad:
                o, s = masked_attention_with_lse(qs.view(B, H, nd, C, D), ks.view(B, H, nd, L, D),
                                                 vs.view(B, H, nd, L, Dv), scale, mask)
            else:  # the fused op takes 4-D inputs: one call per batch row, its mask broadcast over the heads
                q5, k5, v5 = qs.view(B, H, nd, C, D), ks.view(B, H, nd, L, D), vs.view(B, H, nd, L, Dv)
                parts = [masked_attention_with_lse(q5[b], k5[b], v5[b], scale, mask[b]) for b in range(B)]
                o = parts[0][0] if B == 1 else torch.stack([p_[0] for p_ in parts])
                s = parts[0][1] if B == 1 else torch.stack([p_[1] for p_ in parts])
            cols = (idx[:, None] * C + rows_in_chunk[None, :]).reshape(-1)  # [nd * C] rows of out
            if needs_grad:
                out = out.index_copy(1, cols, o.reshape(G, nd * C, Dv))
                lse = lse.index_copy(1, cols, s.reshape(G, nd * C))
            else:
                out.index_copy_(1, cols, o.reshape(G, nd * C, Dv))
                lse.index_copy_(1, cols, s.reshape(G, nd * C))
    out = out.view(B, H, nch * C, Dv)[:, :, :N]
    lse = lse.view(B, H, nch * C)[:, :, :N]
    out, lse = _empty_rows_to_zero(out, lse, (counts == 0)[:, None, :])
    return out, lse, counts


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

    needs_grad = _needs_grad(qf, kf, vf)
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
        if needs_grad:
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
        if needs_grad:
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
    needs_grad = _needs_grad(qf, kf, vf)
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
        if needs_grad:
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
    return _empty_rows_to_zero(out, lse, ~nonempty)


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
    out, lse = merge_parts(out, lse, block_out, block_lse)
    if sample_size > 0:
        sample_out, sample_lse = sampled_residual_attention(qf, kf, vf, key_valid=valid.contiguous(), window=window,
                                                            sample_size=sample_size, generator=generator, scale=scale,
                                                            lo=lo, hi=hi, key_sorted_pos=key_sorted_pos, chunk=C)
        out, lse = merge_parts(out, lse, sample_out, sample_lse)
    if stats is not None:
        nch = -(-N // C)
        stats["window_pairs"] = nch * C * (int(window) + C)
        stats["sample_pairs"] = nch * C * int(sample_size)
    counts = window_counts[:, None, :] + block_counts
    return out, lse, counts
