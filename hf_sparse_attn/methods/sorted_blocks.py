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

Non-causal attention of a group (HyperAttention Algorithm 3 without the causal part; seed 002 Algorithm 1):
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

``sparse_hyper`` uses the same recursion with sample_size 0; its theory scale (seed 002 Definition 5.3) is
applied once on the merged result, with k_i = number of keys query i retained over all parts and n_i = number
of keys it may attend (see sparse_hyper.py and docs/methods/hyper.md).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .lsh import lsh_ranks, random_hyperplanes
from .merge import merge_attention

NEG_INF = float("-inf")
# Causal quadrants cut each key block's queries into chunks of block_size / 2 (at 32k, chunks of
# block_size were 57-65% full; block_size / 4 chunks were 85% full but gather every key block ~4.6 times).
CAUSAL_QUERY_CHUNK_DIVISOR = 2


# --------------------------------------------------------------------------------------------------------------
# The block kernel (torch path). kernels.sorted_block_attention dispatches here or to the Triton kernel.
# --------------------------------------------------------------------------------------------------------------

def _flash_cpu_op():
    """torch's fused CPU attention that also returns the log-sum-exp (a private aten op; None if absent)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def dense_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             bias: Optional[torch.Tensor] = None, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of small dense groups: q [G, M, D], k/v [G, L, D] float32, bias [G, L] (shared by the
    group's queries) or None; causal aligns query m with key m (M == L).

    Returns out [G, M, D] and lse [G, M]. Rows with no attendable key are *not* fixed here (callers know them).
    Uses torch's fused flash kernel on CPU (no [M, L] matrix), batched matmuls with an in-place softmax otherwise.
    When autograd needs the inputs: batched matmuls without in-place steps (the fused op gives no gradient through
    its lse, which the lse merges of the causal recursion and of the sinks need).
    """
    op = _flash_cpu_op()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [G, M, L]
        if bias is not None:
            scores = scores + bias[:, None, :]
        if causal:
            M, L = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(M, L, dtype=torch.bool, device=q.device).triu_(1), NEG_INF)
        # lse = log sum_j e^{s_j - m} + m for any constant m (the row max, detached); a row with no key keeps
        # out 0, lse -inf and a zero (never NaN) gradient
        row_max = scores.detach().amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(scores - row_max)
        denom = weights.sum(dim=-1)
        nonempty = denom > 0
        denom_safe = torch.where(nonempty, denom, torch.ones_like(denom))
        lse = torch.where(nonempty, torch.log(denom_safe) + row_max.squeeze(-1), torch.full_like(denom, NEG_INF))
        return torch.matmul(weights, v) / denom_safe.unsqueeze(-1), lse
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


# --------------------------------------------------------------------------------------------------------------
# Reused buffers
# --------------------------------------------------------------------------------------------------------------

_WORKSPACE: dict[tuple, torch.Tensor] = {}


def workspace(name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A reused buffer of ``shape`` with the dtype/device of ``like`` (contents undefined).

    One flat buffer per (name, dtype, device), grown when a larger one is asked for and kept between calls:
    large fresh allocations page-fault on every call on the project's VMs (DESIGN.md), costing more than the
    gathers. Only for intermediates that do not outlive the call and do not need autograd; not thread-safe
    (one attention call at a time per process, as in a model's forward). ``clear_workspace()`` frees them.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    key = (name, like.dtype, like.device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.pop(key, None)
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        _WORKSPACE[key] = buf
    return buf[:numel].view(shape)


def workspace_bytes() -> int:
    """Bytes held by the reused buffers of :func:`workspace`."""
    return sum(b.numel() * b.element_size() for b in _WORKSPACE.values())


def clear_workspace() -> None:
    """Free the reused buffers (they are re-created on the next call)."""
    _WORKSPACE.clear()


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
    on q_i and the keys; the queries of one key block are then cut into chunks of ``block_size`` / 2.
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
