"""Sorted-block attention shared by ``hyper``, ``sparse_hyper`` and ``kmv``: the LSH-sorted block diagonal and the
sampled residual of a batch of groups, with log-sum-exp values.

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

The whole call (non-causal, or causal through the recursion): causal_recursion.py. The single pass, the window,
the sinks and left padding: single_pass.py, window.py, sinks.py, padding.py.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .defaults import CAUSAL_QUERY_CHUNK_DIVISOR  # causal quadrants: chunks of block_size / 2

NEG_INF = float("-inf")


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
